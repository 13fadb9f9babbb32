"""An exported module served by LangGraph's own server: ``langgraph dev`` (the CLI's
in-memory server, ``pip install 'langgraph-cli[inmem]'``, part of the ``test`` extra) loads
it from a ``langgraph.json`` entry ``"./best.py:graph"`` and runs it over HTTP against the
fake OpenAI-compatible server, with the endpoint from langgraph.json's ``env`` and the
models from the run's ``context``. Nothing outside 127.0.0.1 is contacted (tracing and
the CLI's analytics are switched off; no browser)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from graphtune.export import to_langgraph_module
from graphtune.graphs import Graph, Node

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

LANGGRAPH = Path(sys.executable).parent / "langgraph"
if not LANGGRAPH.exists() or importlib.util.find_spec("langgraph_runtime_inmem") is None:
    pytest.skip("needs LangGraph's CLI with its in-memory server: pip install 'langgraph-cli[inmem]'",
                allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None, timeout_s: float = 60.0):
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read() or b"null")


@contextlib.contextmanager
def _langgraph_dev(tmp_path: Path, name: str, api_base: str):
    """``langgraph dev`` serving ``tmp_path/<name>.py:graph`` (GRAPHTUNE_API_BASE from
    langgraph.json's ``env``); yields its base URL."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    (tmp_path / "langgraph.json").write_text(json.dumps(
        {"dependencies": ["."], "graphs": {name: f"./{name}.py:graph"}, "env": {"GRAPHTUNE_API_BASE": api_base}}))
    env = {**os.environ, "LANGSMITH_TRACING": "false", "LANGCHAIN_TRACING_V2": "false",
           "LANGGRAPH_CLI_NO_ANALYTICS": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    env.pop("GRAPHTUNE_API_BASE", None)
    log = open(tmp_path / "dev.log", "wb")
    # its own session: stopped by process group, whatever the job control of the suite
    proc = subprocess.Popen([str(LANGGRAPH), "dev", "--no-browser", "--no-reload", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if _http("GET", base + "/ok", timeout_s=2).get("ok"):
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("langgraph dev did not start:\n" + (tmp_path / "dev.log").read_text()[-3000:])
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        log.close()


def test_langgraph_dev_serves_the_exported_graph(tmp_path):
    g = Graph.build([Node.make("a", "assistant", "llama-3.2-1b"), Node.make("b", "assistant", "llama-3.2-1b"),
                     Node.make("f", "fuser", "llama-3.2-3b")], [("a", "f"), ("b", "f")])
    spec = {"task": {"scorer": "numeric"}, "env": {"kind": "simulated", "max_tokens": 40, "seed": 5},
            "models": [{"name": "llama-3.2-1b"}, {"name": "llama-3.2-3b"}]}
    (tmp_path / "best.py").write_text(to_langgraph_module(
        g, spec, modname="best", model_map={"llama-3.2-1b": {"model": "openai/echo"},
                                            "llama-3.2-3b": {"model": "openai/echo-3b"}}))
    with FakeOpenAIServer() as llm, _langgraph_dev(tmp_path, "best", llm.api_base) as base:
        (assistant,) = _http("POST", base + "/assistants/search", {"graph_id": "best"})
        schemas = _http("GET", f"{base}/assistants/{assistant['assistant_id']}/schemas")
        assert {"models", "api_base", "api_bases", "api_key_envs"} <= set(schemas["context_schema"]["properties"])
        assert set(schemas["input_schema"]["properties"]) == {"question"}
        q = "What is 5 + 2? ANSWER=7"
        out = _http("POST", base + "/runs/wait", {"assistant_id": "best", "input": {"question": q}})
        assert out["answer"].startswith("The answer is 7.") and set(out["outputs"]) == {"a", "b", "f"}
        assert out["answer"] == out["outputs"]["f"] and out["outputs"]["a"] != out["outputs"]["b"]
        # models chosen per run through the context: the fuser now answers wrongly
        out2 = _http("POST", base + "/runs/wait", {"assistant_id": "best", "input": {"question": q},
                                                   "context": {"models": {"llama-3.2-3b": "openai/echo-acc0"}}})
        assert out2["outputs"]["a"] == out["outputs"]["a"] and not out2["answer"].startswith("The answer is 7.")
        assert llm.stats()["by_model"].get("echo-acc0") == 1


def test_langgraph_dev_serves_an_exported_pipeline(tmp_path):
    """A pipeline's module (each stage a subgraph) served the same way: the run's context
    reaches the stages, and the answer stage's question holds the retrieve stage's answer."""
    from graphtune.graphs.pipeline import Pipeline, Stage

    p = Pipeline((Stage("retrieve", Graph.build([Node.make("a", "assistant", "llama-3.1-70b")])),
                  Stage("answer", Graph.build([Node.make("a", "assistant", "llama-3.2-3b"),
                                               Node.make("b", "assistant", "llama-3.2-3b"),
                                               Node.make("f", "fuser", "llama-3.2-3b")], [("a", "f"), ("b", "f")]),
                        ("question", "retrieve"))))
    spec = {"task": {"scorer": "numeric"}, "env": {"kind": "simulated", "max_tokens": 40, "seed": 5},
            "models": [{"name": "llama-3.1-70b"}, {"name": "llama-3.2-3b"}]}
    (tmp_path / "rag.py").write_text(to_langgraph_module(
        p, spec, modname="rag", model_map={"llama-3.1-70b": {"model": "openai/echo-70b"},
                                           "llama-3.2-3b": {"model": "openai/echo"}}))
    with FakeOpenAIServer() as llm, _langgraph_dev(tmp_path, "rag", llm.api_base) as base:
        q = "What is 5 + 2? ANSWER=7"
        out = _http("POST", base + "/runs/wait", {"assistant_id": "rag", "input": {"question": q}})
        assert out["answer"].startswith("The answer is 7.") and out["answer"] == out["stages"]["answer"]
        assert out["stages"]["retrieve"] in out["prompts"]["answer"] and out["prompts"]["retrieve"] == q
        assert set(out["outputs"]) == {"retrieve/a", "answer/a", "answer/b", "answer/f"}
        out2 = _http("POST", base + "/runs/wait", {"assistant_id": "rag", "input": {"question": q},
                                                   "context": {"models": {"llama-3.1-70b": "openai/echo-acc0"}}})
        assert out2["stages"]["retrieve"] != out["stages"]["retrieve"]
        assert llm.stats()["by_model"].get("echo-acc0") == 1
