"""`walredod bench`: real request sets against one engine or a running daemon, with per-process CPU accounting.

Request sets come from real PostgreSQL 15 WAL (bench/make_sample.py writes walredod/tools/data/requests.bin.gz from the
ground-truth scenario), so the benchmark runs without starting PostgreSQL.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import multiprocessing
import os
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from walredod.types import BLCKSZ, BufferTag, WalRecord

SAMPLE_MAGIC = b"WRBS1\n"
# Shipped as package data; bench/make_sample.py regenerates it.
DEFAULT_SAMPLE = Path(str(importlib.resources.files("walredod.tools") / "data" / "requests.bin.gz"))
_request_head = struct.Struct("<IIIIIQB")
_record_head = struct.Struct("<QI")

Request = tuple[BufferTag, int, bytes | None, list[WalRecord]]


# --- request sets -------------------------------------------------------------------------------------------------

def write_sample(path: Path, sets: dict[str, list[Request]]) -> None:
    out = bytearray(SAMPLE_MAGIC)
    for name, requests in sets.items():
        encoded = name.encode()
        out += struct.pack("<B", len(encoded)) + encoded + struct.pack("<I", len(requests))
        for tag, lsn, base, records in requests:
            out += _request_head.pack(*tag, lsn, base is not None)
            if base is not None:
                out += base
            out += struct.pack("<I", len(records))
            for record in records:
                out += _record_head.pack(record.lsn, len(record.data)) + record.data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(bytes(out), 9, mtime=0))


def read_sample(path: Path = DEFAULT_SAMPLE) -> dict[str, list[Request]]:
    data = gzip.decompress(path.read_bytes())
    if not data.startswith(SAMPLE_MAGIC):
        raise ValueError(f"{path} is not a walredod request sample")
    pos = len(SAMPLE_MAGIC)
    sets: dict[str, list[Request]] = {}
    while pos < len(data):
        length = data[pos]
        name = data[pos + 1:pos + 1 + length].decode()
        pos += 1 + length
        (count,) = struct.unpack_from("<I", data, pos)
        pos += 4
        requests = []
        for _ in range(count):
            *tag, lsn, has_base = _request_head.unpack_from(data, pos)
            pos += _request_head.size
            base = None
            if has_base:
                base = data[pos:pos + BLCKSZ]
                pos += BLCKSZ
            (nrecords,) = struct.unpack_from("<I", data, pos)
            pos += 4
            records = []
            for _ in range(nrecords):
                rec_lsn, rec_len = _record_head.unpack_from(data, pos)
                pos += _record_head.size
                records.append(WalRecord(rec_lsn, data[pos:pos + rec_len]))
                pos += rec_len
            requests.append((BufferTag(*tag), lsn, base, records))
        sets[name] = requests
    return sets


# --- CPU accounting -------------------------------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU of a process so far: (all threads, ZeroMQ's I/O threads); (0, 0) once it is gone."""
    total = zmq_io = 0.0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0.0, 0.0
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # a thread that just ended
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        total += seconds
        if name.startswith("ZMQbg/IO"):
            zmq_io += seconds
    return total, zmq_io


def cpu_of(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds by stage, and by stage's ZeroMQ I/O threads (key "<stage> zmq I/O") where it has any."""
    out: dict[str, float] = {}
    for stage, stage_pids in pids.items():
        figures = [cpu_seconds(pid) for pid in stage_pids]
        out[stage] = sum(f[0] for f in figures)
        out[f"{stage} zmq I/O"] = sum(f[1] for f in figures)
    return out


# --- runs ---------------------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    label: str
    target: str
    mode: str
    clients: int
    requests: int
    records: int
    seconds: float
    latencies_us: list[float] = field(repr=False)
    cpu_us_per_request: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_us)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    def row(self) -> dict:
        return {"label": self.label, "target": self.target, "mode": self.mode, "clients": self.clients,
                "requests_per_s": round(self.rate), "records_per_s": round(self.records / self.seconds),
                "p50_us": round(self.percentile(0.50), 1), "p95_us": round(self.percentile(0.95), 1),
                "p99_us": round(self.percentile(0.99), 1),
                "cpu_us_per_request": {k: round(v, 1) for k, v in self.cpu_us_per_request.items()}}


