"""reinforce: the numeric policy gradient alone."""

from __future__ import annotations

import json

from graphtune.graphs import Budget, Space
from graphtune.graphs.catalog import LLAMA_POOL
from graphtune.search.base import Objective, SearchContext
from graphtune.search.loop import run_search
from graphtune.search.registry import searcher_class
from graphtune.search.reinforce import ReinforceSearcher
from graphtune.store import MemoryStorage

from fakes import FakeEnv


def _ctx(costs, env, evaluations=6):
    return SearchContext(space=Space(models=LLAMA_POOL, max_nodes=5, max_in_degree=3), costs=costs,
                         budget=Budget(units=18), objective=Objective(), dev_ids=tuple(env.split("dev")), seed=1,
                         batch_size=5, budget_runs=evaluations * 20)


def test_reinforce_spends_its_budget_moves_the_distribution_and_has_no_agent(costs):
    assert searcher_class("reinforce") is ReinforceSearcher
    env = FakeEnv(costs, n_dev=20)
    ctx = _ctx(costs, env)
    s = ReinforceSearcher(ctx)
    before = s.pg.params.copy()
    store = MemoryStorage()
    st = store.create_study("s", "reinforce", {})
    out = run_search(s, env, store, st, ctx, budget_runs=ctx.budget_runs, test_ids=env.split("test"))
    assert ctx.budget_runs <= out.runs_spent < ctx.budget_runs + 20  # the loop may finish the last candidate
    assert (s.pg.params != before).any()
    assert store.agent_steps(st.id) == [] and s.drain_agent_steps() == []
    origins = {t.origin for t in store.list_trials(st.id, split="dev")}
    assert "sample" in origins and "probe" not in origins and "agent" not in origins
    # the pick is the best paired mean among the well-evaluated graphs, never simply the last
    assert out.best.n >= max(len(r) for r in [out.best.rewards]) and out.best.n >= 10
    json.dumps(s.state_dict())  # plain data
