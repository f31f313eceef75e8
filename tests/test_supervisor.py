"""The supervisor's bookkeeping without sockets or processes: a fake clock, fake worker processes, and lists where
the sockets would be (walredod.daemon.pool). What a real daemon does end to end is tests/test_daemon.py."""

from __future__ import annotations

import itertools
import json

import pytest
import zmq

from walredod import protocol
from walredod.config import Settings
from walredod.daemon import backend
from walredod.daemon.pool import GRACE, Frontend, Pool
from walredod.errors import RedoFailed
from walredod.types import BLCKSZ, BufferTag, WalRecord

DIRECT_BASE = "ipc:///run/test/walredod-worker"
PAGE = b"\x07" * BLCKSZ


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeProcess:
    """A worker process as the pool sees one: a pid, and an exit status once it ends."""

    pids = itertools.count(40_000)

    def __init__(self, slot: int):
        self.slot = slot
        self.pid = next(self.pids)
        self.returncode: int | None = None
        self.killed = False

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        self.killed = True
        if self.returncode is None:
            self.returncode = -9

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode


def as_bytes(frames) -> list[bytes]:
    return [f.bytes if isinstance(f, zmq.Frame) else bytes(f) for f in frames]


class Harness:
    """A pool with everything it touches recorded: processes started, messages to workers, replies per client."""

    def __init__(self, workers: int = 2, credit: int = 4, request_timeout: float = 10.0, **daemon):
        self.clock = Clock()
        self.processes: list[FakeProcess] = []
        self.to_workers: list[tuple[bytes, list[bytes]]] = []
        self.replies: list[tuple[str, bytes, list[bytes]]] = []
        self.ipc = self.frontend("ipc:///run/test/walredod.sock")
        self.tcp = self.frontend("tcp://127.0.0.1:7000")
        self.pool = Pool(self.settings(workers, credit=credit, request_timeout=request_timeout, **daemon),
                         start_process=self.start_process, send_worker=self.send_worker, clock=self.clock,
                         direct_base=DIRECT_BASE)
        self.pool.resize()

    @staticmethod
    def settings(workers: int, credit: int = 4, request_timeout: float = 10.0, **daemon) -> Settings:
        return Settings.model_validate({
            "daemon": {"workers": workers, "worker_credit": credit, "heartbeat_interval": 0.5,
                       "heartbeat_liveness": 3, **daemon},
            "engine": {"request_timeout": request_timeout},
        })

    def frontend(self, endpoint: str) -> Frontend:
        return Frontend(endpoint, lambda client, frames: self.replies.append((endpoint, client, as_bytes(frames))))

    def start_process(self, slot) -> FakeProcess:
        process = FakeProcess(slot.index)
        self.processes.append(process)
        return process

    def send_worker(self, identity: bytes, frames: list) -> None:
        self.to_workers.append((identity, as_bytes(frames)))

    # --- what workers do ------------------------------------------------------------------------------------------

    def process_of(self, slot: int) -> FakeProcess:
        return self.pool.slots[slot].process

    def identity(self, slot: int) -> bytes:
        return f"w{slot}.{self.process_of(slot).pid}".encode()

    def ready(self, slot: int, credit: int = 4, pid: int | None = None) -> bytes:
        pid = self.process_of(slot).pid if pid is None else pid
        identity = f"w{slot}.{pid}".encode()
        self.from_worker(identity, backend.encode_ready(slot, pid, pid + 1, credit))
        return identity

    def from_worker(self, identity: bytes, frames: list) -> None:
        self.pool.on_worker_message([zmq.Frame(identity), *(zmq.Frame(f) for f in frames)])

    def requests_to(self, slot: int) -> list[tuple[int, int]]:
        """(token, request id) of each request sent to the slot's current worker, taken off the record."""
        identity, taken = self.identity(slot), []
        for sent in [m for m in self.to_workers if m[0] == identity and m[1][0] == backend.REQUEST]:
            self.to_workers.remove(sent)
            frames = sent[1]
            taken.append((backend.decode_token(frames[1]), protocol.peek_request_id([b"", frames[3]])))
        return taken

    def commands_to(self, identity: bytes) -> list[bytes]:
        return [frames[0] for who, frames in self.to_workers if who == identity]

    def answer(self, slot: int, token: int, request_id: int, reply: list | None = None) -> None:
        reply = reply or protocol.encode_reply(request_id, PAGE)
        self.from_worker(self.identity(slot), backend.encode_reply(backend._TOKEN.pack(token), reply))

    def heartbeat(self, slot: int, busy_until: float = 0.0, served: int = 0) -> None:
        pid = self.process_of(slot).pid
        self.from_worker(self.identity(slot), backend.encode_heartbeat(served, pid + 1, 0, busy_until))

    # --- what clients do ------------------------------------------------------------------------------------------

    def send(self, request_id: int, relation: int = 1, client: bytes = b"client", frontend: Frontend | None = None,
             timeout_ms: int = 0, records: int = 1) -> None:
        tag = BufferTag(1663, 5, relation, 0, 0)
        frames = protocol.encode_redo_request(request_id, tag, 0x1000, None,
                                              [WalRecord(0x1000 + i, b"r" * 40) for i in range(records)], timeout_ms)
        self.control(frames, client, frontend)

    def control(self, frames: list, client: bytes = b"client", frontend: Frontend | None = None) -> None:
        self.pool.on_client_message(frontend or self.ipc, [zmq.Frame(client), *(zmq.Frame(f) for f in frames)])

    def answers(self) -> dict[int, tuple[int, bytes]]:
        """request id -> (status, body) of every reply so far, taken off the record; a second reply to one id
        fails the test."""
        self.check_invariants()
        got = {}
        for _endpoint, _client, frames in self.replies:
            request_id, status, body = protocol.decode_reply(frames)
            assert request_id not in got, f"request {request_id} answered twice"
            got[request_id] = (status, bytes(body))
        self.replies.clear()
        return got

    def tick(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)
        self.pool.tick()
        self.check_invariants()

    def check_invariants(self) -> None:
        """What the pool keeps in step: a slot's load is what it holds, everything held is pending, and a slot's
        credit never goes below zero."""
        pool = self.pool
        for slot in pool.slots.values():
            assert slot.load == sum(p.requests for p in slot.in_flight.values()), slot
            assert all(token in pool.pending and pool.pending[token].slot == slot.index for token in slot.in_flight)
            assert slot.credit >= 0


