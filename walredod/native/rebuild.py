"""Rebuild a non-relation object, or a visibility-map page, from its earlier state and its history.

A history is a list of ``WalRecord(lsn, data)`` in WAL order, where ``data`` is a raw XLogRecord or a synthesized
record (walredod.native.synthesized). Relation pages go to the redo child; everything here runs in Python, except
the raw records of a visibility-map page (visibility records and page images), which the redo child applies between
the synthesized ones.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from walredod.errors import InvalidRequest, RedoTimeout
from walredod.native import files, slru, synthesized, visibilitymap
from walredod.objects import RelMapTag, SlruPageTag, TwoPhaseTag, check_base_image
from walredod.types import BLCKSZ, BufferTag, ForkNumber, WalRecord
from walredod.wal import WalDecodeError, decode_record, verify_crc

ObjectTag = SlruPageTag | RelMapTag | TwoPhaseTag


def decode_history_record(record: WalRecord):
    """A synthesized record, or a raw one checked (length, CRC) and decoded."""
    data = bytes(record.data)
    if synthesized.is_synthesized(data):
        return synthesized.decode(data)
    try:
        decoded = decode_record(data, end_lsn=record.lsn)
    except WalDecodeError as exc:
        raise InvalidRequest(f"record ending at {record.lsn:X}: {exc}") from None
    if not verify_crc(data):
        raise InvalidRequest(f"record ending at {record.lsn:X} fails its CRC check")
    return decoded


def _within(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise RedoTimeout("the request's deadline passed while its records were applied")


def rebuild_object(tag: ObjectTag, base: bytes | None, records: Sequence[WalRecord],
                   deadline: float | None = None) -> bytes | None:
    """The object's contents after ``records``; None when it does not exist (a finished prepared transaction).
    Past ``deadline`` (time.monotonic()) it stops with RedoTimeout."""
    if not isinstance(tag, (SlruPageTag, RelMapTag, TwoPhaseTag)):
        raise InvalidRequest(f"{tag!r} is not an object rebuilt in Python")
    check_base_image(tag, base)
    if isinstance(tag, SlruPageTag):
        page = bytearray(base) if base is not None else bytearray(BLCKSZ)
        removed = False
        for record in records:
            _within(deadline)
            try:
                if not slru.apply(tag, page, decode_history_record(record)):
                    raise InvalidRequest(f"a record ending at {record.lsn:X} does not change {tag}")
                removed = False
            except slru.PageRemoved:
                removed = True  # a later zero-page record may bring it back
        return None if removed else bytes(page)
    content = base
    apply = files.apply_relmap if isinstance(tag, RelMapTag) else files.apply_twophase
    for record in records:
        _within(deadline)
        content = apply(tag, content, decode_history_record(record))
    return content


def rebuild_visibility_map_page(engine, tag: BufferTag, lsn: int, base: bytes | None,
                                records: Sequence[WalRecord], deadline: float | None = None) -> bytes | None:
    """A visibility-map page: runs of raw records go to the redo child, synthesized ones are applied here, all by
    ``deadline`` (time.monotonic(); None: each run of raw records gets the engine's request_timeout).

    None when a truncation cut the page off (and nothing touched it since).
    """
    if tag.forknum != ForkNumber.VISIBILITYMAP:
        raise InvalidRequest(f"{tag} is not a visibility-map page")
    check_base_image(tag, base)
    page: bytes | None = base
    raw: list[WalRecord] = []

    def flush() -> None:
        nonlocal page
        if raw:
            page = engine.redo(tag, raw[-1].lsn, page, raw, deadline=deadline)
            raw.clear()

    for record in records:
        if not synthesized.is_synthesized(record.data):
            raw.append(record)
            continue
        flush()
        _within(deadline)
        change = synthesized.decode(record.data)
        if isinstance(change, synthesized.ClearVisibilityMapFlags):
            if not any(visibilitymap.map_block_of(b) == tag.blkno for b in change.heap_blocks):
                raise InvalidRequest(f"a record ending at {record.lsn:X} does not change {tag}")
            buffer = bytearray(page) if page is not None else visibilitymap.new_page()
            visibilitymap.clear(buffer, tag.blkno, change)
            page = bytes(buffer)
        elif isinstance(change, synthesized.TruncateVisibilityMap):
            if page is not None:
                buffer = bytearray(page)
                page = None if visibilitymap.truncate(buffer, tag.blkno, change) else bytes(buffer)
        else:
            raise InvalidRequest(f"{type(change).__name__} records do not change {tag}")
    flush()
    return page
