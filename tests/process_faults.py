"""Process faults at chosen moments of a live search, then resume; compare with a clean run.

Each scenario runs ``graphtune optimize`` (agent-reinforce with an LLM agent, the live
environment on tests/fake_openai_server.py) in a fresh store, kills it with SIGKILL at one
chosen moment, resumes it (``graphtune resume``) until it finishes, and compares the study
with an uninterrupted reference run of the same spec:

* ``trial``: mid-trial, while environment calls are in flight (when the call half-way
  through the reference's has its reply);
* ``agent-call``: during the agent's update, while its LLM call is in flight (the agent's
  endpoint answers after 0.15 s);
* ``agent-reply``: during the agent's update, after its reply arrived and was applied,
  before the batch's state is saved;
* ``commit-trial`` / ``commit-progress`` / ``commit-ledger``: inside a store commit (a
  finished trial with its results; the searcher state with counters and agent steps; a
  batch of the call ledger): every statement of the transaction has run, COMMIT has not;
* ``after-commit-trial`` / ``after-commit-progress``: just after that COMMIT returned.

The moments are hit exactly: a hook installed in the forked child (tests/kill9_resume.py
``run_cli(setup=...)``) writes a marker file at the chosen moment and sleeps; the parent
kills the child as soon as the marker appears. With a PostgreSQL store
(``--backend postgresql``, on ``$GRAPHTUNE_TEST_POSTGRES_URL``'s server, one fresh
database per scenario) there is one more scenario:

* ``pg-drop``: no kill; another connection terminates every backend of the store's
  database (``pg_terminate_backend``) every 0.3 s while the search runs. The search must
  either survive (reconnect) or stop with a one-line error, then resume cleanly.

Checks for every scenario: the resumed study is the reference's (same trials in the same
places, graphs, questions, per-question results, rewards, paid runs; same agent steps,
searcher state, best graph and test score; status complete); every trial finished before
the fault is still there, unchanged (same ``finished_at``: not run again); no LLM call is
recorded twice; and nothing is paid twice beyond what was in flight: the environment
requests beyond the reference's are at most the requests the killed process made whose
replies were not yet durable in the call ledger (``lost``), and the agent requests beyond
the reference's at most one agent step's attempts (agent calls are not in the ledger).

Usage: python tests/process_faults.py [--backend sqlite|postgresql] [--scenarios a,b,...]
           [--json FILE]
Exit status 0 when every check holds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from fake_openai_server import FakeOpenAIServer  # noqa: E402
from kill9_resume import preload, run_cli  # noqa: E402
from workers_check import compare, fresh_postgres_db, snapshot  # noqa: E402

DATASET = ROOT / "examples" / "data" / "easy-arith.jsonl"
CONCURRENCY = 4
AGENT_RETRIES = 1  # attempts per agent step: 1 + AGENT_RETRIES
AGENT_LATENCY_S = 0.15
SCENARIOS = ("trial", "agent-call", "agent-reply", "commit-trial", "commit-progress", "commit-ledger",
             "after-commit-trial", "after-commit-progress")
PG_SCENARIOS = ("pg-drop",)
#: on PostgreSQL by default: the scenarios whose outcome depends on the store (agent moments
#: are the same code on both backends); all of them with --scenarios
PG_DEFAULT = ("trial", "commit-trial", "commit-progress", "commit-ledger", "after-commit-trial") + PG_SCENARIOS

SPEC = """\
study: {study}
task:
  dataset: {dataset}
  scorer: numeric
  dev_size: 6
  test_size: 6
models:
  - name: llama-3.2-1b
    litellm: openai/echo
    api_base: {api_base}
  - name: llama-3.2-3b
    litellm: openai/echo-3b
    api_base: {api_base}
space:
  max_nodes: 4
  max_depth: 3
budget:
  units: 12
objective:
  cost_weight: 0.01
search:
  method: agent-reinforce
  evaluations: {evaluations}
  batch_size: 4
  seed: {seed}
  agent:
    model: openai/agent
    api_base: {agent_base}
    max_retries: {agent_retries}
    max_tokens: 64
env:
  kind: live
  concurrency: {concurrency}
  max_tokens: 32
