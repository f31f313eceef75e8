"""Client library for pageservers: ask a walredod daemon for pages over ZeroMQ.

    from walredod.client import RedoClient
    with RedoClient("ipc:///run/walredod/walredod.sock") as client:
        page = client.redo(tag, lsn, base_image, records)          # one request
        pages = client.redo_many([(tag, lsn, base, records), ...])   # pipelined

Errors come back as the same typed exceptions the engine raises (walredod.errors). Each request carries a request
id; a reply that arrives after its request was given up on is recognised and dropped, so a timeout never hands a
later caller the wrong page.

Both clients are thin shells over one core (walredod.client.core: which worker, batches, re-sends, deadlines) and
one set of connections (walredod.client.links): the shells only wait, send and read.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Sequence

import zmq
import zmq.asyncio

from walredod import protocol
from walredod.client.core import BATCH_SIZE, PIPELINE_WINDOW, Call, ClientCore, Flight, RedoArgs, decode_result
from walredod.client.directory import DIRECT_CHECK_INTERVAL
from walredod.client import local
from walredod.client.core import TRANSPORT_MARGIN, check_request
from walredod.client.links import AsyncLinks, CurveKeys, Links, connect_dealer, direct_path_reachable
from walredod.client.local_link import LocalLink
from walredod.errors import RedoTimeout, Unavailable, WalredodError
from walredod.client import access
from walredod.types import BufferTag, WalRecord

DEFAULT_TIMEOUT = 60.0
_DIRECTORY_TIMEOUT = 2.0  # seconds to wait for a directory the client already has an older copy of
_MAX_WAIT = 1.0  # seconds: the longest the sync client waits before looking at the time again

__all__ = ["AsyncRedoClient", "BATCH_SIZE", "DEFAULT_TIMEOUT", "PIPELINE_WINDOW", "RedoArgs", "RedoClient"]


def _first_error(results: list) -> None:
    for result in results:
        if isinstance(result, WalredodError):
            raise result


def _why_not(endpoint: str) -> str:
    """For a timeout's message: what the socket file says, when it says something."""
    problem = access.ipc_problem(endpoint)
    return f": {problem}" if problem else ""


def _directory_timeout(core: ClientCore, timeout: float) -> float:
    return _DIRECTORY_TIMEOUT if core.directory.known else min(timeout, 5.0)


def apply_reply(core: ClientCore, reply, now: float) -> Sequence[Call]:
    """Hand what a link read to the core: a ZeroMQ reply (frames), answers the local data path decoded
    ((message id, answers)), or a flight its lost connection leaves to re-send through the supervisor."""
    kind = reply.__class__
    if kind is list:
        return core.on_reply(reply)
    if kind is tuple:
        return core.on_answers(*reply)
    if kind is Flight:
        core.resend_through_supervisor(reply, now)
        return ()
    raise TypeError(f"a link handed back {kind.__name__}")


