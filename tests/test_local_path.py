"""The local data path (docs/local-data-path.md): clients on this machine talk straight to a worker slot's redo child
over its Unix socket. These tests speak the local protocol itself (walredod.client.local) to a real `walredod serve`:
real records, pipelining, many connections, bad requests answered without a child restart, a child killed or hung
under its clients, and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from records import RM_XACT_ID, XLOG_XACT_COMMIT, fpi_record, make_page, make_record, with_crc
from test_daemon import Daemon, served, wait_until

from conftest import world_traversable_tmpdir
from walredod import protocol
from walredod.client import AsyncRedoClient, RedoClient, local
from walredod.errors import InvalidRequest, RedoTimeout
from walredod.types import BufferTag, WalRecord

STATUS_INVALID = protocol.STATUS_CODES["invalid_request"]


@pytest.fixture(scope="module")
def daemon():
    daemon = Daemon(world_traversable_tmpdir("walredod-local-"), workers=1)
    yield daemon
    daemon.stop()


def local_socket(daemon) -> str:
    body = daemon.client._control(protocol.KIND_DIRECTORY, 10)[1]
    workers = json.loads(body)["workers"]
    assert workers and all(w["local"] for w in workers)
    return workers[0]["local"]


def alive(pid: int) -> bool:
    """Running or sleeping: not gone, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def children(daemon) -> set[int]:
    """The live redo children (active and spare) of the one worker."""
    worker = daemon.wait_ready(1)[0]["pid"]
    found = set()
    for task in Path(f"/proc/{worker}/task").iterdir():
        found |= {int(pid) for pid in (task / "children").read_text().split()}
    return {pid for pid in found if alive(pid)}


def wait_for_children(daemon, count: int = 2, timeout: float = 30) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = children(daemon)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"the worker has {children(daemon)} children")


def expect_page(reply, request_id, expected):
    got_id, status, body = reply
    assert (got_id, status) == (request_id, protocol.STATUS_OK), body[:300]
    assert body == expected


def test_round_trip_with_real_records_matches_postgres_and_zeromq(daemon, real_requests):
    connection = local.LocalConnection(local_socket(daemon))
    for i, (tag, lsn, base, records, expected) in enumerate(real_requests):
        expect_page(connection.request(local.encode_redo(i, tag, lsn, base, records), 30), i, expected)
    connection.close()
    # The ZeroMQ paths give the same pages.
    assert daemon.client.redo_many([r[:4] for r in real_requests[:300]]) == [r[4] for r in real_requests[:300]]


def test_ping(daemon):
    connection = local.LocalConnection(local_socket(daemon))
    assert connection.request(local.encode_ping(99), 10) == (99, protocol.STATUS_OK, b"")
    connection.close()


def test_pipelining_on_one_connection_answers_in_order(daemon, real_requests):
    connection = local.LocalConnection(local_socket(daemon))
    chosen = real_requests[:400]
    connection.send(b"".join(local.encode_redo(1000 + i, *r[:4]) for i, r in enumerate(chosen)))
    replies = []
    deadline = time.monotonic() + 60
    while len(replies) < len(chosen):
        got = connection.read_replies(deadline)
        assert got, "replies stopped"
        replies += got
    for i, (reply, request) in enumerate(zip(replies, chosen, strict=True)):
        expect_page(reply, 1000 + i, request[4])
    connection.close()


def test_several_connections_at_once(daemon, real_requests):
    path = local_socket(daemon)
    failures = []

    def client(offset: int) -> None:
        try:
            connection = local.LocalConnection(path)
            for i in range(offset, len(real_requests), 8):
                tag, lsn, base, records, expected = real_requests[i]
                expect_page(connection.request(local.encode_redo(i, tag, lsn, base, records), 30), i, expected)
            connection.close()
        except Exception as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures


