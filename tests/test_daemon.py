"""The daemon end to end: real WAL through the client library, faults under load, bad input, routing, operations.

Every test talks to a real `walredod serve` process (supervisor, workers, redo children) over ZeroMQ. Tests that only
send requests share one daemon (module fixture ``daemon``); a test that kills, stops, pauses or reloads part of a
daemon gets its own (``own_daemon``), so no test depends on another's order or leftovers. The supervisor's
bookkeeping rules are unit-tested without processes in tests/test_supervisor.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import zmq

from conftest import world_traversable_tmpdir
from walredod import protocol
from walredod.client import AsyncRedoClient, RedoClient
from walredod.errors import InvalidRequest, PoisonRequest, RedoTimeout, Unavailable, UnsupportedVersion
from groundtruth.cluster import read_object
from walredod.ingest import object_histories
from walredod.objects import RelMapTag, SlruPageTag, TwoPhaseTag
from walredod.types import BufferTag, WalRecord
from walredod.wal import WalReader

def free_tcp_port() -> int:
    """A loopback port nothing listens on now: test daemons of parallel runs must not share one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


CONFIG = """
[daemon]
workers = {workers}
heartbeat_interval = 0.2
max_pending = 2000
max_request_bytes = 16777216
metrics_address = "127.0.0.1:{metrics_port}"
{daemon_extra}[engine]
data_dir = "{data_dir}"
source_logs_hint_bits = true
request_timeout = 20
"""


def wait_until(condition, timeout: float = 30.0, interval: float = 0.05, message: str = "condition"):
    """Poll ``condition`` until it returns something true (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message}: not within {timeout} s")
        time.sleep(interval)


class Daemon:
    def __init__(self, root: Path, workers: int = 2, metrics_port: int | None = None, extra_config: str = "",
                 wait: bool = True, env: dict | None = None, tcp: bool = False, tcp_curve: bool = True):
        self.root = root
        self.endpoint = f"ipc://{root}/walredod.sock"
        self.tcp_endpoint = f"tcp://127.0.0.1:{free_tcp_port()}" if tcp else None
        self.curve = self.daemon_extra = None
        if tcp and not tcp_curve:
            self.daemon_extra = "allow_plain_tcp = true\n"
        elif tcp:  # tcp is served with CURVE: the daemon's key pair, and one allowed client's
            from walredod.client import CurveKeys
            from walredod.daemon.auth import keygen

            server_public, server_secret = keygen(root / "keys", "walredod")
            _, client_secret = keygen(root / "keys" / "clients", "test-client")
            self.curve = CurveKeys.load(server_public, client_secret)
            self.daemon_extra = (f'curve_secret_key_file = "{server_secret}"\n'
                                 f'curve_client_keys = "{root / "keys" / "clients"}"\n')
        self.config = root / "walredod.toml"
        self.metrics_port = metrics_port or free_tcp_port()
        self.extra_config = extra_config
        self.log = root / "daemon.log"
        self.write_config(workers)
        endpoints = [self.endpoint, *([self.tcp_endpoint] if tcp else [])]
        with open(self.log, "wb") as log:  # read by tests that wait for a message; shown when a test fails
            self.process = subprocess.Popen(
                [sys.executable, "-m", "walredod", "serve", "--config", str(self.config),
                 *(arg for endpoint in endpoints for arg in ("--endpoint", endpoint))],
                stderr=log, env={**os.environ, "WALREDOD_LOG_LEVEL": "WARNING", **(env or {})})
        self.client = RedoClient(self.endpoint, timeout=30)
        if not wait:
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if all(w["state"] == "ready" for w in self.client.status(timeout=1)["workers"]):
                    return
            except Unavailable:
                pass
            time.sleep(0.1)
        raise RuntimeError("the daemon did not become ready")

    def write_config(self, workers: int) -> None:
        self.config.write_text(CONFIG.format(workers=workers, metrics_port=self.metrics_port,
                                             data_dir=self.root / "data", daemon_extra=self.daemon_extra or "")
                               + self.extra_config)

    def workers(self) -> list[dict]:
        return self.client.status()["workers"]

    def wait_ready(self, count: int, timeout: float = 30) -> list[dict]:
        def ready():
            workers = self.workers()
            return len(workers) == count and all(w["state"] == "ready" and w["child_pid"]
                                                 and Path(f"/proc/{w['child_pid']}").exists() for w in workers)
        wait_until(ready, timeout, message="workers ready")
        return self.workers()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)
        self.client.close()
        sys.stderr.write(self.log_text())  # pytest shows it with a failing test


@pytest.fixture(scope="module")
def daemon():
    """The daemon shared by tests that only send requests (and read its state): never kill, stop or reload it."""
    daemon = Daemon(world_traversable_tmpdir("walredod-daemon-"), tcp=True)
    yield daemon
    daemon.stop()


@pytest.fixture
def own_daemon():
    """A daemon of the test's own, for tests that kill, pause, reload or stop part of it."""
    daemon = Daemon(world_traversable_tmpdir("walredod-daemon-own-"))
    yield daemon
    daemon.stop()


