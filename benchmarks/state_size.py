"""How large is the searcher state a study saves after every batch?

Runs ``reinforce`` and ``agent-reinforce`` (heuristic agent, offline) through
``graphtune.api.optimize`` on the embedded simulator (examples/quickstart.yaml's problem:
math, 100 dev questions, four LLaMA models, 18 units) for a few budgets and prints, per
run, the JSON size of the stored ``searcher_state`` (what ``save_progress`` rewrites after
every batch), next to the number of dev trials the store holds.

    python benchmarks/state_size.py                    # 40 and 400 evaluations
    python benchmarks/state_size.py --evaluations 40   # one budget
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def spec_for(method: str, evaluations: int, db: str) -> dict:
    """examples/quickstart.yaml's problem with ``method`` and ``evaluations`` x dev size runs."""
    return {
        "study": f"size-{method}-{evaluations}",
        "task": {"profile": "math", "dev_size": 100, "test_size": 1},
        "models": [{"name": m} for m in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b")],
        "space": {"roles": ["assistant", "fuser"], "max_nodes": 9, "max_width": 9, "max_depth": 4,
                  "max_in_degree": 4},
        "budget": {"units": 18},
        "objective": {"metric": "accuracy"},
        "search": {"method": method, "evaluations": evaluations, "batch_size": 8, "seed": 0},
        "env": {"kind": "simulated"},
        "storage": f"sqlite:///{db}",
    }


def measure(method: str, evaluations: int, tmp: str) -> dict:
    from graphtune.api import optimize
    from graphtune.spec import parse_spec
    from graphtune.store.storage import Storage

    db = os.path.join(tmp, f"{method}-{evaluations}.db")
    spec = parse_spec(spec_for(method, evaluations, db))
    t0 = time.perf_counter()
    optimize(spec)
    store = Storage(spec.storage)
    st = store.get_study(spec.study)
    state = st.searcher_state or {}
    trials = [t for t in store.list_trials(st.id, split="dev") if t.status == "complete"]
    out = {"method": method, "evaluations": evaluations, "dev_trials": len(trials),
           "graphs": len({t.graph_hash for t in trials}), "state_bytes": len(json.dumps(state)),
           "parts": {k: len(json.dumps(v)) for k, v in state.items()}, "seconds": time.perf_counter() - t0}
    store.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["reinforce", "agent-reinforce"])
    ap.add_argument("--evaluations", nargs="+", type=int, default=[40, 400])
    ap.add_argument("--parts", action="store_true", help="also print the bytes of each top-level key")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for n in args.evaluations:
                rows.append(measure(method, n, tmp))
    print(f"{'method':<16} {'evaluations':>11} {'dev trials':>10} {'graphs':>6} {'state bytes':>11}")
    for r in rows:
        print(f"{r['method']:<16} {r['evaluations']:>11} {r['dev_trials']:>10} {r['graphs']:>6} "
              f"{r['state_bytes']:>11,}")
        if args.parts:
            print("    " + ", ".join(f"{k}: {v:,}" for k, v in sorted(r["parts"].items(), key=lambda kv: -kv[1])))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
