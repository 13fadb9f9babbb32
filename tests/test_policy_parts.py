"""reinforce and agent-reinforce as a user sees them: the exact trial sequence of a short
run (pinned before they were split into parts, so the split changed no batch and no pick),
an interrupted search resumed from the store equal to an uninterrupted one, a study saved
by the previous version (its state still copying the evidence) resuming exactly, and a
saved state that does not grow with the number of evaluations."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from graphtune.api import optimize
from graphtune.spec import parse_spec
from graphtune.store.storage import Storage

DATA = Path(__file__).resolve().parent / "data"
MODELS = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b")


class Interrupt(Exception):
    """Stands for a crash in the middle of a batch."""


def _spec(db: str, method: str, evaluations: int, options: dict | None = None, *, dev: int = 40, study: str = "s"):
    return parse_spec({
        "study": study, "task": {"profile": "math", "dev_size": dev, "test_size": 10},
        "models": [{"name": m} for m in MODELS],
        "space": {"roles": ["assistant", "fuser"], "max_nodes": 6, "max_width": 5, "max_depth": 3,
                  "max_in_degree": 3},
        "budget": {"units": 18},
        "search": {"method": method, "evaluations": evaluations, "batch_size": 4, "seed": 3,
                   "options": options or {}},
        "env": {"kind": "simulated"}, "storage": f"sqlite:///{db}"})


def _run(spec, *, stop_after_trials: int | None = None) -> None:
    """``optimize``; with ``stop_after_trials``, crash right after that many more trials."""
    if stop_after_trials is None:
        optimize(spec)
        return
    seen = [0]

    def progress(ev: dict) -> None:
        seen[0] += 1
        if seen[0] >= stop_after_trials:
            raise Interrupt()

    with pytest.raises(Interrupt):
        optimize(spec, progress=progress)


def _trials(db: str, study: str = "s") -> list[tuple]:
    store = Storage(f"sqlite:///{db}")
    try:
        st = store.get_study(study)
        return [(t.split, t.batch, t.slot, t.status, t.origin, t.graph_hash, len(t.question_ids), tuple(t.parents),
                 None if t.reward is None else round(t.reward, 9)) for t in store.list_trials(st.id)]
    finally:
        store.close()


def _state(db: str, study: str = "s") -> dict:
    store = Storage(f"sqlite:///{db}")
    try:
        return store.get_study(study).searcher_state
    finally:
        store.close()


def _store_runs_spent(db: str, study: str = "s") -> int:
    store = Storage(f"sqlite:///{db}")
    try:
        return store.get_study(study).runs_spent
    finally:
        store.close()


def _digest(trials: list[tuple]) -> str:
    return hashlib.sha256(json.dumps(trials).encode()).hexdigest()[:16]


#: (method, options) -> (dev trials, digest of every trial's place, origin, graph, questions,
#: parents and reward, the recommended graph), pinned on the code before the split into parts;
#: re-pinned when the engine began to stop exactly at the budget (issue 13): three of the four
#: runs ended with a race trial of 30 questions that passed the budget by 10 runs; it now runs
#: on the first 20 (every earlier trial and the tested graph are the same as before)
PINS = {
    # issue 13 (the final race ranks rivals by their z against the leader; the critic proposes
    # by expected improvement under its Bayesian surrogate) changed all but reinforce-pareto:
    # was (33, 6b892fe7f306753a), (28, 8ba7db859818f9d8), (30, ed49ff910f52adf5)
    ("reinforce", ""): (33, "a1b838db6a091367"),  # was 6350cb6eb623c28b before that
    ("agent-reinforce", ""): (28, "0d730b61ab2f8a3a"),
    ("reinforce", "pareto"): (32, "2fc074b80b6c2eb9"),  # was dd876c8809d5cf55
    ("agent-reinforce", "pareto"): (29, "5ee1d06e697a7bdf"),
}


@pytest.mark.parametrize("method,mode", list(PINS))
def test_a_short_run_proposes_the_pinned_trials(tmp_path, method, mode):
    db = str(tmp_path / "g.db")
    _run(_spec(db, method, 10, {"pareto": "units"} if mode else None))
    trials = _trials(db)
    test = [t for t in trials if t[0] == "test"]
    assert len(test) == 1
    dev = [t for t in trials if t[0] == "dev"]
    # the run exercised every kind of candidate: new graphs, ASHA promotions to each level, the
    # final race; only the last trial may stop short of its level, at the budget
    assert {t[6] for t in dev[:-1]} == {10, 30, 40} and dev[-1][6] in {10, 20, 30, 40}
    assert {t[4] for t in dev} >= {"sample", "race"}
    assert _store_runs_spent(db) == 10 * 40  # exactly the budget, never past it
    assert (sum(1 for t in trials if t[0] == "dev"), _digest(trials)) == PINS[(method, mode)]


CASES = [("reinforce", None), ("agent-reinforce", None), ("reinforce", {"pareto": "units"}),
         ("agent-reinforce", {"pareto": "units"})]


@pytest.mark.parametrize("method,options", CASES)
def test_a_search_interrupted_twice_mid_batch_then_resumed_equals_an_uninterrupted_one(tmp_path, method, options):
    ref = str(tmp_path / "ref.db")
    _run(_spec(ref, method, 10, options))
    db = str(tmp_path / "g.db")
    _run(_spec(db, method, 10, options), stop_after_trials=7)
    _run(_spec(db, method, 10, options), stop_after_trials=9)
    _run(_spec(db, method, 10, options))
    assert _trials(db) == _trials(ref)
    assert _comparable(_state(db)) == _comparable(_state(ref))


def _comparable(state: dict) -> dict:
    """The state less the critic's own wall-clock seconds."""
    return {k: ({**v, "seconds": None} if k == "usage" else v) for k, v in state.items()}


