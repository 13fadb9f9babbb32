"""Endpoint faults: a live search against a fault-injecting OpenAI-compatible server.

The fake server (tests/fake_openai_server.py) injects 429/503 with Retry-After, 500,
timeouts, truncated JSON, empty replies and slow replies at configurable rates,
deterministically by seed. What must hold:

* at 30% transient faults (enough retries) a search ends with the same trials and
  results as a clean run, and no question is scored wrong because of a fault;
* when every call fails it stops early with one line naming the model and the last
  error, exits non-zero, and the study continues once the endpoint is back without
  paying a finished call twice;
* Retry-After is honoured (seconds and HTTP-date), capped;
* a graph measured on zero questions is never recommended; infrastructure failures are
  stored per trial, reported per model, and graphs are compared on shared questions;
* ``graphtune validate --check-endpoints`` checks keys and makes one cheap call per model.
"""

from __future__ import annotations

import email.utils
import json
import sqlite3
import time
from pathlib import Path

import pytest

pytest.importorskip("litellm")
pytest.importorskip("langgraph")

from typer.testing import CliRunner  # noqa: E402

from fake_openai_server import FakeOpenAIServer  # noqa: E402
from graphtune import errors, llm  # noqa: E402
from graphtune.api import live_acomplete  # noqa: E402
from graphtune.envs.datasets import Example  # noqa: E402
from graphtune.envs.live import CallSettings, Endpoint, LiveEnvironment  # noqa: E402
from graphtune.envs.prompts import build_prompts  # noqa: E402
from graphtune.envs.scorers import get_scorer  # noqa: E402
from graphtune.errors import LLMTransientError  # noqa: E402
from graphtune.graphs import Graph, ModelInfo, Node  # noqa: E402
from graphtune.search.base import recommend_by_coverage  # noqa: E402
from graphtune.store.ledger import MemoryLedger  # noqa: E402
from graphtune.store.storage import Storage  # noqa: E402

INFO = ModelInfo("m", 1e9, 16, 2048, usd_per_mtok_in=1.0, usd_per_mtok_out=3.0)
#: 30% of requests fail (or are slow), spread over every kind of fault
FAULTS_30 = {"429": 0.06, "503": 0.04, "500": 0.06, "timeout": 0.03, "truncated": 0.04, "empty": 0.04,
             "slow": 0.03}


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(llm, "BACKOFF_BASE_S", 0.01)


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer(retry_after="0.05", hang_s=4.0, slow_s=0.3) as srv:
        yield srv


def write_spec(tmp_path: Path, srv, *, db: str = "g.db", evaluations: int = 3, method: str = "random",
               extra_env: str = "", models: tuple[str, str] = ("echo-acc60", "echo-acc85"),
               max_nodes: int = 3) -> Path:
    data = tmp_path / "qs.jsonl"
    data.write_text("".join(json.dumps({"id": f"x{i}", "question": f"What is {i}+1? ANSWER={i + 1}",
                                        "answer": str(i + 1)}) + "\n" for i in range(12)))
    spec = tmp_path / f"{Path(db).stem}.yaml"
    spec.write_text(f"""
study: faults
task:
  dataset: qs.jsonl
  scorer: numeric
  dev_size: 8
  test_size: 4
models:
  - name: llama-3.2-1b
    litellm: openai/{models[0]}
    api_base: {srv.api_base}
  - name: llama-3.2-3b
    litellm: openai/{models[1]}
    api_base: {srv.api_base}
space:
  max_nodes: {max_nodes}
  max_depth: 2
budget:
  units: 10
search:
  method: {method}
  evaluations: {evaluations}
  batch_size: 2
  seed: 3
env:
  kind: live
  concurrency: 8
  max_tokens: 32
  timeout_s: 3
{extra_env}
storage: sqlite:///{tmp_path / db}
""")
    return spec


def trials_of(db: Path) -> list[tuple]:
    """Every trial with its per-question outcomes (what the search decided on)."""
    st = Storage(f"sqlite:///{db}", create=False)
    try:
        study = st.get_study("faults")
        out = []
        for t in st.list_trials(study.id):
            res = tuple((r.question_id, r.answer, r.correct, r.score, r.error) for r in st.trial_results(t.id))
            out.append((t.split, t.batch, t.slot, t.graph_hash, t.status, tuple(t.question_ids), res))
        return out
    finally:
        st.close()


