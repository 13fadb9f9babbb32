"""Pareto benchmark: hypervolume of the accuracy-vs-cost front against search budget.

Methods: ``agent-reinforce`` with ``search.options.pareto: units`` (cycled scalarisations,
see ``graphtune.search.reinforce``), ``nsga2`` (Optuna's NSGA-II on reward and units: the
baseline), ``random``, and ``agent-reinforce`` without the option (single objective, for
reference). All run on the calibrated simulator with the same search budget in
graph-question runs.

At checkpoints of the budget each run's *claimed* front is taken from its stored dev
trials exactly as ``graphtune pareto`` does (graphs on at least half the best coverage,
non-dominated in dev accuracy and units). The claimed graphs are then scored on a large
population the search never sees (true accuracy), and the hypervolume of those true
points is measured in the box ``units <= budget``, ``accuracy >= 0`` (accuracy in
points, cost as a fraction of the budget: 100 is a perfect front). A method is credited
only for graphs it both found and measured well enough to claim.

    python benchmarks/pareto_bench.py            # the committed benchmark (< 10 min, 2 cores)
    python benchmarks/pareto_bench.py --quick    # smoke run, no files written
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "agent-reinforce+pareto": ("agent-reinforce", {"pareto": "units"}),
    "nsga2": ("nsga2", {}),
    "random": ("random", {}),
    "agent-reinforce": ("agent-reinforce", {}),
}
TRUE_TEST_SIZE = 2000
TRUE_SEED = 10_007
BEGIN, END = "<!-- pareto-bench:begin -->", "<!-- pareto-bench:end -->"


def spec_for(task: str, budget: float, label: str, seed: int, mult: int, dev: int) -> dict:
    method, options = METHODS[label]
    return {
        "study": f"{label}-{task}-{budget:g}-{seed}",
        "task": {"profile": task, "dev_size": dev, "test_size": 1},
        "models": [{"name": m} for m in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b")],
        "space": {"roles": ["assistant", "fuser"], "max_nodes": 9, "max_width": 9, "max_depth": 4,
                  "max_in_degree": 4},
        "budget": {"units": budget},
        "search": {"method": method, "evaluations": mult, "batch_size": 8, "seed": seed, "options": options},
        "env": {"kind": "simulated", "seed": 1000 + seed},
        "storage": "sqlite:///:memory:",
    }


@dataclass
class Job:
    label: str
    task: str
    budget: float
    seed: int
    mult: int
    dev: int
    checkpoints: int


def run_job(job: Job) -> dict:
    from graphtune.api import build_problem, make_searcher
    from graphtune.pareto import pareto_front, points_from_trials
    from graphtune.search.loop import run_search
    from graphtune.spec import parse_spec
    from graphtune.store.memory import MemoryStorage

    t0 = time.perf_counter()
    spec = parse_spec(spec_for(job.task, job.budget, job.label, job.seed, job.mult, job.dev))
    problem = build_problem(spec)
    ctx = problem.ctx
    searcher = make_searcher(spec, ctx)
    store = MemoryStorage()
    study = store.create_study(spec.study, spec.search.method, {})
    step = ctx.budget_runs / job.checkpoints
    marks = [int(round(step * (i + 1))) for i in range(job.checkpoints)]
    fronts: list[tuple[int, list[dict]]] = []

    def snapshot(spent: int) -> None:
        pts = points_from_trials(store.list_trials(study.id, split="dev"))
        fronts.append((spent, [{"graph": p.graph, "units": p.cost_units, "dev": p.accuracy}
                               for p in pareto_front(pts, "units")]))

    def progress(ev: dict) -> None:
        while marks and ev["runs_spent"] >= marks[0]:
            marks.pop(0)
            snapshot(ev["runs_spent"])

    out = run_search(searcher, problem.env, store, study, ctx, budget_runs=ctx.budget_runs, test_ids=None,
                     progress=progress)
    if marks:  # the search ended early
        snapshot(out.runs_spent)
    searcher.close()
    return {"label": job.label, "task": job.task, "budget": job.budget, "seed": job.seed, "dev": job.dev,
            "fronts": fronts, "wall_s": time.perf_counter() - t0}


class Truth:
    def __init__(self):
        self.envs, self.cache = {}, {}

    def acc(self, task: str, graph_dict: dict) -> float:
        from graphtune.envs.simulated.calibrate import make_env
        from graphtune.graphs.canonical import graph_hash
        from graphtune.graphs.io import from_dict

        g = from_dict(graph_dict)
        key = (task, graph_hash(g))
        if key not in self.cache:
            if task not in self.envs:
                self.envs[task] = make_env(task, seed=TRUE_SEED, test_size=TRUE_TEST_SIZE)
            env = self.envs[task]
            self.cache[key] = 100.0 * env.accuracy(g, env.split("test"))
        return self.cache[key]


def true_hv(truth: Truth, task: str, front: list[dict], budget: float) -> float:
    from graphtune.pareto import hypervolume

    # cost as a fraction of the budget, accuracy in points: 100 = a perfect front
    return hypervolume(((p["units"] / budget, truth.acc(task, p["graph"])) for p in front), 1.0)


def mean_ci(xs) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    m = float(np.mean(xs))
    if len(xs) < 2:
        return m, float("nan")
    from scipy import stats

    return m, float(stats.t.ppf(0.975, len(xs) - 1) * np.std(xs, ddof=1) / math.sqrt(len(xs)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tasks", default="math,mmlu,humaneval")
    ap.add_argument("--budget", type=float, default=18.0)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--mult", type=int, default=20, help="search budget in multiples of the dev size")
    ap.add_argument("--dev", type=int, default=100)
    ap.add_argument("--checkpoints", type=int, default=6)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    ap.add_argument("--md", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--quick", action="store_true", help="smoke run: one task, 2 seeds, short budget, no files")
    args = ap.parse_args(argv)
    if args.quick:
        args.tasks, args.seeds, args.mult, args.md, args.out = "math", 2, 10, None, None
    labels = args.methods.split(",")
    unknown = [m for m in labels if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    tasks = args.tasks.split(",")
    jobs = [Job(lb, t, args.budget, s, args.mult, args.dev, args.checkpoints)
            for t in tasks for lb in labels for s in range(args.seeds)]
    t0 = time.perf_counter()
    results = []
    with mp.get_context("fork").Pool(args.workers) as pool:
        for i, r in enumerate(pool.imap_unordered(run_job, jobs, chunksize=1)):
            results.append(r)
            if (i + 1) % 10 == 0 or i + 1 == len(jobs):
                print(f"  {i + 1}/{len(jobs)} runs, {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    search_wall = time.perf_counter() - t0
    truth = Truth()
    # HV at each checkpoint, indexed by evaluations (runs / dev)
    curves: dict[tuple[str, str], list[list[tuple[float, float]]]] = {}
    for r in results:
        c = [(spent / r["dev"], true_hv(truth, r["task"], front, r["budget"])) for spent, front in r["fronts"]]
        curves.setdefault((r["task"], r["label"]), []).append(c)
    # the best known front per task: every graph any run claimed
    ref_hv = {}
    for t in tasks:
        allp = [p for r in results if r["task"] == t for _, f in r["fronts"] for p in f]
        ref_hv[t] = true_hv(truth, t, allp, args.budget)
    body = report(curves, tasks, labels, args, ref_hv, search_wall, time.perf_counter() - t0)
    print(body)
    if args.out:
        plots(curves, tasks, labels, args, Path(args.out))
    if args.md:
        write_section(Path(args.md), body)
    return 0


def report(curves, tasks, labels, args, ref_hv, search_wall, total_wall) -> str:
    cmd = (f"python benchmarks/pareto_bench.py --tasks {','.join(tasks)} --methods {','.join(labels)} "
           f"--budget {args.budget:g} --seeds {args.seeds} --mult {args.mult} --dev {args.dev} "
           f"--checkpoints {args.checkpoints} --workers {args.workers}")
    lines = [
        "Hypervolume of each method's claimed accuracy-vs-units front (graphs on at least half the best coverage, "
        "as `graphtune pareto` lists them), scored with true accuracy on "
        f"{TRUE_TEST_SIZE} held-out simulated questions; box: units <= budget ({args.budget:g}), accuracy >= 0; "
        "cost as a fraction of the budget, accuracy in points (a perfect front scores 100). "
        f"Budget {args.mult} x dev ({args.dev} questions), {args.seeds} seeds, mean +- 95% CI. "
        "\"best known\" = the front of every graph any run claimed.",
        "",
        "```",
        cmd,
        "```",
        "",
    ]
    for t in tasks:
        first = next(iter(curves[(t, labels[0])]))
        xs = [x for x, _ in first]
        picks = sorted({0, len(xs) // 2 - 1 if len(xs) > 2 else 0, len(xs) - 1})
        head = "| method | " + " | ".join(f"HV @ {xs[i]:.0f} evals" for i in picks) + " |"
        lines += [f"**{t}** (best known front: HV {ref_hv[t]:.1f})", "", head,
                  "|---|" + "---|" * len(picks)]
        for lb in labels:
            runs = curves[(t, lb)]
            cells = []
            for i in picks:
                m, h = mean_ci([c[i][1] if i < len(c) else c[-1][1] for c in runs])
                cells.append(f"{m:.1f} +- {h:.1f}" if not math.isnan(h) else f"{m:.1f}")
            lines.append(f"| {lb} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Wall time: searches {search_wall:.0f} s, scoring and report {total_wall - search_wall:.0f} s "
                 f"(total {total_wall:.0f} s) with {args.workers} workers. Plots: "
                 + ", ".join(f"`docs/benchmarks/pareto_hv_{t}.png`" for t in tasks) + ".")
    return "\n".join(lines)


def plots(curves, tasks, labels, args, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    for t in tasks:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for lb in labels:
            runs = curves[(t, lb)]
            n = min(len(c) for c in runs)
            xs = [runs[0][i][0] for i in range(n)]
            ys = np.array([[c[i][1] for i in range(n)] for c in runs])
            m = ys.mean(axis=0)
            sd = ys.std(axis=0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else np.zeros_like(m)
            ax.plot(xs, m, marker="o", ms=3, label=lb)
            ax.fill_between(xs, m - sd, m + sd, alpha=0.15)
        ax.set_xlabel("search budget spent (evaluations = runs / dev size)")
        ax.set_ylabel("hypervolume (true accuracy x units)")
        ax.set_title(f"{t}: Pareto front hypervolume, budget {args.budget:g} units", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"pareto_hv_{t}.png", dpi=100)
        plt.close(fig)


def write_section(path: Path, body: str) -> None:
    """Replace (or append) the "Pareto fronts" section between its markers; nothing
    else in the file changes."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Pareto fronts\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
