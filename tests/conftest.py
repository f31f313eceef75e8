"""Shared fixtures: a real PostgreSQL 15 scenario (built once per session) and a redo engine."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test helper modules (waldump, records)

from groundtruth.cluster import PgCluster, pg_available  # noqa: E402

# No test is timed (speed is for bench/): hypothesis's per-example deadline would fail on a loaded machine.
settings.register_profile("walredod", deadline=None)
settings.load_profile("walredod")

REPORTS: list[str] = []  # tables printed at the end of the run (pages checked per rmgr, ...)


def report_comparison(title: str, columns: tuple[str, str, str], rows: dict[str, tuple[int, int]],
                      skipped: dict[str, int]) -> None:
    """Print a comparison table now and again at the end of the run: one row per kind, then what was skipped."""
    name, first, second = columns
    table = [title, f"  {name:<18} {first:>8} {second:>16}"]
    table += [f"  {kind:<18} {a:>8} {b:>16}" for kind, (a, b) in sorted(rows.items())]
    table += [f"  skipped {count}: {reason}" for reason, count in sorted(skipped.items())]
    REPORTS.append("\n".join(table))
    print("\n".join(table))


def world_traversable_tmpdir(prefix: str) -> Path:
    """A temp dir the unprivileged PostgreSQL user can reach (pytest's own tmp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    return path


@pytest.fixture(scope="session")
def scenario():
    if not pg_available():
        pytest.fail("PostgreSQL 15 binaries are missing: run the README's set-up (make setup)")
    from groundtruth.scenario import build_scenario

    built = build_scenario(world_traversable_tmpdir("walredod-scenario-"))
    REPORTS.append(f"ground-truth scenario: {built.describe()}")
    return built


@pytest.fixture(scope="session")
def wal_records(scenario):
    """Every record of the scenario's WAL, decoded."""
    from walredod.wal import WalReader

    return list(WalReader(scenario.wal_dir).records())


@pytest.fixture(scope="session")
def redo_engine(engine_data_dir):
    """An engine for the scenario's WAL: its server runs with wal_log_hints = on (to make FPI_FOR_HINT records)."""
    from walredod.engine import RedoEngine

    with RedoEngine(data_dir=engine_data_dir, source_logs_hint_bits=True) as engine:
        yield engine


@pytest.fixture(scope="session")
def real_requests(scenario):
    """Every main- and init-fork page touched after the scenario's second cut, as a request with PostgreSQL's own
    page at the end: (tag, lsn, base image or None, records, expected page)."""
    from groundtruth.cluster import read_page
    from walredod.ingest import page_histories
    from walredod.wal import WalReader

    cut = scenario.cuts[1]
    requests = []
    for tag, history in sorted(page_histories(WalReader(scenario.wal_dir).records(), since_lsn=cut).items()):
        expected = read_page(scenario.final_dir, tag)
        if tag.forknum in (0, 3) and expected is not None:
            base = None if history.starts_empty else read_page(scenario.recovered[cut], tag)
            requests.append((tag, history.lsn, base, history.wal_records(), expected))
    return requests


@pytest.fixture(scope="session")
def panicking_request(real_requests):
    """A real heap insert at offset >= 2 applied to an empty page: heap redo PANICs ("invalid max offset")."""
    from walredod.pg15 import RM_HEAP_ID, XLOG_HEAP_INSERT, init_page
    from walredod.wal import decode_record

    for tag, _lsn, _base, records, _ in real_requests:
        for record in records:
            decoded = decode_record(record.data)
            if (decoded.rmid == RM_HEAP_ID and decoded.rmgr_info == XLOG_HEAP_INSERT and decoded.blocks[0].tag == tag
                    and int.from_bytes(decoded.main_data[:2], "little") >= 2):
                return tag, record.lsn, bytes(init_page()), [record]
    raise AssertionError("no heap insert in the scenario")


@pytest.fixture(scope="session")
def small_wal():
    """WAL with 1 MB segments (records cross segments; a segment switch) from a short real workload."""
    root = world_traversable_tmpdir("walredod-smallwal-")
    cluster = PgCluster(root / "data", root / "sockets")
    cluster.initdb(wal_segsize_mb=1)
    cluster.start()
    try:
        cluster.sql("CREATE TABLE t (id int PRIMARY KEY, v text); CHECKPOINT;")
        cluster.sql("INSERT INTO t SELECT g, repeat('x', g % 500) FROM generate_series(1, 20000) g")
        cluster.sql("SELECT pg_switch_wal()")
        cluster.sql("CHECKPOINT; UPDATE t SET v = v || 'y' WHERE id % 3 = 0")
        cluster.sql("CREATE INDEX t_v ON t (v)")
    finally:
        cluster.stop("immediate")
    return cluster.datadir / "pg_wal"


@pytest.fixture(scope="session")
def engine_data_dir():
    return world_traversable_tmpdir("walredod-engine-")


def pytest_terminal_summary(terminalreporter):
    for report in REPORTS:
        terminalreporter.write_line(report)
