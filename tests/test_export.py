"""`graphtune export`: graph files that `graphtune run` executes, mermaid, PNG, and a
standalone LangGraph module that sends the same messages as graphtune and runs with only
langgraph and litellm importable (checked in a `python -S` subprocess, against the fake
OpenAI-compatible server of tests/fake_openai_server.py)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from graphtune.cli import app
from graphtune.export import ExportError, export_graph, to_langgraph_module
from graphtune.graphs import Graph, Node
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.io import load

QS_MODELS = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b")


def make_study(tmp_path: Path, name: str = "s", method: str = "random", evaluations: int = 6,
               options: dict | None = None) -> str:
    from graphtune.api import optimize
    from graphtune.spec import parse_spec

    db = f"sqlite:///{tmp_path / 'gt.db'}"
    spec = parse_spec({
        "study": name, "task": {"profile": "math", "dev_size": 30, "test_size": 30},
        "models": [{"name": m} for m in QS_MODELS],
        "space": {"roles": ["assistant", "fuser"], "max_nodes": 5, "max_width": 4, "max_depth": 3,
                  "max_in_degree": 3},
        "budget": {"units": 18},
        "search": {"method": method, "evaluations": evaluations, "batch_size": 4, "seed": 0,
                   "options": options or {}},
        "env": {"kind": "simulated"}, "storage": db})
    optimize(spec)
    return db


def vote_graph(model_a="llama-3.2-1b", model_f="llama-3.2-3b") -> Graph:
    return Graph.build([Node.make("a", "assistant", model_a), Node.make("b", "assistant", model_a),
                        Node.make("c", "assistant", model_f), Node.make("f", "fuser", model_f)],
                       [("a", "f"), ("b", "f"), ("c", "f"), ("a", "c")])


def test_graph_files_round_trip(tmp_path):
    g = vote_graph()
    for fmt in ("yaml", "json"):
        p = export_graph(g, fmt, tmp_path / f"g.{fmt}", name="demo", metrics={"accuracy": 0.5, "x": None})
        back = load(p)
        assert graph_hash(back) == graph_hash(g) and back == g
        text = p.read_text()
        assert "demo" in text and "accuracy" in text
    m = export_graph(g, "mermaid", tmp_path / "g.mmd").read_text()
    assert m.startswith("flowchart LR") and "fuser" in m and "llama-3.2-3b" in m and "a --> f" in m
    png = export_graph(g, "png", tmp_path / "g.png", name="demo").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    with pytest.raises(ExportError, match="known formats"):
        export_graph(g, "svgz", tmp_path / "x")
    with pytest.raises(ExportError, match="does not exist"):
        export_graph(g, "yaml", tmp_path / "nope" / "g.yaml")


def test_langgraph_module_has_no_keys_and_reads_the_environment(tmp_path, monkeypatch):
    spec = {"task": {"scorer": "numeric"}, "env": {"temperature": 0.0, "max_tokens": 64, "seed": 3},
            "models": [{"name": "llama-3.2-1b", "litellm": "openai/x", "api_base": "http://h:1/v1",
                        "api_key_env": "MY_KEY"}, {"name": "llama-3.2-3b", "provider": "local"}]}
    monkeypatch.setenv("MY_KEY", "sk-secret-value")
    src = to_langgraph_module(vote_graph(), spec, modname="mod")
    assert "sk-secret-value" not in src and "MY_KEY" in src
    assert "graphtune." not in src.replace("graphtune.yaml", "")  # no import of graphtune
    path = tmp_path / "mod.py"
    path.write_text(src)
    mod = _load(path)
    assert mod.endpoint("llama-3.2-1b") == {"model": "openai/x", "api_base": "http://h:1/v1",
                                            "api_key": "sk-secret-value"}
    monkeypatch.setenv("GRAPHTUNE_API_BASE_LLAMA_3_2_3B", "http://local:9/v1")
    assert mod.endpoint("llama-3.2-3b") == {"model": "openai/llama-3.2-3b", "api_base": "http://local:9/v1",
                                            "api_key": "sk-no-key-required"}
    monkeypatch.setenv("GRAPHTUNE_MODEL_LLAMA_3_2_1B", "anthropic/claude")
    assert mod.endpoint("llama-3.2-1b")["model"] == "anthropic/claude"
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(RuntimeError, match="MY_KEY"):
        mod.endpoint("llama-3.2-1b")


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- against the fake OpenAI-compatible server ------------------------------------------------

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before the first litellm import
pytest.importorskip("litellm")
pytest.importorskip("langgraph")

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer() as srv:
        yield srv


def live_spec(tmp_path: Path, srv) -> Path:
    (tmp_path / "qs.jsonl").write_text("".join(json.dumps({"id": f"x{i}", "question": f"q ANSWER={i}", "answer": str(i)})
                                               + "\n" for i in range(2)))
    p = tmp_path / "live.yaml"
    p.write_text(f"""
