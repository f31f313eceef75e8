"""Fair order and budgets of what the supervisor holds (walredod.daemon.admission), without sockets."""

from __future__ import annotations

import pytest

from walredod.daemon.admission import Budget, FairQueue


def owned(tokens: dict[int, str]) -> FairQueue:
    queue = FairQueue(tokens.__getitem__)
    for token in tokens:
        queue.append(token)
    return queue


def drain(queue: FairQueue) -> list[int]:
    out = []
    while queue:
        assert queue[0] == (head := queue.popleft())
        out.append(head)
    return out


def test_a_flooding_client_gets_one_turn_per_round():
    tokens = {t: "flood" for t in range(1, 12_001)}
    tokens[20_000] = "polite"
    tokens[20_001] = "other"
    queue = owned(tokens)
    order = drain(queue)
    assert order.index(20_000) <= 2 and order.index(20_001) <= 2  # not behind 12,000 requests
    assert [t for t in order if tokens[t] == "flood"] == list(range(1, 12_001))  # each client's order kept
    assert len(queue) == 0 and not queue and queue.owners() == 0


def test_round_robin_and_a_new_client_joins_the_round():
    tokens = {1: "a", 2: "a", 3: "a", 4: "b", 5: "b"}
    queue = owned(tokens)
    assert queue.popleft() == 1
    tokens[6] = "c"
    queue.append(6)
    assert drain(queue) == [4, 2, 6, 5, 3]


def test_a_request_sent_again_goes_first():
    tokens = {1: "a", 2: "b", 3: "b"}
    queue = owned(tokens)
    tokens[9] = "b"
    queue.appendleft(9)  # its worker died: first for its client, and its client is next
    assert queue[0] == 9
    assert drain(queue) == [9, 1, 2, 3]
    with pytest.raises(IndexError):
        queue.popleft()
    with pytest.raises(IndexError):
        queue[0]


def test_clear_and_iterate():
    queue = owned({1: "a", 2: "b"})
    assert sorted(queue) == [1, 2] and len(queue) == 2
    queue.clear()
    assert not queue and list(queue) == []


def test_budget_counts_requests_bytes_and_clients():
    budget = Budget(max_requests=3, max_bytes=1000, max_per_client=2)
    assert budget.refusal("a", 400) is None
    budget.take("a", 400)
    budget.take("a", 400)
    assert budget.refusal("a", 10)[0] == "max_pending_per_client"
    assert budget.refusal("b", 300)[0] == "max_pending_bytes"
    assert budget.refusal("b", 200) is None
    budget.take("b", 200)
    assert budget.refusal("c", 1)[0] == "max_pending"
    budget.give_back("a", 400)
    assert budget.refusal("c", 1) is None
    budget.give_back("a", 400)
    budget.give_back("b", 200)
    assert budget.requests == budget.bytes == budget.clients() == 0


# --- in the supervisor's pool (fake clock, processes and sockets: tests/test_supervisor.py's harness) ----------

from test_supervisor import Harness, status  # noqa: E402


def test_a_flooding_client_does_not_make_another_wait_for_its_backlog():
    h = Harness(workers=1, credit=1, max_pending=20_000, max_pending_per_client=20_000)
    h.ready(0, credit=1)
    for request_id in range(1, 12_001):
        h.send(request_id, client=b"flood")
    h.send(99_999, client=b"polite")
    served = []
    while len(served) < 3:
        (token, request_id), = h.requests_to(0)
        served.append(request_id)
        h.answer(0, token, request_id)
    assert 99_999 in served  # within the next round, not after 12,000 requests


def test_one_client_may_hold_half_of_max_pending_by_default():
    h = Harness(workers=1, max_pending=10)
    for request_id in range(1, 8):
        h.send(request_id, client=b"greedy")
    assert sorted(h.answers()) == [6, 7]
    h.send(8, client=b"other")
    assert h.answers() == {} and len(h.pool.pending) == 6


def test_limits_per_client_and_in_bytes_refuse_as_unavailable_and_count():
    h = Harness(workers=1, max_pending=100, max_pending_per_client=3, max_pending_bytes=1024 * 1024)
    for request_id in range(1, 6):
        h.send(request_id, client=b"greedy")
    h.send(6, client=b"other")
    answers = h.answers()
    assert sorted(answers) == [4, 5] and all(s == status("unavailable") for s, _ in answers.values())
    assert b"max_pending_per_client" in answers[4][1]
    h.send(7, client=b"big", records=30_000)  # 30,000 records of 40 bytes and their LSNs: over 1 MiB
    (code, text), = h.answers().values()
    assert code == status("unavailable") and b"max_pending_bytes" in text
    metric = h.pool.metrics.refused_requests
    assert metric.labels(reason="max_pending_per_client")._value.get() == 2
    assert metric.labels(reason="max_pending_bytes")._value.get() == 1
    assert h.pool.budget.requests == 4 and h.pool.budget.clients() == 2


def test_replies_return_what_the_budget_holds():
    h = Harness(workers=1, max_pending=2, max_pending_per_client=2)
    h.ready(0)
    h.send(1), h.send(2)
    for token, request_id in h.requests_to(0):
        h.answer(0, token, request_id)
    h.send(3)
    assert list(h.answers()) == [1, 2]  # 3 is taken: the first two were given back
    assert h.pool.budget.requests == 1


def test_a_reply_to_a_token_the_worker_does_not_hold_is_ignored():
    """A reply with a made-up token (or a second reply) neither reaches a client nor gives the worker credit."""
    h = Harness(workers=1, credit=1)
    h.ready(0, credit=1)
    h.send(1)
    (token, _), = h.requests_to(0)
    h.answer(0, token + 1000, 1)  # forged: nobody's request
    assert h.answers() == {} and h.pool.slots[0].credit == 0 and h.pool.ignored_replies == 1
    h.answer(0, token, 1)
    h.answer(0, token, 1)  # doubled
    assert list(h.answers()) == [1] and h.pool.slots[0].credit == 1 and h.pool.ignored_replies == 2


def test_a_late_reply_to_a_request_answered_as_timeout_returns_the_credit():
    h = Harness(workers=1, credit=1)
    h.ready(0, credit=1)
    h.send(1, timeout_ms=1000)
    (token, _), = h.requests_to(0)
    h.heartbeat(0, busy_until=h.clock.now + 100)  # alive and busy: not declared hung
    h.tick(1.0 + 2.5)
    assert h.answers()[1][0] == status("timeout") and h.pool.slots[0].credit == 0
    h.answer(0, token, 1)
    assert h.answers() == {} and h.pool.slots[0].credit == 1 and h.pool.ignored_replies == 0