def served(daemon) -> int:
    """Requests the daemon's workers have served (both paths), as their last heartbeats said."""
    return sum(w["served"] for w in daemon.workers())


def wait_for_load(daemon, before: int) -> None:
    """Until the workers report serving more than ``before`` requests: a load started elsewhere is under way."""
    wait_until(lambda: served(daemon) > before, message="the load to start")


def check_all(results, requests):
    for result, (_tag, _lsn, _base, _records, expected) in zip(results, requests, strict=True):
        assert result == expected


# --- serving ------------------------------------------------------------------------------------------------------

def test_every_page_through_the_daemon_matches_postgres(daemon, real_requests):
    assert len(real_requests) > 500
    results = daemon.client.redo_many([r[:4] for r in real_requests])
    check_all(results, real_requests)
    tag, lsn, base, records, expected = real_requests[0]
    assert daemon.client.redo(tag, lsn, base, records) == expected


def test_objects_through_the_daemon_match_postgres(daemon, scenario):
    """pg_xact, MultiXact, relation-map, two-phase and visibility-map requests, rebuilt by the workers."""
    cut = scenario.cuts[1]
    requests, expected = [], []
    for tag, history in object_histories(WalReader(scenario.wal_dir).records(), since_lsn=cut).items():
        final = read_object(scenario.final_dir, tag)
        if isinstance(tag, BufferTag) and final is None:
            continue  # its relation was dropped
        base = None if history.starts_empty else read_object(scenario.recovered[cut], tag)
        requests.append((tag, history.lsn, base, history.records))
        expected.append(final)
    assert {type(r[0]) for r in requests} == {SlruPageTag, RelMapTag, TwoPhaseTag, BufferTag}
    assert None in expected  # a prepared transaction that ended: absent
    assert daemon.client.redo_many(requests) == expected


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "through-supervisor"])
def test_async_client(daemon, real_requests, direct):
    async def run():
        async with AsyncRedoClient(daemon.endpoint, direct=direct) as client:
            return await client.redo_many([r[:4] for r in real_requests[:300]])

    check_all(asyncio.run(run()), real_requests[:300])


def test_async_client_when_a_worker_is_killed(own_daemon, real_requests):
    """What the async client had sent straight to the killed worker is re-sent through the supervisor."""
    daemon = own_daemon
    victim = daemon.wait_ready(2)[1]["pid"]
    before = served(daemon)

    async def run():
        async with AsyncRedoClient(daemon.endpoint, timeout=30) as client:
            load = asyncio.ensure_future(client.redo_many([r[:4] for r in real_requests * 2],
                                                          return_exceptions=True))
            while served(daemon) <= before:  # until the load is under way
                await asyncio.sleep(0.05)
            os.kill(victim, signal.SIGKILL)
            return await load

    assert_answered(asyncio.run(run()), real_requests)
    assert victim not in [w["pid"] for w in daemon.wait_ready(2, timeout=10)]


