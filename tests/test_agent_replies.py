"""Agent replies are outside text (issue 10: defects 14 and 15 and the property suite).

Whatever an agent's LLM returns (random text, JSON-ish noise, deep nesting, huge strings,
NaN/inf/huge numbers, wrong types, unknown node ids/models/roles, cyclic proposals,
unicode, truncated JSON), the search either applies a valid update or rejects the reply
with a stored reason and falls back. Never an exception escaping, never a non-finite
number in the searcher's state, and what is stored of a reply is bounded.

The properties drive the real path: agent-reinforce's init and feedback steps (the LLM
agent's parsing, then ``_apply`` and the probabilistic graph's ``apply_deltas``, then
the queued proposals in the next ``ask``) and llm-opt's proposal step, each with a fake
LLM returning the generated text. Limits are lowered in the searchers under test
(``max_reply_chars``) so over-long replies are cheap to generate; the defaults are
checked by the regression tests in test_agent_reinforce.py and test_llm_opt.py.

Run with ``-s`` to see how many cases each property tried and how they ended.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphtune.agent.schema import (MAX_REPLY_CHARS, MAX_REPLY_DEPTH, MAX_STORED_REPLY_CHARS, REPLY_EXCERPT_CHARS,
                                    AgentUpdate, ReplyLimits, json_depth, parse_update, reply_excerpt)
from graphtune.errors import GraphError
from graphtune.graphs import Budget, Space
from graphtune.graphs.catalog import LLAMA_POOL
from graphtune.graphs.space import validate
from graphtune.search.agent_reinforce import AgentReinforceSearcher
from graphtune.search.base import Objective, SearchContext
from graphtune.search.llm_opt import LLMOptSearcher, parse_reply
from graphtune.search.loop import evaluate_candidate
from graphtune.search.probgraph import ProbabilisticGraph
from graphtune.store import MemoryStorage

from fakes import FakeEnv

#: reply limit in the searchers under test (the default is 200,000 characters)
TEST_MAX_CHARS = 20_000
SLOTS = [f"s{i}" for i in range(5)]
ROLES = ["assistant", "fuser"]
#: a stored reply: one excerpt per attempt, as JSON when there are several, and never
#: more than MAX_STORED_REPLY_CHARS plus the marker line whatever the backend
STORED_BOUND = MAX_STORED_REPLY_CHARS + 300

TRIED: Counter = Counter()
#: largest stored step seen (characters of its JSON, the prompt, which graphtune writes, left out)
LARGEST: Counter = Counter()


def _fallback(applied: dict) -> bool:
    """A step that changed nothing: the numeric update only (the batch's attribution, when
    stored, has no agent part)."""
    rest = {k: v for k, v in applied.items() if k != "attribution"}
    return rest == {"fallback": "numeric update only"} and not (applied.get("attribution") or {}).get("agent_l1")


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    print("\nagent-reply cases tried:", dict(sorted(TRIED.items())))
    print("largest stored step (chars of JSON without the prompt):", dict(LARGEST))


# -- strategies ------------------------------------------------------------------------------

#: strings that break things: NUL, lone surrogates (raw and escaped), RTL override, emoji, BOM
ODD = ["\x00", "\ud800", "\udfff", "\U0001F600", "\u202e", "\ufeff", "é", "\\", '"', "\n", "\\u0000", "\\ud800"]
texts = st.one_of(st.text(max_size=40), st.sampled_from(ODD),
                  st.lists(st.sampled_from(ODD) | st.text(max_size=3), max_size=6).map("".join))
#: a raw JSON number token (placeholder replaced after json.dumps)
RAW = re.compile(r'"@@RAW:([^@]*)@@"')
raw_numbers = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e308", "-1e308", "4.9e-324",
                               "1" + "0" * 400, "-0", "0.0000000000000000000001", "1e-999", "12345678901234567890"])
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),  # json.dumps writes NaN / Infinity
    st.floats(min_value=-10, max_value=10),
    st.integers(min_value=-(10 ** 30), max_value=10 ** 30),
    raw_numbers.map(lambda t: f"@@RAW:{t}@@"),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "0.5", ""]),  # numbers as strings
)
json_values = st.recursive(st.none() | st.booleans() | numbers | texts,
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(texts, c, max_size=3), max_leaves=8)


def maybe_wrong(right):
    """Mostly the right value, sometimes any JSON value (wrong types)."""
    return st.one_of(right, right, right, json_values)


models = st.sampled_from(list(LLAMA_POOL) + ["gpt-99", "", "llama-3.2-1b\x00", "x" * 300])
roles = st.sampled_from(ROLES + ["critic", "", "sink"])
node_ids = st.sampled_from(["a", "b", "c", "s0", "s4", "", "x" * 70, "\x00", "\ud800"])
slot_ids = st.sampled_from(SLOTS + ["s9", "zz", "s-1", "", "s04"])
nodes = st.fixed_dictionaries({"id": maybe_wrong(node_ids), "role": maybe_wrong(roles),
                               "model": maybe_wrong(models)})
graphs = st.fixed_dictionaries({"nodes": maybe_wrong(st.lists(nodes, min_size=0, max_size=5)),
                                "edges": maybe_wrong(st.lists(st.tuples(node_ids, node_ids), max_size=6))},
                               optional={"rationale": texts})
updates = st.fixed_dictionaries(
    {"feedback": maybe_wrong(texts)},
    optional={"model_preference": maybe_wrong(st.dictionaries(models, numbers, max_size=5)),
              "role_preference": maybe_wrong(st.dictionaries(roles, numbers, max_size=3)),
              "edge_changes": maybe_wrong(st.lists(st.fixed_dictionaries(
                  {"src": slot_ids, "dst": slot_ids, "delta": numbers}), max_size=4)),
              "target_width": maybe_wrong(numbers), "target_depth": maybe_wrong(numbers),
              "proposals": maybe_wrong(st.lists(graphs, max_size=4)),
              "confidence": maybe_wrong(numbers), "surprise": json_values})
# right types, semantic trouble: unknown names and slots, cycles, over-budget or dangling edges
finite = st.floats(min_value=-6, max_value=6)
ok_nodes = st.fixed_dictionaries({"id": st.sampled_from(["a", "b", "c", "d"]), "role": roles,
                                  "model": st.sampled_from(list(LLAMA_POOL) + ["gpt-99"])})
ok_graphs = st.fixed_dictionaries({"nodes": st.lists(ok_nodes, min_size=1, max_size=4),
                                   "edges": st.lists(st.tuples(*[st.sampled_from(["a", "b", "c", "d", "z"])] * 2),
                                                     max_size=5)})
typed_updates = st.fixed_dictionaries(
    {"feedback": st.text(max_size=40)},
    optional={"model_preference": st.dictionaries(st.sampled_from(list(LLAMA_POOL) + ["gpt-99"]), finite, max_size=4),
              "role_preference": st.dictionaries(roles, finite, max_size=3),
              "edge_changes": st.lists(st.fixed_dictionaries({"src": slot_ids, "dst": slot_ids,
                                                              "delta": st.floats(-5, 5)}), max_size=4),
              "target_width": st.integers(1, 12), "target_depth": st.integers(1, 12),
              "proposals": st.lists(ok_graphs, max_size=4), "confidence": st.floats(0, 1)})
proposal_replies = st.fixed_dictionaries({"proposals": maybe_wrong(st.lists(graphs, max_size=5))},
                                         optional={"reasoning": maybe_wrong(texts), "surprise": json_values})


def dumps(obj) -> str:
    return RAW.sub(lambda m: m.group(1), json.dumps(obj))


@st.composite
def dressed(draw, objects):
    """A structured reply, then perhaps truncated, wrapped in prose or a fence, or padded."""
    text = draw(objects.map(dumps))
    how = draw(st.sampled_from(["plain", "plain", "truncated", "fenced", "prose", "padded", "unicode"]))
    if how == "truncated":
        text = text[:draw(st.integers(0, max(0, len(text) - 1)))]
    elif how == "fenced":
        text = f"```json\n{text}\n```"
    elif how == "prose":
        text = f"Sure! Here is the update: {text} Hope that helps."
    elif how == "padded":  # valid JSON over the limit
        text = text + " " * draw(st.integers(TEST_MAX_CHARS - len(text), 3 * TEST_MAX_CHARS))
    elif how == "unicode":  # non-ASCII written raw (lone surrogates included)
        text = RAW.sub(lambda m: m.group(1), json.dumps(json.loads(RAW.sub('"n"', text)), ensure_ascii=False))
    return text


TOKENS = ["{", "}", "[", "]", ",", ":", '"', '"feedback"', '"proposals"', '"model_preference"', '"nodes"',
          '"edges"', '"a"', "1", "-0.5", "NaN", "Infinity", "1e999", "null", "true", "\\", "\\u0000", " "]
noise = st.lists(st.sampled_from(TOKENS), max_size=300).map("".join)
nesting = st.builds(lambda n, open_, tail: open_ * n + tail,
                    st.integers(1, 3 * TEST_MAX_CHARS // 5), st.sampled_from(["[", "{", '{"a":', '[{"x":']),
                    st.sampled_from(["", "1", "]" * 40, "}"]))
#: long dict keys (they appear in validation errors) and many unknown names
long_keys = st.builds(lambda n, k, v: json.dumps({"feedback": "x", "model_preference": {("k" * n) + str(i): v
                                                                                     for i in range(k)}}),
                      st.integers(1, 5000), st.integers(1, 200), st.sampled_from([1.0, "x", None]))
huge = st.builds(lambda n, c: json.dumps({"feedback": c * n, "proposals": []}),
                 st.integers(TEST_MAX_CHARS // 2, 3 * TEST_MAX_CHARS), st.sampled_from(["x", "é", "\U0001F600"]))


#: runs that once cost quadratic (or worse) time to scan: quote-backslash, fences, spaces
repeats = st.builds(lambda p, n: p * n, st.sampled_from(['"\\', "```", " ", "\\", '"', '["', "```json\n "]),
                    st.integers(1, TEST_MAX_CHARS // 2))


def replies(structured, typed=None):
    typed = typed if typed is not None else structured
    return st.one_of(st.text(max_size=400), noise, nesting, huge, long_keys, repeats, dressed(structured),
                     dressed(structured), typed.map(dumps), typed.map(dumps))


# -- checks ---------------------------------------------------------------------------------


def _storable(obj, where="") -> None:
    """What a step stores: finite numbers and strings PostgreSQL and UTF-8 can hold."""
    if isinstance(obj, float):
        assert math.isfinite(obj), where
    elif isinstance(obj, str):
        assert "\x00" not in obj, where
        obj.encode("utf-8")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _storable(k, where)
            _storable(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _storable(v, where)


def _check_step(step: dict, method: str) -> str:
    """The invariants of one stored agent step; returns how it ended."""
    _storable(step)
    json.dumps(step, allow_nan=False)
    for field in ("reply", "rejected_reason", "feedback"):
        assert step[field] is None or len(step[field]) <= STORED_BOUND, field
    # what is parsed was read from at most TEST_MAX_CHARS characters (6x: \u escapes)
    assert len(json.dumps(step["parsed"])) <= 6 * TEST_MAX_CHARS
    size = len(json.dumps({k: v for k, v in step.items() if k != "prompt"}, ensure_ascii=False))
    LARGEST[method] = max(LARGEST[method], size)
    if step["parsed"] is None:
        assert step["rejected_reason"], "a rejected reply keeps its reason"
        return "rejected"
    return "applied" if not step.get("rejected_reason") else "applied, partly rejected"


# -- agent-reinforce -------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeReply:
    text: str
    prompt_tokens: int = 10
    completion_tokens: int = 10
    seconds: float = 0.01
    model: str = "fake/llm"


@pytest.fixture(scope="module")
def reinforce_setup():
    from graphtune.graphs import CostModel
    from graphtune.graphs.catalog import KNOWN_MODELS

    from conftest import MATH_SHAPE

    costs = CostModel({m: KNOWN_MODELS[m] for m in LLAMA_POOL}, MATH_SHAPE)
    env = FakeEnv(costs, n_dev=10)
    dev = tuple(env.split("dev"))
    ctx = SearchContext(space=Space(models=LLAMA_POOL, max_nodes=5, max_in_degree=3), costs=costs,
                        budget=Budget(units=18), objective=Objective(), dev_ids=dev, seed=0, batch_size=5,
                        budget_runs=100 * len(dev), task_description="t",
                        agent={"model": "fake/llm", "max_retries": 1, "max_reply_chars": TEST_MAX_CHARS})
    return ctx, env


def _batch(s, ctx, env, store, st_, k):
    cands = s.ask()
    for c in cands:  # every queued agent proposal is a valid, in-budget graph
        validate(c.graph, ctx.space, ctx.costs, ctx.budget)
    evs = [evaluate_candidate(c, env=env, storage=store, study=st_, ctx=ctx, method="x", batch=k, slot=i)
           for i, c in enumerate(cands)]
    s.tell(evs)


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                                 HealthCheck.function_scoped_fixture])
@given(text=replies(updates, typed_updates))
def test_agent_reinforce_applies_or_rejects_any_reply(reinforce_setup, text):
    ctx, env = reinforce_setup
    s = AgentReinforceSearcher(ctx, complete=lambda model, messages, **kw: FakeReply(text))
    store = MemoryStorage()
    st_ = store.create_study("s", "agent-reinforce", {})
    for k in range(3):  # probes + init step, a feedback step, then the agent's proposals evaluated
        _batch(s, ctx, env, store, st_, k)
    steps = s.drain_agent_steps()
    assert [x["kind"] for x in steps][:2] == ["init", "feedback"]
    for x in steps:
        TRIED[f"agent-reinforce step {_check_step(x, 'agent-reinforce')}"] += 1
        if x["parsed"] is None:
            assert _fallback(x["applied"])
        elif not _fallback(x["applied"]):
            assert set(x["applied"]) - {"attribution"} == {"deltas", "proposals"}
    state = s.state_dict()
    json.dumps(state, allow_nan=False)  # no NaN/inf anywhere (PostgreSQL's JSON has none)
    assert np.all(np.isfinite(s.pg.params))
    TRIED["agent-reinforce replies"] += 1


# -- llm-opt ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reply:
    text: str
    prompt_tokens: int = 10
    completion_tokens: int = 10
    seconds: float = 0.01


@settings(max_examples=250, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                                 HealthCheck.function_scoped_fixture])
@given(text=replies(proposal_replies, st.fixed_dictionaries(
    {"reasoning": st.text(max_size=40), "proposals": st.lists(ok_graphs, max_size=5)})))
def test_llm_opt_uses_or_rejects_any_reply(reinforce_setup, text):
    ctx0, _ = reinforce_setup
    ctx = SearchContext(space=Space(models=LLAMA_POOL, max_nodes=4, max_in_degree=3), costs=ctx0.costs,
                        budget=Budget(units=18), objective=Objective(), dev_ids=ctx0.dev_ids, seed=0, batch_size=3,
                        budget_runs=100, task_description="t",
                        agent={"model": "openai/fake", "max_reply_chars": TEST_MAX_CHARS})
    s = LLMOptSearcher(ctx, complete=lambda model, messages, **kw: _Reply(text))
    cands = s.ask()
    assert len(cands) == ctx.batch_size  # the batch is always full (random fill)
    for c in cands:
        validate(c.graph, ctx.space, ctx.costs, ctx.budget)
    [step] = s.drain_agent_steps()
    TRIED[f"llm-opt step {_check_step(step, 'llm-opt')}"] += 1
    accepted = sum(c.origin == "agent" for c in cands)
    assert step["applied"]["accepted"] == accepted
    if accepted < len(step["parsed"]["proposals"] if step["parsed"] else []) or step["parsed"] is None:
        assert step["rejected_reason"] or step["applied"]["random_fill"] == ctx.batch_size - accepted
    json.dumps(s.state_dict(), allow_nan=False)
    TRIED["llm-opt replies"] += 1


# -- the parser alone (many more cases, cheap) ------------------------------------------------


@settings(max_examples=600, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(text=replies(updates, typed_updates))
def test_parse_update_returns_a_finite_update_or_raises_value_error(text):
    limits = ReplyLimits(max_chars=TEST_MAX_CHARS)
    try:
        upd = parse_update(text, limits)
    except ValueError as e:  # pydantic's ValidationError, JSONDecodeError and ReplyRejected are ValueErrors
        assert str(e)
        TRIED["parser: rejected"] += 1
        return
    TRIED["parser: accepted"] += 1
    assert isinstance(upd, AgentUpdate)
    _storable(upd.model_dump(mode="json"))
    json.dumps(upd.model_dump(mode="json"), allow_nan=False)
    assert len(text) <= TEST_MAX_CHARS and json_depth(text) <= MAX_REPLY_DEPTH


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(text=replies(proposal_replies, st.fixed_dictionaries(
    {"reasoning": st.text(max_size=40), "proposals": st.lists(ok_graphs, max_size=5)})))
def test_llm_opt_parse_reply_raises_only_value_error(text):
    try:
        parse_reply(text, ReplyLimits(max_chars=TEST_MAX_CHARS))
        TRIED["llm-opt parser: accepted"] += 1
    except ValueError:
        TRIED["llm-opt parser: rejected"] += 1


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=st.one_of(st.text(max_size=12_000),
                      st.text(alphabet=st.sampled_from([c for c in ODD if len(c) == 1] + ["a", "{"]), max_size=9000)))
def test_reply_excerpt_is_bounded_storable_and_keeps_short_replies_whole(text):
    out = reply_excerpt(text)
    _storable(out)
    assert len(out) <= REPLY_EXCERPT_CHARS + 300
    if len(text) <= REPLY_EXCERPT_CHARS and "\x00" not in text:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return
        assert out == text
    TRIED["excerpt"] += 1


# -- depth scan ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, derandomize=True)
@given(value=st.recursive(st.none() | st.integers() | st.text(alphabet="[]{}\"\\ab", max_size=6),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                          max_leaves=30))
def test_json_depth_is_exact_on_valid_json(value):
    def depth(v):
        if isinstance(v, list):
            return 1 + max((depth(x) for x in v), default=0)
        if isinstance(v, dict):
            return 1 + max((depth(x) for x in v.values()), default=0)
        return 0

    assert json_depth(json.dumps(value)) == depth(value)
    TRIED["depth scan"] += 1


# -- defence in depth: the probabilistic graph -----------------------------------------------


@pytest.fixture
def pg(costs):
    return ProbabilisticGraph(Space(models=LLAMA_POOL, max_nodes=5, max_in_degree=3), costs, Budget(units=18))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["model", "role", "edge", "scale", "max_delta"])
def test_the_probabilistic_graph_never_stores_a_non_finite_logit(pg, bad, where):
    pg.apply_deltas(model_preference={"llama-3.2-3b": 0.7}, scale=1.0)
    before = pg.state_dict()
    kw = {"model": dict(model_preference={"llama-3.2-3b": bad}), "role": dict(role_preference={"fuser": bad}),
          "edge": dict(edge_changes=[{"src": "s0", "dst": "s4", "delta": bad}]),
          "scale": dict(model_preference={"llama-3.2-3b": 1.0}, scale=bad),
          "max_delta": dict(model_preference={"llama-3.2-3b": 1.0}, max_delta=bad)}[where]
    with pytest.raises(GraphError, match="not a finite number; the distribution is unchanged"):
        pg.apply_deltas(**kw)
    assert pg.state_dict() == before
    json.dumps(pg.state_dict(), allow_nan=False)


def test_a_non_finite_gradient_step_is_refused(pg):
    pg.step(np.full(pg.n_params, 0.1), lr=0.1)
    before = pg.state_dict()
    g = np.zeros(pg.n_params)
    g[3] = np.nan
    assert pg.step(g, lr=0.1) == 0.0
    assert pg.step(np.ones(pg.n_params), lr=float("nan")) == 0.0
    assert pg.state_dict() == before  # logits and Adam moments unchanged


def test_a_stored_state_with_nan_is_refused_on_load(pg):
    st_ = pg.state_dict()
    st_["params"][0] = float("nan")
    with pytest.raises(GraphError, match="non-finite values.*start a new study"):
        pg.load_state_dict(st_)


def test_spec_defaults_match_the_parser_defaults():
    from graphtune.spec import AgentSpec

    a = AgentSpec()
    assert (a.max_reply_chars, a.max_reply_depth) == (MAX_REPLY_CHARS, MAX_REPLY_DEPTH)
    assert ReplyLimits.from_settings(a.model_dump()) == ReplyLimits()
    assert ReplyLimits.from_settings({"max_reply_chars": 5000}).max_chars == 5000


# -- hostile replies end as stored steps on every store --------------------------------------

HOSTILE = {
    "nan": json.dumps({"feedback": "x", "model_preference": {"llama-3.2-3b": "@N@"}}).replace('"@N@"', "NaN"),
    "1e999": json.dumps({"feedback": "x", "role_preference": {"fuser": "@N@"}}).replace('"@N@"', "1e999"),
    "deep": "[" * 100_000,
    "huge": json.dumps({"feedback": "x", "proposals": []}) + " " * 1_000_000,
    "nul": json.dumps({"feedback": "a\x00b"}),
    "surrogate": '{"feedback": "\\ud800"}',
    "raw surrogate and NUL in prose": "\ud800\x00 not json",
}


@pytest.mark.parametrize("kind", ["sqlite", "memory", pytest.param("postgresql", marks=pytest.mark.skipif(
    not os.environ.get("GRAPHTUNE_TEST_POSTGRES_URL"),
    reason="set GRAPHTUNE_TEST_POSTGRES_URL (bash scripts/postgres.sh start) to test PostgreSQL"))])
def test_hostile_replies_are_stored_bounded_and_the_study_completes(kind, tmp_path, costs):
    """NaN used to make PostgreSQL refuse the searcher state (the study stuck `running`);
    NUL and lone surrogates cannot be written to PostgreSQL (or as UTF-8) at all."""
    from test_store import open_store

    from graphtune.search.loop import run_search

    texts = list(HOSTILE.values())
    n = iter(range(10 ** 6))

    def complete(model, messages, **kw):
        return FakeReply(texts[next(n) % len(texts)])

    env = FakeEnv(costs, n_dev=10)
    dev = tuple(env.split("dev"))
    ctx = SearchContext(space=Space(models=LLAMA_POOL, max_nodes=5, max_in_degree=3), costs=costs,
                        budget=Budget(units=18), objective=Objective(), dev_ids=dev, seed=0, batch_size=5,
                        budget_runs=20 * len(dev), task_description="t",
                        agent={"model": "fake/llm", "max_retries": 0})
    store = open_store(kind, tmp_path)
    try:
        st_ = store.create_study("s", "agent-reinforce", {})
        run_search(AgentReinforceSearcher(ctx, complete=complete), env, store, st_, ctx,
                   budget_runs=ctx.budget_runs, test_ids=env.split("test")[:5])
        assert store.get_study("s").status == "complete"
        json.dumps(store.get_study("s").searcher_state, allow_nan=False)
        steps = store.agent_steps(st_.id)
        assert len(steps) >= len(HOSTILE)
        for x in steps:
            assert x["rejected_reason"] and _fallback(x["applied"])
            assert len(x["reply"]) <= REPLY_EXCERPT_CHARS + 300
        TRIED[f"hostile replies stored ({kind})"] += len(steps)
    finally:
        store.close()


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a": NaN}', '{"a": 1e999}', "```json\n{\"a\": -Infinity}\n```",
                                  'Sure: {"a": ' + "[" * 50_000 + "}"])
def test_llm_parse_json_raises_value_error_for_deep_or_non_finite_json(text):
    from graphtune.llm import parse_json

    with pytest.raises(ValueError):  # not RecursionError, and no NaN handed to the caller
        parse_json(text)
    assert parse_json('Sure! {"a": [1, 2.5]} Hope that helps.') == {"a": [1, 2.5]}


@pytest.mark.parametrize("pathological", ['"\\' * 100_000, "```" + " " * 100_000, "```json\n" + " " * 100_000 + "x",
                                          '["' * 100_000, "[" * 200_000, '{"a":' * 40_000])
def test_reading_a_reply_is_linear_in_its_length(pathological):
    """Hostile text must not buy CPU time: every reply path stays well under a second on
    200,000 characters (a quote-backslash run was quadratic in the depth scan, and
    parse_json's fence regex took minutes on 5,000 spaces)."""
    import time

    from graphtune.llm import parse_json

    for read in (json_depth, lambda t: parse_update(t), parse_json, lambda t: parse_reply(t)):
        t0 = time.perf_counter()
        try:
            read(pathological)
        except ValueError:
            pass
        assert time.perf_counter() - t0 < 1.0


def test_fenced_and_prose_wrapped_replies_still_parse():
    from graphtune.llm import parse_json

    for text in ('```json\n{"a": 1}\n```', '```\n{"a": 1}\n```', '  ```JSON{"a": 1}```  ', 'ok {"a": 1} bye',
                 '{"a": 1}'):
        assert parse_json(text) == {"a": 1}, text
    assert parse_update('```json\n{"feedback": "f"}\n```').feedback == "f"
