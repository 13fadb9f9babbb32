"""Store contract: every backend (SQLite file, in-memory, PostgreSQL) passes the same cases.

The PostgreSQL backend runs when ``GRAPHTUNE_TEST_POSTGRES_URL`` names a database the tests
may wipe (``bash scripts/test.sh`` and ``.ci/run`` start one with ``scripts/postgres.sh``).
"""

from __future__ import annotations

import os
import sqlite3

import pytest

from graphtune.envs.base import NodeOutcome, QuestionResult
from graphtune.errors import StoreError
from graphtune.store import MemoryStorage, Storage, StudyStorage, TrialRecord, WorkerStorage


PG_URL = os.environ.get("GRAPHTUNE_TEST_POSTGRES_URL")
BACKENDS = ["sqlite", "memory",
            pytest.param("postgresql", marks=pytest.mark.skipif(
                not PG_URL, reason="set GRAPHTUNE_TEST_POSTGRES_URL (bash scripts/postgres.sh start) to test "
                                   "PostgreSQL"))]


def fresh_postgres(url: str) -> str:
    """Empty the test database (drop every table, including Alembic's) and return its URL."""
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    with eng.begin() as c:
        c.execute(text("DROP SCHEMA public CASCADE"))
        c.execute(text("CREATE SCHEMA public"))
    eng.dispose()
    return url


def open_store(kind: str, tmp_path):
    if kind == "sqlite":
        return Storage(f"sqlite:///{tmp_path / 'g.db'}")
    if kind == "postgresql":
        return Storage(fresh_postgres(PG_URL))
    return MemoryStorage()


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    s = open_store(request.param, tmp_path)
    yield s
    s.close()


def _results(qids, ok=True, error=None):
    return [QuestionResult(question_id=q, answer="42", correct=None if error else ok, score=float(ok and not error),
                           prompt_tokens=10, completion_tokens=5, flops=1e9, usd=1e-6, latency_s=0.5, error=error,
                           nodes=(NodeOutcome("a", "42", ok, 10, 5, 0.5),)) for q in qids]


def _record(store, sid, h="h1", qids=("q1", "q2"), batch=0, slot=0, status="complete", error=None, res_error=None):
    return store.record_trial(sid, TrialRecord(
        split="dev", batch=batch, slot=slot, status=status, graph={"nodes": []},
        graph_hash=h, method="random", origin="random", parents=[], info={"k": 1},
        question_ids=list(qids), results=_results(qids, error=res_error), reused=set(),
        metrics={"accuracy": 1.0}, reward=1.0, cost={"units": 3.0, "flops": 1e9},
        new_runs=len(qids), error=error))


def test_study_lifecycle(store):
    assert store.get_study("s") is None
    st = store.create_study("s", "random", {"a": 1})
    with pytest.raises(StoreError, match="already exists"):
        store.create_study("s", "random", {})
    assert [s.name for s in store.list_studies()] == ["s"]
    store.save_progress(st.id, state={"x": [1, 2]}, batch_index=3, runs_spent=40,
                        agent_steps=[{"key": "b0", "batch": 0, "kind": "feedback", "backend": "heuristic"}])
    got = store.get_study("s")
    assert (got.searcher_state, got.batch_index, got.runs_spent) == ({"x": [1, 2]}, 3, 40)
    assert [s["key"] for s in store.agent_steps(st.id)] == ["b0"]
    assert store.delete_study("s") and store.get_study("s") is None


def test_trials_numbered_and_results_round_trip(store):
    st = store.create_study("s", "random", {})
    t1 = _record(store, st.id)
    t2 = _record(store, st.id, h="h2", slot=1)
    assert (t1.number, t2.number) == (1, 2)
    res = store.trial_results(t1.id)
    assert [r.question_id for r in res] == ["q1", "q2"]
    assert res[0].nodes[0] == NodeOutcome("a", "42", True, 10, 5, 0.5)
    assert store.get_trial(st.id, 2).graph_hash == "h2"
    assert store.find_trial(st.id, "dev", 0, 1, "h2").number == 2
    assert store.find_trial(st.id, "dev", 0, 1, "h1") is None


