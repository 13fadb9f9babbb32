"""Live multi-stage pipelines against the fake OpenAI-compatible server (tests/fake_openai_server.py).

The fake server answers ``The answer is <x>. [<tag>]``, ``<x>`` the last ``ANSWER=<x>`` of
the prompt and ``<tag>`` a digest of the prompt, so a stage's reply is known and
recognisable in the next stage's prompt. Nothing here needs a network or an API key; the
last test (marker ``llm``) runs examples/multistage.yaml, cut down, on the local SmolLM2.
"""

from __future__ import annotations

import json
import math
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
from graphtune.envs.live import CallSettings, Endpoint, LiveEnvironment, critical_path_s  # noqa: E402
from graphtune.envs.live_pipeline import HEADING, LivePipelineEnvironment, LiveStage  # noqa: E402
from graphtune.envs.prompts import build_prompts  # noqa: E402
from graphtune.envs.scorers import get_scorer  # noqa: E402
from graphtune.errors import SpecError  # noqa: E402
from graphtune.graphs import Graph, ModelInfo, Node  # noqa: E402
from graphtune.graphs.pipeline import Pipeline, Stage  # noqa: E402
from graphtune.graphs.results import summarize_stages  # noqa: E402
from graphtune.store.ledger import MemoryLedger  # noqa: E402
from graphtune.store.storage import Storage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INFO = ModelInfo("m", 1e9, 16, 2048, usd_per_mtok_in=1.0, usd_per_mtok_out=3.0)


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def slow_server():
    with FakeOpenAIServer(latency_s=0.2) as srv:
        yield srv


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(llm, "BACKOFF_BASE_S", 0.01)


def examples(n: int = 4) -> list[Example]:
    return [Example(id=f"q{i}", question=f"What is {i} + 0? ANSWER={i}", answer=str(i)) for i in range(n)]


def one(nid: str, model: str) -> Graph:
    return Graph.build([Node.make(nid, "assistant", model)])


def vote(model: str, k: int = 2) -> Graph:
    nodes = [Node.make(f"a{i}", "assistant", model) for i in range(k)] + [Node.make("f", "fuser", model)]
    return Graph.build(nodes, [(f"a{i}", "f") for i in range(k)])


def make_env(srv, stages: list[LiveStage], models: dict[str, str], *, ledger=None, max_retries=2):
    eps = {name: Endpoint(name, f"openai/{lit}", INFO, api_base=srv.api_base) for name, lit in models.items()}
    settings = CallSettings(max_retries=max_retries, timeout_s=10, max_consecutive_failures=0)
    live = LiveEnvironment(examples(), [], get_scorer("numeric"), build_prompts("math"), eps, settings=settings,
                           concurrency=8, ledger=ledger if ledger is not None else MemoryLedger(),
                           acomplete=live_acomplete(settings))
    return LivePipelineEnvironment(live, stages)


def draft_verify(prompt: str | None = None) -> list[LiveStage]:
    return [LiveStage("draft", ("question",), build_prompts("text")),
            LiveStage("verify", ("question", "draft"), build_prompts("math"), prompt=prompt)]


def test_a_stage_prompt_holds_its_input_stage_answer_and_only_the_last_stage_is_scored(server):
    led = MemoryLedger()
    env = make_env(server, draft_verify(), {"m": "echo", "n": "echo-verify"}, ledger=led)
    p = Pipeline((Stage("draft", one("d", "m")), Stage("verify", vote("n"), ("question", "draft"))))
    try:
        res = env.evaluate(p, ["q1", "q2", "q3"])
    finally:
        env.close()
    assert [r.question_id for r in res] == ["q1", "q2", "q3"]
    calls = [(c.model, c.messages[-1]["content"]) for c in led.records()]
    for r in res:
        assert r.ok and r.correct is True and r.answer == r.question_id[1:]
        draft, verify = r.stages
        assert (draft.stage, verify.stage) == ("draft", "verify")
        assert draft.correct is None  # an intermediate stage has no scorer of its own
        assert verify.correct is True and verify.answer == r.answer
        assert [n.node_id for n in r.nodes] == ["draft/d", "verify/a0", "verify/a1", "verify/f"]
        assert r.nodes[0].correct is None and r.nodes[-1].correct is True
        # the draft's reply (with its prompt digest) is in every verify call's prompt, under its heading
        verify_prompts = [text for (model, text) in calls if model == "n" and r.question_id[1:] in text
                          and f"What is {r.question_id[1:]} + 0" in text]
        assert len(verify_prompts) == 3  # two assistants and the fuser
        for text in verify_prompts:
            assert HEADING.format(stage="draft") + "\n" + draft.answer.strip() in text
        assert "[" in draft.answer  # the fake's digest tag: the real reply went in, not a summary
        # costs add up over the stages; each stage its own
        assert r.prompt_tokens == draft.prompt_tokens + verify.prompt_tokens > 0
        assert r.usd == pytest.approx(draft.usd + verify.usd) and r.flops == pytest.approx(draft.flops + verify.flops)
    [s_draft, s_verify] = summarize_stages(res)
    assert s_draft.n_scored == 0 and s_verify.accuracy == 1.0


