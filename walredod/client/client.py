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
from dataclasses import dataclass

import zmq
import zmq.asyncio

from walredod import protocol
from walredod.client import access
from walredod.client.directory import DIRECT_CHECK_INTERVAL, DirectWorker, WorkerDirectory
from walredod.errors import InvalidRequest, RedoTimeout, Unavailable, WalredodError
from walredod.types import BufferTag, WalRecord

DEFAULT_TIMEOUT = 60.0
_TRANSPORT_MARGIN = 1.0  # the daemon answers a timeout itself; wait a little longer for that answer
PIPELINE_WINDOW = 64
BATCH_SIZE = 16  # requests for one worker in one message, on the direct data path
_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: flag enums cost microseconds per call

RedoArgs = tuple[BufferTag, int, bytes | None, Sequence[WalRecord]]


@dataclass(slots=True)
class _Flight:
    """A message in flight, a request or a batch: each request's place in the results, by request id; the frames
    (kept for a re-send); the worker it went to directly (None: through the supervisor)."""

    indices: dict[int, int]
    frames: list
    worker: DirectWorker | None = None
    sent_at: float = 0.0


def _dealer(context: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)  # replies are never dropped on our side
    sock.connect(endpoint)
    return sock


def _drain(sock: zmq.Socket, limit: int = 256):
    """Every reply already waiting on ``sock`` (at most ``limit``), without blocking."""
    recv = sock.recv_multipart
    for _ in range(limit):
        try:
            yield recv(_NOBLOCK)
        except zmq.Again:
            return


def _check_args(tag, base_image: bytes | None) -> None:
    object_kind = protocol.tag_fields(tag)[0]  # raises InvalidRequest for what is not a tag
    size = protocol.BASE_IMAGE_SIZES[object_kind]
    if base_image is not None and size is not None and len(base_image) != size:
        raise InvalidRequest(f"base image is {len(base_image)} bytes, {tag} has {size}")


def _why_not(endpoint: str) -> str:
    """For a timeout's message: what the socket file says, when it says something."""
    problem = access.ipc_problem(endpoint)
    return f": {problem}" if problem else ""


def _object_or_none(body):
    """An empty body says the object does not exist: a finished prepared transaction, a visibility-map page cut
    off by a truncation."""
    return None if len(body) == 0 else body


def _answers(frames: list) -> tuple[int, list[tuple[int, bytes | WalredodError]]]:
    """(message id, [(request id, result)]) of a reply to a request or to a batch. A batch refused as a whole
    gives one answer under the batch's own id."""
    if len(frames) == 3:
        request_id, result = _result(frames)
        return request_id, [(request_id, result)]
    message_id = protocol.decode_reply(frames[:3])[0]  # raises for a malformed reply
    return message_id, [(request_id, body if status == protocol.STATUS_OK else protocol.error_for(status, body))
                        for request_id, status, body in protocol.decode_batch_reply(frames)]


def _result(frames: list) -> tuple[int, bytes | WalredodError]:
    request_id, status, body = protocol.decode_reply(frames)
    if status == protocol.STATUS_OK:
        return request_id, body
    return request_id, protocol.error_for(status, body)


