"""The redo child's sandbox (pgext/sandbox.c): every child is in it, and what a taken-over child would try is refused.

A taken-over child is played by the sandbox probes: a sandboxed child attempts the actions of issue 14's findings
(other children's datadirs, the extension, other processes' memory, a socket to the daemon, signals, exec) from inside
its sandbox, and says what happened. What the kernel says about each child is read from /proc, outside it.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import world_traversable_tmpdir
from walredod.config import EngineSettings
from walredod.engine import RedoEngine
from walredod.engine.datadir import CHILD_DATADIRS, RunAs
from walredod.engine.sandbox import PROBE_RELNODE, probe_sandbox, process_sandbox
from walredod.errors import RedoFailed, Unavailable
from walredod.types import BufferTag

ROOT = os.geteuid() == 0
PROBE_TAG = BufferTag(1663, 1, PROBE_RELNODE, 0, 0)


def probe_gucs(*actions: str) -> list[str]:
    return [f"walredod.sandbox_probe={','.join(actions)}", f"walredod.sandbox_probe_relnode={PROBE_RELNODE}"]


def assert_sandboxed(pid: int) -> None:
    process = process_sandbox(pid)
    assert process.seccomp == 2, process.describe()
    assert process.no_new_privs, process.describe()
    assert not process.dumpable, process.describe()
    if ROOT:
        assert process.user == "walredod-redo", process.describe()


@pytest.fixture(scope="module")
def engine(engine_data_dir):
    with RedoEngine(data_dir=engine_data_dir, source_logs_hint_bits=True) as engine:
        yield engine


# --- every child is in it -----------------------------------------------------------------------------------------

def test_every_child_of_an_engine_is_sandboxed(engine):
    engine.ping()
    reports = engine.children_sandbox()
    assert set(reports) == {engine.child_pid, engine.spare_pid}
    for pid, report in reports.items():
        assert_sandboxed(pid)
        assert report.startswith("seccomp=kill-unlisted(")
        assert "landlock=abi" in report and "dumpable=0" in report and "core=0" in report
        limits = child_limits(pid)
        assert limits["Max core file size"] == ("0", "0")
        assert limits["Max file size"] == (str(1 << 30), str(1 << 30))  # one relation segment
        assert limits["Max address space"] == (str(1024 << 20), str(1024 << 20))
        assert limits["Max processes"] == ("0", "0")
        soft, hard = limits["Max open files"]
        assert soft == hard and int(soft) < 1024


def child_limits(pid: int) -> dict[str, tuple[str, str]]:
    """/proc/PID/limits: name -> (soft, hard); soft = hard means the child cannot raise it again."""
    limits = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        name = line[:26].strip()
        soft, hard = line[26:].split()[:2]
        limits[name] = (soft, hard)
    return limits


def test_every_child_of_the_daemon_is_sandboxed():
    from test_daemon import Daemon

    daemon = Daemon(world_traversable_tmpdir("walredod-sandbox-daemon-"), workers=2)
    try:
        workers = daemon.wait_ready(2)
        for worker in workers:
            assert_sandboxed(worker["child_pid"])
            assert process_sandbox(worker["pid"]).seccomp == 0  # the sandbox is the child's alone
        doctor = subprocess.run([sys.executable, "-m", "walredod", "doctor", "--endpoint", daemon.endpoint],
                                capture_output=True, text=True, timeout=120)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        for worker in workers:
            assert f"redo child pid {worker['child_pid']}, user " in doctor.stdout
        assert doctor.stdout.count("Seccomp: 2 (filter), NoNewPrivs: 1, not dumpable") == 2
    finally:
        daemon.stop()


def test_a_replacement_child_is_sandboxed_in_a_fresh_datadir(engine):
    engine.ping()
    old_pid, old_datadir = engine.child_pid, engine.child_datadir
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while engine.child_pid in (old_pid, None) and time.monotonic() < deadline:
        try:
            engine.ping()
        except RedoFailed:
            pass
    engine.start_spare()  # buries the dead child: its datadir goes
    assert engine.child_pid != old_pid
    assert engine.child_datadir != old_datadir and not old_datadir.exists()
    for pid in engine.children_sandbox():
        assert_sandboxed(pid)


@pytest.mark.skipif(not ROOT, reason="ownership separates children from the daemon only when the daemon is root")
def test_what_children_start_from_is_not_theirs(engine):
    """A child owns its datadir and nothing else: not the template, not the extension, not children/ or the root."""
    child = RunAs.for_settings(engine.settings)
    root = engine.data_root
    for path in (root, root / CHILD_DATADIRS, root / "lib", engine.extension, *root.glob("template-*")):
        st = path.stat()
        assert st.st_uid == 0, path
        assert not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH), path
    datadir = engine.child_datadir.stat()
    assert (datadir.st_uid, stat.S_IMODE(datadir.st_mode)) == (child.uid, 0o700)


# --- what a taken-over child would try ----------------------------------------------------------------------------

def test_a_child_cannot_leave_its_datadir(engine):
    """Issue 14: a child read and wrote other workers' scratch datadirs (one line in postgresql.auto.conf made the next child
    load a library), the extension and other children's memory. Each attempt, from inside a sandboxed child."""
    engine.ping()
    other_datadir, other_pid, root = engine.child_datadir, engine.child_pid, engine.data_root
    template = next(root.glob("template-*"))
    refused = [
        f"read:{other_datadir}/PG_VERSION",
        f"write:{other_datadir}/postgresql.auto.conf",
        f"list:{other_datadir}",
        f"write:{engine.extension}",
        f"write:{template}/postgresql.auto.conf",
        f"list:{root}",
        f"read:/proc/{other_pid}/mem",
        f"read:/proc/{os.getpid()}/mem",
        f"read:/proc/{os.getpid()}/environ",
        "read:/etc/passwd",
        "list:/tmp",
    ]
    allowed = [f"read:{engine.extension}", "read:/usr/lib/postgresql/15/lib/plpgsql.so"]  # the probe can succeed
    result = probe_sandbox(engine.settings, refused + allowed)
    assert result.error is None
    for action in refused:
        assert result.outcomes[action] == "denied (Permission denied)", action
    for action in allowed:
        assert result.outcomes[action] == "allowed", action
    assert (other_datadir / "PG_VERSION").read_text().strip() == "15"
    assert "probe" not in (other_datadir / "postgresql.auto.conf").read_text()
    engine.ping()  # the other child is untouched


