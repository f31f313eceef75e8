"""The daemon against its operators' mistakes, other local users and hostile clients (issue 14, items 2-6):
configuration that names what is not there, a second daemon on a live endpoint, stale socket files, who may connect
(ipc socket group and mode, CURVE on tcp), a process posing as a worker, and clients that flood or never read."""

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
from test_daemon import Daemon, free_tcp_port, wait_until
from walredod import protocol
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
        """The base configuration with our [daemon] lines: a key it has already is replaced."""
        super().write_config(workers)
        lines = self.config.read_text().splitlines()
        section = lines.index("[daemon]")
        for line in self.daemon_settings.splitlines():
            key = line.split("=", 1)[0].strip()
            same = [i for i, old in enumerate(lines) if old.split("=", 1)[0].strip() == key]
            if same:
                lines[same[0]] = line
            else:
                lines.insert(section + 1, line)
        self.config.write_text("\n".join(lines) + "\n")


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
                          f'"tcp://127.0.0.1:{port}"]\nallow_plain_tcp = true\n[engine]\ndata_dir = "{root / "data"}"\n')
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
             root / "walredod-worker-7.local", root / "data" / "run" / "backend-999999999.sock"]
    for path in stale:
        stale_socket(path)
    daemon = Daemon(root, workers=1)
    try:
        assert not (root / "walredod-worker-7.sock").exists() and not (root / "walredod-worker-7.local").exists()
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


# --- item 2: workers prove who they are -------------------------------------------------------------------------

def metric(daemon, name: str) -> float:
    """The sum of a counter's samples on the daemon's metrics endpoint."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


FORGER = """
import sys, time, zmq
from walredod.daemon import backend
endpoint, slot, pid, secret_guess = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode()
context = zmq.Context()
socks = []
for creds in (None, (b"worker-%d" % slot, secret_guess)):  # no credentials; a guessed secret
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"w%d.%d" % (slot, pid))  # the real worker's identity
    if creds:
        sock.plain_username, sock.plain_password = creds
    sock.connect(endpoint)
    socks.append(sock)
def send(sock, frames):  # never blocks: a DEALER with no admitted connection would wait for one forever
    try:
        sock.send_multipart(frames, zmq.NOBLOCK)
    except zmq.Again:
        pass
for sock in socks:
    send(sock, backend.encode_ready(slot, pid, pid, 64))
page = bytes([0x41]) * 8192
deadline = time.monotonic() + 5
token = 1
while time.monotonic() < deadline:  # forged replies, status ok, for every token the supervisor might use
    for sock in socks:
        send(sock, backend.encode_reply(backend._TOKEN.pack(token), [b"", b"forged", page]))
    token += 1
    time.sleep(0.001)
