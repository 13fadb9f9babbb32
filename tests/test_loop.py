"""The search loop: budget accounting, no double payment, resume, best-then-test."""

from __future__ import annotations

import pytest

from graphtune.graphs import Budget, Space
from graphtune.graphs.catalog import LLAMA_POOL
from graphtune.search.base import Objective, SearchContext
from graphtune.search.exhaustive import ExhaustiveSearcher
from graphtune.search.loop import run_search
from graphtune.search.random_search import RandomSearcher
from graphtune.store import MemoryStorage, Storage

from fakes import FakeEnv


def _ctx(costs, env, *, evaluations=6, space=None, seed=0, batch=3):
    dev = tuple(env.split("dev"))
    return SearchContext(space=space or Space(models=LLAMA_POOL, max_nodes=4, max_in_degree=3), costs=costs,
                         budget=Budget(units=18), objective=Objective(), dev_ids=dev, seed=seed, batch_size=batch,
                         budget_runs=evaluations * len(dev))


@pytest.fixture(params=["sqlite", "memory"])
def store(request, tmp_path):
    return Storage(f"sqlite:///{tmp_path / 'g.db'}") if request.param == "sqlite" else MemoryStorage()


def test_random_search_spends_its_budget_then_scores_the_best_once_on_test(costs, store):
    env = FakeEnv(costs)
    ctx = _ctx(costs, env)
    st = store.create_study("s", "random", {})
    out = run_search(RandomSearcher(ctx), env, store, st, ctx, budget_runs=ctx.budget_runs,
                     test_ids=env.split("test"))
    assert out.runs_spent == ctx.budget_runs == 6 * 20
    assert out.n_trials == 6
    dev = store.list_trials(st.id, split="dev")
    assert out.best.mean == max(t.reward for t in dev)
    assert out.test_trial.split == "test" and out.test_trial.parents == [out.best.best_trial]
    assert len(out.test_results) == 50
    assert env.calls == 6 * 20 + 50


def test_rerunning_a_finished_study_evaluates_nothing(costs, store):
    env = FakeEnv(costs)
    ctx = _ctx(costs, env)
    st = store.create_study("s", "random", {})
    first = run_search(RandomSearcher(ctx), env, store, st, ctx, budget_runs=ctx.budget_runs, test_ids=env.split("test"))
    calls = env.calls
    again = run_search(RandomSearcher(ctx), env, store, store.get_study("s"), ctx, budget_runs=ctx.budget_runs,
                       test_ids=env.split("test"))
    assert env.calls == calls
    assert again.best.graph_hash == first.best.graph_hash
    assert len(store.list_trials(st.id)) == 7  # 6 dev + 1 test, nothing duplicated


def test_more_evaluations_continue_where_the_study_stopped(costs, store):
    env = FakeEnv(costs)
    ctx = _ctx(costs, env)
    st = store.create_study("s", "random", {})
    run_search(RandomSearcher(ctx), env, store, st, ctx, budget_runs=3 * 20, test_ids=None)
    run_search(RandomSearcher(ctx), env, store, store.get_study("s"), ctx, budget_runs=6 * 20, test_ids=None)
    resumed = [t.graph_hash for t in store.list_trials(st.id, split="dev")]
    ref_store = MemoryStorage()
    ref = ref_store.create_study("r", "random", {})
    run_search(RandomSearcher(ctx), FakeEnv(costs), ref_store, ref, ctx, budget_runs=6 * 20, test_ids=None)
    assert resumed == [t.graph_hash for t in ref_store.list_trials(ref.id, split="dev")]


