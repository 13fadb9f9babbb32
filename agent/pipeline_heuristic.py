"""The heuristic (offline, NOT an LLM) critic's steps on a multi-stage pipeline.

Same spirit as :mod:`graphtune.agent.heuristic` for one graph, with per-stage statistics:

* **initial**: per stage, model preferences from the probes' *stage* accuracies (each probe
  runs one model alone per stage); the budget split toward a stage whose best model alone
  costs more than an even share of the budget; proposals: the best model of each stage alone, then
  width on each stage (several samples of its best model merged by a synthesiser) with the
  other stages at their best single model, cheapest first;
* **feedback**: paired pipeline effects (graph + question fit,
  :func:`graphtune.agent.report.graph_effects`); per stage, model preferences from the
  paired effect of pipelines whose stage uses a model against those whose stage does not;
  targets width/depth from the incumbent's stage graph; the **budget split** moves toward
  the stage whose spending goes with higher paired effect (slope of effect on the stage's
  cost over the pipelines measured) and toward the stage that loses the most answers per
  unit it costs in the incumbent; proposals are local mutations of one stage of the best
  pipelines, mutations that add compute to the stage losing most answers first.

Deterministic given the report, as the single-graph critic is.
"""

from __future__ import annotations

import math
import time

import numpy as np

from graphtune.agent.base import AgentStep
from graphtune.agent.mutations import local_mutations
from graphtune.agent.pipeline import (PipelineBatchReport, PipelineEntry, PipelineInitReport, PipelineProblemInfo,
                                      pipeline_proposal)
from graphtune.agent.report import graph_effects
from graphtune.agent.schema import AgentUpdate, GraphProposal, StagePreference
from graphtune.errors import GraphError
from graphtune.graphs.design import design_hash, validate_design
from graphtune.graphs.model import Graph, Node
from graphtune.graphs.pipeline import Pipeline
from graphtune.graphs.render import to_text

LABEL = "[heuristic statistical critic, not an LLM]"


def _valid(p: Pipeline, prob: PipelineProblemInfo) -> bool:
    try:
        validate_design(p, prob.space, prob.costs, prob.budget)
    except GraphError:
        return False
    return True


def _alone(prob: PipelineProblemInfo, stage: str, model: str) -> Graph:
    sp = prob.space.stage(stage).space
    role = next((r for r in sp.roles if sp.role_allowed(r, has_inputs=False, is_sink=True)), sp.roles[0])
    return Graph.build([Node.make("s0", role, model)])


def _wide(prob: PipelineProblemInfo, stage: str, model: str, k: int) -> Graph | None:
    sp = prob.space.stage(stage).space
    src = next((r for r in sp.roles if sp.role_allowed(r, has_inputs=False, is_sink=False)), None)
    syn = [r for r in sp.roles if sp.role_allowed(r, has_inputs=True, is_sink=True)]
    if src is None or not syn or k + 1 > sp.max_nodes or k > sp.max_in_degree:
        return None
    srcs = [Node.make(f"w{i}", src, model) for i in range(k)]
    syn_role = "fuser" if "fuser" in syn else syn[0]
    return Graph.build(srcs + [Node.make("sink", syn_role, model)], [(s.id, "sink") for s in srcs])


