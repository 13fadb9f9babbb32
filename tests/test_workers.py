"""Many workers, one study (`graphtune worker`): claims, heartbeats, the once-per-batch
update, and equality with a single-process search.

The multi-process cases fork real worker processes (tests/workers_check.py): 4 workers on
PostgreSQL (when ``GRAPHTUNE_TEST_POSTGRES_URL`` is set, as ``bash scripts/test.sh`` and
``.ci/run`` do), and a live search against a fake endpoint where one worker is killed with
SIGKILL while it holds a trial.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from graphtune.cli import app
from graphtune.envs.base import QuestionResult
from graphtune.errors import SpecError
from graphtune.search.worker import WorkerOptions
from graphtune.store.base import TrialRecord
from graphtune.spec import load_spec
from graphtune.store import Storage

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workers_check import SIMULATED_SPEC, compare, snapshot  # noqa: E402

PG_URL = os.environ.get("GRAPHTUNE_TEST_POSTGRES_URL")
needs_pg = pytest.mark.skipif(not PG_URL, reason="set GRAPHTUNE_TEST_POSTGRES_URL (bash scripts/postgres.sh start) "
                                                 "to test PostgreSQL")
BACKENDS = ["sqlite", pytest.param("postgresql", marks=needs_pg)]

pytestmark = pytest.mark.filterwarnings("ignore::graphtune.store.storage.SharedSQLiteWarning")


def _spec(tmp_path: Path, url: str, method: str = "agent-reinforce", evaluations: int = 8, name: str = "s") -> Path:
    p = tmp_path / f"{name}-{method}.yaml"
    options = "{n_startup_trials: 4}" if method == "tpe" else "{}"
    p.write_text(SIMULATED_SPEC.format(study="w", method=method, evaluations=evaluations, batch_size=8, seed=3,
                                       options=options, storage=url))
    return p


def _optimize(spec_path: Path, url: str) -> dict:
    from graphtune.api import optimize

    optimize(load_spec(spec_path, overrides={"storage": url}))
    return snapshot(url, "w")


@pytest.fixture
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    from workers_check import fresh_postgres_db

    url, drop = fresh_postgres_db(PG_URL)
    yield url
    drop()


# -- one process: same search as optimize --------------------------------------------


@pytest.mark.parametrize("method", ["agent-reinforce", "tpe", "random"])
def test_a_worker_rebuilt_for_every_trial_runs_the_same_search_as_optimize(tmp_path, method):
    """Each `work` call below is a fresh worker that evaluates one trial and stops: every
    batch update rebuilds the searcher from the stored state and asks again (the path a
    worker takes when another one asked the batch). The study ends equal to optimize's."""
    from graphtune.api import work

    ref = _optimize(_spec(tmp_path, "x", method), f"sqlite:///{tmp_path / 'ref.db'}")
    url = f"sqlite:///{tmp_path / 'w.db'}"
    spec = load_spec(_spec(tmp_path, url, method), overrides={"storage": url})
    calls = 0
    while True:
        _, st, rep = work("w", url, spec=spec, options=WorkerOptions(max_trials=1, poll_s=0.01))
        calls += 1
        if st.status == "complete":
            break
        assert calls < 500
    got = snapshot(url, "w")
    assert compare(got, ref) == []
    assert calls >= len(ref["trials"])
    assert got["duplicate_places"] == 0 and got["unfinished"] == 0


def test_one_worker_to_the_end_matches_optimize_and_a_finished_study_is_left_alone(tmp_path):
    from graphtune.api import work

    ref = _optimize(_spec(tmp_path, "x"), f"sqlite:///{tmp_path / 'ref.db'}")
    url = f"sqlite:///{tmp_path / 'w.db'}"
    spec = load_spec(_spec(tmp_path, url), overrides={"storage": url})
    _, st, rep = work("w", url, spec=spec, options=WorkerOptions(poll_s=0.01))
    assert st.status == "complete" and rep.stopped == "complete"
    got = snapshot(url, "w")
    assert compare(got, ref) == []
    assert rep.trials == len(ref["trials"])  # dev trials and the one test trial
    assert rep.runs_paid == ref["runs_spent"] + 100  # + the test split, paid once
    assert len([t for t in ref["trials"] if t[1] == "test"]) == 1
    _, _, again = work("w", url, options=WorkerOptions(poll_s=0.01))  # nothing left to do
    assert (again.trials, again.runs_paid, again.batch_updates) == (0, 0, 0)
    assert snapshot(url, "w")["trials"] == got["trials"]