def _drive(target: str, endpoint: str | None, engine_options: dict, client_options: dict,
           requests: Sequence[Request], mode: str, duration: float, batch: int, cpu: int | None, started,
           results) -> None:
    """One client: send requests for ``duration`` seconds (``started`` set once warm); put (latencies, requests,
    records, seconds, its own CPU seconds) on results."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    if target == "engine":
        from walredod.engine import RedoEngine

        client = RedoEngine(**engine_options)
        redo, redo_many = client.redo, None
    else:
        from walredod.client import RedoClient

        client = RedoClient(endpoint, **client_options)
        redo, redo_many = client.redo, client.redo_many
    clock = time.perf_counter
    for request in requests[:20]:  # warm-up
        redo(*request)
    latencies, count, records = [], 0, 0
    started.set()
    child = getattr(client, "child_pid", None)  # an engine's redo child works for this client alone
    child_cpu_start = cpu_seconds(child)[0] if child else 0.0
    cpu_start = time.process_time()  # every thread of this process, ZeroMQ's included
    start = clock()
    index = 0
    while clock() - start < duration:
        if mode == "sync" or redo_many is None:
            request = requests[index % len(requests)]
            t0 = clock()
            redo(*request)
            latencies.append((clock() - t0) * 1e6)
            count += 1
            records += len(request[3])
            index += 1
        else:
            chunk = [requests[(index + i) % len(requests)] for i in range(batch)]
            t0 = clock()
            redo_many(chunk)
            latencies.append((clock() - t0) * 1e6 / batch)  # per request within the batch
            count += batch
            records += sum(len(r[3]) for r in chunk)
            index += batch
    elapsed = clock() - start
    cpu_used = time.process_time() - cpu_start
    child_cpu = cpu_seconds(child)[0] - child_cpu_start if child and child == client.child_pid else 0.0
    client.close()
    results.put((latencies, count, records, elapsed, cpu_used, child_cpu))


def run(label: str, target: str, requests: Sequence[Request], *, endpoint: str | None = None,
        engine_options: dict | None = None, client_options: dict | None = None, mode: str = "sync",
        clients: int = 1, duration: float = 3.0,
        batch: int = 64, client_cpus: Sequence[int] | None = None, stage_pids: dict[str, list[int]] | None = None,
        progress: bool = True) -> RunResult:
    """Run ``clients`` client processes at once.

    CPU per request of each stage: its CPU use over a window inside the steady state (the kernel's accounting of
    each process and thread) divided by the throughput; the clients count their own.
    """
    context = multiprocessing.get_context("spawn")  # no inherited ZeroMQ state
    results = context.Queue()
    started = [context.Event() for _ in range(clients)]
    processes = [context.Process(target=_drive, args=(
        target, endpoint, engine_options or {}, client_options or {}, requests, mode, duration, batch,
        client_cpus[i % len(client_cpus)] if client_cpus else None, started[i], results)) for i in range(clients)]
    for process in processes:
        process.start()
    for event in started:
        event.wait(120)
    begun = time.monotonic()
    time.sleep(min(0.2, duration / 10))
    before, window_start = cpu_of(stage_pids or {}), time.monotonic()
    while time.monotonic() - begun < duration * 0.9:
        if progress:
            print(f"\r  {label}: {time.monotonic() - begun:4.1f} s", end="", file=sys.stderr, flush=True)
        time.sleep(min(0.2, duration / 20))
    after, window = cpu_of(stage_pids or {}), time.monotonic() - window_start
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join()
    if progress:
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr)
    latencies = [x for outcome in outcomes for x in outcome[0]]
    count = sum(o[1] for o in outcomes)
    records = sum(o[2] for o in outcomes)
    seconds = max(o[3] for o in outcomes)
    rate = count / seconds
    cpu = {stage: (after[stage] - before[stage]) / window / rate * 1e6
           for stage in after if after[stage] - before[stage] > 0}
    cpu["client"] = sum(o[4] for o in outcomes) / count * 1e6
    if any(o[5] for o in outcomes):  # in-process engines: their redo children
        cpu["client's redo children"] = sum(o[5] for o in outcomes) / count * 1e6
    return RunResult(label, target, mode, clients, count, records, seconds, latencies, cpu)


def print_table(results: Sequence[RunResult], file=sys.stdout) -> None:
    print(f"{'run':<34} {'req/s':>8} {'records/s':>10} {'p50 µs':>8} {'p95 µs':>8} {'p99 µs':>8}  CPU µs/request",
          file=file)
    for result in results:
        row = result.row()
        cpu = ", ".join(f"{k} {v}" for k, v in row["cpu_us_per_request"].items())
        print(f"{result.label:<34} {row['requests_per_s']:>8} {row['records_per_s']:>10} {row['p50_us']:>8} "
              f"{row['p95_us']:>8} {row['p99_us']:>8}  {cpu}", file=file)


def save(results: Sequence[RunResult], json_path: Path, plot_path: Path | None, extra: dict | None = None) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"runs": [r.row() for r in results], **(extra or {})}, indent=2))
    if plot_path is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    labels = [r.label for r in results]
    left.barh(labels, [r.percentile(0.5) for r in results], color="tab:blue", label="p50")
    left.barh(labels, [r.percentile(0.99) - r.percentile(0.5) for r in results],
              left=[r.percentile(0.5) for r in results], color="tab:orange", alpha=0.6, label="p50..p99")
    left.set_xlabel("µs per request")
    left.invert_yaxis()
    left.legend()
    right.barh(labels, [r.rate for r in results], color="tab:green")
    right.set_xlabel("requests per second")
    right.invert_yaxis()
    right.set_yticklabels([])
    fig.tight_layout()
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot_path, dpi=110)
    plt.close(fig)
