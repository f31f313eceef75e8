"""Reading PostgreSQL 15 WAL: segment files to whole, checked, decoded records.

The WAL is a byte stream addressed by LSN, cut into 8 kB pages, each starting with a page header (a long one at the
start of a segment file). A record may cross pages and segments; the pages it continues on are flagged and say how
many of its bytes are still to come. This module reassembles records, checks them as PostgreSQL's xlogreader does
(page addresses, lengths, back-links, CRC32C), and decodes the header, block references and main data.

Reading stops at the first thing that is not valid WAL; ``WalReader.end_lsn`` and ``WalReader.end_reason`` say
where and why (zeros of never-written WAL, a recycled segment's old pages, a torn record, a missing segment file).
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import crc32c

from walredod.pg15 import RM_MAX_BUILTIN_ID, RM_MIN_CUSTOM_ID, RM_XLOG_ID, XLR_RMGR_INFO_MASK, rmgr_name
from walredod.types import BufferTag, WalRecord, format_lsn

XLOG_BLCKSZ = 8192
XLOG_PAGE_MAGIC = 0xD110  # PostgreSQL 15's WAL format
SHORT_PAGE_HEADER = 24
LONG_PAGE_HEADER = 40
MAX_RECORD_LEN = 1 << 30  # PostgreSQL cannot allocate a larger record

XLP_FIRST_IS_CONTRECORD = 0x01
XLP_LONG_HEADER = 0x02
XLP_FIRST_IS_OVERWRITE_CONTRECORD = 0x08
XLP_ALL_FLAGS = 0x0F

BKPBLOCK_FORK_MASK = 0x0F
BKPBLOCK_HAS_IMAGE = 0x10
BKPBLOCK_HAS_DATA = 0x20
BKPBLOCK_WILL_INIT = 0x40
BKPBLOCK_SAME_REL = 0x80
BKPIMAGE_HAS_HOLE = 0x01
BKPIMAGE_APPLY = 0x02
BKPIMAGE_COMPRESSION = {0x04: "pglz", 0x08: "lz4", 0x10: "zstd"}

XLR_MAX_BLOCK_ID = 32
XLR_BLOCK_ID_DATA_SHORT = 255
XLR_BLOCK_ID_DATA_LONG = 254
XLR_BLOCK_ID_ORIGIN = 253
XLR_BLOCK_ID_TOPLEVEL_XID = 252

XLOG_SWITCH = 0x40

_page_header = struct.Struct("<HHIQI")  # magic, info, tli, pageaddr, rem_len
_long_header_tail = struct.Struct("<QII")  # sysid, seg_size, xlog_blcksz
RECORD_HEADER_LAYOUT = struct.Struct("<IIQBB2xI")  # xl_tot_len, xl_xid, xl_prev, xl_info, xl_rmid, pad, xl_crc
RECORD_HEADER = RECORD_HEADER_LAYOUT.size  # 24
_CRC_OFFSET = RECORD_HEADER - 4
_record_header = RECORD_HEADER_LAYOUT
_u8 = struct.Struct("<B").unpack_from
_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from
_block_header = struct.Struct("<BH")  # fork_flags, data_length
_image_header = struct.Struct("<HHB")  # length, hole_offset, bimg_info
_relfilenode_blkno = struct.Struct("<III")
_SEGMENT_NAME = re.compile(r"^[0-9A-F]{24}$")


def maxalign(n: int) -> int:
    return (n + 7) & ~7


class WalDecodeError(ValueError):
    """A record's bytes are not a valid PostgreSQL 15 record."""


class _EndOfWal(Exception):
    """Valid WAL ends here; the message says why."""


class _ContinuationOverwritten(Exception):
    """The record was torn at a crash and overwritten after recovery; reading resumes at ``lsn``."""

    def __init__(self, lsn: int):
        super().__init__(lsn)
        self.lsn = lsn


