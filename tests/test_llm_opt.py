"""llm-opt: replies used, bad replies rejected with reasons, the offline proposer."""

from __future__ import annotations

import json

import pytest

from graphtune.errors import LLMFatalError, LLMTransientError
from graphtune.graphs import Budget, Space
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.catalog import LLAMA_POOL
from graphtune.graphs.space import validate
from graphtune.llm import LLMReply
from graphtune.search.base import Objective, SearchContext
from graphtune.search.llm_opt import HEURISTIC_BACKEND, LLMOptSearcher, parse_reply, reply_schema
from graphtune.search.loop import run_search
from graphtune.store import MemoryStorage

from fakes import FakeEnv

GOOD = {"reasoning": "a bigger model alone, then a small ensemble",
        "proposals": [
            {"nodes": [{"id": "a", "role": "assistant", "model": "llama-3.1-8b"}], "edges": []},
            {"nodes": [{"id": "a", "role": "assistant", "model": "llama-3.2-1b"},
                       {"id": "b", "role": "assistant", "model": "llama-3.2-1b"},
                       {"id": "f", "role": "fuser", "model": "llama-3.2-3b"}],
             "edges": [["a", "f"], ["b", "f"]]},
        ]}


def _ctx(costs, env, *, agent=None, batch=4, evaluations=8, seed=0):
    dev = tuple(env.split("dev"))
    return SearchContext(space=Space(models=LLAMA_POOL, max_nodes=4, max_in_degree=3), costs=costs,
                         budget=Budget(units=18), objective=Objective(), dev_ids=dev, seed=seed, batch_size=batch,
                         budget_runs=evaluations * len(dev), task_description="grade-school math",
                         agent=agent if agent is not None else {"model": "openai/fake", "usd_per_mtok_in": 1.0,
                                                                "usd_per_mtok_out": 2.0})


class FakeComplete:
    """Stands in for graphtune.llm.complete: replays scripted replies, records calls."""

    def __init__(self, *replies):
        self.replies = list(replies)
        self.calls: list[dict] = []

    def __call__(self, model, messages, **kw):
        self.calls.append({"model": model, "messages": messages, **kw})
        r = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(r, Exception):
            raise r
        text = r if isinstance(r, str) else json.dumps(r)
        return LLMReply(text=text, prompt_tokens=1000, completion_tokens=200, seconds=0.5, model=model)


def test_a_good_reply_is_used_and_recorded(costs):
    env = FakeEnv(costs, n_dev=4)
    fake = FakeComplete(GOOD)
    s = LLMOptSearcher(_ctx(costs, env), complete=fake)
    cands = s.ask()
    assert len(cands) == 4
    assert [c.origin for c in cands] == ["agent", "agent", "random", "random"]
    assert cands[0].graph.size == 1 and cands[1].graph.size == 3
    for c in cands:
        validate(c.graph, s.ctx.space, s.ctx.costs, s.ctx.budget)
        assert c.question_ids is None
    call = fake.calls[0]
    assert call["model"] == "openai/fake" and call["json_schema"]["title"] == "GraphProposals"
    assert "grade-school math" in call["messages"][1]["content"]
    [step] = s.drain_agent_steps()
    assert step["backend"] == "openai/fake" and step["is_llm"] and step["kind"] == "propose"
    assert step["calls"] == 1 and step["prompt_tokens"] == 1000 and step["completion_tokens"] == 200
    assert step["usd"] == pytest.approx((1000 * 1.0 + 200 * 2.0) / 1e6)
    assert step["parsed"]["reasoning"] == GOOD["reasoning"] and step["feedback"] == GOOD["reasoning"]
    assert step["applied"]["accepted"] == 2 and step["applied"]["random_fill"] == 2
    assert step["rejected_reason"] is None
    assert all(c.info["agent_step"] == step["key"] for c in cands)
    assert s.drain_agent_steps() == []  # drained once


