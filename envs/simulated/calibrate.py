"""Calibrate simulator profiles against the papers' measurements (R1-R6) and report.

Usage::

    python -m graphtune.envs.simulated.calibrate [--profile math|mmlu|humaneval|all]
        [--write] [--table docs/simulator.md] [--maxiter N]

Without ``--write`` it only reports: the side-by-side tables of single-model accuracy (R1)
and of the pilot-study mixes (R2), and the checks of R3-R6. With ``--write`` it first fits
the free parameters (``FREE_PARAMETERS`` of :mod:`.profile`) with a small derivative-free
optimiser and writes them, with the refitted abilities, back into the profile files.
``--table`` rewrites the generated section of a markdown file (between the
``<!-- calibration:begin -->`` and ``<!-- calibration:end -->`` markers).

The graph families used by the checks (pilot mixes, width and depth sweeps, candidate
graphs at a budget) live here too, so the tests measure exactly what calibration fits.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from graphtune.envs.simulated.profile import (BUILTIN_PROFILES, FREE_PARAMETERS, Profile, fit_ability,
                                              load_profile)
from graphtune.envs.simulated.simulator import SimulatedEnvironment
from graphtune.errors import EnvError
from graphtune.graphs.catalog import KNOWN_MODELS
from graphtune.graphs.cost import Budget, CostModel, TaskShape
from graphtune.graphs.model import ASSISTANT, FUSER, Graph, Node

#: The pilot study's final decision node.
PILOT_FINAL_MODEL = "llama-3.2-3b"
#: Probability of each candidate edge i -> j (i < j) among the listed nodes.
PILOT_EDGE_P = 0.12

BEGIN, END = "<!-- calibration:begin -->", "<!-- calibration:end -->"


# -- environments ----------------------------------------------------------------------


def cost_model_for(profile: Profile) -> CostModel:
    """Costs of the profile's models (their catalogue constants) on the profile's task."""
    pool = {m: KNOWN_MODELS[m] for m in profile.model_names}
    return CostModel(pool, TaskShape(profile.input_tokens, profile.output_tokens))


def make_env(profile: Profile | str, *, seed: int = 0, test_size: int = 500) -> SimulatedEnvironment:
    p = load_profile(profile)
    return SimulatedEnvironment(p, cost_model_for(p), seed=seed, test_size=test_size)


def short(model: str) -> str:
    """``llama-3.2-3b`` -> ``3B``."""
    return model.rsplit("-", 1)[-1].upper()


# -- graph families ----------------------------------------------------------------------


def pilot_graph(models: Sequence[str], rng: np.random.Generator, *, final_model: str = PILOT_FINAL_MODEL,
                edge_p: float = PILOT_EDGE_P) -> Graph:
    """The pilot study's wiring: the listed models as assistants wired by a sparse random
    DAG (each edge i -> j, i < j, kept with ``edge_p``), plus a final assistant of
    ``final_model`` fed by every listed node without a successor (so nothing is pruned).
    A single listed model is that model alone."""
    if len(models) == 1:
        return Graph.build([Node.make("m0", ASSISTANT, models[0])])
    order = list(rng.permutation(len(models)))
    nodes = [Node.make(f"m{i}", ASSISTANT, models[k]) for i, k in enumerate(order)]
    edges = [(f"m{i}", f"m{j}") for i, j in itertools.combinations(range(len(models)), 2) if rng.random() < edge_p]
    has_succ = {u for u, _ in edges}
    edges += [(f"m{i}", "final") for i in range(len(models)) if f"m{i}" not in has_succ]
    return Graph.build(nodes + [Node.make("final", ASSISTANT, final_model)], edges)


def width_graph(model: str, k: int, *, sink_role: str = FUSER) -> Graph:
    """``k`` assistants of ``model`` into one ``sink_role`` node of the same model."""
    nodes = [Node.make(f"a{i}", ASSISTANT, model) for i in range(k)] + [Node.make("s", sink_role, model)]
    return Graph.build(nodes, [(f"a{i}", "s") for i in range(k)])


def chain_graph(model: str, depth: int) -> Graph:
    """A chain of ``depth`` assistants of ``model`` (each refines the previous answer)."""
    nodes = [Node.make(f"c{i}", ASSISTANT, model) for i in range(depth)]
    return Graph.build(nodes, [(f"c{i}", f"c{i + 1}") for i in range(depth - 1)])


def layered_graph(model: str, width: int, depth: int) -> Graph:
    """``depth`` layers of ``width`` assistants, each layer fully fed by the previous one;
    a wider graph ends in a fuser of the same model. Width 1 is a chain."""
    if width == 1:
        return chain_graph(model, depth)
    nodes, edges = [], []
    for layer in range(depth):
        for i in range(width):
            nodes.append(Node.make(f"l{layer}_{i}", ASSISTANT, model))
            if layer:
                edges += [(f"l{layer - 1}_{j}", f"l{layer}_{i}") for j in range(width)]
    nodes.append(Node.make("s", FUSER, model))
    edges += [(f"l{depth - 1}_{j}", "s") for j in range(width)]
    return Graph.build(nodes, edges)


def candidate_graphs(models: Sequence[str], costs: CostModel, budget_units: float, *,
                     max_sources: int = 8) -> list[Graph]:
    """A broad hand-built family of graphs within ``budget_units`` (R3): single calls,
    chains, any mix of up to ``max_sources`` source assistants (of up to two models) into
    a sink of any model and role, and two-layer variants of those."""
    budget = Budget(units=budget_units)
    out: dict[str, Graph] = {}

    def add(g: Graph) -> None:
        if budget.fits(costs.cost(g)):
            out[str(sorted(g.model_counts().items())) + str(g.role_counts()) + str(g.edges)] = g

    for m in models:
        add(Graph.build([Node.make("x", ASSISTANT, m)]))
        for d in range(2, 5):
            add(chain_graph(m, d))
    for a, b in itertools.combinations_with_replacement(models, 2):
        for na in range(0, max_sources + 1):
            for nb in range(0, max_sources + 1 - na):
                if na + nb == 0 or (a == b and nb):
                    continue
                srcs = [a] * na + [b] * nb
                for sink_model in models:
                    for role in (ASSISTANT, FUSER):
                        nodes = [Node.make(f"s{i}", ASSISTANT, m) for i, m in enumerate(srcs)]
                        g = Graph.build(nodes + [Node.make("z", role, sink_model)], [(f"s{i}", "z") for i in range(len(srcs))])
                        add(g)
                        # a second layer of one refiner before the sink
                        g2 = Graph.build(nodes + [Node.make("r", ASSISTANT, sink_model), Node.make("z", role, sink_model)],
                                         [(f"s{i}", "r") for i in range(len(srcs))] + [("r", "z")])
                        add(g2)
    return list(out.values())


# -- the checks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixRow:
    """One row of the R2 table."""

    label: str
    simulated: float  # %
    paper: float  # %

    @property
    def deviation(self) -> float:
        return self.simulated - self.paper


def _mix_models(models: tuple[tuple[str, int], ...]) -> list[str]:
    return [m for m, c in models for _ in range(c)]


def r2_mix_table(profile: Profile | str, *, n_graphs: int = 40, seed: int = 0, test_size: int = 500,
                 env: SimulatedEnvironment | None = None) -> list[MixRow]:
    """Mean accuracy (%) of ``n_graphs`` random pilot graphs per listed mix on the test
    split, next to the paper's figure (R2). Deterministic given ``seed``."""
    p = load_profile(profile)
    env = env or make_env(p, seed=seed, test_size=test_size)
    ids = env.split("test")
    final = PILOT_FINAL_MODEL if PILOT_FINAL_MODEL in p.model_names else sorted(
        p.models, key=lambda m: m.accuracy)[len(p.models) // 2].name
    rows = []
    for mix in p.mixes:
        models = _mix_models(mix.models)
        rng = np.random.default_rng([seed, len(models), sum(map(ord, mix.label))])
        n = 1 if len(models) == 1 else n_graphs
        accs = [env.accuracy(pilot_graph(models, rng, final_model=final), ids) for _ in range(n)]
        rows.append(MixRow(mix.label, 100 * float(np.mean(accs)), 100 * mix.accuracy))
    return rows


def r1_table(profile: Profile | str, *, seed: int = 0, test_size: int = 500) -> list[MixRow]:
    """Single-model accuracy (%) on the test split next to the profile's target (R1)."""
    p = load_profile(profile)
    env = make_env(p, seed=seed, test_size=test_size)
    ids = env.split("test")
    return [MixRow(short(m.name), 100 * env.accuracy(Graph.build([Node.make("x", ASSISTANT, m.name)]), ids),
                   100 * m.accuracy) for m in p.models]


def mad(rows: Sequence[MixRow]) -> float:
    return float(np.mean([abs(r.deviation) for r in rows]))


def sweep(env: SimulatedEnvironment, make, ks: Sequence[int], ids: Sequence[str]) -> list[float]:
    """Accuracy (%) of ``make(k)`` for each k."""
    return [100 * env.accuracy(make(k), ids) for k in ks]


def wrong_collision_rate(env: SimulatedEnvironment, model_a: str, model_b: str, ids: Sequence[str]) -> float:
    """Among questions where two independent calls (of ``model_a`` and ``model_b``) are both
    wrong, how often they give the same wrong answer (R6)."""
    nodes = [Node.make("a", ASSISTANT, model_a), Node.make("b", ASSISTANT, model_b),
             Node.make("z", FUSER, model_a)]
    sim = env.simulate(Graph.build(nodes, [("a", "z"), ("b", "z")]), ids)
    # canonical positions of the two sources are 0 and 1 (the fuser sorts last)
    src = [i for i in range(3) if i != sim.sink]
    a, b = sim.answers[:, src[0]], sim.answers[:, src[1]]
    both = (a != 0) & (b != 0)
    return float((a[both] == b[both]).mean()) if both.any() else float("nan")


@dataclass(frozen=True)
class BestGraph:
    budget_units: float
    graph: Graph
    accuracy: float  # %
    units: float


def best_graph(env: SimulatedEnvironment, budget_units: float, ids: Sequence[str], *,
               models: Sequence[str] | None = None) -> BestGraph:
    """The most accurate graph of :func:`candidate_graphs` within the budget (R3)."""
    models = list(models or [m for m in env.profile.model_names if m in env.costs.pool])
    best = None
    for g in candidate_graphs(models, env.costs, budget_units):
        acc = 100 * env.accuracy(g, ids)
        if best is None or acc > best.accuracy + 1e-9:
            best = BestGraph(budget_units, g, acc, env.costs.cost(g).units)
    if best is None:
        raise EnvError(f"no candidate graph fits {budget_units:g} units; one call of the smallest model costs 1 unit")
    return best


# -- fitting -------------------------------------------------------------------------------

#: Search box of each free parameter (the optimiser works on the unit cube).
BOUNDS: dict[str, tuple[float, float]] = {
    "difficulty_spread": (0.8, 3.0),
    "idiosyncrasy": (0.0, 3.0),
    "wrong_answer_skew": (0.5, 3.0),
    "error_correlation": (0.0, 1.0),
    "synthesis_gain": (0.0, 8.0),
    "verify_offset": (-3.0, 4.0),
    "weak_synth_penalty": (0.0, 6.0),
    "context_penalty": (0.0, 1.0),
    "corruption": (0.0, 0.6),
}


def _interior(accs: Sequence[float], margin: float = 0.5) -> bool:
    i = int(np.argmax(accs))
    return 0 < i < len(accs) - 1 and accs[i] - accs[0] >= margin and accs[i] - accs[-1] >= margin


def objective(profile: Profile, *, n_graphs: int = 16, test_size: int = 300, seed: int = 0) -> float:
    """Squared deviation from the paper's mixes (R2) plus penalties: the paper's best mix
    must be the simulator's (R2); on MATH, width and depth optima interior for the two
    smallest models (R4), the best depth lower at width 4 than at width 1 (R5) and wrong
    answers colliding (R6, with a margin over the 20% floor)."""
    env = make_env(profile, seed=seed, test_size=test_size)
    rows = r2_mix_table(profile, n_graphs=n_graphs, seed=seed, env=env)
    loss = sum(r.deviation ** 2 for r in rows) / max(len(rows), 1)
    if rows:
        paper_best = max(rows, key=lambda r: r.paper)
        sim_best = max(rows, key=lambda r: r.simulated)
        if sim_best is not paper_best:
            loss += 10.0 + 4.0 * (sim_best.simulated - paper_best.simulated)
    if profile.name == "math":  # R4-R6 are stated on MATH
        big = make_env(profile, seed=seed, test_size=1000)
        ids = big.split("test")
        small = sorted(profile.models, key=lambda m: m.accuracy)[0].name
        coll = wrong_collision_rate(big, small, small, ids)
        if coll < 0.25:
            loss += 400 * (0.25 - coll)
        for m in sorted(profile.models, key=lambda m: m.accuracy)[:2]:
            for make in (lambda k: width_graph(m.name, k), lambda k: chain_graph(m.name, k)):
                if not _interior(sweep(big, make, range(1, 8), ids), margin=1.5):
                    loss += 8.0
            w1, w4 = depth_sweeps(big, m.name, ids, max_depth=5)
            if np.argmax(w4) >= np.argmax(w1):
                loss += 8.0
            loss += 4.0 * max(0.0, 1.5 - interaction_margin(w1, w4))
    return float(loss)


def fit(profile: Profile, *, maxiter: int = 120, verbose: bool = True) -> Profile:
    """Fit the free parameters with Nelder-Mead on the unit cube, from the current values."""
    names = list(FREE_PARAMETERS)
    lo = np.array([BOUNDS[n][0] for n in names])
    hi = np.array([BOUNDS[n][1] for n in names])

    def decode(x: np.ndarray) -> Profile:
        vals = lo + np.clip(x, 0.0, 1.0) * (hi - lo)
        return profile.with_params(**{n: float(round(v, 4)) for n, v in zip(names, vals)})

    start = np.array([(getattr(profile, n) - lo[i]) / (hi[i] - lo[i]) for i, n in enumerate(names)])
    best = [objective(profile), profile]
    if verbose:
        print(f"[{profile.name}] start loss {best[0]:.2f}", flush=True)

    def f(x: np.ndarray) -> float:
        p = decode(x)
        val = objective(p)
        if val < best[0]:
            best[0], best[1] = val, p
            if verbose:
                print(f"[{profile.name}] loss {val:.2f}", flush=True)
        return val

    minimize(f, np.clip(start, 0, 1), method="Nelder-Mead",
             options={"maxfev": maxiter, "initial_simplex": _simplex(np.clip(start, 0, 1), 0.08)})
    return best[1]


def _simplex(x0: np.ndarray, step: float) -> np.ndarray:
    pts = [x0]
    for i in range(len(x0)):
        x = x0.copy()
        x[i] = x[i] + step if x[i] + step <= 1 else x[i] - step
        pts.append(x)
    return np.array(pts)


# -- writing profiles -------------------------------------------------------------------------

_DOC = {
    "name": "Task name; question ids are <name>-<split>-<index>.",
    "task": "Neutral task description shown to the agent (no accuracy figures).",
    "answer_format": "What a final answer looks like (shown to the agent).",
    "input_tokens": "A: average prompt tokens of one question (paper code).",
    "output_tokens": "B: average completion tokens of one call (paper code).",
    "n_wrong": "K: distinct wrong answers per question (answer ids 1..K; 0 is right).",
    "difficulty_spread": "s: question difficulty b_q ~ N(0, s), shared by all models.",
    "idiosyncrasy": "t: sd of a per-(question, model) logit shared by all calls of that model; larger = repeated samples of one model agree more (voting gains less, diverse pools gain more).",
    "wrong_answer_skew": "Zipf exponent of wrong-answer popularity; larger = errors collide more.",
    "error_correlation": "Share of the wrong-answer preference common to all models (rest is model specific).",
    "synthesis_gain": "g: pull (logit) toward the right candidate when the synthesiser can verify it.",
    "verify_offset": "Logit by which verifying an answer is easier than producing it.",
    "weak_synth_penalty": "w: pull toward wrong candidates when the synthesiser cannot verify.",
    "context_penalty": "kappa: logit penalty kappa * d^context_power / z_m for a node with d inputs.",
    "context_power": "Exponent of in-degree in the context penalty.",
    "size_exponent": "Model tolerance z_m = (params / 1e9) ** size_exponent (params from the cost pool).",
    "corruption": "rho: a synthesiser at level l garbles a right answer with prob 1 - exp(-rho * l / z_m).",
    "assistant_own_weight": "Votes of an assistant's own attempt among its inputs' answers.",
    "fuser_own_weight": "Votes of a fuser's own attempt (a fuser mostly selects).",
    "assistant_sharpness": "gamma: candidate weight = votes^gamma; 1 = proportional to votes.",
    "fuser_sharpness": "gamma of a fuser; > 1 leans toward the plurality.",
    "synthesis_diversity": "Share of a synthesiser's selection randomness that is its own; the rest is shared by nodes of its model and role that see the same inputs (identical prompts pick alike).",
    "token_noise": "Log-sd of per-question prompt and per-call completion token counts.",
}

_ORDER = ["name", "task", "answer_format", "input_tokens", "output_tokens", "n_wrong", "difficulty_spread", "idiosyncrasy",
          "wrong_answer_skew", "error_correlation", "synthesis_gain", "verify_offset", "weak_synth_penalty",
          "context_penalty", "context_power", "size_exponent", "corruption", "assistant_own_weight",
          "fuser_own_weight", "assistant_sharpness", "fuser_sharpness", "synthesis_diversity", "token_noise"]


def _yaml_scalar(v: object) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, float):
        return f"{v:.6g}" if not float(v).is_integer() else f"{v:.1f}"
    return str(v)