@dataclass(slots=True)
class BlockRef:
    """One block reference of a record: which page, and what the record carries for it."""

    block_id: int
    tag: BufferTag
    will_init: bool
    has_data: bool
    data: bytes
    has_image: bool
    apply_image: bool = False
    image: bytes = b""  # as stored: without the hole, possibly compressed
    hole_offset: int = 0
    hole_length: int = 0
    image_compression: str | None = None

    @property
    def forknum(self) -> int:
        return self.tag.forknum

    @property
    def blkno(self) -> int:
        return self.tag.blkno


@dataclass(slots=True)
class DecodedRecord:
    """A whole WAL record with its position and decoded contents.

    ``end_lsn`` is PostgreSQL's EndRecPtr: where the next record may start (MAXALIGNed, past page headers only when
    the record itself crossed a page), the LSN redo stamps on the pages the record changes. For an XLOG_SWITCH
    record it is the start of the next segment, as in PostgreSQL.
    """

    start_lsn: int
    end_lsn: int
    raw: bytes
    tot_len: int
    xid: int
    prev: int
    info: int
    rmid: int
    crc: int
    blocks: list[BlockRef] = field(default_factory=list)
    main_data: bytes = b""
    origin: int | None = None
    toplevel_xid: int | None = None

    @property
    def rmgr_name(self) -> str:
        return rmgr_name(self.rmid)

    @property
    def rmgr_info(self) -> int:
        """The rmgr-specific bits of xl_info (the record type)."""
        return self.info & XLR_RMGR_INFO_MASK

    @property
    def is_switch(self) -> bool:
        return self.rmid == RM_XLOG_ID and self.rmgr_info == XLOG_SWITCH

    def block(self, block_id: int) -> BlockRef | None:
        for ref in self.blocks:
            if ref.block_id == block_id:
                return ref
        return None

    def as_wal_record(self) -> WalRecord:
        """What redo needs of this record: its end LSN and raw bytes."""
        return WalRecord(self.end_lsn, self.raw)

    def __str__(self) -> str:
        blocks = ", ".join(f"#{b.block_id} {b.tag}{' FPW' if b.has_image else ''}" for b in self.blocks)
        return (f"{self.rmgr_name} info {self.info:#04x} len {self.tot_len} tx {self.xid} "
                f"lsn {format_lsn(self.start_lsn)}{': ' + blocks if blocks else ''}")


def record_total_length(raw: bytes | memoryview) -> int:
    """xl_tot_len of a raw record (at least 4 bytes of it)."""
    return _u32(raw, 0)[0]


def seal_record(xid: int, prev: int, info: int, rmid: int, body: bytes) -> bytes:
    """A whole record from its header fields and body (block headers, images and data, main data): xl_tot_len
    and xl_crc filled in as XLogRecordAssemble and XLogInsert do."""
    header = RECORD_HEADER_LAYOUT.pack(RECORD_HEADER + len(body), xid, prev, info, rmid, 0)
    crc = crc32c.crc32c(header[:_CRC_OFFSET], crc32c.crc32c(body))
    return header[:_CRC_OFFSET] + struct.pack("<I", crc) + body


def verify_crc(raw: bytes | memoryview) -> bool:
    """True when the record's xl_crc matches: CRC32C of the payload, then of the header up to xl_crc."""
    crc = crc32c.crc32c(raw[RECORD_HEADER:])
    crc = crc32c.crc32c(raw[:_CRC_OFFSET], crc)
    return crc == _u32(raw, _CRC_OFFSET)[0]


def decode_record(raw: bytes, start_lsn: int = 0, end_lsn: int = 0) -> DecodedRecord:
    """Decode a whole raw record (header included). Checks structure, not the CRC (see ``verify_crc``)."""
    if len(raw) < RECORD_HEADER:
        raise WalDecodeError(f"record is {len(raw)} bytes, shorter than its {RECORD_HEADER}-byte header")
    tot_len, xid, prev, info, rmid, crc = _record_header.unpack_from(raw)
    if tot_len != len(raw):
        raise WalDecodeError(f"xl_tot_len is {tot_len} but the record has {len(raw)} bytes")
    record = DecodedRecord(start_lsn, end_lsn, bytes(raw), tot_len, xid, prev, info, rmid, crc)
    _decode_body(record, raw)
    return record


