"""Heap records of Neon's PostgreSQL 15 compute: refused by a vanilla engine, served by wal_format = "neon".

Records are built from the two formats (tests/records.py); the expected pages from what redo does with them:
stock redo gives every tuple it writes t_cid 0 (FirstCommandId) and clears HEAP_COMBOCID; Neon's redo stores the
logged t_cid and takes HEAP_COMBOCID from the record (as logged in a new tuple's infomask, from infobits bit 0x20
for delete, update, lock and lock-updated).
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
from records import (
    RM_HEAP2_ID,
    BlockRef,
    HeapTuple,
    fpi_record,
    heap_delete_record,
    heap_insert_record,
    heap_lock_updated_record,
    heap_multi_insert_record,
    heap_update_record,
    make_page,
    make_record,
    page_lsn,
    tuple_on_page,
    with_lsn,
    write_wal_segment,
)

from walredod.engine import RedoEngine
from walredod.errors import InvalidRequest
from walredod.types import BufferTag, ForkNumber, WalRecord
from walredod.wal import WalReader, decode_record
from walredod.walformat import classify, expected_hoff, fits, tells_format

BLK = 7
TAG = BufferTag(1663, 16384, 24601, ForkNumber.MAIN, BLK)
OTHER = TAG._replace(blkno=BLK + 1)
XID = 1000
LSN = 0x2_0000_0000

# t_infomask and t_infomask2 bits (htup_details.h)
HEAP_HASNULL, HEAP_HASVARWIDTH, HEAP_COMBOCID = 0x0001, 0x0002, 0x0020
HEAP_XMAX_KEYSHR_LOCK, HEAP_XMAX_EXCL_LOCK, HEAP_XMAX_LOCK_ONLY = 0x0010, 0x0040, 0x0080
HEAP_XMIN_COMMITTED, HEAP_XMAX_COMMITTED, HEAP_XMAX_INVALID, HEAP_XMAX_IS_MULTI = 0x0100, 0x0400, 0x0800, 0x1000
HEAP_XMAX_BITS = HEAP_XMAX_COMMITTED | HEAP_XMAX_INVALID | HEAP_XMAX_IS_MULTI | 0x00D0
HEAP_MOVED = 0xC000
HEAP_KEYS_UPDATED, HEAP_HOT_UPDATED, HEAP_ONLY_TUPLE = 0x2000, 0x4000, 0x8000
# infobits_set bits (heapam_xlog.h), and the one Neon adds
XLHL_XMAX_LOCK_ONLY, XLHL_XMAX_EXCL_LOCK, XLHL_XMAX_KEYSHR_LOCK, XLHL_KEYS_UPDATED = 0x02, 0x04, 0x08, 0x10
XLHL_COMBOCID = 0x20
XLOG_HEAP2_VISIBLE = 0x40


def row(values: bytes, *, cid: int = 5, natts: int = 3, nulls: int | None = None, infomask: int = 0) -> HeapTuple:
    """A tuple as heap_insert logs it: HEAP_XMAX_INVALID set, a null bitmap when ``nulls`` (bit per present
    attribute) is given, zero padding up to t_hoff, then ``values``."""
    mask = HEAP_XMAX_INVALID | HEAP_HASVARWIDTH | infomask | (HEAP_HASNULL if nulls is not None else 0)
    hoff = expected_hoff(natts, mask)
    bitmap = b"" if nulls is None else nulls.to_bytes((natts + 7) // 8, "little")
    return HeapTuple(natts, mask, bitmap + bytes(hoff - 23 - len(bitmap)) + values, cid)


ROW1 = row(b"\x01\0\0\0\x02\0\0\0" + b"\x0bhello", cid=5)
ROW2 = row(b"\x03\0\0\0" + b"\x07abc", cid=7, natts=9, nulls=0b1_0000_0011)
ROW3 = row(b"\x04\0\0\0\x05\0\0\0" + b"\x05xy", cid=7)
OLD = row(b"\x09\0\0\0\x09\0\0\0" + b"\x07old", cid=2)


def neon_xmax_step(infomask: int, infomask2: int, infobits: int) -> tuple[int, int]:
    """What heap redo of delete, update (old tuple), lock and lock-updated does to the infomasks under Neon's
    semantics: xmax bits cleared and set from infobits, HEAP_COMBOCID too."""
    infomask &= ~(HEAP_XMAX_BITS | HEAP_MOVED | HEAP_COMBOCID)
    infomask2 &= ~HEAP_KEYS_UPDATED
    for bit, flag in ((0x01, HEAP_XMAX_IS_MULTI), (XLHL_XMAX_LOCK_ONLY, HEAP_XMAX_LOCK_ONLY),
                      (XLHL_XMAX_EXCL_LOCK, HEAP_XMAX_EXCL_LOCK), (XLHL_XMAX_KEYSHR_LOCK, HEAP_XMAX_KEYSHR_LOCK),
                      (XLHL_COMBOCID, HEAP_COMBOCID)):
        if infobits & bit:
            infomask |= flag
    if infobits & XLHL_KEYS_UPDATED:
        infomask2 |= HEAP_KEYS_UPDATED
    return infomask, infomask2


def old_page(old_infomask: int = HEAP_XMIN_COMMITTED | HEAP_XMAX_INVALID | HEAP_HASVARWIDTH, cid: int = 2) -> bytes:
    """A page holding one committed tuple at offset 1 (written by transaction 900)."""
    return make_page(LSN - 0x1000, [tuple_on_page(OLD, xmin=900, cid=cid, ctid=(BLK, 1), infomask=old_infomask)])


@pytest.fixture(scope="module")
def vanilla(engine_data_dir):
    with RedoEngine(data_dir=engine_data_dir, name="vanilla-format") as engine:
        yield engine


@pytest.fixture(scope="module")
def neon(engine_data_dir):
    with RedoEngine(data_dir=engine_data_dir, wal_format="neon", name="neon-format") as engine:
        yield engine


def neon_records() -> dict[str, tuple[BufferTag, bytes | None, bytes]]:
    """One Neon-format record of every kind whose layout differs: (target, base page, record)."""
    return {
        "insert+init": (TAG, None, heap_insert_record(TAG, 1, ROW1, fmt="neon", xid=XID, init=True)),
        "insert": (TAG, old_page(), heap_insert_record(TAG, 2, ROW1, fmt="neon", xid=XID)),
        "multi-insert+init": (TAG, None, heap_multi_insert_record(TAG, [ROW1, ROW2], fmt="neon", xid=XID)),
        "multi-insert": (TAG, old_page(), heap_multi_insert_record(TAG, [ROW2, ROW3], fmt="neon", xid=XID,
                                                                   offsets=[2, 3])),
        "update": (TAG, old_page(), heap_update_record(TAG, 1, 2, ROW1, fmt="neon", xid=XID, old_xmax=XID,
                                                       old_cid=5)),
        "hot-update": (TAG, old_page(), heap_update_record(TAG, 1, 2, ROW1, fmt="neon", xid=XID, old_xmax=XID,
                                                           old_cid=5, hot=True)),
        "delete": (TAG, old_page(), heap_delete_record(TAG, 1, fmt="neon", xid=XID, xmax=XID, cid=4,
                                                       infobits=XLHL_KEYS_UPDATED)),
        "lock": (TAG, old_page(), heap_delete_record(TAG, 1, fmt="neon", xid=XID, xmax=XID, cid=4, lock=True,
                                                     infobits=XLHL_XMAX_LOCK_ONLY | XLHL_XMAX_EXCL_LOCK)),
    }


def vanilla_insert_serves(engine: RedoEngine) -> None:
    """A vanilla insert into a new page gives the page stock redo makes: t_cid 0."""
    end = LSN + 0x50
    page = engine.redo(TAG, end, None, [WalRecord(end, heap_insert_record(TAG, 1, ROW1, fmt="vanilla", xid=XID,
                                                                            init=True))])
    assert page == make_page(end, [tuple_on_page(ROW1, xmin=XID, cid=0, ctid=(BLK, 1))])


# --- the vanilla engine -------------------------------------------------------------------------------------------

def test_vanilla_engine_applies_vanilla_heap_records(vanilla):
    """The builders make records stock redo applies, as stock redo does (the control for what follows)."""
    vanilla_insert_serves(vanilla)
    end = LSN + 0x90
    record = heap_update_record(TAG, 1, 2, ROW1, fmt="vanilla", xid=XID, old_xmax=XID)
    infomask = (HEAP_XMIN_COMMITTED | HEAP_HASVARWIDTH)
    assert vanilla.redo(TAG, end, old_page(), [WalRecord(end, record)]) == make_page(end, [
        tuple_on_page(OLD, xmin=900, xmax=XID, cid=0, ctid=(BLK, 2), infomask=infomask),
        tuple_on_page(ROW1, xmin=XID, cid=0, ctid=(BLK, 2)),
    ], prune_xid=XID)


@pytest.mark.parametrize("kind", list(neon_records()))
def test_vanilla_engine_refuses_neon_records(vanilla, kind):
    """Every Neon-format record whose layout differs is refused before redo, naming the setting to use; the
    engine's next request is served as before."""
    tag, base, record = neon_records()[kind]
    end = LSN + 0x100
    with pytest.raises(InvalidRequest, match=r'not in the heap record format of vanilla PostgreSQL 15 .*'
                                             r'set engine\.wal_format = "neon"'):
        vanilla.redo(tag, end, base, [WalRecord(end, record)])
    vanilla_insert_serves(vanilla)


