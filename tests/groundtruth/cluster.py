"""A real PostgreSQL 15 server for tests and benchmarks: make WAL, back up, and recover copies.

PostgreSQL refuses to run as root; as root, every server and tool here runs as the unprivileged user the redo
children use (walredod.engine.datadir.RunAs).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path

from walredod.config import EngineSettings
from walredod.engine.datadir import RunAs
from walredod.types import BLCKSZ, BufferTag, parse_lsn

log = logging.getLogger(__name__)

PG_BINDIR = Path("/usr/lib/postgresql/15/bin")
SEGMENT_BYTES = 1 << 30  # relation files are cut into 1 GB segments
FORK_SUFFIXES = ("", "_fsm", "_vm", "_init")
DEFAULT_TABLESPACE, GLOBAL_TABLESPACE = 1663, 1664

# Settings that make WAL of every kind quickly and keep the server from touching pages behind our back.
SERVER_SETTINGS = {
    "listen_addresses": "''",
    "fsync": "off",
    "synchronous_commit": "off",
    "autovacuum": "off",
    "wal_log_hints": "on",
    "full_page_writes": "on",
    "wal_level": "replica",
    "max_wal_size": "'4GB'",
    "wal_keep_size": "'4GB'",
    "checkpoint_timeout": "'1h'",
    "hot_standby": "off",
    "shared_buffers": "'16MB'",
    "max_connections": "10",
    "max_prepared_transactions": "5",
    "logging_collector": "off",
    "log_min_messages": "warning",
}


def pg_available() -> bool:
    return (PG_BINDIR / "postgres").is_file() and (PG_BINDIR / "initdb").is_file()


class PgCluster:
    """One PostgreSQL 15 datadir, reached over a unix socket in ``socket_dir``."""

    def __init__(self, datadir: Path, socket_dir: Path, run_as: RunAs | None = None):
        self.datadir = Path(datadir)
        self.socket_dir = Path(socket_dir)
        self.run_as = run_as or RunAs.for_settings(EngineSettings())
        self.running = False

    def _run(self, argv: list, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("check", True)
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        try:
            return subprocess.run([str(a) for a in argv], env=self._env(), **self.run_as.popen_kwargs(), **kwargs)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"{' '.join(map(str, argv))} failed:\n{exc.stdout}\n{exc.stderr}") from None

    def _env(self) -> dict:
        return {"PATH": f"{PG_BINDIR}:/usr/bin:/bin", "LC_ALL": "C", "PGHOST": str(self.socket_dir),
                "PGUSER": "postgres", "PGDATABASE": "postgres", "HOME": str(self.socket_dir)}

    def make_dir(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        self.run_as.chown(path)
        return path

    def initdb(self, wal_segsize_mb: int = 16, settings: dict | None = None) -> None:
        self.make_dir(self.socket_dir)
        self.make_dir(self.datadir.parent)
        self._run([PG_BINDIR / "initdb", "-D", self.datadir, "-U", "postgres", "--no-sync", "-N", "--locale=C",
                   "-E", "UTF8", f"--wal-segsize={wal_segsize_mb}", "--auth=trust"])
        config = {**SERVER_SETTINGS, "unix_socket_directories": f"'{self.socket_dir}'", **(settings or {})}
        with open(self.datadir / "postgresql.auto.conf", "a") as f:
            f.writelines(f"{key} = {value}\n" for key, value in config.items())

    def start(self) -> None:
        self._run([PG_BINDIR / "pg_ctl", "-D", self.datadir, "-l", self.datadir / "server.log", "-w", "-t", "120",
                   "start"])
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        if self.running:
            self._run([PG_BINDIR / "pg_ctl", "-D", self.datadir, "-m", mode, "-w", "-t", "120", "stop"])
            self.running = False

    def wait_promoted(self, timeout: float = 300.0) -> None:
        """Wait until recovery has ended and the server runs out of recovery.

        pg_ctl -w returns as soon as a server without hot standby has started recovering, long before it is done.
        The control file says when it is; asking the server would connect, and a connection reads catalog pages
        and sets their hint bits, which (with wal_log_hints) writes them anew.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            control = self._run([PG_BINDIR / "pg_controldata", "-D", self.datadir], check=False).stdout
            if "Database cluster state:               in production" in control:
                return
            if not (self.datadir / "postmaster.pid").exists():
                raise RuntimeError(f"{self.datadir}: the server stopped during recovery:\n{self.log_tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.datadir}: recovery did not end within {timeout:g} s:\n{self.log_tail()}")

    def sql(self, text: str, database: str = "postgres") -> str:
        result = self._run([PG_BINDIR / "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-d", database],
                           input=text)
        return result.stdout.strip()

    def current_wal_insert_lsn(self) -> int:
        return parse_lsn(self.sql("SELECT pg_current_wal_insert_lsn()"))

    def basebackup(self, dest: Path) -> Path:
        self.make_dir(dest.parent)
        self._run([PG_BINDIR / "pg_basebackup", "-D", dest, "-X", "fetch", "-c", "fast", "--no-sync"])
        return dest

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.datadir / "server.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def recover_copy(backup: Path, dest: Path, wal_archive: Path, socket_dir: Path, target_lsn: int | None,
                 run_as: RunAs | None = None) -> Path:
    """PostgreSQL's own recovery of a copy of ``backup``, from WAL in ``wal_archive``, to ``target_lsn``.

    With a target, recovery stops before the first record that starts at or after it (inclusive = off); without
    one, at the end of the archive's valid WAL. Then the copy is promoted and shut down cleanly, so every page
    recovery touched is on disk.
    """
    shutil.copytree(backup, dest, symlinks=True)
    cluster = PgCluster(dest, socket_dir, run_as)
    for path in [dest, *dest.rglob("*")]:
        cluster.run_as.chown(path)
    settings = {"restore_command": f"'cp {wal_archive}/%f %p'", "recovery_target_action": "'promote'",
                "unix_socket_directories": f"'{socket_dir}'"}
    if target_lsn is not None:
        settings["recovery_target_lsn"] = f"'{target_lsn >> 32:X}/{target_lsn & 0xFFFFFFFF:X}'"
        settings["recovery_target_inclusive"] = "off"
    with open(dest / "postgresql.auto.conf", "a") as f:
        f.writelines(f"{key} = {value}\n" for key, value in settings.items())
    (dest / "recovery.signal").touch()
    cluster.run_as.chown(dest / "recovery.signal")
    cluster.make_dir(socket_dir)
    try:
        cluster.start()
        cluster.wait_promoted()
        cluster.stop("fast")
    except BaseException:
        log.error("recovery of %s failed:\n%s", dest, cluster.log_tail())
        cluster.running = True
        _stop_quietly(cluster)
        raise
    return dest


