"""A worker process: one redo engine, serving requests from the supervisor and, directly, from clients.

The supervisor starts each worker as ``python -m walredod.daemon.worker`` (a fresh interpreter: ZeroMQ contexts do not
survive fork). The worker announces itself READY with its credit, then serves requests in arrival order and
heartbeats when idle. It dies with the supervisor (PR_SET_PDEATHSIG), and its redo children die with it (they see end
of file on their stdin).

Two sockets bring requests. The backend DEALER carries the supervisor's (control messages, and requests clients
sent to the supervisor); the direct ROUTER, bound on the slot's own endpoint, takes clients' requests in the client
protocol itself (docs/client-protocol.md, "Direct data path"), so the common request costs one ZeroMQ hop, not two.

With the local data path on, the worker also creates, binds and listens on the slot's Unix socket and hands it to
each redo child it starts (docs/local-data-path.md): clients then talk to the child itself, and the worker only
manages it — replaces a child that died, kills one past a local request's deadline, and reports the children's
counters in its heartbeats.

The backend messages are in ``walredod.daemon.backend``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import time

import zmq

from walredod import protocol
from walredod.daemon import auth, backend
from walredod.daemon.admission import release_free_memory, resident_bytes
from walredod.daemon.endpoints import bind_worker_endpoint, remove_ipc_file, restrict_socket
from walredod.config import DaemonSettings, EngineSettings
from walredod.engine import RedoEngine
from walredod.errors import InvalidRequest, PoisonRequest, RedoFailed, RedoTimeout, Unavailable, WalredodError
from walredod.native import synthesized
from walredod.native.rebuild import rebuild_object, rebuild_visibility_map_page
from walredod.types import BufferTag, ForkNumber

log = logging.getLogger("walredod.daemon.worker")

_PR_SET_PDEATHSIG = 1
_BURST = 64  # messages taken from one socket before looking at the other
_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: flag enums cost microseconds per call
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_IDLE_POLL_MS = 50  # while idle: how often memory (and the heartbeat) is looked at
# How often the redo children of the local data path are looked at: a child that died is replaced, one past a local
# request's deadline killed, within this many seconds.
LOCAL_WATCH_INTERVAL = 0.05
_LOCAL_BACKLOG = 1024  # connections waiting for a child (during a takeover, say)


def bind_local_socket(path: str) -> socket.socket:
    """The slot's listening socket of the local data path, non-blocking (the children share it: whichever is woken
    first accepts). A file left by the slot's previous worker is replaced; the directory's permissions decide who
    may connect, as for the ipc endpoints beside it."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(_LOCAL_BACKLOG)
    except OSError:
        listener.close()
        raise
    listener.setblocking(False)
    return listener