@pytest.mark.parametrize("action", ["socket", "signal:PARENT", "signal:OTHER_CHILD", "signal:1", "exec:/bin/sh",
                                    "fcntl-setown"])
def test_a_forbidden_system_call_kills_the_child_and_the_engine_serves_on(engine, engine_data_dir, real_requests,
                                                                          action):
    """Issue 14: a process of the children's uid connected to the backend socket and registered as a worker; a
    child had the network, could signal (another child runs as the same user) and exec. Now the first such call
    ends the child; the request gets a typed error, and the next request is served right by the next child."""
    engine.ping()
    action = action.replace("PARENT", str(os.getpid())).replace("OTHER_CHILD", str(engine.child_pid))
    with RedoEngine(data_dir=engine_data_dir, source_logs_hint_bits=True,
                    child_gucs=probe_gucs(action)) as probed:
        first = probed.child_pid
        with pytest.raises(RedoFailed, match="killed by its sandbox: it made a forbidden system call"):
            probed.redo(PROBE_TAG, 0, None, [])
        tag, lsn, base, records, expected = real_requests[0]
        assert probed.redo(tag, lsn, base, records) == expected
        assert probed.child_pid != first
        assert probed.stats.restarts == {"died in request": 1}


@pytest.mark.skipif(not ROOT, reason="needs a second process of the children's uid")
def test_a_process_of_the_child_uid_cannot_read_a_child_memory(engine):
    """Not dumpable: even outside any sandbox, the children's uid cannot read a child's memory."""
    child = RunAs.for_settings(engine.settings)
    attempt = subprocess.run(["head", "-c", "1", f"/proc/{engine.child_pid}/mem"],
                             capture_output=True, text=True, user=child.uid, group=child.gid, extra_groups=[],
                             timeout=60)
    assert attempt.returncode != 0 and "Permission denied" in attempt.stderr


# --- kernels without seccomp or Landlock --------------------------------------------------------------------------

WRAPPER = r"""
/* Runs postgres as a kernel without {what} would: those calls fail with ENOSYS/EINVAL. */
#include <errno.h>
#include <seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>

int
main(int argc, char **argv)
{{
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);

    {rules}
    if (ctx == NULL || seccomp_load(ctx) < 0)
        return 111;
    argv[0] = "{postgres}";
    execv(argv[0], argv);
    perror("execv");
    return 112;
}}
"""
NO_LANDLOCK = "seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(landlock_create_ruleset), 0);"
NO_SECCOMP = ("seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(seccomp), 0);\n"
              "    seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EINVAL), SCMP_SYS(prctl), 1, "
              "SCMP_A0(SCMP_CMP_EQ, PR_SET_SECCOMP));")


def build_old_kernel_postgres(where: Path, what: str, rules: str) -> Path:
    """A postgres that sees a kernel without ``what`` (a seccomp filter of ours in front of the real binary)."""
    postgres = Path("/usr/lib/postgresql/15/bin/postgres")
    where.mkdir(parents=True, exist_ok=True)
    source = where / "postgres.c"
    source.write_text(WRAPPER.format(what=what, rules=rules, postgres=postgres))
    subprocess.run(["gcc", "-O1", "-o", str(where / "postgres"), str(source), "-lseccomp"], check=True)
    (where / "initdb").symlink_to(postgres.with_name("initdb"))
    os.chmod(where, 0o755)
    return where / "postgres"


