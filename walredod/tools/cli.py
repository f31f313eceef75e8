"""The `walredod` command."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from walredod.config import ConfigError, EngineSettings
from walredod.errors import WalredodError

DATA_DIR_HELP = ("the engine's data directory: template cluster and redo children's datadirs (engine.data_dir; "
                 "default: /var/lib/walredod as root, else ~/.local/state/walredod)")


def doctor(args: argparse.Namespace) -> int:
    """Check that this machine can rebuild pages: binaries, template cluster, a child that starts and answers, and
    the sandbox that child is in. With --wal: say which heap record format a WAL directory holds instead."""
    if args.wal:
        return doctor_wal(args.wal)
    from walredod.engine import RedoEngine
    from walredod.engine.datadir import find_extension, find_postgres_bin

    if args.endpoint:
        return _doctor_daemon(args.endpoint[0], args.timeout)
    settings = EngineSettings(**({"data_dir": args.data_dir} if args.data_dir else {}),
                              **({"sandbox": args.sandbox} if args.sandbox else {}))
    print(f"postgres binary : {find_postgres_bin(settings)}")
    print(f"extension       : {find_extension(settings)}")
    print(f"data directory  : {settings.data_dir}")
    started = time.perf_counter()
    with RedoEngine(settings) as engine:
        ready = time.perf_counter() - started
        print(f"engine ready    : {ready * 1000:.1f} ms (child pid {engine.child_pid}, spare pid {engine.spare_pid})")
        rounds = []
        for _ in range(args.pings):
            t0 = time.perf_counter_ns()
            engine.ping()
            rounds.append(time.perf_counter_ns() - t0)
        rounds.sort()
        print(f"ping round trip : p50 {rounds[len(rounds) // 2] / 1000:.1f} us over {len(rounds)} pings")
        sandbox_ok = _doctor_sandbox(settings, engine)
    if not sandbox_ok:
        print(f"FAILED: the sandbox is not in force (engine.sandbox = {settings.sandbox!r})")
        return 1
    print("ok: this machine can run walredod's redo engine")
    return 0


def _doctor_daemon(endpoint: str, timeout: float) -> int:
    """The sandbox of each live redo child of a running daemon, as the kernel reports it (each child also logs its
    "sandbox in force" line, with its Landlock ABI, when it starts)."""
    from walredod.client import RedoClient
    from walredod.engine.sandbox import process_sandbox

    with RedoClient(endpoint) as client:
        workers = client.status(timeout=timeout)["workers"]
    confined = True
    for worker in workers:
        pid = worker.get("child_pid")
        if not pid:
            print(f"worker {worker['slot']}: no redo child now ({worker['state']})")
            continue
        try:
            process = process_sandbox(pid)
        except OSError as exc:
            print(f"worker {worker['slot']}: redo child {pid}: cannot read /proc ({exc.strerror})")
            confined = False
            continue
        ok = process.seccomp == 2 and process.no_new_privs and not process.dumpable
        confined &= ok
        print(f"worker {worker['slot']}: redo child {process.describe()}{'' if ok else ': NOT SANDBOXED'}")
    return 0 if confined else 1


def _doctor_sandbox(settings: EngineSettings, engine) -> bool:
    """Print the sandbox of the engine's live child and of a probe child that tries to break out of it."""
    from walredod.engine.sandbox import probe_sandbox, process_sandbox

    report = engine.child_sandbox()
    process = process_sandbox(engine.child_pid)
    print(f"sandbox setting : {settings.sandbox}")
    print(f"child sandbox   : {report or 'nothing said'}")
    print(f"child process   : {process.describe()}")
    if settings.sandbox == "off":
        return True
    # The probe child tries what a taken-over child would: the live child's datadir and memory, the extension
    # every child loads, the data directory, a socket of its own (the daemon's sockets).
    datadir = engine.child_datadir
    actions = [f"read:{datadir}/PG_VERSION", f"write:{datadir}/postgresql.auto.conf", f"write:{engine.extension}",
               f"read:/proc/{engine.child_pid}/mem", f"list:{engine.data_root}", "socket"]
    probe = probe_sandbox(settings, actions)
    for action in actions:
        print(f"probe           : {action}: {probe.outcomes.get(action, 'not run')}")
    in_force = (report is not None and "seccomp=none" not in report and "landlock=none" not in report
                and process.seccomp == 2 and process.no_new_privs and not process.dumpable)
    refused = all(probe.outcomes.get(a, "").startswith(("denied", "killed")) for a in actions)
    return (in_force and refused) or settings.sandbox == "best_effort"


