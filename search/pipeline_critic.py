"""The critic part of ``agent-reinforce`` on a multi-stage pipeline.

:class:`PipelineCritic` is :class:`~graphtune.search.critic.AgentCritic`'s counterpart for a
:class:`~graphtune.search.pipeline_policy.PipelinePolicy`: it shows the agent per-stage
reports (:mod:`graphtune.agent.pipeline`: each stage's graph, cost, stage accuracy and
answers lost, for the incumbent and the batch) and applies its update per stage:

* ``stage_preferences[]`` to the named stage's distribution (model/role preferences,
  width/depth targets); the top-level ``model_preference`` / ``role_preference`` to every
  stage whose space has the model or role; ``edge_changes[]`` to the graph of their
  ``stage`` (default: the last stage); each delta ``lr_agent * confidence * delta``,
  clipped to ``max_agent_delta``;
* ``budget_split`` (stage -> delta) to the budget split (:meth:`BudgetSplit.shift`);
* proposals, built by :func:`~graphtune.agent.pipeline.proposal_to_pipeline` against the
  incumbent and the pipeline budget, queued for the next batch.

A name of no stage is a one-line rejection stored with the step (the rest of the update
still applies); nothing in a reply can crash the search. Each stored step's ``applied``
carries, per stage, the deltas applied to it (``deltas.stages``), the budget split's
(``deltas.budget_split``, ``deltas.expected_split``) and the incumbent's graph, cost, stage
accuracy and answers lost (``incumbent_stages``), so the agent timeline shows per-stage
attributions and costs.
Its state (queued proposals, usage, the last rounds' lines) is saved whole, as the single
graph critic's is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphtune.agent.base import Agent, AgentStep
from graphtune.agent.pipeline import (PipelineBatchReport, PipelineEntry, PipelineInitReport, PipelineProblemInfo,
                                      StageView, pipeline_entry_stages, proposal_to_pipeline)
from graphtune.agent.schema import AgentUpdate
from graphtune.errors import GraphError
from graphtune.graphs.design import design_from_dict, design_hash, design_to_dict, validate_design
from graphtune.graphs.model import Graph, Node
from graphtune.graphs.pipeline import Pipeline
from graphtune.graphs.render import to_text
from graphtune.search.base import Candidate, Evaluation, Objective, SearchContext
from graphtune.search.critic import CriticSteps
from graphtune.search.pipeline_policy import PipelinePolicy
from graphtune.search.racing import Racing

USAGE_KEYS = ("calls", "prompt_tokens", "completion_tokens", "usd", "seconds")


def pipeline_probe_candidates(ctx: SearchContext, questions: tuple[str, ...]) -> list[Candidate]:
    """One pipeline per model of the pool: every stage a single node of that model (a stage
    without it: its first model), within the budget; what the agent's initial step reads
    (each probe's stage accuracies tell how each model does on each stage)."""
    space = ctx.space
    out, seen = [], set()
    for m in space.models:
        graphs = {}
        for s in space.stages:
            sp = s.space
            role = next((r for r in sp.roles if sp.role_allowed(r, has_inputs=False, is_sink=True)), sp.roles[0])
            graphs[s.name] = Graph.build([Node.make("s0", role, m if m in sp.models else sp.models[0])])
        p = space.pipeline(graphs)
        h = design_hash(p)
        if h in seen:
            continue
        try:
            validate_design(p, space, ctx.costs, ctx.budget)
        except GraphError:
            continue
        seen.add(h)
        out.append(Candidate(graph=p, question_ids=questions, origin="probe"))
    return out


def _stage_summary(v: StageView) -> dict[str, Any]:
    return {"graph": to_text(v.graph), "cost_units": round(v.cost_units, 3),
            "stage_accuracy": None if v.accuracy is None else round(v.accuracy, 4), "lost": v.n_lost, "n": v.n}


class PipelineCritic(CriticSteps):
    """The agent's steps on a pipeline searcher's racing and per-stage policy (see the module
    docstring). Same contract as :class:`~graphtune.search.critic.AgentCritic`."""

    def __init__(self, agent: Agent, problem: PipelineProblemInfo, racing: Racing, policy: PipelinePolicy, *,
                 lr_agent: float, max_agent_delta: float, max_proposals: int, objective: Objective):
        super().__init__(agent)
        self.problem = problem
        self.racing = racing
        self.policy = policy
        self.lr_agent = lr_agent
        self.max_agent_delta = max_agent_delta
        self.max_proposals = max_proposals
        self.objective = objective
        self.costs = problem.costs
        self.unit_flops = problem.costs.unit_flops
        #: per-stage views of pipelines seen in evaluations (hash -> views), rebuilt as batches are told
        self._views: dict[str, tuple[StageView, ...]] = {}

    # -- proposals ---------------------------------------------------------------------
    def proposals(self, questions: tuple[str, ...], taken: set[str]) -> list[Candidate]:
        """The queued proposals on ``questions`` (not in ``taken``; extended); the queue empties."""
        out = []
        for p in self.pending:
            g = design_from_dict(p["graph"])
            h = design_hash(g)
            if h in taken:
                continue
            taken.add(h)
            out.append(Candidate(graph=g, question_ids=questions, origin="agent", parents=tuple(p["parents"]),
                                 info={"agent_step": p["step"], "stage": p.get("stage")}))
        self.pending = []
        return out

    def _incumbent_pipeline(self) -> Pipeline | None:
        inc = self.racing.incumbent()
        g = self.racing.graph(inc) if inc else None
        return g if isinstance(g, Pipeline) else None

    def _queue_proposals(self, upd: AgentUpdate, key: str, default_parents: Sequence[int]) -> list[dict[str, Any]]:
        report: list[dict[str, Any]] = []
        limit = self.max_proposals + (2 if key.endswith("init") else 0)
        base = self._incumbent_pipeline()
        pr = self.problem
        for i, prop in enumerate(upd.proposals):
            if i >= limit:
                report.append({"index": i, "status": "rejected", "reason": f"over the limit of {limit} proposals"})
                continue
            try:
                p = proposal_to_pipeline(prop, pr.space, pr.costs, pr.budget, base)
            except GraphError as e:
                report.append({"index": i, "stage": prop.stage, "status": "rejected", "reason": str(e)})
                continue
            h = design_hash(p)
            if h in self.racing or any(design_hash(design_from_dict(q["graph"])) == h for q in self.pending):
                report.append({"index": i, "stage": prop.stage, "status": "rejected",
                               "reason": f"pipeline {h} was already evaluated"})
                continue
            stage = prop.stage or pr.names[-1]
            row: dict[str, Any] = {"index": i, "stage": stage, "status": "queued", "graph_hash": h}
            # a pipeline proposal changes the incumbent's: its parent, unless it names another trial
            parents = list(default_parents)
            if prop.parent is not None:
                if any(prop.parent in d.trials for d in self.racing.records.values()):
                    parents = [prop.parent]
                else:
                    row["warning"] = (f"parent #{prop.parent} is not a trial of a pipeline measured so far; "
                                      "the incumbent stays its parent")
            self.pending.append({"graph": design_to_dict(p), "step": key, "parents": parents, "stage": stage})
            report.append(row)
        return report

    # -- reports -------------------------------------------------------------------------
    def _entry(self, e: Evaluation, questions: Sequence[str]) -> PipelineEntry:
        r = e.rewards_by_question(self.objective, self.unit_flops)
        on_mb = [r[q] for q in questions if q in r] or list(r.values())
        p = e.candidate.graph
        views = pipeline_entry_stages(p, self.costs, e.results)
        self._views[e.graph_hash] = views
        return PipelineEntry(key=e.graph_hash, pipeline=p, trial_numbers=(e.trial_number,), origin=e.candidate.origin,
                             rewards=dict(self.racing.rewards(e.graph_hash)), reward=float(np.mean(on_mb)),
                             cost_units=e.cost.units, latency_s=e.cost.latency_s, stages=views,
                             shares=e.candidate.info.get("shares"))

    def _history(self) -> tuple[PipelineEntry, ...]:
        out = []
        for g in self.racing.entries():
            p = g.graph
            views = self._views.get(g.key) or pipeline_entry_stages(p, self.costs, ())
            out.append(PipelineEntry(key=g.key, pipeline=p, trial_numbers=g.trial_numbers, origin=g.origin,
                                     rewards=g.rewards, reward=g.reward, cost_units=g.cost_units,
                                     latency_s=g.latency_s, stages=views))
        return tuple(out)

    def remember(self, evaluations: Sequence[Evaluation]) -> None:
        """Keep the per-stage views of told pipelines (stage accuracy and answers lost
        over all the questions of the evaluation)."""
        for e in evaluations:
            if e.ok and isinstance(e.candidate.graph, Pipeline):
                self._views[e.graph_hash] = pipeline_entry_stages(e.candidate.graph, self.costs, e.results)

    # -- steps ---------------------------------------------------------------------------
    def initial(self, evaluations: Sequence[Evaluation], questions: Sequence[str], batch: int) -> None:
        probes = tuple(self._entry(e, questions) for e in evaluations if e.ok)
        step = self.agent.initial(PipelineInitReport(problem=self.problem, probes=probes))
        self._apply(step, f"b{batch}-init", batch, [e.trial_number for e in evaluations], [])

    def feedback(self, evaluations: Sequence[Evaluation], questions: tuple[str, ...], numeric: Mapping[str, Any],
                 batch: int) -> None:
        if not questions:
            return
        rows = tuple(self._entry(e, questions) for e in evaluations if e.ok and e.candidate.origin != "race")
        if not rows:
            return
        inc = self.racing.incumbent()
        fails = {q: np.mean([x.score <= 0 for e in evaluations for x in e.results if x.question_id == q and x.ok])
                 for q in questions}
        hard = tuple(q for q, f in sorted(fails.items(), key=lambda kv: -kv[1]) if f >= 0.75)[:5]
        policy = dict(self.policy.summary())
        policy["numeric_step"] = round(float(numeric.get("step", 0.0)), 3)
        report = PipelineBatchReport(problem=self.problem, round=batch, minibatch=questions, batch=rows,
                                     history=self._history(), incumbent=inc, earlier=tuple(self.earlier),
                                     policy=policy, hard_questions=hard)
        step = self.agent.feedback(report)
        parents = self.racing.trials(inc)[-1:] if inc else []
        self._apply(step, f"b{batch}-feedback", batch, [e.trial_number for e in evaluations], parents)

    def note_round(self, batch: int, n_graphs: int) -> None:
        inc = self.racing.incumbent()
        if inc is None:
            return
        r = self.racing.rewards(inc)
        p = self.racing.graph(inc)
        shares = self.policy.split.expected_shares()
        self.earlier.append(f"round {batch}: {n_graphs} pipelines, leader "
                            + " | ".join(f"{s.name}: {to_text(s.graph)}" for s in p.stages)
                            + f" mean {np.mean(list(r.values())):.3f} over {len(r)} questions; expected split "
                            + ", ".join(f"{n} {x:.2f}" for n, x in shares.items()))
        self.earlier = self.earlier[-8:]

    def _apply_update(self, u: AgentUpdate, scale: float) -> dict[str, Any]:
        """Apply ``u`` per stage; every part refused is a line in ``rejected``. Raises
        GraphError (nothing changed in the stage it concerns) for a non-finite number."""
        names = self.problem.names
        pgs = self.policy.pgs
        per: dict[str, dict[str, Any]] = {n: {"model": {}, "role": {}, "edges": []} for n in names}
        rejected: list[str] = []

        def merge(name: str, d: Mapping[str, Any]) -> None:
            for k in ("model", "role"):
                per[name][k].update(d.get(k, {}))
            per[name]["edges"] += d.get("edges", [])
            for k in ("target_width", "target_depth"):
                if k in d:
                    per[name][k] = d[k]
            rejected.extend(f"stage {name!r}: {x}" for x in d.get("rejected", []))

        # top-level preferences: every stage whose space has the model/role
        for kind, prefs in (("model", u.model_preference), ("role", u.role_preference)):
            for k, x in prefs.items():
                hit = [n for n in names if k in (pgs[n].models if kind == "model" else pgs[n].roles)]
                if not hit:
                    rejected.append(f"{kind}_preference: no stage has {kind} {k!r}")
                for n in hit:
                    merge(n, pgs[n].apply_deltas(**{f"{kind}_preference": {k: x}}, scale=scale,
                                                 max_delta=self.max_agent_delta))
        for sp in u.stage_preferences:
            if sp.stage not in names:
                rejected.append(f"stage_preferences: unknown stage {sp.stage!r} (stages: {list(names)})")
                continue
            merge(sp.stage, pgs[sp.stage].apply_deltas(
                model_preference=sp.model_preference, role_preference=sp.role_preference,
                target_width=sp.target_width, target_depth=sp.target_depth, scale=scale,
                max_delta=self.max_agent_delta))
        for c in u.edge_changes:
            n = c.stage or names[-1]
            if n not in names:
                rejected.append(f"edge_changes: unknown stage {n!r} (stages: {list(names)})")
                continue
            merge(n, pgs[n].apply_deltas(edge_changes=[{"src": c.src, "dst": c.dst, "delta": c.delta}], scale=scale,
                                         max_delta=self.max_agent_delta))
        split: dict[str, float] = {}
        for n, x in u.budget_split.items():
            if n not in names:
                rejected.append(f"budget_split: unknown stage {n!r} (stages: {list(names)})")
                continue
            split[n] = self.policy.split.shift(n, float(np.clip(float(x) * scale, -self.max_agent_delta,
                                                                self.max_agent_delta)))
        return {"scale": scale, "stages": per, "budget_split": split,
                "expected_split": {n: round(x, 4) for n, x in self.policy.split.expected_shares().items()},
                "rejected": rejected}

    def _apply(self, step: AgentStep, key: str, batch: int, trial_numbers: list[int],
               default_parents: Sequence[int]) -> None:
        for k in USAGE_KEYS:
            self.usage[k] += getattr(step, k)
        applied: dict[str, Any] = {"fallback": "numeric update only"}
        rejected = step.rejected_reason
        u = step.update
        if u is not None:
            saved = ({n: pg.params.copy() for n, pg in self.policy.pgs.items()}, self.policy.split.logits.copy())
            try:
                deltas = self._apply_update(u, self.lr_agent * u.confidence)
            except GraphError as e:  # a non-finite value: every distribution back as it was
                for n, pg in self.policy.pgs.items():
                    pg.set_params(saved[0][n])
                self.policy.split.logits = saved[1]
                rejected = f"{e}; fell back to the numeric update"
            else:
                applied = {"deltas": deltas, "proposals": self._queue_proposals(u, key, default_parents)}
        inc = self.racing.incumbent()
        views = self._views.get(inc) if inc else None
        # per stage: the incumbent's graph, cost, stage accuracy and answers lost (attribution)
        applied["incumbent_stages"] = {v.name: _stage_summary(v) for v in views} if views else {}
        self._record(step, key, batch, trial_numbers, applied, rejected)
