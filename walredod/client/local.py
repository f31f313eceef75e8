"""The local data path, client side: requests straight to a worker slot's redo child over a Unix-domain stream
socket, with no process in between (docs/local-data-path.md owns the format; this module is its Python side).

Encoding and decoding of its messages, and two connections speaking it: ``LocalConnection`` (blocking) and
``AsyncLocalConnection`` (asyncio). Both only move messages; which requests go here, re-sending what a lost
connection held and falling back to ZeroMQ belong to the clients (walredod.client).
"""

from __future__ import annotations

import asyncio
import errno
import select
import socket
import struct
import time
from collections.abc import Sequence

from walredod.types import BufferTag, WalRecord

MAGIC = b"WL"
VERSION = 1
KIND_REDO = 1
KIND_PING = 2
FLAG_BASE_IMAGE = 0x01
MAX_RECORDS = 100_000

# magic, version, kind, body length, request id, timeout ms, reserved
REQUEST_HEADER = struct.Struct(">2sBBIQII")
# magic, version, status, body length, request id
REPLY_HEADER = struct.Struct(">2sBBIQ")
# fork, spcnode, dbnode, relnode, block, LSN, flags, record count
_REDO_FIXED = struct.Struct(">BIIIIQBI")
_RECORD_PREFIX = struct.Struct(">QI")  # end LSN, length
_REPLY_HEADER_LEN = REPLY_HEADER.size
_SYNTHESIZED_MAGIC = b"WRSY"  # walredod.native.synthesized: records the worker applies in Python

_pack_header = REQUEST_HEADER.pack
_pack_fixed = _REDO_FIXED.pack
_pack_record = _RECORD_PREFIX.pack
_unpack_reply = REPLY_HEADER.unpack_from


class ConnectionLost(Exception):
    """The connection ended or failed: every request sent on it and not yet answered is unanswered."""


def serves(tag, records: Sequence[WalRecord]) -> bool:
    """Whether the redo child itself can answer this request: relation pages from raw records. Objects (pg_xact,
    MultiXacts, relation maps, two-phase state) and histories with synthesized records are the worker's."""
    if type(tag) is not BufferTag:
        return False
    for record in records:
        if record[1][:4] == _SYNTHESIZED_MAGIC:
            return False
    return True


def encode_redo(request_id: int, tag: BufferTag, lsn: int, base_image: bytes | None,
                records: Sequence[WalRecord], timeout_ms: int = 0) -> bytes:
    """One redo request as bytes: header, fixed part, base image, then each record's end LSN, length and bytes."""
    parts = [b"", _pack_fixed(tag.forknum, tag.spcnode, tag.dbnode, tag.relnode, tag.blkno, lsn,
                              FLAG_BASE_IMAGE if base_image is not None else 0, len(records))]
    size = _REDO_FIXED.size
    if base_image is not None:
        parts.append(base_image)
        size += len(base_image)
    append = parts.append
    for record_lsn, data in records:
        append(_pack_record(record_lsn, len(data)))
        append(data)
        size += 12 + len(data)
    parts[0] = _pack_header(MAGIC, VERSION, KIND_REDO, size, request_id, timeout_ms, 0)
    return b"".join(parts)


def encode_ping(request_id: int) -> bytes:
    return _pack_header(MAGIC, VERSION, KIND_PING, 0, request_id, 0, 0)


def decode_replies(buffer: bytearray) -> tuple[list[tuple[int, int, bytes]], int]:
    """The whole replies at the start of ``buffer``: ([(request id, status, body)], bytes they took).
    Raises ConnectionLost for bytes that are not a reply (the stream cannot be trusted any more)."""
    replies = []
    position, end = 0, len(buffer)
    while end - position >= _REPLY_HEADER_LEN:
        magic, version, status, body_len, request_id = _unpack_reply(buffer, position)
        if magic != MAGIC or version != VERSION:
            raise ConnectionLost(f"not a local-path reply: {bytes(buffer[position:position + 4])!r}")
        stop = position + _REPLY_HEADER_LEN + body_len
        if stop > end:
            break
        replies.append((request_id, status, bytes(buffer[position + _REPLY_HEADER_LEN:stop])))
        position = stop
    return replies, position


