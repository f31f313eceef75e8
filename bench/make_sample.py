#!/usr/bin/env python3
"""Regenerate walredod/tools/data/requests.bin.gz: request sets cut from real PostgreSQL 15 WAL.

    python3 bench/make_sample.py

Builds the ground-truth scenario (a real PostgreSQL 15 server, tests/groundtruth), takes every main-fork page's
history after the second cut, and writes:

- short: the first 2 records of a page's history (heap and btree pages, and index pages), from its image at the cut;
- medium: the first 200-230 records of the longest histories;
- natural-heap-btree / natural-index: whole histories as they come, for heap and btree pages (a pgbench-like mix)
  and for the other index kinds.
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # ground-truth servers (test support)

from walredod.tools.benchmark import DEFAULT_SAMPLE, write_sample  # noqa: E402
from groundtruth.cluster import read_page  # noqa: E402
from groundtruth.scenario import build_scenario  # noqa: E402
from walredod.ingest import page_histories  # noqa: E402
from walredod.wal import WalReader  # noqa: E402

HEAP_BTREE = {"Heap", "Heap2", "Btree", "XLOG"}


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="walredod-sample-"))
    workdir.chmod(0o755)
    scenario = build_scenario(workdir)
    cut = scenario.cuts[1]
    histories = page_histories(WalReader(scenario.wal_dir).records(), since_lsn=cut)
    rng = random.Random(15)
    sets: dict[str, list] = {"short": [], "medium": [], "natural-heap-btree": [], "natural-index": []}
    for tag, history in sorted(histories.items()):
        if tag.forknum != 0:
            continue
        base = None if history.starts_empty else read_page(scenario.recovered[cut], tag)
        records = history.wal_records()
        if len(records) >= 2:
            sets["short"].append((tag, records[1].lsn, base, records[:2]))
        if len(records) >= 200:
            n = rng.randint(200, min(230, len(records)))
            sets["medium"].append((tag, records[n - 1].lsn, base, records[:n]))
        mix = "natural-heap-btree" if {r.rmgr_name for r in history.records} <= HEAP_BTREE else "natural-index"
        sets[mix].append((tag, history.lsn, base, records))
    for name, limit in (("short", 300), ("medium", 30), ("natural-heap-btree", 150), ("natural-index", 80)):
        if len(sets[name]) > limit:
            sets[name] = rng.sample(sets[name], limit)
        print(f"{name}: {len(sets[name])} requests, {sum(len(r[3]) for r in sets[name])} records")
    write_sample(DEFAULT_SAMPLE, sets)
    print(f"written {DEFAULT_SAMPLE} ({DEFAULT_SAMPLE.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