def status(name: str) -> int:
    return protocol.STATUS_CODES[name]


def test_requests_wait_for_credit_and_a_reply_returns_it():
    h = Harness(workers=1, credit=2)
    h.ready(0, credit=2)
    for request_id in (1, 2, 3):
        h.send(request_id)
    assert [rid for _, rid in h.requests_to(0)] == [1, 2]  # the third waits: no credit left
    assert h.pool.slots[0].credit == 0 and list(h.pool.waiting) != []
    assert json.loads(h.pool.status_json())["waiting"] == 1
    h.answer(0, 1, 1)
    assert h.answers() == {1: (protocol.STATUS_OK, PAGE)}
    assert [rid for _, rid in h.requests_to(0)] == [3]  # the returned credit took the waiting one
    assert h.pool.slots[0].credit == 0
    h.answer(0, 2, 2)
    h.answer(0, 3, 3)
    assert set(h.answers()) == {2, 3}
    assert h.pool.slots[0].credit == 2 and not h.pool.pending and not h.pool.slots[0].in_flight
    assert h.pool.slots[0].served == 3


def test_a_late_or_doubled_reply_is_not_sent_twice():
    h = Harness(workers=1)
    h.ready(0)
    h.send(1)
    (token, _), = h.requests_to(0)
    h.answer(0, token, 1)
    h.answer(0, token, 1)
    assert h.answers() == {1: (protocol.STATUS_OK, PAGE)}


def test_a_workers_error_reply_is_passed_on_and_counted_by_status():
    h = Harness(workers=1)
    h.ready(0)
    h.send(1, records=3)
    (token, _), = h.requests_to(0)
    h.answer(0, token, 1, protocol.encode_error(1, RedoFailed("child died")))
    assert h.answers() == {1: (status("redo_failed"), b"child died")}
    registry = h.pool.metrics.registry
    assert registry.get_sample_value("walredod_requests_total", {"status": "redo_failed"}) == 1
    assert registry.get_sample_value("walredod_requests_total", {"status": "ok"}) is None


