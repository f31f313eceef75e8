"""Which worker gets a request: rendezvous hashing by relation, with bounded loads.

Every (relation, worker slot) pair gets a pseudo-random weight; a relation goes to its highest-weight slot, so it
stays on the same warm worker across restarts (slots are numbered, pids are not) and only the relations of a slot
that comes or goes move. To keep one hot relation from overloading its worker while others idle (consistent hashing
with bounded loads, Mirrokni, Thorup and Zadimoghaddam), a slot already holding its share of the load is passed over
for the next-ranked one: load is counted in requests (each request of a batch counts), and the average includes
what is being placed (docs/client-protocol.md, "Which worker").
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Sequence

_key_bytes = struct.Struct(">IIII").pack


def rank_slots(key: tuple[int, ...], slots: Sequence[int]) -> list[int]:
    """``slots`` from most to least preferred for ``key``."""
    weights = []
    for slot in slots:
        digest = hashlib.blake2b(_key_bytes(*key[:3], slot), digest_size=8).digest()
        weights.append((digest, slot))
    weights.sort(reverse=True)
    return [slot for _, slot in weights]


class Router:
    """Picks a slot for each request key from the slots that can take work now."""

    def __init__(self, spill_factor: float):
        self.spill_factor = spill_factor
        self._ranking_cache: dict[tuple, list[int]] = {}
        self._cache_for: tuple[int, ...] = ()

    def choose(self, key: tuple[int, ...], slots: Sequence[int], load: Callable[[int], int],
               can_take: Callable[[int], bool], weight: int = 1) -> int | None:
        """The best slot for ``key`` among ``slots`` that ``can_take`` work and are below the load bound
        ``max(1, ceil((1 + spill_factor) x (total load + weight) / slots))``; when every slot that can take work is
        at or over it, the best-ranked of those. ``weight``: the requests being placed (a batch's size)."""
        if not slots:
            return None
        slots_key = tuple(slots)
        if slots_key != self._cache_for:
            self._ranking_cache.clear()
            self._cache_for = slots_key
        ranking = self._ranking_cache.get(key)
        if ranking is None:
            ranking = rank_slots(key, slots)
            if len(self._ranking_cache) > 100_000:
                self._ranking_cache.clear()
            self._ranking_cache[key] = ranking
        total = sum(map(load, slots)) + weight
        bound = max(1, math.ceil((1 + self.spill_factor) * total / len(slots)))
        fallback = None
        for slot in ranking:
            if not can_take(slot):
                continue
            if load(slot) < bound:
                return slot
            if fallback is None:
                fallback = slot
        return fallback
