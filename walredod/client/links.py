"""How a client reaches the supervisor and the workers: its connections, one per endpoint, for both shells.

Connections are set up in one place (``connect_dealer``), so that what every connection needs (socket options,
security) is added once. A *link* carries client-protocol messages (lists of frames, delimiter first) to one
destination and hands back the replies it reads:

- sync links: ``send(frames)``, ``pollable`` (what zmq.Poller waits on: a ZeroMQ socket or a file descriptor) and
  ``drain()`` (every reply already there, without blocking);
- async links: ``send(frames)`` (never blocks the event loop) and ``start(on_reply)`` (a reader task that feeds
  each reply to ``on_reply``).

``Links`` / ``AsyncLinks`` hold one client's links: the supervisor's, and one per worker, made by
``open_link(worker)`` when a request first goes there and kept by the worker's endpoint (a slot keeps its endpoint
across restarts; a ZeroMQ DEALER reconnects by itself). This is the seam for another transport: ``open_link``
reads the worker's directory entry (``DirectWorker.listing``) and returns the link that reaches it best, and
``link.serves(worker)`` says whether a cached link still reaches the worker now listed there (a link to one
process, not to an endpoint, answers False for a new pid, and is replaced). The routing core
(walredod.client.core) is not touched by a new transport.

The local data path is such a transport (walredod.client.local_link, docs/local-data-path.md): a worker whose entry
lists a ``local`` socket gets a link that carries relation pages over it, straight to the slot's redo child, and
the rest over the worker's ZeroMQ endpoint. Such a link takes whole flights (``send_flight(flight, now)``: it
encodes the requests in its own format) and hands back, besides ZeroMQ replies, decoded answers and flights to
re-send through the supervisor; ``Links.send`` and the shells' ``apply_reply`` deal with both kinds of link.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

import zmq
import zmq.asyncio

from walredod import protocol
from walredod.client.directory import DirectWorker
from walredod.client.local_link import AsyncLocalLink, LocalLink

log = logging.getLogger(__name__)
_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: flag enums cost microseconds per call
_POLLIN = int(zmq.POLLIN)


@dataclass(frozen=True)
class CurveKeys:
    """What a client needs for a daemon's CURVE tcp endpoint (docs/client-protocol.md, "Access"): the daemon's
    public key, and this client's key pair (its public key must be in the daemon's ``daemon.curve_client_keys``)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_public_key_file: str | os.PathLike, secret_key_file: str | os.PathLike) -> CurveKeys:
        """From ``walredod keygen`` files: the daemon's ``.key`` and this client's ``.key_secret``."""
        import zmq.auth

        server_public, _ = zmq.auth.load_certificate(str(server_public_key_file))
        public, secret = zmq.auth.load_certificate(str(secret_key_file))
        if not secret:
            raise ValueError(f"{secret_key_file} holds no secret key (the .key_secret file of `walredod keygen`)")
        return cls(server_public, public, secret)


def connect_dealer(context: zmq.Context, endpoint: str, curve: CurveKeys | None = None) -> zmq.Socket:
    """A DEALER connected to ``endpoint``: every client connection, to the supervisor or a worker, is made here."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)  # replies are never dropped on our side
    if curve is not None:
        sock.curve_serverkey = curve.server_public
        sock.curve_publickey = curve.public
        sock.curve_secretkey = curve.secret
    sock.connect(endpoint)
    return sock


def direct_path_reachable(endpoint: str) -> bool:
    """Whether a client of ``endpoint`` can reach the workers' own endpoints: they are ipc://, on this machine."""
    return endpoint.startswith("ipc://")


# --- sync ---------------------------------------------------------------------------------------------------------

class ZmqLink:
    """A DEALER to one endpoint."""

    __slots__ = ("endpoint", "socket", "pollables", "registered")
    pollables_changed = False

    def __init__(self, context: zmq.Context, endpoint: str, curve: CurveKeys | None = None):
        self.endpoint = endpoint
        self.socket = connect_dealer(context, endpoint, curve)
        self.pollables = (self.socket,)

    def serves(self, worker: DirectWorker) -> bool:
        return worker.endpoint == self.endpoint

    def send(self, frames: list) -> None:
        protocol.send_frames(self.socket, frames)

    def drain(self, limit: int = 256) -> list[list]:
        """Every reply already waiting (at most ``limit``), without blocking."""
        recv = self.socket.recv_multipart
        replies = []
        for _ in range(limit):
            try:
                replies.append(recv(_NOBLOCK))
            except zmq.Again:
                break
        return replies

    def close(self) -> None:
        self.socket.close(linger=0)


def open_link(context: zmq.Context, worker: DirectWorker, local: bool = True):
    """The link to a listed worker: its slot's local socket (with its ZeroMQ endpoint for the rest) when the
    directory lists one and ``local`` allows, else its ZeroMQ endpoint."""
    if local and worker.listing.get("local"):
        return LocalLink(ZmqLink(context, worker.endpoint), worker)
    return ZmqLink(context, worker.endpoint)