def ledger_ok(db: Path) -> tuple[int, int]:
    with sqlite3.connect(db) as c:
        return c.execute("select count(*), count(distinct key) from gt_llm_calls where error is null").fetchone()


# -- the suite's two searches ------------------------------------------------------------------


def test_at_30_percent_faults_a_search_ends_as_a_clean_run_and_nothing_is_scored_wrong(server, tmp_path):
    from graphtune.cli import app

    runner = CliRunner()
    server.set_faults({})
    clean = write_spec(tmp_path, server, db="clean.db")
    r = runner.invoke(app, ["optimize", str(clean), "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    server.reset()
    server.set_faults(FAULTS_30, fault_seed=3)
    faulty = write_spec(tmp_path, server, db="faulty.db", extra_env="  max_retries: 8")
    t0 = time.perf_counter()
    r2 = runner.invoke(app, ["optimize", str(faulty), "--quiet"], catch_exceptions=False)
    wall = time.perf_counter() - t0
    stats = server.stats()
    server.set_faults({})
    assert r2.exit_code == 0, r2.output
    a, b = trials_of(tmp_path / "clean.db"), trials_of(tmp_path / "faulty.db")
    assert a == b  # same trials, same graphs, same answers and scores
    assert all(err is None for t in b for *_, err in t[-1])  # no question excluded, none scored wrong
    assert r.output.split("best graph")[1].split("\n")[0] == r2.output.split("best graph")[1].split("\n")[0]
    faults = sum(v for k, v in stats["faults"].items() if k != "slow")
    assert faults >= 10 and set(stats["faults"]) >= {"429", "500", "timeout", "truncated", "empty"}
    ok, distinct = ledger_ok(tmp_path / "faulty.db")
    assert ok == distinct == stats["ok"]  # every successful call made once
    print(f"\n30% faults: {stats['requests']} requests, {stats['ok']} calls answered, {faults} faults survived "
          f"({stats['faults']}), {stats['requests'] - stats['ok']} retries, {wall:.1f} s")


def test_when_every_call_fails_the_search_stops_early_and_resumes_without_paying_twice(server, tmp_path):
    from graphtune.cli import app

    runner = CliRunner()
    server.reset()
    server.set_faults({"500": 1.0})
    spec = write_spec(tmp_path, server, extra_env="  max_retries: 1", evaluations=12)  # default: stop after 20
    t0 = time.perf_counter()
    r = runner.invoke(app, ["optimize", str(spec), "--quiet"])
    stop_s = time.perf_counter() - t0
    made = server.requests()
    assert r.exit_code == 1, r.output
    out = r.output.strip()
    assert len(out.splitlines()) == 1 and out.startswith("error: model ")
    assert "20 calls in a row failed" in out and "Internal" in out and "Traceback" not in out
    # per model (2) a run of failures, plus the calls in flight (8), each with its retry
    assert made <= (2 * 20 + 8) * 2
    st = Storage(f"sqlite:///{tmp_path / 'g.db'}", create=False)
    assert st.get_study("faults").status != "complete"
    st.close()
    # the endpoint is back for a while: the search goes on, then the endpoint dies again mid-search
    server.set_faults({})
    r = runner.invoke(app, ["optimize", str(spec), "--quiet", "--evaluations", "4"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    server.set_faults({"500": 1.0})
    r = runner.invoke(app, ["optimize", str(spec), "--quiet"])
    assert r.exit_code == 1 and "calls in a row failed" in r.output
    before = trials_of(tmp_path / "g.db")
    server.set_faults({})
    r = runner.invoke(app, ["resume", "faults", "--storage", f"sqlite:///{tmp_path / 'g.db'}", "--quiet"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "best graph" in r.output
    after = trials_of(tmp_path / "g.db")
    finished = [t for t in before if t[4] in ("complete", "failed")]
    assert finished and all(t in after for t in finished)  # nothing finished was lost or rewritten
    assert len(after) == len(set(t[:4] for t in after))  # and no place of the search run twice
    ok, distinct = ledger_ok(tmp_path / "g.db")
    assert ok == distinct == server.stats()["ok"]  # no successful call was made twice
    print(f"\n100% failures: stopped after {stop_s:.2f} s and {made} requests")


def test_every_call_failing_never_recommends_a_graph_measured_on_zero_questions(server, tmp_path):
    from graphtune.cli import app

    server.set_faults({"500": 1.0})
    try:
        for method in ("random", "reinforce"):
            # one-node graphs, 2 x 8 runs: the budget is spent before 20 failures in a row stop it
            spec = write_spec(tmp_path, server, db=f"{method}.db", method=method, evaluations=2, max_nodes=1,
                              extra_env="  max_retries: 0")
            r = CliRunner().invoke(app, ["optimize", str(spec), "--quiet"])
            out = r.output.strip()
            assert r.exit_code == 1, out
            assert len(out.splitlines()) == 1 and "no graph was scored on any dev question" in out, out
            assert "nan" not in out.lower() and "Traceback" not in out
    finally:
        server.set_faults({})


def test_excluded_questions_are_stored_per_trial_and_reported_per_model(server, tmp_path):
    from graphtune.cli import app

    server.reset()
    server.set_faults({"500": 0.2}, fault_seed=1)
    try:
        spec = write_spec(tmp_path, server, extra_env="  max_retries: 0")
        r = CliRunner().invoke(app, ["optimize", str(spec), "--quiet"], catch_exceptions=False)
    finally:
        server.set_faults({})
    assert r.exit_code == 0, r.output
    st = Storage(f"sqlite:///{tmp_path / 'g.db'}", create=False)
    total: dict[str, int] = {}
    for t in st.list_trials(st.get_study("faults").id):
        failed = {res.question_id for res in st.trial_results(t.id) if res.error}
        excluded = t.metrics["excluded"]
        assert set(excluded) == failed  # which questions, stored with the trial
        assert set(excluded.values()) <= {"llama-3.2-1b", "llama-3.2-3b"}
        for m in excluded.values():
            total[m] = total.get(m, 0) + 1
    st.close()
    assert sum(total.values()) > 0
    flat = " ".join(x.strip("│ ") for x in r.output.splitlines())  # the panel wraps long lines
    line = flat[flat.index("excluded  "):]
    assert line.split()[:3] == ["excluded", str(sum(total.values())), "question"]
    for m, n in total.items():
        assert f"{m} {n}" in line


# -- pieces --------------------------------------------------------------------------------------


def _evaluation(name: str, outcomes: dict, trial: int):
    """An Evaluation of a one-node graph: question id -> 1.0/0.0 score, or None for an
    infrastructure failure."""
    from graphtune.envs.base import QuestionResult, summarize
    from graphtune.graphs.cost import GraphCost
    from graphtune.search.base import Candidate, Evaluation

    g = Graph.build([Node.make("a", "assistant", name)])
    res = tuple(QuestionResult(q, None, None, error="infrastructure: down") if v is None else
                QuestionResult(q, "1", bool(v), score=v) for q, v in outcomes.items())
    ok = [r.score for r in res if r.ok]
    return Evaluation(Candidate(graph=g), trial, name, res, summarize(res),
                      sum(ok) / len(ok) if ok else float("nan"), GraphCost(0, 0, 0, 0, 0, 0), len(res))


def _pick(*evals):
    from graphtune.search.base import Objective, pool_stats

    return recommend_by_coverage(pool_stats(evals, Objective(), 1.0))


def test_a_graph_that_lost_a_question_to_a_fault_competes_on_the_questions_both_have():
    qs = [f"q{i}" for i in range(8)]
    a = _evaluation("a", {q: float(i < 6) for i, q in enumerate(qs)}, 0)  # 6/8, and 5/7 on q1..q7
    b = _evaluation("b", {q: (None if i == 0 else float(i != 7)) for i, q in enumerate(qs)}, 1)  # 6/7 on q1..q7
    assert _pick(a, b).graph_hash == "b"  # before: b (7 scored of 8) could not compete
    # with every question on both, the best mean as before; ties to the earlier graph
    c = _evaluation("c", {q: float(i < 6) for i, q in enumerate(qs)}, 2)
    assert _pick(a, c).graph_hash == "a"
    # a graph scored on zero questions is never recommended
    z = _evaluation("z", {q: None for q in qs}, 3)
    assert _pick(z) is None


def test_retry_after_header_forms():
    now = 1_700_000_000.0
    assert llm.retry_after_s({"Retry-After": "7"}) == 7.0
    assert llm.retry_after_s({"retry-after": "0.25"}) == 0.25
    assert llm.retry_after_s({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    date = email.utils.formatdate(now + 42, usegmt=True)
    assert llm.retry_after_s({"Retry-After": date}, now=now) == pytest.approx(42, abs=1)
    assert llm.retry_after_s({"Retry-After": email.utils.formatdate(now - 5, usegmt=True)}, now=now) == 0.0
    for bad in ("soon", "", "-3", "nan"):
        assert llm.retry_after_s({"Retry-After": bad}) is None
    assert llm.retry_after_s(None) is None


@pytest.mark.parametrize("kind,header,cap,want", [
    ("429", "0.4", None, 0.4),  # seconds, honoured
    ("503", "date:30", 5.0, 5.0),  # an HTTP-date 30 s ahead, cut to the cap
    ("429", "1000", None, 60.0),  # the default cap (llm.RETRY_AFTER_MAX_S)
])
def test_retry_after_is_honoured_and_capped(kind, header, cap, want, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(llm, "_sleep", waits.append, raising=False)  # the waits between attempts
    with FakeOpenAIServer(fault_rates={kind: 1.0}, retry_after=header) as srv:
        with pytest.raises(LLMTransientError):
            llm.complete("openai/echo", [{"role": "user", "content": "hi"}], api_base=srv.api_base,
                         max_retries=2, timeout_s=5, **({} if cap is None else {"retry_after_max_s": cap}))
        assert srv.requests() == 3
    assert waits == [pytest.approx(want, abs=1.0 if header.startswith("date:") else 1e-6)] * 2


def test_retry_after_is_honoured_by_the_async_client_too(monkeypatch):
    import asyncio

    waits: list[float] = []

    async def fake_sleep(s):
        waits.append(s)

    monkeypatch.setattr(llm, "_asleep", fake_sleep, raising=False)
    with FakeOpenAIServer(fault_rates={"429": 1.0}, retry_after="0.7") as srv:
        with pytest.raises(LLMTransientError):
            asyncio.run(llm.acomplete("openai/echo", [{"role": "user", "content": "hi"}], api_base=srv.api_base,
                                      max_retries=1, timeout_s=5))
    assert waits == [0.7]


def test_executor_stops_after_a_run_of_failed_calls_naming_the_model(server):
    server.set_faults({"500": 1.0})
    exs = [Example(id=f"q{i}", question=f"What is {i}? ANSWER={i}", answer=str(i)) for i in range(60)]
    env = LiveEnvironment(exs, [], get_scorer("numeric"), build_prompts("math"),
                          {"pool-a": Endpoint("pool-a", "openai/echo", INFO, api_base=server.api_base)},
                          settings=CallSettings(max_retries=0, timeout_s=5),  # default: stop after 20
                          concurrency=2, ledger=MemoryLedger(), acomplete=live_acomplete(CallSettings()))
    try:
        before = server.requests()
        with pytest.raises(getattr(errors, "EndpointDownError", errors.LLMError)) as e:
            env.evaluate(Graph.build([Node.make("a", "assistant", "pool-a")]), env.split("dev"))
        msg = str(e.value)
        assert "'pool-a'" in msg and "20 calls in a row failed" in msg and "\n" not in msg
        assert server.requests() - before <= 20 + 2  # not the 60 questions
    finally:
        env.close()
        server.set_faults({})


def test_the_fault_server_is_deterministic_by_seed():
    def run(seed: int) -> list[int]:
        codes = []
        with FakeOpenAIServer(fault_rates={"500": 0.5}, fault_seed=seed) as srv:
            for i in range(30):
                try:
                    llm.complete("openai/echo", [{"role": "user", "content": f"q{i % 10}"}], api_base=srv.api_base,
                                 max_retries=0, timeout_s=5)
                    codes.append(200)
                except LLMTransientError:
                    codes.append(500)
        return codes

    a = run(1)
    assert a == run(1) and a != run(2) and 5 < a.count(500) < 25


# -- validate --check-endpoints ----------------------------------------------------------------


def test_validate_check_endpoints(server, tmp_path, monkeypatch):
    from graphtune.cli import app

    runner = CliRunner()
    server.set_faults({})
    spec = write_spec(tmp_path, server, models=("echo", "echo-b"))
    before = server.stats()["by_model"]
    r = runner.invoke(app, ["validate", str(spec), "--check-endpoints"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "endpoint llama-3.2-1b: ok" in r.output and "endpoint llama-3.2-3b: ok" in r.output
    after = server.stats()["by_model"]
    assert {m: after.get(m, 0) - before.get(m, 0) for m in ("echo", "echo-b")} == {"echo": 1, "echo-b": 1}
    # a missing key variable, a bad key, a dead endpoint: one line each, non-zero exit
    monkeypatch.delenv("GT_TEST_KEY", raising=False)
    text = spec.read_text().replace("litellm: openai/echo\n", "litellm: openai/badauth\n", 1)
    text = text.replace("litellm: openai/echo-b\n", "litellm: openai/echo-b\n    api_key_env: GT_TEST_KEY\n", 1)
    spec.write_text(text)
    r = runner.invoke(app, ["validate", str(spec), "--check-endpoints"])
    assert r.exit_code == 1, r.output
    lines = r.output.splitlines()
    small = next(x for x in lines if x.startswith("endpoint llama-3.2-1b:"))
    large = next(x for x in lines if x.startswith("endpoint llama-3.2-3b:"))
    assert "failed" in small and "API-key" in small
    assert "failed" in large and "GT_TEST_KEY" in large
    assert lines[-1].startswith("error: 2 of 2 endpoints failed")
    text = spec.read_text().replace(server.api_base, "http://127.0.0.1:9/v1")
    spec.write_text(text.replace("    api_key_env: GT_TEST_KEY\n", ""))
    r = runner.invoke(app, ["validate", str(spec), "--check-endpoints"])
    assert r.exit_code == 1 and "endpoint llama-3.2-3b: failed" in r.output


def test_a_worker_stops_early_too_and_the_study_continues_when_the_endpoint_is_back(server, tmp_path):
    from graphtune.cli import app

    runner = CliRunner()
    spec = write_spec(tmp_path, server, extra_env="  max_retries: 0", evaluations=12)  # default: stop after 20
    url = f"sqlite:///{tmp_path / 'g.db'}"
    args = ["worker", "--study", "faults", "--storage", url, "--spec", str(spec), "--quiet", "--poll", "0.05"]
    server.reset()
    server.set_faults({"500": 1.0})
    try:
        r = runner.invoke(app, args)
    finally:
        server.set_faults({})
    out = r.output.strip().splitlines()
    assert r.exit_code == 1, r.output
    assert out[-1].startswith("error: model ") and "20 calls in a row failed" in out[-1]
    st = Storage(url, create=False)
    assert st.get_study("faults").status != "complete"
    st.close()
    r = runner.invoke(app, args, catch_exceptions=False)  # the endpoint is back: the claim was released
    assert r.exit_code == 0, r.output
    st = Storage(url, create=False)
    study = st.get_study("faults")
    assert study.status == "complete"
    assert any(t.split == "test" for t in st.list_trials(study.id))
    st.close()
    ok, distinct = ledger_ok(tmp_path / "g.db")
    assert ok == distinct == server.stats()["ok"]


@pytest.mark.parametrize("line", ["  max_consecutive_failures: -1", "  retry_after_max_s: -5",
                                  "  max_consecutive_failures: many"])
def test_bad_failure_settings_are_one_line_spec_errors(server, tmp_path, line):
    from graphtune.errors import SpecError
    from graphtune.spec import load_spec

    with pytest.raises(SpecError) as e:
        load_spec(write_spec(tmp_path, server, extra_env=line))
    assert line.split(":")[0].strip() in str(e.value) and "\n" not in str(e.value)
