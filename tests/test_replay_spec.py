"""`env: replay` from a spec, on the shared recorded-GSM8K fixture."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from graphtune.errors import SpecError
from graphtune.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "replay-gsm8k.yaml"
SHARED = ROOT.parent / "shared" / "data" / "recorded"


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data/recorded (the recorded GSM8K fixture)")
def test_optimize_on_recorded_answers(tmp_path):
    from graphtune.api import optimize
    from graphtune.store import Storage

    spec = load_spec(EXAMPLE, overrides={"storage": f"sqlite:///{tmp_path / 'r.db'}", "search.evaluations": 4,
                                         "task.test_size": 300})
    problem, study, out = optimize(spec)
    assert out.best is not None and out.runs_spent >= 4 * 200
    store = Storage(spec.storage)
    trials = [t for t in store.list_trials(study.id, split="dev") if t.status == "complete"]
    singles = [t for t in trials if len(t.graph["nodes"]) == 1]
    multis = [t for t in trials if len(t.graph["nodes"]) > 1]
    assert singles and multis
    # one call of a real system: replayed as recorded; anything with inputs: modelled, flagged
    assert not any(r.modelled for r in store.trial_results(singles[0].id))
    assert all(r.modelled for r in store.trial_results(multis[0].id))
    assert len(out.test_results) == 300


def test_replay_spec_errors(tmp_path):
    data = yaml.safe_load(EXAMPLE.read_text())
    data["env"].pop("records")
    with pytest.raises(SpecError, match="env.kind `replay` needs env.records"):
        parse_spec(data)
    data = yaml.safe_load(EXAMPLE.read_text())
    data["task"]["profile"] = "math"
    with pytest.raises(SpecError, match="task.profile is for the simulator"):
        parse_spec(data)
