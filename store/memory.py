"""An in-process store with the same contract as the SQL store.

For benchmarks and tests that run thousands of short searches: no SQL round trips, no
files. Nothing survives the process; use the SQL store for anything a user keeps.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from collections.abc import Mapping, Sequence
from typing import Any

from graphtune.errors import StoreError
from graphtune.graphs.results import QuestionResult
from graphtune.store.models import utcnow
from graphtune.store.redact import Redactor
from graphtune.store.base import StudyInfo, StudyStorage, TrialInfo, TrialRecord, _finite, spec_hash


class MemoryStorage(StudyStorage):
    """A :class:`StudyStorage` in this process's memory, for one thread at a time.

    ``secrets``: values replaced in everything written, as in the SQL store. It has no
    :class:`~graphtune.store.base.WorkerStorage` part: ``graphtune worker`` processes need
    a store they can share (the SQL store)."""

    url = "memory://"

    def __init__(self, *, secrets=()) -> None:
        self.redactor = Redactor(secrets)
        self._studies: dict[str, dict] = {}
        self._trials: dict[int, list[TrialInfo]] = {}
        self._results: dict[int, list[QuestionResult]] = {}  # trial id -> results
        self._reused: dict[int, set[str]] = {}  # trial id -> question ids reused from earlier trials
        self._by_hash: dict[tuple[int, str, str], dict[str, QuestionResult]] = {}
        self._steps: dict[int, list[dict]] = {}
        self._next_trial_id = 1

    def _info(self, d: dict) -> StudyInfo:
        return StudyInfo(d["id"], d["name"], d["method"], copy.deepcopy(d["spec"]), d["spec_hash"], d["status"],
                         copy.deepcopy(d["searcher_state"]), d["batch_index"], d["runs_spent"],
                         len(self._trials.get(d["id"], [])), d["created_at"])

    # studies
    def get_study(self, name: str) -> StudyInfo | None:
        d = self._studies.get(name)
        return self._info(d) if d else None

    def create_study(self, name: str, method: str, spec: Mapping[str, Any]) -> StudyInfo:
        if name in self._studies:
            raise StoreError(f"study {name!r} already exists; pick another --study name or resume it")
        spec = self.redactor.value(dict(spec))
        d = {"id": len(self._studies) + 1, "name": name, "method": method, "spec": spec,
             "spec_hash": spec_hash(spec), "status": "running", "searcher_state": None, "batch_index": 0,
             "runs_spent": 0, "created_at": utcnow()}
        self._studies[name] = d
        return self._info(d)

    def _by_id(self, study_id: int) -> dict:
        return next(d for d in self._studies.values() if d["id"] == study_id)

    def list_studies(self) -> list[StudyInfo]:
        return [self._info(d) for d in self._studies.values()]

    def update_study_spec(self, study_id: int, spec: Mapping[str, Any]) -> None:
        d = self._by_id(study_id)
        spec = self.redactor.value(dict(spec))
        d["spec"], d["spec_hash"] = spec, spec_hash(spec)

    def delete_study(self, name: str) -> bool:
        d = self._studies.pop(name, None)
        if d is None:
            return False
        for t in self._trials.pop(d["id"], []):
            self._results.pop(t.id, None)
            self._reused.pop(t.id, None)
        self._by_hash = {k: v for k, v in self._by_hash.items() if k[0] != d["id"]}
        self._steps.pop(d["id"], None)
        return True

    def delete_study_if_empty(self, study_id: int) -> bool:
        d = next((d for d in self._studies.values() if d["id"] == study_id), None)
        if d is None or d["runs_spent"] or d["batch_index"] or any(
                t.status in ("complete", "failed") for t in self._trials.get(study_id, [])):
            return False
        return self.delete_study(d["name"])

    def reset_searcher(self, study_id: int, method: str) -> None:
        d = self._by_id(study_id)
        d["method"], d["searcher_state"] = method, None

    def set_status(self, study_id: int, status: str) -> None:
        self._by_id(study_id)["status"] = status

    def save_progress(self, study_id: int, *, state: Mapping[str, Any] | None, batch_index: int, runs_spent: int,
                      agent_steps: Sequence[Mapping[str, Any]] = ()) -> None:
        d = self._by_id(study_id)
        if state is not None:
            d["searcher_state"] = self.redactor.value(json.loads(json.dumps(state)))
        d["batch_index"], d["runs_spent"] = batch_index, runs_spent
        steps = self._steps.setdefault(study_id, [])
        keys = {s["key"] for s in steps}
        steps.extend(self.redactor.value(dict(s)) for s in agent_steps if s["key"] not in keys)

    # trials
    def find_trial(self, study_id: int, split: str, batch: int, slot: int, graph_hash: str) -> TrialInfo | None:
        for t in self._trials.get(study_id, []):
            if (t.split, t.batch, t.slot, t.graph_hash, t.status) == (split, batch, slot, graph_hash, "complete"):
                return t
        return None

    def known_results(self, study_id: int, graph_hash: str, split: str) -> dict[str, QuestionResult]:
        return dict(self._by_hash.get((study_id, graph_hash, split), {}))

    def known_question_ids(self, study_id: int, graph_hash: str, split: str, *, before_batch: int) -> set[str]:
        return {r.question_id for t in self._trials.get(study_id, [])
                if (t.graph_hash, t.split, t.status) == (graph_hash, split, "complete") and t.batch < before_batch
                for r in self._results.get(t.id, []) if r.error is None}

    def record_trial(self, study_id: int, record: TrialRecord) -> TrialInfo:
        rec = record
        split, batch, slot, status, graph, graph_hash = (rec.split, rec.batch, rec.slot, rec.status, rec.graph,
                                                         rec.graph_hash)
        info, metrics, error, feedback, results = rec.info, rec.metrics, rec.error, rec.feedback, rec.results
        trials = self._trials.setdefault(study_id, [])
        cost = rec.cost or {}
        red = self.redactor
        if red:  # what the SQL store keeps: secrets replaced in every text
            info, metrics = red.value(json.loads(json.dumps(dict(info), default=str))), red.value(dict(metrics))
            error, feedback = red.text(error), red.text(feedback)
            results = [replace(r, answer=red.text(r.answer), error=red.text(r.error),
                               nodes=tuple(replace(n, answer=red.text(n.answer)) for n in r.nodes),
                               stages=tuple(replace(s, answer=red.text(s.answer)) for s in r.stages))
                       for r in results]
        t = TrialInfo(self._next_trial_id, len(trials) + 1, split, batch, slot, status, graph, graph_hash, rec.method,
                      rec.origin, list(rec.parents), dict(info), list(rec.question_ids), dict(metrics),
                      _finite(rec.reward), _finite(metrics.get("accuracy")), cost.get("units"), cost.get("flops"),
                      cost.get("usd"), cost.get("latency_s"), rec.new_runs, error, feedback,
                      rec.started_at or utcnow(), utcnow())
        self._next_trial_id += 1
        trials.append(t)
        self._results[t.id] = list(results)
        self._reused[t.id] = set(rec.reused)
        if status == "complete":
            known = self._by_hash.setdefault((study_id, graph_hash, split), {})
            for r in results:
                if r.error is None:
                    known[r.question_id] = r
        return t

    def list_trials(self, study_id: int, split: str | None = None) -> list[TrialInfo]:
        return [t for t in self._trials.get(study_id, []) if split is None or t.split == split]

    def get_trial(self, study_id: int, number: int) -> TrialInfo | None:
        trials = self._trials.get(study_id, [])
        return trials[number - 1] if 0 < number <= len(trials) else None

    def trial_results(self, trial_id: int) -> list[QuestionResult]:
        return list(self._results.get(trial_id, []))

    def paid_results(self, study_id: int) -> list[tuple[int, QuestionResult]]:
        return [(t.id, r) for t in self._trials.get(study_id, []) for r in self._results.get(t.id, [])
                if r.question_id not in self._reused.get(t.id, ())]

    def agent_steps(self, study_id: int) -> list[dict]:
        return [dict(s) for s in self._steps.get(study_id, [])]

    def close(self) -> None:
        pass