def test_records_per_request_counts_a_batchs_records():
    h = Harness(workers=1)
    h.ready(0)
    h.send(1, records=3)
    tag = BufferTag(1663, 5, 1, 0, 0)
    parts = [protocol.encode_redo_request(10 + i, tag, 0x1000, None, [WalRecord(0x1000, b"r" * 40)] * count)
             for i, count in enumerate((2, 0, 5))]
    h.control(protocol.encode_batch(2, parts))
    for token, request_id in h.requests_to(0):
        h.answer(0, token, request_id)
    registry = h.pool.metrics.registry
    assert registry.get_sample_value("walredod_records_per_request_sum") == 3 + 7
    assert registry.get_sample_value("walredod_records_per_request_count") == 2


def test_worker_gone_without_requests_is_replaced_at_once():
    h = Harness(workers=2)
    h.ready(0), h.ready(1)
    first = h.process_of(0)
    first.returncode = 1
    h.tick()
    replacement = h.process_of(0)
    assert replacement is not first and replacement.pid != first.pid
    assert h.pool.slots[0].state == "starting" and h.pool.slots[0].restarts == {"exited": 1}
    assert h.process_of(1) is h.processes[1]  # the other slot is untouched
    assert h.answers() == {}


def test_worker_gone_mid_request_is_redispatched_once_then_poison():
    h = Harness(workers=2)
    h.ready(0), h.ready(1)
    h.send(1, relation=7)
    first = next(slot for slot in (0, 1) if h.requests_to(slot))
    other = 1 - first
    h.process_of(first).returncode = -9
    h.tick()
    assert h.pool.slots[first].restarts == {"killed by signal 9": 1}
    (token, request_id), = h.requests_to(other)  # re-sent to the worker left, same token
    assert request_id == 1 and h.pool.pending[token].attempts == 2
    assert h.answers() == {}  # no reply yet: the request is not lost, nor answered twice
    h.process_of(other).returncode = -9
    h.tick()
    answers = h.answers()
    assert list(answers) == [1] and answers[1][0] == status("poison")
    assert b"two workers" in answers[1][1]
    assert not h.pool.pending and not h.pool.waiting


def test_a_redispatched_request_is_answered_once_by_its_second_worker():
    h = Harness(workers=2)
    h.ready(0), h.ready(1)
    h.send(1, relation=7)
    first = next(slot for slot in (0, 1) if h.requests_to(slot))
    gone_identity = h.identity(first)
    h.process_of(first).returncode = 1
    h.tick()
    (token, _), = h.requests_to(1 - first)
    # The dead worker's identity is forgotten: a reply it had on the wire is not taken.
    h.from_worker(gone_identity, backend.encode_reply(backend._TOKEN.pack(token), protocol.encode_reply(1, b"x")))
    assert h.answers() == {}
    h.answer(1 - first, token, 1)
    assert h.answers() == {1: (protocol.STATUS_OK, PAGE)}


def test_requests_of_a_dead_worker_wait_for_its_replacement_in_their_order():
    h = Harness(workers=1, credit=2)
    h.ready(0, credit=2)
    for request_id in (1, 2, 3):
        h.send(request_id)
    assert [rid for _, rid in h.requests_to(0)] == [1, 2]
    h.process_of(0).returncode = 1
    h.tick()
    assert h.pool.slots[0].state == "starting" and len(h.pool.waiting) == 3
    h.ready(0, credit=4)
    taken = h.requests_to(0)
    assert [rid for _, rid in taken] == [1, 2, 3]  # the re-dispatched first, oldest first, then the one waiting
    for token, request_id in taken:
        h.answer(0, token, request_id)
    assert h.answers() == {rid: (protocol.STATUS_OK, PAGE) for rid in (1, 2, 3)}


