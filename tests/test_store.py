"""Store contract: every backend (SQLite file, in-memory) passes the same cases."""

from __future__ import annotations

import sqlite3

import pytest

from graphtune.envs.base import NodeOutcome, QuestionResult
from graphtune.errors import StoreError
from graphtune.store import MemoryStorage, Storage


@pytest.fixture(params=["sqlite", "memory"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = Storage(f"sqlite:///{tmp_path / 'g.db'}")
    else:
        s = MemoryStorage()
    yield s
    s.close()


def _results(qids, ok=True, error=None):
    return [QuestionResult(question_id=q, answer="42", correct=None if error else ok, score=float(ok and not error),
                           prompt_tokens=10, completion_tokens=5, flops=1e9, usd=1e-6, latency_s=0.5, error=error,
                           nodes=(NodeOutcome("a", "42", ok, 10, 5, 0.5),)) for q in qids]


def _record(store, sid, h="h1", qids=("q1", "q2"), batch=0, slot=0, status="complete", error=None, res_error=None):
    return store.record_trial(sid, split="dev", batch=batch, slot=slot, status=status, graph={"nodes": []},
                              graph_hash=h, method="random", origin="random", parents=[], info={"k": 1},
                              question_ids=list(qids), results=_results(qids, error=res_error), reused=set(),
                              metrics={"accuracy": 1.0}, reward=1.0, cost={"units": 3.0, "flops": 1e9},
                              new_runs=len(qids), error=error)


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
    assert sqlite3.connect(path).execute("select count(*) from studies").fetchone() == (0,)


def test_bad_storage_url_is_one_clear_line(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Storage(f"sqlite:///{tmp_path}/nope/g.db")
    with pytest.raises(StoreError) as e:
        Storage("postgresql://u:secretpw@127.0.0.1:1/db")
    assert "secretpw" not in str(e.value)
