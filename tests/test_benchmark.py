"""The shipped request sample and the benchmark driver (not speed: that is for bench/, never for tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from walredod.tools import benchmark
from walredod.types import BLCKSZ, BufferTag


def test_sample_holds_the_request_sets(tmp_path):
    sets = benchmark.read_sample()
    assert set(sets) == {"short", "medium", "natural-heap-btree", "natural-index"}
    assert all(len(records) == 2 for _, _, _, records in sets["short"])
    assert all(200 <= len(records) <= 230 for _, _, _, records in sets["medium"])
    for tag, lsn, base, records in sets["medium"]:
        assert isinstance(tag, BufferTag) and (base is None or len(base) == BLCKSZ) and records[-1].lsn == lsn
    copy = tmp_path / "copy.bin.gz"
    benchmark.write_sample(copy, {"short": sets["short"][:3]})
    assert benchmark.read_sample(copy) == {"short": sets["short"][:3]}


def test_sample_pages_replay_on_the_engine(engine_data_dir):
    from walredod.engine import RedoEngine

    with RedoEngine(data_dir=engine_data_dir, source_logs_hint_bits=True) as engine:
        for tag, lsn, base, records in benchmark.read_sample()["medium"][:5]:
            assert len(engine.redo(tag, lsn, base, records)) == BLCKSZ


def test_walredod_bench_command(tmp_path, engine_data_dir):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "walredod", "bench", "--mix", "short", "--seconds", "0.5",
                             "--data-dir", str(engine_data_dir), "--json", str(out), "--plot", str(tmp_path / "b.png")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    run = json.loads(out.read_text())["runs"][0]
    assert run["requests_per_s"] > 0 and run["p50_us"] > 0
    assert (tmp_path / "b.png").stat().st_size > 0


def test_transport_floor_reports_latency_and_cpu_per_stage():
    """The floor harness the daemon study compares against: every hop measured, CPU per request by process."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from transport_floor import floors

    from walredod import protocol

    tag, lsn, base, records = benchmark.read_sample()["short"][0]
    result = floors(protocol.encode_redo_request(1, tag, lsn, base, records), seconds=0.3)
    assert set(result) == {"direct_sync", "brokered_sync", "direct_pipelined", "brokered_pipelined"}
    assert all(figures["requests_per_s"] > 0 for figures in result.values())
    assert result["direct_sync"]["p50_us"] > 0
    assert result["brokered_pipelined"]["cpu_us_per_request"]["broker"] > 0
    assert result["direct_pipelined"]["cpu_us_per_request"]["echo"] > 0
