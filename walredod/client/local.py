"""The local data path, client side: requests straight to a worker slot's redo child over a Unix-domain stream
socket, with no process in between (docs/local-data-path.md owns the format; this module is its Python side).

Encoding and decoding of its messages, and two connections speaking it: ``LocalConnection`` (blocking) and
``AsyncLocalConnection`` (callbacks of an asyncio loop). Both only move messages; which requests go here,
re-sending what a lost connection held and falling back to ZeroMQ belong to the clients (walredod.client).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import time
from collections.abc import Sequence

from walredod.native.synthesized import is_synthesized  # records the worker applies in Python
from walredod.types import BufferTag, WalRecord

MAGIC = b"WL"
VERSION = 1
KIND_REDO = 1
KIND_PING = 2
FLAG_BASE_IMAGE = 0x01

# magic, version, kind, body length, request id, timeout ms, reserved
REQUEST_HEADER = struct.Struct(">2sBBIQII")
# magic, version, status, body length, request id
REPLY_HEADER = struct.Struct(">2sBBIQ")
# fork, spcnode, dbnode, relnode, block, LSN, flags, record count
_REDO_FIXED = struct.Struct(">BIIIIQBI")
_RECORD_PREFIX = struct.Struct(">QI")  # end LSN, length
_REPLY_HEADER_LEN = REPLY_HEADER.size
# Seconds a wait for a reply polls without sleeping first: a redo child on another CPU answers a short request
# sooner than this, and waking a process whose CPU went idle costs more than the request on these VMs.
SPIN_WAIT = 50e-6

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
        if is_synthesized(record[1]):
            return False
    return True


def encode_redo(request_id: int, tag: BufferTag, lsn: int, base_image: bytes | None,
                records: Sequence[WalRecord], timeout_ms: int = 0) -> bytes:
    """One redo request as bytes: header, fixed part, base image, then each record's end LSN, length and bytes."""
    parts: list[bytes] = []
    encode_redo_parts(parts, request_id, tag, lsn, base_image, records, timeout_ms)
    return b"".join(parts)


def encode_redo_parts(parts: list, request_id: int, tag: BufferTag, lsn: int, base_image: bytes | None,
                      records: Sequence[WalRecord], timeout_ms: int = 0) -> None:
    """encode_redo's bytes appended to ``parts`` in pieces, so that several requests are joined only once."""
    start = len(parts)
    append = parts.append
    append(b"")  # the header, once the size is known
    append(_pack_fixed(tag.forknum, tag.spcnode, tag.dbnode, tag.relnode, tag.blkno, lsn,
                       FLAG_BASE_IMAGE if base_image is not None else 0, len(records)))
    size = _REDO_FIXED.size
    if base_image is not None:
        append(base_image)
        size += len(base_image)
    for record_lsn, data in records:
        append(_pack_record(record_lsn, len(data)))
        append(data)
        size += 12 + len(data)
    parts[start] = _pack_header(MAGIC, VERSION, KIND_REDO, size, request_id, timeout_ms, 0)


def encode_ping(request_id: int) -> bytes:
    return _pack_header(MAGIC, VERSION, KIND_PING, 0, request_id, 0, 0)


def decode_replies(buffer: bytearray, end: int | None = None) -> tuple[list[tuple[int, int, bytes]], int]:
    """The whole replies at the start of ``buffer`` (its first ``end`` bytes): ([(request id, status, body)],
    bytes they took). Raises ConnectionLost for bytes that are not a reply (the stream cannot be trusted any more)."""
    replies = []
    position, end = 0, len(buffer) if end is None else end
    with memoryview(buffer) as view:  # a body is copied once, out of the view (a slice of the buffer would be twice)
        while end - position >= _REPLY_HEADER_LEN:
            magic, version, status, body_len, request_id = _unpack_reply(buffer, position)
            if magic != MAGIC or version != VERSION:
                raise ConnectionLost(f"not a local-path reply: {bytes(buffer[position:position + 4])!r}")
            stop = position + _REPLY_HEADER_LEN + body_len
            if stop > end:
                break
            replies.append((request_id, status, bytes(view[position + _REPLY_HEADER_LEN:stop])))
            position = stop
    return replies, position


