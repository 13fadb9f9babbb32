"""The surrogate pick's hyperparameters: replay the pick on stored search histories.

Runs agent-reinforce (the default heuristic critic) on the search benchmark's simulator
cases (its ``spec_for``: four LLaMA models, dev 200 drawn per seed, 20 x dev evaluations)
and keeps every history; then picks the result of each history again with the paired pick
and with ``pick: surrogate`` for a grid of the surrogate's prior sd and misfit sd, and prints
the mean regret of each (against the search benchmark's best known graphs, true accuracy on
4000 held-out questions). The searches themselves use the shipped hyperparameters.

    python benchmarks/pick_grid.py --seeds 20
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_bench import Job, Truth, recorded_search  # noqa: E402

CASES = ["math 18", "math 42", "math 80", "mmlu 18", "mmlu 42", "mmlu 80", "humaneval 18", "humaneval 42",
         "humaneval 80"]
#: best known true accuracy per case (docs/benchmarks.md, the search benchmark's table)
BEST = {"math 18": 55.9, "math 42": 63.5, "math 80": 68.0, "mmlu 18": 64.1, "mmlu 42": 68.5, "mmlu 80": 84.1,
        "humaneval 18": 60.0, "humaneval 42": 67.4, "humaneval 80": 68.8}


def run(args):
    case, seed = args
    job = Job("agent-reinforce", case.split()[0], float(case.split()[1]), seed, 20, 200, False)
    ctx, searcher, *_, history = recorded_search(job)
    searcher.close()
    return case, seed, history, ctx


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    import graphtune.agent.surrogate as S
    from graphtune.agent.report import ProblemInfo
    from graphtune.search.racing import recommend_paired, recommend_shrunk

    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(args.workers) as pool:
        runs = pool.map(run, [(c, s) for c in CASES for s in range(args.seeds)], chunksize=1)
    searched = time.perf_counter() - t0
    truth = Truth()
    grid = [("paired", None)] + [(f"{psd:g} x {mis * 100:g} pts", (psd, mis))
                                 for psd in (0.02, 0.05, 0.1, 0.2) for mis in (0.01, 0.02, 0.03)]
    regret: dict[str, dict[str, list[float]]] = {name: {c: [] for c in CASES} for name, _ in grid}
    defaults = dict(S.BayesSurrogate.__init__.__kwdefaults__)
    try:
        for case, seed, history, ctx in runs:
            problem = ProblemInfo(task_description="", space=ctx.space, costs=ctx.costs, budget=ctx.budget)
            for name, hp in grid:
                if hp is None:
                    g = recommend_paired(history, ctx.objective, ctx.costs.unit_flops).graph
                else:
                    S.BayesSurrogate.__init__.__kwdefaults__.update(prior_sd=hp[0], misfit_sd=hp[1])
                    g = recommend_shrunk(history, ctx.objective, ctx.costs.unit_flops, problem).graph
                regret[name][case].append(BEST[case] - truth.acc(case.split()[0], g))
    finally:
        S.BayesSurrogate.__init__.__kwdefaults__.update(defaults)
    print(f"Command: `python benchmarks/pick_grid.py --seeds {args.seeds}` ({searched:.0f} s of searching, "
          f"{time.perf_counter() - t0:.0f} s in all, {args.workers} workers)")
    print()
    print("| pick (prior sd x misfit sd) | " + " | ".join(CASES) + " | mean |")
    print("|---|" + "---|" * (len(CASES) + 1))
    for name, _ in grid:
        cells = [float(np.mean(regret[name][c])) for c in CASES]
        print(f"| {name} | " + " | ".join(f"{x:.2f}" for x in cells) + f" | {np.mean(cells):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
