"""What the supervisor holds for its clients, and in which order it hands it on: bounded, and fair between clients.

- ``FairQueue`` keeps the requests no worker could take yet, one queue per client (its connection), and hands them
  out round-robin: a client with 12,000 requests waiting gets one turn per round like a client with one, so the
  latter waits for at most one request of each other client, not for the whole backlog.
- ``Budget`` counts each client's requests and bytes held (waiting or in flight) against the daemon's limits:
  ``daemon.max_pending`` requests and ``daemon.max_pending_bytes`` bytes in all, and at most
  ``daemon.max_pending_per_client`` requests of one client. Over a limit, a request is answered "unavailable" at
  once; nothing is buffered for it beyond the message ZeroMQ already delivered.
- ``resident_bytes`` is what the supervisor and the workers compare with ``daemon.max_memory_bytes``: ZeroMQ buffers
  a message whole before anyone sees it, so past that limit they drop their client connections.
"""

from __future__ import annotations

import collections
import ctypes
import os
from collections.abc import Callable, Hashable, Iterator


class FairQueue:
    """A deque of tokens as the supervisor uses it (``append``, ``appendleft``, ``[0]``, ``popleft``, ``len``,
    ``clear``), ordered round-robin over owners: ``owner_of(token)`` (called when a token is added) names the
    client it belongs to. Within one owner, order is kept (``appendleft`` puts a token first: a request re-sent
    after its worker died goes before that client's newer ones)."""

    def __init__(self, owner_of: Callable[[int], Hashable]):
        self._owner_of = owner_of
        self._queues: dict[Hashable, collections.deque[int]] = {}
        self._turns: collections.deque[Hashable] = collections.deque()  # owners with tokens, next turn first
        self._count = 0

    def _queue(self, token: int, first: bool) -> collections.deque[int]:
        owner = self._owner_of(token)
        queue = self._queues.get(owner)
        if queue is None:
            queue = self._queues[owner] = collections.deque()
            if first:
                self._turns.appendleft(owner)
            else:
                self._turns.append(owner)
        return queue

    def append(self, token: int) -> None:
        self._queue(token, first=False).append(token)
        self._count += 1

    def appendleft(self, token: int) -> None:
        """First in line: for its owner, and its owner's turn comes next."""
        queue = self._queue(token, first=True)
        queue.appendleft(token)
        owner = self._owner_of(token)
        if self._turns[0] != owner:
            self._turns.remove(owner)
            self._turns.appendleft(owner)
        self._count += 1

    def __getitem__(self, index: int) -> int:
        if index != 0 or not self._count:
            raise IndexError("only the next token can be looked at")
        return self._queues[self._turns[0]][0]

    def popleft(self) -> int:
        """The next token; its owner's turn passes to the next owner."""
        if not self._count:
            raise IndexError("pop from an empty FairQueue")
        owner = self._turns.popleft()
        queue = self._queues[owner]
        token = queue.popleft()
        if queue:
            self._turns.append(owner)
        else:
            del self._queues[owner]
        self._count -= 1
        return token

    def clear(self) -> None:
        self._queues.clear()
        self._turns.clear()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[int]:
        """Every token, in no promised order."""
        for queue in self._queues.values():
            yield from queue

    def owners(self) -> int:
        return len(self._queues)


class Budget:
    """Requests and bytes held, in all and per client; ``refusal`` says why one more would be too much."""

    def __init__(self, max_requests: int, max_bytes: int, max_per_client: int):
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.max_per_client = max_per_client
        self.requests = 0
        self.bytes = 0
        self._per_client: collections.Counter = collections.Counter()

    def refusal(self, client: Hashable, size: int) -> tuple[str, str] | None:
        """None when one more request of ``size`` bytes fits; else (the setting it would exceed, why in words)."""
        if self.requests >= self.max_requests:
            return "max_pending", f"{self.requests} requests are held already; try again later"
        if self.bytes + size > self.max_bytes:
            return "max_pending_bytes", (f"{self.bytes} bytes of requests are held already and this one has "
                                         f"{size}; try again later")
        if self._per_client[client] >= self.max_per_client:
            return "max_pending_per_client", (f"this client has {self._per_client[client]} requests held already; "
                                              "wait for their replies")
        return None

    def take(self, client: Hashable, size: int) -> None:
        self.requests += 1
        self.bytes += size
        self._per_client[client] += 1

    def give_back(self, client: Hashable, size: int) -> None:
        self.requests -= 1
        self.bytes -= size
        left = self._per_client[client] - 1
        if left > 0:
            self._per_client[client] = left
        else:
            del self._per_client[client]

    def clients(self) -> int:
        return len(self._per_client)


# --- resident memory (daemon.max_memory_bytes) ---------------------------------------------------------------------

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident memory (from /proc/self/statm: a few microseconds)."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE_SIZE


def release_free_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps it otherwise, and our resident size with it)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
