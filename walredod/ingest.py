"""From decoded WAL to per-page histories: what a pageserver keeps and later hands to redo.

A relation page's history is the ordered list of records that reference it by a block reference. Relation-level
records change what a history means: a truncation cuts the pages past the new end (they start over as
non-existent), and creating a relation file starts its pages from nothing.

Only block references are followed here. Pages changed by side effect, without a reference (visibility-map bits
cleared by heap records, transaction status pages) need records of their own; see the native-redo modules.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from walredod.native import slru, synthesized
from walredod.native.visibilitymap import map_block_of
from walredod.native.xact import parse_transaction_end, prepared_state
from walredod.pg15 import (
    RM_CLOG_ID, RM_HEAP2_ID, RM_HEAP_ID, RM_MULTIXACT_ID, RM_RELMAP_ID, RM_SMGR_ID, XLOG_HEAP2_LOCK_UPDATED,
    XLOG_HEAP2_MULTI_INSERT, XLOG_HEAP_DELETE, XLOG_HEAP_HOT_UPDATE, XLOG_HEAP_INSERT, XLOG_HEAP_LOCK,
    XLOG_HEAP_OPMASK, XLOG_HEAP_UPDATE,
)
from walredod.objects import RelMapTag, SlruKind, SlruPageTag, TwoPhaseTag
from walredod.types import BufferTag, ForkNumber, WalRecord
from walredod.wal import DecodedRecord
from walredod.walformat import LAYOUTS, WalFormat

XLOG_SMGR_CREATE = 0x10
XLOG_SMGR_TRUNCATE = 0x20
SMGR_TRUNCATE_HEAP = 0x01
_smgr_create = struct.Struct("<IIIi")  # spcnode, dbnode, relnode, forknum
_smgr_truncate = struct.Struct("<IIIIi")  # blkno, spcnode, dbnode, relnode, flags


@dataclass
class PageHistory:
    """The records of one page since some LSN, and whether the page's earlier contents still count.

    ``starts_empty`` is True when the page was cut off by a truncation or its relation file (re)created after that
    LSN: replay then starts from a non-existent page, not from the page's image at the LSN.
    """

    tag: BufferTag
    records: list[DecodedRecord] = field(default_factory=list)
    starts_empty: bool = False

    @property
    def lsn(self) -> int:
        """The page's LSN after replay: the end of its last record."""
        return self.records[-1].end_lsn

    def wal_records(self) -> list[WalRecord]:
        return [record.as_wal_record() for record in self.records]


def page_histories(records: Iterable[DecodedRecord], since_lsn: int = 0) -> dict[BufferTag, PageHistory]:
    """Histories of every relation page referenced by records that start at or after ``since_lsn``."""
    histories: dict[BufferTag, PageHistory] = {}
    blocks_seen: dict[tuple[int, int, int, int], set[int]] = {}  # (spc, db, rel, fork) -> block numbers
    cut_from: dict[tuple[int, int, int, int], int] = {}  # relation fork -> lowest block number cut off so far

    for record in records:
        if record.start_lsn < since_lsn:
            continue
        if record.rmid == RM_SMGR_ID:
            _start_over(record, histories, blocks_seen, cut_from)
            continue
        for block in record.blocks:
            history = histories.get(block.tag)
            if history is None:
                fork = block.tag[:4]
                history = histories[block.tag] = PageHistory(block.tag)
                history.starts_empty = block.tag.blkno >= cut_from.get(fork, 0xFFFFFFFF)
                blocks_seen.setdefault(fork, set()).add(block.tag.blkno)
            history.records.append(record)
    return {tag: history for tag, history in histories.items() if history.records}


