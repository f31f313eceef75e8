"""walredod.wal against pg_waldump on real PostgreSQL 15 WAL, and on copies damaged the ways real copies are."""

from __future__ import annotations

import shutil
import struct

import pytest

from waldump import waldump
from walredod.types import BufferTag, format_lsn
from walredod.pg15 import RM_HEAP_ID
from walredod.wal import (
    XLOG_BLCKSZ, XLP_FIRST_IS_CONTRECORD, WalDecodeError, WalReader, decode_record, maxalign, verify_crc,
)

_page_info = struct.Struct("<xxH").unpack_from
_page_rem_len = struct.Struct("<I").unpack_from


def segments(wal_dir):
    return sorted(p for p in wal_dir.iterdir() if len(p.name) == 24)


def our_view(record):
    """A record as pg_waldump -b shows it."""
    blocks = [(b.block_id, tuple(b.tag),
               (b.apply_image, b.hole_offset, b.hole_length, b.image_compression) if b.has_image else None)
              for b in record.blocks]
    rec_len = record.tot_len - sum(len(b.image) for b in record.blocks)
    return (record.rmgr_name, rec_len, record.tot_len, record.xid, record.start_lsn, record.prev, blocks)


def their_view(dumped):
    return (dumped.rmgr, dumped.rec_len, dumped.tot_len, dumped.xid, dumped.lsn, dumped.prev, dumped.blocks)


def assert_matches_waldump(wal_dir):
    reader = WalReader(wal_dir)
    ours = list(reader.records())
    theirs, their_end = waldump(wal_dir, ours[0].start_lsn)
    assert len(ours) == len(theirs)
    for mine, dumped in zip(ours, theirs):
        assert our_view(mine) == their_view(dumped)
    assert_same_end(reader, their_end)
    return reader, ours


def assert_same_end(reader, their_end):
    """pg_waldump names the page a torn last record should continue on; we name the record (where WAL ends)."""
    if reader.end_lsn != their_end:
        assert "incomplete" in reader.end_reason and f"page {format_lsn(their_end)}" in reader.end_reason, (
            reader.end_reason, format_lsn(their_end))


@pytest.fixture(scope="module")
def scenario_records(scenario):
    reader = WalReader(scenario.wal_dir)
    return reader, list(reader.records())


@pytest.fixture(scope="module")
def small_records(small_wal):
    reader = WalReader(small_wal)
    return reader, list(reader.records())


def test_scenario_wal_matches_pg_waldump(scenario):
    """16 MB segments, every page rmgr, images compressed with pglz, lz4 and zstd."""
    _, records = assert_matches_waldump(scenario.wal_dir)
    methods = {b.image_compression for r in records for b in r.blocks if b.has_image}
    assert {None, "pglz", "lz4", "zstd"} <= methods


def test_small_segment_wal_matches_pg_waldump(small_wal):
    reader, records = assert_matches_waldump(small_wal)
    assert reader.segment_size == 1 << 20
    assert "never written" in reader.end_reason or "written so far ends here" in reader.end_reason


