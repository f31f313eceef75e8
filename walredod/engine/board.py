"""The board: a page of shared memory where a redo child publishes what its manager needs about the local data path
(docs/local-data-path.md, "The board"): the deadline of the request in progress, and counters and a latency
histogram for the metrics. The child writes it (pgext/local_server.c), the engine reads it; no system call on either
side per request.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field

BOARD_SIZE = 4096
BOARD_MAGIC = 0x57524C4200000001  # "WRLB", version 1
NUM_LATENCY_BUCKETS = 16  # 15 upper bounds, then +Inf
# Upper bounds of the latency buckets, in seconds, as the child counts them (pgext/local_server.c): from a ping-like
# 5 µs to a long history's second (Neon's redo histogram spans the same range); the daemon's metrics use them too.
LATENCY_BOUNDS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.25, 1.0)

# Word indexes (u64, native byte order).
MAGIC, BUSY_DEADLINE_NS, REQUESTS_OK, REQUESTS_REFUSED, REQUESTS_INTERNAL, CONNECTIONS_DROPPED, RECORDS, \
    CONNECTIONS_ACCEPTED, CONNECTIONS_OPEN, LATENCY_SUM_NS, LATENCY_BUCKETS = range(11)
_WORDS = LATENCY_BUCKETS + NUM_LATENCY_BUCKETS
_read_words = struct.Struct(f"={_WORDS}Q").unpack_from
_read_word = struct.Struct("=Q").unpack_from


@dataclass
class LocalCounters:
    """What the children of one engine served on the local data path, summed (dead children included)."""

    requests_ok: int = 0
    requests_refused: int = 0
    requests_internal: int = 0
    connections_dropped: int = 0
    records: int = 0
    connections_accepted: int = 0
    connections_open: int = 0
    latency_sum_ns: int = 0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * NUM_LATENCY_BUCKETS)
    deadline_kills: int = 0  # children killed for overrunning a local request's deadline

    def add(self, words: tuple, live: bool) -> None:
        self.requests_ok += words[REQUESTS_OK]
        self.requests_refused += words[REQUESTS_REFUSED]
        self.requests_internal += words[REQUESTS_INTERNAL]
        self.connections_dropped += words[CONNECTIONS_DROPPED]
        self.records += words[RECORDS]
        self.connections_accepted += words[CONNECTIONS_ACCEPTED]
        if live:
            self.connections_open += words[CONNECTIONS_OPEN]
        self.latency_sum_ns += words[LATENCY_SUM_NS]
        for i in range(NUM_LATENCY_BUCKETS):
            self.latency_buckets[i] += words[LATENCY_BUCKETS + i]


class Board:
    """One child's board: an anonymous memory file the child inherits (its descriptor is ``fd`` until the child is
    started, then closed here) and maps."""

    def __init__(self):
        self.fd = os.memfd_create("walredod-board", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, BOARD_SIZE)
        self._map = mmap.mmap(self.fd, BOARD_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)

    def handed_over(self) -> None:
        """The child has its own descriptor now; the mapping stays."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def busy_deadline_ns(self) -> int:
        """CLOCK_MONOTONIC ns by which the local request in progress must be done; 0 when none is."""
        return _read_word(self._map, BUSY_DEADLINE_NS * 8)[0]

    def words(self) -> tuple | None:
        words = _read_words(self._map)
        return words if words[MAGIC] == BOARD_MAGIC else None

    def close(self) -> None:
        self.handed_over()
        self._map.close()