def _start_over(record: DecodedRecord, histories: dict[BufferTag, PageHistory],
                blocks_seen: dict[tuple[int, int, int, int], set[int]],
                cut_from: dict[tuple[int, int, int, int], int]) -> None:
    """Pages a truncation cuts off, or all pages of a newly created relation file, start from nothing."""
    info = record.rmgr_info
    if info == XLOG_SMGR_TRUNCATE:
        blkno, spc, db, rel, flags = _smgr_truncate.unpack_from(record.main_data)
        if not flags & SMGR_TRUNCATE_HEAP:
            return  # only the visibility map or free space map: not pages we follow here
        fork, first_cut = (spc, db, rel, ForkNumber.MAIN), blkno
    elif info == XLOG_SMGR_CREATE:
        spc, db, rel, forknum = _smgr_create.unpack_from(record.main_data)
        fork, first_cut = (spc, db, rel, forknum), 0
    else:
        return
    cut_from[fork] = min(first_cut, cut_from.get(fork, first_cut))
    for blkno in blocks_seen.get(fork, ()):
        if blkno >= first_cut:
            history = histories[BufferTag(*fork, blkno)]
            history.records.clear()
            history.starts_empty = True


# --- objects rebuilt in Python, and visibility-map pages ------------------------------------------------------------

SMGR_TRUNCATE_VM = 0x02
VISIBILITY_MAP_CLEARS = {
    # (rmid, op): (offset of the flags byte in the main data, its "cleared" bit, VM bits cleared on block 0)
    (RM_HEAP_ID, XLOG_HEAP_INSERT): (2, 0x01, 0x03),
    (RM_HEAP_ID, XLOG_HEAP_DELETE): (7, 0x01, 0x03),
    (RM_HEAP_ID, XLOG_HEAP_LOCK): (7, 0x01, 0x02),  # all-frozen only
    (RM_HEAP2_ID, XLOG_HEAP2_MULTI_INSERT): (0, 0x01, 0x03),
    (RM_HEAP2_ID, XLOG_HEAP2_LOCK_UPDATED): (7, 0x01, 0x02),  # all-frozen only
}
UPDATE_OPS = (XLOG_HEAP_UPDATE, XLOG_HEAP_HOT_UPDATE)  # flags at 7: bit 0 old block, bit 1 new block
_DELETE_LAYOUT_OPS = (XLOG_HEAP_DELETE, XLOG_HEAP_LOCK)  # delete, lock: their flags move in Neon's format


@dataclass
class ObjectHistory:
    """Records, raw or synthesized, that change one non-relation object or one visibility-map page."""

    tag: object
    records: list[WalRecord] = field(default_factory=list)
    starts_empty: bool = False

    @property
    def lsn(self) -> int:
        return self.records[-1].lsn


def visibility_map_clears(record: DecodedRecord,
                          wal_format: WalFormat = "vanilla") -> list[tuple[tuple[int, int, int], int, int]]:
    """(relation, heap block, VM bits) that heap redo of this record clears, with no reference to the map page.
    Neon's compute (``wal_format`` "neon") keeps the flags of delete and lock records elsewhere (walredod.walformat).
    """
    op = record.info & XLOG_HEAP_OPMASK
    if record.rmid == RM_HEAP_ID and op in UPDATE_OPS:
        flags = record.main_data[7]
        new = record.blocks[0].tag
        old = record.block(1).tag if record.block(1) is not None else new
        clears = []
        if flags & 0x01:
            clears.append((old.relation, old.blkno, 0x03))
        if flags & 0x02:
            clears.append((new.relation, new.blkno, 0x03))
        return clears
    rule = VISIBILITY_MAP_CLEARS.get((record.rmid, op))
    if rule is None or not record.blocks:
        return []
    offset, bit, bits = rule
    if record.rmid == RM_HEAP_ID and op in _DELETE_LAYOUT_OPS:
        offset = LAYOUTS[wal_format].delete_flags
    if len(record.main_data) <= offset or not record.main_data[offset] & bit:
        return []
    block = record.blocks[0].tag
    return [(block.relation, block.blkno, bits)]


