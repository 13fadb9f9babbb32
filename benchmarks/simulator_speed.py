"""Node evaluations per second of the simulated environment (requirement R8: >= 20,000 on
one core).

Runs random graphs of the paper's space (up to 9 nodes) on 200 questions through the full
``evaluate`` path (result objects, tokens, FLOPs, dollars, latency), as a search does:
every graph is new to the environment, so nothing is served from a cache but the
questions. Prints the figure and exits non-zero when it is under the floor.

    python benchmarks/simulator_speed.py [--profile math] [--graphs 300] [--questions 200]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from graphtune.envs.simulated.calibrate import make_env
from graphtune.graphs.cost import Budget
from graphtune.graphs.space import Space, random_graph

FLOOR = 20_000


def measure(profile: str = "math", n_graphs: int = 300, n_questions: int = 200, *, raw: bool = False,
            seed: int = 0) -> float:
    """Node evaluations per second over ``n_graphs`` random graphs (graph generation and
    canonicalisation not timed; canonicalisation is timed as part of evaluate)."""
    env = make_env(profile, seed=seed)
    space = Space(models=tuple(m for m in env.profile.model_names if "70b" not in m), max_nodes=9,
                  max_width=9, max_depth=4, max_in_degree=4)
    rng = np.random.default_rng(seed)
    graphs = [random_graph(space, env.costs, Budget(units=80), rng) for _ in range(n_graphs)]
    ids = env.split("test")[:n_questions]
    env.evaluate(graphs[0], ids)  # warm the per-question caches
    t0 = time.perf_counter()
    nodes = 0
    for g in graphs:
        if raw:
            env.simulate(g, ids)
        else:
            env.evaluate(g, ids)
        nodes += g.size * len(ids)
    return nodes / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="math")
    ap.add_argument("--graphs", type=int, default=300)
    ap.add_argument("--questions", type=int, default=200)
    args = ap.parse_args(argv)
    full = measure(args.profile, args.graphs, args.questions)
    raw = measure(args.profile, args.graphs, args.questions, raw=True)
    print(f"simulator: {full:,.0f} node evaluations/s through evaluate() "
          f"({raw:,.0f}/s raw simulate()); requirement R8: >= {FLOOR:,}/s")
    return 0 if full >= FLOOR else 1


if __name__ == "__main__":
    sys.exit(main())
