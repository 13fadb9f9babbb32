"""The compact reports an agent reads, and the paired statistics behind them.

A report holds only what the search has measured on dev questions (plus the task
description, the pool and the budget): no benchmark answers, no accuracy tables. The
heuristic critic reads the structured fields; LLM agents read ``render()``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphtune.agent.memory import RoundMemory, render_memory
from graphtune.graphs.cost import Budget, CostModel
from graphtune.graphs.model import Graph
from graphtune.graphs.render import to_text
from graphtune.graphs.results import QuestionResult
from graphtune.graphs.space import Space

#: The paper's three test-time-scaling insights, stated generally (no task numbers).
INSIGHTS = (
    "1. The best mix of models is task specific: some tasks gain most from several mid-size models whose "
    "answers are combined, knowledge-heavy tasks often gain most from a single larger model.",
    "2. Width (parallel nodes) and depth (sequential refinement) each have a task-dependent optimum; past it, "
    "more compute lowers accuracy (long concatenated contexts hurt small models, deep chains let later nodes "
    "overwrite correct answers, many weak models add noise). Large models tolerate more inputs; diverse "
    "inputs help more than repeats of one model.",
    "3. Width and depth interact: a wider graph usually wants less depth, and a deeper graph less width.",
)


@dataclass(frozen=True)
class ProblemInfo:
    """What every report shares: the task, the pool, the space and the budget."""

    task_description: str
    space: Space
    costs: CostModel
    budget: Budget
    objective: str = "accuracy"
    #: slot names of the probabilistic graph (edge_changes refer to these), sink last
    slots: tuple[str, ...] = ()
    max_proposals: int = 3
    seed: int = 0

    def pool_lines(self) -> list[str]:
        out = []
        for name in self.space.models:
            m = self.costs.model(name)
            u0 = self.costs.node_units(name, 0)
            u2 = self.costs.node_units(name, 2)
            out.append(f"- {name}: {m.params / 1e9:g}B parameters, ${m.usd_per_mtok_in:g}/${m.usd_per_mtok_out:g} "
                       f"per 1M tokens in/out, ~{m.decode_tok_s:g} tok/s decode; costs {u0:.1f} units alone, "
                       f"{u2:.1f} units with 2 inputs")
        return out

    def budget_text(self) -> str:
        parts = []
        b = self.budget
        if b.units is not None:
            parts.append(f"{b.units:g} budget units per query (1 unit = one call of the cheapest model with no inputs)")
        if b.flops is not None:
            parts.append(f"{b.flops:.3g} FLOPs per query")
        if b.usd is not None:
            parts.append(f"${b.usd:g} per query")
        if b.latency_s is not None:
            parts.append(f"{b.latency_s:g} s latency per query")
        return "; ".join(parts) or "no per-query limit"


@dataclass(frozen=True)
class GraphEntry:
    """One graph as a report shows it. ``rewards`` holds all its dev evidence (question
    id -> reward); ``reward`` is its mean on the report's shared minibatch."""

    key: str  # canonical hash
    graph: Graph
    trial_numbers: tuple[int, ...]
    origin: str
    rewards: Mapping[str, float]
    reward: float
    cost_units: float
    latency_s: float
    #: node id -> times it turned a correct input into a wrong output (this batch)
    flips: Mapping[str, int] = field(default_factory=dict)
    #: node id -> times it got a correct input (this batch), the denominator of flips
    flip_chances: Mapping[str, int] = field(default_factory=dict)
    failed: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        return len(self.rewards)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.rewards.values()))) if self.rewards else float("nan")


@dataclass(frozen=True)
class InitReport:
    problem: ProblemInfo
    probes: tuple[GraphEntry, ...]


