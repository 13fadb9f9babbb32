"""Runs tests/kill9_resume.py: a live search killed with SIGKILL at random moments (at
least 10 times per method, agent-reinforce and tpe; and a two-stage live pipeline searched
by random), resumed each time, compared with an uninterrupted run of the same seed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("litellm")
pytest.importorskip("langgraph")

SCRIPT = Path(__file__).resolve().parent / "kill9_resume.py"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill9_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path):
    out = tmp_path / "kill9.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--kills", "10", "--json", str(out)], capture_output=True,
                       text=True, timeout=280)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    res = json.loads(out.read_text())["results"]
    assert {r["method"] for r in res} == {"agent-reinforce", "tpe"}
    for r in res:
        assert r["kills_mid_search"] >= 10 and r["resumes"] >= 10
        assert r["trials_match"] and r["best_graph_match"] and r["state_match"]
        assert r["duplicate_trials"] == 0 and r["repeated_llm_calls"] == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill9_of_a_live_pipeline_search_then_resume_matches_an_uninterrupted_run(tmp_path):
    """The same check on a two-stage live pipeline (a draft, then a check whose prompt holds
    the draft; `graphtune optimize` of a pipeline spec, method random)."""
    out = tmp_path / "kill9.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--pipeline", "--methods", "random", "--kills", "10", "--json",
                        str(out)], capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    [r] = json.loads(out.read_text())["results"]
    assert r["method"] == "pipeline-random"
    assert r["kills_mid_search"] >= 10 and r["resumes"] >= 10
    assert r["trials_match"] and r["best_graph_match"] and r["state_match"]
    assert r["duplicate_trials"] == 0 and r["repeated_llm_calls"] == 0
