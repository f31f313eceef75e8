"""The client's routing and re-send logic, without sockets or a clock: one core under the sync and asyncio clients.

The core takes events and answers with what to do; the client shells (walredod.client.client) own the sockets, the
clock and the waiting. Events, each with the shell's ``now`` (time.monotonic()):

- ``submit(call)``: a redo or redo_many call's requests (checked here: nothing is sent when one is malformed);
- ``on_reply(frames)``: a reply message arrived, from any endpoint (``on_answers`` for a transport that decodes
  replies itself); message ids, not endpoints, say which flight it answers;
- ``directory_arrived(body, now)`` / ``directory_failed(now)``: the supervisor's answer to a directory request;
- ``on_time(now)``: time has passed (the shell calls it at ``wakeup(now)`` at the latest).

Actions:

- ``take_sends(now)``: the messages to send now, as flights: ``flight.frames`` to ``flight.worker`` (a
  walredod.client.directory.DirectWorker), or to the supervisor when it is None. New requests are routed here, a
  window of them at most in flight, several for one worker batched into one message;
- ``directory_due(now)``: True when the shell is to ask the supervisor for the directory, and then answer with
  ``directory_arrived`` or ``directory_failed``;
- deliveries: ``on_reply`` and ``on_time`` return the calls they finished; a call's results fill in as they come.

The rules, as docs/client-protocol.md gives them for the direct data path: a request goes to the worker the
supervisor's rendezvous ranking picks for its routing key, spilling over by the same bounded-load rule
(walredod.daemon.routing.Router), counting this client's requests in flight; up to ``batch_size`` requests for one
worker travel as one batch message (through the supervisor, requests travel alone, so that it spreads them). Once
a direct request has waited DIRECT_CHECK_INTERVAL, the core asks for the directory again (at most once per
interval); whatever was in flight on a worker that is no longer listed as ready under the same pid is re-sent
through the supervisor under the same message id, and the first reply wins (a later one finds no flight and is
dropped). When the supervisor does not answer a directory request, everything goes through it until the directory
is due again. A flight not answered ``timeout + TRANSPORT_MARGIN`` after it was sent (or re-sent) is given up:
its requests get RedoTimeout.

The transport seam: the core never sees a connection. A flight names its destination (a worker as listed, or the
supervisor) and carries the request in the client protocol's frames; the shell picks the transport that reaches
the destination (walredod.client.links: today a ZeroMQ DEALER per endpoint; a worker's directory entry, kept whole
in ``DirectWorker.listing``, may offer others) and feeds every reply back through ``on_reply`` or ``on_answers``.
A transport that cannot carry a direct message hands it back with ``resend_through_supervisor``.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import deque
from collections.abc import Sequence

from walredod import protocol
from walredod.client.directory import DIRECT_CHECK_INTERVAL, DirectWorker, WorkerDirectory
from walredod.errors import InvalidRequest, RedoTimeout, WalredodError
from walredod.objects import check_base_image, check_tag
from walredod.types import BufferTag, WalRecord

PIPELINE_WINDOW = 64  # requests of one client in flight at most
BATCH_SIZE = 16  # requests for one worker in one message, on the direct data path
TRANSPORT_MARGIN = 2.5  # seconds past a timeout: the supervisor answers `timeout` for a silent worker 2 s late

RedoArgs = tuple[BufferTag, int, bytes | None, Sequence[WalRecord]]

_INTERNAL = protocol.STATUS_CODES["internal"]


class Call:
    """One redo or redo_many call: its requests and, as they come, their results (a page, None for an object that
    does not exist, or the request's error)."""

    __slots__ = ("requests", "results", "unanswered", "timeout", "timeout_ms", "position", "timed_out", "waiter")

    def __init__(self, requests: Sequence[RedoArgs], timeout: float):
        self.requests = requests
        self.results: list = [None] * len(requests)
        self.unanswered = len(requests)
        self.timeout = timeout
        self.timeout_ms = max(1, int(timeout * 1000))
        self.position = 0  # requests before it have been sent
        self.timed_out = False  # some request was given up on
        self.waiter = None  # the shell's: what to wake when the call is done

    @property
    def done(self) -> bool:
        return self.unanswered == 0


class Flight:
    """A message in flight, one request or a batch (more than one member): each request's call and place in it, by
    request id; its frames; where it went (a worker, or None: the supervisor); when it is given up on."""

    __slots__ = ("message_id", "_frames", "worker", "members", "timeout", "sent_at", "deadline")

    def __init__(self, message_id: int, worker: DirectWorker | None, members: dict, timeout: float,
                 sent_at: float):
        self.message_id = message_id
        self._frames: list | None = None
        self.worker = worker
        self.members: dict[int, tuple[Call, int]] = members
        self.timeout = timeout
        self.sent_at = sent_at
        self.deadline = sent_at + timeout + TRANSPORT_MARGIN

    @property
    def frames(self) -> list:
        """The message in the client protocol's frames, encoded when first asked for: a flight the local data path
        carries (in its own encoding) needs them only if it is re-sent over ZeroMQ."""
        if self._frames is None:
            encode = protocol.encode_redo_request
            requests = [encode(request_id, *call.requests[index], call.timeout_ms)
                        for request_id, (call, index) in self.members.items()]
            self._frames = (requests[0] if len(requests) == 1 else
                            protocol.encode_batch(self.message_id, requests, max(1, int(self.timeout * 1000))))
        return self._frames


def check_request(tag, base_image: bytes | None) -> None:
    """Raise InvalidRequest for a request the daemon would refuse for its tag or base image."""
    check_tag(tag)
    check_base_image(tag, base_image)


def decode_answers(frames: list) -> tuple[int, list[tuple[int, bytes | WalredodError]]]:
    """(message id, [(request id, result)]) of a reply to a request or to a batch. A batch refused as a whole
    gives one answer under the batch's own id. Raises InvalidRequest for a malformed reply."""
    if len(frames) == 3:
        request_id, result = decode_result(frames)
        return request_id, [(request_id, result)]
    message_id = protocol.decode_reply(frames[:3])[0]
    return message_id, [(request_id, body if status == protocol.STATUS_OK else protocol.error_for(status, body))
                        for request_id, status, body in protocol.decode_batch_reply(frames)]


def decode_result(frames: list) -> tuple[int, bytes | WalredodError]:
    """(request id, page or error) of a plain reply."""
    request_id, status, body = protocol.decode_reply(frames)
    if status == protocol.STATUS_OK:
        return request_id, body
    return request_id, protocol.error_for(status, body)


class ClientCore:
    """One client's requests in flight, where they went, and what to do next (see the module docstring)."""

    def __init__(self, endpoint: str, direct: bool, window: int = PIPELINE_WINDOW, batch_size: int = BATCH_SIZE,
                 first_id: int | None = None):
        self.endpoint = endpoint  # the supervisor's, for messages
        self.window = window
        self.batch_size = batch_size
        self.directory: WorkerDirectory | None = WorkerDirectory() if direct else None
        if first_id is None:
            first_id = int.from_bytes(os.urandom(4), "big") << 16  # ids of different clients rarely meet
        self._ids = itertools.count(first_id)
        self._queue: deque[Call] = deque()  # calls with requests not sent yet
        self._flights: dict[int, Flight] = {}  # by message id: a request's id, or a batch's
        self._outbox: list[Flight] = []
        self.in_flight = 0  # requests, not messages
        self._directory_asked = False
        self._next_check = -math.inf  # not before: a directory request to check direct requests' workers
        self._expiry_due = math.inf  # at or before the earliest flight's deadline
        self._check_due = math.inf  # at or before a direct flight will have waited DIRECT_CHECK_INTERVAL

    # --- events -------------------------------------------------------------------------------------------------

    def next_id(self) -> int:
        """A fresh message id (the shell's control requests take theirs here too)."""
        return next(self._ids)

    def submit(self, call: Call) -> None:
        """Queue a call's requests, every one checked first (InvalidRequest: nothing of the call is queued)."""
        for tag, _lsn, base, _records in call.requests:
            check_request(tag, base)
        if call.requests:
            self._queue.append(call)

    def on_reply(self, frames: list) -> Sequence[Call]:
        """A reply message (delimiter first), from whichever endpoint; the calls it finished."""
        message_id, answers = decode_answers(frames)
        return self.on_answers(message_id, answers)

    def on_answers(self, message_id: int, answers: list[tuple[int, bytes | WalredodError]]) -> Sequence[Call]:
        """A reply already decoded; the calls it finished. A reply to no flight in the air (answered already, or
        given up on) is dropped."""
        flight = self._flights.pop(message_id, None)
        if flight is None:
            return ()
        members = flight.members
        count = len(members)
        self.in_flight -= count
        if flight.worker is not None:
            flight.worker.load -= count
        finished = []
        for request_id, result in answers:
            member = members.pop(request_id, None)
            if member is not None:
                _deliver(member, result, finished)
            elif request_id == message_id:  # a batch refused whole: every request's answer
                for member in members.values():
                    _deliver(member, result, finished)
                members.clear()
        for request_id, member in members.items():  # a daemon that skipped one: never leave a caller waiting
            _deliver(member, protocol.error_for(_INTERNAL, f"the reply to message {message_id} did not answer "
                                                           f"request {request_id}".encode()), finished)
        return finished

    def directory_arrived(self, body: bytes, now: float) -> None:
        """The supervisor's directory (a malformed one counts as no answer)."""
        self._directory_asked = False
        try:
            self.directory.update(body, now)
        except (ValueError, TypeError, AttributeError):
            self.directory.clear(now)
        self._resend_departed(now)

    def directory_failed(self, now: float, unsupported: bool = False) -> None:
        """No directory: the supervisor did not answer (everything goes its way until the directory is due again),
        or it does not know directory requests (a daemon from before the direct path: never ask again)."""
        self._directory_asked = False
        self.directory.clear(now)
        self._resend_departed(now)
        if unsupported:
            self.directory = None

    def directory_answered(self, outcome: bytes | Exception, now: float) -> None:
        """What a directory request gave: its body, or the error it ended in. ``invalid_request`` is a daemon from
        before the direct path; any other error, no answer."""
        if isinstance(outcome, InvalidRequest):
            self.directory_failed(now, unsupported=True)
        elif isinstance(outcome, Exception):
            self.directory_failed(now)
        else:
            self.directory_arrived(outcome, now)

    def on_time(self, now: float) -> Sequence[Call]:
        """Give up on flights past their deadline; the calls that finished so."""
        if now < self._expiry_due:
            return ()
        finished = []
        next_due = math.inf
        for message_id, flight in list(self._flights.items()):
            if flight.deadline > now:
                next_due = min(next_due, flight.deadline)
                continue
            del self._flights[message_id]
            count = len(flight.members)
            self.in_flight -= count
            if flight.worker is not None:
                flight.worker.load -= count
            where = flight.worker.endpoint if flight.worker is not None else self.endpoint
            for member in flight.members.values():
                member[0].timed_out = True
                _deliver(member, RedoTimeout(f"no reply from {where} within {flight.timeout:g} s"), finished)
        self._expiry_due = next_due
        return finished

    def resend_through_supervisor(self, flight: Flight, now: float) -> None:
        """A direct flight its transport could not carry: it goes to the supervisor (queued for take_sends)."""
        if flight.worker is not None and self._flights.get(flight.message_id) is flight:
            self._redirect(flight, now)

    def abandon(self) -> None:
        """Forget every request (the shell gives up on all of them); replies still under way will be dropped."""
        for flight in self._flights.values():
            if flight.worker is not None:
                flight.worker.load -= len(flight.members)
        self._flights.clear()
        self._queue.clear()
        self._outbox.clear()
        self.in_flight = 0
        self._expiry_due = self._check_due = math.inf
        self._directory_asked = False  # an answer still owed is not waited for

    def forget_directory(self) -> None:
        """Ask for the directory again before the next request is routed."""
        if self.directory is not None:
            self.directory.forget()

    # --- actions ------------------------------------------------------------------------------------------------

    def waiting_calls(self) -> set[Call]:
        """The calls with requests not answered yet."""
        calls = set(self._queue)
        for flight in self._flights.values():
            calls.update(call for call, _index in flight.members.values())
        return calls

    @property
    def busy(self) -> bool:
        return bool(self._flights or self._queue or self._outbox)

    @property
    def has_sends(self) -> bool:
        """Whether take_sends may have something (requests queued, re-sends waiting)."""
        return bool(self._queue or self._outbox)

    def directory_due(self, now: float) -> bool:
        """Whether to ask the supervisor for the directory now: it is stale and requests wait to be routed, or a
        direct request has waited DIRECT_CHECK_INTERVAL. True once per request: the shell then owes
        directory_arrived or directory_failed."""
        directory = self.directory
        if directory is None or self._directory_asked:
            return False
        if self._queue and directory.stale(now):
            self._directory_asked = True
            return True
        if now < self._check_due:
            return False
        oldest = min((f.sent_at for f in self._flights.values() if f.worker is not None), default=math.inf)
        if now >= self._next_check and now - oldest >= DIRECT_CHECK_INTERVAL:
            self._next_check = now + DIRECT_CHECK_INTERVAL
            self._check_due = max(oldest + DIRECT_CHECK_INTERVAL, self._next_check)
            self._directory_asked = True
            return True
        self._check_due = max(oldest + DIRECT_CHECK_INTERVAL, self._next_check)
        return False

    def take_sends(self, now: float) -> list[Flight]:
        """The messages to send now: re-sends, then new requests routed and batched, up to the window."""
        if self._queue and self.in_flight < self.window and not self._directory_pending():
            self._route(now)
        sends = self._outbox
        if sends:
            self._outbox = []
        return sends

    def wakeup(self, now: float) -> float:
        """Seconds until on_time (or directory_due) has something to do, at the latest."""
        due = self._expiry_due
        if self.directory is not None and self._check_due < due:
            due = max(self._check_due, self._next_check)
        return max(0.0, due - now)

    # --- inside -------------------------------------------------------------------------------------------------

    def _directory_pending(self) -> bool:
        """Requests wait for the first directory (after that, a stale one serves while a new one is asked for)."""
        return self.directory is not None and not self.directory.known

    def _route(self, now: float) -> None:
        directory = self.directory if self.directory is not None and self.directory.usable() else None
        choose = directory.choose if directory is not None else None
        routing_key, ids = protocol.routing_key, self._ids
        flights, outbox, queue = self._flights, self._outbox, self._queue
        batch_size = self.batch_size
        batches: dict[DirectWorker, Flight] = {}
        while queue and self.in_flight < self.window:
            call = queue[0]
            requests, timeout = call.requests, call.timeout
            deadline = now + timeout + TRANSPORT_MARGIN
            start = call.position
            end = min(len(requests), start + self.window - self.in_flight)
            for index in range(start, end):
                request_id = next(ids)
                worker = choose(routing_key(requests[index][0])) if choose is not None else None
                if worker is None:
                    flight = flights[request_id] = Flight(request_id, None, {request_id: (call, index)}, timeout, now)
                    outbox.append(flight)
                    continue
                batch = batches.get(worker)
                if batch is not None and batch.timeout != timeout:  # one batch, one timeout
                    self._close_batch(batches.pop(worker), now)
                    batch = None
                if batch is None:
                    batches[worker] = Flight(0, worker, {request_id: (call, index)}, timeout, now)
                else:
                    batch.members[request_id] = (call, index)
                    if len(batch.members) == batch_size:
                        self._close_batch(batches.pop(worker), now)
            self.in_flight += end - start
            call.position = end
            if end == len(requests):
                queue.popleft()
            if deadline < self._expiry_due:
                self._expiry_due = deadline
        for batch in batches.values():
            self._close_batch(batch, now)

    def _close_batch(self, flight: Flight, now: float) -> None:
        """A worker's requests as one message (a lone request as itself), in the air from now."""
        if len(flight.members) == 1:
            flight.message_id = next(iter(flight.members))
        else:
            flight.message_id = next(self._ids)
        self._flights[flight.message_id] = flight
        self._outbox.append(flight)
        if now + DIRECT_CHECK_INTERVAL < self._check_due:
            self._check_due = now + DIRECT_CHECK_INTERVAL

    def _resend_departed(self, now: float) -> None:
        directory = self.directory
        for flight in self._flights.values():
            if flight.worker is not None and not directory.still_serving(flight.worker):
                self._redirect(flight, now)

    def _redirect(self, flight: Flight, now: float) -> None:
        """To the supervisor, whole (a batch too: it hands a batch to one worker), under the same message id; the
        supervisor's own timeout runs from now."""
        flight.worker.load -= len(flight.members)
        flight.worker = None
        flight.sent_at = now
        flight.deadline = max(flight.deadline, now + flight.timeout + TRANSPORT_MARGIN)
        self._outbox.append(flight)


def _deliver(member: tuple[Call, int], result, finished: list) -> None:
    call, index = member
    if not isinstance(result, WalredodError) and len(result) == 0:
        result = None  # an empty body: the object does not exist (an ended prepared transaction, a truncated page)
    call.results[index] = result
    call.unanswered -= 1
    if call.unanswered == 0:
        finished.append(call)