def render_profile_yaml(p: Profile, *, header: str = "") -> str:
    """The profile as a documented YAML file (every parameter with its meaning)."""
    lines = [f"# Simulator profile '{p.name}'. Model and parameters: docs/simulator.md.",
             "# Fitted by: python -m graphtune.envs.simulated.calibrate --profile "
             f"{p.name} --write  (free parameters: {', '.join(FREE_PARAMETERS)}).",
             "# Only input_tokens, output_tokens and models.<name>.accuracy are required; the",
             "# rest defaults as documented in docs/simulator.md."]
    if header:
        lines += [f"# {h}" for h in header.splitlines()]
    for key in _ORDER:
        lines += [f"# {_DOC[key]}", f"{key}: {_yaml_scalar(getattr(p, key))}"]
    lines += ["# Per model: measured single-call accuracy (fraction), fitted ability (logit; omit it",
              "# to refit from accuracy, difficulty_spread and idiosyncrasy), completion-length verbosity.",
              "models:"]
    for m in p.models:
        lines += [f"  {m.name}:", f"    accuracy: {m.accuracy:g}",
                  f"    ability: {fit_ability(m.accuracy, p.total_spread):.6f}",
                  f"    verbosity: {m.verbosity:g}"]
    if p.mixes:
        lines += ["# Calibration targets (R2): mean accuracy of random pilot graphs of these mixes", "mixes:"]
        for mx in p.mixes:
            inner = ", ".join(f"{m}: {c}" for m, c in mx.models)
            lines += [f"  - label: {_yaml_scalar(mx.label)}", f"    models: {{{inner}}}", f"    accuracy: {mx.accuracy:g}"]
    return "\n".join(lines) + "\n"


