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

from walredod.types import BufferTag, ForkNumber, WalRecord
from walredod.wal import DecodedRecord

RM_SMGR_ID = 2
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
