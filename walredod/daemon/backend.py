"""The backend wire format: messages between the supervisor (a ROUTER) and its workers (DEALERs).

Both sides import this module; neither builds or parses these frames by hand. After the ROUTER's routing identity,
the first frame is the command:

- supervisor -> worker: ``REQ token deadline frames...`` (a client's request from its header frame on) | ``HB`` |
  ``STOP``
- worker -> supervisor: ``READY slot pid child_pid credit`` | ``HB requests child_pid restarts busy_until
  [local_stats]`` | ``REP token reply_header body...``

``token`` is the supervisor's own 8-byte name for an accepted request (client request ids may collide across
clients). ``deadline`` is CLOCK_MONOTONIC seconds as a double: one clock for every process on the machine.
``busy_until`` is how long the worker may be silent: the latest deadline of the direct requests it has taken
(0 once it has been idle a whole interval).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from walredod.engine.board import NUM_LATENCY_BUCKETS

READY, HEARTBEAT, REQUEST, REPLY, STOP = b"READY", b"HB", b"REQ", b"REP", b"STOP"

_READY = struct.Struct(">IIII")  # slot, pid, child pid, credit
_HEARTBEAT = struct.Struct(">QIId")  # requests served, child pid, child restarts, busy until
_DEADLINE = struct.Struct(">d")
_TOKEN = struct.Struct(">Q")


@dataclass(frozen=True, slots=True)
class Ready:
    slot: int
    pid: int
    child_pid: int
    credit: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    served: int
    child_pid: int
    child_restarts: int
    busy_until: float


# --- worker -> supervisor -----------------------------------------------------------------------------------------

def encode_ready(slot: int, pid: int, child_pid: int, credit: int) -> list:
    return [READY, _READY.pack(slot, pid, child_pid, credit)]


def encode_heartbeat(served: int, child_pid: int, child_restarts: int, busy_until: float,
                     local_stats: bytes | None = None) -> list:
    frames = [HEARTBEAT, _HEARTBEAT.pack(served, child_pid, child_restarts, busy_until)]
    if local_stats is not None:
        frames.append(local_stats)  # encode_local_stats
    return frames


def encode_reply(token_frame, reply_frames: list) -> list:
    """``reply_frames`` as the client protocol encodes a reply, delimiter first (dropped here: the supervisor adds
    the client's own). ``token_frame`` is the token as the supervisor sent it."""
    return [REPLY, token_frame, *reply_frames[1:]]


def decode_ready(body) -> Ready:
    return Ready(*_READY.unpack(body))


def decode_heartbeat(body) -> Heartbeat:
    return Heartbeat(*_HEARTBEAT.unpack(body))


def decode_token(frame) -> int:
    return _TOKEN.unpack(frame)[0]


# --- supervisor -> worker -----------------------------------------------------------------------------------------

def encode_request(token: int, deadline: float, request_frames: list) -> list:
    """``request_frames``: the client's frames from its header on (no delimiter), passed on without copies."""
    return [REQUEST, _TOKEN.pack(token), _DEADLINE.pack(deadline), *request_frames]


def encode_heartbeat_probe() -> list:
    """Asks an idle worker to show it is alive (it answers with a heartbeat)."""
    return [HEARTBEAT]


def encode_stop() -> list:
    return [STOP]


def decode_request(frames: list) -> tuple[object, float, list]:
    """``frames`` from the command on: (token frame, deadline, the request's frames with a delimiter first, as the
    client protocol's decoder expects them)."""
    return frames[1], _DEADLINE.unpack(frames[2])[0], [b"", *frames[3:]]


# --- the local data path's counters, in a worker's heartbeat ------------------------------------------------------

_LOCAL_FIELDS = ("requests_ok", "requests_refused", "requests_internal", "connections_dropped", "records",
                 "connections_accepted", "connections_open", "latency_sum_ns", "deadline_kills")
_LOCAL_BUCKETS = NUM_LATENCY_BUCKETS
_LOCAL = struct.Struct(f">{len(_LOCAL_FIELDS) + _LOCAL_BUCKETS}Q")


@dataclass(frozen=True, slots=True)
class LocalStats:
    """What a worker's redo children served on the local data path since the worker started (walredod.engine.board
    has the meaning of each; ``latency_buckets`` are per bucket, not cumulative, the last one +Inf)."""

    requests_ok: int
    requests_refused: int
    requests_internal: int
    connections_dropped: int
    records: int
    connections_accepted: int
    connections_open: int
    latency_sum_ns: int
    deadline_kills: int
    latency_buckets: tuple[int, ...]


def encode_local_stats(counters) -> bytes:
    """``counters``: a walredod.engine.board.LocalCounters. Sent as one more frame after a heartbeat's body."""
    return _LOCAL.pack(*(getattr(counters, name) for name in _LOCAL_FIELDS), *counters.latency_buckets)


def decode_local_stats(body) -> LocalStats:
    values = _LOCAL.unpack(body)
    count = len(_LOCAL_FIELDS)
    return LocalStats(*values[:count], tuple(values[count:]))
