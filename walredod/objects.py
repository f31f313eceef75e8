"""Names of the non-relation objects walredod rebuilds in Python: SLRU pages, relation-map files, two-phase state.

They stand beside walredod.types.BufferTag (relation pages). Each has a routing key like a relation's, so requests
for one object, and for its neighbours, reach the same warm worker.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple


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
