"""RedoEngine on bad input and misbehaving children.

Every bad request gets its own typed error (walredod.errors) with a message naming the problem, and the next good
request on the same engine gets the right page. Requests are checked twice: by Python before they reach the child
(``check_request``), and by the child itself; raw messages sent with ``_call`` reach the child's checks directly.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
import threading
import time
from pathlib import Path

import pytest
from records import (
    RM_HEAP2_ID,
    RM_SMGR_ID,
    RM_XACT_ID,
    RM_XLOG_ID,
    XLOG_FPI,
    XLOG_FPI_FOR_HINT,
    IMAGE_COMPRESSORS,
    BlockRef,
    expected_after_fpi,
    fpi_record,
    make_page,
    make_record,
    with_crc,
)

from walredod.engine import RedoEngine
from walredod.engine.child import ChildDied, RedoChild
from walredod.engine.datadir import CHILD_DATADIRS
from walredod.engine.pipe import PING, encode_request, encode_tag
from walredod.errors import InvalidRequest, RedoFailed, RedoTimeout, Unavailable, WalredodError
from walredod.types import BLCKSZ, ZERO_PAGE, BufferTag, ForkNumber, WalRecord

TAG = BufferTag(1663, 16384, 24576, ForkNumber.MAIN, 5)
IMAGE = make_page(0x77, [b"tuple one", b"tuple two" * 7, b"three" * 30])
END_LSN = 0x3_0000_0028


@pytest.fixture(scope="module")
def engine(engine_data_dir):
    with RedoEngine(data_dir=engine_data_dir) as engine:
        yield engine


_good_counter = iter(range(1, 1 << 30))


def assert_serves(engine: RedoEngine) -> None:
    """A good request (base image and an FPI record, a different page each time) gets exactly the right page."""
    n = next(_good_counter)
    tag = TAG._replace(blkno=1000 + n)
    image = make_page(n, [bytes([n % 256]) * (20 + n % 50)])
    page = engine.redo(tag, END_LSN + n * 8, IMAGE, [WalRecord(END_LSN + n * 8, fpi_record(tag, image, hole=True))])
    assert page == expected_after_fpi(image, END_LSN + n * 8, hole=True)


def good_record() -> bytes:
    return fpi_record(TAG, IMAGE)


def flipped(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    damaged = bytearray(data)
    damaged[offset] ^= mask
    return bytes(damaged)


def raw_call(engine: RedoEngine, message: bytes, error: type[WalredodError], match: str,
             refused: bool = False) -> None:
    """Send a raw message; ``error`` must name the problem. ``refused``: the child refuses the request (whole and
    well framed, checked before redo touches anything) and stays; otherwise the framing is lost and the child dies,
    counted as a restart."""
    errors, restarts = engine.stats.errors, dict(engine.stats.restarts)
    with pytest.raises(error, match=match):
        engine._call(message, 10)
    assert engine.stats.errors == errors + 1
    if refused:
        assert engine.stats.restarts == restarts
    else:
        assert engine.stats.restarts.get("died in request", 0) == restarts.get("died in request", 0) + 1


def refused_by_python(engine: RedoEngine, args: tuple, match: str) -> None:
    """``engine.redo(*args)`` raises InvalidRequest before anything reaches the child: the child lives on."""
    pid, started = engine.child_pid, engine.stats.children_started
    with pytest.raises(InvalidRequest, match=match):
        engine.redo(*args)
    assert (engine.child_pid, engine.stats.children_started) == (pid, started)


def wait_until_dead(pid: int) -> None:
    """Wait until ``pid`` is a zombie (killed, not yet reaped) or gone."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not die")


def test_good_request_before_anything_else(engine):
    """The reference request works on a fresh engine (so later passes are not vacuous)."""
    assert_serves(engine)
    assert engine.redo(TAG, END_LSN, None, [WalRecord(END_LSN, good_record())]) == expected_after_fpi(IMAGE, END_LSN)


# --- records the child refuses ------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [24 + 30, 24 + 4000, -1, 4, 17], ids=["block-header", "image", "last-byte",
                                                                          "xl_xid", "xl_rmid"])
