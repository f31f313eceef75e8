"""Encoding of the wal-redo pipe protocol spoken with a redo child (Neon's `postgres --wal-redo` protocol).

Every message is a tag byte and a big-endian u32 length that counts itself and the body. A block tag is
forknum u8, spcnode, dbnode, relnode, blkno u32, big-endian. Only 'G' and 'H' are answered: BLCKSZ bytes.
"""

from __future__ import annotations

import struct

from collections.abc import Sequence

from walredod.pg15 import BLCKSZ, RM_XLOG_ID, XLOG_FPI, init_page
from walredod.types import BufferTag, WalRecord
from walredod.wal import seal_record

_TAG = struct.Struct(">BIIII")
TAG_LEN = _TAG.size  # 17
_HEADER = struct.Struct(">cI")
_RECORD_HEADER = struct.Struct(">cIQ")

PING = _HEADER.pack(b"H", 4)

# A full-page-image record (rmgr XLOG, info XLOG_FPI) for one block of an otherwise unused relation: replaying it
# once walks a new child through decoding, buffer and redo code, so its first real request finds them in memory.
_WARMUP_TAG = BufferTag(1663, 1, 1, 0, 0)
_WARMUP_END_LSN = 0x100_0000


def _warmup_request() -> bytes:
    page = init_page(lsn=1)
    body = (struct.pack("<BBH", 0, 0x10, 0)  # block 0: main fork, has image, no data
            + struct.pack("<HHB", BLCKSZ, 0, 0x02)  # image: whole page, no hole, apply
            + struct.pack("<IIII", *_WARMUP_TAG[:3], _WARMUP_TAG.blkno) + bytes(page))
    record = seal_record(0, 0, XLOG_FPI, RM_XLOG_ID, body)
    return encode_request(_WARMUP_TAG, None, [WalRecord(_WARMUP_END_LSN, record)])


def encode_tag(tag: BufferTag) -> bytes:
    return _TAG.pack(tag.forknum, tag.spcnode, tag.dbnode, tag.relnode, tag.blkno)


def encode_request(tag: BufferTag, base_image: bytes | None, records: Sequence[WalRecord]) -> bytes:
    """One redo request as a single buffer: begin, base page, every record, get page."""
    wire_tag = encode_tag(tag)
    begin = _HEADER.pack(b"B", 4 + TAG_LEN) + wire_tag
    parts = [begin]
    if base_image is not None:
        parts.append(_HEADER.pack(b"P", 4 + TAG_LEN + BLCKSZ))
        parts.append(wire_tag)
        parts.append(base_image)
    pack_record = _RECORD_HEADER.pack
    for lsn, data in records:
        parts.append(pack_record(b"A", 12 + len(data), lsn))
        parts.append(data)
    parts.append(b"G")
    parts.append(begin[1:])  # same length and tag as 'B'
    return b"".join(parts)


WARMUP = _warmup_request()