class RedoClient:
    """Blocking client. Not thread-safe: one per thread (ZeroMQ sockets belong to one thread).

    On an ipc:// endpoint the client uses the daemon's direct data path when the daemon offers it (``direct``): it
    asks the supervisor once for the directory of workers, sends each request straight to the worker the
    supervisor's own rendezvous ranking picks for its relation (spilling over, as the supervisor does, when one
    worker holds more than its share of this client's requests), and re-sends through the supervisor whatever it
    had sent to a worker that has since died, retired or been replaced. Results are the same either way.
    """

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT, context: zmq.Context | None = None,
                 direct: bool = True):
        if problem := access.permission_denied(endpoint):  # else ZeroMQ would retry in silence until a timeout
            raise Unavailable(problem)
        self.endpoint = endpoint
        self.timeout = timeout
        self._context = context or zmq.Context.instance()
        self._ids = itertools.count(int.from_bytes(os.urandom(4), "big") << 16)
        self._socket = None
        self._control_socket = None
        self._connect()
        self._direct = WorkerDirectory(self._context) if direct and endpoint.startswith("ipc://") else None

    def _connect(self) -> None:
        for sock in (self._socket, self._control_socket):
            if sock is not None:
                sock.close(linger=0)
        self._socket = _dealer(self._context, self.endpoint)
        self._control_socket = _dealer(self._context, self.endpoint)  # replies to requests never mix with these

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

        On the direct data path, requests bound for one worker travel as batches of up to BATCH_SIZE in one
        message (one ZeroMQ round trip instead of one per request); ``timeout`` then applies to each batch.
        With ``return_exceptions`` a failed request's place holds its exception; otherwise the first error (in
        request order) is raised once every reply is in.
        """
        timeout = self.timeout if timeout is None else timeout
        timeout_ms = max(1, int(timeout * 1000))
        pending = list(requests)
        for tag, _lsn, base, _records in pending:
            _check_args(tag, base)
        results: list = [None] * len(pending)
        flights: dict[int, _Flight] = {}  # by message id: a request's id, or a batch's
        directory = self._direct_directory(timeout)
        sent = in_flight = 0
        deadline = time.monotonic() + timeout + _TRANSPORT_MARGIN
        next_check = 0.0
        while sent < len(pending) or flights:
            if sent < len(pending) and in_flight < PIPELINE_WINDOW:
                batches: dict[DirectWorker, list] = {}
                while sent < len(pending) and in_flight < PIPELINE_WINDOW:
                    tag, lsn, base, records = pending[sent]
                    request_id = next(self._ids)
                    frames = protocol.encode_redo_request(request_id, tag, lsn, base, records, timeout_ms)
                    worker = directory.choose(protocol.routing_key(tag)) if directory is not None else None
                    if worker is None:
                        self._dispatch(None, [(request_id, sent, frames)], flights, timeout_ms)
                    else:
                        batch = batches.setdefault(worker, [])
                        batch.append((request_id, sent, frames))
                        if len(batch) == BATCH_SIZE:
                            self._dispatch(worker, batches.pop(worker), flights, timeout_ms)
                    sent += 1
                    in_flight += 1
                for worker, batch in batches.items():
                    self._dispatch(worker, batch, flights, timeout_ms)
                deadline = time.monotonic() + timeout + _TRANSPORT_MARGIN
            now = time.monotonic()
            if now >= deadline:
                self._give_up(flights, results, timeout, answered_any=sent > 0)
                break
            wait = deadline - now
            if directory is not None and any(f.worker for f in flights.values()):
                # Replies from other workers do not prove that the worker of a direct request still lives.
                if now >= next_check and any(now - f.sent_at > DIRECT_CHECK_INTERVAL
                                             for f in flights.values() if f.worker):
                    self._recheck_direct(directory, flights)
                    next_check = time.monotonic() + DIRECT_CHECK_INTERVAL
                wait = min(wait, DIRECT_CHECK_INTERVAL)
            sockets = [self._socket, *(directory.sockets_in_use() if directory is not None else ())]
            ready = zmq.select(sockets, [], [], wait)[0]
            if not ready:
                continue
            for sock in ready:
                for frames in _drain(sock):
                    message_id, answers = _answers(frames)
                    flight = flights.pop(message_id, None)
                    if flight is None:
                        continue  # a late or duplicate reply: its request was answered or given up on
                    if flight.worker is not None:
                        directory.release(flight.worker, len(flight.indices))
                    in_flight -= len(flight.indices)
                    for request_id, result in answers:
                        index = flight.indices.get(request_id)
                        # An answer to the message itself (a batch refused whole) is every request's.
                        for i in (flight.indices.values() if index is None else (index,)):
                            results[i] = result if isinstance(result, WalredodError) else _object_or_none(result)
        if not return_exceptions:
            for result in results:
                if isinstance(result, WalredodError):
                    raise result
        return results

    def _dispatch(self, worker: DirectWorker | None, batch: list, flights: dict[int, _Flight],
                  timeout_ms: int) -> None:
        """Send one request, or several for one worker as a batch."""
        if len(batch) == 1:
            message_id, _index, frames = batch[0]
        else:
            message_id = next(self._ids)
            frames = protocol.encode_batch(message_id, [request_frames for _, _, request_frames in batch],
                                           timeout_ms)
        flight = _Flight({request_id: index for request_id, index, _ in batch}, frames, worker)
        flights[message_id] = flight
        flight.sent_at = time.monotonic()
        self._send(flight)

    def _send(self, flight: _Flight) -> None:
        if flight.worker is not None:
            protocol.send_frames(flight.worker.socket, flight.frames)
        else:
            protocol.send_frames(self._socket, flight.frames)

    def _direct_directory(self, timeout: float) -> WorkerDirectory | None:
        """The workers to send to directly, refreshed when stale; None when the daemon offers no direct path."""
        if self._direct is None:
            return None
        if self._direct.stale():
            try:
                self._direct.update(self._control(protocol.KIND_DIRECTORY, min(timeout, 5.0))[1])
            except InvalidRequest:  # a daemon from before the direct path
                self._direct.close()
                self._direct = None
                return None
            except (Unavailable, ValueError):
                self._direct.clear()  # the supervisor does not answer: everything goes its way and waits
        return self._direct if self._direct.usable() else None

    def _recheck_direct(self, directory: WorkerDirectory, flights: dict[int, _Flight]) -> None:
        """A direct request has waited a while: ask the supervisor whether the workers we wait on still live. Requests sent to a
        worker that has died, retired or been replaced are re-sent through the supervisor (redo is a pure function,
        so a request that ran twice is harmless; the first reply wins)."""
        try:
            directory.update(self._control(protocol.KIND_DIRECTORY, 2.0)[1])
        except (Unavailable, InvalidRequest, ValueError):
            directory.clear()
        for flight in flights.values():
            if flight.worker is not None and not directory.still_serving(flight.worker):
                directory.release(flight.worker, len(flight.indices))
                flight.worker = None
                self._send(flight)  # a batch too: the supervisor hands it to one worker whole

    def _give_up(self, flights: dict[int, _Flight], results: list, timeout: float, answered_any: bool) -> None:
        self._connect()  # late replies to a closed socket are lost; ids guard against the rest
        if self._direct is not None:
            self._direct.reset_sockets()
        why = "" if answered_any else _why_not(self.endpoint)
        for flight in flights.values():
            for index in flight.indices.values():
                results[index] = (RedoTimeout if answered_any else Unavailable)(
                    f"no reply from {self.endpoint} within {timeout:g} s{why}")
        flights.clear()

    def ping(self, timeout: float = 5.0) -> float:
        """Round trip to the supervisor, in seconds. Raises Unavailable when it does not answer."""
        return self._control(protocol.KIND_PING, timeout)[0]

    def status(self, timeout: float = 5.0) -> dict:
        import json

        return json.loads(self._control(protocol.KIND_STATUS, timeout)[1])

    def _control(self, kind: int, timeout: float) -> tuple[float, bytes]:
        request_id = next(self._ids)
        started = time.monotonic()
        sock = self._control_socket
        sock.send_multipart(protocol.encode_ping(request_id, kind))
        deadline = started + timeout
        while (remaining := deadline - time.monotonic()) > 0 and sock.poll(remaining * 1000):
            got_id, result = _result(sock.recv_multipart())
            if got_id == request_id:
                if isinstance(result, WalredodError):
                    raise result
                return time.monotonic() - started, result
        self._control_socket.close(linger=0)
        self._control_socket = _dealer(self._context, self.endpoint)
        raise Unavailable(f"no answer from {self.endpoint} within {timeout:g} s{_why_not(self.endpoint)}")

    def close(self) -> None:
        for sock in (self._socket, self._control_socket):
            if sock is not None:
                sock.close(linger=0)
        self._socket = self._control_socket = None
        if self._direct is not None:
            self._direct.close()

    def __enter__(self) -> RedoClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncRedoClient:
    """asyncio client: any number of concurrent ``await client.redo(...)`` share its sockets.

    Uses the direct data path as RedoClient does: a reader task per socket, and while direct requests wait, a
    check every DIRECT_CHECK_INTERVAL without replies that re-sends through the supervisor what a departed worker
    held.
    """

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT, direct: bool = True):
        if problem := access.permission_denied(endpoint):
            raise Unavailable(problem)
        self.endpoint = endpoint
        self.timeout = timeout
        self._context = zmq.asyncio.Context.instance()
        self._socket = _dealer(self._context, endpoint)
        self._control_socket = _dealer(self._context, endpoint)
        self._control_lock = asyncio.Lock()
        self._ids = itertools.count(int.from_bytes(os.urandom(4), "big") << 16)
        self._waiting: dict[int, tuple[_Flight, asyncio.Future]] = {}
        self._readers: dict[zmq.Socket, asyncio.Task] = {}
        self._checker: asyncio.Task | None = None
        self._direct = WorkerDirectory(self._context) if direct and endpoint.startswith("ipc://") else None

    async def redo(self, tag: BufferTag, lsn: int, base_image: bytes | None, records: Sequence[WalRecord],
                   timeout: float | None = None) -> bytes:
        _check_args(tag, base_image)
        timeout = self.timeout if timeout is None else timeout
        request_id = next(self._ids)
        frames = protocol.encode_redo_request(request_id, tag, lsn, base_image, records, max(1, int(timeout * 1000)))
        flight = _Flight({request_id: 0}, frames)
        directory = await self._direct_directory(timeout)
        if directory is not None:
            flight.worker = directory.choose(protocol.routing_key(tag))
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = (flight, future)
        flight.sent_at = time.monotonic()
        try:
            await self._send(flight)
            if flight.worker is not None and (self._checker is None or self._checker.done()):
                self._checker = asyncio.create_task(self._check_direct())
            result = await asyncio.wait_for(future, timeout + _TRANSPORT_MARGIN)
        except asyncio.TimeoutError:
            raise RedoTimeout(f"no reply from {self.endpoint} within {timeout:g} s") from None
        finally:
            self._waiting.pop(request_id, None)
            if flight.worker is not None:
                WorkerDirectory.release(flight.worker)
                flight.worker = None
        if isinstance(result, WalredodError):
            raise result
        return _object_or_none(result)

    async def redo_many(self, requests: Iterable[RedoArgs], timeout: float | None = None,
                        return_exceptions: bool = False) -> list:
        return await asyncio.gather(*(self.redo(*args, timeout=timeout) for args in requests),
                                    return_exceptions=return_exceptions)

    async def _send(self, flight: _Flight) -> None:
        sock = flight.worker.socket if flight.worker is not None else self._socket
        reader = self._readers.get(sock)
        if reader is None or reader.done():
            self._readers[sock] = asyncio.create_task(self._read_replies(sock))
        await sock.send_multipart(flight.frames, copy=False)

    async def _read_replies(self, sock: zmq.Socket) -> None:
        while self._waiting:
            frames = await sock.recv_multipart()
            request_id, result = _result(frames)
            _flight, future = self._waiting.get(request_id, (None, None))
            if future is not None and not future.done():
                future.set_result(result)

    async def _direct_directory(self, timeout: float) -> WorkerDirectory | None:
        if self._direct is None:
            return None
        if self._direct.stale():
            try:
                self._direct.update(await self._control(protocol.KIND_DIRECTORY, min(timeout, 5.0)))
            except InvalidRequest:  # a daemon from before the direct path
                self._direct.close()
                self._direct = None
                return None
            except (Unavailable, ValueError):
                self._direct.clear()
        return self._direct if self._direct.usable() else None

    async def _check_direct(self) -> None:
        """While direct requests wait: once one has waited DIRECT_CHECK_INTERVAL, re-send through the supervisor
        those whose worker the directory no longer lists under the same pid (at most one directory request per
        interval; replies from other workers prove nothing about this one's)."""
        directory = self._direct
        while any(flight.worker is not None for flight, _ in self._waiting.values()):
            await asyncio.sleep(DIRECT_CHECK_INTERVAL)
            now = time.monotonic()
            if not any(flight.worker is not None and now - flight.sent_at > DIRECT_CHECK_INTERVAL
                       for flight, _ in self._waiting.values()):
                continue
            try:
                directory.update(await self._control(protocol.KIND_DIRECTORY, 2.0))
            except (Unavailable, InvalidRequest, ValueError):
                directory.clear()
            for flight, future in list(self._waiting.values()):
                if flight.worker is not None and not future.done() and not directory.still_serving(flight.worker):
                    WorkerDirectory.release(flight.worker)
                    flight.worker = None
                    await self._send(flight)

    async def _control(self, kind: int, timeout: float) -> bytes:
        async with self._control_lock:  # one control request at a time on the control socket
            request_id = next(self._ids)
            sock = self._control_socket
            await sock.send_multipart(protocol.encode_ping(request_id, kind))
            deadline = time.monotonic() + timeout
            while (remaining := deadline - time.monotonic()) > 0 and await sock.poll(remaining * 1000):
                got_id, result = _result(await sock.recv_multipart())
                if got_id == request_id:
                    if isinstance(result, WalredodError):
                        raise result
                    return result
            sock.close(linger=0)
            self._control_socket = _dealer(self._context, self.endpoint)
            raise Unavailable(f"no answer from {self.endpoint} within {timeout:g} s{_why_not(self.endpoint)}")

    async def close(self) -> None:
        for task in (*self._readers.values(), self._checker):
            if task is not None:
                task.cancel()
        self._socket.close(linger=0)
        self._control_socket.close(linger=0)
        if self._direct is not None:
            self._direct.close()

    async def __aenter__(self) -> AsyncRedoClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