def test_corrupted_crc(engine, offset):
    """A record with one flipped bit (body or header, length kept) fails the child's CRC check: InvalidRequest."""
    record = flipped(good_record(), offset % len(good_record()))
    with pytest.raises(InvalidRequest, match="fails its CRC check"):
        engine.redo(TAG, END_LSN, None, [WalRecord(END_LSN, record)])
    assert_serves(engine)


def test_wrong_stored_crc(engine):
    """A record whose xl_crc itself is wrong is refused the same way."""
    with pytest.raises(InvalidRequest, match=r"fails its CRC check \(stored"):
        engine.redo(TAG, END_LSN, None, [WalRecord(END_LSN, flipped(good_record(), 20, 0x80))])
    assert_serves(engine)


def test_truncated_record_refused_by_python(engine):
    """engine.redo sees that xl_tot_len disagrees with the bytes given, before the child does."""
    short = good_record()[:-5]
    refused_by_python(engine, (TAG, END_LSN, None, [WalRecord(END_LSN, short)]), "xl_tot_len says")
    refused_by_python(engine, (TAG, END_LSN, None, [WalRecord(END_LSN, short[:10])]), "shorter than a record header")
    assert_serves(engine)


@pytest.mark.parametrize("change", [-5, +3], ids=["truncated", "trailing-bytes"])
def test_record_length_checked_by_the_child(engine, change):
    """A raw 'A' message whose body disagrees with xl_tot_len: the child's own check answers InvalidRequest."""
    record = good_record()
    record = record[:change] if change < 0 else record + b"\0" * change
    message = encode_request(TAG, None, [WalRecord(END_LSN, record)])
    raw_call(engine, message, InvalidRequest, f"xl_tot_len {len(good_record())} but the message carries "
                                              f"{len(record)} bytes", refused=True)
    assert_serves(engine)


def test_apply_message_too_short_for_a_header(engine):
    """An 'A' message too short to hold an LSN and a record header is a protocol violation."""
    message = encode_request(TAG, None, [])
    begin, get = message[:22], message[22:]
    raw_call(engine, begin + b"A" + struct.pack(">I", 4 + 8 + 10) + bytes(18) + get, InvalidRequest,
             "too short for an LSN and a record header", refused=True)
    assert_serves(engine)


def test_malformed_record_with_a_correct_crc(engine):
    """A record that passes its CRC but whose block header is inconsistent (HAS_HOLE with the whole page) is
    refused as malformed."""
    record = bytearray(good_record())
    assert record[24 + 1] & 0x10 and record[24 + 4 + 4] == 0x02  # block 0 has an image, bimg_info APPLY
    record[24 + 4 + 4] |= 0x01  # BKPIMAGE_HAS_HOLE, hole offset 0 and a BLCKSZ-long image
    with pytest.raises(InvalidRequest, match="malformed: BKPIMAGE_HAS_HOLE set"):
        engine.redo(TAG, END_LSN, None, [WalRecord(END_LSN, with_crc(bytes(record)))])
    assert_serves(engine)


# --- full-page images ------------------------------------------------------------------------------------------

COMPRESSIONS = sorted(IMAGE_COMPRESSORS)


@pytest.mark.parametrize("hole", [False, True], ids=["whole-page", "with-hole"])
@pytest.mark.parametrize("method", COMPRESSIONS)
def test_compressed_images_are_restored(engine, method, hole):
    """The child decompresses the target's image itself (one context for its life): every method gives the page,
    with the hole zero-filled."""
    tag = TAG._replace(blkno=70)
    record = make_record(RM_XLOG_ID, XLOG_FPI, [BlockRef(tag, IMAGE, hole=hole, compression=method)])
    assert engine.redo(tag, END_LSN, None, [WalRecord(END_LSN, record)]) == expected_after_fpi(IMAGE, END_LSN, hole)


