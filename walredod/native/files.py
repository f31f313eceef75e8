"""Relation-map files and two-phase state files: whole small files that one record rewrites or creates."""

from __future__ import annotations

import struct

import crc32c

from walredod.errors import InvalidRequest
from walredod.native.xact import parse_transaction_end, prepared_state
from walredod.pg15 import RM_RELMAP_ID
from walredod.objects import RELMAP_FILE_SIZE, RelMapTag, TwoPhaseTag
from walredod.wal import DecodedRecord

XLOG_RELMAP_UPDATE = 0x00
RELMAP_MAGIC = 0x592717
RELMAP_CRC_OFFSET = RELMAP_FILE_SIZE - 8  # the CRC covers everything before it; 4 bytes of padding follow it


def apply_relmap(tag: RelMapTag, current: bytes | None, record: DecodedRecord) -> bytes:
    """A RELMAP_UPDATE record carries the whole new file; PostgreSQL writes it with its magic and CRC set."""
    if not isinstance(record, DecodedRecord) or record.rmid != RM_RELMAP_ID or record.rmgr_info != XLOG_RELMAP_UPDATE:
        raise InvalidRequest(f"only relation-map update records change {tag}")
    try:
        dbid, tsid, nbytes = struct.unpack_from("<IIi", record.main_data)
    except struct.error:
        raise InvalidRequest(f"malformed relation-map record at {record.start_lsn:X}") from None
    if (tsid, dbid) != (tag.spcnode, tag.dbnode):
        raise InvalidRequest(f"relation-map record for {tsid}/{dbid} does not change {tag}")
    if nbytes != RELMAP_FILE_SIZE or len(record.main_data) < 12 + nbytes:
        raise InvalidRequest(f"relation-map record carries {nbytes} bytes, a map file is {RELMAP_FILE_SIZE}")
    content = bytearray(record.main_data[12:12 + nbytes])
    struct.pack_into("<i", content, 0, RELMAP_MAGIC)
    struct.pack_into("<I", content, RELMAP_CRC_OFFSET, crc32c.crc32c(bytes(content[:RELMAP_CRC_OFFSET])))
    return bytes(content)


def apply_twophase(tag: TwoPhaseTag, current: bytes | None, record: DecodedRecord) -> bytes | None:
    """PREPARE creates the state file (the record's data and its CRC32C); COMMIT/ABORT PREPARED removes it."""
    if isinstance(record, DecodedRecord):
        prepared = prepared_state(record)
        if prepared is not None:
            xid, state = prepared
            if xid != tag.xid:
                raise InvalidRequest(f"PREPARE of xid {xid} does not change {tag}")
            return state + struct.pack("<I", crc32c.crc32c(state))
        end = parse_transaction_end(record)
        if end is not None and end.prepared:
            if end.xid != tag.xid:
                raise InvalidRequest(f"end of prepared xid {end.xid} does not change {tag}")
            return None
    raise InvalidRequest(f"only PREPARE, COMMIT PREPARED and ABORT PREPARED records change {tag}")