"""


def test_a_forged_worker_registration_is_refused_and_logged(real_requests):
    """The issue's attack: a process of the daemon's own uid connects to the backend socket, registers as a slot's
    worker (its pid and identity from `status`) and sends forged replies. Every client still gets PostgreSQL's pages;
    the refusals are logged and counted."""
    daemon = Daemon(world_traversable_tmpdir("walredod-hardening-forge-"), workers=1)
    try:
        backend_socket, = (daemon.root / "data" / "run").glob("backend-*.sock")
        worker = daemon.workers()[0]
        forger = subprocess.Popen([sys.executable, "-c", FORGER, f"ipc://{backend_socket}", "0", str(worker["pid"]),
                                   "0" * 32], env={**os.environ, "PYTHONPATH": os.getcwd()})
        try:
            with RedoClient(daemon.endpoint, timeout=30, direct=False) as client:
                results = client.redo_many([r[:4] for r in real_requests[:300]])
            assert results == [r[4] for r in real_requests[:300]]
        finally:
            forger.wait(60)
        assert daemon.workers()[0]["pid"] == worker["pid"]  # the real worker keeps its slot
        log = (daemon.root / "daemon.log").read_text()
        assert "refused a connection in walredod-workers" in log, log[-2000:]
        assert metric(daemon, "walredod_refused_connections_total") >= 1
    finally:
        daemon.stop()


# --- item 3: tcp needs CURVE ------------------------------------------------------------------------------------

def test_tcp_without_curve_needs_an_explicit_setting(tmp_path):
    config = tmp_path / "walredod.toml"
    config.write_text('[daemon]\nendpoints = ["tcp://127.0.0.1:1"]\n')
    result = walredod("check-config", "--config", str(config))
    assert result.returncode == 2 and "daemon.allow_plain_tcp" in result.stderr, result.stderr
    config.write_text(f'[daemon]\nendpoints = ["tcp://127.0.0.1:1"]\ncurve_secret_key_file = "{tmp_path}/none"\n'
                      f'curve_client_keys = "{tmp_path}"\n')
    result = walredod("check-config", "--config", str(config))
    assert result.returncode == 2
    assert "daemon.curve_secret_key_file" in result.stderr and "daemon.curve_client_keys" in result.stderr


def test_plain_tcp_when_allowed_is_warned_at_start(real_requests):
    root = world_traversable_tmpdir("walredod-hardening-plaintcp-")
    daemon = Daemon(root, workers=1, tcp=True, tcp_curve=False)
    try:
        with RedoClient(daemon.tcp_endpoint, timeout=30) as client:
            tag, lsn, base, records, expected = real_requests[0]
            assert client.redo(tag, lsn, base, records) == expected
        assert "serves plain tcp" in (root / "daemon.log").read_text()
    finally:
        daemon.stop()


def test_a_tcp_client_needs_an_allowed_key(real_requests, tmp_path):
    from walredod.client import CurveKeys
    from walredod.daemon.auth import keygen

    daemon = Daemon(world_traversable_tmpdir("walredod-hardening-curve-"), workers=1, tcp=True)
    try:
        tag, lsn, base, records, expected = real_requests[0]
        with RedoClient(daemon.tcp_endpoint, timeout=30, curve=daemon.curve) as client:
            assert client.redo(tag, lsn, base, records) == expected
        _, stranger_secret = keygen(tmp_path, "stranger")
        stranger = CurveKeys.load(daemon.root / "keys" / "walredod.key", stranger_secret)
        for keys in (stranger, None):  # a key the daemon does not list; no CURVE at all
            with RedoClient(daemon.tcp_endpoint, timeout=2, curve=keys) as client:
                with pytest.raises(Unavailable):
                    client.ping(timeout=2)
        assert "client key" in (daemon.root / "daemon.log").read_text()
        status = walredod("status", "--endpoint", daemon.tcp_endpoint, "--server-key",
                          str(daemon.root / "keys" / "walredod.key"), "--key",
                          str(daemon.root / "keys" / "clients" / "test-client.key_secret"))
        assert status.returncode == 0 and "ready" in status.stdout, status.stderr
        assert metric(daemon, "walredod_refused_connections_total") >= 1
    finally:
        daemon.stop()


# --- item 4: bounded resources ----------------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


UNREAD_BOUND = 24 * 1024 * 1024  # growth allowed while a client reads none of 10,000 page replies (80 MB of them)


@pytest.mark.parametrize("path", ["supervisor", "worker"])
def test_replies_a_client_does_not_read_are_bounded(real_requests, path):
    """A client sends 10,000 small requests (no base image: their pages start empty) in waves, to the supervisor or
    straight to a worker, and never reads: that process keeps at most max_unread_replies (100 here) of its 8 kB
    replies, drops the rest, and serves others meanwhile. Unbounded, the replies alone would be 80 MB."""
    daemon = DaemonWith(world_traversable_tmpdir("walredod-hardening-unread-"),
                        "max_unread_replies = 100\nmax_pending_per_client = 20000\nmax_pending = 20000\n", workers=2)
    try:
        small = [r for r in real_requests if r[2] is None and sum(len(rec.data) for rec in r[3]) < 2000][:100]
        assert len(small) >= 10
        with RedoClient(daemon.endpoint, timeout=60, direct=False) as warm:  # the process's own start-up aside
            warm.redo_many([r[:4] for r in small] * 20)
        if path == "supervisor":
            pid, endpoint = daemon.process.pid, daemon.endpoint
            served = lambda: daemon.client.status()["pending"] == 0  # noqa: E731
        else:
            worker = daemon.workers()[0]
            pid, endpoint = worker["pid"], f"{daemon.endpoint.removesuffix('.sock')}-worker-0.sock"
            with RedoClient(endpoint.replace("-worker-0", ""), timeout=60) as warm:  # the worker warmed too
                warm.redo_many([r[:4] for r in small] * 20)
            first = daemon.workers()[0]["served"]
        before = rss_bytes(pid)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 1)  # this process stops reading after one reply
        sock.setsockopt(zmq.RCVBUF, 4096)
        sock.connect(endpoint)
        for wave in range(10):  # in waves of 1,000, so that the requests held at once stay few
            for i in range(wave * 1000, wave * 1000 + 1000):
                tag, lsn, base, records, _ = small[i % len(small)]
                sock.send_multipart(protocol.encode_redo_request(i, tag, lsn, base, records), copy=False)
            if wave == 5:
                tag, lsn, base, records, expected = real_requests[5]
                with RedoClient(daemon.endpoint, timeout=60, direct=False) as other:
                    assert other.redo(tag, lsn, base, records) == expected
            if path == "worker":
                target = first + 1000 * (wave + 1)
                served = lambda: daemon.workers()[0]["served"] >= target  # noqa: E731
            wait_until(served, timeout=180, message="wave served")
        grown = rss_bytes(pid) - before
        print(f"{path} grew by {grown / 2**20:.1f} MiB while 10,000 replies went unread")
        assert grown < UNREAD_BOUND, f"{path} grew by {grown / 2**20:.1f} MiB"
        if path == "supervisor":
            assert metric(daemon, 'walredod_dropped_replies_total{reason="unread"}') > 9000
        sock.close()
    finally:
        daemon.stop()


def test_one_clients_flood_does_not_make_another_wait_for_it(real_requests):
    """Client A sends 5,000 requests: it may hold half of max_pending (1,000; the rest are refused at once) and they
    wait in the supervisor; client B's request is admitted and served within a round of the fair queue, long before
    A's backlog is done."""
    daemon = Daemon(world_traversable_tmpdir("walredod-hardening-fair-"), workers=1)  # max_pending 2000
    try:
        flood = zmq.Context.instance().socket(zmq.DEALER)
        flood.setsockopt(zmq.LINGER, 0)
        flood.connect(daemon.endpoint)
        for i in range(5_000):
            tag, lsn, base, records, _ = real_requests[i % len(real_requests)]
            flood.send_multipart(protocol.encode_redo_request(i, tag, lsn, base, records), copy=False)
        wait_until(lambda: daemon.client.status()["waiting"] > 800, timeout=60, message="the flood is queued")
        tag, lsn, base, records, expected = real_requests[7]
        with RedoClient(daemon.endpoint, timeout=60, direct=False) as other:
            assert other.redo(tag, lsn, base, records) == expected
        assert daemon.client.status()["waiting"] > 400  # A's backlog is still there: B did not wait for it
        flood.close()
    finally:
        daemon.stop()