@pytest.fixture(scope="module")
def old_kernels():
    root = world_traversable_tmpdir("walredod-old-kernel-")
    yield {"Landlock": build_old_kernel_postgres(root / "no-landlock", "Landlock", NO_LANDLOCK),
           "seccomp": build_old_kernel_postgres(root / "no-seccomp", "seccomp", NO_SECCOMP)}
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("missing", ["Landlock", "seccomp"])
def test_required_sandbox_refuses_a_kernel_without_it(engine_data_dir, old_kernels, missing):
    with pytest.raises(Unavailable, match=f"sandbox lacks {missing}") as refused:
        RedoEngine(data_dir=engine_data_dir, postgres_bin=old_kernels[missing], sandbox="required")
    assert "58000" in str(refused.value)


@pytest.mark.parametrize("missing", ["Landlock", "seccomp"])
def test_best_effort_sandbox_serves_with_what_the_kernel_has(engine_data_dir, old_kernels, real_requests, missing,
                                                             caplog):
    with RedoEngine(data_dir=engine_data_dir, postgres_bin=old_kernels[missing], sandbox="best_effort",
                    keep_spare=False) as engine:
        tag, lsn, base, records, expected = real_requests[0]
        assert engine.redo(tag, lsn, base, records) == expected
        report = engine.child_sandbox()
        process = process_sandbox(engine.child_pid)
    assert f"sandbox lacks {missing}" in caplog.text  # the child's warning, logged by the engine
    if missing == "Landlock":
        assert "landlock=none" in report and report.startswith("seccomp=kill-unlisted(")
        assert process.seccomp == 2
    else:
        assert "seccomp=none" in report and "landlock=abi" in report
        assert process.seccomp == 2  # the wrapper's own filter: the test's, not ours


def test_sandbox_off_is_said(engine_data_dir):
    with RedoEngine(data_dir=engine_data_dir, sandbox="off", keep_spare=False) as engine:
        assert engine.child_sandbox().startswith("none")
        assert process_sandbox(engine.child_pid).seccomp == 0


# --- walredod doctor ----------------------------------------------------------------------------------------------

def test_doctor_reports_and_probes_the_sandbox(engine_data_dir):
    done = subprocess.run([sys.executable, "-m", "walredod", "doctor", "--data-dir", str(engine_data_dir),
                           "--pings", "10"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "sandbox setting : required" in out
    assert "Seccomp: 2 (filter), NoNewPrivs: 1, not dumpable" in out
    assert "landlock=abi" in out
    assert "socket: killed" in out and "postgresql.auto.conf: denied" in out


def test_settings_default_to_the_required_sandbox():
    assert EngineSettings().sandbox == "required"
    text = textwrap.dedent((Path(__file__).parent.parent / "config" / "walredod.toml").read_text())
    assert 'sandbox = "required"' in text


# --- one uid for everything (the systemd unit) --------------------------------------------------------------------

@pytest.mark.skipif(not ROOT, reason="needs root to become the unit's single user")
def test_one_uid_for_daemon_and_children_is_contained():
    """Under the systemd unit the daemon and its children share the uid `walredod`: ownership separates nothing,
    the sandbox must. A forked process becomes that user and runs an engine (children then run as the same uid, as
    under the unit); a probe child tries what issue 14 found a child could do to its daemon and its siblings."""
    import json
    import pwd

    unit_user = pwd.getpwnam("walredod")
    data_dir = world_traversable_tmpdir("walredod-one-uid-")
    os.chown(data_dir, unit_user.pw_uid, unit_user.pw_gid)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "daemon", as the unit's user
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(unit_user.pw_gid)
            os.setuid(unit_user.pw_uid)
            with RedoEngine(data_dir=data_dir) as engine:
                datadir, template = engine.child_datadir, next(engine.data_root.glob("template-*"))
                me = os.getpid()
                # Without the sandbox, this uid may write all of these (the control: we can).
                with open(datadir / "postgresql.auto.conf", "a"), open(engine.extension, "ab"):
                    pass
                actions = [f"write:{datadir}/postgresql.auto.conf", f"read:{datadir}/PG_VERSION",
                           f"write:{template}/postgresql.auto.conf", f"write:{engine.extension}",
                           f"read:/proc/{me}/mem", f"read:/proc/{me}/environ", f"read:/proc/{engine.child_pid}/mem",
                           f"signal:{me}"]
                result = probe_sandbox(engine.settings, actions)
                outcome = {"uid": process_sandbox(engine.child_pid).uid, "outcomes": result.outcomes,
                           "error": str(result.error), "me": me}
            os.write(write_end, json.dumps(outcome).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    _, status = os.waitpid(pid, 0)
    shutil.rmtree(data_dir, ignore_errors=True)
    assert status == 0 and data
    outcome = json.loads(data)
    assert outcome["uid"] == unit_user.pw_uid  # the children share the daemon's uid
    outcomes = outcome["outcomes"]
    signal_action = f"signal:{outcome['me']}"
    for action, result in outcomes.items():
        expected = "killed" if action == signal_action else "denied (Permission denied)"
        assert result == expected, action
    assert len(outcomes) == 8 and "forbidden system call" in outcome["error"]
