"""Deterministic local mode (``deterministic: true`` on a ``provider: local`` model): two
fresh stores running the same live search with SmolLM2 at temperature 0.8 (sampled
replies, a seed per call) get the same replies and answers, call for call.

Without it they do not: llama.cpp batches concurrent requests across its slots and
reuses cached prompt prefixes, and both change the logits slightly
(``benchmarks/live_perf.py --parts determinism`` measures it). Needs the real local model
(marker ``llm``); about a minute on 2 idle cores."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.llm

ROOT = Path(__file__).resolve().parents[1]

from fakes import skip_without_local_llm  # noqa: E402

skip_without_local_llm()

SPEC = """
study: det
task:
  dataset: {data}
  scorer: numeric
  dev_size: 3
  test_size: 2
models:
  - name: smollm2
    provider: local
    deterministic: true
    params: 1.06e8
    layers: 30
    hidden: 576
    usd_per_mtok: 0
space:
  roles: [assistant, fuser]
  max_nodes: 3
  max_width: 2
  max_depth: 2
  max_in_degree: 2
budget:
  units: 6
search:
  method: exhaustive
  evaluations: 4
  batch_size: 4
  seed: 0
env:
  kind: live
  concurrency: 8
  max_tokens: 16
  temperature: 0.8
  seed: 11
storage: sqlite:///{db}
"""


def run_search(tmp_path: Path, name: str):
    from graphtune.api import optimize
    from graphtune.spec import load_spec
    from graphtune.store.ledger import open_ledger
    from graphtune.store.storage import Storage

    spec_path = tmp_path / f"{name}.yaml"
    db = tmp_path / f"{name}.db"
    spec_path.write_text(SPEC.format(data=ROOT / "examples" / "data" / "easy-arith.jsonl", db=db))
    problem, _, out = optimize(load_spec(spec_path))
    assert problem.env.executor.stats.made > 0 and problem.env.executor.stats.failed == 0
    led = open_ledger(f"sqlite:///{db}")
    calls = {(c.key, c.reply) for c in led.records()}
    endpoints = {c.endpoint for c in led.records()}
    led.close()
    st = Storage(f"sqlite:///{db}", create=False)
    try:
        study = st.get_study("det")
        answers = sorted((t.graph_hash, t.split, r.question_id, r.answer)
                         for t in st.list_trials(study.id) for r in st.trial_results(t.id))
    finally:
        st.close()
    return calls, answers, endpoints, out


def test_two_fresh_stores_give_the_same_sampled_replies_in_deterministic_mode(tmp_path):
    calls_a, answers_a, endpoints, out_a = run_search(tmp_path, "a")
    calls_b, answers_b, _, out_b = run_search(tmp_path, "b")
    assert endpoints == {"local:SmolLM2-135M-Instruct.Q4_1.gguf:deterministic"}
    assert len(calls_a) > 10 and len(answers_a) > 10
    assert calls_a == calls_b  # every call (key: messages, params, seed) got the same reply
    assert answers_a == answers_b
    assert out_a.best.graph_hash == out_b.best.graph_hash
    # temperature 0.8 really samples: the several samples of one prompt (seeds 11, 12)
    # do not all agree
    assert len({reply for _, reply in calls_a}) > len(calls_a) // 2


def test_a_deterministic_server_refuses_several_slots():
    from graphtune.errors import EnvError
    from graphtune.local_server import LocalLLMServer

    with pytest.raises(EnvError, match="deterministic mode serves one request at a time; set n_parallel to 1"):
        LocalLLMServer(n_parallel=4, deterministic=True)


def test_a_deterministic_server_has_one_slot_and_processes_every_prompt_whole():
    """What the mode removes: a second identical prompt is not served from the prompt cache
    (the default server reuses all but its last token, which it then processes alone)."""
    import json
    import urllib.request

    from graphtune.local_server import LocalLLMServer

    body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "What is 2 + 3?"}],
                       "max_tokens": 2, "seed": 1}).encode()

    def timings(srv) -> dict:
        req = urllib.request.Request(srv.url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.load(r)["timings"]

    with LocalLLMServer(n_parallel=1, deterministic=True) as srv:
        with urllib.request.urlopen(srv.url + "/props", timeout=10) as r:
            assert json.load(r)["total_slots"] == 1
        first, second = timings(srv), timings(srv)
        assert first["cache_n"] == second["cache_n"] == 0 and first["prompt_n"] == second["prompt_n"] > 5
    with LocalLLMServer(n_parallel=1) as srv:  # the default mode, for contrast
        first, second = timings(srv), timings(srv)
        assert second["cache_n"] > 0 and second["prompt_n"] < first["prompt_n"]
