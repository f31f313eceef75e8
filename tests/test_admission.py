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
    assert "max_pending_per_client" in budget.refusal("a", 10)
    assert "max_pending_bytes" in budget.refusal("b", 300)
    assert budget.refusal("b", 200) is None
    budget.take("b", 200)
    assert "max_pending)" in budget.refusal("c", 1)
    budget.give_back("a", 400)
    assert budget.refusal("c", 1) is None
    budget.give_back("a", 400)
    budget.give_back("b", 200)
    assert budget.requests == budget.bytes == budget.clients() == 0