def test_a_stage_prompt_template_places_the_question_and_the_answers(server):
    led = MemoryLedger()
    env = make_env(server, draft_verify("Check this draft: {draft}\nfor: {question}"), {"m": "echo"}, ledger=led)
    p = Pipeline((Stage("draft", one("d", "m")), Stage("verify", one("v", "m"), ("question", "draft"))))
    try:
        [r] = env.evaluate(p, ["q2"])
    finally:
        env.close()
    texts = [c.messages[-1]["content"] for c in led.records()]
    want = f"Check this draft: {r.stages[0].answer.strip()}\nfor: What is 2 + 0? ANSWER=2"
    assert sum(want in t for t in texts) == 1 and r.correct is True


def test_an_infrastructure_failure_in_stage_one_is_not_scored_wrong(server):
    env = make_env(server, draft_verify(), {"down": "down-stage1", "m": "echo-after"}, max_retries=0)
    p = Pipeline((Stage("draft", one("d", "down")), Stage("verify", one("v", "m"), ("question", "draft"))))
    server.reset()
    try:
        res = env.evaluate(p, ["q0", "q1", "q2"])
    finally:
        env.close()
    for r in res:
        assert r.correct is None and r.error.startswith("infrastructure: stage 'draft':")
        assert r.failed_model == "down"
        assert [s.stage for s in r.stages] == ["draft"]  # the verify stage never ran
    m = summarize(res)
    assert m.n_errors == 3 and m.n_scored == 0 and math.isnan(m.accuracy)
    assert "echo-after" not in server.stats()["by_model"]  # nothing paid downstream of the failure


def test_latency_follows_the_critical_path_and_independent_stages_run_side_by_side(slow_server):
    # a and b read only the question; c reads both: latency = max(a, b) + c
    stages = [LiveStage("a", ("question",), build_prompts("math")),
              LiveStage("b", ("question",), build_prompts("math")),
              LiveStage("c", ("question", "a", "b"), build_prompts("math"))]
    env = make_env(slow_server, stages, {"m": "echo"})
    chain = Graph.build([Node.make("x", "assistant", "m"), Node.make("y", "assistant", "m")], [("x", "y")])
    p = Pipeline((Stage("a", chain), Stage("b", one("z", "m")), Stage("c", one("w", "m"), ("question", "a", "b"))))
    try:
        [r] = env.evaluate(p, ["q1"])
    finally:
        env.close()
    sa, sb, sc = r.stages
    node_lat = {n.node_id: n.latency_s for n in r.nodes}
    assert sa.latency_s == pytest.approx(node_lat["a/x"] + node_lat["a/y"])  # a stage: its graph's critical path
    assert r.latency_s == pytest.approx(max(sa.latency_s, sb.latency_s) + sc.latency_s)
    assert r.latency_s < sa.latency_s + sb.latency_s + sc.latency_s
    assert sc.latency_s > 0.1 and sa.latency_s > sb.latency_s


