"""The client's routing and re-send core, without sockets or a clock (walredod.client.core): events in, actions out."""

from __future__ import annotations

import json

import pytest

from walredod import protocol
from walredod.client.core import BATCH_SIZE, TRANSPORT_MARGIN, Call, ClientCore
from walredod.client.directory import DIRECT_CHECK_INTERVAL, DIRECTORY_MAX_AGE, WorkerDirectory
from walredod.daemon.routing import Router, rank_slots
from walredod.errors import InvalidRequest, RedoFailed, RedoTimeout, WalredodError
from walredod.objects import RelMapTag, SlruKind, SlruPageTag, TwoPhaseTag
from walredod.types import BLCKSZ, BufferTag, WalRecord

T0 = 1000.0  # the tests' clock: the core has none of its own
PAGE = bytes(BLCKSZ)


def directory_body(workers, direct=True, spill_factor=0.25) -> bytes:
    return json.dumps({"direct": direct, "spill_factor": spill_factor, "workers": [
        {"slot": slot, "pid": pid, "endpoint": f"ipc:///tmp/w-{slot}.sock", "ready": ready}
        for slot, pid, ready in workers]}).encode()


def request(relnode: int, block: int = 0):
    return BufferTag(1663, 5, relnode, 0, block), 100, None, [WalRecord(90, b"r" * 30)]


def direct_core(workers=((0, 100, True), (1, 101, True), (2, 102, True)), spill_factor=0.25, **options):
    core = ClientCore("ipc:///tmp/sup.sock", direct=True, first_id=1, **options)
    assert core.directory_due(T0) is False  # nothing to route yet
    return core, workers, spill_factor


def start(core, calls, workers, spill_factor=0.25, now=T0):
    """Submit ``calls``, answer the first directory request, return the first messages to send."""
    for call in calls:
        core.submit(call)
    assert core.take_sends(now) == []  # held until the first directory is in
    assert core.directory_due(now)
    assert not core.directory_due(now)  # asked once
    core.directory_arrived(directory_body(workers, spill_factor=spill_factor), now)
    return core.take_sends(now)


def requests_of(flight) -> list:
    """The decoded requests a flight carries, a batch's one by one."""
    decoded = protocol.decode_request(flight.frames)
    if decoded.kind == protocol.KIND_BATCH:
        assert decoded.request_id == flight.message_id
        return [protocol.decode_request(part) for part in decoded.batch]
    assert decoded.request_id == flight.message_id
    return [decoded]


def reply_to(flight, body=PAGE) -> list:
    """The daemon's reply to a flight: a page for each request."""
    members = requests_of(flight)
    if len(members) == 1 and protocol.decode_request(flight.frames).kind == protocol.KIND_REDO:
        return protocol.encode_reply(flight.message_id, body)
    return protocol.encode_batch_reply(flight.message_id, [protocol.encode_reply(r.request_id, body)
                                                           for r in members])


# --- the directory ------------------------------------------------------------------------------------------------

def test_worker_directory_routes_like_the_supervisor_and_notices_replaced_workers():
    directory = WorkerDirectory()
    assert directory.stale(T0) and not directory.usable() and not directory.known
    directory.update(directory_body([(0, 100, True), (1, 101, True), (2, 102, False)]), T0)
    assert directory.usable() and not directory.stale(T0) and directory.stale(T0 + DIRECTORY_MAX_AGE + 0.1)
    key = (1663, 5, 16384)
    first = directory.choose(key)
    assert first.slot == rank_slots(key, [0, 1])[0]  # the supervisor's ranking over the ready slots
    # Bounded load over this client's own requests in flight: the hot relation spills to the other worker.
    chosen = [directory.choose(key) for _ in range(20)]
    assert {w.slot for w in chosen} == {0, 1}
    for worker in [first, *chosen]:
        directory.release(worker)
    assert first.listing["endpoint"] == first.endpoint  # the whole entry, for the worker's transport
    # Same pid: the same worker, whatever else its entry says. New pid (a restart) or not ready (retiring):
    # requests to it are to be re-sent.
    moving = json.loads(directory_body([(0, 100, True), (1, 101, True)]))
    moving["workers"][first.slot]["served"] = 12345
    directory.update(json.dumps(moving).encode(), T0)
    assert directory.still_serving(first) and first.listing["served"] == 12345
    directory.update(directory_body([(0, 100, True), (1, 201, True)]), T0)
    assert directory.still_serving(first) == (first.slot == 0)
    directory.update(directory_body([(0, 100, False), (1, 201, True)]), T0)
    assert not any(directory.still_serving(w) for w in chosen if w.slot == 0)
    assert directory.choose(key).slot == 1
    directory.update(directory_body([(0, 100, True)], direct=False), T0)
    assert not directory.usable()
    for bad in (b"not json", b"[1, 2]"):
        with pytest.raises(ValueError):
            directory.update(bad, T0)
    directory.clear(T0)
    assert not directory.usable() and directory.known