@pytest.mark.parametrize("method", COMPRESSIONS)
def test_other_blocks_images_do_not_reach_the_target(engine, method):
    """An image of another block in the same record (here one that would not even decompress) changes nothing on
    the target: the other block's page is thrown away, so its image is not decompressed at all."""
    tag = TAG._replace(blkno=71)
    other = BlockRef(TAG._replace(blkno=72), IMAGE, compression=method, compressed_image=b"\xff" * 40)
    record = make_record(RM_XLOG_ID, XLOG_FPI, [BlockRef(tag, IMAGE, compression=method), other])
    assert engine.redo(tag, END_LSN, None, [WalRecord(END_LSN, record)]) == expected_after_fpi(IMAGE, END_LSN)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "one-byte-short"])
@pytest.mark.parametrize("method", COMPRESSIONS)
def test_image_that_does_not_decompress_is_refused(engine, method, damage):
    """A target image that is not a valid stream of its method, or stands for fewer bytes than the page less its
    hole, is refused before redo (PostgreSQL would restore what it got and leave the rest of the page to chance):
    InvalidRequest naming the block, and the same child serves on."""
    tag = TAG._replace(blkno=73)
    stream = IMAGE_COMPRESSORS[method](IMAGE)
    stream = {"truncated": stream[:-100], "garbage": b"\xff" * 40,
              "one-byte-short": IMAGE_COMPRESSORS[method](IMAGE[:-1])}[damage]
    record = make_record(RM_XLOG_ID, XLOG_FPI, [BlockRef(tag, IMAGE, compression=method, compressed_image=stream)])
    message = encode_request(tag, None, [WalRecord(END_LSN, record)])
    raw_call(engine, message, InvalidRequest, rf"image of block 0 of the record at end LSN 3/28 does not "
                                              rf"decompress \({method}\) to the {BLCKSZ} bytes", refused=True)
    assert_serves(engine)


def test_image_whose_hole_runs_past_the_page_is_refused(engine):
    """An uncompressed image whose hole starts past its own bytes would be restored past the end of the page's
    buffer (the WAL reader checks the hole's flags, not where it ends): refused, the child stays."""
    tag = TAG._replace(blkno=74)
    record = bytearray(make_record(RM_XLOG_ID, XLOG_FPI, [BlockRef(tag, IMAGE, hole=True)]))
    image_header = 24 + 4  # record header, then block 0's id, fork_flags and data length
    bimg_len, hole_offset, bimg_info = struct.unpack_from("<HHB", record, image_header)
    assert bimg_info & 0x01 and bimg_len < BLCKSZ  # BKPIMAGE_HAS_HOLE: the hole is BLCKSZ - bimg_len long
    struct.pack_into("<H", record, image_header + 2, BLCKSZ - 8)
    message = encode_request(tag, None, [WalRecord(END_LSN, with_crc(bytes(record)))])
    raw_call(engine, message, InvalidRequest, "has a hole .* past the end of the page", refused=True)
    assert_serves(engine)


def test_record_for_another_block(engine):
    """A record that does not reference the requested page is refused, naming the target."""
    for other in (TAG._replace(blkno=TAG.blkno + 1), TAG._replace(forknum=ForkNumber.INIT),
                  TAG._replace(relnode=TAG.relnode + 1)):
        with pytest.raises(InvalidRequest, match=r"XLOG record does not reference the target block "
                                                 r"1663/16384/24576 fork 0 blk 5"):
            engine.redo(TAG, END_LSN, None, [WalRecord(END_LSN, fpi_record(other, IMAGE))])
        assert_serves(engine)


@pytest.mark.parametrize("rmid, info, message", [
    (200, 0x00, "unknown resource manager id 200"),
    (27, 0x00, "unknown resource manager id 27"),  # between the built-in rmgrs (0-21) and the custom range (128-255)
    (RM_XACT_ID, 0x00, r"Transaction record \(info 0x00\) does not change relation pages"),
    (RM_SMGR_ID, 0x20, r"Storage record \(info 0x20\) does not change relation pages"),
    (RM_XLOG_ID, 0x20, r"XLOG record \(info 0x20\) does not change relation pages"),  # XLOG_NOOP
    (RM_HEAP2_ID, 0x00, r"Heap2 record \(info 0x00\) does not change relation pages"),  # HEAP2 REWRITE
], ids=["rmgr-200", "rmgr-27", "xact-commit", "smgr-truncate", "xlog-noop", "heap2-rewrite"])
def test_refused_resource_managers(engine, rmid, info, message):
    """Records of unknown rmgrs, or of real ones that change no relation page, are refused (with a correct CRC and
    a block reference to the target, so nothing else can be the reason)."""
    record = fpi_record(TAG, IMAGE, rmid=rmid, info=info)
    with pytest.raises(InvalidRequest, match=message):
        engine.redo(TAG, END_LSN, None, [WalRecord(END_LSN, record)])
    assert_serves(engine)


