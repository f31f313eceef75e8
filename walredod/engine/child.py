"""One redo child process: start it, send it requests, notice its death, explain it."""

from __future__ import annotations

import collections
import logging
import os
import re
import select
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

from walredod.engine.board import Board
from walredod.engine.pipe import PING, WARMUP
from walredod.errors import InvalidRequest, RedoFailed, RedoTimeout, Unavailable, WalredodError, error_for_sqlstate
from walredod.types import BLCKSZ

log = logging.getLogger("walredod.child")

_SQLSTATE_LINE = re.compile(r"\b(ERROR|FATAL|PANIC):\s+([0-9A-Z]{5}):\s+(.*)")
# The line a child writes once its sandbox is in force (pgext/sandbox.c), and the probes' outcomes.
_SANDBOX_LINE = re.compile(r"walredod: sandbox in force: (.*)")
_PROBE_LINE = re.compile(r"walredod: sandbox probe (\S+): (allowed|denied.*|trying|unknown probe)$")
_PROBES_DONE_LINE = "walredod: sandbox probes done"


class ChildDied(Exception):
    """The child ended while we waited for it; ``error`` is what to tell the caller."""

    def __init__(self, error: WalredodError):
        super().__init__(str(error))
        self.error = error


class ChildRefused(Exception):
    """The child refused a request before redo touched anything, and goes on serving; ``error`` is the caller's."""

    def __init__(self, error: WalredodError):
        super().__init__(str(error))
        self.error = error


# Status bytes of replies when the child answers refusals (walredod.pipe_error_replies; docs/redo-child-protocol.md).
_REPLY_OK, _REPLY_INVALID, _REPLY_INTERNAL = 0, 1, 2
# A refusal's message is a line of the child's (a few hundred bytes); anything longer means the pipe is out of step.
_MAX_REFUSAL = 64 * 1024
_MAX_PROBES = 64  # probes a child may report (tests and `walredod doctor` run a handful)
_read_length = struct.Struct(">I").unpack_from


class ChildGone(Exception):
    """The child was already dead when a request was written to it: the request was not seen, it may be retried.

    Why it died is not asked here (that means waiting for its exit and its last words); ``RedoChild.death_error``
    tells, later.
    """


