"""One proposal schema and one builder for every agent step (issue 11).

llm-opt's replies are the agent's proposal model (``ProposalReply`` of ``GraphProposal``),
refused with the same one-line reasons as agent-reinforce's LLM agent, and every proposal
becomes a graph through ``graphtune.agent.proposals.proposal_to_graph``: the same proposal
is the same graph, or the same reason, in both searchers."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from graphtune.agent.proposals import check_graph, proposal_to_graph
from graphtune.agent.schema import (GraphProposal, ProposalReply, describe_reply_error, parse_proposal_reply,
                                    parse_update, proposal_reply_json_schema)
from graphtune.errors import BudgetError, GraphError
from graphtune.graphs import Budget, Space, summarize
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.catalog import LLAMA_POOL
from graphtune.graphs.model import Graph, Node
from graphtune.llm import LLMReply
from graphtune.search.agent_reinforce import AgentReinforceSearcher
from graphtune.search.base import Evaluation, Objective, SearchContext
from graphtune.search.llm_opt import LLMOptSearcher, parse_reply, reply_schema

from fakes import FakeEnv

ROLES = ("assistant", "fuser")
ENSEMBLE = {"nodes": [{"id": "a", "role": "assistant", "model": "llama-3.2-1b"},
                      {"id": "b", "role": "assistant", "model": "llama-3.2-1b"},
                      {"id": "f", "role": "fuser", "model": "llama-3.2-3b"}],
            "edges": [["a", "f"], ["b", "f"]]}
BAD = [  # (proposal, what its one-line reason names)
    ({"nodes": [{"id": "a", "role": "assistant", "model": "gpt-9"}], "edges": []}, "gpt-9"),
    ({"nodes": [{"id": "a", "role": "fuser", "model": "llama-3.2-1b"}], "edges": []}, "fuser"),
    ({"nodes": [{"id": "a", "role": "assistant", "model": "llama-3.2-1b"},
                {"id": "b", "role": "assistant", "model": "llama-3.2-1b"}], "edges": [["a", "b"], ["b", "a"]]},
     "cycle"),
    ({"nodes": [{"id": "a", "role": "assistant", "model": "llama-3.2-1b"}], "edges": [["a", "zz"]]}, "zz"),
    ({"nodes": [{"id": f"n{i}", "role": "assistant", "model": "llama-3.1-8b"} for i in range(3)]
     + [{"id": "z", "role": "fuser", "model": "llama-3.1-8b"}], "edges": [[f"n{i}", "z"] for i in range(3)]},
     "over budget"),
    # a node id from the reply holding a line break: the reason stays on one line
    ({"nodes": [{"id": "a\nb", "role": "assistant", "model": "llama-3.2-1b"}], "edges": [["a\nb", "c\nd"]]},
     "c\\nd"),
]


def _ctx(costs, env, *, max_retries=1):
    return SearchContext(space=Space(models=LLAMA_POOL, max_nodes=5, max_in_degree=3), costs=costs,
                         budget=Budget(units=18), objective=Objective(), dev_ids=tuple(env.split("dev")), seed=0,
                         batch_size=8, budget_runs=1000, task_description="t",
                         agent={"model": "fake/llm", "max_retries": max_retries})


class FakeComplete:
    def __init__(self, text: str):
        self.text = text
        self.calls = 0

    def __call__(self, model, messages, **kw):
        self.calls += 1
        return LLMReply(text=self.text, prompt_tokens=10, completion_tokens=5, seconds=0.1, model=model)


def _evals(cands, env, ctx):
    out = []
    for i, c in enumerate(cands):
        res = env.evaluate(c.graph, c.question_ids or ctx.dev_ids)
        m = summarize(res)
        out.append(Evaluation(candidate=c, trial_number=i, graph_hash=graph_hash(c.graph), results=tuple(res),
                              metrics=m, reward=m.accuracy, cost=ctx.costs.cost(c.graph), new_runs=len(res)))
    return out


def _agent_reinforce_init(ctx, env, text):
    """agent-reinforce after its probes: the LLM agent's first step answered by ``text``."""
    s = AgentReinforceSearcher(ctx, complete=FakeComplete(text))
    s.tell(_evals(s.ask(), env, ctx))
    [step] = s.drain_agent_steps()
    assert step["kind"] == "init"
    return s, step


def _llm_opt(ctx, text):
    s = LLMOptSearcher(ctx, complete=FakeComplete(text))
    cands = s.ask()
    [step] = s.drain_agent_steps()
    return cands, step