def test_fpi_for_hint_is_accepted(engine):
    """XLOG_FPI_FOR_HINT, the other page-image record of rmgr XLOG, is applied like XLOG_FPI."""
    record = fpi_record(TAG, IMAGE, info=XLOG_FPI_FOR_HINT, hole=True)
    assert engine.redo(TAG, END_LSN, None, [WalRecord(END_LSN, record)]) \
        == expected_after_fpi(IMAGE, END_LSN, hole=True)


@pytest.mark.parametrize("blocks, message", [
    ([BlockRef(TAG, None, data=b"x")], "XLOG_FPI record did not contain a full-page image"),
    ([BlockRef(TAG, IMAGE, apply=False)], "unexpected XLogReadBufferForRedo result"),
], ids=["no-image", "image-not-applied"])
def test_redo_error_inside_postgres(engine, blocks, message):
    """A well-formed record that PostgreSQL's own redo rejects: RedoFailed with PostgreSQL's message."""
    record = make_record(RM_XLOG_ID, XLOG_FPI, blocks)
    with pytest.raises(RedoFailed, match=message):
        engine.redo(TAG, END_LSN, None, [WalRecord(END_LSN, record)])
    assert_serves(engine)


def test_records_before_the_last_image_of_the_page_are_checked_not_replayed(engine):
    """A request is replayed from its last record that restores the page's full image: nothing before it can change
    the page. Here the record ahead of that one would fail inside PostgreSQL's redo; the request is served all the
    same, and the records ahead are still checked (a bad CRC there is refused)."""
    failing = make_record(RM_XLOG_ID, XLOG_FPI, [BlockRef(TAG, None, data=b"x")])
    image = make_page(0x51, [b"after the failing record" * 3])
    records = [WalRecord(END_LSN, failing), WalRecord(END_LSN + 8, fpi_record(TAG, image, hole=True))]
    assert engine.redo(TAG, END_LSN + 8, IMAGE, records) == expected_after_fpi(image, END_LSN + 8, hole=True)
    records[0] = WalRecord(END_LSN, flipped(failing, len(failing) - 1))
    with pytest.raises(InvalidRequest, match="fails its CRC check"):
        engine.redo(TAG, END_LSN + 8, IMAGE, records)
    assert_serves(engine)


# --- bad messages -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("garbage, message", [
    (b"Zxxxx", "message 'Z' has invalid length 2021161080"),  # "xxxx" read as the length
    (b"Z\x00\x00\x00\x04", "unknown message type 0x5A"),
    (b"B\x00\x00\x00\x02", "message 'B' has invalid length 2"),
    (b"B\xff\xff\xff\xff", "message 'B' has invalid length 4294967295"),
    (b"B\x00\x00\x00\x08abcd", "'B' message body is 4 bytes, expected 17"),
    (b"H\x00\x00\x00\x05x", "'H' message has a 1-byte body"),
    (b"G\x00\x00\x00\x15" + encode_tag(TAG), "'G' message before any 'B' message"),
    (b"A\x00\x00\x00\x24" + bytes(32), "'A' message before any 'B' message"),
    (b"B\x00\x00\x00\x15" + encode_tag(TAG._replace(forknum=9)) + PING, "invalid fork number 9"),
    (b"B\x00\x00\x00\x15" + encode_tag(TAG._replace(blkno=0xFFFFFFFF)) + PING,
     "block number 4294967295 in block tag is not below"),
], ids=["Z", "Z-empty", "short-length", "huge-length", "short-B", "H-with-body", "G-first", "A-first",
        "bad-fork", "bad-block"])
