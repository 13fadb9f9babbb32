"""A small run of benchmarks/load_bench.py: several workers, one study, a filled call
ledger; the read commands work and the counts and sums agree (trials listed = counted =
reported by the workers; runs_spent = sum of new_runs; no result paid twice; the ledger
holds exactly the calls put). SQLite always; PostgreSQL when ``GRAPHTUNE_TEST_POSTGRES_URL``
is set. The full-size figures (4 workers, 1,000+ trials, 100k calls) are in
docs/benchmarks.md "Load"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "load_bench.py"
PG_URL = os.environ.get("GRAPHTUNE_TEST_POSTGRES_URL")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(
    not PG_URL, reason="set GRAPHTUNE_TEST_POSTGRES_URL (bash scripts/postgres.sh start)"))])
def test_workers_and_a_filled_ledger_leave_counts_and_sums_consistent(tmp_path, backend):
    out = tmp_path / "load.json"
    args = [sys.executable, str(SCRIPT), "--workers", "3", "--trials", "60", "--ledger", "3000", "--batch-size", "16",
            "--dev-size", "10", "--repeat", "1", "--no-cold", "--json", str(out)]
    env = dict(os.environ)
    if backend == "sqlite":
        args += ["--storage", f"sqlite:///{tmp_path / 'load.db'}"]
        env.pop("GRAPHTUNE_TEST_POSTGRES_URL", None)
    p = subprocess.run(args, capture_output=True, text=True, timeout=280, env=env)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    res = json.loads(out.read_text())
    c = res["consistency"]
    assert c["problems"] == []
    assert c["dev_trials"] >= 60 and c["trials"] == c["dev_trials"] + 1  # plus the test trial
    assert c["runs_spent"] == c["sum_new_runs_dev"] and c["duplicate_results"] == 0
    assert c["workers"] == 3 and c["workers_trials_done"] == c["trials"]
    assert c["ledger_calls"] == 3000 and c["ledger_duplicates"] == 0
    assert set(res["commands"]) == {"studies", "trials", "show"}
    # `graphtune trials`: a title, a header and one plain line per trial (a rich Table took
    # 3 s to lay out 1,000 trials: docs/benchmarks.md "Load")
    assert res["commands"]["trials"]["output_lines"] == c["trials"] + 2