def test_known_results_skip_infrastructure_failures(store):
    st = store.create_study("s", "random", {})
    _record(store, st.id, qids=("q1",))
    _record(store, st.id, qids=("q2",), slot=1, res_error="timeout")
    known = store.known_results(st.id, "h1", "dev")
    assert set(known) == {"q1"}  # the failed question will be retried, not reused as wrong


def test_every_backend_implements_the_whole_contract(tmp_path):
    # an ABC refuses to instantiate while an abstract method is missing: opening is the check
    for kind in ("sqlite", "memory"):
        s = open_store(kind, tmp_path)
        assert isinstance(s, StudyStorage)
        missing = [m for m in StudyStorage.__abstractmethods__ if getattr(type(s), m) is getattr(StudyStorage, m)]
        assert missing == [], (kind, missing)
        s.close()
    sql = Storage(f"sqlite:///{tmp_path / 'w.db'}")
    assert isinstance(sql, WorkerStorage)
    sql.close()
    assert not isinstance(MemoryStorage(), WorkerStorage)  # workers need a store they can share
    with pytest.raises(TypeError, match="abstract"):
        type("Partial", (StudyStorage,), {"get_study": lambda self, name: None})()


def test_known_question_ids_count_only_reusable_results_of_earlier_batches(store):
    st = store.create_study("s", "random", {})
    _record(store, st.id, qids=("q1", "q2"), batch=0)
    _record(store, st.id, qids=("q3",), batch=0, slot=1, res_error="timeout")  # retried, not reused
    _record(store, st.id, qids=("q4",), batch=1)
    _record(store, st.id, qids=("q5",), batch=1, slot=2, status="failed", error="cycle")
    _record(store, st.id, h="other", qids=("q6",), batch=0, slot=3)
    assert store.known_question_ids(st.id, "h1", "dev", before_batch=0) == set()
    assert store.known_question_ids(st.id, "h1", "dev", before_batch=1) == {"q1", "q2"}
    assert store.known_question_ids(st.id, "h1", "dev", before_batch=2) == {"q1", "q2", "q4"}
    assert store.known_question_ids(st.id, "h1", "test", before_batch=2) == set()
    assert store.known_question_ids(st.id, "other", "dev", before_batch=1) == {"q6"}


def test_an_empty_study_is_deleted_and_one_with_anything_stored_is_kept(store):
    empty = store.create_study("empty", "random", {})
    assert store.delete_study_if_empty(empty.id) is True and store.get_study("empty") is None
    assert store.delete_study_if_empty(empty.id) is False  # gone already
    with_trial = store.create_study("with-trial", "random", {})
    _record(store, with_trial.id, qids=("q1",))
    paid = store.create_study("paid", "random", {})
    store.save_progress(paid.id, state={}, batch_index=0, runs_spent=3)
    stepped = store.create_study("stepped", "random", {})
    store.save_progress(stepped.id, state={}, batch_index=1, runs_spent=0)
    for st in (with_trial, paid, stepped):
        assert store.delete_study_if_empty(st.id) is False
        assert store.get_study(st.name) is not None


def test_paid_results_leave_out_reused_ones(store):
    st = store.create_study("s", "random", {})
    t1 = _record(store, st.id, qids=("q1", "q2"))
    t2 = store.record_trial(st.id, TrialRecord(
        split="dev", batch=1, slot=0, status="complete", graph={"nodes": []}, graph_hash="h1", method="random",
        origin="random", parents=[], info={}, question_ids=["q1", "q2", "q3"], results=_results(("q1", "q2", "q3")),
        reused={"q1", "q2"}, metrics={"accuracy": 1.0}, reward=1.0, cost=None, new_runs=1))
    assert [(i, r.question_id) for i, r in store.paid_results(st.id)] == [(t1.id, "q1"), (t1.id, "q2"),
                                                                          (t2.id, "q3")]
    assert store.paid_results(st.id)[0][1] == store.trial_results(t1.id)[0]


