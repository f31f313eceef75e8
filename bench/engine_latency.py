#!/usr/bin/env python3
"""Redo engine benchmark on real PostgreSQL 15 WAL: round trips, time inside the child, start-up, memory.

    python3 bench/engine_latency.py [--iterations 3000] [--json bench/results/engine_latency.json]
    python3 bench/engine_latency.py --sandbox-compare [--rounds 3]   # the redo child's sandbox on against off
    python3 bench/engine_latency.py --against-extension OLD.so [--rounds 3]   # this build against another

Requests are real page histories from the ground-truth scenario (tests/groundtruth): a page image at the first
cut, then the first N records of that page's history after the cut, for N in 1, 2, 10, 100 and 227; "ping" is the
0-record round trip. Every placement runs in the same process, one after the other, so ratios between rows are
side by side:

- "one CPU": caller and child pinned to the same CPU (the child inherits the caller's affinity);
- "two CPUs": caller on one CPU, child on the other;
- "unpinned": wherever the scheduler puts them.

Time inside the child comes from the child's own clock: at exit it prints how many requests it served and how many
nanoseconds it spent between their first byte and their reply. Pings are not requests to it: their row has the
child's time on CPU per ping from /proc/<pid>/schedstat, the same measure (kernel time included).

--against-extension OLD.so measures this build of the redo child against another one (an earlier commit's, say:
`git worktree add /tmp/old <commit> && make -C /tmp/old/pgext`), side by side: the held-out request sample shipped
with the package (walredod/tools/data; no PostgreSQL server needed), caller and child on one CPU, the two builds
alternating for --rounds rounds; for each request set, the median over rounds of the round-trip p50 and of the
child's CPU per request (its time on CPU from /proc/<pid>/schedstat, kernel time included), and the ratio new/old.

--sandbox-compare measures the cost of the redo child's sandbox (engine.sandbox = "required" against "off"): the
"one CPU" placement, alternating the two settings for --rounds rounds (so drift on a shared machine hits both), and
start-up to first page; it reports the median of each row over the rounds and the ratio on/off.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # ground-truth servers (test support)

from walredod.engine import RedoEngine  # noqa: E402
from groundtruth.cluster import read_page  # noqa: E402
from groundtruth.scenario import build_scenario  # noqa: E402
from walredod.ingest import page_histories  # noqa: E402
from walredod.tools.benchmark import read_sample  # noqa: E402
from walredod.wal import WalReader  # noqa: E402

RECORD_COUNTS = (1, 2, 10, 100, 227)
_SERVED = re.compile(r"served (\d+) requests, (\d+) records, (\d+) ns of CPU time")


class ChildStatsCatcher(logging.Handler):
    """Keeps the exit statistics line each child writes to its stderr (forwarded to logging)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: dict[int, tuple[int, int, int]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if match := _SERVED.search(message):
            pid = int(re.search(r"\[(\d+)\]", message)[1])
            self.lines[pid] = tuple(int(x) for x in match.groups())


def build_requests(workdir: Path) -> tuple[dict[int, list], dict]:
    """For each record count N, requests rebuilding real pages from their image at the cut plus N records."""
    started = time.monotonic()
    scenario = build_scenario(workdir)
    cut = scenario.cuts[0]
    records = list(WalReader(scenario.wal_dir).records())
    histories = page_histories(records, since_lsn=cut)
    by_count: dict[int, list] = {n: [] for n in RECORD_COUNTS}
    for tag, history in sorted(histories.items()):
        if tag.forknum != 0 or history.starts_empty:
            continue
        base = read_page(scenario.recovered[cut], tag)
        for n in RECORD_COUNTS:
            if len(history.records) >= n and len(by_count[n]) < 200:
                chosen = history.records[:n]
                by_count[n].append((tag, chosen[-1].end_lsn, base, [r.as_wal_record() for r in chosen]))
    info = {"scenario_seconds": round(time.monotonic() - started, 1), "wal_records": len(records),
            "pages_with_history": len(histories),
            "requests_per_count": {n: len(v) for n, v in by_count.items()}}
    return by_count, info


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_requests(engine: RedoEngine, requests: list, iterations: int) -> list[float]:
    """Microseconds per round trip, cycling through ``requests``."""
    redo = engine.redo
    clock = time.perf_counter_ns
    samples = []
    for i in range(iterations):
        tag, lsn, base, records = requests[i % len(requests)]
        t0 = clock()
        redo(tag, lsn, base, records)
        samples.append((clock() - t0) / 1000)
    return samples


def time_pings(engine: RedoEngine, iterations: int) -> list[float]:
    ping = engine.ping
    clock = time.perf_counter_ns
    samples = []
    for _ in range(iterations):
        t0 = clock()
        ping()
        samples.append((clock() - t0) / 1000)
    return samples


def memory_of(pid: int) -> dict[str, float]:
    """RSS split into private anonymous, shared memory (PostgreSQL's segment) and file pages, in MB."""
    anonymous = shmem = total = 0
    current = ""
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            parts = line.split()
            first = parts[0]
            if not first.endswith(":"):  # a mapping's header line: address range, perms, ..., path
                current = " ".join(parts[5:]) if len(parts) > 5 else ""
                continue
            if parts[-1] != "kB":
                continue  # VmFlags and the like
            kb = int(parts[1])
            if first == "Rss:":
                total += kb
                if current.startswith("/dev/zero") or current.startswith("/SYSV") or "shmem" in current:
                    shmem += kb
            elif first == "Anonymous:":
                anonymous += kb
    return {"rss_mb": round(total / 1024, 2), "anonymous_mb": round(anonymous / 1024, 2),
            "shared_memory_mb": round(shmem / 1024, 2),
            "file_mb": round((total - anonymous - shmem) / 1024, 2)}


def run_placement(name: str, caller_cpus: set[int], child_cpus: set[int] | None, by_count: dict, data_dir: Path,
                  iterations: int, catcher: ChildStatsCatcher, sandbox: str = "required") -> dict:
    os.sched_setaffinity(0, caller_cpus)
    rows = {}
    with RedoEngine(data_dir=data_dir, source_logs_hint_bits=True, keep_spare=False, sandbox=sandbox) as engine:
        if child_cpus is not None:
            os.sched_setaffinity(engine.child_pid, child_cpus)
        time_pings(engine, 500)
        before = child_cpu_ns(engine.child_pid)
        pings = time_pings(engine, iterations)
        # A ping has no request for the child's own clock: its time on CPU per ping instead (the same measure).
        rows["ping"] = {"records": 0, "p50_us": percentile(pings, 0.5), "p99_us": percentile(pings, 0.99),
                        "in_child_us": round((child_cpu_ns(engine.child_pid) - before) / iterations / 1000, 2)}
        memory = memory_of(engine.child_pid)
    for n in RECORD_COUNTS:
        requests = by_count[n]
        if not requests:
            continue
        # A child per row, so its exit line gives this row's time inside the child.
        with RedoEngine(data_dir=data_dir, source_logs_hint_bits=True, keep_spare=False, sandbox=sandbox) as engine:
            pid = engine.child_pid
            if child_cpus is not None:
                os.sched_setaffinity(pid, child_cpus)
            time_requests(engine, requests, min(iterations // 5, 500))
            samples = time_requests(engine, requests, iterations)
            if n == RECORD_COUNTS[-1]:
                memory = memory_of(pid)  # after the longest requests: the most the child holds
        served, records, busy_ns = catcher.lines.get(pid, (0, 0, 0))
        rows[f"{n} records"] = {
            "records": n, "p50_us": percentile(samples, 0.5), "p99_us": percentile(samples, 0.99),
            "in_child_us": round(busy_ns / served / 1000, 2) if served else None,
        }
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    return {"placement": name, "sandbox": sandbox, "caller_cpus": sorted(caller_cpus),
            "child_cpus": sorted(child_cpus) if child_cpus is not None else "inherited",
            "rows": rows, "child_memory": memory}


def wait_dead(pid: int) -> None:
    """Until a killed child is a zombie (a fixed sleep is not enough on a busy machine)."""
    while True:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.005)


def measure_start_and_takeover(by_count: dict, data_dir: Path, cpu: int, sandbox: str = "required",
                               takeover: bool = True) -> dict:
    """Start-up to first page (no spare) and the first request after a child's death (with a warm spare)."""
    os.sched_setaffinity(0, {cpu})
    tag, lsn, base, records = by_count[2][0]
    result = {}
    with RedoEngine(data_dir=data_dir, source_logs_hint_bits=True, keep_spare=False, sandbox=sandbox) as engine:
        starts = []
        for _ in range(20):
            victim = engine.child_pid
            os.kill(victim, signal.SIGKILL)
            wait_dead(victim)  # dead before the request: the engine restarts it on the write
            t0 = time.perf_counter_ns()
            engine.redo(tag, lsn, base, records)
            starts.append((time.perf_counter_ns() - t0) / 1e6)
        result["start_to_first_page_ms"] = {"p50": statistics.median(starts), "max": max(starts)}
    if not takeover:
        os.sched_setaffinity(0, set(range(os.cpu_count())))
        return result
    with RedoEngine(data_dir=data_dir, source_logs_hint_bits=True, keep_spare=True) as engine:
        steady = time_requests(engine, [by_count[2][0]], 2000)
        firsts, after_pause = [], []
        for _ in range(20):
            engine.start_spare()  # the idle-time step the daemon's worker takes
            time.sleep(0.3)  # let the new spare finish starting
            engine.ping()
            victim = engine.child_pid
            paused = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            wait_dead(victim)
            paused = time.monotonic() - paused
            t0 = time.perf_counter_ns()
            engine.redo(tag, lsn, base, records)
            firsts.append((time.perf_counter_ns() - t0) / 1000)
            # The same request after the same pause on a live child: what idleness alone costs on this machine
            # (caches and the idle CPU's wake-up), so that the takeover's own cost shows apart.
            engine.start_spare()
            time.sleep(0.3)
            engine.ping()
            time.sleep(paused)
            t0 = time.perf_counter_ns()
            engine.redo(tag, lsn, base, records)
            after_pause.append((time.perf_counter_ns() - t0) / 1000)
        takeover = result["after_takeover_us"] = {"first_request_p50": statistics.median(firsts),
                                                  "after_same_pause_p50": statistics.median(after_pause),
                                                  "steady_p50": percentile(steady, 0.5)}
        takeover["ratio"] = round(takeover["first_request_p50"] / takeover["steady_p50"], 2)
        takeover["ratio_to_same_pause"] = round(takeover["first_request_p50"] / takeover["after_same_pause_p50"], 2)
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    return result


def compare_sandbox(by_count: dict, data_dir: Path, iterations: int, catcher: ChildStatsCatcher, cpu: int,
                    rounds: int) -> dict:
    """The "one CPU" rows and start-up with the sandbox on and off, alternating, medians over the rounds."""
    runs: dict[str, list[dict]] = {"off": [], "required": []}
    starts: dict[str, list[float]] = {"off": [], "required": []}
    for _ in range(rounds):
        for sandbox in ("off", "required"):
            runs[sandbox].append(run_placement(f"one CPU, sandbox {sandbox}", {cpu}, None, by_count, data_dir,
                                               iterations, catcher, sandbox))
            started = measure_start_and_takeover(by_count, data_dir, cpu, sandbox, takeover=False)
            starts[sandbox].append(started["start_to_first_page_ms"]["p50"])
    rows = {}
    for name in runs["off"][0]["rows"]:
        off = statistics.median(r["rows"][name]["p50_us"] for r in runs["off"])
        on = statistics.median(r["rows"][name]["p50_us"] for r in runs["required"])
        in_off = [r["rows"][name].get("in_child_us") for r in runs["off"]]
        in_on = [r["rows"][name].get("in_child_us") for r in runs["required"]]
        rows[name] = {"off_p50_us": off, "on_p50_us": on, "ratio": round(on / off, 3),
                      "off_in_child_us": statistics.median(in_off) if None not in in_off else None,
                      "on_in_child_us": statistics.median(in_on) if None not in in_on else None}
    start_off, start_on = statistics.median(starts["off"]), statistics.median(starts["required"])
    return {"cpu": cpu, "rounds": rounds, "rows": rows,
            "start_to_first_page_ms": {"off": start_off, "on": start_on, "ratio": round(start_on / start_off, 3)},
            "runs": runs}


def print_sandbox_report(report: dict) -> None:
    comparison = report["sandbox_compare"]
    print(f"\nmachine: {report['machine']}")
    print(f"sandbox on (engine.sandbox = required) against off; caller and child on CPU {comparison['cpu']}; "
          f"median of {comparison['rounds']} alternating rounds")
    print(f"  {'request':<12} {'off p50 µs':>11} {'on p50 µs':>10} {'on/off':>7} {'off in child':>13} "
          f"{'on in child':>12}")
    for name, row in comparison["rows"].items():
        in_off, in_on = row["off_in_child_us"], row["on_in_child_us"]
        print(f"  {name:<12} {row['off_p50_us']:>11.1f} {row['on_p50_us']:>10.1f} {row['ratio']:>7.3f} "
              f"{'' if in_off is None else f'{in_off:.2f}':>13} {'' if in_on is None else f'{in_on:.2f}':>12}")
    start = comparison["start_to_first_page_ms"]
    print(f"  start-up to first page (ms, p50): off {start['off']:.1f}, on {start['on']:.1f}, "
          f"on/off {start['ratio']:.3f}")


def child_cpu_ns(pid: int) -> int:
    """Nanoseconds ``pid`` has spent on a CPU (the scheduler's own count, kernel time included)."""
    with open(f"/proc/{pid}/schedstat") as stat:
        return int(stat.read().split()[0])


def compare_builds(old_extension: Path, data_dir: Path, rounds: int, cpu: int) -> dict:
    """This build of the redo child against ``old_extension`` on the shipped request sample, one CPU."""
    sample = read_sample()
    sets = {"short": (sample["short"], 3000),
            "natural": (sample["natural-heap-btree"] + sample["natural-index"], 600),
            "medium": (sample["medium"], 150)}
    os.sched_setaffinity(0, {cpu})
    builds = {"old": old_extension, "new": None}
    samples = {build: {name: {"p50_us": [], "child_cpu_us": []} for name in sets} for build in builds}
    engines = {build: RedoEngine(data_dir=data_dir / build, extension_path=path, keep_spare=False)
               for build, path in builds.items()}
    try:
        for engine in engines.values():
            time_requests(engine, sets["short"][0], 300)
        for _ in range(rounds):
            for name, (requests, iterations) in sets.items():
                for build, engine in engines.items():
                    before = child_cpu_ns(engine.child_pid)
                    latencies = time_requests(engine, requests, iterations)
                    cpu_ns = child_cpu_ns(engine.child_pid) - before
                    samples[build][name]["p50_us"].append(percentile(latencies, 0.5))
                    samples[build][name]["child_cpu_us"].append(cpu_ns / iterations / 1000)
    finally:
        for engine in engines.values():
            engine.close()
        os.sched_setaffinity(0, set(range(os.cpu_count())))
    rows = {}
    for name, (requests, _) in sets.items():
        row = {"records_per_request": round(statistics.mean(len(r[3]) for r in requests), 1)}
        for build in builds:
            for measure in ("p50_us", "child_cpu_us"):
                row[f"{build}_{measure}"] = round(statistics.median(samples[build][name][measure]), 2)
        for measure in ("p50_us", "child_cpu_us"):
            row[f"ratio_{measure}"] = round(row[f"new_{measure}"] / row[f"old_{measure}"], 3)
        rows[name] = row
    return {"old_extension": str(old_extension), "cpu": cpu, "rounds": rounds, "sets": rows}


def print_builds_report(report: dict) -> None:
    print(f"this build against {report['old_extension']}: caller and child on CPU {report['cpu']}, "
          f"medians of {report['rounds']} alternating rounds")
    print(f"  {'requests':<9} {'records':>7} {'old p50 µs':>11} {'new p50 µs':>11} {'new/old':>8} "
          f"{'old child CPU µs':>17} {'new child CPU µs':>17} {'new/old':>8}")
    for name, row in report["sets"].items():
        print(f"  {name:<9} {row['records_per_request']:>7} {row['old_p50_us']:>11.1f} {row['new_p50_us']:>11.1f} "
              f"{row['ratio_p50_us']:>8.3f} {row['old_child_cpu_us']:>17.2f} {row['new_child_cpu_us']:>17.2f} "
              f"{row['ratio_child_cpu_us']:>8.3f}")


def print_report(report: dict) -> None:
    print(f"\nmachine: {report['machine']}")
    for placement in report["placements"]:
        print(f"\n{placement['placement']}: caller on CPU {placement['caller_cpus']}, "
              f"child on {placement['child_cpus']}")
        print(f"  {'request':<12} {'p50 µs':>8} {'p99 µs':>8} {'in child µs':>12}")
        for name, row in placement["rows"].items():
            in_child = row.get("in_child_us")
            print(f"  {name:<12} {row['p50_us']:>8.1f} {row['p99_us']:>8.1f} "
                  f"{'' if in_child is None else f'{in_child:.2f}':>12}")
        print(f"  child memory: {placement['child_memory']}")
    print(f"\nstart-up and takeover: {json.dumps(report['startup'])}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--json", type=Path, default=None,
                        help="default: bench/results/engine_latency.json (engine_sandbox.json with --sandbox-compare)")
    parser.add_argument("--sandbox-compare", action="store_true",
                        help="only the cost of the redo child's sandbox: on against off, side by side")
    parser.add_argument("--against-extension", type=Path, default=None, metavar="OLD.so",
                        help="only this build of the redo child against another, side by side on the request sample")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds with --sandbox-compare or --against-extension")
    args = parser.parse_args()
    if args.json is None:
        name = ("engine_sandbox.json" if args.sandbox_compare else
                "engine_builds.json" if args.against_extension else "engine_latency.json")
        args.json = Path("bench/results") / name
    logging.basicConfig(level=logging.WARNING)
    catcher = ChildStatsCatcher()
    logging.getLogger("walredod.child").addHandler(catcher)
    logging.getLogger("walredod.child").setLevel(logging.DEBUG)
    logging.getLogger("walredod.child").propagate = False

    workdir = Path(tempfile.mkdtemp(prefix="walredod-bench-"))
    os.chmod(workdir, 0o755)
    data_dir = workdir / "engine"
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.release()}"
    if args.against_extension:
        report = {"machine": machine, "builds": compare_builds(args.against_extension.resolve(), data_dir,
                                                               args.rounds, sorted(os.sched_getaffinity(0))[0])}
        print_builds_report(report["builds"])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nwritten to {args.json}")
        return 0
    by_count, info = build_requests(workdir / "scenario")
    cpus = sorted(os.sched_getaffinity(0))
    if args.sandbox_compare:
        report = {"machine": machine, "workload": info, "iterations": args.iterations,
                  "sandbox_compare": compare_sandbox(by_count, data_dir, args.iterations, catcher, cpus[0],
                                                     args.rounds)}
        print_sandbox_report(report)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nwritten to {args.json}")
        return 0
    placements = [run_placement("one CPU", {cpus[0]}, None, by_count, data_dir, args.iterations, catcher)]
    if len(cpus) > 1:
        placements.append(run_placement("two CPUs", {cpus[0]}, {cpus[1]}, by_count, data_dir, args.iterations,
                                        catcher))
    placements.append(run_placement("unpinned", set(cpus), None, by_count, data_dir, args.iterations, catcher))
    report = {
        "machine": machine,
        "workload": info, "iterations": args.iterations, "placements": placements,
        "startup": measure_start_and_takeover(by_count, data_dir, cpus[0]),
    }
    print_report(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
