"""pg_waldump's view of WAL, parsed: the reference our WAL reader is checked against."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from walredod.types import format_lsn, parse_lsn

PG_BINDIR = Path("/usr/lib/postgresql/15/bin")
FORKS = {"main": 0, "fsm": 1, "vm": 2, "init": 3}

_RECORD = re.compile(
    r"^rmgr: (?P<rmgr>\S+)\s+len \(rec/tot\):\s+(?P<rec>\d+)/\s*(?P<tot>\d+), tx:\s+(?P<xid>\d+), "
    r"lsn: (?P<lsn>[0-9A-F]+/[0-9A-F]+), prev (?P<prev>[0-9A-F]+/[0-9A-F]+), desc: "
)
_BLOCK = re.compile(
    r"^\tblkref #(?P<id>\d+): rel (?P<spc>\d+)/(?P<db>\d+)/(?P<rel>\d+) fork (?P<fork>\w+) blk (?P<blk>\d+)"
    r"(?: \(FPW(?P<verify> for WAL verification)?\); hole: offset: (?P<hole_off>\d+), length: (?P<hole_len>\d+)"
    r"(?:, compression saved: \d+, method: (?P<method>\w+))?)?"
)
_END = re.compile(r"error in WAL record at (?P<lsn>[0-9A-F]+/[0-9A-F]+): (?P<reason>.*)")


@dataclass
class DumpedRecord:
    rmgr: str
    rec_len: int
    tot_len: int
    xid: int
    lsn: int
    prev: int
    blocks: list[tuple]  # (block_id, (spc, db, rel, fork, blk), image: None | (apply, hole_off, hole_len, method))


def waldump(wal_dir: Path, start_lsn: int, end_lsn: int | None = None) -> tuple[list[DumpedRecord], int | None]:
    """Records pg_waldump -b reads from ``start_lsn``, and the LSN where it found valid WAL to end (if it did).

    That LSN is where reading failed: a record's start, or the start of the page a torn record should continue on.
    """
    argv = [str(PG_BINDIR / "pg_waldump"), "-b", "-p", str(wal_dir), "-s", format_lsn(start_lsn)]
    if end_lsn is not None:
        argv += ["-e", format_lsn(end_lsn)]
    result = subprocess.run(argv, capture_output=True, text=True)
    records: list[DumpedRecord] = []
    for line in result.stdout.splitlines():
        if m := _RECORD.match(line):
            records.append(DumpedRecord(m["rmgr"], int(m["rec"]), int(m["tot"]), int(m["xid"]),
                                        parse_lsn(m["lsn"]), parse_lsn(m["prev"]), []))
        elif m := _BLOCK.match(line):
            image = None
            if m["hole_off"] is not None:
                image = (m["verify"] is None, int(m["hole_off"]), int(m["hole_len"]), m["method"])
            tag = (int(m["spc"]), int(m["db"]), int(m["rel"]), FORKS[m["fork"]], int(m["blk"]))
            records[-1].blocks.append((int(m["id"]), tag, image))
        elif line.strip():
            raise AssertionError(f"unexpected pg_waldump line: {line!r}")
    # pg_waldump names the last good record, then the reason, which holds the LSN where reading failed.
    end = _END.search(result.stderr)
    if end is None:
        return records, None
    if failed_at := re.search(r" at ([0-9A-F]+/[0-9A-F]+)", end["reason"]):
        return records, parse_lsn(failed_at[1])
    if in_segment := re.search(r"in log segment ([0-9A-F]{24}), offset (\d+)", end["reason"]):
        name, offset = in_segment[1], int(in_segment[2])
        segment_size = (Path(wal_dir) / name).stat().st_size
        segno = int(name[8:16], 16) * (0x1_0000_0000 // segment_size) + int(name[16:24], 16)
        return records, segno * segment_size + offset
    raise AssertionError(f"cannot tell where pg_waldump stopped: {end['reason']}")
