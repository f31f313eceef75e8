"""Hand-made PostgreSQL 15 WAL records and pages for unit tests.

A record is laid out as PostgreSQL 15 writes it: the 24-byte XLogRecord header (xl_tot_len, xl_xid, xl_prev,
xl_info, xl_rmid, 2 pad bytes, xl_crc), every block header (id, fork_flags, data_length; an image header when the
block carries a page image; the RelFileNode unless it repeats the previous block's; the block number), the main-data
header, then each block's image and data in block order, then the main data. Everything is little-endian (the
layout of the C structs on the machines we run on). The CRC32C covers the record after the header, then the header
up to xl_crc.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import crc32c

from walredod.pg15 import (  # noqa: F401 (resource managers and record types the tests use, from here)
    BLCKSZ, PAGE_HEADER, PG_PAGE_LAYOUT_VERSION, RM_HEAP2_ID, RM_HEAP_ID, RM_SMGR_ID, RM_XACT_ID, RM_XLOG_ID,
    SIZE_OF_PAGE_HEADER, XLOG_FPI, XLOG_FPI_FOR_HINT, page_lsn,
)
from walredod.pg15 import with_page_lsn as with_lsn
from walredod.types import BufferTag

XLOG_XACT_COMMIT = 0x00
XLOG_SMGR_TRUNCATE = 0x20

# The record header, fork_flags bits of a block header, bimg_info bits of an image header, main-data block ids:
# the WAL reader's.
from walredod.wal import (  # noqa: E402
    RECORD_HEADER_LAYOUT as RECORD_HEADER,
    BKPBLOCK_HAS_DATA, BKPBLOCK_HAS_IMAGE, BKPBLOCK_SAME_REL, BKPBLOCK_WILL_INIT, BKPIMAGE_APPLY, BKPIMAGE_HAS_HOLE,
    XLR_BLOCK_ID_DATA_LONG, XLR_BLOCK_ID_DATA_SHORT, seal_record,
)

_CRC_OFFSET = RECORD_HEADER.size - 4

PAGE_HEADER_SIZE = SIZE_OF_PAGE_HEADER
LP_NORMAL = 1
MAXALIGN = 8


def make_page(lsn: int = 0, tuples: Sequence[bytes] = (), special: bytes = b"", prune_xid: int = 0) -> bytes:
    """A page as PageInit makes it, then with ``tuples`` added as PageAddItem would (line pointers growing up from
    the header, MAXALIGNed tuples growing down from the special space), so it has a zero "hole" in the middle."""
    special_size = -(-len(special) // MAXALIGN) * MAXALIGN
    page = bytearray(BLCKSZ)
    special_start = BLCKSZ - special_size
    page[special_start:special_start + len(special)] = special
    lower, upper = PAGE_HEADER_SIZE, special_start
    for tuple_data in tuples:
        upper -= -(-len(tuple_data) // MAXALIGN) * MAXALIGN
        if upper < lower + 4:
            raise ValueError("the tuples do not fit in one page")
        page[upper:upper + len(tuple_data)] = tuple_data
        struct.pack_into("<I", page, lower, upper | (LP_NORMAL << 15) | (len(tuple_data) << 17))
        lower += 4
    PAGE_HEADER.pack_into(page, 0, lsn >> 32, lsn & 0xFFFFFFFF, 0, 0, lower, upper, special_start,
                           BLCKSZ | PG_PAGE_LAYOUT_VERSION, prune_xid)
    return bytes(page)


def page_hole(page: bytes) -> tuple[int, int]:
    """(offset, length) of the free space between pd_lower and pd_upper of a standard page, as XLogRecordAssemble
    finds it; (0, 0) when the header does not describe one."""
    lower, upper = struct.unpack_from("<HH", page, 12)
    if PAGE_HEADER_SIZE <= lower < upper <= BLCKSZ:
        return lower, upper - lower
    return 0, 0


@dataclass(frozen=True)
class BlockRef:
    """One block reference of a record: the block, optionally its page image and rmgr-specific data."""

    tag: BufferTag
    image: bytes | None = None
    hole: bool = False  # leave out the page's free space (a "standard" page), as REGBUF_STANDARD does
    apply: bool = True  # BKPIMAGE_APPLY: redo restores the image (not just kept for consistency checks)
    data: bytes = b""
    will_init: bool = False


def _block_header(block_id: int, ref: BlockRef, previous: BufferTag | None) -> tuple[bytes, bytes]:
    """The block's header bytes and the bytes it contributes to the data area (image, then data)."""
    fork_flags = ref.tag.forknum
    if ref.data:
        fork_flags |= BKPBLOCK_HAS_DATA
    if ref.will_init:
        fork_flags |= BKPBLOCK_WILL_INIT
    same_rel = previous is not None and previous.relation == ref.tag.relation
    if same_rel:
        fork_flags |= BKPBLOCK_SAME_REL
    image_header = b""
    payload = b""
    if ref.image is not None:
        if len(ref.image) != BLCKSZ:
            raise ValueError(f"a page image is {BLCKSZ} bytes, not {len(ref.image)}")
        fork_flags |= BKPBLOCK_HAS_IMAGE
        hole_offset, hole_length = page_hole(ref.image) if ref.hole else (0, 0)
        bimg_info = (BKPIMAGE_APPLY if ref.apply else 0) | (BKPIMAGE_HAS_HOLE if hole_length else 0)
        payload = ref.image[:hole_offset] + ref.image[hole_offset + hole_length:] if hole_length else ref.image
        # Uncompressed: no XLogRecordBlockCompressHeader, the hole length is BLCKSZ - length.
        image_header = struct.pack("<HHB", len(payload), hole_offset, bimg_info)
    if len(ref.data) > 0xFFFF:
        raise ValueError("block data is limited to 65535 bytes")
    header = struct.pack("<BBH", block_id, fork_flags, len(ref.data)) + image_header
    if not same_rel:
        header += struct.pack("<III", *ref.tag.relation)
    header += struct.pack("<I", ref.tag.blkno)
    return header, payload + ref.data


