"""The search in one process (``graphtune optimize`` on a store of its own): the batch
engine (:mod:`graphtune.search.engine`) with this process as its only worker.

Budget is counted in graph-question runs actually paid for: a graph already evaluated on
a question in this study is served from the store and costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from graphtune.envs.base import Environment
from graphtune.graphs.design import design_hash as graph_hash
from graphtune.graphs.design import design_to_dict as to_dict
from graphtune.search.base import Candidate, Evaluation, ProgressCallback, SearchContext, Searcher
from graphtune.search.engine import (MAX_IDLE_BATCHES, BatchEngine, SearchOutcome, TrialPlan, Update,
                                     excluded_by_model, no_graph_measured, trial_metrics)
from graphtune.store.base import StudyInfo, StudyStorage

__all__ = ["MAX_IDLE_BATCHES", "SearchOutcome", "evaluate_candidate", "excluded_by_model", "no_graph_measured",
           "run_search", "trial_metrics", "commit_here"]


def run_search(searcher: Searcher, env: Environment, storage: StudyStorage, study: StudyInfo, ctx: SearchContext, *,
               budget_runs: int, test_ids: Sequence[str] | None = None,
               progress: ProgressCallback | None = None) -> SearchOutcome:
    """Run (or continue) a study until ``budget_runs`` graph-question runs are spent or
    the searcher has nothing new to propose; then recommend a graph and score it once on
    the test split. Each planned trial runs here, in slot order; the searcher's state is
    saved after every batch, so a killed search resumes exactly."""
    engine = BatchEngine(env=env, storage=storage, study=study, ctx=ctx, test_ids=test_ids, budget_runs=budget_runs)
    engine.resume(searcher)
    best_so_far = float("-inf")
    up = engine.advance(searcher, batch_index=study.batch_index, runs_spent=study.runs_spent, asked=None, rows={})
    while True:
        commit_here(storage, study, up)
        if up.status != "running":
            break
        rows, spent = {}, up.runs_spent
        for p in up.plans:
            t = engine.run_here(p)
            rows[p.slot] = t
            spent += t.new_runs
            if t.status == "complete" and t.reward is not None and math.isfinite(t.reward) \
                    and len(t.question_ids) == len(ctx.dev_ids):
                best_so_far = max(best_so_far, t.reward)
            if progress:
                progress({"runs_spent": spent, "budget_runs": budget_runs, "trial": t.number,
                          "reward": t.reward if t.reward is not None else float("nan"), "best_full_dev": best_so_far})
        up = engine.advance(searcher, batch_index=up.batch_index, runs_spent=up.runs_spent, asked=up.asked, rows=rows)
    for p in up.plans:  # the recommended graph on the test split
        engine.run_here(p)
    storage.set_status(study.id, "complete")
    return engine.outcome(up.best, up.stopped or "budget", up.runs_spent)


def commit_here(storage: StudyStorage, study: StudyInfo, up: Update) -> None:
    """Save what ``up`` changed (state, counters, agent steps) before its trials run."""
    if up.state is None and not up.agent_steps:
        return
    storage.save_progress(study.id, state=up.state, batch_index=up.batch_index, runs_spent=up.runs_spent,
                          agent_steps=up.agent_steps)


def evaluate_candidate(cand: Candidate, *, env: Environment, storage: StudyStorage, study: StudyInfo,
                       ctx: SearchContext, method: str, batch: int, slot: int, split: str = "dev",
                       question_ids: Sequence[str] | None = None) -> Evaluation:
    """Evaluate one candidate as a stored trial at place (split, batch, slot), paying only
    for questions without a stored result (for tests and tools driving a searcher by hand)."""
    engine = BatchEngine(env=env, storage=storage, study=study, ctx=ctx)
    g = cand.graph
    plan = TrialPlan(split=split, batch=batch, slot=slot, graph=to_dict(g), graph_hash=graph_hash(g), method=method,
                     origin=cand.origin, parents=tuple(cand.parents), info=dict(cand.info),
                     question_ids=tuple(question_ids or cand.question_ids or ctx.dev_ids))
    return engine.evaluation(engine.run_here(plan), cand)
