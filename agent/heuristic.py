"""``heuristic``: an offline statistical critic that fills the agent schema. NOT an LLM.

It reads the paired evidence of a report and answers with the same structured update an
LLM agent would give, plus feedback text written from the statistics:

* graph effects from a two-way (graph + question) additive fit, so graphs scored on
  different questions are still compared fairly;
* a Bayesian linear surrogate of those effects on structural features
  (:mod:`graphtune.agent.surrogate`: nodes per model, the sink's model and role, the sink's
  number of inputs, depth, model diversity, budget use), which gives every coefficient and
  prediction a posterior sd;
* ``model_preference`` / ``role_preference`` moved by each model's (sink role's) z score
  under that posterior, so a preference the evidence does not yet separate moves little,
  and ``confidence`` from the mean |z|;
* ``target_width`` / ``target_depth`` from the best graph so far;
* ``edge_changes`` from paired with/without comparisons of slot edges;
* ``proposals``: untried neighbours (one or two local edits: change a model or role, add
  or drop a node or edge, add a synthesiser on top) of the best graphs, validated against
  space and budget, ranked by expected improvement over the best effect (the parent's
  measured effect plus the surrogate's contrast, with their uncertainty);
* its memory (``report.memory``, when the searcher keeps one): the feedback opens by
  saying whether its previous hypothesis held (which pushed preferences the graphs
  measured since confirm or contradict, how its proposals did against the incumbent).
  The numbers it answers with do not depend on the memory.

The same surrogate refines agent-reinforce's final pick (``pick: surrogate``,
:func:`graphtune.search.racing.recommend_shrunk`; docs/agent.md).

Each proposal names the graph it mutates in ``parent`` (that graph's latest trial).

On a multi-stage pipeline the same agent answers from per-stage statistics
(:mod:`graphtune.agent.pipeline_heuristic`).

Deterministic given the report (no hidden state), so a resumed search replays it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from graphtune.agent.base import Agent, AgentStep
from graphtune.agent.memory import RoundMemory
from graphtune.agent.pipeline import (PipelineBatchReport, PipelineInitReport, render_pipeline_batch,
                                      render_pipeline_init)
from graphtune.agent.pipeline_heuristic import pipeline_feedback, pipeline_initial
from graphtune.agent.report import BatchReport, GraphEntry, InitReport, ProblemInfo, graph_effects, render_batch, \
    render_init
from graphtune.agent.schema import AgentUpdate, EdgeChange, GraphProposal, ProposedNode
from graphtune.agent.surrogate import BayesSurrogate, expected_improvement, neighbourhood
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.model import BUILTIN_ROLES, Graph, Node
from graphtune.graphs.render import to_text
from graphtune.graphs.space import is_valid

BACKEND = "heuristic (statistical critic, not an LLM)"
LABEL = "[heuristic statistical critic, not an LLM]"


def _finite(prefs: dict[str, float]) -> dict[str, float]:
    """Preferences without non-finite values: the update schema refuses NaN/inf (a
    degenerate fit must not poison the distribution, nor crash the critic)."""
    return {k: v for k, v in prefs.items() if math.isfinite(v)}


def _to_proposal(g: Graph, why: str, parent: int | None = None) -> GraphProposal:
    return GraphProposal(nodes=[ProposedNode(id=n.id, role=n.role, model=n.model) for n in g.nodes],
                         edges=[(u, v) for u, v in g.edges], rationale=why, parent=parent)


def recall_text(memory: Sequence[RoundMemory]) -> str | None:
    """One sentence on the newest remembered round: whether its hypothesis held."""
    if not memory:
        return None
    last = memory[-1]
    what = "initial step" if last.kind == "init" else f"step after round {last.round}"
    parts = []
    tested = [o for o in last.preferences if o.verdict != "untested"]
    if tested:
        parts.append("its pushes " + ", ".join(f"{o.claim} {o.verdict}" for o in tested[:4]))
    elif last.preferences:
        parts.append("its pushes not tested yet (too few graphs measured since)")
    measured = [o for o in last.proposals if o.verdict in ("better", "worse", "unclear", "incumbent")]
    if measured:
        counts: dict[str, int] = {}
        for o in measured:
            counts[o.verdict] = counts.get(o.verdict, 0) + 1
        parts.append("its proposals vs the incumbent: " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items())))
    held = sum(o.verdict == "held" for o in tested)
    bad = sum(o.verdict == "contradicted" for o in tested)
    verdict = ("held" if held and not bad else "did not hold" if bad and not held
               else "held in part" if held else "is not settled yet")
    return f"Previous hypothesis ({what}) {verdict}: " + ("; ".join(parts) or "nothing measurable yet") + "."


# -- the agent ------------------------------------------------------------------------------


class HeuristicAgent(Agent):
    """Offline statistical critic (see the module docstring). Not an LLM."""

    backend = BACKEND
    is_llm = False

    def __init__(self, problem: ProblemInfo):
        self.problem = problem

    # -- initial --------------------------------------------------------------------
    def initial(self, report: InitReport) -> AgentStep:
        if isinstance(report, PipelineInitReport):  # a multi-stage study: per-stage statistics
            return pipeline_initial(report, render_pipeline_init)
        t0 = time.perf_counter()
        p = report.problem
        acc = {e.graph.nodes[0].model: e.reward for e in report.probes if e.graph.size == 1}
        fits = {m: is_valid(Graph.build([Node.make("x", "assistant", m)]), p.space, p.costs, p.budget)
                for m in p.space.models}
        pref: dict[str, float] = {}
        vals = np.array(list(acc.values())) if acc else np.zeros(1)
        sd = float(vals.std()) + 0.05
        for m in p.space.models:
            if not fits[m]:
                pref[m] = -3.0
            elif m in acc:
                pref[m] = float(np.clip((acc[m] - vals.mean()) / sd * 0.5, -1.5, 1.5))
        ranked = sorted((m for m in acc if fits[m]), key=lambda m: -acc[m])
        props = self._template_graphs(ranked, p)
        lines = [f"{LABEL} Probes (each model alone, same questions): "
                 + ", ".join(f"{m} {acc[m]:.2f}" for m in ranked) + "."]
        unfit = [m for m in p.space.models if not fits[m]]
        if unfit:
            lines.append(f"Over budget even alone: {', '.join(unfit)} (strongly disfavoured).")
        lines.append("Preferences follow the probe accuracies; first proposals test width (several copies of a "
                     "strong affordable model merged by a synthesiser), depth (a refinement chain) and the best "
                     "single model, so the next paired batch tells which kind of scaling this task rewards.")
        upd = AgentUpdate(feedback=" ".join(lines), model_preference=_finite(pref),
                          proposals=props[: p.max_proposals + 2],
                          confidence=0.6)
        return AgentStep(kind="init", prompt=render_init(report), reply=None, update=upd,
                         seconds=time.perf_counter() - t0)

    def _template_graphs(self, ranked: list[str], p: ProblemInfo) -> list[GraphProposal]:
        """Generic scaling shapes built from the best affordable models."""
        out: list[GraphProposal] = []
        seen: set[str] = set()
        src_role = next((r for r in p.space.roles if p.space.role_allowed(r, has_inputs=False, is_sink=False)),
                        "assistant")
        syn_roles = [r for r in ("fuser", "assistant") if r in p.space.roles]
        # roles users define that may end a graph on inputs (a verifier, a critic, ...)
        custom_sinks = [r for r in p.space.roles if r not in BUILTIN_ROLES
                        and p.space.role_allowed(r, has_inputs=True, is_sink=True)]

        def add(g: Graph, why: str) -> None:
            if is_valid(g, p.space, p.costs, p.budget):
                h = graph_hash(g)
                if h not in seen:
                    seen.add(h)
                    out.append(_to_proposal(g, why))

        for m in ranked[:2]:
            for syn_model in ranked[:2]:
                for k in range(p.space.max_in_degree, 1, -1):  # widest that fits
                    srcs = [Node.make(f"w{i}", src_role, m) for i in range(k)]
                    g = None
                    for r in syn_roles:
                        g = Graph.build(srcs + [Node.make("sink", r, syn_model)], [(s.id, "sink") for s in srcs])
                        if is_valid(g, p.space, p.costs, p.budget):
                            break
                    if g is not None and is_valid(g, p.space, p.costs, p.budget):
                        add(g, f"width: {k} x {m} merged by {syn_model}")
                        break
        if len(ranked) >= 2:
            a, b = ranked[0], ranked[1]
            g = Graph.build([Node.make("x0", src_role, a), Node.make("x1", src_role, b),
                             Node.make("sink", syn_roles[0] if syn_roles else src_role, a)],
                            [("x0", "sink"), ("x1", "sink")])
            add(g, f"diversity: {a} and {b} merged by {a}")
        for m in ranked[:2]:
            g = Graph.build([Node.make("x0", src_role, m), Node.make("sink", "assistant", m)], [("x0", "sink")])
            add(g, f"depth: {m} refines {m}")
        for r in custom_sinks:
            for m in ranked[:2]:
                g = Graph.build([Node.make("x0", src_role, m), Node.make("sink", r, m)], [("x0", "sink")])
                add(g, f"the {r} role: {m} answers, a {r} of {m} finishes")
        return out

    # -- feedback -------------------------------------------------------------------
    def feedback(self, report: BatchReport) -> AgentStep:
        if isinstance(report, PipelineBatchReport):
            return pipeline_feedback(report, render_pipeline_batch)
        t0 = time.perf_counter()
        p = report.problem
        hist = [e for e in report.history if e.rewards]
        eff = graph_effects(hist)
        sur = BayesSurrogate(hist, eff, p)
        models, roles = list(p.space.models), list(p.space.roles)
        M = len(models)
        text: list[str] = [LABEL]
        recalled = recall_text(report.memory)
        if recalled:
            text.append(recalled)
        # model preferences: each model's effect per node (plus half its effect as the sink)
        # relative to the pool's mean, shifted by its z score under the posterior, so a
        # model the evidence does not yet separate moves little
        pref: dict[str, float] = {}
        zs: list[float] = []
        if sur.coef is not None:
            est = [(sur.per_unit(k), sur.per_unit(M + k)) for k in range(M)]
            eff_m = np.array([a[0] + 0.5 * b[0] for a, b in est])
            sd_m = np.array([math.sqrt(a[1] ** 2 + 0.25 * b[1] ** 2) for a, b in est])
            for k, m in enumerate(models):
                z = float((eff_m[k] - eff_m.mean()) / max(sd_m[k], 1e-6))
                zs.append(abs(z))
                pref[m] = float(np.clip(0.25 * z, -0.75, 0.75))
            best_m = models[int(np.argmax(eff_m))]
            text.append(f"Bayesian ridge fit of paired effects over {sur.n} graphs (misfit sd "
                        f"{math.sqrt(sur.misfit) * 100:.1f} pts): per added node, "
                        + ", ".join(f"{m} {eff_m[k] * 100:+.1f} +- {1.96 * sd_m[k] * 100:.1f} pts"
                                    for k, m in enumerate(models))
                        + f"; favouring {best_m}; preferences moved by the evidence (z) behind each.")
        role_pref: dict[str, float] = {}
        if sur.coef is not None and len(roles) > 1:
            rc = [sur.per_unit(2 * M + k) for k in range(len(roles))]
            mean_rc = float(np.mean([c[0] for c in rc]))
            for k, r in enumerate(roles):
                z = (rc[k][0] - mean_rc) / max(rc[k][1], 1e-6)
                zs.append(abs(z))
                role_pref[r] = float(np.clip(0.2 * z, -0.4, 0.4))
            text.append("Sink role effects: " + ", ".join(f"{r} {rc[k][0] * 100:+.1f} +- {1.96 * rc[k][1] * 100:.1f} pts"
                                                         for k, r in enumerate(roles)) + ".")
        # the best graph so far sets the structural targets
        ranked = sorted(hist, key=lambda e: -eff.get(e.key, (-9, 0, 0))[0])
        inc = next((e for e in hist if e.key == report.incumbent), ranked[0] if ranked else None)
        tw = td = None
        if inc is not None:
            tw, td = inc.graph.width, inc.graph.depth
            mu, se, n = eff[inc.key]
            text.append(f"Best so far: {to_text(inc.graph)} (paired effect {mu * 100:+.1f} +- {1.96 * se * 100:.1f} "
                        f"pts over {n} questions); aiming the distribution at width {tw}, depth {td}.")
        # width/depth evidence, paired
        for attr in ("width", "depth"):
            groups: dict[int, list[float]] = {}
            for e in hist:
                groups.setdefault(getattr(e.graph, attr), []).append(eff[e.key][0])
            if len(groups) > 1:
                text.append(f"Mean paired effect by {attr}: "
                            + ", ".join(f"{k}: {np.mean(v) * 100:+.1f} ({len(v)})" for k, v in sorted(groups.items()))
                            + ".")
        # slot edges: with vs without, among sampled (slot-named) graphs
        edge_changes: list[EdgeChange] = []
        slot_set = set(p.slots)
        slot_graphs = [e for e in hist if all(n.id in slot_set for n in e.graph.nodes)]
        if len(slot_graphs) >= 6:
            present: dict[tuple[str, str], list[float]] = {}
            for e in slot_graphs:
                for u, v in e.graph.edges:
                    present.setdefault((u, v), []).append(eff[e.key][0])
            base = float(np.mean([eff[e.key][0] for e in slot_graphs]))
            scored = [(np.mean(v) - base, k, len(v)) for k, v in present.items() if len(v) >= 2]
            scored.sort(key=lambda t: -abs(t[0]))
            for d, (u, v), n in scored[:4]:
                if not math.isfinite(d):
                    continue
                edge_changes.append(EdgeChange(src=u, dst=v, delta=float(np.clip(d * 10, -1.0, 1.0))))
            if scored:
                text.append("Edges with the largest paired effect: "
                            + ", ".join(f"{u}->{v} {d * 100:+.1f} ({n})" for d, (u, v), n in scored[:4]) + ".")
        # weakest synthesisers: correct-to-wrong flips by (role, model) this batch
        flips: dict[str, list[int]] = {}
        for e in report.batch:
            for nid, c in e.flip_chances.items():
                n = e.graph.node_map[nid]
                f = flips.setdefault(f"{n.role}:{n.model}", [0, 0])
                f[0] += e.flips.get(nid, 0)
                f[1] += c
        if flips:
            worst = sorted(flips.items(), key=lambda kv: -(kv[1][0] / max(kv[1][1], 1)))[:3]
            text.append("Correct-input-to-wrong-output rate of synthesisers: "
                        + ", ".join(f"{k} {a}/{b}" for k, (a, b) in worst) + ".")
        props = self._proposals(report, ranked, sur, eff)
        if props:
            text.append(f"Proposing {len(props)} untried neighbours of the best graphs with the highest predicted "
                        "effect.")
        # confidence: how clearly the posterior separates the preferences it moved
        conf = float(np.clip(0.2 + 0.15 * (np.mean(zs) if zs else 0.0), 0.2, 0.9))
        upd = AgentUpdate(feedback=" ".join(text), model_preference=_finite(pref),
                          role_preference=_finite(role_pref),
                          edge_changes=edge_changes, target_width=tw, target_depth=td, proposals=props,
                          confidence=conf)
        return AgentStep(kind="feedback", prompt=render_batch(report), reply=None, update=upd,
                         seconds=time.perf_counter() - t0)

    def _proposals(self, report: BatchReport, ranked: list[GraphEntry], sur: BayesSurrogate,
                   eff: dict[str, tuple[float, float, int]]) -> list[GraphProposal]:
        """Untried neighbours (one or two edits) of the best graphs, ranked by expected
        improvement over the incumbent: each predicted as its parent's measured effect plus
        the surrogate's contrast, with the parent's standard error, the contrast's posterior
        sd and the misfit as its uncertainty."""
        p = report.problem
        seen = {e.key for e in report.history}
        if not ranked or p.max_proposals <= 0:
            return []
        # parents: the best graphs by effect, preferring well-measured ones (lower bound)
        parents = sorted(ranked, key=lambda e: -(eff[e.key][0] - eff[e.key][1]))[:3]
        target = max(eff[e.key][0] for e in parents)
        misfit = getattr(sur, "misfit", 0.0)

        def predicted(g: Graph, par: GraphEntry) -> tuple[float, float]:
            d, sd = sur.contrast(g, par.graph)
            mu, se, _ = eff[par.key]
            return mu + d, math.sqrt(se ** 2 + sd ** 2 + misfit)

        cands: list[tuple[float, float, str, Graph, GraphEntry]] = []
        found: set[str] = set()
        for par in parents:
            hood = neighbourhood([par.graph], p, seen, rank=lambda g, par=par: predicted(g, par)[0])
            for h, (g, _) in hood.items():
                if h in found:  # a neighbour of an earlier (better) parent already
                    continue
                found.add(h)
                mean, sd = predicted(g, par)
                cands.append((expected_improvement(mean, sd, target), mean, h, g, par))
        cands.sort(key=lambda t: (-t[0], t[2]))
        out: list[GraphProposal] = []
        per_parent: dict[str, int] = {}
        cap = max(1, math.ceil(p.max_proposals / 2))
        for ei, mean, h, g, par in cands:
            pk = par.key
            if per_parent.get(pk, 0) >= cap:
                continue
            per_parent[pk] = per_parent.get(pk, 0) + 1
            parent = par.trial_numbers[-1] if par.trial_numbers else None
            out.append(_to_proposal(g, f"neighbour of {pk}, predicted effect {mean * 100:+.1f} pts, expected "
                                       f"improvement {ei * 100:.2f} pts", parent))
            if len(out) >= p.max_proposals:
                break
        return out