_FORMAT_ADVICE = {
    "vanilla": 'vanilla PostgreSQL 15: engine.kind = "vanilla", engine.wal_format = "vanilla" (the defaults)',
    "neon": 'a Neon compute (PostgreSQL 15): engine.wal_format = "neon" (or engine.kind = "neon", Neon\'s binary)',
}


def doctor_wal(wal_dir: Path) -> int:
    """Scan a WAL directory's heap records and say which format they are in (exit 1 when they do not agree)."""
    from walredod.types import format_lsn
    from walredod.wal import WalReader
    from walredod.walformat import classify

    reader = WalReader(wal_dir)
    report = classify(reader.records())
    start = format_lsn(reader.start_lsn) if reader.start_lsn is not None else "-"
    print(f"WAL             : {wal_dir}, {report.records} records from {start} "
          f"to {format_lsn(reader.end_lsn)} ({reader.end_reason})")
    print(f"heap records    : {report.heap_records}, {report.telling} of them with a format-dependent layout")
    print(f"layout fits     : vanilla only {report.fits['vanilla']}, neon only {report.fits['neon']}, "
          f"both {report.fits['both']}, neither {report.fits['neither']}")
    for fmt, record in report.first_misfit.items():
        label = f"first not {fmt}"
        print(f"{label:<16}: {record}")
    verdict = report.verdict
    if verdict in _FORMAT_ADVICE:
        print(f"format          : {verdict}: WAL from {_FORMAT_ADVICE[verdict]}")
        if report.fits["neither"]:
            print(f"warning         : {report.fits['neither']} heap records fit neither format (damaged WAL?)")
        return 0
    if verdict == "undecided":
        print("format          : undecided: no heap record here depends on the format")
        return 0
    print("format          : mixed: some heap records fit only the vanilla layout and others only Neon's; "
          "one WAL comes from one server, so this WAL is damaged or assembled from two sources")
    return 1


def _overrides(args: argparse.Namespace) -> dict:
    overrides = {}
    if getattr(args, "endpoint", None):
        overrides["daemon.endpoints"] = args.endpoint
    if getattr(args, "workers", None) is not None:
        overrides["daemon.workers"] = args.workers
    if getattr(args, "data_dir", None):
        overrides["engine.data_dir"] = args.data_dir
    return overrides


