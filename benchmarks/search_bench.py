"""Search benchmark: which method finds better graphs with fewer paid graph-question runs.

Runs searchers x tasks x budgets x seeds on the calibrated simulator, each method with the
same search budget counted in graph-question runs (``mult`` x dev size), and reports per
case: the true accuracy of the returned graph (scored on a large held-out population the
search never sees), regret against the best graph known for the case, the search budget
used to come within 1 point of it, and the search cost (environment FLOPs/dollars; the
agent's own calls and tokens apart). Writes a markdown report and one PNG per case.

    python benchmarks/search_bench.py                      # the full committed benchmark
    python benchmarks/search_bench.py --quick              # a smoke run

"Best known" for a case = the best true accuracy over (a) a broad hand-built family of
graphs (single models, chains, every mix of up to 8 sources of up to two models into a
sink of any model and role, with and without a refiner layer;
``graphtune.envs.simulated.calibrate.candidate_graphs``), (b) every method's returned and
top dev graphs in every run of the benchmark. It is the best *known* graph, not a proven
optimum: the full space (up to 9 nodes, any DAG) is too large to enumerate.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = ["agent-reinforce", "reinforce", "random", "tpe", "cmaes", "qmc", "llm-opt"]
TRUE_TEST_SIZE = 4000
TRUE_SEED = 10_007


def spec_for(task: str, budget: float, method: str, seed: int, mult: int, dev: int,
             agent: dict | None = None) -> dict:
    return {
        "study": f"{method}-{task}-{budget:g}-{seed}-{mult}",
        "task": {"profile": task, "dev_size": dev, "test_size": 1},
        "models": [{"name": m} for m in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b")],
        "space": {"roles": ["assistant", "fuser"], "max_nodes": 9, "max_width": 9, "max_depth": 4,
                  "max_in_degree": 4},
        "budget": {"units": budget},
        "search": {"method": method, "evaluations": mult, "batch_size": 8, "seed": seed,
                   **({"agent": agent} if agent else {})},
        # the dev questions differ per seed: variance over seeds includes the dev draw
        "env": {"kind": "simulated", "seed": 1000 + seed},
        "storage": "sqlite:///:memory:",
    }


@dataclass
class Job:
    method: str
    task: str
    budget: float
    seed: int
    mult: int
    dev: int
    curve: bool
    #: search.agent settings (benchmarks/agent_bench.py: an LLM agent); None: the default agent
    agent: dict | None = None
    #: a label told apart in the results (default: the method)
    label: str | None = None


_PROBLEMS: dict = {}  # per worker: environments are deterministic and stateless, so reuse them


def _problem(spec, job: Job):
    from dataclasses import replace

    from graphtune.api import build_problem

    key = (job.task, job.budget, job.seed, job.dev)
    if key not in _PROBLEMS:
        if len(_PROBLEMS) > 8:
            _PROBLEMS.clear()
        _PROBLEMS[key] = build_problem(spec)
    base = _PROBLEMS[key]
    ctx = replace(base.ctx, seed=spec.search.seed, budget_runs=spec.search.evaluations * len(base.ctx.dev_ids))
    return base, ctx


def recorded_search(job: Job, after_tell=None):
    """Run ``job``'s search in memory and keep its history as the loop tells it; after each
    told batch ``after_tell(searcher, history, spent)`` (runs paid so far) is called. Returns
    (ctx, searcher, store, study, outcome, history)."""
    from graphtune.api import make_searcher
    from graphtune.search.loop import run_search
    from graphtune.spec import parse_spec
    from graphtune.store.memory import MemoryStorage

    spec = parse_spec(spec_for(job.task, job.budget, job.method, job.seed, job.mult, job.dev, job.agent))
    problem, ctx = _problem(spec, job)
    searcher = make_searcher(spec, ctx)
    store = MemoryStorage()
    study = store.create_study(spec.study, job.method, {})
    history: list = []
    spent = [0]
    tell = searcher.tell

    def recording_tell(evaluations):
        history.extend(evaluations)
        tell(evaluations)
        spent[0] += sum(e.new_runs for e in evaluations)
        if after_tell is not None:
            after_tell(searcher, history, spent[0])

    searcher.tell = recording_tell
    out = run_search(searcher, problem.env, store, study, ctx, budget_runs=ctx.budget_runs, test_ids=None)
    return ctx, searcher, store, study, out, history


def run_job(job: Job) -> dict:
    from graphtune.graphs.io import to_dict

    t0 = time.perf_counter()
    curve: list[tuple[int, dict]] = []
    step = 2 * job.dev
    nxt = [step]

    def checkpoint(searcher, history, spent):
        # checkpoint the current pick every 2 x dev runs
        if job.curve and spent >= nxt[0]:
            best = searcher.recommend(history)
            if best is not None:
                curve.append((spent, to_dict(best.graph)))
            while nxt[0] <= spent:
                nxt[0] += step

    ctx, searcher, store, study, out, history = recorded_search(job, checkpoint)
    trials = [t for t in store.list_trials(study.id, split="dev") if t.status == "complete"]
    flops = sum((t.flops or 0.0) * t.new_runs for t in trials)
    usd = sum((t.usd or 0.0) * t.new_runs for t in trials)
    usage = searcher.agent_usage() if hasattr(searcher, "agent_usage") else {}
    # the method's best few graphs by dev evidence, to widen the "best known" pool
    from graphtune.search.base import pool_stats

    stats = sorted(pool_stats(history, ctx.objective, ctx.costs.unit_flops).values(),
                   key=lambda s: (-s.n, -s.mean))[:5]
    searcher.close()
    steps = store.agent_steps(study.id)
    return {"label": job.label or job.method, "steps": [
                {k: st.get(k) for k in ("kind", "is_llm", "rejected_reason", "calls", "prompt_tokens",
                                        "completion_tokens", "usd", "seconds")} | {"parsed": st.get("parsed") is not None}
                for st in steps],
            "method": job.method, "task": job.task, "budget": job.budget, "seed": job.seed, "mult": job.mult,
            "dev": job.dev, "graph": to_dict(out.best.graph) if out.best else None, "runs": out.runs_spent,
            "trials": out.n_trials, "env_flops": flops, "env_usd": usd,
            "agent": {k: usage.get(k) for k in ("backend", "is_llm", "calls", "prompt_tokens", "completion_tokens",
                                                "usd", "seconds")} if usage else None,
            "curve": curve, "top": [to_dict(s.graph) for s in stats], "wall_s": time.perf_counter() - t0}


class Truth:
    """True accuracy of graphs per task, on a large population the searches never see."""

    def __init__(self):
        self.envs = {}
        self.cache: dict[tuple[str, str], float] = {}

    def env(self, task: str):
        if task not in self.envs:
            from graphtune.envs.simulated.calibrate import make_env

            self.envs[task] = make_env(task, seed=TRUE_SEED, test_size=TRUE_TEST_SIZE)
        return self.envs[task]

    def acc(self, task: str, graph) -> float:
        from graphtune.graphs.canonical import graph_hash

        key = (task, graph_hash(graph))
        if key not in self.cache:
            env = self.env(task)
            self.cache[key] = 100.0 * env.accuracy(graph, env.split("test"))
        return self.cache[key]


def mean_ci(xs) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    m = float(np.mean(xs))
    if len(xs) < 2:
        return m, float("nan")
    from scipy import stats

    half = float(stats.t.ppf(0.975, len(xs) - 1) * np.std(xs, ddof=1) / math.sqrt(len(xs)))
    return m, half


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--tasks", default="math,mmlu,humaneval")
    ap.add_argument("--budgets", default="18,42,80")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--mults", default="20,60", help="search budgets in multiples of the dev size")
    ap.add_argument("--curve-mult", type=int, default=20, help="record best-so-far curves in runs of this budget")
    ap.add_argument("--long-methods", default="tpe",
                    help="methods also run at the larger budgets of --mults (all run at the smallest)")
    ap.add_argument("--dev", type=int, default=200)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    ap.add_argument("--md", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--json", default=None, help="also dump raw per-run results here")
    ap.add_argument("--reuse", default=None,
                    help="comma-separated --json dumps of earlier runs: their runs of methods not in --methods "
                         "are reported with this run's (same cases, seeds and dev size; a run in two dumps is "
                         "taken from the first listed); their wall time is added. --methods '' reports only them")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 methods, 1 case, 2 seeds, no files")
    args = ap.parse_args(argv)
    if args.quick:
        args.methods, args.tasks, args.budgets, args.seeds, args.mults = "agent-reinforce,random", "math", "18", 2, "20"
        args.md = None
    methods = [m for m in args.methods.split(",") if m]
    tasks = args.tasks.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    mults = [int(m) for m in args.mults.split(",")]
    long_methods = args.long_methods.split(",") if args.long_methods else methods
    jobs = [Job(m, t, b, s, mult, args.dev, mult == args.curve_mult)
            for mult in mults for t in tasks for b in budgets for s in range(args.seeds) for m in methods
            if mult == min(mults) or m in long_methods]
    # warm the imports once in the parent: forked workers inherit them
    import graphtune.api  # noqa: F401
    import graphtune.envs.simulated  # noqa: F401
    import graphtune.search.optuna_search  # noqa: F401
    t0 = time.perf_counter()
    results = []
    ctx = mp.get_context("fork")
    with ctx.Pool(args.workers) as pool:
        for i, r in enumerate(pool.imap_unordered(run_job, jobs, chunksize=1)):
            results.append(r)
            if (i + 1) % 20 == 0 or i + 1 == len(jobs):
                print(f"  {i + 1}/{len(jobs)} runs, {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    search_wall = time.perf_counter() - t0
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    reused_wall = 0.0
    if args.reuse:
        old = reuse(args.reuse.split(","), methods, tasks, budgets, mults, args)
        results += old
        reused_wall = sum(r["wall_s"] for r in old) / max(1, args.workers)
        methods = methods + [m for m in DEFAULT_METHODS + sorted({r["method"] for r in old})
                             if m not in methods and any(r["method"] == m for r in old)]
        methods = list(dict.fromkeys(methods))
    report = analyse(results, methods, tasks, budgets, mults, args, search_wall, t0, reused_wall)
    print(report)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        write_section(Path(args.md), report)
    return 0


def reuse(paths: list[str], methods, tasks, budgets, mults, args) -> list[dict]:
    """Runs from earlier ``--json`` dumps for the methods this run does not run, restricted
    to this run's cases, seeds and budgets; a dump with another dev size is refused."""
    out, seen = [], set()
    for path in paths:
        rows = json.loads(Path(path).read_text())
        for r in rows:
            if r.get("dev", args.dev) != args.dev:
                raise SystemExit(f"{path}: runs with dev size {r.get('dev')}, this run uses --dev {args.dev}")
            key = (r["method"], r["task"], r["budget"], r["seed"], r["mult"])
            if (r["method"] not in methods and r["task"] in tasks and r["budget"] in budgets
                    and r["mult"] in mults and r["seed"] < args.seeds and key not in seen):
                seen.add(key)  # the first dump listed wins
                out.append(r)
    return out


