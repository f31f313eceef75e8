"""PostgreSQL 15 facts every layer shares: page size and block numbers, resource-manager ids and the record types
we look inside, and the standard page header. One place, so that no module keeps its own copy.

Values as PostgreSQL 15 defines them (pg_config_manual.h, block.h, rmgrlist.h, heapam_xlog.h, pg_control.h,
bufpage.h) for its default build; integers inside pages and records are little-endian on the machines we serve.
"""

from __future__ import annotations

import struct

BLCKSZ = 8192
"""Size of a relation page and of an SLRU page; PostgreSQL's default build, the only one we serve."""

MAX_BLOCK_NUMBER = 0xFFFFFFFE
"""MaxBlockNumber: blocks are numbered below it (0xFFFFFFFF is InvalidBlockNumber)."""

# --- resource managers ----------------------------------------------------------------------------------------------

RM_XLOG_ID = 0
RM_XACT_ID = 1
RM_SMGR_ID = 2
RM_CLOG_ID = 3
RM_DBASE_ID = 4
RM_TBLSPC_ID = 5
RM_MULTIXACT_ID = 6
RM_RELMAP_ID = 7
RM_STANDBY_ID = 8
RM_HEAP2_ID = 9
RM_HEAP_ID = 10
RM_BTREE_ID = 11
RM_HASH_ID = 12
RM_GIN_ID = 13
RM_GIST_ID = 14
RM_SEQ_ID = 15
RM_SPGIST_ID = 16
RM_BRIN_ID = 17
RM_COMMIT_TS_ID = 18
RM_REPLORIGIN_ID = 19
RM_GENERIC_ID = 20
RM_LOGICALMSG_ID = 21
RM_MAX_BUILTIN_ID = RM_LOGICALMSG_ID
RM_MIN_CUSTOM_ID = 128  # ids 128-255 belong to extensions' custom resource managers

RMGR_NAMES = (
    "XLOG", "Transaction", "Storage", "CLOG", "Database", "Tablespace", "MultiXact", "RelMap", "Standby", "Heap2",
    "Heap", "Btree", "Hash", "Gin", "Gist", "Sequence", "SPGist", "BRIN", "CommitTs", "ReplicationOrigin",
    "Generic", "LogicalMessage",
)
"""The built-in resource managers by id, under the names pg_waldump prints."""


def rmgr_name(rmid: int) -> str:
    if rmid < len(RMGR_NAMES):
        return RMGR_NAMES[rmid]
    return f"custom{rmid}" if rmid >= RM_MIN_CUSTOM_ID else f"unknown{rmid}"


XLR_RMGR_INFO_MASK = 0xF0  # the record type's bits of xl_info; the low four bits are the WAL machinery's

# XLOG records that carry whole pages (pg_control.h).
XLOG_FPI_FOR_HINT = 0xA0
XLOG_FPI = 0xB0

# Heap and Heap2 record types (heapam_xlog.h): the operation is xl_info & XLOG_HEAP_OPMASK.
XLOG_HEAP_OPMASK = 0x70
XLOG_HEAP_INIT_PAGE = 0x80  # the record starts the page anew
XLOG_HEAP_INSERT = 0x00
XLOG_HEAP_DELETE = 0x10
XLOG_HEAP_UPDATE = 0x20
XLOG_HEAP_HOT_UPDATE = 0x40
XLOG_HEAP_LOCK = 0x60
XLOG_HEAP2_MULTI_INSERT = 0x50
XLOG_HEAP2_LOCK_UPDATED = 0x60

# --- the standard page header (PageHeaderData) ----------------------------------------------------------------------

PAGE_HEADER = struct.Struct("<IIHHHHHHI")
"""pd_lsn (high half, low half), pd_checksum, pd_flags, pd_lower, pd_upper, pd_special, pd_pagesize_version,
pd_prune_xid."""
SIZE_OF_PAGE_HEADER = PAGE_HEADER.size  # 24, already MAXALIGNed: a page's contents start here
PG_PAGE_LAYOUT_VERSION = 4
_PAGE_LSN = struct.Struct("<II")


def init_page(special_size: int = 0, lsn: int = 0) -> bytearray:
    """A page as PageInit leaves it (with ``lsn`` stamped): empty, its free space between header and special
    space. ``special_size`` must already be MAXALIGNed."""
    page = bytearray(BLCKSZ)
    special = BLCKSZ - special_size
    PAGE_HEADER.pack_into(page, 0, lsn >> 32, lsn & 0xFFFFFFFF, 0, 0, SIZE_OF_PAGE_HEADER, special, special,
                          BLCKSZ | PG_PAGE_LAYOUT_VERSION, 0)
    return page


def page_lsn(page) -> int:
    """pd_lsn: two u32, the high half first."""
    hi, lo = _PAGE_LSN.unpack_from(page)
    return (hi << 32) | lo


def with_page_lsn(page: bytes, lsn: int) -> bytes:
    """The page with pd_lsn set, as PageSetLSN does."""
    return _PAGE_LSN.pack(lsn >> 32, lsn & 0xFFFFFFFF) + bytes(page[_PAGE_LSN.size:])