storage: {storage}
"""

STUDY = "faults"
_LITELLM_LOG = re.compile(r"^\d\d:\d\d:\d\d - LiteLLM")
_UNAWAITED = re.compile(r"RuntimeWarning: (coroutine '[\w.]+' was never awaited|Enable tracemalloc to get the "
                        r"object allocation traceback)")


# -- hooks, installed in the forked child ------------------------------------------------------


def _hit(marker: Path) -> None:
    """The chosen moment: tell the parent (marker file) and wait for its SIGKILL."""
    marker.write_text(str(os.getpid()))
    time.sleep(300)
    os._exit(99)  # never reached when the parent kills us


def hook(scenario: str, marker: Path, occurrence: int):
    """A ``setup`` for ``run_cli``: installs the scenario's hook in the child."""

    def setup() -> None:
        count = {"n": 0}

        def due() -> bool:
            count["n"] += 1
            return count["n"] == occurrence

        if scenario == "trial":
            from graphtune.envs.live import Executor

            orig_call = Executor._make_call

            async def _make_call(self, *a, **kw):  # inside a trial; other calls are in flight
                out = await orig_call(self, *a, **kw)
                if due():
                    _hit(marker)
                return out

            Executor._make_call = _make_call
        elif scenario == "agent-reply":
            from graphtune.search.critic import AgentCritic

            orig = AgentCritic._apply

            def _apply(self, step, *a, **kw):  # the agent answered; its update is applied, not saved
                out = orig(self, step, *a, **kw)
                if step.calls and due():
                    _hit(marker)
                return out

            AgentCritic._apply = _apply
        elif scenario.startswith("commit-"):
            from sqlalchemy import event
            from sqlalchemy.engine import Engine

            # a trial's outcome is stored with its results; the searcher's update sets the state
            what = {"commit-trial": "insert into gt_question_results", "commit-progress": "searcher_state",
                    "commit-ledger": "insert into gt_llm_calls"}[scenario]

            @event.listens_for(Engine, "before_cursor_execute")
            def _seen(conn, cursor, statement, parameters, context, executemany):
                s = statement.lower()
                if what in s and (what != "searcher_state" or s.startswith("update gt_studies")):
                    conn.info["gt_fault_target"] = True

            @event.listens_for(Engine, "commit")
            def _commit(conn):  # every statement of the transaction ran; COMMIT is next
                if conn.info.pop("gt_fault_target", False) and due():
                    _hit(marker)

            @event.listens_for(Engine, "rollback")
            def _rollback(conn):
                conn.info.pop("gt_fault_target", None)
        elif scenario == "after-commit-trial":
            from graphtune.store.storage import Storage

            orig = Storage.finish_claim

            def after(self, *a, **kw):  # the trial is committed; the worker has not seen it
                out = orig(self, *a, **kw)
                if due():
                    _hit(marker)
                return out

            Storage.finish_claim = after
        elif scenario == "after-commit-progress":
            import contextlib

            from graphtune.store.storage import Coordination, Storage

            orig_co, orig_adv = Storage.coordination, Coordination.advance
            advanced = {"state": False}

            def advance(self, *a, **kw):
                advanced["state"] = advanced["state"] or kw.get("state") is not None
                return orig_adv(self, *a, **kw)

            @contextlib.contextmanager
            def coordination(self, *a, **kw):  # the searcher's update is committed when the block ends
                advanced["state"] = False
                with orig_co(self, *a, **kw) as co:
                    yield co
                if advanced["state"] and due():
                    _hit(marker)

            Coordination.advance, Storage.coordination = advance, coordination
        else:
            raise ValueError(f"no hook for scenario {scenario!r}")

    return setup


# -- the store, read from outside ----------------------------------------------------------


def durable(url: str) -> dict:
    """What the store holds right now (after a kill): finished trials and ledger rows."""
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    try:
        with eng.connect() as c:
            names = set(c.execute(text("select name from sqlite_master where type='table'")).scalars()) \
                if url.startswith("sqlite") else set(c.execute(text(
                    "select tablename from pg_tables where schemaname = current_schema()")).scalars())
            if "gt_trials" not in names:
                return {"trials": {}, "ledger_ok": 0, "ledger_rows": 0}
            trials = {n: str(f) for n, f in c.execute(text(
                "select t.number, t.finished_at from gt_trials t join gt_studies s on s.id = t.study_id "
                "where s.name = :n and t.status = 'complete'"), {"n": STUDY})}
            ok = c.execute(text("select count(*) from gt_llm_calls where error is null")).scalar()
            rows = c.execute(text("select count(*) from gt_llm_calls")).scalar()
    finally:
        eng.dispose()
    return {"trials": trials, "ledger_ok": int(ok), "ledger_rows": int(rows)}


