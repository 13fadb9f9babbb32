"""`env: replay` from a spec, on the recorded-GSM8K fixture (the in-repo subset, and the full
data where it is found)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from graphtune.errors import SpecError
from graphtune.spec import load_spec, parse_spec

from datafiles import DATA, SOURCES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "replay-gsm8k.yaml"


@pytest.mark.parametrize("data", SOURCES)
def test_optimize_on_recorded_answers(tmp_path, data):
    """The example as shipped (the in-repo subset: dev 60, test 40 of 100 questions), and on
    the full data where it is found (dev 200, test 300 of 1,319)."""
    from graphtune.api import optimize
    from graphtune.store import Storage

    overrides = {"storage": f"sqlite:///{tmp_path / 'r.db'}", "search.evaluations": 4}
    if data == "full":
        overrides |= {"env.records": str(DATA["full"] / "recorded"), "task.dev_size": 200, "task.test_size": 300}
    spec = load_spec(EXAMPLE, overrides=overrides)
    dev, test = spec.task.dev_size, spec.task.test_size
    assert (dev, test) == ((60, 40) if data == "subset" else (200, 300))
    problem, study, out = optimize(spec)
    assert out.best is not None and out.runs_spent >= 4 * dev
    store = Storage(spec.storage)
    trials = [t for t in store.list_trials(study.id, split="dev") if t.status == "complete"]
    singles = [t for t in trials if len(t.graph["nodes"]) == 1]
    multis = [t for t in trials if len(t.graph["nodes"]) > 1]
    assert singles and multis
    # one call of a real system: replayed as recorded; anything with inputs: modelled, flagged
    assert not any(r.modelled for r in store.trial_results(singles[0].id))
    assert all(r.modelled for r in store.trial_results(multis[0].id))
    assert len(out.test_results) == test


def test_the_example_runs_from_the_repository_root_and_from_examples(tmp_path, monkeypatch):
    """`records: data/recorded` resolves beside the spec from any working directory."""
    for cwd in (ROOT, ROOT / "examples", tmp_path):
        monkeypatch.chdir(cwd)
        assert Path(load_spec(EXAMPLE).records_source()).resolve() == (DATA["subset"] / "recorded").resolve()


def test_replay_spec_errors(tmp_path):
    data = yaml.safe_load(EXAMPLE.read_text())
    data["env"].pop("records")
    with pytest.raises(SpecError, match="env.kind `replay` needs env.records"):
        parse_spec(data)
    data = yaml.safe_load(EXAMPLE.read_text())
    data["task"]["profile"] = "math"
    with pytest.raises(SpecError, match="task.profile is for the simulator"):
        parse_spec(data)