# -- report ---------------------------------------------------------------------------------------


def report(profiles: Sequence[Profile], *, n_graphs: int = 40) -> str:
    """The markdown section of tables and findings (R1-R6)."""
    out = ["_Generated by `python -m graphtune.envs.simulated.calibrate --profile all "
           "--table docs/simulator.md` (seed 0, 500-question test split, "
           f"{n_graphs} random pilot graphs per mix)._", "",
           "### R1: single-model accuracy (%), simulated vs paper", "",
           "| task | " + " | ".join(short(m) for m in profiles[0].model_names) + " |",
           "|---|" + "---|" * len(profiles[0].model_names)]
    for p in profiles:
        rows = r1_table(p)
        out.append(f"| {p.name} | " + " | ".join(f"{r.simulated:.1f} ({r.paper:.0f})" for r in rows) + " |")
    out += ["", "### R2: random pilot graphs per mix (%), simulated vs paper", "",
            "| task | mix | simulated | paper | deviation |", "|---|---|---|---|---|"]
    mads = []
    for p in profiles:
        rows = r2_mix_table(p, n_graphs=n_graphs)
        for r in rows:
            out.append(f"| {p.name} | {r.label} | {r.simulated:.1f} | {r.paper:.0f} | {r.deviation:+.1f} |")
        sim_best = max(rows, key=lambda r: r.simulated).label
        paper_best = max(rows, key=lambda r: r.paper).label
        mads.append(f"- {p.name}: MAD {mad(rows):.1f} points; best mix simulated {sim_best}, paper {paper_best}")
    out += ["", *mads, "", "### R3: best graph of a hand-built candidate family at a budget", "",
            "| task | budget (units) | best graph | units | accuracy (%) |", "|---|---|---|---|---|"]
    for p in profiles:
        env = make_env(p)
        ids = env.split("test")
        for budget in (18, 42):
            bg = best_graph(env, budget, ids, models=[m for m in p.model_names if "70b" not in m])
            out.append(f"| {p.name} | {budget} | {describe_graph(bg.graph)} | {bg.units:.1f} | {bg.accuracy:.1f} |")
    out += ["", "### R4/R5: width and depth sweeps (accuracy %, k = 1..8)", "",
            "| task | model | width: k assistants -> fuser | depth: chain of k assistants |", "|---|---|---|---|"]
    for p in profiles:
        env = make_env(p)
        ids = env.split("test")
        for m in p.model_names:
            w = sweep(env, lambda k: width_graph(m, k), range(1, 9), ids)
            d = sweep(env, lambda k: chain_graph(m, k), range(1, 9), ids)
            out.append(f"| {p.name} | {short(m)} | {' '.join(f'{x:.0f}' for x in w)} | {' '.join(f'{x:.0f}' for x in d)} |")
    out += ["", "Best depth (layers of assistants; width > 1 ends in a fuser) at width 1 and width 4:", "",
            "| task | model | best depth at width 1 | best depth at width 4 |", "|---|---|---|---|"]
    for p in profiles:
        env = make_env(p)
        ids = env.split("test")
        for m in p.model_names[:3]:
            b1, b4 = best_depths(env, m, ids)
            out.append(f"| {p.name} | {short(m)} | {b1} | {b4} |")
    out += ["", "### R6: wrong-answer collisions (two independent wrong calls agree)", "",
            "| task | 1B vs 1B | 3B vs 3B | 1B vs 8B |", "|---|---|---|---|"]
    for p in profiles:
        env = make_env(p)
        ids = env.split("test")
        names = p.model_names
        c = [wrong_collision_rate(env, a, b, ids) for a, b in ((names[0], names[0]), (names[1], names[1]),
                                                                 (names[0], names[2]))]
        out.append(f"| {p.name} | " + " | ".join(f"{100 * x:.0f}%" for x in c) + " |")
    return "\n".join(out) + "\n"


