"""Units with no processes: relation routing, the client wire format, configuration."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

import zmq

from walredod import protocol
from walredod.config import ConfigError, load_settings
from walredod.errors import InvalidRequest, UnsupportedVersion
from walredod.daemon.routing import Router, rank_slots
from walredod.objects import RelMapTag, SlruPageTag
from walredod.pg15 import MAX_BLOCK_NUMBER
from walredod.types import BLCKSZ, BufferTag, WalRecord

relations = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))


@given(relations, st.integers(2, 16))
def test_removing_a_slot_moves_only_its_relations(relation, count):
    slots = list(range(count))
    first = rank_slots(relation, slots)[0]
    gone = (first + 1) % count  # some other slot leaves
    assert rank_slots(relation, [s for s in slots if s != gone])[0] == first


def test_relations_spread_over_slots():
    chosen = [rank_slots((1663, 5, rel), range(4))[0] for rel in range(4000)]
    assert all(800 < chosen.count(slot) < 1200 for slot in range(4))


@given(st.lists(st.integers(0, 50), min_size=2, max_size=8), relations, st.floats(0, 2))
@settings(max_examples=200)
def test_bounded_load(loads, relation, spill):
    router = Router(spill)
    slots = list(range(len(loads)))
    chosen = router.choose(relation, slots, lambda s: loads[s], lambda s: True)
    bound = max(1, math.ceil((1 + spill) * (sum(loads) + 1) / len(slots)))
    if any(load < bound for load in loads):
        assert loads[chosen] < bound  # never past the bound while some worker is under it
    preferred = rank_slots(relation, slots)[0]
    if loads[preferred] < bound:
        assert chosen == preferred  # under the bound, a relation stays home


def test_only_slots_with_credit_are_chosen():
    router = Router(0.25)
    assert router.choose((1, 2, 3), [0, 1], lambda s: 0, lambda s: s == 1) == 1
    assert router.choose((1, 2, 3), [0, 1], lambda s: 0, lambda s: False) is None


tags = st.builds(BufferTag, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                 st.integers(0, 3), st.integers(0, MAX_BLOCK_NUMBER - 1))
records = st.lists(st.tuples(st.integers(0, 2**64 - 1), st.binary(min_size=24, max_size=200)), max_size=20)


@given(st.integers(0, 2**64 - 1), tags, st.integers(0, 2**64 - 1), st.booleans(), records, st.integers(0, 2**32 - 1))
def test_request_round_trip(request_id, tag, lsn, with_base, recs, timeout_ms):
    base = bytes(range(256)) * 32 if with_base else None
    frames = protocol.encode_redo_request(request_id, tag, lsn, base, [WalRecord(*r) for r in recs], timeout_ms)
    decoded = protocol.decode_request(frames)
    assert (decoded.request_id, decoded.tag, decoded.lsn, decoded.timeout_ms) == (request_id, tag, lsn, timeout_ms)
    assert decoded.base_image == base
    assert [(r.lsn, bytes(r.data)) for r in decoded.records] == recs


def test_send_frames_keeps_every_frame(tmp_path):
    """Our cheaper send: frames arrive as sent, small (copied) and large (zero-copy) alike."""
    context = zmq.Context()
    receiver, sender = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    receiver.bind(f"ipc://{tmp_path}/s.sock")
    sender.connect(f"ipc://{tmp_path}/s.sock")
    frames = [b"", b"header", bytes(range(256)) * 32, memoryview(b"x" * 100_000), b"last"]
    protocol.send_frames(sender, frames)
    assert receiver.poll(5000)
    assert receiver.recv_multipart() == [bytes(f) for f in frames]
    context.destroy(linger=0)


def test_reply_round_trip():
    assert protocol.decode_reply(protocol.encode_reply(5, b"p" * BLCKSZ)) == (5, 0, b"p" * BLCKSZ)
    request_id, status, message = protocol.decode_reply(protocol.encode_error(6, UnsupportedVersion("v9")))
    error = protocol.error_for(status, message)
    assert request_id == 6 and isinstance(error, UnsupportedVersion) and str(error) == "v9"


def test_unknown_kind_and_object():
    frames = protocol.encode_redo_request(1, BufferTag(1, 2, 3, 0, 4), 10, None, [])
    for offset, value, message in ((3, b"\x09", "unknown request kind"), (24, b"\x05", "unknown object kind"),
                                   (25, b"\x04", "fork number must be 0 to 3"),
                                   (38, MAX_BLOCK_NUMBER.to_bytes(4, "big"), "block number must be below")):
        header = bytearray(frames[1])
        header[offset:offset + len(value)] = value
        with pytest.raises(InvalidRequest, match=message):
            protocol.decode_request([frames[0], bytes(header), *frames[2:]])


def test_batch_round_trip_and_malformed_batches():
    tag = BufferTag(1663, 5, 16384, 0, 7)
    requests = [protocol.encode_redo_request(i, tag, 100 + i, None if i % 2 else bytes(BLCKSZ),
                                             [WalRecord(90, b"r" * 30)] * i) for i in range(4)]
    frames = protocol.encode_batch(99, requests, timeout_ms=500)
    batch = protocol.decode_request(frames)
    assert (batch.kind, batch.request_id, batch.timeout_ms, batch.tag) == (protocol.KIND_BATCH, 99, 500, tag)
    assert [protocol.decode_request(part) for part in batch.batch] == [protocol.decode_request(r) for r in requests]

    replies = [protocol.encode_reply(0, b"page"), protocol.encode_error(1, InvalidRequest("bad"))]
    decoded = protocol.decode_batch_reply(protocol.encode_batch_reply(99, replies))
    assert [(i, status) for i, status, _ in decoded] == [(0, protocol.STATUS_OK), (1, 1)]

    header = frames[1]
    for broken, message in (
            ([b"", header], "no requests"),
            ([b"", header, *requests[2][1:-1]], "LSN frame holds 2 LSNs but only 1"),
            ([b"", header, requests[0][1], requests[0][2]], "cut short"),
            ([b"", header, protocol.encode_control(3)[1], b"", b""], "not a redo request"),
            ([b"", header, *(requests[0][1:] * (protocol.MAX_BATCH + 1))], "more than"),
    ):
        with pytest.raises(InvalidRequest, match=message):
            protocol.decode_request(broken)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "walredod.toml"
    path.write_text('[daemon]\nworkers = 3\nendpoints = ["tcp://127.0.0.1:5555"]\n[engine]\nrequest_timeout = 5\n')
    settings = load_settings(path, {"daemon.workers": 7})
    assert settings.daemon.workers == 7 and settings.daemon.endpoints == ["tcp://127.0.0.1:5555"]
    assert settings.engine.request_timeout == 5


@pytest.mark.parametrize("text, message", [
    ("[daemon]\nworkers = 'many'\n", "daemon.workers"),
    ("[daemon]\nspill_factor = -1\n", "daemon.spill_factor"),
    ("[engine]\nkind = 'oracle'\n", "engine.kind"),
    ("[engnie]\n", "engnie"),
    ("[daemon\n", "not valid TOML"),
])
def test_config_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(path)


def test_shipped_config_file_is_valid():
    from pathlib import Path

    load_settings(Path(__file__).resolve().parent.parent / "config" / "walredod.toml")


def test_a_batch_weighs_its_requests():
    """What is being placed counts in the average: one request spills off a worker a batch of eight still fits."""
    relation = (1663, 5, 16384)
    home, other = rank_slots(relation, [0, 1])
    loads = {home: 3, other: 0}
    router = Router(0.25)
    assert router.choose(relation, [0, 1], loads.get, lambda s: True) == other  # bound ceil(1.25 x 4 / 2) = 3
    assert router.choose(relation, [0, 1], loads.get, lambda s: True, weight=8) == home  # bound 7


def test_request_ids_of_malformed_messages():
    """The id comes back whenever the second frame starts with the magic and reaches past the id."""
    header = protocol.encode_control(77)[1]
    assert protocol.peek_request_id([b"", header[:40]]) == 77
    assert protocol.peek_request_id([b"", header[:12]]) == 77
    assert protocol.peek_request_id([b"not empty", header]) == 77
    assert protocol.peek_request_id([b"", header[:11]]) is None
    assert protocol.peek_request_id([b"", b"XR" + header[2:]]) is None
    assert protocol.peek_request_id([b""]) is None


def test_checks_run_in_the_documented_order():
    """Magic, then version, then the header's size (docs/client-protocol.md, "How the daemon checks a request")."""
    header = protocol.encode_control(5)[1]
    wrong_version = header[:2] + bytes([9]) + header[3:]
    with pytest.raises(InvalidRequest, match="magic") as caught:
        protocol.decode_request([b"", b"XR" + wrong_version[2:40]])
    assert not isinstance(caught.value, UnsupportedVersion)
    with pytest.raises(UnsupportedVersion):
        protocol.decode_request([b"", wrong_version[:12]])
    with pytest.raises(InvalidRequest, match="12 bytes, expected 42"):
        protocol.decode_request([b"", header[:12]])  # a ping is a whole header too
    with pytest.raises(InvalidRequest, match="only the header frame"):
        protocol.decode_request([b"", header, b""])
    with pytest.raises(ValueError):
        protocol.encode_control(1, protocol.KIND_REDO)
    for kind in protocol.CONTROL_KINDS:
        assert protocol.decode_request(protocol.encode_control(6, kind)).kind == kind