def test_garbage_messages(engine, garbage, message):
    """Messages the protocol does not allow make the child fail with InvalidRequest naming what was wrong."""
    raw_call(engine, garbage + PING, InvalidRequest, message)
    assert_serves(engine)


def test_get_for_another_page(engine):
    """A 'G' naming a page other than the one 'B' began is refused."""
    message = encode_request(TAG, None, [])
    raw_call(engine, message[:-17] + encode_tag(TAG._replace(blkno=6)), InvalidRequest,
             "'G' message names block 1663/16384/24576 fork 0 blk 6, but redo began for", refused=True)
    assert_serves(engine)


def test_message_cut_short_times_out(engine):
    """A message whose body never arrives leaves the child waiting: RedoTimeout, and the child is replaced."""
    victim = engine.child_pid
    timeouts = engine.stats.restarts.get("timeout", 0)
    with pytest.raises(RedoTimeout, match=f"redo child {victim} gave no answer within 0.5 s"):
        engine._call(b"B\x00\x00\x00\x15" + encode_tag(TAG)[:5], 0.5)
    assert engine.stats.restarts["timeout"] == timeouts + 1
    assert_serves(engine)
    assert not Path(f"/proc/{victim}").exists()


def test_base_image_of_the_wrong_size(engine):
    """A base image that is not one page: refused by Python, and by the child when sent raw."""
    for size in (0, 5, BLCKSZ - 1, BLCKSZ + 1):
        refused_by_python(engine, (TAG, END_LSN, b"\1" * size, []), f"base image is {size} bytes, a page is 8192")
    message = encode_request(TAG, ZERO_PAGE, [])
    begin, push, get = message[:22], message[22:22 + 5 + 17 + BLCKSZ], message[22 + 5 + 17 + BLCKSZ:]
    short_push = b"P" + struct.pack(">I", 4 + 17 + 100) + push[5:5 + 17 + 100]
    raw_call(engine, begin + short_push + get, InvalidRequest, "'P' message body is 117 bytes, expected 8209",
             refused=True)
    assert_serves(engine)


def test_base_image_for_another_page(engine):
    """A raw 'P' naming another page than 'B' is refused."""
    message = encode_request(TAG, IMAGE, [])
    wrong = message[:22 + 5] + encode_tag(TAG._replace(relnode=1)) + message[22 + 5 + 17:]
    raw_call(engine, wrong, InvalidRequest, "'P' message names block 1663/16384/1 fork 0 blk 5", refused=True)
    assert_serves(engine)


def test_lsns_out_of_order(engine):
    """Records whose end LSNs go backwards, or end past the requested LSN, are refused by Python."""
    records = [WalRecord(END_LSN, good_record()), WalRecord(END_LSN - 8, good_record())]
    refused_by_python(engine, (TAG, END_LSN, None, records), "LSNs must increase")
    refused_by_python(engine, (TAG, END_LSN - 1, None, records[:1]), "after the requested LSN")
    assert_serves(engine)


@pytest.mark.parametrize("tag, message", [
    (TAG._replace(forknum=4), "fork number must be 0 to 3"),
    (TAG._replace(blkno=0xFFFFFFFF), "block number must be below 0xfffffffe"),
    (TAG._replace(relnode=-1), "unsigned 32-bit"),
    ((1663, 1, 1, 0, 0), "must be a BufferTag"),
])
def test_bad_tags_refused_by_python(engine, tag, message):
    """Tags the child could not represent are refused before it sees them."""
    refused_by_python(engine, (tag, END_LSN, None, []), message)
    assert_serves(engine)


# --- dead and hung children ---------------------------------------------------------------------------------------

def assert_fresh_spare_after_takeover(engine: RedoEngine, old: set[int]) -> None:
    """The request after a takeover starts a new spare (the engine leaves it to the next request or to idle time)."""
    engine.ping()
    assert engine.spare_pid is not None and engine.spare_pid not in old | {engine.child_pid}
    assert Path(f"/proc/{engine.spare_pid}").exists()


