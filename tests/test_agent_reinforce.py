"""agent-reinforce: runs, resumes exactly, survives bad agent replies, counts agent cost,
labels the heuristic as non-LLM and never pays twice for a graph on a question."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from graphtune.agent.heuristic import BACKEND, HeuristicAgent
from graphtune.agent.report import BatchReport, GraphEntry, node_flips
from graphtune.agent.schema import AgentUpdate, update_json_schema
from graphtune.graphs import Budget, Space
from graphtune.graphs.catalog import LLAMA_POOL
from graphtune.graphs.io import from_dict
from graphtune.graphs.model import Graph, Node
from graphtune.search.agent_reinforce import AgentReinforceSearcher
from graphtune.search.base import GraphStats, Objective, SearchContext
from graphtune.search.loop import run_search
from graphtune.store import MemoryStorage

from fakes import FakeEnv

ROOT = Path(__file__).resolve().parents[1]

def _ctx(costs, env, *, evaluations=8, agent=None, seed=0, options=None):
    dev = tuple(env.split("dev"))
    return SearchContext(space=Space(models=LLAMA_POOL, max_nodes=5, max_in_degree=3), costs=costs,
                         budget=Budget(units=18), objective=Objective(), dev_ids=dev, seed=seed, batch_size=6,
                         budget_runs=evaluations * len(dev), task_description="test task",
                         agent=agent or {"model": "heuristic"}, options=options or {})


def _fallback(applied: dict) -> bool:
    """A step that changed nothing: the numeric update only (the batch's attribution, when
    stored, has no agent part)."""
    rest = {k: v for k, v in applied.items() if k != "attribution"}
    return rest == {"fallback": "numeric update only"} and not (applied.get("attribution") or {}).get("agent_l1")


def _run(ctx, env, store=None, searcher=None):
    store = store or MemoryStorage()
    st = store.get_study("s") or store.create_study("s", "agent-reinforce", {})
    out = run_search(searcher or AgentReinforceSearcher(ctx), env, store, st, ctx, budget_runs=ctx.budget_runs,
                     test_ids=env.split("test"))
    return out, store, st


def test_runs_on_fake_env_with_lineage_and_heuristic_labelled_non_llm(costs):
    env = FakeEnv(costs, n_dev=30)
    ctx = _ctx(costs, env)
    out, store, st = _run(ctx, env)
    assert out.runs_spent == ctx.budget_runs  # exactly: the last trial runs on what the budget pays for
    steps = store.agent_steps(st.id)
    assert steps[0]["kind"] == "init" and len(steps) > 2
    assert all(s["backend"] == BACKEND and s["is_llm"] is False for s in steps)
    assert all("not an LLM" in s["feedback"] for s in steps)
    agent_trials = [t for t in store.list_trials(st.id, split="dev") if t.origin == "agent"]
    assert agent_trials
    keys = {s["key"] for s in steps}
    for t in agent_trials:
        assert t.info["agent_step"] in keys
    # probes exist and the pick is well evaluated
    assert any(t.origin == "probe" for t in store.list_trials(st.id, split="dev"))
    # the dev reward and 95% interval the CLI prints, recomputed from the stored results
    scores = {}
    for t in store.list_trials(st.id, split="dev"):
        if t.graph_hash == out.best.graph_hash and t.error is None:
            scores.update({r.question_id: r.score for r in store.trial_results(t.id) if r.error is None})
    n, mean = len(scores), statistics.fmean(scores.values())
    assert out.best.n == n >= 15 and out.best.mean == pytest.approx(mean)
    # 0/1 scores: the Wilson interval scipy gives, inside [0, 1]
    import scipy.stats

    ref = scipy.stats.binomtest(round(mean * n), n).proportion_ci(method="wilson")
    lo, hi = out.best.ci95()
    assert (lo, hi) == pytest.approx((ref.low, ref.high)) and 0 <= lo < mean < hi <= 1 and hi - lo < 1
    # per-node outcomes reach the critic: each batch's correct-input-to-wrong-output counts of
    # its synthesisers, recounted from the stored per-node results of the batch's trials
    _check_reported_flips(store, st.id, steps)


def _check_reported_flips(store, study_id, steps):
    trials = {t.number: t for t in store.list_trials(study_id, split="dev")}
    reported = 0
    for step in steps:
        m = re.search(r"rate of synthesisers: (.*?)\.(?: |$)", step["feedback"])
        if not m:
            continue
        counts: dict[str, list[int]] = {}
        for n in step["trial_numbers"]:
            t = trials[n]
            if t.origin == "race" or t.error is not None:  # racing rounds are not in the paired report
                continue
            g = from_dict(t.graph)
            for r in store.trial_results(t.id):
                ok = {o.node_id: o.correct for o in r.nodes}
                for nid, preds in g.preds.items():
                    if preds and any(ok[p] for p in preds):
                        c = counts.setdefault(f"{g.node_map[nid].role}:{g.node_map[nid].model}", [0, 0])
                        c[0] += not ok[nid]
                        c[1] += 1
        shown = re.findall(r"(\w+:\S+) (\d+)/(\d+)", m.group(1))
        assert shown and all(counts[k] == [int(a), int(b)] for k, a, b in shown), (shown, counts)
        # the worst rates are the ones shown
        worst = max(a / b for a, b in counts.values())
        assert int(shown[0][1]) / int(shown[0][2]) == worst
        reported += sum(int(a) for _, a, _ in shown)
    assert reported > 0  # some synthesiser did turn a right input wrong


def test_the_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    g = Graph.build([Node.make("a", "assistant", "llama-3.1-8b")])
    for p in (0.3, 0.75):
        hits = 0
        for _ in range(400):
            draws = rng.random(60) < p
            lo, hi = GraphStats(g, "h", {f"q{i}": float(x) for i, x in enumerate(draws)}, 1, 1).ci95()
            hits += lo <= p <= hi
        assert 0.89 <= hits / 400 <= 0.985, (p, hits)


def test_a_weak_synthesiser_is_charged_with_more_flips_than_a_strong_one(costs):
    """The same two inputs merged by a 1b and by a 70b fuser: per node, the 1b one turns a
    right input wrong more often, and the critic's feedback names it first, with its count."""
    env = FakeEnv(costs, n_dev=200)
    qs = env.split("dev")
    srcs = [Node.make("a", "assistant", "llama-3.2-3b"), Node.make("b", "assistant", "llama-3.1-8b")]
    entries, shown, rate = [], {}, {}
    for k, model in enumerate(("llama-3.1-70b", "llama-3.2-1b")):
        g = Graph.build(srcs + [Node.make("sink", "fuser", model)], [("a", "sink"), ("b", "sink")])
        res = env.evaluate(g, qs)
        flips, chances = node_flips(g, res)
        ok = [{o.node_id: o.correct for o in r.nodes} for r in res]
        assert chances == {"sink": sum(1 for o in ok if o["a"] or o["b"])}
        assert flips.get("sink", 0) == sum(1 for o in ok if (o["a"] or o["b"]) and not o["sink"])
        rate[model] = flips.get("sink", 0) / chances["sink"]
        shown[model] = f"fuser:{model} {flips.get('sink', 0)}/{chances['sink']}"
        rewards = {r.question_id: r.score for r in res}
        entries.append(GraphEntry(key=model, graph=g, trial_numbers=(k + 1,), origin="sample", rewards=rewards,
                                  reward=statistics.fmean(rewards.values()), cost_units=costs.cost(g).units,
                                  latency_s=costs.cost(g).latency_s, flips=flips, flip_chances=chances))
    assert rate["llama-3.2-1b"] > rate["llama-3.1-70b"] + 0.2
    problem = AgentReinforceSearcher(_ctx(costs, env)).problem
    text = HeuristicAgent(problem).feedback(BatchReport(problem=problem, round=1, minibatch=tuple(qs),
                                                        batch=tuple(entries), history=tuple(entries),
                                                        incumbent=None)).update.feedback
    weak, strong = shown["llama-3.2-1b"], shown["llama-3.1-70b"]
    assert weak in text and strong in text and text.index(weak) < text.index(strong)


