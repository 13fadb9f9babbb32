"""An exported LangGraph module against the real local LLM (SmolLM2-135M on llama.cpp):
it makes the same node calls as graphtune's own run of the same graph -- the same
number of calls and, per node, the same messages and sample seeds. graphtune's calls are
read from its call ledger; the module's are recorded by a wrapper around
``litellm.acompletion`` (the module's ``acompletion`` hook) that forwards to the server.

Both runs use one llama.cpp slot (``max_concurrency: 1``) and temperature 0, so the
first-level replies, and hence the fuser's prompt, are normally identical. Should the
server still return a different reply, the fuser's messages are checked against
graphtune's prompt builder applied to the replies the module received."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.llm

ROOT = Path(__file__).resolve().parents[1]

from fakes import skip_without_local_llm  # noqa: E402

skip_without_local_llm()

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def test_exported_module_makes_the_same_calls_as_graphtune(tmp_path, monkeypatch):
    from graphtune.api import run_graph
    from graphtune.envs.prompts import build_prompts
    from graphtune.export import to_langgraph_module
    from graphtune.graphs import Graph, Node
    from graphtune.local_server import LocalLLMServer, smollm2_path
    from graphtune.spec import load_spec
    from graphtune.store.storage import Storage

    spec_path = tmp_path / "local.yaml"
    spec_path.write_text(f"""
study: export-llm
task: {{dataset: {ROOT / 'examples/data/easy-arith.jsonl'}, scorer: numeric, dev_size: 2, test_size: 2}}
models:
  - {{name: smollm2, provider: local, params: 1.06e8, layers: 30, hidden: 576, usd_per_mtok: 0,
     max_concurrency: 1}}
budget: {{units: 6}}
env: {{kind: live, max_tokens: 32, temperature: 0.0, seed: 7, concurrency: 1}}
storage: sqlite:///{tmp_path / 'gt.db'}
""")
    spec = load_spec(spec_path)
    # two identical assistants (samples 0 and 1: seeds 7 and 8) and a fuser
    g = Graph.build([Node.make("a", "assistant", "smollm2"), Node.make("b", "assistant", "smollm2"),
                     Node.make("f", "fuser", "smollm2")], [("a", "f"), ("b", "f")])
    q = "What is 2 + 3?"
    ours = run_graph(spec, g, question=q)
    assert ours.calls["made"] == 3 and ours.results[0].error is None
    rows = Storage(spec.storage).engine.connect().exec_driver_sql(
        "select messages, params, reply from gt_llm_calls order by id").all()
    ledger = [(json.loads(m) if isinstance(m, str) else m, (json.loads(p) if isinstance(p, str) else p)["seed"],
               r) for m, p, r in rows]
    assert len(ledger) == 3

    path = tmp_path / "exported_graph.py"
    path.write_text(to_langgraph_module(g, spec.resolved(), modname="exported_graph"))
    mod_spec = importlib.util.spec_from_file_location("exported_graph", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    seen = []

    async def recorder(**kw):
        import litellm

        resp = await litellm.acompletion(**kw)
        seen.append((kw["messages"], kw["seed"], resp.choices[0].message.content or ""))
        return resp

    sync_seen = []

    def sync_recorder(**kw):
        import litellm

        resp = litellm.completion(**kw)
        sync_seen.append((kw["messages"], kw["seed"], resp.choices[0].message.content or ""))
        return resp

    with LocalLLMServer(smollm2_path(), alias="smollm2", n_parallel=1, seed=7) as srv:
        monkeypatch.setenv("GRAPHTUNE_API_BASE_SMOLLM2", srv.api_base)
        outputs = mod.run_nodes(q, acompletion=recorder)
        # LangGraph's sync interface, the endpoint given in the run's context instead
        monkeypatch.delenv("GRAPHTUNE_API_BASE_SMOLLM2")
        state = mod.graph.invoke({"question": q}, context={"api_bases": {"smollm2": srv.api_base}},
                                 config={"configurable": {"completion": sync_recorder}})
    assert len(seen) == 3 and set(outputs) == {"a", "b", "f"}
    assert len(sync_seen) == 3 and state["answer"] == state["outputs"]["f"]

    key = lambda t: json.dumps(t[:2], sort_keys=True)  # noqa: E731
    first = lambda calls: sorted((c for c in calls if "Response 1" not in c[0][-1]["content"]), key=key)  # noqa: E731
    # the sources: the same messages and seeds as graphtune sent (async and sync runs)
    assert [c[:2] for c in first(seen)] == [c[:2] for c in first(ledger)]
    assert [c[:2] for c in first(sync_seen)] == [c[:2] for c in first(ledger)]
    # the fuser: exactly graphtune's prompt over the replies this run received
    prompts = build_prompts(None, {}, scorer="numeric")
    fuser = [c for c in seen if "Response 1" in c[0][-1]["content"]]
    assert len(fuser) == 1
    assert fuser[0][0] == prompts.messages("fuser", q, [outputs["a"], outputs["b"]])
    same = [c[2] for c in first(seen)] == [c[2] for c in first(ledger)]
    print(f"replies of the sources identical in both runs: {same}")
    if same:  # same replies: the whole call list matches
        assert sorted((c[:2] for c in seen), key=json.dumps) == sorted((c[:2] for c in ledger), key=json.dumps)
