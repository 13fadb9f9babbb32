"""The policy of ``reinforce`` and ``agent-reinforce`` on a multi-stage pipeline.

A pipeline study (``ctx.space`` a :class:`~graphtune.graphs.design.PipelineSpace`,
``ctx.costs`` a :class:`~graphtune.graphs.cost.PipelineCostModel`, ``ctx.budget`` a
:class:`~graphtune.graphs.cost.PipelineBudget`) searches the joint space with:

* **one probabilistic graph per stage** (:class:`~graphtune.search.probgraph.ProbabilisticGraph`
  over the stage's space and cost model), sampled independently;
* a **budget split** (:class:`BudgetSplit`): a learned categorical over a fixed grid of
  shares of the pipeline budget per stage. A draw picks a split; each stage's graph is
  drawn under :func:`~graphtune.graphs.design.stage_budget` with its share (and its cap),
  and the whole pipeline is checked against the pipeline budget (redrawn when over).

The joint log-probability of a drawn pipeline is the sum of its stages' (marginal,
slot-labelled) log-probabilities and of its split's, so the REINFORCE gradient splits into
one gradient per part: :meth:`PipelinePolicy.step` gives every stage's distribution and the
split the same normalised advantages of the pipeline's reward, each part with its own Adam
moments and entropy floor (as :class:`~graphtune.search.policy.PolicyUpdate` does for one
graph).

Rejection note: with one budget per sample the rejection term ``grad log p(F)`` cancels
against a zero-mean advantage (see :mod:`graphtune.search.probgraph`); here a stage's
feasible set depends on the split drawn, so that cancellation is approximate for the
stage distributions (exact for the split's own categorical given its draws).

State: plain JSON, a few KB (every stage's logits and Adam moments, the split's logits and
moments, the generator), saved whole; the same state asks the same batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np

from graphtune.errors import BudgetError, GraphError
from graphtune.graphs.design import PipelineSpace, design_hash, random_design, stage_budget
from graphtune.graphs.pipeline import Pipeline
from graphtune.search.base import Candidate, Evaluation, SearchContext, rng_from_state, rng_state
from graphtune.search.probgraph import ProbabilisticGraph

SPLIT_STATE_VERSION = 1


def is_pipeline_study(ctx: SearchContext) -> bool:
    """Whether ``ctx`` is a multi-stage study (its space a PipelineSpace)."""
    return isinstance(ctx.space, PipelineSpace)


def share_grid(n_stages: int, *, max_points: int = 40) -> np.ndarray:
    """Every split of the budget into ``n_stages`` positive shares on a grid of ``1/G``
    (``G`` the finest grid with at most ``max_points`` splits, at most 12): shape (K, n)."""
    if n_stages == 1:
        return np.ones((1, 1))
    G = n_stages
    for g in range(n_stages, 13):
        if math.comb(g - 1, n_stages - 1) <= max_points:
            G = g
    rows = []
    for cuts in combinations(range(1, G), n_stages - 1):
        parts = np.diff((0, *cuts, G))
        rows.append(parts / G)
    return np.array(rows, dtype=float)


class BudgetSplit:
    """A categorical over the splits of :func:`share_grid`: ``logits[k]`` is the preference
    for giving the stages the shares ``grid[k]`` of the pipeline budget. Its own Adam
    moments; :meth:`shift` moves preference toward (or away from) one stage."""

    def __init__(self, names: Sequence[str], *, logit_clip: float = 6.0):
        self.names = tuple(names)
        self.grid = share_grid(len(self.names))
        self.logits = np.zeros(len(self.grid))
        self.logit_clip = float(logit_clip)
        self._m = np.zeros(len(self.grid))
        self._v = np.zeros(len(self.grid))
        self._t = 0

    @property
    def probs(self) -> np.ndarray:
        x = self.logits - self.logits.max()
        e = np.exp(x)
        return e / e.sum()

    def sample(self, rng: np.random.Generator) -> int:
        c = np.cumsum(self.probs)
        return min(int(np.searchsorted(c, rng.random() * c[-1], side="right")), len(c) - 1)

    def shares(self, k: int) -> dict[str, float]:
        return {n: float(x) for n, x in zip(self.names, self.grid[k])}

    def expected_shares(self) -> dict[str, float]:
        """The mean share of each stage under the current preferences (for reports)."""
        return {n: float(x) for n, x in zip(self.names, self.probs @ self.grid)}

    def log_prob(self, k: int) -> float:
        x = self.logits - self.logits.max()
        return float(x[k] - math.log(float(np.exp(x).sum())))

    def grad_log_prob(self, k: int) -> np.ndarray:
        g = -self.probs
        g[k] += 1.0
        return g

    def entropy(self) -> float:
        p = self.probs
        nz = p[p > 0]
        return float(-np.sum(nz * np.log(nz)))

    def max_entropy(self) -> float:
        return math.log(len(self.grid))

    def step(self, grad: np.ndarray, lr: float, *, max_step: float = 1.0, beta1: float = 0.9,
             beta2: float = 0.999) -> float:
        """One Adam ascent step (refused, nothing changed, when it is not finite)."""
        g = np.asarray(grad, dtype=float)
        t = self._t + 1
        m = beta1 * self._m + (1 - beta1) * g
        v = beta2 * self._v + (1 - beta2) * g * g
        delta = np.clip(lr * (m / (1 - beta1 ** t)) / (np.sqrt(v / (1 - beta2 ** t)) + 1e-8), -max_step, max_step)
        theta = np.clip(self.logits + delta, -self.logit_clip, self.logit_clip)
        if not (np.all(np.isfinite(m)) and np.all(np.isfinite(v)) and np.all(np.isfinite(theta))):
            return 0.0
        self._t, self._m, self._v, self.logits = t, m, v, theta
        return float(np.max(np.abs(delta)))

    def shift(self, stage: str, delta: float) -> float:
        """Move preference toward giving ``stage`` more budget (``delta`` > 0) or less: the
        splits with the largest share of it gain ``delta``, those with the smallest lose it,
        linearly in between. Returns the delta applied (0 for a one-stage pipeline)."""
        if not math.isfinite(delta):
            raise GraphError(f"budget split update refused: delta for {stage!r} is not a finite number")
        i = self.names.index(stage)
        col = self.grid[:, i]
        span = float(col.max() - col.min())
        if span <= 0:
            return 0.0
        self.logits = np.clip(self.logits + delta * (2 * (col - col.min()) / span - 1), -self.logit_clip,
                              self.logit_clip)
        return float(delta)

    def enforce_entropy_floor(self, min_entropy: float) -> None:
        """Shrink the logits toward zero until the entropy is at least ``min_entropy``."""
        if self.entropy() >= min_entropy:
            return
        base = self.logits.copy()
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            self.logits = mid * base
            if self.entropy() >= min_entropy:
                lo = mid
            else:
                hi = mid
        self.logits = lo * base

    def state_dict(self) -> dict[str, Any]:
        return {"version": SPLIT_STATE_VERSION, "stages": list(self.names), "points": len(self.grid),
                "logits": [float(x) for x in self.logits],
                "adam": {"m": [float(x) for x in self._m], "v": [float(x) for x in self._v], "t": self._t}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state.get("stages", [])) != list(self.names) or int(state.get("points", -1)) != len(self.grid):
            raise GraphError("budget-split state does not match this pipeline's stages; start a new study")
        logits = np.array(state["logits"], dtype=float)
        if not np.all(np.isfinite(logits)):
            raise GraphError("budget-split state holds non-finite values; start a new study")
        self.logits = logits
        self._m = np.array(state["adam"]["m"], dtype=float)
        self._v = np.array(state["adam"]["v"], dtype=float)
        self._t = int(state["adam"]["t"])


class PipelinePolicy:
    """The pipeline counterpart of :class:`~graphtune.search.policy.PolicyUpdate` (same
    ``sample`` / ``step`` / ``enforce_entropy_floor`` / state contract; see the module
    docstring). ``pgs``: stage name -> its probabilistic graph; ``split``: the budget split."""

    def __init__(self, ctx: SearchContext, *, lr: float, max_step: float, entropy_floor: float, edge_init: float):
        if not is_pipeline_study(ctx):
            raise GraphError("PipelinePolicy needs a multi-stage study (a PipelineSpace)")
        self.ctx = ctx
        self.space: PipelineSpace = ctx.space  # type: ignore[assignment]
        self.lr = lr
        self.max_step = max_step
        # each stage's distribution, bounded by the most its stage could ever get (the total
        # less the other stages' cheapest graphs, and its cap); a draw uses its share's budget
        self.pgs: dict[str, ProbabilisticGraph] = {
            s.name: ProbabilisticGraph(s.space, ctx.costs.of(s.name),
                                       stage_budget(self.space, ctx.costs, ctx.budget, s.name), edge_init=edge_init)
            for s in self.space.stages}
        self.split = BudgetSplit(self.space.names)
        self.min_entropy = {n: entropy_floor * pg.max_entropy() for n, pg in self.pgs.items()}
        self.min_split_entropy = entropy_floor * self.split.max_entropy()
        self.rng = ctx.rng(salt=12)
        self._budgets: dict[tuple[str, int], Any] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return self.space.names

    def stage_budget(self, name: str, k: int):
        """The budget of stage ``name``'s graph under split ``k`` (cached)."""
        key = (name, k)
        if key not in self._budgets:
            share = self.split.grid[k][self.names.index(name)]
            self._budgets[key] = stage_budget(self.space, self.ctx.costs, self.ctx.budget, name,
                                              share=float(share) if len(self.names) > 1 else None)
        return self._budgets[key]

    def draw(self, rng: np.random.Generator, *, max_tries: int = 200) -> tuple[Pipeline, dict[str, Any]]:
        """One pipeline within the pipeline budget: a split, then each stage's graph under
        its share; redrawn (split included) when the whole is over budget. Returns it and
        its info (``split`` index, ``shares``, joint ``log_prob``)."""
        for _ in range(max_tries):
            k = self.split.sample(rng)
            graphs, lp = {}, self.split.log_prob(k)
            try:
                for n in self.names:
                    s, slp = self.pgs[n].sample(rng, max_tries=500, budget=self.stage_budget(n, k))
                    graphs[n] = s.graph
                    lp += slp
            except BudgetError:
                continue
            p = self.space.pipeline(graphs)
            if self.ctx.budget.fits(self.ctx.costs.cost(p)):
                return p, {"log_prob": lp, "split": k,
                           "shares": {n: round(x, 4) for n, x in self.split.shares(k).items()}}
        raise BudgetError(f"no pipeline within the budget in {max_tries} draws from the stage distributions")

    def sample(self, n: int, questions: tuple[str, ...], taken: set[str], known: Container[str]) -> list[Candidate]:
        """``n`` new pipelines on ``questions``, none in ``taken`` (extended) or ``known``;
        as :meth:`PolicyUpdate.sample`, random pipelines (flagged ``fallback``) once the
        policy keeps drawing pipelines already measured."""
        out = []
        for _ in range(n):
            for attempt in range(60):
                try:
                    if attempt >= 20:
                        raise BudgetError("policy draws exhausted")
                    p, info = self.draw(self.rng)
                except BudgetError:
                    p = random_design(self.space, self.ctx.costs, self.ctx.budget, self.rng)
                    info = {"fallback": True}
                h = design_hash(p)
                if h not in taken and h not in known:
                    taken.add(h)
                    out.append(Candidate(graph=p, question_ids=questions, origin="sample", info=info))
                    break
        return out

    def step(self, evaluations: Sequence[Evaluation], reward: Callable[[Evaluation], float]) -> dict[str, Any]:
        """The REINFORCE step of :meth:`PolicyUpdate.step` on pipelines: leave-one-out
        baseline and normalised advantages of the pipelines' rewards; every stage's
        distribution steps along the mean of ``advantage * grad log p(stage graph)``, the
        split along ``advantage * grad log p(split)``."""
        items = []
        for e in evaluations:
            info = e.candidate.info
            if e.candidate.origin != "sample" or not e.ok or info.get("fallback") or "split" not in info:
                continue
            p = e.candidate.graph
            if not isinstance(p, Pipeline):
                continue
            samples = {n: self.pgs[n].embed(p.stage(n).graph) for n in self.names}
            k = int(info["split"])
            r = reward(e)
            if all(s is not None for s in samples.values()) and 0 <= k < len(self.split.grid) and not math.isnan(r):
                items.append((samples, k, r))
        if len(items) < 2:
            return {"samples": len(items), "step": 0.0}
        R = np.array([r for *_, r in items])
        K = len(R)
        adv = R - (R.sum() - R) / (K - 1)
        sd = float(adv.std())
        if sd < 1e-9:
            return {"samples": K, "step": 0.0}
        adv = adv / sd
        moved = 0.0
        per_stage = {}
        for n in self.names:
            pg = self.pgs[n]
            grad = np.mean([a * pg.grad_log_prob(s[n], marginal=True) for (s, _, _), a in zip(items, adv)], axis=0)
            per_stage[n] = pg.step(grad, self.lr, max_step=self.max_step)
            moved = max(moved, per_stage[n])
        gs = np.mean([a * self.split.grad_log_prob(k) for (_, k, _), a in zip(items, adv)], axis=0)
        split_moved = self.split.step(gs, self.lr, max_step=self.max_step)
        return {"samples": K, "step": max(moved, split_moved), "mean_reward": float(R.mean()),
                "stage_steps": per_stage, "split_step": split_moved}

    def enforce_entropy_floor(self) -> None:
        for n, pg in self.pgs.items():
            pg.enforce_entropy_floor(self.min_entropy[n])
        self.split.enforce_entropy_floor(self.min_split_entropy)

    def summary(self) -> dict[str, Any]:
        """A compact view for reports: per stage its model marginals and the sink's expected
        inputs, and the expected budget share."""
        shares = self.split.expected_shares()
        return {n: {"budget_share": round(shares[n], 3),
                    "model_marginals": {m: round(p, 3) for m, p in pg.model_marginals().items()},
                    "expected_sink_inputs": round(pg.expected_in_degree(pg.sink), 2)}
                for n, pg in self.pgs.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"pgs": {n: pg.state_dict() for n, pg in self.pgs.items()}, "split": self.split.state_dict(),
                "rng": rng_state(self.rng)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "pgs" not in state:
            raise GraphError("searcher state has no per-stage policy (saved by a single-stage study); "
                             "start a new study")
        if sorted(state["pgs"]) != sorted(self.names):
            raise GraphError(f"searcher state's stages {sorted(state['pgs'])} are not this pipeline's "
                             f"{list(self.names)}; start a new study")
        for n, pg in self.pgs.items():
            pg.load_state_dict(state["pgs"][n])
        self.split.load_state_dict(state["split"])
        self.rng = rng_from_state(state["rng"])
