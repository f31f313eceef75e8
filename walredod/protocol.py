"""The client wire protocol: ZeroMQ multipart messages between pageservers and the daemon (docs/client-protocol.md).

A request is an empty delimiter frame, a fixed-size header, the base image, the records' end LSNs, then one frame per
raw record. Pages and records travel as frames of their own, so neither side copies or re-encodes them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import zmq

from walredod.errors import ERROR_CLASSES, InvalidRequest, UnsupportedVersion, WalredodError
from walredod.objects import RelMapTag, SlruKind, SlruPageTag, TwoPhaseTag, check_base_image, check_tag
from walredod.types import BufferTag, WalRecord

MAGIC = b"WR"
VERSION = 1
KIND_REDO = 1
KIND_PING = 2
KIND_STATUS = 3  # answered by the supervisor: its state as JSON
KIND_DIRECTORY = 4  # answered by the supervisor: the workers' direct endpoints as JSON
KIND_BATCH = 5  # several redo requests in one message, answered in one message
MAX_BATCH = 1024  # redo requests in one batch
OBJECT_RELATION_PAGE = 0
OBJECT_SLRU_PAGE = 1  # fork field: SLRU kind (0 pg_xact, 1 multixact offsets, 2 multixact members); block: page
OBJECT_RELMAP = 2  # tablespace and database fields
OBJECT_TWOPHASE = 3  # block field: the prepared transaction's xid

REQUEST_FIELDS = (
    ("magic", "2s"), ("version", "B"), ("kind", "B"), ("request id", "Q"), ("timeout ms", "I"), ("lsn", "Q"),
    ("object kind", "B"), ("fork", "B"), ("spcnode", "I"), ("dbnode", "I"), ("relnode", "I"), ("block", "I"),
)
REPLY_FIELDS = (("magic", "2s"), ("version", "B"), ("status", "B"), ("request id", "Q"))
REQUEST_HEADER = struct.Struct(">" + "".join(code for _, code in REQUEST_FIELDS))  # 42 bytes
REPLY_HEADER = struct.Struct(">" + "".join(code for _, code in REPLY_FIELDS))  # 12 bytes
_VERSION_OFFSET = 2
_KIND_OFFSET = 3  # the request kind in a request header, the status in a reply header: both right after the version
_REQUEST_ID = struct.Struct(">Q")
_REQUEST_ID_OFFSET = 4
MAX_RECORDS = 100_000  # records in one redo request

STATUS_OK = 0
STATUS_CODES = {
    "invalid_request": 1, "redo_failed": 2, "timeout": 3, "poison": 4, "unavailable": 5, "internal": 6,
    "unsupported_version": 7,
}
STATUS_NAMES = {number: name for name, number in STATUS_CODES.items()}
_lsn_array_cache: dict[int, struct.Struct] = {}


@dataclass(slots=True)
class Request:
    """A decoded request. ``base_image`` and ``records`` are the frames' own buffers, not copies."""

    request_id: int
    kind: int
    timeout_ms: int
    lsn: int
    tag: BufferTag | None
    base_image: memoryview | bytes | None
    records: list[WalRecord]
    batch: list[list] | None = None  # a batch's requests, each as its own frames (delimiter first)


def _lsn_array(count: int) -> struct.Struct:
    packer = _lsn_array_cache.get(count)
    if packer is None:
        packer = struct.Struct(f">{count}Q")
        if count <= 256:
            _lsn_array_cache[count] = packer
    return packer


def field_offsets(fields) -> list[tuple[str, int, int]]:
    """(name, offset, size) of each field of a header layout (REQUEST_FIELDS, REPLY_FIELDS)."""
    rows, offset = [], 0
    for name, code in fields:
        size = struct.calcsize(">" + code)
        rows.append((name, offset, size))
        offset += size
    return rows


def request_kind(header) -> int | None:
    """The kind byte of a request header frame, None when the frame is too short to hold one."""
    return header[_KIND_OFFSET] if len(header) > _KIND_OFFSET else None


def reply_status(header) -> int:
    """The status byte of a reply header frame (as a worker sent it; see REPLY_FIELDS)."""
    return header[_KIND_OFFSET]


def tag_fields(tag) -> tuple[int, int, int, int, int, int]:
    """(object kind, fork, spcnode, dbnode, relnode, block) of any tag, as the header carries them."""
    if isinstance(tag, BufferTag):
        return OBJECT_RELATION_PAGE, tag.forknum, tag.spcnode, tag.dbnode, tag.relnode, tag.blkno
    if isinstance(tag, SlruPageTag):
        return OBJECT_SLRU_PAGE, int(tag.kind), 0, 0, 0, tag.pageno
    if isinstance(tag, RelMapTag):
        return OBJECT_RELMAP, 0, tag.spcnode, tag.dbnode, 0, 0
    if isinstance(tag, TwoPhaseTag):
        return OBJECT_TWOPHASE, 0, 0, 0, 0, tag.xid
    raise InvalidRequest(f"{type(tag).__name__} is not a page or object walredod rebuilds")