def test_never_pays_twice_for_a_graph_on_a_question(costs):
    env = FakeEnv(costs, n_dev=30)
    ctx = _ctx(costs, env)
    out, store, st = _run(ctx, env)
    seen = set()
    for t in store.list_trials(st.id, split="dev"):
        res = store.trial_results(t.id)
        assert t.new_runs == sum(1 for r in res if (t.graph_hash, r.question_id) not in seen)
        seen |= {(t.graph_hash, r.question_id) for r in res}
    assert env.calls == out.runs_spent + len(env.split("test"))


def test_resume_from_state_gives_identical_continuation(costs):
    env = FakeEnv(costs, n_dev=30)
    ctx = _ctx(costs, env)
    a = AgentReinforceSearcher(ctx)
    b = AgentReinforceSearcher(ctx)
    store = MemoryStorage()
    st = store.create_study("s", "agent-reinforce", {})
    from graphtune.search.loop import evaluate_candidate

    told = []

    def one_batch(s, batch):
        cands = s.ask()
        evs = [evaluate_candidate(c, env=env, storage=store, study=st, ctx=ctx, method="x", batch=batch, slot=i)
               for i, c in enumerate(cands)]
        s.tell(evs)
        told.extend(evs)
        return [(c.origin, c.graph, c.question_ids) for c in cands]

    for k in range(3):
        one_batch(a, k)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    b.restore(told)  # the evaluations it was told: the evidence the store holds is not in the state
    for k in range(3, 5):
        ca = a.ask()
        cb = b.ask()
        assert [(c.origin, c.graph, c.question_ids, c.parents) for c in ca] == \
               [(c.origin, c.graph, c.question_ids, c.parents) for c in cb]
        evs = [evaluate_candidate(c, env=env, storage=store, study=st, ctx=ctx, method="x", batch=k, slot=i)
               for i, c in enumerate(ca)]
        a.tell(evs)
        b.tell(evs)
    sa, sb = a.state_dict(), b.state_dict()
    sa["usage"].pop("seconds"), sb["usage"].pop("seconds")  # wall-clock time of the critic itself
    assert sa == sb