def die_with_parent() -> None:
    """Ask the kernel to kill us when the supervisor dies, even by SIGKILL."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


class RequestServer:
    """What a worker does with one request, sockets aside: check and decode it, rebuild the page or object, and
    encode the reply. (bench/daemon_study.py times it against the engine alone: our per-request Python.)"""

    def __init__(self, engine: RedoEngine, name: str, max_request_bytes: int = 0,
                 expect_busy=lambda deadline: None):
        self.engine = engine
        self.name = name
        self.max_request_bytes = max_request_bytes
        self.expect_busy = expect_busy  # told a direct request's deadline before the work starts
        self.requests = 0

    def serve(self, frames: list, deadline: float | None, taken: float | None = None) -> list:
        """One request's reply frames: the page, or a typed error. ``deadline`` None: a direct request, whose
        deadline is its own timeout from ``taken`` (default: now), when this worker took it off its socket:
        receiving, decoding and checking count against it as much as redo does."""
        taken = taken if taken is not None else time.monotonic()
        request_id = protocol.peek_request_id(frames) or 0
        try:
            if deadline is None:
                size = sum(len(f) for f in frames)
                if self.max_request_bytes and size > self.max_request_bytes:
                    raise InvalidRequest(f"request of {size} bytes is over the limit of {self.max_request_bytes}")
            request = protocol.decode_request(frames)
            if request.kind == protocol.KIND_PING:
                return protocol.encode_reply(request_id, b"")
            if request.kind not in (protocol.KIND_REDO, protocol.KIND_BATCH):
                raise InvalidRequest("status and directory requests go to the supervisor, not to a worker")
            if deadline is None:
                timeout = request.timeout_ms / 1000 if request.timeout_ms else self.engine.settings.request_timeout
                deadline = taken + timeout
                self.expect_busy(deadline)
            if request.kind == protocol.KIND_BATCH:
                # Each request of the batch is answered on its own, an error included; the batch shares the deadline.
                return protocol.encode_batch_reply(request_id, [self.serve(part, deadline) for part in request.batch])
            page = self.redo(request, deadline)
        except WalredodError as error:
            return protocol.encode_error(request_id, error)
        except Exception as error:  # a bug of ours: answer it, keep serving
            log.exception("%s: request %d failed", self.name, request_id)
            return protocol.encode_error(request_id, WalredodError(f"internal error: {error!r}"))
        self.requests += 1
        return protocol.encode_reply(request.request_id, page)

    def redo(self, request: protocol.Request, deadline: float) -> bytes:
        if not isinstance(request.tag, BufferTag):
            # pg_xact, MultiXact, relation-map and two-phase objects: rebuilt here, in Python. An object that
            # does not exist (a finished prepared transaction) is answered with an empty body.
            return rebuild_object(request.tag, request.base_image, request.records, deadline) or b""
        records = request.records
        for attempt in (1, 2):
            if time.monotonic() >= deadline:
                raise RedoTimeout("the request's deadline passed before it could be served")
            try:
                if request.tag.forknum == ForkNumber.VISIBILITYMAP and any(
                        synthesized.is_synthesized(r.data) for r in records):
                    page = rebuild_visibility_map_page(self.engine, request.tag, request.lsn, request.base_image,
                                                       records, deadline)
                    return page or b""  # cut off by a truncation
                return self.engine.redo(request.tag, request.lsn, request.base_image, records, deadline=deadline)
            except InvalidRequest:
                raise
            except RedoFailed as failure:
                # Redo is a pure function: a child death may be the machine's fault, so try once more on the
                # spare; a request that kills two children is poison.
                if attempt == 2:
                    raise PoisonRequest(f"the request killed the redo child twice: {failure}") from None
                log.warning("%s: request %d killed a redo child (%s); trying once more",
                            self.name, request.request_id, failure)
        raise AssertionError("unreachable")


class Worker:
    def __init__(self, slot: int, backend: str, engine_settings: EngineSettings, credit: int,
                 heartbeat_interval: float, direct: str | None = None, max_request_bytes: int = 0,
                 daemon_settings: DaemonSettings | None = None, secret: bytes | None = None,
                 local: str | None = None):
        self.slot = slot
        self.daemon_settings = daemon_settings or DaemonSettings()
        self.credit = credit
        self.heartbeat_interval = heartbeat_interval
        self._reported_child: int | None = None
        self._busy_until = 0.0  # deadline of the direct request in hand, as last told to the supervisor
        self._last_sent = 0.0
        self.local_path = None
        self.local_listener = None
        if local and engine_settings.kind == "vanilla":
            try:
                self.local_listener = bind_local_socket(local)
                self.local_path = local
                restrict_socket(local, self.daemon_settings)  # the socket group and mode, as for the ipc endpoints
            except (OSError, Unavailable) as exc:  # a path too long for a socket, a group we cannot give it, ...
                self._close_local()  # clients then use ZeroMQ
                self.local_path = None
                log.warning("worker %d: no local data path on %s: %s", slot, local, exc)
        self._next_watch = 0.0
        try:
            self.engine = RedoEngine(
                engine_settings, name=f"worker-{slot}",
                local_listener=self.local_listener.fileno() if self.local_listener else None,
                local_max_request_bytes=max_request_bytes or 64 << 20)
        except BaseException:
            self._close_local()
            raise
        self.server = RequestServer(self.engine, f"worker {slot}", max_request_bytes, self._expect_busy)
        self.context = zmq.Context(1)
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.setsockopt(zmq.IDENTITY, f"w{slot}.{os.getpid()}".encode())
        if secret is not None:  # the supervisor admits only its own worker process with the secret it gave it
            auth.worker_credentials(self.socket, slot, secret)
        self.socket.connect(backend)
        self.direct_path = direct
        self.max_request_bytes = max_request_bytes
        self.direct = self._bind_direct() if direct else None
        self._next_memory_check = 0.0

    def _bind_direct(self, claim: bool = True) -> zmq.Socket:
        direct = self.context.socket(zmq.ROUTER)
        direct.setsockopt(zmq.LINGER, 1000)
        # Replies a client leaves unread: as many as the supervisor keeps (daemon.max_unread_replies), the rest
        # dropped, never waited for.
        direct.setsockopt(zmq.SNDHWM, self.daemon_settings.max_unread_replies)
        direct.setsockopt(zmq.ROUTER_MANDATORY, 1)  # ... and to a departed one raises, not vanishes
        if self.max_request_bytes:
            direct.setsockopt(zmq.MAXMSGSIZE, self.max_request_bytes + 4096)
        bind_worker_endpoint(direct, self.direct_path, self.daemon_settings, claim)  # a live one refused, stale removed
        return direct

    def run(self) -> None:
        self._send(backend.encode_ready(self.slot, os.getpid(), self.engine.child_pid or 0, self.credit))
        self._poller = poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        if self.direct is not None:
            poller.register(self.direct, zmq.POLLIN)
        backend_events = self.socket.getsockopt
        self._direct_events = self.direct.getsockopt if self.direct is not None else None
        watching = self.engine.serves_local_path
        idle_poll_ms = min(self.heartbeat_interval, LOCAL_WATCH_INTERVAL, _IDLE_POLL_MS / 1000) * 1000
        while True:
            # Checking a socket's EVENTS is much cheaper than a poll; poll only when both are empty.
            direct_events = self._direct_events
            busy_direct = direct_events is not None and direct_events(zmq.EVENTS) & zmq.POLLIN
            busy_backend = backend_events(zmq.EVENTS) & zmq.POLLIN
            if watching and time.monotonic() >= self._next_watch:
                self._watch_local()
            if not (busy_direct or busy_backend):
                self.engine.start_spare()  # idle: replace a spare used up by a takeover
                if not poller.poll(idle_poll_ms):
                    self._check_memory()
                    if time.monotonic() - self._last_sent >= self.heartbeat_interval:
                        self._heartbeat(busy_until=0.0)  # idle a whole interval: silence from now on is a hang
                continue
            if busy_direct:
                self._serve_direct()
            if busy_backend and self._serve_backend():
                return
            if (self.engine.child_pid != self._reported_child
                    or time.monotonic() - self._last_sent >= self.heartbeat_interval):
                self._heartbeat()
            if time.monotonic() >= self._next_memory_check:
                self._check_memory()

    def _check_memory(self) -> None:
        """As the supervisor does (walredod.daemon.supervisor, _check_memory): ZeroMQ buffers a client's message
        whole before we see it, so past daemon.max_memory_bytes of our resident memory the direct endpoint's
        connections are dropped (closing the socket frees what was buffered) and the endpoint bound anew."""
        self._next_memory_check = time.monotonic() + _IDLE_POLL_MS / 1000
        if self.direct is None or resident_bytes() <= self.daemon_settings.max_memory_bytes:
            return
        log.error("worker %d holds %d MiB, over daemon.max_memory_bytes: dropping the connections of its direct "
                  "endpoint (a client sending a message too large to buffer?)", self.slot, resident_bytes() >> 20)
        self._poller.unregister(self.direct)
        self.direct.close(linger=0)
        self.direct = self._bind_direct(claim=False)  # ours: the closed socket may still be listening a moment
        self._poller.register(self.direct, zmq.POLLIN)
        self._direct_events = self.direct.getsockopt
        release_free_memory()

    def _send(self, frames: list) -> None:
        protocol.send_frames(self.socket, frames)
        self._last_sent = time.monotonic()

    def _heartbeat(self, busy_until: float | None = None) -> None:
        if busy_until is not None:
            self._busy_until = busy_until
        restarts = sum(self.engine.stats.restarts.values())
        self._reported_child = self.engine.child_pid
        served, local = self.server.requests, None
        if self.engine.serves_local_path:  # what its children answered ok on the local data path counts too
            counters = self.engine.local_counters()
            served += counters.requests_ok
            local = backend.encode_local_stats(counters)
        self._send(backend.encode_heartbeat(served, self.engine.child_pid or 0, restarts, self._busy_until, local))

    def _watch_local(self) -> None:
        """The redo children serve local clients on their own: replace one that died, kill one past a local
        request's deadline (RedoEngine.watch_children)."""
        self.engine.watch_children()
        self.engine.start_spare()
        self._next_watch = time.monotonic() + LOCAL_WATCH_INTERVAL
        if self.engine.child_pid != self._reported_child:
            self._heartbeat()

    def _serve_backend(self) -> bool:
        """Requests and commands from the supervisor; True when told to stop."""
        recv = self.socket.recv_multipart
        for _ in range(_BURST):
            try:
                frames = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                return False
            command = frames[0].bytes
            if command == backend.REQUEST:
                token, deadline, request = backend.decode_request([f.buffer for f in frames])
                self._send(backend.encode_reply(token, self.server.serve(request, deadline)))
            elif command == backend.STOP:
                self._finish_direct()
                return True
        return False

    def _serve_direct(self, until_empty: bool = False) -> None:
        """Requests clients sent straight to this worker: [identity, delimiter, header, ...] in, the same reply
        frames as the supervisor's out."""
        recv, direct = self.direct.recv_multipart, self.direct
        served = 0
        while until_empty or served < _BURST:
            served += 1
            taken = time.monotonic()
            try:
                frames = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            body = [f.buffer for f in frames[1:]]
            reply = self.server.serve(body, None, taken)
            try:
                direct.send(frames[0], _SNDMORE_NOBLOCK)  # EAGAIN: the client's unread replies are at the limit
            except zmq.ZMQError:  # ... or the client left: nobody to answer
                continue
            protocol.send_frames(direct, reply)

    def _finish_direct(self) -> None:
        """Before stopping, answer what clients already sent; later arrivals are theirs to re-send (the directory
        no longer lists this worker)."""
        if self.direct is not None:
            self._serve_direct(until_empty=True)

    def _expect_busy(self, deadline: float) -> None:
        """Tell the supervisor, before a direct request, how long we may be silent (one message per heartbeat
        interval at most under steady traffic)."""
        if deadline > self._busy_until + self.heartbeat_interval:
            self._heartbeat(busy_until=deadline)

    def _close_local(self) -> None:
        if self.local_listener is not None:
            self.local_listener.close()
            self.local_listener = None
            try:
                os.unlink(self.local_path)  # the slot's next worker binds anew
            except OSError:
                pass

    def close(self) -> None:
        self.engine.close()
        self._close_local()
        if self.direct is not None:
            self.direct.close(linger=1000)
            remove_ipc_file(self.direct_path)  # ZeroMQ leaves it; the slot's next worker binds anew
        self.socket.close(linger=1000)
        self.context.term()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="walredod worker (started by the supervisor)")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--credit", type=int, required=True)
    parser.add_argument("--heartbeat-interval", type=float, required=True)
    parser.add_argument("--cpu", type=int, default=-1, help="CPU for this worker and its redo children (-1: any)")
    parser.add_argument("--direct", default=None, help="endpoint of the direct data path (none: supervisor only)")
    parser.add_argument("--max-request-bytes", type=int, default=0, help="largest direct request accepted")
    parser.add_argument("--local", default=None, help="socket path of the local data path (none: no local path)")
    parser.add_argument("--engine-settings", required=True, help="EngineSettings as JSON")
    parser.add_argument("--daemon-settings", default="{}", help="DaemonSettings as JSON (socket access)")
    parser.add_argument("--secret-fd", type=int, default=-1,
                        help="pipe holding the secret this worker logs in to the supervisor with")
    args = parser.parse_args(argv)
    die_with_parent()
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})  # inherited by the redo children started below
    logging.basicConfig(level=os.environ.get("WALREDOD_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s %(levelname)s worker-{args.slot}[%(process)d] %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the supervisor, which stops us in order
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Read (and close) the secret before anything starts a redo child that could inherit it.
    secret = auth.read_secret(args.secret_fd) if args.secret_fd >= 0 else None
    settings = EngineSettings.model_validate(json.loads(args.engine_settings))
    daemon_settings = DaemonSettings.model_validate(json.loads(args.daemon_settings))
    try:
        worker = Worker(args.slot, args.backend, settings, args.credit, args.heartbeat_interval, args.direct,
                        args.max_request_bytes, daemon_settings, secret, args.local)
    except WalredodError as error:
        log.error("worker %d cannot start: %s", args.slot, error)
        return 3
    try:
        worker.run()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
