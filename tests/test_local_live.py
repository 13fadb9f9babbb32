"""A real search on a real model, offline: SmolLM2-135M on a local llama.cpp server that
graphtune starts itself (examples/local-live.yaml, cut down). Asserts structure -- calls
made, tokens and latency recorded, a re-run served by the ledger -- never correctness."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.llm

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "examples" / "local-live.yaml"

from fakes import skip_without_local_llm  # noqa: E402

skip_without_local_llm()


def test_local_live_search_records_calls_and_reruns_for_free(tmp_path):
    from graphtune.api import optimize
    from graphtune.spec import load_spec
    from graphtune.store.ledger import open_ledger

    db = f"sqlite:///{tmp_path / 'local.db'}"
    over = {"storage": db, "search.evaluations": 2, "task.dev_size": 3, "task.test_size": 2, "env.max_tokens": 24}
    spec = load_spec(SPEC, overrides=over)
    problem, study, out = optimize(spec)
    stats = problem.env.executor.stats
    assert stats.made > 0 and stats.failed == 0
    assert study.runs_spent == 6 and out.best is not None
    led = open_ledger(db)
    calls = led.records()
    led.close()
    assert len(calls) == stats.made
    for c in calls:
        assert c.ok and c.reply.strip()
        assert c.prompt_tokens > 0 and 0 < c.completion_tokens <= 24 and c.latency_s > 0
        assert c.endpoint.startswith("local:") and c.usd == 0.0 and c.flops > 0
    for r in out.test_results:
        assert r.ok and r.prompt_tokens > 0 and r.latency_s > 0 and r.flops > 0

    # the same search under another study name: every call is served by the ledger
    spec2 = load_spec(SPEC, overrides={**over, "study": "local-live-again"})
    problem2, _, _ = optimize(spec2)
    assert problem2.env.executor.stats.made == 0
    assert problem2.env.executor.stats.cached > 0
    led = open_ledger(db)
    assert led.count() == len(calls)
    led.close()
