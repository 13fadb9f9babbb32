"""Optuna baselines: valid in-budget proposals, no double payment, exact resume."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from graphtune.envs.base import summarize
from graphtune.errors import GraphtuneError
from graphtune.graphs import Budget, Space
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.catalog import LLAMA_POOL
from graphtune.graphs.space import random_graph, validate
from graphtune.search.base import Evaluation, Objective, SearchContext
from graphtune.search.loop import run_search
from graphtune.search.optuna_search import GraphEncoding, GPSearcher
from graphtune.search.registry import searcher_class
from graphtune.store import MemoryStorage

from fakes import FakeEnv

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_CMAES = importlib.util.find_spec("cmaes") is not None

METHODS = [
    "tpe",
    pytest.param("gp", marks=pytest.mark.skipif(not HAS_TORCH, reason="gp needs torch (pip install torch)")),
    pytest.param("cmaes", marks=pytest.mark.skipif(not HAS_CMAES, reason="cmaes needs `pip install cmaes`")),
    "qmc",
    "nsga2",
]
FAST_METHODS = METHODS


def _ctx(costs, env, *, space=None, budget=18.0, seed=0, batch=4, evaluations=8, options=None):
    dev = tuple(env.split("dev"))
    return SearchContext(space=space or Space(models=LLAMA_POOL, max_nodes=4, max_in_degree=3), costs=costs,
                         budget=Budget(units=budget), objective=Objective(), dev_ids=dev, seed=seed,
                         batch_size=batch, budget_runs=evaluations * len(dev), options=options or {})


def _fake_evals(searcher, cands, costs):
    """Evaluations without a loop: reward grows with model size and node count."""
    out = []
    for i, c in enumerate(cands):
        g = c.graph
        r = sum(costs.node_units(n.model, 0) ** 0.3 for n in g.nodes) / 10
        out.append(Evaluation(candidate=c, trial_number=i, graph_hash=graph_hash(g), results=(),
                              metrics=summarize([]), reward=r, cost=costs.cost(g), new_runs=1))
    return out


@pytest.mark.parametrize("method", METHODS)
def test_every_searcher_proposes_valid_in_budget_graphs_and_never_pays_twice(method, costs):
    env = FakeEnv(costs, n_dev=5)
    ctx = _ctx(costs, env)
    store = MemoryStorage()
    st = store.create_study("s", method, {})
    out = run_search(searcher_class(method)(ctx), env, store, st, ctx, budget_runs=ctx.budget_runs)
    trials = store.list_trials(st.id, split="dev")
    assert out.runs_spent == ctx.budget_runs == env.calls
    assert len(trials) == 8
    hashes = [t.graph_hash for t in trials]
    assert len(set(hashes)) == len(hashes)  # no graph evaluated twice
    for t in trials:
        assert t.status == "complete" and t.new_runs == 5  # whole dev split, nothing reused
        assert t.cost_units <= 18 + 1e-9
        assert t.info["sampler"] == method


@pytest.mark.parametrize("method", FAST_METHODS)
def test_a_tiny_space_is_exhausted_without_paying_for_duplicates(method, costs):
    # one model, one role, at most two nodes: exactly two graphs exist (a, a -> a)
    space = Space(models=("llama-3.2-1b",), roles=("assistant",), max_nodes=2)
    env = FakeEnv(costs, n_dev=3)
    ctx = _ctx(costs, env, space=space, evaluations=10, batch=3, options={"max_rejects": 5})
    store = MemoryStorage()
    st = store.create_study("s", method, {})
    out = run_search(searcher_class(method)(ctx), env, store, st, ctx, budget_runs=ctx.budget_runs)
    assert out.stopped == "exhausted"
    assert env.calls == 2 * 3
    assert len({t.graph_hash for t in store.list_trials(st.id)}) == 2


@pytest.mark.parametrize("method", FAST_METHODS)
def test_proposals_pass_validation_and_duplicates_are_told_the_stored_value(method, costs):
    env = FakeEnv(costs, n_dev=2)
    ctx = _ctx(costs, env, budget=12.0)
    s = searcher_class(method)(ctx)
    seen: set[str] = set()
    for _ in range(4):
        cands = s.ask()
        assert cands
        for c in cands:
            validate(c.graph, ctx.space, ctx.costs, ctx.budget)
            assert c.question_ids is None
            h = graph_hash(c.graph)
            assert h not in seen
            seen.add(h)
        s.tell(_fake_evals(s, cands, costs))
    # every told COMPLETE trial of a proposed graph carries that graph's stored value
    for t in s.study.get_trials(deepcopy=False):
        g = s.enc.decode(t.params)
        h = graph_hash(g)
        if h in s.values:
            assert list(t.values) == s.values[h]


@pytest.mark.parametrize("method", FAST_METHODS)
def test_resume_mid_way_asks_the_same_next_graphs(method, costs):
    env = FakeEnv(costs, n_dev=2)
    ctx = _ctx(costs, env, space=Space(models=LLAMA_POOL, max_nodes=5, max_in_degree=3), budget=25.0, seed=3)

    def run(n_batches, searcher):
        got = []
        for _ in range(n_batches):
            cands = searcher.ask()
            got.append([graph_hash(c.graph) for c in cands])
            searcher.tell(_fake_evals(searcher, cands, costs))
        return got

    cls = searcher_class(method)
    straight = run(6, cls(ctx))
    first = cls(ctx)
    head = run(3, first)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON store
    resumed = cls(ctx)
    resumed.load_state_dict(state)
    tail = run(3, resumed)
    assert head + tail == straight


def test_different_seeds_give_different_searches(costs):
    env = FakeEnv(costs, n_dev=2)
    a = searcher_class("tpe")(_ctx(costs, env, seed=0)).ask()
    b = searcher_class("tpe")(_ctx(costs, env, seed=1)).ask()
    assert [graph_hash(c.graph) for c in a] != [graph_hash(c.graph) for c in b]


@pytest.mark.parametrize("continuous", [False, True])
def test_encoding_round_trips_every_graph(continuous, costs):
    env = FakeEnv(costs, n_dev=2)
    ctx = _ctx(costs, env, space=Space(models=LLAMA_POOL, max_nodes=6), budget=40.0)
    enc = GraphEncoding(ctx, continuous=continuous)
    rng = np.random.default_rng(0)
    for _ in range(50):
        g = random_graph(ctx.space, ctx.costs, ctx.budget, rng)
        params = enc.encode(g)
        assert set(params) == set(enc.names)
        for name, v in params.items():
            assert enc.distributions[name]._contains(enc.distributions[name].to_internal_repr(v))
        assert graph_hash(enc.decode(params)) == graph_hash(g)


def test_continuous_encoding_orders_models_by_cost(costs):
    env = FakeEnv(costs, n_dev=2)
    enc = GraphEncoding(_ctx(costs, env, space=Space(models=tuple(reversed(LLAMA_POOL)), max_nodes=2)),
                        continuous=True)
    assert enc.models == LLAMA_POOL


def test_state_from_another_method_is_refused(costs):
    env = FakeEnv(costs, n_dev=2)
    ctx = _ctx(costs, env)
    tpe = searcher_class("tpe")(ctx)
    tpe.tell(_fake_evals(tpe, tpe.ask(), costs))
    with pytest.raises(GraphtuneError, match="start a new study"):
        searcher_class("nsga2")(ctx).load_state_dict(tpe.state_dict())


@pytest.mark.skipif(HAS_TORCH, reason="torch is installed: gp runs")
def test_gp_without_torch_names_the_install_command(costs):
    env = FakeEnv(costs, n_dev=2)
    with pytest.raises(GraphtuneError, match="pip install"):
        GPSearcher(_ctx(costs, env))
