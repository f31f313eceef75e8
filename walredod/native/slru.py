"""pg_xact and pg_multixact pages: bit and byte layouts, and the redo of the records that change them."""

from __future__ import annotations

import struct

from walredod.errors import InvalidRequest
from walredod.native import synthesized
from walredod.native.xact import parse_transaction_end
from walredod.objects import SLRU_PAGES_PER_SEGMENT, SlruKind, SlruPageTag
from walredod.pg15 import BLCKSZ, RM_CLOG_ID, RM_MULTIXACT_ID
from walredod.wal import DecodedRecord

CLOG_ZEROPAGE = 0x00
CLOG_TRUNCATE = 0x10
CLOG_PAGES = 2**32 // (BLCKSZ * 4)
FIRST_NORMAL_XID = 3
XLOG_MULTIXACT_ZERO_OFF_PAGE = 0x00
XLOG_MULTIXACT_ZERO_MEM_PAGE = 0x10
XLOG_MULTIXACT_CREATE_ID = 0x20

CLOG_XACTS_PER_PAGE = BLCKSZ * 4  # two status bits per transaction
MULTIXACT_OFFSETS_PER_PAGE = BLCKSZ // 4
MEMBERS_PER_GROUP = 4  # a group: 4 flag bytes, then 4 member xids
MEMBER_GROUP_SIZE = 4 + 4 * MEMBERS_PER_GROUP
MEMBER_GROUPS_PER_PAGE = BLCKSZ // MEMBER_GROUP_SIZE  # 409: the last 12 bytes of a page are unused
MEMBERS_PER_PAGE = MEMBER_GROUPS_PER_PAGE * MEMBERS_PER_GROUP
_u32 = struct.Struct("<I")


def clog_page_of(xid: int) -> int:
    return xid // CLOG_XACTS_PER_PAGE


def set_clog_status(page: bytearray, pageno: int, xids, status: int) -> None:
    """Set the two status bits of those ``xids`` that live on page ``pageno``."""
    for xid in xids:
        if xid // CLOG_XACTS_PER_PAGE != pageno:
            continue
        index = xid % CLOG_XACTS_PER_PAGE
        byte, shift = index // 4, (index % 4) * 2
        page[byte] = (page[byte] & ~(0x03 << shift) & 0xFF) | (status << shift)


def _xid_precedes(a: int, b: int) -> bool:
    return ((a - b) & 0xFFFFFFFF) >= 0x80000000  # circular comparison of normal xids


def _clog_page_precedes(page1: int, page2: int) -> bool:
    xid1 = page1 * CLOG_XACTS_PER_PAGE + FIRST_NORMAL_XID
    xid2 = page2 * CLOG_XACTS_PER_PAGE + FIRST_NORMAL_XID
    return _xid_precedes(xid1, xid2) and _xid_precedes(xid1, (xid2 + CLOG_XACTS_PER_PAGE - 1) & 0xFFFFFFFF)


def clog_truncation_removes(pageno: int, cutoff_page: int) -> bool:
    """Does truncating pg_xact at ``cutoff_page`` delete the segment holding ``pageno``? A segment goes when its
    first and last pages both precede the cutoff, in PostgreSQL's circular sense."""
    first = pageno - pageno % SLRU_PAGES_PER_SEGMENT
    return _clog_page_precedes(first, cutoff_page) and _clog_page_precedes(first + SLRU_PAGES_PER_SEGMENT - 1,
                                                                           cutoff_page)


def offsets_page_of(mid: int) -> int:
    return mid // MULTIXACT_OFFSETS_PER_PAGE


def set_multixact_offset(page: bytearray, pageno: int, mid: int, offset: int) -> bool:
    if mid // MULTIXACT_OFFSETS_PER_PAGE != pageno:
        return False
    _u32.pack_into(page, (mid % MULTIXACT_OFFSETS_PER_PAGE) * 4, offset)
    return True


def next_multixact(mid: int) -> int:
    return (mid + 1) & 0xFFFFFFFF or 1  # MultiXactId 0 is invalid: wrap to 1


def record_new_multixact_offsets(page: bytearray, pageno: int, mid: int, offset: int, nmembers: int) -> bool:
    """What PostgreSQL 15's RecordNewMultiXact writes to pg_multixact/offsets: this MultiXact's offset, and the
    next one's (the end of these members, skipping offset 0), which may be the first entry of the next page."""
    next_offset = (offset + nmembers) & 0xFFFFFFFF or 1
    touched = set_multixact_offset(page, pageno, mid, offset)
    return set_multixact_offset(page, pageno, next_multixact(mid), next_offset) or touched


