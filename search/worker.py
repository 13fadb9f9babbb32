"""Many workers, one study: ``graphtune worker``.

Any number of worker processes, on any machines that reach the study's store, run one
search together. There is no scheduler process: every worker loops over

1. **claim** a queued trial (``Storage.claim_trial``: one conditional update, ``FOR
   UPDATE SKIP LOCKED`` on PostgreSQL), run the graph on the questions whose results are
   not stored yet, and store the outcome only if it still holds the claim. A heartbeat
   thread refreshes the claim; a claim whose heartbeat is older than ``stale_after_s`` is
   retaken by another worker (its first holder died or hung);
2. when nothing is claimable and the current batch is finished, **update**: take the
   study's update claim (``Storage.claim_update``: one worker at a time), let the batch
   engine tell the searcher its results and plan the next batch, outside any store lock
   (the agent's LLM call may take a while), then commit the new state, counters, agent
   steps and queued trials in one short transaction under the study's lock
   (``Storage.coordination``), only if the batch counter has not moved;
3. otherwise wait ``poll_s`` and look again.

The rules (budget cut, idle stop, invalid graphs, recommend-then-test) are the batch
engine's (:mod:`graphtune.search.engine`), the same as one process (``run_search``): the
searcher sees the same batches in the same order. A worker whose in-memory searcher is not
the one that asked the current batch rebuilds it from the stored state (saved after the
previous ``tell``) and asks again; searchers are deterministic given their state, which is
checked against the queued trials.

LLM calls: identical calls are paid once across workers, including calls in flight (the
call ledger's claims, ``SQLLedger.share``). Concurrency limits: the spec's global and
per-model limits hold for the study as a whole: each worker uses ``1/n`` of them, where ``n`` is the number of workers with a
fresh heartbeat, re-read before every trial (``Environment.share_limits``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from graphtune.envs.base import Environment
from graphtune.errors import SearchError
from graphtune.search.base import Candidate, SearchContext, Searcher
from graphtune.search.engine import BatchEngine
from graphtune.store.storage import Storage, StudyInfo, TrialInfo

FINISHED = ("complete", "failed")


@dataclass(frozen=True)
class WorkerOptions:
    heartbeat_s: float = 5.0  # how often a worker refreshes its claim
    stale_after_s: float = 60.0  # a claim older than this is retaken by another worker
    poll_s: float = 0.5  # wait between looks when there is nothing to do
    max_trials: int | None = None  # stop after evaluating this many trials (None: until the study ends)
    take_over: bool = False  # mark every other worker of the study dead on joining (their claims are retaken)


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
        self.engine = BatchEngine(env=env, storage=storage, study=study, ctx=ctx, test_ids=self.test_ids)

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> WorkerReport:
        sid = self.study.id
        self.storage.register_worker(sid, self.name, socket.gethostname(), os.getpid(),
                                     take_over=self.options.take_over)
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
    @contextlib.contextmanager
    def _beating(self, what: str):
        """Refresh this worker's heartbeat (and its claim's) from a thread while the block runs."""
        stop = threading.Event()

        def beat():
            while not stop.wait(self.options.heartbeat_s):
                try:
                    self._beat()
                except Exception:  # a missed beat only risks a retake, never a wrong result
                    pass

        hb = threading.Thread(target=beat, name=f"heartbeat-{what}", daemon=True)
        hb.start()
        try:
            yield
        finally:
            stop.set()
            hb.join()

    def _evaluate(self, t: TrialInfo) -> None:
        self._holding = t.id
        try:
            with self._beating(f"trial-{t.number}"):
                self.env.share_limits(max(1, self.storage.live_workers(self.study.id, self.options.stale_after_s)))
                rec = self.engine.execute(t)
                ok = self.storage.finish_claim(t.id, self.name, rec)
            missing, reward = rec.new_runs, rec.reward if rec.reward is not None else float("nan")
        except BaseException:
            self.storage.release_claim(t.id, self.name)  # someone else runs it (the ledger keeps paid calls)
            raise
        finally:
            self._holding = None
        if ok:
            self.trials += 1
            self.runs += missing
        else:
            self.lost += 1
        if self.progress:
            self.progress({"worker": self.name, "trial": t.number, "batch": t.batch, "slot": t.slot,
                           "split": t.split, "reward": reward, "new_runs": missing, "stored": ok,
                           "n_questions": len(t.question_ids)})

    # -- the batch update --------------------------------------------------------------
    def _coordinate(self) -> bool:
        """Advance the study if its current batch is finished (or not yet queued); True when
        something changed. The searcher's update (``BatchEngine.advance``: tell, ask, which
        may call a paid LLM agent) runs outside any store lock, by the one worker holding the
        study's update claim; its result commits in one short transaction, only if the batch
        counter has not moved."""
        sid = self.study.id
        if self.storage.unfinished_trials(sid):  # the batch (or the test) is still running
            return False
        st = self.storage.get_study(self.study.name)
        if st is None or st.status == "complete":
            return False
        if st.status == "finishing":
            with self.storage.coordination(sid) as co:
                if co is None or co.study.status != "finishing":
                    return False
                if all(t.status in FINISHED for t in co.trials("test", -1)):
                    co.set_status("complete")
                    return True
                return False
        if not self.storage.claim_update(sid, self.name, stale_after_s=self.options.stale_after_s):
            return False  # another worker is updating the searcher
        # read again now that the claim is ours: an update committed just before is seen
        st = self.storage.get_study(self.study.name)
        k = st.batch_index if st is not None else -1
        rows = {t.slot: t for t in self.storage.list_trials(sid, split="dev") if t.batch == k}
        if st is None or st.status != "running" or self.storage.unfinished_trials(sid) \
                or any(t.status not in FINISHED for t in rows.values()):
            self.storage.release_update(sid, self.name)
            return False
        try:
            with self._beating(f"update-{k}"):
                searcher, asked = self._searcher_at(st)
                up = self.engine.advance(searcher, batch_index=k, runs_spent=st.runs_spent, asked=asked, rows=rows)
            with self.storage.coordination(sid, wait=True) as co:
                if co is None or co.study.batch_index != k or co.study.status != "running" \
                        or {t.slot for t in co.trials("dev", k)} != set(rows):
                    self._forget()  # another worker advanced the study (this one's claim had lapsed)
                    if co is not None:
                        co.release_update(self.name)
                    return True
                co.advance(expect_batch_index=k, state=up.state, batch_index=up.batch_index, runs_spent=up.runs_spent,
                           agent_steps=up.agent_steps, enqueue=[p.fields() for p in up.plans],
                           status=None if up.status == "running" else up.status)
                co.release_update(self.name)
        except BaseException:
            self._forget()  # its searcher may be half-way through an update
            try:
                self.storage.release_update(sid, self.name)
            except Exception:  # noqa: BLE001 - the failure being raised is the one to report
                pass
            raise
        if up.told:
            self.updates += 1
        if up.status == "running":
            self._asked, self._asked_batch = list(up.asked or ()), up.batch_index
        else:
            self._forget()
        return True

    def _forget(self) -> None:
        self._asked_batch = None

    def _searcher_at(self, st: StudyInfo) -> tuple[Searcher, list[Candidate] | None]:
        """A searcher at the state saved before batch ``st.batch_index`` with the batch's
        candidates when this worker asked them (None: not asked; it is rebuilt from the
        stored state unless this worker made the last update)."""
        if self._searcher is not None and self._asked_batch == st.batch_index:
            return self._searcher, self._asked
        if self._searcher is not None:
            self._searcher.close()
        self._searcher, self._asked_batch = None, None
        s = self.make_searcher()
        self.engine.resume(s, st)
        self._searcher = s
        return s, None
