"""The supervisor's bookkeeping, apart from its sockets and processes: slots, accepted requests, credit, routing,
deadlines, re-dispatch, restarts with back-off and parking.

``Pool`` decides; the supervisor's message loop (``walredod.daemon.supervisor``) moves bytes and processes. The pool
reaches the outside world only through what it is given: a clock, a ``start_process(slot)`` that returns a process
handle (``pid``, ``poll()``, ``kill()``, ``wait()``: a ``subprocess.Popen`` or a test's fake), a ``send_worker(identity,
frames)`` for the backend, and one ``Frontend`` per client endpoint whose ``send(client, frames)`` answers a client.
So every rule below is unit-tested with a fake clock, fake processes and lists for sockets (tests/test_supervisor.py).

Every accepted request is kept until exactly one reply has gone back: its worker's, or a typed error when its worker
died twice under it (poison), its deadline passed with its worker silent, or the daemon stops. A slot whose worker
dies is restarted at once if the worker had served, else after an exponential back-off; after ``max_failed_starts``
failed starts in a row the slot is parked (reported down) until a reload.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from walredod import protocol
from walredod.config import Settings
from walredod.daemon import backend
from walredod.daemon.admission import Budget, FairQueue
from walredod.daemon.endpoints import local_socket_path
from walredod.daemon.metrics import Metrics
from walredod.daemon.routing import Router
from walredod.errors import InvalidRequest, PoisonRequest, RedoTimeout, Unavailable, WalredodError

log = logging.getLogger("walredod.daemon.supervisor")

GRACE = 2.0  # seconds past a request's deadline before the supervisor answers for a silent worker
MIN_BACKOFF = 0.1  # seconds before the first restart of a worker that never became ready; doubles per failure


def per_client_limit(daemon_settings) -> int:
    """Requests one client connection may have held: daemon.max_pending_per_client, by default half of max_pending."""
    limit = daemon_settings.max_pending_per_client or max(1, daemon_settings.max_pending // 2)
    return min(limit, daemon_settings.max_pending)


class Process(Protocol):
    """What the pool needs of a worker process (``subprocess.Popen`` has it)."""

    pid: int

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class Frontend:
    """One bound client endpoint. A reply leaves by the endpoint its request came in by, and the endpoint's kind
    decides the directory its clients get: only ipc clients are on this machine, where the workers' ipc endpoints
    are (ZeroMQ does not say which bound endpoint a message came in by, hence one socket per endpoint)."""

    __slots__ = ("endpoint", "local", "send")

    def __init__(self, endpoint: str, send: Callable[[bytes, list], None]):
        self.endpoint = endpoint
        self.local = endpoint.startswith("ipc://")
        self.send = send  # (client identity, frames delimiter first); a departed client's reply is dropped

    def __repr__(self) -> str:
        return f"Frontend({self.endpoint!r})"


@dataclass(slots=True)
class Pending:
    """An accepted request, until its one reply."""

    frontend: Frontend
    client: bytes
    request_id: int
    frames: list  # the client's frames from the header on, as received (no copies)
    key: tuple
    deadline: float
    accepted: float
    records: int
    size: int  # bytes of all its frames
    requests: int = 1  # a batch's size: load is counted in requests, as clients count theirs
    attempts: int = 0
    slot: int | None = None

    @property
    def owner(self) -> tuple[str, bytes]:
        """Whose it is, for fairness and budgets: the client's connection (endpoint and ZeroMQ identity)."""
        return self.frontend.endpoint, self.client


@dataclass
class Slot:
    """A worker position; its worker process comes and goes, the slot (and so its relations) stays."""

    index: int
    process: Process | None = None
    identity: bytes | None = None
    ready: bool = False
    credit: int = 0
    in_flight: dict[int, Pending] = field(default_factory=dict)
    owed: set[int] = field(default_factory=set)  # tokens answered for the worker (timeout): its reply returns credit
    load: int = 0  # requests in flight here, a batch counting its size (kept, not summed: read per dispatch)
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
    local_socket: str | None = None  # the local data path's socket (docs/local-data-path.md)

    @property
    def state(self) -> str:
        if self.parked:
            return "down"
        if self.process is None:
            return "restarting"
        if self.retiring:
            return "retiring"
        return "ready" if self.ready else "starting"

    @property
    def takes_work(self) -> bool:
        return self.ready and not self.retiring


