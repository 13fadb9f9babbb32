"""Issue 13's default critic: a Bayesian surrogate over graph features that proposes by
expected improvement, shifts preferences by its evidence, and refines the final pick
(``pick: surrogate``); and the final race ordered by the evidence of beating the leader."""

from __future__ import annotations

import math

import numpy as np
import pytest

from graphtune.agent.report import GraphEntry, ProblemInfo, graph_effects
from graphtune.agent.surrogate import BayesSurrogate, expected_improvement
from graphtune.errors import SpecError
from graphtune.graphs import Budget, Space
from graphtune.graphs.catalog import LLAMA_POOL
from graphtune.graphs.cost import GraphCost
from graphtune.graphs.model import Graph, Node
from graphtune.graphs.results import QuestionResult, summarize
from graphtune.search.agent_reinforce import AgentReinforceSearcher
from graphtune.search.base import Candidate, Evaluation, Objective, SearchContext
from graphtune.search.racing import Racing, recommend_paired, recommend_shrunk
from graphtune.search.reinforce import ReinforceSearcher

SMALL, BIG = "llama-3.2-1b", "llama-3.1-8b"
QS = [f"q{i}" for i in range(200)]


def _problem(costs) -> ProblemInfo:
    return ProblemInfo(task_description="t", space=Space(models=LLAMA_POOL, max_nodes=5, max_in_degree=3),
                       costs=costs, budget=Budget(units=40))


def _chain(models: list[str]) -> Graph:
    """A refinement chain: each node reads the previous one; the last answers."""
    nodes = [Node.make(f"n{i}", "assistant", m) for i, m in enumerate(models)]
    return Graph.build(nodes, [(f"n{i}", f"n{i + 1}") for i in range(len(models) - 1)])


def _scores(rng: np.random.Generator, p: float, n: int, base: np.ndarray) -> dict[str, float]:
    """``n`` questions, right with probability ``p`` shifted by the question's ease ``base``."""
    return {q: float(rng.random() < min(1.0, max(0.0, p + base[i]))) for i, q in enumerate(QS[:n])}


def _entry(g: Graph, key: str, rewards: dict[str, float]) -> GraphEntry:
    return GraphEntry(key=key, graph=g, trial_numbers=(0,), origin="sample", rewards=rewards,
                      reward=float(np.mean(list(rewards.values()))), cost_units=0.0, latency_s=0.0)


def _evaluation(g: Graph, key: str, rewards: dict[str, float], trial: int) -> Evaluation:
    res = tuple(QuestionResult(q, "1", bool(v), score=v) for q, v in rewards.items())
    return Evaluation(Candidate(graph=g), trial, key, res, summarize(res), float(np.mean(list(rewards.values()))),
                      GraphCost(0, 0, 0, 0, 0, 0), len(res))