def test_child_killed_while_idle_is_replaced_transparently(engine, caplog):
    """SIGKILL to an idle child: the next request is served by the spare without an error. The death is logged
    when the dead are buried (the next start_spare, the worker's idle step), not on the request's path."""
    engine.start_spare()
    victim, spare = engine.child_pid, engine.spare_pid
    assert spare is not None
    errors, idle = engine.stats.errors, engine.stats.restarts.get("died idle", 0)
    os.kill(victim, signal.SIGKILL)
    wait_until_dead(victim)
    caplog.set_level("WARNING", logger="walredod.engine.engine")
    assert_serves(engine)
    said = f"redo child {victim} ended (died idle)"
    assert said not in caplog.text
    assert engine.child_pid == spare
    assert engine.stats.errors == errors
    assert engine.stats.restarts["died idle"] == idle + 1
    assert_fresh_spare_after_takeover(engine, {victim, spare})
    assert said in caplog.text
    assert not Path(f"/proc/{victim}").exists()  # reaped


def test_child_and_spare_killed_while_idle(engine):
    """With both children dead, the request starts a new child and is still served without an error."""
    engine.start_spare()
    victims = (engine.child_pid, engine.spare_pid)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    for pid in victims:
        wait_until_dead(pid)
    assert_serves(engine)
    assert engine.child_pid not in victims
    assert_fresh_spare_after_takeover(engine, set(victims))
    assert not any(Path(f"/proc/{pid}").exists() for pid in victims)


def test_child_killed_mid_request(engine):
    """SIGKILL while the child holds a request (written in full, no reply yet): RedoFailed saying it was killed;
    the spare serves what follows."""
    engine.start_spare()
    victim, spare = engine.child_pid, engine.spare_pid
    died = engine.stats.restarts.get("died in request", 0)
    os.kill(victim, signal.SIGSTOP)  # it holds the request until it is killed
    killer = threading.Timer(0.3, os.kill, (victim, signal.SIGKILL))
    killer.start()
    try:
        with pytest.raises(RedoFailed, match=f"redo child {victim} died \\(killed by signal 9\\)"):
            engine.redo(TAG, END_LSN, None, [WalRecord(END_LSN, good_record())], timeout=30)
    finally:
        killer.join()
    assert engine.stats.restarts["died in request"] == died + 1
    assert_serves(engine)
    assert engine.child_pid == spare
    assert_fresh_spare_after_takeover(engine, {victim, spare})
    assert not Path(f"/proc/{victim}").exists()


def test_child_killed_while_busy(engine):
    """SIGKILL from another thread while requests of many records keep the child busy: every answer is the right
    page or a RedoFailed saying the child was killed, and service goes on with another child."""
    engine.start_spare()
    victim = engine.child_pid
    empty = make_page(0)  # its image is 24 bytes once the hole is left out: 600 records fit in the pipe buffer
    records = [WalRecord(END_LSN + i * 8, fpi_record(TAG, empty, hole=True)) for i in range(599)]
    records.append(WalRecord(END_LSN + 599 * 8, fpi_record(TAG, IMAGE, hole=True)))
    assert len(encode_request(TAG, None, records)) < 65536
    expected = expected_after_fpi(IMAGE, END_LSN + 599 * 8, hole=True)
    outcomes: list[Exception | bytes] = []
    stop = threading.Event()

    def run():
        while not stop.is_set() and len(outcomes) < 10_000:
            try:
                outcomes.append(engine.redo(TAG, records[-1].lsn, None, records, timeout=30))
            except Exception as exc:  # noqa: BLE001 - handed to the test thread
                outcomes.append(exc)
                return

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.2)
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.2)
    stop.set()
    thread.join(60)
    assert not thread.is_alive()
    assert len(outcomes) > 1
    pages = [o for o in outcomes if isinstance(o, bytes)]
    failures = [o for o in outcomes if not isinstance(o, bytes)]
    assert all(page == expected for page in pages)
    assert len(failures) <= 1
    for failure in failures:  # none if the kill landed between two requests
        assert isinstance(failure, RedoFailed) and "killed by signal 9" in str(failure), repr(failure)
    assert engine.child_pid != victim
    assert_serves(engine)


