"""One ground-truth scenario: real WAL, plus PostgreSQL's own recovered pages at cut points and at the end.

    schema, CHECKPOINT, base backup, phase 1, cut 1, phase 2, cut 2, phase 3, immediate stop

then PostgreSQL recovers copies of the backup to cut 1, to cut 2, and to the end of the WAL. A page rebuilt by
walredod from its image at a cut plus its records after the cut must equal the page in the copy recovered to the
end.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from groundtruth.cluster import PgCluster, recover_copy
from groundtruth.workloads import PHASES, SCHEMA, WAL_COMPRESSION
from walredod.types import format_lsn

log = logging.getLogger(__name__)


@dataclass
class Scenario:
    wal_dir: Path
    backup_dir: Path
    cuts: list[int]
    recovered: dict[int, Path]  # cut LSN -> copy recovered to just before it
    final_dir: Path  # copy recovered to the end of the WAL
    seconds: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        wal_mb = sum(p.stat().st_size for p in self.wal_dir.iterdir()) / 2**20
        cuts = ", ".join(format_lsn(c) for c in self.cuts)
        times = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        return f"WAL {wal_mb:.0f} MB in {self.wal_dir}; cuts at {cuts}; {times}"


def build_scenario(workdir: Path, wal_segsize_mb: int = 16) -> Scenario:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    sockets = workdir / "sockets"
    cluster = PgCluster(workdir / "source", sockets)
    seconds: dict[str, float] = {}
    started = time.monotonic()
    cluster.initdb(wal_segsize_mb)
    cluster.start()
    try:
        cluster.sql(";\n".join(SCHEMA) + ";\nCHECKPOINT;")
        backup = cluster.basebackup(workdir / "backup")
        seconds["schema and backup"] = time.monotonic() - started
        cuts = []
        for number, (phase, compression) in enumerate(zip(PHASES, WAL_COMPRESSION), start=1):
            t0 = time.monotonic()
            cluster.sql(f"ALTER SYSTEM SET wal_compression = '{compression}'; SELECT pg_reload_conf();")
            for statement in phase:
                cluster.sql(statement)
            seconds[f"phase {number}"] = time.monotonic() - t0
            if number < len(PHASES):
                cuts.append(cluster.current_wal_insert_lsn())
        cluster.stop("immediate")
    except BaseException:
        log.error("scenario failed; server log:\n%s", cluster.log_tail())
        if cluster.running:
            cluster.stop("immediate")
        raise

    wal_dir = workdir / "wal"
    wal_dir.mkdir()
    for segment in sorted((cluster.datadir / "pg_wal").iterdir()):
        if segment.is_file() and len(segment.name) == 24:
            shutil.copy(segment, wal_dir / segment.name)
            cluster.run_as.chown(wal_dir / segment.name)
    cluster.make_dir(wal_dir)

    t0 = time.monotonic()
    recovered = {cut: recover_copy(backup, workdir / f"at-{cut:X}", wal_dir, sockets, cut) for cut in cuts}
    final = recover_copy(backup, workdir / "final", wal_dir, sockets, None)
    seconds["recovery"] = time.monotonic() - t0
    return Scenario(wal_dir, backup, cuts, recovered, final, seconds)