def test_one_relation_stays_on_one_worker_and_a_hot_one_spills(daemon, real_requests):
    by_relation = {}
    for request in real_requests:
        by_relation.setdefault(request[0].relation, []).append(request)
    same = max(by_relation.values(), key=len)[:5]
    assert len(same) == 5
    through_supervisor = RedoClient(daemon.endpoint, direct=False)
    for client in (daemon.client, through_supervisor):  # both data paths
        before = served_counts(daemon)
        for _ in range(40):
            for tag, lsn, base, records, expected in same:
                assert client.redo(tag, lsn, base, records) == expected
        grew = served_since(daemon, before, 200)
        assert sorted(grew.values()) == [0, 200], grew  # sequential: always the relation's own worker

        before = served_counts(daemon)
        check_all(client.redo_many([r[:4] for r in same] * 400), same * 400)  # 64 in flight: over the bound
        grew = served_since(daemon, before, 2000)
        assert min(grew.values()) > 100, grew  # the hot relation used the whole pool
    through_supervisor.close()


def served_counts(daemon) -> dict[int, int]:
    return {w["slot"]: w["served"] for w in daemon.workers()}


def served_since(daemon, before: dict[int, int], total: int) -> dict[int, int]:
    """Requests each slot served since ``before``, once the workers' heartbeats (which carry the counts) report
    ``total`` of them."""
    def grew():
        now = served_counts(daemon)
        return {slot: count - before[slot] for slot, count in now.items()}
    wait_until(lambda: sum(grew().values()) >= total, message=f"{total} requests reported served")
    return grew()


def test_poison_request(daemon, real_requests, panicking_request):
    """A request whose redo kills its child, twice, is answered as poison; the daemon keeps serving."""
    with pytest.raises(PoisonRequest, match="twice"):
        daemon.client.redo(*panicking_request)
    check_all(daemon.client.redo_many([r[:4] for r in real_requests[:50]]), real_requests[:50])


# --- faults under load --------------------------------------------------------------------------------------------

def run_under_load(daemon, real_requests, fault, timeout=30.0, direct=True):
    """Pipeline every request (twice) from another thread; ``fault`` happens once the load is under way. Returns the
    results."""
    outcome = {}
    before = served(daemon)

    def load():
        with RedoClient(daemon.endpoint, timeout=timeout, direct=direct) as client:
            started = time.monotonic()
            outcome["results"] = client.redo_many([r[:4] for r in real_requests * 2], return_exceptions=True)
            outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=load)
    thread.start()
    wait_for_load(daemon, before)
    fault()
    thread.join(120)
    return outcome["results"]


def assert_answered(results, real_requests, allowed=()):
    assert len(results) == 2 * len(real_requests)  # every request answered: none lost
    for result, (*_, expected) in zip(results, real_requests * 2):
        if isinstance(result, Exception):
            assert isinstance(result, allowed), result
        else:
            assert result == expected


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "through-supervisor"])
def test_worker_killed_under_load(own_daemon, real_requests, direct):
    """Direct requests in flight on the dead worker are re-sent by the client through the supervisor; the
    supervisor's own are re-dispatched by it."""
    daemon = own_daemon
    victim = daemon.wait_ready(2)[0]["pid"]
    resumed_after = []

    def kill_and_time_the_next_request():
        os.kill(victim, signal.SIGKILL)
        started = time.monotonic()
        with RedoClient(daemon.endpoint) as client:
            tag, lsn, base, records, expected = real_requests[0]
            assert client.redo(tag, lsn, base, records) == expected
        resumed_after.append(time.monotonic() - started)

    results = run_under_load(daemon, real_requests, kill_and_time_the_next_request, direct=direct)
    assert resumed_after[0] < 1.0
    assert_answered(results, real_requests)  # its requests went to the other worker: no error at all
    workers = daemon.wait_ready(2, timeout=10)
    assert victim not in [w["pid"] for w in workers]
    assert sum(sum(w["restarts"].values()) for w in workers) >= 1


