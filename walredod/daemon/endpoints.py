"""Where the daemon's sockets live, who may connect to them, and that one daemon owns each.

- Naming: the workers' direct endpoints are named after the first ipc:// frontend endpoint.
- One daemon per endpoint: libzmq unlinks whatever sits at an ipc:// path when it binds, so a second daemon would
  silently take the first one's socket. Before binding we hold a lock beside the socket (``<path>.lock``) and try a
  plain AF_UNIX connect to the path: accepted means another process serves it (we refuse to start and touch
  nothing); refused means the file is left from a daemon that died (we remove it). A tcp:// port that is taken
  fails the bind (libzmq does not share listening ports); we say which.
- Access: every ipc socket file gets ``daemon.socket_group`` and ``daemon.socket_mode`` (connecting to a Unix
  socket needs write permission on it), so a pageserver whose user is in that group connects and nobody else does.
  The directory the daemon creates for them gets the matching search bits and nothing more; an existing directory
  of ours only gains the group and its search bit (never a shared one such as /tmp).
- ZeroMQ leaves socket files behind when its sockets close; whoever bound one removes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import grp
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from walredod.errors import Unavailable

log = logging.getLogger("walredod.daemon.endpoints")

PRIVATE_SOCKET_MODE = 0o600  # the backend socket: the supervisor and its workers (one user) only


class EndpointInUse(Unavailable):
    """Another process serves an endpoint this daemon was told to bind; the other one is left alone."""


def ipc_path(endpoint: str | None) -> str | None:
    if endpoint and endpoint.startswith("ipc://"):
        return endpoint[len("ipc://"):]
    return None


def remove_ipc_file(endpoint: str | None) -> None:
    """ZeroMQ does not remove an ipc:// socket file when its socket closes."""
    if path := ipc_path(endpoint):
        with contextlib.suppress(OSError):
            os.unlink(path)


def direct_endpoint_base(daemon_settings) -> str | None:
    """Workers' direct endpoints are named after the first ipc:// frontend endpoint (same directory, so the same
    access rules): ``ipc:///run/walredod/walredod.sock`` gives ``.../walredod-worker-<slot>.sock``, named by slot so
    clients' connections reach the slot's next worker after a restart. None (no direct path) without an ipc://
    endpoint: tcp:// clients may be on other machines."""
    if not daemon_settings.direct_data_path:
        return None
    for endpoint in daemon_settings.endpoints:
        if endpoint.startswith("ipc://"):
            stem = endpoint.removesuffix(".sock")
            return f"{stem}-worker"
    return None


# --- is anybody there? --------------------------------------------------------------------------------------------

LIVE, STALE, ABSENT = "live", "stale", "absent"


def probe_ipc_path(path: str) -> str:
    """LIVE when a process accepts connections on the Unix socket ``path``, STALE when it is a socket file nobody
    listens on, ABSENT when nothing is there. Raises EndpointInUse when the path is something else (a regular file
    is nobody's socket to remove) or cannot be checked."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return ABSENT
    if not stat.S_ISSOCK(mode):
        raise EndpointInUse(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return STALE
    except FileNotFoundError:
        return ABSENT  # removed in the meantime
    except PermissionError:
        raise EndpointInUse(f"cannot tell whether {path} is live: permission denied (another user's daemon?)") from None
    except OSError as error:
        if error.errno == errno.EAGAIN:  # a full accept queue: somebody listens
            return LIVE
        raise EndpointInUse(f"cannot tell whether {path} is live: {error.strerror}") from None
    finally:
        probe.close()
    return LIVE


def claim_ipc_path(path: str, what: str) -> None:
    """Make ``path`` free for our bind: refuse when another process serves it, remove the file when it is stale."""
    state = probe_ipc_path(path)
    if state == LIVE:
        raise EndpointInUse(f"{what} ipc://{path} is served by another process (it accepts connections): "
                            "another walredod on the same endpoint? Stop it or configure another endpoint")
    if state == STALE:
        log.info("removing the stale socket file %s (nobody listens on it)", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def remove_stale_sockets(pattern: str) -> None:
    """Socket files matching ``pattern`` that nobody listens on (left by daemons that died); live ones stay."""
    for path in glob.glob(pattern):
        try:
            if probe_ipc_path(path) == STALE:
                log.info("removing the stale socket file %s", path)
                os.unlink(path)
        except (EndpointInUse, OSError):
            continue


class EndpointLock:
    """An exclusive lock on ``<socket path>.lock`` for the daemon's life: two daemons started at the same moment
    cannot both pass the liveness probe and then take turns unlinking each other's socket."""

    def __init__(self, socket_path: str):
        self.path = socket_path + ".lock"
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise EndpointInUse(f"ipc://{socket_path} belongs to another walredod (it holds {self.path})") from None
            # The holder before us may have removed the file after we opened it: our lock would be on a ghost.
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # while still locked, so nobody holds a lock on the removed file
            os.close(self._fd)
            self._fd = None


