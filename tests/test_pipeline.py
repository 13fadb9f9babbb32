"""Pipelines as values: validation, hashing, serialisation, rendering, costing and budgets."""

from __future__ import annotations

import json

import pytest

from graphtune.errors import BudgetError, GraphError
from graphtune.graphs import (QUESTION, Budget, CostModel, Graph, Node, Pipeline, PipelineBudget, PipelineCostModel,
                              QuestionResult, Stage, StageOutcome, TaskShape, as_single, graph_hash, pipeline_hash)
from graphtune.graphs import pipeline as P
from graphtune.graphs.catalog import KNOWN_MODELS
from graphtune.graphs.results import NodeOutcome, outcomes_from_json, outcomes_to_json

S, M, L = "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-70b"


def vote(model: str, k: int, prefix: str = "a") -> Graph:
    nodes = [Node.make(f"{prefix}{i}", "assistant", model) for i in range(k)] + [Node.make("f", "fuser", model)]
    return Graph.build(nodes, [(f"{prefix}{i}", "f") for i in range(k)])


def one(model: str, nid: str = "a") -> Graph:
    return Graph.build([Node.make(nid, "assistant", model)])


def rag(retrieve: Graph | None = None, answer: Graph | None = None) -> Pipeline:
    return Pipeline((Stage("retrieve", retrieve or one(L)), Stage("answer", answer or vote(M, 3), (QUESTION, "retrieve"))))


POOL = {m: KNOWN_MODELS[m] for m in (S, M, L)}
COSTS = PipelineCostModel({"retrieve": CostModel(POOL, TaskShape(3000, 30)), "answer": CostModel(POOL, TaskShape(600, 30))})


# -- the value ----------------------------------------------------------------------------


def test_a_pipeline_is_an_immutable_value_with_its_stages_in_order():
    p = rag()
    assert p.names == ("retrieve", "answer")
    assert p.final.name == "answer"
    assert p.upstream("answer") == ("retrieve",)
    assert p.size == 1 + 4
    assert p.model_counts() == {L: 1, M: 4}
    assert rag() == p and hash(rag()) == hash(p)
    with pytest.raises(Exception):
        p.stages = ()  # frozen
    # inputs given as a list or one name make the same value
    assert Pipeline([Stage("retrieve", one(L), "question"), Stage("answer", vote(M, 3), ["question", "retrieve"])]) == p
    q = p.replace_stage("answer", one(S))
    assert q.stage("answer").graph == one(S) and p.stage("answer").graph == vote(M, 3)


@pytest.mark.parametrize("stages, needle", [
    ((), "no stages"),
    ((Stage("a", one(S)), Stage("a", one(S), ("a",))), "appears twice"),
    ((Stage("a", one(S), ("b",)), Stage("b", one(S), ("a",))), "stage 'a' reads stage 'b', which runs after it"),
    ((Stage("a", one(S), ("a",)),), "stage 'a' reads itself"),
    ((Stage("a", one(S), ("nowhere",)),), "unknown input 'nowhere'"),
    ((Stage("a", one(S), ()),), "stage 'a' has no inputs"),
    ((Stage("a", one(S)), Stage("b", one(S))), "stage 'a' feeds no later stage"),
    ((Stage("question", one(S)),), "rename the stage"),
    ((Stage("bad name", one(S)),), "stage 'bad name'"),
    ((Stage("a", one(S), (QUESTION, QUESTION)),), "lists an input twice"),
    ((Stage("a", Graph.build([Node.make("x", "assistant", S), Node.make("y", "assistant", S)])),),
     "stage 'a': graph must have exactly one sink"),
])
def test_an_invalid_pipeline_is_one_line_naming_the_stage(stages, needle):
    with pytest.raises(GraphError) as err:
        Pipeline(stages)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_the_hash_ignores_node_naming_but_not_stages_inputs_or_graphs():
    h = pipeline_hash(rag())
    assert pipeline_hash(rag(one(L, "zz"), vote(M, 3, prefix="b"))) == h
    assert pipeline_hash(rag(answer=vote(M, 4))) != h
    assert pipeline_hash(Pipeline((Stage("retrieve", one(L)), Stage("answer", vote(M, 3), ("retrieve",))))) != h
    assert pipeline_hash(Pipeline((Stage("r", one(L)), Stage("answer", vote(M, 3), (QUESTION, "r"))))) != h
    assert h == "50ac27d46a276c4f"  # stable across processes and versions: stored studies key on it