class LocalConnection:
    """A blocking connection to a slot's local socket. Requests may be pipelined; replies come in request order.

    Not thread-safe. ``read_replies`` waits at most until its deadline; the redo child's own deadline is enforced
    by its worker, which kills a child past it (the connection then ends: ConnectionLost).
    """

    # The kernel wakes a blocked read this often, so a deadline is checked without a poll() per read.
    _WAKE_INTERVAL = 0.25

    def __init__(self, path: str, connect_timeout: float = 1.0):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(connect_timeout)
            self._sock.connect(path)
            self._sock.settimeout(None)
            timeval = struct.pack("@ll", 0, int(self._WAKE_INTERVAL * 1e6))
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        except OSError as exc:
            self._sock.close()
            raise ConnectionLost(f"cannot connect to {path}: {exc}") from None
        self._buffer = bytearray()
        self._chunk = bytearray(262144)
        self._view = memoryview(self._chunk)

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise ConnectionLost(f"{self.path}: {exc}") from None

    def read_replies(self, deadline: float) -> list[tuple[int, int, bytes]]:
        """At least one reply (all that have arrived), or [] once ``deadline`` (time.monotonic()) has passed."""
        while True:
            replies, used = decode_replies(self._buffer)
            if replies:
                del self._buffer[:used]
                return replies
            if time.monotonic() >= deadline:
                return []
            try:
                got = self._sock.recv_into(self._chunk)
            except (BlockingIOError, TimeoutError):
                continue  # the wake interval passed: check the deadline
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    continue
                raise ConnectionLost(f"{self.path}: {exc}") from None
            if got == 0:
                raise ConnectionLost(f"{self.path}: the redo child closed the connection")
            self._buffer += self._view[:got]

    def poll(self, timeout: float) -> bool:
        """Whether a reply (or the end of the connection) may be read now or within ``timeout`` seconds."""
        if len(self._buffer) >= _REPLY_HEADER_LEN:
            return True
        return bool(select.select([self._sock], [], [], max(0.0, timeout))[0])

    def request(self, data: bytes, timeout: float) -> tuple[int, int, bytes]:
        """Send one request and wait for its reply: (request id, status, body). Raises ConnectionLost, or
        TimeoutError when nothing came by the deadline (the connection is then closed: its late reply is lost)."""
        self.send(data)
        replies = self.read_replies(time.monotonic() + timeout)
        if not replies:
            self.close()
            raise TimeoutError(f"no reply from {self.path} within {timeout:g} s")
        return replies[0]

    def close(self) -> None:
        self._sock.close()


class AsyncLocalConnection:
    """An asyncio connection to a slot's local socket: ``send`` queues a request, ``read_reply`` awaits the next
    reply in request order."""

    def __init__(self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.path = path
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, path: str, connect_timeout: float = 1.0) -> AsyncLocalConnection:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=1 << 20),
                                                    connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ConnectionLost(f"cannot connect to {path}: {exc!r}") from None
        return cls(path, reader, writer)

    def send(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise ConnectionLost(f"{self.path}: the connection is closed")
        self._writer.write(data)

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except OSError as exc:
            raise ConnectionLost(f"{self.path}: {exc}") from None

    async def read_reply(self) -> tuple[int, int, bytes]:
        try:
            header = await self._reader.readexactly(_REPLY_HEADER_LEN)
            magic, version, status, body_len, request_id = _unpack_reply(header)
            if magic != MAGIC or version != VERSION:
                raise ConnectionLost(f"not a local-path reply: {header[:4]!r}")
            body = await self._reader.readexactly(body_len) if body_len else b""
        except (asyncio.IncompleteReadError, OSError) as exc:
            raise ConnectionLost(f"{self.path}: the connection ended ({exc!r})") from None
        return request_id, status, body

    def close(self) -> None:
        self._writer.close()
