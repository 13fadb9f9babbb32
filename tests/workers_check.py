"""Run one study with several ``graphtune worker`` processes and compare it with a
single-process run of the same spec.

Used by tests/test_workers.py (4 workers on PostgreSQL; a worker killed with SIGKILL
mid-search) and by benchmarks/workers_bench.py (speed-up against a fake endpoint of fixed
latency). Every worker is a real process forked from this one after it imported
graphtune (and litellm for live specs), so start-up takes milliseconds.

    python tests/workers_check.py --storage postgresql+psycopg://... [--workers 4]
        [--env simulated|live|pipeline] [--method agent-reinforce] [--kill-one] [--json FILE]

Checks: every trial finished, no (split, batch, slot) twice, no trial lost (the same
trials as the reference, in the same places, with the same graphs, questions, results,
rewards and paid runs), the same agent steps, searcher state, best graph and test score.
Exit status 0 when every check holds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

DATASET = ROOT / "examples" / "data" / "easy-arith.jsonl"

SIMULATED_SPEC = """\
study: {study}
task:
  profile: math
  dev_size: 40
  test_size: 100
models:
  - name: llama-3.2-1b
  - name: llama-3.2-3b
  - name: llama-3.1-8b
  - name: llama-3.1-70b
space:
  max_nodes: 9
  max_depth: 4
budget:
  units: 18
search:
  method: {method}
  evaluations: {evaluations}
  batch_size: {batch_size}
  seed: {seed}
  options: {options}
env:
  kind: simulated
storage: {storage}
"""

#: a simulated retrieve-then-answer pipeline (``--env pipeline``)
PIPELINE_SPEC = """\
study: {study}
task: {{profile: pipeline-rag, dev_size: 40, test_size: 100}}
models: [{{name: llama-3.2-1b}}, {{name: llama-3.2-3b}}, {{name: llama-3.1-8b}}, {{name: llama-3.1-70b}}]
pipeline:
  stages:
    - {{name: retrieve, space: {{max_nodes: 3}}}}
    - {{name: answer, space: {{models: [llama-3.2-3b, llama-3.1-8b], max_nodes: 5}}, budget: {{units: 300}}}}
budget: {{units: 600}}
search:
  method: {method}
  evaluations: {evaluations}
  batch_size: {batch_size}
  seed: {seed}
  options: {options}
env:
  kind: simulated
storage: {storage}
"""

LIVE_SPEC = """\
study: {study}
task:
  dataset: {dataset}
  scorer: numeric
  dev_size: 8
  test_size: 8
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
  method: {method}
  evaluations: {evaluations}
  batch_size: {batch_size}
  seed: {seed}
  options: {options}
env:
  kind: live
  concurrency: {concurrency}
  max_tokens: 32
  cache: {cache}