# -- a fake LLM --------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeReply:
    text: str
    prompt_tokens: int = 100
    completion_tokens: int = 20
    seconds: float = 0.5
    model: str = "fake/llm"


GOOD = {"feedback": "use more 3b", "model_preference": {"llama-3.2-3b": 0.5}, "confidence": 0.5,
        "proposals": [{"nodes": [{"id": "a", "role": "assistant", "model": "llama-3.2-3b"},
                                 {"id": "b", "role": "fuser", "model": "llama-3.2-3b"}], "edges": [["a", "b"]]}]}


def _bad_replies():
    g = json.loads(json.dumps(GOOD))
    unknown_model = dict(g, model_preference={"gpt-99": 1.0}, proposals=[])
    unknown_node = dict(g, edge_changes=[{"src": "zz", "dst": "s4", "delta": 1.0}], proposals=[])
    over_budget = dict(g, proposals=[{"nodes": [{"id": f"n{i}", "role": "assistant", "model": "llama-3.1-8b"}
                                                for i in range(3)] + [{"id": "z", "role": "fuser",
                                                                       "model": "llama-3.1-8b"}],
                                      "edges": [[f"n{i}", "z"] for i in range(3)]}])
    cyclic = dict(g, proposals=[{"nodes": [{"id": "a", "role": "assistant", "model": "llama-3.2-1b"},
                                           {"id": "b", "role": "assistant", "model": "llama-3.2-1b"}],
                                 "edges": [["a", "b"], ["b", "a"]]}])
    return {
        "not_json": ("this is not json at all", "not JSON"),
        "wrong_schema": (json.dumps({"feedback": "x", "confidence": 7}), "wrong schema"),
        "unknown_model": (json.dumps(unknown_model), "unknown model"),
        "unknown_node": (json.dumps(unknown_node), "unknown node"),
        "over_budget": (json.dumps(over_budget), "over budget"),
        "cyclic": (json.dumps(cyclic), "cycle"),
    }


