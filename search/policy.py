"""The policy-update part of ``reinforce`` and ``agent-reinforce``.

:class:`PolicyUpdate` holds a :class:`~graphtune.search.probgraph.ProbabilisticGraph`
(the distribution over graphs), the generator its draws come from, and the numeric
update: the samples of a batch share the level-0 questions, so their rewards are
directly comparable; leave-one-out baseline, normalised advantages, the gradient of the
marginal log-probability of each evaluated graph averaged and applied with Adam
(:meth:`PolicyUpdate.step`), then the entropy floor (:meth:`PolicyUpdate.enforce_entropy_floor`).

Its state (logits, Adam moments, the generator) is all the store cannot give back, so it
is saved whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any

import numpy as np

from graphtune.errors import BudgetError
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.space import random_graph
from graphtune.search.base import Candidate, Evaluation, SearchContext, rng_from_state, rng_state
from graphtune.search.probgraph import ProbabilisticGraph


class PolicyUpdate:
    """The distribution, its draws and its REINFORCE step (see the module docstring).

    ``lr``: Adam step size on the logits; ``max_step``: largest step per logit;
    ``entropy_floor``: minimum entropy as a fraction of the maximum; ``edge_init``: the
    initial edge logit (sparse graphs first)."""

    def __init__(self, ctx: SearchContext, *, lr: float, max_step: float, entropy_floor: float, edge_init: float):
        self.ctx = ctx
        self.lr = lr
        self.max_step = max_step
        self.pg = ProbabilisticGraph(ctx.space, ctx.costs, ctx.budget, edge_init=edge_init)
        self.min_entropy = entropy_floor * self.pg.max_entropy()
        self.rng = ctx.rng(salt=12)

    def sample(self, n: int, questions: tuple[str, ...], taken: set[str], known: Container[str]) -> list[Candidate]:
        """``n`` new graphs on ``questions``, none in ``taken`` (the batch so far; extended)
        or ``known`` (graphs already measured)."""
        out = []
        for _ in range(n):
            # a few redraws to keep the batch new; when the policy has concentrated on
            # graphs already measured, explore with uniformly random valid graphs instead
            # (flagged: they carry no policy gradient)
            for attempt in range(60):
                try:
                    if attempt >= 20:
                        raise BudgetError("policy draws exhausted")
                    s, lp = self.pg.sample(self.rng)
                    g, info = s.graph, {"log_prob": lp}
                except BudgetError:
                    g = random_graph(self.ctx.space, self.ctx.costs, self.ctx.budget, self.rng)
                    info = {"fallback": True}
                h = graph_hash(g)
                if h not in taken and h not in known:
                    taken.add(h)
                    out.append(Candidate(graph=g, question_ids=questions, origin="sample", info=info))
                    break
        return out

    def step(self, evaluations: Sequence[Evaluation], reward: Callable[[Evaluation], float]) -> dict[str, Any]:
        """Leave-one-out-baseline, normalised REINFORCE step from the batch's samples (their
        ``reward``); returns what it did (``samples``, ``step``, ``mean_reward``)."""
        items = []
        for e in evaluations:
            if e.candidate.origin != "sample" or not e.ok or e.candidate.info.get("fallback"):
                continue
            s = self.pg.embed(e.candidate.graph)
            r = reward(e)
            if s is not None and not math.isnan(r):
                items.append((s, r))
        if len(items) < 2:
            return {"samples": len(items), "step": 0.0}
        R = np.array([r for _, r in items])
        K = len(R)
        adv = R - (R.sum() - R) / (K - 1)  # leave-one-out baseline: unbiased
        sd = float(adv.std())
        if sd < 1e-9:
            return {"samples": K, "step": 0.0}
        adv = adv / sd
        grad = np.mean([a * self.pg.grad_log_prob(s, marginal=True) for (s, _), a in zip(items, adv)], axis=0)
        moved = self.pg.step(grad, self.lr, max_step=self.max_step)
        return {"samples": K, "step": moved, "mean_reward": float(R.mean())}

    def snapshot(self) -> np.ndarray:
        """A copy of the logits now (for :meth:`attribution`)."""
        return self.pg.params.copy()

    def attribution(self, before: np.ndarray, after_gradient: np.ndarray, after_agent: np.ndarray,
                    *, top: int = 8) -> dict[str, Any]:
        """How the logits moved in one batch, by source: the numeric gradient step
        (``before`` -> ``after_gradient``), the agent's deltas (-> ``after_agent``) and the
        entropy floor (-> the logits now). Plain data, rounded to 4 decimals: the summed
        absolute change of each source (``gradient_l1``, ``agent_l1``, ``floor_l1``), the
        agent's share of the gradient-plus-agent change (``agent_share``; None when
        nothing moved) and the ``top`` logits by total change, each split into its parts."""
        now = self.pg.params
        g, a, f = after_gradient - before, after_agent - after_gradient, now - after_agent
        gl, al, fl = (float(np.abs(x).sum()) for x in (g, a, f))
        total = g + a + f
        names = self.pg.param_names()
        order = [int(i) for i in np.argsort(-np.abs(total), kind="stable")[:top] if abs(total[i]) > 1e-6]
        return {"gradient_l1": round(gl, 4), "agent_l1": round(al, 4), "floor_l1": round(fl, 4),
                "agent_share": round(al / (gl + al), 4) if gl + al > 1e-12 else None,
                "top": [{"logit": names[i], "gradient": round(float(g[i]), 4), "agent": round(float(a[i]), 4),
                         "floor": round(float(f[i]), 4), "total": round(float(total[i]), 4)} for i in order]}

    def enforce_entropy_floor(self) -> None:
        self.pg.enforce_entropy_floor(self.min_entropy)

    def state_dict(self) -> dict[str, Any]:
        return {"pg": self.pg.state_dict(), "rng": rng_state(self.rng)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pg.load_state_dict(state["pg"])
        self.rng = rng_from_state(state["rng"])