storage: {storage}
"""


def preload(api_base: str | None) -> None:
    """Import what a worker imports (and, for live specs, make one litellm call: it
    initialises lazily) in this process, so forked workers start at once. No thread may
    survive this (forking a threaded process is unsafe)."""
    import threading

    import graphtune.api  # noqa: F401
    import graphtune.cli  # noqa: F401
    import graphtune.search.agent_reinforce  # noqa: F401
    import graphtune.search.optuna_search  # noqa: F401
    import graphtune.search.random_search  # noqa: F401
    import graphtune.search.worker  # noqa: F401

    try:
        import psycopg  # noqa: F401
        import sqlalchemy.dialects.postgresql.psycopg  # noqa: F401
    except ImportError:
        pass
    if api_base:
        from kill9_resume import preload as live_preload

        live_preload(api_base)
    if threading.active_count() != 1:
        raise RuntimeError(f"threads alive before fork: {threading.enumerate()}")


def spawn(args: list[str], cwd: Path, log: Path) -> int:
    """Fork a child that runs ``graphtune ARGS`` (its output in ``log``); its pid."""
    from kill9_resume import _child

    pid = os.fork()
    if pid == 0:
        _child(args, cwd, log)
    return pid


def wait_all(pids: dict[int, Path], timeout_s: float) -> dict[int, int | None]:
    """Wait for every child; exit codes (None: killed by a signal)."""
    codes: dict[int, int | None] = {}
    t0 = time.monotonic()
    while len(codes) < len(pids):
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None
        if time.monotonic() - t0 > timeout_s:
            for pid in pids:
                if pid not in codes:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            raise RuntimeError(f"workers did not finish in {timeout_s:.0f} s")
        time.sleep(0.02)
    return codes


def snapshot(url: str, study: str) -> dict:
    """Everything that must be identical between two runs of one spec (no timings)."""
    from graphtune.store.storage import Storage

    store = Storage(url, create=False)
    try:
        st = store.get_study(study)
        trials = store.list_trials(st.id)
        rows = []
        for t in trials:
            res = [(r.question_id, r.answer, r.correct, round(r.score, 9), r.error is None)
                   for r in store.trial_results(t.id)]
            rows.append((t.number, t.split, t.batch, t.slot, t.status, t.graph_hash, list(t.question_ids),
                         None if t.reward is None else round(t.reward, 9), t.accuracy, t.new_runs, t.error,
                         list(t.parents), t.origin, res))
        steps = [(s["key"], s["batch"], s["kind"], s["parsed"], s["applied"], s["rejected_reason"])
                 for s in sorted(store.agent_steps(st.id), key=lambda s: s["key"])]
        places = [(t.split, t.batch, t.slot) for t in trials]
        state = json.loads(json.dumps(st.searcher_state))
        if isinstance(state, dict) and isinstance(state.get("usage"), dict):
            state["usage"].pop("seconds", None)  # the agent's own wall clock
        workers = store.list_workers(st.id)
    finally:
        store.close()
    return {"status": st.status, "runs_spent": st.runs_spent, "batch_index": st.batch_index, "state": state,
            "trials": rows, "agent_steps": steps, "duplicate_places": len(places) - len(set(places)),
            "unfinished": sum(t.status not in ("complete", "failed") for t in trials),
            "workers": [{"name": w["name"], "trials_done": w["trials_done"], "batches_updated": w["batches_updated"],
                         "status": w["status"]} for w in workers]}


def compare(got: dict, ref: dict) -> list[str]:
    errors = []
    if got["duplicate_places"]:
        errors.append(f"{got['duplicate_places']} trials duplicated (same split/batch/slot)")
    if got["unfinished"]:
        errors.append(f"{got['unfinished']} trials left unfinished")
    for k in ("status", "runs_spent", "batch_index", "agent_steps", "state"):
        if got[k] != ref[k]:
            errors.append(f"{k} differs: {str(got[k])[:300]} vs reference {str(ref[k])[:300]}")
    if len(got["trials"]) != len(ref["trials"]):
        errors.append(f"{len(got['trials'])} trials vs {len(ref['trials'])} in the reference")
    for a, b in zip(got["trials"], ref["trials"]):
        if a != b:
            errors.append(f"trial #{b[0]} differs: {str(a)[:300]} vs reference {str(b)[:300]}")
            break
    return errors


def fresh_postgres_db(admin_url: str) -> tuple[str, callable]:
    """A new empty database on the server of ``admin_url``: (its URL, a function that drops it)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"gt_workers_{uuid.uuid4().hex[:10]}"
    eng = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    eng.dispose()

    def drop():
        e = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with e.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        e.dispose()

    return make_url(admin_url).set(database=name).render_as_string(hide_password=False), drop


