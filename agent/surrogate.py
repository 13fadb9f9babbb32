"""The heuristic critic's surrogate: Bayesian linear regression of paired graph effects on
graph features, and the candidate graphs it ranks.

* :func:`features` describes a graph by what a test-time-scaling study varies: nodes per
  model, the sink's model and role, the sink's number of inputs, depth, size, model
  diversity, refinement steps and budget use.
* :class:`BayesSurrogate` fits the paired effects of :func:`~graphtune.agent.report.graph_effects`
  (each with its standard error) with a Gaussian prior on the coefficients (standardised
  features), noise = each graph's own standard error squared plus a misfit variance (how
  far a graph's true effect lies from what its features predict; ``PRIOR_SD`` and
  ``MISFIT_SD``). So it knows
  how sure it is: a prediction comes with a posterior standard deviation, and a
  coefficient with a z score. The critic shifts preferences by those z scores and
  proposes by expected improvement, both calibrated by the same posterior.
* :func:`neighbourhood`: the candidate graphs it ranks, the local mutations of the best
  graphs and of their most promising mutations (two edits away). Enumerating the space
  instead is out of reach: even a budget of 18 units on four models holds tens of
  thousands of graphs.
* :func:`expected_improvement`: the classic EI of a Gaussian prediction over a target.

Pure functions of their inputs (no hidden state, no randomness): a resumed search replays
the critic exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from graphtune.agent.mutations import local_mutations
from graphtune.agent.report import GraphEntry, ProblemInfo
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.model import Graph
from graphtune.graphs.space import is_valid

#: prior sd of a coefficient of a standardised feature (5 points of effect per sd of a
#: feature), and the misfit: the sd of a graph's true effect around what its features
#: predict (2 points). Chosen on the search benchmark's nine cases from a grid (prior sd
#: 0.02-0.2 x misfit 1-3 points; docs/agent.md): a broad optimum, 0.70-0.77 mean regret
#: over 0.05-0.1 x 1-2 points; the type-II maximum-likelihood choice did worse there (0.87,
#: it fits the effects of all graphs, the pick needs the top few ranked).
PRIOR_SD = 0.05
MISFIT_SD = 0.02


def feature_names(p: ProblemInfo) -> list[str]:
    models, roles = list(p.space.models), list(p.space.roles)
    return ([f"nodes of {m} (not the sink)" for m in models] + [f"sink model {m}" for m in models]
            + [f"sink role {r}" for r in roles]
            + ["sink inputs", "sink inputs^2", "depth", "depth^2", "size", "models used", "refining nodes",
               "budget use"])


def features(g: Graph, p: ProblemInfo) -> np.ndarray:
    models, roles = list(p.space.models), list(p.space.roles)
    sink = g.node_map[g.sink]
    f: list[float] = []
    for m in models:
        f.append(sum(1 for n in g.nodes if n.model == m and n.id != sink.id))
    for m in models:
        f.append(float(sink.model == m))
    for r in roles:
        f.append(float(sink.role == r))
    d = g.in_degree(sink.id)
    f += [d, d * d, g.depth, g.depth ** 2, g.size]
    f.append(len({n.model for n in g.nodes if n.id != sink.id}))
    f.append(sum(1 for n in g.nodes if n.id != sink.id and g.preds[n.id]))
    units = p.costs.cost(g).units
    f.append(units / p.budget.units if p.budget.units else units / 10.0)
    return np.array(f, dtype=float)


class BayesSurrogate:
    """Bayesian linear regression of paired graph effects on :func:`features` (see the
    module docstring). ``coef`` is None below ``min_graphs`` measured graphs."""

    def __init__(self, entries: Sequence[GraphEntry], effects: dict[str, tuple[float, float, int]],
                 p: ProblemInfo, *, prior_sd: float = PRIOR_SD, misfit_sd: float = MISFIT_SD, min_graphs: int = 3,
                 cache: dict[str, np.ndarray] | None = None):
        """``cache`` (entry key -> features), when given, is read and filled: fits over the
        same graphs (the pick's leave-one-out fits) cost the features once."""
        self.p = p
        cache = {} if cache is None else cache
        for e in entries:
            if e.key not in cache:
                cache[e.key] = features(e.graph, p)
        rows = [(cache[e.key], effects[e.key][0], effects[e.key][1]) for e in entries if e.key in effects]
        self.n = len(rows)
        self.coef: np.ndarray | None = None
        if self.n < min_graphs:
            return
        X = np.array([r[0] for r in rows])
        y = np.array([r[1] for r in rows])
        se2 = np.array([max(r[2], 1e-3) ** 2 for r in rows])
        self.mu = X.mean(axis=0)
        self.sd = X.std(axis=0)
        self.sd[self.sd < 1e-9] = 1.0  # a constant feature: its coefficient stays at the prior
        Z = np.hstack([np.ones((self.n, 1)), (X - self.mu) / self.sd])
        prec = np.full(Z.shape[1], 1.0 / prior_sd ** 2)
        prec[0] = 1.0  # the intercept is all but free
        w = 1.0 / (se2 + misfit_sd ** 2)
        self.cov = np.linalg.inv(Z.T @ (Z * w[:, None]) + np.diag(prec))
        self.coef = self.cov @ (Z.T @ (w * y))
        self.misfit = misfit_sd ** 2

    def _z(self, g: Graph) -> np.ndarray:
        return np.concatenate([[1.0], (features(g, self.p) - self.mu) / self.sd])

    def predict(self, g: Graph) -> tuple[float, float]:
        """Posterior mean and standard deviation of ``g``'s effect (the misfit included)."""
        if self.coef is None:
            return 0.0, 1.0
        z = self._z(g)
        return float(z @ self.coef), math.sqrt(float(z @ self.cov @ z) + self.misfit)

    def contrast(self, a: Graph, b: Graph) -> tuple[float, float]:
        """Posterior mean and sd of effect(a) - effect(b), the misfit left out (what the
        features say about the change from ``b`` to ``a``)."""
        if self.coef is None:
            return 0.0, 1.0
        dz = self._z(a) - self._z(b)
        return float(dz @ self.coef), math.sqrt(max(float(dz @ self.cov @ dz), 0.0))

    def per_unit(self, k: int) -> tuple[float, float]:
        """Effect of +1 of feature ``k`` on the raw scale: posterior mean and sd."""
        if self.coef is None:
            return 0.0, 1.0
        return float(self.coef[1 + k] / self.sd[k]), float(math.sqrt(self.cov[1 + k, 1 + k]) / self.sd[k])


def expected_improvement(mean: float, sd: float, target: float) -> float:
    """E[max(0, X - target)] for X ~ N(mean, sd^2)."""
    if sd <= 0:
        return max(0.0, mean - target)
    z = (mean - target) / sd
    return float((mean - target) * 0.5 * math.erfc(-z / math.sqrt(2)) + sd * math.exp(-0.5 * z * z)
                 / math.sqrt(2 * math.pi))


def neighbourhood(parents: Iterable[Graph], p: ProblemInfo, seen: set[str], *,
                  second: int = 2, rank=None) -> dict[str, tuple[Graph, Graph]]:
    """Valid, unmeasured local mutations of ``parents`` (hash -> (graph, parent)); the
    ``second`` best of each parent's mutations by ``rank`` (a graph -> score) are mutated
    once more (two edits away: the critic may skip a valley of one edit)."""
    out: dict[str, tuple[Graph, Graph]] = {}
    for par in parents:
        first: list[tuple[float, str, Graph]] = []
        for g in local_mutations(par, p.space):
            h = graph_hash(g)
            if h in seen or h in out or not is_valid(g, p.space, p.costs, p.budget):
                continue
            out[h] = (g, par)
            if rank is not None:
                first.append((rank(g), h, g))
        for _, _, g1 in sorted(first, key=lambda t: (-t[0], t[1]))[:second]:
            for g in local_mutations(g1, p.space):
                h = graph_hash(g)
                if h in seen or h in out or not is_valid(g, p.space, p.costs, p.budget):
                    continue
                out[h] = (g, par)
    return out