def analyse(results, methods, tasks, budgets, mults, args, search_wall, t0, reused_wall: float = 0.0) -> str:
    from graphtune.envs.simulated.calibrate import candidate_graphs, cost_model_for
    from graphtune.envs.simulated.profile import load_profile
    from graphtune.graphs.io import from_dict
    from graphtune.graphs.render import to_short

    truth = Truth()
    best: dict[tuple[str, float], tuple[float, str]] = {}
    for t in tasks:
        prof = load_profile(t)
        costs = cost_model_for(prof)
        for b in budgets:
            fam = [g for g in candidate_graphs(prof.model_names, costs, b)]
            # keep within the benchmark space (<= 9 nodes, in-degree <= 4, depth <= 4)
            fam = [g for g in fam if g.size <= 9 and g.max_in_degree <= 4 and g.depth <= 4]
            accs = [(truth.acc(t, g), to_short(g)) for g in fam]
            best[(t, b)] = max(accs) if accs else (float("-inf"), "")
    # The floor of selecting on dev: evaluate the whole hand-built family on each seed's dev
    # set (far more than any method's budget) and take the dev-best; its true regret is what
    # dev noise alone costs at this dev size.
    from graphtune.envs.simulated.simulator import SimulatedEnvironment

    floor: dict[tuple[str, float], float] = {}
    for t in tasks:
        prof = load_profile(t)
        costs = cost_model_for(prof)
        for b in budgets:
            fam = [g for g in candidate_graphs(prof.model_names, costs, b)
                   if g.size <= 9 and g.max_in_degree <= 4 and g.depth <= 4]
            true = np.array([truth.acc(t, g) for g in fam])
            regs = []
            for seed in range(args.seeds):
                env = SimulatedEnvironment(prof, costs, seed=1000 + seed, dev_size=args.dev, test_size=1)
                ids = env.split("dev")
                dev_acc = np.array([env.accuracy(g, ids) for g in fam])
                regs.append(float(true.max() - true[int(dev_acc.argmax())]))
            floor[(t, b)] = float(np.mean(regs))
    for r in results:
        for gd in [r["graph"], *r["top"], *(g for _, g in r["curve"])]:
            if gd:
                a = truth.acc(r["task"], from_dict(gd))
                key = (r["task"], r["budget"])
                if a > best[key][0]:
                    best[key] = (a, to_short(from_dict(gd)))
    for r in results:
        key = (r["task"], r["budget"])
        r["true"] = truth.acc(r["task"], from_dict(r["graph"])) if r["graph"] else float("nan")
        r["regret"] = best[key][0] - r["true"]
        r["within1"] = next((runs for runs, g in r["curve"]
                             if best[key][0] - truth.acc(r["task"], from_dict(g)) <= 1.0), None)
    by = defaultdict(list)
    for r in results:
        by[(r["method"], r["task"], r["budget"], r["mult"])].append(r)
    lines = []
    cmd = "python benchmarks/search_bench.py " + " ".join(
        f"--{k} {v}" for k, v in (("methods", ",".join(methods)), ("long-methods", args.long_methods),
                                   ("tasks", ",".join(tasks)),
                                   ("budgets", ",".join(f"{b:g}" for b in budgets)), ("seeds", args.seeds),
                                   ("mults", ",".join(map(str, mults))), ("dev", args.dev)))
    if args.reuse:
        cmd += f" --reuse {args.reuse}"
    lines += [f"Command: `{cmd}` ({args.workers} worker processes on {os.cpu_count()} cores: "
              f"{time.perf_counter() - t0:.0f} s in all, {search_wall:.0f} s of searching"
              + (f", plus about {reused_wall:.0f} s of searching in the reused runs" if args.reuse else "") + ").", "",
              f"Dev set {args.dev} questions per seed (a new draw per seed); search budget `mult` x dev size "
              f"graph-question runs; true accuracy on {TRUE_TEST_SIZE} held-out simulated questions; "
              f"means over {args.seeds} seeds with 95% t-intervals. Regret is against the best *known* graph "
              "of the case (a hand-built family of ~thousands of structured graphs plus every graph any "
              "run returned or ranked top-5); `within 1 pt` is the median search budget (x dev size) at "
              f"which the method's current pick first came within 1 point of it, from the {args.curve_mult} x "
              "runs (`-` when the median seed never did). `dev-oracle regret` is the floor that dev noise "
              "alone sets: the whole hand-built family evaluated on each seed's full dev set (far beyond any "
              "method's budget), the dev-best graph picked, its true regret averaged over seeds.", ""]
    lines.append("| case | best known | dev-oracle regret | method | mult | true acc | regret | within 1 pt | env PFLOPs "
                 "| wall s per run | agent calls | agent ms per step |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in tasks:
        for b in budgets:
            bk, bg = best[(t, b)]
            for mult in mults:
                for m in methods:
                    rs = by.get((m, t, b, mult), [])
                    if not rs:
                        continue
                    acc, acc_h = mean_ci([r["true"] for r in rs])
                    reg, reg_h = mean_ci([r["regret"] for r in rs])
                    w = [r["within1"] for r in rs if r["mult"] == args.curve_mult]
                    w1 = ""
                    if w:
                        med = float(np.median([x if x is not None else math.inf for x in w]))
                        w1 = f"{med / args.dev:.0f}" if math.isfinite(med) else "-"
                    pf = np.mean([r["env_flops"] for r in rs]) / 1e15
                    calls = [r["agent"]["calls"] for r in rs if r.get("agent")]
                    ac = f"{np.mean(calls):.0f}" + (" (heuristic, not an LLM)" if rs[0].get("agent") and not rs[0]["agent"]["is_llm"] else "") if calls else "-"
                    wall = np.mean([r["wall_s"] for r in rs])
                    steps = [st for r in rs for st in r.get("steps", [])]
                    per_step = (f"{1000 * np.mean([st['seconds'] or 0.0 for st in steps]):.0f}"
                                if steps else "-")
                    lines.append(f"| {t} {b:g} | {bk:.1f} `{bg}` | {floor[(t, b)]:.2f} | {m} | {mult} | {acc:.1f} +- {acc_h:.1f} | "
                                 f"{reg:.2f} +- {reg_h:.2f} | {w1} | {pf:.2f} | {wall:.1f} | {ac} | {per_step} |")
    lines.append("")
    lines += targets(by, methods, tasks, budgets, mults, floor)
    if args.md:
        lines += plots(by, methods, tasks, budgets, args, truth, best)
    return "\n".join(lines)


def targets(by, methods, tasks, budgets, mults, floor=None) -> list[str]:
    """The issue-13 targets for agent-reinforce at 20 x dev, checked on this run."""
    if "agent-reinforce" not in methods or 20 not in mults:
        return []
    from scipy import stats

    out = ["### Targets for agent-reinforce (default agent: the heuristic critic)", ""]
    cases = [(t, b) for t in tasks for b in budgets if by.get(("agent-reinforce", t, b, 20))]
    reg = {(m, t, b): {r["seed"]: r["regret"] for r in by.get((m, t, b, 20), [])}
           for m in methods for t, b in cases}
    ar_mean = float(np.mean([np.mean(list(reg[("agent-reinforce", t, b)].values())) for t, b in cases]))
    if floor:
        fl = float(np.mean([floor[c] for c in cases]))
        out.append(f"- Mean regret over the {len(cases)} cases at or below the dev-oracle floor's mean: "
                   f"**{ar_mean:.2f} vs {fl:.2f}: {'met' if ar_mean <= fl else 'not met'}**.")
    lowest, cells = 0, []
    for t, b in cases:
        means = {m: np.mean(list(reg[(m, t, b)].values())) for m in methods if reg.get((m, t, b))}
        mine = means.pop("agent-reinforce")
        rival = min(means, key=means.get) if means else None
        strict = rival is None or mine < means[rival] - 1e-9
        lowest += strict
        cells.append(f"{t} {b:g}: {mine:.2f} vs {rival} {means[rival]:.2f}" if rival else f"{t} {b:g}")
    out.append(f"- Strictly lowest mean regret of all methods: **{lowest} of {len(cases)} cases** (target: at "
               f"least 7 of 9). Per case (agent-reinforce vs the best other method): {'; '.join(cells)}.")
    if "reinforce" in methods:
        better = sig = 0
        cells = []
        for t, b in cases:
            a, r = reg[("agent-reinforce", t, b)], reg.get(("reinforce", t, b), {})
            seeds = sorted(set(a) & set(r))
            if len(seeds) < 2:
                continue
            d = np.array([r[s] - a[s] for s in seeds])  # positive: agent-reinforce better
            pval = float(stats.ttest_rel([r[s] for s in seeds], [a[s] for s in seeds]).pvalue) if d.std() > 0 else 1.0
            better += d.mean() > 0
            sig += d.mean() > 0 and pval < 0.05
            cells.append(f"{t} {b:g}: {d.mean():+.2f} (p={pval:.3f})")
        out.append(f"- Beats `reinforce` (lower mean regret, same seeds and dev draws): **{better} of {len(cells)} "
                   f"cases**, significantly (paired t-test over seeds, p < 0.05) on **{sig}** (targets: 9 of 9, "
                   f"at least 5 significant). Per case, regret of reinforce minus agent-reinforce: "
                   f"{'; '.join(cells)}.")
    if 60 in mults and "tpe" in methods:
        wins, cells = 0, []
        for t, b in cases:
            a = by.get(("agent-reinforce", t, b, 20), [])
            p_ = by.get(("tpe", t, b, 60), [])
            if a and p_:
                ma, mp_ = np.mean([r["true"] for r in a]), np.mean([r["true"] for r in p_])
                wins += ma >= mp_
                cells.append(f"{t} {b:g}: {ma:.1f} vs {mp_:.1f}")
        out.append(f"- agent-reinforce at 20 x dev reaches TPE's result at 60 x dev (a third of its budget): "
                   f"**{wins} of {len(cells)} cases** (target: 9 of 9). Per case (mean true accuracy, AR@20 vs "
                   f"TPE@60): {'; '.join(cells)}.")
    out.append("")
    return out


def plots(by, methods, tasks, budgets, args, truth, best) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(matplotlib not installed: no plots; `pip install matplotlib`)"]
    from graphtune.graphs.io import from_dict

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["### Best-so-far curves", ""]
    for t in tasks:
        for b in budgets:
            fig, ax = plt.subplots(figsize=(6, 4))
            for m in methods:
                rs = by.get((m, t, b, args.curve_mult), [])
                if not rs:
                    continue
                grid = np.arange(2, args.curve_mult + 1, 2) * args.dev
                ys = []
                for r in rs:
                    pts = [(runs, truth.acc(t, from_dict(g))) for runs, g in r["curve"]]
                    row = []
                    for x in grid:
                        prior = [a for runs, a in pts if runs <= x]
                        row.append(prior[-1] if prior else np.nan)
                    ys.append(row)
                ax.plot(grid / args.dev, np.nanmean(np.array(ys, dtype=float), axis=0), label=m)
            ax.axhline(best[(t, b)][0], color="k", ls="--", lw=0.8, label="best known")
            ax.set_xlabel("search budget (x dev size graph-question runs)")
            ax.set_ylabel("true accuracy of current pick (%)")
            ax.set_title(f"{t}, {b:g} units")
            ax.legend(fontsize=7)
            fig.tight_layout()
            name = f"curve_{t}_{b:g}.png"
            fig.savefig(out_dir / name, dpi=90)
            plt.close(fig)
            lines.append(f"![{t} {b:g}](benchmarks/{name})")
    lines.append("")
    return lines


BEGIN, END = "<!-- search-bench:begin -->", "<!-- search-bench:end -->"


def write_section(path: Path, body: str, *, begin: str = BEGIN, end: str = END,
                  heading: str = "Search methods") -> None:
    """Replace the block between ``begin`` and ``end`` in the markdown file ``path`` with
    ``body``, or append it under ``## heading`` (every benchmark's report section)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