def test_backoff_grows_while_starts_fail_and_resets_once_a_worker_serves():
    h = Harness(workers=1, restart_backoff_max=1.0, max_failed_starts=10)
    for backoff in (0.2, 0.4, 0.8, 1.0, 1.0):  # doubling from 0.1 s, up to restart_backoff_max
        failed = h.process_of(0)
        failed.returncode = 3  # it never sent READY
        h.tick()
        h.tick(backoff - 0.01)
        assert h.pool.slots[0].process is None, backoff
        h.tick(0.02)
        assert h.pool.slots[0].process not in (None, failed), backoff
    h.ready(0)
    assert h.pool.slots[0].failed_starts == 0
    h.process_of(0).returncode = 1  # this one had served: replaced without waiting
    h.tick()
    assert h.pool.slots[0].state == "starting"


def test_a_slot_whose_starts_keep_failing_is_parked_until_reload():
    h = Harness(workers=1, max_failed_starts=3, restart_backoff_max=0.5)
    h.send(1)  # waits for a worker that never comes
    for _ in range(3):
        h.process_of(0).returncode = 3
        h.tick()
        for _ in range(40):
            if h.pool.slots[0].process is not None or h.pool.slots[0].parked:
                break
            h.tick(0.05)
    slot = h.pool.slots[0]
    assert slot.parked and slot.state == "down" and slot.process is None
    assert len(h.processes) == 3
    answers = h.answers()  # told at once, not at its deadline
    assert answers[1][0] == status("unavailable") and b"no worker can start" in answers[1][1]
    h.tick(3600)
    assert len(h.processes) == 3  # no hot loop, and no retry either
    h.send(2)
    assert h.answers()[2][0] == status("unavailable")
    h.pool.apply_settings(h.settings(1, max_failed_starts=3, restart_backoff_max=0.5))  # a reload: try again
    h.tick()
    assert not slot.parked and slot.process is not None and len(h.processes) == 4


def test_a_silent_worker_past_the_deadline_gets_its_request_answered_as_timeout():
    h = Harness(workers=1)
    h.ready(0)
    h.send(1, timeout_ms=5000)
    h.requests_to(0)
    worker = h.process_of(0)
    h.tick(5.0 + GRACE - 0.1)  # silent well past its heartbeats, but inside the request it holds
    assert h.answers() == {} and not worker.killed
    h.tick(0.2)
    answers = h.answers()
    assert list(answers) == [1] and answers[1][0] == status("timeout")
    assert worker.killed and h.pool.slots[0].restarts == {"hung (missed heartbeats)": 1}


def test_a_request_waiting_past_its_deadline_is_answered_as_timeout():
    h = Harness(workers=1, request_timeout=3.0)
    h.send(1)  # no worker ready
    h.tick(3.0 + GRACE - 0.1)
    assert h.answers() == {}
    h.tick(0.2)
    assert h.answers()[1][0] == status("timeout")
    assert not h.pool.waiting or h.pool.waiting[0] not in h.pool.pending


def test_a_silent_idle_worker_is_declared_hung_after_its_missed_heartbeats():
    h = Harness(workers=1)
    h.ready(0)
    worker = h.process_of(0)
    h.tick(0.5)
    assert h.commands_to(h.identity(0)) == [backend.HEARTBEAT]  # probed when idle for an interval
    h.tick(1.0)
    assert not worker.killed  # 1.5 s of silence: not past liveness (3 x 0.5 s) yet
    h.tick(GRACE)
    assert worker.killed and h.pool.slots[0].restarts == {"hung (missed heartbeats)": 1}


def test_busy_until_lets_a_worker_be_silent_while_it_serves_a_direct_request():
    h = Harness(workers=1)
    h.ready(0)
    worker = h.process_of(0)
    h.heartbeat(0, busy_until=h.clock.now + 20.0)
    h.tick(20.0 + GRACE - 0.1)
    assert not worker.killed
    h.tick(0.2)
    assert worker.killed


def test_heartbeats_keep_a_worker_alive_and_report_its_counts():
    h = Harness(workers=1)
    h.ready(0)
    worker = h.process_of(0)
    for served in range(1, 20):
        h.tick(0.5)
        h.heartbeat(0, served=served)
    assert not worker.killed
    assert h.pool.slots[0].served == 19
    assert json.loads(h.pool.status_json())["workers"][0]["served"] == 19


