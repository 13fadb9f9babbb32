"""Agent benchmark: what an LLM agent adds to agent-reinforce, measured in one command.

Runs, on the simulator cases of the search benchmark (same protocol, same seeds, same dev
draws: ``benchmarks/search_bench.py``), three arms:

* ``agent-reinforce`` with the agent you name (any litellm model string, or ``local`` for
  SmolLM2 on a llama.cpp server started here, offline);
* ``agent-reinforce`` with the default agent (the offline statistical critic);
* ``reinforce`` (no agent at all: what the numeric policy gradient alone does);

and reports per case the true accuracy and regret of the returned graph (as the search
benchmark computes them), and for the LLM agent what can be measured honestly whatever
its quality: how many of its replies were valid (parsed and applied) and how many fell
back to the numeric update, its calls, tokens, dollars and seconds per step.

    python benchmarks/agent_bench.py --agent openai/gpt-4o-mini --api-key-env OPENAI_API_KEY
    python benchmarks/agent_bench.py --agent local --tasks math --budgets 18 --seeds 2   # offline

An LLM agent's calls go to its endpoint one run at a time (``--workers`` for the two
offline arms only), so a remote model's rate limits and a local server's slots are
respected. ``--md`` replaces the agent section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_bench as sb  # noqa: E402  (the search benchmark's protocol, shared)

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- agent-bench:begin -->", "<!-- agent-bench:end -->"


def agent_settings(args, api_base: str | None) -> dict:
    out = {"model": args.agent_model, "temperature": args.temperature, "max_retries": args.max_retries,
           "max_tokens": args.max_tokens, "timeout_s": args.timeout_s,
           "usd_per_mtok_in": args.usd_in, "usd_per_mtok_out": args.usd_out}
    if api_base:
        out["api_base"] = api_base
    if args.api_key_env:
        out["api_key_env"] = args.api_key_env
    return out


def step_stats(steps: list[dict]) -> dict:
    """Valid replies, fallbacks and per-step cost of one run's LLM agent steps."""
    llm = [s for s in steps if s.get("is_llm")]
    n = len(llm)
    valid = sum(1 for s in llm if s["parsed"] and not s["rejected_reason"])
    tok = sum((s["prompt_tokens"] or 0) + (s["completion_tokens"] or 0) for s in llm)
    return {"steps": n, "valid": valid, "fallbacks": n - valid, "calls": sum(s["calls"] or 0 for s in llm),
            "prompt_tokens": sum(s["prompt_tokens"] or 0 for s in llm),
            "completion_tokens": sum(s["completion_tokens"] or 0 for s in llm),
            "tokens": tok, "usd": sum(s["usd"] or 0.0 for s in llm), "seconds": sum(s["seconds"] or 0.0 for s in llm)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agent", required=True, help="a litellm model string, or `local` (SmolLM2, offline)")
    ap.add_argument("--api-base", default=None)
    ap.add_argument("--api-key-env", default=None, help="the environment variable holding the agent's API key")
    ap.add_argument("--tasks", default="math,mmlu,humaneval")
    ap.add_argument("--budgets", default="18,42,80")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--mult", type=int, default=20, help="search budget in multiples of the dev size")
    ap.add_argument("--dev", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2, help="processes for the two offline arms")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-retries", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--timeout-s", type=float, default=120.0)
    ap.add_argument("--usd-in", type=float, default=0.0, help="agent prompt price per million tokens")
    ap.add_argument("--usd-out", type=float, default=0.0)
    ap.add_argument("--md", default=None, help="write the report into this markdown file's agent section")
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    import graphtune.api  # noqa: F401  (warm the imports: forked workers inherit them)
    import graphtune.envs.simulated  # noqa: F401

    t0 = time.perf_counter()
    offline = [sb.Job(m, t, b, s, args.mult, args.dev, False, label=lab)
               for t in tasks for b in budgets for s in range(args.seeds)
               for m, lab in (("agent-reinforce", "agent-reinforce (default agent)"), ("reinforce", "reinforce"))]
    results = []
    # the pool forks before a local server starts threads in this process
    with mp.get_context("fork").Pool(args.workers) as pool:
        pending = pool.map_async(sb.run_job, offline, chunksize=1)
        server = None
        try:
            if args.agent == "local":
                from graphtune.local_server import LocalLLMServer

                server = LocalLLMServer(n_parallel=1, ctx_per_slot=8192)
                server.__enter__()
                args.agent_model, api_base = server.model, server.api_base
            else:
                args.agent_model, api_base = args.agent, args.api_base
            agent = agent_settings(args, api_base)
            llm = [sb.Job("agent-reinforce", t, b, s, args.mult, args.dev, False, agent=agent,
                          label=f"agent-reinforce ({args.agent})")
                   for t in tasks for b in budgets for s in range(args.seeds)]
            for i, job in enumerate(llm):  # one at a time against the agent's endpoint
                results.append(sb.run_job(job))
                print(f"  llm agent run {i + 1}/{len(llm)}, {time.perf_counter() - t0:.0f}s", file=sys.stderr,
                      flush=True)
        finally:
            if server is not None:
                server.__exit__(None, None, None)
        results += pending.get()
    report = analyse(results, tasks, budgets, args, time.perf_counter() - t0, argv)
    print(report)
    if args.md:
        write_section(Path(args.md), report)
    return 0