@pytest.mark.parametrize("record, message", [
    (b"WRSY\x01\x00" + bytes(4), "flags 0 are not 1, 2 or 3"),
    (b"WRSY\x01\x04" + bytes(4), "flags 4"),
    (b"WRSY\x01\x03" + bytes(5), "malformed"),
    (b"WRSY\x03\x03" + bytes(4), "status 3 is not 1 or 2"),
    (b"WRSY\x05" + bytes(4 + 8 + 3), "not an offset and whole"),
    (b"WRSY\x04" + bytes(9), "malformed"),
])
def test_synthesized_records_refuse_what_they_do_not_define(record, message):
    from walredod.native import synthesized

    with pytest.raises(InvalidRequest, match=message):
        synthesized.decode(record)


@pytest.mark.parametrize("tag, image, message", [
    (BufferTag(1663, 5, 16384, 4, 0), None, "fork number must be 0 to 3"),
    (BufferTag(1663, 5, 2**32, 0, 0), None, "unsigned 32-bit"),
    (BufferTag(1663, 5, 16384, 0, MAX_BLOCK_NUMBER), None, "block number must be below"),
    (BufferTag(1663, 5, 16384, 0, 0), bytes(100), "base image is 100 bytes, a page is 8192"),
    (SlruPageTag(3, 0), None, "SLRU kind 3 is not 0 to 2"),
    (RelMapTag(1663, 5), bytes(8192), "base image is 8192 bytes, a relation-map file is 512"),
    ((1663, 5, 16384, 0, 0), None, "tuple is not a page or object"),
])
def test_one_check_of_tags_and_base_images(tag, image, message):
    """The client, the protocol decoder, the engine and the Python redo all refuse with the same check."""
    from walredod.client.core import check_request
    from walredod.native.rebuild import rebuild_object
    from walredod.objects import TwoPhaseTag, check_base_image, check_tag

    with pytest.raises(InvalidRequest, match=message):
        check_tag(tag)
        check_base_image(tag, image)
    with pytest.raises(InvalidRequest, match=message):
        check_request(tag, image)
    if isinstance(tag, (SlruPageTag, RelMapTag, TwoPhaseTag)) and image is not None:
        with pytest.raises(InvalidRequest, match=message):
            rebuild_object(tag, image, [])