@dataclass(frozen=True)
class BatchReport:
    problem: ProblemInfo
    round: int
    minibatch: tuple[str, ...]
    batch: tuple[GraphEntry, ...]
    #: every graph evaluated so far (batch included), with all its evidence
    history: tuple[GraphEntry, ...]
    incumbent: str | None
    earlier: tuple[str, ...] = ()
    #: a compact view of the current distribution (model marginals, expected inputs of the sink)
    policy: Mapping[str, Any] = field(default_factory=dict)
    hard_questions: tuple[str, ...] = ()
    #: the agent's earlier rounds with their measured outcomes (:mod:`graphtune.agent.memory`),
    #: already cut to ``memory_tokens``; empty without memory
    memory: tuple[RoundMemory, ...] = ()
    #: the token bound of the memory section (0: no memory)
    memory_tokens: int = 0

    def render(self) -> str:
        return render_batch(self)


# -- statistics ------------------------------------------------------------------------


def node_flips(graph: Graph, results: Sequence[QuestionResult]) -> tuple[dict[str, int], dict[str, int]]:
    """Per node: how often it turned a correct input into a wrong output, and how often
    it had at least one correct input (from the per-node outcomes)."""
    flips: dict[str, int] = {}
    chances: dict[str, int] = {}
    for r in results:
        if not r.ok or not r.nodes:
            continue
        ok = {o.node_id: o.correct for o in r.nodes}
        for nid, preds in graph.preds.items():
            if not preds or nid not in ok:
                continue
            if any(ok.get(p) for p in preds):
                chances[nid] = chances.get(nid, 0) + 1
                if ok[nid] is False:
                    flips[nid] = flips.get(nid, 0) + 1
    return flips, chances


def graph_effects(entries: Sequence[GraphEntry], *, prior_n: float = 4.0,
                  iters: int = 25) -> dict[str, tuple[float, float, int]]:
    """Paired graph effects: fit ``reward[g, q] = mu_g + beta_q`` by alternating least
    squares (questions differ in difficulty, graphs were scored on different questions),
    with ``mu_g`` shrunk towards 0 by ``prior_n`` pseudo-questions. Returns key ->
    (mu, standard error, n). Effects are relative to the average graph."""
    keys = [e.key for e in entries if e.rewards]
    if not keys:
        return {}
    qids = sorted({q for e in entries for q in e.rewards})
    qi = {q: i for i, q in enumerate(qids)}
    rows, cols, vals = [], [], []
    for g, e in enumerate(e for e in entries if e.rewards):
        for q, r in e.rewards.items():
            rows.append(g)
            cols.append(qi[q])
            vals.append(r)
    rows_a, cols_a, vals_a = np.array(rows), np.array(cols), np.array(vals, dtype=float)
    G, Q = len(keys), len(qids)
    n_g = np.bincount(rows_a, minlength=G).astype(float)
    n_q = np.bincount(cols_a, minlength=Q).astype(float)
    mu = np.zeros(G)
    beta = np.zeros(Q)
    for _ in range(iters):
        beta = np.bincount(cols_a, weights=vals_a - mu[rows_a], minlength=Q) / np.maximum(n_q, 1)
        mu = np.bincount(rows_a, weights=vals_a - beta[cols_a], minlength=G) / (n_g + prior_n)
    resid = vals_a - mu[rows_a] - beta[cols_a]
    var = float(np.mean(resid ** 2)) if len(resid) > 1 else 0.25
    var = max(var, 1e-4)
    return {k: (float(mu[g]), math.sqrt(var / (n_g[g] + prior_n)), int(n_g[g])) for g, k in enumerate(keys)}


