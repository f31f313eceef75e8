"""The systemd unit: valid, hardened (exposure at most 1.5), and still allowing every system call the daemon makes.

No systemd runs here (nor in CI), so the unit is checked offline with `systemd-analyze` (scripts/setup.sh installs
it): `verify` for its syntax and references, `security --offline=true` for its exposure, and `syscall-filter` to
expand the unit's SystemCallFilter= into the calls it allows.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "walredod.service"
MAX_EXPOSURE = 1.5

# Every system call the supervisor, its workers, their redo children (PostgreSQL 15 single-user) and `cp -a` of a
# template made while a daemon ran with two workers, an ipc and a tcp endpoint, metrics, every request set of the
# benchmark sample, a reload and a stop: `strace -f -c` of `walredod serve` (2026-12-02). A daemon run as root adds
# setgroups/setreuid/setregid (children switch to run_as); the unit runs it as walredod.
TRACED = """accept4 access arch_prctl bind brk chdir chmod chown clock_gettime clock_nanosleep clone clone3 close
close_range connect copy_file_range dup dup2 epoll_create1 epoll_ctl epoll_wait eventfd2 execve fadvise64 fallocate
fchownat fcntl fgetxattr flistxattr flock fsetxattr fstatfs ftruncate futex getcwd getdents64 getegid geteuid getgid
getpeername getpid getppid getrandom getsockname getsockopt gettid getuid getxattr ioctl kill listen llistxattr lseek
madvise mkdir mkdirat mmap mprotect munmap newfstatat openat pipe2 poll prctl pread64 prlimit64 pwrite64 pwritev read
readlink recvfrom recvmsg removexattr rename restart_syscall rmdir rseq rt_sigaction rt_sigprocmask rt_sigreturn
sched_getaffinity sched_getparam sched_getscheduler sched_setaffinity sched_setscheduler sendto set_robust_list
set_tid_address setgroups setitimer setregid setreuid setsockopt setxattr shmat shmctl shmdt shmget shutdown signalfd4
socket statfs statx sysinfo umask uname unlink unlinkat utimensat vfork wait4 write""".split()
# What a redo child needs to enter its own sandbox (issue 14, item 1): seccomp and Landlock.
SANDBOX = ["seccomp", "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "prctl", "setrlimit",
           "prlimit64"]


def systemd_analyze(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: run scripts/setup.sh (it installs the systemd package)")
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=120)


def test_unit_verifies_clean():
    result = systemd_analyze("verify", str(UNIT))
    assert result.returncode == 0 and UNIT.name not in result.stderr, result.stderr


def test_unit_exposure_is_at_most_1_5():
    result = systemd_analyze("security", "--offline=true", "--no-pager", str(UNIT))
    match = re.search(r"Overall exposure level for walredod\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def syscall_groups() -> dict[str, list[str]]:
    """Each @group of this systemd, as it lists them (members may be groups themselves)."""
    groups, current = {}, None
    for line in systemd_analyze("syscall-filter", "--no-pager").stdout.splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if not line.startswith(" "):
            current = groups.setdefault(text, [])
        elif current is not None:
            current.append(text)
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    calls = set()
    for name in names:
        calls |= expand(groups[name], groups) if name.startswith("@") else {name}
    return calls


def allowed_syscalls() -> set[str]:
    """The unit's SystemCallFilter= lines in order: the first allow list starts the set, later allow lines add to
    it, ~ lines take away (systemd's rule)."""
    groups = syscall_groups()
    allowed: set[str] = set()
    for line in UNIT.read_text().splitlines():
        if line.startswith("SystemCallFilter="):
            value = line.split("=", 1)[1]
            if value.startswith("~"):
                allowed -= expand(value[1:].split(), groups)
            else:
                allowed |= expand(value.split(), groups)
    return allowed


def test_unit_allows_every_system_call_the_daemon_makes():
    allowed = allowed_syscalls()
    assert "ptrace" not in allowed and "mount" not in allowed and "init_module" not in allowed
    assert not set(TRACED) - allowed
    assert not set(SANDBOX) - allowed


def test_unit_lets_the_daemon_do_what_it_must():
    """Settings whose absence would break the daemon under the unit: where its files go, the socket directory's
    group access, the address families of its endpoints."""
    text = UNIT.read_text()
    for line in ("StateDirectory=walredod", "RuntimeDirectory=walredod", "RuntimeDirectoryMode=0710",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "Type=notify", "KillMode=mixed"):
        assert line in text.splitlines(), line