def members_page_of(offset: int) -> int:
    return offset // MEMBERS_PER_PAGE


def set_multixact_members(page: bytearray, pageno: int, first_offset: int, members) -> bool:
    """Store members (xid, status) from ``first_offset`` on (wrapping at 2^32), those that fall on ``pageno``."""
    touched = False
    for i, (xid, status) in enumerate(members):
        offset = (first_offset + i) & 0xFFFFFFFF
        if offset // MEMBERS_PER_PAGE != pageno:
            continue
        group_start = ((offset // MEMBERS_PER_GROUP) % MEMBER_GROUPS_PER_PAGE) * MEMBER_GROUP_SIZE
        slot = offset % MEMBERS_PER_GROUP
        page[group_start + slot] = status & 0xFF  # one flag byte per member
        _u32.pack_into(page, group_start + 4 + 4 * slot, xid)
        touched = True
    return touched


def _multixact_create(record: DecodedRecord) -> tuple[int, int, list[tuple[int, int]]]:
    data = record.main_data
    try:
        mid, moff, count = struct.unpack_from("<IIi", data)
        members = [struct.unpack_from("<Ii", data, 12 + 8 * i) for i in range(count)]
    except struct.error as exc:
        raise InvalidRequest(f"malformed MultiXact record at {record.start_lsn:X}: {exc}") from None
    return mid, moff, members


class PageRemoved(Exception):
    """A truncation removed the page's segment: the page no longer exists."""


def apply(tag: SlruPageTag, page: bytearray, record: DecodedRecord | object) -> bool:
    """Apply one raw (DecodedRecord) or synthesized record; False when it does not touch this page."""
    pageno = tag.pageno
    if tag.kind == SlruKind.CLOG:
        if isinstance(record, synthesized.SetClogStatus):
            set_clog_status(page, pageno, record.xids, record.status)
            return any(clog_page_of(x) == pageno for x in record.xids)
        if isinstance(record, DecodedRecord):
            if record.rmid == RM_CLOG_ID and record.rmgr_info == CLOG_ZEROPAGE:
                return _zero_if(page, pageno, record)
            if record.rmid == RM_CLOG_ID and record.rmgr_info == CLOG_TRUNCATE:
                if clog_truncation_removes(pageno, struct.unpack_from("<i", record.main_data)[0]):
                    raise PageRemoved(f"{tag} was removed by a pg_xact truncation")
                return False
            end = parse_transaction_end(record)
            if end is not None:
                set_clog_status(page, pageno, end.xids, end.status)
                return any(clog_page_of(x) == pageno for x in end.xids)
    elif tag.kind == SlruKind.MULTIXACT_OFFSETS:
        if isinstance(record, synthesized.CreateMultiXactOffset):
            return set_multixact_offset(page, pageno, record.mid, record.offset)
        if isinstance(record, DecodedRecord) and record.rmid == RM_MULTIXACT_ID:
            if record.rmgr_info == XLOG_MULTIXACT_ZERO_OFF_PAGE:
                return _zero_if(page, pageno, record)
            if record.rmgr_info == XLOG_MULTIXACT_CREATE_ID:
                mid, moff, members = _multixact_create(record)
                return record_new_multixact_offsets(page, pageno, mid, moff, len(members))
    elif tag.kind == SlruKind.MULTIXACT_MEMBERS:
        if isinstance(record, synthesized.CreateMultiXactMembers):
            return set_multixact_members(page, pageno, record.first_offset, record.members)
        if isinstance(record, DecodedRecord) and record.rmid == RM_MULTIXACT_ID:
            if record.rmgr_info == XLOG_MULTIXACT_ZERO_MEM_PAGE:
                return _zero_if(page, pageno, record)
            if record.rmgr_info == XLOG_MULTIXACT_CREATE_ID:
                _mid, moff, members = _multixact_create(record)
                return set_multixact_members(page, pageno, moff, members)
    raise InvalidRequest(f"{_describe(record)} does not change {tag}")


def _zero_if(page: bytearray, pageno: int, record: DecodedRecord) -> bool:
    if struct.unpack_from("<i", record.main_data)[0] != pageno:
        return False
    page[:] = bytes(BLCKSZ)
    return True


def _describe(record) -> str:
    if isinstance(record, DecodedRecord):
        return f"{record.rmgr_name} record (info {record.info:#04x})"
    return f"{type(record).__name__} record"