def _old_state_file(method: str, options: dict | None) -> Path:
    return DATA / f"old_searcher_state_{method}{'_pareto' if options else ''}.json"


#: agent-reinforce's fixture (tests/data/old_searcher_state_agent-reinforce.json) is kept but
#: no longer replayed here: the test swaps the old state into today's run at the same trial,
#: which needs today's first 13 trials to equal the old version's, and issue 13's surrogate
#: critic proposes other graphs from batch 1 on. The evidence-in-state format it tests is
#: Racing's, which the reinforce fixture still covers.
@pytest.mark.parametrize("method,options", [CASES[2]])
def test_a_study_saved_by_the_previous_version_resumes_exactly(tmp_path, method, options):
    """The state the previous version saved (it copied every graph's evidence) after 13 trials
    of this run: loaded into today's store at the same place, the search continues exactly as
    an uninterrupted one."""
    old = json.loads(_old_state_file(method, options).read_text())
    assert "evidence" in old["state"]
    ref = str(tmp_path / "ref.db")
    _run(_spec(ref, method, 10, options))
    db = str(tmp_path / "g.db")
    _run(_spec(db, method, 10, options), stop_after_trials=13)
    store = Storage(f"sqlite:///{db}")
    st = store.get_study("s")
    assert (st.batch_index, st.runs_spent) == (old["batch_index"], old["runs_spent"])
    store.save_progress(st.id, state=old["state"], batch_index=st.batch_index, runs_spent=st.runs_spent)
    store.close()
    _run(_spec(db, method, 10, options))
    assert _trials(db) == _trials(ref)
    assert "evidence" not in _state(db)


#: (method, first budget) -> (dev trials, digest) after continuing to 10 evaluations, pinned
#: on the code before the split; the first run ends with a promotion asked but not completed
#: (the budget ran out within it), which the saved state must carry since no trial shows it.
#: Re-pinned when the engine began to stop exactly at the budget (issue 13): that promotion
#: now runs on the 20 questions the budget allows instead of passing it by 10 runs, so the
#: first run spends 10 runs less and the continued schedule differs from there on
#: (was (33, "b219c162457ee68b") and (29, "356c289041df48b8")); issue 13's race order and
#: critic then changed both (was (33, "d04a341d0c48f013") and (30, "e46ba2cd37a0a122"))
CONTINUED = {("reinforce", 7): (34, "787eaa2012690418"), ("agent-reinforce", 6): (30, "40a2f68d167e04dc")}


@pytest.mark.parametrize("method,first", list(CONTINUED))
def test_a_finished_study_continued_with_more_evaluations_proposes_the_pinned_trials(tmp_path, method, first):
    db = str(tmp_path / "g.db")
    _run(_spec(db, method, first))
    assert _state(db)["promoted"]  # asked, not run: only the saved state knows
    _run(_spec(db, method, 10))
    trials = _trials(db)
    assert (sum(1 for t in trials if t[0] == "dev"), _digest(trials)) == CONTINUED[(method, first)]


@pytest.mark.parametrize("method", ["reinforce", "agent-reinforce"])
def test_the_saved_state_does_not_grow_with_the_evaluations(tmp_path, method):
    """The store holds every graph's results; the saved state (rewritten after every batch)
    keeps the policy and counters only (and agent-reinforce's memory, bounded by its token
    bound), so three times the evaluations leave it the same size."""
    sizes = {}
    for n in (4, 12):
        db = str(tmp_path / f"g{n}.db")
        _run(_spec(db, method, n))
        saved = _state(db)
        assert len(saved.get("earlier", [])) <= 8  # agent-reinforce: one line per round, the last 8
        # agent-reinforce: the agent's hypotheses, bounded by memory_tokens (1000, ~4000 characters)
        assert len(json.dumps(saved.get("memory", []))) <= 2 * 4 * 1000
        state = json.dumps(saved)
        sizes[n] = len(json.dumps({k: v for k, v in saved.items() if k not in ("earlier", "memory")}))
        asked = {q for t in _store_trials(db) for q in t.question_ids}
        assert asked and not any(f'"{q}"' in state for q in asked)  # no question's result is copied
    assert abs(sizes[12] - sizes[4]) < 1000, sizes


def _store_trials(db: str):
    store = Storage(f"sqlite:///{db}")
    try:
        return store.list_trials(store.get_study("s").id)
    finally:
        store.close()