def ledger_duplicates(url: str) -> int:
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    try:
        with eng.connect() as c:
            return len(c.execute(text("select key from gt_llm_calls where error is null group by key "
                                      "having count(*) > 1")).all())
    finally:
        eng.dispose()


def study_exists(url: str) -> bool:
    for attempt in range(5):  # pg-drop: our own connection may be terminated too
        try:
            return _study_exists(url)
        except Exception:  # noqa: BLE001
            if attempt == 4:
                raise
            time.sleep(0.1)
    return False


def _study_exists(url: str) -> bool:
    # the studies row itself: a run that stops before its first trial removes the study it
    # created (its ledger rows stay, so the next run pays nothing twice)
    if not durable(url)["trials"]:
        from sqlalchemy import create_engine, text

        eng = create_engine(url)
        try:
            with eng.connect() as c:
                return c.execute(text("select count(*) from gt_studies where name = :n"), {"n": STUDY}).scalar() > 0
        except Exception:  # noqa: BLE001 - no tables yet
            return False
        finally:
            eng.dispose()
    return True


def terminate_backends(url: str) -> int:
    """Terminate every other connection to the database of ``url``; how many."""
    from sqlalchemy import create_engine, text

    eng = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with eng.connect() as c:
            return int(c.execute(text(
                "select count(pg_terminate_backend(pid)) from pg_stat_activity "
                "where datname = current_database() and pid <> pg_backend_pid()")).scalar() or 0)
    finally:
        eng.dispose()


# -- one scenario --------------------------------------------------------------------------------


