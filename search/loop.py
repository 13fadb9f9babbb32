"""The search loop: ask, evaluate (never paying twice), tell, store; then pick and test.

Budget is counted in graph-question runs actually paid for: a graph already evaluated on
a question in this study is served from the store and costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from graphtune.envs.base import Environment
from graphtune.errors import GraphError, SearchError
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.cost import GraphCost
from graphtune.graphs.io import from_dict, to_dict
from graphtune.graphs.results import QuestionResult, summarize
from graphtune.graphs.space import validate
from graphtune.search.base import (Candidate, Evaluation, GraphStats, ProgressCallback, SearchContext, Searcher,
                                   pool_stats)
from graphtune.store.base import StudyInfo, StudyStorage, TrialInfo, TrialRecord

#: stop when a searcher keeps proposing only graphs it already paid for
MAX_IDLE_BATCHES = 25


@dataclass(frozen=True)
class SearchOutcome:
    best: GraphStats | None
    best_trial: TrialInfo | None
    test_trial: TrialInfo | None
    test_results: tuple[QuestionResult, ...]
    runs_spent: int
    n_trials: int
    stopped: str  # "budget" | "exhausted" | "idle"
    #: question runs left out of a trial's mean by infrastructure failures, per model
    #: (over the study's trials, dev and test; "?" when the failing model is unknown)
    excluded: dict[str, int] = field(default_factory=dict)


def _evaluation_from_trial(t: TrialInfo, results: Sequence[QuestionResult], cand: Candidate,
                           ctx: SearchContext) -> Evaluation:
    cost = GraphCost(t.flops or 0.0, t.cost_units or 0.0, t.usd or 0.0, t.latency_s or 0.0, 0.0, 0.0)
    return Evaluation(candidate=cand, trial_number=t.number, graph_hash=t.graph_hash, results=tuple(results),
                      metrics=summarize(results), reward=t.reward if t.reward is not None else float("nan"),
                      cost=cost, new_runs=t.new_runs, error=t.error)


def evaluate_candidate(cand: Candidate, *, env: Environment, storage: StudyStorage, study: StudyInfo,
                       ctx: SearchContext, method: str, batch: int, slot: int, split: str = "dev",
                       question_ids: Sequence[str] | None = None) -> Evaluation:
    """Evaluate one candidate as a stored trial, paying only for missing questions."""
    g = cand.graph
    h = graph_hash(g)
    qids = tuple(question_ids or cand.question_ids or ctx.dev_ids)
    done = storage.find_trial(study.id, split, batch, slot, h)
    if done is not None:  # resumed search re-asking a batch it had already run
        return _evaluation_from_trial(done, storage.trial_results(done.id), cand, ctx)
    common = dict(split=split, batch=batch, slot=slot, graph=to_dict(g), graph_hash=h, method=method,
                  origin=cand.origin, parents=cand.parents, info=cand.info, question_ids=qids)
    try:
        cost = validate(g, ctx.space, ctx.costs, ctx.budget)
    except GraphError as e:
        t = storage.record_trial(study.id, TrialRecord(status="failed", results=[], reused=set(), metrics={},
                                                       reward=None, cost=None, new_runs=0, error=str(e), **common))
        return Evaluation(candidate=cand, trial_number=t.number, graph_hash=h, results=(),
                          metrics=summarize([]), reward=float("nan"), cost=GraphCost(0, 0, 0, 0, 0, 0),
                          new_runs=0, error=str(e))
    results, reused, missing = run_missing(g, h, qids, env=env, storage=storage, study_id=study.id, split=split)
    reward = _mean([ctx.objective.question_reward(r, ctx.costs.unit_flops) for r in results if r.ok])
    metrics = summarize(results)
    t = storage.record_trial(study.id, TrialRecord(status="complete", results=results, reused=reused,
                                                   metrics=trial_metrics(results), reward=reward,
                                                   cost=cost.as_dict(), new_runs=len(missing), **common))
    return Evaluation(candidate=cand, trial_number=t.number, graph_hash=h, results=tuple(results),
                      metrics=metrics, reward=reward, cost=cost, new_runs=len(missing))


def trial_metrics(results: Sequence[QuestionResult]) -> dict:
    """A trial's stored metrics: ``summarize`` plus ``excluded``, the questions left out of
    its mean by infrastructure failures, each with the pool model whose call failed."""
    out = summarize(results).as_dict()
    out["excluded"] = {r.question_id: (r.failed_model or "?") for r in results if not r.ok and
                       (r.error or "").startswith("infrastructure")}
    return out


def excluded_by_model(trials: Sequence[TrialInfo]) -> dict[str, int]:
    """Question runs excluded by infrastructure failures over ``trials``, per model."""
    out: dict[str, int] = {}
    for t in trials:
        for model in ((t.metrics or {}).get("excluded") or {}).values():
            out[model] = out.get(model, 0) + 1
    return dict(sorted(out.items()))


def no_graph_measured(storage: StudyStorage, study: StudyInfo) -> SearchError:
    """The error when a search ends with trials but no graph scored on any question."""
    trials = [t for t in storage.list_trials(study.id, split="dev") if t.status == "complete"]
    last = next((r.error for t in reversed(trials) for r in storage.trial_results(t.id) if r.error), None)
    return SearchError(f"study {study.name!r}: no graph was scored on any dev question ({len(trials)} trials, every "
                       f"question run failed; last: {last or 'none'}); nothing is recommended and the study is kept: "
                       "fix the endpoints (`graphtune validate SPEC --check-endpoints`), then continue it with more "
                       "--evaluations")


def run_missing(g, h: str, qids: Sequence[str], *, env: Environment, storage: StudyStorage, study_id: int,
                split: str) -> tuple[list[QuestionResult], set[str], list[str]]:
    """Results of graph ``g`` on ``qids``: stored ones reused, the missing ones run (paid).
    Returns ``(results in qids order, reused question ids, missing question ids)``."""
    known = storage.known_results(study_id, h, split)
    missing = [q for q in qids if q not in known]
    fresh = {r.question_id: r for r in env.evaluate(g, missing)} if missing else {}
    return [known[q] if q in known else fresh[q] for q in qids], set(known) & set(qids), missing


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def load_history(storage: StudyStorage, study: StudyInfo, ctx: SearchContext) -> list[Evaluation]:
    """Every finished dev trial of the study as Evaluations (for ``recommend``)."""
    out = []
    for t in storage.list_trials(study.id, split="dev"):
        if t.status != "complete":
            continue
        cand = Candidate(graph=from_dict(t.graph), question_ids=tuple(t.question_ids), parents=tuple(t.parents),
                         origin=t.origin, info=t.info)
        out.append(_evaluation_from_trial(t, storage.trial_results(t.id), cand, ctx))
    return out


def resume_searcher(searcher: Searcher, storage: StudyStorage, study: StudyInfo, ctx: SearchContext) -> None:
    """Bring a fresh searcher to the study's saved state: ``load_state_dict`` then
    ``restore`` with the dev trials of the batches it was told (nothing for a new study)."""
    if study.searcher_state is None:
        return
    searcher.load_state_dict(study.searcher_state)
    told = [e for e, t in zip(load_history(storage, study, ctx), _complete_dev(storage, study))
            if t.batch < study.batch_index]
    searcher.restore(told)


def _complete_dev(storage: StudyStorage, study: StudyInfo) -> list[TrialInfo]:
    return [t for t in storage.list_trials(study.id, split="dev") if t.status == "complete"]


def run_search(searcher: Searcher, env: Environment, storage: StudyStorage, study: StudyInfo, ctx: SearchContext, *,
               budget_runs: int, test_ids: Sequence[str] | None = None,
               progress: ProgressCallback | None = None) -> SearchOutcome:
    """Run (or continue) a study until ``budget_runs`` graph-question runs are spent or
    the searcher has nothing new to propose; then recommend a graph and score it once on
    the test split."""
    resume_searcher(searcher, storage, study, ctx)
    batch_index, spent, idle = study.batch_index, study.runs_spent, 0
    stopped = "budget"
    best_so_far = float("-inf")
    while spent < budget_runs:
        cands = searcher.ask()
        if not cands:
            stopped = "exhausted"
            break
        evals: list[Evaluation] = []
        for slot, c in enumerate(cands):
            if spent >= budget_runs:
                break
            ev = evaluate_candidate(c, env=env, storage=storage, study=study, ctx=ctx, method=searcher.name,
                                    batch=batch_index, slot=slot)
            spent += ev.new_runs
            evals.append(ev)
            if ev.ok and ev.metrics.n == len(ctx.dev_ids):
                best_so_far = max(best_so_far, ev.reward)
            if progress:
                progress({"runs_spent": spent, "budget_runs": budget_runs, "trial": ev.trial_number,
                          "reward": ev.reward, "best_full_dev": best_so_far})
        searcher.tell(evals)
        batch_index += 1
        storage.save_progress(study.id, state=searcher.state_dict(), batch_index=batch_index, runs_spent=spent,
                              agent_steps=_drain_agent_steps(searcher))
        idle = idle + 1 if all(e.new_runs == 0 for e in evals) else 0
        if idle >= MAX_IDLE_BATCHES:
            stopped = "idle"
            break
    history = load_history(storage, study, ctx)
    best = searcher.recommend(history)
    if best is not None and not best.n:  # a searcher's own recommend must not pick an unmeasured graph either
        best = None
    if best is None and history:
        raise no_graph_measured(storage, study)
    best_trial = storage.get_trial(study.id, best.best_trial) if best else None
    test_trial, test_results = None, ()
    if best is not None and test_ids:
        ev = evaluate_candidate(Candidate(graph=best.graph, origin="test", parents=(best.best_trial,)), env=env,
                                storage=storage, study=study, ctx=ctx, method=searcher.name, batch=-1, slot=0,
                                split="test", question_ids=test_ids)
        test_trial = storage.get_trial(study.id, ev.trial_number)
        test_results = ev.results
    storage.set_status(study.id, "complete")
    trials = storage.list_trials(study.id)
    n_trials = sum(1 for t in trials if t.split == "dev")
    return SearchOutcome(best=best, best_trial=best_trial, test_trial=test_trial, test_results=test_results,
                         runs_spent=spent, n_trials=n_trials, stopped=stopped, excluded=excluded_by_model(trials))


def _drain_agent_steps(searcher: Searcher) -> list[dict]:
    return list(searcher.drain_agent_steps())


def is_finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