@pytest.mark.parametrize("case", list(_bad_replies()))
def test_bad_agent_replies_are_rejected_with_a_reason_and_the_search_goes_on(costs, case):
    text, reason = _bad_replies()[case]
    calls = []

    def complete(model, messages, **kw):
        calls.append(kw)
        assert kw["json_schema"] == update_json_schema()
        return FakeReply(text)

    env = FakeEnv(costs, n_dev=20)
    ctx = _ctx(costs, env, evaluations=4, agent={"model": "fake/llm", "max_retries": 1, "usd_per_mtok_in": 1.0,
                                                  "usd_per_mtok_out": 2.0})
    s = AgentReinforceSearcher(ctx, complete=complete)
    out, store, st = _run(ctx, env, searcher=s)
    assert out.runs_spent == ctx.budget_runs  # the search went on, to the budget exactly
    steps = store.agent_steps(st.id)
    assert steps and all(x["is_llm"] and x["backend"] == "fake/llm" for x in steps)
    blob = json.dumps([[x["rejected_reason"], x["applied"]] for x in steps])
    assert reason in blob
    if case in ("not_json", "wrong_schema"):
        assert all(x["parsed"] is None and _fallback(x["applied"]) for x in steps)
        assert all(x["calls"] == 2 for x in steps)  # one retry
    # agent costs are counted apart from the environment
    tot = s.agent_usage()
    assert tot["calls"] == len(calls) == sum(x["calls"] for x in steps)
    assert tot["prompt_tokens"] == 100 * len(calls)
    assert tot["usd"] == pytest.approx((100 * 1.0 + 20 * 2.0) * len(calls) / 1e6)


def test_good_llm_reply_is_applied_and_its_proposal_evaluated(costs):
    env = FakeEnv(costs, n_dev=20)
    ctx = _ctx(costs, env, evaluations=4, agent={"model": "fake/llm"})
    s = AgentReinforceSearcher(ctx, complete=lambda m, msgs, **kw: FakeReply(json.dumps(GOOD)))
    out, store, st = _run(ctx, env, searcher=s)
    steps = store.agent_steps(st.id)
    assert steps[0]["rejected_reason"] is None
    assert AgentUpdate.model_validate(steps[0]["parsed"]).model_preference == {"llama-3.2-3b": 0.5}
    assert steps[0]["applied"]["proposals"][0]["status"] == "queued"
    prop = [t for t in store.list_trials(st.id, split="dev") if t.origin == "agent"]
    assert prop and prop[0].info["agent_step"] == steps[0]["key"]
    # the prompt carries the task, pool, budget, insights and probe results
    p = steps[0]["prompt"]
    for needle in ("test task", "llama-3.1-8b", "18 budget units", "INSIGHTS", "PROBE RESULTS"):
        assert needle in p


def test_runs_on_the_simulator():
    # the simulator needs only core dependencies (numpy, scipy): nothing to skip for
    from graphtune.api import build_problem, make_searcher
    from graphtune.envs.simulated import SimulatedEnvironment
    from graphtune.spec import load_spec

    spec = load_spec(str(ROOT / "examples" / "quickstart.yaml"),
                     overrides={"search.method": "agent-reinforce", "search.evaluations": 6, "task.dev_size": 40,
                                "task.test_size": 40})
    p = build_problem(spec)
    assert isinstance(p.env, SimulatedEnvironment)
    store = MemoryStorage()
    st = store.create_study("s", "agent-reinforce", {})
    out = run_search(make_searcher(spec, p.ctx), p.env, store, st, p.ctx, budget_runs=p.ctx.budget_runs,
                     test_ids=p.test_ids)
    assert out.runs_spent == p.ctx.budget_runs and out.best is not None and len(out.test_results) == 40


# -- hostile replies (issue 10, defects 14 and 15) ---------------------------------------