def test_the_history_reaches_the_next_prompt_best_last(costs):
    env = FakeEnv(costs, n_dev=4)
    store = MemoryStorage()
    ctx = _ctx(costs, env, evaluations=8)
    fake = FakeComplete(GOOD)
    st = store.create_study("s", "llm-opt", {})
    run_search(LLMOptSearcher(ctx, complete=fake), env, store, st, ctx, budget_runs=ctx.budget_runs)
    assert len(fake.calls) == 2
    second = fake.calls[1]["messages"][1]["content"]
    assert "Graphs evaluated so far (4 of 4" in second
    rewards = [float(line.split("reward=")[1].split()[0]) for line in second.splitlines() if "reward=" in line]
    assert rewards == sorted(rewards)
    steps = store.agent_steps(st.id)
    assert len(steps) == 2
    # the second batch re-proposes the same two graphs: rejected as duplicates, not paid twice
    assert "already proposed" in steps[1]["rejected_reason"]
    hashes = [t.graph_hash for t in store.list_trials(st.id)]
    assert len(hashes) == len(set(hashes)) == 8


def test_invalid_and_over_budget_proposals_are_rejected_with_reasons(costs):
    env = FakeEnv(costs, n_dev=4)
    bad = {"reasoning": "", "proposals": [
        {"nodes": [{"id": "a", "role": "assistant", "model": "llama-3.1-70b"}], "edges": []},  # over budget
        {"nodes": [{"id": "a", "role": "assistant", "model": "gpt-9"}], "edges": []},  # not in the pool
        {"nodes": [{"id": "a", "role": "fuser", "model": "llama-3.2-1b"}], "edges": []},  # fuser without input
        {"nodes": [{"id": "a", "role": "assistant", "model": "llama-3.2-1b"},
                   {"id": "b", "role": "assistant", "model": "llama-3.2-1b"}], "edges": [["a", "b"], ["b", "a"]]},
        {"nodes": [{"id": "a", "role": "assistant", "model": "llama-3.2-1b"}], "edges": [["a", "zz"]]},
    ]}
    s = LLMOptSearcher(_ctx(costs, env, batch=3), complete=FakeComplete(bad))
    cands = s.ask()
    assert len(cands) == 3 and all(c.origin == "random" for c in cands)
    [step] = s.drain_agent_steps()
    reason = step["rejected_reason"]
    assert "proposal 0:" in reason and "over budget" in reason
    assert "gpt-9" in reason and "fuser" in reason and "cycle" in reason and "zz" in reason
    assert [o["status"] for o in step["applied"]["proposals"]] == ["rejected"] * 5


def test_an_unparsable_reply_is_re_asked_once_then_filled_randomly(costs):
    env = FakeEnv(costs, n_dev=4)
    fake = FakeComplete("I think you should use a big model.", {"proposals": "nope"})
    s = LLMOptSearcher(_ctx(costs, env, batch=2), complete=fake)
    cands = s.ask()
    assert len(cands) == 2 and all(c.origin == "random" for c in cands)
    assert len(fake.calls) == 2
    assert "invalid" in fake.calls[1]["messages"][-1]["content"]
    [step] = s.drain_agent_steps()
    assert step["calls"] == 2 and "unusable reply" in step["rejected_reason"]
    assert "does not match the schema" in step["rejected_reason"]


def test_a_reply_repaired_on_the_second_try_is_used(costs):
    env = FakeEnv(costs, n_dev=4)
    fake = FakeComplete("not json", "```json\n" + json.dumps(GOOD) + "\n```")
    s = LLMOptSearcher(_ctx(costs, env, batch=2), complete=fake)
    assert [c.origin for c in s.ask()] == ["agent", "agent"]


def test_a_transient_llm_failure_fills_the_batch_and_a_fatal_one_stops(costs):
    env = FakeEnv(costs, n_dev=4)
    s = LLMOptSearcher(_ctx(costs, env, batch=2), complete=FakeComplete(LLMTransientError("rate limited")))
    assert len(s.ask()) == 2
    assert "LLM call failed" in s.drain_agent_steps()[0]["rejected_reason"]
    s = LLMOptSearcher(_ctx(costs, env, batch=2), complete=FakeComplete(LLMFatalError("bad key")))
    with pytest.raises(LLMFatalError):
        s.ask()