class RedoChild:
    """A running redo child with pipes to its stdin/stdout; its stderr goes to logging."""

    def __init__(self, argv: list[str], *, env: dict[str, str], cwd: Path | None, popen_kwargs: dict, name: str,
                 board: Board | None = None, pass_fds: tuple[int, ...] = (), error_replies: bool = False,
                 spin_wait: float = 0.0):
        """``spin_wait``: seconds a wait for a reply polls without sleeping first (EngineSettings.spin_wait_us)."""
        self.name = name
        self._spin_wait = spin_wait
        self.error_replies = error_replies  # replies start with a status byte; refusals are answered
        self.board = board  # the local data path's shared state, when the child serves it
        self.started_at = time.monotonic()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=50)
        self._stderr_done = threading.Event()
        self._sandbox_said = threading.Event()
        self._sandbox: str | None = None
        self.probes: dict[str, str] = {}  # sandbox probe -> its last outcome
        self._probes_done = threading.Event()
        try:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env, cwd=cwd, close_fds=True, pass_fds=pass_fds, **popen_kwargs,
            )
        except OSError as exc:
            raise Unavailable(f"could not start the redo child {argv[0]}: {exc}") from exc
        self.pid = self.process.pid
        self._stdin = self.process.stdin.fileno()
        self._stdout = self.process.stdout.fileno()
        self._poll = select.poll()
        self._poll.register(self._stdout, select.POLLIN)
        os.set_blocking(self._stdin, False)  # writes wait on a deadline (_write), never forever
        self._poll_out = select.poll()
        self._poll_out.register(self._stdin, select.POLLOUT)
        self._replies_pending = 0
        threading.Thread(target=self._forward_stderr, name=f"{name}-stderr", daemon=True).start()

    def _forward_stderr(self) -> None:
        try:
            for raw in self.process.stderr:
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    if match := _SANDBOX_LINE.search(line):
                        self._sandbox = match.group(1)
                        self._sandbox_said.set()
                    elif (match := _PROBE_LINE.search(line)) and (
                            len(self.probes) < _MAX_PROBES or match.group(1) in self.probes):
                        self.probes[match.group(1)] = match.group(2)
                    elif _PROBES_DONE_LINE in line:
                        self._probes_done.set()
                    self._stderr_tail.append(line)
                    log.log(_log_level(line), "%s[%d]: %s", self.name, self.pid, line)
        finally:
            self._stderr_done.set()
            self._sandbox_said.set()
            self._probes_done.set()

    def wait_probes(self, timeout: float) -> None:
        """Until the child has run its sandbox probes or ended."""
        self._probes_done.wait(timeout)

    def sandbox_report(self, timeout: float = 5.0) -> str | None:
        """What the child said is in force ("seccomp=... landlock=abi7 ..."), None if it ended without saying."""
        self._sandbox_said.wait(timeout)
        return self._sandbox

    # --- requests -----------------------------------------------------------------------------------------------

    def send_warmup(self) -> None:
        """Ask for a ping and a warm-up redo without waiting: the child answers once it is up."""
        self._write(PING + WARMUP, time.monotonic() + 60)  # smaller than a pipe: never waits
        self._replies_pending = 2

    def wait_ready(self, timeout: float) -> None:
        """Consume the pending replies: the child has started, and has been through redo once."""
        while self._replies_pending:
            self.read_page(timeout)
            self._replies_pending -= 1

    def request(self, message: bytes, deadline: float, timeout: float) -> bytes:
        """Send one request and read its page, both by ``deadline`` (time.monotonic()); past it the child is
        killed (RedoTimeout). ``timeout`` is the request's, for the error message."""
        self._write(message, deadline)
        return self.read_page(timeout, deadline)

    def _write(self, data: bytes, deadline: float) -> None:
        """Write a whole message. A child that hung up before taking any of it never saw it (ChildGone); one that
        dies or stalls part-way through a message larger than the pipe died in this request."""
        view = memoryview(data)
        written = 0
        while written < len(data):
            try:
                written += os.write(self._stdin, view[written:])
            except BlockingIOError:  # the pipe is full: the child is busy parsing, or hung
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._poll_out.poll(remaining * 1000):
                    self.kill()
                    raise ChildDied(RedoTimeout(
                        f"redo child {self.pid} took no more of the request within its timeout")) from None
            except (BrokenPipeError, ConnectionResetError):
                if written == 0:
                    raise ChildGone() from None
                raise ChildDied(self.death_error()) from None

    def read_page(self, timeout: float, deadline: float | None = None) -> bytes:
        """The child's next 8 kB reply, by ``deadline`` (default: ``timeout`` seconds from now). Raises
        ChildRefused for a request the child refused and ChildDied when it ended or overran the deadline."""
        deadline = deadline if deadline is not None else time.monotonic() + timeout
        if not self.error_replies:
            return self._read_exactly(BLCKSZ, timeout, deadline)
        reply = self._read_exactly(1 + BLCKSZ, timeout, deadline, at_least=5)
        if reply[0] == _REPLY_OK:
            return reply[1:]
        length = _read_length(reply, 1)[0]
        if reply[0] not in (_REPLY_INVALID, _REPLY_INTERNAL) or length > _MAX_REFUSAL:
            self.kill()  # its replies can no longer be told apart: the child is done
            raise ChildDied(RedoFailed(f"redo child {self.pid} sent a reply with status {reply[0]} and length "
                                       f"{length}, which the protocol does not have"))
        message = reply[5:] + (self._read_exactly(5 + length - len(reply), timeout, deadline)
                               if len(reply) < 5 + length else b"")
        text = message.decode("utf-8", "replace")
        raise ChildRefused(InvalidRequest(text) if reply[0] == _REPLY_INVALID else RedoFailed(text))

    def _read_exactly(self, size: int, timeout: float, deadline: float, at_least: int | None = None) -> bytes:
        """``size`` bytes of the child's stdout; with ``at_least``, as soon as that many have come and nothing
        more is waiting (a refusal is shorter than a page)."""
        chunks: list[bytes] = []
        got = 0
        while got < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._readable_within(remaining):
                self.kill()
                raise ChildDied(RedoTimeout(f"redo child {self.pid} gave no answer within {timeout:g} s"))
            chunk = os.read(self._stdout, size - got)
            if not chunk:
                raise ChildDied(self.death_error())
            chunks.append(chunk)
            got += len(chunk)
            if at_least is not None and got >= at_least and chunks[0][0] != _REPLY_OK:
                break  # a refusal: its length says how much follows
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _readable_within(self, timeout: float) -> bool:
        """Whether the child's stdout has something to read within ``timeout`` seconds: polled without sleeping
        (yielding the CPU in between) for up to the spin wait, then waited for."""
        poll = self._poll.poll
        if self._spin_wait:
            give_up = time.monotonic() + min(self._spin_wait, timeout)
            while not poll(0):
                if time.monotonic() >= give_up:
                    break
                os.sched_yield()
            else:
                return True
        return bool(poll(timeout * 1000))

    # --- life and death -----------------------------------------------------------------------------------------

    def alive(self) -> bool:
        """Not exited (reaps it when it has: the engine's look at children serving the local data path)."""
        return self.process.poll() is None

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self, timeout: float = 5.0) -> None:
        """Ask the child to exit (EOF on its stdin); kill it if it does not."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.process.wait()
        self._stderr_done.wait(1.0)
        for stream in (self.process.stdout, self.process.stderr):
            try:
                stream.close()
            except OSError:
                pass

    def death_error(self) -> WalredodError:
        """Why the child ended, from its exit status and the last error it wrote."""
        try:
            status = self.process.wait(5.0)
        except subprocess.TimeoutExpired:
            self.kill()
            status = self.process.wait()
        self._stderr_done.wait(2.0)
        if status == -signal.SIGSYS:
            # seccomp killed it: whatever it was doing, it was not redo (the allow-list covers redo).
            return RedoFailed(f"redo child {self.pid} was killed by its sandbox: it made a forbidden system call "
                              "(SIGSYS); the request's WAL is suspect")
        for line in reversed(self._stderr_tail):
            match = _SQLSTATE_LINE.search(line)
            if match:
                level, sqlstate, message = match.groups()
                cls = error_for_sqlstate(sqlstate)
                return cls(f"{message} ({level} {sqlstate})")
        how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
        last = self._stderr_tail[-1] if self._stderr_tail else "no message"
        return RedoFailed(f"redo child {self.pid} died ({how}): {last}")


def _log_level(line: str) -> int:
    if "PANIC:" in line or "FATAL:" in line or "ERROR:" in line:
        return logging.ERROR
    if "WARNING:" in line:
        return logging.WARNING
    return logging.DEBUG
