"""The supervisor: accepts requests, routes them to warm workers by relation, and heals the pool.

One thread, one poll loop over two ROUTER sockets: the frontend (clients) and the backend (workers, as DEALERs).
With the direct data path on (the default for ipc:// endpoints), each worker also binds its own endpoint beside the
frontend's, and clients on this machine send most requests there: the supervisor then answers the directory of
workers (which slot is where, under which pid) and stays the control plane, out of the requests' way.
Every accepted request is kept until exactly one reply has gone back: the worker's, or a typed error when its worker
died twice under it (poison), its deadline passed, or the daemon stops. Workers are child processes in numbered
slots; a slot whose worker dies is restarted with exponential back-off, and parked (reported, not retried in a hot
loop) after too many failed starts in a row.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from walredod import protocol
from walredod.daemon import backend, preflight
from walredod.daemon.endpoints import EndpointInUse, SupervisorEndpoints, direct_endpoint_base
from walredod.config import ConfigError, Settings, load_settings
from walredod.errors import PoisonRequest, RedoTimeout, Unavailable, WalredodError
from walredod.daemon.metrics import Metrics
from walredod.daemon.routing import Router

log = logging.getLogger("walredod.daemon.supervisor")

_GRACE = 2.0  # seconds past a request's deadline before the supervisor answers for a silent worker
_MIN_BACKOFF = 0.1
_HOUSEKEEPING_INTERVAL = 0.05  # seconds between checks of workers, deadlines and heartbeats


@dataclass
class Pending:
    """An accepted request, until its one reply."""

    client: bytes
    request_id: int
    frames: list  # the client's frames from the header on, as received (no copies)
    key: tuple
    deadline: float
    accepted: float
    records: int
    attempts: int = 0
    slot: int | None = None


@dataclass
class Slot:
    """A worker position; its worker process comes and goes, the slot (and so its relations) stays."""

    index: int
    process: subprocess.Popen | None = None
    identity: bytes | None = None
    ready: bool = False
    credit: int = 0
    in_flight: dict[int, Pending] = field(default_factory=dict)
    last_seen: float = 0.0
    started_at: float = 0.0
    failed_starts: int = 0
    next_start: float = 0.0
    restarts: collections.Counter = field(default_factory=collections.Counter)
    served: int = 0
    child_pid: int = 0
    child_restarts: int = 0
    parked: bool = False
    retiring: bool = False
    stop_sent: bool = False
    busy_until: float = 0.0  # the worker may be silent until then: it serves a direct request
    direct_endpoint: str | None = None

    @property
    def state(self) -> str:
        if self.parked:
            return "down"
        if self.process is None:
            return "restarting"
        if self.retiring:
            return "retiring"
        return "ready" if self.ready else "starting"


class Supervisor:
    def __init__(self, settings: Settings, config_path: Path | None = None, overrides: dict | None = None):
        self.settings = settings
        self.config_path = config_path
        self.overrides = overrides or {}
        self.context = zmq.Context(1)
        self.frontend = self.context.socket(zmq.ROUTER)
        self.backend = self.context.socket(zmq.ROUTER)
        self.router = Router(settings.daemon.spill_factor)
        self.metrics = Metrics()
        self.slots: dict[int, Slot] = {}
        self.by_identity: dict[bytes, Slot] = {}
        self.pending: dict[int, Pending] = {}
        self.waiting: collections.deque[int] = collections.deque()  # tokens no worker could take yet
        self.tokens = itertools.count(1)
        self.stopping = False
        self.stop_deadline = 0.0
        self._signals: list[int] = []
        self.cpus: list[int] = []
        self._notifier = _systemd_notifier()
        self._last_watchdog = 0.0
        self._next_housekeeping = 0.0
        run_dir = settings.engine.data_dir / "run"
        self.endpoints: SupervisorEndpoints | None = None
        self.backend_endpoint = f"ipc://{run_dir}/backend-{os.getpid()}.sock"
        self.direct_base = direct_endpoint_base(settings.daemon)

    # --- start and stop -------------------------------------------------------------------------------------------

    def bind(self) -> None:
        d = self.settings.daemon
        for sock in (self.frontend, self.backend):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting worker or client takes its identity back
        self.frontend.setsockopt(zmq.RCVHWM, d.max_pending)
        # Never drop a reply because a client reads slowly (ZeroMQ's default at the high-water mark): what waits is
        # bounded by what that client sent. Replies to clients that left raise instead of vanishing silently.
        self.frontend.setsockopt(zmq.SNDHWM, 0)
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.frontend.setsockopt(zmq.MAXMSGSIZE, d.max_request_bytes + 4096)
        # Refuses (touching nothing) when another daemon serves an endpoint; removes stale socket files.
        self.endpoints = SupervisorEndpoints(d, self.backend_endpoint)
        try:
            for endpoint in d.endpoints:
                self.endpoints.bind_frontend(self.frontend, endpoint)
            self.endpoints.bind_backend(self.backend, self.backend_endpoint)
            if d.metrics_address:
                try:
                    self.metrics.serve(d.metrics_address)
                except OSError as error:
                    raise EndpointInUse(f"daemon.metrics_address {d.metrics_address}: {error.strerror}") from None
        except BaseException:
            self.frontend.close()
            self.backend.close()
            self.endpoints.release()
            raise

    def worker_count(self) -> int:
        return self.settings.daemon.workers or os.cpu_count() or 1

    def run(self) -> int:
        preflight.check(self.settings, self.config_path)
        self.cpus = sorted(os.sched_getaffinity(0))
        if self.settings.daemon.cpu_placement == "pair" and len(self.cpus) > 1:
            # Our own CPU: the last one, where the fewest workers sit (worker i is on CPU i). A supervisor the
            # scheduler moves around pays cold caches and cross-CPU wake-ups on every message.
            os.sched_setaffinity(0, {self.cpus[-1]})
        self.bind()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        for index in range(self.worker_count()):
            self.slots[index] = Slot(index)
            self._start_worker(self.slots[index])
        log.info("walredod serving on %s with %d workers", ", ".join(self.settings.daemon.endpoints),
                 len(self.slots))
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        announced = False
        try:
            while True:
                self._handle_signals()
                if self.stopping and (not self.pending or time.monotonic() >= self.stop_deadline):
                    break
                events = dict(poller.poll(self._poll_timeout_ms()))
                if self.backend in events:
                    self._drain_backend()
                if self.frontend in events:
                    self._drain_frontend()
                if time.monotonic() >= self._next_housekeeping:
                    self._housekeeping()
                    self._next_housekeeping = time.monotonic() + _HOUSEKEEPING_INTERVAL
                if not announced and any(s.ready for s in self.slots.values()):
                    self._notify("READY=1")
                    announced = True
        finally:
            self._shutdown()
        return 0

    def _on_signal(self, signum, _frame) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                log.info("stopping: answering the %d requests in flight, accepting no more", len(self.pending))
                self._notify("STOPPING=1")
                self.stopping = True
                self.stop_deadline = time.monotonic() + self.settings.daemon.shutdown_timeout
            elif signum == signal.SIGHUP:
                self.reload()
            elif signum == signal.SIGCHLD:
                self._reap()

    def reload(self) -> None:
        """Re-read the configuration; the worker count and tunables change without dropping requests."""
        try:
            settings = load_settings(self.config_path, self.overrides)
            preflight.check(settings, self.config_path)
        except ConfigError as error:
            log.error("reload refused, keeping the running configuration: %s", error)
            return
        for name in ("endpoints", "socket_group", "socket_mode"):  # bound sockets keep what they were made with
            if getattr(settings.daemon, name) != getattr(self.settings.daemon, name):
                log.warning("reload: daemon.%s changed; that needs a restart, keeping %s", name,
                            getattr(self.settings.daemon, name))
                settings = settings.model_copy(update={"daemon": settings.daemon.model_copy(
                    update={name: getattr(self.settings.daemon, name)})})
        self.settings = settings
        self.router.spill_factor = settings.daemon.spill_factor
        wanted = self.worker_count()
        for index in range(wanted):
            slot = self.slots.get(index)
            if slot is None:
                self.slots[index] = slot = Slot(index)
                self._start_worker(slot)
            slot.retiring = False
            if slot.parked:  # a reload is the operator's "try again"
                slot.parked, slot.failed_starts, slot.next_start = False, 0, 0.0
        for index, slot in self.slots.items():
            if index >= wanted:
                slot.retiring = True  # stops taking work; stopped once its requests are answered
        log.info("reloaded: %d workers", wanted)

    def _shutdown(self) -> None:
        for token in list(self.pending):
            self._answer_error(token, Unavailable("the daemon is stopping"))
        for slot in self.slots.values():
            if slot.identity is not None and slot.process is not None:
                self._send_worker(slot, backend.encode_stop())
        deadline = time.monotonic() + 5.0
        for slot in self.slots.values():
            if slot.process is not None:
                try:
                    slot.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    slot.process.kill()
                    slot.process.wait()
        self.frontend.close()
        self.backend.close()
        self.context.term()
        self.endpoints.release()  # ZeroMQ leaves socket files behind
        self.metrics.stop()
        log.info("walredod stopped")

    # --- workers --------------------------------------------------------------------------------------------------

    def _start_worker(self, slot: Slot) -> None:
        d = self.settings.daemon
        cpu = self.cpus[slot.index % len(self.cpus)] if d.cpu_placement == "pair" else -1
        argv = [sys.executable, "-m", "walredod.daemon.worker", "--slot", str(slot.index),
                "--backend", self.backend_endpoint, "--credit", str(d.worker_credit),
                "--heartbeat-interval", str(d.heartbeat_interval), "--cpu", str(cpu),
                "--max-request-bytes", str(d.max_request_bytes),
                "--engine-settings", self.settings.engine.model_dump_json(),
                "--daemon-settings", self.settings.daemon.model_dump_json()]
        slot.direct_endpoint = f"{self.direct_base}-{slot.index}.sock" if self.direct_base else None
        if slot.direct_endpoint:
            argv += ["--direct", slot.direct_endpoint]
        slot.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, close_fds=True)
        slot.started_at = slot.last_seen = time.monotonic()
        slot.ready = False
        slot.identity = None
        slot.stop_sent = False
        slot.busy_until = 0.0
        log.info("slot %d: worker %d started", slot.index, slot.process.pid)

    def _reap(self) -> None:
        for slot in self.slots.values():
            process = slot.process
            if process is not None and process.poll() is not None:
                if slot.retiring and slot.stop_sent and not slot.in_flight:
                    log.info("slot %d: worker %d retired", slot.index, process.pid)
                    self.by_identity.pop(slot.identity, None)
                    slot.process = None
                    continue
                cause = "exited" if process.returncode >= 0 else f"killed by signal {-process.returncode}"
                self._worker_gone(slot, cause)

    def _worker_gone(self, slot: Slot, cause: str) -> None:
        """The slot's worker is dead (or declared dead): re-dispatch its requests, schedule a restart."""
        process = slot.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        log.warning("slot %d: worker %s %s with %d requests in flight", slot.index,
                    process.pid if process else "?", cause, len(slot.in_flight))
        self.metrics.restarts.labels(cause=cause.split(" ")[0]).inc()
        slot.restarts[cause] += 1
        if slot.identity is not None:
            self.by_identity.pop(slot.identity, None)
        never_ready = not slot.ready
        slot.process, slot.identity, slot.ready, slot.credit = None, None, False, 0
        for token, pending in list(slot.in_flight.items()):
            pending.slot = None
            if pending.attempts >= 2:
                self._answer_error(token, PoisonRequest(
                    f"request {pending.request_id} was in flight on two workers that died; not tried again"))
            else:
                self.waiting.appendleft(token)
        slot.in_flight.clear()
        self.metrics.set_in_flight(slot.index, 0)
        if slot.retiring:
            return
        slot.failed_starts = slot.failed_starts + 1 if never_ready else 0
        if slot.failed_starts >= self.settings.daemon.max_failed_starts:
            slot.parked = True
            log.error("slot %d: worker failed to start %d times in a row; slot parked until reload (SIGHUP)",
                      slot.index, slot.failed_starts)
            return
        backoff = min(self.settings.daemon.restart_backoff_max, _MIN_BACKOFF * (2 ** slot.failed_starts))
        slot.next_start = time.monotonic() + (backoff if slot.failed_starts else 0.0)

    def _send_worker(self, slot: Slot, frames: list) -> None:
        protocol.send_frames(self.backend, [slot.identity, *frames])

    def _drain_backend(self) -> None:
        recv, events = self.backend.recv_multipart, self.backend.getsockopt
        for _ in range(1000):  # bounded, so clients are heard between bursts of replies
            if not events(zmq.EVENTS) & zmq.POLLIN:
                return
            self._on_worker_message(recv(copy=False))

    def _on_worker_message(self, frames: list) -> None:
        identity = frames[0].bytes
        command = frames[1].bytes
        now = time.monotonic()
        slot = self.by_identity.get(identity)
        if command == backend.REPLY and slot is not None:
            slot.last_seen = now
            token = backend.decode_token(frames[2].buffer)
            pending = slot.in_flight.pop(token, None)
            slot.credit += 1
            if pending is not None and self.pending.pop(token, None) is not None:
                self._send_client([pending.client, b"", *frames[3:]])  # a batch's reply has more frames
                status = frames[3].buffer[3]
                self.metrics.observe(protocol.STATUS_NAMES.get(status, "ok"), now - pending.accepted,
                                     pending.records)
                slot.served += 1
            self.metrics.set_in_flight(slot.index, len(slot.in_flight))
            self._dispatch_waiting()
        elif command == backend.HEARTBEAT and slot is not None:
            slot.last_seen = now
            beat = backend.decode_heartbeat(frames[2].buffer)
            slot.served, slot.child_pid, slot.child_restarts, slot.busy_until = (
                beat.served, beat.child_pid, beat.child_restarts, beat.busy_until)
            self.metrics.set_served(slot.index, slot.served)
        elif command == backend.READY:
            ready = backend.decode_ready(frames[2].buffer)
            index, pid, child_pid, credit = ready.slot, ready.pid, ready.child_pid, ready.credit
            slot = self.slots.get(index)
            if slot is None or slot.process is None or slot.process.pid != pid:
                self.backend.send_multipart([identity, *backend.encode_stop()])  # a stray from an earlier life
                return
            slot.identity, slot.ready, slot.credit, slot.child_pid = identity, True, credit, child_pid
            slot.last_seen, slot.failed_starts = now, 0
            self.by_identity[identity] = slot
            log.info("slot %d: worker %d ready (redo child %d)", index, pid, child_pid)
            self._dispatch_waiting()
        # anything else from an unknown identity is ignored: a worker we already declared dead

    # --- requests -------------------------------------------------------------------------------------------------

    def _drain_frontend(self) -> None:
        recv, events = self.frontend.recv_multipart, self.frontend.getsockopt
        for _ in range(1000):
            if not events(zmq.EVENTS) & zmq.POLLIN:
                return
            self._on_client_message(recv(copy=False))

    def _on_client_message(self, frames: list) -> None:
        client = frames[0].bytes
        body = [f.buffer for f in frames[1:]]
        request_id = protocol.peek_request_id(body) or 0
        try:
            request = self._accept(body)
        except WalredodError as error:
            self.metrics.observe(error.code, 0.0, 0)
            self._send_client([client, *protocol.encode_error(request_id, error)])
            return
        if request is None:  # ping
            self._send_client([client, *protocol.encode_reply(request_id, b"")])
            return
        if request == "status":
            self._send_client([client, *protocol.encode_reply(request_id, self.status_json())])
            return
        if request == "directory":
            self._send_client([client, *protocol.encode_reply(request_id, self.directory_json())])
            return
        now = time.monotonic()
        timeout = request.timeout_ms / 1000 if request.timeout_ms else self.settings.engine.request_timeout
        token = next(self.tokens)
        self.pending[token] = Pending(client, request_id, frames[2:], protocol.routing_key(request.tag),
                                      now + timeout, now, len(request.records))
        self.waiting.append(token)
        self._dispatch_waiting()

    def _accept(self, body: list):
        """Checks the supervisor can make cheaply; the worker decodes the rest."""
        if self.stopping:
            raise Unavailable("the daemon is stopping")
        size = sum(len(f) for f in body)
        if size > self.settings.daemon.max_request_bytes:
            raise protocol.InvalidRequest(f"request of {size} bytes is over the limit of "
                                          f"{self.settings.daemon.max_request_bytes}")
        request = protocol.decode_request(body, records=False)
        if request.kind == protocol.KIND_STATUS:
            return "status"
        if request.kind == protocol.KIND_DIRECTORY:
            return "directory"
        if request.kind == protocol.KIND_PING:
            return None
        if self.slots and all(slot.parked for slot in self.slots.values()):
            raise Unavailable("no worker can start (see the daemon's log and `walredod status`)")
        if len(self.pending) >= self.settings.daemon.max_pending:
            raise Unavailable(f"{len(self.pending)} requests are waiting; try again later")
        return request

    def _dispatch_waiting(self) -> None:
        slots = [s.index for s in self.slots.values() if s.ready and not s.retiring]
        while self.waiting:
            token = self.waiting[0]
            pending = self.pending.get(token)
            if pending is None:
                self.waiting.popleft()
                continue
            index = self.router.choose(pending.key, slots, lambda i: len(self.slots[i].in_flight),
                                       lambda i: self.slots[i].credit > 0)
            if index is None:
                return
            self.waiting.popleft()
            slot = self.slots[index]
            slot.credit -= 1
            slot.in_flight[token] = pending
            pending.slot = index
            pending.attempts += 1
            self._send_worker(slot, backend.encode_request(token, pending.deadline, pending.frames))
            self.metrics.set_in_flight(index, len(slot.in_flight))
        self.metrics.queue_depth.set(len(self.waiting))

    def _send_client(self, frames: list) -> None:
        try:
            protocol.send_frames(self.frontend, frames)
        except zmq.ZMQError as exc:  # the client disconnected: nobody is left to answer
            log.debug("reply to a departed client dropped: %s", exc)

    def _answer_error(self, token: int, error: WalredodError) -> None:
        pending = self.pending.pop(token, None)
        if pending is None:
            return
        if pending.slot is not None:
            self.slots[pending.slot].in_flight.pop(token, None)
        self.metrics.observe(error.code, time.monotonic() - pending.accepted, pending.records)
        self._send_client([pending.client, *protocol.encode_error(pending.request_id, error)])

    # --- time -----------------------------------------------------------------------------------------------------

    def _poll_timeout_ms(self) -> int:
        return max(1, int((self._next_housekeeping - time.monotonic()) * 1000) + 1)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        d = self.settings.daemon
        self._reap()
        for slot in self.slots.values():
            if slot.process is None:
                if not slot.parked and not slot.retiring and now >= slot.next_start:
                    self._start_worker(slot)
                continue
            silent = now - slot.last_seen
            if slot.ready and silent > d.heartbeat_interval * d.heartbeat_liveness:
                # Silence is allowed while the worker is inside a request it holds (ours or a direct one).
                oldest = min((p.deadline for p in slot.in_flight.values()), default=0.0)
                if now > max(oldest, slot.busy_until) + _GRACE:
                    self._worker_gone(slot, "hung (missed heartbeats)")
                    continue
            if not slot.ready and now - slot.started_at > self.settings.engine.start_timeout + 10:
                self._worker_gone(slot, "hung (never ready)")
                continue
            if slot.ready and now - slot.last_seen >= d.heartbeat_interval and not slot.in_flight:
                self._send_worker(slot, backend.encode_heartbeat_probe())
            if slot.retiring and not slot.in_flight and not slot.stop_sent and slot.identity is not None:
                self._send_worker(slot, backend.encode_stop())  # it exits; reaping removes the slot
                slot.stop_sent = True
        for index in [i for i, s in self.slots.items() if s.retiring and s.process is None]:
            del self.slots[index]
        # Answer for requests whose worker went silent past their deadline.
        for token, pending in list(self.pending.items()):
            if now > pending.deadline + _GRACE:
                self._answer_error(token, RedoTimeout(
                    f"request {pending.request_id} was not answered within its deadline"))
        self._dispatch_waiting()
        if now - self._last_watchdog >= 1.0:
            self._notify("WATCHDOG=1")
            self._last_watchdog = now

    # --- status ---------------------------------------------------------------------------------------------------

    def status_json(self) -> bytes:
        workers = [{
            "slot": s.index, "state": s.state, "pid": s.process.pid if s.process else None,
            "child_pid": s.child_pid or None, "in_flight": len(s.in_flight), "served": s.served,
            "restarts": dict(s.restarts), "child_restarts": s.child_restarts,
        } for s in self.slots.values()]
        return json.dumps({"pid": os.getpid(), "pending": len(self.pending), "waiting": len(self.waiting),
                           "stopping": self.stopping, "workers": workers}).encode()

    def directory_json(self) -> bytes:
        """Where clients may send requests directly: each slot's endpoint, the pid of its worker, and whether it
        takes new work. A client re-sends through us whatever it had sent to a worker that is no longer listed
        with the same pid (docs/client-protocol.md)."""
        workers = [{"slot": s.index, "pid": s.process.pid if s.process else None, "endpoint": s.direct_endpoint,
                    "ready": s.ready and not s.retiring and s.process is not None}
                   for s in self.slots.values() if s.direct_endpoint]
        return json.dumps({"direct": self.direct_base is not None and not self.stopping,
                           "spill_factor": self.settings.daemon.spill_factor, "workers": workers}).encode()

    def _notify(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)


def _systemd_notifier():
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    import sdnotify

    return sdnotify.SystemdNotifier()