def _stop_quietly(cluster: PgCluster) -> None:
    try:
        cluster.stop("immediate")
    except Exception:  # noqa: BLE001 - best effort while already failing
        pass


def relation_path(datadir: Path, spcnode: int, dbnode: int, relnode: int, forknum: int) -> Path:
    if spcnode == GLOBAL_TABLESPACE:
        base = datadir / "global"
    elif spcnode == DEFAULT_TABLESPACE:
        base = datadir / "base" / str(dbnode)
    else:
        base = next((datadir / "pg_tblspc" / str(spcnode)).glob("PG_15_*")) / str(dbnode)
    return base / f"{relnode}{FORK_SUFFIXES[forknum]}"


def read_page(datadir: Path, tag: BufferTag) -> bytes | None:
    """The page as stored in ``datadir``; None when its file is missing or shorter."""
    path = relation_path(Path(datadir), tag.spcnode, tag.dbnode, tag.relnode, tag.forknum)
    segment, offset = divmod(tag.blkno * BLCKSZ, SEGMENT_BYTES)
    if segment:
        path = path.with_name(f"{path.name}.{segment}")
    return _read_range(path, offset, BLCKSZ)


def _read_range(path: Path, offset: int, size: int) -> bytes | None:
    """``size`` bytes at ``offset``; None when the file is missing or too short."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except FileNotFoundError:
        return None
    return data if len(data) == size else None


def read_object(datadir: Path, tag) -> bytes | None:
    """An SLRU page, relation-map file or two-phase state file as stored in ``datadir``; None when absent."""
    from walredod.objects import SLRU_PAGES_PER_SEGMENT, RelMapTag, SlruKind, SlruPageTag, TwoPhaseTag

    datadir = Path(datadir)
    if isinstance(tag, SlruPageTag):
        directory = {SlruKind.CLOG: "pg_xact", SlruKind.MULTIXACT_OFFSETS: "pg_multixact/offsets",
                     SlruKind.MULTIXACT_MEMBERS: "pg_multixact/members"}[tag.kind]
        segment, page = divmod(tag.pageno, SLRU_PAGES_PER_SEGMENT)
        path, offset, size = datadir / directory / f"{segment:04X}", page * BLCKSZ, BLCKSZ
    elif isinstance(tag, RelMapTag):
        path = (datadir / "global" if tag.dbnode == 0
                else relation_path(datadir, tag.spcnode, tag.dbnode, 0, 0).parent) / "pg_filenode.map"
        offset, size = 0, 512
    elif isinstance(tag, TwoPhaseTag):
        path = datadir / "pg_twophase" / f"{tag.xid:08X}"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
    else:
        return read_page(datadir, tag)
    return _read_range(path, offset, size)
