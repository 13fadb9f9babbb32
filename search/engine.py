"""The batch engine: one set of rules for every way a study runs.

A study advances batch by batch. For batch ``k`` the engine

1. **plans** the batch the searcher asked for (:meth:`BatchEngine.plan`): its trials in slot
   order while the runs predicted to be paid (from the results already stored) stay under
   the budget; a graph repeated inside the batch waits for its earlier slot, so shared
   questions are paid once;
2. the planned trials are **executed** (:meth:`BatchEngine.execute`: check the graph against
   the space and budget, run it on the questions without a stored result, score) by the
   process itself (:func:`graphtune.search.loop.run_search`, ``graphtune optimize``) or by
   whichever worker claims them (:class:`graphtune.search.worker.Worker`);
3. once every planned trial is finished, :meth:`BatchEngine.advance` **tells** the searcher,
   snapshots its state and asks for the next batch, or **finishes**: stops for the budget,
   for ``MAX_IDLE_BATCHES`` batches that paid nothing, or because the searcher has nothing
   left; recommends a graph (never one measured on zero questions) and plans its one
   evaluation on the held-out test split.

The drivers differ only in where a planned trial waits (a list in the process, a queue in
the store) and who runs it; the budget cut, the idle stop, invalid graphs, the searcher's
updates and the recommendation are decided here, once. :meth:`advance` never touches a
lock: a driver commits the :class:`Update` it returns (``save_progress`` in process; one
transaction under the study's lock for workers), so a slow searcher update (an LLM agent's
call) holds no store lock.

Given the same stored state the engine plans the same batch: searchers are deterministic
given their state, and a searcher rebuilt from the store (``load_state_dict`` then
``restore``) asks again exactly what the one that was stopped asked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from graphtune.envs.base import Environment
from graphtune.errors import GraphError, SearchError
from graphtune.graphs.cost import GraphCost
from graphtune.graphs.design import design_from_dict as from_dict
from graphtune.graphs.design import design_hash as graph_hash
from graphtune.graphs.design import design_to_dict as to_dict
from graphtune.graphs.design import validate_design as validate
from graphtune.graphs.results import QuestionResult, summarize
from graphtune.search.base import Candidate, Evaluation, GraphStats, SearchContext, Searcher
from graphtune.store.base import StudyInfo, StudyStorage, TrialInfo, TrialRecord

#: stop when a searcher keeps proposing only graphs it already paid for
MAX_IDLE_BATCHES = 25


@dataclass(frozen=True)
class TrialPlan:
    """One trial the engine decided to run: its place and what to run. ``after_slot``: the
    earlier slot of the same batch with the same graph, which it waits for."""

    split: str
    batch: int
    slot: int
    graph: dict
    graph_hash: str
    method: str
    origin: str
    parents: tuple[int, ...]
    info: Mapping[str, Any]
    question_ids: tuple[str, ...]
    after_slot: int | None = None

    def fields(self) -> dict[str, Any]:
        """The plan as the fields of a queued trial (``Coordination.advance``'s ``enqueue``)."""
        return dict(split=self.split, batch=self.batch, slot=self.slot, graph=self.graph, graph_hash=self.graph_hash,
                    method=self.method, origin=self.origin, parents=list(self.parents), info=dict(self.info),
                    question_ids=list(self.question_ids), after_slot=self.after_slot)


@dataclass(frozen=True)
class Update:
    """What :meth:`BatchEngine.advance` decided, for the driver to commit in one step.

    ``state``: the searcher state to save (taken after ``tell``, before the next ``ask``;
    None: unchanged); ``plans``: the trials to run next (the batch's, or the test trial
    once finishing); ``status``: ``running``, ``finishing`` (the test trial is planned) or
    ``complete``; ``asked``: the candidates of batch ``batch_index`` while running."""

    batch_index: int
    runs_spent: int
    state: dict | None
    agent_steps: list[dict]
    plans: tuple[TrialPlan, ...]
    status: str = "running"
    stopped: str | None = None
    best: GraphStats | None = None
    asked: tuple[Candidate, ...] | None = None
    told: int = 0  # evaluations told to the searcher by this update


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


class BatchEngine:
    """The rules of one study's search (see the module docstring)."""

    def __init__(self, *, env: Environment, storage: StudyStorage, study: StudyInfo, ctx: SearchContext,
                 test_ids: Sequence[str] | None = None, budget_runs: int | None = None):
        self.env, self.storage, self.study, self.ctx = env, storage, study, ctx
        self.test_ids = tuple(test_ids or ())
        self.budget = ctx.budget_runs if budget_runs is None else budget_runs
        self._results: dict[int, list[QuestionResult]] = {}  # trial id -> results, for trials run here

    # -- the searcher --------------------------------------------------------------------
    def resume(self, searcher: Searcher, study: StudyInfo | None = None) -> None:
        """Bring a fresh searcher to the study's saved state: ``load_state_dict``, then
        ``restore`` with the dev evaluations of the batches it was told (nothing for a new
        study)."""
        st = study or self.study
        if st.searcher_state is None:
            return
        searcher.load_state_dict(st.searcher_state)
        searcher.restore([e for e, t in self._history() if t.batch < st.batch_index])

    # -- planning ----------------------------------------------------------------------
    def plan(self, cands: Sequence[Candidate], *, batch: int, spent: int, method: str) -> list[TrialPlan]:
        """The trials of batch ``batch``: in slot order, while the runs spent (counting the
        new runs each slot is predicted to pay, from the results stored by earlier batches
        and earlier slots of this one) stay under the budget. A slot whose graph appeared
        earlier in the batch waits for that slot. The prediction is exact unless an earlier
        trial of the same graph in the batch hits infrastructure failures (those questions
        are paid again)."""
        covered: dict[str, set[str]] = {}
        last: dict[str, int] = {}
        out = []
        for slot, c in enumerate(cands):
            if spent >= self.budget:
                break
            g = c.graph
            h = graph_hash(g)
            qids = tuple(c.question_ids or self.ctx.dev_ids)
            if h not in covered:
                covered[h] = self.storage.known_question_ids(self.study.id, h, "dev", before_batch=batch)
            try:
                validate(g, self.ctx.space, self.ctx.costs, self.ctx.budget)
                ok = True
            except GraphError:
                ok = False
            if ok:
                spent += sum(1 for q in qids if q not in covered[h])
            out.append(TrialPlan(split="dev", batch=batch, slot=slot, graph=to_dict(g), graph_hash=h, method=method,
                                 origin=c.origin, parents=tuple(c.parents), info=dict(c.info), question_ids=qids,
                                 after_slot=last.get(h) if ok else None))
            if ok:
                covered[h] |= set(qids)
                last[h] = slot
        return out

    # -- executing -----------------------------------------------------------------------
    def execute(self, plan: TrialPlan | TrialInfo) -> TrialRecord:
        """Run one planned (or claimed) trial: an invalid graph is a failed trial, never
        evaluated; otherwise the stored results are reused and only the missing questions
        are run (paid). Returns the trial as it is to be written."""
        # when the work began, so a trial's start and finish span its evaluation (the
        # dashboard's timeline draws that span; the store's default is the write time)
        started_at = getattr(plan, "started_at", None) or datetime.now(timezone.utc)
        g = from_dict(plan.graph)
        place = dict(started_at=started_at, split=plan.split, batch=plan.batch, slot=plan.slot, graph=dict(plan.graph),
                     graph_hash=plan.graph_hash, method=plan.method, origin=plan.origin, parents=tuple(plan.parents),
                     info=dict(plan.info), question_ids=tuple(plan.question_ids))
        try:
            cost = validate(g, self.ctx.space, self.ctx.costs, self.ctx.budget)
        except GraphError as e:
            return TrialRecord(status="failed", results=[], reused=frozenset(), metrics={}, reward=None, cost=None,
                               new_runs=0, error=str(e), **place)
        known = self.storage.known_results(self.study.id, plan.graph_hash, plan.split)
        qids = tuple(plan.question_ids)
        missing = [q for q in qids if q not in known]
        fresh = {r.question_id: r for r in self.env.evaluate(g, missing)} if missing else {}
        results = [known[q] if q in known else fresh[q] for q in qids]
        reward = _mean([self.ctx.objective.question_reward(r, self.ctx.costs.unit_flops) for r in results if r.ok])
        return TrialRecord(status="complete", results=results, reused=frozenset(set(known) & set(qids)),
                           metrics=trial_metrics(results), reward=reward, cost=cost.as_dict(), new_runs=len(missing),
                           **place)

    def run_here(self, plan: TrialPlan) -> TrialInfo:
        """Execute ``plan`` in this process and store it; a trial already stored at its
        place (a resumed search re-asking a batch it had run) is read, not paid again."""
        done = self.storage.find_trial(self.study.id, plan.split, plan.batch, plan.slot, plan.graph_hash)
        if done is not None:
            return done
        rec = self.execute(plan)
        t = self.storage.record_trial(self.study.id, rec)
        self._results[t.id] = list(rec.results)
        return t

    def results(self, t: TrialInfo) -> list[QuestionResult]:
        if t.id not in self._results:
            self._results[t.id] = self.storage.trial_results(t.id)
        return self._results[t.id]

    def evaluation(self, t: TrialInfo, cand: Candidate) -> Evaluation:
        """A stored trial as the searcher sees it."""
        results = tuple(self.results(t))
        cost = GraphCost(t.flops or 0.0, t.cost_units or 0.0, t.usd or 0.0, t.latency_s or 0.0, 0.0, 0.0)
        return Evaluation(candidate=cand, trial_number=t.number, graph_hash=t.graph_hash, results=results,
                          metrics=summarize(results), reward=t.reward if t.reward is not None else float("nan"),
                          cost=cost, new_runs=t.new_runs, error=t.error)

    # -- advancing -----------------------------------------------------------------------
    def advance(self, searcher: Searcher, *, batch_index: int, runs_spent: int,
                asked: Sequence[Candidate] | None, rows: Mapping[int, TrialInfo]) -> Update:
        """Decide the study's next step at batch ``batch_index``.

        ``searcher`` is at the state saved before that batch; ``asked``: the candidates it
        already asked for the batch (None: it has not asked yet); ``rows``: the batch's
        trials stored or queued so far, by slot, all finished. Plans the slots not stored
        yet; once all are, tells the searcher and plans the next batch, or finishes."""
        k, spent = batch_index, runs_spent
        if asked is None:
            asked = searcher.ask() if spent < self.budget else []
            if not asked:
                return self._finish(searcher, k, spent, "budget" if spent >= self.budget else "exhausted")
        cands = list(asked)
        plan = self.plan(cands, batch=k, spent=spent, method=searcher.name)
        for slot, t in rows.items():
            if slot >= len(cands) or graph_hash(cands[slot].graph) != t.graph_hash:
                mine = graph_hash(cands[slot].graph)[:8] if slot < len(cands) else "none"
                raise SearchError(f"searcher {searcher.name!r} proposed a different batch {k} when rebuilt from its "
                                  f"stored state (slot {slot}: {mine} instead of {t.graph_hash[:8]}); it is not "
                                  "deterministic given its state, so the study cannot be continued by another "
                                  "process: use one process (graphtune optimize) from the start")
        todo = tuple(p for p in plan if p.slot not in rows)
        if todo:
            return Update(batch_index=k, runs_spent=spent, state=None, agent_steps=searcher.drain_agent_steps(),
                          plans=todo, asked=tuple(cands))
        if not plan:  # nothing affordable
            return self._finish(searcher, k, spent, "budget")
        evals = [self.evaluation(rows[p.slot], cands[p.slot]) for p in plan]
        searcher.tell(evals)
        spent += sum(e.new_runs for e in evals)
        # a snapshot now: state_dict() may share structures that ask() changes
        state = json.loads(json.dumps(searcher.state_dict()))
        idle = self.idle_batches(k) + 1 if all(e.new_runs == 0 for e in evals) else 0
        if spent >= self.budget or idle >= MAX_IDLE_BATCHES:
            return self._finish(searcher, k + 1, spent, "budget" if spent >= self.budget else "idle", state=state,
                                told=len(evals))
        nxt = searcher.ask()
        if not nxt:
            return self._finish(searcher, k + 1, spent, "exhausted", state=state, told=len(evals))
        plan = self.plan(nxt, batch=k + 1, spent=spent, method=searcher.name)
        return Update(batch_index=k + 1, runs_spent=spent, state=state, agent_steps=searcher.drain_agent_steps(),
                      plans=tuple(plan), asked=tuple(nxt), told=len(evals))

    def _finish(self, searcher: Searcher, batch_index: int, spent: int, why: str, state: dict | None = None,
                told: int = 0) -> Update:
        """The search is over: recommend a graph and plan its one test-split evaluation."""
        best = self.recommend(searcher)
        plans: tuple[TrialPlan, ...] = ()
        if best is not None and self.test_ids and self.storage.find_trial(
                self.study.id, "test", -1, 0, graph_hash(best.graph)) is None:  # tested once, ever
            g = best.graph
            plans = (TrialPlan(split="test", batch=-1, slot=0, graph=to_dict(g), graph_hash=graph_hash(g),
                               method=searcher.name, origin="test", parents=(best.best_trial,),
                               info={"stopped": why}, question_ids=self.test_ids),)
        return Update(batch_index=batch_index, runs_spent=spent, state=state, agent_steps=searcher.drain_agent_steps(),
                      plans=plans, status="finishing" if plans else "complete", stopped=why, best=best, told=told)

    def recommend(self, searcher: Searcher) -> GraphStats | None:
        """The searcher's pick among the study's dev evaluations; never a graph measured on
        zero questions (``SearchError`` when trials exist but none was scored)."""
        history = [e for e, _ in self._history()]
        best = searcher.recommend(history)
        if best is not None and not best.n:
            best = None
        if best is None and history:
            raise no_graph_measured(self.storage, self.study)
        return best

    def stop_reason(self, study: StudyInfo) -> str:
        """Why a finished study stopped, from the store: the reason its test trial records,
        else the budget, the idle limit or the searcher having nothing left."""
        for t in reversed(self.storage.list_trials(study.id, split="test")):
            if (t.info or {}).get("stopped"):
                return str(t.info["stopped"])
        if study.runs_spent >= self.budget:
            return "budget"
        return "idle" if self.idle_batches(study.batch_index) >= MAX_IDLE_BATCHES else "exhausted"

    def idle_batches(self, before: int) -> int:
        """Dev batches up to ``before`` (exclusive), counted back from it, that paid no new run."""
        paid: dict[int, int] = {}
        for t in self.storage.list_trials(self.study.id, split="dev"):
            if t.batch >= 0:
                paid[t.batch] = paid.get(t.batch, 0) + (t.new_runs or 0)
        n = 0
        for b in range(before - 1, -1, -1):
            if paid.get(b, 0):
                break
            n += 1
        return n

    def _history(self) -> list[tuple[Evaluation, TrialInfo]]:
        out = []
        for t in self.storage.list_trials(self.study.id, split="dev"):
            if t.status != "complete":
                continue
            cand = Candidate(graph=from_dict(t.graph), question_ids=tuple(t.question_ids), parents=tuple(t.parents),
                             origin=t.origin, info=t.info)
            out.append((self.evaluation(t, cand), t))
        return out

    def outcome(self, best: GraphStats | None, stopped: str, runs_spent: int) -> SearchOutcome:
        """The finished study's outcome, read from the store."""
        trials = self.storage.list_trials(self.study.id)
        test = next((t for t in trials if t.split == "test" and t.status == "complete" and self.test_ids
                     and best is not None and t.graph_hash == graph_hash(best.graph)), None)
        return SearchOutcome(best=best, best_trial=self.storage.get_trial(self.study.id, best.best_trial) if best else None,
                             test_trial=test, test_results=tuple(self.results(test)) if test else (),
                             runs_spent=runs_spent, n_trials=sum(1 for t in trials if t.split == "dev"),
                             stopped=stopped, excluded=excluded_by_model(trials))


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


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
