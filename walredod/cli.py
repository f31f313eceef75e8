"""The `walredod` command."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from walredod.config import EngineSettings
from walredod.errors import WalredodError


def doctor(args: argparse.Namespace) -> int:
    """Check that this machine can rebuild pages: binaries, template cluster, a child that starts and answers."""
    from walredod.engine import RedoEngine
    from walredod.engine.datadir import find_extension, find_postgres_bin

    settings = EngineSettings(**({"data_dir": args.data_dir} if args.data_dir else {}))
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
    print("ok: this machine can run walredod's redo engine")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="walredod", description="WAL redo daemon for disaggregated PostgreSQL")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("doctor", help="check the set-up: start a redo engine and ping it")
    p.add_argument("--data-dir", help="data directory (default: /var/lib/walredod as root, else ~/.local/state)")
    p.add_argument("--pings", type=int, default=1000)
    p.set_defaults(func=doctor)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except WalredodError as exc:
        print(f"walredod: {exc.code}: {exc}", file=sys.stderr)
        return 1