def test_vanilla_engine_refuses_a_neon_record_in_the_middle(vanilla):
    """A Neon record after vanilla ones fails the whole request: no page built from a part of the history."""
    end = LSN + 0x100
    records = [WalRecord(end, heap_insert_record(TAG, 1, ROW1, fmt="vanilla", xid=XID, init=True)),
               WalRecord(end + 0x80, heap_insert_record(TAG, 2, ROW3, fmt="neon", xid=XID))]
    with pytest.raises(InvalidRequest, match='engine.wal_format = "neon"'):
        vanilla.redo(TAG, end + 0x80, None, records)
    vanilla_insert_serves(vanilla)


def test_a_record_restored_from_its_image_is_format_neutral(vanilla, neon):
    """An insert whose block comes back from its image (its tuple data kept beside it) is applied by both: redo
    never reads the tuple header."""
    image = old_page()
    end = LSN + 0x200
    for fmt, engine in (("neon", vanilla), ("vanilla", neon)):
        record = heap_insert_record(TAG, 2, ROW1, fmt=fmt, xid=XID, image=image)
        assert engine.redo(TAG, end, None, [WalRecord(end, record)]) == with_lsn(image, end)


# --- the neon engine ----------------------------------------------------------------------------------------------

def test_neon_insert(neon):
    """Inserted tuples get the logged t_cid, and their infomask as logged (HEAP_COMBOCID included)."""
    end1, end2 = LSN + 0x100, LSN + 0x200
    combo = row(ROW3.body[1:], cid=9, infomask=HEAP_COMBOCID)
    records = [WalRecord(end1, heap_insert_record(TAG, 1, ROW1, fmt="neon", xid=XID, init=True)),
               WalRecord(end2, heap_insert_record(TAG, 2, combo, fmt="neon", xid=XID + 1))]
    assert neon.redo(TAG, end2, None, records) == make_page(end2, [
        tuple_on_page(ROW1, xmin=XID, cid=5, ctid=(BLK, 1)),
        tuple_on_page(combo, xmin=XID + 1, cid=9, ctid=(BLK, 2)),
    ])


