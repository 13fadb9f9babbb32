"""Small-space benchmark: a space with fewer graphs than the budget can measure.

The space: the math profile's two small models (llama-3.2-1b, llama-3.2-3b), up to two
assistants, 6 budget units per query: 5 graphs. Each of them is measured on the whole dev
set directly (the simulator is deterministic), so the pick of a search can be compared with
the dev-best graph of the space. Per method and budget (``evaluations`` x dev size), over
seeds (each a new dev draw): the runs spent, why the search stopped, how many picks rest on
the full dev set, how many are the dev-best of the five, and the mean dev-accuracy shortfall
of the pick (points).

    python benchmarks/small_space_bench.py                 # 8 seeds, 5 and 20 x dev
    python benchmarks/small_space_bench.py --seeds 3 --evaluations 20
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter


def run_case(method: str, evaluations: int, seed: int, dev: int) -> dict:
    from graphtune.api import build_problem, make_searcher
    from graphtune.graphs.canonical import graph_hash
    from graphtune.graphs.space import enumerate_graphs
    from graphtune.search.loop import run_search
    from graphtune.spec import parse_spec
    from graphtune.store import MemoryStorage

    spec = parse_spec({
        "study": "small", "task": {"profile": "math", "dev_size": dev, "test_size": 1},
        "models": [{"name": m} for m in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b")],
        "space": {"roles": ["assistant"], "max_nodes": 2, "max_width": 2, "max_depth": 2, "max_in_degree": 1},
        "budget": {"units": 6},
        "search": {"method": method, "evaluations": evaluations, "batch_size": 8, "seed": seed},
        "env": {"kind": "simulated", "seed": 1000 + seed}, "storage": "sqlite:///:memory:"})
    p = build_problem(spec)
    graphs = list(enumerate_graphs(p.ctx.space, p.ctx.costs, p.ctx.budget))
    full = {graph_hash(g): sum(r.score for r in p.env.evaluate(g, p.ctx.dev_ids)) / dev for g in graphs}
    store = MemoryStorage()
    st = store.create_study("s", method, {})
    out = run_search(make_searcher(spec, p.ctx), p.env, store, st, p.ctx, budget_runs=p.ctx.budget_runs)
    return {"graphs": len(graphs), "runs": out.runs_spent, "budget": p.ctx.budget_runs, "stopped": out.stopped,
            "full_dev": out.best.n == dev, "shortfall": 100 * (max(full.values()) - full[out.best.graph_hash])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="reinforce,agent-reinforce")
    ap.add_argument("--evaluations", default="5,20", help="search budgets in multiples of the dev size")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--dev", type=int, default=100)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    print("| method | budget | runs spent (mean) | stopped | pick on full dev | dev-best picked | "
          "dev shortfall of the pick (pts) |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for ev in (int(e) for e in args.evaluations.split(",")):
            rows = [run_case(method, ev, s, args.dev) for s in range(args.seeds)]
            n = len(rows)
            stopped = ", ".join(f"{k} {v}" for k, v in sorted(Counter(r["stopped"] for r in rows).items()))
            print(f"| {method} | {ev} x dev ({rows[0]['budget']} runs, {rows[0]['graphs']} graphs) | "
                  f"{sum(r['runs'] for r in rows) / n:.0f} | {stopped} | {sum(r['full_dev'] for r in rows)}/{n} | "
                  f"{sum(r['shortfall'] == 0 for r in rows)}/{n} | {sum(r['shortfall'] for r in rows) / n:.1f} |")
    print(f"\n{args.seeds} seeds, dev {args.dev}; {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