def test_a_one_stage_pipeline_on_the_question_is_the_single_graph_with_its_hash():
    g = vote(M, 3)
    p = P.single(g)
    assert as_single(p) is g and graph_hash(as_single(p)) == graph_hash(g)
    assert as_single(rag()) is None


def test_to_dict_round_trips_through_json_and_bad_data_is_one_line():
    p = rag()
    assert P.from_dict(json.loads(json.dumps(P.to_dict(p)))) == p
    data = P.to_dict(p)
    data["stages"][1]["inputs"] = ["question", "later"]
    with pytest.raises(GraphError, match="stage 'answer' reads unknown input 'later'"):
        P.from_dict(data)
    data = P.to_dict(p)
    data["stages"][0]["graph"]["edges"] = [["a", "nope"]]
    with pytest.raises(GraphError, match="stage 'retrieve'"):
        P.from_dict(data)
    with pytest.raises(GraphError, match="unknown keys"):
        P.from_dict({"stages": [], "extra": 1})
    with pytest.raises(GraphError, match="non-empty list"):
        P.from_dict({"stages": []})


def test_text_and_mermaid_show_every_stage_and_what_feeds_it():
    p = rag()
    text = str(p)
    assert text.splitlines()[0].startswith("retrieve(<-question): ")
    assert text.splitlines()[1].startswith("answer(<-question,retrieve): ")
    m = P.to_mermaid(p)
    assert 'subgraph s0["retrieve"]' in m and 'subgraph s1["answer"]' in m
    assert "question --> s0" in m and "question --> s1" in m
    assert "s0_a --> s1" in m  # the retrieval's sink feeds the answer stage
    assert "s1_a0 --> s1_f" in m
    assert m.count("subgraph") == 2 and m.count("    end") == 2


# -- costs ----------------------------------------------------------------------------------


def test_costs_add_up_over_stages_and_every_call_counts():
    p = rag()
    c = COSTS.cost(p)
    r, a = COSTS.of("retrieve").cost(one(L)), COSTS.of("answer").cost(vote(M, 3))
    assert c.stage("retrieve").flops == r.flops and c.stage("answer").flops == a.flops
    assert c.total.flops == pytest.approx(r.flops + a.flops)
    assert c.total.usd == pytest.approx(r.usd + a.usd)
    assert c.total.prompt_tokens == r.prompt_tokens + a.prompt_tokens
    assert c.total.units == pytest.approx(c.stage("retrieve").units + c.stage("answer").units)
    # one unit: the cheapest model's call on the stage with the shortest prompt
    assert COSTS.unit_flops == COSTS.of("answer").unit_flops
    assert c.stage("answer").units == pytest.approx(a.units)
    # the fuser is counted: three samples and a fuser cost more than three samples
    assert c.stage("answer").flops > 3 * COSTS.of("answer").cost(one(M)).flops
    assert set(c.as_dict()["stages"]) == {"retrieve", "answer"}


def test_latency_follows_the_critical_path_through_the_stages():
    # a and b both read the question and run side by side; c waits for both
    slow, fast = vote(L, 2), one(S)
    p = Pipeline((Stage("a", slow), Stage("b", fast), Stage("c", one(M), ("a", "b"))))
    c = PipelineCostModel(CostModel(POOL, TaskShape(600, 30))).cost(p)
    la, lb, lc = (c.stage(n).latency_s for n in "abc")
    assert la > lb
    assert c.total.latency_s == pytest.approx(max(la, lb) + lc)
    chain = Pipeline((Stage("a", slow), Stage("b", fast, ("a",)), Stage("c", one(M), ("b",))))
    c2 = PipelineCostModel(CostModel(POOL, TaskShape(600, 30))).cost(chain)
    assert c2.total.latency_s == pytest.approx(la + lb + lc)