def test_neon_multi_insert(neon):
    """Each tuple of a multi-insert gets its own logged t_cid; a tuple with a null bitmap keeps its t_hoff (32)."""
    end = LSN + 0x300
    assert ROW2.hoff == 32
    expected = make_page(end, [tuple_on_page(OLD, xmin=900, cid=2, ctid=(BLK, 1),
                                             infomask=HEAP_XMIN_COMMITTED | HEAP_XMAX_INVALID | HEAP_HASVARWIDTH),
                               tuple_on_page(ROW2, xmin=XID, cid=7, ctid=(BLK, 2)),
                               tuple_on_page(ROW1, xmin=XID, cid=5, ctid=(BLK, 3))])
    record = heap_multi_insert_record(TAG, [ROW2, ROW1], fmt="neon", xid=XID, offsets=[2, 3])
    assert neon.redo(TAG, end, old_page(), [WalRecord(end, record)]) == expected

    init = heap_multi_insert_record(TAG, [ROW1, ROW2, ROW3], fmt="neon", xid=XID)
    assert neon.redo(TAG, end, None, [WalRecord(end, init)]) == make_page(end, [
        tuple_on_page(ROW1, xmin=XID, cid=5, ctid=(BLK, 1)),
        tuple_on_page(ROW2, xmin=XID, cid=7, ctid=(BLK, 2)),
        tuple_on_page(ROW3, xmin=XID, cid=7, ctid=(BLK, 3))])


