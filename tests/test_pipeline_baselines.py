"""The baseline searchers on multi-stage pipelines: Optuna (tpe, qmc, ...), exhaustive,
llm-opt and the AgentTTS-style (model, samples) search, on a small simulated RAG study."""

from __future__ import annotations

import json
from dataclasses import replace
from itertools import product

import pytest

from graphtune.api import build_problem
from graphtune.errors import SearchError
from graphtune.graphs.design import PipelineSpace, design_hash, stage_budget, validate_design
from graphtune.graphs.families import sampling_graph, sampling_params
from graphtune.graphs.pipeline import Pipeline
from graphtune.graphs.space import enumerate_graphs
from graphtune.llm import LLMReply
from graphtune.search.exhaustive import ExhaustiveSearcher
from graphtune.search.llm_opt import LLMOptSearcher
from graphtune.search.loop import evaluate_candidate, run_search
from graphtune.search.optuna_search import GraphEncoding, PipelineEncoding
from graphtune.search.registry import searcher_class
from graphtune.spec import parse_spec
from graphtune.store import MemoryStorage

POOL = [{"name": m} for m in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b")]


def rag_spec(method: str = "random", *, retrieve=None, answer=None, budget=600, cap=300, evaluations=6, batch=3,
             options=None, dev=12, agent=None) -> dict:
    return {
        "study": f"rag-{method}",
        "task": {"profile": "pipeline-rag", "dev_size": dev, "test_size": 10},
        "models": POOL,
        "pipeline": {"stages": [
            {"name": "retrieve", "space": retrieve or {"max_nodes": 3}},
            {"name": "answer", "space": answer or {"models": ["llama-3.2-3b", "llama-3.1-8b"], "max_nodes": 5},
             **({"budget": {"units": cap}} if cap else {})},
        ]},
        "budget": {"units": budget},
        "search": {"method": method, "evaluations": evaluations, "batch_size": batch, "options": options or {},
                   **({"agent": agent} if agent else {})},
        "storage": "sqlite:///:memory:",
    }


def problem(**kw):
    return build_problem(parse_spec(rag_spec(**kw)))


def make(method, ctx, complete=None):
    cls = searcher_class(method)
    return cls(ctx, complete=complete) if complete is not None else cls(ctx)


def drive(searcher, prob, n_batches, store, study, start=0, method="m"):
    """ask/tell ``n_batches`` times with real evaluations; the hashes asked per batch and
    every evaluation."""
    asked, evals = [], []
    for b in range(start, start + n_batches):
        cands = searcher.ask()
        ev = [evaluate_candidate(c, env=prob.env, storage=store, study=study, ctx=prob.ctx, method=method, batch=b,
                                 slot=i) for i, c in enumerate(cands)]
        searcher.tell(ev)
        asked.append([design_hash(c.graph) for c in cands])
        evals += ev
    return asked, evals


SEARCHERS = ["tpe", "qmc", "cmaes", "nsga2", "exhaustive", "llm-opt", "agenttts"]


def small_ctx(prob, method):
    if method == "exhaustive":  # a space small enough to enumerate
        return build_problem(parse_spec(rag_spec(method, retrieve={"max_nodes": 2},
                                                 answer={"models": ["llama-3.2-3b"], "max_nodes": 3})))
    return prob


@pytest.mark.parametrize("method", SEARCHERS)
def test_every_baseline_proposes_valid_in_budget_pipelines_and_resumes_exactly(method):
    prob = small_ctx(problem(method=method), method)
    ctx = prob.ctx
    # a whole study through the engine: every trial a valid pipeline within the budget and caps
    store = MemoryStorage()
    st = store.create_study("s", method, {})
    out = run_search(make(method, ctx), prob.env, store, st, ctx, budget_runs=ctx.budget_runs)
    trials = store.list_trials(st.id, split="dev")
    assert trials and out.best is not None
    for t in trials:
        assert t.status == "complete", t.error
        assert t.cost_units <= 600 + 1e-6
    assert isinstance(out.best.graph, Pipeline)
    # resume: 2 batches, the state through JSON, 2 more batches == 4 batches straight
    s1, s2 = MemoryStorage(), MemoryStorage()
    straight, _ = drive(make(method, ctx), prob, 4, s1, s1.create_study("a", method, {}))
    first = make(method, ctx)
    st2 = s2.create_study("b", method, {})
    head, evals = drive(first, prob, 2, s2, st2)
    resumed = make(method, ctx)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    resumed.restore(evals)
    tail, _ = drive(resumed, prob, 2, s2, st2, start=2)
    assert head + tail == straight
    assert sum(map(len, straight)) > 0
    for e in evals:  # every proposal valid and in budget (pipeline total and the answer stage's cap)
        assert e.error is None
        c = validate_design(e.candidate.graph, ctx.space, ctx.costs, ctx.budget)
        assert c.total.units <= 600 + 1e-6 and c.stage("answer").units <= 300 + 1e-6


def test_optuna_encodes_each_stage_with_stage_prefixed_parameters():
    prob = problem()
    ctx = prob.ctx
    enc = PipelineEncoding(ctx, continuous=False)
    assert "retrieve.model_0" in enc.names and "answer.edge_0_4" in enc.names
    assert all(n.split(".", 1)[0] in ("retrieve", "answer") for n in enc.names)
    # each stage's block is the single-graph encoding of its space, with the prefix
    single = GraphEncoding(space=ctx.space.stage("answer").space, costs=ctx.costs.of("answer"), continuous=False)
    assert [n for n in enc.names if n.startswith("answer.")] == [f"answer.{n}" for n in single.names]
    p = ctx.space.pipeline({"retrieve": sampling_graph("llama-3.1-70b", 1), "answer": sampling_graph("llama-3.2-3b", 3)})
    assert design_hash(enc.decode(enc.encode(p))) == design_hash(p)
    cont = PipelineEncoding(ctx, continuous=True)
    assert design_hash(cont.decode(cont.encode(p))) == design_hash(p)


def test_exhaustive_finds_the_true_best_of_a_tiny_pipeline_space():
    prob = build_problem(parse_spec(rag_spec("exhaustive", retrieve={"max_nodes": 1},
                                             answer={"models": ["llama-3.2-3b", "llama-3.1-8b"], "max_nodes": 2},
                                             evaluations=100, batch=4)))
    ctx, env = prob.ctx, prob.env
    s = ExhaustiveSearcher(ctx)
    # the product of the stages' enumerations, filtered by the budget, cheapest first
    per = [enumerate_graphs(st.space, ctx.costs.of(st.name), stage_budget(ctx.space, ctx.costs, ctx.budget, st.name))
           for st in ctx.space.stages]
    want = [ctx.space.pipeline(dict(zip(ctx.space.names, gs))) for gs in product(*per)]
    want = [p for p in want if ctx.budget.fits(ctx.costs.cost(p))]
    assert sorted(design_hash(p) for p in s.graphs) == sorted(design_hash(p) for p in want)
    units = [ctx.costs.cost(p).total.units for p in s.graphs]
    assert units == sorted(units)
    store = MemoryStorage()
    st = store.create_study("s", "exhaustive", {})
    out = run_search(s, env, store, st, ctx, budget_runs=ctx.budget_runs)
    assert len(store.list_trials(st.id, split="dev")) == len(want)
    best = max(env.accuracy(p, list(ctx.dev_ids)) for p in want)
    assert env.accuracy(out.best.graph, list(ctx.dev_ids)) == pytest.approx(best)


def test_exhaustive_refuses_a_pipeline_space_too_large_in_one_line():
    # each stage alone is enumerable (retrieve: 532 graphs, answer: 29,098), the product is not
    prob = problem(method="exhaustive", options={"max_graphs": 100_000})
    with pytest.raises(SearchError) as e:
        ExhaustiveSearcher(prob.ctx)
    msg = str(e.value)
    assert "\n" not in msg and "max_graphs (100000)" in msg and "532 x 29098 = 15480136 pipelines" in msg
    # a stage too large alone is named
    with pytest.raises(SearchError, match="stage 'retrieve' alone has more than 50 graphs"):
        ExhaustiveSearcher(replace(prob.ctx, options={"max_graphs": 50}))


def test_agenttts_only_proposes_sampling_graphs_and_grows_samples():
    prob = problem(method="agenttts", evaluations=14, batch=4)
    ctx = prob.ctx
    store = MemoryStorage()
    st = store.create_study("s", "agenttts", {})
    run_search(make("agenttts", ctx), prob.env, store, st, ctx, budget_runs=ctx.budget_runs)
    trials = store.list_trials(st.id, split="dev")
    from graphtune.graphs.design import design_from_dict

    seen_k = set()
    for t in trials:
        p = design_from_dict(t.graph)
        for stage in p.stages:
            mk = sampling_params(stage.graph)
            assert mk is not None, f"{stage.name}: not a sampling graph"
            seen_k.add(mk[1])
    assert max(seen_k) > 1  # it grew the samples somewhere
    # the first batches: every retrieve model at one sample (the model phase)
    first = [design_from_dict(t.graph).stage("retrieve").graph for t in trials[:5]]
    assert {sampling_params(g)[0] for g in first} >= {"llama-3.2-1b", "llama-3.1-70b"}


def test_agenttts_refuses_a_space_without_sampling_graphs():
    ctx = problem(method="agenttts").ctx
    # the answer stage's sink must be a fuser and it has one node: no (model, samples) graph fits
    answer = ctx.space.stage("answer")
    space = PipelineSpace((ctx.space.stage("retrieve"),
                           replace(answer, space=replace(answer.space, sink_roles=("fuser",), max_nodes=1))))
    with pytest.raises(SearchError, match="stage 'answer' allows no"):
        make("agenttts", replace(ctx, space=space))


# -- llm-opt with a fake LLM --------------------------------------------------------------


def node(i, model, role="assistant"):
    return {"id": i, "role": role, "model": model}


class FakeComplete:
    def __init__(self, *replies):
        self.replies = list(replies)
        self.calls: list[dict] = []

    def __call__(self, model, messages, **kw):
        self.calls.append({"model": model, "messages": messages, **kw})
        r = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        text = r if isinstance(r, str) else json.dumps(r)
        return LLMReply(text=text, prompt_tokens=100, completion_tokens=50, seconds=0.1, model=model)


WHOLE = {"reasoning": "70B retrieval, an ensemble of 3B answers", "proposals": [
    # a whole pipeline: one stage's graph plus every other stage's
    {"stage": "retrieve", "nodes": [node("r", "llama-3.1-70b")], "edges": [],
     "other_stages": [{"stage": "answer", "nodes": [node("a", "llama-3.2-3b"), node("b", "llama-3.2-3b"),
                                                    node("f", "llama-3.2-3b", "fuser")],
                       "edges": [["a", "f"], ["b", "f"]]}]},
    # a model the answer stage does not allow
    {"stage": "answer", "nodes": [node("a", "llama-3.1-70b")], "edges": [],
     "other_stages": [{"stage": "retrieve", "nodes": [node("r", "llama-3.2-1b")], "edges": []}]},
    # an unknown stage; one stage while no pipeline is evaluated yet (no incumbent)
    {"stage": "rerank", "nodes": [node("r", "llama-3.2-1b")], "edges": []},
    {"stage": "answer", "nodes": [node("a", "llama-3.1-8b")], "edges": []},
]}


def test_llm_opt_proposes_pipelines_per_stage_with_one_line_reasons():
    prob = problem(method="llm-opt", batch=4, agent={"model": "openai/fake"})
    ctx = prob.ctx
    fake = FakeComplete(WHOLE)
    s = LLMOptSearcher(ctx, complete=fake)
    cands = s.ask()
    assert len(cands) == 4  # one accepted, three random fills
    first = cands[0].graph
    assert cands[0].origin == "agent" and [c.origin for c in cands[1:]] == ["random"] * 3
    assert sampling_params(first.stage("retrieve").graph) == ("llama-3.1-70b", 1)
    assert sampling_params(first.stage("answer").graph) == ("llama-3.2-3b", 2)
    for c in cands:
        validate_design(c.graph, ctx.space, ctx.costs, ctx.budget)
    step = s.drain_agent_steps()[0]
    reasons = step["rejected_reason"]
    assert "stage 'answer'" in reasons and "llama-3.1-70b" in reasons
    assert "unknown stage 'rerank'" in reasons
    assert "no incumbent" in reasons
    assert all("\n" not in o.get("reason", "") for o in step["applied"]["proposals"])
    schema = fake.calls[0]["json_schema"]
    item = schema["properties"]["proposals"]["items"]
    assert item["properties"]["stage"]["enum"] == ["retrieve", "answer"] and "other_stages" in item["required"]
    prompt = fake.calls[0]["messages"][1]["content"]
    assert "Stage 'retrieve'" in prompt and "Stage 'answer'" in prompt and "Cap on this stage alone" in prompt


def test_llm_opt_changes_one_stage_of_the_best_pipeline():
    prob = problem(method="llm-opt", batch=2, agent={"model": "openai/fake"})
    ctx = prob.ctx
    store = MemoryStorage()
    st = store.create_study("s", "llm-opt", {})
    s = LLMOptSearcher(ctx, complete=FakeComplete(WHOLE))
    _, evals = drive(s, prob, 1, store, st)
    best = min(evals, key=lambda e: (-e.reward, e.trial_number))
    change = {"reasoning": "more answer samples", "proposals": [
        {"stage": "answer",
         "nodes": [node(f"a{i}", "llama-3.2-3b") for i in range(3)] + [node("f", "llama-3.2-3b", "fuser")],
         "edges": [[f"a{i}", "f"] for i in range(3)]},
    ]}
    s._complete = FakeComplete(change)
    cands = s.ask()
    p = cands[0].graph
    assert cands[0].origin == "agent"
    assert p.stage("retrieve").graph == best.candidate.graph.stage("retrieve").graph
    assert sampling_params(p.stage("answer").graph) == ("llama-3.2-3b", 3)
    prompt = s._complete.calls[0]["messages"][1]["content"]
    assert f"trial {best.trial_number}:" in prompt


def test_llm_opt_offline_heuristic_mutates_one_stage_at_a_time():
    prob = problem(method="llm-opt", batch=3, evaluations=9)
    ctx = replace(prob.ctx, agent={"model": "heuristic"})
    store = MemoryStorage()
    st = store.create_study("s", "llm-opt", {})
    s = LLMOptSearcher(ctx)
    run_search(s, prob.env, store, st, ctx, budget_runs=ctx.budget_runs)
    steps = store.agent_steps(st.id)
    mutated = [st_ for st_ in steps if st_["parsed"] and st_["parsed"]["reasoning"]]
    assert mutated and any("retrieve:" in m["parsed"]["reasoning"] or "answer:" in m["parsed"]["reasoning"]
                           for m in mutated)


def test_agenttts_runs_a_single_stage_study_on_sampling_graphs():
    spec = parse_spec({"study": "s", "task": {"profile": "math", "dev_size": 10, "test_size": 5},
                       "models": POOL, "space": {"max_nodes": 5}, "budget": {"units": 30},
                       "search": {"method": "agenttts", "evaluations": 12, "batch_size": 4}})
    prob = build_problem(spec)
    store = MemoryStorage()
    st = store.create_study("s", "agenttts", {})
    out = run_search(make("agenttts", prob.ctx), prob.env, store, st, prob.ctx, budget_runs=prob.ctx.budget_runs)
    from graphtune.graphs.io import from_dict

    trials = store.list_trials(st.id, split="dev")
    assert trials and all(sampling_params(from_dict(t.graph)) is not None for t in trials)
    assert all(t.cost_units <= 30 + 1e-9 for t in trials)
    assert sampling_params(out.best.graph) is not None
