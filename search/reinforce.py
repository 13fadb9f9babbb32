"""``reinforce``: a policy-gradient search over a probabilistic graph (numeric only).

:class:`PolicySearcher` is the machinery shared with ``agent-reinforce``: a
:class:`~graphtune.search.probgraph.ProbabilisticGraph`, paired minibatches, a
variance-reduced REINFORCE step, racing of the best graphs on more questions and a
recommendation by paired mean with evidence. :class:`ReinforceSearcher` uses the numeric
update alone (GPTSwarm-style edge/role/model policy gradient).

One batch (``ask``):

1. *Racing*: the ``race_top`` graphs with the best paired effect are scored on
   ``race_step`` more dev questions they have not seen (in one fixed question order, so
   the contenders share their questions). In the last ``final_race_frac`` of the budget
   only racing happens, on the top ``race_top + 1`` graphs.
2. The *incumbent* (best paired effect) on this batch's minibatch, for the paired
   comparison.
3. ``samples`` graphs from the distribution (distinct by canonical hash), on the same
   minibatch.

``tell``: each sample's reward is its mean over the minibatch; advantages use a
leave-one-out baseline and are normalised; the gradient of the marginal log-probability
of each evaluated graph (``ProbabilisticGraph.grad_log_prob``) is averaged and applied
with Adam; then the entropy floor. The minibatch grows by ``minibatch_growth`` per batch
up to ``minibatch_max``. The loop never pays twice for a graph on a question (canonical
hash), so re-including the incumbent or a repeated sample costs only questions it has
not seen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphtune.agent.report import GraphEntry, graph_effects
from graphtune.errors import BudgetError
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.io import from_dict, to_dict
from graphtune.graphs.model import Graph
from graphtune.graphs.space import random_graph
from graphtune.search.base import (Candidate, Evaluation, GraphStats, SearchContext, Searcher, pool_stats,
                                   rng_from_state, rng_state)
from graphtune.search.probgraph import ProbabilisticGraph


def _opt(options: Mapping[str, Any], key: str, default, cast=float):
    v = options.get(key, default)
    return cast(v) if v is not None else default


class PolicySearcher(Searcher):
    """Shared REINFORCE machinery (see the module docstring). Options (``search.options``):

    - ``minibatch`` (int, default: 10% of dev, 5..20): questions per paired minibatch;
    - ``minibatch_growth`` (1.1), ``minibatch_max`` (3 x minibatch);
    - ``samples`` (default ``search.batch_size``): graphs drawn per batch;
    - ``lr`` (0.25): Adam step size on the logits; ``max_step`` (1.0) per coordinate;
    - ``entropy_floor`` (0.4): minimum entropy as a fraction of the maximum;
    - ``edge_init`` (-1.0): initial edge logit (sparse graphs first);
    - ``race_top`` (2), ``race_step`` (= minibatch): racing of the best graphs;
    - ``final_race_frac`` (0.2): share of the budget kept for racing at the end.
    """

    name = "policy"
    #: whether the first batch probes each model alone (agent-reinforce)
    probes = False

    def __init__(self, ctx: SearchContext):
        super().__init__(ctx)
        o = ctx.options
        n_dev = len(ctx.dev_ids)
        self.mb0 = max(1, min(n_dev, _opt(o, "minibatch", max(5, min(20, round(0.1 * n_dev))), int)))
        self.mb_growth = _opt(o, "minibatch_growth", 1.1)
        self.mb_max = max(self.mb0, min(n_dev, _opt(o, "minibatch_max", 3 * self.mb0, int)))
        self.n_samples = max(1, _opt(o, "samples", ctx.batch_size, int))
        self.lr = _opt(o, "lr", 0.25)
        self.max_step = _opt(o, "max_step", 1.0)
        self.entropy_frac = _opt(o, "entropy_floor", 0.4)
        self.race_top = max(0, _opt(o, "race_top", 2, int))
        self.race_step = max(1, _opt(o, "race_step", self.mb0, int))
        self.final_race_frac = _opt(o, "final_race_frac", 0.2)
        self.pg = ProbabilisticGraph(ctx.space, ctx.costs, ctx.budget, edge_init=_opt(o, "edge_init", -1.0))
        self.min_entropy = self.entropy_frac * self.pg.max_entropy()
        # one fixed question order: minibatches are its chunks, racing follows it
        perm = ctx.rng(salt=11).permutation(n_dev)
        self.order: list[str] = [ctx.dev_ids[int(i)] for i in perm]
        self.rng = ctx.rng(salt=12)
        self.batches_told = 0
        self.pointer = 0
        self.mb_size = self.mb0
        self.spent = 0
        self.phase = "probe" if self.probes else "search"
        #: graph hash -> {"graph": plain graph, "rewards": {qid: r}, "trials": [...], "origin": str}
        self.evidence: dict[str, dict[str, Any]] = {}
        self.earlier: list[str] = []
        self._minibatch: tuple[str, ...] = ()

    # -- evidence ----------------------------------------------------------------------
    def _entries(self) -> list[GraphEntry]:
        out = []
        for h, d in self.evidence.items():
            g = from_dict(d["graph"])
            c = self.ctx.costs.cost(g)
            out.append(GraphEntry(key=h, graph=g, trial_numbers=tuple(d["trials"]), origin=d["origin"],
                                  rewards=d["rewards"], reward=float(np.mean(list(d["rewards"].values()))),
                                  cost_units=c.units, latency_s=c.latency_s))
        return out

    def _effects(self) -> dict[str, tuple[float, float, int]]:
        return graph_effects(self._entries())

    def incumbent(self) -> str | None:
        """Hash of the graph with the best paired effect, among those measured on at least
        one full minibatch."""
        eff = self._effects()
        pool = {h: v for h, v in eff.items() if v[2] >= min(self.mb0, len(self.ctx.dev_ids))} or eff
        if not pool:
            return None
        return max(pool, key=lambda h: (pool[h][0], -self.evidence[h]["trials"][0]))

    def _graph(self, h: str) -> Graph:
        return from_dict(self.evidence[h]["graph"])

    def _unseen(self, h: str | None, k: int) -> list[str]:
        seen = self.evidence[h]["rewards"] if h in self.evidence else {}
        return [q for q in self.order if q not in seen][:k]

    # -- ask -------------------------------------------------------------------------
    def _next_minibatch(self) -> tuple[str, ...]:
        n = len(self.order)
        k = min(self.mb_size, n)
        out = [self.order[(self.pointer + i) % n] for i in range(k)]
        self.pointer = (self.pointer + k) % n
        return tuple(out)

    def _race_candidates(self, top: int, step: int) -> list[Candidate]:
        eff = self._effects()
        ranked = sorted(eff, key=lambda h: (-eff[h][0], self.evidence[h]["trials"][0]))
        out = []
        for h in ranked:
            if len(out) >= top:
                break
            new = self._unseen(h, step)
            if not new:
                continue
            have = [q for q in self.order if q in self.evidence[h]["rewards"]]
            out.append(Candidate(graph=self._graph(h), question_ids=tuple(have + new), origin="race",
                                 parents=(self.evidence[h]["trials"][-1],)))
        return out

    def _sample_candidates(self, mb: tuple[str, ...], taken: set[str]) -> list[Candidate]:
        out = []
        for _ in range(self.n_samples):
            for _ in range(20):  # a few redraws to keep the batch distinct
                try:
                    s, lp = self.pg.sample(self.rng)
                    g, info = s.graph, {"log_prob": lp}
                except BudgetError:
                    g, info = random_graph(self.ctx.space, self.ctx.costs, self.ctx.budget, self.rng), {"fallback": True}
                h = graph_hash(g)
                if h not in taken:
                    taken.add(h)
                    out.append(Candidate(graph=g, question_ids=mb, origin="sample", info=info))
                    break
        return out

    def _extra_candidates(self, mb: tuple[str, ...], taken: set[str]) -> list[Candidate]:
        """Hook: more candidates on the minibatch (agent proposals)."""
        return []

    def _probe_candidates(self) -> list[Candidate]:
        from graphtune.graphs.model import Node
        from graphtune.graphs.space import is_valid

        mb = tuple(self.order[: min(self.mb0, len(self.order))])
        out = []
        src = next((r for r in self.ctx.space.roles if r != "fuser"), self.ctx.space.roles[0])
        for m in self.ctx.space.models:
            g = Graph.build([Node.make(self.pg.slot_id(self.pg.sink), src, m)])
            if is_valid(g, self.ctx.space, self.ctx.costs, self.ctx.budget):
                out.append(Candidate(graph=g, question_ids=mb, origin="probe"))
        return out

    def remaining_runs(self) -> int:
        return max(0, self.ctx.budget_runs - self.spent) if self.ctx.budget_runs else 1 << 30

    def ask(self) -> list[Candidate]:
        if self.phase == "probe":
            cands = self._probe_candidates()
            if cands:
                self._minibatch = tuple(cands[0].question_ids or ())
                return cands
            self.phase = "search"
        if self.ctx.budget_runs and self.remaining_runs() < self.final_race_frac * self.ctx.budget_runs:
            race = self._race_candidates(self.race_top + 1, 2 * self.race_step)
            if race:
                self._minibatch = ()
                return race
        mb = self._next_minibatch()
        self._minibatch = mb
        cands = self._race_candidates(self.race_top, self.race_step)
        taken = {graph_hash(c.graph) for c in cands}
        inc = self.incumbent()
        if inc is not None and inc not in taken:
            taken.add(inc)
            cands.append(Candidate(graph=self._graph(inc), question_ids=mb, origin="incumbent",
                                   parents=(self.evidence[inc]["trials"][-1],)))
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
                                                        "trials": [], "origin": e.candidate.origin})
            d["rewards"].update(e.rewards_by_question(self.ctx.objective, self.ctx.costs.unit_flops))
            if e.trial_number not in d["trials"]:
                d["trials"].append(e.trial_number)

    def _mb_reward(self, e: Evaluation, mb: Sequence[str]) -> float:
        r = e.rewards_by_question(self.ctx.objective, self.ctx.costs.unit_flops)
        vals = [r[q] for q in mb if q in r]
        return float(np.mean(vals)) if vals else float("nan")

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
        if mb:
            self.mb_size = min(self.mb_max, max(self.mb_size + 1, int(round(self.mb_size * self.mb_growth))))
        inc = self.incumbent()
        if inc is not None:
            d = self.evidence[inc]
            self.earlier.append(f"round {self.batches_told}: {len(evaluations)} graphs, best so far "
                                f"{from_dict(d['graph'])} mean {np.mean(list(d['rewards'].values())):.3f} over "
                                f"{len(d['rewards'])} questions")
            self.earlier = self.earlier[-8:]
        self.batches_told += 1

    def _after_probes(self, evaluations: Sequence[Evaluation]) -> None:
        """Hook: the agent's initial preferences."""

    # -- recommendation --------------------------------------------------------------
    def recommend(self, history: Sequence[Evaluation]) -> GraphStats | None:
        """Among well-evaluated graphs (at least half the best coverage), the best paired
        mean reward; ``GraphStats.ci95`` gives its interval."""
        stats = pool_stats(history, self.ctx.objective, self.ctx.costs.unit_flops)
        if not stats:
            return None
        top = max(s.n for s in stats.values())
        well = {h: s for h, s in stats.items() if s.n >= max(1, top // 2)}
        entries = [GraphEntry(key=h, graph=s.graph, trial_numbers=(s.first_trial,), origin="", rewards=s.rewards,
                              reward=s.mean, cost_units=0.0, latency_s=0.0) for h, s in stats.items()]
        eff = graph_effects(entries, prior_n=0.0)
        return max(well.values(), key=lambda s: (eff[s.graph_hash][0], s.mean, -s.first_trial))

    # -- state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"pg": self.pg.state_dict(), "rng": rng_state(self.rng), "batches_told": self.batches_told,
                "pointer": self.pointer, "mb_size": self.mb_size, "spent": self.spent, "phase": self.phase,
                "evidence": self.evidence, "earlier": list(self.earlier)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pg.load_state_dict(state["pg"])
        self.rng = rng_from_state(state["rng"])
        self.batches_told = int(state["batches_told"])
        self.pointer = int(state["pointer"])
        self.mb_size = int(state["mb_size"])
        self.spent = int(state["spent"])
        self.phase = str(state["phase"])
        self.evidence = {h: {"graph": d["graph"], "rewards": dict(d["rewards"]), "trials": list(d["trials"]),
                             "origin": d["origin"]} for h, d in state["evidence"].items()}
        self.earlier = list(state["earlier"])


class ReinforceSearcher(PolicySearcher):
    """``reinforce``: the numeric policy gradient alone (no agent, no probes). Options as
    :class:`PolicySearcher`."""

    name = "reinforce"
