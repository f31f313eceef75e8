"""A worker process: one redo engine behind a DEALER socket on the supervisor's backend.

The supervisor starts each worker as ``python -m walredod.worker`` (a fresh interpreter: ZeroMQ contexts do not
survive fork). The worker announces itself READY with its credit, then serves requests in arrival order and
heartbeats when idle. It dies with the supervisor (PR_SET_PDEATHSIG), and its redo children die with it (they see end
of file on their stdin).

Backend messages (first frame after the routing identity is the command):

- supervisor -> worker: ``REQ token deadline frames...`` | ``HB`` | ``STOP``
- worker -> supervisor: ``READY slot pid child_pid credit`` | ``HB requests child_pid restarts`` |
  ``REP token reply_header body``
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import struct
import sys
import time

import zmq

from walredod import protocol
from walredod.config import EngineSettings
from walredod.engine import RedoEngine
from walredod.errors import InvalidRequest, PoisonRequest, RedoFailed, RedoTimeout, WalredodError
from walredod.native import synthesized
from walredod.native.rebuild import rebuild_object, rebuild_visibility_map_page
from walredod.types import BufferTag, ForkNumber

log = logging.getLogger("walredod.worker")

READY, HEARTBEAT, REQUEST, REPLY, STOP = b"READY", b"HB", b"REQ", b"REP", b"STOP"
READY_BODY = struct.Struct(">IIII")  # slot, pid, child pid, credit
HEARTBEAT_BODY = struct.Struct(">QII")  # requests served, child pid, child restarts
DEADLINE = struct.Struct(">d")  # CLOCK_MONOTONIC seconds: one clock for every process on the machine
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to kill us when the supervisor dies, even by SIGKILL."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


class Worker:
    def __init__(self, slot: int, backend: str, engine_settings: EngineSettings, credit: int,
                 heartbeat_interval: float):
        self.slot = slot
        self.credit = credit
        self.heartbeat_interval = heartbeat_interval
        self.requests = 0
        self._reported_child: int | None = None
        self.engine = RedoEngine(engine_settings, name=f"worker-{slot}")
        self.context = zmq.Context(1)
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.setsockopt(zmq.IDENTITY, f"w{slot}.{os.getpid()}".encode())
        self.socket.connect(backend)

    def run(self) -> None:
        send = self.socket.send_multipart
        recv = self.socket.recv_multipart
        send([READY, READY_BODY.pack(self.slot, os.getpid(), self.engine.child_pid or 0, self.credit)])
        last_sent = time.monotonic()
        while True:
            if not self.socket.poll(0):
                self.engine.start_spare()  # idle: replace a spare used up by a takeover
                if not self.socket.poll(self.heartbeat_interval * 1000):
                    send([HEARTBEAT, self._heartbeat_body()])
                    last_sent = time.monotonic()
                    continue
            frames = recv(copy=False)
            command = frames[0].bytes
            if command == REQUEST:
                token = frames[1].bytes
                deadline = DEADLINE.unpack(frames[2].buffer)[0]
                reply = self.serve([b"", *(f.buffer for f in frames[3:])], deadline)
                send([REPLY, token, *reply[1:]], copy=False)
                last_sent = time.monotonic()
            elif command == STOP:
                return
            child_changed = self.engine.child_pid != self._reported_child
            if child_changed or time.monotonic() - last_sent >= self.heartbeat_interval:
                send([HEARTBEAT, self._heartbeat_body()])
                last_sent = time.monotonic()

    def _heartbeat_body(self) -> bytes:
        restarts = sum(self.engine.stats.restarts.values())
        self._reported_child = self.engine.child_pid
        return HEARTBEAT_BODY.pack(self.requests, self.engine.child_pid or 0, restarts)

    def serve(self, frames: list, deadline: float) -> list:
        """One request's reply frames: the page, or a typed error."""
        request_id = protocol.peek_request_id(frames) or 0
        try:
            request = protocol.decode_request(frames)
            page = self.redo(request, deadline)
        except WalredodError as error:
            return protocol.encode_error(request_id, error)
        except Exception as error:  # a bug of ours: answer it, keep serving
            log.exception("worker %d: request %d failed", self.slot, request_id)
            return protocol.encode_error(request_id, WalredodError(f"internal error: {error!r}"))
        self.requests += 1
        return protocol.encode_reply(request.request_id, page)

    def redo(self, request: protocol.Request, deadline: float) -> bytes:
        if not isinstance(request.tag, BufferTag):
            # pg_xact, MultiXact, relation-map and two-phase objects: rebuilt here, in Python. An object that
            # does not exist (a finished prepared transaction) is answered with an empty body.
            return rebuild_object(request.tag, request.base_image, request.records) or b""
        records = request.records
        for attempt in (1, 2):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RedoTimeout("the request's deadline passed before it could be served")
            try:
                if request.tag.forknum == ForkNumber.VISIBILITYMAP and any(
                        synthesized.is_synthesized(r.data) for r in records):
                    page = rebuild_visibility_map_page(self.engine, request.tag, request.lsn, request.base_image,
                                                       records, timeout=remaining)
                    return page or b""  # cut off by a truncation
                return self.engine.redo(request.tag, request.lsn, request.base_image, records, timeout=remaining)
            except InvalidRequest:
                raise
            except RedoFailed as failure:
                # Redo is a pure function: a child death may be the machine's fault, so try once more on the
                # spare; a request that kills two children is poison.
                if attempt == 2:
                    raise PoisonRequest(f"the request killed the redo child twice: {failure}") from None
                log.warning("worker %d: request %d killed a redo child (%s); trying once more",
                            self.slot, request.request_id, failure)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.engine.close()
        self.socket.close(linger=1000)
        self.context.term()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="walredod worker (started by the supervisor)")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--credit", type=int, required=True)
    parser.add_argument("--heartbeat-interval", type=float, required=True)
    parser.add_argument("--cpu", type=int, default=-1, help="CPU for this worker and its redo children (-1: any)")
    parser.add_argument("--engine-settings", required=True, help="EngineSettings as JSON")
    args = parser.parse_args(argv)
    die_with_parent()
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})  # inherited by the redo children started below
    logging.basicConfig(level=os.environ.get("WALREDOD_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s %(levelname)s worker-{args.slot}[%(process)d] %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the supervisor, which stops us in order
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    settings = EngineSettings.model_validate(json.loads(args.engine_settings))
    try:
        worker = Worker(args.slot, args.backend, settings, args.credit, args.heartbeat_interval)
    except WalredodError as error:
        log.error("worker %d cannot start: %s", args.slot, error)
        return 3
    try:
        worker.run()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
