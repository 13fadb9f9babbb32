"""The live environment against a fake OpenAI-compatible server in its own process.

The fake server answers ``The answer is <x>.`` where ``<x>`` is the last ``ANSWER=<x>`` in
the prompt, so accuracy is known; its model names select failures (see
tests/fake_openai_server.py). Nothing here needs a network or an API key.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("litellm")
pytest.importorskip("langgraph")

from typer.testing import CliRunner  # noqa: E402

from fake_openai_server import FakeOpenAIServer  # noqa: E402
from graphtune import llm  # noqa: E402
from graphtune.api import live_acomplete  # noqa: E402
from graphtune.envs.base import summarize  # noqa: E402
from graphtune.envs.datasets import Example  # noqa: E402
from graphtune.envs.live import (CallSettings, Endpoint, LiveEnvironment, compile_graph, critical_path_s,  # noqa: E402
                                 lg_name)
from graphtune.envs.prompts import build_prompts  # noqa: E402
from graphtune.envs.scorers import get_scorer  # noqa: E402
from graphtune.errors import LLMFatalError, SpecError  # noqa: E402
from graphtune.graphs import Graph, ModelInfo, Node  # noqa: E402
from graphtune.store.ledger import MemoryLedger, SQLLedger  # noqa: E402
from graphtune.store.storage import Storage  # noqa: E402

INFO = ModelInfo("m", 1e9, 16, 2048, usd_per_mtok_in=1.0, usd_per_mtok_out=3.0)


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def slow_server():
    with FakeOpenAIServer(latency_s=0.3) as srv:
        yield srv


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(llm, "BACKOFF_BASE_S", 0.01)


def examples(n: int = 6) -> list[Example]:
    return [Example(id=f"q{i}", question=f"What is {i} + 0? ANSWER={i}", answer=str(i)) for i in range(n)]


def make_env(srv, model: str = "echo", *, ledger=None, cache=True, concurrency=8, n=6, models=None, **kw):
    models = models or {"m": model}
    eps = {name: Endpoint(name, f"openai/{lit}", INFO, api_base=srv.api_base, max_concurrency=kw.pop("mc", None))
           for name, lit in models.items()}
    settings = CallSettings(max_retries=kw.pop("max_retries", 2), timeout_s=10)
    kw.setdefault("acomplete", live_acomplete(settings))  # the LLM client the app wires in
    return LiveEnvironment(examples(n), [], get_scorer("numeric"), build_prompts("math"), eps,
                           settings=settings, concurrency=concurrency,
                           ledger=ledger if ledger is not None else MemoryLedger(), cache=cache, **kw)


def g_single(model="m"):
    return Graph.build([Node.make("a", "assistant", model)])


def g_vote(k=3, model="m"):
    nodes = [Node.make(f"a{i}", "assistant", model) for i in range(k)] + [Node.make("f", "fuser", model)]
    return Graph.build(nodes, [(f"a{i}", "f") for i in range(k)])


def g_diamond():
    # a -> b -> d, a -> c -> d, a -> d: a join over predecessors of different levels
    n = [Node.make(x, "assistant", "m") for x in "abc"] + [Node.make("d", "fuser", "m")]
    return Graph.build(n, [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"), ("a", "d")])


# -- compile --------------------------------------------------------------------------------


def test_graph_compiles_to_a_langgraph_with_one_node_per_graph_node():
    g = g_diamond()
    app = compile_graph(g, build_prompts("math"))
    names = set(app.get_graph().nodes)
    assert {lg_name(n) for n in "abcd"} <= names
    assert {"__start__", "__end__"} <= names


def test_every_node_runs_once_and_a_join_waits_for_all_predecessors(server):
    env = make_env(server)
    try:
        before = server.requests()
        res = env.evaluate(g_diamond(), ["q0", "q1"])
        assert server.requests() - before == 8  # 4 nodes x 2 questions, the join once each
        r = res[0]
        assert [o.node_id for o in r.nodes] == ["a", "b", "c", "d"]
        # d's prompt holds three responses: it ran after b and c, not once per edge
        assert r.nodes[3].prompt_tokens > r.nodes[1].prompt_tokens
    finally:
        env.close()


# -- results and cost -------------------------------------------------------------------------


def test_results_in_order_with_measured_tokens_cost_and_latency(server):
    env = make_env(server)
    try:
        ids = ["q3", "q1", "q4"]
        res = env.evaluate(g_vote(2), ids)
        assert [r.question_id for r in res] == ids
        for r in res:
            assert r.ok and r.correct is True and r.score == 1.0
            assert r.prompt_tokens == sum(o.prompt_tokens for o in r.nodes) > 0
            assert r.completion_tokens == 7 * 3
            assert r.usd == pytest.approx((r.prompt_tokens * 1.0 + r.completion_tokens * 3.0) / 1e6)
            assert r.flops > 0
            lat = {o.node_id: o.latency_s for o in r.nodes}
            assert r.latency_s == pytest.approx(max(lat["a0"], lat["a1"]) + lat["f"])
            assert all(o.correct is True for o in r.nodes)
        m = summarize(res)
        assert m.accuracy == 1.0 and m.n_errors == 0
    finally:
        env.close()


def test_critical_path_takes_the_longest_chain():
    from graphtune.envs.live import NodeRun

    g = g_diamond()
    runs = {"a": NodeRun("a", "x", latency_s=1), "b": NodeRun("b", "x", latency_s=5),
            "c": NodeRun("c", "x", latency_s=2), "d": NodeRun("d", "x", latency_s=1)}
    assert critical_path_s(g, runs) == 7


def test_nodes_of_a_level_and_questions_run_concurrently(slow_server):
    env = make_env(slow_server, concurrency=64, n=8)
    try:
        env.evaluate(g_single(), ["q0"])  # warm up the client
        t0 = time.perf_counter()
        res = env.evaluate(g_vote(3), env.split("dev"))  # 2 levels x 0.3 s; 32 calls
        wall = time.perf_counter() - t0
        assert all(r.ok for r in res)
        # ideal 0.6 s; all calls one after another 9.6 s; questions one after another (levels
        # concurrent within a question) 8 x 0.6 = 4.8 s. The margin absorbs a loaded machine.
        assert wall < 4.0, wall
    finally:
        env.close()


def test_per_model_limit_caps_calls_in_flight(server):
    seen = {"now": 0, "max": 0}

    async def counting(model, messages, **kw):
        seen["now"] += 1
        seen["max"] = max(seen["max"], seen["now"])
        await asyncio.sleep(0.02)
        seen["now"] -= 1
        return llm.LLMReply("The answer is 1.", 5, 3, 0.02, model)

    env = make_env(server, concurrency=32, mc=2, acomplete=counting)
    try:
        env.evaluate(g_vote(3), env.split("dev"))
        assert seen["max"] == 2
    finally:
        env.close()


# -- samples, ledger, sharing ------------------------------------------------------------------


def test_width_k_makes_k_distinct_samples_and_sample_0_is_shared_across_graphs(server):
    env = make_env(server)
    try:
        before = server.requests()
        env.evaluate(g_single(), ["q0"])
        assert server.requests() - before == 1
        before = server.requests()
        r = env.evaluate(g_vote(3), ["q0"])[0]
        # three assistants with one prompt are samples 0, 1, 2: sample 0 comes from the
        # single-node graph's call, samples 1 and 2 and the fuser are new
        assert server.requests() - before == 3
        texts = {o.node_id: o.answer for o in r.nodes}
        assert len(texts) == 4
        keys = [rec.key for rec in env.ledger.records()]
        assert len(keys) == len(set(keys)) == 4
        assert sorted(rec.sample_index for rec in env.ledger.records())[:3] == [0, 0, 1]
    finally:
        env.close()


def test_identical_run_is_served_from_the_ledger_and_no_cache_calls_again(server):
    env = make_env(server)
    try:
        first = env.evaluate(g_vote(2), env.split("dev"))
        before = server.requests()
        again = env.evaluate(g_vote(2), env.split("dev"))
        assert server.requests() == before
        assert env.executor.stats.cached == 18
        assert [r.answer for r in again] == [r.answer for r in first]
        assert [r.prompt_tokens for r in again] == [r.prompt_tokens for r in first]
    finally:
        env.close()
    env = make_env(server, ledger=env.ledger, cache=False)
    try:
        before = server.requests()
        env.evaluate(g_vote(2), env.split("dev"))
        assert server.requests() - before == 18
        assert env.executor.stats.cached == 0
    finally:
        env.close()


def test_concurrent_identical_calls_are_made_once(server):
    env = make_env(server)
    try:
        before = server.requests()
        res = env.evaluate(g_single(), ["q2", "q2", "q2", "q2"])
        assert server.requests() - before == 1
        assert env.executor.stats.shared == 3
        assert len({r.answer for r in res}) == 1
    finally:
        env.close()


def test_sql_ledger_makes_a_resumed_run_free(server, tmp_path):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    env = make_env(server, ledger=SQLLedger(Storage(url)))
    env.evaluate(g_vote(2), env.split("dev"))
    env.close()
    env = make_env(server, ledger=SQLLedger(Storage(url)))  # a new process would do the same
    try:
        before = server.requests()
        res = env.evaluate(g_vote(2), env.split("dev"))
        assert server.requests() == before and all(r.ok for r in res)
    finally:
        env.close()


# -- failures ----------------------------------------------------------------------------------


def test_transient_errors_are_retried(server):
    env = make_env(server, model="flaky-1")
    try:
        res = env.evaluate(g_single(), ["q1", "q2"])
        assert all(r.ok and r.correct for r in res)
        assert env.executor.stats.failed == 0
    finally:
        env.close()


@pytest.mark.parametrize("model", ["down", "empty"])
def test_a_call_that_keeps_failing_is_an_infrastructure_failure_not_a_wrong_answer(server, model):
    env = make_env(server, models={"m": model, "ok": "echo"}, max_retries=1)
    g = Graph.build([Node.make("a", "assistant", "ok"), Node.make("b", "assistant", "m"),
                     Node.make("f", "fuser", "ok")], [("a", "f"), ("b", "f")])
    try:
        before = server.requests()
        res = env.evaluate(g, ["q0", "q1"])
        for r in res:
            assert r.error is not None and r.correct is None and not r.ok
            assert ("empty" in r.error) if model == "empty" else ("503" in r.error or "navailable" in r.error)
        # the fuser was skipped: per question a (1) + b (2 attempts)
        assert server.requests() - before == 2 * 3
        m = summarize(res)
        assert m.n_errors == 2 and m.n_scored == 0
        failed = [rec for rec in env.ledger.records() if not rec.ok]
        assert len(failed) == 2  # recorded with their reason, never served
        before = server.requests()
        env.evaluate(g, ["q0"])
        assert server.requests() - before == 2  # a retried, b's failure not reused; a from the ledger
    finally:
        env.close()


@pytest.mark.parametrize("model,needle", [("badauth", "API-key"), ("missing", "model string")])
def test_auth_and_bad_model_errors_stop_the_evaluation(server, model, needle):
    env = make_env(server, model=model, n=20)
    try:
        with pytest.raises(LLMFatalError) as e:
            env.evaluate(g_vote(2), env.split("dev"))
        assert needle in str(e.value) and "\n" not in str(e.value)
    finally:
        env.close()


# -- spec, API and CLI ---------------------------------------------------------------------------


def write_spec(tmp_path: Path, srv, *, model="echo", study="live", n=8, extra="") -> Path:
    data = tmp_path / "qs.jsonl"
    data.write_text("".join(json.dumps({"id": f"x{i}", "question": f"What is {i}+1? ANSWER={i + 1}",
                                        "answer": str(i + 1)}) + "\n" for i in range(n)))
    spec = tmp_path / "live.yaml"
    spec.write_text(f"""