def test_a_worker_refuses_a_spec_that_differs_from_the_stored_one(tmp_path):
    from graphtune.api import work

    url = f"sqlite:///{tmp_path / 'w.db'}"
    work("w", url, spec=load_spec(_spec(tmp_path, url), overrides={"storage": url}),
         options=WorkerOptions(max_trials=1, poll_s=0.01))
    other = load_spec(_spec(tmp_path, url, method="random"), overrides={"storage": url})
    with pytest.raises(SpecError, match=r"study 'w' exists with a different spec \(search.method changed\)"):
        work("w", url, spec=other)


def test_optimize_joins_a_study_that_workers_left_queued_and_runs_the_same_search(tmp_path):
    """optimize is a worker of the study's queue: it claims what a worker queued and left,
    and the study ends equal to one optimize from the start (nothing duplicated)."""
    from graphtune.api import optimize, work

    ref = _optimize(_spec(tmp_path, "x"), f"sqlite:///{tmp_path / 'ref.db'}")
    url = f"sqlite:///{tmp_path / 'w.db'}"
    spec = load_spec(_spec(tmp_path, url), overrides={"storage": url})
    work("w", url, spec=spec, options=WorkerOptions(max_trials=1, poll_s=0.01))  # leaves a batch queued
    _, st, out = optimize(spec)
    assert st.status == "complete" and out.stopped == "budget" and out.test_trial is not None
    got = snapshot(url, "w")
    assert compare(got, ref) == []
    assert got["duplicate_places"] == 0 and got["unfinished"] == 0


def test_a_changed_spec_is_refused_while_other_processes_run_the_study(tmp_path):
    from graphtune.api import optimize, work

    url = f"sqlite:///{tmp_path / 'w.db'}"
    spec = load_spec(_spec(tmp_path, url), overrides={"storage": url})
    work("w", url, spec=spec, options=WorkerOptions(max_trials=1, poll_s=0.01))
    store = Storage(url, workers=True)
    st = store.get_study("w")
    store.register_worker(st.id, "elsewhere:7:x", "elsewhere", 7)  # a live worker of another machine
    other = load_spec(_spec(tmp_path, url, method="random"), overrides={"storage": url})
    with pytest.raises(SpecError, match=r"study 'w' is being run by 1 other process\(es\) with its stored spec"):
        optimize(other, force=True)
    assert store.get_study("w").method == "agent-reinforce"  # nothing changed
    store.close()


# -- claims ---------------------------------------------------------------------------


def _queue(store: Storage, n: int, same_graph_at: tuple[int, ...] = ()) -> int:
    """A study with batch 0 queued: ``n`` trials (the slots in ``same_graph_at`` share slot 0's graph)."""
    st = store.create_study("q", "random", {})
    items = []
    for i in range(n):
        same = i in same_graph_at
        items.append(dict(split="dev", batch=0, slot=i, graph={"nodes": []}, graph_hash="h0" if same or i == 0 else
                          f"h{i}", method="random", origin="sample", parents=[], info={}, question_ids=["a", "b"],
                          after_slot=0 if same else None))
    with store.coordination(st.id) as co:
        assert co is not None
        co.advance(expect_batch_index=0, state={"x": 1}, batch_index=0, runs_spent=0, enqueue=items)
    return st.id


def _result(q: str) -> QuestionResult:
    return QuestionResult(question_id=q, answer="1", correct=True, score=1.0)


def _finish(store, t, worker):
    rec = TrialRecord(split=t.split, batch=t.batch, slot=t.slot, status="complete", graph=t.graph,
                      graph_hash=t.graph_hash, method=t.method, origin=t.origin, parents=t.parents, info=t.info,
                      question_ids=t.question_ids, results=[_result("a"), _result("b")], reused=frozenset(),
                      metrics={"accuracy": 1.0}, reward=1.0, cost={"units": 1.0}, new_runs=2)
    return store.finish_claim(t.id, worker, rec)