def _decode_body(record: DecodedRecord, raw: bytes) -> None:
    """Block headers first, then (in the same order) each block's image and data, then the main data."""
    pos = RECORD_HEADER
    end = len(raw)
    payload = 0  # bytes of images and data announced so far; headers end where only they remain
    main_len = 0
    last_rel = None
    last_block_id = -1
    pending: list[tuple[BlockRef, int, int]] = []  # block, image length, data length

    def need(n: int, what: str) -> None:
        if pos + n > end:
            raise WalDecodeError(f"record at {format_lsn(record.start_lsn)} ends inside {what}")

    while end - pos > payload:
        need(1, "a block id")
        block_id = raw[pos]
        pos += 1
        if block_id == XLR_BLOCK_ID_DATA_SHORT:
            need(1, "the main data length")
            main_len = raw[pos]
            pos += 1
            payload += main_len
            break  # main data header is always last
        if block_id == XLR_BLOCK_ID_DATA_LONG:
            need(4, "the main data length")
            main_len = _u32(raw, pos)[0]
            pos += 4
            payload += main_len
            break
        if block_id == XLR_BLOCK_ID_ORIGIN:
            need(2, "the replication origin")
            record.origin = _u16(raw, pos)[0]
            pos += 2
            continue
        if block_id == XLR_BLOCK_ID_TOPLEVEL_XID:
            need(4, "the top-level xid")
            record.toplevel_xid = _u32(raw, pos)[0]
            pos += 4
            continue
        if block_id > XLR_MAX_BLOCK_ID:
            raise WalDecodeError(f"invalid block id {block_id} at offset {pos - 1}")
        if block_id <= last_block_id:
            raise WalDecodeError(f"block id {block_id} out of order (after {last_block_id})")
        last_block_id = block_id
        need(_block_header.size, f"block {block_id}'s header")
        fork_flags, data_len = _block_header.unpack_from(raw, pos)
        pos += _block_header.size
        has_data = bool(fork_flags & BKPBLOCK_HAS_DATA)
        if has_data != (data_len > 0):
            raise WalDecodeError(f"block {block_id}: data flag {has_data} but data length {data_len}")
        ref = BlockRef(block_id, None, bool(fork_flags & BKPBLOCK_WILL_INIT), has_data, b"",
                       bool(fork_flags & BKPBLOCK_HAS_IMAGE))
        image_len = 0
        if ref.has_image:
            need(_image_header.size, f"block {block_id}'s image header")
            image_len, hole_offset, bimg_info = _image_header.unpack_from(raw, pos)
            pos += _image_header.size
            ref.apply_image = bool(bimg_info & BKPIMAGE_APPLY)
            compression = [name for bit, name in BKPIMAGE_COMPRESSION.items() if bimg_info & bit]
            if len(compression) > 1:
                raise WalDecodeError(f"block {block_id}: image claims several compression methods")
            ref.image_compression = compression[0] if compression else None
            if bimg_info & BKPIMAGE_HAS_HOLE:
                if ref.image_compression:
                    need(2, f"block {block_id}'s hole length")
                    hole_length = _u16(raw, pos)[0]
                    pos += 2
                else:
                    hole_length = XLOG_BLCKSZ - image_len
                if hole_offset == 0 or hole_length == 0 or hole_offset + hole_length > XLOG_BLCKSZ:
                    raise WalDecodeError(f"block {block_id}: invalid hole (offset {hole_offset}, "
                                         f"length {hole_length}, image {image_len})")
                ref.hole_offset, ref.hole_length = hole_offset, hole_length
            elif hole_offset != 0:
                raise WalDecodeError(f"block {block_id}: hole offset {hole_offset} without a hole")
            elif not ref.image_compression and image_len != XLOG_BLCKSZ:
                raise WalDecodeError(f"block {block_id}: uncompressed image without hole is {image_len} bytes")
        if fork_flags & BKPBLOCK_SAME_REL:
            if last_rel is None:
                raise WalDecodeError(f"block {block_id} says 'same relation' but no relation came before")
            need(4, f"block {block_id}'s block number")
            blkno = _u32(raw, pos)[0]
            pos += 4
        else:
            need(_relfilenode_blkno.size + 4, f"block {block_id}'s relation and block number")
            last_rel = _relfilenode_blkno.unpack_from(raw, pos)
            blkno = _u32(raw, pos + _relfilenode_blkno.size)[0]
            pos += _relfilenode_blkno.size + 4
        ref.tag = BufferTag(*last_rel, fork_flags & BKPBLOCK_FORK_MASK, blkno)
        payload += image_len + data_len
        pending.append((ref, image_len, data_len))

    if end - pos != payload:
        raise WalDecodeError(f"record at {format_lsn(record.start_lsn)}: headers announce {payload} bytes of "
                             f"images and data but {end - pos} follow")
    for ref, image_len, data_len in pending:
        ref.image = raw[pos:pos + image_len]
        pos += image_len
        ref.data = raw[pos:pos + data_len]
        pos += data_len
        record.blocks.append(ref)
    record.main_data = raw[pos:pos + main_len]


