"""The storage contract: what every graphtune store keeps, whatever holds the data.

:class:`StudyStorage` is the base of every backend (``Storage``: SQLAlchemy, SQLite or
PostgreSQL; ``MemoryStorage``: in-process). :class:`WorkerStorage` is the extra part a
store shared by several ``graphtune worker`` processes implements (leases, claims,
heartbeats, the batch-update lock); only the SQL store has it, and callers that need it
check ``isinstance(store, WorkerStorage)``. The values passed in and out
(:class:`StudyInfo`, :class:`TrialInfo`, :class:`TrialRecord`) are frozen dataclasses.
One contract test suite (tests/test_store.py) runs every backend through the same cases.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from graphtune.graphs.results import QuestionResult


def spec_hash(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _finite(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


@dataclass(frozen=True)
class StudyInfo:
    id: int
    name: str
    method: str
    spec: dict
    spec_hash: str
    status: str
    searcher_state: dict | None
    batch_index: int
    runs_spent: int
    n_trials: int = 0
    created_at: Any = None


@dataclass(frozen=True)
class TrialInfo:
    id: int
    number: int
    split: str
    batch: int
    slot: int
    status: str
    graph: dict
    graph_hash: str
    method: str
    origin: str
    parents: list
    info: dict
    question_ids: list
    metrics: dict
    reward: float | None
    accuracy: float | None
    cost_units: float | None
    flops: float | None
    usd: float | None
    latency_s: float | None
    new_runs: int
    error: str | None
    feedback: str | None
    started_at: Any
    finished_at: Any
    worker: str | None = None  # the worker holding (or that held) the claim (graphtune worker)


@dataclass(frozen=True)
class TrialRecord:
    """One finished (``status="complete"``) or failed (``"failed"``) trial, as written by
    :meth:`StudyStorage.record_trial`.

    Its place: ``split``, ``batch``, ``slot``, ``graph_hash``. ``results``: one per question
    evaluated or reused; ``reused``: the question ids whose result came from an earlier
    trial (not paid again); ``cost``: the graph's cost (``units``, ``flops``, ``usd``,
    ``latency_s``), None for a graph that failed validation; ``new_runs``: questions paid
    for by this trial; ``error``: why a failed trial failed; ``started_at``: when the
    trial started (None: the time it is written)."""

    split: str
    batch: int
    slot: int
    status: str
    graph: dict
    graph_hash: str
    method: str
    origin: str
    parents: Sequence[int]
    info: Mapping[str, Any]
    question_ids: Sequence[str]
    results: Sequence[QuestionResult]
    reused: AbstractSet[str]
    metrics: Mapping[str, Any]
    reward: float | None
    cost: Mapping[str, float] | None
    new_runs: int
    error: str | None = None
    feedback: str | None = None
    started_at: Any = None


class StudyStorage(abc.ABC):
    """Where studies, their trials, per-question results and agent steps live.

    Invariants every backend keeps (checked for each by tests/test_store.py):

    - **Finished trials are written once and read-only.** :meth:`record_trial` writes a
      trial with its results in one step (all or nothing); nothing changes it afterwards.
      Trial numbers count from 1 per study, in the order trials were written.
    - **A trial is found again by its place** (split, batch, slot, graph hash):
      :meth:`find_trial` returns the complete trial there, so a resumed search re-asking a
      batch it had already run reads it instead of paying again.
    - **Progress is saved after the batch's trials.** :meth:`save_progress` writes the
      searcher state, the batch counter and the spent budget in one step: a resumed search
      restarts at the first batch whose progress was not saved.
    - **Results are per (graph hash, split, question) and never paid twice.**
      :meth:`known_results` returns every stored result of a graph on a split from any
      complete trial; results that are infrastructure failures (``error`` set) are not
      reused (they are retried).
    - **Everything written is redacted** of the store's secrets (``self.redactor``): the
      spec, searcher state, trial info, metrics, errors, feedback, answers and agent steps.
    - **Returned values are copies** (frozen dataclasses, fresh dicts): changing one never
      changes the store.
    - **Thread-safety.** The SQL store opens one session per call and may be shared by
      threads and processes (see :class:`WorkerStorage` for coordination); the memory store
      belongs to one process and is meant for one thread at a time.

    ``url``: where the store is (``memory://`` for the memory store); ``redactor``: the
    :class:`~graphtune.store.redact.Redactor` applied to everything written."""

    url: str

    # -- studies ---------------------------------------------------------------------
    @abc.abstractmethod
    def get_study(self, name: str) -> StudyInfo | None:
        """The study called ``name`` (with its trial count), or None."""

    @abc.abstractmethod
    def create_study(self, name: str, method: str, spec: Mapping[str, Any]) -> StudyInfo:
        """A new running study; ``StoreError`` if the name is taken."""

    @abc.abstractmethod
    def list_studies(self) -> list[StudyInfo]:
        """Every study, oldest first."""

    @abc.abstractmethod
    def update_study_spec(self, study_id: int, spec: Mapping[str, Any]) -> None:
        """Replace the study's spec (and its hash)."""

    @abc.abstractmethod
    def delete_study(self, name: str) -> bool:
        """Delete the study with everything of it; False if there was none."""

    @abc.abstractmethod
    def delete_study_if_empty(self, study_id: int) -> bool:
        """Delete the study when nothing was stored in it yet (no finished trial, no run
        paid, batch 0; trials only queued go with it, and a study another live worker has
        joined stays), deciding and deleting in one transaction; True if it was deleted. A run that
        fails before its first trial removes the study it created with this, so the fixed
        spec runs under the same name (its ledger rows stay: nothing is paid twice)."""

    @abc.abstractmethod
    def reset_searcher(self, study_id: int, method: str) -> None:
        """Forget the searcher state (a study continued with another method); trials, the
        batch counter and the spent budget stay."""

    @abc.abstractmethod
    def set_status(self, study_id: int, status: str) -> None:
        """Set the study's status (``running``, ``done``, ...)."""

    @abc.abstractmethod
    def save_progress(self, study_id: int, *, state: Mapping[str, Any] | None, batch_index: int, runs_spent: int,
                      agent_steps: Sequence[Mapping[str, Any]] = ()) -> None:
        """Searcher state + counters + the batch's agent steps, in one step; ``state=None``
        keeps the stored state; an agent step whose ``key`` is already stored is not added
        again."""

    # -- trials ----------------------------------------------------------------------
    @abc.abstractmethod
    def find_trial(self, study_id: int, split: str, batch: int, slot: int, graph_hash: str) -> TrialInfo | None:
        """The complete trial at this place, or None."""

    @abc.abstractmethod
    def known_results(self, study_id: int, graph_hash: str, split: str) -> dict[str, QuestionResult]:
        """Every stored result of this graph on this split (any complete trial), by question
        id; infrastructure failures are not reused (they are retried)."""

    @abc.abstractmethod
    def known_question_ids(self, study_id: int, graph_hash: str, split: str, *, before_batch: int) -> set[str]:
        """Questions of ``split`` this graph has a reusable result on, from batches before
        ``before_batch`` (what a batch's runs are predicted from)."""

    @abc.abstractmethod
    def record_trial(self, study_id: int, record: TrialRecord) -> TrialInfo:
        """Write one finished (or failed) trial with its results, atomically; returns it as
        stored (redacted, numbered)."""

    @abc.abstractmethod
    def list_trials(self, study_id: int, split: str | None = None) -> list[TrialInfo]:
        """The study's trials (of ``split`` if given), by number."""

    @abc.abstractmethod
    def get_trial(self, study_id: int, number: int) -> TrialInfo | None:
        """The study's trial with this number, or None."""

    @abc.abstractmethod
    def trial_results(self, trial_id: int) -> list[QuestionResult]:
        """A trial's per-question results, in the order they were recorded."""

    @abc.abstractmethod
    def paid_results(self, study_id: int) -> list[tuple[int, QuestionResult]]:
        """Every result the study's trials paid for (results reused from an earlier trial
        left out), as (trial id, result), by trial number then the order recorded."""

    @abc.abstractmethod
    def agent_steps(self, study_id: int) -> list[dict]:
        """The study's agent steps (dicts with at least ``key``), in the order stored."""

    def safe_url(self) -> str:
        """Where the store is, safe to print (any password masked)."""
        return self.url

    def close(self) -> None:
        """Release connections; the store is not used afterwards."""


class WorkerStorage(abc.ABC):
    """The part of a store that several ``graphtune worker`` processes share a study
    through (only the SQL store; ``graphtune optimize`` is one of them): a row per
    process, a queue of trials claimed one at a time, heartbeats that let a dead worker's
    claims be retaken, the update claim (one worker computes a batch update) and the
    study's lock that commits it (:meth:`coordination`). Every method is one transaction; conflicts
    between processes are resolved by row locks (PostgreSQL) or retried (SQLite)."""

    @abc.abstractmethod
    def register_worker(self, study_id: int, name: str, host: str, pid: int, *, take_over: bool = False) -> None:
        """Add a worker process (``graphtune worker`` or ``graphtune optimize``) to the
        study, marking dead ones stopped (every other one with ``take_over``) so their
        claims are taken over at once."""

    @abc.abstractmethod
    def worker_heartbeat(self, study_id: int, name: str, *, trial_id: int | None = None, trials_done: int = 0,
                         batches_updated: int = 0, status: str = "running") -> None:
        """Refresh the worker's heartbeat (and that of the trial it holds)."""

    @abc.abstractmethod
    def live_workers(self, study_id: int, stale_after_s: float) -> int:
        """How many workers of the study have a fresh heartbeat."""

    @abc.abstractmethod
    def list_workers(self, study_id: int) -> list[dict]:
        """Every process registered on the study, as dicts."""

    @abc.abstractmethod
    def claim_trial(self, study_id: int, worker: str, *, stale_after_s: float) -> TrialInfo | None:
        """Claim one queued trial (or one whose holder went stale) for ``worker``; None when
        there is none."""

    @abc.abstractmethod
    def finish_claim(self, trial_id: int, worker: str, record: TrialRecord) -> bool:
        """Store a claimed trial's outcome (``record``'s status, results, metrics, cost...;
        its place is the claimed trial's) if ``worker`` still holds the claim (False:
        retaken; nothing written)."""

    @abc.abstractmethod
    def release_claim(self, trial_id: int, worker: str) -> None:
        """Put a claimed trial back in the queue."""

    @abc.abstractmethod
    def unfinished_trials(self, study_id: int) -> int:
        """How many of the study's trials are queued, waiting or claimed."""

    @abc.abstractmethod
    def idle_batches(self, study_id: int, before: int) -> int:
        """How many batches just before ``before`` paid for no new run."""

    @abc.abstractmethod
    def coordination(self, study_id: int, *, wait: bool = False) -> contextlib.AbstractContextManager:
        """The study's batch-update lock: a context yielding a holder of it, or None when
        another worker holds it (``wait``: wait for it instead)."""

    @abc.abstractmethod
    def claim_update(self, study_id: int, worker: str, *, stale_after_s: float) -> bool:
        """Make ``worker`` the one that computes the study's next batch update (the
        searcher's tell and ask, outside any lock); False while another live worker holds
        the claim. The claim lapses with its holder's heartbeat; it ends with
        ``Coordination.release_update`` (in the commit) or :meth:`release_update`."""

    @abc.abstractmethod
    def release_update(self, study_id: int, worker: str) -> None:
        """Give up the update claim without committing."""