def test_the_surrogate_finds_a_planted_effect_and_grows_surer_with_evidence(costs):
    """Graphs whose sink is the big model are 15 points better: the fit finds the contrast
    (big sink vs small sink, same first node) with a z score far from zero, the z grows
    with more graphs, and a prediction's sd never falls below the misfit (the surrogate
    does not claim to know a graph better than that)."""
    rng = np.random.default_rng(0)
    base = rng.normal(0, 0.1, len(QS))
    p = _problem(costs)
    entries = []
    for i in range(24):
        first = [SMALL, BIG][i % 2]
        sink = [SMALL, BIG][(i // 2) % 2]
        g = _chain([first] * (1 + i % 3) + [sink])
        entries.append(_entry(g, f"g{i}", _scores(rng, 0.40 + 0.15 * (sink == BIG), 60, base)))
    zs = []
    for n in (8, 24):
        sur = BayesSurrogate(entries[:n], graph_effects(entries[:n]), p)
        mean, sd = sur.contrast(_chain([SMALL, BIG]), _chain([SMALL, SMALL]))
        zs.append(mean / sd)
    assert zs[1] > 3 and zs[1] > zs[0]
    sur = BayesSurrogate(entries, graph_effects(entries), p)
    assert sur.predict(_chain([SMALL, BIG]))[0] > sur.predict(_chain([BIG, SMALL]))[0] + 0.08
    assert sur.predict(_chain([SMALL, BIG]))[1] >= math.sqrt(sur.misfit)


def test_expected_improvement_rewards_a_better_mean_and_more_uncertainty():
    assert expected_improvement(0.1, 0.05, 0.0) > expected_improvement(0.0, 0.05, 0.0) > 0
    assert expected_improvement(0.0, 0.10, 0.05) > expected_improvement(0.0, 0.02, 0.05)
    assert expected_improvement(0.2, 0.0, 0.1) == pytest.approx(0.1)


def _field(rng, base, lucky_n: int):
    """A leader-kind family (chains ending in BIG, true 0.60) and a poor family (chains
    ending in SMALL, true 0.40) with one member lucky on the questions it has."""
    evals, t = [], 0
    for i, first in enumerate([SMALL, BIG, SMALL, BIG, SMALL, BIG]):
        g = _chain([first] * (1 + i // 2) + [BIG])
        evals.append(_evaluation(g, f"good{i}", _scores(rng, 0.60, 200, base), t))
        t += 1
    for i, first in enumerate([SMALL, BIG, SMALL, BIG, SMALL, BIG]):
        g = _chain([first] * (1 + i // 2) + [SMALL])
        evals.append(_evaluation(g, f"poor{i}", _scores(rng, 0.40, 200, base), t))
        t += 1
    if lucky_n:  # one poor-kind graph, right far more often than its kind on the questions it has
        lucky = {q: float(rng.random() < 0.75) for q in QS[:lucky_n]}
        evals.append(_evaluation(_chain([BIG, BIG, SMALL]), "lucky", lucky, t))
    return evals


def test_the_surrogate_pick_does_not_crown_a_graph_for_luck_its_kind_does_not_share(costs):
    """A poor-kind graph at 0.75 on 100 questions, against good-kind graphs at about 0.60
    on 200: the paired pick takes the lucky one, the surrogate pick one of the good kind."""
    rng = np.random.default_rng(1)
    base = rng.normal(0, 0.05, len(QS))
    evals = _field(rng, base, lucky_n=100)
    obj = Objective()
    assert recommend_paired(evals, obj, 1.0).graph_hash == "lucky"
    assert recommend_shrunk(evals, obj, 1.0, _problem(costs)).graph_hash.startswith("good")


def test_strong_evidence_still_beats_what_the_features_predict(costs):
    """The same graph right on 95% of 200 questions: its own evidence outweighs its kind."""
    rng = np.random.default_rng(2)
    base = rng.normal(0, 0.05, len(QS))
    evals = _field(rng, base, lucky_n=0)
    star = {q: float(rng.random() < 0.95) for q in QS}
    evals.append(_evaluation(_chain([BIG, BIG, SMALL]), "star", star, 99))
    assert recommend_shrunk(evals, Objective(), 1.0, _problem(costs)).graph_hash == "star"


def test_the_final_race_takes_the_rival_with_evidence_before_one_with_only_a_wide_interval(costs):
    """Rivals of the leader below the full dev set: one ahead of it on 75 questions, one
    level with it on 25. The race extends the first one first; the bound-first order it
    had took the least-measured graph, whose bound is the higher for its wide interval."""
    racing = Racing(order=tuple(QS), levels=[25, 75, 200], eta=3.0, race_top=1, final_race_frac=0.15,
                    budget_runs=10_000, objective=Objective(), unit_flops=1.0)
    lead = {q: float(i % 2 == 0) for i, q in enumerate(QS)}
    close = {q: 1.0 if i in (1, 3) else lead[q] for i, q in enumerate(QS[:75])}  # two questions better
    # even with the leader on 25 questions (two better, two worse): only its wide interval
    # puts its bound above the close rival's
    far = {q: 0.0 if i in (0, 2) else 1.0 if i in (1, 3) else lead[q] for i, q in enumerate(QS[:25])}
    racing.record([_evaluation(_chain([BIG]), "lead", lead, 0), _evaluation(_chain([SMALL, BIG]), "close", close, 1),
                   _evaluation(_chain([BIG, SMALL]), "far", far, 2)])
    assert racing.incumbent() == "lead"
    z = dict((h, s) for s, h in racing._rivals("lead"))
    assert set(z) == {"close", "far"} and z["close"] > z["far"]
    ucb = {h: np.mean(d) + 2 * np.std(d, ddof=1) / math.sqrt(len(d))
           for h, d in (("close", [close[q] - lead[q] for q in close]), ("far", [far[q] - lead[q] for q in far]))}
    assert ucb["far"] > ucb["close"]  # what the old order went by
    (first,) = racing.final_race(0)
    assert first.graph == racing.graph("close") and len(first.question_ids) == 200


def _ctx(costs, options):
    from fakes import FakeEnv

    env = FakeEnv(costs)
    dev = tuple(env.split("dev"))
    return SearchContext(space=Space(models=LLAMA_POOL, max_nodes=5, max_in_degree=3), costs=costs,
                         budget=Budget(units=18), objective=Objective(), dev_ids=dev, seed=0, batch_size=6,
                         budget_runs=8 * len(dev), task_description="test task", agent={"model": "heuristic"},
                         options=options)


def test_pick_is_an_option_with_one_line_errors_where_it_cannot_apply(costs):
    assert AgentReinforceSearcher(_ctx(costs, {})).opts.pick is None  # surrogate by default there
    assert ReinforceSearcher(_ctx(costs, {"pick": "surrogate"})).opts.pick == "surrogate"
    with pytest.raises(SpecError, match="pick: surrogate picks one graph; with pareto"):
        ReinforceSearcher(_ctx(costs, {"pick": "surrogate", "pareto": "units"}))
    with pytest.raises(SpecError, match=r"search.options"):
        ReinforceSearcher(_ctx(costs, {"pick": "best"}))


def test_with_a_handful_of_graphs_the_surrogate_pick_is_the_paired_pick(costs):
    """Five measured graphs are too few to learn what features are worth: the pick is the
    paired one (a space of five graphs raced to the full dev set returns its dev-best)."""
    rng = np.random.default_rng(4)
    base = rng.normal(0, 0.05, len(QS))
    evals = _field(rng, base, lucky_n=100)[-5:]
    assert recommend_shrunk(evals, Objective(), 1.0, _problem(costs)).graph_hash == \
        recommend_paired(evals, Objective(), 1.0).graph_hash == "lucky"