@pytest.mark.parametrize("hot", [False, True], ids=["update", "hot-update"])
@pytest.mark.parametrize("combo", [False, True], ids=["plain-cmax", "combo-cid"])
def test_neon_update_on_one_page(neon, hot, combo):
    """The old version gets the record's t_cid (a combo id when infobits say so), the new one its own."""
    end = LSN + 0x400
    old_infomask = HEAP_XMIN_COMMITTED | HEAP_XMAX_INVALID | HEAP_HASVARWIDTH
    infobits = XLHL_KEYS_UPDATED | (XLHL_COMBOCID if combo else 0)
    new = HeapTuple(ROW1.infomask2 | (HEAP_ONLY_TUPLE if hot else 0), ROW1.infomask, ROW1.body, cid=6)
    record = heap_update_record(TAG, 1, 2, new, fmt="neon", xid=XID, old_xmax=XID, old_cid=11, hot=hot,
                                old_infobits=infobits)
    infomask, infomask2 = neon_xmax_step(old_infomask, OLD.infomask2, infobits)
    infomask2 = infomask2 | HEAP_HOT_UPDATED if hot else infomask2 & ~HEAP_HOT_UPDATED
    assert neon.redo(TAG, end, old_page(old_infomask), [WalRecord(end, record)]) == make_page(end, [
        tuple_on_page(OLD, xmin=900, xmax=XID, cid=11, ctid=(BLK, 2), infomask=infomask, infomask2=infomask2),
        tuple_on_page(new, xmin=XID, cid=6, ctid=(BLK, 2)),
    ], prune_xid=XID)


def test_neon_update_across_pages(neon):
    """Block 0 is the new version's page, block 1 the old one's: each page gets its own tuple's t_cid."""
    end = LSN + 0x500
    record = heap_update_record(OTHER, 1, 1, ROW3, fmt="neon", xid=XID, old_xmax=XID, old_cid=8, old_tag=TAG,
                                old_infobits=XLHL_COMBOCID)
    infomask, infomask2 = neon_xmax_step(HEAP_XMIN_COMMITTED | HEAP_XMAX_INVALID | HEAP_HASVARWIDTH,
                                         OLD.infomask2, XLHL_COMBOCID)
    assert neon.redo(TAG, end, old_page(), [WalRecord(end, record)]) == make_page(end, [
        tuple_on_page(OLD, xmin=900, xmax=XID, cid=8, ctid=(BLK + 1, 1), infomask=infomask, infomask2=infomask2),
    ], prune_xid=XID)
    assert neon.redo(OTHER, end, make_page(LSN), [WalRecord(end, record)]) == make_page(end, [
        tuple_on_page(ROW3, xmin=XID, cid=7, ctid=(BLK + 1, 1)),
    ])


@pytest.mark.parametrize("fmt", ["vanilla", "neon"])
def test_update_with_prefix_suffix_and_old_key(vanilla, neon, fmt):
    """The new tuple shares a prefix and a suffix with the old one (their lengths first in block 0 data) and the
    record carries the old key for logical decoding: each engine rebuilds its own format's update, refuses the
    other's."""
    end = LSN + 0xB00
    old_data = OLD.body[1:]  # after the padding byte up to t_hoff 24
    middle = b"\x07new"
    new = HeapTuple(OLD.infomask2, OLD.infomask, OLD.body[:1] + middle, cid=6)
    key = row(b"\x09\0\0\0", cid=2, natts=1)
    record = heap_update_record(TAG, 1, 2, new, fmt=fmt, xid=XID, old_xmax=XID, old_cid=11, prefix_len=8,
                                suffix_len=0, old_key=key)
    rebuilt = HeapTuple(OLD.infomask2, OLD.infomask, OLD.body[:1] + old_data[:8] + middle, cid=6)
    infomask, infomask2 = neon_xmax_step(HEAP_XMIN_COMMITTED | HEAP_XMAX_INVALID | HEAP_HASVARWIDTH,
                                         OLD.infomask2, 0)
    cids = (11, 6) if fmt == "neon" else (0, 0)
    expected = make_page(end, [
        tuple_on_page(OLD, xmin=900, xmax=XID, cid=cids[0], ctid=(BLK, 2), infomask=infomask, infomask2=infomask2),
        tuple_on_page(rebuilt, xmin=XID, cid=cids[1], ctid=(BLK, 2)),
    ], prune_xid=XID)
    right, wrong = (neon, vanilla) if fmt == "neon" else (vanilla, neon)
    assert right.redo(TAG, end, old_page(), [WalRecord(end, record)]) == expected
    with pytest.raises(InvalidRequest, match="engine.wal_format"):
        wrong.redo(TAG, end, old_page(), [WalRecord(end, record)])