def encode_redo_request(request_id: int, tag, lsn: int, base_image: bytes | None,
                        records: Sequence[WalRecord], timeout_ms: int = 0) -> list:
    """The frames of a redo request (after the empty delimiter)."""
    header = REQUEST_HEADER.pack(MAGIC, VERSION, KIND_REDO, request_id, timeout_ms, lsn, *tag_fields(tag))
    lsns = _lsn_array(len(records)).pack(*(r[0] for r in records))  # WalRecord or plain (lsn, data) pairs
    return [b"", header, base_image if base_image is not None else b"", lsns, *(r[1] for r in records)]


CONTROL_KINDS = (KIND_PING, KIND_STATUS, KIND_DIRECTORY)


def encode_control(request_id: int, kind: int = KIND_PING) -> list:
    """A control request: a ping, status or directory request (``kind``), the header frame alone, its fields after
    the request id zero. The supervisor answers each; a worker answers pings only."""
    if kind not in CONTROL_KINDS:
        raise ValueError(f"request kind {kind} is not a ping, status or directory request")
    return [b"", REQUEST_HEADER.pack(MAGIC, VERSION, kind, request_id, 0, 0, 0, 0, 0, 0, 0, 0)]


def encode_batch(batch_id: int, requests: Sequence[list], timeout_ms: int = 0) -> list:
    """One message for several encoded redo requests (each as encode_redo_request gave it, delimiter first).
    ``timeout_ms`` is the whole batch's: its requests are served one after the other."""
    header = REQUEST_HEADER.pack(MAGIC, VERSION, KIND_BATCH, batch_id, timeout_ms, 0, 0, 0, 0, 0, 0, 0)
    frames = [b"", header]
    for request in requests:
        frames += request[1:]
    return frames


def split_batch(frames: Sequence) -> list[list]:
    """A batch's requests, each as the frames of a plain request (delimiter first). Each request is its header, its
    base image, its LSN frame and as many record frames as the LSN frame holds LSNs."""
    parts, position, count = [], 2, len(frames)
    while position < count:
        if len(parts) == MAX_BATCH:
            raise InvalidRequest(f"more than {MAX_BATCH} requests in one batch")
        if position + 3 > count:
            raise InvalidRequest(f"batch request {len(parts)} is cut short: a request has at least a header, a base "
                                 f"image and an LSN frame")
        header = frames[position]
        if len(header) != REQUEST_HEADER.size or request_kind(header) != KIND_REDO:
            raise InvalidRequest(f"batch request {len(parts)}: its header frame is not a redo request's")
        records = len(frames[position + 2]) // 8
        end = position + 3 + records
        if end > count:
            raise InvalidRequest(f"batch request {len(parts)}: its LSN frame holds {records} LSNs but only "
                                 f"{count - position - 3} frames follow")
        parts.append([b"", *frames[position:end]])
        position = end
    if not parts:
        raise InvalidRequest("a batch holds no requests")
    return parts


def encode_batch_reply(batch_id: int, replies: Sequence[list]) -> list:
    """The replies to a batch's requests, in its order, each as its reply header and body."""
    frames = [b"", REPLY_HEADER.pack(MAGIC, VERSION, STATUS_OK, batch_id)]
    for reply in replies:
        frames += reply[1:]
    return frames


def decode_batch_reply(frames: Sequence) -> list[tuple[int, int, bytes]]:
    """(request id, status, page or error message) of each request of a batch's successful reply."""
    if len(frames) < 4 or len(frames) % 2:
        raise InvalidRequest(f"malformed batch reply of {len(frames)} frames")
    return [decode_reply([b"", frames[i], frames[i + 1]]) for i in range(2, len(frames), 2)]


def peek_request_id(frames: Sequence) -> int | None:
    """The request id of a message that may be malformed, so that even an error reply names its request: read
    whenever the second frame starts with the magic and reaches past the request id, whatever else is wrong."""
    if (len(frames) >= 2 and len(frames[1]) >= _REQUEST_ID_OFFSET + _REQUEST_ID.size
            and bytes(frames[1][:len(MAGIC)]) == MAGIC):
        return _REQUEST_ID.unpack_from(frames[1], _REQUEST_ID_OFFSET)[0]
    return None


