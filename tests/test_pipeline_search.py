"""`reinforce` and `agent-reinforce` on multi-stage pipelines: a distribution per stage, a
learned budget split, per-stage agent reports and updates (search/pipeline_policy.py,
search/pipeline_critic.py, agent/pipeline.py)."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphtune.agent.pipeline import proposal_to_pipeline
from graphtune.agent.schema import AgentUpdate, GraphProposal
from graphtune.api import build_problem, make_searcher
from graphtune.errors import BudgetError, GraphError
from graphtune.graphs.design import design_from_dict, validate_design
from graphtune.graphs.model import Graph, Node
from graphtune.graphs.pipeline import Pipeline
from graphtune.search.agent_reinforce import AgentReinforceSearcher
from graphtune.search.loop import evaluate_candidate, run_search
from graphtune.search.pipeline_policy import BudgetSplit, PipelinePolicy, share_grid
from graphtune.search.reinforce import ReinforceSearcher
from graphtune.spec import load_spec
from graphtune.store import MemoryStorage

POOL = "models: [{name: llama-3.2-1b}, {name: llama-3.2-3b}, {name: llama-3.1-8b}, {name: llama-3.1-70b}]\n"
# the RAG spec of tests/test_pipeline_study.py
RAG = """
study: rag
task: {profile: pipeline-rag, dev_size: 40, test_size: 100}
""" + POOL + """
pipeline:
  stages:
    - {name: retrieve, description: pick the supporting passages, space: {max_nodes: 3}}
    - {name: answer, space: {models: [llama-3.2-3b, llama-3.1-8b], max_nodes: 5}, budget: {units: 300}}
budget: {units: 600}
search: {method: METHOD, evaluations: EVALS, batch_size: 6, seed: SEED}
"""
# the answering stage may sample widely (docs/pipelines.md: it gains from many 3B samples)
RAG_WIDE = RAG.replace("max_nodes: 5}", "max_nodes: 9, max_width: 8, max_in_degree: 8}")
TOOL = """
study: tool
task: {profile: pipeline-tool-use, dev_size: 40, test_size: 200}
""" + POOL + """
pipeline:
  stages:
    - {name: decompose, space: {max_nodes: 3}}
    - {name: select, space: {max_nodes: 3}}
    - {name: fill, space: {max_nodes: 4}}
