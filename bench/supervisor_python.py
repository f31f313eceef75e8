#!/usr/bin/env python3
"""The supervisor's own Python per request, sockets aside: a request in and its reply out through ``Pool``.

    python3 bench/supervisor_python.py [--cpu 0] [--requests 20000]

The supervisor's bookkeeping (walredod/daemon/pool.py) runs here with no-op sends, on one pinned CPU, for a short
request (2 records, a base image) and its 8 kB reply: once at a time (a synchronous client) and 64 at a time (a
pipelined one). Best of five rounds, in µs of CPU per request. What ZeroMQ then costs per message is in
bench/transport_floor.py and bench/daemon_study.py; this is the part a change to the supervisor's Python moves.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq  # noqa: E402

from walredod import protocol  # noqa: E402
from walredod.config import Settings  # noqa: E402
from walredod.daemon import backend  # noqa: E402
from walredod.daemon.pool import Frontend, Pool, Slot  # noqa: E402
from walredod.types import BufferTag, WalRecord  # noqa: E402


def measure(requests: int, depth: int) -> float:
    """µs of CPU per request and reply, ``depth`` requests accepted before their replies come back."""
    settings = Settings.model_validate({"daemon": {"workers": 1, "endpoints": ["ipc:///tmp/bench.sock"]},
                                        "engine": {"data_dir": tempfile.mkdtemp(prefix="walredod-bench-")}})
    pool = Pool(settings, start_process=None, send_worker=lambda identity, frames: None)
    slot = Slot(0, ready=True, credit=10**9, identity=b"w0")
    pool.slots[0] = slot
    pool.by_identity[b"w0"] = slot
    frontend = Frontend("ipc:///tmp/bench.sock", lambda client, frames: None)
    tag = BufferTag(1663, 5, 16384, 0, 3)
    request = protocol.encode_redo_request(1, tag, 0x1000, b"\0" * 8192, [WalRecord(0x1000, b"r" * 120)] * 2)
    client_frames = [zmq.Frame(b"client-1"), *(zmq.Frame(f) for f in request)]  # as recv(copy=False) gives them
    reply_frames = [zmq.Frame(f) for f in protocol.encode_reply(1, b"\1" * 8192)[1:]]
    identity, command = zmq.Frame(b"w0"), zmq.Frame(backend.REPLY)
    on_client, on_worker = pool.on_client_message, pool.on_worker_message
    token_frames = [zmq.Frame(backend.encode_request(token, 0.0, [])[1]) for token in range(1, requests + 1)]
    started = time.process_time()
    for first in range(0, requests, depth):
        for _ in range(min(depth, requests - first)):
            on_client(frontend, client_frames)
        for token_frame in token_frames[first:first + depth]:
            on_worker([identity, command, token_frame, *reply_frames])
    spent = time.process_time() - started
    assert not pool.pending and slot.served == requests, "a reply did not match its request"
    return spent / requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.cpu})
    for depth in (1, 64):
        best = min(measure(args.requests, depth) for _ in range(5))
        print(f"{depth:>3} in flight: {best:5.1f} µs of supervisor Python per request and reply (CPU {args.cpu})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
