"""The paper's ablations of agent-reinforce, as options, on the calibrated simulator.

Runs agent-reinforce (heuristic agent) in full and with each ablation switched off
(``memory_tokens: 0``: no memory; ``insight_init: false``: no insight-based
initialisation; ``roles: assistant-only``; ``pick: paired``: the result picked without the
critic's surrogate), plus ``reinforce`` (no agent at all) with its own pick and with the
surrogate pick, on the
search benchmark's cases (``benchmarks/search_bench.py``'s spec: four LLaMA models, the
simulated math/mmlu/humaneval profiles, a per-seed dev draw) and prints, per case and
variant, the true accuracy (on the benchmark's 4000 held-out questions) of the returned
graph, mean +- 95% CI over seeds, and the mean paired difference to the full method
(seeds share the dev draw).

    python benchmarks/agent_ablations.py --tasks math,mmlu --budgets 18,42 --seeds 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

#: variant name -> (method, search.options)
VARIANTS = {
    "full": ("agent-reinforce", {}),
    "no memory": ("agent-reinforce", {"memory_tokens": 0}),
    "no insight init": ("agent-reinforce", {"insight_init": False}),
    "assistant-only": ("agent-reinforce", {"roles": "assistant-only"}),
    "paired pick": ("agent-reinforce", {"pick": "paired"}),
    "reinforce (no agent)": ("reinforce", {}),
    "reinforce + surrogate pick": ("reinforce", {"pick": "surrogate"}),
}


def run(job: tuple[str, str, float, int, int, int]) -> dict:
    from graphtune.api import build_problem, make_searcher
    from graphtune.search.loop import run_search
    from graphtune.spec import parse_spec
    from graphtune.store.memory import MemoryStorage
    from search_bench import spec_for

    variant, task, budget, seed, mult, dev = job
    method, options = VARIANTS[variant]
    data = spec_for(task, budget, method, seed, mult, dev)
    data["search"]["options"] = dict(options)
    spec = parse_spec(data)
    t0 = time.perf_counter()
    problem = build_problem(spec)
    searcher = make_searcher(spec, problem.ctx)
    store = MemoryStorage()
    study = store.create_study(spec.study, method, {})
    out = run_search(searcher, problem.env, store, study, problem.ctx, budget_runs=problem.ctx.budget_runs,
                     test_ids=None)
    searcher.close()
    return {"variant": variant, "task": task, "budget": budget, "seed": seed, "graph": out.best.graph,
            "wall_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    import numpy as np
    from search_bench import Truth, mean_ci

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="math,mmlu,humaneval")
    ap.add_argument("--budgets", default="18,42")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--mult", type=int, default=20)
    ap.add_argument("--dev", type=int, default=200)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args(argv)
    variants = a.variants.split(",")
    cases = [(t, float(b)) for t in a.tasks.split(",") for b in a.budgets.split(",")]
    jobs = [(v, t, b, s, a.mult, a.dev) for t, b in cases for s in range(a.seeds) for v in variants]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(a.workers) as ex:
        results = list(ex.map(run, jobs))
    truth = Truth()
    acc = {(r["variant"], r["task"], r["budget"], r["seed"]): truth.acc(r["task"], r["graph"]) for r in results}
    print(f"agent-reinforce ablations: {a.mult} x dev {a.dev}, {a.seeds} seeds, heuristic agent; "
          f"{time.perf_counter() - t0:.0f} s on {a.workers} workers")
    print()
    print("| case | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    for t, b in cases:
        cells = []
        for v in variants:
            xs = [acc[(v, t, b, s)] for s in range(a.seeds)]
            m, h = mean_ci(xs)
            cell = f"{m:.1f} +- {h:.1f}"
            if "full" in variants and v != "full":
                d = float(np.mean([acc[(v, t, b, s)] - acc[("full", t, b, s)] for s in range(a.seeds)]))
                cell += f" ({d:+.2f})"
            cells.append(cell)
        print(f"| {t} {b:g} | " + " | ".join(cells) + " |")
    means = {v: float(np.mean([acc[(v, t, b, s)] for t, b in cases for s in range(a.seeds)])) for v in variants}
    print()
    print("Mean over the cases: " + ", ".join(f"{v} {m:.2f}" for v, m in means.items()) + ".")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
