"""`graphtune resume`, `delete`, `dump`, and continuing a study with a changed spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from graphtune.cli import app
from graphtune.store import Storage

SPEC = """
study: {study}
task:
  profile: math
  dev_size: 20
  test_size: 20
models:
  - name: llama-3.2-1b
  - name: llama-3.2-3b
space:
  max_nodes: 4
  max_in_degree: 3
budget:
  units: 12
search:
  method: {method}
  evaluations: 4
  batch_size: 2
  seed: 1
env:
  kind: simulated
storage: {storage}
"""


def write(tmp_path: Path, *, study="s", method="random", name="spec.yaml") -> tuple[Path, str]:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    p = tmp_path / name
    p.write_text(SPEC.format(study=study, method=method, storage=url))
    return p, url


def invoke(*args, ok=True):
    r = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output
    return r


def test_resume_continues_from_the_stored_spec_and_pays_nothing_twice(tmp_path):
    spec, url = write(tmp_path)
    invoke("optimize", spec, "--quiet")
    store = Storage(url)
    st = store.get_study("s")
    trials = [(t.batch, t.slot, t.graph_hash) for t in store.list_trials(st.id)]
    spec.unlink()  # resume needs only the store
    r = invoke("resume", "s", "--storage", url, "--quiet")
    assert "best graph" in r.output
    assert [(t.batch, t.slot, t.graph_hash) for t in store.list_trials(st.id)] == trials
    assert store.get_study("s").runs_spent == st.runs_spent
    invoke("resume", "s", "--storage", url, "--quiet", "-n", "6")
    assert store.get_study("s").runs_spent == 6 * 20  # more evaluations: safe, extends the study
    r = invoke("resume", "nope", "--storage", url, ok=False)
    assert r.exit_code != 0 and "no study named 'nope'" in r.output


def test_a_changed_spec_is_refused_naming_the_field_unless_forced_and_a_new_method_starts_fresh(tmp_path):
    spec, url = write(tmp_path, method="reinforce")
    invoke("optimize", spec, "--quiet")
    store = Storage(url)
    before = store.get_study("s")
    assert before.searcher_state is not None
    r = invoke("optimize", spec, "--quiet", "--method", "random", ok=False)
    assert r.exit_code == 2 and "search.method" in r.output and "--force" in r.output
    # tpe refuses a state that is not its own: the reinforce state must not reach it
    invoke("optimize", spec, "--quiet", "--method", "tpe", "--force", "-n", "6")
    after = store.get_study("s")
    assert after.method == "tpe" and after.searcher_state["sampler"] == "tpe"
    assert after.batch_index > before.batch_index and after.runs_spent >= 6 * 20
    dev = [t for t in store.list_trials(after.id, split="dev")]
    assert {t.method for t in dev} == {"reinforce", "tpe"}
    assert len({(t.batch, t.slot) for t in dev}) == len(dev)  # the new searcher starts after the old batches


def test_delete_asks_unless_yes(tmp_path):
    spec, url = write(tmp_path)
    invoke("optimize", spec, "--quiet")
    r = CliRunner().invoke(app, ["delete", "s", "--storage", url], input="n\n")
    assert r.exit_code == 1 and "nothing deleted" in r.output
    assert Storage(url).get_study("s") is not None
    r = invoke("delete", "s", "--storage", url, "--yes")
    assert "deleted study 's'" in r.output and Storage(url).get_study("s") is None
    r = invoke("delete", "s", "--storage", url, "--yes", ok=False)
    assert "no study named 's'" in r.output


def test_dump_writes_study_spec_trials_results_and_steps(tmp_path):
    spec, url = write(tmp_path, method="agent-reinforce")
    invoke("optimize", spec, "--quiet")
    out = tmp_path / "s.json"
    r = invoke("dump", "s", "--storage", url, "-o", out)
    assert "wrote" in r.output
    d = json.loads(out.read_text())
    assert d["study"]["name"] == "s" and d["spec"]["search"]["method"] == "agent-reinforce"
    assert d["trials"] and all("results" in t for t in d["trials"])
    assert len(d["trials"][0]["results"]) == len(d["trials"][0]["question_ids"])
    assert d["agent_steps"] and "prompt" in d["agent_steps"][0]


def test_dump_masks_a_storage_password():
    from graphtune.store.storage import mask_url

    assert "hunter2" not in mask_url("postgresql+psycopg://u:hunter2@db/x")


def test_dataset_paths_are_stored_absolute_and_old_relative_ones_still_match(tmp_path):
    from graphtune.api import changed_fields, stored_spec
    from graphtune.spec import load_spec

    (tmp_path / "qs.jsonl").write_text("".join(f'{{"id": "a{i}", "question": "1+1?", "answer": "2"}}\n' for i in range(2)))
    p = tmp_path / "live.yaml"
    p.write_text("""
study: l
task: {dataset: qs.jsonl, scorer: numeric, dev_size: 1, test_size: 1}
models: [{name: llama-3.2-1b, litellm: openai/echo, api_base: "http://127.0.0.1:9/v1"}]
budget: {units: 10}
env: {kind: live}
""")
    spec = load_spec(p)
    stored = stored_spec(spec)
    assert stored["task"]["dataset"] == str((tmp_path / "qs.jsonl").resolve())
    old = spec.resolved()  # as stores made before paths were stored absolute hold it
    assert old["task"]["dataset"] == "qs.jsonl"
    assert changed_fields(old, stored) == []
    other = dict(stored, task=dict(stored["task"], dataset="/elsewhere/other.jsonl"))
    assert changed_fields(old, other) == [("task", "dataset")]


def test_a_study_stored_with_the_flat_env_resumes_and_continues_unforced(tmp_path):
    # stores written while `env` was one model for every kind hold all kinds' fields
    spec, url = write(tmp_path)
    invoke("optimize", spec, "--quiet")
    store = Storage(url)
    st = store.get_study("s")
    flat = {"kind": "simulated", "seed": 0, "concurrency": 16, "cache": True, "timeout_s": 60.0, "max_retries": 2,
            "max_consecutive_failures": 20, "retry_after_max_s": 60.0, "temperature": 0.0, "max_tokens": 256,
            "records": None, "task": None, "synthesis": "math"}
    store.update_study_spec(st.id, dict(st.spec, env=flat))
    invoke("resume", "s", "--storage", url, "--quiet", "-n", "5")
    assert store.get_study("s").runs_spent == 5 * 20
    invoke("optimize", spec, "--quiet", "-n", "6")  # the same spec file: not a changed spec
    assert store.get_study("s").runs_spent == 6 * 20


def test_extending_a_study_shows_the_studys_best_from_the_first_trial_on(tmp_path):
    """The progress bar of a study continued with more evaluations starts from the best the
    study already has on the full dev set, not from this run's first trials."""
    import math

    from graphtune.api import optimize
    from graphtune.spec import load_spec

    path, url = write(tmp_path)
    optimize(load_spec(path))
    store = Storage(url, readonly=True)
    st = store.get_study("s")
    best = max(t.reward for t in store.list_trials(st.id, split="dev")
               if t.status == "complete" and len(t.question_ids) == 20 and math.isfinite(t.reward))
    store.close()
    events: list[dict] = []
    optimize(load_spec(path, overrides={"search.evaluations": 8}), progress=events.append)
    assert events and events[0]["best_full_dev"] >= best
    assert all(a["best_full_dev"] <= b["best_full_dev"] for a, b in zip(events, events[1:]))
    assert events[-1]["runs_spent"] <= events[-1]["budget_runs"] + 20