@pytest.mark.parametrize("fmt", ["vanilla", "neon"])
def test_delete_with_old_key(vanilla, neon, fmt):
    """A delete that carries the old key for logical decoding: applied in its own format, refused in the other."""
    end = LSN + 0xC00
    key = row(b"\x09\0\0\0", cid=2, natts=1)
    record = heap_delete_record(TAG, 1, fmt=fmt, xid=XID, xmax=XID, cid=4, infobits=XLHL_KEYS_UPDATED, old_key=key)
    infomask, infomask2 = neon_xmax_step(HEAP_XMIN_COMMITTED | HEAP_XMAX_INVALID | HEAP_HASVARWIDTH,
                                         OLD.infomask2, XLHL_KEYS_UPDATED)
    expected = make_page(end, [tuple_on_page(OLD, xmin=900, xmax=XID, cid=4 if fmt == "neon" else 0, ctid=(BLK, 1),
                                             infomask=infomask, infomask2=infomask2)], prune_xid=XID)
    right, wrong = (neon, vanilla) if fmt == "neon" else (vanilla, neon)
    assert right.redo(TAG, end, old_page(), [WalRecord(end, record)]) == expected
    with pytest.raises(InvalidRequest, match="engine.wal_format"):
        wrong.redo(TAG, end, old_page(), [WalRecord(end, record)])


@pytest.mark.parametrize("combo", [False, True], ids=["plain-cmax", "combo-cid"])
def test_neon_delete(neon, combo):
    end = LSN + 0x600
    infobits = XLHL_KEYS_UPDATED | (XLHL_COMBOCID if combo else 0)
    record = heap_delete_record(TAG, 1, fmt="neon", xid=XID, xmax=XID, cid=4, infobits=infobits)
    infomask, infomask2 = neon_xmax_step(HEAP_XMIN_COMMITTED | HEAP_XMAX_INVALID | HEAP_HASVARWIDTH,
                                         OLD.infomask2, infobits)
    assert neon.redo(TAG, end, old_page(), [WalRecord(end, record)]) == make_page(end, [
        tuple_on_page(OLD, xmin=900, xmax=XID, cid=4, ctid=(BLK, 1), infomask=infomask, infomask2=infomask2),
    ], prune_xid=XID)


def test_neon_lock_and_lock_updated_clear_a_combo_flag(neon):
    """Lock stores the record's t_cid; both lock records clear HEAP_COMBOCID (stock redo of a lock-updated record
    would keep it)."""
    end = LSN + 0x700
    had_combo = HEAP_XMIN_COMMITTED | HEAP_XMAX_INVALID | HEAP_HASVARWIDTH | HEAP_COMBOCID
    infobits = XLHL_XMAX_LOCK_ONLY | XLHL_XMAX_EXCL_LOCK
    infomask, infomask2 = neon_xmax_step(had_combo, OLD.infomask2, infobits)

    lock = heap_delete_record(TAG, 1, fmt="neon", xid=XID, xmax=XID, cid=3, infobits=infobits, lock=True)
    assert neon.redo(TAG, end, old_page(had_combo, cid=9), [WalRecord(end, lock)]) == make_page(end, [
        tuple_on_page(OLD, xmin=900, xmax=XID, cid=3, ctid=(BLK, 1), infomask=infomask, infomask2=infomask2)])

    lock_updated = heap_lock_updated_record(TAG, 1, xid=XID, xmax=XID, infobits=infobits)
    assert neon.redo(TAG, end, old_page(had_combo, cid=9), [WalRecord(end, lock_updated)]) == make_page(end, [
        tuple_on_page(OLD, xmin=900, xmax=XID, cid=9, ctid=(BLK, 1), infomask=infomask, infomask2=infomask2)])


