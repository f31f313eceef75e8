"""Client library for pageservers: ask a walredod daemon for pages over ZeroMQ.

    from walredod.client import RedoClient
    with RedoClient("ipc:///run/walredod/walredod.sock") as client:
        page = client.redo(tag, lsn, base_image, records)          # one request
        pages = client.redo_many([(tag, lsn, base, records), ...])   # pipelined

Errors come back as the same typed exceptions the engine raises (walredod.errors). Each request carries a request
id; a reply that arrives after its request was given up on is recognised and dropped, so a timeout never hands a
later caller the wrong page.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Iterable, Sequence

import zmq
import zmq.asyncio

from walredod import protocol
from walredod.errors import InvalidRequest, RedoTimeout, Unavailable, WalredodError
from walredod.types import BufferTag, WalRecord

DEFAULT_TIMEOUT = 60.0
_TRANSPORT_MARGIN = 1.0  # the daemon answers a timeout itself; wait a little longer for that answer
PIPELINE_WINDOW = 64

RedoArgs = tuple[BufferTag, int, bytes | None, Sequence[WalRecord]]


def _check_args(tag, base_image: bytes | None) -> None:
    object_kind = protocol.tag_fields(tag)[0]  # raises InvalidRequest for what is not a tag
    size = protocol.BASE_IMAGE_SIZES[object_kind]
    if base_image is not None and size is not None and len(base_image) != size:
        raise InvalidRequest(f"base image is {len(base_image)} bytes, {tag} has {size}")


def _object_or_none(body):
    """An empty body says the object does not exist: a finished prepared transaction, a visibility-map page cut
    off by a truncation."""
    return None if len(body) == 0 else body


def _result(frames: list) -> tuple[int, bytes | WalredodError]:
    request_id, status, body = protocol.decode_reply(frames)
    if status == protocol.STATUS_OK:
        return request_id, body
    return request_id, protocol.error_for(status, body)


class RedoClient:
    """Blocking client. Not thread-safe: one per thread (ZeroMQ sockets belong to one thread)."""

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT, context: zmq.Context | None = None):
        self.endpoint = endpoint
        self.timeout = timeout
        self._context = context or zmq.Context.instance()
        self._ids = itertools.count(int.from_bytes(os.urandom(4), "big") << 16)
        self._socket = None
        self._connect()

    def _connect(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, 0)  # replies are never dropped on our side
        self._socket.connect(self.endpoint)

    def redo(self, tag, lsn: int, base_image: bytes | None, records: Sequence[WalRecord],
             timeout: float | None = None) -> bytes | None:
        """The page ``tag`` at ``lsn``: ``base_image`` (None: no page yet) with ``records`` applied.

        ``tag`` is a BufferTag (relation page) or an object tag of walredod.objects; the result is None for an
        object that does not exist at ``lsn`` (a prepared transaction that has ended).
        """
        result = self.redo_many([(tag, lsn, base_image, records)], timeout=timeout, return_exceptions=True)[0]
        if isinstance(result, WalredodError):
            raise result
        return result

    def redo_many(self, requests: Iterable[RedoArgs], timeout: float | None = None,
                  return_exceptions: bool = False) -> list:
        """Pipelined: up to PIPELINE_WINDOW requests in flight; results in request order.

        With ``return_exceptions`` a failed request's place holds its exception; otherwise the first error (in
        request order) is raised once every reply is in.
        """
        timeout = self.timeout if timeout is None else timeout
        timeout_ms = max(1, int(timeout * 1000))
        pending = list(requests)
        results: list = [None] * len(pending)
        slot_of: dict[int, int] = {}
        sent = 0
        deadline = time.monotonic() + timeout + _TRANSPORT_MARGIN
        for tag, _lsn, base, _records in pending:
            _check_args(tag, base)
        while sent < len(pending) or slot_of:
            while sent < len(pending) and len(slot_of) < PIPELINE_WINDOW:
                tag, lsn, base, records = pending[sent]
                request_id = next(self._ids)
                slot_of[request_id] = sent
                self._socket.send_multipart(
                    protocol.encode_redo_request(request_id, tag, lsn, base, records, timeout_ms), copy=False)
                sent += 1
                deadline = time.monotonic() + timeout + _TRANSPORT_MARGIN
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._socket.poll(remaining * 1000):
                self._connect()  # late replies to a closed socket are lost; ids guard against the rest
                for index in slot_of.values():
                    results[index] = (RedoTimeout if sent else Unavailable)(
                        f"no reply from {self.endpoint} within {timeout:g} s")
                slot_of.clear()
                break
            request_id, result = _result(self._socket.recv_multipart())
            index = slot_of.pop(request_id, None)
            if index is not None:
                results[index] = result if isinstance(result, WalredodError) else _object_or_none(result)
        if not return_exceptions:
            for result in results:
                if isinstance(result, WalredodError):
                    raise result
        return results

    def ping(self, timeout: float = 5.0) -> float:
        """Round trip to the supervisor, in seconds. Raises Unavailable when it does not answer."""
        return self._control(protocol.KIND_PING, timeout)[0]

    def status(self, timeout: float = 5.0) -> dict:
        import json

        return json.loads(self._control(protocol.KIND_STATUS, timeout)[1])

    def _control(self, kind: int, timeout: float) -> tuple[float, bytes]:
        request_id = next(self._ids)
        started = time.monotonic()
        self._socket.send_multipart(protocol.encode_ping(request_id, kind))
        deadline = started + timeout
        while (remaining := deadline - time.monotonic()) > 0 and self._socket.poll(remaining * 1000):
            got_id, result = _result(self._socket.recv_multipart())
            if got_id == request_id:
                if isinstance(result, WalredodError):
                    raise result
                return time.monotonic() - started, result
        self._connect()
        raise Unavailable(f"no answer from {self.endpoint} within {timeout:g} s")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def __enter__(self) -> RedoClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncRedoClient:
    """asyncio client: any number of concurrent ``await client.redo(...)`` share one socket."""

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT):
        self.endpoint = endpoint
        self.timeout = timeout
        self._context = zmq.asyncio.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.connect(endpoint)
        self._ids = itertools.count(int.from_bytes(os.urandom(4), "big") << 16)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    async def redo(self, tag: BufferTag, lsn: int, base_image: bytes | None, records: Sequence[WalRecord],
                   timeout: float | None = None) -> bytes:
        _check_args(tag, base_image)
        timeout = self.timeout if timeout is None else timeout
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_replies())
        try:
            await self._socket.send_multipart(protocol.encode_redo_request(
                request_id, tag, lsn, base_image, records, max(1, int(timeout * 1000))), copy=False)
            result = await asyncio.wait_for(future, timeout + _TRANSPORT_MARGIN)
        except asyncio.TimeoutError:
            raise RedoTimeout(f"no reply from {self.endpoint} within {timeout:g} s") from None
        finally:
            self._waiting.pop(request_id, None)
        if isinstance(result, WalredodError):
            raise result
        return _object_or_none(result)

    async def redo_many(self, requests: Iterable[RedoArgs], timeout: float | None = None,
                        return_exceptions: bool = False) -> list:
        return await asyncio.gather(*(self.redo(*args, timeout=timeout) for args in requests),
                                    return_exceptions=return_exceptions)

    async def _read_replies(self) -> None:
        while self._waiting:
            frames = await self._socket.recv_multipart()
            request_id, result = _result(frames)
            future = self._waiting.get(request_id)
            if future is not None and not future.done():
                future.set_result(result)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._socket.close(linger=0)

    async def __aenter__(self) -> AsyncRedoClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
