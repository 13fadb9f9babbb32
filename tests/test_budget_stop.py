"""Issue 13: a small space is searched to the end, and a search stops exactly at its budget.

* A space of 5 graphs (2 models, up to 2 assistants, 6 budget units) under ``reinforce`` and
  ``agent-reinforce``: the policy soon has no new graph to draw. The search used to stop
  there as "exhausted" with about a tenth of its budget spent, picking a graph that had beaten
  rivals measured on a few dozen questions; it now races the candidates up the prefix levels,
  so the pick is measured on the full dev set and is the best of the five on it.
* Every searcher stops at the budget, never past it: the trial that would pass it runs on the
  prefix of its questions the budget still pays for, and what it measured is reused.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from graphtune.api import build_problem, make_searcher
from graphtune.graphs import Budget, Space
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.catalog import LLAMA_POOL
from graphtune.graphs.space import enumerate_graphs
from graphtune.search.base import Objective, SearchContext
from graphtune.search.loop import run_search
from graphtune.search.registry import searcher_class
from graphtune.spec import parse_spec
from graphtune.store import MemoryStorage, Storage

from fakes import FakeEnv

DEV = 100


def _small_spec(method: str, evaluations: int, seed: int = 0, storage: str = "sqlite:///:memory:"):
    return parse_spec({
        "study": "small", "task": {"profile": "math", "dev_size": DEV, "test_size": 20},
        "models": [{"name": m} for m in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b")],
        "space": {"roles": ["assistant"], "max_nodes": 2, "max_width": 2, "max_depth": 2, "max_in_degree": 1},
        "budget": {"units": 6},  # only the two small models fit, alone or as two calls
        "search": {"method": method, "evaluations": evaluations, "batch_size": 8, "seed": seed},
        "env": {"kind": "simulated"}, "storage": storage})


def _run_small(method: str, evaluations: int, seed: int = 0):
    spec = _small_spec(method, evaluations, seed)
    p = build_problem(spec)
    graphs = list(enumerate_graphs(p.ctx.space, p.ctx.costs, p.ctx.budget))
    # every graph of the space on the whole dev set (the simulator is deterministic)
    full_dev = {graph_hash(g): sum(r.score for r in p.env.evaluate(g, p.ctx.dev_ids)) / DEV for g in graphs}
    store = MemoryStorage()
    st = store.create_study("s", method, {})
    out = run_search(make_searcher(spec, p.ctx), p.env, store, st, p.ctx, budget_runs=p.ctx.budget_runs,
                     test_ids=p.test_ids)
    return out, full_dev, store, st


@pytest.mark.parametrize("method", ["reinforce", "agent-reinforce"])
def test_a_five_graph_space_is_raced_to_the_full_dev_set_and_the_best_is_picked(method):
    # a budget that measures each of the 5 graphs on the whole dev set once
    out, full_dev, store, st = _run_small(method, evaluations=5)
    assert len(full_dev) == 5
    best = max(full_dev, key=full_dev.get)
    assert sorted(full_dev.values())[-2] < full_dev[best]  # one best graph, so the check means something
    assert out.runs_spent == 5 * DEV  # the whole budget (it used to stop "exhausted" after 84..196 runs)
    assert out.best.n == DEV  # the pick rests on the full dev set, not on a prefix
    assert out.best.graph_hash == best
    races = [t for t in store.list_trials(st.id, split="dev") if t.origin == "race"]
    assert races and max(len(t.question_ids) for t in races) == DEV


@pytest.mark.parametrize("method", ["reinforce", "agent-reinforce"])
def test_a_space_smaller_than_the_budget_is_searched_to_the_end(method):
    """20 x dev could measure the five graphs four times over: the search races every
    contender to the full dev set, then stops as exhausted (nothing is paid twice)."""
    out, full_dev, store, st = _run_small(method, evaluations=20)
    assert out.stopped == "exhausted"
    assert out.best.n == DEV and out.best.graph_hash == max(full_dev, key=full_dev.get)
    covered = {}
    for t in store.list_trials(st.id, split="dev"):
        covered.setdefault(t.graph_hash, set()).update(t.question_ids)
    assert out.runs_spent == sum(len(q) for q in covered.values()) <= 5 * DEV
    # every graph left short of the full dev set was measured and found worse than the pick
    assert all(len(q) == DEV or full_dev[h] < out.best.mean for h, q in covered.items())


class Interrupt(Exception):
    """Stands for a crash in the middle of a batch."""


@pytest.mark.parametrize("method", ["reinforce", "agent-reinforce"])
def test_a_small_space_race_interrupted_then_resumed_equals_an_uninterrupted_one(tmp_path, method):
    """The exhausted flag and the race's promotions are saved, so a search killed while
    racing the five graphs continues with the same trials (and the same cut last trial)."""
    from graphtune.api import optimize

    def trials(db):
        store = Storage(f"sqlite:///{db}")
        try:
            st = store.get_study("small")
            return [(t.split, t.batch, t.slot, t.origin, t.graph_hash, tuple(t.question_ids), t.new_runs)
                    for t in store.list_trials(st.id)]
        finally:
            store.close()

    ref = tmp_path / "ref.db"
    optimize(_small_spec(method, 4, storage=f"sqlite:///{ref}"))
    db = tmp_path / "g.db"
    for stop_after in (7, 3):  # the second interruption lands inside the race
        seen = [0]

        def progress(ev, seen=seen, stop_after=stop_after):
            seen[0] += 1
            if seen[0] >= stop_after:
                raise Interrupt()

        with pytest.raises(Interrupt):
            optimize(_small_spec(method, 4, storage=f"sqlite:///{db}"), progress=progress)
    optimize(_small_spec(method, 4, storage=f"sqlite:///{db}"))
    got, want = trials(db), trials(ref)
    assert got == want
    assert sum(t[6] for t in want if t[0] == "dev") == 4 * DEV and any(t[3] == "race" for t in want)


def test_a_budget_that_cannot_race_all_five_is_spent_exactly():
    out, full_dev, store, st = _run_small("reinforce", evaluations=3)
    assert out.stopped == "budget" and out.runs_spent == 3 * DEV
    assert sum(t.new_runs for t in store.list_trials(st.id, split="dev")) == 3 * DEV
    assert out.best.n >= DEV // 2


# -- the exact stop, every searcher ----------------------------------------------------------


def _ctx(costs, env, budget_runs: int, max_nodes: int = 5, **kw):
    return SearchContext(space=Space(models=LLAMA_POOL, max_nodes=max_nodes, max_in_degree=3), costs=costs,
                         budget=Budget(units=18), objective=Objective(), dev_ids=tuple(env.split("dev")), seed=1,
                         batch_size=5, budget_runs=budget_runs, **kw)


@pytest.mark.parametrize("method", ["random", "reinforce", "agent-reinforce", "exhaustive", "tpe", "qmc"])
@pytest.mark.parametrize("budget_runs", [130, 247])
def test_a_search_stops_exactly_at_its_budget(costs, method, budget_runs):
    """Budgets that are no multiple of a trial: the search still has graphs to ask, so it
    spends the budget to the run, and the trial at the edge is cut to a prefix of its
    questions (its info says how many it was asked on)."""
    env = FakeEnv(costs, n_dev=20)
    ctx = _ctx(costs, env, budget_runs, max_nodes=3 if method == "exhaustive" else 5)  # enumerated: keep it small
    store = MemoryStorage()
    st = store.create_study("s", method, {})
    out = run_search(searcher_class(method)(ctx), env, store, st, ctx, budget_runs=budget_runs,
                     test_ids=env.split("test"))
    dev = store.list_trials(st.id, split="dev")
    assert out.stopped == "budget"
    assert out.runs_spent == budget_runs == sum(t.new_runs for t in dev)
    assert env.calls == budget_runs + len(env.split("test"))  # paid: the budget, then the test split once
    trimmed = [t for t in dev if "trimmed_from" in (t.info or {})]
    assert len(trimmed) <= 1 and all(t is dev[-1] for t in trimmed)
    for t in trimmed:  # a prefix of what it was asked on, paying exactly what was left
        assert len(t.question_ids) < t.info["trimmed_from"]
        assert t.new_runs == budget_runs - sum(u.new_runs for u in dev[:-1])


@pytest.mark.parametrize("method", ["random", "reinforce"])
def test_a_trimmed_trial_is_resumed_and_continued_without_paying_twice(costs, tmp_path, method):
    """A study stopped at an odd budget (its last trial cut) and continued with a larger one
    plans what a fresh search with the first budget planned, and never pays twice for a
    graph on a question: a later trial of the cut graph pays only for the rest."""
    env = FakeEnv(costs, n_dev=20)
    store = Storage(f"sqlite:///{tmp_path / 'g.db'}")
    st = store.create_study("s", method, {})
    first = run_search(searcher_class(method)(_ctx(costs, env, 130)), env, store, st, _ctx(costs, env, 130),
                       budget_runs=130)
    assert first.runs_spent == 130
    ref = MemoryStorage()
    ref_st = ref.create_study("r", method, {})
    run_search(searcher_class(method)(_ctx(costs, env, 130)), FakeEnv(costs, n_dev=20), ref, ref_st,
               _ctx(costs, env, 130), budget_runs=130)
    first_trials = [(t.batch, t.slot, t.graph_hash, tuple(t.question_ids)) for t in store.list_trials(st.id, "dev")]
    assert first_trials == [(t.batch, t.slot, t.graph_hash, tuple(t.question_ids))
                            for t in ref.list_trials(ref_st.id, "dev")]
    env2 = FakeEnv(costs, n_dev=20)
    more = run_search(searcher_class(method)(_ctx(costs, env2, 260)), env2, store, store.get_study("s"),
                      _ctx(costs, env2, 260), budget_runs=260)
    assert more.runs_spent == 260 and env2.calls == 130
    pairs = {}
    for t in store.list_trials(st.id, split="dev"):
        pairs.setdefault(t.graph_hash, set()).update(t.question_ids)
    assert sum(len(q) for q in pairs.values()) == 260  # every paid run is a new (graph, question)


def test_the_engine_cuts_the_last_trial_to_the_prefix_the_budget_pays(costs):
    from graphtune.search.base import Candidate
    from graphtune.search.engine import BatchEngine
    from graphtune.graphs.model import Graph, Node

    env = FakeEnv(costs, n_dev=20)
    ctx = _ctx(costs, env, 50)
    store = MemoryStorage()
    st = store.create_study("s", "random", {})
    engine = BatchEngine(env=env, storage=store, study=st, ctx=ctx, budget_runs=50)
    g1 = Graph.build([Node.make("a", "assistant", "llama-3.2-1b")])
    g2 = Graph.build([Node.make("a", "assistant", "llama-3.2-3b")])
    plan = engine.plan([Candidate(g1), Candidate(g2), Candidate(g1)], batch=0, spent=15, method="random")
    # 15 spent: g1 pays 20 (35), g2 only the 15 left, and nothing after it
    assert [len(p.question_ids) for p in plan] == [20, 15]
    assert plan[1].question_ids == ctx.dev_ids[:15] and plan[1].info["trimmed_from"] == 20
    assert "trimmed_from" not in plan[0].info


@pytest.mark.filterwarnings("ignore::graphtune.store.storage.SharedSQLiteWarning")
@pytest.mark.parametrize("method", ["reinforce", "agent-reinforce"])
def test_workers_rebuilt_for_every_trial_race_a_small_space_as_optimize_does(tmp_path, method):
    """The worker path: each `work` call runs one trial and stops, so every batch update
    rebuilds the searcher from the stored state (the exhausted flag included) and plans
    again (the cut last trial included). The study ends equal to one process's."""
    import sys as _sys
    from pathlib import Path

    from graphtune.api import optimize, work
    from graphtune.search.worker import WorkerOptions

    _sys.path.insert(0, str(Path(__file__).resolve().parent))
    from workers_check import compare, snapshot

    ref_url = f"sqlite:///{tmp_path / 'ref.db'}"
    optimize(_small_spec(method, 4, storage=ref_url))
    ref = snapshot(ref_url, "small")
    url = f"sqlite:///{tmp_path / 'w.db'}"
    spec = _small_spec(method, 4, storage=url)
    for _ in range(200):
        _, st, _ = work("small", url, spec=spec, options=WorkerOptions(max_trials=1, poll_s=0.01))
        if st.status == "complete":
            break
    got = snapshot(url, "small")
    assert compare(got, ref) == []
    assert got["runs_spent"] == 4 * DEV and got["duplicate_places"] == 0