study: live
task: {{dataset: qs.jsonl, scorer: numeric, dev_size: 1, test_size: 1}}
models:
  - {{name: llama-3.2-1b, litellm: openai/echo, api_base: {srv.api_base}}}
  - {{name: llama-3.2-3b, litellm: openai/echo-3b, api_base: {srv.api_base}}}
budget: {{units: 30}}
env: {{kind: live, temperature: 0.0, max_tokens: 40, seed: 5}}
storage: sqlite:///{tmp_path / 'live.db'}
""")
    return p


def test_exported_module_sends_the_same_messages_as_graphtune(tmp_path, server):
    from graphtune.api import run_graph
    from graphtune.spec import load_spec
    from graphtune.store.storage import Storage

    spec = load_spec(live_spec(tmp_path, server))
    # two identical first-level nodes: samples 0 and 1 (seeds 5 and 6) in both run-times
    g = vote_graph()
    q = "What is 20 + 22? ANSWER=42"
    out = run_graph(spec, g, question=q)
    assert "42" in out.results[0].answer
    rows = Storage(spec.storage).engine.connect().exec_driver_sql(
        "select endpoint, messages, params from gt_llm_calls").all()
    ours = [(e.split("@")[0], json.loads(m) if isinstance(m, str) else m,
             (json.loads(p) if isinstance(p, str) else p)["seed"]) for e, m, p in rows]
    path = tmp_path / "exported.py"
    path.write_text(to_langgraph_module(g, spec.resolved(), modname="exported"))
    mod = _load(path)
    seen = []

    async def recorder(**kw):
        import litellm

        seen.append((kw["model"], kw["messages"], kw["seed"]))
        return await litellm.acompletion(**kw)

    outputs = mod.run_nodes(q, acompletion=recorder)
    assert sorted(seen, key=lambda t: json.dumps(t)) == sorted(ours, key=lambda t: json.dumps(t))
    assert len(seen) == 4 and "42" in outputs["f"]
    assert "42" in asyncio.run(mod.arun(q))
    # LangGraph's own sync interface sends the same calls (a sync hook in the run's config)
    sync_seen = []

    def sync_recorder(**kw):
        import litellm

        sync_seen.append((kw["model"], kw["messages"], kw["seed"]))
        return litellm.completion(**kw)

    state = mod.graph.invoke({"question": q}, config={"configurable": {"completion": sync_recorder}})
    assert sorted(sync_seen, key=json.dumps) == sorted(ours, key=json.dumps)
    assert state["answer"] == state["outputs"]["f"] == outputs["f"]


def _deps_path() -> str:
    """The site-packages folder that holds langgraph and litellm (and their dependencies)."""
    import langgraph
    import litellm

    dirs = {str(Path(next(iter(langgraph.__path__))).parent), str(Path(litellm.__file__).parent.parent)}
    return os.pathsep.join(sorted(dirs))


def test_exported_module_runs_without_graphtune(tmp_path, server):
    db = make_study(tmp_path, evaluations=3)
    spec = live_spec(tmp_path, server)
    out = tmp_path / "best.py"
    r = CliRunner().invoke(app, ["export", "s", "--select", "best", "--format", "langgraph", "-o", str(out),
                                 "--storage", db], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    # endpoints for the simulated study's models come from the environment
    work = tmp_path / "elsewhere"
    work.mkdir()
    script = ("import sys, importlib.util\n"
              f"sys.path.insert(0, {str(out.parent)!r})\n"
              "import best\n"
              "print('ANSWER:', best.run('What is 5 + 2? ANSWER=7'))\n"
              "assert not any(m == 'graphtune' or m.startswith('graphtune.') for m in sys.modules), 'imported'\n"
              "assert importlib.util.find_spec('graphtune') is None, 'graphtune importable'\n")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": _deps_path(), "GRAPHTUNE_API_BASE": server.api_base,
           "HOME": str(tmp_path)}
    for m in QS_MODELS:
        env["GRAPHTUNE_MODEL_" + m.upper().replace("-", "_").replace(".", "_")] = "openai/echo"
    p = subprocess.run([sys.executable, "-S", "-c", script], cwd=work, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "ANSWER: The answer is 7" in p.stdout
    del spec


def test_cli_export_selectors_and_run_the_exported_file(tmp_path, server):
    db = make_study(tmp_path, evaluations=6)
    runner = CliRunner()
    r = runner.invoke(app, ["export", "s", "--select", "pareto", "--format", "yaml", "-o", str(tmp_path / "front"),
                            "--storage", db], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    files = sorted((tmp_path / "front").glob("*.yaml"))
    assert files and len(files) == r.output.count("wrote ")
    r = runner.invoke(app, ["export", "s", "--select", "units<=6", "-f", "json", "-o", str(tmp_path / "cheap.json"),
                            "--storage", db], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "cheap.json").read_text())
    assert doc["metrics"]["cost_units"] <= 6
    for fmt, name in (("mermaid", "g.mmd"), ("png", "g.png")):
        r = runner.invoke(app, ["export", "s", "-f", fmt, "-o", str(tmp_path / name), "--storage", db])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export", "s", "--select", "latency_s<=0.0001", "-o", str(tmp_path / "x.yaml"),
                            "--storage", db])
    assert r.exit_code != 0 and r.output.startswith("error: no graph on the front") and \
        len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["export", "s", "--select", "cheapest", "-o", str(tmp_path / "x.yaml"), "--storage", db])
    assert r.exit_code != 0 and "cannot read selector" in r.output
    # the exported best graph runs under `graphtune run` on live endpoints
    r = runner.invoke(app, ["export", "s", "-o", str(tmp_path / "best.yaml"), "--storage", db])
    assert r.exit_code == 0 and "graphtune run" in r.output
    spec = tmp_path / "live2.yaml"
    models = "\n".join(f"  - {{name: {m}, litellm: openai/echo, api_base: {server.api_base}}}" for m in QS_MODELS)
    (tmp_path / "qs.jsonl").write_text("".join(json.dumps({"id": f"x{i}", "question": f"q ANSWER={i}", "answer": str(i)})
                                               + "\n" for i in range(2)))
    spec.write_text(f"study: l\ntask: {{dataset: qs.jsonl, scorer: numeric, dev_size: 1, test_size: 1}}\n"
                    f"models:\n{models}\nbudget: {{units: 30}}\nenv: {{kind: live}}\n"
                    f"storage: sqlite:///{tmp_path / 'l.db'}\n")
    r = runner.invoke(app, ["run", str(tmp_path / "best.yaml"), "--spec", str(spec), "--question", "x ANSWER=3"],
                      catch_exceptions=False)
    assert r.exit_code == 0 and "The answer is 3" in r.output, r.output


# -- a plain LangGraph graph ------------------------------------------------------------------

SIM_SPEC = {"task": {"scorer": "numeric"}, "env": {"kind": "simulated", "max_tokens": 40, "seed": 5},
            "models": [{"name": m} for m in QS_MODELS]}


def _module(tmp_path: Path, graph: Graph, spec=None, *, model_map=None, name: str = "exported"):
    path = tmp_path / f"{name}.py"
    path.write_text(to_langgraph_module(graph, spec, modname=name, model_map=model_map))
    return _load(path)


def test_exported_graph_is_called_the_way_langgraph_documents(tmp_path, server, monkeypatch):
    from langgraph.graph.state import CompiledStateGraph

    mod = _module(tmp_path, vote_graph(), SIM_SPEC,
                  model_map={"llama-3.2-1b": {"model": "openai/echo"}, "llama-3.2-3b": {"model": "openai/echo-3b"}})
    g = mod.graph
    assert isinstance(g, CompiledStateGraph)
    assert {"node_a", "node_b", "node_c", "node_f"} <= set(g.get_graph().nodes)
    assert set(g.get_input_jsonschema()["properties"]) == {"question"}
    assert set(g.get_output_jsonschema()["properties"]) == {"answer", "outputs"}
    q = "What is 5 + 2? ANSWER=7"
    state = g.invoke({"question": q}, context={"api_base": server.api_base})  # sync nodes
    assert state["answer"].startswith("The answer is 7") and state["answer"] == state["outputs"]["f"]
    assert set(state["outputs"]) == {"a", "b", "c", "f"}
    # async: the same requests (the fake's reply carries a digest of prompt and seed)
    astate = asyncio.run(g.ainvoke({"question": q}, context=mod.Context(api_base=server.api_base)))
    assert astate == state
    # two identical sources are two samples: seeds 5 and 6, so two different replies
    assert state["outputs"]["a"] != state["outputs"]["b"]
    # streaming, per node, as LangGraph streams any graph
    updates = [u for u in g.stream({"question": q}, context={"api_base": server.api_base}, stream_mode="updates")]
    assert [next(iter(u)) for u in updates][-1] == "node_f" and len(updates) == 4
    # the models, chosen at call time through the context
    seen = []

    def rec(**kw):
        import litellm

        seen.append((kw["model"], kw["seed"], kw.get("api_key")))
        return litellm.completion(**kw)

    g.invoke({"question": q}, context={"api_base": server.api_base, "models": {"llama-3.2-3b": "openai/echo-acc0"},
                                       "seed": 11},
             config={"configurable": {"completion": rec}})
    assert sorted(seen) == [("openai/echo", 11, "sk-no-key-required"), ("openai/echo", 12, "sk-no-key-required"),
                            ("openai/echo-acc0", 11, "sk-no-key-required"),
                            ("openai/echo-acc0", 11, "sk-no-key-required")]
    # defaults from the environment: no context at all
    monkeypatch.setenv("GRAPHTUNE_API_BASE", server.api_base)
    assert g.invoke({"question": q}) == state
    # the context wins over the environment, which wins over the exported MODELS block
    monkeypatch.setenv("GRAPHTUNE_MODEL_LLAMA_3_2_1B", "openai/from-env")
    assert mod.endpoint("llama-3.2-1b")["model"] == "openai/from-env"
    ctx = mod.Context(models={"llama-3.2-1b": "openai/from-ctx"}, api_bases={"llama-3.2-1b": "http://ctx:1/v1"})
    assert mod.endpoint("llama-3.2-1b", ctx)["model"] == "openai/from-ctx"
    assert mod.endpoint("llama-3.2-1b", ctx)["api_base"] == "http://ctx:1/v1"
    assert mod.endpoint("llama-3.2-3b", ctx) == {"model": "openai/echo-3b", "api_base": server.api_base,
                                                 "api_key": "sk-no-key-required"}
    # a key travels by the name of its variable only
    monkeypatch.setenv("CTX_KEY", "sk-ctx")
    assert mod.endpoint("llama-3.2-3b", mod.Context(api_key_envs={"llama-3.2-3b": "CTX_KEY"}))["api_key"] == "sk-ctx"


def test_nodes_of_a_level_run_in_parallel_sync_and_async(tmp_path):
    """Four sources and a fuser against a server that takes 0.5 s per reply: about 1 s
    when the sources overlap, 2.5 s one after the other."""
    g = Graph.build([Node.make(f"s{i}", "assistant", "llama-3.2-1b") for i in range(4)]
                    + [Node.make("f", "fuser", "llama-3.2-3b")], [(f"s{i}", "f") for i in range(4)])
    mod = _module(tmp_path, g, SIM_SPEC, model_map={"llama-3.2-1b": {"model": "openai/echo"},
                                                    "llama-3.2-3b": {"model": "openai/echo"}}, name="wide")
    with FakeOpenAIServer(latency_s=0.5) as slow:
        ctx = {"api_base": slow.api_base}
        q = {"question": "q ANSWER=3"}
        mod.graph.invoke(q, context=ctx)  # warm-up: litellm's first call loads its provider modules
        t0 = time.perf_counter()
        state = mod.graph.invoke(q, context=ctx)
        sync_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        astate = asyncio.run(mod.graph.ainvoke(q, context=ctx))
        async_s = time.perf_counter() - t0
    assert state == astate and state["answer"].startswith("The answer is 3")
    assert len(set(state["outputs"].values())) == 5  # four samples (seeds 5..8) and the fuser
    print(f"level of 4 x 0.5 s replies + fuser: invoke {sync_s:.2f} s, ainvoke {async_s:.2f} s")
    assert sync_s < 2.0 and async_s < 2.0, (sync_s, async_s)


def test_cli_maps_a_simulated_studys_models_to_endpoints(tmp_path, server):
    db = make_study(tmp_path, evaluations=3)
    runner = CliRunner()
    out = tmp_path / "mapped.py"
    r = runner.invoke(app, ["export", "s", "-f", "langgraph", "-o", str(tmp_path / "plain.py"), "--storage", db])
    assert r.exit_code == 0, r.output
    assert "no endpoint for" in r.output and "--models" in r.output and "graphtune[llm]" in r.output
    mapping = tmp_path / "models.yaml"
    mapping.write_text("llama-3.2-1b: openai/echo\n"
                       "llama-3.2-3b: {litellm: openai/echo-3b, api_key_env: FAKE_KEY}\n"
                       "llama-3.1-8b: {litellm: openai/echo-8b}\n")
    r = runner.invoke(app, ["export", "s", "-f", "langgraph", "-o", str(out), "--models-file", str(mapping),
                            "--models", "llama-3.1-70b=openai/echo-70b", "--models", "llama-3.1-8b=openai/echo",
                            "--storage", db], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "no endpoint for" not in r.output and './mapped.py:graph' in r.output
    mod = _load(out)
    want = {"llama-3.2-1b": ("openai/echo", None), "llama-3.2-3b": ("openai/echo-3b", "FAKE_KEY"),
            "llama-3.1-8b": ("openai/echo", None), "llama-3.1-70b": ("openai/echo-70b", None)}
    assert mod.MODELS and all(mod.MODELS[m]["model"] == want[m][0] and mod.MODELS[m]["api_key_env"] == want[m][1]
                              for m in mod.MODELS)
    os.environ["FAKE_KEY"] = "sk-fake"
    try:
        state = mod.graph.invoke({"question": "What is 1 + 1? ANSWER=2"}, context={"api_base": server.api_base})
    finally:
        del os.environ["FAKE_KEY"]
    assert state["answer"].startswith("The answer is 2")
    assert "sk-fake" not in out.read_text()
    # mistakes: one line each, naming the fix
    for args, msg in ((["--models", "llama-3.2-1b"], "write NAME=LITELLM_STRING"),
                      (["--models", "gpt-9=openai/x"], "gpt-9 is not a model of the study; its models: "),
                      (["--models-file", str(tmp_path / "none.yaml")], "does not exist"),
                      (["--models", "llama-3.2-1b=openai/x", "-f", "yaml"], "apply to --format langgraph only")):
        cmd = ["export", "s", "-o", str(tmp_path / "x.py"), "--storage", db, "-f", "langgraph", *args]
        r = runner.invoke(app, cmd)
        assert r.exit_code == 2 and msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("llama-3.2-1b: {litellm: openai/x, api_key: sk-oops}\n")
    r = runner.invoke(app, ["export", "s", "-f", "langgraph", "-o", str(out), "--models-file", str(bad),
                            "--storage", db])
    assert r.exit_code == 2 and "unknown key(s) api_key" in r.output and "sk-oops" not in out.read_text()