def make_record(rmid: int, info: int, blocks: Sequence[BlockRef] = (), main_data: bytes = b"", *,
                xid: int = 0, prev: int = 0) -> bytes:
    """A whole XLogRecord with a correct xl_tot_len and CRC."""
    headers: list[bytes] = []
    payloads: list[bytes] = []
    previous = None
    for block_id, ref in enumerate(blocks):
        header, payload = _block_header(block_id, ref, previous)
        headers.append(header)
        payloads.append(payload)
        previous = ref.tag
    if main_data:
        if len(main_data) < 256:
            headers.append(struct.pack("<BB", XLR_BLOCK_ID_DATA_SHORT, len(main_data)))
        else:
            headers.append(struct.pack("<BI", XLR_BLOCK_ID_DATA_LONG, len(main_data)))
    return seal_record(xid, prev, info, rmid, b"".join(headers) + b"".join(payloads) + main_data)


def with_crc(record: bytes) -> bytes:
    """The record with xl_crc computed over what it holds now (to make a record that is wrong yet passes CRC)."""
    crc = crc32c.crc32c(record[:_CRC_OFFSET], crc32c.crc32c(record[RECORD_HEADER.size:]))
    return record[:_CRC_OFFSET] + struct.pack("<I", crc) + record[RECORD_HEADER.size:]


def fpi_record(tag: BufferTag, image: bytes, *, hole: bool = False, info: int = XLOG_FPI, rmid: int = RM_XLOG_ID,
               others: Sequence[BlockRef] = ()) -> bytes:
    """An XLOG_FPI record (log_newpage's) restoring ``image`` into ``tag``, as block 0, then ``others``."""
    return make_record(rmid, info, [BlockRef(tag, image, hole=hole), *others])


def expected_after_fpi(image: bytes, end_lsn: int, hole: bool = False) -> bytes:
    """What redo of an FPI makes of a page: the image (its hole zeroed, if the record left it out) stamped with the
    record's end LSN, unless the image is of a new page (pd_upper 0), which XLogReadBufferForRedoExtended leaves
    unstamped."""
    hole_offset, hole_length = page_hole(image) if hole else (0, 0)
    if hole_length:
        image = image[:hole_offset] + bytes(hole_length) + image[hole_offset + hole_length:]
    if struct.unpack_from("<H", image, 14)[0] == 0:
        return image
    return with_lsn(image, end_lsn)