def test_redo_child_killed_under_load(own_daemon, real_requests):
    daemon = own_daemon
    victim = daemon.wait_ready(2)[1]["child_pid"]
    results = run_under_load(daemon, real_requests, lambda: os.kill(victim, signal.SIGKILL))
    assert_answered(results, real_requests)  # a retried request lands on the warm spare
    assert victim not in [w["child_pid"] for w in daemon.wait_ready(2)]


def test_redo_child_stopped_past_the_timeout(own_daemon, real_requests):
    """The worker waits on its hung child for the request's timeout, silent; the supervisor must not take it for a
    hung worker (the direct request's deadline, sent ahead, says how long it may be silent)."""
    daemon = own_daemon
    worker, victim = (daemon.wait_ready(2)[0][key] for key in ("pid", "child_pid"))
    os.kill(victim, signal.SIGSTOP)
    tag, lsn, base, records, expected = next(r for r in real_requests
                                             if r[0].relation == real_requests[0][0].relation)
    zeromq = RedoClient(daemon.endpoint, local=False)  # the worker's own wait (the local path: test_local_path.py)
    try:
        started = time.monotonic()
        results = [zeromq.redo_many([r[:4] for r in real_requests[:200]], timeout=2.0, return_exceptions=True)]
    finally:
        with contextlib.suppress(ProcessLookupError):  # normally killed already, as hung
            os.kill(victim, signal.SIGCONT)
    assert time.monotonic() - started < 15
    flat = results[0]
    errors = [r for r in flat if isinstance(r, Exception)]
    assert errors and all(isinstance(e, RedoTimeout) for e in errors)
    check_all([r for r in flat if not isinstance(r, Exception)],
              [q for r, q in zip(flat, real_requests[:200]) if not isinstance(r, Exception)])
    assert zeromq.redo(tag, lsn, base, records) == expected  # resumed
    zeromq.close()
    assert worker in [w["pid"] for w in daemon.workers()]


# --- bad input ----------------------------------------------------------------------------------------------------

def raw_socket(endpoint: str, curve=None):
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, 10_000)
    if curve is not None:
        socket.curve_serverkey, socket.curve_publickey, socket.curve_secretkey = (
            curve.server_public, curve.public, curve.secret)
    socket.connect(endpoint)
    return socket


def directory(daemon, endpoint: str | None = None) -> dict:
    with raw_socket(endpoint or daemon.endpoint, daemon.curve if endpoint == daemon.tcp_endpoint else None) as socket:
        socket.send_multipart(protocol.encode_control(5, protocol.KIND_DIRECTORY))
        request_id, status, body = protocol.decode_reply(socket.recv_multipart())
    assert (request_id, status) == (5, protocol.STATUS_OK)
    return json.loads(body)


@pytest.fixture(params=["supervisor", "worker"])
def raw(daemon, request):
    """A bare DEALER on the daemon's endpoint, or on a worker's direct endpoint."""
    endpoint = daemon.endpoint if request.param == "supervisor" else directory(daemon)["workers"][0]["endpoint"]
    socket = raw_socket(endpoint)
    yield socket
    socket.close()


def reply_error(socket, frames):
    socket.send_multipart(frames)
    request_id, status, body = protocol.decode_reply(socket.recv_multipart())
    assert status != protocol.STATUS_OK
    return protocol.error_for(status, body)