class Links:
    """A sync client's links: the supervisor's and the workers', and waiting on all of them at once."""

    def __init__(self, context: zmq.Context, endpoint: str, local: bool = True, curve: CurveKeys | None = None):
        self._context = context
        self._endpoint = endpoint
        self._local = local  # the local data path, where the directory offers it
        self._curve = curve
        self._workers: dict[str, ZmqLink] = {}  # by the worker's endpoint
        self._eventful: set = set()  # links with events to hand back before any wait
        self._poller = zmq.Poller()
        self._by_pollable: dict = {}
        self.supervisor = self._add(ZmqLink(context, endpoint, curve))

    def _add(self, link):
        for pollable in link.pollables:
            self._poller.register(pollable, _POLLIN)
            self._by_pollable[pollable] = link
        link.registered = link.pollables
        return link

    def _remove(self, link) -> None:
        self._forget_pollables(link)
        link.close()

    def _forget_pollables(self, link) -> None:
        for pollable in link.registered:
            self._poller.unregister(pollable)
            del self._by_pollable[pollable]

    def refresh(self, link) -> None:
        """A link whose connections changed (a local connection lost or made) is polled on its new ones."""
        if link.pollables_changed:
            link.pollables_changed = False
            self._forget_pollables(link)
            self._add(link)

    def to(self, worker: DirectWorker | None):
        """The link to a worker (None: the supervisor), opened on first use."""
        if worker is None:
            return self.supervisor
        link = self._workers.get(worker.endpoint)
        if link is None or not link.serves(worker):
            if link is not None:
                self._remove(link)
            link = self._workers[worker.endpoint] = self._add(open_link(self._context, worker, self._local))
        return link

    def send(self, flight, now: float) -> None:
        """A flight to its destination (a worker, or the supervisor when it has none)."""
        link = self.to(flight.worker)
        if link.__class__ is LocalLink:
            link.send_flight(flight, now)
            self.refresh(link)
            if link.has_events:
                self._eventful.add(link)
        else:
            link.send(flight.frames)

    def wait(self, timeout: float) -> list[list]:
        """The replies that arrive within ``timeout`` seconds, from every link (none when time runs out)."""
        if self._eventful:  # what a link learned while sending, at once
            links, self._eventful = self._eventful, set()
            replies = [reply for link in links for reply in link.drain()]
            for link in links:
                self.refresh(link)
            return replies
        ready = self._poller.poll(timeout * 1000)
        if not ready:
            return []
        by_pollable = self._by_pollable
        if len(ready) == 1:
            link = by_pollable[ready[0][0]]
            replies = link.drain()
            self.refresh(link)
            return replies
        links = {by_pollable[pollable] for pollable, _event in ready}
        replies = [reply for link in links for reply in link.drain()]
        for link in links:
            self.refresh(link)
        return replies

    def reset(self) -> None:
        """Close every link and open the supervisor's again: replies still under way are lost, not read later, and
        messages queued for a peer that is gone are dropped."""
        self.close()
        self._poller = zmq.Poller()
        self.supervisor = self._add(ZmqLink(self._context, self._endpoint, self._curve))

    def close(self) -> None:
        self._eventful.clear()
        for link in set(self._by_pollable.values()):
            self._remove(link)
        self._workers.clear()


# --- asyncio ------------------------------------------------------------------------------------------------------

class AsyncZmqLink:
    """A DEALER to one endpoint, for the asyncio client: sends never block the loop, a task reads the replies."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str, curve: CurveKeys | None = None):
        self.endpoint = endpoint
        self.socket = connect_dealer(context, endpoint, curve)
        self._reader = None

    def serves(self, worker: DirectWorker) -> bool:
        return worker.endpoint == self.endpoint

    def send(self, frames: list) -> None:
        sent = self.socket.send_multipart(frames)  # sent at once unless the socket is full; queued in order then
        if not sent.done():
            sent.add_done_callback(_log_send_failure)

    def start(self, on_reply) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read(on_reply))

    async def _read(self, on_reply) -> None:
        recv = self.socket.recv_multipart
        while True:
            frames = await recv()
            try:
                on_reply(frames)
            except Exception:  # a malformed reply: it answers nothing; every request still gets its timeout
                log.exception("reply from %s dropped", self.endpoint)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.socket.close(linger=0)


def _log_send_failure(future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("a message was not sent: %s (its requests will time out or be re-sent)", future.exception())


def open_async_link(context: zmq.asyncio.Context, worker: DirectWorker, local: bool = True):
    if local and worker.listing.get("local"):
        return AsyncLocalLink(AsyncZmqLink(context, worker.endpoint), worker)
    return AsyncZmqLink(context, worker.endpoint)


class AsyncLinks:
    """An asyncio client's links; each reads its replies into ``on_reply``."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str, on_reply, local: bool = True,
                 curve: CurveKeys | None = None):
        self._context = context
        self._on_reply = on_reply
        self._local = local
        self._workers: dict[str, AsyncZmqLink] = {}
        self.supervisor = AsyncZmqLink(context, endpoint, curve)

    def to(self, worker: DirectWorker | None):
        if worker is None:
            link = self.supervisor
        else:
            link = self._workers.get(worker.endpoint)
            if link is None or not link.serves(worker):
                if link is not None:
                    link.close()
                link = self._workers[worker.endpoint] = open_async_link(self._context, worker, self._local)
        link.start(self._on_reply)
        return link

    def send(self, flight, now: float) -> None:
        link = self.to(flight.worker)
        if link.__class__ is AsyncLocalLink:
            link.send_flight(flight, now)
        else:
            link.send(flight.frames)

    def close(self) -> None:
        for link in (self.supervisor, *self._workers.values()):
            link.close()
        self._workers.clear()