def depth_sweeps(env: SimulatedEnvironment, model: str, ids: Sequence[str], *,
                 max_depth: int = 6) -> tuple[list[float], list[float]]:
    """Accuracy (%) of :func:`layered_graph` at depths 1..max_depth, at width 1 and 4 (R5)."""
    return tuple(sweep(env, lambda d: layered_graph(model, width, d), range(1, max_depth + 1), ids)
                 for width in (1, 4))


def best_depths(env: SimulatedEnvironment, model: str, ids: Sequence[str], *, max_depth: int = 6) -> tuple[int, int]:
    """Best depth of :func:`layered_graph` at width 1 and at width 4 (R5)."""
    w1, w4 = depth_sweeps(env, model, ids, max_depth=max_depth)
    return 1 + int(np.argmax(w1)), 1 + int(np.argmax(w4))


def interaction_margin(w1: Sequence[float], w4: Sequence[float]) -> float:
    """How clearly the best depths differ (R5): the smaller of what width 4 loses at width
    1's best depth and what width 1 loses at width 4's best depth (points; 0 when equal)."""
    b1, b4 = int(np.argmax(w1)), int(np.argmax(w4))
    return min(max(w4) - w4[b1], max(w1) - w1[b4])


def describe_graph(g: Graph) -> str:
    sink = g.node_map[g.sink]
    srcs = [g.node_map[p] for p in g.preds[g.sink]]
    if not srcs:
        return f"{short(sink.model)} alone"
    counts = {}
    for n in g.nodes:
        if n.id != g.sink:
            counts[short(n.model)] = counts.get(short(n.model), 0) + 1
    body = "+".join(f"{c}x{m}" for m, c in sorted(counts.items()))
    return f"{body} -> {sink.role} {short(sink.model)} (depth {g.depth})"


