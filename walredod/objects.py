"""Names of the non-relation objects walredod rebuilds in Python: SLRU pages, relation-map files, two-phase state.

They stand beside walredod.types.BufferTag (relation pages). Each has a routing key like a relation's, so requests
for one object, and for its neighbours, reach the same warm worker.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

from walredod.errors import InvalidRequest
from walredod.pg15 import BLCKSZ, MAX_BLOCK_NUMBER
from walredod.types import BufferTag, ForkNumber


class SlruKind(IntEnum):
    CLOG = 0  # pg_xact: two status bits per transaction
    MULTIXACT_OFFSETS = 1  # pg_multixact/offsets: where each MultiXact's members start
    MULTIXACT_MEMBERS = 2  # pg_multixact/members: member xids and their lock strength


class SlruPageTag(NamedTuple):
    """One 8 kB page of an SLRU, by its global page number (segment file = pageno // 32)."""

    kind: SlruKind
    pageno: int

    @property
    def routing_key(self) -> tuple[int, int, int]:
        return (0xFFFFFFFF, int(self.kind), self.pageno // 32)  # one segment's pages go together

    def __str__(self) -> str:
        return f"{SlruKind(self.kind).name.lower()} page {self.pageno}"


class RelMapTag(NamedTuple):
    """A relation-map file (pg_filenode.map, 512 bytes): dbnode 0 is the global map."""

    spcnode: int
    dbnode: int

    @property
    def routing_key(self) -> tuple[int, int, int]:
        return (0xFFFFFFFE, self.spcnode, self.dbnode)

    def __str__(self) -> str:
        return f"relmap {self.spcnode}/{self.dbnode}"


class TwoPhaseTag(NamedTuple):
    """The state file of a prepared transaction (pg_twophase/<xid>)."""

    xid: int

    @property
    def routing_key(self) -> tuple[int, int, int]:
        return (0xFFFFFFFD, 0, self.xid)

    def __str__(self) -> str:
        return f"two-phase state of xid {self.xid}"


SLRU_PAGES_PER_SEGMENT = 32
RELMAP_FILE_SIZE = 512


# --- the one check of tags and base images -------------------------------------------------------------------------

_U32_MAX = 0xFFFFFFFF


def _u32(*values: int) -> bool:
    for v in values:  # a loop, not all() over a generator: this runs for every request a client sends
        if not (isinstance(v, int) and 0 <= v <= _U32_MAX):
            return False
    return True


def check_tag(tag) -> None:
    """Raise InvalidRequest unless ``tag`` names a page or object walredod rebuilds, with every field in range."""
    if isinstance(tag, BufferTag):
        if not _u32(tag.spcnode, tag.dbnode, tag.relnode):
            raise InvalidRequest(f"tag {tag}: relation OIDs must be unsigned 32-bit numbers")
        if not (isinstance(tag.forknum, int) and 0 <= tag.forknum <= ForkNumber.INIT):
            raise InvalidRequest(f"tag {tag}: fork number must be 0 to {int(ForkNumber.INIT)}")
        if not (isinstance(tag.blkno, int) and 0 <= tag.blkno < MAX_BLOCK_NUMBER):
            raise InvalidRequest(f"tag {tag}: block number must be below {MAX_BLOCK_NUMBER:#x} (PostgreSQL's limit)")
    elif isinstance(tag, SlruPageTag):
        if not (isinstance(tag.kind, int) and 0 <= tag.kind < len(SlruKind)):
            raise InvalidRequest(f"SLRU kind {tag.kind} is not 0 to {len(SlruKind) - 1}")
        if not _u32(tag.pageno):
            raise InvalidRequest(f"{tag}: the page number must be an unsigned 32-bit number")
    elif isinstance(tag, RelMapTag):
        if not _u32(tag.spcnode, tag.dbnode):
            raise InvalidRequest(f"{tag}: tablespace and database OIDs must be unsigned 32-bit numbers")
    elif isinstance(tag, TwoPhaseTag):
        if not _u32(tag.xid):
            raise InvalidRequest(f"{tag}: the xid must be an unsigned 32-bit number")
    else:
        raise InvalidRequest(f"{type(tag).__name__} is not a page or object walredod rebuilds")


def base_image_size(tag) -> int | None:
    """Bytes of the object's base image: a page, a relation-map file; None for two-phase state (any size)."""
    if isinstance(tag, (BufferTag, SlruPageTag)):
        return BLCKSZ
    if isinstance(tag, RelMapTag):
        return RELMAP_FILE_SIZE
    return None


def check_base_image(tag, image, name: str = "base image") -> None:
    """Raise InvalidRequest unless ``image`` (None: the object does not exist yet) has the size of ``tag``'s
    object. ``name`` is what the message calls the image."""
    size = base_image_size(tag)
    if image is not None and size is not None and len(image) != size:
        what = "a relation-map file" if isinstance(tag, RelMapTag) else "a page"
        raise InvalidRequest(f"{name} is {len(image)} bytes, {what} is {size}")
