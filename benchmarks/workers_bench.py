"""Speed-up of `graphtune worker` processes over one process, against a fake
OpenAI-compatible endpoint of fixed latency (evaluation dominates).

For each method and worker count it runs the same live spec (tests/workers_check.py:
easy-arith, dev 8, two "models" on the fake endpoint, global concurrency 128 split between
the workers) once as a single `graphtune optimize` process and once with N `graphtune
worker` processes on one shared store, checks that both runs hold the same trials, and
prints wall times and the speed-up.

    python benchmarks/workers_bench.py [--workers 1,2,4] [--methods random,agent-reinforce]
        [--latency-s 0.5] [--evaluations 64] [--batch-size 16] [--storage URL] [--json FILE]

Storage: a new database on $GRAPHTUNE_TEST_POSTGRES_URL's server when set (start one with
`eval "$(bash scripts/postgres.sh start)"`), else a SQLite file.
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
sys.path.insert(0, str(ROOT / "tests"))

from workers_check import fresh_postgres_db, preload, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--methods", default="random,agent-reinforce")
    ap.add_argument("--latency-s", type=float, default=0.5)
    ap.add_argument("--evaluations", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--storage")
    ap.add_argument("--cache", choices=["on", "off"], default="off",
                    help="the call ledger (off: every call is paid in both runs, so evaluation time is the same "
                         "work; on: workers running trials at the same time cannot share each other's calls)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from fake_openai_server import FakeOpenAIServer

    rows = []
    server = FakeOpenAIServer(latency_s=a.latency_s).start()
    try:
        preload(server.api_base)
        for method in a.methods.split(","):
            for n in [int(x) for x in a.workers.split(",")]:
                drop = None
                with tempfile.TemporaryDirectory(prefix="gt-wbench-") as tmp:
                    storage = a.storage
                    if storage is None and os.environ.get("GRAPHTUNE_TEST_POSTGRES_URL"):
                        storage, drop = fresh_postgres_db(os.environ["GRAPHTUNE_TEST_POSTGRES_URL"])
                    storage = storage or f"sqlite:///{Path(tmp) / 'shared.db'}"
                    try:
                        t0 = time.perf_counter()
                        res = run(storage=storage, workers=n, env="live", method=method, evaluations=a.evaluations,
                                  batch_size=a.batch_size, seed=0, work=Path(tmp), api_base=server.api_base,
                                  concurrency=128, reference="optimize", timeout_s=1200, server=server,
                                  cache=a.cache == "on")
                        res["bench_wall_s"] = round(time.perf_counter() - t0, 1)
                    finally:
                        if drop is not None:
                            drop()
                res.pop("worker_rows", None)
                rows.append(res)
                print(f"{method:16s} workers {n}: one process {res['reference_wall_s']:7.2f} s, {n} workers "
                      f"{res['workers_wall_s']:7.2f} s, speed-up {res['speedup']:.2f}x, {res['trials']} trials, "
                      f"same trials: {not res['errors']}, storage {res['storage']}, endpoint requests "
                      f"{res['endpoint_requests']['reference']} vs {res['endpoint_requests']['workers']}", flush=True)
    finally:
        server.stop()
    print("\n| method | cache | workers | trials | one process (s) | workers (s) | speed-up | requests (1 process / workers) | same trials |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        req = r["endpoint_requests"]
        print(f"| {r['method']} | {'on' if r['cache'] else 'off'} | {r['workers']} | {r['trials']} | "
              f"{r['reference_wall_s']:.1f} | {r['workers_wall_s']:.1f} | {r['speedup']:.2f}x | "
              f"{req['reference']} / {req['workers']} | {'yes' if not r['errors'] else 'NO'} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": rows}, indent=1, default=str))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
