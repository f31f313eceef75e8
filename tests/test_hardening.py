"""The daemon against its own operators' mistakes and other local users (issue 14, items 3, 5 and 6):
configuration that names what is not there, a second daemon on a live endpoint, stale socket files, and who may
connect to the ipc sockets."""

from __future__ import annotations

import grp
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from conftest import world_traversable_tmpdir
from test_daemon import Daemon, free_tcp_port
from walredod.client import RedoClient
from walredod.config import EngineSettings, Settings
from walredod.daemon import endpoints, preflight
from walredod.engine.datadir import find_extension, find_postgres_bin
from walredod.errors import Unavailable


def walredod(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walredod", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "WALREDOD_LOG_LEVEL": "WARNING"})


class DaemonWith(Daemon):
    """A test daemon with more [daemon] settings."""

    def __init__(self, root: Path, daemon_settings: str, **kwargs):
        self.daemon_settings = daemon_settings
        super().__init__(root, **kwargs)

    def write_config(self, workers: int) -> None:
        super().write_config(workers)
        text = self.config.read_text().replace("[daemon]\n", f"[daemon]\n{self.daemon_settings}", 1)
        self.config.write_text(text)


def stale_socket(path: Path) -> None:
    """A socket file nobody listens on: what a daemon killed by SIGKILL leaves."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()


# --- item 6: configuration is honest ----------------------------------------------------------------------------

@pytest.mark.parametrize("setting, line", [
    ("engine.postgres_bin", 'postgres_bin = "/nonexistent/bin/postgres"'),
    ("engine.extension_path", 'extension_path = "/nonexistent/walredod_redo.so"'),
    ("engine.neon_postgres_bin", 'kind = "neon"\nneon_postgres_bin = "/nonexistent/neon/postgres"'),
    ("engine.neon_ld_library_path", 'kind = "neon"\nneon_postgres_bin = "/bin/true"\n'
                                    'neon_ld_library_path = "/usr/lib:/nonexistent/lib"'),
    ("engine.data_dir", 'data_dir = "/nonexistent/deeper/walredod"'),
])
def test_check_config_refuses_a_path_that_is_not_there(tmp_path, setting, line):
    config = tmp_path / "walredod.toml"
    config.write_text(f"[engine]\n{line}\n")
    result = walredod("check-config", "--config", str(config))
    assert result.returncode == 2, result
    assert setting in result.stderr and "/nonexistent" in result.stderr, result.stderr
    assert "ok" not in result.stdout


def test_check_config_refuses_daemon_paths_and_groups(tmp_path):
    config = tmp_path / "walredod.toml"
    config.write_text('[daemon]\nendpoints = ["ipc:///nonexistent/deeper/walredod.sock"]\n'
                      'socket_group = "no-such-group-walredod"\n')
    result = walredod("check-config", "--config", str(config))
    assert result.returncode == 2
    assert "daemon.endpoints" in result.stderr and "daemon.socket_group" in result.stderr, result.stderr
    config.write_text('[daemon]\nsocket_mode = "0999"\n')
    result = walredod("check-config", "--config", str(config))
    assert result.returncode == 2 and "daemon.socket_mode" in result.stderr


def test_check_config_accepts_the_shipped_file_and_real_paths(tmp_path):
    shipped = Path(__file__).resolve().parent.parent / "config" / "walredod.toml"
    assert walredod("check-config", "--config", str(shipped)).returncode == 0
    config = tmp_path / "walredod.toml"
    config.write_text(f'[engine]\npostgres_bin = "{find_postgres_bin(EngineSettings())}"\n'
                      f'extension_path = "{find_extension(EngineSettings())}"\ndata_dir = "{tmp_path / "new"}"\n')
    result = walredod("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr


def test_a_configured_path_is_never_replaced_by_the_default():
    settings = EngineSettings(postgres_bin="/nonexistent/postgres", extension_path="/nonexistent/x.so")
    with pytest.raises(Unavailable, match="engine.postgres_bin: /nonexistent/postgres does not exist"):
        find_postgres_bin(settings)
    with pytest.raises(Unavailable, match="engine.extension_path: /nonexistent/x.so does not exist"):
        find_extension(settings)
    with pytest.raises(Unavailable, match="engine.postgres_bin: /etc/passwd is not executable"):
        find_postgres_bin(EngineSettings(postgres_bin="/etc/passwd"))
    assert preflight.problems(Settings()) == []


def test_serve_refuses_a_path_that_is_not_there():
    root = world_traversable_tmpdir("walredod-hardening-config-")
    config = root / "walredod.toml"
    config.write_text(f'[engine]\ndata_dir = "{root / "data"}"\nextension_path = "/nonexistent/walredod_redo.so"\n')
    result = walredod("serve", "--config", str(config), "--endpoint", f"ipc://{root}/walredod.sock")
    assert result.returncode == 2
    assert "engine.extension_path" in result.stderr, result.stderr
    assert not list(root.glob("*.sock*"))


# --- item 5: one daemon per endpoint ----------------------------------------------------------------------------

def test_probe_tells_live_from_stale(tmp_path):
    live, stale, regular = tmp_path / "live.sock", tmp_path / "stale.sock", tmp_path / "file"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(live))
    listener.listen()
    stale_socket(stale)
    regular.write_text("not a socket")
    try:
        assert endpoints.probe_ipc_path(str(live)) == endpoints.LIVE
        assert endpoints.probe_ipc_path(str(stale)) == endpoints.STALE
        assert endpoints.probe_ipc_path(str(tmp_path / "absent")) == endpoints.ABSENT
        with pytest.raises(endpoints.EndpointInUse, match="not a socket"):
            endpoints.claim_ipc_path(str(regular), "endpoint")
        with pytest.raises(endpoints.EndpointInUse, match="served by another process"):
            endpoints.claim_ipc_path(str(live), "endpoint")
        endpoints.claim_ipc_path(str(stale), "endpoint")
        assert live.exists() and regular.exists() and not stale.exists()
    finally:
        listener.close()


def test_endpoint_lock_is_exclusive_and_removed_on_release(tmp_path):
    path = str(tmp_path / "walredod.sock")
    first = endpoints.EndpointLock(path)
    with pytest.raises(endpoints.EndpointInUse, match="belongs to another walredod"):
        endpoints.EndpointLock(path)
    first.release()
    assert not Path(path + ".lock").exists()
    endpoints.EndpointLock(path).release()


def test_second_daemon_on_the_same_endpoint_is_refused_and_the_first_serves_on(real_requests):
    first = Daemon(world_traversable_tmpdir("walredod-hardening-first-"), workers=1)
    try:
        sockets_before = {p: p.stat().st_ino for p in first.root.glob("*.sock")}
        assert len(sockets_before) == 2  # the frontend and the worker's direct endpoint
        root = world_traversable_tmpdir("walredod-hardening-second-")
        config = root / "walredod.toml"
        config.write_text(f'[daemon]\nworkers = 1\nmetrics_address = "127.0.0.1:{free_tcp_port()}"\n'
                          f'[engine]\ndata_dir = "{root / "data"}"\n')
        second = walredod("serve", "--config", str(config), "--endpoint", first.endpoint)
        assert second.returncode == 1
        assert "another walredod" in second.stderr and first.endpoint in second.stderr, second.stderr
        assert {p: p.stat().st_ino for p in first.root.glob("*.sock")} == sockets_before
        tag, lsn, base, records, expected = real_requests[0]
        assert first.client.redo(tag, lsn, base, records) == expected
        with RedoClient(first.endpoint, timeout=30, direct=False) as client:
            assert client.redo(tag, lsn, base, records) == expected
    finally:
        first.stop()


def test_a_live_endpoint_of_another_program_is_left_alone(real_requests):
    """No lock file to go by: the liveness probe alone must see that somebody serves the path."""
    root = world_traversable_tmpdir("walredod-hardening-other-")
    path = root / "walredod.sock"
    other = zmq.Context.instance().socket(zmq.ROUTER)
    other.setsockopt(zmq.LINGER, 0)
    other.bind(f"ipc://{path}")
    inode = path.stat().st_ino
    try:
        config = root / "walredod.toml"
        config.write_text(f'[daemon]\nworkers = 1\n[engine]\ndata_dir = "{root / "data"}"\n')
        result = walredod("serve", "--config", str(config), "--endpoint", f"ipc://{path}")
        assert result.returncode == 1
        assert "served by another process" in result.stderr, result.stderr
        assert path.stat().st_ino == inode
        client = zmq.Context.instance().socket(zmq.DEALER)
        client.setsockopt(zmq.LINGER, 0)
        client.connect(f"ipc://{path}")
        client.send(b"still mine")
        assert other.poll(10_000) and other.recv_multipart()[1] == b"still mine"
        client.close()
    finally:
        other.close()


def test_taken_tcp_port_is_refused_and_nothing_is_left():
    root = world_traversable_tmpdir("walredod-hardening-tcp-")
    port = free_tcp_port()
    taken = socket.socket()
    taken.bind(("127.0.0.1", port))
    taken.listen()
    try:
        config = root / "walredod.toml"
        config.write_text(f'[daemon]\nworkers = 1\nendpoints = ["ipc://{root}/walredod.sock", '
                          f'"tcp://127.0.0.1:{port}"]\n[engine]\ndata_dir = "{root / "data"}"\n')
        result = walredod("serve", "--config", str(config))
        assert result.returncode == 1
        assert f"tcp://127.0.0.1:{port}: the address is in use" in result.stderr, result.stderr
        assert not list(root.glob("*.sock*")) and not list((root / "data" / "run").glob("*.sock"))
    finally:
        taken.close()


def test_stale_socket_files_are_removed_at_start_and_stop(real_requests):
    """What a SIGKILLed daemon leaves: its frontend, a worker's direct endpoint, its backend socket."""
    root = world_traversable_tmpdir("walredod-hardening-stale-")
    (root / "data" / "run").mkdir(parents=True)
    stale = [root / "walredod.sock", root / "walredod-worker-0.sock", root / "walredod-worker-7.sock",
             root / "data" / "run" / "backend-999999999.sock"]
    for path in stale:
        stale_socket(path)
    daemon = Daemon(root, workers=1)
    try:
        assert not (root / "walredod-worker-7.sock").exists()
        assert not (root / "data" / "run" / "backend-999999999.sock").exists()
        tag, lsn, base, records, expected = real_requests[1]
        assert daemon.client.redo(tag, lsn, base, records) == expected
    finally:
        daemon.stop()
    assert not list(root.glob("*.sock*")) and not list((root / "data" / "run").glob("*.sock"))


def test_a_killed_daemons_files_do_not_stop_the_next_one(real_requests):
    root = world_traversable_tmpdir("walredod-hardening-killed-")
    daemon = Daemon(root, workers=1)
    daemon.process.kill()
    daemon.process.wait()
    daemon.client.close()
    assert (root / "walredod.sock").exists()  # left behind, nobody listens
    time.sleep(1)  # the worker dies with its supervisor (PR_SET_PDEATHSIG)
    again = Daemon(root, workers=1)
    try:
        tag, lsn, base, records, expected = real_requests[2]
        assert again.client.redo(tag, lsn, base, records) == expected
        assert len(list((root / "data" / "run").glob("backend-*.sock"))) == 1
    finally:
        again.stop()


# --- item 3: who may connect to the ipc sockets -----------------------------------------------------------------

CLIENT_GROUP = "walredod-clients"
MEMBER_UID, OUTSIDER_UID = 64101, 64102  # no passwd entry needed: the kernel checks numbers


def client_group() -> int:
    if os.geteuid() != 0:
        pytest.skip("creating a group and switching users needs root (CI runs as root)")
    try:
        return grp.getgrnam(CLIENT_GROUP).gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", CLIENT_GROUP], check=True)
        return grp.getgrnam(CLIENT_GROUP).gr_gid


def as_user(uid: int, gids: list[int], work) -> object:
    """Run ``work()`` in a forked child as ``uid`` with groups ``gids``; its result (or its error as text)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.setgroups(gids)
            os.setgid(gids[0])
            os.setuid(uid)
            result = work()
        except BaseException as error:  # noqa: BLE001 (reported to the parent)
            result = f"{type(error).__name__}: {error}"
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_only_the_socket_group_connects(real_requests):
    gid = client_group()
    root = world_traversable_tmpdir("walredod-hardening-access-")
    daemon = DaemonWith(root, f'socket_group = "{CLIENT_GROUP}"\nsocket_mode = "0660"\n', workers=1)
    try:
        for path in root.glob("*.sock"):
            info = path.stat()
            assert info.st_gid == gid and info.st_mode & 0o777 == 0o660, path
        assert (root / "data" / "run").stat().st_mode & 0o777 == 0o700
        for path in (root / "data" / "run").glob("*.sock"):
            assert path.stat().st_mode & 0o777 == 0o600
        tag, lsn, base, records, expected = real_requests[3]

        def page_as_client():
            with RedoClient(daemon.endpoint, timeout=30, context=zmq.Context()) as client:
                return client.redo(tag, lsn, base, records).hex()

        assert as_user(MEMBER_UID, [gid], page_as_client) == expected.hex()  # direct path: a worker's socket
        refused = as_user(OUTSIDER_UID, [OUTSIDER_UID], page_as_client)
        assert refused.startswith("Unavailable: permission denied on ") and str(root) in refused, refused

        def raw_zeromq():  # a client that skips our library's check only sees silence
            sock = zmq.Context().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(daemon.endpoint)
            sock.send_multipart([b"", b"\x01"])
            return bool(sock.poll(2000))

        assert as_user(OUTSIDER_UID, [OUTSIDER_UID], raw_zeromq) is False
        assert daemon.client.redo(tag, lsn, base, records) == expected
    finally:
        daemon.stop()


def test_client_says_why_when_nobody_answers(tmp_path):
    stale_socket(tmp_path / "stale.sock")
    with RedoClient(f"ipc://{tmp_path}/stale.sock", timeout=0.5) as client:
        with pytest.raises(Unavailable, match="nothing listens on"):
            client.ping(timeout=0.5)
    with RedoClient(f"ipc://{tmp_path}/absent.sock", timeout=0.5) as client:
        with pytest.raises(Unavailable, match="no socket at"):
            client.ping(timeout=0.5)
