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
