"""A client's view of the daemon's workers, for the direct data path (docs/client-protocol.md, "Direct data path").

The supervisor answers a directory request with each worker's slot, pid and endpoint. A client sends a request
straight to the worker the supervisor's own rendezvous ranking would pick for its relation, with the same bounded
load over what this client has in flight, so one relation still warms one worker. A request whose worker is no
longer listed under the same pid is the client's to re-send through the supervisor (walredod.client.core).

No sockets here: a listed worker carries its directory entry as given (``listing``), so that the transport that
reaches it (walredod.client.links) can read its own fields, and the client's shell owns the connections.
"""

from __future__ import annotations

import json
import math

from walredod.daemon.routing import Router

DIRECT_CHECK_INTERVAL = 0.5  # seconds a direct request waits before the client asks whether its worker lives
DIRECTORY_MAX_AGE = 5.0  # seconds before a directory is asked for again (new workers after a reload, say)
DEFAULT_SPILL_FACTOR = 0.25  # until the directory gives the daemon's daemon.spill_factor


class DirectWorker:
    """One worker as listed: a slot's worker under one pid. A new pid in the slot is a new DirectWorker."""

    __slots__ = ("slot", "pid", "endpoint", "listing", "load")

    def __init__(self, slot: int, pid: int, endpoint: str, listing: dict):
        self.slot = slot
        self.pid = pid
        self.endpoint = endpoint  # its ZeroMQ endpoint; other transports read theirs from ``listing``
        self.listing = listing  # the directory's entry for it, every field as the supervisor sent it
        self.load = 0  # this client's requests in flight on it

    def __repr__(self) -> str:
        return f"DirectWorker(slot={self.slot}, pid={self.pid}, endpoint={self.endpoint!r}, load={self.load})"


class WorkerDirectory:
    """The workers taking new work, as the supervisor last listed them, and this client's load on each."""

    def __init__(self, spill_factor: float = DEFAULT_SPILL_FACTOR):
        self._router = Router(spill_factor)
        self._workers: dict[int, DirectWorker] = {}  # workers taking new work, by slot
        self._slots: tuple[int, ...] = ()
        self._offered = False
        self._fetched = -math.inf  # monotonic time of the last answer (or of the last failure to get one)

    @property
    def known(self) -> bool:
        """Whether the supervisor has been asked at least once (answered or not)."""
        return self._fetched != -math.inf

    def stale(self, now: float) -> bool:
        return now - self._fetched > DIRECTORY_MAX_AGE

    def usable(self) -> bool:
        return self._offered and bool(self._workers)

    def update(self, body: bytes, now: float) -> None:
        """Take the supervisor's directory (JSON; ValueError when it is not one)."""
        document = json.loads(body)
        if not isinstance(document, dict):
            raise ValueError("the directory is not a JSON object")
        self._fetched = now
        self._offered = bool(document.get("direct"))
        spill_factor = document.get("spill_factor")
        if isinstance(spill_factor, (int, float)) and spill_factor >= 0:
            self._router.spill_factor = float(spill_factor)
        workers: dict[int, DirectWorker] = {}
        for entry in document.get("workers", ()):
            if not isinstance(entry, dict):
                continue
            slot, pid, endpoint = entry.get("slot"), entry.get("pid"), entry.get("endpoint")
            if not (entry.get("ready") and isinstance(slot, int) and pid and isinstance(endpoint, str)):
                continue
            known = self._workers.get(slot)
            if known is not None and known.pid == pid and known.endpoint == endpoint:
                known.listing = entry  # the same worker (other fields may change): it keeps this client's load
                workers[slot] = known
            else:
                workers[slot] = DirectWorker(slot, pid, endpoint, entry)
        self._workers = workers
        self._slots = tuple(sorted(workers))

    def clear(self, now: float) -> None:
        """The supervisor did not answer: send nothing directly until the directory is due again."""
        self._fetched = now
        self._offered = False
        self._workers = {}
        self._slots = ()

    def forget(self) -> None:
        """Ask the supervisor again before the next request (after a timeout, say)."""
        self.clear(-math.inf)

    def choose(self, key: tuple) -> DirectWorker | None:
        """The worker for a request with routing key ``key``, counted as one more request on it; None when the
        supervisor's ranking has no worker to offer (send through the supervisor)."""
        slot = self._router.choose(key, self._slots, self._load, self._workers.__contains__)
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

    def workers(self) -> list[DirectWorker]:
        return list(self._workers.values())
