"""Who may talk to the supervisor (walredod.daemon.auth): the Gatekeeper's rules without sockets, then over real
ZeroMQ sockets with its ZAP handler — a process posing as a worker, or a tcp client without an allowed key, never
gets a message through."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest
import zmq
import zmq.utils.z85

from walredod.daemon import auth


def zap_request(domain: bytes, address: bytes, mechanism: bytes, *credentials: bytes) -> list[bytes]:
    return [b"1.0", b"7", domain, address, b"", mechanism, *credentials]


def ipc_peer(pid: int, uid: int | None = None) -> bytes:
    return f"localhost:{os.geteuid() if uid is None else uid}:0:{pid}".encode()


def status(reply: list[bytes]) -> bytes:
    assert reply[:2] == [b"1.0", b"7"]
    return reply[2]


def test_a_worker_needs_its_process_and_its_secret(caplog):
    gate = auth.Gatekeeper()
    secret = gate.expect_worker(3, pid=4242)
    user = auth.worker_username(3)
    ok = gate.decide(zap_request(auth.WORKER_DOMAIN, ipc_peer(4242), b"PLAIN", user, secret))
    assert status(ok) == b"200" and ok[4] == b"worker-3"
    with caplog.at_level(logging.WARNING, logger="walredod.daemon.auth"):
        refusals = {
            "another process": zap_request(auth.WORKER_DOMAIN, ipc_peer(4243), b"PLAIN", user, secret),
            "another uid": zap_request(auth.WORKER_DOMAIN, ipc_peer(4242, uid=os.geteuid() + 1), b"PLAIN", user,
                                       secret),
            "a wrong secret": zap_request(auth.WORKER_DOMAIN, ipc_peer(4242), b"PLAIN", user, b"x" * 32),
            "another slot": zap_request(auth.WORKER_DOMAIN, ipc_peer(4242), b"PLAIN", auth.worker_username(4),
                                        secret),
            "no credentials": zap_request(auth.WORKER_DOMAIN, ipc_peer(4242), b"NULL"),
            "not ipc": zap_request(auth.WORKER_DOMAIN, b"127.0.0.1", b"PLAIN", user, secret),
            "an unknown domain": zap_request(b"other", ipc_peer(4242), b"PLAIN", user, secret),
        }
        for what, request in refusals.items():
            reply = gate.decide(request)
            assert status(reply) == b"400" and reply[4] == b"", what
    assert gate.refused == len(refusals)
    assert "refused a connection in walredod-workers" in caplog.text
    gate.forget_worker(3)  # the slot's worker died: its secret is void
    assert status(gate.decide(zap_request(auth.WORKER_DOMAIN, ipc_peer(4242), b"PLAIN", user, secret))) == b"400"
    assert gate.decide([b"1.0"])[2] == b"400"


def test_a_restarted_slot_voids_the_old_workers_secret():
    gate = auth.Gatekeeper()
    old = gate.expect_worker(0, pid=100)
    new = gate.expect_worker(0, pid=101)
    user = auth.worker_username(0)
    assert status(gate.decide(zap_request(auth.WORKER_DOMAIN, ipc_peer(100), b"PLAIN", user, old))) == b"400"
    assert status(gate.decide(zap_request(auth.WORKER_DOMAIN, ipc_peer(101), b"PLAIN", user, new))) == b"200"


def test_tcp_clients_need_an_allowed_key():
    allowed_public, _ = zmq.curve_keypair()
    other_public, _ = zmq.curve_keypair()
    gate = auth.Gatekeeper(client_keys={zmq.utils.z85.decode(allowed_public)})
    ok = gate.decide(zap_request(auth.CLIENT_DOMAIN, b"10.0.0.1", b"CURVE", zmq.utils.z85.decode(allowed_public)))
    assert status(ok) == b"200" and ok[4] == allowed_public
    refused = gate.decide(zap_request(auth.CLIENT_DOMAIN, b"10.0.0.1", b"CURVE", zmq.utils.z85.decode(other_public)))
    assert status(refused) == b"400"
    assert status(gate.decide(zap_request(auth.CLIENT_DOMAIN, b"10.0.0.1", b"NULL"))) == b"400"


def test_keys_from_keygen_load(tmp_path):
    server_public, server_secret = auth.keygen(tmp_path / "server", "walredod")
    client_public, _ = auth.keygen(tmp_path / "clients", "pageserver-1")
    assert server_secret.stat().st_mode & 0o777 == 0o600
    public, secret = auth.load_server_keys(server_secret)
    assert len(public) == len(secret) == 40
    with pytest.raises(ValueError, match="no secret key"):
        auth.load_server_keys(server_public)
    assert auth.load_client_keys(tmp_path / "clients") == {
        zmq.utils.z85.decode(zmq.auth.load_certificate(str(client_public))[0])}


def test_secret_travels_through_a_pipe():
    secret = os.urandom(auth.SECRET_BYTES)
    fd = auth.hand_secret(secret)
    assert auth.read_secret(fd) == secret
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: a redo child started later cannot inherit it


# --- over real sockets --------------------------------------------------------------------------------------------

class Backend:
    """A backend ROUTER with the Gatekeeper's ZAP handler, as the supervisor sets them up."""

    def __init__(self, path):
        self.context = zmq.Context()
        self.gate = auth.Gatekeeper()
        self.zap = auth.ZapHandler(self.context, self.gate)
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        auth.worker_server(self.router)
        self.endpoint = f"ipc://{path}"
        self.router.bind(self.endpoint)

    def received(self, seconds: float) -> list[bytes]:
        poller = zmq.Poller()
        poller.register(self.zap.socket, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            events = dict(poller.poll(left * 1000))
            if self.zap.socket in events:
                self.zap.answer(self.zap.socket.recv_multipart())
            if self.router in events:
                got.append(self.router.recv_multipart()[-1])
        return got

    def close(self):
        self.router.close()
        self.zap.close()
        self.context.term()


def dealer(context, endpoint, slot=None, secret=None):
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if slot is not None:
        auth.worker_credentials(sock, slot, secret)
    sock.connect(endpoint)
    return sock


def test_only_the_expected_process_with_its_secret_gets_through(tmp_path):
    backend = Backend(tmp_path / "backend.sock")
    context = zmq.Context()
    try:
        secret = backend.gate.expect_worker(0, pid=os.getpid())
        sockets = [dealer(context, backend.endpoint, 0, secret), dealer(context, backend.endpoint, 0, b"y" * 32),
                   dealer(context, backend.endpoint), dealer(context, backend.endpoint, 1, secret)]
        for sock, text in zip(sockets, [b"worker", b"wrong secret", b"no credentials", b"wrong slot"]):
            sock.send(text)
        assert backend.received(3.0) == [b"worker"]
        assert backend.gate.refused >= 2  # (a NULL peer fails the PLAIN handshake before ZAP is asked)
        for sock in sockets:
            sock.close()
        # The right secret in another process (a redo child that read it, say) is still refused: not its pid.
        forger = subprocess.Popen([sys.executable, "-c", f"""
import time, zmq
sock = zmq.Context().socket(zmq.DEALER)
sock.plain_username = b"worker-0"
sock.plain_password = bytes.fromhex("{secret.hex()}")
sock.connect("{backend.endpoint}")
sock.send(b"forged")
time.sleep(3)
"""])
        try:
            assert backend.received(4.0) == []
        finally:
            forger.wait(30)
    finally:
        context.term()
        backend.close()


def test_keygen_command_writes_a_pair_and_never_overwrites(tmp_path):
    def keygen(*args):
        return subprocess.run([sys.executable, "-m", "walredod", "keygen", str(tmp_path), *args],
                              capture_output=True, text=True, timeout=60)

    assert keygen("--name", "pageserver-1").returncode == 0
    public, secret = tmp_path / "pageserver-1.key", tmp_path / "pageserver-1.key_secret"
    assert public.exists() and secret.stat().st_mode & 0o777 == 0o600
    before = secret.read_bytes()
    again = keygen("--name", "pageserver-1")
    assert again.returncode != 0 and "not overwriting" in again.stderr
    assert secret.read_bytes() == before