# -- the builder ---------------------------------------------------------------------------


def test_a_proposal_builds_its_graph(costs):
    space = Space(models=LLAMA_POOL, max_nodes=5, max_in_degree=3)
    g = proposal_to_graph(GraphProposal.model_validate(ENSEMBLE), space, costs, Budget(units=18))
    assert g == Graph.build([Node.make("a", "assistant", "llama-3.2-1b"), Node.make("b", "assistant", "llama-3.2-1b"),
                             Node.make("f", "fuser", "llama-3.2-3b")], [("a", "f"), ("b", "f")])
    assert check_graph(g, space, costs, Budget(units=18)) is g


@pytest.mark.parametrize("i", range(len(BAD)))
def test_a_bad_proposal_is_refused_with_one_line_naming_what_is_wrong(costs, i):
    prop, names = BAD[i]
    space = Space(models=LLAMA_POOL, max_nodes=5, max_in_degree=3)
    with pytest.raises(GraphError) as e:
        proposal_to_graph(GraphProposal.model_validate(prop), space, costs, Budget(units=18))
    assert names in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, BudgetError) == (names == "over budget")


# -- the same proposal, the same outcome in both searchers ---------------------------------


def test_one_proposal_builds_the_same_graph_through_both_searchers(costs):
    env = FakeEnv(costs, n_dev=6)
    ctx = _ctx(costs, env)
    expected = proposal_to_graph(GraphProposal.model_validate(ENSEMBLE), ctx.space, ctx.costs, ctx.budget)
    proposals = [ENSEMBLE] + [p for p, _ in BAD]

    cands, opt_step = _llm_opt(ctx, json.dumps({"reasoning": "r", "proposals": proposals}))
    from_opt = [c.graph for c in cands if c.origin == "agent"]

    ar_ctx = replace(ctx, options={"proposals": len(proposals)})  # every proposal considered
    s, ar_step = _agent_reinforce_init(ar_ctx, env, json.dumps({"feedback": "f", "proposals": proposals}))
    from_ar = [c.graph for c in s.ask() if c.origin == "agent"]

    assert from_opt == from_ar == [expected]
    # every refused proposal keeps the same one-line reason in both step records
    opt_outcomes = opt_step["applied"]["proposals"]
    ar_outcomes = ar_step["applied"]["proposals"]
    assert [o["status"] for o in opt_outcomes] == ["accepted"] + ["rejected"] * len(BAD)
    assert [o["status"] for o in ar_outcomes] == ["queued"] + ["rejected"] * len(BAD)
    for o, a, (_, names) in zip(opt_outcomes[1:], ar_outcomes[1:], BAD, strict=True):
        assert o["reason"] == a["reason"] and names in o["reason"] and "\n" not in o["reason"]
    # both store the parsed proposal the same way (the agent's model, rationale included)
    assert opt_step["parsed"]["proposals"][0] == ar_step["parsed"]["proposals"][0] == \
        GraphProposal.model_validate(ENSEMBLE).model_dump(mode="json")


def _pair(proposal_json: str, pad_to: int | None = None) -> tuple[str, str]:
    """The same proposals as an agent-reinforce update and as an llm-opt reply."""
    agent = '{"feedback": "f", "proposals": [' + proposal_json + "]}"
    opt = '{"reasoning": "f", "proposals": [' + proposal_json + "]}"
    if pad_to:
        agent, opt = agent.ljust(pad_to), opt.ljust(pad_to)
    return agent, opt