def write_table(path: Path, text: str) -> None:
    doc = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{text}{END}"
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + block + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m graphtune.envs.simulated.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="all", help="math, mmlu, humaneval, all, or a path to a profile file")
    ap.add_argument("--write", action="store_true", help="fit the free parameters and write them into the profile")
    ap.add_argument("--table", type=Path, help="markdown file whose generated section to refresh")
    ap.add_argument("--maxiter", type=int, default=120, help="objective evaluations per profile (default 120)")
    args = ap.parse_args(argv)
    names = list(BUILTIN_PROFILES) if args.profile == "all" else [args.profile]
    profiles = []
    for name in names:
        p = load_profile(name)
        path = BUILTIN_PROFILES.get(name, Path(name))
        if args.write:
            t0 = time.perf_counter()
            p = fit(p, maxiter=args.maxiter)
            path.write_text(render_profile_yaml(p))
            p = load_profile(path)
            print(f"[{p.name}] wrote {path} ({time.perf_counter() - t0:.0f} s)", flush=True)
        profiles.append(p)
    for p in profiles:
        print(f"\n== {p.name}")
        print("R1 single model (simulated vs paper): " + ", ".join(
            f"{r.label} {r.simulated:.1f}/{r.paper:.0f}" for r in r1_table(p)))
        rows = r2_mix_table(p)
        print("R2 mixes (simulated vs paper):")
        for r in rows:
            print(f"  {r.label:>14}: {r.simulated:5.1f}  {r.paper:5.0f}  ({r.deviation:+.1f})")
        print(f"  MAD {mad(rows):.1f}; best simulated {max(rows, key=lambda r: r.simulated).label}, "
              f"paper {max(rows, key=lambda r: r.paper).label}")
    if args.table:
        write_table(args.table, report(profiles))
        print(f"\nrefreshed the tables in {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