def test_a_worker_that_never_gets_ready_is_replaced():
    h = Harness(workers=1)
    first = h.process_of(0)
    h.tick(h.pool.settings.engine.start_timeout + 10.1)
    assert first.killed and h.pool.slots[0].restarts == {"hung (never ready)": 1}


def test_ready_from_a_stray_pid_is_told_to_stop_and_not_used():
    h = Harness(workers=1)
    stray = h.ready(0, pid=12345)  # a worker of an earlier life of slot 0, or something else
    assert h.commands_to(stray) == [backend.STOP]
    assert h.pool.slots[0].state == "starting" and stray not in h.pool.by_identity
    h.ready(7, pid=h.process_of(0).pid)  # a slot that does not exist
    h.send(1)
    assert h.pool.waiting and h.answers() == {}  # nobody took it
    h.from_worker(stray, backend.encode_heartbeat(99, 1, 0, 0.0))  # and nothing from a stranger counts
    assert h.pool.slots[0].served == 0


def test_reload_to_fewer_workers_retires_slots_after_their_requests():
    h = Harness(workers=3)
    for slot in range(3):
        h.ready(slot)
    by_slot = {}
    relation = 0
    while 2 not in by_slot:  # a request held by slot 2
        relation += 1
        h.send(relation, relation=relation)
        for slot in range(3):
            for taken in h.requests_to(slot):
                by_slot.setdefault(slot, []).append(taken)
    retiring = h.process_of(2)
    identity = h.identity(2)
    h.pool.apply_settings(h.settings(2))
    assert h.pool.slots[2].state == "retiring"
    h.send(1000, relation=next(r for r in range(1, 10_000) if  # a relation slot 2 would have taken
                                 h.pool.router.choose((1663, 5, r), [0, 1, 2], lambda i: 0, lambda i: True) == 2))
    assert h.requests_to(2) == [] and len(h.requests_to(0) + h.requests_to(1)) == 1
    h.tick()
    assert backend.STOP not in h.commands_to(identity)  # it still holds a request
    for token, request_id in by_slot[2]:
        h.answer(2, token, request_id)
    h.tick()
    assert backend.STOP in h.commands_to(identity)
    retiring.returncode = 0
    h.tick()
    assert sorted(h.pool.slots) == [0, 1] and not retiring.killed
    assert h.pool.slots[0].restarts == {} and identity not in h.pool.by_identity
    h.pool.apply_settings(h.settings(3))  # and back up: a fresh worker in slot 2
    assert sorted(h.pool.slots) == [0, 1, 2] and h.process_of(2) is not retiring


def test_max_pending_refuses_the_excess_as_unavailable():
    h = Harness(workers=1, max_pending=3, max_pending_per_client=3)
    for request_id in range(5):
        h.send(request_id)
    answers = h.answers()
    assert sorted(answers) == [3, 4] and {s for s, _ in answers.values()} == {status("unavailable")}
    assert len(h.pool.pending) == 3


def test_an_oversized_or_malformed_request_is_refused_and_nothing_else_changes():
    h = Harness(workers=1, max_request_bytes=16 * 1024)
    h.ready(0)
    h.send(1, records=500)  # 500 x 40 bytes: over 16 kB
    h.control([b"", b"XX" + b"\0" * 40])
    answers = h.answers()
    assert answers[1][0] == status("invalid_request") and b"over the limit" in answers[1][1]
    assert answers[0][0] == status("invalid_request") and b"magic" in answers[0][1]
    assert not h.pool.pending and h.requests_to(0) == []


def test_stop_answers_everything_pending_as_unavailable_and_stops_the_workers():
    h = Harness(workers=2, credit=1)
    h.ready(0), h.ready(1)
    for request_id in range(1, 5):
        h.send(request_id, relation=request_id)
    taken = {slot: h.requests_to(slot) for slot in (0, 1)}
    h.pool.begin_stop()
    h.send(9)
    h.control(protocol.encode_control(10, protocol.KIND_STATUS))  # control requests too (docs/client-protocol.md)
    assert h.answers() == {rid: (status("unavailable"), b"the daemon is stopping") for rid in (9, 10)}
    # What is in flight is still served while stopping.
    token, request_id = taken[0][0]
    h.answer(0, token, request_id)
    assert h.answers() == {request_id: (protocol.STATUS_OK, PAGE)}
    processes = h.pool.stop()
    answers = h.answers()
    assert set(answers) == {1, 2, 3, 4} - {request_id}
    assert {s for s, _ in answers.values()} == {status("unavailable")}
    assert not h.pool.pending
    assert sorted(p.pid for p in processes) == sorted(h.process_of(s).pid for s in (0, 1))
    assert all(backend.STOP in h.commands_to(h.identity(s)) for s in (0, 1))