# --- who may connect ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SocketAccess:
    """Owner group and permissions of the ipc socket files clients connect to."""

    gid: int
    mode: int

    @classmethod
    def from_settings(cls, daemon_settings) -> SocketAccess:
        group = daemon_settings.socket_group
        if group is None:
            gid = os.getegid()
        else:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise Unavailable(f"daemon.socket_group: there is no group {group!r}") from None
        return cls(gid, int(daemon_settings.socket_mode, 8))

    @property
    def directory_mode(self) -> int:
        """A directory holding sockets of ``mode``: search (not list) for whoever may connect."""
        return 0o700 | (0o010 if self.mode & 0o060 else 0) | (0o001 if self.mode & 0o006 else 0)


def _access(settings) -> SocketAccess:
    return settings if isinstance(settings, SocketAccess) else SocketAccess.from_settings(settings)


def restrict_socket(path: str | os.PathLike, settings) -> None:
    """Give the socket file at ``path`` the configured group and mode (``settings``: DaemonSettings or a
    SocketAccess). Call it right after binding, before announcing the socket: until then the file has the
    process's umask, which never grants others write permission (and so, connection) with our unit's UMask."""
    access = _access(settings)
    try:
        if os.stat(path).st_gid != access.gid:  # (a chown even to the same group is a syscall some units forbid)
            os.chown(path, -1, access.gid)
        os.chmod(path, access.mode)
    except OSError as error:
        raise Unavailable(f"daemon.socket_group/socket_mode: cannot give {path} group {access.gid} and mode "
                          f"{access.mode:o}: {error.strerror}") from None


def prepare_socket_dir(directory: str | os.PathLike, settings) -> None:
    """Make the directory of client-facing sockets reachable by the socket group (and no wider than needed when
    we create it). Its parent must exist: a missing one is a configuration mistake (see ``setting_problems``)."""
    access = _access(settings)
    directory = Path(directory)
    try:
        directory.mkdir(mode=access.directory_mode)
        if directory.stat().st_gid != access.gid:
            os.chown(directory, -1, access.gid)
        os.chmod(directory, access.directory_mode)  # mkdir's mode passes through the umask
        return
    except FileExistsError:
        pass
    info = directory.stat()
    shared = info.st_mode & (stat.S_ISVTX | stat.S_IWOTH)
    if info.st_uid != os.geteuid() or shared:
        return  # not ours to change (/tmp, another user's directory): the socket file's own mode still rules
    if access.mode & 0o060 and info.st_gid != access.gid:
        try:
            os.chown(directory, -1, access.gid)
        except OSError as error:
            raise Unavailable(f"daemon.socket_group: cannot give {directory} group {access.gid}: "
                              f"{error.strerror}") from None
    os.chmod(directory, stat.S_IMODE(info.st_mode) | (access.directory_mode & 0o011))