def pipeline_initial(report: PipelineInitReport, render) -> AgentStep:
    """The initial step from the probes (see the module docstring)."""
    t0 = time.perf_counter()
    prob = report.problem
    text = [LABEL]
    prefs: list[StagePreference] = []
    best: dict[str, str] = {}
    for s in prob.space.stages:
        acc: dict[str, list[float]] = {}
        for e in report.probes:
            v = e.stage(s.name)
            if v is not None and v.graph.size == 1 and v.accuracy is not None:
                acc.setdefault(v.graph.nodes[0].model, []).append(v.accuracy)
        means = {m: float(np.mean(x)) for m, x in acc.items()}
        if not means:
            best[s.name] = s.space.models[0]
            continue
        vals = np.array(list(means.values()))
        sd = float(vals.std()) + 0.05
        pref = {m: float(np.clip((a - vals.mean()) / sd * 0.5, -1.5, 1.5)) for m, a in means.items()}
        prefs.append(StagePreference(stage=s.name, model_preference=pref))
        best[s.name] = max(means, key=lambda m: (means[m], -prob.node_units(s.name, m, 0)))
        text.append(f"Stage {s.name}: stage accuracy alone " + ", ".join(f"{m} {a:.2f}" for m, a in
                                                                          sorted(means.items(), key=lambda t: -t[1]))
                    + ".")
    # the split: a stage whose best model alone takes more than an even share of the budget
    # gets more of it (one call of a large model cannot be had for less than its price)
    split: dict[str, float] = {}
    total = prob.budget.total.units
    if total:
        n = len(prob.names)
        for name in prob.names:
            need = prob.node_units(name, best[name], 0) / total
            d = float(np.clip(need - 1.0 / n, -0.3, 0.3))
            if abs(d) > 1e-3:
                split[name] = d
        if split:
            text.append("Budget split from the price of each stage's best model alone: "
                        + ", ".join(f"{k} {v:+.2f}" for k, v in split.items()) + ".")
    props: list[GraphProposal] = []
    seen: set[str] = set()

    def add(graphs: dict[str, Graph], changed: str, why: str) -> None:
        try:
            p = prob.space.pipeline(graphs)
        except GraphError:
            return
        h = design_hash(p)
        if h not in seen and _valid(p, prob):
            seen.add(h)
            props.append(pipeline_proposal(p, changed, why, whole=True))

    base = {n: _alone(prob, n, best[n]) for n in prob.names}
    add(base, prob.names[-1], "the best model of each stage, alone")
    for n in reversed(prob.names):  # width on the answering stage first
        sp = prob.space.stage(n).space
        for k in range(min(sp.max_in_degree, sp.max_nodes - 1), 1, -1):
            g = _wide(prob, n, best[n], k)
            if g is not None:
                before = len(props)
                add({**base, n: g}, n, f"width on stage {n}: {k} x {best[n]} merged")
                if len(props) > before:
                    break
    text.append("First proposals: each stage's best model alone, then width on one stage at a time, so the next "
                "paired batch tells which stage gains from more compute.")
    upd = AgentUpdate(feedback=" ".join(text), stage_preferences=prefs, budget_split=split,
                      proposals=props[: prob.max_proposals + 2], confidence=0.6)
    return AgentStep(kind="init", prompt=render(report), reply=None, update=upd, seconds=time.perf_counter() - t0)


def _stage_model_effects(hist: list[PipelineEntry], eff: dict, stage: str, models) -> dict[str, float]:
    out = {}
    for m in models:
        with_m = [eff[e.key][0] for e in hist if any(n.model == m for n in e.pipeline.stage(stage).graph.nodes)]
        without = [eff[e.key][0] for e in hist if e.key in eff
                   and not any(n.model == m for n in e.pipeline.stage(stage).graph.nodes)]
        if len(with_m) >= 2 and len(without) >= 2:
            out[m] = float(np.mean(with_m) - np.mean(without))
    return out


def budget_split_deltas(hist: list[PipelineEntry], eff: dict, inc: PipelineEntry | None,
                        names: tuple[str, ...]) -> tuple[dict[str, float], list[str]]:
    """Deltas of the budget split (stage -> delta) and the sentences explaining them: the
    slope of the paired effect on each stage's cost (in effect points per standard
    deviation of that stage's cost), plus the incumbent's answers lost per unit by stage."""
    text: list[str] = []
    score = {n: 0.0 for n in names}
    if len(hist) >= 4:
        y = np.array([eff[e.key][0] for e in hist])
        for n in names:
            u = np.array([e.stage(n).cost_units if e.stage(n) else 0.0 for e in hist])
            if u.std() > 1e-9:
                score[n] += float(np.cov(u, y)[0, 1] / u.var() * u.std())
        text.append("Paired effect per standard deviation of each stage's cost: "
                    + ", ".join(f"{n} {score[n] * 100:+.1f} pts" for n in names) + ".")
    if inc is not None and inc.stages:
        per_unit = {v.name: v.lost_rate / max(v.cost_units, 1e-9) for v in inc.stages}
        if any(per_unit.values()):
            worst = max(per_unit, key=per_unit.get)
            score[worst] += 0.01
            text.append("Incumbent's answers lost per unit of cost: "
                        + ", ".join(f"{n} {per_unit[n]:.3f}" for n in names if n in per_unit)
                        + f"; {worst} loses most per unit.")
    mean = float(np.mean(list(score.values())))
    deltas = {n: float(np.clip((score[n] - mean) * 20.0, -0.6, 0.6)) for n in names}
    deltas = {n: d for n, d in deltas.items() if math.isfinite(d) and abs(d) > 1e-6}
    if deltas:
        text.append("Budget split (toward the stage whose spending goes with higher effect, nudged toward the one "
                    "losing most answers per unit): " + ", ".join(f"{n} {d:+.2f}" for n, d in deltas.items()) + ".")
    return deltas, text