def test_records_cross_pages_and_segments(small_records):
    reader, records = small_records
    size = reader.segment_size
    crossing_pages = [r for r in records if r.start_lsn // XLOG_BLCKSZ != (r.start_lsn + r.tot_len - 1) // XLOG_BLCKSZ]
    crossing_segments = [r for r in records if r.start_lsn // size != (r.end_lsn - 1) // size and not r.is_switch]
    assert crossing_pages and crossing_segments
    for record in records:
        assert verify_crc(record.raw)
        assert record.end_lsn % 8 == 0 and record.end_lsn >= record.start_lsn + record.tot_len


def test_switch_record_ends_at_next_segment(small_records):
    reader, records = small_records
    switches = [i for i, r in enumerate(records) if r.is_switch]
    assert switches, "the workload switches WAL segments"
    for i in switches:
        assert records[i].end_lsn % reader.segment_size == 0
        assert records[i + 1].start_lsn == records[i].end_lsn + 40  # after the next segment's long page header
        assert records[i + 1].prev == records[i].start_lsn


def test_copy_starting_mid_segment(small_records, small_wal, tmp_path):
    """A replica's copy: earlier segments absent, the first pages of its first segment zeroed, and its first valid
    page starting with the tail of an earlier record. Reading starts at the first record after that tail."""
    reader, records = small_records
    segment_files = segments(small_wal)
    first = segment_files[1]
    data = bytearray(first.read_bytes())
    page = next(p for p in range(5, len(data) // XLOG_BLCKSZ)
                if _page_info(data, p * XLOG_BLCKSZ)[0] & XLP_FIRST_IS_CONTRECORD
                and _page_rem_len(data, p * XLOG_BLCKSZ + 16)[0] < XLOG_BLCKSZ - 24)
    data[:page * XLOG_BLCKSZ] = bytes(page * XLOG_BLCKSZ)
    copy = tmp_path / "wal"
    copy.mkdir()
    (copy / first.name).write_bytes(data)
    for path in segment_files[2:]:
        shutil.copy(path, copy)

    page_lsn = (reader.first_segment_lsn // reader.segment_size + 1) * reader.segment_size + page * XLOG_BLCKSZ
    expected_start = page_lsn + 24 + maxalign(_page_rem_len(data, page * XLOG_BLCKSZ + 16)[0])
    copied = WalReader(copy)
    resumed = list(copied.records())
    assert copied.start_lsn == expected_start
    full = [r for r in records if r.start_lsn >= expected_start]
    assert [(r.start_lsn, r.raw) for r in resumed] == [(r.start_lsn, r.raw) for r in full]
    assert copied.end_lsn == reader.end_lsn


def test_corrupted_record_ends_valid_wal(small_records, small_wal, tmp_path):
    reader, records = small_records
    victim = records[len(records) // 2]
    copy = shutil.copytree(small_wal, tmp_path / "wal")
    segno, offset = divmod(victim.start_lsn + 20, reader.segment_size)  # flip a bit of xl_crc itself
    path = copy / reader._segment_name(segno)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(data)

    damaged = WalReader(copy)
    kept = list(damaged.records())
    assert [r.start_lsn for r in kept] == [r.start_lsn for r in records[:len(records) // 2]]
    assert damaged.end_lsn == victim.start_lsn
    assert "CRC32C mismatch" in damaged.end_reason
    _, their_end = waldump(copy, records[0].start_lsn)
    assert their_end == victim.start_lsn


def test_recycled_segment_ends_valid_wal(small_records, small_wal, tmp_path):
    """A segment file holding an older segment's pages (as after recycling) is not WAL for this position."""
    reader, records = small_records
    copy = shutil.copytree(small_wal, tmp_path / "wal")
    names = [p.name for p in segments(copy)]
    shutil.copy(copy / names[1], copy / names[3])
    damaged = WalReader(copy)
    kept = list(damaged.records())
    boundary = (reader.first_segment_lsn // reader.segment_size + 3) * reader.segment_size
    assert kept and all(r.end_lsn <= boundary for r in kept)
    assert damaged.end_lsn <= boundary < damaged.end_lsn + reader.segment_size
    assert "recycled segment" in damaged.end_reason


def test_missing_segment_ends_valid_wal(small_records, small_wal, tmp_path):
    reader, records = small_records
    copy = shutil.copytree(small_wal, tmp_path / "wal")
    names = [p.name for p in segments(copy)]
    (copy / names[2]).unlink()
    damaged = WalReader(copy)
    list(damaged.records())
    assert "missing" in damaged.end_reason and names[2] in damaged.end_reason


def test_start_lsn_reads_from_that_record(small_records, small_wal):
    reader, records = small_records
    middle = records[len(records) // 3]
    again = list(WalReader(small_wal).records(middle.start_lsn))
    assert [r.start_lsn for r in again] == [r.start_lsn for r in records[len(records) // 3:]]


# --- decode_record on hand-made records: structure errors are named -----------------------------------------------

def _record(body: bytes, rmid: int = RM_HEAP_ID) -> bytes:
    return struct.pack("<IIQBB2xI", 24 + len(body), 7, 0, 0, rmid, 0) + body


def test_decode_block_reference_and_main_data():
    body = (bytes([0, 0x20]) + struct.pack("<H", 3) + struct.pack("<IIII", 1663, 5, 16384, 9)
            + bytes([255, 2]) + b"abc" + b"xy")
    record = decode_record(_record(body))
    (block,) = record.blocks
    assert block.tag == BufferTag(1663, 5, 16384, 0, 9)
    assert block.has_data and block.data == b"abc" and not block.has_image and not block.will_init
    assert record.main_data == b"xy"


@pytest.mark.parametrize("body, message", [
    (bytes([40]), "invalid block id 40"),
    (bytes([1, 0x00]) + struct.pack("<H", 0) + struct.pack("<IIII", 1, 2, 3, 4) + bytes([0, 0x80])
     + struct.pack("<H", 0) + struct.pack("<I", 5), "out of order"),
    (bytes([0, 0x80]) + struct.pack("<H", 0) + struct.pack("<I", 5), "same relation"),
    (bytes([0, 0x20]) + struct.pack("<H", 0) + struct.pack("<IIII", 1, 2, 3, 4), "data flag"),
    (bytes([255, 10]) + b"short", "announce 10 bytes"),
    (bytes([0, 0x00]) + struct.pack("<H", 0), "ends inside"),
])
def test_decode_names_structure_errors(body, message):
    with pytest.raises(WalDecodeError, match=message):
        decode_record(_record(body))


def test_decode_refuses_length_mismatch():
    with pytest.raises(WalDecodeError, match="xl_tot_len"):
        decode_record(_record(b"") + b"z")
