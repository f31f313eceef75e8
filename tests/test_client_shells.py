"""The sync and asyncio clients' shells over the core, against a stand-in daemon (two ROUTER sockets in a thread):
what reaches the workers' endpoint and the supervisor's, batches and re-sends included."""

from __future__ import annotations

import asyncio
import json
import struct
import threading

import pytest
import zmq

from walredod import protocol
from walredod.client import AsyncRedoClient, RedoClient
from walredod.errors import RedoTimeout, Unavailable
from walredod.types import BufferTag, WalRecord


class StandIn:
    """A supervisor that answers directory requests and redo requests, and one worker; both answer each request
    with its block number (8 bytes), and count the messages they got by kind."""

    def __init__(self, directory: str):
        self.supervisor_endpoint = f"ipc://{directory}/sup.sock"
        self.worker_endpoint = f"ipc://{directory}/w-0.sock"
        self.worker_pids = [100]  # the pid each directory lists in turn (the last one from then on)
        self.worker_answers = True
        self.kinds = {"supervisor": [], "worker": []}
        self._context = zmq.Context()
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._bound.wait(10)

    def _serve(self) -> None:
        sockets = {}
        for name, endpoint in (("supervisor", self.supervisor_endpoint), ("worker", self.worker_endpoint)):
            sock = self._context.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(endpoint)
            sockets[sock] = name
        self._bound.set()
        poller = zmq.Poller()
        for sock in sockets:
            poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _event in poller.poll(50):
                identity, *frames = sock.recv_multipart()
                reply = self._answer(sockets[sock], frames)
                if reply is not None:
                    sock.send_multipart([identity, *reply])
        for sock in sockets:
            sock.close(linger=0)

    def _answer(self, name: str, frames: list):
        request = protocol.decode_request(frames)
        self.kinds[name].append(request.kind)
        if request.kind == protocol.KIND_DIRECTORY:
            return protocol.encode_reply(request.request_id, json.dumps({"direct": True, "spill_factor": 0.25,
                "workers": [{"slot": 0, "pid": self._next_pid(), "endpoint": self.worker_endpoint,
                             "ready": True}]}).encode())
        if name == "worker" and not self.worker_answers:
            return None
        if request.kind == protocol.KIND_BATCH:
            parts = [protocol.decode_request(part) for part in request.batch]
            return protocol.encode_batch_reply(request.request_id, [
                protocol.encode_reply(p.request_id, struct.pack(">Q", p.tag.blkno)) for p in parts])
        return protocol.encode_reply(request.request_id, struct.pack(">Q", request.tag.blkno))

    def _next_pid(self) -> int:
        return self.worker_pids.pop(0) if len(self.worker_pids) > 1 else self.worker_pids[0]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._context.term()


@pytest.fixture
def stand_in(tmp_path):
    daemon = StandIn(str(tmp_path))
    yield daemon
    daemon.stop()


def requests(count: int) -> list:
    return [(BufferTag(1663, 5, 16384, 0, block), 100, None, [WalRecord(90, b"r" * 30)]) for block in range(count)]


def pages(count: int) -> list:
    return [struct.pack(">Q", block) for block in range(count)]


def test_sync_client_batches_for_a_worker(stand_in):
    with RedoClient(stand_in.supervisor_endpoint, timeout=30) as client:
        assert client.redo_many(requests(40)) == pages(40)
    assert stand_in.kinds["supervisor"] == [protocol.KIND_DIRECTORY]
    assert stand_in.kinds["worker"] == [protocol.KIND_BATCH] * 3  # 16 + 16 + 8


def test_async_client_batches_concurrent_calls(stand_in):
    async def run():
        async with AsyncRedoClient(stand_in.supervisor_endpoint, timeout=30) as client:
            single = await client.redo(*requests(1)[0])
            together = await asyncio.gather(*(client.redo(*r) for r in requests(32)))
            many = await client.redo_many(requests(20))
            return single, together, many

    single, together, many = asyncio.run(run())
    assert (single, together, many) == (pages(1)[0], pages(32), pages(20))
    assert stand_in.kinds["worker"] == [protocol.KIND_REDO] + [protocol.KIND_BATCH] * 4  # 16 + 16, 16 + 4


@pytest.mark.parametrize("client_kind", ["sync", "async"])
def test_requests_on_a_replaced_worker_are_re_sent_through_the_supervisor(stand_in, client_kind):
    stand_in.worker_answers = False  # it took the requests and died
    stand_in.worker_pids = [100, 200]  # the next directory lists its successor

    def load():
        if client_kind == "sync":
            with RedoClient(stand_in.supervisor_endpoint, timeout=30) as client:
                return client.redo_many(requests(20))

        async def run():
            async with AsyncRedoClient(stand_in.supervisor_endpoint, timeout=30) as client:
                return await client.redo_many(requests(20))

        return asyncio.run(run())

    assert load() == pages(20)
    assert protocol.KIND_BATCH in stand_in.kinds["worker"]  # sent straight to the worker first
    assert stand_in.kinds["supervisor"].count(protocol.KIND_BATCH) == stand_in.kinds["worker"].count(
        protocol.KIND_BATCH)  # then every batch again, whole, through the supervisor


@pytest.mark.parametrize("client_kind", ["sync", "async"])
def test_no_reply_at_all_gives_redo_timeout(stand_in, client_kind):
    stand_in.worker_answers = False  # and the supervisor keeps listing it: nothing is re-sent

    def load():
        if client_kind == "sync":
            with RedoClient(stand_in.supervisor_endpoint, timeout=0.2) as client:
                return client.redo_many(requests(3), return_exceptions=True)

        async def run():
            async with AsyncRedoClient(stand_in.supervisor_endpoint, timeout=0.2) as client:
                return await client.redo_many(requests(3), return_exceptions=True)

        return asyncio.run(run())

    results = load()
    assert len(results) == 3 and all(isinstance(r, RedoTimeout) for r in results)


def test_closing_the_async_client_answers_its_waiting_callers(stand_in):
    stand_in.worker_answers = False

    async def run():
        client = AsyncRedoClient(stand_in.supervisor_endpoint, timeout=30)
        waiting = asyncio.ensure_future(client.redo_many(requests(3)))
        while protocol.KIND_BATCH not in stand_in.kinds["worker"]:
            await asyncio.sleep(0.01)
        await client.close()
        with pytest.raises(Unavailable, match="closed"):
            await waiting

    asyncio.run(asyncio.wait_for(run(), 30))