def test_a_rerun_is_served_from_the_ledger_and_a_changed_upstream_stage_pays_downstream_again(server):
    led = MemoryLedger()
    env = make_env(server, draft_verify(), {"m": "echo", "m2": "echo-acc0"}, ledger=led)
    p = Pipeline((Stage("draft", one("d", "m")), Stage("verify", one("v", "m"), ("question", "draft"))))
    try:
        first = env.evaluate(p, ["q1", "q2"])
        made = env.executor.stats.made
        again = env.evaluate(p, ["q1", "q2"])
        assert env.executor.stats.made == made and again == first  # every call served from the ledger
        other = p.replace_stage("draft", one("d", "m2"))  # another draft answer: verify's prompt changes
        env.evaluate(other, ["q1", "q2"])
        assert env.executor.stats.made == made + 4  # 2 drafts + 2 verifications, nothing wrongly served
    finally:
        env.close()


# -- the app: spec, optimize, run ------------------------------------------------------------

SPEC = """\
study: {study}
task:
  dataset: qs.jsonl
  scorer: numeric
  dev_size: 4
  test_size: 4
models:
  - name: llama-3.2-1b
    litellm: openai/echo
    api_base: {api_base}
  - name: llama-3.2-3b
    litellm: openai/echo-big
    api_base: {api_base}
pipeline:
  stages:
    - name: extract
      prompt: "List the numbers of: {{question}}"
      prompts: {{style: text, answer_format: "Only list them."}}
      space: {{max_nodes: 2}}
    - name: compute
      space: {{max_nodes: 3, models: [llama-3.2-3b]}}
budget:
  units: 12
search:
  method: random
  evaluations: 3
  batch_size: 2
env:
  kind: live
  concurrency: 8
  max_tokens: 32
storage: sqlite:///{db}
"""


def write_spec(tmp_path: Path, srv, study: str = "pipe") -> Path:
    (tmp_path / "qs.jsonl").write_text("".join(json.dumps({"id": f"x{i}", "question": f"What is {i}+1? ANSWER={i + 1}",
                                                           "answer": str(i + 1)}) + "\n" for i in range(8)))
    p = tmp_path / "pipe.yaml"
    p.write_text(SPEC.format(study=study, api_base=srv.api_base, db=tmp_path / "g.db"))
    return p


def test_spec_builds_a_live_pipeline_with_a_cost_model_per_stage(server, tmp_path):
    from graphtune.api import build_problem
    from graphtune.spec import load_spec

    p = build_problem(load_spec(write_spec(tmp_path, server)))
    try:
        env, costs = p.env, p.costs
        assert env.kind == "live" and len(p.ctx.dev_ids) == 4 and len(p.test_ids) == 4
        ex, co = costs.of("extract").shape, costs.of("compute").shape
        assert ex.output_tokens == co.output_tokens == 32
        # compute's prompt holds the question under its default text plus extract's answer (B = 32)
        assert co.input_tokens >= 32 + 5 and ex.input_tokens > 5
        assert env.stages[0].prompts.answer_format == "Only list them." and env.stages[0].prompts.style == "text"
        assert env.stages[1].prompts.style == "math"  # implied by the task's scorer
        assert not (tmp_path / "g.db").exists()  # building writes nothing
    finally:
        p.env.close()


def test_spec_refuses_a_pipeline_no_stage_can_afford(server, tmp_path):
    from graphtune.api import build_problem
    from graphtune.spec import load_spec

    spec = write_spec(tmp_path, server)
    spec.write_text(spec.read_text().replace("units: 12", "units: 1"))
    with pytest.raises(Exception, match="cheapest pipeline") as e:
        build_problem(load_spec(spec)).env.close()
    assert "\n" not in str(e.value)