def test_neon_record_already_on_the_page_changes_nothing(neon):
    """A page at or past the record's LSN is left as it is: no t_cid is written over a tuple redo skipped."""
    end = LSN + 0x800
    page = make_page(end + 8, [tuple_on_page(OLD, xmin=900, cid=77, ctid=(BLK, 1)),
                               tuple_on_page(ROW1, xmin=XID, cid=77, ctid=(BLK, 2))])
    record = heap_insert_record(TAG, 2, ROW1, fmt="neon", xid=XID)
    assert neon.redo(TAG, end, page, [WalRecord(end, record)]) == page
    delete = heap_delete_record(TAG, 1, fmt="neon", xid=XID, xmax=XID, cid=4, infobits=XLHL_COMBOCID)
    assert neon.redo(TAG, end, page, [WalRecord(end, delete)]) == page


def test_neon_visibility_record_stamps_the_heap_page(vanilla, neon):
    """Neon's redo sets the heap page's LSN for a visibility record; stock redo only when the source logs hint
    bits (not this vanilla engine)."""
    end = LSN + 0x900
    vm_tag = TAG._replace(forknum=ForkNumber.VISIBILITYMAP, blkno=0)
    record = make_record(RM_HEAP2_ID, XLOG_HEAP2_VISIBLE, [BlockRef(vm_tag), BlockRef(TAG)],
                         struct.pack("<IB", 900, 0x03))  # cutoff xid, all-visible and all-frozen
    for engine, lsn in ((neon, end), (vanilla, page_lsn(old_page()))):
        page = engine.redo(TAG, end, old_page(), [WalRecord(end, record)])
        assert page_lsn(page) == lsn
        assert page[10] & 0x04  # PD_ALL_VISIBLE


@pytest.mark.parametrize("kind", ["insert", "multi-insert", "update", "delete", "lock"])
def test_neon_engine_refuses_vanilla_records(neon, kind):
    end = LSN + 0xA00
    record = {
        "insert": heap_insert_record(TAG, 2, ROW1, fmt="vanilla", xid=XID),
        "multi-insert": heap_multi_insert_record(TAG, [ROW1, ROW2], fmt="vanilla", xid=XID),
        "update": heap_update_record(TAG, 1, 2, ROW1, fmt="vanilla", xid=XID, old_xmax=XID),
        "delete": heap_delete_record(TAG, 1, fmt="vanilla", xid=XID, xmax=XID),
        "lock": heap_delete_record(TAG, 1, fmt="vanilla", xid=XID, xmax=XID, lock=True),
    }[kind]
    with pytest.raises(InvalidRequest, match=r'format of a Neon compute .*set engine\.wal_format = "vanilla"'):
        neon.redo(TAG, end, old_page(), [WalRecord(end, record)])
    assert neon.redo(TAG, end, None, [WalRecord(end, heap_insert_record(TAG, 1, ROW1, fmt="neon", xid=XID,
                                                                        init=True))]) == \
        make_page(end, [tuple_on_page(ROW1, xmin=XID, cid=5, ctid=(BLK, 1))])


# --- telling the formats apart in Python, and `walredod doctor --wal` ----------------------------------------------

def test_classifier_tells_every_differing_record():
    for kind, (_tag, _base, raw) in neon_records().items():
        record = decode_record(raw)
        assert tells_format(record), kind
        assert fits(record, "neon") and not fits(record, "vanilla"), kind
    image_only = decode_record(fpi_record(TAG, old_page()))
    assert not tells_format(image_only) and fits(image_only, "vanilla") and fits(image_only, "neon")


def vanilla_wal() -> list[bytes]:
    return [heap_insert_record(TAG, 1, ROW1, fmt="vanilla", xid=XID, init=True),
            heap_multi_insert_record(OTHER, [ROW2, ROW3] * 120, fmt="vanilla", xid=XID),  # crosses pages
            heap_update_record(TAG, 1, 2, ROW3, fmt="vanilla", xid=XID, old_xmax=XID),
            fpi_record(OTHER, old_page()),
            heap_delete_record(TAG, 2, fmt="vanilla", xid=XID, xmax=XID)]