def test_a_crash_mid_batch_resumes_without_duplicate_trials_or_runs(costs, tmp_path):
    class Boom(Exception):
        pass

    class CrashingEnv(FakeEnv):
        def __init__(self, costs, crash_at):
            super().__init__(costs)
            self.crash_at = crash_at

        def evaluate(self, graph, qids):
            if self.calls >= self.crash_at:
                raise Boom()
            return super().evaluate(graph, qids)

    url = f"sqlite:///{tmp_path / 'c.db'}"
    env = CrashingEnv(costs, crash_at=20 * 4)  # dies inside the second batch of 3
    ctx = _ctx(costs, env)
    store = Storage(url)
    st = store.create_study("s", "random", {})
    with pytest.raises(Boom):
        run_search(RandomSearcher(ctx), env, store, st, ctx, budget_runs=ctx.budget_runs)
    env2 = FakeEnv(costs)
    store2 = Storage(url)
    run_search(RandomSearcher(ctx), env2, store2, store2.get_study("s"), ctx, budget_runs=ctx.budget_runs)
    assert env2.calls == 6 * 20 - 4 * 20  # only what was not finished before the crash
    trials = store2.list_trials(st.id, split="dev")
    assert len(trials) == 6 and len({(t.batch, t.slot) for t in trials}) == 6


def test_exhaustive_finds_the_optimum_of_a_small_space(costs):
    env = FakeEnv(costs)
    space = Space(models=("llama-3.2-1b", "llama-3.2-3b"), max_nodes=2, max_in_degree=1)
    ctx = _ctx(costs, env, evaluations=1000, space=space)
    store = MemoryStorage()
    st = store.create_study("x", "exhaustive", {})
    searcher = ExhaustiveSearcher(ctx)
    out = run_search(searcher, env, store, st, ctx, budget_runs=ctx.budget_runs)
    assert out.stopped == "exhausted" and out.n_trials == searcher.size
    assert out.best.mean == max(t.reward for t in store.list_trials(st.id, split="dev"))


def test_invalid_proposals_become_failed_trials_not_crashes(costs):
    from graphtune.graphs import Graph, Node
    from graphtune.search.base import Candidate, Searcher

    class Bad(Searcher):
        name = "bad"
        done = False

        def ask(self):
            if self.done:
                return []
            self.done = True
            return [Candidate(Graph.build([Node.make("f", "fuser", "llama-3.2-1b")])),
                    Candidate(Graph.build([Node.make("a", "assistant", "llama-3.2-1b")]))]

        def tell(self, evs):
            self.evs = evs

        def state_dict(self):
            return {"done": self.done}

        def load_state_dict(self, s):
            self.done = s["done"]

    env = FakeEnv(costs)
    ctx = _ctx(costs, env)
    store = MemoryStorage()
    st = store.create_study("b", "bad", {})
    b = Bad(ctx)
    out = run_search(b, env, store, st, ctx, budget_runs=ctx.budget_runs)
    assert "fuser with no predecessor" in b.evs[0].error and b.evs[0].new_runs == 0
    assert b.evs[1].ok and out.best.graph.size == 1


def test_accuracy_intervals_are_binomial_and_stay_inside_0_1():
    """A graph right on 4 of 6 questions: 0.300-0.903 (Wilson; was 0.253-1.080), the
    interval scipy gives; rewards that are not 0/1 (cost-weighted) keep the normal one."""
    import scipy.stats

    from graphtune.graphs.model import Graph, Node
    from graphtune.search.base import GraphStats

    g = Graph((Node("a", "assistant", "m"),), ())

    def stats(rewards):
        return GraphStats(g, "h", {f"q{i}": r for i, r in enumerate(rewards)}, 1, 1)

    for k, n in [(4, 6), (58, 100), (0, 3), (3, 3), (1, 1)]:
        lo, hi = stats([1.0] * k + [0.0] * (n - k)).ci95()
        ref = scipy.stats.binomtest(k, n).proportion_ci(method="wilson")
        assert 0.0 <= lo <= k / n <= hi <= 1.0
        assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-9)
    lo, hi = stats([0.9, 0.4, 0.95, 0.2]).ci95()
    m = (0.9 + 0.4 + 0.95 + 0.2) / 4
    assert lo < m < hi and hi - lo == pytest.approx(2 * 1.96 * 0.37053 / 2, rel=1e-3)  # sd / sqrt(4)