def test_a_trial_record_is_a_frozen_value():
    import dataclasses

    rec = TrialRecord(split="dev", batch=0, slot=0, status="complete", graph={}, graph_hash="h", method="m",
                      origin="o", parents=[], info={}, question_ids=[], results=[], reused=set(), metrics={},
                      reward=None, cost=None, new_runs=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.status = "failed"


def test_failed_trials_are_stored_with_their_reason(store):
    st = store.create_study("s", "random", {})
    t = _record(store, st.id, status="failed", error="graph has a cycle")
    assert store.get_trial(st.id, t.number).error == "graph has a cycle"
    assert store.known_results(st.id, "h1", "dev") == {}


def test_sqlite_uses_wal_and_busy_timeout(tmp_path):
    path = tmp_path / "w.db"
    s = Storage(f"sqlite:///{path}")
    with s.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    s.close()
    assert sqlite3.connect(path).execute("select count(*) from gt_studies").fetchone() == (0,)


def test_bad_storage_url_is_one_clear_line(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Storage(f"sqlite:///{tmp_path}/nope/g.db")
    with pytest.raises(StoreError) as e:
        Storage("postgresql://u:secretpw@127.0.0.1:1/db")
    assert "secretpw" not in str(e.value)


def test_json_columns_and_timestamps_round_trip(store):
    st = store.create_study("j", "random", {"nested": {"a": [1, 2.5, None, "x"], "b": True}, "unicode": "é→∑"})
    assert store.get_study("j").spec == {"nested": {"a": [1, 2.5, None, "x"], "b": True}, "unicode": "é→∑"}
    state = {"theta": [[0.1, -2.0], [3e-9, 1e9]], "rng": {"bit_generator": "PCG64", "state": 2 ** 100}, "k": None}
    store.save_progress(st.id, state=state, batch_index=1, runs_spent=2)
    assert store.get_study("j").searcher_state == state
    t = _record(store, st.id)
    got = store.get_trial(st.id, t.number)
    assert got.info == {"k": 1} and got.question_ids == ["q1", "q2"] and got.metrics == {"accuracy": 1.0}
    assert got.finished_at is not None


def test_reset_searcher_keeps_trials_and_budget(store):
    st = store.create_study("r", "tpe", {})
    store.save_progress(st.id, state={"sampler": "tpe"}, batch_index=2, runs_spent=8)
    _record(store, st.id)
    store.reset_searcher(st.id, "agent-reinforce")
    got = store.get_study("r")
    assert (got.method, got.searcher_state, got.batch_index, got.runs_spent, got.n_trials) == \
        ("agent-reinforce", None, 2, 8, 1)


def test_delete_removes_trials_results_and_steps(store):
    st = store.create_study("d", "random", {})
    store.save_progress(st.id, state={}, batch_index=1, runs_spent=2,
                        agent_steps=[{"key": "b0", "batch": 0, "kind": "feedback", "backend": "heuristic"}])
    t = _record(store, st.id)
    other = store.create_study("keep", "random", {})
    _record(store, other.id)
    assert store.delete_study("d") and not store.delete_study("d")
    assert store.get_study("d") is None and store.trial_results(t.id) == []
    assert [s.name for s in store.list_studies()] == ["keep"] and len(store.list_trials(other.id)) == 1


@pytest.mark.parametrize("kind", BACKENDS)
def test_search_loop_resumes_on_every_backend(kind, tmp_path, costs):
    """The loop's contract on each backend: a search stopped half-way and continued has
    the same trials as one run straight through, nothing duplicated or paid twice."""
    from fakes import FakeEnv

    from graphtune.graphs import Budget, Space
    from graphtune.graphs.catalog import LLAMA_POOL
    from graphtune.search.base import Objective, SearchContext
    from graphtune.search.loop import run_search
    from graphtune.search.random_search import RandomSearcher

    env = FakeEnv(costs)
    dev = tuple(env.split("dev"))
    ctx = SearchContext(space=Space(models=LLAMA_POOL, max_nodes=4, max_in_degree=3), costs=costs,
                        budget=Budget(units=18), objective=Objective(), dev_ids=dev, seed=0, batch_size=3,
                        budget_runs=6 * len(dev))
    store = open_store(kind, tmp_path)
    st = store.create_study("s", "random", {})
    run_search(RandomSearcher(ctx), env, store, st, ctx, budget_runs=3 * len(dev))
    run_search(RandomSearcher(ctx), env, store, store.get_study("s"), ctx, budget_runs=6 * len(dev),
               test_ids=env.split("test"))
    ref_store = MemoryStorage()
    ref = ref_store.create_study("r", "random", {})
    ref_env = FakeEnv(costs)
    run_search(RandomSearcher(ctx), ref_env, ref_store, ref, ctx, budget_runs=6 * len(dev), test_ids=env.split("test"))
    got = [(t.split, t.batch, t.slot, t.graph_hash, t.reward) for t in store.list_trials(st.id)]
    assert got == [(t.split, t.batch, t.slot, t.graph_hash, t.reward) for t in ref_store.list_trials(ref.id)]
    assert env.calls == ref_env.calls
    store.close()


# -- workers join each other; dead ones are taken over (issue 10 defect 8, issue 11) -----------

SQL_BACKENDS = ["sqlite", BACKENDS[2]]


@pytest.fixture(params=SQL_BACKENDS)
def sql_store(request, tmp_path):
    s = open_store(request.param, tmp_path)
    yield s
    s.close()


def test_a_joining_worker_marks_dead_ones_stopped_and_their_claims_are_retaken_at_once(sql_store):
    """Workers (optimize included) join each other; one that is dead (stale heartbeat, pid
    gone from this machine, or declared dead with take_over) is marked stopped when the next
    one registers, and its claimed trial is claimable at once, not after the stale timeout."""
    import socket
    import subprocess
    import sys
    import time

    s = sql_store
    st = s.create_study("joined", "random", {})

    def statuses():
        return {w["name"]: w["status"] for w in s.list_workers(st.id)}

    s.register_worker(st.id, "far:11", "far", 11)
    s.register_worker(st.id, "far:12", "far", 12)
    assert statuses() == {"far:11": "running", "far:12": "running"}  # they join each other
    # a process of this machine that is gone: stopped when the next one registers
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    here = socket.gethostname()
    s.register_worker(st.id, "here:dead", here, p.pid)
    with s.coordination(st.id) as co:
        co.advance(expect_batch_index=0, state={"x": 1}, batch_index=0, runs_spent=0, enqueue=[dict(
            split="dev", batch=0, slot=0, graph={"nodes": []}, graph_hash="h", method="random", origin="sample",
            parents=[], info={}, question_ids=["a"])])
    held = s.claim_trial(st.id, "here:dead", stale_after_s=60)
    assert held is not None and s.claim_trial(st.id, "far:11", stale_after_s=60) is None  # claimed
    s.register_worker(st.id, "here:me", here, os.getpid())
    assert statuses()["here:dead"] == "stopped" and statuses()["here:me"] == "running"
    again = s.claim_trial(st.id, "here:me", stale_after_s=60)
    assert again is not None and again.id == held.id and again.worker == "here:me"  # at once
    assert not s.finish_claim(held.id, "here:dead", _record_for(again))  # the dead one's result is refused
    # a stale heartbeat
    time.sleep(1.1)
    s.register_worker(st.id, "far:13", "far", 13, stale_after_s=1.0)
    assert statuses()["far:11"] == "stopped" and statuses()["far:13"] == "running"
    # take_over: the caller says every other one is dead
    s.register_worker(st.id, "far:14", "far", 14, take_over=True)
    assert [n for n, v in statuses().items() if v == "running"] == ["far:14"]


def _record_for(t):
    from graphtune.store.base import TrialRecord

    return TrialRecord(split=t.split, batch=t.batch, slot=t.slot, status="complete", graph=t.graph,
                       graph_hash=t.graph_hash, method=t.method, origin=t.origin, parents=t.parents, info=t.info,
                       question_ids=t.question_ids, results=[], reused=frozenset(), metrics={}, reward=None,
                       cost=None, new_runs=0)


# -- read-only stores, in-memory URLs, one-line errors (defect 12) ---------------------------


def test_a_read_only_open_never_writes_and_reads_everything(tmp_path):
    url = f"sqlite:///{tmp_path / 'ro.db'}"
    w = Storage(url)
    st = w.create_study("s", "random", {"a": 1})
    _record(w, st.id)
    w.close()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    ro = Storage(url, readonly=True)
    assert ro.get_study("s").n_trials == 1 and [x.name for x in ro.list_studies()] == ["s"]
    assert len(ro.trial_results(ro.list_trials(st.id)[0].id)) == 2
    with pytest.raises(StoreError) as e:
        ro.create_study("t", "random", {})
    assert "read-only" in str(e.value) and "\n" not in str(e.value)
    ro.close()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before
    # an empty file is not given a schema by a read-only open
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    Storage(f"sqlite:///{empty}", readonly=True).close()
    assert sqlite3.connect(empty).execute("select count(*) from sqlite_master").fetchone() == (0,)


@pytest.mark.skipif(not PG_URL, reason="set GRAPHTUNE_TEST_POSTGRES_URL to test PostgreSQL")
def test_a_read_only_postgres_session_refuses_writes_in_one_line():
    w = Storage(fresh_postgres(PG_URL))
    w.create_study("s", "random", {})
    w.close()
    ro = Storage(PG_URL, readonly=True)
    assert ro.get_study("s") is not None
    with pytest.raises(StoreError) as e:
        ro.create_study("t", "random", {})
    assert "read-only" in str(e.value) and "\n" not in str(e.value)
    ro.close()


def test_unnamed_in_memory_urls_are_refused_for_commands_that_keep_a_study():
    from graphtune.store.storage import is_unnamed_memory_url, require_persistent

    for url in ("sqlite://", "sqlite:///", "sqlite:///?timeout=3"):
        assert is_unnamed_memory_url(url)
        with pytest.raises(StoreError, match="in-memory SQLite store.*sqlite:///graphtune.db"):
            require_persistent(url, "optimize")
    for url in ("sqlite:///g.db", "sqlite:////tmp/g.db", "sqlite:///:memory:", "postgresql://h/db"):
        assert not is_unnamed_memory_url(url)
        require_persistent(url, "optimize")


def _small_disk(monkeypatch, pages: int = 40):
    """SQLite stores opened from now on fill up at ``pages`` pages: 'database or disk is full'."""
    from sqlalchemy import event

    from graphtune.store import storage as mod

    orig = mod.Storage._make_engine

    def make(url, **kw):
        eng = orig(url, **kw)

        @event.listens_for(eng, "connect")
        def _limit(conn, _rec):
            conn.execute(f"PRAGMA max_page_count={pages}")

        return eng

    monkeypatch.setattr(mod.Storage, "_make_engine", staticmethod(make))


def test_a_full_disk_is_one_line_and_loses_nothing_stored(tmp_path, monkeypatch):
    from graphtune.store.ledger import CallRecord, SQLLedger

    url = f"sqlite:///{tmp_path / 'full.db'}"
    Storage(url).close()
    _small_disk(monkeypatch)
    s = Storage(url)
    st = s.create_study("s", "random", {})
    stored = 0
    with pytest.raises(StoreError) as e:
        for i in range(10_000):
            _record(s, st.id, h=f"h{i}", qids=[f"q{j}" for j in range(20)], batch=i)
            stored += 1
    msg = str(e.value)
    assert "\n" not in msg and "disk is full" in msg and "free disk space" in msg and "sqlalche.me" not in msg
    assert stored > 0 and len(s.list_trials(st.id)) == stored  # the failed write left nothing half-written
    led = SQLLedger(s)
    with pytest.raises(StoreError) as e:
        for i in range(10_000):
            led.put(CallRecord(key=f"k{i}", model="m", endpoint="openai/m", messages=[{"content": "x" * 500}],
                               reply="y" * 500))
        led.flush()
    msg = str(e.value)
    assert "\n" not in msg and "disk is full" in msg and "sqlalche.me" not in msg


# -- secrets never stored (defect 16) ---------------------------------------------------------


def test_secret_values_are_redacted_from_everything_a_store_writes(tmp_path):
    from graphtune.store.ledger import CallRecord, SQLLedger
    from graphtune.store.redact import MASK

    key = "sk-PLANTED-0123456789abcdef"
    url = f"sqlite:///{tmp_path / 'sec.db'}"
    s = Storage(url, secrets={key, "ab"})  # "ab": too short to be a secret, left alone
    st = s.create_study("s", "random", {"note": f"k={key}"})
    res = [QuestionResult(question_id="q1", answer=f"the key is {key}", correct=False, error=f"echo {key}",
                          nodes=(NodeOutcome("a", f"{key}!", False, 1, 1, 0.1),))]
    s.record_trial(st.id, TrialRecord(
        split="dev", batch=0, slot=0, status="complete", graph={"nodes": []}, graph_hash="h",
        method="random", origin="random", parents=[], info={"why": key, key: 1}, question_ids=["q1"],
        results=res, reused=set(), metrics={"accuracy": 0.0, "msg": key}, reward=0.0, cost=None,
        new_runs=1, error=f"failed with {key}", feedback=f"fb {key}"))
    step = {"key": "b0", "batch": 0, "kind": "feedback", "backend": "openai/x", "is_llm": True,
            "prompt": f"question: {key}", "reply": f"answer: {key}", "parsed": {"t": key}, "applied": [key],
            "rejected_reason": f"bad {key}", "feedback": key}
    s.save_progress(st.id, state={"history": [key]}, batch_index=1, runs_spent=1, agent_steps=[step])
    with s.coordination(st.id) as co:
        co.advance(expect_batch_index=1, state={"h": key}, batch_index=2, runs_spent=1,
                   agent_steps=[dict(step, key="b1")],
                   enqueue=[dict(split="dev", batch=2, slot=0, graph={}, graph_hash="h2", method="random",
                                 origin="random", parents=[], info={"k": key}, question_ids=["q1"])])
    led = SQLLedger(s)
    led.put(CallRecord(key="c1", model="m", endpoint="openai/m", messages=[{"role": "user", "content": key}],
                       reply=f"ok {key}", error=None))
    led.put(CallRecord(key="c2", model="m", endpoint="openai/m", messages=[], reply=None, error=f"401 {key}"))
    led.close()
    assert led.get("c1").reply == f"ok {MASK}"  # what is served is what is stored
    s.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert key.encode() not in raw and MASK.encode() in raw
    db = sqlite3.connect(tmp_path / "sec.db")
    text = repr([db.execute(f"select * from {t}").fetchall() for (t,) in
                 db.execute("select name from sqlite_master where type='table'")])
    assert key not in text
    assert "'random', '{\"note\": \"k=[redacted]\"}'" in text  # short values ("ab") are left alone


def test_contract_every_backend_redacts_its_secrets_from_trials_steps_and_state(store):
    from graphtune.store.redact import MASK

    key = "sk-contract-secret-42"
    store.redactor.add([key])
    st = store.create_study("s", "random", {"x": key})
    res = [QuestionResult(question_id="q1", answer=f"a {key}", correct=False, error=None,
                          nodes=(NodeOutcome("n", key, False),))]
    t = store.record_trial(st.id, TrialRecord(
        split="dev", batch=0, slot=0, status="complete", graph={"nodes": []},
        graph_hash="h", method="random", origin="random", parents=[], info={"i": key},
        question_ids=["q1"], results=res, reused=set(), metrics={"accuracy": 0.0}, reward=0.0,
        cost=None, new_runs=1, error=f"e {key}", feedback=key))
    store.save_progress(st.id, state={"s": key}, batch_index=1, runs_spent=1,
                        agent_steps=[{"key": "b0", "batch": 0, "kind": "feedback", "backend": "x", "is_llm": True,
                                      "prompt": key, "reply": key, "feedback": key}])
    got = store.get_trial(st.id, t.number)
    seen = repr((store.get_study("s"), got, store.trial_results(got.id), store.agent_steps(st.id)))
    assert key not in seen and MASK in seen


