"""Who may talk to the supervisor: its own workers on the backend socket, allowed clients on tcp endpoints.

libzmq asks a ZAP handler (ZeroMQ RFC 27) about every connection to a socket with a ZAP domain, before any message
of it is delivered; ``Gatekeeper`` is ours, answered from the supervisor's own loop (no thread).

- **Workers** (domain ``walredod-workers``, PLAIN mechanism on the backend's ipc socket). A worker proves two things:
  that it is the process the supervisor started for its slot — libzmq gives ZAP the ipc peer's kernel credentials
  (SO_PEERCRED, as ``localhost:UID:GID:PID``), and the pid must be the slot's worker and the uid ours — and that it
  holds the secret the supervisor gave that process alone at start (32 random bytes through an inherited pipe, never
  argv or the environment, which other processes of the uid can read). Anything else is refused and logged: a redo
  child, or any process of the same user, can neither register as a worker nor answer for one. The ZAP user id of an
  admitted worker is ``worker-<slot>``; the supervisor checks it against the slot a READY names.
- **tcp clients** (domain ``walredod-clients``, CURVE). Only clients whose public key is in
  ``daemon.curve_client_keys`` get in; the daemon's key pair is ``daemon.curve_secret_key_file`` (``walredod
  keygen``). The user id is the client's public key (Z85). Plain tcp exists only with ``daemon.allow_plain_tcp``.
- ipc client endpoints need no ZAP: the socket file's group and mode decide (walredod.daemon.endpoints).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85

log = logging.getLogger("walredod.daemon.auth")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by RFC 27
WORKER_DOMAIN = b"walredod-workers"
CLIENT_DOMAIN = b"walredod-clients"
SECRET_BYTES = 32
_REFUSAL_LOG_INTERVAL = 1.0  # seconds between refusal log lines of one kind (a flood must not flood the log)


@dataclass(frozen=True)
class ExpectedWorker:
    pid: int
    secret: bytes


def worker_username(slot: int) -> bytes:
    return f"worker-{slot}".encode()


def peer_credentials(address: bytes) -> tuple[int, int, int] | None:
    """(uid, gid, pid) of an ipc peer from the ZAP request's address, None when libzmq did not give them."""
    parts = address.decode("ascii", "replace").split(":")
    if len(parts) != 4 or parts[0] != "localhost" or not all(p.isdigit() for p in parts[1:]):
        return None
    return int(parts[1]), int(parts[2]), int(parts[3])


class Gatekeeper:
    """Decides ZAP requests; the supervisor tells it which worker process each slot should have."""

    def __init__(self, client_keys: set[bytes] | None = None, metrics=None, clock=time.monotonic):
        self.client_keys = client_keys or set()  # raw 32-byte CURVE public keys
        self.workers: dict[bytes, ExpectedWorker] = {}  # by PLAIN username
        self.metrics = metrics
        self.clock = clock
        self._last_logged: dict[str, float] = {}
        self.refused = 0

    # --- the supervisor's side ---------------------------------------------------------------------------------

    def expect_worker(self, slot: int, pid: int, secret: bytes | None = None) -> bytes:
        """A new worker process for ``slot`` with ``secret`` (a fresh one when None, returned to hand it through a
        pipe). The slot's earlier worker is forgotten (a restarted slot's old process can no longer connect)."""
        if secret is None:
            secret = new_worker_secret()
        self.workers[worker_username(slot)] = ExpectedWorker(pid, secret)
        return secret

    def forget_worker(self, slot: int) -> None:
        self.workers.pop(worker_username(slot), None)

    # --- ZAP ---------------------------------------------------------------------------------------------------

    def decide(self, request: list[bytes]) -> list[bytes]:
        """The ZAP reply frames to a ZAP request's frames."""
        if len(request) < 6:
            return [b"1.0", request[1] if len(request) > 1 else b"", b"400", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _identity, mechanism, *credentials = request
        if version != b"1.0":
            return [b"1.0", request_id, b"400", b"unknown ZAP version", b"", b""]
        user, refusal = self._judge(domain, address, mechanism, credentials)
        if refusal is not None:
            self._refused(domain.decode(errors="replace"), f"{refusal} (peer {address.decode(errors='replace')})")
            return [b"1.0", request_id, b"400", refusal.encode()[:200], b"", b""]
        return [b"1.0", request_id, b"200", b"OK", user, b""]

    def _judge(self, domain: bytes, address: bytes, mechanism: bytes, credentials: list[bytes]):
        if domain == WORKER_DOMAIN:
            if mechanism != b"PLAIN" or len(credentials) != 2:
                return None, f"worker connection without PLAIN credentials ({mechanism.decode(errors='replace')})"
            username, password = credentials
            expected = self.workers.get(username)
            if expected is None:
                return None, f"no worker expected as {username.decode(errors='replace')!r}"
            peer = peer_credentials(address)
            if peer is None:
                return None, "no peer credentials for a worker connection (not an ipc socket?)"
            uid, _gid, pid = peer
            if uid != os.geteuid() or pid != expected.pid:
                return None, (f"{username.decode()} must be process {expected.pid} of uid {os.geteuid()}, "
                              f"not process {pid} of uid {uid}")
            if not hmac.compare_digest(password, expected.secret):
                return None, f"{username.decode()}: wrong secret"
            return username, None
        if domain == CLIENT_DOMAIN:
            if mechanism != b"CURVE" or len(credentials) != 1:
                return None, f"client without CURVE ({mechanism.decode(errors='replace')})"
            if credentials[0] not in self.client_keys:
                return None, f"client key {zmq.utils.z85.encode(credentials[0]).decode()} is not allowed"
            return zmq.utils.z85.encode(credentials[0]), None
        return None, f"unknown ZAP domain {domain.decode(errors='replace')!r}"

    def _refused(self, domain: str, reason: str) -> None:
        self.refused += 1
        if self.metrics is not None:
            self.metrics.refused_connections.labels(domain=domain).inc()
        now = self.clock()
        if now - self._last_logged.get(domain, -1e9) >= _REFUSAL_LOG_INTERVAL:
            self._last_logged[domain] = now
            log.warning("refused a connection in %s: %s (%d refusals so far)", domain, reason, self.refused)


class ZapHandler:
    """The Gatekeeper on its ZAP socket, in ``context``; the supervisor polls ``socket`` and calls ``answer``."""

    def __init__(self, context: zmq.Context, gatekeeper: Gatekeeper):
        self.gatekeeper = gatekeeper
        self.socket = context.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ZAP_ENDPOINT)

    def answer(self, request: list[bytes]) -> None:
        """Answer one ZAP request (its frames, as received on ``socket``)."""
        self.socket.send_multipart(self.gatekeeper.decide(request))

    def close(self) -> None:
        self.socket.close(linger=0)


