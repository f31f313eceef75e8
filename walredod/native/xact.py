"""Transaction records (rmgr XACT) as PostgreSQL 15 writes them: which transactions end, and how."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from walredod.errors import InvalidRequest
from walredod.pg15 import RM_XACT_ID
from walredod.wal import DecodedRecord

XLOG_XACT_COMMIT = 0x00
XLOG_XACT_PREPARE = 0x10
XLOG_XACT_ABORT = 0x20
XLOG_XACT_COMMIT_PREPARED = 0x30
XLOG_XACT_ABORT_PREPARED = 0x40
XLOG_XACT_OPMASK = 0x70
XLOG_XACT_HAS_INFO = 0x80

XINFO_HAS_DBINFO = 1 << 0
XINFO_HAS_SUBXACTS = 1 << 1
XINFO_HAS_RELFILENODES = 1 << 2
XINFO_HAS_INVALS = 1 << 3
XINFO_HAS_TWOPHASE = 1 << 4
XINFO_HAS_ORIGIN = 1 << 5
XINFO_HAS_GID = 1 << 7
XINFO_HAS_DROPPED_STATS = 1 << 8

STATUS_COMMITTED = 1
STATUS_ABORTED = 2

_i32 = struct.Struct("<i").unpack_from
_u32 = struct.Struct("<I").unpack_from


@dataclass(frozen=True)
class TransactionEnd:
    """A commit or abort: the status every listed transaction (the top one and its subtransactions) gets."""

    xid: int
    subxacts: tuple[int, ...]
    status: int
    dropped_relfilenodes: tuple[tuple[int, int, int], ...]
    prepared: bool  # COMMIT/ABORT PREPARED: ``xid`` is the prepared transaction's

    @property
    def xids(self) -> tuple[int, ...]:
        return (self.xid, *self.subxacts)


def parse_transaction_end(record: DecodedRecord) -> TransactionEnd | None:
    """The transaction end a XACT record carries, or None for other XACT records (assignment, invalidations...)."""
    if record.rmid != RM_XACT_ID:
        return None
    op = record.info & XLOG_XACT_OPMASK
    if op not in (XLOG_XACT_COMMIT, XLOG_XACT_ABORT, XLOG_XACT_COMMIT_PREPARED, XLOG_XACT_ABORT_PREPARED):
        return None
    data = record.main_data
    try:
        pos = 8  # xact_time
        xinfo = 0
        if record.info & XLOG_XACT_HAS_INFO:
            xinfo = _u32(data, pos)[0]
            pos += 4
        if xinfo & XINFO_HAS_DBINFO:
            pos += 8
        subxacts: tuple[int, ...] = ()
        if xinfo & XINFO_HAS_SUBXACTS:
            count = _i32(data, pos)[0]
            subxacts = struct.unpack_from(f"<{count}I", data, pos + 4)
            pos += 4 + 4 * count
        dropped: tuple = ()
        if xinfo & XINFO_HAS_RELFILENODES:
            count = _i32(data, pos)[0]
            dropped = tuple(struct.unpack_from("<III", data, pos + 4 + 12 * i) for i in range(count))
            pos += 4 + 12 * count
        if xinfo & XINFO_HAS_DROPPED_STATS:
            pos += 4 + 12 * _i32(data, pos)[0]
        if xinfo & XINFO_HAS_INVALS:
            pos += 4 + 16 * _i32(data, pos)[0]
        xid = record.xid
        if xinfo & XINFO_HAS_TWOPHASE:
            xid = _u32(data, pos)[0]
            pos += 4
            if xinfo & XINFO_HAS_GID:
                end_of_gid = data.index(b"\0", pos)  # ValueError: no terminator
                pos = end_of_gid + 1
        if xinfo & XINFO_HAS_ORIGIN:
            pos += 16  # origin LSN and timestamp, unaligned
        if pos > len(data):
            raise struct.error("sections run past the record's data")
    except (struct.error, ValueError) as exc:
        raise InvalidRequest(f"malformed transaction record at {record.start_lsn:X}: {exc}") from None
    committed = op in (XLOG_XACT_COMMIT, XLOG_XACT_COMMIT_PREPARED)
    return TransactionEnd(xid, tuple(subxacts), STATUS_COMMITTED if committed else STATUS_ABORTED, dropped,
                          op in (XLOG_XACT_COMMIT_PREPARED, XLOG_XACT_ABORT_PREPARED))


def prepared_state(record: DecodedRecord) -> tuple[int, bytes] | None:
    """(xid, state) of a PREPARE TRANSACTION record: its data is the prepared transaction's state."""
    if record.rmid != RM_XACT_ID or record.info & XLOG_XACT_OPMASK != XLOG_XACT_PREPARE:
        return None
    if len(record.main_data) < 12:
        raise InvalidRequest(f"PREPARE record at {record.start_lsn:X} is too short")
    return _u32(record.main_data, 8)[0], record.main_data  # TwoPhaseFileHeader: magic, total_len, xid, ...
