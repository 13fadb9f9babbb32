"""Pareto fronts, hypervolume and selectors (graphtune.pareto), the Pareto option of the
REINFORCE searchers, and `graphtune pareto` / `graphtune compare`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from graphtune.cli import app
from graphtune.errors import SpecError
from graphtune.pareto import (FrontPoint, SelectError, front_of_pairs, hypervolume, pareto_front, points_from_trials,
                              select)
from test_export import make_study


def pt(n, acc, units, usd=0.0, lat=0.0, cov=100):
    return FrontPoint(graph_hash=f"h{n}", graph={}, trial_number=n, accuracy=acc, n=cov, cost_units=units,
                      flops=units * 1e12, usd=usd, latency_s=lat)


POINTS = [pt(1, 0.30, 1.0, 0.001, 1.0), pt(2, 0.40, 3.0, 0.002, 1.5), pt(3, 0.35, 4.0, 0.003, 3.0),
          pt(4, 0.55, 12.0, 0.004, 4.0), pt(5, 0.40, 3.0, 0.002, 2.0), pt(6, 0.50, 8.0, 0.001, 5.0)]


def test_front_is_non_dominated_and_cheapest_first():
    f = pareto_front(POINTS, "units")
    assert [p.trial_number for p in f] == [1, 2, 6, 4]  # 3 dominated by 2; 5 ties 2, later trial
    f = pareto_front(POINTS, "cost_usd")
    assert [p.trial_number for p in f] == [6, 4]
    assert [p.trial_number for p in pareto_front(POINTS, "latency_s")] == [1, 2, 4]
    with pytest.raises(SelectError, match="unknown cost metric"):
        pareto_front(POINTS, "joules")


def test_hypervolume_by_hand():
    assert front_of_pairs([(1, 0.3), (2, 0.2), (3, 0.5)]) == [(1, 0.3), (3, 0.5)]
    # (1,.3) covers [1,3) x .3 = .6, (3,.5) covers [3,4) x .5 = .5
    assert hypervolume([(1, 0.3), (2, 0.2), (3, 0.5)], ref_cost=4) == pytest.approx(1.1)
    assert hypervolume([(5, 0.9)], ref_cost=4) == 0.0  # outside the box
    assert hypervolume([], ref_cost=4) == 0.0
    # adding a dominated point changes nothing; a new front point only adds
    base = hypervolume([(1, 0.3), (3, 0.5)], 4)
    assert hypervolume([(1, 0.3), (3, 0.5), (3.5, 0.4)], 4) == pytest.approx(base)
    assert hypervolume([(1, 0.3), (3, 0.5), (2, 0.45)], 4) > base


def test_selectors():
    rec = POINTS[2]
    assert select(POINTS, "best", recommended=rec) == [rec]
    assert select(POINTS, "best")[0].trial_number == 4
    assert [p.trial_number for p in select(POINTS, "pareto")] == [1, 2, 6, 4]
    assert select(POINTS, "units<=8")[0].trial_number == 6
    assert select(POINTS, "cost_usd<=0.002")[0].trial_number == 6
    assert select(POINTS, "latency_s<=2")[0].trial_number == 2
    assert select(POINTS, "latency_s < 1.5")[0].trial_number == 1
    assert select(POINTS, "accuracy>=0.45")[0].trial_number == 4
    assert select(POINTS, "#3")[0].trial_number == 3 and select(POINTS, "trial=5")[0].trial_number == 5
    with pytest.raises(SelectError, match="no graph on the front"):
        select(POINTS, "units<=0.5")
    with pytest.raises(SelectError, match="cannot read selector"):
        select(POINTS, "cheap")
    with pytest.raises(SelectError, match="trial #99"):
        select(POINTS, "#99")
    with pytest.raises(SelectError, match="no finished dev trials"):
        select([], "best")


def test_points_pool_each_graph_on_its_best_covered_trial():
    def t(num, h, nq, acc, units, status="complete", split="dev"):
        return SimpleNamespace(number=num, graph_hash=h, graph={"h": h}, question_ids=[f"q{i}" for i in range(nq)],
                               accuracy=acc, status=status, split=split, cost_units=units, flops=1.0, usd=0.0,
                               latency_s=1.0, reward=acc, method="m")

    trials = [t(1, "a", 10, 0.9, 2), t(2, "b", 40, 0.5, 3), t(3, "a", 40, 0.6, 2), t(4, "c", 10, 1.0, 1),
              t(5, "d", 40, 0.7, 9, status="failed"), t(6, "e", 40, 0.8, 9, split="test")]
    pts = points_from_trials(trials)
    assert [(p.trial_number, p.accuracy) for p in pts] == [(2, 0.5), (3, 0.6)]  # c: 10 < 40 // 2 questions
    assert {p.graph_hash for p in points_from_trials(trials, min_questions=1)} == {"a", "b", "c"}


# -- the searcher option ---------------------------------------------------------------------


def test_pareto_option_is_validated():
    from graphtune.search.reinforce import pareto_metric

    assert pareto_metric(None) is None and pareto_metric([]) is None
    assert pareto_metric("units") == "units" and pareto_metric(["cost_usd"]) == "usd"
    assert pareto_metric("latency_s") == "latency_s" and pareto_metric("flops") == "flops"
    with pytest.raises(SpecError, match="unknown cost metric"):
        pareto_metric("joules")
    with pytest.raises(SpecError, match="one cost metric"):
        pareto_metric(["units", "latency_s"])


@pytest.mark.parametrize("method", ["agent-reinforce", "reinforce"])
def test_pareto_search_is_deterministic_and_keeps_accuracy_as_reward(tmp_path, method):
    from graphtune.store.storage import Storage

    db = make_study(tmp_path, method=method, evaluations=8, options={"pareto": "units", "n0": 6})
    store = Storage(db)
    st = store.get_study("s")
    trials = [t for t in store.list_trials(st.id, split="dev") if t.status == "complete"]
    assert trials and all(t.reward == pytest.approx(t.accuracy) for t in trials)  # objective unchanged
    records = _resumed_searcher(store, st).racing.records  # the evidence, rebuilt from the stored trials
    assert records and all(d.pcost is not None for d in records.values())
    assert "evidence" not in st.searcher_state  # the store holds it; the saved state does not copy it
    assert len({t.graph_hash for t in trials}) > 5
    # the same search again is deterministic
    again = tmp_path / "again"
    again.mkdir()
    db2 = make_study(again, method=method, evaluations=8, options={"pareto": "units", "n0": 6})
    t2 = [t for t in Storage(db2).list_trials(Storage(db2).get_study("s").id, split="dev") if t.status == "complete"]
    assert [(t.graph_hash, t.question_ids) for t in t2] == [(t.graph_hash, t.question_ids) for t in trials]


def test_default_path_has_no_pareto_state(tmp_path):
    from graphtune.store.storage import Storage

    db = make_study(tmp_path, method="reinforce", evaluations=4)
    store = Storage(db)
    st = store.get_study("s")
    records = _resumed_searcher(store, st).racing.records
    assert records and not any(d.pcost is not None for d in records.values())


def _resumed_searcher(store, st):
    """The study's searcher as a resumed run rebuilds it: its saved state, then the trials
    it was told, from the store."""
    from graphtune.api import build_problem, make_searcher
    from graphtune.search.engine import BatchEngine
    from graphtune.spec import parse_spec, stored_spec_data

    spec = parse_spec({**stored_spec_data(dict(st.spec)), "study": st.name, "storage": store.url})
    problem = build_problem(spec)
    searcher = make_searcher(spec, problem.ctx)
    BatchEngine(env=problem.env, storage=store, study=st, ctx=problem.ctx).resume(searcher)
    problem.env.close()
    return searcher


# -- CLI --------------------------------------------------------------------------------------


def test_cli_pareto_and_compare(tmp_path):
    db = make_study(tmp_path, name="a", evaluations=6)
    make_study(tmp_path, name="b", method="nsga2", evaluations=6)
    runner = CliRunner()
    r = runner.invoke(app, ["pareto", "a", "--storage", db], catch_exceptions=False, terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "Pareto front of a" in r.output and "hypervolume" in r.output and "*" in r.output
    r = runner.invoke(app, ["pareto", "a", "--metric", "latency_s", "--storage", db], terminal_width=200)
    assert r.exit_code == 0 and "vs latency_s" in r.output
    r = runner.invoke(app, ["pareto", "a", "--metric", "joules", "--storage", db])
    assert r.exit_code == 2 and r.output.startswith("error: unknown cost metric")
    r = runner.invoke(app, ["pareto", "zzz", "--storage", db])
    assert r.exit_code != 0 and "no study named 'zzz'" in r.output
    png = tmp_path / "cmp.png"
    r = runner.invoke(app, ["compare", "a", "b", "--storage", db, "--png", str(png)], catch_exceptions=False,
                      terminal_width=250)
    assert r.exit_code == 0, r.output
    assert "random" in r.output and "nsga2" in r.output and "HV" in r.output
    assert png.read_bytes()[:4] == b"\x89PNG"
