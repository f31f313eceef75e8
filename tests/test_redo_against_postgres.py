"""Pages rebuilt by the redo engine are byte-identical to the pages PostgreSQL's own recovery produced.

For each cut of the ground-truth scenario: every main-fork and init-fork page that a record after the cut
references is rebuilt from its image in the copy PostgreSQL recovered to the cut (none, if the page did not exist
yet or was cut off by a truncation since) plus its records after the cut, and compared with the page in the copy
PostgreSQL recovered to the end of the WAL. Visibility-map pages need records of their own (heap records clear
their bits without referencing them): tests/test_native_redo.py compares them. Free-space-map pages are changed
by PostgreSQL's recovery without WAL: they are not compared.
"""

from __future__ import annotations

import collections

import pytest

from conftest import report_comparison
from groundtruth.cluster import read_page
from walredod.ingest import page_histories
from walredod.types import ForkNumber

COMPARED_FORKS = (ForkNumber.MAIN, ForkNumber.INIT)
SKIPPED_FORKS = {
    ForkNumber.FSM: "free space map pages: PostgreSQL's recovery also changes them without WAL",
    ForkNumber.VISIBILITYMAP: "visibility map pages: compared in test_native_redo (heap records clear their bits "
                              "without referencing them; their histories need synthesized records)",
}
REQUIRED_RMGRS = {"Heap", "Heap2", "Btree", "Hash", "Gin", "Gist", "SPGist", "BRIN", "Sequence", "Generic", "XLOG"}


@pytest.mark.postgres
@pytest.mark.parametrize("cut_index", [0, 1])
def test_every_touched_page_matches_postgres_recovery(scenario, wal_records, redo_engine, cut_index):
    cut = scenario.cuts[cut_index]
    histories = page_histories(wal_records, since_lsn=cut)
    pages_by_rmgr: collections.Counter = collections.Counter()
    applied_by_rmgr: collections.Counter = collections.Counter()
    skipped: collections.Counter = collections.Counter()
    mismatches = []
    checked = 0
    for tag, history in sorted(histories.items()):
        if tag.forknum not in COMPARED_FORKS:
            skipped[SKIPPED_FORKS[tag.forknum]] += 1
            continue
        expected = read_page(scenario.final_dir, tag)
        if expected is None:
            skipped["gone at the end (relation dropped or truncated): nothing to compare with"] += 1
            continue
        base = None if history.starts_empty else read_page(scenario.recovered[cut], tag)
        page = redo_engine.redo(tag, history.lsn, base, history.wal_records())
        checked += 1
        rmgrs = collections.Counter(record.rmgr_name for record in history.records)
        applied_by_rmgr.update(rmgrs)
        pages_by_rmgr.update(rmgrs.keys())
        if page != expected:
            first = next(i for i in range(len(page)) if page[i] != expected[i])
            mismatches.append(f"{tag}: {len(history.records)} records, first differing byte at {first}")

    report_comparison(f"cut {cut_index + 1} at {cut:X}: {checked} pages rebuilt and compared, "
                      f"{len(mismatches)} mismatches", ("rmgr", "pages", "records applied"),
                      {name: (pages_by_rmgr[name], applied_by_rmgr[name]) for name in pages_by_rmgr}, skipped)

    assert not mismatches, "\n".join(mismatches[:20])
    assert checked > 1000
    assert REQUIRED_RMGRS <= set(pages_by_rmgr), REQUIRED_RMGRS - set(pages_by_rmgr)