def run(*, storage: str, workers: int, env: str, method: str, evaluations: int, batch_size: int, seed: int,
        work: Path, api_base: str | None = None, concurrency: int = 64, kill_one: bool = False,
        reference: str = "optimize", heartbeat: float = 0.5, stale_after: float = 3.0, poll: float = 0.05,
        timeout_s: float = 240, server=None, cache: bool = True) -> dict:
    """Reference run (one process, SQLite) and a run with ``workers`` workers on
    ``storage``; their snapshots, timings and the comparison."""
    study = f"w-{method}"
    options = "{n_startup_trials: 4}" if method == "tpe" else "{}"

    def spec_file(name: str, url: str) -> Path:
        tpl = {"live": LIVE_SPEC, "pipeline": PIPELINE_SPEC}.get(env, SIMULATED_SPEC)
        p = work / f"{name}.yaml"
        p.write_text(tpl.format(study=study, dataset=DATASET, api_base=api_base, method=method,
                                evaluations=evaluations, batch_size=batch_size, seed=seed, options=options,
                                concurrency=concurrency, storage=url, cache=str(cache).lower()))
        return p

    # 1. the reference: one process (`optimize`, or one worker) on its own SQLite store
    ref_url = f"sqlite:///{work / 'reference.db'}"
    ref_spec = spec_file("reference", ref_url)
    args = (["optimize", str(ref_spec), "--quiet"] if reference == "optimize" else
            ["worker", "--study", study, "--storage", ref_url, "--spec", str(ref_spec), "--quiet"])
    if server is not None:
        server.reset()
    t0 = time.perf_counter()
    pid = spawn(args, work, work / "reference.log")
    code = wait_all({pid: work / "reference.log"}, timeout_s)[pid]
    ref_wall = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"reference run failed ({code}):\n{(work / 'reference.log').read_text()[-3000:]}")
    ref = snapshot(ref_url, study)
    ref_requests = server.requests() if server is not None else None
    if server is not None:
        server.reset()

    # 2. the same spec with N workers on the shared store
    spec = spec_file("workers", storage)
    logs = {}
    t0 = time.perf_counter()
    for i in range(workers):
        log = work / f"worker-{i}.log"
        pid = spawn(["worker", "--study", study, "--storage", storage, "--spec", str(spec), "--quiet",
                     "--heartbeat", str(heartbeat), "--stale-after", str(stale_after), "--poll", str(poll)],
                    work, log)
        logs[pid] = log
    killed = None
    if kill_one:  # SIGKILL one worker while it holds a claim, mid-search
        victim = next(iter(logs))
        killed = _kill_while_holding(storage, study, victim, logs, timeout_s)
    codes = wait_all(logs, timeout_s)
    wall = time.perf_counter() - t0
    failed = {pid: c for pid, c in codes.items() if c not in (0, None) or (c is None and pid != killed)}
    if failed:
        pid = next(iter(failed))
        raise RuntimeError(f"worker {pid} failed ({failed[pid]}):\n{logs[pid].read_text()[-3000:]}")
    got = snapshot(storage, study)
    errors = compare(got, ref)
    active = sum(1 for w in got["workers"] if w["trials_done"] > 0)
    return {"method": method, "env": env, "workers": workers, "cache": cache, "storage": storage.split(":")[0],
            "reference": reference, "reference_wall_s": round(ref_wall, 2), "workers_wall_s": round(wall, 2),
            "speedup": round(ref_wall / wall, 2), "trials": len(got["trials"]),
            "endpoint_requests": {"reference": ref_requests,
                                  "workers": server.requests() if server is not None else None}, "killed_worker": killed is not None,
            "workers_with_trials": active, "worker_rows": got["workers"],
            "duplicate_places": got["duplicate_places"], "unfinished": got["unfinished"], "errors": errors}


def _kill_while_holding(storage: str, study: str, pid: int, logs: dict, timeout_s: float) -> int:
    """SIGKILL worker ``pid`` once it holds a claimed trial (after the search's first batch)."""
    from sqlalchemy import create_engine, text

    eng = create_engine(storage)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < timeout_s:
            with eng.connect() as c:
                try:
                    row = c.execute(text(
                        "select t.number from gt_trials t join gt_studies s on s.id = t.study_id "
                        "where s.name = :n and t.status = 'running' and t.worker like :w and t.batch >= 1"),
                        {"n": study, "w": f"%:{pid}:%"}).first()
                except Exception:  # tables not there yet
                    row = None
            if row is not None:
                os.kill(pid, signal.SIGKILL)
                return pid
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                raise RuntimeError("the worker to kill finished before it held a claim")
            time.sleep(0.01)
    finally:
        eng.dispose()
    raise RuntimeError("the worker to kill never held a claim")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storage", help="shared store URL (default: a new database on $GRAPHTUNE_TEST_POSTGRES_URL's "
                                      "server, else a SQLite file)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--env", choices=["simulated", "live", "pipeline"], default="simulated",
                    help="pipeline: a simulated two-stage pipeline (retrieve, answer)")
    ap.add_argument("--method", default="agent-reinforce")
    ap.add_argument("--evaluations", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latency-s", type=float, default=0.2, help="fake endpoint latency (live env)")
    ap.add_argument("--kill-one", action="store_true", help="SIGKILL one worker while it holds a trial")
    ap.add_argument("--reference", choices=["optimize", "worker"], default="optimize")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    server = None
    drop = None
    with tempfile.TemporaryDirectory(prefix="gt-workers-") as tmp:
        work = Path(tmp)
        try:
            api_base = None
            if a.env == "live":
                from fake_openai_server import FakeOpenAIServer

                server = FakeOpenAIServer(latency_s=a.latency_s).start()
                api_base = server.api_base
            storage = a.storage
            if storage is None and os.environ.get("GRAPHTUNE_TEST_POSTGRES_URL"):
                storage, drop = fresh_postgres_db(os.environ["GRAPHTUNE_TEST_POSTGRES_URL"])
            storage = storage or f"sqlite:///{work / 'shared.db'}"
            preload(api_base)
            res = run(storage=storage, workers=a.workers, env=a.env, method=a.method, evaluations=a.evaluations,
                      batch_size=a.batch_size, seed=a.seed, work=work, api_base=api_base, kill_one=a.kill_one,
                      reference=a.reference, server=server)
        finally:
            if server is not None:
                server.stop()
            if drop is not None:
                drop()
    print(json.dumps(res, indent=1, default=str))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