class Pool:
    def __init__(self, settings: Settings, *, start_process: Callable[[Slot], Process],
                 send_worker: Callable[[bytes, list], None], clock: Callable[[], float] = time.monotonic,
                 metrics: Metrics | None = None, direct_base: str | None = None):
        self.settings = settings
        self.start_process = start_process
        self.send_worker = send_worker
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.direct_base = direct_base  # workers' direct endpoints are named after it; None: no direct path
        self.router = Router(settings.daemon.spill_factor)
        self.slots: dict[int, Slot] = {}
        self.by_identity: dict[bytes, Slot] = {}
        self.pending: dict[int, Pending] = {}
        # Tokens no worker could take yet, taken round-robin over clients (a flood of one client waits its turns).
        self.waiting = FairQueue(lambda token: self.pending[token].owner)
        d = settings.daemon
        self.budget = Budget(d.max_pending, d.max_pending_bytes, per_client_limit(d))
        self.ignored_replies = 0  # replies to tokens a worker does not hold: duplicates, or a confused worker
        self.tokens = itertools.count(1)
        self.stopping = False

    # --- workers: start, READY, heartbeats, death -----------------------------------------------------------------

    def worker_count(self) -> int:
        return self.settings.daemon.workers or os.cpu_count() or 1

    def resize(self) -> None:
        """Give the configured number of slots a worker; slots past it retire (they take no new work and stop once
        their requests are answered). A parked slot gets a fresh start: a reload is the operator's "try again"."""
        wanted = self.worker_count()
        for index in range(wanted):
            slot = self.slots.get(index)
            if slot is None:
                self.slots[index] = slot = Slot(index)
                self._start(slot)
            slot.retiring = False
            if slot.parked:
                slot.parked, slot.failed_starts, slot.next_start = False, 0, 0.0
        for index, slot in self.slots.items():
            if index >= wanted:
                slot.retiring = True

    def apply_settings(self, settings: Settings) -> None:
        """A reloaded configuration: tunables take effect for what comes next, the worker count at once."""
        self.settings = settings
        self.router.spill_factor = settings.daemon.spill_factor
        d = settings.daemon
        self.budget.max_requests, self.budget.max_bytes = d.max_pending, d.max_pending_bytes
        self.budget.max_per_client = per_client_limit(d)
        self.resize()

    def _start(self, slot: Slot) -> None:
        slot.direct_endpoint = f"{self.direct_base}-{slot.index}.sock" if self.direct_base else None
        slot.local_socket = local_socket_path(self.settings.daemon, slot.index) if self.direct_base else None
        slot.process = self.start_process(slot)
        slot.started_at = slot.last_seen = self.clock()
        slot.ready, slot.identity, slot.stop_sent, slot.busy_until = False, None, False, 0.0
        log.info("slot %d: worker %d started", slot.index, slot.process.pid)

    def on_ready(self, identity: bytes, ready: backend.Ready) -> None:
        slot = self.slots.get(ready.slot)
        if slot is None or slot.process is None or slot.process.pid != ready.pid:
            self.send_worker(identity, backend.encode_stop())  # a stray from an earlier life
            return
        if slot.identity is not None:
            self.by_identity.pop(slot.identity, None)
        slot.identity, slot.ready, slot.credit, slot.child_pid = identity, True, ready.credit, ready.child_pid
        slot.last_seen, slot.failed_starts = self.clock(), 0
        self.by_identity[identity] = slot
        log.info("slot %d: worker %d ready (redo child %d)", slot.index, ready.pid, ready.child_pid)
        self.dispatch()

    def on_heartbeat(self, slot: Slot, beat: backend.Heartbeat) -> None:
        slot.last_seen = self.clock()
        slot.served, slot.child_pid, slot.child_restarts, slot.busy_until = (
            beat.served, beat.child_pid, beat.child_restarts, beat.busy_until)
        self.metrics.set_served(slot.index, slot.served)

    def reap(self) -> None:
        """Notice workers that exited (the supervisor calls this on SIGCHLD, and housekeeping does too)."""
        for slot in self.slots.values():
            process = slot.process
            returncode = process.poll() if process is not None else None
            if returncode is None:
                continue
            if slot.retiring and slot.stop_sent and not slot.in_flight:
                log.info("slot %d: worker %d retired", slot.index, process.pid)
                self.by_identity.pop(slot.identity, None)
                slot.process = None
                continue
            self.worker_gone(slot, "exited" if returncode >= 0 else f"killed by signal {-returncode}")

    def worker_gone(self, slot: Slot, cause: str) -> None:
        """The slot's worker is dead (or declared dead): re-dispatch its requests once, schedule a restart."""
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
        # Back to the front of the queue, oldest first; a request its second worker died under is poison.
        for token, pending in reversed(slot.in_flight.items()):
            pending.slot = None
            if pending.attempts >= 2:
                self.answer_error(token, PoisonRequest(
                    f"request {pending.request_id} was in flight on two workers that died; not tried again"))
            else:
                self.waiting.appendleft(token)
        slot.in_flight.clear()
        slot.owed.clear()
        slot.load = 0
        self.metrics.set_in_flight(slot.index, 0)
        if not slot.retiring:  # a retiring slot is not restarted: housekeeping removes it
            slot.failed_starts = slot.failed_starts + 1 if never_ready else 0
            if slot.failed_starts >= self.settings.daemon.max_failed_starts:
                slot.parked = True
                log.error("slot %d: worker failed to start %d times in a row; slot parked until reload (SIGHUP)",
                          slot.index, slot.failed_starts)
                self._refuse_waiting_if_nothing_can_serve()
            else:
                slot.next_start = self.clock() + self.backoff(slot.failed_starts)
        self.dispatch()  # to the workers left, at once

    def backoff(self, failed_starts: int) -> float:
        """Seconds before restarting a slot whose last ``failed_starts`` workers never became ready (0: a worker
        that had served is replaced at once)."""
        if not failed_starts:
            return 0.0
        return min(self.settings.daemon.restart_backoff_max, MIN_BACKOFF * (2 ** failed_starts))

    # --- messages -------------------------------------------------------------------------------------------------

    def on_worker_message(self, frames: list) -> None:
        """A backend message as received (ZeroMQ frames: the worker's identity, the command, its fields)."""
        identity = frames[0].bytes
        command = frames[1].bytes
        slot = self.by_identity.get(identity)
        if command == backend.REPLY and slot is not None:
            self.on_reply(slot, backend.decode_token(frames[2].buffer), frames)
        elif command == backend.HEARTBEAT and slot is not None:
            self.on_heartbeat(slot, backend.decode_heartbeat(frames[2].buffer))
            if len(frames) > 3:  # what its redo children served on the local data path
                self.metrics.set_local(slot.index, backend.decode_local_stats(frames[3].buffer))
        elif command == backend.READY:
            self.on_ready(identity, backend.decode_ready(frames[2].buffer))
        # anything else from an unknown identity is ignored: a worker we already declared dead

    def on_reply(self, slot: Slot, token: int, frames: list) -> None:
        """A worker's reply to ``token``; ``frames[3:]`` are the reply header and body (a batch's has more)."""
        now = self.clock()
        slot.last_seen = now
        pending = slot.in_flight.pop(token, None)
        if pending is None:
            if token not in slot.owed:  # not a request this worker holds: no credit, nothing sent
                self.ignored_replies += 1
                log.warning("slot %d: reply to token %d, which the worker does not hold, ignored", slot.index, token)
                return
            slot.owed.discard(token)  # we answered it already (timeout); the worker's credit comes back
        slot.credit += 1
        if pending is not None:
            del self.pending[token]
            slot.load -= pending.requests
            pending.frontend.send(pending.client, [b"", *frames[3:]])  # a batch's reply has more frames
            self.metrics.observe(protocol.STATUS_NAMES.get(protocol.reply_status(frames[3].buffer), "ok"),
                                 now - pending.accepted, pending.records)
            self.released(pending)
            slot.served += 1
        self.metrics.set_in_flight(slot.index, len(slot.in_flight))
        if self.waiting:
            self.dispatch()

    def on_client_message(self, frontend: Frontend, frames: list) -> None:
        """A client message as received on ``frontend``: its identity, then the request, delimiter first."""
        client = frames[0].bytes
        body = [f.buffer for f in frames[1:]]
        # The checks in the order of docs/client-protocol.md, "How the daemon checks a request".
        try:
            if self.stopping:
                raise Unavailable("the daemon is stopping")
            size = sum(len(f) for f in body)
            if size > self.settings.daemon.max_request_bytes:
                raise InvalidRequest(f"request of {size} bytes is over the limit of "
                                     f"{self.settings.daemon.max_request_bytes}")
            request = protocol.decode_request(body, records=False)
            if request.kind in protocol.CONTROL_KINDS:
                frontend.send(client, protocol.encode_reply(request.request_id, self.control_reply(frontend,
                                                                                                   request.kind)))
                return
            self.admit(frontend, client, size)
        except WalredodError as error:
            self.metrics.observe(error.code, 0.0, 0)
            frontend.send(client, protocol.encode_error(protocol.peek_request_id(body) or 0, error))
            return
        now = self.clock()
        timeout = request.timeout_ms / 1000 if request.timeout_ms else self.settings.engine.request_timeout
        token = next(self.tokens)
        # Records: the frames after each request's header, base image and LSN frame (a batch has its own header).
        records = len(body) - 4 if request.batch is None else len(body) - 2 - 3 * len(request.batch)
        self.pending[token] = Pending(frontend, client, request.request_id, frames[2:],
                                      protocol.routing_key(request.tag), now + timeout, now, records, size,
                                      len(request.batch) if request.batch else 1)
        self.budget.take(self.pending[token].owner, size)
        self.waiting.append(token)
        self.dispatch()

    def control_reply(self, frontend: Frontend, kind: int) -> bytes:
        """The body of the answer to a ping, status or directory request, which the supervisor answers itself."""
        if kind == protocol.KIND_STATUS:
            return self.status_json()
        if kind == protocol.KIND_DIRECTORY:
            return self.directory_json(frontend.local)
        return b""

    # --- admission ------------------------------------------------------------------------------------------------
    # Whether a redo request is taken, and what is given back when it is answered: the one place for limits on what
    # the daemon holds (walredod.daemon.admission: requests and bytes in all and per client; ``released`` gives back).

    def admit(self, frontend: Frontend, client: bytes, size: int) -> None:
        """Raises the error to answer instead of taking a well-formed redo request or batch of ``size`` bytes from
        ``client`` (the last of the checks)."""
        if self.slots and all(slot.parked for slot in self.slots.values()):
            raise Unavailable("no worker can start (see the daemon's log and `walredod status`)")
        if refusal := self.budget.refusal((frontend.endpoint, client), size):
            setting, why = refusal
            self.metrics.refused_requests.labels(reason=setting).inc()
            raise Unavailable(f"{why} (daemon.{setting})")

    def released(self, pending: Pending) -> None:
        """``pending`` got its reply (or error) and no longer counts against the limits."""
        self.budget.give_back(pending.owner, pending.size)

    # --- dispatch and answers -------------------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand waiting requests, oldest first, to their relation's worker (or the next-ranked one, see Router) while
        workers have credit."""
        slots = self.slots
        ready = [s.index for s in slots.values() if s.takes_work]
        load = lambda i: slots[i].load  # noqa: E731
        has_credit = lambda i: slots[i].credit > 0  # noqa: E731
        while self.waiting:
            token = self.waiting[0]
            pending = self.pending.get(token)
            if pending is None:  # answered meanwhile (an error)
                self.waiting.popleft()
                continue
            index = self.router.choose(pending.key, ready, load, has_credit, pending.requests)
            if index is None:
                break
            self.waiting.popleft()
            slot = slots[index]
            slot.credit -= 1
            slot.load += pending.requests
            slot.in_flight[token] = pending
            pending.slot = index
            pending.attempts += 1
            self.send_worker(slot.identity, backend.encode_request(token, pending.deadline, pending.frames))
            self.metrics.set_in_flight(index, len(slot.in_flight))
        self.metrics.queue_depth.set(len(self.waiting))

    def answer_error(self, token: int, error: WalredodError) -> None:
        pending = self.pending.pop(token, None)
        if pending is None:
            return
        if pending.slot is not None:
            slot = self.slots[pending.slot]
            if slot.in_flight.pop(token, None) is not None:
                slot.load -= pending.requests
                slot.owed.add(token)  # its worker still holds it, and will answer
        self.metrics.observe(error.code, self.clock() - pending.accepted, pending.records)
        pending.frontend.send(pending.client, protocol.encode_error(pending.request_id, error))
        self.released(pending)

    def _refuse_waiting_if_nothing_can_serve(self) -> None:
        """With every slot parked, nothing will ever take the waiting requests: say so now, not at their deadline."""
        if all(slot.parked for slot in self.slots.values()):
            while self.waiting:
                self.answer_error(self.waiting.popleft(), Unavailable(
                    "no worker can start (see the daemon's log and `walredod status`)"))

    # --- time -----------------------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Housekeeping, every few tens of milliseconds: exits, restarts due, hung workers, heartbeat probes,
        retiring slots, and requests whose deadline passed with their worker silent."""
        now = self.clock()
        d = self.settings.daemon
        self.reap()
        for slot in list(self.slots.values()):
            if slot.process is None:
                if not slot.parked and not slot.retiring and now >= slot.next_start:
                    self._start(slot)
                continue
            if slot.ready and now - slot.last_seen > d.heartbeat_interval * d.heartbeat_liveness:
                # Silence is allowed while the worker is inside a request it holds (ours or a direct one).
                oldest = min((p.deadline for p in slot.in_flight.values()), default=0.0)
                if now > max(oldest, slot.busy_until) + GRACE:
                    self.worker_gone(slot, "hung (missed heartbeats)")
                    continue
            if not slot.ready and now - slot.started_at > self.settings.engine.start_timeout + 10:
                self.worker_gone(slot, "hung (never ready)")
                continue
            if slot.ready and now - slot.last_seen >= d.heartbeat_interval and not slot.in_flight:
                self.send_worker(slot.identity, backend.encode_heartbeat_probe())
            if slot.retiring and not slot.in_flight and not slot.stop_sent and slot.identity is not None:
                self.send_worker(slot.identity, backend.encode_stop())  # it exits; reaping removes the slot
                slot.stop_sent = True
        for index in [i for i, s in self.slots.items() if s.retiring and s.process is None]:
            del self.slots[index]
        for token, pending in list(self.pending.items()):
            if now > pending.deadline + GRACE:
                self.answer_error(token, RedoTimeout(
                    f"request {pending.request_id} was not answered within its deadline"))
        self.dispatch()

    # --- stop -----------------------------------------------------------------------------------------------------

    def begin_stop(self) -> None:
        """Take no new requests; those accepted are still served."""
        self.stopping = True

    def stop(self) -> list[Process]:
        """Answer what is left as unavailable and tell every worker to stop; the processes to wait for."""
        self.stopping = True
        for token in list(self.pending):
            self.answer_error(token, Unavailable("the daemon is stopping"))
        self.waiting.clear()
        for slot in self.slots.values():
            if slot.identity is not None and slot.process is not None:
                self.send_worker(slot.identity, backend.encode_stop())
                slot.stop_sent = True
        return [slot.process for slot in self.slots.values() if slot.process is not None]

    # --- status ---------------------------------------------------------------------------------------------------

    def any_ready(self) -> bool:
        return any(slot.ready for slot in self.slots.values())

    def status_json(self) -> bytes:
        workers = [{
            "slot": s.index, "state": s.state, "pid": s.process.pid if s.process else None,
            "child_pid": s.child_pid or None, "in_flight": len(s.in_flight), "served": s.served,
            "restarts": dict(s.restarts), "child_restarts": s.child_restarts,
        } for s in self.slots.values()]
        return json.dumps({"pid": os.getpid(), "pending": len(self.pending), "waiting": len(self.waiting),
                           "stopping": self.stopping, "workers": workers}).encode()

    def directory_json(self, local: bool) -> bytes:
        """Where clients may send requests directly: each slot's endpoint, the pid of its worker, and whether it
        takes new work. A client re-sends through us whatever it had sent to a worker that is no longer listed
        with the same pid (docs/client-protocol.md). Clients that came in by tcp get no direct path: the workers'
        endpoints are ipc sockets on this machine."""
        direct = local and self.direct_base is not None
        workers = [{"slot": s.index, "pid": s.process.pid if s.process else None, "endpoint": s.direct_endpoint,
                    "local": s.local_socket, "ready": s.takes_work and s.process is not None}
                   for s in self.slots.values() if direct and s.direct_endpoint]
        return json.dumps({"direct": direct, "spill_factor": self.settings.daemon.spill_factor,
                           "workers": workers}).encode()