def test_malformed_frames(daemon, raw, real_requests):
    tag, lsn, base, records, expected = real_requests[0]
    good = protocol.encode_redo_request(7, tag, lsn, base, records)
    cases = [
        ([b"no delimiter", *good[1:]], InvalidRequest, "delimiter"),
        ([b"", b"XX" + good[1][2:], *good[2:]], InvalidRequest, "magic"),
        ([b"", good[1][:2] + bytes([9]) + good[1][3:], *good[2:]], UnsupportedVersion, "version 9"),
        ([b"", good[1][:-1], *good[2:]], InvalidRequest, "header frame"),
        ([b"", good[1], b"x" * 100, *good[3:]], InvalidRequest, "base image frame is 100 bytes"),
        ([b"", good[1], good[2], good[3][:-8], *good[4:]], InvalidRequest, "LSN frame"),
        ([b"", good[1], good[2], good[3], *good[4:], b"extra"], InvalidRequest, "LSN frame"),
        ([b"", good[1], good[2], b"", ], None, None),  # no records: a valid request
        ([b"", good[1], good[2], (1).to_bytes(8, "big"), b"x" * 10], InvalidRequest, "record 0"),
        ([b"", good[1], b"", *protocol.encode_redo_request(7, tag, lsn, base, [WalRecord(lsn, b"z" * 9_000_000),
                                                                             WalRecord(lsn, b"z" * 9_000_000)])[3:]],
         InvalidRequest, "over the limit"),
    ]
    for frames, error, message in cases:
        if error is None:
            raw.send_multipart(frames)
            assert protocol.decode_reply(raw.recv_multipart())[1] == protocol.STATUS_OK
            continue
        got = reply_error(raw, frames)
        assert isinstance(got, error) and message in str(got), (message, got)
    assert daemon.client.redo(tag, lsn, base, records) == expected


def test_directory_lists_the_workers_direct_endpoints(daemon, real_requests):
    workers = daemon.wait_ready(2)
    listed = directory(daemon)
    assert listed["direct"] is True
    assert [(w["slot"], w["pid"], w["ready"]) for w in listed["workers"]] == [
        (w["slot"], w["pid"], True) for w in workers]
    assert {w["endpoint"] for w in listed["workers"]} == {
        f"ipc://{daemon.root}/walredod-worker-{slot}.sock" for slot in (0, 1)}
    with raw_socket(listed["workers"][1]["endpoint"]) as socket:  # a worker answers pings, and only redo else
        socket.send_multipart(protocol.encode_control(8))
        assert protocol.decode_reply(socket.recv_multipart())[:2] == (8, protocol.STATUS_OK)
        got = reply_error(socket, protocol.encode_control(9, protocol.KIND_STATUS))
        assert isinstance(got, InvalidRequest) and "supervisor" in str(got)


def test_a_tcp_client_is_offered_no_direct_path(daemon, real_requests):
    """The workers' direct endpoints are ipc sockets on this machine: a client that came in by tcp is told to send
    everything through the supervisor, and it is served there; ipc clients still get the directory."""
    listed = directory(daemon, daemon.tcp_endpoint)
    assert listed["direct"] is False and listed["workers"] == []
    assert directory(daemon)["direct"] is True
    tag, lsn, base, records, expected = real_requests[0]
    with RedoClient(daemon.tcp_endpoint, curve=daemon.curve) as client:
        assert client.redo(tag, lsn, base, records) == expected
        assert [w["state"] for w in client.status()["workers"]] == ["ready", "ready"]


def test_batch_answers_each_request_on_its_own(daemon, raw, real_requests):
    """A batch (what the client sends a worker on the direct path; the supervisor hands one to a worker whole): a
    bad request in it gets its own error, the others their pages, in order."""
    chosen = real_requests[:5]
    requests = [protocol.encode_redo_request(10 + i, *r[:4]) for i, r in enumerate(chosen)]
    for bad in (2, 0):  # in the middle; first (the one a batch is routed by)
        requests = [protocol.encode_redo_request(10 + i, *r[:4]) for i, r in enumerate(chosen)]
        tag, lsn, base, records = chosen[bad][:4]
        requests[bad] = protocol.encode_redo_request(10 + bad, tag, lsn, base[:100], records)  # a 100-byte image
        raw.send_multipart(protocol.encode_batch(77, requests))
        frames = raw.recv_multipart()
        assert protocol.decode_reply(frames[:3])[:2] == (77, protocol.STATUS_OK)
        answers = protocol.decode_batch_reply(frames)
        assert [request_id for request_id, _, _ in answers] == [10, 11, 12, 13, 14]
        for (_, status, body), expected in zip(answers, chosen, strict=True):
            if status == protocol.STATUS_OK:
                assert body == expected[4]
        assert [status for _, status, _ in answers] == [
            protocol.STATUS_CODES["invalid_request"] if i == bad else 0 for i in range(5)]
        assert b"base image frame is 100 bytes" in answers[bad][2]
    got = reply_error(raw, [b"", protocol.encode_batch(78, requests)[1], *requests[0][1:-1]])  # cut short
    assert isinstance(got, InvalidRequest) and "batch request 0" in str(got)