def test_offline_heuristic_mutates_the_best_graphs_and_says_it_is_not_an_llm(costs):
    env = FakeEnv(costs, n_dev=5)
    store = MemoryStorage()
    ctx = _ctx(costs, env, agent={"model": "heuristic"}, evaluations=12)
    st = store.create_study("s", "llm-opt", {})
    out = run_search(LLMOptSearcher(ctx), env, store, st, ctx, budget_runs=ctx.budget_runs)
    assert out.runs_spent == ctx.budget_runs
    trials = store.list_trials(st.id)
    assert len({t.graph_hash for t in trials}) == len(trials) == 12
    assert all(t.cost_units <= 18 + 1e-9 for t in trials)
    steps = store.agent_steps(st.id)
    assert {s["backend"] for s in steps} == {HEURISTIC_BACKEND} and not any(s["is_llm"] for s in steps)
    assert [t.origin for t in trials[:4]] == ["random"] * 4  # no history yet
    assert {t.origin for t in trials[4:]} == {"mutation"}


def test_heuristic_runs_resume_exactly(costs):
    env = FakeEnv(costs, n_dev=3)
    ctx = _ctx(costs, env, agent={}, evaluations=12)  # no agent configured: heuristic

    def run(searcher, n):
        got = []
        for _ in range(n):
            cands = searcher.ask()
            got.append([graph_hash(c.graph) for c in cands])
            searcher.tell(_evals(cands, env, ctx))
        return got

    straight = run(LLMOptSearcher(ctx), 4)
    first = LLMOptSearcher(ctx)
    head = run(first, 2)
    resumed = LLMOptSearcher(ctx)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + run(resumed, 2) == straight


def _evals(cands, env, ctx):
    from graphtune.envs.base import summarize
    from graphtune.search.base import Evaluation

    out = []
    for i, c in enumerate(cands):
        res = env.evaluate(c.graph, ctx.dev_ids)
        m = summarize(res)
        out.append(Evaluation(candidate=c, trial_number=i, graph_hash=graph_hash(c.graph), results=tuple(res),
                              metrics=m, reward=m.accuracy, cost=ctx.costs.cost(c.graph), new_runs=len(res)))
    return out


def test_reply_schema_and_parser_agree():
    schema = reply_schema(LLAMA_POOL, ("assistant", "fuser"))
    text = json.dumps(schema)
    assert all(k not in text for k in ("minItems", "maxItems", "maxLength"))  # strict-mode portable
    assert schema["properties"]["proposals"]["items"]["properties"]["nodes"]["items"]["properties"]["model"][
        "enum"] == list(LLAMA_POOL)
    assert len(parse_reply(json.dumps(GOOD)).proposals) == 2
    with pytest.raises(ValueError, match="not JSON"):
        parse_reply("hello")
    with pytest.raises(ValueError, match="schema"):
        parse_reply(json.dumps({"proposals": [{"nodes": [{"id": "a"}], "edges": []}]}))


# -- hostile replies (issue 10, defects 14 and 15) ---------------------------------------


def test_a_deeply_nested_reply_is_refused_and_the_batch_filled(costs):
    # 100,000 `[` used to end the search with RecursionError
    env = FakeEnv(costs, n_dev=4)
    fake = FakeComplete("[" * 100_000)
    s = LLMOptSearcher(_ctx(costs, env, batch=3), complete=fake)
    cands = s.ask()
    assert len(cands) == 3 and all(c.origin == "random" for c in cands)
    [step] = s.drain_agent_steps()
    assert step["calls"] == 2 and "nested 100000 levels deep" in step["rejected_reason"]
    assert step["parsed"] is None


def test_a_huge_reply_is_refused_and_stored_as_a_bounded_excerpt(costs):
    import hashlib

    from graphtune.agent.schema import REPLY_EXCERPT_CHARS

    huge = json.dumps(dict(GOOD, reasoning="x" * 5_000_000))
    env = FakeEnv(costs, n_dev=4)
    fake = FakeComplete(huge)
    s = LLMOptSearcher(_ctx(costs, env, batch=2), complete=fake)
    assert all(c.origin == "random" for c in s.ask())
    [step] = s.drain_agent_steps()
    assert "over the limit of 200000" in step["rejected_reason"]
    assert len(step["reply"]) < 3 * REPLY_EXCERPT_CHARS  # two attempts, one excerpt each
    assert hashlib.sha256(huge.encode()).hexdigest() in step["reply"]
    # the re-ask carries the excerpt, not 5 MB
    assert len(fake.calls[1]["messages"][-2]["content"]) < REPLY_EXCERPT_CHARS + 300


