#!/usr/bin/env python3
"""The local data path's floor: our Python client (walredod.client.local) against a C server that speaks the same
framing over an AF_UNIX stream socket and answers at once (bench/unix_echo.c, built here with the system's C
compiler). The local path's figures are then "redo + this floor + what the child adds".

    python3 bench/unix_floor.py [--seconds 3]

Rows: synchronous round trips with client and echo on one CPU, on two CPUs, and unpinned; pipelined throughput with
one client process per CPU (each on its own CPU, the echo unpinned).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from walredod.client import local  # noqa: E402
from walredod.tools.benchmark import cpu_of  # noqa: E402

SOURCE = Path(__file__).resolve().parent / "unix_echo.c"


def build_echo(directory: Path) -> Path:
    binary = directory / "unix_echo"
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler: the AF_UNIX floor needs one to build bench/unix_echo.c")
    subprocess.run([compiler, "-O2", "-o", str(binary), str(SOURCE)], check=True)
    return binary


class Echo:
    def __init__(self, binary: Path, path: str, cpu: int | None):
        pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
        self.path = path
        self.process = subprocess.Popen([str(binary), path], preexec_fn=pin)
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise RuntimeError("the echo did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def _sync_client(path: str, request: bytes, seconds: float, cpu: int | None, results) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    connection = local.LocalConnection(path)
    for _ in range(200):
        connection.request(request, 5)
    latencies = []
    clock = time.perf_counter
    end = clock() + seconds
    while clock() < end:
        t0 = clock()
        connection.request(request, 5)
        latencies.append((clock() - t0) * 1e6)
    results.put(latencies)


def _pipelined_client(path: str, request: bytes, seconds: float, window: int, cpu: int | None, results) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    connection = local.LocalConnection(path)
    burst = request * window
    count = 0
    cpu0 = time.process_time()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        connection.send(burst)
        got = 0
        while got < window:
            got += len(connection.read_replies(time.monotonic() + 5))
        count += window
    results.put((count, time.perf_counter() - start, time.process_time() - cpu0))


def sync_floor(binary: Path, request: bytes, seconds: float, client_cpu: int | None, echo_cpu: int | None) -> dict:
    directory = Path(tempfile.mkdtemp(prefix="walredod-unix-floor-"))
    echo = Echo(binary, str(directory / "echo.sock"), echo_cpu)
    try:
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        process = context.Process(target=_sync_client, args=(echo.path, request, seconds, client_cpu, results))
        process.start()
        latencies = sorted(results.get(timeout=seconds + 60))
        process.join()
    finally:
        echo.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return {"p50_us": round(latencies[len(latencies) // 2], 1),
            "p99_us": round(latencies[int(len(latencies) * 0.99)], 1),
            "requests_per_s": round(len(latencies) / seconds)}


def pipelined_floor(binary: Path, request: bytes, seconds: float, cpus: list[int], window: int = 64) -> dict:
    """One pipelining client process per CPU (each pinned), one echo (unpinned), ``window`` requests per burst."""
    directory = Path(tempfile.mkdtemp(prefix="walredod-unix-floor-"))
    echo = Echo(binary, str(directory / "echo.sock"), None)
    try:
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        processes = [context.Process(target=_pipelined_client,
                                     args=(echo.path, request, seconds, window, cpu, results)) for cpu in cpus]
        for process in processes:
            process.start()
        time.sleep(seconds * 0.2)
        before, t0 = cpu_of({"echo": [echo.process.pid]}), time.monotonic()
        time.sleep(seconds * 0.5)
        after, window_s = cpu_of({"echo": [echo.process.pid]}), time.monotonic() - t0
        outcomes = [results.get(timeout=seconds + 60) for _ in processes]
        for process in processes:
            process.join()
    finally:
        echo.stop()
        shutil.rmtree(directory, ignore_errors=True)
    count = sum(o[0] for o in outcomes)
    rate = count / max(o[1] for o in outcomes)
    return {"requests_per_s": round(rate),
            "cpu_us_per_request": {"echo": round((after["echo"] - before["echo"]) / window_s / rate * 1e6, 1),
                                   "client": round(sum(o[2] for o in outcomes) / count * 1e6, 1)}}


def floors(request: bytes, seconds: float, cpus: list[int] | None = None) -> dict:
    """Every row of the AF_UNIX floor for one encoded local request."""
    cpus = cpus or sorted(os.sched_getaffinity(0))
    build_dir = Path(tempfile.mkdtemp(prefix="walredod-unix-echo-"))
    try:
        binary = build_echo(build_dir)
        out = {
            "sync, one CPU": sync_floor(binary, request, seconds, cpus[0], cpus[0]),
            "sync, two CPUs": sync_floor(binary, request, seconds, cpus[0], cpus[-1]),
            "sync, unpinned": sync_floor(binary, request, seconds, None, None),
            f"pipelined x{len(cpus)}, clients pinned, echo unpinned": pipelined_floor(binary, request, seconds,
                                                                                     cpus),
        }
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    from walredod.tools.benchmark import read_sample

    tag, lsn, base, records = read_sample()["short"][0]
    print(json.dumps(floors(local.encode_redo(1, tag, lsn, base, records), args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
