"""The redo child's sandbox, seen from outside: what a live child has in force, and probes that try to break it.

The sandbox itself is entered by the child (pgext/sandbox.c). From outside we read what the kernel says about the
process (/proc/PID/status: ``Seccomp``, ``NoNewPrivs``; a process that is not dumpable has its /proc/PID files owned
by root) and what the child said (its "sandbox in force" line: Landlock has no /proc view). Probes make a sandboxed
child attempt forbidden actions when a request names ``PROBE_RELNODE``; only the parent can ask for them (child
settings come from its command line) and they can only attempt what the sandbox must refuse.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Sequence
from dataclasses import dataclass, field

from walredod.config import EngineSettings
from walredod.errors import WalredodError
from walredod.types import BufferTag

# The relation whose requests run the probes: no tenant relation has it in a probe engine, which serves nothing else.
PROBE_RELNODE = 2_000_000_000


@dataclass(frozen=True)
class ProcessSandbox:
    """What the kernel reports for one process."""

    pid: int
    uid: int
    seccomp: int  # 0 none, 1 strict, 2 filter
    no_new_privs: bool
    dumpable: bool

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    def describe(self) -> str:
        mode = {0: "none", 1: "strict", 2: "filter"}.get(self.seccomp, str(self.seccomp))
        return (f"pid {self.pid}, user {self.user}, Seccomp: {self.seccomp} ({mode}), NoNewPrivs: "
                f"{int(self.no_new_privs)}, {'dumpable' if self.dumpable else 'not dumpable'}")


def process_sandbox(pid: int) -> ProcessSandbox:
    """Read a live process's seccomp mode, no_new_privs and dumpability from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    uid = int(fields["Uid"].split()[1])  # effective
    # The kernel gives a non-dumpable process's /proc files to root (unless it runs as root anyway).
    owner = os.stat(f"/proc/{pid}/mem").st_uid
    return ProcessSandbox(pid=pid, uid=uid, seccomp=int(fields.get("Seccomp", "0")),
                          no_new_privs=fields.get("NoNewPrivs") == "1", dumpable=uid == 0 or owner == uid)


@dataclass
class ProbeResult:
    """One probe child: what it said was in force, and each probe's outcome ("allowed", "denied (reason)", or
    "killed" when the sandbox ended the child on it)."""

    report: str | None
    process: ProcessSandbox | None
    outcomes: dict[str, str] = field(default_factory=dict)
    error: WalredodError | None = None  # what the probe request was answered


def probe_sandbox(settings: EngineSettings, actions: Sequence[str], timeout: float = 30.0) -> ProbeResult:
    """Start one child, let it attempt ``actions`` (read:PATH, write:PATH, list:PATH, socket, signal:PID,
    exec:PATH) inside its sandbox, and report. Actions the seccomp filter refuses kill the child: put them last."""
    from walredod.engine.engine import RedoEngine

    gucs = [f"walredod.sandbox_probe={','.join(actions)}", f"walredod.sandbox_probe_relnode={PROBE_RELNODE}"]
    with RedoEngine(settings.model_copy(update={"keep_spare": False}), name="sandbox-probe",
                    child_gucs=gucs) as engine:
        child = engine._active
        result = ProbeResult(report=child.sandbox_report(timeout), process=process_sandbox(child.pid))
        try:
            engine.redo(BufferTag(1663, 1, PROBE_RELNODE, 0, 0), 0, None, [], timeout=timeout)
        except WalredodError as exc:
            result.error = exc
        child.wait_probes(timeout)
        result.outcomes = {action: "killed" if outcome == "trying" else outcome
                           for action, outcome in child.probes.items()}
    return result