budget: {units: 600}
search: {method: METHOD, evaluations: EVALS, batch_size: 6, seed: SEED}
"""


def problem(tmp_path: Path, text: str, method: str, *, seed: int = 0, evaluations: int = 8, agent: str = ""):
    p = tmp_path / f"{method}-{seed}.yaml"
    body = text.replace("METHOD", method).replace("SEED", str(seed)).replace("EVALS", str(evaluations))
    if agent:
        body = body.replace("seed: %d}" % seed, "seed: %d, agent: %s}" % (seed, agent))
    p.write_text(textwrap.dedent(body))
    spec = load_spec(p)
    return spec, build_problem(spec)


def run(tmp_path, text, method, *, seed=0, evaluations=8, searcher=None):
    spec, pr = problem(tmp_path, text, method, seed=seed, evaluations=evaluations)
    store = MemoryStorage()
    st = store.create_study("s", method, {})
    s = searcher(pr.ctx) if searcher else make_searcher(spec, pr.ctx)
    out = run_search(s, pr.env, store, st, pr.ctx, budget_runs=pr.ctx.budget_runs, test_ids=pr.test_ids)
    return out, pr, s, store, st


def true_accuracy(pr, out) -> float:
    return pr.env.accuracy(out.best.graph, list(pr.env.split("test")))


# -- the budget split ------------------------------------------------------------------------


def test_the_split_grid_covers_positive_shares_and_a_shift_moves_budget_to_the_named_stage():
    g = share_grid(2)
    assert g.shape == (11, 2) and np.allclose(g.sum(axis=1), 1) and g.min() > 0
    assert len(share_grid(3)) <= 40 and np.allclose(share_grid(3).sum(axis=1), 1)
    s = BudgetSplit(("retrieve", "answer"))
    assert s.expected_shares() == pytest.approx({"retrieve": 0.5, "answer": 0.5})
    s.shift("retrieve", 1.0)
    assert s.expected_shares()["retrieve"] > 0.6
    with pytest.raises(ValueError):
        s.shift("nope", 1.0)  # callers check names first; an unknown one is not silently ignored
    state = json.loads(json.dumps(s.state_dict()))
    t = BudgetSplit(("retrieve", "answer"))
    t.load_state_dict(state)
    assert t.expected_shares() == s.expected_shares()
    with pytest.raises(GraphError, match="start a new study"):
        BudgetSplit(("a", "b", "c")).load_state_dict(state)


# -- every proposal is a valid pipeline within budget and caps ------------------------------


@pytest.mark.parametrize("method", ["reinforce", "agent-reinforce"])
def test_every_proposal_is_a_valid_pipeline_within_the_budget_and_the_stage_caps(tmp_path, method):
    out, pr, s, store, st = run(tmp_path, RAG, method, evaluations=6)
    assert isinstance(s.policy, PipelinePolicy) and set(s.policy.pgs) == {"retrieve", "answer"}
    trials = store.list_trials(st.id)
    assert len(trials) > 10
    origins = set()
    for t in trials:
        p = design_from_dict(t.graph)
        assert isinstance(p, Pipeline) and [x.name for x in p.stages] == ["retrieve", "answer"]
        assert t.error is None, t.error
        cost = validate_design(p, pr.ctx.space, pr.ctx.costs, pr.ctx.budget)
        assert cost.total.units <= 600 + 1e-6 and cost.stage("answer").units <= 300 + 1e-6
        origins.add(t.origin)
        if t.origin == "sample" and not t.info.get("fallback"):
            shares = t.info["shares"]
            assert set(shares) == {"retrieve", "answer"} and sum(shares.values()) == pytest.approx(1, abs=1e-3)
    assert "sample" in origins
    if method == "agent-reinforce":
        assert {"probe", "agent"} <= origins
    assert isinstance(out.best.graph, Pipeline) and out.test_results  # recommended and scored once on test
    json.dumps(store.get_study("s").searcher_state, allow_nan=False)


def test_the_policy_step_moves_every_stage_and_the_split(tmp_path):
    spec, pr = problem(tmp_path, RAG, "reinforce")
    s = ReinforceSearcher(pr.ctx)
    store = MemoryStorage()
    st = store.create_study("s", "reinforce", {})
    before = {n: pg.params.copy() for n, pg in s.policy.pgs.items()}, s.policy.split.logits.copy()
    for k in range(3):
        cands = s.ask()
        evs = [evaluate_candidate(c, env=pr.env, storage=store, study=st, ctx=pr.ctx, method="reinforce", batch=k,
                                  slot=i) for i, c in enumerate(cands)]
        s.tell(evs)
    for n, pg in s.policy.pgs.items():
        assert not np.allclose(pg.params, before[0][n]), n
    assert not np.allclose(s.policy.split.logits, before[1])


# -- the search beats random at equal budget --------------------------------------------------


def test_policy_searches_beat_random_on_the_tool_use_pipeline(tmp_path):
    """Measured (seeds 0-2, 12 evaluations of 40 dev questions, true accuracy on 200 test
    questions): agent-reinforce 0.678, reinforce 0.540, random 0.462 (docs/pipelines.md)."""
    means = {}
    for method in ("random", "reinforce", "agent-reinforce"):
        accs = []
        for sd in (0, 1, 2):
            out, pr, *_ = run(tmp_path, TOOL, method, seed=sd, evaluations=12)
            accs.append(true_accuracy(pr, out))
        means[method] = float(np.mean(accs))
    assert means["reinforce"] >= means["random"] + 0.04, means
    assert means["agent-reinforce"] >= means["random"] + 0.15, means


def test_the_learned_split_moves_toward_retrieval_on_rag(tmp_path):
    """On rag, retrieval gains from one call of the 70B (339 of the 600 units) and answering
    from many samples of the 3B (docs/pipelines.md): the split must learn to give retrieval
    more than half the budget. Measured expected retrieval shares (seeds 0-2, 40
    evaluations): 0.57, 0.56, 0.58 (agent-reinforce: 0.78, 0.70, 0.81)."""
    for sd in (0, 1, 2):
        out, pr, s, *_ = run(tmp_path, RAG_WIDE, "reinforce", seed=sd, evaluations=40)
        assert s.policy.split.expected_shares()["retrieve"] > 0.53, sd
        retrieve = out.best.graph.stage("retrieve").graph
        assert any(n.model == "llama-3.1-70b" for n in retrieve.nodes), (sd, retrieve)


# -- exact resume -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ReinforceSearcher, AgentReinforceSearcher])
def test_a_killed_pipeline_study_resumes_asking_the_same_batches(tmp_path, cls):
    spec, pr = problem(tmp_path, RAG, cls.name, evaluations=12)
    ctx, env = pr.ctx, pr.env
    a, b = cls(ctx), cls(ctx)
    store = MemoryStorage()
    st = store.create_study("s", cls.name, {})
    told = []

    def evals(cands, batch):
        return [evaluate_candidate(c, env=env, storage=store, study=st, ctx=ctx, method=cls.name, batch=batch, slot=i)
                for i, c in enumerate(cands)]

    for k in range(3):
        evs = evals(a.ask(), k)
        a.tell(evs)
        told += evs
    state = json.dumps(a.state_dict(), allow_nan=False)
    assert len(state) < 64_000  # small, plain JSON
    b.load_state_dict(json.loads(state))
    b.restore(told)
    for k in range(3, 6):
        ca, cb = a.ask(), b.ask()
        assert [(c.origin, c.graph, c.question_ids, c.parents, dict(c.info)) for c in ca] == \
               [(c.origin, c.graph, c.question_ids, c.parents, dict(c.info)) for c in cb]
        evs = evals(ca, k)
        a.tell(evs)
        b.tell(evs)
    sa, sb = a.state_dict(), b.state_dict()
    for s_ in (sa, sb):
        s_.get("usage", {}).pop("seconds", None)
    assert sa == sb


def test_a_single_stage_state_is_refused_by_a_pipeline_study(tmp_path):
    spec, pr = problem(tmp_path, RAG, "reinforce")
    s = ReinforceSearcher(pr.ctx)
    state = s.state_dict()
    state.pop("pgs")
    state["pg"] = {}
    with pytest.raises(GraphError, match="start a new study"):
        ReinforceSearcher(pr.ctx).load_state_dict(state)


# -- the agent on pipelines -------------------------------------------------------------------


def _one(model: str, nid: str = "a") -> dict:
    return {"nodes": [{"id": nid, "role": "assistant", "model": model}], "edges": []}


def test_agent_proposals_are_built_and_checked_per_stage(tmp_path):
    spec, pr = problem(tmp_path, RAG, "agent-reinforce")
    sp, costs, budget = pr.ctx.space, pr.ctx.costs, pr.ctx.budget
    base = sp.pipeline({"retrieve": Graph.build([Node.make("r", "assistant", "llama-3.1-8b")]),
                        "answer": Graph.build([Node.make("a", "assistant", "llama-3.2-3b")])})
    # a change of one stage keeps the incumbent's other stages
    p = proposal_to_pipeline(GraphProposal(**_one("llama-3.1-8b"), stage="answer"), sp, costs, budget, base)
    assert p.stage("answer").graph.nodes[0].model == "llama-3.1-8b" and p.stage("retrieve") == base.stage("retrieve")
    # without a stage: the last stage; a whole pipeline names the others
    whole = GraphProposal(**_one("llama-3.2-3b"), other_stages=[{"stage": "retrieve", **_one("llama-3.1-70b")}])
    p = proposal_to_pipeline(whole, sp, costs, budget, None)
    assert p.stage("retrieve").graph.nodes[0].model == "llama-3.1-70b"
    bad = [
        (GraphProposal(**_one("llama-3.2-3b"), stage="rerank"), GraphError, "unknown stage 'rerank'"),
        # the 1B is not in the answering stage's pool: the reason names the stage
        (GraphProposal(**_one("llama-3.2-1b"), stage="answer"), GraphError, "stage 'answer'"),
        (GraphProposal(**_one("llama-3.2-3b"), stage="answer",
                       other_stages=[{"stage": "answer", **_one("llama-3.2-3b")}]), GraphError, "given twice"),
        (GraphProposal(**_one("llama-3.2-3b")), GraphError, "no incumbent"),
    ]
    for prop, err, words in bad:
        with pytest.raises(err, match=words) as e:
            proposal_to_pipeline(prop, sp, costs, budget, base if "incumbent" not in words else None)
        assert "\n" not in str(e.value)
    # two 70B retrievals (339 units each) put the pipeline over its 600 units
    two = {"nodes": [{"id": "x", "role": "assistant", "model": "llama-3.1-70b"},
                     {"id": "y", "role": "assistant", "model": "llama-3.1-70b"},
                     {"id": "s", "role": "fuser", "model": "llama-3.2-1b"}], "edges": [["x", "s"], ["y", "s"]]}
    over = GraphProposal(**two, stage="retrieve")
    with pytest.raises(BudgetError, match="over budget"):
        proposal_to_pipeline(over, sp, costs, budget, base)


@dataclass
class FakeReply:
    text: str
    prompt_tokens: int = 10
    completion_tokens: int = 10
    seconds: float = 0.01
    model: str = "fake/llm"


REPLY = {
    "feedback": "retrieval loses most answers: spend there",
    "stage_preferences": [{"stage": "retrieve", "model_preference": {"llama-3.1-70b": 1.0}},
                          {"stage": "rerank", "model_preference": {"llama-3.2-3b": 1.0}}],
    "budget_split": {"retrieve": 1.0, "rerank": 1.0},
    "edge_changes": [{"src": "s0", "dst": "s4", "delta": 1.0, "stage": "answer"},
                     {"src": "s0", "dst": "s1", "delta": 1.0, "stage": "nowhere"}],
    "model_preference": {"llama-3.2-3b": 0.5},
    "proposals": [{**_one("llama-3.1-8b"), "stage": "retrieve"}, {**_one("llama-3.2-3b"), "stage": "rerank"}],
    "confidence": 0.8,
}


def test_an_llm_agent_sees_stages_and_its_unknown_stage_names_are_recorded_not_fatal(tmp_path):
    prompts = []

    def complete(model, messages, **kw):
        assert "multi-stage pipeline" in messages[0]["content"]
        prompts.append(messages[-1]["content"])
        return FakeReply(json.dumps(REPLY))

    spec, pr = problem(tmp_path, RAG, "agent-reinforce", evaluations=6, agent="{model: fake/llm, max_retries: 0}")
    store = MemoryStorage()
    st = store.create_study("s", "agent-reinforce", {})
    s = AgentReinforceSearcher(pr.ctx, complete=complete)
    run_search(s, pr.env, store, st, pr.ctx, budget_runs=pr.ctx.budget_runs, test_ids=pr.test_ids)
    assert store.get_study("s").status == "complete"
    assert "STAGE retrieve" in prompts[0] and "STAGE answer" in prompts[0] and "budget_split" in prompts[0]
    assert any("stage accuracy" in p and "lost the answer" in p for p in prompts[1:])
    steps = store.agent_steps(st.id)
    assert steps and all(x["rejected_reason"] is None for x in steps)
    d = steps[0]["applied"]["deltas"]
    assert d["budget_split"]["retrieve"] > 0 and "rerank" not in d["budget_split"]
    assert d["stages"]["retrieve"]["model"]["llama-3.1-70b"] > 0
    assert d["stages"]["answer"]["edges"] and d["stages"]["answer"]["model"]["llama-3.2-3b"] > 0
    rej = " | ".join(d["rejected"])
    for words in ("stage_preferences: unknown stage 'rerank'", "budget_split: unknown stage 'rerank'",
                  "edge_changes: unknown stage 'nowhere'"):
        assert words in rej
    props = steps[0]["applied"]["proposals"]
    assert props[0]["status"] == "queued" and props[0]["stage"] == "retrieve"
    assert props[1]["status"] == "rejected" and "unknown stage 'rerank'" in props[1]["reason"]
    agent_trials = [t for t in store.list_trials(st.id) if t.origin == "agent"]
    assert agent_trials and all(t.info["stage"] == "retrieve" for t in agent_trials)


def test_the_heuristic_agent_reports_per_stage_attribution_and_moves_the_split(tmp_path):
    out, pr, s, store, st = run(tmp_path, RAG_WIDE, "agent-reinforce", evaluations=12)
    steps = store.agent_steps(st.id)
    assert steps[0]["kind"] == "init" and "STAGE retrieve" in steps[0]["prompt"]
    # retrieval's best model alone (the 70B, 339 of 600 units) needs more than half the budget
    assert steps[0]["applied"]["deltas"]["budget_split"]["retrieve"] > 0
    fb = [x for x in steps if x["kind"] == "feedback"]
    assert fb
    for x in fb:
        assert set(x["applied"]["incumbent_stages"]) == {"retrieve", "answer"}
        for v in x["applied"]["incumbent_stages"].values():
            assert v["cost_units"] > 0 and v["lost"] >= 0 and "[" in v["graph"]
        assert set(x["applied"]["deltas"]["stages"]) == {"retrieve", "answer"}
    assert "not an LLM" in fb[-1]["feedback"] and "Budget split" in " ".join(x["feedback"] for x in fb)
    assert any(x["applied"]["deltas"]["budget_split"] for x in fb)
    # its proposals are whole pipelines, each within the budget
    for t in store.list_trials(st.id):
        if t.origin == "agent":
            validate_design(design_from_dict(t.graph), pr.ctx.space, pr.ctx.costs, pr.ctx.budget)


def test_the_update_schema_takes_stage_fields_and_a_single_stage_reply_is_unchanged():
    u = AgentUpdate.model_validate(REPLY)
    assert u.stage_preferences[0].stage == "retrieve" and u.budget_split == {"retrieve": 1.0, "rerank": 1.0}
    assert u.proposals[0].stage == "retrieve" and u.edge_changes[0].stage == "answer"
    plain = AgentUpdate.model_validate({"feedback": "x", "model_preference": {"a": 1.0}})
    assert plain.stage_preferences == [] and plain.budget_split == {}
    with pytest.raises(ValueError):
        AgentUpdate.model_validate({"feedback": "x", "budget_split": {"retrieve": float("nan")}})


# -- from the CLI, on SQLite: the stored steps and the report's timeline ----------------------


@pytest.mark.parametrize("method", ["reinforce", "agent-reinforce"])
def test_graphtune_optimize_runs_a_policy_search_on_a_pipeline_and_resumes_as_finished(tmp_path, method):
    from typer.testing import CliRunner

    from graphtune.cli import app
    from graphtune.report import _changes
    from graphtune.store import Storage

    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = tmp_path / "rag.yaml"
    spec.write_text(textwrap.dedent(RAG.replace("METHOD", method).replace("SEED", "0").replace("EVALS", "6"))
                    + f"storage: {url}\n")
    r = CliRunner().invoke(app, ["optimize", str(spec), "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    store = Storage(url)
    st = store.get_study("rag")
    trials = [(t.batch, t.slot, t.graph_hash) for t in store.list_trials(st.id)]
    r2 = CliRunner().invoke(app, ["optimize", str(spec), "--quiet"], catch_exceptions=False)
    assert r2.exit_code == 0, r2.output
    assert [(t.batch, t.slot, t.graph_hash) for t in store.list_trials(st.id)] == trials  # nothing paid twice
    steps = store.agent_steps(st.id)
    if method == "reinforce":
        assert not steps
        return
    html = " ".join(_changes(x) for x in steps)
    assert "stage retrieve:" in html and "stage answer:" in html and "expected budget shares now" in html
    assert "incumbent&#x27;s answer:" in html or "incumbent's answer:" in html


# -- any per-stage reply: applied or refused line by line, never a crash -----------------------

_NAMES = st.sampled_from(["retrieve", "answer", "rerank", "", "s0", "llama-3.1-70b", "x" * 64])
_DELTA = st.floats(-5, 5, allow_nan=False)
_REPLIES = st.fixed_dictionaries({
    "feedback": st.text(max_size=20),
    "model_preference": st.dictionaries(st.sampled_from(["llama-3.2-3b", "llama-3.1-70b", "gpt-9"]), _DELTA,
                                        max_size=3),
    "stage_preferences": st.lists(st.fixed_dictionaries({
        "stage": _NAMES.filter(bool),
        "model_preference": st.dictionaries(st.sampled_from(["llama-3.2-1b", "llama-3.1-8b", "nope"]), _DELTA,
                                            max_size=2),
        "target_width": st.one_of(st.none(), st.integers(1, 64)),
        "target_depth": st.one_of(st.none(), st.integers(1, 64))}), max_size=3),
    "budget_split": st.dictionaries(_NAMES.filter(bool), _DELTA, max_size=3),
    "edge_changes": st.lists(st.fixed_dictionaries({
        "src": st.sampled_from(["s0", "s1", "s4", "q"]), "dst": st.sampled_from(["s1", "s2", "s4", "s9"]),
        "delta": _DELTA, "stage": st.one_of(st.none(), _NAMES.filter(bool))}), max_size=3),
    "confidence": st.floats(0, 1),
})


@pytest.fixture(scope="module")
def rag_critic(tmp_path_factory):
    spec, pr = problem(tmp_path_factory.mktemp("rag"), RAG, "agent-reinforce")
    return AgentReinforceSearcher(pr.ctx)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reply=_REPLIES)
def test_any_per_stage_reply_is_applied_or_refused_with_a_line_and_the_state_stays_finite(rag_critic, reply):
    s = rag_critic
    u = AgentUpdate.model_validate(reply)
    d = s.critic._apply_update(u, 1.0 * u.confidence)
    names = {"retrieve", "answer"}
    unknown = ({p["stage"] for p in reply["stage_preferences"]} | set(reply["budget_split"])
               | {c["stage"] for c in reply["edge_changes"] if c["stage"]}) - names
    for n in unknown:
        assert any(repr(n) in line for line in d["rejected"]), (n, d["rejected"])
    assert set(d["budget_split"]) <= names and set(d["stages"]) == names
    assert all("\n" not in line for line in d["rejected"])
    json.dumps(s.state_dict(), allow_nan=False)
