"""``heuristic``: an offline statistical critic that fills the agent schema. NOT an LLM.

It reads the paired evidence of a report and answers with the same structured update an
LLM agent would give, plus feedback text written from the statistics:

* graph effects from a two-way (graph + question) additive fit, so graphs scored on
  different questions are still compared fairly;
* a ridge regression of those effects on structural features (nodes per model, the
  sink's model and role, the sink's number of inputs, depth, model diversity, budget
  use): its per-model coefficients become ``model_preference``, the sink-role
  coefficients ``role_preference``;
* ``target_width`` / ``target_depth`` from the best graph so far;
* ``edge_changes`` from paired with/without comparisons of slot edges;
* ``proposals``: local mutations of the best graphs (change a model or role, add or
  drop a node or edge, add a synthesiser on top), validated against space and budget,
  not yet evaluated, ranked by the regression's prediction;
* ``confidence`` grows with the number of graphs measured.

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
from graphtune.agent.mutations import local_mutations
from graphtune.agent.pipeline import (PipelineBatchReport, PipelineInitReport, render_pipeline_batch,
                                      render_pipeline_init)
from graphtune.agent.pipeline_heuristic import pipeline_feedback, pipeline_initial
from graphtune.agent.report import BatchReport, GraphEntry, InitReport, ProblemInfo, graph_effects, render_batch, \
    render_init
from graphtune.agent.schema import AgentUpdate, EdgeChange, GraphProposal, ProposedNode
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.model import BUILTIN_ROLES, Graph, Node
from graphtune.graphs.render import to_text
from graphtune.graphs.space import is_valid

BACKEND = "heuristic (statistical critic, not an LLM)"
LABEL = "[heuristic statistical critic, not an LLM]"


# -- graph features and a ridge surrogate -------------------------------------------------


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


class Surrogate:
    """Weighted ridge regression of paired graph effects on :func:`features`."""

    def __init__(self, entries: Sequence[GraphEntry], effects: dict[str, tuple[float, float, int]],
                 p: ProblemInfo, lam: float = 1.0):
        self.p = p
        rows = [(features(e.graph, p), effects[e.key][0], effects[e.key][2]) for e in entries if e.key in effects]
        self.n = len(rows)
        if self.n < 3:
            self.coef = None
            return
        X = np.array([r[0] for r in rows])
        y = np.array([r[1] for r in rows])
        w = np.array([r[2] / (r[2] + 4.0) for r in rows])
        self.mu = X.mean(axis=0)
        self.sd = X.std(axis=0) + 1e-9
        Z = (X - self.mu) / self.sd
        Z = np.hstack([np.ones((self.n, 1)), Z])
        W = np.diag(w)
        reg = lam * np.eye(Z.shape[1])
        reg[0, 0] = 1e-6
        self.coef = np.linalg.solve(Z.T @ W @ Z + reg, Z.T @ W @ y)

    def predict(self, g: Graph) -> float:
        if self.coef is None:
            return 0.0
        z = (features(g, self.p) - self.mu) / self.sd
        return float(self.coef[0] + z @ self.coef[1:])

    def per_unit(self, k: int) -> float:
        """Raw-scale coefficient of feature k (effect of +1 of that feature)."""
        if self.coef is None:
            return 0.0
        return float(self.coef[1 + k] / self.sd[k])


def _finite(prefs: dict[str, float]) -> dict[str, float]:
    """Preferences without non-finite values: the update schema refuses NaN/inf (a
    degenerate fit must not poison the distribution, nor crash the critic)."""
    return {k: v for k, v in prefs.items() if math.isfinite(v)}


def _to_proposal(g: Graph, why: str) -> GraphProposal:
    return GraphProposal(nodes=[ProposedNode(id=n.id, role=n.role, model=n.model) for n in g.nodes],
                         edges=[(u, v) for u, v in g.edges], rationale=why)


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
        sur = Surrogate(hist, eff, p)
        models, roles = list(p.space.models), list(p.space.roles)
        M = len(models)
        text: list[str] = [LABEL]
        # model preferences from the per-node coefficients (plus the sink-model ones)
        pref: dict[str, float] = {}
        if sur.coef is not None:
            eff_m = np.array([sur.per_unit(k) + 0.5 * sur.per_unit(M + k) for k in range(M)])
            scale = float(np.std(eff_m)) + 0.01
            for k, m in enumerate(models):
                pref[m] = float(np.clip((eff_m[k] - eff_m.mean()) / scale * 0.3, -0.6, 0.6))
            best_m = models[int(np.argmax(eff_m))]
            text.append(f"Ridge fit of paired effects over {sur.n} graphs: per added node, "
                        + ", ".join(f"{m} {eff_m[k] * 100:+.1f} pts" for k, m in enumerate(models))
                        + f"; favouring {best_m}.")
        role_pref: dict[str, float] = {}
        if sur.coef is not None and len(roles) > 1:
            rc = np.array([sur.per_unit(2 * M + k) for k in range(len(roles))])
            for k, r in enumerate(roles):
                role_pref[r] = float(np.clip((rc[k] - rc.mean()) * 5.0, -0.4, 0.4))
            text.append("Sink role effects: " + ", ".join(f"{r} {rc[k] * 100:+.1f} pts" for k, r in enumerate(roles))
                        + ".")
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
        conf = float(min(0.9, 0.2 + 0.04 * len(hist)))
        upd = AgentUpdate(feedback=" ".join(text), model_preference=_finite(pref),
                          role_preference=_finite(role_pref),
                          edge_changes=edge_changes, target_width=tw, target_depth=td, proposals=props,
                          confidence=conf)
        return AgentStep(kind="feedback", prompt=render_batch(report), reply=None, update=upd,
                         seconds=time.perf_counter() - t0)

    def _proposals(self, report: BatchReport, ranked: list[GraphEntry], sur: Surrogate,
                   eff: dict[str, tuple[float, float, int]]) -> list[GraphProposal]:
        p = report.problem
        seen = {e.key for e in report.history}
        if not ranked or p.max_proposals <= 0:
            return []
        # parents: the best graphs by effect, preferring well-measured ones (lower bound)
        parents = sorted(ranked, key=lambda e: -(eff[e.key][0] - eff[e.key][1]))[:3]
        cands: list[tuple[float, str, Graph, str]] = []
        found: set[str] = set()
        for rank, par in enumerate(parents):
            base = eff[par.key][0]
            for g in local_mutations(par.graph, p.space):
                h = graph_hash(g)
                if h in seen or h in found or not is_valid(g, p.space, p.costs, p.budget):
                    continue
                found.add(h)
                # the parent's measured effect plus the surrogate's predicted change
                score = base + (sur.predict(g) - sur.predict(par.graph))
                cands.append((score, h, g, par.key))
        cands.sort(key=lambda t: (-t[0], t[1]))
        out: list[GraphProposal] = []
        per_parent: dict[str, int] = {}
        cap = max(1, math.ceil(p.max_proposals / 2))
        for score, h, g, pk in cands:
            if per_parent.get(pk, 0) >= cap:
                continue
            per_parent[pk] = per_parent.get(pk, 0) + 1
            out.append(_to_proposal(g, f"mutation of {pk}, predicted effect {score * 100:+.1f} pts"))
            if len(out) >= p.max_proposals:
                break
        return out
