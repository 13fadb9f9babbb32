"""agent-reinforce's agent learns from its own feedback: each feedback prompt carries its
earlier hypotheses next to what was measured since (bounded by tokens, rebuilt exactly on
resume), a proposal's parent comes from its ``parent`` field, every batch stores how much
of each logit change came from the gradient and from the agent, and the paper's ablations
(no memory, no insight-based initialisation, assistant-only roles) are options."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pytest

from graphtune.agent.memory import CHARS_PER_TOKEN, MEMORY_ASK, MEMORY_HEADER, estimate_tokens
from graphtune.errors import SpecError
from graphtune.graphs import Budget, Space
from graphtune.graphs.catalog import LLAMA_POOL
from graphtune.graphs.render import to_text
from graphtune.search.agent_reinforce import AgentReinforceSearcher
from graphtune.search.base import Objective, SearchContext
from graphtune.search.loop import evaluate_candidate, run_search
from graphtune.store import MemoryStorage

from fakes import FakeEnv


@dataclass(frozen=True)
class FakeReply:
    text: str
    prompt_tokens: int = 100
    completion_tokens: int = 20
    seconds: float = 0.01
    model: str = "fake/llm"


def _node(i, role, model):
    return {"id": f"x{i}", "role": role, "model": model}


#: distinct valid graphs (at most 18 units), one per agent call, so no proposal repeats
PROPOSALS = [
    {"nodes": [_node(0, "assistant", "llama-3.2-3b"), _node(1, "fuser", "llama-3.2-3b")], "edges": [["x0", "x1"]]},
    {"nodes": [_node(0, "assistant", "llama-3.2-1b"), _node(1, "fuser", "llama-3.2-3b")], "edges": [["x0", "x1"]]},
    {"nodes": [_node(0, "assistant", "llama-3.2-1b"), _node(1, "fuser", "llama-3.2-1b")], "edges": [["x0", "x1"]]},
    {"nodes": [_node(0, "assistant", "llama-3.2-3b"), _node(1, "assistant", "llama-3.2-1b")], "edges": [["x0", "x1"]]},
    {"nodes": [_node(0, "assistant", "llama-3.2-1b"), _node(1, "assistant", "llama-3.2-1b"),
               _node(2, "fuser", "llama-3.2-3b")], "edges": [["x0", "x2"], ["x1", "x2"]]},
    {"nodes": [_node(0, "assistant", "llama-3.2-1b"), _node(1, "assistant", "llama-3.2-3b")], "edges": [["x0", "x1"]]},
    {"nodes": [_node(0, "assistant", "llama-3.2-3b"), _node(1, "fuser", "llama-3.2-1b")], "edges": [["x0", "x1"]]},
    {"nodes": [_node(0, "assistant", "llama-3.2-1b"), _node(1, "assistant", "llama-3.2-3b"),
               _node(2, "fuser", "llama-3.2-3b")], "edges": [["x0", "x2"], ["x1", "x2"]]},
]


class RecordingLLM:
    """A fake LLM agent: call k says hypothesis k, pushes llama-3.2-3b, proposes
    ``PROPOSALS[k]`` (with ``parent`` from ``parent_of(k, prompt)`` when given) and
    records every prompt it was sent."""

    def __init__(self, parent_of=None, rationale: str = ""):
        self.prompts: list[str] = []
        self.parent_of = parent_of
        self.rationale = rationale

    def __call__(self, model, messages, **kw):
        k = len(self.prompts)
        self.prompts.append(messages[-1]["content"])
        prop = dict(PROPOSALS[k % len(PROPOSALS)], rationale=self.rationale)
        if self.parent_of is not None:
            parent = self.parent_of(k, messages[-1]["content"])
            if parent is not None:
                prop["parent"] = parent
        reply = {"feedback": f"hypothesis-{k}: llama-3.2-3b helps on this task", "confidence": 0.5,
                 "model_preference": {"llama-3.2-3b": 0.5, "llama-3.2-1b": -0.4}, "proposals": [prop]}
        return FakeReply(json.dumps(reply))


def _ctx(costs, env, *, options=None, agent=None, evaluations=12, space=None):
    dev = tuple(env.split("dev"))
    return SearchContext(space=space or Space(models=LLAMA_POOL, max_nodes=5, max_in_degree=3), costs=costs,
                         budget=Budget(units=18), objective=Objective(), dev_ids=dev, seed=0, batch_size=6,
                         budget_runs=evaluations * len(dev), task_description="test task",
                         agent=agent or {"model": "fake/llm", "max_retries": 0}, options=options or {})


class Driver:
    """Asks, evaluates and tells batch by batch (as the loop does), keeping what was told."""

    def __init__(self, ctx, env):
        self.ctx, self.env = ctx, env
        self.store = MemoryStorage()
        self.study = self.store.create_study("s", "agent-reinforce", {})
        self.told = []
        self.batch = 0

    def step(self, s, cands=None):
        cands = s.ask() if cands is None else cands
        evs = [evaluate_candidate(c, env=self.env, storage=self.store, study=self.study, ctx=self.ctx, method="x",
                                  batch=self.batch, slot=i) for i, c in enumerate(cands)]
        s.tell(evs)
        self.told.extend(evs)
        self.batch += 1
        return cands, evs


def _memory_section(prompt: str) -> str:
    if MEMORY_HEADER not in prompt:
        return ""
    start = prompt.index(MEMORY_HEADER)
    end = prompt.index(MEMORY_ASK, start) + len(MEMORY_ASK)
    return prompt[start:end]


# -- memory -----------------------------------------------------------------------------------


def test_the_second_feedback_prompt_shows_the_first_hypothesis_and_its_proposals_measured_outcome(costs):
    env = FakeEnv(costs, n_dev=30)
    ctx = _ctx(costs, env)
    llm = RecordingLLM()
    s = AgentReinforceSearcher(ctx, complete=llm)
    d = Driver(ctx, env)
    for _ in range(3):  # probes + initial step; batch 1 + feedback 1; batch 2 (its proposal) + feedback 2
        d.step(s)
    assert len(llm.prompts) == 3
    first_feedback, second_feedback = llm.prompts[1], llm.prompts[2]
    assert MEMORY_HEADER in first_feedback and "hypothesis-0" in first_feedback  # the initial step's
    memory = _memory_section(second_feedback)
    assert "hypothesis-1: llama-3.2-3b helps on this task" in memory
    # the first feedback step's proposal was evaluated in batch 2: its trial and its paired
    # difference to the incumbent, with a 95% interval, sit next to the hypothesis
    prop = next(e for e in d.told if e.candidate.origin == "agent" and e.candidate.info["agent_step"] == "b1-feedback")
    inc = s.racing.incumbent()
    assert prop.graph_hash != inc
    line = re.search(re.escape(f"#{prop.trial_number} {to_text(prop.candidate.graph)}: ")
                     + r"([+-]\d+\.\d) pts \[([+-]\d+\.\d), ([+-]\d+\.\d)\] on (\d+) shared questions -> (\w+)", memory)
    assert line, memory
    from graphtune.agent.report import paired_difference

    diff, se, n = paired_difference(s.racing.rewards(prop.graph_hash), s.racing.rewards(inc))
    assert float(line.group(1)) == pytest.approx(diff * 100, abs=0.051)
    assert float(line.group(2)) == pytest.approx((diff - 1.96 * se) * 100, abs=0.051)
    assert int(line.group(4)) == n
    # what it pushed, next to what the graphs measured since say about it
    assert re.search(r"llama-3\.2-3b \+\d\.\d\d: ([+-]\d+\.\d pts \[.*?\] \(\d+ vs \d+ graphs\) -> "
                     r"(held|contradicted|unclear)|untested)", memory)
    assert "confirm" in memory  # the agent is asked to confirm or revise its hypotheses


def test_memory_stays_within_its_token_bound_dropping_the_oldest_rounds_first(costs):
    env = FakeEnv(costs, n_dev=30)
    bound = 250
    ctx = _ctx(costs, env, options={"memory_tokens": bound}, evaluations=30)
    llm = RecordingLLM()
    s = AgentReinforceSearcher(ctx, complete=llm)
    d = Driver(ctx, env)
    for _ in range(7):
        d.step(s)
    last = _memory_section(llm.prompts[-1])
    assert last and estimate_tokens(last) <= bound
    k = len(llm.prompts) - 1
    assert f"hypothesis-{k - 1}" in last  # the newest round is there
    assert "hypothesis-0" not in last and "hypothesis-1" not in last  # the oldest were dropped
    # the state keeps only the hypotheses the bound could show (7 steps were made)
    kept = s.state_dict()["memory"]
    assert len(kept) <= 3 and sum(len(r["feedback"]) for r in kept) <= bound * CHARS_PER_TOKEN
    assert kept[-1]["feedback"].startswith(f"hypothesis-{k}:")


def test_memory_tokens_zero_gives_the_memoryless_prompt(costs):
    env = FakeEnv(costs, n_dev=30)
    prompts = {}
    for tokens in (0, 1000):
        ctx = _ctx(costs, env, options={"memory_tokens": tokens})
        llm = RecordingLLM()
        s = AgentReinforceSearcher(ctx, complete=llm)
        d = Driver(ctx, env)
        for _ in range(4):
            d.step(s)
        prompts[tokens] = llm.prompts
        if tokens == 0:
            assert s.state_dict()["memory"] == []
    assert all(MEMORY_HEADER not in p and "hypothesis-" not in p for p in prompts[0])
    # the same search (the fake's replies do not read the prompt): the prompts differ only
    # by the memory section
    assert len(prompts[0]) == len(prompts[1000]) == 4
    for a, b in zip(prompts[0], prompts[1000]):
        section = _memory_section(b)
        assert a == (b.replace("\n\n" + section, "") if section else b)
    assert any(_memory_section(b) for b in prompts[1000][1:])


def test_a_resumed_search_sends_the_same_prompts(costs):
    env = FakeEnv(costs, n_dev=30)
    ctx = _ctx(costs, env)
    la, lb = RecordingLLM(), RecordingLLM()
    a = AgentReinforceSearcher(ctx, complete=la)
    d = Driver(ctx, env)
    for _ in range(4):
        d.step(a)
    state = json.loads(json.dumps(a.state_dict()))
    assert len(json.dumps(state["memory"])) < 8000  # the state keeps hypotheses, not evidence
    lb.prompts = list(la.prompts)  # call k of the fake answers as call k did
    b = AgentReinforceSearcher(ctx, complete=lb)
    b.load_state_dict(state)
    b.restore(list(d.told))  # the evidence comes back from the store's trials
    for _ in range(3):
        ca, cb = a.ask(), b.ask()
        assert [(c.graph, c.question_ids, c.parents) for c in ca] == [(c.graph, c.question_ids, c.parents) for c in cb]
        _, evs = d.step(a, ca)
        b.tell(evs)
    assert len(la.prompts) == len(lb.prompts) > 4
    assert la.prompts[4:] == lb.prompts[4:]
    assert any(_memory_section(p) for p in lb.prompts[4:])


def test_the_heuristic_says_whether_its_previous_hypothesis_held(costs):
    env = FakeEnv(costs, n_dev=30)
    ctx = _ctx(costs, env, agent={"model": "heuristic"}, evaluations=20)
    store = MemoryStorage()
    st = store.create_study("s", "agent-reinforce", {})
    run_search(AgentReinforceSearcher(ctx), env, store, st, ctx, budget_runs=ctx.budget_runs)
    steps = [x for x in store.agent_steps(st.id) if x["kind"] == "feedback"]
    assert len(steps) >= 3
    # from the first feedback on, the heuristic reads its memory: the prompt holds it and
    # the feedback opens with a verdict on its previous hypothesis
    for x in steps:
        assert MEMORY_HEADER in x["prompt"]
        assert re.search(r"Previous hypothesis \((initial step|step after round \d+)\) "
                         r"(held|did not hold|held in part|is not settled yet)", x["feedback"])


# -- lineage ----------------------------------------------------------------------------------


def _probe_trial(prompt: str) -> int:
    return int(re.search(r"^- #(\d+) ", prompt, re.M).group(1))


def test_a_proposals_parent_comes_from_its_field(costs):
    env = FakeEnv(costs, n_dev=30)
    ctx = _ctx(costs, env)
    llm = RecordingLLM(parent_of=lambda k, prompt: _probe_trial(prompt) if k == 0 else None,
                       rationale="a change of #12 and of graph 0123456789abcdef")
    s = AgentReinforceSearcher(ctx, complete=llm)
    d = Driver(ctx, env)
    _, probes = d.step(s)
    named = _probe_trial(llm.prompts[0])
    assert named in [e.trial_number for e in probes]
    cands, _ = d.step(s)
    (init_prop,) = [c for c in cands if c.origin == "agent"]
    assert init_prop.parents == (named,)
    # the second proposal names no parent: its rationale's "#12" or hash sets none
    cands, _ = d.step(s)
    (fb_prop,) = [c for c in cands if c.origin == "agent"]
    assert fb_prop.parents == ()


def test_an_unknown_parent_is_dropped_with_a_warning_not_a_crash(costs):
    env = FakeEnv(costs, n_dev=30)
    ctx = _ctx(costs, env)
    s = AgentReinforceSearcher(ctx, complete=RecordingLLM(parent_of=lambda k, prompt: 99999))
    d = Driver(ctx, env)
    d.step(s)
    steps = s.drain_agent_steps()
    row = steps[0]["applied"]["proposals"][0]
    assert row["status"] == "queued" and "parent #99999" in row["warning"] and "dropped" in row["warning"]
    cands, _ = d.step(s)
    assert [c.parents for c in cands if c.origin == "agent"] == [()]


def test_the_heuristic_names_the_graph_it_mutated_as_parent(costs):
    env = FakeEnv(costs, n_dev=30)
    ctx = _ctx(costs, env, agent={"model": "heuristic"}, evaluations=12)
    store = MemoryStorage()
    st = store.create_study("s", "agent-reinforce", {})
    run_search(AgentReinforceSearcher(ctx), env, store, st, ctx, budget_runs=ctx.budget_runs)
    steps = {x["key"]: x for x in store.agent_steps(st.id)}
    trials = store.list_trials(st.id, split="dev")
    by_number = {t.number: t for t in trials}
    mutated = [t for t in trials if t.origin == "agent" and t.info["agent_step"].endswith("feedback")]
    assert mutated
    for t in mutated:
        step = steps[t.info["agent_step"]]
        row = next(r for r in step["applied"]["proposals"] if r.get("graph_hash") == t.graph_hash)
        named = step["parsed"]["proposals"][row["index"]]["parent"]
        assert list(t.parents) == [named] and by_number[named].number < t.number


# -- attribution ------------------------------------------------------------------------------


def test_every_batch_stores_how_much_of_each_logit_change_came_from_the_gradient_and_the_agent(costs):
    env = FakeEnv(costs, n_dev=30)
    ctx = _ctx(costs, env)
    s = AgentReinforceSearcher(ctx, complete=RecordingLLM())
    d = Driver(ctx, env)
    moved = []
    for _ in range(4):
        before = s.pg.params.copy()
        d.step(s)
        moved.append(s.pg.params - before)
    steps = s.drain_agent_steps()
    assert [x["batch"] for x in steps] == [0, 1, 2, 3]
    names = s.pg.param_names()
    for x, change in zip(steps, moved):
        a = x["applied"]["attribution"]
        # parts add up to what the batch did to the distribution
        assert a["gradient_l1"] + a["agent_l1"] + a["floor_l1"] >= float(np.abs(change).sum()) - 1e-3
        for row in a["top"]:
            i = names.index(row["logit"])
            assert row["gradient"] + row["agent"] + row["floor"] == pytest.approx(change[i], abs=1e-3)
            assert row["total"] == pytest.approx(change[i], abs=1e-4)
        assert a["agent_l1"] > 0  # the fake pushes llama-3.2-3b every step
    assert steps[0]["applied"]["attribution"]["gradient_l1"] == 0  # the initial step: the agent alone
    assert any(x["applied"]["attribution"]["gradient_l1"] > 0 for x in steps[1:])  # samples gave a gradient
    # with the agent's step size at 0 every change is the gradient's (and the floor's)
    ctx0 = _ctx(costs, env, options={"lr_agent": 0.0})
    s0 = AgentReinforceSearcher(ctx0, complete=RecordingLLM())
    d0 = Driver(ctx0, env)
    for _ in range(3):
        d0.step(s0)
    assert all(x["applied"]["attribution"]["agent_l1"] == 0 for x in s0.drain_agent_steps())


# -- ablation options ---------------------------------------------------------------------------


def test_insight_init_false_starts_from_the_uniform_distribution_without_probes(costs):
    env = FakeEnv(costs, n_dev=30)
    ctx = _ctx(costs, env, options={"insight_init": False})
    llm = RecordingLLM()
    s = AgentReinforceSearcher(ctx, complete=llm)
    uniform = AgentReinforceSearcher(ctx, complete=llm).pg.params.copy()
    cands = s.ask()
    assert cands and all(c.origin == "sample" for c in cands)  # no probes, no initial proposals
    assert np.array_equal(s.pg.params, uniform)
    d = Driver(ctx, env)
    d.step(s, cands)
    steps = s.drain_agent_steps()
    assert [x["kind"] for x in steps] == ["feedback"] and len(llm.prompts) == 1
    assert "PROBE RESULTS" not in llm.prompts[0]
    # the default probes every model first and starts from the agent's initial step
    s1 = AgentReinforceSearcher(_ctx(costs, env), complete=RecordingLLM())
    assert all(c.origin == "probe" for c in s1.ask())


def test_assistant_only_roles_search_graphs_of_assistants_only(costs):
    env = FakeEnv(costs, n_dev=30)
    ctx = _ctx(costs, env, options={"roles": "assistant-only"}, agent={"model": "heuristic"}, evaluations=12)
    s = AgentReinforceSearcher(ctx)
    store = MemoryStorage()
    st = store.create_study("s", "agent-reinforce", {})
    run_search(s, env, store, st, ctx, budget_runs=ctx.budget_runs)
    trials = store.list_trials(st.id, split="dev")
    roles = {n["role"] for t in trials for n in t.graph["nodes"]}
    assert roles == {"assistant"} and any(len(t.graph["nodes"]) > 1 for t in trials)
    assert s.pg.roles == ("assistant",)
    # a fuser proposed by the agent is refused in that space, with the reason
    ctx2 = _ctx(costs, env, options={"roles": "assistant-only"})
    s2 = AgentReinforceSearcher(ctx2, complete=RecordingLLM())
    Driver(ctx2, env).step(s2)
    row = s2.drain_agent_steps()[0]["applied"]["proposals"][0]
    assert row["status"] == "rejected" and "fuser" in row["reason"]
    # the default searches the space's roles
    s3 = AgentReinforceSearcher(_ctx(costs, env, agent={"model": "heuristic"}))
    assert s3.pg.roles == ("assistant", "fuser")


def test_assistant_only_needs_an_assistant_role(costs):
    env = FakeEnv(costs, n_dev=30)
    ctx = _ctx(costs, env, options={"roles": "assistant-only"},
               space=Space(models=LLAMA_POOL, roles=("fuser", "critic"), max_nodes=5, max_in_degree=3))
    with pytest.raises(SpecError, match="assistant-only needs the role 'assistant'"):
        AgentReinforceSearcher(ctx)


def test_on_a_pipeline_insight_init_false_skips_the_probes_and_assistant_only_is_refused(tmp_path):
    from dataclasses import replace

    from test_pipeline_search import RAG, problem

    spec, pr = problem(tmp_path, RAG, "agent-reinforce", evaluations=8)
    ctx = replace(pr.ctx, options={"insight_init": False})
    s = AgentReinforceSearcher(ctx)
    store = MemoryStorage()
    st = store.create_study("s", "agent-reinforce", {})
    for k in range(2):
        cands = s.ask()
        assert cands and all(c.origin != "probe" for c in cands)
        s.tell([evaluate_candidate(c, env=pr.env, storage=store, study=st, ctx=ctx, method="agent-reinforce",
                                   batch=k, slot=i) for i, c in enumerate(cands)])
    assert [x["kind"] for x in s.drain_agent_steps()] == ["feedback", "feedback"]
    with pytest.raises(SpecError, match="assistant-only is for single-stage studies"):
        AgentReinforceSearcher(replace(pr.ctx, options={"roles": "assistant-only"}))
