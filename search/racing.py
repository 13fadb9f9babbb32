"""Racing: what a policy searcher knows about each graph, and where it spends the budget.

:class:`Racing` is the part ``reinforce`` and ``agent-reinforce`` hold for their
evidence and their evaluation protocol (why it is sample-efficient):

* One fixed random order of the dev questions. Every graph is scored on a *prefix* of
  it, so any two graphs are paired on their common prefix: question difficulty cancels
  out of every comparison, which cuts the noise of a difference several-fold.
* Prefix lengths form levels ``n_0 < n_1 < ... = dev size`` (each ``eta`` times the
  last, :func:`prefix_levels`). A new graph is scored on ``n_0`` questions.
  Asynchronous successive halving (ASHA, :meth:`Racing.promotions`): once a graph ranks
  in the top ``1/eta`` of the graphs that completed level k (by its mean on exactly the
  ``n_k`` shared questions), it is extended to level ``k+1``. Poor graphs cost ``n_0``
  runs; only contenders earn the whole dev set.
* The loop never pays twice for a graph on a question (canonical hash), so extending a
  graph costs only its new questions.
* In the last ``final_race_frac`` of the budget, or once the policy has no new graph to
  draw (:attr:`Racing.exhausted`: a space smaller than the budget; :meth:`Racing.final_phase`)
  no new graphs are drawn: the best graphs by paired effect race to the full dev set
  (:meth:`Racing.final_race`; once exhausted :meth:`Racing.catch_up_race`, lowest level
  first), one level a batch, until none is left below it or the budget is spent. A trial
  cut at the budget (the engine runs it on the prefix of its questions the budget pays
  for) completes no level; its results count as evidence, and a later trial of the graph
  pays only for the rest.

Evidence versus state. The per-graph evidence (its rewards per question, its trials,
where it came from, its cost) is what the store already holds: it is rebuilt from the
told evaluations by :meth:`Racing.restore` and never saved. So are the promotions the
race trials show. ``state_dict`` keeps only what the store cannot give: the runs counted
so far, whether the space was found exhausted, and the promotions that were asked but
never completed (the budget ran out before or within them), which a study continued with
more evaluations must not ask again.

:class:`ParetoScalarisation` is ``search.options.pareto``: each batch ranks graphs by
``reward - w * cost / scale`` (``w`` cycling through the weights), for the ASHA
promotions here and for the policy gradient's rewards (:meth:`Racing.minibatch_reward`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphtune.agent.report import GraphEntry, ProblemInfo, graph_effects
from graphtune.agent.surrogate import BayesSurrogate
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.cost import Budget, GraphCost
from graphtune.graphs.model import Graph
from graphtune.search.base import Candidate, Evaluation, GraphStats, Objective, SearchContext, best_paired, pool_stats


def prefix_levels(n_dev: int, n0: int, eta: float) -> list[int]:
    """``n0, n0*eta, ... , n_dev`` (strictly increasing, capped at the dev size)."""
    out = [max(1, min(n0, n_dev))]
    while out[-1] < n_dev:
        nxt = int(math.ceil(out[-1] * eta))
        out.append(min(n_dev, nxt if nxt > out[-1] else out[-1] + 1))
    if len(out) >= 2 and n_dev - out[-2] < 0.25 * out[-2]:  # no sliver of a last level
        out.pop(-2)
    return out


def default_n0(n_dev: int) -> int:
    """The first level's size when ``n0`` is not given: dev/8 clamped to 10..40. Large enough
    to rank graphs at all (a few questions are noise), small enough that a poor graph stays
    cheap."""
    return int(np.clip(round(n_dev / 8), 10, 40))


@dataclass(frozen=True)
class ParetoScalarisation:
    """``search.options.pareto``: the batch's reward is ``reward - w * cost / scale``, ``w``
    cycling through ``weights`` (one per batch), ``scale`` the budget's limit on the metric,
    else the largest cost seen."""

    metric: str  # a GraphCost field: units, flops, usd, latency_s
    weights: tuple[float, ...]
    limit: float  # the budget's limit on ``metric`` (0: none)

    @classmethod
    def of(cls, metric: str, weights: Sequence[float], budget: Budget) -> ParetoScalarisation:
        limit = {"units": budget.units, "flops": budget.flops, "usd": budget.usd, "latency_s": budget.latency_s}[metric]
        return cls(metric, tuple(weights), float(limit or 0.0))

    def cost(self, cost: GraphCost) -> float:
        return float(getattr(cost, self.metric))

    def weight(self, batch: int) -> float:
        return self.weights[batch % len(self.weights)]

    def penalty(self, cost: float, batch: int, costs_seen: Iterable[float]) -> float:
        scale = self.limit if self.limit else max(list(costs_seen) + [1e-12])
        return self.weight(batch) * cost / scale


@dataclass
class GraphRecord:
    """The evidence about one graph: rebuilt from its trials, never saved."""

    graph: Graph
    rewards: dict[str, float]  # question id -> reward, in the order first seen
    trials: list[int]
    origin: str  # of its first trial with a scored question
    units: float
    latency_s: float
    pcost: float | None = None  # its cost on the Pareto metric (Pareto mode)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.rewards.values())))


@dataclass
class Racing:
    """Evidence per graph on one fixed question order, prefix levels, ASHA promotions, the
    final race and the incumbent (see the module docstring)."""

    order: tuple[str, ...]
    levels: list[int]
    eta: float
    race_top: int
    final_race_frac: float
    budget_runs: int
    objective: Objective
    unit_flops: float
    pareto: ParetoScalarisation | None = None
    #: graph hash -> evidence (insertion order: first scored trial)
    records: dict[str, GraphRecord] = field(default_factory=dict)
    #: graph hash -> highest level it was sent to (absent: 0)
    promoted: dict[str, int] = field(default_factory=dict)
    #: graph hash -> highest level of its told race trials (rebuilt from the trials): the
    #: promotions the store shows, so the state saves only the others
    raced: dict[str, int] = field(default_factory=dict)
    #: graph-question runs paid for by the evaluations told so far
    spent: int = 0
    #: the policy found no new graph to draw (the space is used up): the final race runs
    #: from then on, whatever budget is left (saved: the draws that found it are gone)
    exhausted: bool = False

    @classmethod
    def of(cls, ctx: SearchContext, *, n0: int | None, eta: float, race_top: int, final_race_frac: float,
           pareto: ParetoScalarisation | None = None) -> Racing:
        n_dev = len(ctx.dev_ids)
        perm = ctx.rng(salt=11).permutation(n_dev)
        return cls(order=tuple(ctx.dev_ids[int(i)] for i in perm),
                   levels=prefix_levels(n_dev, n0 if n0 is not None else default_n0(n_dev), eta), eta=eta,
                   race_top=race_top, final_race_frac=final_race_frac, budget_runs=ctx.budget_runs,
                   objective=ctx.objective, unit_flops=ctx.costs.unit_flops, pareto=pareto)

    # -- evidence ----------------------------------------------------------------------
    def record(self, evaluations: Sequence[Evaluation]) -> None:
        """Count the runs paid and add the scored evaluations of a told batch."""
        for e in evaluations:
            self.spent += e.new_runs
            self._add(e)

    def restore(self, history: Sequence[Evaluation]) -> None:
        """Rebuild the evidence from every evaluation told so far (in trial order, as the
        store gives them back: complete trials); the counters and the promotions the trials
        do not show come from the saved state."""
        self.records, self.raced = {}, {}
        for e in history:
            self._add(e)
        for h, k in self.raced.items():
            self.promoted[h] = max(self.promoted.get(h, 0), k)

    def _add(self, e: Evaluation) -> None:
        if e.error is None and e.candidate.origin == "race" and e.candidate.question_ids is not None:
            n = len(e.candidate.question_ids)
            if n in self.levels:
                self.raced[e.graph_hash] = max(self.raced.get(e.graph_hash, 0), self.levels.index(n))
        if not e.ok:
            return
        d = self.records.get(e.graph_hash)
        if d is None:
            d = self.records[e.graph_hash] = GraphRecord(graph=e.candidate.graph, rewards={}, trials=[],
                                                         origin=e.candidate.origin, units=e.cost.units,
                                                         latency_s=e.cost.latency_s)
        d.rewards.update(e.rewards_by_question(self.objective, self.unit_flops))
        if e.trial_number not in d.trials:
            d.trials.append(e.trial_number)
        if self.pareto:
            d.pcost = self.pareto.cost(e.cost)

    def __contains__(self, h: str) -> bool:
        return h in self.records

    def graph(self, h: str) -> Graph:
        return self.records[h].graph

    def rewards(self, h: str) -> Mapping[str, float]:
        return self.records[h].rewards

    def trials(self, h: str) -> list[int]:
        return list(self.records[h].trials)

    def questions(self, level: int) -> tuple[str, ...]:
        """The order's prefix of level ``level``."""
        return self.order[: self.levels[level]]

    def n_scored(self, h: str) -> int:
        """Length of the order prefix graph ``h`` has been scored on."""
        r = self.records[h].rewards
        n = 0
        for q in self.order:
            if q not in r:
                break
            n += 1
        return n

    def prefix_mean(self, h: str, n: int) -> float:
        r = self.records[h].rewards
        return float(np.mean([r[q] for q in self.order[:n]]))

    def level_of(self, h: str) -> int:
        """Highest level completed (-1: none)."""
        n = self.n_scored(h)
        return max((k for k, nk in enumerate(self.levels) if n >= nk), default=-1)

    def entries(self) -> list[GraphEntry]:
        """Every graph as the agent's reports show it (mean over all its questions)."""
        return [GraphEntry(key=h, graph=d.graph, trial_numbers=tuple(d.trials), origin=d.origin,
                           rewards=dict(d.rewards), reward=d.mean, cost_units=d.units, latency_s=d.latency_s)
                for h, d in self.records.items()]

    def incumbent(self) -> str | None:
        """The leader: among graphs on the highest level reached, the best mean on that
        level's shared questions."""
        if not self.records:
            return None
        levels = {h: self.level_of(h) for h in self.records}
        top = max(levels.values())
        if top < 0:
            return max(self.records, key=lambda h: (self.records[h].mean, -self.records[h].trials[0]))
        n = self.levels[top]
        pool = [h for h, k in levels.items() if k == top]
        return max(pool, key=lambda h: (self.prefix_mean(h, n), -self.records[h].trials[0]))

    # -- where the budget goes -------------------------------------------------------------
    def remaining_runs(self) -> int:
        return max(0, self.budget_runs - self.spent) if self.budget_runs else 1 << 30

    def final_phase(self) -> bool:
        """In the last ``final_race_frac`` of the budget, or once the policy found no new
        graph to draw (:attr:`exhausted`): race, draw no new graphs."""
        return self.exhausted or (bool(self.budget_runs)
                                  and self.remaining_runs() < self.final_race_frac * self.budget_runs)

    def extend(self, h: str, level: int, origin: str = "race") -> Candidate:
        """Graph ``h`` on level ``level``'s questions (it pays only for the new ones)."""
        self.promoted[h] = max(self.promoted.get(h, 0), level)
        return Candidate(graph=self.records[h].graph, question_ids=self.questions(level), origin=origin,
                         parents=(self.records[h].trials[-1],))

    def promotions(self, batch: int) -> list[Candidate]:
        """ASHA: graphs in the top 1/eta of those that completed level k go to k+1."""
        out: list[Candidate] = []
        levels = {h: self.level_of(h) for h in self.records}
        for k in range(len(self.levels) - 2, -1, -1):
            done = [h for h, lv in levels.items() if lv >= k]
            quota = int(len(done) // self.eta)
            if quota < 1:
                continue
            n = self.levels[k]
            ranked = sorted(done, key=lambda h: (-self._rank_value(h, n, batch), self.records[h].trials[0]))
            for h in ranked[:quota]:
                if levels[h] == k and self.promoted.get(h, 0) <= k:
                    out.append(self.extend(h, k + 1))
        return out

    def final_race(self, batch: int) -> list[Candidate]:
        """Race to the full dev set: the leader, and every graph whose paired upper
        confidence bound against the leader is above zero (most promising first, up to
        ``race_top``), one level up. In Pareto mode: the current front instead
        (:meth:`pareto_race`)."""
        if self.pareto:
            return self.pareto_race()
        leader = self.incumbent()
        if leader is None:
            return []
        top_level = len(self.levels) - 1
        out = []
        if self.level_of(leader) < top_level:
            out.append(self.extend(leader, self.level_of(leader) + 1))
        for _, h in sorted(self._rivals(leader), key=lambda t: (-t[0], t[1]))[: self.race_top]:
            out.append(self.extend(h, self.level_of(h) + 1))
        return out

    def catch_up_race(self, batch: int, *, top: int, exclude: Container[str] = ()) -> list[Candidate]:
        """The final race once the space is used up (:attr:`exhausted`): the contenders (the
        leader and every graph whose paired upper confidence bound against it is above zero)
        on the lowest level any of them is on climb one level, the leader then the most
        promising first, up to ``top`` a batch, none in ``exclude`` (already in the batch).
        Rung by rung, as successive halving does (the field is re-judged on each rung's
        shared questions), so that when the budget runs out the contenders stand on about
        as many questions and are compared on them: a leader raced alone to the full dev
        set would be picked for its coverage. Asked batch after batch, every contender
        reaches the full dev set; [] once none is left below it. In Pareto mode: the
        current front (:meth:`pareto_race`)."""
        if self.pareto:
            return [c for c in self.pareto_race(top) if graph_hash(c.graph) not in exclude]
        leader = self.incumbent()
        if leader is None:
            return []
        top_level = len(self.levels) - 1
        todo = [(math.inf, leader)] if self.level_of(leader) < top_level else []
        todo += self._rivals(leader)
        todo = [(ucb, h) for ucb, h in todo if h not in exclude]
        if not todo:
            return []
        low = min(self.level_of(h) for _, h in todo)  # a rung is done before the next starts
        todo = sorted((t for t in todo if self.level_of(t[1]) == low), key=lambda t: (-t[0], t[1]))
        return [self.extend(h, low + 1) for _, h in todo[:top]]

    def _rivals(self, leader: str) -> list[tuple[float, str]]:
        """(z of the paired difference to ``leader``: its mean over its standard error, hash)
        of every graph below the full dev set whose paired upper confidence bound (mean + 2
        standard errors) is above zero."""
        top_level = len(self.levels) - 1
        lr = self.records[leader].rewards
        scored = []
        for h, d in self.records.items():
            if h == leader or self.level_of(h) >= top_level:
                continue
            shared = [q for q in d.rewards if q in lr]
            if len(shared) < 2:
                continue
            diff = np.array([d.rewards[q] - lr[q] for q in shared])
            se = float(diff.std(ddof=1)) / math.sqrt(len(diff))
            if diff.mean() + 2.0 * se > 0:
                # ranked by the evidence of beating the leader (z), not by the bound: a bound
                # ranks the least-measured graphs first, whose wide interval is all they have
                scored.append((float(diff.mean()) / se if se > 0 else math.inf, h))
        return scored

    def pareto_race(self, top: int | None = None) -> list[Candidate]:
        """Final race in Pareto mode: extend the graphs of the current front (by own mean
        reward and cost) that have not reached the full dev set, most accurate first
        (``2 * top + 1`` of them; ``top`` defaults to ``race_top``)."""
        top_level = len(self.levels) - 1
        pts = sorted(((d.pcost or 0.0, -d.mean, d.trials[0], h) for h, d in self.records.items()))
        front, best = [], -math.inf
        for c, neg_mean, _, h in pts:
            if -neg_mean > best:
                front.append(h)
                best = -neg_mean
        todo = [h for h in front if self.level_of(h) < top_level]
        todo.sort(key=lambda h: -self.records[h].mean)
        top = self.race_top if top is None else top
        return [self.extend(h, self.level_of(h) + 1) for h in todo[: 2 * top + 1]]

    # -- what a batch is ranked by -----------------------------------------------------------
    def _rank_value(self, h: str, n: int, batch: int) -> float:
        """What ASHA ranks graphs by: the prefix mean, minus this batch's cost penalty in
        Pareto mode."""
        if self.pareto:
            return self.prefix_mean(h, n) - self._penalty(self.records[h].pcost or 0.0, batch)
        return self.prefix_mean(h, n)

    def _penalty(self, cost: float, batch: int) -> float:
        return self.pareto.penalty(cost, batch, (d.pcost or 0.0 for d in self.records.values()))

    def minibatch_reward(self, questions: Sequence[str], batch: int) -> Callable[[Evaluation], float]:
        """The reward of an evaluation for the policy gradient of batch ``batch``: its mean
        on ``questions`` (nan when it has none), minus the batch's cost penalty in Pareto mode."""

        def reward(e: Evaluation) -> float:
            r = e.rewards_by_question(self.objective, self.unit_flops)
            vals = [r[q] for q in questions if q in r]
            if self.pareto and vals:
                return float(np.mean(vals)) - self._penalty(self.pareto.cost(e.cost), batch)
            return float(np.mean(vals)) if vals else float("nan")

        return reward

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The runs counted, and the promotions no told trial shows yet (asked, not run)."""
        out: dict[str, Any] = {"spent": self.spent,
                               "promoted": {h: k for h, k in self.promoted.items() if k > self.raced.get(h, 0)}}
        if self.exhausted:
            out["exhausted"] = True
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Counters and promotions; a state saved before the evidence left it (``evidence``:
        hash -> {..., "promoted": level}) gives its promotions the same way."""
        self.spent = int(state["spent"])
        self.exhausted = bool(state.get("exhausted", False))
        if "promoted" in state:
            self.promoted = {str(h): int(k) for h, k in state["promoted"].items()}
        else:
            self.promoted = {h: int(d["promoted"]) for h, d in (state.get("evidence") or {}).items()
                             if d.get("promoted")}
        self.records, self.raced = {}, {}


def recommend_paired(history: Sequence[Evaluation], objective: Objective, unit_flops: float) -> GraphStats | None:
    """Among well-evaluated graphs (at least half the top coverage), the best mean on the
    questions they share with the best-covered leader; ``GraphStats.ci95`` gives the
    interval of its own mean."""
    stats = pool_stats(history, objective, unit_flops)  # only graphs scored somewhere
    return _pick_paired(_well_covered(stats)) if stats else None


def _well_covered(stats: Mapping[str, GraphStats]) -> list[GraphStats]:
    """The candidates of a pick: graphs with at least half the top coverage (coverage counts
    infrastructure failures: a fault must not demote a graph)."""
    top = max(s.coverage for s in stats.values())
    return [s for s in stats.values() if s.coverage >= max(1, top // 2)]


def _pick_paired(well: Sequence[GraphStats]) -> GraphStats:
    top = max(s.coverage for s in well)
    leader = best_paired([s for s in well if s.coverage == top])

    def paired(s: GraphStats) -> float:
        # the leader's mean plus the paired difference on the questions both have
        shared = [q for q in s.rewards if q in leader.rewards]
        if not shared:
            return s.mean
        return leader.mean + float(np.mean([s.rewards[q] - leader.rewards[q] for q in shared]))

    return max(well, key=lambda s: (paired(s), s.n, -s.first_trial))


#: the surrogate pick needs this many other measured graphs to fit its leave-one-out
#: predictions on; with fewer (a space of a handful of graphs) it is the paired pick
SHRINK_MIN_GRAPHS = 10


def recommend_shrunk(history: Sequence[Evaluation], objective: Objective, unit_flops: float,
                     problem: ProblemInfo) -> GraphStats | None:
    """``pick: surrogate``: among the graphs :func:`recommend_paired` chooses from (at least
    half the top coverage), the best *shrunk* estimate. Picking the best raw dev mean among
    many graphs picks luck as well (the winner's curse: the more graphs compared, the more
    the winner's dev score overstates it). Each candidate's paired effect (the two-way fit
    of :func:`~graphtune.agent.report.graph_effects`, with its standard error ``se``) is
    pulled towards what the critic's surrogate (:class:`~graphtune.agent.surrogate.BayesSurrogate`,
    fitted on every *other* measured graph: leave-one-out, so a graph's own luck does not
    vouch for it) predicts for its features, by the usual empirical-Bayes weight
    ``sd^2 / (sd^2 + se^2)``, ``sd`` the prediction's posterior sd (misfit included). A
    graph far better than its features predict still wins when its own evidence is strong;
    one that is merely lucky on a few questions does not. Deterministic; it is
    :func:`recommend_paired` with fewer than two candidates or at most
    ``SHRINK_MIN_GRAPHS`` measured graphs (too few to learn anything from the features)."""
    stats = pool_stats(history, objective, unit_flops)
    if not stats:
        return None
    well = _well_covered(stats)
    if len(well) < 2 or len(stats) <= SHRINK_MIN_GRAPHS:
        return _pick_paired(well)
    entries = [GraphEntry(key=h, graph=s.graph, trial_numbers=(s.first_trial,), origin="", rewards=s.rewards,
                          reward=s.mean, cost_units=0.0, latency_s=0.0) for h, s in stats.items()]
    eff = graph_effects(entries)
    score: dict[str, float] = {}
    cache: dict[str, np.ndarray] = {}
    for s in well:
        sur = BayesSurrogate([e for e in entries if e.key != s.graph_hash], eff, problem, cache=cache)
        mu, se, _ = eff[s.graph_hash]
        if sur.coef is None:
            score[s.graph_hash] = mu
            continue
        pm, psd = sur.predict(s.graph)
        score[s.graph_hash] = pm + psd ** 2 / (psd ** 2 + se ** 2) * (mu - pm)
    return max(well, key=lambda s: (score[s.graph_hash], s.n, -s.first_trial))