def test_flood_past_the_limit(daemon, real_requests):
    """More requests at once than max_pending: the excess is refused as unavailable, everything is answered.
    (A worker's direct endpoint holds no queue of its own to bound: ZeroMQ's high-water marks push back instead.)"""
    raw = raw_socket(daemon.endpoint)
    tag, lsn, base, records, expected = real_requests[0]
    count = 5000
    for i in range(count):
        raw.send_multipart(protocol.encode_redo_request(i, tag, lsn, base, records), copy=False)
    statuses = {}
    for _ in range(count):
        request_id, status, body = protocol.decode_reply(raw.recv_multipart())
        statuses[request_id] = status
        if status == protocol.STATUS_OK:
            assert body == expected
    assert len(statuses) == count
    assert set(statuses.values()) <= {protocol.STATUS_OK, protocol.STATUS_CODES["unavailable"]}
    assert protocol.STATUS_CODES["unavailable"] in statuses.values()
    assert daemon.client.redo(tag, lsn, base, records) == expected
    raw.close()


# --- operations ---------------------------------------------------------------------------------------------------

def metrics(daemon) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_metrics_endpoint(daemon, real_requests):
    """Requests through the supervisor are counted by outcome there; the workers' served counts (both paths) come
    with their heartbeats. Compared with the counts before the test's own requests, whatever ran before."""
    tag, lsn, base, records, expected = real_requests[0]
    before = metrics(daemon)
    with RedoClient(daemon.endpoint, direct=False) as through_supervisor:
        for _ in range(3):
            assert through_supervisor.redo(tag, lsn, base, records) == expected
    for _ in range(4):
        assert daemon.client.redo(tag, lsn, base, records) == expected  # direct
    ok = 'walredod_requests_total{status="ok"}'
    assert metrics(daemon)[ok] - before.get(ok, 0) == 3  # the direct ones never pass the supervisor

    def served_grew():
        now = metrics(daemon)
        return sum(value - before.get(name, 0) for name, value in now.items()
                   if name.startswith("walredod_worker_requests_served{")) >= 7
    wait_until(served_grew, message="the workers' heartbeats to report 7 more requests served")
    now = metrics(daemon)
    assert "walredod_request_seconds_bucket{le=\"+Inf\"}" in now
    assert len([n for n in now if n.startswith("walredod_worker_requests_served{")]) == 2


def test_status_command(daemon):
    out = subprocess.run([sys.executable, "-m", "walredod", "status", "--endpoint", daemon.endpoint],
                         capture_output=True, text=True, check=True).stdout
    assert "ready" in out and "slot" in out


def test_reload_changes_the_worker_count(own_daemon, real_requests):
    daemon = own_daemon
    daemon.write_config(3)
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_ready(3)
    check_all(daemon.client.redo_many([r[:4] for r in real_requests[:300]]), real_requests[:300])
    daemon.write_config(2)
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_ready(2)


def test_reload_of_a_wrong_configuration_keeps_the_running_one(own_daemon, real_requests):
    daemon = own_daemon
    daemon.config.write_text("[daemon]\nworkers = 'many'\n")
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in daemon.log_text(), message="the reload to be refused")
    assert "daemon.workers" in daemon.log_text()  # the log names the wrong key
    assert daemon.process.poll() is None
    daemon.wait_ready(2)
    check_all(daemon.client.redo_many([r[:4] for r in real_requests[:100]]), real_requests[:100])


