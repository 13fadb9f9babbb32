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


# -- someone else's records: correctness only, seven models --------------------------------------

SEVEN = [f"m{i}" for i in range(7)]


def foreign_spec(tmp_path, *, env: dict | None = None, task: dict | None = None, method: str = "random") -> dict:
    """A replay spec over a correctness-only table (no answers, tokens or texts) written to CSV."""
    import csv

    rows = [{"task": "t", "question_id": f"q{q:03d}", "model": m, "sample": 0, "answer": "",
             "correct": (q * 7 + i * 3) % 10 < 3 + i}
            for q in range(60) for i, m in enumerate(SEVEN) if not (m == "m3" and q % 5 == 0)]
    path = tmp_path / "foreign.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return {"study": "foreign", "task": {"dev_size": 30, "test_size": 30, "input_tokens": 80, **(task or {})},
            "models": [{"name": m, "params": (i + 1) * 2e9, "layers": 32, "hidden": 4096, "usd_per_mtok": 0.1}
                       for i, m in enumerate(SEVEN)],
            "space": {"max_nodes": 4}, "budget": {"units": 20},
            "search": {"method": method, "evaluations": 6, "batch_size": 3},
            "env": {"kind": "replay", "records": str(path), "answers": "unknown", **(env or {})},
            "storage": f"sqlite:///{tmp_path / 'f.db'}"}


def test_output_tokens_alone_is_honoured_in_replay(tmp_path):
    from graphtune.api import build_problem

    p = build_problem(parse_spec(foreign_spec(tmp_path, task={"output_tokens": 33})))
    assert (p.env.shape.input_tokens, p.env.shape.output_tokens) == (80, 33)
    assert p.costs.shape.output_tokens == 33


@pytest.mark.parametrize("method", ["random", "agent-reinforce", "tpe", "exhaustive"])
def test_recorded_only_searches_fully_recorded_graphs_only(tmp_path, method):
    from graphtune.api import build_problem, optimize
    from graphtune.errors import GraphError
    from graphtune.graphs.model import Graph, Node
    from graphtune.graphs.space import validate
    from graphtune.store import Storage

    data = foreign_spec(tmp_path, env={"recorded_only": True}, task={"output_tokens": 40}, method=method)
    data["space"]["models"] = [m for m in SEVEN if m != "m3"]
    spec = parse_spec(data)
    p = build_problem(spec)
    two = Graph.build([Node.make("a", "assistant", "m0"), Node.make("b", "assistant", "m1")], [("a", "b")])
    with pytest.raises(GraphError, match="; env.recorded_only: only graphs of one node have every outcome recorded"):
        validate(two, p.ctx.space, p.costs, p.ctx.budget)
    problem, study, out = optimize(spec)
    store = Storage(spec.storage)
    trials = [t for t in store.list_trials(study.id) if t.status == "complete"]
    assert trials and all(len(t.graph["nodes"]) == 1 for t in trials)
    assert not any(r.modelled for t in trials for r in store.trial_results(t.id))
    assert all(t.metrics["n_modelled"] == 0 for t in trials)
    # a model not recorded on every dev and test question cannot be searched recorded-only
    data["space"].pop("models")
    with pytest.raises(SpecError, match="model 'm3' has no record on 12 of the 60 dev and test questions"):
        build_problem(parse_spec(data))


def test_the_modelled_share_stands_beside_every_replay_accuracy(tmp_path):
    from typer.testing import CliRunner

    from graphtune.cli import app

    spec = tmp_path / "foreign.yaml"
    spec.write_text(yaml.safe_dump(foreign_spec(tmp_path, task={"output_tokens": 40})))
    url = f"sqlite:///{tmp_path / 'f.db'}"
    r = CliRunner().invoke(app, ["optimize", str(spec)])
    assert r.exit_code == 0, r.output
    dev = next(x for x in r.output.splitlines() if "dev reward" in x)
    test = next(x for x in r.output.splitlines() if "test accuracy" in x)
    assert ("modelled" in dev or "all recorded" in dev) and ("modelled" in test or "all recorded" in test)
    r = CliRunner().invoke(app, ["trials", "foreign", "--storage", url])
    head = next(x for x in r.output.splitlines() if "split" in x.split())
    assert "modelled" in head.split() and "%" in r.output
    r = CliRunner().invoke(app, ["show", "foreign", "--storage", url])
    assert sum(("modelled" in x or "all recorded" in x) for x in r.output.splitlines()
               if x.startswith(("dev:", "test:"))) == 2


def test_the_token_default_is_one_warning_line_in_the_cli(tmp_path):
    import subprocess
    import sys

    data = foreign_spec(tmp_path)
    data["search"]["evaluations"] = 1
    spec = tmp_path / "foreign.yaml"
    spec.write_text(yaml.safe_dump(data))
    r = subprocess.run([sys.executable, "-m", "graphtune.cli", "optimize", str(spec)], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if "completion" in x]
    assert len(lines) == 1 and lines[0].startswith("warning: records ") and "256 tokens (the default)" in lines[0]
    assert "set task.output_tokens" in lines[0]


def test_docs_state_the_spec_default_of_test_size():
    from graphtune.spec import TaskSpec

    doc = (ROOT / "docs" / "replay.md").read_text()
    assert "all the rest" not in doc
    assert f"default {TaskSpec.model_fields['test_size'].default}" in doc


def test_a_replay_study_stored_before_the_new_options_continues_unchanged(tmp_path):
    from graphtune.api import changed_fields, stored_spec

    known = stored_spec(parse_spec(foreign_spec(tmp_path, env={"answers": "known"})))
    old = {**known, "env": {k: v for k, v in known["env"].items()
                            if k not in ("answers", "wrong_agreement", "recorded_only")}}
    assert changed_fields(old, known) == []  # it ran with the defaults
    assert changed_fields(old, stored_spec(parse_spec(foreign_spec(tmp_path)))) == [("env", "answers")]
