"""reinforce vs agent-reinforce vs random on the simulated pipeline profiles (small budget).

For each method and seed: a study on a memory store (``run_search``), the recommended
pipeline's *true* accuracy on the profile's test questions, and for the policy searchers
the budget split they learned (expected share of the pipeline budget per stage).

    python benchmarks/pipeline_policy.py                          # every profile, seeds 0-4, 12 evaluations
    python benchmarks/pipeline_policy.py --profile rag-wide --evaluations 40 --seeds 0,1,2

Profiles: ``rag`` (the spec of tests/test_pipeline_study.py: retrieve with up to 3 nodes,
answer with the 3B/8B and up to 5 nodes, capped at 300 of the 600 units), ``rag-wide`` (the
answering stage may sample up to 8 times), ``tool-use`` (decompose, select, fill; 600 units).
Results go to docs/pipelines.md ("Searching pipelines").
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from graphtune.api import build_problem, make_searcher
from graphtune.search.loop import run_search
from graphtune.spec import load_spec
from graphtune.store import MemoryStorage

POOL = "models: [{name: llama-3.2-1b}, {name: llama-3.2-3b}, {name: llama-3.1-8b}, {name: llama-3.1-70b}]\n"
RAG = """
study: rag
task: {profile: pipeline-rag, dev_size: 40, test_size: 200}
""" + POOL + """
pipeline:
  stages:
    - {name: retrieve, space: {max_nodes: 3}}
    - {name: answer, space: {models: [llama-3.2-3b, llama-3.1-8b], max_nodes: 5}, budget: {units: 300}}
budget: {units: 600}
search: {method: METHOD, evaluations: EVALS, batch_size: 6, seed: SEED}
"""
SPECS = {
    "rag": RAG,
    "rag-wide": RAG.replace("max_nodes: 5}", "max_nodes: 9, max_width: 8, max_in_degree: 8}"),
    "tool-use": """
study: tool
task: {profile: pipeline-tool-use, dev_size: 40, test_size: 200}
""" + POOL + """
pipeline:
  stages:
    - {name: decompose, space: {max_nodes: 3}}
    - {name: select, space: {max_nodes: 3}}
    - {name: fill, space: {max_nodes: 4}}
budget: {units: 600}
search: {method: METHOD, evaluations: EVALS, batch_size: 6, seed: SEED}
""",
}


def one(profile: str, method: str, seed: int, evaluations: int) -> tuple[float, dict | None, str]:
    text = SPECS[profile].replace("METHOD", method).replace("SEED", str(seed)).replace("EVALS", str(evaluations))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "spec.yaml")
        with open(path, "w") as f:
            f.write(text)
        spec = load_spec(path)
    pr = build_problem(spec)
    store = MemoryStorage()
    st = store.create_study("s", method, {})
    searcher = make_searcher(spec, pr.ctx)
    out = run_search(searcher, pr.env, store, st, pr.ctx, budget_runs=pr.ctx.budget_runs, test_ids=pr.test_ids)
    p = out.best.graph
    acc = pr.env.accuracy(p, list(pr.env.split("test")))
    split = getattr(getattr(searcher, "policy", None), "split", None)
    shares = {k: round(v, 2) for k, v in split.expected_shares().items()} if split is not None else None
    return acc, shares, " | ".join(f"{s.name}: {s.graph}" for s in p.stages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="all", choices=["all", *SPECS])
    ap.add_argument("--methods", default="random,reinforce,agent-reinforce")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--evaluations", type=int, default=12)
    ap.add_argument("-v", "--verbose", action="store_true", help="print each run's pipeline")
    a = ap.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")]
    profiles = list(SPECS) if a.profile == "all" else [a.profile]
    print(f"{'profile':<10} {'method':<16} {'true acc (mean)':>15}  per seed; learned split (mean share)")
    for prof in profiles:
        for m in a.methods.split(","):
            t0 = time.perf_counter()
            accs, shares = [], []
            for sd in seeds:
                acc, sh, text = one(prof, m, sd, a.evaluations)
                accs.append(acc)
                if sh:
                    shares.append(sh)
                if a.verbose:
                    print(f"   {prof} {m} seed {sd}: {acc:.3f} {text} {json.dumps(sh) if sh else ''}")
            split = ""
            if shares:
                split = json.dumps({k: round(float(np.mean([s[k] for s in shares])), 2) for k in shares[0]})
            print(f"{prof:<10} {m:<16} {np.mean(accs):>15.3f}  {' '.join(f'{x:.3f}' for x in accs)}; {split}"
                  f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