def test_systemd_notifications(tmp_path, real_requests):
    """Under systemd (Type=notify): READY=1 once a worker serves, WATCHDOG=1 while alive, STOPPING=1 on SIGTERM."""
    sock_path = world_traversable_tmpdir("walredod-notify-") / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.settimeout(10)
    daemon = Daemon(world_traversable_tmpdir("walredod-daemon-notify-"), workers=1,
                    env={"NOTIFY_SOCKET": str(sock_path)})
    try:
        seen = set()
        deadline = time.monotonic() + 10
        while not {"READY=1", "WATCHDOG=1"} <= seen and time.monotonic() < deadline:
            seen.update(notify.recv(4096).decode().split("\n"))
        assert {"READY=1", "WATCHDOG=1"} <= seen
        daemon.process.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in seen:
            seen.update(notify.recv(4096).decode().split("\n"))
        assert daemon.process.wait(30) == 0
    finally:
        daemon.stop()
        notify.close()


def test_check_config_names_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nworkers = -1\nbogus = 1\n")
    result = subprocess.run([sys.executable, "-m", "walredod", "check-config", "--config", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "daemon.workers" in result.stderr and "daemon.bogus" in result.stderr


def postgres_pids(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists()
            and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"}


def test_sigterm_answers_in_flight_and_leaves_nothing(real_requests):
    """Requests accepted before SIGTERM all get their reply (the page, or "unavailable" past the shutdown bound);
    no process and no socket file is left."""
    daemon = Daemon(world_traversable_tmpdir("walredod-daemon-stop-"))
    pids = {pid for w in daemon.workers() for pid in (w["pid"], w["child_pid"])}
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, 30_000)
    socket.connect(daemon.endpoint)
    requests = real_requests[:400]
    for i, (tag, lsn, base, records, _) in enumerate(requests):
        socket.send_multipart(protocol.encode_redo_request(i, tag, lsn, base, records), copy=False)
    answered = {}
    for n in range(len(requests)):
        if n == 1:  # the daemon is serving what was sent: stop it now
            daemon.process.send_signal(signal.SIGTERM)
        request_id, status, body = protocol.decode_reply(socket.recv_multipart())
        answered[request_id] = status
        if status == protocol.STATUS_OK:
            assert body == requests[request_id][4]
        else:
            assert status == protocol.STATUS_CODES["unavailable"], protocol.error_for(status, body)
    socket.close()
    assert len(answered) == len(requests)
    assert daemon.process.wait(30) == 0
    wait_until(lambda: not postgres_pids(pids), timeout=10, message="workers and redo children to end")
    assert not list(daemon.root.glob("*.sock")) and not list((daemon.root / "data" / "run").glob("*.sock"))
    daemon.client.close()


def test_supervisor_killed_leaves_no_process(real_requests):
    daemon = Daemon(world_traversable_tmpdir("walredod-daemon-kill-"))
    pids = {pid for w in daemon.workers() for pid in (w["pid"], w["child_pid"])}
    os.kill(daemon.process.pid, signal.SIGKILL)
    daemon.process.wait()
    wait_until(lambda: not postgres_pids(pids), timeout=10, message="workers and redo children to die with it")
    daemon.client.close()


def test_worker_that_cannot_start_is_parked_not_restarted_in_a_loop(real_requests):
    daemon = Daemon(world_traversable_tmpdir("walredod-daemon-broken-"), workers=1,
                    extra_config='postgres_bin = "/bin/false"\n', wait=False)
    try:
        def parked():
            try:
                workers = daemon.client.status(timeout=1)["workers"]
            except Unavailable:  # not listening yet
                return None
            return workers if workers[0]["state"] == "down" else None

        workers = wait_until(parked, timeout=60, interval=0.1, message="the slot to be parked")
        assert sum(workers[0]["restarts"].values()) == 5  # max_failed_starts, with back-off in between
        with pytest.raises(Unavailable, match="no worker can start"):
            daemon.client.redo(*real_requests[0][:4])
    finally:
        daemon.stop()
