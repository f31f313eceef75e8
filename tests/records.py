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
from pathlib import Path

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
    BKPBLOCK_HAS_DATA, BKPBLOCK_HAS_IMAGE, BKPBLOCK_SAME_REL, BKPBLOCK_WILL_INIT, BKPIMAGE_APPLY, BKPIMAGE_COMPRESSION,
    BKPIMAGE_HAS_HOLE,
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


def pglz_literals(data: bytes) -> bytes:
    """``data`` as a pglz stream of literals only: a control byte of zero bits before every eight bytes."""
    return b"".join(b"\x00" + data[i:i + 8] for i in range(0, len(data), 8))


def lz4_block_literals(data: bytes) -> bytes:
    """``data`` as one LZ4 block (no frame, as LZ4_compress_default writes) holding a single literals-only
    sequence: a token with the literal length (15 means more follows in bytes of 255 and a last byte below 255)."""
    head = bytes([min(len(data), 15) << 4])
    if len(data) >= 15:
        rest = len(data) - 15
        head += b"\xff" * (rest // 255) + bytes([rest % 255])
    return head + data


def zstd_frame_raw(data: bytes) -> bytes:
    """``data`` as a zstd frame (as ZSTD_compress writes) of one raw block: magic, a frame header saying
    single segment with a 2-byte content size (stored minus 256), then the last block's 3-byte header (raw type)."""
    if not 256 <= len(data) <= 65535 + 256:
        raise ValueError("this frame layout holds 256 to 65791 bytes")
    frame_header = bytes([0x60]) + struct.pack("<H", len(data) - 256)  # content size flag 1, single segment
    block_header = (len(data) << 3 | 1).to_bytes(3, "little")  # last block, raw
    return struct.pack("<I", 0xFD2FB528) + frame_header + block_header + data


IMAGE_COMPRESSORS = {"pglz": pglz_literals, "lz4": lz4_block_literals, "zstd": zstd_frame_raw}


@dataclass(frozen=True)
class BlockRef:
    """One block reference of a record: the block, optionally its page image and rmgr-specific data."""

    tag: BufferTag
    image: bytes | None = None
    hole: bool = False  # leave out the page's free space (a "standard" page), as REGBUF_STANDARD does
    apply: bool = True  # BKPIMAGE_APPLY: redo restores the image (not just kept for consistency checks)
    data: bytes = b""
    will_init: bool = False
    compression: str | None = None  # "pglz", "lz4" or "zstd": the image as that method's stream (IMAGE_COMPRESSORS)
    compressed_image: bytes | None = None  # the compressed bytes to write instead (corrupt ones, say)


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
        if ref.compression is None:
            # Uncompressed: no XLogRecordBlockCompressHeader, the hole length is BLCKSZ - length.
            image_header = struct.pack("<HHB", len(payload), hole_offset, bimg_info)
        else:
            # Compressed: the stream stands for the page less its hole; a hole's length follows the header.
            bimg_info |= {name: bit for bit, name in BKPIMAGE_COMPRESSION.items()}[ref.compression]
            payload = (ref.compressed_image if ref.compressed_image is not None
                       else IMAGE_COMPRESSORS[ref.compression](payload))
            image_header = struct.pack("<HHB", len(payload), hole_offset, bimg_info)
            if hole_length:
                image_header += struct.pack("<H", hole_length)
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


# --- heap records in the two PostgreSQL 15 formats: vanilla, and Neon compute's (walredod/walformat.py) ------------

from walredod.pg15 import (  # noqa: E402, F401 (heap record kinds, for the tests that build heap records)
    XLOG_HEAP2_LOCK_UPDATED, XLOG_HEAP2_MULTI_INSERT, XLOG_HEAP_DELETE, XLOG_HEAP_HOT_UPDATE, XLOG_HEAP_INIT_PAGE,
    XLOG_HEAP_INSERT, XLOG_HEAP_LOCK, XLOG_HEAP_UPDATE,
)
XLH_UPDATE_CONTAINS_OLD_KEY = 0x08
XLH_UPDATE_PREFIX_FROM_OLD = 0x20
XLH_UPDATE_SUFFIX_FROM_OLD = 0x40
XLH_DELETE_CONTAINS_OLD_KEY = 0x04
NEON_PADDING = b"\x20\xff"  # Neon leaves its structs' padding uninitialised: never zero in real WAL


@dataclass(frozen=True)
class HeapTuple:
    """A tuple as heap records log it: infomask bits, and the bytes after the 23-byte on-page header (null bitmap,
    padding up to t_hoff, data). ``cid`` is the command id Neon's format carries with it."""

    infomask2: int
    infomask: int
    body: bytes
    cid: int = 0

    @property
    def hoff(self) -> int:
        from walredod.walformat import expected_hoff

        return expected_hoff(self.infomask2, self.infomask)


def tuple_on_page(t: HeapTuple, *, xmin: int, xmax: int = 0, cid: int, ctid: tuple[int, int],
                  infomask: int | None = None, infomask2: int | None = None) -> bytes:
    """The tuple as it sits on a page: HeapTupleHeaderData (t_xmin, t_xmax, t_cid, t_ctid as block hi/lo and
    offset, t_infomask2, t_infomask, t_hoff), then its body."""
    blkno, offnum = ctid
    return struct.pack("<IIIHHHHHB", xmin, xmax, cid, blkno >> 16, blkno & 0xFFFF, offnum,
                       t.infomask2 if infomask2 is None else infomask2,
                       t.infomask if infomask is None else infomask, t.hoff) + t.body


def heap_header(t: HeapTuple, fmt: str) -> bytes:
    """xl_heap_header: vanilla t_infomask2, t_infomask, t_hoff (5 bytes); Neon puts t_cid before t_hoff (9)."""
    if fmt == "neon":
        return struct.pack("<HHIB", t.infomask2, t.infomask, t.cid, t.hoff)
    return struct.pack("<HHB", t.infomask2, t.infomask, t.hoff)


def heap_insert_record(tag: BufferTag, offnum: int, t: HeapTuple, *, fmt: str, xid: int, init: bool = False,
                       flags: int = 0, image: bytes | None = None) -> bytes:
    """XLOG_HEAP_INSERT: xl_heap_insert (offnum u16, flags u8) as main data, the tuple header and body as block 0
    data (kept beside an image only when ``image`` is given, as with wal_level = logical)."""
    block = BlockRef(tag, image=image, data=heap_header(t, fmt) + t.body, will_init=init)
    return make_record(RM_HEAP_ID, XLOG_HEAP_INSERT | (XLOG_HEAP_INIT_PAGE if init else 0), [block],
                       struct.pack("<HB", offnum, flags), xid=xid)


def multi_insert_tuple_header(t: HeapTuple, fmt: str) -> bytes:
    """xl_multi_insert_tuple: datalen, t_infomask2, t_infomask, t_hoff (7 bytes); Neon's has 2 padding bytes and
    t_cid before t_hoff (13)."""
    if fmt == "neon":
        return struct.pack("<HHH2sIB", len(t.body), t.infomask2, t.infomask, NEON_PADDING, t.cid, t.hoff)
    return struct.pack("<HHHB", len(t.body), t.infomask2, t.infomask, t.hoff)


def heap_multi_insert_record(tag: BufferTag, tuples: Sequence[HeapTuple], *, fmt: str, xid: int,
                             offsets: Sequence[int] | None = None, flags: int = 0) -> bytes:
    """XLOG_HEAP2_MULTI_INSERT: xl_heap_multi_insert (flags u8, pad, ntuples u16, offsets u16[] unless the record
    initialises the page: ``offsets`` None) as main data; each tuple header at an even offset of block 0 data,
    its body after it."""
    init = offsets is None
    main = struct.pack("<BxH", flags, len(tuples)) + (b"" if init else struct.pack(f"<{len(offsets)}H", *offsets))
    data = bytearray()
    for t in tuples:
        if len(data) % 2:
            data += b"\0"
        data += multi_insert_tuple_header(t, fmt) + t.body
    return make_record(RM_HEAP2_ID, XLOG_HEAP2_MULTI_INSERT | (XLOG_HEAP_INIT_PAGE if init else 0),
                       [BlockRef(tag, data=bytes(data), will_init=init)], main, xid=xid)


def heap_update_record(new_tag: BufferTag, old_offnum: int, new_offnum: int, new: HeapTuple, *, fmt: str,
                       xid: int, old_xmax: int, old_infobits: int = 0, old_cid: int = 0, new_xmax: int = 0,
                       flags: int = 0, hot: bool = False, old_tag: BufferTag | None = None,
                       prefix_len: int = 0, suffix_len: int = 0, old_key: HeapTuple | None = None) -> bytes:
    """XLOG_HEAP_UPDATE / HOT_UPDATE: xl_heap_update (old_xmax, old_offnum, old_infobits_set, flags, new_xmax,
    new_offnum; Neon: the old tuple's t_cid after flags) as main data, then ``old_key``'s header and body if given;
    block 0 the new tuple's page with the lengths of a prefix and suffix taken from the old tuple (if any), the new
    tuple's header and its body (null bitmap and padding, then the data between prefix and suffix); block 1 the
    old tuple's page when it is another."""
    flags |= (XLH_UPDATE_PREFIX_FROM_OLD if prefix_len else 0) | (XLH_UPDATE_SUFFIX_FROM_OLD if suffix_len else 0)
    flags |= XLH_UPDATE_CONTAINS_OLD_KEY if old_key is not None else 0
    if fmt == "neon":
        main = struct.pack("<IHBBIIH", old_xmax, old_offnum, old_infobits, flags, old_cid, new_xmax, new_offnum)
    else:
        main = struct.pack("<IHBBIH", old_xmax, old_offnum, old_infobits, flags, new_xmax, new_offnum)
    if old_key is not None:
        main += heap_header(old_key, fmt) + old_key.body
    lengths = (struct.pack("<H", prefix_len) if prefix_len else b"") + (struct.pack("<H", suffix_len) if suffix_len
                                                                        else b"")
    blocks = [BlockRef(new_tag, data=lengths + heap_header(new, fmt) + new.body)]
    if old_tag is not None:
        blocks.append(BlockRef(old_tag))
    return make_record(RM_HEAP_ID, XLOG_HEAP_HOT_UPDATE if hot else XLOG_HEAP_UPDATE, blocks, main, xid=xid)


def heap_delete_record(tag: BufferTag, offnum: int, *, fmt: str, xid: int, xmax: int, infobits: int = 0,
                       flags: int = 0, cid: int = 0, lock: bool = False, old_key: HeapTuple | None = None) -> bytes:
    """XLOG_HEAP_DELETE (or, ``lock``, XLOG_HEAP_LOCK, the same layout): xmax, offnum, infobits_set, flags;
    Neon: 2 padding bytes and t_cid before infobits_set. A delete may carry ``old_key`` (header and body) after."""
    flags |= XLH_DELETE_CONTAINS_OLD_KEY if old_key is not None else 0
    if fmt == "neon":
        main = struct.pack("<IH2sIBB", xmax, offnum, NEON_PADDING, cid, infobits, flags)
    else:
        main = struct.pack("<IHBB", xmax, offnum, infobits, flags)
    if old_key is not None:
        main += heap_header(old_key, fmt) + old_key.body
    return make_record(RM_HEAP_ID, XLOG_HEAP_LOCK if lock else XLOG_HEAP_DELETE, [BlockRef(tag)], main, xid=xid)


def heap_lock_updated_record(tag: BufferTag, offnum: int, *, xid: int, xmax: int, infobits: int = 0) -> bytes:
    """XLOG_HEAP2_LOCK_UPDATED: xmax, offnum, infobits_set, flags: one layout in both formats."""
    return make_record(RM_HEAP2_ID, XLOG_HEAP2_LOCK_UPDATED, [BlockRef(tag)],
                       struct.pack("<IHBB", xmax, offnum, infobits, 0), xid=xid)


# --- WAL segments --------------------------------------------------------------------------------------------------

XLP_FIRST_IS_CONTRECORD = 0x01
XLP_LONG_HEADER = 0x02
XLOG_PAGE_MAGIC = 0xD110
WAL_SEGMENT_SIZE = 1 << 20  # the smallest initdb allows


def write_wal_segment(directory, records: Sequence[bytes], *, start_lsn: int = 0x100_0028, timeline: int = 1,
                      system_id: int = 7000000000000000001) -> list[int]:
    """Write ``records`` one after another into one WAL segment file in ``directory``, as PostgreSQL lays them out:
    page headers (a long one at the segment start), records MAXALIGNed, a record crossing a page continued after
    the next page's header, each record's xl_prev the start of the one before (CRC recomputed). Returns each
    record's end LSN. ``start_lsn`` must be just past a page header."""
    segno = start_lsn // WAL_SEGMENT_SIZE
    seg_start = segno * WAL_SEGMENT_SIZE
    segment = bytearray(WAL_SEGMENT_SIZE)
    pos, prev, ends = start_lsn, 0, []

    def page_header(page_lsn: int, rem_len: int) -> int:
        info = XLP_FIRST_IS_CONTRECORD if rem_len else 0
        if page_lsn == seg_start:
            struct.pack_into("<HHIQI4xQII", segment, 0, XLOG_PAGE_MAGIC, info | XLP_LONG_HEADER, timeline,
                             page_lsn, rem_len, system_id, WAL_SEGMENT_SIZE, BLCKSZ)
            return 40
        struct.pack_into("<HHIQI", segment, page_lsn - seg_start, XLOG_PAGE_MAGIC, info, timeline, page_lsn, rem_len)
        return 24

    page_header(seg_start, 0)
    for record in records:
        if pos % BLCKSZ == 0:
            pos += page_header(pos, 0)
        record = with_crc(record[:8] + struct.pack("<Q", prev) + record[16:])
        prev, left = pos, record
        while left:
            if pos % BLCKSZ == 0:
                pos += page_header(pos, len(left))
            room = BLCKSZ - pos % BLCKSZ
            chunk, left = left[:room], left[room:]
            segment[pos - seg_start:pos - seg_start + len(chunk)] = chunk
            pos += len(chunk)
            if pos - seg_start >= WAL_SEGMENT_SIZE:
                raise ValueError("the records do not fit in one segment")
        pos = -(-pos // MAXALIGN) * MAXALIGN
        ends.append(pos)
    per_id = 0x1_0000_0000 // WAL_SEGMENT_SIZE
    path = Path(directory) / f"{timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"
    path.write_bytes(bytes(segment))
    return ends
