"""RedoEngine on real records: histories from real WAL, damaged real records, a redo that fails inside PostgreSQL,
and a long soak. Hand-made bad input and misbehaving children are in test_engine_bad_input.py.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from records import expected_after_fpi, fpi_record, make_page

from walredod.engine import RedoEngine
from walredod.engine.datadir import CHILD_DATADIRS
from walredod.engine.pipe import encode_request
from walredod.errors import InvalidRequest, RedoFailed
from walredod.types import ZERO_PAGE, BufferTag, WalRecord

SCRATCH_DATABASE = "4000000000"  # the extension's scratch relations live in this database directory


@pytest.fixture(scope="module")
def engine(redo_engine):
    return redo_engine


@pytest.fixture(scope="module")
def good_requests(real_requests):
    """Real pages with a base image and at least three records, with PostgreSQL's page for each."""
    return [r for r in real_requests if r[0].forknum == 0 and r[2] is not None and len(r[3]) >= 3][:50]


def assert_serves(engine, good_requests):
    tag, lsn, base, records, expected = good_requests[0]
    assert engine.redo(tag, lsn, base, records) == expected


# --- what it serves -----------------------------------------------------------------------------------------------

def test_real_histories_match_postgres(engine, good_requests):
    assert len(good_requests) == 50
    for tag, lsn, base, records, expected in good_requests:
        assert engine.redo(tag, lsn, base, records) == expected


def test_no_records(engine):
    tag = BufferTag(1663, 5, 16384, 0, 7)
    assert engine.redo(tag, 100, None, []) == ZERO_PAGE
    image = make_page(0x5A, [b"a tuple"])
    assert engine.redo(tag, 100, image, []) == image


def test_full_page_image_record_sets_the_end_lsn(engine):
    for tag in (BufferTag(1663, 5, 16384, 0, 3), BufferTag(1663, 5, 16384, 3, 0),  # main and init fork
                BufferTag(1663, 5, 16384, 0, 10_000_000)):  # far past 1 GB: segment files never written
        image = make_page(0x22, [b"new tuple" * 9])
        page = engine.redo(tag, 0x2000_0000, make_page(0x11), [WalRecord(0x1234_5678, fpi_record(tag, image))])
        assert page == expected_after_fpi(image, 0x1234_5678)
        assert struct.unpack_from("<II", page) == (0, 0x1234_5678)


def test_ping_and_stats(engine):
    before = engine.stats.requests
    engine.ping()
    engine.redo(BufferTag(1663, 5, 1, 0, 0), 1, None, [])
    assert engine.stats.requests == before + 1


def test_flipped_byte_in_a_real_record(engine, good_requests):
    tag, lsn, base, records, _ = good_requests[1]
    damaged = bytearray(records[-1].data)
    damaged[len(damaged) // 2] ^= 0x40
    with pytest.raises(InvalidRequest, match="CRC"):
        engine.redo(tag, lsn, base, [*records[:-1], WalRecord(records[-1].lsn, bytes(damaged))])
    assert_serves(engine, good_requests)


def test_truncated_record(engine, good_requests):
    tag, lsn, base, records, _ = good_requests[2]
    short = records[0].data[:-5]
    with pytest.raises(InvalidRequest, match="xl_tot_len"):  # caught before the child
        engine.redo(tag, lsn, base, [WalRecord(records[0].lsn, short)])
    # The child's own check: a message whose length disagrees with the record's.
    message = encode_request(tag, base, [WalRecord(records[0].lsn, short)])
    with pytest.raises(InvalidRequest, match="xl_tot_len"):
        engine._call(message, 10)
    assert_serves(engine, good_requests)


def test_record_for_another_block(engine, good_requests):
    tag, lsn, base, records, _ = good_requests[3]
    other = tag._replace(blkno=tag.blkno + 1000)
    with pytest.raises(InvalidRequest, match="does not reference the target block"):
        engine.redo(other, lsn, None, records)
    assert_serves(engine, good_requests)


def test_redo_failure_inside_postgres(engine, good_requests, panicking_request):
    """A valid record applied to a page it does not fit: PostgreSQL's redo PANICs, we answer RedoFailed."""
    with pytest.raises(RedoFailed, match="PANIC"):
        engine.redo(*panicking_request)
    assert_serves(engine, good_requests)


def test_close_stops_every_child_and_removes_datadirs(engine_data_dir, good_requests):
    engine = RedoEngine(data_dir=engine_data_dir, source_logs_hint_bits=True)
    pids = [engine.child_pid, engine.spare_pid]
    datadirs = {datadir for datadir in (Path(engine_data_dir) / CHILD_DATADIRS).iterdir()
                if datadir.name.startswith(f"{os.getpid()}-")}
    assert_serves(engine, good_requests)
    engine.close()
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    left = {s for s in (Path(engine_data_dir) / CHILD_DATADIRS).iterdir() if s.name.startswith(f"{os.getpid()}-")}
    assert left < datadirs  # this engine's child datadirs are gone; the module's engine keeps its own


# --- soak ---------------------------------------------------------------------------------------------------------

def memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value)
    return fields


def scratch_files(data_dir: Path) -> list[Path]:
    return [p for datadir in (data_dir / CHILD_DATADIRS).iterdir()
            for p in (datadir / "base" / SCRATCH_DATABASE).iterdir()]


def test_soak_100k_requests_memory_flat_nothing_written(engine_data_dir, good_requests):
    """100,000 requests of every shape: the child's memory stays flat and its scratch relations stay empty."""
    with RedoEngine(data_dir=engine_data_dir, source_logs_hint_bits=True, keep_spare=False) as engine:
        pid = engine.child_pid
        far = BufferTag(1663, 5, 16384, 0, 500_000)  # past the first 1 GB segment

        def one(i: int) -> None:
            kind = i % 4
            if kind == 0:
                engine.ping()
            elif kind == 1:
                engine.redo(far._replace(blkno=131_072 + i), 0x100, None,
                            [WalRecord(0x100, fpi_record(far._replace(blkno=131_072 + i), make_page(i % 251)))])
            else:
                tag, lsn, base, records, expected = good_requests[i % len(good_requests)]
                assert engine.redo(tag, lsn, base, records) == expected

        for i in range(10_000):
            one(i)
        warm = memory_kb(pid)
        for i in range(10_000, 100_000):
            one(i)
        end = memory_kb(pid)
        assert engine.child_pid == pid  # no restart along the way
        assert end["Anonymous"] - warm["Anonymous"] < 256, (warm, end)
        assert end["Rss"] - warm["Rss"] < 1024, (warm, end)
        files = scratch_files(Path(engine_data_dir))
        assert files and all(f.stat().st_size == 0 and f.stat().st_blocks == 0 for f in files)