def test_hung_child_times_out_on_a_request_larger_than_the_pipe(engine):
    """The timeout also covers writing the request: a stopped child that cannot take a 160 kB request in gets
    RedoTimeout, not a caller blocked forever."""
    engine.start_spare()
    victim = engine.child_pid
    records = [WalRecord(END_LSN + i * 8, fpi_record(TAG, IMAGE)) for i in range(20)]
    outcome: list[Exception | bytes] = []

    def run():
        try:
            outcome.append(engine.redo(TAG, records[-1].lsn, None, records, timeout=0.5))
        except Exception as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    os.kill(victim, signal.SIGSTOP)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(5)
    hung = thread.is_alive()
    if hung:
        os.kill(victim, signal.SIGKILL)  # unblock the writer so the engine stays usable for the other tests
        thread.join(30)
    assert_serves(engine)
    assert not hung, "the request was still blocked writing to the stopped child after 5 s (timeout 0.5 s)"
    assert isinstance(outcome[0], RedoTimeout), outcome


def test_large_bad_request_costs_no_child(engine):
    """A request bigger than the pipe buffer whose first record is corrupt is refused by the child, which read it
    whole and checked it before redo: its error is the child's own, and the child stays."""
    engine.start_spare()
    records = [WalRecord(END_LSN + i * 8, fpi_record(TAG, IMAGE)) for i in range(50)]
    records[0] = WalRecord(records[0].lsn, flipped(records[0].data, 100))
    started, restarts = engine.stats.children_started, dict(engine.stats.restarts)
    with pytest.raises(InvalidRequest, match="fails its CRC check"):
        engine.redo(TAG, records[-1].lsn, None, records)
    assert_serves(engine)
    engine.start_spare()
    assert engine.stats.restarts == restarts
    assert engine.stats.children_started == started


def test_block_numbers_past_postgres_limit(engine, engine_data_dir):
    """Block 0xFFFFFFFE is PostgreSQL's MaxBlockNumber, never a real block: refused as the target (by Python and
    by the child) and as any other block of a record, before redo could extend a scratch relation on disk."""
    far = TAG._replace(blkno=0xFFFFFFFE)
    refused_by_python(engine, (far, END_LSN, None, []), "block number must be below")
    raw_call(engine, encode_request(far, None, []), InvalidRequest, "not below")
    record = make_record(RM_XLOG_ID, XLOG_FPI, [BlockRef(TAG, IMAGE), BlockRef(far._replace(relnode=777), IMAGE)])
    raw_call(engine, encode_request(TAG, None, [WalRecord(END_LSN, record)]), InvalidRequest, "block 1 has block",
             refused=True)
    assert_serves(engine)
    scratch = [f for datadir in (Path(engine_data_dir) / CHILD_DATADIRS).iterdir()
               if (datadir / "base" / "4000000000").is_dir()  # a child still starting has none yet
               for f in (datadir / "base" / "4000000000").iterdir()]
    assert all(f.stat().st_blocks == 0 for f in scratch) and not [f for f in scratch if "." in f.name]


def test_child_stopped_past_the_timeout(engine):
    """A child that stops answering: RedoTimeout after the timeout; it is killed and reaped, the spare serves."""
    engine.start_spare()
    victim, spare = engine.child_pid, engine.spare_pid
    timeouts = engine.stats.restarts.get("timeout", 0)
    os.kill(victim, signal.SIGSTOP)
    with pytest.raises(RedoTimeout, match=f"redo child {victim} gave no answer within 0.5 s"):
        engine.redo(TAG, END_LSN, None, [WalRecord(END_LSN, good_record())], timeout=0.5)
    assert engine.stats.restarts["timeout"] == timeouts + 1
    assert_serves(engine)
    assert engine.child_pid == spare
    assert not Path(f"/proc/{victim}").exists()  # killed and reaped by the request that followed
    assert_fresh_spare_after_takeover(engine, {victim, spare})


def test_closed_engine_is_unavailable(engine_data_dir):
    """After close, requests get Unavailable rather than hanging or starting children."""
    engine = RedoEngine(data_dir=engine_data_dir, keep_spare=False)
    engine.close()
    with pytest.raises(Unavailable):
        engine.ping()