HUGE_MESSAGE = """
import sys, zmq
sock = zmq.Context().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(sys.argv[1])
frame = b"x" * (16 * 1024 * 1024)  # each frame under the daemon's MAXMSGSIZE, the message far over its limit
frames = [b""] + [frame] * int(sys.argv[2])
sock.send_multipart(frames, copy=False)
sock.poll(20_000)  # keep the connection while the daemon takes it in (it drops it instead)
"""


@pytest.mark.parametrize("path", ["supervisor", "worker"])
def test_a_message_too_large_to_buffer_is_dropped_within_the_memory_limit(real_requests, path):
    """ZeroMQ delivers a message only whole and caps only each frame: 64 frames of 16 MiB (1 GiB) would be
    buffered before the supervisor (or a worker, on the direct path) could refuse it. Past max_memory_bytes the
    process drops its client connections; its peak resident memory stays under that plus one check interval's
    arrivals (50 ms), and it serves on."""
    limit = 192 * 1024 * 1024
    daemon = DaemonWith(world_traversable_tmpdir("walredod-hardening-huge-"),
                        f"max_memory_bytes = {limit}\nmax_pending_bytes = {64 * 1024 * 1024}\n", workers=1)
    try:
        if path == "supervisor":
            pid, endpoint = daemon.process.pid, daemon.endpoint
        else:
            pid, endpoint = daemon.workers()[0]["pid"], f"{daemon.endpoint.removesuffix('.sock')}-worker-0.sock"
        log = daemon.root / "daemon.log"
        attacker = subprocess.Popen([sys.executable, "-c", HUGE_MESSAGE, endpoint, "64"])
        try:
            wait_until(lambda: "over daemon.max_memory_bytes" in log.read_text(), timeout=120,
                       message="the connections were dropped")
        finally:
            attacker.kill()
            attacker.wait()
        peak = int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("VmHWM:"))) * 1024
        print(f"{path} peak resident memory {peak / 2**20:.0f} MiB (limit {limit >> 20} MiB)")
        assert peak < limit + 256 * 1024 * 1024, f"{path} peaked at {peak / 2**20:.0f} MiB"
        tag, lsn, base, records, expected = real_requests[0]
        with RedoClient(daemon.endpoint, timeout=60) as client:  # both paths
            assert client.redo(tag, lsn, base, records) == expected
        if path == "supervisor":
            assert metric(daemon, "walredod_memory_resets_total") >= 1
        assert daemon.workers()[0]["pid"] == pid or path == "supervisor"  # the worker lived through it
    finally:
        daemon.stop()