@dataclass(frozen=True)
class _PageHeader:
    lsn: int
    info: int
    tli: int
    rem_len: int
    size: int  # header length: where the page's data starts


class WalReader:
    """Records from a pg_wal directory or a list of segment files of one timeline, in LSN order.

    >>> reader = WalReader("pg_wal")
    >>> for record in reader.records():
    ...     print(record)
    >>> reader.end_lsn, reader.end_reason

    The segment size comes from the first segment's long page header. Without a start LSN, reading begins at the
    first valid page and, when that page starts with the tail of an earlier record (a replica's or safekeeper's
    copy that begins mid-segment), at the first record after that tail.
    """

    def __init__(self, source: str | os.PathLike | Iterable[str | os.PathLike], *, timeline: int | None = None):
        paths = _segment_paths(source)
        by_timeline: dict[int, dict[int, Path]] = {}
        self.segment_size = _read_segment_size(paths)
        segments_per_id = 0x1_0000_0000 // self.segment_size
        for path in paths:
            name = path.name
            tli, log, seg = int(name[0:8], 16), int(name[8:16], 16), int(name[16:24], 16)
            by_timeline.setdefault(tli, {})[log * segments_per_id + seg] = path
        if timeline is None:
            if len(by_timeline) > 1:
                raise WalDecodeError(f"segments of timelines {sorted(by_timeline)} found; say which timeline")
            timeline = next(iter(by_timeline))
        if timeline not in by_timeline:
            raise WalDecodeError(f"no segment of timeline {timeline}")
        self.timeline = timeline
        self._segments = by_timeline[timeline]
        self._cached_segno: int | None = None
        self._cached_data = b""
        self.start_lsn: int | None = None
        self.end_lsn: int | None = None
        self.end_reason: str | None = None

    @property
    def first_segment_lsn(self) -> int:
        return min(self._segments) * self.segment_size

    def records(self, start_lsn: int | None = None) -> Iterator[DecodedRecord]:
        """Every valid record from ``start_lsn`` (a record's start) or the first record found, to the end of WAL."""
        self.end_lsn = self.end_reason = None
        try:
            pos = self.find_first_record() if start_lsn is None else start_lsn
        except _EndOfWal as end:
            self.start_lsn = None
            self.end_lsn, self.end_reason = self.first_segment_lsn, str(end)
            return
        self.start_lsn = pos
        prev = None
        while True:
            try:
                record = self._read_record(pos, prev)
            except _EndOfWal as end:
                self.end_lsn, self.end_reason = pos, str(end)
                return
            except _ContinuationOverwritten as overwritten:
                pos, prev = overwritten.lsn, None
                continue
            yield record
            prev = record.start_lsn
            pos = record.end_lsn

    def find_first_record(self) -> int:
        """Start of the first whole record in the first segment that has a valid page."""
        for segno in sorted(self._segments):
            page_lsn = segno * self.segment_size
            segment_end = page_lsn + self.segment_size
            while page_lsn < segment_end:
                try:
                    header = self._page_header(page_lsn)
                except _EndOfWal:
                    page_lsn += XLOG_BLCKSZ  # zeros or an old page before the copy's first valid one
                    continue
                # Skip the tail of a record that began before this copy, page by page.
                while header.info & XLP_FIRST_IS_CONTRECORD:
                    room = XLOG_BLCKSZ - header.size
                    if header.rem_len <= room:
                        return page_lsn + header.size + maxalign(header.rem_len)
                    page_lsn += XLOG_BLCKSZ
                    header = self._page_header(page_lsn)
                return page_lsn + header.size
        raise _EndOfWal("no valid WAL page in any segment")

    # --- pages ----------------------------------------------------------------------------------------------------

    def _segment(self, segno: int) -> bytes:
        if segno != self._cached_segno:
            path = self._segments.get(segno)
            if path is None:
                raise _EndOfWal(f"WAL segment {self._segment_name(segno)} is missing")
            self._cached_data = path.read_bytes()
            self._cached_segno = segno
        return self._cached_data

    def _segment_name(self, segno: int) -> str:
        per_id = 0x1_0000_0000 // self.segment_size
        return f"{self.timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"

    def _page_header(self, page_lsn: int) -> _PageHeader:
        segno, offset = divmod(page_lsn, self.segment_size)
        data = self._segment(segno)
        if len(data) < offset + XLOG_BLCKSZ:
            raise _EndOfWal(f"segment {self._segment_name(segno)} ends before page {format_lsn(page_lsn)}")
        magic, info, tli, pageaddr, rem_len = _page_header.unpack_from(data, offset)
        where = f"page {format_lsn(page_lsn)}"
        if magic != XLOG_PAGE_MAGIC:
            if not any(data[offset:offset + XLOG_BLCKSZ]):
                raise _EndOfWal(f"{where} is zeros: never written")
            raise _EndOfWal(f"{where} has magic {magic:#06x}, not PostgreSQL 15's {XLOG_PAGE_MAGIC:#06x}")
        if info & ~XLP_ALL_FLAGS:
            raise _EndOfWal(f"{where} has invalid info bits {info:#x}")
        if pageaddr != page_lsn:
            raise _EndOfWal(f"{where} carries address {format_lsn(pageaddr)}: old contents of a recycled segment")
        if tli > self.timeline:
            raise _EndOfWal(f"{where} belongs to timeline {tli}, after ours ({self.timeline})")
        if offset == 0:
            if not info & XLP_LONG_HEADER:
                raise _EndOfWal(f"{where} starts a segment but has no long header")
            _sysid, seg_size, blcksz = _long_header_tail.unpack_from(data, offset + _page_header.size + 4)
            if seg_size != self.segment_size or blcksz != XLOG_BLCKSZ:
                raise _EndOfWal(f"{where}: segment size {seg_size} / page size {blcksz} differ from the first "
                                f"segment's {self.segment_size} / {XLOG_BLCKSZ}")
        size = LONG_PAGE_HEADER if info & XLP_LONG_HEADER else SHORT_PAGE_HEADER
        return _PageHeader(page_lsn, info, tli, rem_len, size)

    def _page_bytes(self, page_lsn: int, start: int, length: int) -> bytes:
        segno, offset = divmod(page_lsn, self.segment_size)
        return self._segment(segno)[offset + start:offset + start + length]

    # --- records --------------------------------------------------------------------------------------------------

    def _read_record(self, pos: int, prev: int | None) -> DecodedRecord:
        page_lsn = pos - pos % XLOG_BLCKSZ
        header = self._page_header(page_lsn)
        offset = pos - page_lsn
        if offset == 0:
            offset = header.size  # the previous record ended exactly at a page boundary
            pos += offset
            if header.info & XLP_FIRST_IS_CONTRECORD:
                raise _EndOfWal(f"page {format_lsn(page_lsn)} continues a record, but none was open")
        elif offset < header.size:
            raise _EndOfWal(f"record position {format_lsn(pos)} is inside a page header")
        where = f"record at {format_lsn(pos)}"
        tot_len = _u32(self._page_bytes(page_lsn, offset, 4), 0)[0]
        if tot_len == 0:
            raise _EndOfWal(f"{where}: length 0, the WAL written so far ends here")
        if tot_len < RECORD_HEADER or tot_len > MAX_RECORD_LEN:
            raise _EndOfWal(f"{where}: invalid record length {tot_len}")
        chunk = self._page_bytes(page_lsn, offset, min(tot_len, XLOG_BLCKSZ - offset))
        chunks = [chunk]
        remaining = tot_len - len(chunk)
        end = pos + tot_len
        while remaining:
            page_lsn += XLOG_BLCKSZ
            try:
                header = self._page_header(page_lsn)
            except _EndOfWal as reason:
                raise _EndOfWal(f"{where} is incomplete: {reason}") from None
            if not header.info & XLP_FIRST_IS_CONTRECORD:
                if header.info & XLP_FIRST_IS_OVERWRITE_CONTRECORD:
                    raise _ContinuationOverwritten(page_lsn + header.size)
                raise _EndOfWal(f"{where} is incomplete: page {format_lsn(page_lsn)} does not continue it")
            if header.rem_len != remaining:
                raise _EndOfWal(f"{where}: page {format_lsn(page_lsn)} says {header.rem_len} bytes remain, "
                                f"expected {remaining}")
            chunk = self._page_bytes(page_lsn, header.size, min(remaining, XLOG_BLCKSZ - header.size))
            chunks.append(chunk)
            remaining -= len(chunk)
            end = page_lsn + header.size + len(chunk)
        raw = b"".join(chunks) if len(chunks) > 1 else chunk
        tot_len, xid, prev_link, info, rmid, crc = _record_header.unpack_from(raw)
        if not (rmid <= RM_MAX_BUILTIN_ID or rmid >= RM_MIN_CUSTOM_ID):
            raise _EndOfWal(f"{where}: invalid resource manager id {rmid}")
        if prev is not None and prev_link != prev:
            raise _EndOfWal(f"{where}: back-link {format_lsn(prev_link)} does not point to the previous record "
                            f"{format_lsn(prev)}")
        if not verify_crc(raw):
            raise _EndOfWal(f"{where}: CRC32C mismatch")
        end_lsn = maxalign(end)
        if rmid == RM_XLOG_ID and info & XLR_RMGR_INFO_MASK == XLOG_SWITCH:
            end_lsn = -(-end_lsn // self.segment_size) * self.segment_size  # the rest of the segment is unused
        try:
            return decode_record(raw, pos, end_lsn)
        except WalDecodeError as error:
            raise _EndOfWal(f"{where}: {error}") from None


def _segment_paths(source) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
        if source.is_dir():
            paths = [p for p in source.iterdir() if _SEGMENT_NAME.match(p.name) and p.is_file()]
        else:
            paths = [source]
    else:
        paths = [Path(p) for p in source]
    for path in paths:
        if not _SEGMENT_NAME.match(path.name):
            raise WalDecodeError(f"{path} is not named like a WAL segment (24 hex digits)")
    if not paths:
        raise WalDecodeError(f"no WAL segment files in {source}")
    return sorted(paths, key=lambda p: p.name)


def _read_segment_size(paths: list[Path]) -> int:
    """The segment size from a long page header; a copy may start with zeroed pages, so take any segment's."""
    for path in paths:
        with open(path, "rb") as f:
            head = f.read(LONG_PAGE_HEADER)
        if len(head) < LONG_PAGE_HEADER:
            continue
        magic, info, _tli, _addr, _rem = _page_header.unpack_from(head)
        if magic == XLOG_PAGE_MAGIC and info & XLP_LONG_HEADER:
            seg_size = _long_header_tail.unpack_from(head, _page_header.size + 4)[1]
            if seg_size < (1 << 20) or seg_size > (1 << 30) or seg_size & (seg_size - 1):
                raise WalDecodeError(f"{path}: invalid segment size {seg_size}")
            return seg_size
    # Every first page zeroed (a copy that starts mid-segment): fall back on the file size.
    size = paths[0].stat().st_size
    if size < (1 << 20) or size > (1 << 30) or size & (size - 1):
        raise WalDecodeError(f"cannot tell the segment size: no long page header, and {paths[0]} is {size} bytes")
    return size
