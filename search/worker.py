"""Many workers, one study: ``graphtune worker``.

Any number of worker processes, on any machines that reach the study's store, run one
search together. There is no scheduler process: every worker loops over

1. **claim** a queued trial (``Storage.claim_trial``: one conditional update, ``FOR
   UPDATE SKIP LOCKED`` on PostgreSQL), run the graph on the questions whose results are
   not stored yet, and store the outcome only if it still holds the claim. A heartbeat
   thread refreshes the claim; a claim whose heartbeat is older than ``stale_after_s`` is
   retaken by another worker (its first holder died or hung);
2. when nothing is claimable, **coordinate**: take the study's batch-update lock
   (``Storage.coordination``); if the current batch is fully evaluated, tell the searcher
   its results, save the new state and queue the next batch, all in one transaction. The
   lock and the batch counter make that update happen exactly once per batch;
3. otherwise wait ``poll_s`` and look again.

Same search as one process (``run_search``): the searcher sees the same batches in the
same order. A worker whose in-memory searcher is not the one that asked the current batch
rebuilds it from the stored state (saved after the previous ``tell``) and asks again;
searchers are deterministic given their state, which is checked against the queued
trials. Budget: a batch is cut where ``run_search`` would cut it, predicted from the runs
already stored (the prediction is exact unless an earlier trial of the same graph in the
batch hits infrastructure failures, which ``run_search`` would pay for again). Trials of
one graph inside a batch run one after the other (``waiting``), so shared questions are
paid once.

LLM calls: identical calls are paid once across workers, including calls in flight (the
call ledger's claims, ``SQLLedger.share``). Concurrency limits: the spec's global and
per-model limits hold for the study as a whole: each worker uses ``1/n`` of them, where ``n`` is the number of workers with a
fresh heartbeat, re-read before every trial (``Environment.share_limits``).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from graphtune.envs.base import Environment
from graphtune.errors import GraphError, SearchError
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.io import from_dict, to_dict
from graphtune.graphs.space import validate
from graphtune.search.base import Candidate, SearchContext, Searcher
from graphtune.search.loop import (MAX_IDLE_BATCHES, _evaluation_from_trial, _mean, load_history, no_graph_measured,
                                   resume_searcher,
                                   run_missing, trial_metrics)
from graphtune.store.base import StudyStorage
from graphtune.store.storage import Coordination, Storage, StudyInfo, TrialInfo

FINISHED = ("complete", "failed")


@dataclass(frozen=True)
class WorkerOptions:
    heartbeat_s: float = 5.0  # how often a worker refreshes its claim
    stale_after_s: float = 60.0  # a claim older than this is retaken by another worker
    poll_s: float = 0.5  # wait between looks when there is nothing to do
    max_trials: int | None = None  # stop after evaluating this many trials (None: until the study ends)


@dataclass(frozen=True)
class WorkerReport:
    name: str
    trials: int  # trials this worker evaluated and stored
    lost_claims: int  # trials it evaluated but another worker had retaken (not stored by it)
    batch_updates: int  # searcher updates it made
    runs_paid: int  # graph-question runs it paid for
    study_status: str
    stopped: str  # "complete" | "max-trials"


class Worker:
    """One worker process's loop on one study (see the module docstring)."""

    def __init__(self, *, env: Environment, ctx: SearchContext, test_ids: Sequence[str],
                 make_searcher: Callable[[], Searcher], storage: Storage, study: StudyInfo,
                 options: WorkerOptions = WorkerOptions(), name: str | None = None,
                 progress: Callable[[dict], None] | None = None):
        self.env, self.ctx, self.test_ids = env, ctx, tuple(test_ids)
        self.make_searcher, self.storage, self.study = make_searcher, storage, study
        self.options = options
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.progress = progress
        self._searcher: Searcher | None = None
        self._asked_batch: int | None = None  # the batch the in-memory searcher has asked
        self._asked: list[Candidate] = []
        self.trials = self.lost = self.updates = self.runs = 0
        self._holding: int | None = None

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> WorkerReport:
        sid = self.study.id
        self.storage.register_worker(sid, self.name, socket.gethostname(), os.getpid())
        self.env.share_calls(self.name, stale_after_s=self.options.stale_after_s)
        stopped, last_beat = "complete", 0.0
        try:
            while True:
                if self.options.max_trials is not None and self.trials >= self.options.max_trials:
                    stopped = "max-trials"
                    break
                t = self.storage.claim_trial(sid, self.name, stale_after_s=self.options.stale_after_s)
                if t is not None:
                    self._evaluate(t)
                    continue
                if self._coordinate():
                    continue
                st = self.storage.get_study(self.study.name)
                if st is None:
                    raise SearchError(f"study {self.study.name!r} was deleted while worker {self.name} ran")
                if st.status == "complete":
                    break
                if time.monotonic() - last_beat > self.options.heartbeat_s:
                    self._beat()
                    last_beat = time.monotonic()
                time.sleep(self.options.poll_s)
        finally:
            try:
                self._beat(status="stopped")
            finally:
                if self._searcher is not None:
                    self._searcher.close()
        st = self.storage.get_study(self.study.name)
        return WorkerReport(self.name, self.trials, self.lost, self.updates, self.runs,
                            st.status if st else "deleted", stopped)

    def _beat(self, status: str = "running") -> None:
        self.storage.worker_heartbeat(self.study.id, self.name, trial_id=self._holding, trials_done=self.trials,
                                      batches_updated=self.updates, status=status)

    # -- evaluating a claimed trial ----------------------------------------------------
    def _evaluate(self, t: TrialInfo) -> None:
        ctx = self.ctx
        self._holding = t.id
        stop = threading.Event()

        def beat():
            while not stop.wait(self.options.heartbeat_s):
                try:
                    self._beat()
                except Exception:  # a missed beat only risks a retake, never a wrong result
                    pass

        hb = threading.Thread(target=beat, name=f"heartbeat-{t.number}", daemon=True)
        hb.start()
        try:
            self.env.share_limits(max(1, self.storage.live_workers(self.study.id, self.options.stale_after_s)))
            g = from_dict(t.graph)
            try:
                cost = validate(g, ctx.space, ctx.costs, ctx.budget)
            except GraphError as e:
                ok = self.storage.finish_claim(t.id, self.name, status="failed", results=[], reused=set(),
                                               metrics={}, reward=None, cost=None, new_runs=0, error=str(e))
                missing: list[str] = []
                reward = float("nan")
            else:
                results, reused, missing = run_missing(g, t.graph_hash, t.question_ids, env=self.env,
                                                       storage=self.storage, study_id=self.study.id, split=t.split)
                reward = _mean([ctx.objective.question_reward(r, ctx.costs.unit_flops) for r in results if r.ok])
                ok = self.storage.finish_claim(t.id, self.name, status="complete", results=results, reused=reused,
                                               metrics=trial_metrics(results), reward=reward,
                                               cost=cost.as_dict(), new_runs=len(missing))
        except BaseException:
            self.storage.release_claim(t.id, self.name)  # someone else runs it (the ledger keeps paid calls)
            raise
        finally:
            stop.set()
            hb.join()
            self._holding = None
        if ok:
            self.trials += 1
            self.runs += len(missing)
        else:
            self.lost += 1
        if self.progress:
            self.progress({"worker": self.name, "trial": t.number, "batch": t.batch, "slot": t.slot,
                           "split": t.split, "reward": reward, "new_runs": len(missing), "stored": ok})

    # -- the batch update --------------------------------------------------------------
    def _coordinate(self) -> bool:
        """Advance the study if its current batch is done (or not yet queued); True when
        something changed."""
        if self.storage.unfinished_trials(self.study.id):  # the batch (or the test) is still running
            return False
        with self.storage.coordination(self.study.id) as co:
            if co is None:
                return False
            st = co.study
            if st.status == "complete":
                return False
            if st.status == "finishing":
                test = co.trials("test", -1)
                if all(t.status in FINISHED for t in test):
                    co.set_status("complete")
                    return True
                return False
            return self._advance(co, st)

    def _searcher_at(self, st: StudyInfo) -> tuple[Searcher, list[Candidate]]:
        """A searcher that has asked batch ``st.batch_index`` (rebuilt from the stored state
        unless this worker asked it), with that batch's candidates."""
        k = st.batch_index
        if self._searcher is not None and self._asked_batch == k:
            return self._searcher, self._asked
        if self._searcher is not None:
            self._searcher.close()
        self._searcher, self._asked_batch = None, None
        s = self.make_searcher()
        resume_searcher(s, self.storage, st, self.ctx)
        self._searcher, self._asked, self._asked_batch = s, s.ask(), k
        return s, self._asked

    def _advance(self, co: Coordination, st: StudyInfo) -> bool:
        k, budget = st.batch_index, self.ctx.budget_runs
        rows = {t.slot: t for t in co.trials("dev", k)}
        if any(t.status not in FINISHED for t in rows.values()):
            return False
        if not rows and st.runs_spent >= budget:  # budget spent (a finished study given no more)
            s = self.make_searcher()
            try:
                resume_searcher(s, self.storage, st, self.ctx)
                return self._finish(co, st, s, k, st.runs_spent, "budget")
            finally:
                s.close()
        searcher, cands = self._searcher_at(st)
        plan = plan_batch(cands, ctx=self.ctx, storage=self.storage, study_id=st.id, batch=k, spent=st.runs_spent,
                          budget=budget, method=searcher.name) if cands else []
        for slot, t in rows.items():
            if slot >= len(cands) or graph_hash(cands[slot].graph) != t.graph_hash:
                raise SearchError(f"searcher {searcher.name!r} proposed a different batch {k} when rebuilt from its "
                                  f"stored state (slot {slot}: {graph_hash(cands[slot].graph)[:8] if slot < len(cands) else 'none'}"
                                  f" instead of {t.graph_hash[:8]}); it is not deterministic given its state, so "
                                  "several workers cannot run it: use one process (graphtune optimize)")
        todo = [p for p in plan if p["slot"] not in rows]
        if todo:  # the batch is not (fully) queued yet: queue it
            co.advance(expect_batch_index=k, state=None, batch_index=k, runs_spent=st.runs_spent,
                       agent_steps=searcher.drain_agent_steps(), enqueue=todo)
            return True
        if not plan:  # nothing asked (exhausted) or nothing affordable
            return self._finish(co, st, searcher, k, st.runs_spent, "exhausted" if not cands else "budget")
        evals = [_evaluation_from_trial(rows[p["slot"]], self.storage.trial_results(rows[p["slot"]].id),
                                        cands[p["slot"]], self.ctx) for p in plan]
        searcher.tell(evals)
        self.updates += 1
        spent = st.runs_spent + sum(e.new_runs for e in evals)
        # a snapshot now: state_dict() may share structures that ask() changes
        state = json.loads(json.dumps(searcher.state_dict()))
        idle = (self.storage.idle_batches(st.id, k) + 1) if all(e.new_runs == 0 for e in evals) else 0
        self._asked_batch = None
        if spent >= budget or idle >= MAX_IDLE_BATCHES:
            return self._finish(co, st, searcher, k + 1, spent, "budget" if spent >= budget else "idle", state=state)
        nxt = searcher.ask()
        if not nxt:
            return self._finish(co, st, searcher, k + 1, spent, "exhausted", state=state)
        self._asked, self._asked_batch = nxt, k + 1
        plan = plan_batch(nxt, ctx=self.ctx, storage=self.storage, study_id=st.id, batch=k + 1, spent=spent,
                          budget=budget, method=searcher.name)
        co.advance(expect_batch_index=k, state=state, batch_index=k + 1, runs_spent=spent,
                   agent_steps=searcher.drain_agent_steps(), enqueue=plan)
        return True

    def _finish(self, co: Coordination, st: StudyInfo, searcher: Searcher, batch_index: int, spent: int,
                why: str, state=None) -> bool:
        """The search is over: recommend a graph and queue its one test-split evaluation."""
        history = load_history(self.storage, st, self.ctx)
        best = searcher.recommend(history)
        if best is not None and not best.n:  # never a graph measured on zero questions
            best = None
        if best is None and history:
            raise no_graph_measured(self.storage, st)
        enqueue = []
        if best is not None and self.test_ids:
            g = best.graph
            enqueue.append(dict(split="test", batch=-1, slot=0, graph=to_dict(g), graph_hash=graph_hash(g),
                                method=searcher.name, origin="test", parents=[best.best_trial], info={"stopped": why},
                                question_ids=list(self.test_ids)))
        co.advance(expect_batch_index=st.batch_index, state=state, batch_index=batch_index, runs_spent=spent,
                   agent_steps=searcher.drain_agent_steps(), enqueue=enqueue,
                   status="finishing" if enqueue else "complete")
        self._asked_batch = None
        return True