def analyse(results, tasks, budgets, args, wall_s: float, argv) -> str:
    from graphtune.graphs.io import from_dict

    truth = sb.Truth()
    best: dict[tuple[str, float], float] = {}
    from graphtune.envs.simulated.calibrate import candidate_graphs, cost_model_for
    from graphtune.envs.simulated.profile import load_profile

    for t in tasks:
        prof = load_profile(t)
        costs = cost_model_for(prof)
        for b in budgets:
            fam = [g for g in candidate_graphs(prof.model_names, costs, b)
                   if g.size <= 9 and g.max_in_degree <= 4 and g.depth <= 4]
            best[(t, b)] = max((truth.acc(t, g) for g in fam), default=float("-inf"))
    for r in results:
        for gd in [r["graph"], *r["top"]]:
            if gd:
                key = (r["task"], r["budget"])
                best[key] = max(best[key], truth.acc(r["task"], from_dict(gd)))
    for r in results:
        r["true"] = truth.acc(r["task"], from_dict(r["graph"])) if r["graph"] else float("nan")
        r["regret"] = best[(r["task"], r["budget"])] - r["true"]
    labels = list(dict.fromkeys(r["label"] for r in results))
    by = defaultdict(list)
    for r in results:
        by[(r["label"], r["task"], r["budget"])].append(r)
    cmd = "python benchmarks/agent_bench.py " + " ".join(a for a in (argv or sys.argv[1:]) if a != "--md"
                                                         and not a.endswith(".md"))
    lines = [f"Command: `{cmd}` ({wall_s:.0f} s in all). Same protocol and seeds as the search benchmark: dev "
             f"{args.dev} questions per seed, search budget {args.mult} x dev, true accuracy on "
             f"{sb.TRUE_TEST_SIZE} held-out simulated questions, regret in points against the best known graph "
             f"of the case; means over {args.seeds} seeds.", "",
             "| case | " + " | ".join(f"{lab}: regret" for lab in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for t in tasks:
        for b in budgets:
            cells = []
            for lab in labels:
                rs = by[(lab, t, b)]
                m, h = sb.mean_ci([r["regret"] for r in rs])
                cells.append(f"{m:.2f}" + (f" ± {h:.2f}" if not math.isnan(h) else ""))
            lines.append(f"| {t} {b:g} | " + " | ".join(cells) + " |")
    means = {lab: float(np.nanmean([r["regret"] for r in results if r["label"] == lab])) for lab in labels}
    lines.append("| **mean** | " + " | ".join(f"**{means[lab]:.2f}**" for lab in labels) + " |")
    llm_runs = [r for r in results if r["label"].startswith("agent-reinforce (") and "default" not in r["label"]]
    st = [step_stats(r["steps"]) for r in llm_runs]
    n = sum(s["steps"] for s in st)
    if n:
        valid = sum(s["valid"] for s in st)
        lines += ["", f"The LLM agent ({args.agent}) over {len(llm_runs)} runs: {n} steps, {valid} valid replies "
                      f"({100 * valid / n:.0f}%), {n - valid} fell back to the numeric update; "
                      f"{sum(s['calls'] for s in st)} calls; per step {sum(s['seconds'] for s in st) / n:.1f} s, "
                      f"{sum(s['prompt_tokens'] for s in st) / n:.0f} prompt and "
                      f"{sum(s['completion_tokens'] for s in st) / n:.0f} completion tokens, "
                      f"${sum(s['usd'] for s in st) / n:.5f}."]
        reasons = defaultdict(int)
        for r in llm_runs:
            for s in r["steps"]:
                if s.get("is_llm") and s["rejected_reason"]:
                    reasons[str(s["rejected_reason"]).split(":")[0][:80]] += 1
        if reasons:
            lines.append("Why replies fell back: " + "; ".join(f"{k} ({v})" for k, v in
                                                               sorted(reasons.items(), key=lambda kv: -kv[1])[:5]) + ".")
    else:
        lines += ["", f"The LLM agent ({args.agent}) made no steps."]
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    sb.write_section(path, body, begin=BEGIN, end=END, heading="What an LLM agent adds (agent benchmark)")

if __name__ == "__main__":
    sys.exit(main())