# --- routing and batching -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spill_factor", [0.0, 0.25, 1.0])
def test_routing_matches_the_supervisors_ranking_and_spill_rule(spill_factor):
    """Every request goes where the supervisor's own Router would put it, given this client's requests in flight
    per worker (the request being placed counted, as the supervisor counts it)."""
    hot = [request(16384, block) for block in range(30)]
    mixed = [request(relnode) for relnode in range(20000, 20024)]
    objects = [(SlruPageTag(SlruKind(0), 3), 100, PAGE, []), (RelMapTag(1663, 5), 100, None, []),
               (TwoPhaseTag(745), 100, None, [])]
    call = Call(hot + mixed + objects, timeout=5.0)
    core, workers, _ = direct_core()
    sends = start(core, [call], workers, spill_factor=spill_factor)

    placed = {}
    for flight in sends:
        assert flight.worker is not None  # the direct path
        for decoded in requests_of(flight):
            placed[decoded.request_id] = flight.worker.slot
    reference, loads, slots = Router(spill_factor), {0: 0, 1: 0, 2: 0}, [0, 1, 2]
    expected = []
    for tag, *_ in call.requests:
        slot = reference.choose(protocol.routing_key(tag), slots, loads.__getitem__, lambda s: True)
        loads[slot] += 1
        expected.append(slot)
    assert [placed[request_id] for request_id in sorted(placed)] == expected
    assert len(set(expected[:30])) > 1  # the hot relation spilled (bounded load)
    assert sum(w.load for w in core.directory.workers()) == len(call.requests) == core.in_flight


def test_requests_for_one_worker_travel_in_batches_of_up_to_16():
    call = Call([request(16384, block) for block in range(40)], timeout=5.0)
    core, workers, _ = direct_core(workers=((0, 100, True),))  # one worker: everything is its
    sends = start(core, [call], workers)
    sizes = [len(requests_of(flight)) for flight in sends]
    assert sizes == [BATCH_SIZE, BATCH_SIZE, 40 - 2 * BATCH_SIZE]
    assert all(protocol.decode_request(f.frames).kind == protocol.KIND_BATCH for f in sends)
    assert protocol.decode_request(sends[0].frames).timeout_ms == 5000  # the batch carries the call's timeout
    order = [r.tag.blkno for flight in sends for r in requests_of(flight)]
    assert order == list(range(40))  # in request order
    for flight in sends:
        core.on_reply(reply_to(flight))
    assert call.done and call.results == [PAGE] * 40


def test_a_lone_request_for_a_worker_is_sent_as_itself():
    call = Call([request(16384)], timeout=5.0)
    core, workers, _ = direct_core()
    [flight] = start(core, [call], workers)
    assert protocol.decode_request(flight.frames).kind == protocol.KIND_REDO
    assert core.on_reply(reply_to(flight)) == [call]


def test_through_the_supervisor_requests_travel_alone():
    call = Call([request(16384, block) for block in range(20)], timeout=5.0)
    core = ClientCore("tcp://host:1", direct=False, first_id=1)
    core.submit(call)
    assert not core.directory_due(T0)  # no directory without a direct path
    sends = core.take_sends(T0)
    assert len(sends) == 20 and all(f.worker is None and len(requests_of(f)) == 1 for f in sends)


def test_the_window_bounds_requests_in_flight():
    call = Call([request(16384, block) for block in range(100)], timeout=5.0)
    core = ClientCore("ipc:///tmp/sup.sock", direct=False, window=64, first_id=1)
    core.submit(call)
    first = core.take_sends(T0)
    assert len(first) == 64 and core.take_sends(T0) == []
    for flight in first[:10]:
        core.on_reply(reply_to(flight))
    more = core.take_sends(T0)
    assert len(more) == 10 and core.in_flight == 64
    for flight in first[10:] + more:
        core.on_reply(reply_to(flight))
    rest = core.take_sends(T0)
    assert len(rest) == 26
    for flight in rest:
        core.on_reply(reply_to(flight))
    assert call.done and not core.busy