def object_histories(records: Iterable[DecodedRecord], since_lsn: int = 0,
                     wal_format: WalFormat = "vanilla") -> dict[object, ObjectHistory]:
    """Histories of every SLRU page, relation map, prepared transaction and visibility-map page that records
    starting at or after ``since_lsn`` change: raw records where PostgreSQL's record names the object, synthesized
    ones (walredod.native.synthesized) for visibility-map bits heap records clear as a side effect (read in the
    heap record layout of ``wal_format``)."""
    histories: dict[object, ObjectHistory] = {}

    def add(tag, record: WalRecord) -> ObjectHistory:
        history = histories.get(tag)
        if history is None:
            history = histories[tag] = ObjectHistory(tag)
        history.records.append(record)
        return history

    for record in records:
        if record.start_lsn < since_lsn:
            continue
        raw = record.as_wal_record()
        end = parse_transaction_end(record)
        if end is not None:
            for pageno in sorted({slru.clog_page_of(x) for x in end.xids}):
                add(SlruPageTag(SlruKind.CLOG, pageno), raw)
            if end.prepared:
                add(TwoPhaseTag(end.xid), raw)
            continue
        prepared = prepared_state(record)
        if prepared is not None:
            add(TwoPhaseTag(prepared[0]), raw).starts_empty = True
            continue
        if record.rmid == RM_CLOG_ID and record.rmgr_info == slru.CLOG_ZEROPAGE:
            add(SlruPageTag(SlruKind.CLOG, struct.unpack_from("<i", record.main_data)[0]), raw)
        elif record.rmid == RM_CLOG_ID and record.rmgr_info == slru.CLOG_TRUNCATE:
            cutoff = struct.unpack_from("<i", record.main_data)[0]
            for tag in [t for t in histories if isinstance(t, SlruPageTag) and t.kind == SlruKind.CLOG
                        and slru.clog_truncation_removes(t.pageno, cutoff)]:
                add(tag, raw)
        elif record.rmid == RM_MULTIXACT_ID:
            info = record.rmgr_info
            if info in (slru.XLOG_MULTIXACT_ZERO_OFF_PAGE, slru.XLOG_MULTIXACT_ZERO_MEM_PAGE):
                kind = (SlruKind.MULTIXACT_OFFSETS if info == slru.XLOG_MULTIXACT_ZERO_OFF_PAGE
                        else SlruKind.MULTIXACT_MEMBERS)
                add(SlruPageTag(kind, struct.unpack_from("<i", record.main_data)[0]), raw)
            elif info == slru.XLOG_MULTIXACT_CREATE_ID:
                mid, moff, count = struct.unpack_from("<IIi", record.main_data)
                for pageno in sorted({slru.offsets_page_of(mid), slru.offsets_page_of(slru.next_multixact(mid))}):
                    add(SlruPageTag(SlruKind.MULTIXACT_OFFSETS, pageno), raw)
                pages = {slru.members_page_of((moff + i) & 0xFFFFFFFF) for i in range(count)}
                for pageno in sorted(pages):
                    add(SlruPageTag(SlruKind.MULTIXACT_MEMBERS, pageno), raw)
        elif record.rmid == RM_RELMAP_ID:
            dbid, tsid = struct.unpack_from("<II", record.main_data)
            add(RelMapTag(tsid, dbid), raw)
        elif record.rmid == RM_SMGR_ID and record.rmgr_info == XLOG_SMGR_TRUNCATE:
            blkno, spc, db, rel, flags = _smgr_truncate.unpack_from(record.main_data)
            if flags & SMGR_TRUNCATE_VM:
                truncation = WalRecord(record.end_lsn, synthesized.encode(synthesized.TruncateVisibilityMap(blkno)))
                cut_map_block = map_block_of(blkno)
                for tag in [t for t in histories if isinstance(t, BufferTag) and t.relation == (spc, db, rel)
                            and t.blkno > cut_map_block]:
                    add(tag, truncation)
                add(BufferTag(spc, db, rel, ForkNumber.VISIBILITYMAP, cut_map_block), truncation)
        # Visibility-map pages: referenced by visibility records and page images, cleared by heap records.
        for block in record.blocks:
            if block.tag.forknum == ForkNumber.VISIBILITYMAP:
                add(block.tag, raw)
        by_page: dict[BufferTag, tuple[list[int], int]] = {}
        for relation, heap_block, bits in visibility_map_clears(record, wal_format):
            tag = BufferTag(*relation, ForkNumber.VISIBILITYMAP, map_block_of(heap_block))
            blocks, _ = by_page.setdefault(tag, ([], bits))
            blocks.append(heap_block)
        for tag, (blocks, bits) in by_page.items():
            add(tag, WalRecord(record.end_lsn, synthesized.encode(
                synthesized.ClearVisibilityMapFlags(tuple(blocks), bits))))
    return histories
