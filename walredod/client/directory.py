"""A client's view of the daemon's workers, for the direct data path.

The supervisor answers a directory request with each worker's slot, pid and endpoint. A client sends a request
straight to the worker the supervisor's own rendezvous ranking would pick for its relation, with the same bounded
load over what this client has in flight, so one relation still warms one worker. The directory is refreshed now
and then, and whenever replies are slow: a request whose worker is no longer listed under the same pid is the
client's to re-send through the supervisor (walredod.client).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import zmq

from walredod.daemon.routing import Router

DIRECT_CHECK_INTERVAL = 0.5  # seconds without a reply, direct requests in flight, before asking whether workers live
DIRECTORY_MAX_AGE = 5.0  # seconds before a directory is asked for again (new workers after a reload, say)
DEFAULT_SPILL_FACTOR = 0.25  # until the directory gives the daemon's daemon.spill_factor


@dataclass(eq=False)
class DirectWorker:
    """One worker as listed: a slot's worker under one pid. A new pid in the slot is a new DirectWorker."""

    slot: int
    pid: int
    endpoint: str
    socket: zmq.Socket
    load: int = 0  # this client's requests in flight on it


def _any_worker(_slot: int) -> bool:
    return True


class WorkerDirectory:
    def __init__(self, context: zmq.Context, spill_factor: float = DEFAULT_SPILL_FACTOR):
        self._context = context
        self._router = Router(spill_factor)
        self._workers: dict[int, DirectWorker] = {}  # workers taking new work, by slot
        self._slots: list[int] = []
        self._sockets: dict[str, zmq.Socket] = {}  # by endpoint: a slot keeps its endpoint across restarts
        self._socket_list: list[zmq.Socket] = []
        self._offered = False
        self._fetched = -math.inf

    def stale(self) -> bool:
        return time.monotonic() - self._fetched > DIRECTORY_MAX_AGE

    def usable(self) -> bool:
        return self._offered and bool(self._workers)

    def update(self, body: bytes) -> None:
        """Take the supervisor's directory (JSON; ValueError when it is not one)."""
        document = json.loads(body)
        self._fetched = time.monotonic()
        self._offered = bool(document.get("direct"))
        spill_factor = document.get("spill_factor")
        if isinstance(spill_factor, (int, float)) and spill_factor >= 0:
            self._router.spill_factor = float(spill_factor)
        workers: dict[int, DirectWorker] = {}
        for entry in document.get("workers", []):
            slot, pid, endpoint = entry.get("slot"), entry.get("pid"), entry.get("endpoint")
            if not (entry.get("ready") and isinstance(slot, int) and pid and isinstance(endpoint, str)):
                continue
            known = self._workers.get(slot)
            if known is not None and known.pid == pid and known.endpoint == endpoint:
                workers[slot] = known
            else:
                workers[slot] = DirectWorker(slot, pid, endpoint, self._socket_for(endpoint))
        self._workers = workers
        self._slots = sorted(workers)

    def clear(self) -> None:
        """The supervisor did not answer: send nothing directly until the directory is due again."""
        self._fetched = time.monotonic()
        self._offered = False
        self._workers = {}
        self._slots = []

    def choose(self, key: tuple) -> DirectWorker | None:
        slot = self._router.choose(key, self._slots, self._load, _any_worker)
        if slot is None:
            return None
        worker = self._workers[slot]
        worker.load += 1
        return worker

    def _load(self, slot: int) -> int:
        return self._workers[slot].load

    @staticmethod
    def release(worker: DirectWorker, count: int = 1) -> None:
        worker.load -= count

    def still_serving(self, worker: DirectWorker) -> bool:
        """Whether the directory still lists this worker (same slot, same pid) as taking work."""
        return self._workers.get(worker.slot) is worker

    def sockets_in_use(self) -> list[zmq.Socket]:
        """Every direct socket: replies may still come from a worker that has since been re-listed."""
        return self._socket_list

    def reset_sockets(self) -> None:
        """Close every direct socket (after a timeout: replies still under way are to be lost, not read later)."""
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets.clear()
        self._socket_list = []
        self._workers = {}
        self._slots = []
        self._fetched = -math.inf

    close = reset_sockets

    def _socket_for(self, endpoint: str) -> zmq.Socket:
        sock = self._sockets.get(endpoint)
        if sock is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.connect(endpoint)
            self._sockets[endpoint] = sock
            self._socket_list = list(self._sockets.values())
        return sock