def test_the_directory_fits_the_endpoint_the_client_came_in_by():
    h = Harness(workers=2)
    h.ready(0)
    h.control(protocol.encode_control(1, protocol.KIND_DIRECTORY))
    h.control(protocol.encode_control(2, protocol.KIND_DIRECTORY), frontend=h.tcp)
    assert [(endpoint, client) for endpoint, client, _ in h.replies] == [
        (h.ipc.endpoint, b"client"), (h.tcp.endpoint, b"client")]
    answers = h.answers()
    local, remote = json.loads(answers[1][1]), json.loads(answers[2][1])
    assert local["direct"] is True
    assert [(w["slot"], w["endpoint"], w["pid"], w["ready"]) for w in local["workers"]] == [
        (0, f"{DIRECT_BASE}-0.sock", h.process_of(0).pid, True),
        (1, f"{DIRECT_BASE}-1.sock", h.process_of(1).pid, False)]
    assert remote["direct"] is False and remote["workers"] == []


def test_a_reply_leaves_by_the_endpoint_its_request_came_in_by():
    h = Harness(workers=1)
    h.ready(0)
    h.send(1, client=b"same-identity", frontend=h.tcp)
    h.send(2, client=b"same-identity")
    for token, request_id in h.requests_to(0):
        h.answer(0, token, request_id)
    assert sorted((protocol.decode_reply(frames)[0], endpoint) for endpoint, _, frames in h.replies) == [
        (1, h.tcp.endpoint), (2, h.ipc.endpoint)]


@pytest.mark.parametrize("kind", [protocol.KIND_PING, protocol.KIND_STATUS])
def test_ping_and_status_are_answered_by_the_supervisor(kind):
    h = Harness(workers=1)
    h.control(protocol.encode_control(4, kind))
    (status_code, body), = h.answers().values()
    assert status_code == protocol.STATUS_OK
    if kind == protocol.KIND_STATUS:
        assert [w["state"] for w in json.loads(body)["workers"]] == ["starting"]
    else:
        assert body == b""
    assert h.to_workers == []


def test_a_retiring_worker_that_dies_hands_its_requests_on_and_is_not_replaced():
    h = Harness(workers=2)
    h.ready(0), h.ready(1)
    relation = next(r for r in range(1, 10_000)
                    if h.pool.router.choose((1663, 5, r), [0, 1], lambda i: 0, lambda i: True) == 1)
    h.send(1, relation=relation)
    (token, _), = h.requests_to(1)
    h.pool.apply_settings(h.settings(1))
    retiring = h.process_of(1)
    retiring.returncode = -9
    started = len(h.processes)
    h.tick()
    assert h.requests_to(0) == [(token, 1)]  # re-sent to the worker left
    assert sorted(h.pool.slots) == [0] and len(h.processes) == started
    h.answer(0, token, 1)
    assert h.answers() == {1: (protocol.STATUS_OK, PAGE)}


def test_a_batch_weighs_its_requests_in_the_load_bound():
    """Load is counted in requests, a batch by its size (docs/client-protocol.md, "Which worker"): after a batch of
    4 on a relation's worker, its next request spills to the other (counted as one message, it would stay)."""
    h = Harness(workers=2, spill_factor=0.5)
    h.ready(0), h.ready(1)
    tag = BufferTag(1663, 5, 1, 0, 0)
    parts = [protocol.encode_redo_request(10 + i, tag, 0x1000, None, [WalRecord(0x1000, b"r" * 40)])
             for i in range(4)]
    h.control(protocol.encode_batch(2, parts))
    home = next(slot for slot in (0, 1) if h.requests_to(slot))
    h.send(3, relation=1)
    assert [rid for _, rid in h.requests_to(1 - home)] == [3]