@pytest.mark.parametrize("store_url", BACKENDS, indirect=True)
def test_claims_are_exclusive_and_a_stale_claim_is_retaken(store_url):
    store = Storage(store_url)
    sid = _queue(store, 3)
    a = store.claim_trial(sid, "A", stale_after_s=60)
    b = store.claim_trial(sid, "B", stale_after_s=60)
    c = store.claim_trial(sid, "C", stale_after_s=60)
    assert sorted([a.slot, b.slot, c.slot]) == [0, 1, 2]
    assert store.claim_trial(sid, "D", stale_after_s=60) is None  # all held, heartbeats fresh
    assert store.unfinished_trials(sid) == 3
    # A's heartbeat goes stale: D retakes it; A can no longer store its outcome
    d = store.claim_trial(sid, "D", stale_after_s=0)
    assert d is not None and d.id in (a.id, b.id, c.id) and d.status == "running"
    held = {a.id: "A", b.id: "B", c.id: "C"}[d.id]
    assert _finish(store, d, held) is False
    assert store.trial_results(d.id) == []
    assert _finish(store, d, "D") is True
    t = [x for x in store.list_trials(sid) if x.id == d.id][0]
    assert t.status == "complete" and t.reward == 1.0 and len(store.trial_results(d.id)) == 2
    # giving a claim back makes it claimable again
    rest = [x for x in (a, b, c) if x.id != d.id]
    store.release_claim(rest[0].id, {a.id: "A", b.id: "B", c.id: "C"}[rest[0].id])
    e = store.claim_trial(sid, "E", stale_after_s=60)
    assert e.id == rest[0].id and e.worker == "E"
    store.close()


@pytest.mark.parametrize("store_url", BACKENDS, indirect=True)
def test_a_graph_queued_twice_in_a_batch_waits_for_its_first_slot(store_url):
    store = Storage(store_url)
    sid = _queue(store, 3, same_graph_at=(2,))
    first = store.claim_trial(sid, "A", stale_after_s=60)
    other = store.claim_trial(sid, "B", stale_after_s=60)
    assert (first.slot, other.slot) == (0, 1)
    assert store.claim_trial(sid, "C", stale_after_s=60) is None  # slot 2 waits for slot 0
    assert [t.status for t in store.list_trials(sid)] == ["running", "running", "waiting"]
    assert _finish(store, first, "A")
    third = store.claim_trial(sid, "C", stale_after_s=60)
    assert third.slot == 2 and third.graph_hash == first.graph_hash
    assert set(store.known_results(sid, first.graph_hash, "dev")) == {"a", "b"}  # reused, not paid again
    store.close()


@pytest.mark.parametrize("store_url", [pytest.param("postgresql", marks=needs_pg)], indirect=True)
def test_the_batch_update_lock_is_held_by_one_worker_at_a_time(store_url):
    """PostgreSQL: a second worker skips the locked study (SQLite makes it wait instead)."""
    store = Storage(store_url)
    st = store.create_study("q", "random", {})
    other = Storage(store_url)
    with store.coordination(st.id) as co:
        assert co is not None
        with other.coordination(st.id) as co2:
            assert co2 is None  # skipped, not blocked
        co.advance(expect_batch_index=0, state={"s": 1}, batch_index=1, runs_spent=5)
    with other.coordination(st.id) as co2:
        assert co2 is not None and co2.study.batch_index == 1
        with pytest.raises(Exception, match="moved to batch 1"):
            co2.advance(expect_batch_index=0, state={"s": 2}, batch_index=1, runs_spent=9)
    assert store.get_study("q").searcher_state == {"s": 1}  # the refused update wrote nothing
    other.close()
    store.close()


def test_the_searchers_update_holds_no_store_lock_and_one_worker_makes_it(tmp_path):
    """The searcher's tell/ask (an LLM agent's call, in agent-reinforce) runs outside any
    store lock: while it runs, another process can take the study's lock (report, show,
    a heartbeat, a trial being stored), but not the update claim, so no second worker
    makes the same (paid) update."""
    from graphtune.api import build_problem, make_searcher, stored_spec
    from graphtune.search.base import Searcher
    from graphtune.search.worker import Worker

    url = f"sqlite:///{tmp_path / 'w.db'}"
    spec = load_spec(_spec(tmp_path, url, "agent-reinforce", evaluations=6), overrides={"storage": url})
    problem = build_problem(spec)
    store, other = Storage(url, workers=True), Storage(url, workers=True)
    st = store.create_study("w", spec.search.method, stored_spec(spec))
    other.register_worker(st.id, "other", "elsewhere", 1)  # a live worker of another machine
    seen: list[tuple[bool, bool]] = []

    class Probe(Searcher):
        def __init__(self, inner):
            self.inner, self.name, self.ctx = inner, inner.name, inner.ctx

        def tell(self, evaluations):
            with other.coordination(st.id) as co:
                lock_free = co is not None
            seen.append((lock_free, other.claim_update(st.id, "other", stale_after_s=60)))
            self.inner.tell(evaluations)

        def ask(self):
            return self.inner.ask()

        def state_dict(self):
            return self.inner.state_dict()

        def load_state_dict(self, state):
            self.inner.load_state_dict(state)

        def restore(self, history):
            self.inner.restore(history)

        def recommend(self, history):
            return self.inner.recommend(history)

        def drain_agent_steps(self):
            return self.inner.drain_agent_steps()

        def close(self):
            self.inner.close()

    w = Worker(env=problem.env, ctx=problem.ctx, test_ids=problem.test_ids, storage=store, study=st,
               make_searcher=lambda: Probe(make_searcher(spec, problem.ctx)), options=WorkerOptions(poll_s=0.01))
    try:
        rep = w.run()
    finally:
        problem.env.close()
    assert rep.study_status == "complete" and rep.batch_updates >= 2
    assert len(seen) == rep.batch_updates
    assert all(lock_free for lock_free, _ in seen), seen  # no store lock held during the update
    assert not any(claimed for _, claimed in seen), seen  # and no other worker could start the same one
    assert [w["status"] for w in store.list_workers(st.id) if w["name"] != "other"] == ["stopped"]
    other.close()
    store.close()