def test_cli_optimize_stores_stage_outcomes_and_reports_each_stage(server, tmp_path):
    from graphtune.cli import app

    spec = write_spec(tmp_path, server)
    r = CliRunner().invoke(app, ["optimize", str(spec), "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "test accuracy   1.000" in r.output
    assert "stage extract" in r.output and "stage compute" in r.output
    store = Storage(f"sqlite:///{tmp_path / 'g.db'}")
    try:
        st = store.get_study("pipe")
        trials = [t for t in store.list_trials(st.id) if t.status == "complete"]
        assert trials
        for t in trials:
            for res in store.trial_results(t.id):
                assert [s.stage for s in res.stages] == ["extract", "compute"]
                assert res.stages[0].correct is None and res.stages[1].correct is True
                assert all(n.node_id.split("/")[0] in ("extract", "compute") for n in res.nodes)
    finally:
        store.close()
    before = server.requests()
    r = CliRunner().invoke(app, ["optimize", str(spec), "--quiet", "--study", "again"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert server.requests() == before  # the same pipelines again: every call from the ledger


def test_cli_run_executes_a_pipeline_file(server, tmp_path):
    import yaml

    from graphtune.cli import app
    from graphtune.graphs import pipeline as P

    spec = write_spec(tmp_path, server)
    runner = CliRunner()
    p = Pipeline((Stage("extract", one("e", "llama-3.2-1b")),
                  Stage("compute", vote("llama-3.2-3b"), ("question", "extract"))))
    out = tmp_path / "best.yaml"  # what `graphtune export --format yaml` writes of a pipeline study
    out.write_text(yaml.safe_dump({**P.to_dict(p), "name": "pipe trial 3", "metrics": {"dev_accuracy": 1.0}},
                                  sort_keys=False))
    r = runner.invoke(app, ["run", str(out), "--spec", str(spec), "--question", "What is 5+5? ANSWER=10", "--nodes"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "== stage extract" in r.output and "== stage compute" in r.output
    assert "List the numbers of: What is 5+5? ANSWER=10" in r.output  # extract's question text
    assert HEADING.format(stage="extract") in r.output  # compute's, by default, under a heading
    assert "[extract/" in r.output and "[compute/" in r.output
    assert "answer    The answer is 10" in r.output and "latency" in r.output
    r = runner.invoke(app, ["run", str(out), "--spec", str(spec), "--dataset", str(tmp_path / "qs.jsonl"),
                            "--limit", "3"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "accuracy  1.000 on 3 scored of 3" in r.output and "stage compute" in r.output
    # a pipeline whose stages are not the spec's is refused in one line
    bad = tmp_path / "bad.yaml"
    bad.write_text(out.read_text().replace("name: compute", "name: solve").replace("- compute", "- solve"))
    r = runner.invoke(app, ["run", str(bad), "--spec", str(spec), "--question", "x"])
    assert r.exit_code == 2 and "not the spec's pipeline.stages" in r.output
    bad.write_text(out.read_text().replace("model: llama-3.2-3b", "model: gpt-9"))
    r = runner.invoke(app, ["run", str(bad), "--spec", str(spec), "--question", "x"])
    assert r.exit_code == 2 and "stage 'compute'" in r.output and "not in the spec's pool" in r.output


def test_cli_validate_prints_each_stage_of_a_pipeline_spec(server, tmp_path):
    from graphtune.cli import app

    spec = write_spec(tmp_path, server)
    before = server.requests()
    r = CliRunner().invoke(app, ["validate", str(spec)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "stage extract (<- question): models llama-3.2-1b, llama-3.2-3b" in r.output
    assert "stage compute (<- question, extract): models llama-3.2-3b" in r.output
    assert "budget per query, whole pipeline: units <= 12" in r.output
    assert "graphs per stage (up to isomorphism, the other stages at their cheapest): extract " in r.output
    assert server.requests() == before and not (tmp_path / "g.db").exists()  # validate runs and writes nothing
    # the 3B extracting, with compute's cheapest graph, breaks 7.5 units (the 1B's 6.77 fit): named with its stage
    spec.write_text(spec.read_text().replace("units: 12", "units: 7.5"))
    r = CliRunner().invoke(app, ["validate", str(spec)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "warning: stage 'extract': model 'llama-3.2-3b' can never be used there" in r.output
    assert "model 'llama-3.2-1b' can never" not in r.output


def test_a_stage_prompt_naming_an_unknown_input_is_refused(server, tmp_path):
    from graphtune.spec import load_spec

    spec = write_spec(tmp_path, server)
    spec.write_text(spec.read_text().replace("List the numbers of: {question}", "Use {compute}"))
    with pytest.raises(SpecError, match="not the question or an input"):
        load_spec(spec)


# -- a real model ---------------------------------------------------------------------------


@pytest.mark.llm
def test_multistage_example_runs_end_to_end_on_the_local_model(tmp_path):
    from fakes import skip_without_local_llm

    skip_without_local_llm()
    from graphtune.api import optimize
    from graphtune.spec import load_spec

    db = f"sqlite:///{tmp_path / 'local.db'}"
    over = {"storage": db, "search.evaluations": 1, "task.dev_size": 2, "task.test_size": 2, "env.max_tokens": 24}
    problem, study, out = optimize(load_spec(ROOT / "examples" / "multistage.yaml", overrides=over))
    stats = problem.env.executor.stats
    assert stats.made > 0 and stats.failed == 0
    assert out.best is not None and study.runs_spent == 2
    for r in out.test_results:
        assert r.ok and [s.stage for s in r.stages] == ["extract", "compute"]
        assert r.stages[0].correct is None and r.stages[1].correct in (True, False)
        assert r.stages[0].answer.strip() and r.latency_s > 0 and r.flops > 0
        assert r.latency_s == pytest.approx(r.stages[0].latency_s + r.stages[1].latency_s)


def _cut_down_example(tmp_path: Path) -> Path:
    """examples/multistage.yaml made short: 2 dev and 2 test questions, 3 trials of one
    pipeline each, 16-token replies, and one llama.cpp slot (calls one at a time, so a call
    made again after a kill gets the same reply as in the uninterrupted run)."""
    import re

    text = (ROOT / "examples" / "multistage.yaml").read_text()
    for pat, new in ((r"(?m)^  dev_size: \d+", "  dev_size: 2"), (r"(?m)^  test_size: \d+", "  test_size: 2"),
                     (r"(?m)^  evaluations: \d+", "  evaluations: 3"), (r"(?m)^  batch_size: \d+", "  batch_size: 1"),
                     (r"(?m)^  max_tokens: \d+", "  max_tokens: 16"),
                     (r"(?m)^    max_concurrency: \d+", "    max_concurrency: 1")):
        text, n = re.subn(pat, new, text)
        assert n == 1, pat
    p = tmp_path / "multistage-short.yaml"
    p.write_text(text)
    return p


@pytest.mark.llm
@pytest.mark.timeout(900)
def test_the_local_multistage_example_resumes_after_kill9_with_the_same_result(tmp_path):
    """`graphtune optimize` of the example (cut down) killed with SIGKILL once a trial is
    stored, then `graphtune resume`: the same trials, pipelines, rewards, state and test
    score as an uninterrupted run, and no call recorded twice."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from fakes import skip_without_local_llm
    from kill9_resume import _comparable, snapshot

    skip_without_local_llm()
    spec = _cut_down_example(tmp_path)
    cli = [sys.executable, "-c", "from graphtune.cli import main; main()"]
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}

    def run(args, **kw):
        return subprocess.run([*cli, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, **kw)

    ref_db = tmp_path / "ref.db"
    p = run(["optimize", str(spec), "--quiet", "--storage", f"sqlite:///{ref_db}"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ref = snapshot(ref_db, "multistage")

    db = tmp_path / "killed.db"
    proc = subprocess.Popen([*cli, "optimize", str(spec), "--quiet", "--storage", f"sqlite:///{db}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t0 = time.monotonic()
        while True:  # kill once the first trial is stored (the search is under way, calls in the ledger)
            assert proc.poll() is None, "the search finished before it could be killed"
            assert time.monotonic() - t0 < 300
            if db.exists():
                import sqlite3

                con = sqlite3.connect(db, timeout=30)
                try:
                    n = con.execute("select count(*) from gt_trials where status='complete'").fetchone()[0]
                except sqlite3.OperationalError:  # tables not there yet
                    n = 0
                finally:
                    con.close()
                if n >= 1:
                    break
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # graphtune and its llama.cpp server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    mid = snapshot(db, "multistage")
    assert mid["status"] != "complete" and 0 < len(mid["trials"]) < len(ref["trials"])
    p = run(["resume", "multistage", "--quiet", "--storage", f"sqlite:///{db}"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = snapshot(db, "multistage")
    assert got["status"] == "complete"
    assert got["trials"] == ref["trials"] and got["test"] == ref["test"]
    assert _comparable(got["state"]) == _comparable(ref["state"])
    assert got["duplicate_places"] == [] and got["duplicate_ledger_calls"] == []
