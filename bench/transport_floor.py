#!/usr/bin/env python3
"""The transport's own floor: the daemon's ZeroMQ hops and message sizes, with nothing behind them.

- direct: client DEALER -> ROUTER echo process that answers every request with an 8 KB page;
- brokered: client DEALER -> ROUTER/ROUTER broker process -> DEALER echo worker, the daemon's topology.

    python3 bench/transport_floor.py [--seconds 3]

Daemon figures are then "redo + this floor + our overhead" (bench/daemon_study.py runs both side by side).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from walredod import protocol  # noqa: E402
from walredod.tools.benchmark import cpu_of  # noqa: E402
from walredod.types import BLCKSZ  # noqa: E402

PAGE = bytes(BLCKSZ)


def echo_router(endpoint: str, cpu: int | None) -> None:
    """Answers each request directly (the 'direct' floor)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    socket = zmq.Context().socket(zmq.ROUTER)
    socket.bind(endpoint)
    while True:
        frames = socket.recv_multipart(copy=False)
        socket.send_multipart([frames[0], b"", frames[2].bytes[:12], PAGE], copy=False)


def echo_worker(endpoint: str, cpu: int | None) -> None:
    """A DEALER worker behind the broker: replies with the request's envelope and a page."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    socket = zmq.Context().socket(zmq.DEALER)
    socket.connect(endpoint)
    socket.send(b"READY")
    while True:
        frames = socket.recv_multipart(copy=False)  # client identity, header, ...
        socket.send_multipart([frames[0], b"", frames[1].bytes[:12], PAGE], copy=False)


def broker(frontend_endpoint: str, backend_endpoint: str, cpu: int | None) -> None:
    """One recv and one send per message each way, like the supervisor's minimum."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    context = zmq.Context()
    frontend = context.socket(zmq.ROUTER)
    backend = context.socket(zmq.ROUTER)
    frontend.bind(frontend_endpoint)
    backend.bind(backend_endpoint)
    worker = backend.recv_multipart()[0]  # READY
    poller = zmq.Poller()
    poller.register(frontend, zmq.POLLIN)
    poller.register(backend, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if frontend in events:
            frames = frontend.recv_multipart(copy=False)
            backend.send_multipart([worker, frames[0], *frames[2:]], copy=False)
        if backend in events:
            frames = backend.recv_multipart(copy=False)
            frontend.send_multipart(frames[1:], copy=False)


def measure(endpoint: str, request_frames: list, seconds: float, pipelined: bool = False,
            stage_pids: dict[str, list[int]] | None = None) -> dict:
    """Round trips for ``seconds``; with ``stage_pids``, CPU µs per request of those processes (and of this
    client) from the kernel's accounting."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    for _ in range(200):
        socket.send_multipart(request_frames)
        socket.recv_multipart()
    latencies, count = [], 0
    before, cpu_start = cpu_of(stage_pids or {}), time.process_time()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        if pipelined:
            for _ in range(64):
                socket.send_multipart(request_frames)
            for _ in range(64):
                socket.recv_multipart()
            count += 64
        else:
            t0 = time.perf_counter()
            socket.send_multipart(request_frames)
            socket.recv_multipart()
            latencies.append((time.perf_counter() - t0) * 1e6)
            count += 1
    elapsed = time.perf_counter() - start
    after, cpu_used = cpu_of(stage_pids or {}), time.process_time() - cpu_start
    socket.close()
    latencies.sort()
    cpu = {stage: round((after[stage] - before[stage]) / count * 1e6, 1) for stage in after}
    cpu["client"] = round(cpu_used / count * 1e6, 1)
    return {"requests_per_s": round(count / elapsed),
            "p50_us": round(latencies[len(latencies) // 2], 1) if latencies else None,
            "cpu_us_per_request": cpu}


def floors(request_frames: list, seconds: float = 3.0, cpus: tuple[int | None, int | None] = (None, None)) -> dict:
    """Direct and brokered floors, sync and pipelined; ``cpus``: (echo side, broker) placement."""
    context = multiprocessing.get_context("spawn")
    run_dir = Path(tempfile.mkdtemp(prefix="walredod-floor-"))
    direct, front, back = (f"ipc://{run_dir}/{name}.sock" for name in ("direct", "front", "back"))
    processes = [context.Process(target=echo_router, args=(direct, cpus[0]), daemon=True),
                 context.Process(target=broker, args=(front, back, cpus[1]), daemon=True),
                 context.Process(target=echo_worker, args=(back, cpus[0]), daemon=True)]
    for process in processes:
        process.start()
    time.sleep(1.0)
    echo, brokered = {"echo": [processes[0].pid]}, {"broker": [processes[1].pid], "echo": [processes[2].pid]}
    try:
        return {"direct_sync": measure(direct, request_frames, seconds, stage_pids=echo),
                "brokered_sync": measure(front, request_frames, seconds, stage_pids=brokered),
                "direct_pipelined": measure(direct, request_frames, seconds, pipelined=True, stage_pids=echo),
                "brokered_pipelined": measure(front, request_frames, seconds, pipelined=True, stage_pids=brokered)}
    finally:
        for process in processes:
            process.kill()
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="ZeroMQ floor of the daemon's hops")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    from walredod.tools.benchmark import read_sample

    tag, lsn, base, records = read_sample()["short"][0]
    frames = protocol.encode_redo_request(1, tag, lsn, base, records)
    for name, figures in floors(frames, args.seconds).items():
        print(f"{name:<20} {figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