def bad_requests(real_requests, wal_records=None) -> list[tuple[str, bytes, str]]:
    """(what, encoded request, words the error names): each refusable before redo touches anything."""
    tag, lsn, base, records, _ = next(r for r in real_requests if r[3] and r[2] is not None)
    other_tag, _, _, other_records, _ = next(r for r in real_requests
                                             if r[3] and r[0].relation != tag.relation)
    first = records[0]
    corrupt = bytearray(first.data)
    corrupt[-1] ^= 0xFF
    commit = with_crc(make_record(RM_XACT_ID, XLOG_XACT_COMMIT, main_data=struct.pack("<q", 0)))
    good = local.encode_redo(1, tag, lsn, base, records)
    cases = [
        ("bad CRC", local.encode_redo(1, tag, lsn, base, [WalRecord(first.lsn, bytes(corrupt)), *records[1:]]),
         "CRC"),
        ("a transaction record", local.encode_redo(1, tag, lsn, base, [WalRecord(first.lsn, commit)]),
         "does not change relation pages"),
        ("a record of another page", local.encode_redo(1, tag, max(lsn, other_records[0].lsn), base,
                                                       [other_records[0]]), "does not reference the target"),
        ("LSNs out of order", local.encode_redo(1, tag, lsn, base, [WalRecord(lsn + 8, first.data),
                                                                    WalRecord(lsn, first.data)]), "before the record"),
        ("a record after the requested LSN", local.encode_redo(1, tag, first.lsn - 8, base, [first]),
         "after the requested LSN"),
        ("block number MaxBlockNumber", local.encode_redo(1, tag._replace(blkno=0xFFFFFFFF), lsn, base, records),
         "not below"),
        ("fork 9", local.encode_redo(1, tag._replace(forknum=9), lsn, base, records), "fork number 9"),
        ("record shorter than its header", local.encode_redo(1, tag, lsn, base, [WalRecord(lsn, b"x" * 10)]),
         "shorter than a record header"),
        ("xl_tot_len disagrees", local.encode_redo(1, tag, lsn, base, [WalRecord(first.lsn, first.data + b"xx")]),
         "xl_tot_len"),
        ("record count past the body", good[:50] + struct.pack(">I", len(records) + 1) + good[54:],
         "ends before record"),
        ("bytes after the last record", good[:4] + struct.pack(">I", len(good) - 24 + 3) + good[8:] + b"xyz",
         "left over"),
        ("unknown flags", good[:49] + b"\x06" + good[50:], "unknown flags"),
        ("unknown kind", good[:3] + b"\x09" + good[4:], "unknown request kind 9"),
        ("a ping with a body", local.encode_ping(1)[:4] + struct.pack(">I", 3) + local.encode_ping(1)[8:] + b"abc",
         "no body"),
    ]
    return cases


def test_bad_requests_get_error_replies_and_cost_no_restart(daemon, real_requests):
    before = wait_for_children(daemon)
    connection = local.LocalConnection(local_socket(daemon))
    tag, lsn, base, records, expected = real_requests[0]
    for what, encoded, words in bad_requests(real_requests):
        request_id, status, body = connection.request(encoded, 30)
        assert status == STATUS_INVALID, what
        assert words in body.decode(), (what, body)
        # The same connection carries on.
        expect_page(connection.request(local.encode_redo(2, tag, lsn, base, records), 30), 2, expected)
    assert children(daemon) == before
    connection.close()


@pytest.mark.parametrize("what, mangle, status", [
    ("bad magic", lambda r: b"XX" + r[2:], STATUS_INVALID),
    ("version 9", lambda r: r[:2] + b"\x09" + r[3:], protocol.STATUS_CODES["unsupported_version"]),
    ("a body over the limit", lambda r: r[:4] + struct.pack(">I", 1 << 30) + r[8:], STATUS_INVALID),
])
def test_a_request_whose_framing_is_lost_is_answered_then_the_connection_closed(daemon, real_requests, what,
                                                                                mangle, status):
    before = wait_for_children(daemon)
    tag, lsn, base, records, expected = real_requests[0]
    connection = local.LocalConnection(local_socket(daemon))
    connection.send(mangle(local.encode_redo(5, tag, lsn, base, records)))
    replies = connection.read_replies(time.monotonic() + 30)
    assert [r[1] for r in replies] == [status]
    with pytest.raises(local.ConnectionLost):
        connection.read_replies(time.monotonic() + 30)
    assert children(daemon) == before
    # A new connection is served as ever.
    expect_page(local.LocalConnection(local_socket(daemon)).request(
        local.encode_redo(6, tag, lsn, base, records), 30), 6, expected)


