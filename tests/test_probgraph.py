"""The probabilistic graph is a real distribution: frequencies, gradients, entropy, state."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest

from graphtune.graphs import Budget, Space
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.catalog import LLAMA_POOL
from graphtune.graphs.space import structural_errors
from graphtune.search.probgraph import GraphSample, ProbabilisticGraph

TWO = ("llama-3.2-1b", "llama-3.2-3b")


def _randomise(pg: ProbabilisticGraph, seed: int = 0, scale: float = 1.0) -> None:
    rng = np.random.default_rng(seed)
    pg.set_params(rng.normal(0, scale, pg.n_params))


def _all_latents(pg: ProbabilisticGraph):
    """Every latent draw of a tiny distribution, with its probability (exhaustive)."""
    S, M, R, cap = pg.S, len(pg.models), len(pg.roles), pg.space.max_in_degree
    pairs = [(i, j) for j in range(S) for i in range(j - 1, -1, -1)]
    for models in itertools.product(range(M), repeat=S):
        for bits in itertools.product((0, 1), repeat=len(pairs)):
            # drop bits the cap forces absent (they are not drawn)
            drawn, k_in = [], [0] * S
            valid = True
            for (i, j), b in zip(pairs, bits):
                if k_in[j] >= cap:
                    if b:
                        valid = False
                        break
                    continue
                drawn.append((i, j, b))
                k_in[j] += b
            if not valid:
                continue
            for roles in itertools.product(range(R), repeat=S):
                ok = all(pg._role_mask[j, int(k_in[j] > 0), roles[j]] for j in range(S))
                if not ok:
                    continue
                g, reached = pg._build(models, roles, drawn)
                s = GraphSample(tuple(models), tuple(roles), tuple(drawn), reached, g)
                yield s, math.exp(pg.log_prob(s))


@pytest.fixture
def tiny(costs):
    space = Space(models=TWO, roles=("assistant", "fuser"), max_nodes=3, max_width=3, max_depth=3, max_in_degree=2)
    pg = ProbabilisticGraph(space, costs, Budget(units=6))
    _randomise(pg, 3)
    return pg


def test_latent_probabilities_sum_to_one_and_entropy_is_exact(tiny):
    tiny.budget = Budget(units=1e9)
    probs = [p for _, p in _all_latents(tiny)]
    assert sum(probs) == pytest.approx(1.0, abs=1e-9)
    exact = -sum(p * math.log(p) for p in probs if p > 0)
    assert tiny.entropy() == pytest.approx(exact, rel=1e-9)


def test_graph_marginal_equals_sum_over_latents(tiny):
    tiny.budget = Budget(units=1e9)
    by_graph: dict = {}
    for s, p in _all_latents(tiny):
        key = (s.graph.nodes, s.graph.edges)
        by_graph.setdefault(key, [s.graph, 0.0])[1] += p
    for g, p in by_graph.values():
        assert math.exp(tiny.log_prob(g)) == pytest.approx(p, rel=1e-9)


def test_sampled_frequencies_match_probabilities(tiny):
    # exact truncated distribution over canonical graphs (rejection on budget and space)
    exact: Counter = Counter()
    for s, p in _all_latents(tiny):
        if tiny.feasible(s.graph):
            exact[graph_hash(s.graph)] += p
    z = sum(exact.values())
    rng = np.random.default_rng(0)
    n = 4000
    seen = Counter(graph_hash(tiny.sample(rng)[0].graph) for _ in range(n))
    assert set(seen) <= set(exact)
    # chi-square over the cells with enough expected mass, the rest pooled
    chi, dof, rest_o, rest_e = 0.0, -1, 0, 0.0
    for h, p in exact.items():
        e = n * p / z
        if e >= 5:
            chi += (seen[h] - e) ** 2 / e
            dof += 1
        else:
            rest_o += seen[h]
            rest_e += e
    if rest_e > 0:
        chi += (rest_o - rest_e) ** 2 / max(rest_e, 1e-9)
        dof += 1
    # 99.9% quantile of chi-square ~ dof + 3.1*sqrt(2 dof) + 10
    assert chi < dof + 3.1 * math.sqrt(2 * dof) + 10, (chi, dof)


@pytest.mark.parametrize("marginal", [True, False])
def test_analytic_gradient_matches_finite_differences(costs, space, marginal):
    pg = ProbabilisticGraph(space, costs, Budget(units=18))
    _randomise(pg, 1, 0.7)
    rng = np.random.default_rng(5)
    for _ in range(3):
        s, _ = pg.sample(rng)
        g = pg.grad_log_prob(s, marginal=marginal)
        theta = pg.params.copy()
        fd = np.zeros_like(theta)
        eps = 1e-6
        for k in range(len(theta)):
            for sign in (1, -1):
                t = theta.copy()
                t[k] += sign * eps
                pg.set_params(t)
                fd[k] += sign * pg.log_prob(s, marginal=marginal) / (2 * eps)
        pg.set_params(theta)
        assert np.max(np.abs(fd - g)) < 1e-5


def test_entropy_matches_monte_carlo_of_latent_log_prob(costs):
    space = Space(models=LLAMA_POOL, max_nodes=5, max_in_degree=2)
    pg = ProbabilisticGraph(space, costs, Budget(units=1e9))
    _randomise(pg, 2)
    rng = np.random.default_rng(1)
    lps = []
    while len(lps) < 1500:
        s = pg.sample_unconstrained(rng)
        if s is not None:
            lps.append(pg.log_prob(s))
    # roles are masked, never empty here, so every draw is a sample
    mc = -float(np.mean(lps))
    se = float(np.std(lps)) / math.sqrt(len(lps))
    assert abs(mc - pg.entropy()) < 4 * se + 1e-3


def test_every_sample_is_a_valid_in_budget_dag_named_by_slot(costs, space):
    budget = Budget(units=18)
    pg = ProbabilisticGraph(space, costs, budget)
    _randomise(pg, 4, 0.5)
    rng = np.random.default_rng(2)
    for _ in range(60):
        s, lp = pg.sample(rng)
        g = s.graph
        assert not structural_errors(g, space)
        assert budget.fits(costs.cost(g))
        assert g.sink == pg.slot_id(pg.sink)
        assert lp == pytest.approx(pg.log_prob(g)) and math.isfinite(lp)
        assert pg.embed(g) is not None


def test_state_round_trip_gives_identical_next_samples(costs, space):
    pg = ProbabilisticGraph(space, costs, Budget(units=18))
    _randomise(pg, 6)
    pg.step(np.ones(pg.n_params) * 0.1, 0.05)
    state = json.loads(json.dumps(pg.state_dict()))
    other = ProbabilisticGraph(space, costs, Budget(units=18))
    other.load_state_dict(state)
    a, b = np.random.default_rng(9), np.random.default_rng(9)
    for _ in range(10):
        assert pg.sample(a)[0].graph == other.sample(b)[0].graph
    g = np.linspace(-1, 1, pg.n_params)
    pg.step(g, 0.1)
    other.step(g, 0.1)
    assert np.array_equal(pg.params, other.params)


def test_entropy_floor_and_agent_deltas(costs, space):
    pg = ProbabilisticGraph(space, costs, Budget(units=18))
    _randomise(pg, 7, 5.0)
    floor = 0.5 * pg.max_entropy()
    pg.enforce_entropy_floor(floor)
    assert pg.entropy() >= floor - 1e-6
    before = pg.model_marginals()["llama-3.1-8b"]
    applied = pg.apply_deltas(model_preference={"llama-3.1-8b": 1.0, "gpt-9": 1.0},
                              edge_changes=[{"src": "s0", "dst": "s8", "delta": 1.0},
                                            {"src": "x", "dst": "s8", "delta": 1.0},
                                            {"src": "s5", "dst": "s2", "delta": 1.0}],
                              target_width=3)
    assert pg.model_marginals()["llama-3.1-8b"] > before
    assert len(applied["rejected"]) == 3
    assert pg.expected_in_degree(pg.sink) == pytest.approx(3.0, abs=0.05)
