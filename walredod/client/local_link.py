"""The local data path as a link of the client shells (walredod.client.links): a worker whose directory entry lists
a local socket is reached through it for relation pages, straight to the slot's redo child; everything else for that
worker, and everything when the socket cannot be reached, takes the worker's ZeroMQ endpoint
(docs/local-data-path.md).

A link hands back, besides ZeroMQ replies (lists of frames), two kinds of events for the shell to apply to the
client core (walredod.client.core):

- ``(message id, [(request id, page or error)])``: a flight answered on the local path (a batch once every request
  of it is answered: one connection answers in order);
- a ``Flight``: a flight whose connection was lost before its deadline, to re-send through the supervisor
  (``ClientCore.resend_through_supervisor``). One whose deadline had passed is answered with RedoTimeout instead:
  a child past a request's deadline is killed by its worker.
"""

from __future__ import annotations

import time
from collections import deque

from walredod import protocol
from walredod.client import local
from walredod.errors import RedoTimeout

RETRY_INTERVAL = 1.0  # seconds before a socket that refused a connection is tried again
_OK = protocol.STATUS_OK


def _served_locally(flight) -> bool:
    """Whether the redo child serves every request of the flight (relation pages from raw records)."""
    serves = local.serves
    for call, index in flight.members.values():
        request = call.requests[index]
        if not serves(request[0], request[3]):
            return False
    return True


def _encode(flight) -> bytes:
    timeout_ms = max(1, int(flight.timeout * 1000))
    encode, parts = local.encode_redo_parts, []
    for request_id, (call, index) in flight.members.items():
        encode(parts, request_id, *call.requests[index], timeout_ms)
    return b"".join(parts)


class _Ledger:
    """What one connection owes: its flights' requests in the order sent, and the answers of batches so far."""

    def __init__(self):
        self.pending: deque = deque()  # (flight, request id)
        self.gathered: dict[int, list] = {}  # batch message id -> [(request id, result)]

    def sent(self, flight) -> None:
        for request_id in flight.members:
            self.pending.append((flight, request_id))

    def answered(self, replies: list, events: list) -> bool:
        """Match replies to the requests in order; False when one does not match (the connection is then lost)."""
        pending, gathered, error_for = self.pending, self.gathered, protocol.error_for
        for request_id, status, body in replies:
            if not pending or pending[0][1] != request_id:
                return False
            flight = pending.popleft()[0]
            result = body if status == _OK else error_for(status, body)
            if len(flight.members) == 1:
                events.append((flight.message_id, [(request_id, result)]))
                continue
            answers = gathered.setdefault(flight.message_id, [])
            answers.append((request_id, result))
            if len(answers) == len(flight.members):
                del gathered[flight.message_id]
                events.append((flight.message_id, answers))
        return True

    def lost(self, events: list, where: str) -> None:
        """The connection ended: each flight still owed is re-sent, or timed out when past its deadline."""
        now = time.monotonic()
        seen = set()
        for flight, _request_id in self.pending:
            if flight.message_id in seen:
                continue
            seen.add(flight.message_id)
            if now >= flight.sent_at + flight.timeout:
                error = RedoTimeout(f"no reply from {where} within {flight.timeout:g} s (its redo child ended)")
                answers = self.gathered.pop(flight.message_id, [])  # a batch's answers so far stand
                answered = {request_id for request_id, _result in answers}
                events.append((flight.message_id, answers + [(request_id, error) for request_id in flight.members
                                                             if request_id not in answered]))
            else:
                events.append(flight)
        self.pending.clear()
        self.gathered.clear()


class _LocalLinkBase:
    """What the sync and asyncio links share: where they go, the ledger of the connection, and how they end."""

    def __init__(self, fallback, worker):
        self.endpoint = worker.endpoint
        self.path = worker.listing.get("local")
        self.fallback = fallback
        self.connection = None
        self._ledger = _Ledger()
        self._retry_at = 0.0

    def serves(self, worker) -> bool:
        return worker.endpoint == self.endpoint and worker.listing.get("local") == self.path

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        self._ledger = _Ledger()
        self.fallback.close()


