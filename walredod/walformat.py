"""Which PostgreSQL 15 wrote a WAL's heap records: vanilla, or Neon's compute (its heap records carry t_cid).

Neon's compute keeps PostgreSQL 15's resource managers and record kinds but adds the inserting or deleting command
id (``t_cid``, u32) to five structs, so the same record kind has two layouts. This module owns those layout facts on
the Python side (the redo child has the same checks in C, pgext/wal_format.c, applied before a record is replayed):

====================================  ===========================  ==================================
struct                                vanilla PostgreSQL 15        Neon compute, PostgreSQL 15
====================================  ===========================  ==================================
xl_heap_header (insert, update new)   5 bytes: t_hoff at 4         9 bytes: t_cid at 4, t_hoff at 8
xl_multi_insert_tuple                 7 bytes: t_hoff at 6         13 bytes: t_cid at 8, t_hoff at 12
xl_heap_delete, xl_heap_lock          8 bytes: flags at 7          14 bytes: t_cid at 8, flags at 13
xl_heap_update                        14 bytes                     18 bytes: t_cid at 8
====================================  ===========================  ==================================

Every tuple header starts with t_infomask2 (u16) then t_infomask (u16); a multi-insert tuple's with its data
length (u16) first. PostgreSQL gives every tuple ``t_hoff = MAXALIGN(23 + null bitmap)``; read in the wrong layout,
the byte at t_hoff's place is something else (the low byte of t_cid, or tuple data), so a tuple header tells the
formats apart, and main-data lengths tell for delete, lock and update. A record whose layout does not depend on
the format (or an insert restored from its page image) tells nothing.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from walredod.pg15 import (  # noqa: F401 (the heap record kinds, for the users of this module too)
    RM_HEAP2_ID, RM_HEAP_ID, XLOG_HEAP2_MULTI_INSERT, XLOG_HEAP_DELETE, XLOG_HEAP_HOT_UPDATE, XLOG_HEAP_INIT_PAGE,
    XLOG_HEAP_INSERT, XLOG_HEAP_LOCK, XLOG_HEAP_OPMASK, XLOG_HEAP_UPDATE,
)
from walredod.wal import DecodedRecord, maxalign

WalFormat = Literal["vanilla", "neon"]
FORMATS: tuple[WalFormat, ...] = ("vanilla", "neon")

SIZEOF_HEAP_TUPLE_HEADER = 23  # SizeofHeapTupleHeader: the on-page header up to the null bitmap
SIZEOF_HEAP_INSERT = 3  # xl_heap_insert: offnum u16, flags u8 (both formats)
SIZEOF_HEAP_MULTI_INSERT = 4  # xl_heap_multi_insert: flags u8, pad, ntuples u16, then offsets u16[] (both)
MAX_HEAP_TUPLES_PER_PAGE = 291
HEAP_HASNULL = 0x0001
HEAP_NATTS_MASK = 0x07FF
XLH_DELETE_CONTAINS_OLD = 0x02 | 0x04  # old tuple, old key
XLH_UPDATE_CONTAINS_OLD = 0x04 | 0x08
XLH_UPDATE_PREFIX_FROM_OLD = 0x20
XLH_UPDATE_SUFFIX_FROM_OLD = 0x40
UPDATE_FLAGS = 7  # xl_heap_update.flags, the same place in both formats


@dataclass(frozen=True)
class HeapRecordLayout:
    """Sizes and offsets of one format's heap structs (as logged, not C's sizeof)."""

    header_size: int  # xl_heap_header
    header_hoff: int
    multi_size: int  # xl_multi_insert_tuple
    multi_hoff: int
    delete_size: int  # xl_heap_delete and xl_heap_lock
    delete_flags: int
    update_size: int  # xl_heap_update


LAYOUTS: dict[WalFormat, HeapRecordLayout] = {
    "vanilla": HeapRecordLayout(5, 4, 7, 6, 8, 7, 14),
    "neon": HeapRecordLayout(9, 8, 13, 12, 14, 13, 18),
}
NEON_HEADER_CID = 4  # t_cid in Neon's xl_heap_header
NEON_MULTI_CID = 8  # in its xl_multi_insert_tuple
NEON_DELETE_CID = 8  # in its xl_heap_delete, xl_heap_lock and xl_heap_update
NEON_XLHL_COMBOCID = 0x20  # infobits bit Neon adds: the tuple's t_cid is a combo id

_u16 = struct.Struct("<H").unpack_from


def expected_hoff(infomask2: int, infomask: int) -> int:
    """The t_hoff PostgreSQL gives a tuple: its header and null bitmap, MAXALIGNed."""
    bitmap = ((infomask2 & HEAP_NATTS_MASK) + 7) // 8 if infomask & HEAP_HASNULL else 0
    return maxalign(SIZEOF_HEAP_TUPLE_HEADER + bitmap)


def _tuple_header_fits(data: bytes, pos: int, header_size: int, infomask2_at: int, hoff_at: int) -> bool:
    if len(data) - pos < header_size:
        return False
    hoff = data[pos + hoff_at]
    infomask2, infomask = struct.unpack_from("<HH", data, pos + infomask2_at)
    return hoff == expected_hoff(infomask2, infomask) and \
        len(data) - pos - header_size >= hoff - SIZEOF_HEAP_TUPLE_HEADER


def _old_tuple_fits(main: bytes, offset: int, layout: HeapRecordLayout) -> bool:
    """An old tuple or key for logical decoding, copied as stored: only a plausible t_hoff is asked of it."""
    if len(main) < offset + layout.header_size:
        return False
    hoff = main[offset + layout.header_hoff]
    return hoff >= 24 and hoff % 8 == 0 and len(main) - offset - layout.header_size >= hoff - SIZEOF_HEAP_TUPLE_HEADER


def _main_fits(main: bytes, size: int, has_old: bool, layout: HeapRecordLayout) -> bool:
    if len(main) < size or (not has_old and len(main) != size):
        return False
    return not has_old or _old_tuple_fits(main, size, layout)


def _block0_read(record: DecodedRecord):
    """Block 0 as redo reads it: None when redo restores it from its image (or it is missing)."""
    block = record.block(0)
    if block is None or block.apply_image:
        return None
    return block


def _multi_insert_fits(record: DecodedRecord, data: bytes, layout: HeapRecordLayout) -> bool:
    ntuples = _u16(record.main_data, 2)[0]
    pos = 0
    for _ in range(ntuples):
        pos += pos & 1  # SHORTALIGN
        if not _tuple_header_fits(data, pos, layout.multi_size, 2, layout.multi_hoff):
            return False
        datalen = _u16(data, pos)[0]
        if len(data) - pos - layout.multi_size < datalen:
            return False
        pos += layout.multi_size + datalen
    return pos == len(data)


def tells_format(record: DecodedRecord) -> bool:
    """Does replaying this record read a struct whose layout depends on the format?"""
    op = record.info & XLOG_HEAP_OPMASK
    if record.rmid == RM_HEAP_ID:
        if op in (XLOG_HEAP_DELETE, XLOG_HEAP_LOCK, XLOG_HEAP_UPDATE, XLOG_HEAP_HOT_UPDATE):
            return True
        if op == XLOG_HEAP_INSERT:
            return _block0_read(record) is not None
    if record.rmid == RM_HEAP2_ID and op == XLOG_HEAP2_MULTI_INSERT:
        return _block0_read(record) is not None and len(record.main_data) >= SIZEOF_HEAP_MULTI_INSERT
    return False


def fits(record: DecodedRecord, fmt: WalFormat) -> bool:
    """Is the record laid out as ``fmt`` writes it (as far as redo reads it)? Records that do not tell fit both."""
    layout = LAYOUTS[fmt]
    op = record.info & XLOG_HEAP_OPMASK
    main = record.main_data
    if record.rmid == RM_HEAP_ID:
        if op == XLOG_HEAP_INSERT:
            block = _block0_read(record)
            return len(main) >= SIZEOF_HEAP_INSERT and (
                block is None or _tuple_header_fits(block.data, 0, layout.header_size, 0, layout.header_hoff))
        if op in (XLOG_HEAP_DELETE, XLOG_HEAP_LOCK):
            old_flags = XLH_DELETE_CONTAINS_OLD if op == XLOG_HEAP_DELETE else 0
            flags = main[layout.delete_flags] if len(main) > layout.delete_flags else 0
            return _main_fits(main, layout.delete_size, bool(flags & old_flags), layout)
        if op in (XLOG_HEAP_UPDATE, XLOG_HEAP_HOT_UPDATE):
            flags = main[UPDATE_FLAGS] if len(main) > UPDATE_FLAGS else 0
            if not _main_fits(main, layout.update_size, bool(flags & XLH_UPDATE_CONTAINS_OLD), layout):
                return False
            block = _block0_read(record)
            if block is None:
                return True
            skip = 2 * bool(flags & XLH_UPDATE_PREFIX_FROM_OLD) + 2 * bool(flags & XLH_UPDATE_SUFFIX_FROM_OLD)
            return _tuple_header_fits(block.data, skip, layout.header_size, 0, layout.header_hoff)
    if record.rmid == RM_HEAP2_ID and op == XLOG_HEAP2_MULTI_INSERT:
        if len(main) < SIZEOF_HEAP_MULTI_INSERT:
            return False
        ntuples = _u16(main, 2)[0]
        if ntuples > MAX_HEAP_TUPLES_PER_PAGE:
            return False
        if not record.info & XLOG_HEAP_INIT_PAGE and len(main) < SIZEOF_HEAP_MULTI_INSERT + 2 * ntuples:
            return False
        block = _block0_read(record)
        return block is None or _multi_insert_fits(record, block.data, layout)
    return True


@dataclass
class WalFormatReport:
    """What the heap records of a WAL say about its format."""

    records: int = 0
    heap_records: int = 0
    telling: int = 0  # records whose layout depends on the format
    fits: Counter = field(default_factory=Counter)  # "vanilla", "neon", "both", "neither" -> telling records
    first_misfit: dict[str, DecodedRecord] = field(default_factory=dict)  # format -> first telling record not fitting

    def add(self, record: DecodedRecord) -> None:
        self.records += 1
        if record.rmid not in (RM_HEAP_ID, RM_HEAP2_ID):
            return
        self.heap_records += 1
        if not tells_format(record):
            return
        self.telling += 1
        matching = [fmt for fmt in FORMATS if fits(record, fmt)]
        self.fits["both" if len(matching) == 2 else matching[0] if matching else "neither"] += 1
        for fmt in FORMATS:
            if fmt not in matching:
                self.first_misfit.setdefault(fmt, record)

    @property
    def verdict(self) -> WalFormat | Literal["undecided", "mixed"]:
        """The format when every telling record fits it and some fit only it; 'mixed' when each format has records
        only it fits; 'undecided' when no record tells."""
        only = {fmt for fmt in FORMATS if self.fits[fmt]}
        if len(only) == 1:
            return only.pop()
        return "mixed" if only else "undecided"


def classify(records: Iterable[DecodedRecord]) -> WalFormatReport:
    report = WalFormatReport()
    for record in records:
        report.add(record)
    return report