study: {study}
task:
  dataset: qs.jsonl
  scorer: numeric
  dev_size: 4
  test_size: 4
models:
  - name: llama-3.2-1b
    litellm: openai/{model}
    api_base: {srv.api_base}
  - name: llama-3.2-3b
    litellm: openai/{model}-3b
    api_base: {srv.api_base}
space:
  max_nodes: 3
  max_depth: 2
budget:
  units: 10
search:
  method: random
  evaluations: 3
  batch_size: 2
env:
  kind: live
  concurrency: 8
  max_tokens: 32
storage: sqlite:///{tmp_path / 'g.db'}
{extra}""")
    return spec


def test_spec_builds_a_live_env_with_a_dataset_next_to_the_spec(server, tmp_path, monkeypatch):
    from graphtune.api import build_problem
    from graphtune.spec import load_spec

    monkeypatch.chdir("/")
    spec = load_spec(write_spec(tmp_path, server))
    p = build_problem(spec)
    try:
        assert p.env.kind == "live" and len(p.ctx.dev_ids) == 4 and len(p.test_ids) == 4
        assert p.env.shape.output_tokens == 32 and p.env.shape.input_tokens > 5  # estimated from the data
        assert not (tmp_path / "g.db").exists()  # building writes nothing
    finally:
        p.env.close()


def test_spec_rejects_bad_live_settings(tmp_path, server):
    from graphtune.spec import load_spec

    p = write_spec(tmp_path, server)
    text = p.read_text()
    bad = {
        "kind: live": "kind: replay",
        "  scorer: numeric\n": "",
        "    litellm: openai/echo\n": "    provider: local\n    litellm: openai/echo\n",
    }
    for old, new in bad.items():
        q = tmp_path / "bad.yaml"
        q.write_text(text.replace(old, new, 1))
        with pytest.raises(SpecError) as e:
            load_spec(q)
        assert "\n" not in str(e.value)


def test_cli_optimize_live_then_a_new_study_pays_nothing(server, tmp_path):
    from graphtune.cli import app

    runner = CliRunner()
    spec = write_spec(tmp_path, server)
    r = runner.invoke(app, ["optimize", str(spec), "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "best graph" in r.output and "test accuracy   1.000" in r.output
    before = server.requests()
    r = runner.invoke(app, ["optimize", str(spec), "--quiet", "--study", "again"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert server.requests() == before  # every call served from the ledger
    r = runner.invoke(app, ["optimize", str(spec), "--quiet", "--study", "fresh", "--no-cache"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert server.requests() > before
    rows = Storage(f"sqlite:///{tmp_path / 'g.db'}").engine.connect().exec_driver_sql(
        "select count(*), count(distinct key) from gt_llm_calls").one()
    assert rows[0] > rows[1] > 0  # --no-cache recorded its calls again


def test_cli_fatal_error_is_one_line(server, tmp_path):
    from graphtune.cli import app

    spec = write_spec(tmp_path, server, model="badauth")
    r = CliRunner().invoke(app, ["optimize", str(spec), "--quiet"])
    assert r.exit_code == 1
    assert r.output.strip().startswith("error: LLM call to") and len(r.output.strip().splitlines()) == 1


def test_cli_run_one_question_and_a_dataset(server, tmp_path):
    from graphtune.cli import app

    spec = write_spec(tmp_path, server)
    graph = tmp_path / "g.yaml"
    graph.write_text("nodes:\n  - {id: a, role: assistant, model: llama-3.2-1b}\n"
                     "  - {id: b, role: assistant, model: llama-3.2-3b}\n"
                     "  - {id: f, role: fuser, model: llama-3.2-3b}\nedges: [[a, f], [b, f]]\n")
    runner = CliRunner()
    r = runner.invoke(app, ["run", str(graph), "--spec", str(spec), "--question", "What? ANSWER=17", "--nodes"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "The answer is 17" in r.output and "latency" in r.output and "FLOPs" in r.output
    assert "3 made" in r.output
    r = runner.invoke(app, ["run", str(graph), "--spec", str(spec), "--question", "What? ANSWER=17"],
                      catch_exceptions=False)
    assert "0 made, 3 served from the ledger" in r.output
    r = runner.invoke(app, ["run", str(graph), "--spec", str(spec), "--dataset", str(tmp_path / "qs.jsonl"),
                            "--limit", "5"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "accuracy  1.000 on 5 scored of 5" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  - {id: a, role: assistant, model: gpt-9}\nedges: []\n")
    r = runner.invoke(app, ["run", str(bad), "--spec", str(spec), "--question", "x"])
    assert r.exit_code == 2 and "not in the spec's pool" in r.output
