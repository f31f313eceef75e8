"""A request's deadline covers all the work on it: decoding, checks and encoding count, not only the redo child's
answer (docs/client-protocol.md, "Timeouts"). Slow steps are made slow on purpose (a sleep far longer than the
timeout), so the outcome does not depend on the machine's speed."""

from __future__ import annotations

import time

import pytest
from records import expected_after_fpi, fpi_record, make_page

from walredod import protocol
from walredod.daemon import worker as worker_module
from walredod.daemon.worker import RequestServer
from walredod.engine import RedoEngine
from walredod.engine import engine as engine_module
from walredod.errors import RedoTimeout
from walredod.native import synthesized
from walredod.native.rebuild import rebuild_object, rebuild_visibility_map_page
from walredod.objects import SlruKind, SlruPageTag
from walredod.types import BufferTag, ForkNumber, WalRecord

TAG = BufferTag(1663, 5, 24000, ForkNumber.MAIN, 3)
END_LSN = 0x5_0000_0028
IMAGE = make_page(0x11, [b"tuple" * 9])
STALL = 0.05  # seconds a slowed step takes: ten times the timeouts below
TIMEOUT_MS = 5


@pytest.fixture(scope="module")
def engine(engine_data_dir):
    with RedoEngine(data_dir=engine_data_dir, keep_spare=False) as engine:
        yield engine


def slowed(function, stall: float = STALL):
    def slow(*args, **kwargs):
        time.sleep(stall)
        return function(*args, **kwargs)
    return slow


def request_frames(timeout_ms: int, request_id: int = 7) -> list:
    frames = protocol.encode_redo_request(request_id, TAG, END_LSN, None, [WalRecord(END_LSN, fpi_record(TAG, IMAGE))],
                                          timeout_ms)
    return [memoryview(f) if isinstance(f, bytes) else f for f in frames]


def status_of(reply: list) -> tuple[int, bytes]:
    request_id, status, body = protocol.decode_reply(reply)
    return status, bytes(body)


def test_engine_counts_encoding_against_the_timeout(engine, monkeypatch):
    """Encoding that outlasts the timeout: RedoTimeout, and the child, which never saw the request, is kept."""
    child = engine.child_pid
    monkeypatch.setattr(engine_module, "encode_request", slowed(engine_module.encode_request))
    with pytest.raises(RedoTimeout, match="before its records reached the redo child"):
        engine.redo(TAG, END_LSN, None, [WalRecord(END_LSN, fpi_record(TAG, IMAGE))], timeout=TIMEOUT_MS / 1000)
    monkeypatch.undo()
    assert engine.child_pid == child
    assert engine.redo(TAG, END_LSN, None, [WalRecord(END_LSN, fpi_record(TAG, IMAGE))]) == expected_after_fpi(
        IMAGE, END_LSN)


def test_engine_honours_an_absolute_deadline(engine):
    with pytest.raises(RedoTimeout):
        engine.redo(TAG, END_LSN, None, [], deadline=time.monotonic() - 1)


def test_direct_request_deadline_runs_from_when_the_worker_takes_it(engine, monkeypatch):
    """On the direct path the worker's deadline starts before decoding: a decode that outlasts the request's
    timeout makes the answer `timeout`, not a page delivered long after it."""
    server = RequestServer(engine, "test")
    assert status_of(server.serve(request_frames(60_000), None))[0] == protocol.STATUS_OK
    monkeypatch.setattr(worker_module.protocol, "decode_request", slowed(protocol.decode_request))
    status, message = status_of(server.serve(request_frames(TIMEOUT_MS), None))
    assert protocol.STATUS_NAMES[status] == "timeout", message


def test_batch_shares_one_deadline(engine, monkeypatch):
    """The second request of a batch starts after the first used up the batch's time: it is answered `timeout`."""
    server = RequestServer(engine, "test")
    monkeypatch.setattr(engine_module, "encode_request", slowed(engine_module.encode_request, 0.5))
    batch = protocol.encode_batch(99, [request_frames(0, 1), request_frames(0, 2)], timeout_ms=750)
    answers = protocol.decode_batch_reply(server.serve([memoryview(f) for f in batch], None))
    assert [(request_id, protocol.STATUS_NAMES.get(status, "ok")) for request_id, status, _ in answers] == [
        (1, "ok"), (2, "timeout")]


def test_supervisor_path_deadline_passed_before_the_worker_starts(engine):
    server = RequestServer(engine, "test")
    status, _ = status_of(server.serve(request_frames(0), time.monotonic() - 0.001))
    assert protocol.STATUS_NAMES[status] == "timeout"


def test_records_applied_in_python_stop_at_the_deadline():
    tag = SlruPageTag(SlruKind.CLOG, 0)
    records = [WalRecord(END_LSN, synthesized.encode(synthesized.SetClogStatus((xid,), 1))) for xid in range(3, 50)]
    assert rebuild_object(tag, None, records, deadline=time.monotonic() + 60) is not None
    with pytest.raises(RedoTimeout):
        rebuild_object(tag, None, records, deadline=time.monotonic() - 1)
    vm_tag = TAG._replace(forknum=ForkNumber.VISIBILITYMAP, blkno=0)
    clear = WalRecord(END_LSN, synthesized.encode(synthesized.ClearVisibilityMapFlags((5,), 3)))
    with pytest.raises(RedoTimeout):
        rebuild_visibility_map_page(None, vm_tag, END_LSN, None, [clear], deadline=time.monotonic() - 1)