class LocalLink(_LocalLinkBase):
    """A worker's link: its slot's local socket for what the redo child serves, its ZeroMQ endpoint (``fallback``)
    for the rest. ``pollables`` changes when the connection is lost or made again (``pollables_changed``)."""

    def __init__(self, fallback, worker):
        super().__init__(fallback, worker)
        self.connection: local.LocalConnection | None = None
        self.pollables_changed = False
        self._events: list = []
        self._connect(time.monotonic())
        self.pollables_changed = False

    @property
    def has_events(self) -> bool:
        """Events wait for the next drain (a connection lost while sending)."""
        return bool(self._events)

    @property
    def pollables(self) -> tuple:
        if self.connection is None:
            return (self.fallback.socket,)
        return (self.fallback.socket, self.connection.fileno())


    def _connect(self, now: float) -> local.LocalConnection | None:
        if now < self._retry_at:
            return None
        try:
            self.connection = local.LocalConnection(self.path)
        except local.ConnectionLost:
            self._retry_at = now + RETRY_INTERVAL
            return None
        self.pollables_changed = True
        return self.connection

    def send(self, frames: list) -> None:
        """A message without a flight (the shell's own): ZeroMQ."""
        self.fallback.send(frames)

    def ready_for_round_trip(self, now: float) -> bool:
        """Whether ``round_trip`` may use the connection now: it is open (or opens) and owes no reply."""
        if self._ledger.pending or self._events:
            return False
        return (self.connection or self._connect(now)) is not None

    def round_trip(self, data: bytes, request_id: int, deadline: float) -> tuple[int, bytes]:
        """One request alone on the connection (ready_for_round_trip said so): (status, body) of its reply.
        Raises ConnectionLost when the connection ends first, TimeoutError when nothing came by ``deadline``; the
        connection is closed either way (a late reply is never read)."""
        connection = self.connection
        try:
            try:
                connection.send(data)
            except local.ConnectionLost:  # the child was gone before it could see any of it: a new connection
                self._lose()
                connection = self._connect(time.monotonic())
                if connection is None:
                    raise
                connection.send(data)
            replies = connection.read_replies(deadline)
            if not replies:
                raise TimeoutError
            if len(replies) != 1 or replies[0][0] != request_id:
                raise local.ConnectionLost(f"{self.path}: a reply to another request")
        except BaseException:
            self._lose()
            raise
        return replies[0][1], replies[0][2]

    def send_flight(self, flight, now: float) -> None:
        connection = self.connection or self._connect(now)
        if connection is None or not _served_locally(flight):
            self.fallback.send(flight.frames)
            return
        data = _encode(flight)
        try:
            connection.send(data)
        except local.ConnectionLost:
            # The connection had ended (its child died since the last request): what it held follows the re-send
            # rule, but no child saw any of this flight, so a new connection (to the child now serving) takes it.
            self._lose()
            connection = self._connect(now)
            if connection is None:
                self.fallback.send(flight.frames)
                return
            self._ledger.sent(flight)
            try:
                connection.send(data)
            except local.ConnectionLost:
                self._lose()
            return
        self._ledger.sent(flight)

    def drain(self, limit: int = 256) -> list:
        events = self._events
        self._events = []
        events += self.fallback.drain(limit)
        connection = self.connection
        if connection is not None:
            try:
                replies = connection.receive_now()
            except local.ConnectionLost:
                self._lose(events)
            else:
                if replies and not self._ledger.answered(replies, events):
                    self._lose(events)
        return events

    def _lose(self, events: list | None = None) -> None:
        self._ledger.lost(self._events if events is None else events, self.path)
        if self.connection is not None:
            self.connection.close()
            self.connection = None
            self.pollables_changed = True


class AsyncLocalLink(_LocalLinkBase):
    """The asyncio client's LocalLink: replies and lost connections come as events through ``on_reply`` (the
    callback ``start`` was given), from the event loop's callbacks."""

    def __init__(self, fallback, worker):
        super().__init__(fallback, worker)
        self.connection: local.AsyncLocalConnection | None = None
        self._on_reply = None

    def start(self, on_reply) -> None:
        self._on_reply = on_reply
        self.fallback.start(on_reply)

    def send(self, frames: list) -> None:
        self.fallback.send(frames)

    def send_flight(self, flight, now: float) -> None:
        connection = self.connection or self._connect(now)
        if connection is None or not _served_locally(flight):
            self.fallback.send(flight.frames)
            return
        self._ledger.sent(flight)
        try:
            connection.send(_encode(flight))
        except local.ConnectionLost as exc:
            self._lost(str(exc))

    def _connect(self, now: float):
        import asyncio

        if now < self._retry_at:
            return None
        ledger = self._ledger = _Ledger()
        try:
            self.connection = local.AsyncLocalConnection(
                self.path, asyncio.get_running_loop(),
                lambda replies: self._replies(ledger, replies), lambda why: self._lost(why, ledger))
        except local.ConnectionLost:
            self._retry_at = now + RETRY_INTERVAL
            return None
        return self.connection

    def _replies(self, ledger: _Ledger, replies: list) -> None:
        events: list = []
        if not ledger.answered(replies, events):
            if self.connection is not None:
                self.connection.close()
            self._lost("a reply out of order", ledger, events)
            return
        self._emit(events)

    def _lost(self, _why: str, ledger: _Ledger | None = None, events: list | None = None) -> None:
        ledger = ledger or self._ledger
        events = events if events is not None else []
        ledger.lost(events, self.path)
        if ledger is self._ledger:
            self.connection = None
        self._emit(events)

    def _emit(self, events: list) -> None:
        on_reply = self._on_reply
        for event in events:
            on_reply(event)