def pipeline_feedback(report: PipelineBatchReport, render) -> AgentStep:
    """Feedback on one batch (see the module docstring)."""
    t0 = time.perf_counter()
    prob = report.problem
    hist = [e for e in report.history if e.rewards]
    eff = graph_effects(hist)
    hist = [e for e in hist if e.key in eff]
    text = [LABEL]
    ranked = sorted(hist, key=lambda e: -eff[e.key][0])
    inc = next((e for e in hist if e.key == report.incumbent), ranked[0] if ranked else None)
    prefs: list[StagePreference] = []
    for s in prob.space.stages:
        me = _stage_model_effects(hist, eff, s.name, s.space.models)
        pref = {m: float(np.clip(d * 5.0, -0.6, 0.6)) for m, d in me.items() if math.isfinite(d)}
        tw = td = None
        if inc is not None:
            g = inc.pipeline.stage(s.name).graph
            tw, td = g.width, g.depth
        prefs.append(StagePreference(stage=s.name, model_preference=pref, target_width=tw, target_depth=td))
        if me:
            text.append(f"Stage {s.name}: paired effect of using a model there "
                        + ", ".join(f"{m} {d * 100:+.1f} pts" for m, d in me.items()) + ".")
    if inc is not None:
        mu, se, n = eff[inc.key]
        text.append(f"Best so far (paired effect {mu * 100:+.1f} +- {1.96 * se * 100:.1f} pts over {n} questions): "
                    + "; ".join(f"{v.name} {to_text(v.graph)} ({v.cost_units:.1f} units, lost {v.n_lost}/{v.n})"
                                for v in inc.stages) + ".")
    split, split_text = budget_split_deltas(hist, eff, inc, prob.names)
    text += split_text
    props = _proposals(report, ranked, eff, inc)
    if props:
        text.append(f"Proposing {len(props)} untried one-stage changes of the best pipelines, adding compute to the "
                    "stage that loses most answers first.")
    conf = float(min(0.9, 0.2 + 0.04 * len(hist)))
    upd = AgentUpdate(feedback=" ".join(text), stage_preferences=prefs, budget_split=split, proposals=props,
                      confidence=conf)
    return AgentStep(kind="feedback", prompt=render(report), reply=None, update=upd, seconds=time.perf_counter() - t0)


def _proposals(report: PipelineBatchReport, ranked: list[PipelineEntry], eff: dict,
               inc: PipelineEntry | None) -> list[GraphProposal]:
    prob = report.problem
    if not ranked or prob.max_proposals <= 0:
        return []
    seen = {e.key for e in report.history}
    loss = {v.name: v.lost_rate for v in inc.stages} if inc is not None else {}
    parents = sorted(ranked, key=lambda e: -(eff[e.key][0] - eff[e.key][1]))[:2]
    cands: list[tuple[float, str, Pipeline, str]] = []
    for par in parents:
        base = eff[par.key][0]
        pcost = prob.costs.cost(par.pipeline)
        for s in prob.space.stages:
            g0 = par.pipeline.stage(s.name).graph
            for g in local_mutations(g0, s.space):
                graphs = {st.name: st.graph for st in par.pipeline.stages}
                graphs[s.name] = g
                try:
                    p = prob.space.pipeline(graphs)
                except GraphError:
                    continue
                h = design_hash(p)
                if h in seen or not _valid(p, prob):
                    continue
                seen.add(h)
                more = prob.costs.cost(p).stage(s.name).units - pcost.stage(s.name).units
                # compute moved onto a stage that loses answers is worth trying first
                score = base + 0.05 * loss.get(s.name, 0.0) * float(np.sign(more))
                cands.append((score, h, p, s.name))
    cands.sort(key=lambda t: (-t[0], t[1]))
    out = []
    per_stage: dict[str, int] = {}
    cap = max(1, math.ceil(prob.max_proposals / 2))
    for score, h, p, stage in cands:
        if per_stage.get(stage, 0) >= cap:
            continue
        per_stage[stage] = per_stage.get(stage, 0) + 1
        out.append(pipeline_proposal(p, stage, f"change of stage {stage}, predicted effect {score * 100:+.1f} pts",
                                     whole=True))
        if len(out) >= prob.max_proposals:
            break
    return out
