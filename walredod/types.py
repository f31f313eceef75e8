"""Value types shared by every layer: what a page is called and what a record is."""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple


from walredod.pg15 import BLCKSZ

ZERO_PAGE = bytes(BLCKSZ)


class ForkNumber(IntEnum):
    MAIN = 0
    FSM = 1
    VISIBILITYMAP = 2
    INIT = 3


class BufferTag(NamedTuple):
    """Names one relation page, as PostgreSQL's BufferTag does (tablespace, database, relfilenode, fork, block)."""

    spcnode: int
    dbnode: int
    relnode: int
    forknum: int
    blkno: int

    @property
    def relation(self) -> tuple[int, int, int]:
        """The (spcnode, dbnode, relnode) part: the key requests are routed by."""
        return (self.spcnode, self.dbnode, self.relnode)

    def __str__(self) -> str:
        return f"{self.spcnode}/{self.dbnode}/{self.relnode} fork {self.forknum} blk {self.blkno}"


class WalRecord(NamedTuple):
    """One raw WAL record to replay.

    ``lsn`` is the record's END position (PostgreSQL's EndRecPtr: where the next record starts, MAXALIGNed),
    the value redo stamps on the pages it changes. ``data`` is the whole XLogRecord, header included.
    """

    lsn: int
    data: bytes


def format_lsn(lsn: int) -> str:
    """LSN in PostgreSQL's X/X notation."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    hi, lo = text.strip().split("/")
    return (int(hi, 16) << 32) | int(lo, 16)