def test_refused_requests_cost_no_child(engine):
    """Requests the child can refuse before redo touches anything (here: 200 with a bad CRC, interleaved with good
    ones) are answered with InvalidRequest by the same child: no restart, no new child."""
    engine.start_spare()
    pid, started, restarts = engine.child_pid, engine.stats.children_started, dict(engine.stats.restarts)
    bad = WalRecord(END_LSN, flipped(good_record(), 24 + 4000))
    for _ in range(200):
        with pytest.raises(InvalidRequest, match="fails its CRC check"):
            engine.redo(TAG, END_LSN, None, [bad])
        assert_serves(engine)
    assert (engine.child_pid, engine.stats.children_started, engine.stats.restarts) == (pid, started, restarts)


@pytest.mark.parametrize("reply, what", [
    (b"\x01" + struct.pack(">I", 1 << 31), "status 1 and length 2147483648"),
    (b"\x07" + struct.pack(">I", 5) + b"hello", "status 7 and length 5"),
], ids=["refusal-too-long", "unknown-status"])
def test_a_reply_the_protocol_does_not_have_ends_the_child(tmp_path, reply, what):
    """A child that answers with an unknown status or a refusal longer than any message (a child taken over by
    its WAL, say) is killed at once: the engine neither buffers what it announces nor reads on out of step."""
    script = f"import sys; sys.stdin.buffer.read(5); sys.stdout.buffer.write({reply!r}); sys.stdout.flush(); " \
             "import time; time.sleep(60)"
    child = RedoChild([sys.executable, "-c", script], env={}, cwd=None, popen_kwargs={}, name="fake",
                      error_replies=True)
    try:
        started = time.monotonic()
        with pytest.raises(ChildDied) as died:
            child.request(PING, time.monotonic() + 30, 30)
        assert isinstance(died.value.error, RedoFailed)
        assert what in str(died.value.error)
        assert time.monotonic() - started < 20
        assert child.process.wait(10) is not None  # killed, not left to sleep
    finally:
        child.kill()
        child.close()


def child_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_refused_requests_leave_no_memory_behind(engine):
    """What checking a refused request allocates goes with the refusal: 40 requests of 2 MB of well-formed records,
    refused only after every record was decoded (the last does not reference the page), leave the child's memory where one
    such request left it (they used to pile up until the child could allocate nothing)."""
    other = TAG._replace(blkno=TAG.blkno + 100)
    records = [WalRecord(END_LSN + i, make_record(RM_XLOG_ID, XLOG_FPI,
                                                  [BlockRef(other if i == 31 else TAG, IMAGE, data=bytes(60000))]))
               for i in range(32)]  # the last one is refused, once all were decoded
    request = (TAG, END_LSN + 64, None, records)

    def refused() -> None:
        with pytest.raises(InvalidRequest, match="does not reference the target block"):
            engine.redo(*request)

    refused()
    pid, after_one = engine.child_pid, child_rss_kb(engine.child_pid)
    for _ in range(40):
        refused()
    assert engine.child_pid == pid
    assert child_rss_kb(pid) - after_one < 16 * 1024, "the refusals' memory stayed in the child"
    assert_serves(engine)


def test_a_spare_that_cannot_start_is_retried_with_back_off(engine_data_dir, monkeypatch):
    """The worker asks for a missing spare every few tens of milliseconds; one that cannot start (a failed copy,
    a full disk) is tried again after 50 ms, then 100, 200...: not at every ask, each a fork and a copy."""
    with RedoEngine(data_dir=engine_data_dir) as engine:
        tries = []

        def cannot_start():
            tries.append(time.monotonic())
            raise Unavailable("copying the template cluster failed: No space left on device")

        monkeypatch.setattr(engine, "_start_child", cannot_start)
        os.kill(engine.spare_pid, signal.SIGKILL)
        wait_until_dead(engine.spare_pid)
        engine._child_died(engine._spare, "died idle")
        end = time.monotonic() + 0.6
        while time.monotonic() < end:  # the worker's idle step, every 10 ms
            engine.watch_children()
            engine.start_spare()
            time.sleep(0.01)
        assert 1 <= len(tries) <= 6, tries  # up to 60 asks; tries at least 50, 100, 200, 400 ms apart
        engine.ping()  # the active child serves on
