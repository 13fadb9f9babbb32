"""The agent on a multi-stage pipeline: what it reads (per-stage reports) and how its
proposals become pipelines.

A pipeline study's agent sees, for the incumbent and the recent pipelines, each stage's
graph, its cost (in the pipeline's budget units) and its stage accuracy and how often it
lost the pipeline's answer (from the results' per-stage outcomes,
:func:`graphtune.graphs.results.summarize_stages`), plus the current distribution per stage
and the expected budget split. It answers with the same
:class:`~graphtune.agent.schema.AgentUpdate` as for one graph, using its multi-stage fields:
``stage_preferences`` (per-stage model/role preferences and width/depth targets),
``budget_split`` (stage -> delta of its budget share), ``edge_changes[].stage`` and
proposals naming a ``stage`` (with ``other_stages`` for a whole pipeline).

:func:`proposal_to_pipeline` builds a proposal into a checked pipeline: unknown stage
names and every stage graph's problems are one-line GraphErrors naming the stage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphtune.agent.proposals import proposal_to_graph
from graphtune.agent.report import INSIGHTS, paired_difference
from graphtune.agent.schema import GraphProposal, StageGraph, one_line
from graphtune.errors import GraphError
from graphtune.graphs.cost import CostModel, PipelineBudget, PipelineCostModel
from graphtune.graphs.design import PipelineSpace, validate_design
from graphtune.graphs.model import Graph
from graphtune.graphs.pipeline import Pipeline
from graphtune.graphs.render import to_text
from graphtune.graphs.results import QuestionResult, summarize_stages

__all__ = ["PipelineBatchReport", "PipelineEntry", "PipelineInitReport", "PipelineProblemInfo", "StageView",
           "pipeline_entry_stages", "proposal_to_pipeline", "render_pipeline_batch", "render_pipeline_init"]


@dataclass(frozen=True)
class PipelineProblemInfo:
    """What every pipeline report shares: the task, the stages (each its space, pool and
    inputs), the pipeline budget and the objective."""

    task_description: str
    space: PipelineSpace
    costs: PipelineCostModel
    budget: PipelineBudget
    objective: str = "accuracy"
    #: stage name -> slot names of its probabilistic graph (edge_changes name these), sink last
    slots: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    max_proposals: int = 3
    seed: int = 0

    @property
    def names(self) -> tuple[str, ...]:
        return self.space.names

    def stage_costs(self, name: str) -> CostModel:
        return self.costs.of(name)

    def node_units(self, stage: str, model: str, in_degree: int) -> float:
        """One node's cost in the pipeline's budget units."""
        cm = self.costs.of(stage)
        return cm.node_units(model, in_degree) * cm.unit_flops / self.costs.unit_flops

    def budget_text(self) -> str:
        t = self.budget.total
        parts = []
        if t.units is not None:
            parts.append(f"{t.units:g} budget units per query for the whole pipeline (1 unit = one call of the "
                         "cheapest model with no inputs on the cheapest stage)")
        if t.flops is not None:
            parts.append(f"{t.flops:.3g} FLOPs per query")
        if t.usd is not None:
            parts.append(f"${t.usd:g} per query")
        if t.latency_s is not None:
            parts.append(f"{t.latency_s:g} s latency per query (critical path)")
        for name, cap in self.budget.stages:
            if cap is not None and cap.units is not None:
                parts.append(f"stage {name!r} at most {cap.units:g} units")
        return "; ".join(parts) or "no per-query limit"


@dataclass(frozen=True)
class StageView:
    """One stage of a measured pipeline: its graph, its cost (pipeline units), its stage
    accuracy (None when the scorer cannot tell) and how often it lost the answer."""

    name: str
    graph: Graph
    cost_units: float
    accuracy: float | None = None
    n_lost: int = 0
    n: int = 0

    @property
    def lost_rate(self) -> float:
        return self.n_lost / self.n if self.n else 0.0


@dataclass(frozen=True)
class PipelineEntry:
    """One pipeline as a report shows it (as :class:`~graphtune.agent.report.GraphEntry`
    for a graph): ``rewards`` all its dev evidence, ``reward`` its mean on the report's
    minibatch, ``stages`` per stage, ``shares`` the budget split it was drawn under (None
    when it was not drawn by the policy)."""

    key: str
    pipeline: Pipeline
    trial_numbers: tuple[int, ...]
    origin: str
    rewards: Mapping[str, float]
    reward: float
    cost_units: float
    latency_s: float
    stages: tuple[StageView, ...] = ()
    shares: Mapping[str, float] | None = None

    @property
    def n(self) -> int:
        return len(self.rewards)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.rewards.values()))) if self.rewards else float("nan")

    def stage(self, name: str) -> StageView | None:
        return next((s for s in self.stages if s.name == name), None)


def pipeline_entry_stages(pipeline: Pipeline, costs: PipelineCostModel,
                          results: Sequence[QuestionResult]) -> tuple[StageView, ...]:
    """Per-stage views of ``pipeline`` from its analytic cost and its ``results``."""
    cost = costs.cost(pipeline)
    summ = {s.stage: s for s in summarize_stages(results)}
    out = []
    for s in pipeline.stages:
        ss = summ.get(s.name)
        out.append(StageView(name=s.name, graph=s.graph, cost_units=cost.stage(s.name).units,
                             accuracy=None if ss is None else ss.accuracy, n_lost=0 if ss is None else ss.n_lost,
                             n=0 if ss is None else ss.n))
    return tuple(out)


@dataclass(frozen=True)
class PipelineInitReport:
    problem: PipelineProblemInfo
    probes: tuple[PipelineEntry, ...]

    def render(self) -> str:
        return render_pipeline_init(self)


@dataclass(frozen=True)
class PipelineBatchReport:
    problem: PipelineProblemInfo
    round: int
    minibatch: tuple[str, ...]
    batch: tuple[PipelineEntry, ...]
    #: every pipeline evaluated so far (batch included), with all its evidence
    history: tuple[PipelineEntry, ...]
    incumbent: str | None
    earlier: tuple[str, ...] = ()
    #: per stage: its budget share, model marginals and the sink's expected inputs
    policy: Mapping[str, Any] = field(default_factory=dict)
    hard_questions: tuple[str, ...] = ()

    def render(self) -> str:
        return render_pipeline_batch(self)


# -- proposals -------------------------------------------------------------------------------


def _stage_graph(nodes, edges, name: str, pspace: PipelineSpace, costs: PipelineCostModel) -> Graph:
    prop = GraphProposal(nodes=list(nodes), edges=list(edges))
    try:
        return proposal_to_graph(prop, pspace.stage(name).space, costs.of(name))
    except GraphError as e:
        raise type(e)(one_line(f"stage {name!r}: {e}")) from None


def proposal_to_pipeline(proposal: GraphProposal, space: PipelineSpace, costs: PipelineCostModel,
                         budget: PipelineBudget, base: Pipeline | None) -> Pipeline:
    """The pipeline ``proposal`` describes: ``base`` (the incumbent) with the graph of
    ``proposal.stage`` (default: the last stage) and of every ``other_stages`` entry
    replaced; every stage named at most once. Checked against each stage's space and the
    pipeline budget and caps; raises a one-line GraphError (BudgetError) naming the stage."""
    names = space.names
    main = proposal.stage or names[-1]
    parts: list[tuple[str, Any, Any]] = [(main, proposal.nodes, proposal.edges)]
    parts += [(sg.stage, sg.nodes, sg.edges) for sg in proposal.other_stages]
    graphs: dict[str, Graph] = {}
    for name, nodes, edges in parts:
        if name not in names:
            raise GraphError(one_line(f"unknown stage {name!r}; the pipeline's stages are {list(names)}"))
        if name in graphs:
            raise GraphError(f"stage {name!r} is given twice in one proposal; give each stage once")
        graphs[name] = _stage_graph(nodes, edges, name, space, costs)
    missing = [n for n in names if n not in graphs]
    if missing:
        if base is None:
            raise GraphError(f"no graph for stage(s) {missing} and no incumbent to take them from; "
                             "give every stage (other_stages)")
        for n in missing:
            graphs[n] = base.stage(n).graph
    p = space.pipeline(graphs)
    try:
        validate_design(p, space, costs, budget)
    except GraphError as e:
        raise type(e)(one_line(str(e))) from None
    return p


def to_stage_graph(name: str, g: Graph) -> StageGraph:
    from graphtune.agent.schema import ProposedNode

    return StageGraph(stage=name, nodes=[ProposedNode(id=n.id, role=n.role, model=n.model) for n in g.nodes],
                      edges=[(u, v) for u, v in g.edges])


def pipeline_proposal(p: Pipeline, changed: str, why: str, *, whole: bool = False) -> GraphProposal:
    """A proposal of pipeline ``p`` as a change of stage ``changed`` (the others from the
    incumbent), or the whole pipeline (``whole``)."""
    from graphtune.agent.schema import ProposedNode

    g = p.stage(changed).graph
    others = [to_stage_graph(s.name, s.graph) for s in p.stages if s.name != changed] if whole else []
    return GraphProposal(nodes=[ProposedNode(id=n.id, role=n.role, model=n.model) for n in g.nodes],
                         edges=[(u, v) for u, v in g.edges], rationale=why, stage=changed, other_stages=others)


# -- rendering -------------------------------------------------------------------------------


def _stage_line(v: StageView) -> str:
    acc = "n/a" if v.accuracy is None else f"{v.accuracy:.3f}"
    return (f"    {v.name}: {to_text(v.graph)}; cost {v.cost_units:.1f} units; stage accuracy {acc}; "
            f"lost the answer {v.n_lost}/{v.n}")


def _entry_lines(e: PipelineEntry) -> list[str]:
    split = ""
    if e.shares:
        split = "; drawn under budget split " + ", ".join(f"{n} {x:.2f}" for n, x in e.shares.items())
    return [f"reward {e.reward:.3f} on the minibatch, mean {e.mean:.3f} over {e.n} questions; cost "
            f"{e.cost_units:.1f} units, latency {e.latency_s:.1f} s; origin {e.origin}{split}",
            *(_stage_line(v) for v in e.stages)]


def render_pipeline_problem(p: PipelineProblemInfo) -> str:
    lines = ["TASK: " + (p.task_description or "(no description)"), "",
             f"PIPELINE: {len(p.names)} stages run in order, each a collaboration graph; a stage's final answer "
             "enters the prompts of the stages that read it; the last stage answers."]
    for s in p.space.stages:
        sp = s.space
        lines.append(f"STAGE {s.name} (reads {', '.join(s.inputs)}): {s.description or 'no description'}")
        for m in sp.models:
            lines.append(f"  - {m}: {p.node_units(s.name, m, 0):.1f} units alone, "
                         f"{p.node_units(s.name, m, 2):.1f} units with 2 inputs")
        lines.append(f"  space: roles {list(sp.roles)}; at most {sp.max_nodes} nodes, width {sp.max_width}, "
                     f"depth {sp.max_depth}, {sp.max_in_degree} inputs per node; slots "
                     f"{list(p.slots.get(s.name, ()))} (the last is the sink)")
    lines += ["", "BUDGET: " + p.budget_text() + ". The search splits it between the stages (budget_split moves "
              "the split).", f"OBJECTIVE: maximise {p.objective} of the pipeline's final answer.", "",
              "GENERAL TEST-TIME-SCALING INSIGHTS (per stage):", *INSIGHTS,
              "4. Stages interact: a weak early stage needs more compute downstream, and compute spent on a stage "
              "that rarely loses the answer is wasted.", "",
              "ANSWER per stage: stage_preferences [{stage, model_preference, role_preference, target_width, "
              "target_depth}], budget_split {stage: delta}, edge_changes with `stage`, proposals with `stage` (the "
              "incumbent with that stage's graph replaced) and optionally other_stages [{stage, nodes, edges}]."]
    return "\n".join(lines)


def render_pipeline_init(r: PipelineInitReport) -> str:
    lines = [render_pipeline_problem(r.problem), "", "PROBE RESULTS (one model per stage, alone, same dev questions):"]
    for e in r.probes:
        lines += _entry_lines(e)
    lines += ["", f"Return the initial preferences per stage, a budget split and up to {r.problem.max_proposals} "
              "pipelines to try first, as JSON matching the schema."]
    return "\n".join(lines)


def render_pipeline_batch(r: PipelineBatchReport) -> str:
    p = r.problem
    inc = next((e for e in r.history if e.key == r.incumbent), None)
    lines = [render_pipeline_problem(p), "",
             f"ROUND {r.round}: {len(r.batch)} pipelines on the same {len(r.minibatch)} dev questions (paired)."]
    for k, e in enumerate(sorted(r.batch, key=lambda e: -e.reward)):
        diff = ""
        if inc is not None and e.key != inc.key:
            d, se, n = paired_difference(e.rewards, inc.rewards)
            if n and math.isfinite(d):
                diff = f" vs incumbent {d:+.3f} (se {se:.3f}, {n} shared questions)"
        lines.append(f"[{k}]{diff}")
        lines += _entry_lines(e)
    if inc is not None:
        lines += ["", f"INCUMBENT (best so far): mean {inc.mean:.3f} over {inc.n} questions", *_entry_lines(inc)]
    if r.hard_questions:
        lines.append("QUESTIONS MOST PIPELINES FAILED: " + ", ".join(r.hard_questions))
    if r.policy:
        lines.append("CURRENT DISTRIBUTION PER STAGE: " + "; ".join(f"{k}: {v}" for k, v in r.policy.items()))
    if r.earlier:
        lines += ["", "EARLIER ROUNDS:", *r.earlier[-5:]]
    lines += ["", "Explain what the paired, per-stage evidence suggests in `feedback`, then give per-stage deltas, a "
              f"budget_split and up to {p.max_proposals} new pipelines (not yet evaluated) as JSON matching the "
              "schema. Set `confidence` to how sure you are."]
    return "\n".join(lines)