def neon_wal() -> list[bytes]:
    return [raw for _tag, _base, raw in neon_records().values()] + [fpi_record(OTHER, old_page())]


def doctor(wal_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walredod", "doctor", "--wal", str(wal_dir)], capture_output=True,
                          text=True, timeout=120, check=False)


def test_doctor_wal_names_the_format(tmp_path):
    for name, records, verdict in (("vanilla", vanilla_wal(), 'format          : vanilla'),
                                   ("neon", neon_wal(), 'engine.wal_format = "neon"')):
        wal_dir = tmp_path / name
        wal_dir.mkdir()
        write_wal_segment(wal_dir, records)
        report = classify(WalReader(wal_dir).records())
        assert report.records == len(records) and report.verdict == name
        done = doctor(wal_dir)
        assert done.returncode == 0, done.stderr
        assert verdict in done.stdout and f"{len(records)} records" in done.stdout


def test_doctor_wal_refuses_mixed_wal(tmp_path):
    write_wal_segment(tmp_path, vanilla_wal() + neon_wal())
    done = doctor(tmp_path)
    assert done.returncode == 1 and "mixed" in done.stdout


def test_doctor_wal_on_real_vanilla_wal(scenario):
    """PostgreSQL 15's own WAL (the ground-truth scenario) is vanilla; no record in it fits Neon's layout only."""
    report = classify(WalReader(scenario.wal_dir).records())
    assert report.telling > 1000 and report.fits["neon"] == 0 and report.fits["neither"] == 0
    assert report.verdict == "vanilla"


def test_visibility_map_clears_read_the_format_s_flags():
    """Delete and lock keep their flags at 7 in vanilla WAL and at 13 in Neon's: the VM bits they clear are found
    in both (and a Neon record read as vanilla would take its padding for flags)."""
    from walredod.ingest import visibility_map_clears

    for lock, bits in ((False, 0x03), (True, 0x02)):
        for fmt in ("vanilla", "neon"):
            record = decode_record(heap_delete_record(TAG, 1, fmt=fmt, xid=XID, xmax=XID, flags=0x01, lock=lock))
            assert visibility_map_clears(record, fmt) == [(TAG.relation, BLK, bits)]
            quiet = decode_record(heap_delete_record(TAG, 1, fmt=fmt, xid=XID, xmax=XID, flags=0, lock=lock))
            assert visibility_map_clears(quiet, fmt) == []


@pytest.mark.parametrize("fmt", ["vanilla", "neon"])
@pytest.mark.parametrize("record", ["insert", "multi-insert", "update-with-prefix"])
def test_a_tuple_longer_than_a_heap_tuple_is_refused(vanilla, neon, fmt, record):
    """Heap redo builds a logged tuple in a stack buffer of MaxHeapTupleSize bytes that only an Assert guards, and
    block data may be 64 kB: a longer tuple (a crafted record with a good CRC) is refused before redo, in either
    format, and the child serves on."""
    engine = vanilla if fmt == "vanilla" else neon
    long_row = HeapTuple(infomask2=1, infomask=0, body=b"\0" + b"x" * 8200)  # t_hoff 24: one byte of padding
    end = LSN + 0x90
    built = {
        "insert": lambda: heap_insert_record(TAG, 1, long_row, fmt=fmt, xid=XID, init=True),
        "multi-insert": lambda: heap_multi_insert_record(TAG, [long_row], fmt=fmt, xid=XID),
        # The new tuple alone fits; with the prefix taken from the old tuple it would not.
        "update-with-prefix": lambda: heap_update_record(TAG, 1, 2, ROW3, fmt=fmt, xid=XID, old_xmax=XID,
                                                         prefix_len=8180),
    }[record]()
    pid, restarts = engine.child_pid, dict(engine.stats.restarts)
    with pytest.raises(InvalidRequest, match="more than a heap tuple holds"):
        engine.redo(TAG, end, None if record != "update-with-prefix" else make_page(0x10), [WalRecord(end, built)])
    assert (engine.child_pid, engine.stats.restarts) == (pid, restarts)
    vanilla_insert_serves(vanilla)