class Runner:
    def __init__(self, work: Path, env: FakeOpenAIServer, agent: FakeOpenAIServer, evaluations: int, seed: int):
        self.work, self.env, self.agent = work, env, agent
        self.evaluations, self.seed = evaluations, seed

    def spec(self, name: str, url: str) -> Path:
        p = self.work / f"{name}.yaml"
        p.write_text(SPEC.format(study=STUDY, dataset=DATASET, api_base=self.env.api_base,
                                 agent_base=self.agent.api_base, agent_retries=AGENT_RETRIES,
                                 evaluations=self.evaluations, seed=self.seed, concurrency=CONCURRENCY,
                                 storage=url))
        return p

    def reset(self) -> None:
        self.env.reset()
        self.agent.reset()

    def reference(self) -> dict:
        url = f"sqlite:///{self.work / 'reference.db'}"
        self.reset()
        _, wall = run_cli(["optimize", str(self.spec("reference", url)), "--quiet"], cwd=self.work)
        snap = snapshot(url, STUDY)
        return {"url": url, "snapshot": snap, "env_requests": self.env.requests(),
                "agent_requests": self.agent.requests(), "wall_s": round(wall, 2),
                "agent_steps": len(snap["agent_steps"]),
                "trials": len(snap["trials"])}

    def resume_to_end(self, url: str, name: str) -> int:
        """Resume until the study is complete; the number of resumes."""
        n = 0
        while True:
            n += 1
            if n > 5:
                raise AssertionError(f"{name}: not complete after 5 resumes")
            args = (["resume", STUDY, "--storage", url, "--quiet"] if study_exists(url)
                    else ["optimize", str(self.spec(name, url)), "--quiet"])
            code, _ = run_cli(args, cwd=self.work, check=False, log=self.work / f"{name}-resume-{n}.log")
            if code == 0:
                return n

    def kill_at(self, scenario: str, url: str, ref: dict) -> dict:
        """Start the search, kill it at the scenario's moment; what was durable then."""
        marker = self.work / f"{scenario}.marker"
        marker.unlink(missing_ok=True)
        setup = None
        if scenario == "agent-call":
            kill = lambda t: self.agent.requests() >= 2  # noqa: E731  (the first feedback step's call)
        else:
            # the call half-way through the reference's; the second agent reply (the first
            # feedback); the 3rd trial; the 2nd batch's state; the 2nd ledger batch
            occurrence = {"trial": ref["env_requests"] // 2, "agent-reply": 2, "commit-trial": 3, "after-commit-trial": 3, "commit-progress": 2,
                          "after-commit-progress": 2, "commit-ledger": 2}[scenario]
            setup = hook(scenario, marker, occurrence)
            kill = lambda t: marker.exists()  # noqa: E731
        code, wall = run_cli(["optimize", str(self.spec(scenario, url)), "--quiet"], cwd=self.work, kill=kill,
                             setup=setup, check=False, log=self.work / f"{scenario}-killed.log")
        if code is not None:
            raise AssertionError(f"{scenario}: the search ended ({code}) before the fault moment:\n"
                                 + (self.work / f"{scenario}-killed.log").read_text()[-2000:])
        at_kill = durable(url)
        return {"killed_after_s": round(wall, 2), "env_requests_at_kill": self.env.requests(),
                "agent_requests_at_kill": self.agent.requests(), "at_kill": at_kill}

    def run(self, scenario: str, url: str, ref: dict) -> dict:
        self.reset()
        out: dict = {"scenario": scenario}
        if scenario == "pg-drop":
            out.update(self.pg_drop(url))
            at_kill = {"trials": out.pop("at_stops")}
            out["trials_finished_at_stops"] = len(at_kill["trials"])
        else:
            k = self.kill_at(scenario, url, ref)
            out.update({key: v for key, v in k.items() if key != "at_kill"})
            at_kill = k["at_kill"]
            out["resumes"] = self.resume_to_end(url, scenario)
            # requests the killed process made whose replies were not durable: paid again at most
            out["lost_in_flight"] = k["env_requests_at_kill"] - at_kill["ledger_ok"]
            out["trials_finished_at_kill"] = len(at_kill["trials"])
        got = snapshot(url, STUDY)
        problems = compare(got, ref["snapshot"])
        if scenario == "pg-drop" and not out["stops_one_line"]:
            problems.append(f"a dropped connection stopped the search without a one-line error: {out['first_lines']}")
        final = durable(url)["trials"]
        changed = [n for n, f in at_kill["trials"].items() if final.get(n) != f]
        if changed:
            problems.append(f"trials finished before the fault were lost or run again: {changed}")
        dups = ledger_duplicates(url)
        if dups:
            problems.append(f"{dups} LLM calls recorded twice in the ledger")
        env_extra = self.env.requests() - ref["env_requests"]
        agent_extra = self.agent.requests() - ref["agent_requests"]
        bound = out.get("lost_in_flight", 0) if scenario != "pg-drop" else out["stops"] * 3 * CONCURRENCY
        if env_extra < 0 or env_extra > bound:
            problems.append(f"{env_extra} environment requests beyond the reference's {ref['env_requests']}: "
                            f"more than the {bound} not durable when the process stopped")
        agent_bound = (1 + AGENT_RETRIES) * (1 if scenario != "pg-drop" else out["stops"])
        if agent_extra < 0 or agent_extra > agent_bound:
            problems.append(f"{agent_extra} agent requests beyond the reference's {ref['agent_requests']} "
                            f"(at most {agent_bound}: one agent step per stop)")
        out.update({"trials": len(got["trials"]), "status": got["status"], "env_requests": self.env.requests(),
                    "env_extra_requests": env_extra, "agent_requests": self.agent.requests(),
                    "agent_extra_requests": agent_extra, "ledger_duplicates": dups, "problems": problems})
        return out

    def pg_drop(self, url: str) -> dict:
        """Terminate the search's connections every 0.3 s while it runs; resume after a stop."""
        counts = self.work / "pg-drop.counts"
        dropper = start_dropper(url, counts, every_s=0.3)
        stops, one_line, runs, firsts, finished, stray = 0, [], 0, [], {}, 0
        try:
            while runs < 8:
                runs += 1
                args = (["resume", STUDY, "--storage", url, "--quiet"] if study_exists(url)
                        else ["optimize", str(self.spec("pg-drop", url)), "--quiet"])
                log = self.work / f"pg-drop-{runs}.log"
                code, _ = run_cli(args, cwd=self.work, check=False, log=log)
                if code == 0:
                    break
                stops += 1
                for attempt in range(5):  # what was durable when it stopped (our connection may drop too)
                    try:
                        finished.update(durable(url)["trials"])
                        break
                    except Exception:  # noqa: BLE001
                        time.sleep(0.1)
                text = log.read_text()
                # ours must be one "error:" line and nothing else, apart from litellm's own log
                # lines and Python's warning about a coroutine litellm leaves unawaited when a
                # call is cancelled at the stop (counted in `stray_warnings`: a known issue of
                # the live environment's shutdown, not of the store)
                lines, skip = [], False
                for ln in text.splitlines():
                    indented, skip = skip and ln.startswith((" ", "\t")), False
                    if indented or not ln.strip() or _LITELLM_LOG.match(ln):
                        continue
                    if _UNAWAITED.search(ln):
                        stray += 1
                        skip = True  # the warning's source line follows it
                        continue
                    lines.append(ln)
                firsts.append(lines[0] if lines else text[-300:])
                one_line.append(len(lines) == 1 and lines[0].startswith("error:"))
        finally:
            os.kill(dropper, signal.SIGKILL)
            os.waitpid(dropper, 0)
        resumes = self.resume_to_end(url, "pg-drop") if runs >= 8 else 0  # finish it without drops
        rounds, backends = (int(x) for x in (counts.read_text().split() if counts.exists() else (0, 0)))
        return {"drop_rounds": rounds, "backends_terminated": backends, "runs": runs, "stops": stops,
                "stops_one_line": all(one_line), "first_lines": sorted(set(firsts))[:3],
                "resumes_without_drops": resumes, "survived": stops == 0, "stray_warnings": stray,
                "at_stops": finished}