def test_a_long_reasoning_is_used_but_stored_bounded(costs):
    from graphtune.agent.schema import REPLY_EXCERPT_CHARS

    env = FakeEnv(costs, n_dev=4)
    s = LLMOptSearcher(_ctx(costs, env, batch=2), complete=FakeComplete(dict(GOOD, reasoning="y" * 50_000)))
    assert [c.origin for c in s.ask()] == ["agent", "agent"]
    [step] = s.drain_agent_steps()
    assert step["rejected_reason"] is None
    for text in (step["reply"], step["feedback"], step["parsed"]["reasoning"]):
        assert len(text) < REPLY_EXCERPT_CHARS + 300


@pytest.mark.parametrize("bad", ["NaN", "1e999", '"a\\u0000"', '"\\ud800"'])
def test_non_finite_numbers_and_unstorable_strings_are_refused(costs, bad):
    # a NUL or a lone surrogate in a node id cannot be written to PostgreSQL (or as UTF-8)
    reply = json.dumps({"reasoning": "ok", "proposals": [
        {"nodes": [{"id": "@X@", "role": "assistant", "model": "llama-3.1-8b"}], "edges": []}]})
    env = FakeEnv(costs, n_dev=4)
    s = LLMOptSearcher(_ctx(costs, env, batch=1), complete=FakeComplete(reply.replace('"@X@"', bad)))
    assert [c.origin for c in s.ask()] == ["random"]
    [step] = s.drain_agent_steps()
    assert "reply refused" in step["rejected_reason"]
    json.dumps(step, allow_nan=False).encode("utf-8")


def test_a_proposals_parent_comes_from_its_field_and_the_heuristic_names_the_trial_it_mutated(costs):
    env = FakeEnv(costs, n_dev=4)
    store = MemoryStorage()
    ctx = _ctx(costs, env, evaluations=12)
    second = {"reasoning": "grow the best one; #1 was bad",
              "proposals": [
                  {"nodes": [{"id": "a", "role": "assistant", "model": "llama-3.2-3b"}], "edges": [], "parent": 1},
                  {"nodes": [{"id": "a", "role": "assistant", "model": "llama-3.2-1b"},
                             {"id": "b", "role": "assistant", "model": "llama-3.2-3b"}], "edges": [["a", "b"]],
                   "parent": 99, "rationale": "derived from #2"},
                  {"nodes": [{"id": "a", "role": "assistant", "model": "llama-3.1-8b"},
                             {"id": "b", "role": "assistant", "model": "llama-3.2-1b"}], "edges": [["a", "b"]],
                   "rationale": "like #3"}]}
    fake = FakeComplete(GOOD, second)
    st = store.create_study("s", "llm-opt", {})
    run_search(LLMOptSearcher(ctx, complete=fake), env, store, st, ctx, budget_runs=ctx.budget_runs)
    prompt = fake.calls[1]["messages"][1]["content"]
    assert "#1 {" in prompt and '"parent"' in prompt  # trials are numbered where the agent reads them
    batch1 = [t for t in store.list_trials(st.id) if t.batch == 1]
    assert [t.origin for t in batch1[:3]] == ["agent"] * 3
    # the field sets the parent; an unknown trial is dropped with a warning; free text sets none
    assert [list(t.parents) for t in batch1[:3]] == [[1], [], []]
    step = store.agent_steps(st.id)[1]
    assert "parent #99 is not a trial the agent was shown" in step["applied"]["proposals"][1]["warning"]
    # the offline heuristic records the trial each mutation came from
    store2 = MemoryStorage()
    ctx2 = _ctx(costs, env, agent={"model": "heuristic"}, evaluations=12)
    st2 = store2.create_study("h", "llm-opt", {})
    run_search(LLMOptSearcher(ctx2), env, store2, st2, ctx2, budget_runs=ctx2.budget_runs)
    numbers = {t.number for t in store2.list_trials(st2.id)}
    mutations = [t for t in store2.list_trials(st2.id) if t.origin == "mutation"]
    assert mutations and all(len(t.parents) == 1 and t.parents[0] in numbers and t.parents[0] < t.number
                             for t in mutations)