NODE = '{"id": "a", "role": "assistant", "model": "llama-3.2-1b"}'
HOSTILE = {
    "not JSON": ("I think you should use a big model.",) * 2,
    "deep nesting": ("[" * 100_000,) * 2,
    "non-finite number": _pair('{"nodes": [' + NODE + '], "edges": [["a", 1e999]]}'),
    "NaN": _pair('{"nodes": [' + NODE + '], "edges": [[NaN, "a"]]}'),
    "NUL in an id": _pair('{"nodes": [{"id": "a\\u0000", "role": "assistant", "model": "llama-3.2-1b"}], '
                          '"edges": []}'),
    "lone surrogate": _pair('{"nodes": [{"id": "\\ud800", "role": "assistant", "model": "llama-3.2-1b"}], '
                            '"edges": []}'),
    "too long": _pair('{"nodes": [' + NODE + '], "edges": []}', pad_to=250_000),
    "missing role": _pair('{"nodes": [{"id": "a", "model": "llama-3.2-1b"}], "edges": []}'),
    "edge not a pair": _pair('{"nodes": [' + NODE + '], "edges": [["a"]]}'),
    "unknown field": _pair('{"nodes": [' + NODE + '], "edges": [], "weight": 2}'),
    "empty model": _pair('{"nodes": [{"id": "a", "role": "assistant", "model": ""}], "edges": []}'),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_or_malformed_llm_opt_reply_gets_the_agents_one_line_rejection(costs, case):
    agent_text, opt_text = HOSTILE[case]
    with pytest.raises(ValueError) as agent_err:
        parse_update(agent_text)
    with pytest.raises(ValueError) as opt_err:
        parse_proposal_reply(opt_text)
    reason = describe_reply_error(opt_err.value)
    assert reason == describe_reply_error(agent_err.value)
    assert "\n" not in reason
    with pytest.raises(ValueError) as e:
        parse_reply(opt_text)
    assert str(e.value) == reason

    env = FakeEnv(costs, n_dev=6)
    ctx = _ctx(costs, env)
    cands, opt_step = _llm_opt(ctx, opt_text)
    _, ar_step = _agent_reinforce_init(ctx, env, agent_text)
    assert all(c.origin == "random" for c in cands)
    for step in (opt_step, ar_step):  # both asked again once, then stored the same reason
        assert step["parsed"] is None and step["calls"] == 2
        assert "unusable reply after 2 attempt(s)" in step["rejected_reason"]
        assert step["rejected_reason"].endswith(reason) or f"{reason};" in step["rejected_reason"]
        assert "\n" not in step["rejected_reason"]


# -- what the LLM is asked for matches what is parsed -----------------------------------------


def _resolve(schema: dict, root: dict) -> dict:
    ref = schema.get("$ref")
    return root["$defs"][ref.rsplit("/", 1)[1]] if ref else schema


def _agree(strict: dict, model: dict, root: dict, where: str = "reply") -> None:
    """Every field the strict schema asks for is one the model accepts, and every field
    the model requires is one the strict schema requires (recursively)."""
    model = _resolve(model, root)
    if strict.get("type") == "object":
        assert strict["additionalProperties"] is False, where
        assert set(strict["required"]) == set(strict["properties"]), where  # strict mode: all listed
        assert set(strict["properties"]) <= set(model["properties"]), where
        assert set(model.get("required", ())) <= set(strict["required"]), where
        for k, sub in strict["properties"].items():
            _agree(sub, model["properties"][k], root, f"{where}.{k}")
    elif strict.get("type") == "array":
        assert model["type"] == "array", where
        if model.get("prefixItems"):  # a [src, dst] pair: its length is pydantic's check
            assert all(strict["items"]["type"] == p["type"] for p in model["prefixItems"]), where
        else:
            _agree(strict["items"], model["items"], root, f"{where}[]")
    elif "anyOf" in model:  # an optional field: strict mode's nullable type lists the same types
        assert sorted(strict["type"]) == sorted(o["type"] for o in model["anyOf"]), where
    else:
        assert strict["type"] == model["type"], where


def test_the_json_schema_the_llm_is_given_agrees_with_the_parsing_model():
    strict = reply_schema(LLAMA_POOL, ROLES)
    assert strict == proposal_reply_json_schema(LLAMA_POOL, ROLES)
    root = ProposalReply.model_json_schema()
    _agree(strict, root, root)
    # a reply built from the strict schema's enums parses, and the same proposal is the agent's
    reply = {"reasoning": "r", "proposals": [{"nodes": [{"id": "a", "role": ROLES[0], "model": LLAMA_POOL[0]}],
                                              "edges": []}]}
    assert parse_reply(json.dumps(reply)).proposals[0] == GraphProposal.model_validate(reply["proposals"][0])
    # the parent field, required and nullable in strict mode: a trial number or null
    for parent in (7, None):
        reply["proposals"][0]["parent"] = parent
        assert parse_reply(json.dumps(reply)).proposals[0].parent == parent


def test_the_json_the_prompt_documents_parses(costs):
    env = FakeEnv(costs, n_dev=4)
    prompt = LLMOptSearcher(_ctx(costs, env), complete=FakeComplete("{}")).prompt()
    example = prompt.split("Answer as JSON: ", 1)[1]
    parsed = parse_reply(example)
    assert [n.id for n in parsed.proposals[0].nodes] == ["a"]