def test_a_malformed_request_sends_nothing():
    core = ClientCore("ipc:///tmp/sup.sock", direct=False, first_id=1)
    with pytest.raises(InvalidRequest, match="base image is 10 bytes"):
        core.submit(Call([request(1), (BufferTag(1, 2, 3, 0, 4), 100, b"x" * 10, [])], timeout=5.0))
    with pytest.raises(InvalidRequest, match="not a page or object"):
        core.submit(Call([("not a tag", 100, None, [])], timeout=5.0))
    assert core.take_sends(T0) == [] and not core.busy


# --- replies ------------------------------------------------------------------------------------------------------

def test_answers_of_a_batch_each_their_own_and_an_empty_body_is_none():
    call = Call([request(16384, block) for block in range(3)], timeout=5.0)
    core, workers, _ = direct_core(workers=((0, 100, True),))
    [flight] = start(core, [call], workers)
    ids = [r.request_id for r in requests_of(flight)]
    core.on_reply(protocol.encode_batch_reply(flight.message_id, [
        protocol.encode_reply(ids[0], PAGE), protocol.encode_error(ids[1], RedoFailed("bad record")),
        protocol.encode_reply(ids[2], b"")]))
    assert call.done and call.results[0] == PAGE and call.results[2] is None
    assert isinstance(call.results[1], RedoFailed) and str(call.results[1]) == "bad record"
    assert core.directory.workers()[0].load == 0 and core.in_flight == 0


def test_a_batch_refused_whole_answers_every_request():
    call = Call([request(16384, block) for block in range(3)], timeout=5.0)
    core, workers, _ = direct_core(workers=((0, 100, True),))
    [flight] = start(core, [call], workers)
    core.on_reply(protocol.encode_error(flight.message_id, InvalidRequest("batch cut short")))
    assert call.done and all(isinstance(r, InvalidRequest) for r in call.results)


def test_a_batch_reply_that_skips_a_request_does_not_leave_it_waiting():
    call = Call([request(16384, block) for block in range(2)], timeout=5.0)
    core, workers, _ = direct_core(workers=((0, 100, True),))
    [flight] = start(core, [call], workers)
    first = requests_of(flight)[0].request_id
    core.on_reply(protocol.encode_batch_reply(flight.message_id, [protocol.encode_reply(first, PAGE)]))
    assert call.done and call.results[0] == PAGE
    assert isinstance(call.results[1], WalredodError) and "did not answer" in str(call.results[1])


def test_a_reply_to_nothing_in_flight_is_dropped():
    call = Call([request(16384)], timeout=5.0)
    core = ClientCore("ipc:///tmp/sup.sock", direct=False, first_id=1)
    core.submit(call)
    [flight] = core.take_sends(T0)
    assert core.on_reply(protocol.encode_reply(999_999, b"other")) == ()
    assert core.on_reply(reply_to(flight)) == [call]
    assert core.on_reply(reply_to(flight, b"again")) == ()  # a duplicate
    assert call.results == [PAGE]
    with pytest.raises(InvalidRequest, match="malformed reply"):
        core.on_reply([b"", b"short"])


# --- workers that go away -----------------------------------------------------------------------------------------

def spread(core, workers, count=30):
    """A call whose requests land on every worker; its first messages."""
    call = Call([request(20000 + i) for i in range(count)], timeout=30.0)
    sends = start(core, [call], workers)
    assert {f.worker.slot for f in sends} == {w[0] for w in workers}
    return call, sends