def start_dropper(url: str, counts: Path, every_s: float) -> int:
    """Fork a process that terminates the store's connections every ``every_s``; its pid
    (a process, not a thread: the searches are forked from this one)."""
    pid = os.fork()
    if pid:
        return pid
    try:
        rounds = backends = 0
        while True:
            time.sleep(every_s)
            try:
                backends += terminate_backends(url)
            except Exception:  # noqa: BLE001 - the server is busy; next round
                continue
            rounds += 1
            tmp = counts.with_suffix(".tmp")
            tmp.write_text(f"{rounds} {backends}")
            tmp.replace(counts)  # atomic: the parent never reads a half-written file
    finally:
        os._exit(0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--scenarios", help=f"comma-separated, of {', '.join(SCENARIOS + PG_SCENARIOS)} (default: all "
                                         f"on SQLite; on PostgreSQL {', '.join(PG_DEFAULT)})")
    ap.add_argument("--evaluations", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--workdir", type=Path)
    a = ap.parse_args(argv)
    names = (a.scenarios.split(",") if a.scenarios else
             list(PG_DEFAULT) if a.backend == "postgresql" else list(SCENARIOS))
    admin = os.environ.get("GRAPHTUNE_TEST_POSTGRES_URL")
    if a.backend == "postgresql" and not admin:
        print("set GRAPHTUNE_TEST_POSTGRES_URL (bash scripts/postgres.sh start)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="graphtune-faults-") as tmp, \
            FakeOpenAIServer() as env, FakeOpenAIServer(latency_s=AGENT_LATENCY_S) as agent:
        if a.backend == "postgresql":
            import psycopg  # noqa: F401  (imported before forking)
            import sqlalchemy.dialects.postgresql.psycopg  # noqa: F401
        preload(env.api_base)
        work = a.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        r = Runner(work, env, agent, a.evaluations, a.seed)
        ref = r.reference()
        print(f"reference: {ref['trials']} trials, {ref['agent_steps']} agent steps, {ref['env_requests']} "
              f"environment and {ref['agent_requests']} agent requests, {ref['wall_s']} s", flush=True)
        for name in names:
            drop = None
            if a.backend == "postgresql":
                url, drop = fresh_postgres_db(admin)
            else:
                url = f"sqlite:///{work / (name + '.db')}"
            t1 = time.perf_counter()
            try:
                res = r.run(name, url, ref)
            except AssertionError as e:
                res = {"scenario": name, "problems": [str(e)]}
            finally:
                if drop is not None:
                    drop()
            res["backend"], res["wall_s"] = a.backend, round(time.perf_counter() - t1, 2)
            results.append(res)
            status = "ok" if not res["problems"] else "FAILED: " + "; ".join(res["problems"])
            figures = {k: v for k, v in res.items() if k not in ("scenario", "problems", "backend")}
            print(f"{a.backend} {name}: {json.dumps(figures)}: {status}", flush=True)
    total = time.perf_counter() - t0
    print(f"total {total:.1f} s")
    if a.json:
        a.json.write_text(json.dumps({"reference": {k: v for k, v in ref.items() if k != "snapshot"},
                                      "results": results, "total_s": total}, indent=1, default=str))
    return 0 if all(not x["problems"] for x in results) else 1


if __name__ == "__main__":
    sys.exit(main())