def test_a_thousand_bad_requests_interleaved_restart_no_child(daemon, real_requests):
    before = wait_for_children(daemon)
    connection = local.LocalConnection(local_socket(daemon))
    bad = [encoded for _, encoded, _ in bad_requests(real_requests)]
    good = real_requests[:100]
    for i in range(1000):
        assert connection.request(bad[i % len(bad)], 30)[1] == STATUS_INVALID
        if i % 10 == 0:
            tag, lsn, base, records, expected = good[(i // 10) % len(good)]
            expect_page(connection.request(local.encode_redo(i, tag, lsn, base, records), 30), i, expected)
    assert children(daemon) == before


def test_refused_local_requests_are_not_counted_as_served(daemon, real_requests):
    """walredod_worker_requests_served counts requests answered ok, on the local path as on ZeroMQ."""
    connection = local.LocalConnection(local_socket(daemon))
    bad = [encoded for _, encoded, _ in bad_requests(real_requests)]
    tag, lsn, base, records, expected = real_requests[0]
    before = served(daemon)  # once heartbeats (every 0.2 s here) have reported what earlier tests had served
    for _ in range(40):
        time.sleep(0.5)
        if served(daemon) == before:
            break
        before = served(daemon)
    for i in range(50):
        assert connection.request(bad[i % len(bad)], 30)[1] == STATUS_INVALID
    expect_page(connection.request(local.encode_redo(7, tag, lsn, base, records), 30), 7, expected)
    wait_until(lambda: served(daemon) > before, message="a heartbeat with the good request")
    time.sleep(0.5)  # more heartbeats, which would carry any refused request counted
    assert served(daemon) - before < 50
    connection.close()


def test_child_killed_mid_request_ends_its_connections_and_the_spare_serves(daemon, real_requests):
    path = local_socket(daemon)
    victims = wait_for_children(daemon)
    connections = [local.LocalConnection(path) for _ in range(4)]
    chosen = real_requests[:300]
    for connection in connections:
        connection.send(b"".join(local.encode_redo(i, *r[:4]) for i, r in enumerate(chosen)))
    for pid in victims:  # both children: whichever took a connection, it ends
        os.kill(pid, signal.SIGKILL)
    for connection in connections:
        answered = 0
        with pytest.raises(local.ConnectionLost):
            while True:
                replies = connection.read_replies(time.monotonic() + 30)
                assert replies, "neither replies nor the end of the connection"
                for request_id, status, body in replies:  # every reply that came is whole and right
                    expect_page((request_id, status, body), answered, chosen[answered][4])
                    answered += 1
        assert answered < len(chosen)
    # Reconnecting to the same path reaches the children that took over.
    tag, lsn, base, records, expected = real_requests[0]
    expect_page(local.LocalConnection(path).request(local.encode_redo(7, tag, lsn, base, records), 30), 7, expected)
    assert not wait_for_children(daemon) & victims


def long_request(tag: BufferTag, records: int = 50_000) -> tuple[int, list[WalRecord]]:
    """A request that keeps a child inside redo for some milliseconds: many full-page images of one block."""
    image = make_page(0, [b"x" * 40])
    end_lsn = 0x1_0000_0000
    wal = []
    for _ in range(records):
        end_lsn += 8
        wal.append(WalRecord(end_lsn, fpi_record(tag, image, hole=True)))
    return end_lsn, wal


def board_deadline(pid: int) -> int:
    """The busy deadline a child publishes on its board (docs/local-data-path.md), read from its memory."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if "walredod-board" in line:
            with open(f"/proc/{pid}/mem", "rb") as memory:
                memory.seek(int(line.split("-", 1)[0], 16) + 8)
                return struct.unpack("=Q", memory.read(8))[0]
    raise AssertionError(f"child {pid} maps no board")


def test_hung_child_is_killed_at_the_request_deadline(daemon, real_requests):
    """A child stopped (SIGSTOP) inside a local request is killed by its worker once the request's deadline has
    passed: its connection ends within the deadline and the worker's check interval, and the next connection is
    served. (The test stops the children until it catches one inside redo, as its board says.)"""
    path = local_socket(daemon)
    victims = wait_for_children(daemon)
    tag = BufferTag(1663, 5, 6000, 0, 1)
    lsn, records = long_request(tag)
    encoded = local.encode_redo(1, tag, lsn, None, records, timeout_ms=500)
    connection = local.LocalConnection(path)
    done = threading.Event()

    def send() -> None:
        with contextlib.suppress(local.ConnectionLost):
            for _ in range(300):  # unread replies stay below the 4 MiB the child lets pile up
                if done.is_set():
                    return
                connection.send(encoded)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    caught = None
    try:
        give_up = time.monotonic() + 60
        while time.monotonic() < give_up and sender.is_alive():
            for pid in victims:
                os.kill(pid, signal.SIGSTOP)
            busy = [pid for pid in victims if board_deadline(pid)]
            if busy:
                caught = busy[0]
                stopped_at = time.monotonic()
                break
            for pid in victims:
                os.kill(pid, signal.SIGCONT)
            time.sleep(0.002)
        assert caught, "never caught a child inside a request"
        with pytest.raises(local.ConnectionLost):
            while True:
                replies = connection.read_replies(stopped_at + 30)
                assert replies, "the stopped child's connection did not end"
                assert all(status == protocol.STATUS_OK for _, status, _ in replies)
        ended = time.monotonic() - stopped_at
    finally:
        done.set()
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert ended < 10
    tag, lsn, base, records, expected = real_requests[0]
    expect_page(local.LocalConnection(path).request(local.encode_redo(2, tag, lsn, base, records), 30), 2, expected)
    assert caught not in wait_for_children(daemon)


def test_metrics_show_the_local_path(daemon, real_requests):
    connection = local.LocalConnection(local_socket(daemon))
    tag, lsn, base, records, expected = real_requests[0]
    for i in range(20):
        expect_page(connection.request(local.encode_redo(i, tag, lsn, base, records), 30), i, expected)
    assert connection.request(bad_requests(real_requests)[0][1], 30)[1] == STATUS_INVALID
    time.sleep(0.6)  # a heartbeat (0.2 s in these daemons) carries the counters
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10).read().decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line.startswith("walredod_local_")}
    assert values['walredod_local_requests_total{slot="0",status="ok"}'] >= 20
    assert values['walredod_local_requests_total{slot="0",status="invalid_request"}'] >= 1
    assert values['walredod_local_request_seconds_count{slot="0"}'] >= 20
    assert values['walredod_local_connections{slot="0"}'] >= 1


# --- the clients ----------------------------------------------------------------------------------------------------

def local_requests_answered(daemon) -> float:
    """Requests the daemon's children answered on the local data path (every status), from the metrics."""
    time.sleep(0.6)  # counters travel with heartbeats
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("walredod_local_requests_total{"))


def test_clients_take_the_local_path_by_default_and_zeromq_answers_the_same(daemon, real_requests):
    requests, expected = [r[:4] for r in real_requests], [r[4] for r in real_requests]
    before = local_requests_answered(daemon)
    assert daemon.client.redo_many(requests) == expected
    tag, lsn, base, records, page = real_requests[0]
    assert daemon.client.redo(tag, lsn, base, records) == page
    middle = local_requests_answered(daemon)
    assert middle - before >= len(requests) + 1
    with RedoClient(daemon.endpoint, local=False) as zeromq:
        assert zeromq.redo_many(requests) == expected
    assert local_requests_answered(daemon) == middle

    async def run() -> list:
        async with AsyncRedoClient(daemon.endpoint) as client:
            return await client.redo_many(requests[:300])

    assert asyncio.run(run()) == expected[:300]
    assert local_requests_answered(daemon) - middle >= 300


def test_client_bad_request_is_refused_by_the_child_that_stays(daemon, real_requests):
    before = wait_for_children(daemon)
    tag, lsn, base, records, expected = next(r for r in real_requests if r[3])
    damaged = bytearray(records[-1].data)
    damaged[-1] ^= 1
    for _ in range(20):
        with pytest.raises(InvalidRequest, match="CRC"):
            daemon.client.redo(tag, lsn, base, [*records[:-1], WalRecord(records[-1].lsn, bytes(damaged))])
        assert daemon.client.redo(tag, lsn, base, records) == expected
    assert children(daemon) == before


@pytest.mark.parametrize("kind", ["sync", "asyncio"])
def test_client_re_sends_what_a_killed_child_held(daemon, real_requests, kind):
    """Both children killed while a client pipelines real requests on the local path: every request gets exactly
    one answer, the right page (what the lost connections held goes through the supervisor)."""
    victims = wait_for_children(daemon)
    requests, expected = [r[:4] for r in real_requests] * 3, [r[4] for r in real_requests] * 3
    results = []

    def kill_soon() -> None:
        time.sleep(0.05)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    if kind == "sync":
        results = daemon.client.redo_many(requests, return_exceptions=True)
    else:
        async def run() -> list:
            async with AsyncRedoClient(daemon.endpoint, timeout=30) as client:
                return await client.redo_many(requests, return_exceptions=True)

        results = asyncio.run(run())
    killer.join()
    assert len(results) == len(requests)
    assert [r for r in results if isinstance(r, Exception)] == []
    assert results == expected
    assert not wait_for_children(daemon) & victims
    tag, lsn, base, records, page = real_requests[0]
    assert daemon.client.redo(tag, lsn, base, records) == page  # a new connection, to the children now serving


def test_client_gives_up_on_a_stopped_child_at_its_timeout(daemon, real_requests):
    """Children stopped outside any request publish no deadline: the client's own timeout answers RedoTimeout, and
    once they run again the next request is served."""
    victims = wait_for_children(daemon)
    tag, lsn, base, records, expected = real_requests[0]
    with RedoClient(daemon.endpoint) as client:
        assert client.redo(tag, lsn, base, records) == expected  # connected, to one of them
        for pid in victims:
            os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(RedoTimeout):
                client.redo(tag, lsn, base, records, timeout=1.0)
            assert time.monotonic() - started < 10
        finally:
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        assert client.redo(tag, lsn, base, records) == expected


@pytest.mark.parametrize("spin_wait", [0.0, 0.001], ids=["sleeps-at-once", "spins-first"])
@pytest.mark.parametrize("delay", [0.0, 0.05], ids=["reply-waiting", "reply-after-the-spin"])
def test_a_connection_reads_replies_whether_or_not_it_spins(tmp_path, spin_wait, delay):
    """A blocking connection polls without sleeping for its spin wait, then sleeps: a reply that is already there,
    or comes only after the spin wait, is read either way; a child's closing is seen either way."""
    path = str(tmp_path / "slot.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    connection = local.LocalConnection(path, spin_wait=spin_wait)
    child_side, _ = listener.accept()
    reply = local.REPLY_HEADER.pack(local.MAGIC, local.VERSION, protocol.STATUS_OK, 4, 7) + b"page"

    def answer():
        time.sleep(delay)
        child_side.sendall(reply)
        time.sleep(delay)
        child_side.close()

    answering = threading.Thread(target=answer)
    answering.start()
    try:
        assert connection.read_replies(time.monotonic() + 10) == [(7, protocol.STATUS_OK, b"page")]
        with pytest.raises(local.ConnectionLost, match="closed the connection"):
            connection.read_replies(time.monotonic() + 10)
    finally:
        answering.join()
        connection.close()
        listener.close()


def test_replies_split_or_joined_across_receives_are_read_whole(tmp_path):
    """Replies arrive as the stream delivers them: one cut in three pieces, then two in one piece with the start of
    a third; each is read whole, in order, and the piece of the third is kept for it."""
    path = str(tmp_path / "slot.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    connection = local.LocalConnection(path)
    child_side, _ = listener.accept()

    def reply(request_id: int, body: bytes) -> bytes:
        return local.REPLY_HEADER.pack(local.MAGIC, local.VERSION, protocol.STATUS_OK, len(body), request_id) + body

    pages = [bytes([i]) * 8192 for i in range(4)]
    first, second, third = reply(1, pages[1]), reply(2, pages[2]), reply(3, pages[3])
    try:
        for piece in (first[:10], first[10:5000]):
            child_side.sendall(piece)
            time.sleep(0.02)
            assert connection.receive_now() == []
        child_side.sendall(first[5000:])
        assert connection.read_replies(time.monotonic() + 10) == [(1, protocol.STATUS_OK, pages[1])]
        child_side.sendall(second + third[:100])
        assert connection.read_replies(time.monotonic() + 10) == [(2, protocol.STATUS_OK, pages[2])]
        child_side.sendall(third[100:])
        assert connection.read_replies(time.monotonic() + 10) == [(3, protocol.STATUS_OK, pages[3])]
    finally:
        child_side.close()
        connection.close()
        listener.close()


def test_a_batch_cut_off_past_its_deadline_keeps_the_answers_it_had():
    """A connection that ends after part of a batch was answered, past the batch's deadline: the answered requests
    keep their pages, only the rest get RedoTimeout (docs/local-data-path.md: what was answered is answered)."""
    from types import SimpleNamespace

    from walredod.client.local_link import _Ledger
    from walredod.errors import RedoTimeout

    flight = SimpleNamespace(message_id=9, members={1: None, 2: None, 3: None}, sent_at=time.monotonic() - 10,
                             timeout=1.0)
    ledger, events = _Ledger(), []
    ledger.sent(flight)
    assert ledger.answered([(1, protocol.STATUS_OK, b"page one")], events) and events == []
    ledger.lost(events, "slot.sock")
    [(message_id, answers)] = events
    assert message_id == 9 and [request_id for request_id, _ in answers] == [1, 2, 3]
    assert answers[0] == (1, b"page one")
    assert all(isinstance(result, RedoTimeout) for _, result in answers[1:])
