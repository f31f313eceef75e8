"""The files a redo child needs: PostgreSQL binaries, our extension, and a scratch datadir.

initdb takes about a second, so one template cluster is initdb'd once per data directory (under a lock, so parallel
engines and workers share it) and each child gets a fresh copy of its own (a child datadir, under ``children/``),
removed when the child is gone. A child reads tenants' WAL and may be taken over, so nothing it can write outlives
it: not its datadir (the next child would start, not yet sandboxed, from whatever it left there), not the template
or the extension.

Who owns what: when the daemon is root the children run as a user of their own (``walredod-redo``); the data
directory, ``children/``, the template and the extension belong to the daemon, and a child owns only its datadir
(0700). When the daemon is not root (the systemd unit runs everything as ``walredod``) ownership cannot separate
them; the child's sandbox (Landlock) confines it to its datadir instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import importlib.resources
import logging
import os
import pwd
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from walredod.config import EngineSettings
from walredod.errors import Unavailable

log = logging.getLogger(__name__)

DEFAULT_RUN_AS = "walredod-redo"
EXTENSION_NAME = "walredod_redo.so"
CHILD_DATADIRS = "children"  # under the data directory: one datadir per redo child
# Databases the child never connects to; dropping their files makes each copy a third of the size.
_UNUSED_DATABASE_DIRS = ("base/1", "base/4")
_child_datadir_counter = itertools.count()


@dataclass(frozen=True)
class RunAs:
    """Who the children run as: the caller, or (when the caller is root) an unprivileged user of their own."""

    user: str | None
    uid: int
    gid: int

    @classmethod
    def for_settings(cls, settings: EngineSettings) -> RunAs:
        if os.geteuid() != 0:
            return cls(None, os.geteuid(), os.getegid())
        name = settings.run_as or DEFAULT_RUN_AS
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise Unavailable(
                f"we are root and redo children run as a user of their own, but user {name!r} does not exist "
                "(scripts/setup.sh creates it; or set engine.run_as)"
            ) from None
        return cls(name, entry.pw_uid, entry.pw_gid)

    def popen_kwargs(self) -> dict:
        if self.user is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def chown(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.uid, self.gid)

    def chown_tree(self, path: Path) -> None:
        if self.user is not None:
            _chown_tree(path, self.uid, self.gid)


def find_postgres_bin(settings: EngineSettings) -> Path:
    """The configured binary, or (only when none is configured) the Debian package's or pg_config's."""
    if settings.postgres_bin is not None:
        _check_executable(settings.postgres_bin, "engine.postgres_bin")
        return settings.postgres_bin
    candidates = [Path("/usr/lib/postgresql/15/bin/postgres")]
    if pg_config := shutil.which("pg_config"):
        try:
            bindir = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True).stdout
            candidates.append(Path(bindir.strip()) / "postgres")
        except (OSError, subprocess.CalledProcessError):
            pass
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise Unavailable(
        "PostgreSQL 15's postgres binary was not found (run the README's set-up, or set engine.postgres_bin)"
    )


def find_extension(settings: EngineSettings) -> Path:
    """The configured extension, or (only when none is configured) the one the set-up built."""
    if settings.extension_path is not None:
        if not settings.extension_path.is_file():
            raise Unavailable(f"engine.extension_path: {settings.extension_path} {_missing(settings.extension_path)}")
        return settings.extension_path
    # The set-up installs the built extension as package data (walredod/_native).
    built = Path(str(importlib.resources.files("walredod") / "_native" / EXTENSION_NAME))
    if built.is_file():
        return built
    raise Unavailable(f"{EXTENSION_NAME} was not found (run the README's set-up to build it, or set "
                      "engine.extension_path)")


def engine_path_problems(settings: EngineSettings) -> list[str]:
    """Every configured path of ``settings`` that cannot be what it says, each naming its setting; the defaults
    the settings' kind needs, when they are missing. A configured path is never replaced by a default."""
    problems = []
    if settings.kind == "vanilla":
        for find in (find_postgres_bin, find_extension):
            try:
                find(settings)
            except Unavailable as error:
                problems.append(str(error))
    else:
        if settings.neon_postgres_bin is None:
            problems.append("engine.neon_postgres_bin: kind = 'neon' needs the path of Neon's postgres binary")
    if settings.neon_postgres_bin is not None:
        try:
            _check_executable(settings.neon_postgres_bin, "engine.neon_postgres_bin")
        except Unavailable as error:
            problems.append(str(error))
    for entry in filter(None, settings.neon_ld_library_path.split(":")):
        if not Path(entry).is_dir():
            problems.append(f"engine.neon_ld_library_path: {entry} {_missing(Path(entry), directory=True)}")
    # A configured data directory is made on first use (systemd's StateDirectory makes it too), but not its
    # parent: a missing parent is a typo far more often than a wish. (The default one is made with its parents.)
    data_dir = Path(settings.data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        problems.append(f"engine.data_dir: {data_dir} is not a directory")
    elif "data_dir" in settings.model_fields_set and not data_dir.exists() and not data_dir.parent.is_dir():
        problems.append(f"engine.data_dir: {data_dir.parent} (the parent of {data_dir}) "
                        f"{_missing(data_dir.parent, directory=True)}")
    return problems


def _check_executable(path: Path, setting: str) -> None:
    if not path.is_file():
        raise Unavailable(f"{setting}: {path} {_missing(path)}")
    if not os.access(path, os.X_OK):
        raise Unavailable(f"{setting}: {path} is not executable")


def _missing(path: Path, directory: bool = False) -> str:
    """Why ``path`` is not the file (or directory) it should be."""
    if not path.exists():
        return "does not exist"
    return "is not a directory" if directory else "is not a regular file"


class DataDirectory:
    """The engine's data directory: the template cluster, a private copy of the extension, child datadirs."""

    def __init__(self, settings: EngineSettings, run_as: RunAs):
        self.root = Path(settings.data_dir)
        self.run_as = run_as
        self.postgres_bin = find_postgres_bin(settings)
        # With a child user, children traverse these two to reach their datadir; they may neither list nor change them.
        self._dir_mode = 0o711 if run_as.user is not None else 0o700
        self._make_dir(self.root, self._dir_mode)
        self._make_dir(self.root / CHILD_DATADIRS, self._dir_mode)
        self._template: Path | None = None  # found or made once: children start often (takeovers, spares)

    def _make_dir(self, path: Path, mode: int) -> None:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
        self._own(path, mode)

    def _own(self, path: Path, mode: int) -> None:
        """Make ``path`` the daemon's with ``mode``: earlier versions gave the data directory to the child user."""
        st = path.stat()
        if self.run_as.user is not None and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
            os.chown(path, os.geteuid(), os.getegid())
        if stat.S_IMODE(st.st_mode) != mode:
            path.chmod(mode)

    def _run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, **self.run_as.popen_kwargs(), **kwargs)

    def install_extension(self, source: Path) -> Path:
        """Copy our extension into the data directory under a name from its content.

        The child must be able to read it (as root the source may sit in a directory the unprivileged user cannot
        enter), and a rebuild while children run must not change the file under them. It belongs to the daemon; a
        copy that does not match its name (changed by someone) is replaced.
        """
        data = source.read_bytes()
        lib_dir = self.root / "lib"
        self._make_dir(lib_dir, 0o755 if self.run_as.user is not None else 0o700)
        digest = hashlib.sha256(data).hexdigest()
        target = lib_dir / f"walredod_redo-{digest[:16]}.so"
        if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == digest:
            self._own(target, 0o644)
            return target
        tmp = lib_dir / f".{target.name}.{os.getpid()}"
        tmp.write_bytes(data)
        tmp.chmod(0o644)
        os.replace(tmp, target)
        return target

    def template(self) -> Path:
        """The initdb'd template cluster, made on first use by exactly one process; looked up once per process."""
        if self._template is None:
            self._template = self._find_or_make_template()
        return self._template

    def _find_or_make_template(self) -> Path:
        version_text = self._run([str(self.postgres_bin), "--version"], check=True).stdout
        version = re.search(r"\d+(\.\d+)+", version_text).group(0)
        template = self.root / f"template-{version}"
        if (template / "PG_VERSION").exists():
            self._own_template(template)
            return template
        with open(self.root / "template.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (template / "PG_VERSION").exists():
                return template
            self._initdb(template)
        return template

    def _own_template(self, template: Path) -> None:
        """Children copy from the template: it must not be theirs (it was, before they had a user of their own)."""
        if self.run_as.user is not None and template.stat().st_uid != os.geteuid():
            log.info("taking the template cluster %s back from the child user", template)
            _chown_tree(template, os.geteuid(), os.getegid())

    def _initdb(self, template: Path) -> None:
        building = self.root / f".{template.name}.building"
        shutil.rmtree(building, ignore_errors=True)
        # initdb refuses root: it runs as the child user, in a directory made for it, then the result becomes ours.
        building.mkdir(mode=0o700)
        self.run_as.chown(building)
        initdb = self.postgres_bin.with_name("initdb")
        log.info("creating the template cluster %s with %s", template, initdb)
        # 1MB WAL segments, no checksums (the children never compute them), C locale.
        done = self._run(
            [str(initdb), "-D", str(building), "--no-sync", "--auth=trust", "--username=postgres",
             "--wal-segsize=1", "--locale=C", "--encoding=UTF8"],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
        )
        if done.returncode != 0:
            raise Unavailable(f"initdb of the template cluster failed: {done.stderr.strip()[-2000:]}")
        for unused in _UNUSED_DATABASE_DIRS:
            shutil.rmtree(building / unused, ignore_errors=True)
        if self.run_as.user is not None:
            _chown_tree(building, os.geteuid(), os.getegid())
        os.rename(building, template)

    def new_child_datadir(self) -> Path:
        """A fresh child datadir copied from the template, owned by the child user; ``remove_child_datadir`` ends
        it."""
        if self._template is None:  # the first child of this process: what dead processes left goes first
            self.remove_abandoned_child_datadirs()
        template = self.template()
        datadir = self.root / CHILD_DATADIRS / f"{os.getpid()}-{next(_child_datadir_counter)}"
        shutil.rmtree(datadir, ignore_errors=True)
        # cp is faster than a Python tree copy; the copy is ours until it is handed over whole.
        done = subprocess.run(["cp", "-a", str(template), str(datadir)], capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(datadir, ignore_errors=True)
            raise Unavailable(f"copying the template cluster failed: {done.stderr.strip()}")
        try:
            self.run_as.chown_tree(datadir)
        except Unavailable:
            shutil.rmtree(datadir, ignore_errors=True)
            raise
        return datadir

    @staticmethod
    def remove_child_datadir(datadir: Path) -> None:
        shutil.rmtree(datadir, ignore_errors=True)

    def remove_abandoned_child_datadirs(self) -> None:
        """Child datadirs of processes that are gone (killed without closing their engine)."""
        for datadir in (self.root / CHILD_DATADIRS).iterdir():
            pid = datadir.name.split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _process_exists(int(pid)):
                log.info("removing the abandoned child datadir %s", datadir)
                shutil.rmtree(datadir, ignore_errors=True)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    done = subprocess.run(["chown", "-R", "--no-dereference", f"{uid}:{gid}", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise Unavailable(f"could not give {path} to uid {uid}: {done.stderr.strip()}")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
