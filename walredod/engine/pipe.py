"""Encoding of the wal-redo pipe protocol spoken with a redo child (Neon's `postgres --wal-redo` protocol).

Every message is a tag byte and a big-endian u32 length that counts itself and the body. A block tag is
forknum u8, spcnode, dbnode, relnode, blkno u32, big-endian. Only 'G' and 'H' are answered: BLCKSZ bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from walredod.types import BLCKSZ, BufferTag, WalRecord

_TAG = struct.Struct(">BIIII")
TAG_LEN = _TAG.size  # 17
_HEADER = struct.Struct(">cI")
_RECORD_HEADER = struct.Struct(">cIQ")

PING = _HEADER.pack(b"H", 4)


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