@pytest.mark.parametrize("change", ["died", "replaced", "retired"])
def test_a_departed_workers_requests_are_re_sent_through_the_supervisor(change):
    """Once a direct request has waited DIRECT_CHECK_INTERVAL the core asks for the directory again, and re-sends
    through the supervisor, under the same ids and frames, what was in flight on a worker not listed as ready
    under the same pid."""
    core, workers, _ = direct_core(workers=((0, 100, True), (1, 101, True)))
    call, sends = spread(core, workers)
    carried = {f.message_id: (f.worker.slot, [r.request_id for r in requests_of(f)]) for f in sends}
    assert not core.directory_due(T0 + DIRECT_CHECK_INTERVAL / 2)  # replies from others prove nothing, but wait
    assert core.wakeup(T0) == pytest.approx(DIRECT_CHECK_INTERVAL)
    now = T0 + DIRECT_CHECK_INTERVAL
    assert core.directory_due(now)
    listed = {"died": [(1, 101, True)], "replaced": [(0, 200, True), (1, 101, True)],
              "retired": [(0, 100, False), (1, 101, True)]}[change]
    core.directory_arrived(directory_body(listed), now)
    resent = core.take_sends(now)
    on_zero = [f for f in sends if f.message_id in {r.message_id for r in resent}]
    assert resent and all(f.worker is None for f in resent)  # to the supervisor
    assert {f.message_id for f in resent} == {f.message_id for f in on_zero}
    # What slot 0 held, whole: a batch stays one message with the same requests.
    assert all(carried[f.message_id] == (0, [r.request_id for r in requests_of(f)]) for f in resent)
    kept = [f for f in sends if f not in resent]
    assert kept and all(f.worker.slot == 1 for f in kept)
    for flight in sends:  # the supervisor's answers to the re-sent, the worker's own to the rest
        core.on_reply(reply_to(flight))
    assert call.done and call.results == [PAGE] * len(call.requests)
    assert all(w.load == 0 for w in core.directory.workers()) and core.in_flight == 0


def test_a_worker_still_listed_keeps_its_requests_and_checks_are_spaced():
    core, workers, _ = direct_core(workers=((0, 100, True), (1, 101, True)))
    spread(core, workers)
    now = T0 + DIRECT_CHECK_INTERVAL
    assert core.directory_due(now)
    core.directory_arrived(directory_body(workers), now)
    assert core.take_sends(now) == []  # same pids: nothing to re-send
    assert not core.directory_due(now + DIRECT_CHECK_INTERVAL / 2)  # at most one check per interval
    assert core.directory_due(now + DIRECT_CHECK_INTERVAL)


def test_first_reply_wins_and_a_late_duplicate_is_dropped():
    core, workers, _ = direct_core(workers=((0, 100, True), (1, 101, True)))
    call, sends = spread(core, workers, count=2)
    now = T0 + DIRECT_CHECK_INTERVAL
    assert core.directory_due(now)
    core.directory_arrived(directory_body([]), now)  # neither listed any more
    resent = core.take_sends(now)
    assert len(resent) == len(sends)
    first, second = resent
    # The old worker was alive after all and answers first: its reply wins, the supervisor's is dropped.
    assert not core.on_reply(reply_to(first, b"w" * BLCKSZ))  # delivered, the call not finished yet
    assert core.on_reply(reply_to(first, b"s" * BLCKSZ)) == ()
    # The supervisor answers first: the old worker's late reply is dropped.
    assert core.on_reply(reply_to(second, b"s" * BLCKSZ)) == [call]
    assert core.on_reply(reply_to(second, b"w" * BLCKSZ)) == ()
    index_first = 0 if requests_of(first)[0].request_id < requests_of(second)[0].request_id else 1
    assert call.results[index_first] == b"w" * BLCKSZ and call.results[1 - index_first] == b"s" * BLCKSZ


def test_supervisor_fallback_when_the_directory_does_not_answer():
    core = ClientCore("ipc:///tmp/sup.sock", direct=True, first_id=1)
    call = Call([request(20000 + i) for i in range(10)], timeout=5.0)
    core.submit(call)
    assert core.directory_due(T0)
    core.directory_failed(T0)
    sends = core.take_sends(T0)
    assert len(sends) == 10 and all(f.worker is None for f in sends)  # everything the supervisor's way
    for flight in sends:
        core.on_reply(reply_to(flight))
    later = Call([request(1)], timeout=5.0)
    core.submit(later)
    assert not core.directory_due(T0 + 1)  # not asked again at once
    assert core.directory_due(T0 + DIRECTORY_MAX_AGE + 0.1)  # due again later


def test_a_check_the_supervisor_does_not_answer_sends_direct_requests_its_way():
    core, workers, _ = direct_core(workers=((0, 100, True), (1, 101, True)))
    _call, sends = spread(core, workers)
    now = T0 + DIRECT_CHECK_INTERVAL
    assert core.directory_due(now)
    core.directory_failed(now)
    resent = core.take_sends(now)
    assert {f.message_id for f in resent} == {f.message_id for f in sends} and all(f.worker is None for f in resent)


def test_a_daemon_without_a_directory_is_never_asked_again():
    core = ClientCore("ipc:///tmp/sup.sock", direct=True, first_id=1)
    core.submit(Call([request(1)], timeout=5.0))
    assert core.directory_due(T0)
    core.directory_failed(T0, unsupported=True)
    assert [f.worker for f in core.take_sends(T0)] == [None]
    core.submit(Call([request(2)], timeout=5.0))
    assert not core.directory_due(T0 + 100)