def test_a_budget_checks_the_total_and_each_capped_stage_by_name():
    p = rag()
    c = COSTS.cost(p)
    assert PipelineBudget.make(Budget(units=c.total.units)).check(p, COSTS) == c
    with pytest.raises(BudgetError) as err:
        PipelineBudget.make(Budget(units=c.total.units - 1)).check(p, COSTS)
    assert "pipeline total" in str(err.value) and "\n" not in str(err.value)
    cap = {"answer": Budget(units=c.stage("answer").units / 2), "retrieve": None}
    b = PipelineBudget.make(Budget(units=c.total.units * 2), cap)
    assert not b.fits(c)
    with pytest.raises(BudgetError) as err:
        b.check(p, COSTS)
    msg = str(err.value)
    assert "stage 'answer'" in msg and "retrieve" not in msg and "\n" not in msg
    assert PipelineBudget.make(stages={"retrieve": Budget(units=c.stage("retrieve").units)}).fits(c)
    with pytest.raises(GraphError, match="caps stage 'rerank', which the pipeline does not have"):
        PipelineBudget.make(stages={"rerank": Budget(units=1)}).check(p, COSTS)


def test_a_stage_without_a_cost_model_is_named():
    with pytest.raises(GraphError, match="stage 'answer' has no cost model"):
        PipelineCostModel({"retrieve": CostModel(POOL, TaskShape(10, 10))}).cost(rag())


# -- per-stage outcomes in results and the store ------------------------------------------


def test_the_stage_that_lost_the_answer_is_the_first_wrong_one():
    st = (StageOutcome("retrieve", "7", False), StageOutcome("answer", "3", False))
    r = QuestionResult("q", "3", False, stages=st)
    assert r.lost_at == "retrieve"
    assert QuestionResult("q", "0", True, stages=st).lost_at is None
    assert QuestionResult("q", "3", False, stages=(StageOutcome("retrieve", "0", True), st[1])).lost_at == "answer"
    assert QuestionResult("q", "3", False).lost_at is None and QuestionResult("q", "3", False).stages == ()


def test_stage_outcomes_travel_in_the_nodes_json_and_old_rows_still_read():
    nodes = (NodeOutcome("retrieve/a", "7", False, 10, 2, 0.5), NodeOutcome("answer/f", "0", True, 5, 1, 0.1))
    stages = (StageOutcome("retrieve", "7", False, 10, 2, 1e9, 0.001, 0.5), StageOutcome("answer", "0", True))
    data = json.loads(json.dumps(outcomes_to_json(nodes, stages)))
    assert outcomes_from_json(data) == (nodes, stages)
    assert outcomes_from_json([["n0", "1", True, 1, 2, 0.5]]) == ((NodeOutcome("n0", "1", True, 1, 2, 0.5),), ())
    assert outcomes_from_json(None) == ((), ())


def test_the_sql_row_mapping_keeps_stage_outcomes_and_redacts_their_answers():
    from graphtune.store.redact import Redactor
    from graphtune.store.storage import _result_row, result_from_row

    r = QuestionResult("q1", "0", True, score=1.0, nodes=(NodeOutcome("answer/a", "0", True),),
                       stages=(StageOutcome("retrieve", "passage sk-SECRET", True, 3, 4, 5.0, 0.1, 0.2),
                               StageOutcome("answer", "0", True)))
    back = result_from_row(_result_row(0, r, False, Redactor()))
    assert back.stages == r.stages and back.nodes == r.nodes
    red = result_from_row(_result_row(0, r, False, Redactor(["sk-SECRET"])))
    assert "sk-SECRET" not in red.stages[0].answer
