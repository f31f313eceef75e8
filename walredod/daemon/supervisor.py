"""The supervisor: accepts requests, routes them to warm workers by relation, and heals the pool.

One thread, one small poll loop (the ZeroMQ guide's Paranoid Pirate broker): a ROUTER per client endpoint (the
frontends: one per endpoint, so that a reply, and the directory, fit the endpoint a client came in by) and one ROUTER
for the workers (DEALERs). With the direct data path on (the default for ipc:// endpoints), each worker also binds
its own endpoint beside the frontend's, and clients on this machine send most requests there: the supervisor then
answers the directory of workers (which slot is where, under which pid) and stays the control plane, out of the
requests' way. Workers are child processes in numbered slots.

What the supervisor decides (accepted requests until their one reply, credit, routing, deadlines, re-dispatch,
restarts with back-off, parking) is ``walredod.daemon.pool.Pool``, apart from sockets and processes; this module moves
messages between the sockets and the pool, starts and stops processes, and handles signals.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import zmq

from walredod import protocol
from walredod.config import ConfigError, Settings, load_settings
from walredod.daemon import auth, backend, preflight
from walredod.daemon.admission import release_free_memory, resident_bytes
from walredod.daemon.endpoints import EndpointInUse, SupervisorEndpoints, direct_endpoint_base
from walredod.daemon.metrics import Metrics
from walredod.daemon.pool import Frontend, Pool, Slot

log = logging.getLogger("walredod.daemon.supervisor")

_HOUSEKEEPING_INTERVAL = 0.05  # seconds between checks of workers, deadlines and heartbeats
_BURST = 1000  # messages taken from one socket before the others are heard
_SNDMORE = int(zmq.SNDMORE)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)


def _sender(socket: zmq.Socket, dropped=None):
    """``send(identity, frames)`` on a ROUTER: the identity frame, then the message. A peer that left (ZeroMQ's
    ROUTER_MANDATORY refuses its identity on the first frame) gets nothing: nobody is left to answer. Neither does a
    peer with SNDHWM messages it has not read (ROUTER_MANDATORY says EAGAIN; we never wait for a client):
    ``dropped(reason)`` counts both."""
    send_identity = socket.send

    def send(identity: bytes, frames: list) -> None:
        try:
            send_identity(identity, _SNDMORE_NOBLOCK)
        except zmq.Again:
            if dropped is not None:
                dropped("unread")
            return
        except zmq.ZMQError as exc:
            log.debug("message to a departed peer dropped: %s", exc)
            if dropped is not None:
                dropped("departed")
            return
        protocol.send_frames(socket, frames)

    return send


class Supervisor:
    def __init__(self, settings: Settings, config_path: Path | None = None, overrides: dict | None = None):
        self.settings = settings
        self.config_path = config_path
        self.overrides = overrides or {}
        self.context = zmq.Context(1)
        self.metrics = Metrics()
        self.frontends: dict[zmq.Socket, Frontend] = {}
        for endpoint in settings.daemon.endpoints:
            socket = self.context.socket(zmq.ROUTER)
            self.frontends[socket] = Frontend(endpoint, _sender(socket, self._reply_dropped))
        self.backend = self.context.socket(zmq.ROUTER)
        # Every connection to the backend, and to a CURVE tcp endpoint, is checked before its first message.
        client_keys = (auth.load_client_keys(settings.daemon.curve_client_keys)
                       if settings.daemon.curve_client_keys else set())
        self.gatekeeper = auth.Gatekeeper(client_keys, self.metrics)
        self.zap = auth.ZapHandler(self.context, self.gatekeeper)
        run_dir = settings.engine.data_dir / "run"
        self.endpoints: SupervisorEndpoints | None = None
        self.backend_endpoint = f"ipc://{run_dir}/backend-{os.getpid()}.sock"
        self.pool = Pool(settings, start_process=self._start_process, send_worker=_sender(self.backend),
                         metrics=self.metrics, direct_base=direct_endpoint_base(settings.daemon))
        self.stop_deadline = 0.0
        self._signals: list[int] = []
        self.cpus: list[int] = []
        self._notifier = _systemd_notifier()
        self._last_watchdog = 0.0
        self._next_housekeeping = 0.0
        self._last_memory_reset = -1e9
        self._poller: zmq.Poller | None = None
        self._handlers: dict = {}

    # --- start and stop -------------------------------------------------------------------------------------------

    def bind(self) -> None:
        d = self.settings.daemon
        for socket in (*self.frontends, self.backend):
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting worker or client takes its identity back
        for socket, frontend in self.frontends.items():
            self._configure_frontend(socket, frontend)
            if frontend.endpoint.startswith("tcp://") and d.curve_secret_key_file is None:
                log.warning("%s serves plain tcp (daemon.allow_plain_tcp): anyone who reaches the port gets "
                            "pages and the status document", frontend.endpoint)
        self.backend.setsockopt(zmq.SNDHWM, 0)  # requests to workers are bounded by their credit
        auth.worker_server(self.backend)  # only the worker processes we started, with their secrets
        # Refuses (touching nothing) when another daemon serves an endpoint; removes stale socket files.
        self.endpoints = SupervisorEndpoints(d, self.backend_endpoint)
        try:
            for socket, frontend in self.frontends.items():
                self.endpoints.bind_frontend(socket, frontend.endpoint)
            self.endpoints.bind_backend(self.backend, self.backend_endpoint)
            if d.metrics_address:
                try:
                    self.metrics.serve(d.metrics_address)
                except OSError as error:
                    raise EndpointInUse(f"daemon.metrics_address {d.metrics_address}: {error.strerror}") from None
        except BaseException:
            for socket in (*self.frontends, self.backend):
                socket.close()
            self.endpoints.release()
            raise

    def _configure_frontend(self, socket: zmq.Socket, frontend: Frontend) -> None:
        d = self.settings.daemon
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        socket.setsockopt(zmq.RCVHWM, d.max_pending)
        # Replies a client has not read: at most max_unread_replies per connection; past that a reply is dropped
        # (counted), never waited for. Replies to clients that left raise instead of vanishing silently.
        socket.setsockopt(zmq.SNDHWM, d.max_unread_replies)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # ZeroMQ caps each frame; a message of many frames is buffered whole before we see it (see _check_memory).
        socket.setsockopt(zmq.MAXMSGSIZE, d.max_request_bytes + 4096)
        if frontend.endpoint.startswith("tcp://") and d.curve_secret_key_file is not None:
            auth.curve_server(socket, *auth.load_server_keys(d.curve_secret_key_file))

    def run(self) -> int:
        preflight.check(self.settings, self.config_path)
        self.cpus = sorted(os.sched_getaffinity(0))
        if self.settings.daemon.cpu_placement == "pair" and len(self.cpus) > 1:
            # Our own CPU: the last one, where the fewest workers sit (worker i is on CPU i). A supervisor the
            # scheduler moves around pays cold caches and cross-CPU wake-ups on every message.
            os.sched_setaffinity(0, {self.cpus[-1]})
        self.bind()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        self.pool.resize()
        log.info("walredod serving on %s with %d workers", ", ".join(self.settings.daemon.endpoints),
                 len(self.pool.slots))
        self._poller = poller = zmq.Poller()
        for socket in (self.backend, self.zap.socket, *self.frontends):
            poller.register(socket, zmq.POLLIN)
        pool = self.pool
        self._handlers = handlers = {
            self.backend: self._on_worker_message, self.zap.socket: self._on_zap_request,
            **{socket: self._client_handler(frontend) for socket, frontend in self.frontends.items()}}
        announced = False
        try:
            while True:
                self._handle_signals()
                if pool.stopping and (not pool.pending or time.monotonic() >= self.stop_deadline):
                    break
                # The backend first (registered first): replies free credit for the requests behind them.
                for socket, _ in poller.poll(self._poll_timeout_ms()):
                    self._drain(socket, handlers[socket])
                if time.monotonic() >= self._next_housekeeping:
                    self._housekeeping()
                if not announced and pool.any_ready():
                    self._notify("READY=1")
                    announced = True
        finally:
            self._shutdown()
        return 0

    def _on_zap_request(self, frames: list) -> None:
        self.zap.answer([f.bytes for f in frames])

    def _on_worker_message(self, frames: list) -> None:
        """A READY must come from the connection the Gatekeeper admitted as that slot's worker."""
        if frames[1].bytes == backend.READY:
            ready = backend.decode_ready(frames[2].buffer)
            user = frames[1].get("User-Id")
            if user != auth.worker_username(ready.slot).decode():
                log.warning("READY for slot %d from a connection admitted as %r: ignored", ready.slot, user)
                return
        self.pool.on_worker_message(frames)

    def _reply_dropped(self, reason: str) -> None:
        self.metrics.dropped_replies.labels(reason=reason).inc()

    def _client_handler(self, frontend: Frontend):
        on_client_message = self.pool.on_client_message
        return lambda frames: on_client_message(frontend, frames)

    @staticmethod
    def _drain(socket: zmq.Socket, handle) -> None:
        """Hand the pool what ``socket`` holds, up to a burst (bounded, so the other sockets are heard between)."""
        recv, events = socket.recv_multipart, socket.getsockopt
        for _ in range(_BURST):
            if not events(zmq.EVENTS) & _POLLIN:
                return
            handle(recv(copy=False))

    def _on_signal(self, signum, _frame) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT) and not self.pool.stopping:
                log.info("stopping: answering the %d requests in flight, accepting no more", len(self.pool.pending))
                self._notify("STOPPING=1")
                self.pool.begin_stop()
                self.stop_deadline = time.monotonic() + self.settings.daemon.shutdown_timeout
            elif signum == signal.SIGHUP:
                self.reload()
            elif signum == signal.SIGCHLD:
                self.pool.reap()

    def reload(self) -> None:
        """Re-read the configuration; the worker count and tunables change without dropping requests."""
        try:
            settings = load_settings(self.config_path, self.overrides)
            preflight.check(settings, self.config_path)
        except ConfigError as error:
            log.error("reload refused, keeping the running configuration: %s", error)
            return
        for name in ("endpoints", "socket_group", "socket_mode"):  # bound sockets keep what they were made with
            if getattr(settings.daemon, name) != getattr(self.settings.daemon, name):
                log.warning("reload: daemon.%s changed; that needs a restart, keeping %s", name,
                            getattr(self.settings.daemon, name))
                settings = settings.model_copy(update={"daemon": settings.daemon.model_copy(
                    update={name: getattr(self.settings.daemon, name)})})
        self.settings = settings
        self.pool.apply_settings(settings)
        log.info("reloaded: %d workers", self.pool.worker_count())

    def _shutdown(self) -> None:
        processes = self.pool.stop()
        deadline = time.monotonic() + 5.0
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for socket in (*self.frontends, self.backend):
            socket.close()
        self.zap.close()
        self.context.term()
        self.endpoints.release()  # ZeroMQ leaves socket files behind
        self.metrics.stop()
        log.info("walredod stopped")

    # --- workers --------------------------------------------------------------------------------------------------

    def _start_process(self, slot: Slot) -> subprocess.Popen:
        d = self.settings.daemon
        cpu = self.cpus[slot.index % len(self.cpus)] if d.cpu_placement == "pair" and self.cpus else -1
        argv = [sys.executable, "-m", "walredod.daemon.worker", "--slot", str(slot.index),
                "--backend", self.backend_endpoint, "--credit", str(d.worker_credit),
                "--heartbeat-interval", str(d.heartbeat_interval), "--cpu", str(cpu),
                "--max-request-bytes", str(d.max_request_bytes),
                "--engine-settings", self.settings.engine.model_dump_json(),
                "--daemon-settings", self.settings.daemon.model_dump_json()]
        if slot.direct_endpoint:
            argv += ["--direct", slot.direct_endpoint]
        if slot.local_socket:
            argv += ["--local", slot.local_socket]
        # The worker's secret goes through a pipe only it inherits (argv and the environment are readable by other
        # processes of our uid); the Gatekeeper admits that secret from that pid alone.
        # It is admitted once registered below, before this loop answers its ZAP request.
        secret = auth.new_worker_secret()
        secret_read = auth.hand_secret(secret)
        try:
            process = subprocess.Popen([*argv, "--secret-fd", str(secret_read)], stdin=subprocess.DEVNULL,
                                       close_fds=True, pass_fds=(secret_read,))
        finally:
            os.close(secret_read)
        self.gatekeeper.expect_worker(slot.index, process.pid, secret)
        return process

    # --- time -----------------------------------------------------------------------------------------------------

    def _poll_timeout_ms(self) -> int:
        return max(1, int((self._next_housekeeping - time.monotonic()) * 1000) + 1)

    def _housekeeping(self) -> None:
        self.pool.tick()
        self._check_memory()
        now = time.monotonic()
        self._next_housekeeping = now + _HOUSEKEEPING_INTERVAL
        if now - self._last_watchdog >= 1.0:
            self._notify("WATCHDOG=1")
            self._last_watchdog = now

    def _check_memory(self) -> None:
        """The last line against a client that sends one endless message: ZeroMQ delivers a message only whole and
        caps only its frames, so it buffers every frame of it before we can refuse it. Past daemon.max_memory_bytes
        of our own resident memory, every client connection is dropped (closing the frontend sockets frees what
        ZeroMQ buffered for them) and the endpoints bound anew; clients' ZeroMQ sockets reconnect by themselves,
        replies to requests sent before are lost (the clients time out). Checked every housekeeping interval, so
        the supervisor stays under the limit plus what arrives in one interval."""
        limit = self.settings.daemon.max_memory_bytes
        if resident_bytes() <= limit or time.monotonic() - self._last_memory_reset < 1.0:
            return
        rss = resident_bytes()
        log.error("the supervisor holds %d MiB, over daemon.max_memory_bytes (%d MiB): dropping every client "
                  "connection (a client sending a message too large to buffer?)", rss >> 20, limit >> 20)
        self.metrics.memory_resets.inc()
        for old, frontend in list(self.frontends.items()):
            self._poller.unregister(old)
            del self._handlers[old], self.frontends[old]
            old.close(linger=0)
            socket = self.context.socket(zmq.ROUTER)
            self._configure_frontend(socket, frontend)
            self.endpoints.bind_frontend(socket, frontend.endpoint)
            frontend.send = _sender(socket, self._reply_dropped)
            self.frontends[socket] = frontend
            self._handlers[socket] = self._client_handler(frontend)
            self._poller.register(socket, zmq.POLLIN)
        release_free_memory()
        self._last_memory_reset = time.monotonic()
        log.warning("client connections dropped; the supervisor holds %d MiB now", resident_bytes() >> 20)

    def _notify(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)


def _systemd_notifier():
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    import sdnotify

    return sdnotify.SystemdNotifier()