class LocalConnection:
    """A blocking connection to a slot's local socket. Requests may be pipelined; replies come in request order.

    Not thread-safe. ``read_replies`` waits at most until its deadline; the redo child's own deadline is enforced
    by its worker, which kills a child past it (the connection then ends: ConnectionLost).
    """

    # The kernel wakes a blocked read this often, so a deadline is checked without a poll() per read.
    _WAKE_INTERVAL = 0.25
    _SEND_STALL = 5  # seconds

    def __init__(self, path: str, connect_timeout: float = 1.0, spin_wait: float = SPIN_WAIT):
        """``spin_wait``: seconds a wait for a reply polls without sleeping first (yielding the CPU in between)."""
        self.path = path
        self._spin_wait = spin_wait
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(connect_timeout)
            self._sock.connect(path)
            self._sock.settimeout(None)
            timeval = struct.pack("@ll", 0, int(self._WAKE_INTERVAL * 1e6))
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            # A child that takes none of our bytes for this long is stalled outside redo (no deadline of its own
            # is published then): the send fails, the connection is dropped and its requests go elsewhere.
            stall = struct.pack("@ll", int(self._SEND_STALL), 0)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, stall)
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
            if time.monotonic() >= deadline:
                return []
            try:
                got = self._recv_spinning() if self._spin_wait else self._sock.recv_into(self._chunk)
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
            replies = self._take(got)
            if replies:
                return replies

    def _take(self, got: int) -> list[tuple[int, int, bytes]]:
        """The whole replies a receive of ``got`` bytes into the chunk completed; the rest of a reply is kept for
        the next (what is kept is never a whole reply). Straight from the chunk when nothing was kept: each body is
        then copied once."""
        if not self._buffer:
            replies, used = decode_replies(self._chunk, got)
            if used < got:
                self._buffer += self._view[used:got]
            return replies
        self._buffer += self._view[:got]
        replies, used = decode_replies(self._buffer)
        if used:
            del self._buffer[:used]
        return replies

    def _recv_spinning(self) -> int:
        """recv_into the chunk: without sleeping for up to the spin wait, then blocking (up to the wake interval)."""
        recv_into, chunk = self._sock.recv_into, self._chunk
        give_up = time.monotonic() + self._spin_wait
        while True:
            try:
                return recv_into(chunk, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.monotonic() >= give_up:
                    return recv_into(chunk)
                os.sched_yield()

    def receive_now(self) -> list[tuple[int, int, bytes]]:
        """The replies that have arrived, without waiting (possibly none)."""
        replies = []
        while True:
            try:
                got = self._sock.recv_into(self._chunk, 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                raise ConnectionLost(f"{self.path}: {exc}") from None
            if got == 0:
                raise ConnectionLost(f"{self.path}: the redo child closed the connection")
            replies += self._take(got)
            if got < len(self._chunk):
                break
        return replies

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
    """A connection to a slot's local socket for an asyncio event loop, without coroutines: ``send`` writes at once
    (what the socket cannot take waits in a buffer, written as it drains), and the loop calls ``on_replies(list of
    (request id, status, body))`` as replies arrive and ``on_lost(reason)`` once if the connection ends. Connecting
    is immediate on a Unix socket (the listening socket's backlog holds the connection until a child accepts it).
    """

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop, on_replies, on_lost):
        self.path = path
        self._loop = loop
        self._on_replies = on_replies
        self._on_lost = on_lost
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(1.0)
            self._sock.connect(path)
        except OSError as exc:
            self._sock.close()
            raise ConnectionLost(f"cannot connect to {path}: {exc}") from None
        self._sock.setblocking(False)
        self._fd = self._sock.fileno()
        self._buffer = bytearray()
        self._unsent = bytearray()
        self._closed = False
        loop.add_reader(self._fd, self._readable)

    def send(self, data: bytes) -> None:
        if self._closed:
            raise ConnectionLost(f"{self.path}: the connection is closed")
        if self._unsent:
            self._unsent += data
            return
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lose(f"{self.path}: {exc}")
            return
        if sent < len(data):
            self._unsent += memoryview(data)[sent:]
            self._loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        try:
            sent = self._sock.send(self._unsent)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lose(f"{self.path}: {exc}")
            return
        del self._unsent[:sent]
        if not self._unsent:
            self._loop.remove_writer(self._fd)

    def _readable(self) -> None:
        try:
            data = self._sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lose(f"{self.path}: {exc}")
            return
        if not data:
            self._lose(f"{self.path}: the redo child closed the connection")
            return
        self._buffer += data
        try:
            replies, used = decode_replies(self._buffer)
        except ConnectionLost as exc:
            self._lose(str(exc))
            return
        if replies:
            del self._buffer[:used]
            self._on_replies(replies)

    def _lose(self, reason: str) -> None:
        if not self._closed:
            self.close()
            self._on_lost(reason)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self._fd)
            if self._unsent:
                self._loop.remove_writer(self._fd)
            self._sock.close()