def plan_batch(cands: Sequence[Candidate], *, ctx: SearchContext, storage: StudyStorage, study_id: int, batch: int,
               spent: int, budget: int, method: str) -> list[dict]:
    """The trials of batch ``batch`` that ``run_search`` would evaluate: in slot order,
    while the runs spent (counting the new runs each slot is predicted to pay, from the
    results stored by earlier batches and earlier slots of this one) stay under the budget.
    A slot whose graph appeared earlier in the batch waits for that slot (``after_slot``)."""
    covered: dict[str, set[str]] = {}
    last: dict[str, int] = {}
    out = []
    for slot, c in enumerate(cands):
        if spent >= budget:
            break
        g = c.graph
        h = graph_hash(g)
        qids = tuple(c.question_ids or ctx.dev_ids)
        if h not in covered:
            covered[h] = storage.known_question_ids(study_id, h, "dev", before_batch=batch)
        try:
            validate(g, ctx.space, ctx.costs, ctx.budget)
            ok = True
        except GraphError:
            ok = False
        if ok:
            spent += sum(1 for q in qids if q not in covered[h])
        out.append(dict(split="dev", batch=batch, slot=slot, graph=to_dict(g), graph_hash=h, method=method,
                        origin=c.origin, parents=list(c.parents), info=dict(c.info), question_ids=list(qids),
                        after_slot=last.get(h) if ok else None))
        if ok:
            covered[h] |= set(qids)
            last[h] = slot
    return out