def decode_request(frames: Sequence, records: bool = True) -> Request:
    """Check and decode a request's frames (delimiter first). Raises InvalidRequest naming what is wrong.

    With ``records=False`` the frames are checked but the records are not unpacked (the supervisor's cheap look).
    """
    if len(frames) < 2 or len(frames[0]) != 0:
        raise InvalidRequest("a request starts with an empty delimiter frame, then the header frame")
    header = frames[1]
    if len(header) <= _KIND_OFFSET or bytes(header[:len(MAGIC)]) != MAGIC:
        raise InvalidRequest("the header frame does not start with the magic bytes 'WR'")
    if header[_VERSION_OFFSET] != VERSION:
        raise UnsupportedVersion(f"protocol version {header[_VERSION_OFFSET]} is not supported; this daemon speaks "
                                 f"{VERSION}")
    if len(header) != REQUEST_HEADER.size:
        raise InvalidRequest(f"the header frame is {len(header)} bytes, expected {REQUEST_HEADER.size}")
    (_magic, _version, kind, request_id, timeout_ms, lsn, object_kind,
     forknum, spcnode, dbnode, relnode, blkno) = REQUEST_HEADER.unpack(header)
    if kind in CONTROL_KINDS:
        if len(frames) != 2:
            raise InvalidRequest("a ping, status or directory request has only the header frame")
        return Request(request_id, kind, timeout_ms, 0, None, None, [])
    if kind == KIND_BATCH:
        parts = split_batch(frames)
        try:  # the batch goes where its first request would; a bad one is answered on its own, later
            tag = decode_request(parts[0], records=False).tag
        except InvalidRequest:
            tag = None
        return Request(request_id, kind, timeout_ms, 0, tag, None, [], parts)
    if kind != KIND_REDO:
        raise InvalidRequest(f"unknown request kind {kind}")
    tag = _tag(object_kind, forknum, spcnode, dbnode, relnode, blkno)
    if len(frames) < 4:
        raise InvalidRequest(f"a redo request has at least 4 frames (delimiter, header, base image, LSNs), "
                             f"got {len(frames)}")
    base = frames[2]
    check_base_image(tag, base if len(base) else None, "the base image frame")
    lsn_frame = frames[3]
    count = len(frames) - 4
    if count > MAX_RECORDS:
        raise InvalidRequest(f"{count} records in one request; at most {MAX_RECORDS}")
    if len(lsn_frame) != 8 * count:
        raise InvalidRequest(f"the LSN frame holds {len(lsn_frame) // 8} end LSNs for {count} record frames")
    if not records:
        return Request(request_id, kind, timeout_ms, lsn, tag, None, [])
    lsns = _lsn_array(count).unpack(lsn_frame)
    wal_records = [WalRecord(lsns[i], frames[4 + i]) for i in range(count)]
    return Request(request_id, kind, timeout_ms, lsn, tag, base if len(base) else None, wal_records)


def _tag(object_kind: int, forknum: int, spcnode: int, dbnode: int, relnode: int, blkno: int):
    if object_kind == OBJECT_RELATION_PAGE:
        tag = BufferTag(spcnode, dbnode, relnode, forknum, blkno)
    elif object_kind == OBJECT_SLRU_PAGE:
        tag = SlruPageTag(forknum, blkno)
    elif object_kind == OBJECT_RELMAP:
        tag = RelMapTag(spcnode, dbnode)
    elif object_kind == OBJECT_TWOPHASE:
        tag = TwoPhaseTag(blkno)
    else:
        raise InvalidRequest(f"unknown object kind {object_kind}")
    check_tag(tag)
    return tag._replace(kind=SlruKind(forknum)) if object_kind == OBJECT_SLRU_PAGE else tag


def routing_key(tag) -> tuple[int, int, int]:
    """What requests are routed by: the relation of a page, a comparable key for other objects (and one fixed key
    for a batch whose first request is malformed)."""
    if tag is None:
        return (0, 0, 0)
    return tag.relation if isinstance(tag, BufferTag) else tag.routing_key


_SNDMORE = int(zmq.SNDMORE)
_ZERO_COPY_FROM = 65536  # bytes: smaller frames are cheaper copied than pinned (pyzmq's own threshold)


def send_frames(socket: zmq.Socket, frames: Sequence) -> None:
    """``socket.send_multipart(frames)``, at about half the CPU for our small frames: pyzmq's version builds flag
    enums and frame objects per frame, which costs more than the copy of a page (bench/daemon_study.py)."""
    send = socket.send
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        send(frame, _SNDMORE if i < last else 0, copy=len(frame) < _ZERO_COPY_FROM)


def encode_reply(request_id: int, page) -> list:
    return [b"", REPLY_HEADER.pack(MAGIC, VERSION, STATUS_OK, request_id), page]


def encode_error(request_id: int, error: WalredodError) -> list:
    status = STATUS_CODES.get(error.code, STATUS_CODES["internal"])
    return [b"", REPLY_HEADER.pack(MAGIC, VERSION, status, request_id), str(error).encode("utf-8", "replace")]


def decode_reply(frames: Sequence) -> tuple[int, int, bytes]:
    """(request id, status, page or error message) of a reply (delimiter first)."""
    if len(frames) != 3 or len(frames[0]) != 0 or len(frames[1]) != REPLY_HEADER.size:
        raise InvalidRequest(f"malformed reply of {len(frames)} frames")
    magic, version, status, request_id = REPLY_HEADER.unpack(frames[1])
    if magic != MAGIC or version != VERSION:
        raise InvalidRequest(f"reply of an unknown protocol ({magic!r} version {version})")
    return request_id, status, frames[2]


def error_for(status: int, message: bytes) -> WalredodError:
    cls = ERROR_CLASSES.get(STATUS_NAMES.get(status, "internal"), WalredodError)
    return cls(bytes(message).decode("utf-8", "replace"))
