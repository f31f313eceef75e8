"""RedoEngine: rebuilds pages with one redo child, replaced at once when it dies.

A second child (the spare) is started ahead of time and warmed with a ping and one real redo, so a child's death
costs the next request no start-up: the spare takes over, and the next spare is started by ``start_spare``, which the
daemon's worker calls when idle (or, failing that, the following request).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from walredod.config import EngineSettings
from walredod.engine.board import Board, LocalCounters
from walredod.engine.child import ChildDied, ChildGone, ChildRefused, RedoChild
from walredod.engine.datadir import DataDirectory, RunAs, find_extension
from walredod.engine.pipe import PING, encode_request
from walredod.errors import InvalidRequest, RedoTimeout, Unavailable
from walredod.objects import check_base_image, check_tag
from walredod.types import ZERO_PAGE, BufferTag, WalRecord
from walredod.wal import RECORD_HEADER, record_total_length

log = logging.getLogger(__name__)


# Settings for the scratch cluster's single-user backend: small shared memory, nothing in the background, errors
# with their SQLSTATE so the engine can tell a bad request from a redo failure.
_CHILD_GUCS = (
    "walredod.serve=on",
    "walredod.pipe_error_replies=on",  # a request refused before redo is answered, the child stays
    "fsync=off",
    "autovacuum=off",
    "jit=off",
    "huge_pages=off",
    # Dynamic shared memory as files in the datadir, not in /dev/shm: the sandboxed child removes them at exit.
    "dynamic_shared_memory_type=mmap",
    "max_connections=2",
    "superuser_reserved_connections=0",
    "max_worker_processes=0",
    "max_wal_senders=0",
    "max_replication_slots=0",
    "max_prepared_transactions=0",
    "max_locks_per_transaction=10",
    "wal_level=minimal",
    "wal_buffers=64kB",
    "track_activities=off",
    "track_counts=off",
    "log_min_messages=warning",
    "log_error_verbosity=verbose",
    "log_checkpoints=off",
)


@dataclass
class EngineStats:
    requests: int = 0
    records: int = 0
    errors: int = 0
    children_started: int = 0
    restarts: dict[str, int] = field(default_factory=dict)  # cause -> count


# Seconds before another spare after one failed, doubling with each failure in a row, at most the second.
SPARE_RETRY_FIRST = 0.05
SPARE_RETRY_MAX = 5.0
SPARE_EARLY_DEATH = 1.0  # a spare dead this soon after its start counts as one that failed to start


class RedoEngine:
    """Owns one redo child (plus a warm spare) and rebuilds pages with it.

    >>> with RedoEngine() as engine:
    ...     page = engine.redo(tag, lsn, base_image, records)
    """

    def __init__(self, settings: EngineSettings | None = None, *, name: str = "redo",
                 local_listener: int | None = None, local_max_request_bytes: int = 64 << 20,
                 child_gucs: Sequence[str] = (), **overrides):
        """``child_gucs``: more ``name=value`` settings for the children (the sandbox probes of tests and
        `walredod doctor`). ``local_listener``: the listening socket of the local data path, inherited by every
        child (docs/local-data-path.md)."""
        if settings is None:
            settings = EngineSettings(**overrides)
        elif overrides:
            settings = settings.model_copy(update=overrides)
        self.settings = settings
        self.name = name
        self.stats = EngineStats()
        self._child_gucs = tuple(child_gucs)
        self._run_as = RunAs.for_settings(settings)
        self._data = None
        self._extension: Path | None = None
        self._datadir_of: dict[int, Path] = {}  # child pid -> its datadir
        self._active: RedoChild | None = None
        self._spare: RedoChild | None = None
        self._spare_wanted = False
        self._dead: list[RedoChild] = []  # killed children not yet reaped
        self._unlogged_deaths: list[tuple[int, str]] = []  # (pid, cause) of deaths found on a request's path
        self._spare_failures = 0  # spares in a row that failed to start or died unused
        self._spare_retry_at = 0.0
        self._closed = False
        # The local data path (docs/local-data-path.md): every child of ours inherits this listening socket and
        # serves clients on it directly; the engine only watches (watch_children) and counts (local_counters).
        self._local_listener = local_listener if settings.kind == "vanilla" else None
        self._local_max_request_bytes = local_max_request_bytes
        self._local_retired = LocalCounters()  # what buried children served
        if settings.kind == "vanilla":
            self._data = DataDirectory(settings, self._run_as)
            self._extension = self._data.install_extension(find_extension(settings))
        elif settings.neon_postgres_bin is None:
            raise Unavailable("kind = 'neon' needs neon_postgres_bin, the path of Neon's postgres binary")
        try:
            self._active = self._start_child()
            self._active.wait_ready(settings.start_timeout)
            if settings.keep_spare:
                self._spare = self._start_child()
        except ChildDied as death:
            self.close()
            raise Unavailable(f"the redo child could not start: {death.error}") from None
        except BaseException:
            self.close()
            raise

    # --- public API ---------------------------------------------------------------------------------------------

    def redo(
        self,
        tag: BufferTag,
        lsn: int,
        base_image: bytes | None,
        records: Sequence[WalRecord],
        timeout: float | None = None,
        *,
        deadline: float | None = None,
    ) -> bytes:
        """The page ``tag`` as of ``lsn``: ``base_image`` (None: the page did not exist) with ``records`` applied.

        ``records`` are the page's records in WAL order, each ``WalRecord(lsn=<end LSN>, data=<raw XLogRecord>)``.
        The whole call, checks and encoding included, ends by ``deadline`` (time.monotonic()), or ``timeout``
        seconds from now (default: the settings' request_timeout). Raises InvalidRequest, RedoFailed, RedoTimeout
        or Unavailable (walredod.errors).
        """
        started = time.monotonic()
        if deadline is None:
            deadline = started + (timeout if timeout is not None else self.settings.request_timeout)
        check_request(tag, lsn, base_image, records)
        message = encode_request(tag, base_image, records)
        page = self._call(message, deadline - started, deadline=deadline)
        self.stats.requests += 1
        self.stats.records += len(records)
        return page

    def ping(self, timeout: float | None = None) -> None:
        """Round trip to the child without redo work."""
        if self._call(PING, timeout) != ZERO_PAGE:
            raise Unavailable("the redo child answered a ping with something else than a zero page")

    @property
    def child_pid(self) -> int | None:
        return self._active.pid if self._active else None

    @property
    def spare_pid(self) -> int | None:
        return self._spare.pid if self._spare else None

    @property
    def child_datadir(self) -> Path | None:
        """The active child's scratch datadir (vanilla)."""
        return self._datadir_of.get(self._active.pid) if self._active else None

    @property
    def data_root(self) -> Path | None:
        return self._data.root if self._data else None

    @property
    def extension(self) -> Path | None:
        """The copy of our extension the children load."""
        return self._extension

    def child_sandbox(self, timeout: float = 5.0) -> str | None:
        """What the active child said about its sandbox ("seccomp=... landlock=..."); None if it said nothing."""
        if self._active is None:
            self._take_over()
        return self._active.sandbox_report(timeout)

    def children_sandbox(self, timeout: float = 30.0) -> dict[int, str | None]:
        """Child pid -> what it said about its sandbox, for the active child and the spare (waits for a spare that
        is still starting)."""
        return {child.pid: child.sandbox_report(timeout) for child in (self._active, self._spare) if child}

    def close(self) -> None:
        """Stop the children (EOF on their stdin) and remove their datadirs."""
        self._closed = True
        for child in (self._active, self._spare):
            if child is not None:
                child.close()
                if child.board is not None:
                    child.board.close()
        self._active = self._spare = None
        self._bury_dead()
        for datadir in self._datadir_of.values():
            self._data.remove_child_datadir(datadir)
        self._datadir_of.clear()

    def __enter__(self) -> RedoEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.close()

    # --- children -----------------------------------------------------------------------------------------------

    def _call(self, message: bytes, timeout: float | None = None, *, deadline: float | None = None) -> bytes:
        """The child's answer to ``message``, by ``deadline`` or within ``timeout`` seconds (the settings'
        request_timeout by default); ``timeout`` also names the time allowed in a RedoTimeout's message."""
        if self._closed:
            raise Unavailable("the redo engine is closed")
        if timeout is None:
            timeout = self.settings.request_timeout
        if deadline is None:
            deadline = time.monotonic() + timeout
        if self._spare_wanted or self._dead:
            self.start_spare()
        for _attempt in range(2):
            if time.monotonic() >= deadline:  # the child has not seen the request: it stays
                raise RedoTimeout("the request's deadline passed before its records reached the redo child")
            child = self._active or self._take_over()
            try:
                return child.request(message, deadline, timeout)
            except ChildRefused as refusal:  # checked before redo: the child serves on
                self.stats.errors += 1
                raise refusal.error from None
            except ChildGone:
                # Died while idle: it never saw this request, so the next child may serve it. Its log line waits
                # until the dead are buried, off this request's path: writing it costs more than the spare's answer.
                self._child_died(child, "died idle", log_now=False)
                last = child
                continue
            except ChildDied as death:
                self.stats.errors += 1
                cause = "timeout" if isinstance(death.error, RedoTimeout) else "died in request"
                self._child_died(child, cause)
                raise death.error from None
        self.stats.errors += 1
        raise last.death_error()

    def _child_died(self, child: RedoChild, cause: str, log_now: bool = True) -> None:
        """Forget a dead (or hung) child. It is reaped and its datadir removed later, off the request's path."""
        if log_now:
            log.warning("%s: redo child %d ended (%s); the spare takes over", self.name, child.pid, cause)
        else:
            self._unlogged_deaths.append((child.pid, cause))
        self.stats.restarts[cause] = self.stats.restarts.get(cause, 0) + 1
        if cause != "died idle":  # an idle child that hung up is already dead; reaping it can wait
            child.kill()
        self._dead.append(child)
        if child is self._active:
            self._active = None
        if child is self._spare:
            self._spare = None
            if time.monotonic() - child.started_at < SPARE_EARLY_DEATH:
                self._spare_failed()  # died as it started: what made it die will most likely kill the next

    def _bury_dead(self) -> None:
        for pid, cause in self._unlogged_deaths:
            log.warning("%s: redo child %d ended (%s); the spare took over", self.name, pid, cause)
        self._unlogged_deaths.clear()
        for child in self._dead:
            child.close()
            self._release_datadir(child)
            if child.board is not None:
                words = child.board.words()
                if words is not None:
                    self._local_retired.add(words, live=False)
                child.board.close()
        self._dead.clear()

    # --- the local data path ------------------------------------------------------------------------------------

    @property
    def serves_local_path(self) -> bool:
        return self._local_listener is not None

    def watch_children(self) -> None:
        """Children serve local clients the engine never sees, so the engine looks at them now and then (the
        daemon's worker: every few tens of milliseconds): a child that died is replaced by the spare at once,
        and a child still inside a local request past that request's deadline is killed (its clients see
        their connection end)."""
        now = time.monotonic_ns()
        for child in (self._active, self._spare):
            if child is None:
                continue
            if not child.alive():
                self._child_died(child, "died on the local path")
            elif child.board is not None:
                deadline = child.board.busy_deadline_ns()
                if deadline and now > deadline:
                    self._local_retired.deadline_kills += 1
                    self._child_died(child, "local timeout")
        if self._active is None and not self._closed:
            try:
                self._take_over()
            except Unavailable as exc:
                log.error("%s: no redo child to take over: %s", self.name, exc)
        if self._spare is None and not self._closed:
            self._spare_wanted = self.settings.keep_spare  # start_spare replaces a spare that died too

    def local_counters(self) -> LocalCounters:
        """What this engine's children served on the local data path, since the engine started."""
        total = LocalCounters(**{**self._local_retired.__dict__,
                                 "latency_buckets": list(self._local_retired.latency_buckets)})
        for child in (self._active, self._spare, *self._dead):
            if child is not None and child.board is not None:
                words = child.board.words()
                if words is not None:
                    total.add(words, live=child is self._active or child is self._spare)
        return total

    def start_spare(self) -> None:
        """Start the spare child if it is missing. A takeover leaves this to the next request or to the caller's
        idle time (the daemon's worker calls it when its queue is empty), so the request that found its child dead
        pays neither the fork nor the new child's start-up on its CPU."""
        if self._dead:
            self._bury_dead()
        if self._spare_wanted and not self._closed and time.monotonic() >= self._spare_retry_at:
            self._spare_wanted = False
            try:
                self._spare = self._start_child()
            except Unavailable as exc:
                log.error("%s: could not start a spare redo child: %s", self.name, exc)
                self._spare_failed()

    def _spare_failed(self) -> None:
        """A spare could not start, or died before it was needed: the next one waits, longer each time in a row
        (the worker asks for one every few tens of milliseconds; each try forks and copies a datadir)."""
        self._spare_failures += 1
        delay = min(SPARE_RETRY_MAX, SPARE_RETRY_FIRST * 2 ** (self._spare_failures - 1))
        self._spare_retry_at = time.monotonic() + delay

    def _take_over(self) -> RedoChild:
        """Promote the spare (or start a child now, if there is none); the next spare is left to start_spare."""
        for _attempt in range(2):
            child, self._spare = self._spare, None
            if child is None:
                self._bury_dead()  # removes the dead child's datadir before a new one is made
                child = self._start_child()
            try:
                child.wait_ready(self.settings.start_timeout)
            except ChildDied as death:
                self._child_died(child, "failed to start")
                error = death.error
                continue
            self._active = child
            self._spare_wanted = self.settings.keep_spare
            self._spare_failures = 0
            return child
        raise Unavailable(f"the redo child could not start: {error}")

    def _start_child(self) -> RedoChild:
        board, pass_fds = None, ()
        if self.settings.kind == "neon":
            argv = [str(self.settings.neon_postgres_bin), "--wal-redo"]
            env = {"LD_LIBRARY_PATH": self.settings.neon_ld_library_path}
            cwd = self.settings.data_dir if self.settings.data_dir.is_dir() else None
            datadir = None
        else:
            # A fresh datadir for every child: one taken over leaves nothing for the next (datadir.py).
            datadir = self._data.new_child_datadir()
            argv = [str(self._data.postgres_bin), "--single", "-D", str(datadir),
                    "-c", f"session_preload_libraries={self._extension}",
                    "-c", f"shared_buffers={self.settings.shared_buffers_kb}kB",
                    "-c", f"walredod.source_logs_hint_bits={'on' if self.settings.source_logs_hint_bits else 'off'}",
                    "-c", f"walredod.wal_format={self.settings.wal_format}",
                    "-c", f"walredod.sandbox={self.settings.sandbox}",
                    "-c", f"walredod.sandbox_address_space_mb={self.settings.child_address_space_mb}",
                    "-c", f"walredod.spin_wait_us={self.settings.spin_wait_us}"]
            for guc in (*_CHILD_GUCS, *self._child_gucs):
                argv += ["-c", guc]
            if self._local_listener is not None:
                board = Board()
                pass_fds = (self._local_listener, board.fd)
                argv += ["-c", f"walredod.local_listen_fd={self._local_listener}",
                         "-c", f"walredod.local_board_fd={board.fd}",
                         "-c", f"walredod.local_default_timeout_ms={max(1, int(self.settings.request_timeout * 1000))}",
                         "-c", f"walredod.local_max_request_bytes={self._local_max_request_bytes}"]
            argv.append("postgres")
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
            cwd = datadir
        try:
            child = RedoChild(argv, env=env, cwd=cwd, popen_kwargs=self._run_as.popen_kwargs(), name=self.name,
                              board=board, pass_fds=pass_fds, error_replies=self.settings.kind == "vanilla",
                              spin_wait=self.settings.spin_wait_us / 1e6)
        except Unavailable:
            if datadir is not None:
                self._data.remove_child_datadir(datadir)
            if board is not None:
                board.close()
            raise
        if board is not None:
            board.handed_over()
        if datadir is not None:
            self._datadir_of[child.pid] = datadir
        self.stats.children_started += 1
        try:
            child.send_warmup()
        except ChildGone:
            pass  # wait_ready reports it
        return child

    def _release_datadir(self, child: RedoChild) -> None:
        datadir = self._datadir_of.pop(child.pid, None)
        if datadir is not None:
            self._data.remove_child_datadir(datadir)


def check_request(tag: BufferTag, lsn: int, base_image: bytes | None, records: Sequence[WalRecord]) -> None:
    """Refuse what would make the child fail for reasons we can see without decoding a record."""
    if not isinstance(tag, BufferTag):
        raise InvalidRequest(f"tag must be a BufferTag, not {type(tag).__name__}")
    check_tag(tag)
    check_base_image(tag, base_image)
    previous = 0
    for i, (rec_lsn, data) in enumerate(records):
        if len(data) < RECORD_HEADER:
            raise InvalidRequest(f"record {i} is {len(data)} bytes, shorter than a record header")
        tot_len = record_total_length(data)
        if tot_len != len(data):
            raise InvalidRequest(f"record {i}: xl_tot_len says {tot_len} bytes but {len(data)} were given")
        if rec_lsn < previous:
            raise InvalidRequest(f"record {i}: LSNs must increase (end LSN {rec_lsn:X} after {previous:X})")
        previous = rec_lsn
    if previous > lsn:
        raise InvalidRequest(f"a record ends at {previous:X}, after the requested LSN {lsn:X}")