class RedoClient:
    """Blocking client. Not thread-safe: one per thread (ZeroMQ sockets belong to one thread).

    On an ipc:// endpoint the client uses the daemon's direct data path when the daemon offers it (``direct``): it
    asks the supervisor for the directory of workers, sends each request straight to the worker the supervisor's
    own rendezvous ranking picks for its relation (spilling over, as the supervisor does, when one worker holds
    more than its share of this client's requests), and re-sends through the supervisor whatever it had sent to a
    worker that has since died, retired or been replaced. Results are the same either way.

    Where the directory lists a worker's local socket (``local``, the default), relation pages go over it straight
    to the slot's redo child, with no ZeroMQ and no Python process in between (docs/local-data-path.md); what a
    lost connection held is re-sent through the supervisor.
    """

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT, context: zmq.Context | None = None,
                 direct: bool = True, window: int = PIPELINE_WINDOW, local: bool = True,
                 curve: CurveKeys | None = None):
        if problem := access.permission_denied(endpoint):  # else ZeroMQ would retry in silence until a timeout
            raise Unavailable(problem)
        self.endpoint = endpoint
        self.timeout = timeout
        self._curve = curve  # for a tcp:// endpoint with CURVE (CurveKeys.load)
        self._context = context or zmq.Context.instance()
        self._core = ClientCore(endpoint, direct and direct_path_reachable(endpoint), window)
        self._links = Links(self._context, endpoint, local, curve)
        self._local = local and self._core.directory is not None
        self._supervisor_core: ClientCore | None = None  # for what a lost local connection leaves to re-send
        self._control_socket = connect_dealer(self._context, endpoint, curve)  # replies to requests never mix

    def redo(self, tag, lsn: int, base_image: bytes | None, records: Sequence[WalRecord],
             timeout: float | None = None) -> bytes | None:
        """The page ``tag`` at ``lsn``: ``base_image`` (None: no page yet) with ``records`` applied.

        ``tag`` is a BufferTag (relation page) or an object tag of walredod.objects; the result is None for an
        object that does not exist at ``lsn`` (a prepared transaction that has ended).
        """
        timeout = self.timeout if timeout is None else timeout
        link = self._idle_local_link(tag, records) if self._local else None
        if link is not None:
            result = self._local_round_trip(link, (tag, lsn, base_image, records), timeout)
        else:
            result = self.redo_many([(tag, lsn, base_image, records)], timeout=timeout, return_exceptions=True)[0]
        if isinstance(result, WalredodError):
            raise result
        return result

    # --- one request on the local data path, without the core's machinery -----------------------------------

    def _idle_local_link(self, tag, records) -> LocalLink | None:
        """The local link of the worker this request goes to, when nothing else is in the air: a lone request then
        makes its round trip on the connection directly (the core's routing, once, and none of its bookkeeping)."""
        core = self._core
        directory = core.directory
        if core.busy or directory is None or not directory.usable() or not local.serves(tag, records):
            return None
        now = time.monotonic()
        if directory.stale(now):
            return None
        worker = directory.choose(protocol.routing_key(tag))
        if worker is None:
            return None
        directory.release(worker)
        link = self._links.to(worker)
        if link.__class__ is not LocalLink or not link.ready_for_round_trip(now):
            self._links.refresh(link)
            return None
        self._links.refresh(link)
        return link

    def _local_round_trip(self, link: LocalLink, request: RedoArgs, timeout: float):
        """The page or the error of one request sent on ``link``'s connection; a lost connection's request is sent
        again through the supervisor, or answered RedoTimeout past its deadline (docs/local-data-path.md)."""
        tag, lsn, base_image, records = request
        check_request(tag, base_image)
        request_id = self._core.next_id()
        sent_at = time.monotonic()
        data = local.encode_redo(request_id, tag, lsn, base_image, records, max(1, int(timeout * 1000)))
        try:
            status, body = link.round_trip(data, request_id, sent_at + timeout + TRANSPORT_MARGIN)
        except local.ConnectionLost:
            self._links.refresh(link)
            if time.monotonic() >= sent_at + timeout:
                return RedoTimeout(f"no reply from {link.path} within {timeout:g} s (its redo child ended)")
            return self._through_supervisor(request, timeout)
        except TimeoutError:
            self._links.refresh(link)
            return RedoTimeout(f"no reply from {link.path} within {timeout:g} s")
        return body if status == protocol.STATUS_OK else protocol.error_for(status, body)

    def _through_supervisor(self, request: RedoArgs, timeout: float):
        core = self._supervisor_core
        if core is None:
            core = self._supervisor_core = ClientCore(self.endpoint, direct=False)
        call = Call([request], timeout)
        core.submit(call)
        try:
            self._serve(call, core)
        except BaseException:
            core.abandon()
            raise
        return call.results[0]

    def redo_many(self, requests: Iterable[RedoArgs], timeout: float | None = None,
                  return_exceptions: bool = False) -> list:
        """Pipelined: up to ``window`` requests in flight; results in request order.

        On the direct data path, requests bound for one worker travel as batches of up to BATCH_SIZE in one
        message (one ZeroMQ round trip instead of one per request); ``timeout`` then applies to each batch.
        With ``return_exceptions`` a failed request's place holds its exception; otherwise the first error (in
        request order) is raised once every reply is in.
        """
        call = Call(list(requests), self.timeout if timeout is None else timeout)
        self._core.submit(call)  # raises InvalidRequest before anything is sent
        try:
            self._serve(call)
        except BaseException:
            self._core.abandon()
            raise
        if call.timed_out:
            self._links.reset()  # late replies to closed sockets are lost; message ids guard against the rest
            self._core.forget_directory()
        if not return_exceptions:
            _first_error(call.results)
        return call.results

    def _serve(self, call: Call, core: ClientCore | None = None) -> None:
        """Send, wait and read until every request of ``call`` is answered or given up on."""
        core, links, clock = core or self._core, self._links, time.monotonic
        while not call.done:
            now = clock()
            if core.directory_due(now):
                self._ask_directory(call.timeout)
                now = clock()
            for flight in core.take_sends(now):
                links.send(flight, now)
            replies = links.wait(min(core.wakeup(now), _MAX_WAIT))
            if replies:
                now = clock()
                for reply in replies:
                    apply_reply(core, reply, now)
            core.on_time(clock())

    def _ask_directory(self, timeout: float) -> None:
        core = self._core
        try:
            outcome = self._control(protocol.KIND_DIRECTORY, _directory_timeout(core, timeout))[1]
        except (WalredodError, zmq.ZMQError) as error:
            outcome = error
        core.directory_answered(outcome, time.monotonic())

    def ping(self, timeout: float = 5.0) -> float:
        """Round trip to the supervisor, in seconds. Raises Unavailable when it does not answer."""
        return self._control(protocol.KIND_PING, timeout)[0]

    def status(self, timeout: float = 5.0) -> dict:
        return json.loads(self._control(protocol.KIND_STATUS, timeout)[1])

    def _control(self, kind: int, timeout: float) -> tuple[float, bytes]:
        request_id = self._core.next_id()
        started = time.monotonic()
        sock = self._control_socket
        sock.send_multipart(protocol.encode_control(request_id, kind))
        deadline = started + timeout
        while (remaining := deadline - time.monotonic()) > 0 and sock.poll(remaining * 1000):
            got_id, result = decode_result(sock.recv_multipart())
            if got_id == request_id:
                if isinstance(result, WalredodError):
                    raise result
                return time.monotonic() - started, result
        sock.close(linger=0)
        self._control_socket = connect_dealer(self._context, self.endpoint, self._curve)
        raise Unavailable(f"no answer from {self.endpoint} within {timeout:g} s{_why_not(self.endpoint)}")

    def close(self) -> None:
        self._links.close()
        if self._control_socket is not None:
            self._control_socket.close(linger=0)
            self._control_socket = None

    def __enter__(self) -> RedoClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncRedoClient:
    """asyncio client: any number of concurrent ``await client.redo(...)`` share its sockets.

    Uses the direct data path as RedoClient does, batches included: requests submitted in one turn of the event
    loop (a redo_many, or concurrent redo calls) are routed together, up to ``window`` in flight. A reader task per
    connection feeds replies to the core; a clock task gives up on late flights and has departed workers checked.
    """

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT, direct: bool = True,
                 window: int = PIPELINE_WINDOW, local: bool = True, curve: CurveKeys | None = None):
        if problem := access.permission_denied(endpoint):
            raise Unavailable(problem)
        self.endpoint = endpoint
        self.timeout = timeout
        self._curve = curve
        self._context = zmq.asyncio.Context.instance()
        self._core = ClientCore(endpoint, direct and direct_path_reachable(endpoint), window)
        self._links = AsyncLinks(self._context, endpoint, self._on_reply, local, curve)
        self._control_socket = connect_dealer(self._context, endpoint, curve)
        self._control_lock = asyncio.Lock()
        self._flush_scheduled = False
        self._clock: asyncio.Task | None = None
        self._directory_task: asyncio.Task | None = None

    async def redo(self, tag: BufferTag, lsn: int, base_image: bytes | None, records: Sequence[WalRecord],
                   timeout: float | None = None) -> bytes | None:
        result = (await self._run([(tag, lsn, base_image, records)], timeout))[0]
        if isinstance(result, WalredodError):
            raise result
        return result

    async def redo_many(self, requests: Iterable[RedoArgs], timeout: float | None = None,
                        return_exceptions: bool = False) -> list:
        results = await self._run(list(requests), timeout)
        if not return_exceptions:
            _first_error(results)
        return results

    async def _run(self, requests: list, timeout: float | None) -> list:
        call = Call(requests, self.timeout if timeout is None else timeout)
        self._core.submit(call)  # raises InvalidRequest before anything is sent
        if call.done:
            return call.results
        loop = asyncio.get_running_loop()
        call.waiter = loop.create_future()
        self._schedule_flush(loop)
        if self._clock is None or self._clock.done():
            self._clock = loop.create_task(self._keep_time())
        return await call.waiter  # cancelled: its requests' replies are dropped as they come

    def _schedule_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Send at the end of this turn of the loop, so that requests submitted in it share batches."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        core = self._core
        now = time.monotonic()
        if core.directory_due(now):
            self._directory_task = asyncio.get_running_loop().create_task(self._ask_directory())
        links = self._links
        for flight in core.take_sends(now):
            links.send(flight, now)

    def _on_reply(self, reply) -> None:
        self._finish(apply_reply(self._core, reply, time.monotonic()))
        if self._core.has_sends:
            self._schedule_flush(asyncio.get_running_loop())

    @staticmethod
    def _finish(calls: Sequence[Call]) -> None:
        for call in calls:
            if not call.waiter.done():
                call.waiter.set_result(call.results)

    async def _keep_time(self) -> None:
        """While requests are out: give up on late ones, and let the core check on direct requests' workers."""
        core = self._core
        while core.busy:
            self._finish(core.on_time(time.monotonic()))
            self._flush()
            await asyncio.sleep(min(core.wakeup(time.monotonic()), DIRECT_CHECK_INTERVAL))

    async def _ask_directory(self) -> None:
        core = self._core
        try:
            outcome = await self._control(protocol.KIND_DIRECTORY, _directory_timeout(core, self.timeout))
        except (WalredodError, zmq.ZMQError) as error:
            outcome = error
        core.directory_answered(outcome, time.monotonic())
        self._flush()

    async def _control(self, kind: int, timeout: float) -> bytes:
        async with self._control_lock:  # one control request at a time on the control socket
            request_id = self._core.next_id()
            sock = self._control_socket
            await sock.send_multipart(protocol.encode_control(request_id, kind))
            deadline = time.monotonic() + timeout
            while (remaining := deadline - time.monotonic()) > 0 and await sock.poll(remaining * 1000):
                got_id, result = decode_result(await sock.recv_multipart())
                if got_id == request_id:
                    if isinstance(result, WalredodError):
                        raise result
                    return result
            sock.close(linger=0)
            self._control_socket = connect_dealer(self._context, self.endpoint, self._curve)
            raise Unavailable(f"no answer from {self.endpoint} within {timeout:g} s{_why_not(self.endpoint)}")

    async def close(self) -> None:
        for task in (self._clock, self._directory_task):
            if task is not None:
                task.cancel()
        for call in self._core.waiting_calls():  # nobody is left to answer them
            if call.waiter is not None and not call.waiter.done():
                call.waiter.set_exception(Unavailable("the client was closed"))
        self._core.abandon()
        self._links.close()
        self._control_socket.close(linger=0)

    async def __aenter__(self) -> AsyncRedoClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