def test_a_stale_directory_serves_while_a_new_one_is_asked_for():
    core, workers, _ = direct_core(workers=((0, 100, True),))
    _call, sends = spread(core, workers, count=1)
    core.on_reply(reply_to(sends[0]))
    later = T0 + DIRECTORY_MAX_AGE + 1
    core.submit(Call([request(20000)], timeout=5.0))
    assert core.directory_due(later)
    [flight] = core.take_sends(later)
    assert flight.worker is not None and flight.worker.slot == 0


# --- giving up ----------------------------------------------------------------------------------------------------

def test_a_flight_not_answered_in_time_gives_redo_timeout():
    core = ClientCore("ipc:///tmp/sup.sock", direct=False, first_id=1)
    call = Call([request(1), request(2)], timeout=2.0)
    core.submit(call)
    first, second = core.take_sends(T0)
    core.on_reply(reply_to(first))
    deadline = T0 + 2.0 + TRANSPORT_MARGIN
    assert core.wakeup(T0) == pytest.approx(2.0 + TRANSPORT_MARGIN)
    assert core.on_time(deadline - 0.01) == ()
    assert core.on_time(deadline) == [call]
    assert call.timed_out and call.results[0] == PAGE
    assert isinstance(call.results[1], RedoTimeout) and "within 2 s" in str(call.results[1])
    assert core.on_reply(reply_to(second)) == ()  # too late: dropped
    assert not core.busy and core.in_flight == 0


def test_a_re_sent_flight_gets_the_supervisors_time_and_a_direct_one_its_workers():
    core, workers, _ = direct_core(workers=((0, 100, True), (1, 101, True)))
    call, sends = spread(core, workers)
    now = T0 + DIRECT_CHECK_INTERVAL
    assert core.directory_due(now)
    core.directory_arrived(directory_body([(1, 101, True)]), now)
    resent = core.take_sends(now)
    finished = core.on_time(T0 + 30.0 + TRANSPORT_MARGIN)  # the direct ones' deadline
    assert finished == []
    assert all(isinstance(call.results[i], RedoTimeout) for f in sends if f not in resent
               for _call, i in f.members.values())
    assert core.on_time(now + 30.0 + TRANSPORT_MARGIN) == [call]  # the re-sent ones' deadline runs from the re-send
    timed_out = [r for r in call.results if isinstance(r, RedoTimeout)]
    assert len(timed_out) == len(call.requests)
    assert any("w-1.sock" in str(r) for r in timed_out) and any("sup.sock" in str(r) for r in timed_out)


def test_abandon_forgets_everything():
    core, workers, _ = direct_core()
    _call, sends = spread(core, workers)
    core.abandon()
    assert not core.busy and core.in_flight == 0 and all(w.load == 0 for w in core.directory.workers())
    assert core.on_reply(reply_to(sends[0])) == ()
    core.forget_directory()
    core.submit(Call([request(1)], timeout=5.0))
    assert core.directory_due(T0) and core.take_sends(T0) == []  # held for a new directory
    core.abandon()  # say its request failed with the socket under it: the answer is not waited for
    core.submit(Call([request(1)], timeout=5.0))
    assert core.directory_due(T0)


def test_waiting_calls_are_those_with_requests_unanswered():
    core = ClientCore("ipc:///tmp/sup.sock", direct=False, window=2, first_id=1)
    answered, sent, queued = (Call([request(i)], timeout=5.0) for i in range(3))
    for call in (answered, sent, queued):
        core.submit(call)
    first, _second = core.take_sends(T0)
    core.on_reply(reply_to(first))
    assert core.waiting_calls() == {sent, queued}


def test_a_transport_hands_back_a_message_it_cannot_carry():
    core, workers, _ = direct_core(workers=((0, 100, True),))
    [flight] = start(core, [Call([request(1)], timeout=5.0)], workers)
    core.resend_through_supervisor(flight, T0 + 0.1)
    assert core.take_sends(T0 + 0.1) == [flight] and flight.worker is None
    assert core.directory.workers()[0].load == 0
    core.on_reply(reply_to(flight))
    core.resend_through_supervisor(flight, T0 + 0.2)  # answered meanwhile: nothing to send
    assert core.take_sends(T0 + 0.2) == []