def prepare_private_dir(directory: str | os.PathLike) -> None:
    """The supervisor's backend socket directory: ours alone."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if directory.stat().st_uid == os.geteuid():
        os.chmod(directory, 0o700)


# --- configuration ------------------------------------------------------------------------------------------------

def setting_problems(daemon_settings) -> list[str]:
    """What in the [daemon] settings cannot work on this machine, each naming its setting."""
    problems = []
    for endpoint in daemon_settings.endpoints:
        if path := ipc_path(endpoint):
            parent = Path(path).parent
            if not parent.is_dir() and not parent.parent.is_dir():
                problems.append(f"daemon.endpoints: {endpoint}: neither {parent} nor its parent exists")
    group = daemon_settings.socket_group
    if group is not None:
        try:
            entry = grp.getgrnam(group)
        except KeyError:
            problems.append(f"daemon.socket_group: there is no group {group!r}")
        else:
            if os.geteuid() != 0 and entry.gr_gid != os.getegid() and entry.gr_gid not in os.getgroups():
                problems.append(f"daemon.socket_group: the daemon's user is not in group {group!r}, so it cannot "
                                "give its sockets to that group")
    return problems


# --- binding ------------------------------------------------------------------------------------------------------

def bind(sock, endpoint: str) -> None:
    """``sock.bind(endpoint)``, with a taken address said in words."""
    import zmq

    try:
        sock.bind(endpoint)
    except zmq.ZMQError as error:
        if error.errno == errno.EADDRINUSE:
            raise EndpointInUse(f"{endpoint}: the address is in use (another walredod, or another program)") from None
        raise Unavailable(f"cannot bind {endpoint}: {error.strerror}") from None


def bind_worker_endpoint(sock, endpoint: str, settings, claim: bool = True) -> None:
    """A worker's direct endpoint: refused when live, a stale file removed, then bound and restricted. ``claim``
    False: the path is ours already (bound again after our own socket there was closed)."""
    path = ipc_path(endpoint)
    if path and claim:
        claim_ipc_path(path, "worker endpoint")
    bind(sock, endpoint)
    if path:
        restrict_socket(path, settings)


class SupervisorEndpoints:
    """The endpoints a supervisor binds: claimed (locked, checked, stale files removed) before binding, and their
    files removed at stop. On an error nothing of another daemon is touched and what we made is undone."""

    def __init__(self, daemon_settings, backend_endpoint: str):
        self.access = SocketAccess.from_settings(daemon_settings)
        self._locks: list[EndpointLock] = []
        self._bound: list[str] = []
        self._worker_patterns: list[str] = []
        try:
            for endpoint in daemon_settings.endpoints:
                if path := ipc_path(endpoint):
                    prepare_socket_dir(Path(path).parent, self.access)
                    self._locks.append(EndpointLock(path))
                    claim_ipc_path(path, "endpoint")
            if base := direct_endpoint_base(daemon_settings):
                # Ours alone now that we hold the frontend's lock; a live one is a worker of a daemon still running.
                # (.sock: the workers' direct endpoints; .local: their sockets of the local data path.)
                self._worker_patterns = [f"{ipc_path(base)}-[0-9]*.sock", f"{ipc_path(base)}-[0-9]*.local"]
                for pattern in self._worker_patterns:
                    for path in glob.glob(pattern):
                        claim_ipc_path(path, "worker endpoint")
            backend_dir = Path(ipc_path(backend_endpoint)).parent
            prepare_private_dir(backend_dir)
            remove_stale_sockets(str(backend_dir / "backend-*.sock"))  # other daemons may share the data directory
        except BaseException:
            self.release()
            raise

    def bind_frontend(self, sock, endpoint: str) -> None:
        bind(sock, endpoint)
        if path := ipc_path(endpoint):
            self._bound.append(path)
            restrict_socket(path, self.access)

    def bind_backend(self, sock, endpoint: str) -> None:
        bind(sock, endpoint)
        path = ipc_path(endpoint)
        self._bound.append(path)
        os.chmod(path, PRIVATE_SOCKET_MODE)

    def release(self) -> None:
        """After the sockets are closed (and the workers stopped): remove our socket files, then the locks."""
        for path in self._bound:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._bound.clear()
        for pattern in self._worker_patterns:
            remove_stale_sockets(pattern)  # a worker killed before it could remove its own
        for lock in self._locks:
            lock.release()
        self._locks.clear()
def local_socket_path(daemon_settings, slot: int) -> str | None:
    """A slot's socket of the local data path (docs/local-data-path.md), beside its direct endpoint and named by slot
    like it: ``.../walredod-worker-<slot>.local``. None without the direct data path or with the local path off."""
    base = direct_endpoint_base(daemon_settings)
    if base is None or not daemon_settings.local_data_path:
        return None
    return f"{base[len('ipc://'):]}-{slot}.local"
