#!/usr/bin/env python3
"""The daemon against its own floors and against engines driven directly, side by side in one run.

    python3 bench/daemon_study.py [--seconds 4]

Uses the shipped request sample (walredod/tools/data/requests.bin.gz; no PostgreSQL server needed), starts daemons with
the placements compared, measures the transport floors in the same run (ZeroMQ: bench/transport_floor.py; AF_UNIX
for the local data path: bench/unix_floor.py), the local path's faults (bench/local_faults.py), and prints the
targets of the performance issues as ratios. The client takes the local data path by default (an ipc:// endpoint);
rows marked "ZeroMQ" keep it to ZeroMQ (RedoClient(local=False)). Writes bench/results/daemon_study.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from local_faults import bad_requests_interleaved, children_of, kill_children_under_load  # noqa: E402
from transport_floor import floors  # noqa: E402
from unix_floor import floors as unix_floors  # noqa: E402

from walredod import protocol  # noqa: E402
from walredod.tools import benchmark  # noqa: E402
from walredod.client import RedoClient, local  # noqa: E402
from walredod.errors import Unavailable  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class Daemon:
    """A `walredod serve` for one configuration; its process ids by stage for CPU accounting."""

    def __init__(self, root: Path, workers: int, placement: str, supervisor_cpu: int | None = None):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        self.endpoint = f"ipc://{root}/walredod.sock"
        config = root / "walredod.toml"
        config.write_text(f'[daemon]\nworkers = {workers}\ncpu_placement = "{placement}"\n'
                          f'[engine]\ndata_dir = "{root.parent / "data"}"\n')
        pin = (lambda: os.sched_setaffinity(0, {supervisor_cpu})) if supervisor_cpu is not None else None
        self.process = subprocess.Popen([sys.executable, "-m", "walredod", "serve", "--config", str(config),
                                         "--endpoint", self.endpoint], preexec_fn=pin,
                                        env={**os.environ, "WALREDOD_LOG_LEVEL": "WARNING"})
        with RedoClient(self.endpoint) as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    workers_state = client.status(timeout=1)["workers"]
                    if all(w["state"] == "ready" and w["child_pid"] for w in workers_state):
                        break
                except Unavailable:
                    pass
                time.sleep(0.1)
        # Redo children: the active one and the spare of each worker (both serve the local data path).
        time.sleep(0.5)  # spares are started once a worker is idle
        self.pids = {"supervisor": [self.process.pid], "workers": [w["pid"] for w in workers_state],
                     "redo children": sorted(set().union(*(children_of(w["pid"]) for w in workers_state)))}

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


def hot_mix(requests: list, share: float = 0.9, size: int = 400, seed: int = 7) -> list:
    """``share`` of the requests on one relation (its pages repeated), the rest uniform."""
    by_relation: dict = {}
    for request in requests:
        by_relation.setdefault(request[0].relation, []).append(request)
    hot = max(by_relation.values(), key=len)
    rng = random.Random(seed)
    return [rng.choice(hot) if rng.random() < share else rng.choice(requests) for _ in range(size)]


def serve_overhead(requests: list, data_dir: Path, cpu: int, rounds: int = 5) -> dict:
    """Our per-request Python in a worker, sockets aside: RequestServer.serve (decode, check, rebuild, encode)
    against RedoEngine.redo alone on the same requests, in this process, pinned with the child to one CPU."""
    from walredod.engine import RedoEngine
    from walredod.daemon.worker import RequestServer

    os.sched_setaffinity(0, {cpu})
    frames = [protocol.encode_redo_request(i, *r) for i, r in enumerate(requests)]
    best = {"engine.redo": float("inf"), "worker serve": float("inf")}
    with RedoEngine(data_dir=data_dir) as engine:
        server = RequestServer(engine, "study")
        for _ in range(rounds):  # the best round of each: the least disturbed by the machine's neighbours
            t0 = time.process_time()
            for request in requests:
                engine.redo(*request)
            t1 = time.process_time()
            for body in frames:
                server.serve(body, None)
            t2 = time.process_time()
            best["engine.redo"] = min(best["engine.redo"], (t1 - t0) / len(requests) * 1e6)
            best["worker serve"] = min(best["worker serve"], (t2 - t1) / len(requests) * 1e6)
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    best["overhead"] = best["worker serve"] - best["engine.redo"]
    return {k: round(v, 1) for k, v in best.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    seconds = args.seconds
    sets = benchmark.read_sample()
    short = sets["short"]
    cpus = sorted(os.sched_getaffinity(0))
    ncpu = len(cpus)
    work = Path(tempfile.mkdtemp(prefix="walredod-study-"))
    work.chmod(0o755)
    runs = []
    run = benchmark.run
    via_supervisor = {"direct": False}
    zeromq_only = {"local": False}
    faults = {}

    # 1. One synchronous client, short requests: the engine directly, then the daemon (1 worker) by placement,
    #    on the direct data path (the default) and through the supervisor.
    runs.append(run("engine direct, one CPU", "engine", short, engine_options={"data_dir": work / "data"},
                    client_cpus=[cpus[0]], duration=seconds))
    runs.append(run("engine direct, unpinned", "engine", short, engine_options={"data_dir": work / "data"},
                    duration=seconds))
    placements = {}
    for label, placement, supervisor_cpu, client_cpus in (
            ("daemon 1 worker, default (pair)", "pair", None, None),
            ("daemon 1 worker, placement none", "none", None, None),
            ("daemon 1 worker, all on one CPU", "pair", cpus[0], [cpus[0]]),
            ("daemon 1 worker, client+sup. on 2nd", "pair", cpus[-1], [cpus[-1]])):
        daemon = Daemon(work / label.replace(" ", "-").replace(",", ""), 1, placement, supervisor_cpu)
        try:
            result = run(label, "daemon", short, endpoint=daemon.endpoint, client_cpus=client_cpus,
                         stage_pids=daemon.pids, duration=seconds)
            runs.append(result)
            placements[label] = result
            if placement == "pair" and supervisor_cpu is None:
                runs.append(run("daemon 1 worker, ZeroMQ direct path", "daemon", short, endpoint=daemon.endpoint,
                                client_options=zeromq_only, stage_pids=daemon.pids, duration=seconds))
                runs.append(run("daemon 1 worker, via supervisor", "daemon", short, endpoint=daemon.endpoint,
                                client_options=via_supervisor, stage_pids=daemon.pids, duration=seconds))
                faults["bad requests interleaved"] = bad_requests_interleaved(daemon.endpoint, short, 1000)
                runs.append(run("daemon 1 worker, redo_many(64)", "daemon", short, endpoint=daemon.endpoint,
                                mode="pipelined", stage_pids=daemon.pids, duration=seconds))
        finally:
            daemon.stop()

    # 2. The transport floor in the same run: same frames, same hops, an echo instead of redo.
    tag, lsn, base, records = short[0]
    floor = floors(protocol.encode_redo_request(1, tag, lsn, base, records), seconds)
    unix_floor = unix_floors(local.encode_redo(1, tag, lsn, base, records), seconds, cpus)

    # 3. Throughput with workers = cores: the daemon pipelined vs engines driven directly, one process each.
    engines = run(f"engines direct x{ncpu}", "engine", short, engine_options={"data_dir": work / "data"},
                  clients=ncpu, client_cpus=cpus, duration=seconds)
    runs.append(engines)
    daemon = Daemon(work / "pool", ncpu, "pair")
    try:
        pool = run(f"daemon {ncpu} workers, pipelined x{ncpu}", "daemon", short, endpoint=daemon.endpoint,
                   mode="pipelined", clients=ncpu, stage_pids=daemon.pids, duration=seconds)
        pool_via = run(f"daemon {ncpu} workers, via supervisor", "daemon", short, endpoint=daemon.endpoint,
                       client_options=via_supervisor, mode="pipelined", clients=ncpu, stage_pids=daemon.pids,
                       duration=seconds)
        pool_zmq = run(f"daemon {ncpu} workers, pipelined, ZeroMQ", "daemon", short, endpoint=daemon.endpoint,
                       client_options=zeromq_only, mode="pipelined", clients=ncpu, stage_pids=daemon.pids,
                       duration=seconds)
        hot = run(f"daemon {ncpu} workers, 90% one relation", "daemon", hot_mix(short), endpoint=daemon.endpoint,
                  mode="pipelined", clients=ncpu, stage_pids=daemon.pids, duration=seconds)
        runs += [pool, pool_zmq, pool_via, hot]
        from walredod.engine import RedoEngine

        with RedoEngine(data_dir=work / "data") as engine:
            expected = [engine.redo(*request) for request in short]
        faults["redo children killed under load"] = kill_children_under_load(
            daemon.endpoint, short, expected, daemon.pids["workers"], clients=4, seconds=30.0, every=2.0)
    finally:
        daemon.stop()

    # 4. Our per-request Python in the worker, sockets aside.
    python_cost = serve_overhead(short, work / "data", cpus[0])

    benchmark.print_table(runs)
    by_label = {r.label: r for r in runs}
    engine_p50 = by_label["engine direct, one CPU"].percentile(0.5)
    engine_unpinned_p50 = by_label["engine direct, unpinned"].percentile(0.5)
    default = by_label["daemon 1 worker, default (pair)"]
    zeromq_direct = by_label["daemon 1 worker, ZeroMQ direct path"]
    via = by_label["daemon 1 worker, via supervisor"]
    best = min(placements.values(), key=lambda r: r.percentile(0.5))
    batch = by_label["daemon 1 worker, redo_many(64)"]
    echo_cpu = floor["direct_pipelined"]["cpu_us_per_request"]["echo"]
    broker_cpu = floor["brokered_pipelined"]["cpu_us_per_request"]["broker"]
    worker_cpu = pool.cpu_us_per_request["workers"]
    engine_driver_cpu = engines.cpu_us_per_request["client"]
    bad = faults["bad requests interleaved"]
    killed = faults["redo children killed under load"]

    def total_cpu(result) -> float:
        return sum(v for k, v in result.cpu_us_per_request.items() if not k.endswith("zmq I/O"))

    targets = {
        "local path: sync p50 / the same client's in-process engine p50, unpinned (<= 1.3)":
            default.percentile(0.5) / engine_unpinned_p50,
        "  local path p50 - AF_UNIX floor p50, unpinned (what redo and the child add, µs)":
            default.percentile(0.5) - unix_floor["sync, unpinned"]["p50_us"],
        "  ZeroMQ direct path p50 / in-process engine p50, unpinned": zeromq_direct.percentile(0.5) / engine_unpinned_p50,
        "local path: pipelined throughput / engines direct, workers = CPUs (>= 0.8)": pool.rate / engines.rate,
        "local path: CPU per request, all processes / in-process (<= 1.3)": total_cpu(pool) / total_cpu(engines),
        "  ZeroMQ direct pipelined throughput / engines direct": pool_zmq.rate / engines.rate,
        "local path: 1,000 bad requests interleaved, child restarts (0)": bad["child_restarts"],
        "local path: good p50 with bad interleaved / alone (<= 1.2)": bad["ratio"],
        "local path: kill -9 every 2 s, 4 clients, 30 s: wrong pages + errors (0)":
            killed["wrong_pages"] + killed["errors"],
        "  requests answered right meanwhile": killed["answered_right"],
        "daemon overhead / floor, direct path vs direct floor (<= 1.3)":
            (zeromq_direct.percentile(0.5) - engine_p50) / floor["direct_sync"]["p50_us"],
        "daemon overhead / floor, via supervisor vs broker floor (<= 1.3)":
            (via.percentile(0.5) - engine_p50) / floor["brokered_sync"]["p50_us"],
        "default placement p50 / best placement p50 (<= 1.2)": default.percentile(0.5) / best.percentile(0.5),
        "supervisor CPU µs per request, direct path (<= 15)": pool.cpu_us_per_request.get("supervisor", 0.0),
        "supervisor CPU µs per request, via supervisor": pool_via.cpu_us_per_request["supervisor"],
        "  the floor's broker, for comparison": broker_cpu,
        "worker CPU µs per request, all of it": worker_cpu,
        "  of which our Python: worker - echo floor - engine driver (<= 20)":
            worker_cpu - echo_cpu - engine_driver_cpu,
        "  our Python, sockets aside: serve - engine.redo in one process (<= 20)": python_cost["overhead"],
        "daemon pipelined / engines direct throughput (>= 0.7)": pool.rate / engines.rate,
        "  the floor's own: direct echo pipelined / engines direct":
            floor["direct_pipelined"]["requests_per_s"] / engines.rate,
        "hot relation / uniform throughput (>= 0.8)": hot.rate / pool.rate,
        "redo_many(64) / redo per-request time (<= 0.5)": batch.percentile(0.5) / default.percentile(0.5),
        "the direct path saves (µs p50, via supervisor - direct, 1 worker)":
            via.percentile(0.5) - default.percentile(0.5),
        "  the floor said (µs p50, brokered - direct)":
            floor["brokered_sync"]["p50_us"] - floor["direct_sync"]["p50_us"],
    }
    print(f"\nfloor (same run): {json.dumps(floor)}")
    print(f"AF_UNIX floor of the local path (same run): {json.dumps(unix_floor)}")
    print(f"faults on the local path: {json.dumps(faults)}")
    print(f"worker Python, sockets aside (µs per request): {json.dumps(python_cost)}")
    print(f"best placement by hand: {best.label}")
    for name, value in targets.items():
        print(f"  {name:<76} {value:8.2f}")
    benchmark.save(runs, RESULTS / "daemon_study.json", RESULTS / "daemon_study.png",
                   {"floor": floor, "unix_floor": unix_floor, "faults": faults, "targets": targets,
                    "worker_python": python_cost, "cpus": cpus})
    print(f"written {RESULTS / 'daemon_study.json'} and {RESULTS / 'daemon_study.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
