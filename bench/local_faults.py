"""Faults on the local data path, for bench/daemon_study.py: refusable bad requests interleaved with good ones, and
redo children killed under pipelining clients (docs/local-data-path.md, targets of the local-path issue).

Both drive a running daemon through RedoClient (which takes the local path by default on an ipc:// endpoint).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import statistics
import threading
import time
from pathlib import Path

from walredod.client import RedoClient
from walredod.errors import InvalidRequest
from walredod.types import WalRecord


def corrupt(records: list) -> list:
    """The same records with one bit of the last one's body flipped: its CRC fails, the child refuses it."""
    last = records[-1]
    data = bytearray(last[1])
    data[-1] ^= 0x01
    return [*records[:-1], WalRecord(last[0], bytes(data))]


def children_of(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found |= {int(child) for child in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


def bad_requests_interleaved(endpoint: str, requests: list, bad_count: int = 1000) -> dict:
    """Good requests, each timed, in pairs: one right after a good request ("alone"), one right after a refusable
    bad one (a flipped CRC bit; "interleaved"), ``bad_count`` pairs. Alternating keeps both samples under the same
    conditions (an unpinned client's placement flips during a run). Returns both p50s, the bad requests refused, and
    the redo children restarted meanwhile (none is the target)."""
    with RedoClient(endpoint) as client:
        workers = client.status()["workers"]
        before = {w["slot"]: (w["child_pid"], w["child_restarts"]) for w in workers}
        clock = time.perf_counter
        for request in requests[:50]:
            client.redo(*request)
        alone, interleaved, refused = [], [], 0
        for i in range(bad_count):
            request = requests[(2 * i) % len(requests)]
            t0 = clock()
            client.redo(*request)
            alone.append((clock() - t0) * 1e6)
            tag, lsn, base, records = requests[(2 * i + 1) % len(requests)]
            try:
                client.redo(tag, lsn, base, corrupt(records) if records else records)
            except InvalidRequest:
                refused += 1
            t0 = clock()
            client.redo(tag, lsn, base, records)
            interleaved.append((clock() - t0) * 1e6)
        after = {w["slot"]: (w["child_pid"], w["child_restarts"]) for w in client.status()["workers"]}
    restarts = sum(after[slot][1] - before[slot][1] for slot in before if slot in after)
    changed = sum(1 for slot in before if after.get(slot, (None,))[0] != before[slot][0])
    return {"bad_requests": bad_count, "refused": refused, "child_restarts": restarts, "active_children_replaced": changed,
            "good_p50_alone_us": round(statistics.median(alone), 1),
            "good_p50_interleaved_us": round(statistics.median(interleaved), 1),
            "ratio": round(statistics.median(interleaved) / statistics.median(alone), 3)}


def _pipelining_client(endpoint: str, requests: list, expected: list, seconds: float, window: int, results) -> None:
    answered = wrong = errors = 0
    error_kinds: dict[str, int] = {}
    with RedoClient(endpoint, timeout=30) as client:
        end = time.monotonic() + seconds
        index = 0
        while time.monotonic() < end:
            chunk = [(index + i) % len(requests) for i in range(window)]
            results_now = client.redo_many([requests[i] for i in chunk], return_exceptions=True)
            if len(results_now) != len(chunk):
                wrong += len(chunk)
            for i, result in zip(chunk, results_now):
                if isinstance(result, Exception):
                    errors += 1
                    error_kinds[type(result).__name__] = error_kinds.get(type(result).__name__, 0) + 1
                elif result != expected[i]:
                    wrong += 1
                else:
                    answered += 1
            index += window
    results.put((answered, wrong, errors, error_kinds))


def kill_children_under_load(endpoint: str, requests: list, expected: list, worker_pids: list[int],
                             clients: int = 4, seconds: float = 30.0, every: float = 2.0, window: int = 64) -> dict:
    """``clients`` processes pipelining ``window`` requests at a time for ``seconds``, while a redo child (the one
    of a random worker, chosen at random among its children) is killed with SIGKILL every ``every`` seconds: each
    request must get exactly one answer, and every page must be right."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_pipelining_client,
                                 args=(endpoint, requests, expected, seconds, window, queue)) for _ in range(clients)]
    for process in processes:
        process.start()
    stop = threading.Event()
    kills = []

    def killer() -> None:
        rng = random.Random(13)
        time.sleep(every)
        while not stop.is_set():
            worker = rng.choice(worker_pids)
            children = sorted(children_of(worker))
            if children:
                victim = rng.choice(children)
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills.append(victim)
                except ProcessLookupError:
                    pass
            stop.wait(every)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    outcomes = [queue.get(timeout=seconds + 120) for _ in processes]
    stop.set()
    thread.join()
    for process in processes:
        process.join()
    error_kinds: dict[str, int] = {}
    for outcome in outcomes:
        for kind, count in outcome[3].items():
            error_kinds[kind] = error_kinds.get(kind, 0) + count
    return {"clients": clients, "seconds": seconds, "children_killed": len(kills),
            "answered_right": sum(o[0] for o in outcomes), "wrong_pages": sum(o[1] for o in outcomes),
            "errors": sum(o[2] for o in outcomes), "error_kinds": error_kinds}