# --- the worker's side --------------------------------------------------------------------------------------------

def new_worker_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def hand_secret(secret: bytes) -> int:
    """A pipe holding ``secret``: pass its read end to the worker (``pass_fds``), then close it here."""
    read, write = os.pipe()
    os.write(write, secret)
    os.close(write)
    return read


def read_secret(fd: int) -> bytes:
    """The secret from the pipe the supervisor handed us (closed afterwards, so no redo child inherits it)."""
    try:
        data = b""
        while len(data) < SECRET_BYTES:
            chunk = os.read(fd, SECRET_BYTES - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) != SECRET_BYTES:
        raise ValueError(f"the worker secret is {len(data)} bytes, not {SECRET_BYTES}")
    return data


def worker_credentials(sock: zmq.Socket, slot: int, secret: bytes) -> None:
    """Set a worker's backend DEALER to log in as its slot (before it connects)."""
    sock.plain_username = worker_username(slot)
    sock.plain_password = secret


def worker_server(sock: zmq.Socket) -> None:
    """Set the supervisor's backend ROUTER to ask the Gatekeeper about every worker (before it binds)."""
    sock.plain_server = True
    sock.zap_domain = WORKER_DOMAIN


# --- tcp clients: CURVE ------------------------------------------------------------------------------------------

def load_server_keys(secret_key_file: Path) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a secret key file written by ``walredod keygen``."""
    public, secret = zmq.auth.load_certificate(str(secret_key_file))
    if not secret:
        raise ValueError(f"{secret_key_file} holds no secret key (the .key_secret file of `walredod keygen`)")
    return public, secret


def load_client_keys(directory: Path) -> set[bytes]:
    """Raw public keys of the allowed clients: every ``*.key`` file in ``directory``."""
    return {zmq.utils.z85.decode(key) for key in zmq.auth.load_certificates(str(directory))}


def curve_server(sock: zmq.Socket, public: bytes, secret: bytes) -> None:
    """Make ``sock`` a CURVE server whose clients the Gatekeeper checks (before it binds)."""
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.zap_domain = CLIENT_DOMAIN


def keygen(directory: Path, name: str) -> tuple[Path, Path]:
    """A new key pair: ``name.key`` (public: give it to the other side) and ``name.key_secret`` (mode 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
    return Path(public), Path(secret)


def setting_problems(daemon_settings) -> list[str]:
    """What in the tcp/CURVE settings cannot work, each naming its setting."""
    problems = []
    d = daemon_settings
    if d.curve_secret_key_file is not None:
        try:
            load_server_keys(d.curve_secret_key_file)
        except (OSError, ValueError) as error:
            reason = "does not exist" if not d.curve_secret_key_file.exists() else str(error)
            problems.append(f"daemon.curve_secret_key_file: {d.curve_secret_key_file}: {reason}")
    if d.curve_client_keys is not None:
        if not d.curve_client_keys.is_dir():
            problems.append(f"daemon.curve_client_keys: {d.curve_client_keys} is not a directory")
        else:
            try:
                if not load_client_keys(d.curve_client_keys):
                    problems.append(f"daemon.curve_client_keys: {d.curve_client_keys} holds no *.key file")
            except (OSError, ValueError) as error:
                problems.append(f"daemon.curve_client_keys: {error}")
    if (d.curve_secret_key_file is None) != (d.curve_client_keys is None):
        problems.append("daemon.curve_secret_key_file and daemon.curve_client_keys go together")
    tcp = [e for e in d.endpoints if e.startswith("tcp://")]
    if tcp and d.curve_secret_key_file is None and not d.allow_plain_tcp:
        problems.append(f"daemon.endpoints: {', '.join(tcp)} needs daemon.curve_secret_key_file and "
                        "daemon.curve_client_keys (`walredod keygen`), or daemon.allow_plain_tcp = true")
    return problems