async def _no_call(model, messages, **kw):
    raise AssertionError("no LLM call expected")


def test_live_workers_split_the_concurrency_limits():
    from graphtune.envs.live import Endpoint, Executor
    from graphtune.graphs.catalog import KNOWN_MODELS

    ep = Endpoint(name="m", model="openai/x", info=KNOWN_MODELS["llama-3.2-1b"], max_concurrency=8)
    ex = Executor({"m": ep}, concurrency=32, acomplete=_no_call)
    g, m = ex._sems(ep)
    assert (g._value, m._value) == (32, 8)
    ex.set_share(4)
    g, m = ex._sems(ep)
    assert (g._value, m._value) == (8, 2)
    ex.set_share(16)
    g, m = ex._sems(ep)
    assert (g._value, m._value) == (2, 1)  # never below one call


def _two_live_envs(url: str, acomplete, share: bool):
    from types import SimpleNamespace

    from test_live import make_env

    from graphtune.store.ledger import SQLLedger

    envs = [make_env(SimpleNamespace(api_base=None), ledger=SQLLedger(Storage(url)), acomplete=acomplete, n=4)
            for _ in range(2)]
    if share:
        for e, name in zip(envs, "AB"):
            e.share_calls(name, stale_after_s=60)
    return envs


@pytest.mark.parametrize("share", [True, False])
def test_workers_pay_an_identical_call_in_flight_once(tmp_path, share):
    """Two worker processes (two environments, two ledgers on one store) run the same
    graph at the same time: with call sharing every distinct call is made once."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from test_live import g_vote

    from graphtune import llm

    url = f"sqlite:///{tmp_path / 'calls.db'}"
    store = Storage(url)
    st = store.create_study("s", "random", {})
    store.register_worker(st.id, "A", "host", 1)
    store.register_worker(st.id, "B", "host", 2)
    calls = []

    async def slow(model, messages, **kw):
        calls.append(messages[-1]["content"][-40:])
        await asyncio.sleep(0.3)
        return llm.LLMReply("The answer is 1.", 5, 3, 0.3, model)

    envs = _two_live_envs(url, slow, share)
    try:
        with ThreadPoolExecutor(2) as pool:
            res = list(pool.map(lambda e: e.evaluate(g_vote(3), e.split("dev")), envs))
    finally:
        for e in envs:
            e.close()
    distinct = 4 * 4  # 4 questions x (3 samples + the fuser)
    assert len(calls) == (distinct if share else 2 * distinct)
    assert [r.answer for r in res[0]] == [r.answer for r in res[1]]
    with store.session() as s:
        from sqlalchemy import func, select

        from graphtune.store.models import LLMCallClaimRow

        assert s.scalar(select(func.count()).select_from(LLMCallClaimRow)) == 0  # every claim released
    store.close()


def test_a_call_claimed_by_a_dead_worker_is_taken_over(tmp_path):
    from graphtune.store.ledger import SQLLedger

    url = f"sqlite:///{tmp_path / 'calls.db'}"
    store = Storage(url)
    st = store.create_study("s", "random", {})
    store.register_worker(st.id, "live", "host", 1)
    led = {n: SQLLedger(Storage(url)) for n in ("live", "dead", "me")}
    for n, ledger in led.items():
        ledger.share(n, stale_after_s=60)
    assert led["live"].claim("k1") and not led["me"].claim("k1")
    assert led["me"].claim_status("k1") == "held"  # its worker's heartbeat is fresh
    assert led["dead"].claim("k2") and not led["me"].claim("k2")
    assert led["me"].claim_status("k2") == "free"  # no live worker "dead": its claim is removed
    assert led["me"].claim("k2")
    for ledger in led.values():
        ledger.close()
    store.close()


def test_worker_cli_errors_are_one_line(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    r = CliRunner().invoke(app, ["worker", "--study", "nope", "--storage", url])
    assert r.exit_code != 0
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("warning: workers share the SQLite store") and len(lines) == 2  # each one line
    assert lines[1].startswith("error: no study named 'nope'") and "--spec SPEC" in lines[1]
    r = CliRunner().invoke(app, ["worker", "--study", "w", "--storage", url, "--heartbeat", "10", "--stale-after", "20"])
    assert r.exit_code != 0 and "--stale-after (20 s) must be at least 3 x --heartbeat" in r.output


def test_worker_cli_runs_a_study_to_the_end(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    r = CliRunner().invoke(app, ["worker", "--study", "w", "--storage", url, "--spec", str(_spec(tmp_path, url)),
                                 "--poll", "0.01", "-q"])
    assert r.exit_code == 0, r.output
    assert "study w is complete" in r.output and "best graph" in r.output and "test accuracy" in r.output
    store = Storage(url)
    st = store.get_study("w")
    ws = store.list_workers(st.id)
    assert len(ws) == 1 and ws[0]["status"] == "stopped" and ws[0]["trials_done"] == st.n_trials
    store.close()
    r = CliRunner().invoke(app, ["dump", "w", "--storage", url, "-o", str(tmp_path / "d.json")])
    assert r.exit_code == 0, r.output
    dumped = json.loads((tmp_path / "d.json").read_text())
    assert [w["name"] for w in dumped["workers"]] == [ws[0]["name"]]
    assert all(t["worker"] == ws[0]["name"] for t in dumped["trials"])


# -- several processes ----------------------------------------------------------------


def _check(tmp_path, *args, timeout=400) -> dict:
    out = tmp_path / "res.json"
    p = subprocess.run([sys.executable, str(HERE / "workers_check.py"), *args, "--json", str(out)],
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return json.loads(out.read_text())


@needs_pg
@pytest.mark.slow
@pytest.mark.timeout(450)
@pytest.mark.parametrize("method", ["agent-reinforce", "tpe"])
def test_four_worker_processes_on_postgresql_run_the_same_search_as_one_process(tmp_path, method):
    res = _check(tmp_path, "--workers", "4", "--method", method)
    assert res["storage"].startswith("postgresql")
    assert res["errors"] == [] and res["duplicate_places"] == 0 and res["unfinished"] == 0
    assert len(res["worker_rows"]) == 4 and res["workers_with_trials"] >= 2
    assert sum(w["trials_done"] for w in res["worker_rows"]) == res["trials"]  # none lost, none twice


@pytest.mark.slow
@pytest.mark.timeout(450)
def test_a_worker_killed_while_it_holds_a_trial_loses_nothing(tmp_path):
    """Live search on a fake endpoint (0.1 s per call); one of 4 workers gets SIGKILL while
    it holds a claimed trial; another retakes it after the stale timeout (3 s)."""
    pytest.importorskip("litellm")
    pytest.importorskip("langgraph")
    res = _check(tmp_path, "--workers", "4", "--env", "live", "--latency-s", "0.1", "--evaluations", "16",
                 "--kill-one")
    assert res["killed_worker"] is True
    assert res["errors"] == [] and res["duplicate_places"] == 0 and res["unfinished"] == 0
    assert res["workers_with_trials"] >= 2
    # every call is paid once across the workers (calls in flight are shared through the
    # ledger's claims); the only extra requests are the killed worker's calls in flight
    # (at most its share of the concurrency limit: 64 / 4)
    req = res["endpoint_requests"]
    assert req["reference"] <= req["workers"] <= req["reference"] + 16, req


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_worker_processes_run_a_pipeline_study_as_one_process_does(tmp_path):
    """A multi-stage study (the simulated retrieve-then-answer pipeline, method random) run
    by two `graphtune worker` processes on one SQLite store ends with the same trials,
    pipelines, per-question results, state and test score as one `optimize`."""
    res = _check(tmp_path, "--workers", "2", "--env", "pipeline", "--method", "random", "--evaluations", "12",
                 timeout=280)
    assert res["errors"] == [] and res["duplicate_places"] == 0 and res["unfinished"] == 0
    assert len(res["worker_rows"]) == 2  # both joined (which trials each took depends on timing)
    assert sum(w["trials_done"] for w in res["worker_rows"]) == res["trials"]  # none lost, none twice
