"""Objects rebuilt in Python (pg_xact, pg_multixact, relation maps, two-phase state) and visibility-map pages,
against PostgreSQL's own recovery of the same WAL; and the bit-level helpers against slow, obvious models."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings, strategies as st

from conftest import report_comparison
from walredod.errors import InvalidRequest
from groundtruth.cluster import read_object
from walredod.ingest import object_histories
from walredod.native import slru, synthesized, visibilitymap
from walredod.native.rebuild import decode_history_record, rebuild_object, rebuild_visibility_map_page
from walredod.native.xact import parse_transaction_end
from walredod.objects import RelMapTag, SlruKind, SlruPageTag, TwoPhaseTag
from walredod.types import BLCKSZ, BufferTag, WalRecord


def kind_of(tag) -> str:
    if isinstance(tag, SlruPageTag):
        return SlruKind(tag.kind).name.lower()
    if isinstance(tag, BufferTag):
        return "visibility map"
    return {RelMapTag: "relation map", TwoPhaseTag: "two-phase state"}[type(tag)]


@pytest.mark.postgres
@pytest.mark.parametrize("cut_index", [0, 1])
def test_every_touched_object_matches_postgres_recovery(scenario, wal_records, redo_engine, cut_index):
    cut = scenario.cuts[cut_index]
    checked: collections.Counter = collections.Counter()
    records_applied: collections.Counter = collections.Counter()
    skipped: collections.Counter = collections.Counter()
    mismatches = []
    for tag, history in object_histories(wal_records, since_lsn=cut).items():
        expected = read_object(scenario.final_dir, tag)
        base = None if history.starts_empty else read_object(scenario.recovered[cut], tag)
        if isinstance(tag, BufferTag):
            if expected is None:
                skipped["visibility map page gone at the end (relation dropped or truncated)"] += 1
                continue
            rebuilt = rebuild_visibility_map_page(redo_engine, tag, history.lsn, base, history.records)
        else:
            rebuilt = rebuild_object(tag, base, history.records)
        checked[kind_of(tag)] += 1
        records_applied[kind_of(tag)] += len(history.records)
        if rebuilt != expected:
            mismatches.append(f"{tag}: {len(history.records)} records; ours "
                              f"{'absent' if rebuilt is None else len(rebuilt)}, PostgreSQL's "
                              f"{'absent' if expected is None else len(expected)}")

    report_comparison(f"cut {cut_index + 1}: objects rebuilt in Python and compared, {len(mismatches)} mismatches",
                      ("object", "checked", "records"),
                      {kind: (checked[kind], records_applied[kind]) for kind in checked}, skipped)
    assert not mismatches, "\n".join(mismatches[:20])
    for kind in ("clog", "multixact_offsets", "multixact_members", "relation map", "two-phase state",
                 "visibility map"):
        assert checked[kind] > 0, kind


def test_synthesized_transaction_status_equals_raw_records(scenario, wal_records):
    """A pageserver may keep "set status" records instead of raw commits: same page either way."""
    cut = scenario.cuts[0]
    for tag, history in object_histories(wal_records, since_lsn=cut).items():
        if not isinstance(tag, SlruPageTag) or tag.kind != SlruKind.CLOG:
            continue
        converted = []
        for record in history.records:
            decoded = decode_history_record(record)
            end = parse_transaction_end(decoded)
            if end is None:
                converted.append(record)
            else:
                converted.append(WalRecord(record.lsn, synthesized.encode(
                    synthesized.SetClogStatus(end.xids, end.status))))
        base = read_object(scenario.recovered[cut], tag)
        assert rebuild_object(tag, base, converted) == rebuild_object(tag, base, history.records)


def test_records_that_do_not_change_the_object_are_refused(scenario, wal_records):
    histories = object_histories(wal_records)
    clog = next(h for t, h in histories.items() if isinstance(t, SlruPageTag) and t.kind == SlruKind.CLOG)
    relmap = next(h for t, h in histories.items() if isinstance(t, RelMapTag))
    with pytest.raises(InvalidRequest, match="does not change"):
        rebuild_object(SlruPageTag(SlruKind.CLOG, 999), None, clog.records[:1])
    with pytest.raises(InvalidRequest, match="relation-map"):
        rebuild_object(RelMapTag(1663, 424242), None, relmap.records[:1])
    with pytest.raises(InvalidRequest, match="do not change|only"):
        rebuild_object(TwoPhaseTag(5), None, relmap.records[:1])
    damaged = bytearray(relmap.records[0].data)
    damaged[-1] ^= 1
    with pytest.raises(InvalidRequest, match="CRC"):
        rebuild_object(relmap.tag, None, [WalRecord(relmap.records[0].lsn, bytes(damaged))])
    with pytest.raises(InvalidRequest, match="synthesized record type"):
        rebuild_object(clog.tag, None, [WalRecord(1, b"WRSY\x63")])


# --- bit-level helpers against slow models ------------------------------------------------------------------------

@given(st.integers(0, 3), st.lists(st.tuples(st.integers(0, 3 * slru.CLOG_XACTS_PER_PAGE), st.sampled_from([1, 2])),
                                   max_size=60))
@settings(max_examples=150)
def test_clog_bits_against_a_model(pageno, changes):
    page = bytearray(BLCKSZ)
    model = {}
    for xid, status in changes:
        slru.set_clog_status(page, pageno, [xid], status)
        if xid // slru.CLOG_XACTS_PER_PAGE == pageno:
            model[xid] = status
    for index in range(slru.CLOG_XACTS_PER_PAGE):
        xid = pageno * slru.CLOG_XACTS_PER_PAGE + index
        bits = (page[index // 4] >> (2 * (index % 4))) & 3
        assert bits == model.get(xid, 0)


@given(st.integers(0, 2**32 - 1), st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 5)), max_size=40))
@settings(max_examples=150)
def test_multixact_members_against_a_model(first_offset, members):
    pageno = slru.members_page_of(first_offset)
    page = bytearray(BLCKSZ)
    slru.set_multixact_members(page, pageno, first_offset, members)
    model = bytearray(BLCKSZ)
    for i, (xid, status) in enumerate(members):
        offset = (first_offset + i) % 2**32
        if offset // slru.MEMBERS_PER_PAGE == pageno:
            group, slot = divmod(offset % slru.MEMBERS_PER_PAGE, 4)
            model[group * 20 + slot] = status
            model[group * 20 + 4 + 4 * slot:group * 20 + 8 + 4 * slot] = xid.to_bytes(4, "little")
    assert page == model


@given(st.integers(0, 2), st.lists(st.integers(0, 3 * visibilitymap.HEAPBLOCKS_PER_PAGE), max_size=30),
       st.sampled_from([1, 2, 3]), st.integers(0, 3 * visibilitymap.HEAPBLOCKS_PER_PAGE))
@settings(max_examples=150)
def test_visibility_map_clear_and_truncate_against_a_model(map_block, heap_blocks, flags, nblocks):
    page = bytearray(visibilitymap.new_page())
    page[24:] = b"\xff" * (BLCKSZ - 24)
    first = map_block * visibilitymap.HEAPBLOCKS_PER_PAGE
    model = {first + i: 3 for i in range(visibilitymap.HEAPBLOCKS_PER_PAGE)}
    visibilitymap.clear(page, map_block, synthesized.ClearVisibilityMapFlags(tuple(heap_blocks), flags))
    for block in heap_blocks:
        if block in model:
            model[block] &= ~flags
    removed = visibilitymap.truncate(page, map_block, synthesized.TruncateVisibilityMap(nblocks))
    assert removed == (nblocks <= first)
    if removed:
        return
    for block in model:
        if block >= nblocks:
            model[block] = 0
    for block, bits in model.items():
        index = block - first
        assert (page[24 + index // 4] >> (2 * (index % 4))) & 3 == bits


def _clog_record(info: int, pageno: int) -> WalRecord:
    import crc32c
    import struct

    body = bytes([255, 12]) + struct.pack("<iII", pageno, 3, 5)  # main data: pageno (+ truncate's xid, db)
    header = struct.pack("<IIQBB2x", 24 + len(body), 0, 0, info, 3)
    crc = crc32c.crc32c(header, crc32c.crc32c(body))
    return WalRecord(0x100, header + struct.pack("<I", crc) + body)


def test_clog_zero_and_truncate():
    page = bytearray(b"\x55" * BLCKSZ)
    assert rebuild_object(SlruPageTag(SlruKind.CLOG, 40), bytes(page), [_clog_record(0x00, 40)]) == bytes(BLCKSZ)
    # Truncating at page 70 removes whole segments before page 64's segment (pages 0..63), not page 64's.
    assert rebuild_object(SlruPageTag(SlruKind.CLOG, 40), bytes(page), [_clog_record(0x10, 70)]) is None
    with pytest.raises(InvalidRequest, match="does not change"):
        rebuild_object(SlruPageTag(SlruKind.CLOG, 64), bytes(page), [_clog_record(0x10, 70)])
    # Circular: just after wraparound, the last pages of the xid space precede the first ones.
    assert slru.clog_truncation_removes(slru.CLOG_PAGES - 1, 40)
    assert not slru.clog_truncation_removes(41, slru.CLOG_PAGES - 1)