def serve(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT."""
    from walredod.config import load_settings
    from walredod.daemon.supervisor import Supervisor

    settings = load_settings(args.config, _overrides(args))
    return Supervisor(settings, args.config, _overrides(args)).run()


def check_config(args: argparse.Namespace) -> int:
    from walredod.config import load_settings

    from walredod.daemon import preflight

    settings = load_settings(args.config, _overrides(args))
    preflight.check(settings, args.config)
    print(f"{args.config or 'defaults'}: ok")
    if args.verbose:
        print(settings.model_dump_json(indent=2))
    return 0


def status(args: argparse.Namespace) -> int:
    """Each worker's state, pid, child pid, requests served and restarts."""
    from walredod.client import CurveKeys, RedoClient
    from walredod.config import load_settings

    endpoint = args.endpoint[0] if args.endpoint else load_settings(args.config).daemon.endpoints[0]
    curve = CurveKeys.load(args.server_key, args.key) if args.server_key and args.key else None
    with RedoClient(endpoint, curve=curve) as client:
        state = client.status(timeout=args.timeout)
    print(f"supervisor {state['pid']}: {state['pending']} requests pending, {state['waiting']} waiting"
          f"{', stopping' if state['stopping'] else ''}")
    print(f"{'slot':>4} {'state':<10} {'pid':>8} {'child':>8} {'in flight':>9} {'served':>10}  restarts")
    for w in state["workers"]:
        restarts = ", ".join(f"{cause}: {n}" for cause, n in w["restarts"].items()) or "-"
        print(f"{w['slot']:>4} {w['state']:<10} {w['pid'] or '-':>8} {w['child_pid'] or '-':>8} "
              f"{w['in_flight']:>9} {w['served']:>10}  {restarts}; redo children replaced: {w['child_restarts']}")
    return 0


def keygen(args: argparse.Namespace) -> int:
    """A CURVE key pair for tcp:// endpoints: the daemon's, or a client's."""
    from walredod.daemon.auth import keygen as make_keys

    if (args.directory / f"{args.name}.key_secret").exists():
        raise SystemExit(f"walredod keygen: {args.directory / args.name}.key_secret exists; not overwriting it")
    public, secret = make_keys(args.directory, args.name)
    print(f"public key {public} (give it to the other side)\nsecret key {secret} (keep it; mode 0600)")
    return 0


def bench(args: argparse.Namespace) -> int:
    """Real request sets against one engine or a running daemon: a table, a JSON result and a PNG plot."""
    from walredod.tools import benchmark

    sets = benchmark.read_sample(args.sample) if args.sample else benchmark.read_sample()
    if args.mix not in sets:
        raise SystemExit(f"walredod bench: no request set {args.mix!r}; the sample has {', '.join(sets)}")
    requests = sets[args.mix]
    if args.target == "daemon" and not args.endpoint:
        raise SystemExit("walredod bench: --endpoint is needed to drive a daemon")
    results = []
    for clients in args.clients:
        path = " via supervisor" if args.target == "daemon" and args.via_supervisor else ""
        label = f"{args.target}{path} {args.mix} {args.mode} x{clients}"
        results.append(benchmark.run(label, args.target, requests, endpoint=args.endpoint and args.endpoint[0],
                                     engine_options={"data_dir": args.data_dir} if args.data_dir else {},
                                     client_options={"direct": not args.via_supervisor}, mode=args.mode,
                                     clients=clients, duration=args.seconds))
    benchmark.print_table(results)
    benchmark.save(results, args.json, args.plot)
    print(f"written {args.json}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="walredod", description="WAL redo daemon for disaggregated PostgreSQL")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("doctor", help="check the set-up: start a redo engine, ping it, show and probe its "
                            "sandbox; or, with --wal, say which format a WAL directory holds")
    p.add_argument("--data-dir", type=Path, help=DATA_DIR_HELP)
    p.add_argument("--pings", type=int, default=1000)
    p.add_argument("--sandbox", choices=["required", "best_effort", "off"],
                   help="the engine.sandbox setting to check with (default: required)")
    p.add_argument("--endpoint", action="append",
                   help="instead, show the sandbox of each redo child of the daemon serving this endpoint")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--wal", type=Path, metavar="DIR",
                   help="scan this WAL directory (or segment file) instead: vanilla PostgreSQL 15 or Neon compute "
                   "heap records, and the engine settings to use")
    p.set_defaults(func=doctor)

    def daemon_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="TOML configuration file (default: embedded defaults)")
        p.add_argument("--endpoint", action="append", help="client endpoint, e.g. ipc:///run/walredod/walredod.sock "
                       "or tcp://127.0.0.1:5555 (repeatable; replaces the configured ones)")

    p = commands.add_parser("serve", help="run the daemon: a supervisor and N workers")
    daemon_options(p)
    p.add_argument("--workers", type=int, help="worker processes (0: one per CPU)")
    p.add_argument("--data-dir", type=Path, help=DATA_DIR_HELP)
    p.set_defaults(func=serve)

    p = commands.add_parser("check-config", help="validate the configuration without starting")
    daemon_options(p)
    p.add_argument("--workers", type=int)
    p.add_argument("--data-dir", type=Path, help=DATA_DIR_HELP)
    p.set_defaults(func=check_config)

    p = commands.add_parser("status", help="print each worker's state, pid, child pid, requests served, restarts")
    daemon_options(p)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--server-key", type=Path, help="a CURVE tcp endpoint: the daemon's public key file")
    p.add_argument("--key", type=Path, help="a CURVE tcp endpoint: this client's .key_secret file")
    p.set_defaults(func=status)

    p = commands.add_parser("keygen", help="make a CURVE key pair (daemon: curve_secret_key_file; clients: their "
                            "public key goes into the daemon's curve_client_keys directory)")
    p.add_argument("directory", type=Path)
    p.add_argument("--name", default="walredod", help="file names: NAME.key (public), NAME.key_secret")
    p.set_defaults(func=keygen)

    p = commands.add_parser("bench", help="benchmark one engine or a running daemon on real request sets")
    p.add_argument("--target", choices=["engine", "daemon"], default="engine")
    p.add_argument("--endpoint", action="append", help="the daemon's endpoint (with --target daemon)")
    p.add_argument("--mix", default="short", help="request set: short, medium, natural-heap-btree, natural-index")
    p.add_argument("--mode", choices=["sync", "pipelined"], default="sync")
    p.add_argument("--via-supervisor", action="store_true",
                   help="send every request through the supervisor, not the direct data path (with --target daemon)")
    p.add_argument("--clients", type=int, nargs="+", default=[1], help="concurrent client processes (one run each)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--sample", type=Path, help="request sample (default: walredod/tools/data/requests.bin.gz)")
    p.add_argument("--data-dir", type=Path, help=DATA_DIR_HELP + " (with --target engine)")
    p.add_argument("--json", type=Path, default=Path("bench/results/walredod_bench.json"))
    p.add_argument("--plot", type=Path, default=Path("bench/results/walredod_bench.png"))
    p.set_defaults(func=bench)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except WalredodError as exc:
        print(f"walredod: {exc.code}: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"walredod: configuration: {exc}", file=sys.stderr)
        return 2