def _nan_reply(token: str, where: str) -> str:
    g = json.loads(json.dumps(GOOD))
    if where == "model_preference":
        g["model_preference"] = {"llama-3.2-3b": "@X@"}
    elif where == "role_preference":
        g["role_preference"] = {"fuser": "@X@"}
    elif where == "edge_changes":
        g["edge_changes"] = [{"src": "s0", "dst": "s4", "delta": "@X@"}]
    else:
        g["confidence"] = "@X@"
    return json.dumps(g).replace('"@X@"', token)


@pytest.mark.parametrize("where", ["model_preference", "role_preference", "edge_changes", "confidence"])
@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999", '"nan"', '"-inf"'])
def test_non_finite_numbers_in_a_reply_are_refused_and_the_saved_state_stays_finite(costs, token, where):
    env = FakeEnv(costs, n_dev=20)
    ctx = _ctx(costs, env, evaluations=4, agent={"model": "fake/llm", "max_retries": 0})
    reply = _nan_reply(token, where)
    s = AgentReinforceSearcher(ctx, complete=lambda m, msgs, **kw: FakeReply(reply))
    out, store, st = _run(ctx, env, searcher=s)
    # JSON has no NaN: PostgreSQL could not save a NaN state and the study was stuck
    json.dumps(s.state_dict(), allow_nan=False)
    json.dumps(store.get_study("s").searcher_state, allow_nan=False)
    steps = store.agent_steps(st.id)
    assert steps
    for x in steps:
        assert x["parsed"] is None and _fallback(x["applied"])
        assert "finite" in x["rejected_reason"] and "fell back" in x["rejected_reason"]
        json.dumps(x, allow_nan=False, default=str)


def test_a_deeply_nested_reply_is_refused_not_a_crash(costs):
    # 100,000 `[` used to end the search with RecursionError, the study left `running`
    env = FakeEnv(costs, n_dev=20)
    ctx = _ctx(costs, env, evaluations=4, agent={"model": "fake/llm", "max_retries": 1})
    s = AgentReinforceSearcher(ctx, complete=lambda m, msgs, **kw: FakeReply("[" * 100_000))
    out, store, st = _run(ctx, env, searcher=s)
    assert out.runs_spent == ctx.budget_runs
    steps = store.agent_steps(st.id)
    assert steps and all("nested 100000 levels deep" in x["rejected_reason"] for x in steps)
    assert all(_fallback(x["applied"]) for x in steps)


def test_a_huge_reply_is_stored_as_a_bounded_excerpt_with_its_length_and_hash(costs, tmp_path):
    import hashlib

    from graphtune.agent.schema import MAX_STORED_REPLY_CHARS, REPLY_EXCERPT_CHARS
    from graphtune.store import Storage

    huge = json.dumps(GOOD) + " " * 5_000_000  # valid JSON, but 5 MB
    calls = []

    def complete(model, messages, **kw):
        calls.append(messages)
        return FakeReply(huge)

    env = FakeEnv(costs, n_dev=20)
    ctx = _ctx(costs, env, evaluations=4, agent={"model": "fake/llm", "max_retries": 1})
    db = tmp_path / "g.db"
    out, store, st = _run(ctx, env, store=Storage(f"sqlite:///{db}"),
                          searcher=AgentReinforceSearcher(ctx, complete=complete))
    steps = store.agent_steps(st.id)
    assert len(steps) >= 2
    digest = hashlib.sha256(huge.encode()).hexdigest()
    for x in steps:
        assert "over the limit of 200000" in x["rejected_reason"]
        assert len(x["reply"]) <= 2 * (REPLY_EXCERPT_CHARS + 300) < MAX_STORED_REPLY_CHARS
        assert digest in x["reply"] and str(len(huge)) in x["reply"]
    # the retry sends back the excerpt, not 5 MB
    assert all(sum(len(m["content"]) for m in msgs) < 100_000 for msgs in calls)
    store.close()
    size = sum(f.stat().st_size for f in tmp_path.glob("g.db*"))  # the database and its WAL
    assert size < 2_000_000  # two 5 MB replies made a 15 MB store (six made 30 MB)
