"""``reinforce``: a policy-gradient search over a probabilistic graph (numeric only).

:class:`PolicySearcher` is the machinery shared with ``agent-reinforce``: a
:class:`~graphtune.search.probgraph.ProbabilisticGraph` that proposes graphs, a
variance-reduced REINFORCE step, and **racing** that spends the evaluation budget where
it decides something. :class:`ReinforceSearcher` uses the numeric update alone
(GPTSwarm-style edge/role/model policy gradient).

Evaluation protocol (why it is sample-efficient):

* One fixed random order of the dev questions. Every graph is scored on a *prefix* of
  it, so any two graphs are paired on their common prefix: question difficulty cancels
  out of every comparison, which cuts the noise of a difference several-fold.
* Prefix lengths form levels ``n_0 < n_1 < ... = dev size`` (each ``eta`` times the
  last). A new graph is scored on ``n_0`` questions. Asynchronous successive halving
  (ASHA): once a graph ranks in the top ``1/eta`` of the graphs that completed level
  k (by its mean on exactly the ``n_k`` shared questions), it is extended to level
  ``k+1``. Poor graphs cost ``n_0`` runs; only contenders earn the whole dev set.
* The loop never pays twice for a graph on a question (canonical hash), so extending a
  graph costs only its new questions.

One batch (``ask``): the pending promotions, then new graphs on the level-0 prefix:
hook candidates (agent proposals, in ``agent-reinforce``) and ``samples`` draws from the
distribution. In the last ``final_race_frac`` of the budget no new graphs are drawn:
the best graphs by paired effect race to the full dev set.

``tell``: the samples of a batch share the level-0 questions, so their rewards are
directly comparable: leave-one-out baseline, normalised advantages, the gradient of the
marginal log-probability of each evaluated graph averaged and applied with Adam, then
the entropy floor.

``recommend``: among graphs measured on the most questions (at least half of the top
coverage), the best mean on the questions they share with the leader, with a 95% CI.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from graphtune.agent.report import GraphEntry, graph_effects
from graphtune.errors import BudgetError, SpecError
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.io import from_dict, to_dict
from graphtune.graphs.model import Graph
from graphtune.graphs.space import random_graph
from graphtune.search.base import (Candidate, Evaluation, GraphStats, SearchContext, Searcher, SearcherOptions,
                                   best_paired, pool_stats, rng_from_state, rng_state)
from graphtune.search.probgraph import ProbabilisticGraph


#: scalarisation weights cycled through in Pareto mode (reward lost per budget-sized cost)
DEFAULT_PARETO_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)
#: accepted names of the cost metric of ``search.options.pareto`` -> GraphCost field
PARETO_METRICS = {"units": "units", "cost_units": "units", "flops": "flops", "usd": "usd", "cost_usd": "usd",
                  "latency_s": "latency_s"}


def pareto_metric(value: Any) -> str | None:
    """The GraphCost field of ``search.options.pareto`` (a metric name or a one-element
    list), None when unset; a one-line SpecError otherwise."""
    if value is None or value is False or value == []:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise SpecError(f"search.options.pareto: give one cost metric (got {list(value)}); "
                            f"known: {', '.join(sorted(PARETO_METRICS))}")
        value = value[0]
    try:
        return PARETO_METRICS[str(value).strip().lower()]
    except KeyError:
        raise SpecError(f"search.options.pareto: unknown cost metric {value!r}; "
                        f"known: {', '.join(sorted(PARETO_METRICS))}") from None


class PolicyOptions(SearcherOptions):
    """``search.options`` of ``reinforce`` (see :class:`PolicySearcher` for what each does)."""

    n0: int | None = Field(None, ge=1, le=1_000_000, description="questions of the first level (default dev/8, 10..40)")
    eta: float = Field(3.0, ge=1.5, le=100, description="level growth factor and successive-halving ratio")
    samples: int | None = Field(None, ge=1, le=4096, description="graphs drawn per batch")
    lr: float = Field(0.3, gt=0, le=100, description="Adam step size on the logits")
    max_step: float = Field(1.0, gt=0, le=100, description="largest step per logit")
    entropy_floor: float = Field(0.35, ge=0, le=1, description="minimum entropy, a fraction of the maximum")
    edge_init: float = Field(-1.0, ge=-100, le=100, description="initial edge logit")
    race_top: int = Field(3, ge=1, le=1000, description="graphs raced at the end")
    final_race_frac: float = Field(0.15, ge=0, lt=1, description="share of the budget kept for the final race")
    pareto: str | list[str] | bool | None = Field(None, description="a cost metric: search the accuracy-vs-cost front")
    pareto_weights: list[float] = Field(list(DEFAULT_PARETO_WEIGHTS), min_length=1, max_length=1000)

    @field_validator("pareto")
    @classmethod
    def _metric(cls, v: Any) -> str | None:
        try:
            return pareto_metric(v)
        except SpecError as e:
            raise ValueError(str(e).removeprefix("search.options.pareto: ")) from None

    @field_validator("pareto_weights")
    @classmethod
    def _weights(cls, v: list[float]) -> list[float]:
        if min(v) < 0:
            raise ValueError("pareto weights must be >= 0")
        return v


def prefix_levels(n_dev: int, n0: int, eta: float) -> list[int]:
    """``n0, n0*eta, ... , n_dev`` (strictly increasing, capped at the dev size)."""
    out = [max(1, min(n0, n_dev))]
    while out[-1] < n_dev:
        nxt = int(math.ceil(out[-1] * eta))
        out.append(min(n_dev, nxt if nxt > out[-1] else out[-1] + 1))
    if len(out) >= 2 and n_dev - out[-2] < 0.25 * out[-2]:  # no sliver of a last level
        out.pop(-2)
    return out


class PolicySearcher(Searcher):
    """Shared REINFORCE + racing machinery (see the module docstring). Options
    (``search.options``):

    - ``n0`` (default: dev/8 clamped to 10..40): questions of the first level;
    - ``eta`` (3): level growth factor and successive-halving ratio;
    - ``samples`` (default ``search.batch_size``): graphs drawn per batch;
    - ``lr`` (0.3): Adam step size on the logits; ``max_step`` (1.0) per coordinate;
    - ``entropy_floor`` (0.35): minimum entropy as a fraction of the maximum;
    - ``edge_init`` (-1.0): initial edge logit (sparse graphs first);
    - ``race_top`` (3): graphs raced at the end; ``final_race_frac`` (0.15): share of
      the budget kept for that final race;
    - ``pareto`` (off): a cost metric (``units``, ``flops``, ``usd``/``cost_usd`` or
      ``latency_s``) to search the accuracy-vs-cost front instead of the best reward.
      Each batch uses one scalarisation ``reward - w * cost / scale`` (``w`` cycles
      through ``pareto_weights``, default ``[0, 0.25, 0.5, 1, 2]``; ``scale`` is the
      budget's limit on that metric, else the largest cost seen) for the policy
      gradient and the ASHA promotions, so cheap graphs earn questions too, and the
      final race extends the current front instead of the leader's rivals. Stored
      rewards, the recommended graph and everything without the option are unchanged.
    """

    name = "policy"
    Options = PolicyOptions
    #: whether the first batch probes each model alone (agent-reinforce)
    probes = False

    def __init__(self, ctx: SearchContext):
        super().__init__(ctx)
        o = self.opts
        n_dev = len(ctx.dev_ids)
        self.eta = o.eta
        # the first level must be large enough to rank graphs at all (a few questions are
        # noise), small enough that a poor graph stays cheap
        n0 = o.n0 if o.n0 is not None else int(np.clip(round(n_dev / 8), 10, 40))
        self.levels = prefix_levels(n_dev, n0, self.eta)
        self.n_samples = o.samples if o.samples is not None else ctx.batch_size
        self.lr = o.lr
        self.max_step = o.max_step
        self.entropy_frac = o.entropy_floor
        self.race_top = o.race_top
        self.final_race_frac = o.final_race_frac
        self.pareto = o.pareto
        self.pareto_weights = list(o.pareto_weights)
        self.pg = ProbabilisticGraph(ctx.space, ctx.costs, ctx.budget, edge_init=o.edge_init)
        self.min_entropy = self.entropy_frac * self.pg.max_entropy()
        perm = ctx.rng(salt=11).permutation(n_dev)
        self.order: list[str] = [ctx.dev_ids[int(i)] for i in perm]
        self.rng = ctx.rng(salt=12)
        self.batches_told = 0
        self.spent = 0
        self.phase = "probe" if self.probes else "search"
        #: graph hash -> {"graph": plain graph, "rewards": {qid: r}, "trials": [...], "origin": str,
        #:               "promoted": highest level it was sent to}
        self.evidence: dict[str, dict[str, Any]] = {}
        self.earlier: list[str] = []
        self._minibatch: tuple[str, ...] = ()
        self._gcache: dict[str, Graph] = {}

    # -- evidence ----------------------------------------------------------------------
    def _n(self, h: str) -> int:
        """Length of the order prefix graph ``h`` has been scored on."""
        r = self.evidence[h]["rewards"]
        n = 0
        for q in self.order:
            if q not in r:
                break
            n += 1
        return n

    def _prefix_mean(self, h: str, n: int) -> float:
        r = self.evidence[h]["rewards"]
        return float(np.mean([r[q] for q in self.order[:n]]))

    def _level_of(self, h: str) -> int:
        """Highest level completed (-1: none)."""
        n = self._n(h)
        return max((k for k, nk in enumerate(self.levels) if n >= nk), default=-1)

    def _entries(self) -> list[GraphEntry]:
        out = []
        for h, d in self.evidence.items():
            g = self._graph(h)
            out.append(GraphEntry(key=h, graph=g, trial_numbers=tuple(d["trials"]), origin=d["origin"],
                                  rewards=d["rewards"], reward=float(np.mean(list(d["rewards"].values()))),
                                  cost_units=d.get("units", 0.0), latency_s=d.get("latency_s", 0.0)))
        return out

    def _effects(self) -> dict[str, tuple[float, float, int]]:
        return graph_effects(self._entries())

    def incumbent(self) -> str | None:
        """The leader: among graphs on the highest level reached, the best mean on that
        level's shared questions."""
        if not self.evidence:
            return None
        levels = {h: self._level_of(h) for h in self.evidence}
        top = max(levels.values())
        if top < 0:
            return max(self.evidence, key=lambda h: (np.mean(list(self.evidence[h]["rewards"].values())),
                                                     -self.evidence[h]["trials"][0]))
        n = self.levels[top]
        pool = [h for h, k in levels.items() if k == top]
        return max(pool, key=lambda h: (self._prefix_mean(h, n), -self.evidence[h]["trials"][0]))

    def _graph(self, h: str) -> Graph:
        g = self._gcache.get(h)
        if g is None:  # parsed once per graph (the evidence keeps plain data for the state)
            g = self._gcache[h] = from_dict(self.evidence[h]["graph"])
        return g

    # -- ask -------------------------------------------------------------------------
    def _extend(self, h: str, level: int, origin: str) -> Candidate:
        self.evidence[h]["promoted"] = max(self.evidence[h].get("promoted", 0), level)
        return Candidate(graph=self._graph(h), question_ids=tuple(self.order[: self.levels[level]]), origin=origin,
                         parents=(self.evidence[h]["trials"][-1],))

    def _promotions(self) -> list[Candidate]:
        """ASHA: graphs in the top 1/eta of those that completed level k go to k+1."""
        out: list[Candidate] = []
        levels = {h: self._level_of(h) for h in self.evidence}
        for k in range(len(self.levels) - 2, -1, -1):
            done = [h for h, lv in levels.items() if lv >= k]
            quota = int(len(done) // self.eta)
            if quota < 1:
                continue
            n = self.levels[k]
            ranked = sorted(done, key=lambda h: (-self._rank_value(h, n), self.evidence[h]["trials"][0]))
            for h in ranked[:quota]:
                if levels[h] == k and self.evidence[h].get("promoted", 0) <= k:
                    out.append(self._extend(h, k + 1, "race"))
        return out

    def _final_race(self) -> list[Candidate]:
        """Race to the full dev set: the leader, and every graph whose paired upper
        confidence bound against the leader is above zero (most promising first)."""
        if self.pareto:
            return self._pareto_race()
        leader = self.incumbent()
        if leader is None:
            return []
        top_level = len(self.levels) - 1
        lr = self.evidence[leader]["rewards"]
        scored = []
        for h, d in self.evidence.items():
            if h == leader or self._level_of(h) >= top_level:
                continue
            shared = [q for q in d["rewards"] if q in lr]
            if len(shared) < 2:
                continue
            diff = np.array([d["rewards"][q] - lr[q] for q in shared])
            ucb = float(diff.mean() + 2.0 * diff.std(ddof=1) / math.sqrt(len(diff)))
            if ucb > 0:
                scored.append((ucb, h))
        out = []
        if self._level_of(leader) < top_level:
            out.append(self._extend(leader, self._level_of(leader) + 1, "race"))
        for _, h in sorted(scored, key=lambda t: (-t[0], t[1]))[: self.race_top]:
            out.append(self._extend(h, self._level_of(h) + 1, "race"))
        return out

    def _sample_candidates(self, mb: tuple[str, ...], taken: set[str]) -> list[Candidate]:
        out = []
        for _ in range(self.n_samples):
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
                    g, info = random_graph(self.ctx.space, self.ctx.costs, self.ctx.budget, self.rng), {"fallback": True}
                h = graph_hash(g)
                if h not in taken and h not in self.evidence:
                    taken.add(h)
                    out.append(Candidate(graph=g, question_ids=mb, origin="sample", info=info))
                    break
        return out

    def _extra_candidates(self, mb: tuple[str, ...], taken: set[str]) -> list[Candidate]:
        """Hook: more new graphs on the level-0 questions (agent proposals)."""
        return []

    def _probe_candidates(self) -> list[Candidate]:
        from graphtune.graphs.model import Node
        from graphtune.graphs.space import is_valid

        # probes seed the agent's prior: measure them on the second level's questions
        mb = tuple(self.order[: self.levels[min(1, len(self.levels) - 1)]])
        out = []
        src = next((r for r in self.ctx.space.roles if r != "fuser"), self.ctx.space.roles[0])
        for m in self.ctx.space.models:
            g = Graph.build([Node.make(self.pg.slot_id(self.pg.sink), src, m)])
            if is_valid(g, self.ctx.space, self.ctx.costs, self.ctx.budget):
                out.append(Candidate(graph=g, question_ids=mb, origin="probe"))
        return out

    def remaining_runs(self) -> int:
        return max(0, self.ctx.budget_runs - self.spent) if self.ctx.budget_runs else 1 << 30

    def _final_phase(self) -> bool:
        return bool(self.ctx.budget_runs) and self.remaining_runs() < self.final_race_frac * self.ctx.budget_runs

    def ask(self) -> list[Candidate]:
        if self.phase == "probe":
            cands = self._probe_candidates()
            if cands:
                self._minibatch = tuple(cands[0].question_ids or ())
                return cands
            self.phase = "search"
        if self._final_phase():
            race = self._final_race()
            if race:
                self._minibatch = ()
                return race
        cands = self._promotions()
        taken = {graph_hash(c.graph) for c in cands}
        mb = tuple(self.order[: self.levels[0]])
        self._minibatch = mb
        cands += self._extra_candidates(mb, taken)
        cands += self._sample_candidates(mb, taken)
        return cands

    # -- tell ------------------------------------------------------------------------
    def _record(self, evaluations: Sequence[Evaluation]) -> None:
        for e in evaluations:
            self.spent += e.new_runs
            if not e.ok:
                continue
            d = self.evidence.setdefault(e.graph_hash, {"graph": to_dict(e.candidate.graph), "rewards": {},
                                                        "trials": [], "origin": e.candidate.origin, "promoted": 0,
                                                        "units": e.cost.units, "latency_s": e.cost.latency_s})
            d["rewards"].update(e.rewards_by_question(self.ctx.objective, self.ctx.costs.unit_flops))
            if e.trial_number not in d["trials"]:
                d["trials"].append(e.trial_number)
            if self.pareto:
                d["pcost"] = self._pareto_cost(e.cost)

    def _mb_reward(self, e: Evaluation, mb: Sequence[str]) -> float:
        r = e.rewards_by_question(self.ctx.objective, self.ctx.costs.unit_flops)
        vals = [r[q] for q in mb if q in r]
        if self.pareto and vals:
            return float(np.mean(vals)) - self._pareto_penalty(self._pareto_cost(e.cost))
        return float(np.mean(vals)) if vals else float("nan")

    # -- Pareto mode (search.options.pareto) ------------------------------------------------
    def _rank_value(self, h: str, n: int) -> float:
        """What ASHA ranks graphs by: the prefix mean, minus this batch's cost penalty in
        Pareto mode."""
        if self.pareto:
            return self._prefix_mean(h, n) - self._pareto_penalty(self.evidence[h].get("pcost", 0.0))
        return self._prefix_mean(h, n)

    def _pareto_cost(self, cost) -> float:
        return float(getattr(cost, self.pareto))

    def _pareto_weight(self) -> float:
        return self.pareto_weights[self.batches_told % len(self.pareto_weights)]

    def _pareto_scale(self) -> float:
        limit = {"units": self.ctx.budget.units, "flops": self.ctx.budget.flops, "usd": self.ctx.budget.usd,
                 "latency_s": self.ctx.budget.latency_s}[self.pareto]
        if limit:
            return float(limit)
        return max([d.get("pcost", 0.0) for d in self.evidence.values()] + [1e-12])

    def _pareto_penalty(self, cost: float) -> float:
        return self._pareto_weight() * cost / self._pareto_scale()

    def _pareto_race(self) -> list[Candidate]:
        """Final race in Pareto mode: extend the graphs of the current front (by own mean
        reward and cost) that have not reached the full dev set, most accurate first."""
        top_level = len(self.levels) - 1
        pts = sorted(((d.get("pcost", 0.0), -float(np.mean(list(d["rewards"].values()))), d["trials"][0], h)
                      for h, d in self.evidence.items()))
        front, best = [], -math.inf
        for c, neg_mean, _, h in pts:
            if -neg_mean > best:
                front.append(h)
                best = -neg_mean
        todo = [h for h in front if self._level_of(h) < top_level]
        todo.sort(key=lambda h: -float(np.mean(list(self.evidence[h]["rewards"].values()))))
        return [self._extend(h, self._level_of(h) + 1, "race") for h in todo[: 2 * self.race_top + 1]]

    def _numeric_step(self, evaluations: Sequence[Evaluation], mb: Sequence[str]) -> dict[str, Any]:
        """Leave-one-out-baseline, normalised REINFORCE step from the batch's samples."""
        items = []
        for e in evaluations:
            if e.candidate.origin != "sample" or not e.ok or e.candidate.info.get("fallback"):
                continue
            s = self.pg.embed(e.candidate.graph)
            r = self._mb_reward(e, mb)
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

    def _after_numeric(self, evaluations: Sequence[Evaluation], mb: tuple[str, ...], numeric: dict) -> None:
        """Hook: the agent's feedback (agent-reinforce)."""

    def tell(self, evaluations: Sequence[Evaluation]) -> None:
        self._record(evaluations)
        mb = self._minibatch
        if self.phase == "probe":
            self._after_probes(evaluations)
            self.phase = "search"
            self.batches_told += 1
            return
        numeric = self._numeric_step(evaluations, mb) if mb else {"samples": 0, "step": 0.0}
        self._after_numeric(evaluations, mb, numeric)
        self.pg.enforce_entropy_floor(self.min_entropy)
        inc = self.incumbent()
        if inc is not None:
            d = self.evidence[inc]
            self.earlier.append(f"round {self.batches_told}: {len(evaluations)} graphs, leader "
                                f"{self._graph(inc)} mean {np.mean(list(d['rewards'].values())):.3f} over "
                                f"{len(d['rewards'])} questions")
            self.earlier = self.earlier[-8:]
        self.batches_told += 1

    def _after_probes(self, evaluations: Sequence[Evaluation]) -> None:
        """Hook: the agent's initial preferences."""

    # -- recommendation --------------------------------------------------------------
    def recommend(self, history: Sequence[Evaluation]) -> GraphStats | None:
        """Among well-evaluated graphs (at least half the top coverage), the best mean on
        the questions they share with the best-covered leader; ``GraphStats.ci95`` gives
        the interval of its own mean."""
        stats = pool_stats(history, self.ctx.objective, self.ctx.costs.unit_flops)  # only graphs scored somewhere
        if not stats:
            return None
        # coverage counts infrastructure failures: a fault must not demote a graph
        top = max(s.coverage for s in stats.values())
        well = [s for s in stats.values() if s.coverage >= max(1, top // 2)]
        leader = best_paired([s for s in well if s.coverage == top])

        def paired(s: GraphStats) -> float:
            # the leader's mean plus the paired difference on the questions both have
            shared = [q for q in s.rewards if q in leader.rewards]
            if not shared:
                return s.mean
            return leader.mean + float(np.mean([s.rewards[q] - leader.rewards[q] for q in shared]))

        return max(well, key=lambda s: (paired(s), s.n, -s.first_trial))

    # -- state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"pg": self.pg.state_dict(), "rng": rng_state(self.rng), "batches_told": self.batches_told,
                "spent": self.spent, "phase": self.phase, "evidence": self.evidence, "earlier": list(self.earlier)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pg.load_state_dict(state["pg"])
        self.rng = rng_from_state(state["rng"])
        self.batches_told = int(state["batches_told"])
        self.spent = int(state["spent"])
        self.phase = str(state["phase"])
        self.evidence = {h: {**d, "rewards": dict(d["rewards"]), "trials": list(d["trials"])}
                         for h, d in state["evidence"].items()}
        self.earlier = list(state["earlier"])


class ReinforceSearcher(PolicySearcher):
    """``reinforce``: the numeric policy gradient alone (no agent, no probes). Options as
    :class:`PolicySearcher`."""

    name = "reinforce"
