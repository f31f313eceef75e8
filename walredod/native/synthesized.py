"""Records a pageserver makes itself while ingesting WAL, each with the end LSN of the WAL record it stands for.

PostgreSQL changes some pages as a side effect, with no block reference to them: heap records clear visibility-map
bits, a commit sets transaction status bits. A pageserver keeps such a change as a small synthesized record in the
page's own history. On the wire a synthesized record is a record frame that starts with the magic ``WRSY`` (a raw
record starts with its length, which can never equal those bytes), then a type byte, then its fields, big-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from walredod.errors import InvalidRequest

MAGIC = b"WRSY"
VISIBILITY_MAP_MASKS = (1, 2, 3)  # all-visible, all-frozen, both
TRANSACTION_STATUSES = (1, 2)  # committed, aborted
_u32 = struct.Struct(">I")
_u32_pair = struct.Struct(">II")


@dataclass(frozen=True)
class ClearVisibilityMapFlags:
    """Clear the bits in ``flags`` (a mask: 1 all-visible, 2 all-frozen) of heap blocks in a visibility-map page."""

    heap_blocks: tuple[int, ...]
    flags: int
    type_id = 1
    name = "clear visibility-map flags"

    def body(self) -> bytes:
        return bytes([self.flags]) + struct.pack(f">{len(self.heap_blocks)}I", *self.heap_blocks)

    @classmethod
    def parse(cls, body: bytes):
        if not body or body[0] not in VISIBILITY_MAP_MASKS:
            raise InvalidRequest(f"{cls.name}: flags {body[0] if body else 'missing'} are not 1, 2 or 3")
        return cls(struct.unpack(f">{(len(body) - 1) // 4}I", body[1:]), body[0])


@dataclass(frozen=True)
class TruncateVisibilityMap:
    """The heap was truncated to ``heap_nblocks`` blocks: bits of later blocks are cleared."""

    heap_nblocks: int
    type_id = 2
    name = "truncate visibility map"

    def body(self) -> bytes:
        return _u32.pack(self.heap_nblocks)

    @classmethod
    def parse(cls, body: bytes):
        return cls(*_u32.unpack(body))


@dataclass(frozen=True)
class SetClogStatus:
    """Set the status (1 committed, 2 aborted) of transactions in a pg_xact page."""

    xids: tuple[int, ...]
    status: int
    type_id = 3
    name = "set transaction status"

    def body(self) -> bytes:
        return bytes([self.status]) + struct.pack(f">{len(self.xids)}I", *self.xids)

    @classmethod
    def parse(cls, body: bytes):
        if not body or body[0] not in TRANSACTION_STATUSES:
            raise InvalidRequest(f"{cls.name}: status {body[0] if body else 'missing'} is not 1 or 2")
        return cls(struct.unpack(f">{(len(body) - 1) // 4}I", body[1:]), body[0])


@dataclass(frozen=True)
class CreateMultiXactOffset:
    """MultiXact ``mid`` has its members from ``offset`` on (pg_multixact/offsets)."""

    mid: int
    offset: int
    type_id = 4
    name = "create MultiXact offset"

    def body(self) -> bytes:
        return _u32_pair.pack(self.mid, self.offset)

    @classmethod
    def parse(cls, body: bytes):
        return cls(*_u32_pair.unpack(body))


@dataclass(frozen=True)
class CreateMultiXactMembers:
    """Members (xid, status) stored from member offset ``first_offset`` on (pg_multixact/members)."""

    first_offset: int
    members: tuple[tuple[int, int], ...]
    type_id = 5
    name = "create MultiXact members"

    def body(self) -> bytes:
        return _u32.pack(self.first_offset) + b"".join(_u32_pair.pack(x, s) for x, s in self.members)

    @classmethod
    def parse(cls, body: bytes):
        if len(body) < 4 or (len(body) - 4) % 8:
            raise InvalidRequest(f"{cls.name}: {len(body)} bytes are not an offset and whole (xid, status) pairs")
        return cls(_u32.unpack_from(body)[0],
                   tuple(_u32_pair.unpack_from(body, 4 + 8 * i) for i in range((len(body) - 4) // 8)))


SYNTHESIZED = {cls.type_id: cls for cls in (ClearVisibilityMapFlags, TruncateVisibilityMap, SetClogStatus,
                                             CreateMultiXactOffset, CreateMultiXactMembers)}


def encode(record) -> bytes:
    return MAGIC + bytes([record.type_id]) + record.body()


def is_synthesized(data) -> bool:
    return bytes(data[:4]) == MAGIC


def decode(data):
    data = bytes(data)
    cls = SYNTHESIZED.get(data[4]) if len(data) > 4 else None
    if cls is None:
        raise InvalidRequest(f"unknown synthesized record type {data[4] if len(data) > 4 else 'missing'}")
    try:
        return cls.parse(data[5:])
    except (struct.error, IndexError) as exc:
        raise InvalidRequest(f"malformed {cls.name} record: {exc}") from None