def paired_difference(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[float, float, int]:
    """Mean of a - b over shared questions, its standard error and the count."""
    shared = sorted(set(a) & set(b))
    if not shared:
        return float("nan"), float("nan"), 0
    d = np.array([a[q] - b[q] for q in shared])
    se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se, len(d)


# -- rendering -------------------------------------------------------------------------


def trial_label(e: GraphEntry) -> str:
    """``#N``: the trial number a proposal's ``parent`` names this graph by (its latest)."""
    return f"#{e.trial_numbers[-1]} " if e.trial_numbers else ""


def _graph_line(e: GraphEntry) -> str:
    g = e.graph
    flips = ", ".join(f"{nid}({e.flips[nid]}/{e.flip_chances.get(nid, 0)})" for nid in sorted(e.flips)) or "none"
    return (f"{trial_label(e)}{to_text(g)}\n    reward {e.reward:.3f} on the minibatch, mean {e.mean:.3f} over {e.n} questions; "
            f"cost {e.cost_units:.1f} units, latency {e.latency_s:.1f} s; width {g.width}, depth {g.depth}, "
            f"max in-degree {g.max_in_degree}; origin {e.origin}; correct->wrong flips: {flips}")


def render_problem(p: ProblemInfo) -> str:
    sink = p.slots[-1] if p.slots else "the last slot"
    return "\n".join([
        "TASK: " + (p.task_description or "(no description)"),
        "",
        "MODEL POOL:",
        *p.pool_lines(),
        "",
        "BUDGET: " + p.budget_text() + ". A node's cost grows with its number of inputs (each input's answer is "
        "appended to its prompt).",
        f"SPACE: roles {list(p.space.roles)}; at most {p.space.max_nodes} nodes, width {p.space.max_width}, "
        f"depth {p.space.max_depth}, {p.space.max_in_degree} inputs per node. A fuser needs at least one input.",
        *(f"ROLE {r.name}: {r.description or 'a role the user defined'} ({r.rule_text()})"
          for r in p.space.role_specs if r.name in p.space.roles),
        f"OBJECTIVE: maximise {p.objective} (mean reward per question).",
        "",
        "GENERAL TEST-TIME-SCALING INSIGHTS:",
        *INSIGHTS,
        "",
        f"THE DISTRIBUTION: node slots {list(p.slots)} in a fixed order, {sink} is the sink (final answer); edges "
        "only go from a lower slot to a higher one. edge_changes name slots; proposals are free graphs.",
    ])


def render_init(r: InitReport) -> str:
    lines = [render_problem(r.problem), "", "PROBE RESULTS (each model alone, same dev questions):"]
    for e in r.probes:
        lines.append(f"- {trial_label(e)}{to_text(e.graph)}: reward {e.reward:.3f} over {e.n} questions, cost {e.cost_units:.1f} units")
    lines += ["", f"Return the initial preferences and up to {r.problem.max_proposals} graphs to try first, as JSON "
              "matching the schema."]
    return "\n".join(lines)


def render_batch(r: BatchReport) -> str:
    p = r.problem
    inc = next((e for e in r.history if e.key == r.incumbent), None)
    lines = [render_problem(p), "", f"ROUND {r.round}: {len(r.batch)} graphs on the same {len(r.minibatch)} "
             "dev questions (paired)."]
    for k, e in enumerate(sorted(r.batch, key=lambda e: -e.reward)):
        diff = ""
        if inc is not None and e.key != inc.key:
            d, se, n = paired_difference(e.rewards, inc.rewards)
            if n:
                diff = f"; vs incumbent {d:+.3f} (se {se:.3f}, {n} shared questions)"
        lines.append(f"[{k}] " + _graph_line(e) + diff)
    if inc is not None:
        lo = inc.mean - 1.96 * float(np.std(list(inc.rewards.values()), ddof=1) / math.sqrt(max(inc.n, 2)))
        lines += ["", f"INCUMBENT (best so far): {trial_label(inc)}{to_text(inc.graph)}: mean {inc.mean:.3f} over {inc.n} questions "
                  f"(95% lower bound {lo:.3f})"]
    if r.hard_questions:
        lines.append("QUESTIONS MOST GRAPHS FAILED: " + ", ".join(r.hard_questions))
    if r.policy:
        lines.append("CURRENT DISTRIBUTION: " + ", ".join(f"{k}={v}" for k, v in r.policy.items()))
    if r.earlier:
        lines += ["", "EARLIER ROUNDS:", *r.earlier[-5:]]
    memory = render_memory(r.memory, r.memory_tokens)
    if memory:
        lines += ["", *memory]
    lines += ["", "Explain what the paired evidence suggests in `feedback`, then give logit deltas, target width/depth "
              f"and up to {p.max_proposals} new graphs (not yet evaluated) as JSON matching the schema; a graph "
              "that changes one shown above names it in `parent` by its trial number (#N). "
              "Set `confidence` to how sure you are."]
    return "\n".join(lines)
