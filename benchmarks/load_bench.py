"""Load: many workers, 1,000+ trials on one PostgreSQL study, a call ledger of 100k+ calls;
how long the read commands take, and whether the counts and sums add up.

1. ``--workers`` ``graphtune worker`` processes (forked from this one after it imported
   graphtune) run one study of the simulated environment (``random`` search, batches of
   ``--batch-size``) until it has ``--trials`` trials;
2. ``--ledger`` call records are written through the store's API (``SQLLedger.put``, the
   writer thread's batched transactions), as a long live search would leave them;
3. ``graphtune studies``, ``graphtune trials STUDY`` and ``graphtune show STUDY`` run
   ``--repeat`` times each: the command's own time (forked from this process, whose imports
   are done: what a user waits for beyond Python's start-up) and the whole cold process
   (``python -m graphtune.cli ...``, start-up and imports included);
4. consistency: the trials the store lists and counts agree; every trial finished; no
   (split, batch, slot) twice; ``runs_spent`` = the sum of the dev trials' ``new_runs``;
   no (graph, split, question) result paid twice; the trials the workers report add up to
   the trials stored; the ledger holds exactly the records put.

    python benchmarks/load_bench.py [--storage URL] [--workers 4] [--trials 1000]
        [--ledger 100000] [--repeat 3] [--json FILE]

Storage: a new database on $GRAPHTUNE_TEST_POSTGRES_URL's server when set (start one with
`eval "$(bash scripts/postgres.sh start)"`), else a SQLite file. Exit status 0 when every
consistency check holds (timings are reported, not enforced: they depend on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kill9_resume import run_cli  # noqa: E402
from workers_check import fresh_postgres_db, preload, spawn, wait_all  # noqa: E402

STUDY = "load"
COMMANDS = ("studies", "trials", "show")

SPEC = """\
study: {study}
task:
  profile: math
  dev_size: {dev_size}
  test_size: 20
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
  method: random
  evaluations: {evaluations}
  batch_size: {batch_size}
  seed: {seed}
env:
  kind: simulated
storage: {storage}
"""


def run_workers(storage: str, work: Path, *, workers: int, trials: int, batch_size: int, dev_size: int,
                seed: int, timeout_s: float) -> dict:
    """One study worked by ``workers`` processes until about ``trials`` dev trials exist."""
    spec = work / "load.yaml"
    # random search: every trial is a new graph on the whole dev split, so the budget
    # (in full-dev evaluations) is the number of dev trials
    spec.write_text(SPEC.format(study=STUDY, dev_size=dev_size, evaluations=trials, batch_size=batch_size,
                                seed=seed, storage=storage))
    logs = {}
    t0 = time.perf_counter()
    for i in range(workers):
        log = work / f"worker-{i}.log"
        pid = spawn(["worker", "--study", STUDY, "--storage", storage, "--spec", str(spec), "--quiet",
                     "--heartbeat", "1", "--stale-after", "30", "--poll", "0.05"], work, log)
        logs[pid] = log
    codes = wait_all(logs, timeout_s)
    wall = time.perf_counter() - t0
    bad = {pid: c for pid, c in codes.items() if c != 0}
    if bad:
        pid = next(iter(bad))
        raise RuntimeError(f"worker {pid} failed ({bad[pid]}):\n{logs[pid].read_text()[-3000:]}")
    return {"workers": workers, "workers_wall_s": round(wall, 2)}


def fill_ledger(storage: str, n: int, *, study: str = STUDY) -> dict:
    """Put ``n`` call records through the store's ledger API (batched transactions)."""
    from graphtune.store.ledger import CallRecord, SQLLedger, call_key
    from graphtune.store.storage import Storage

    store = Storage(storage, create=False)
    led = SQLLedger(store)
    t0 = time.perf_counter()
    try:
        for i in range(n):
            messages = [{"role": "user", "content": f"What is {i} + {i % 97}? Think step by step."}]
            params = {"temperature": 0.0, "max_tokens": 256, "seed": 0}
            led.put(CallRecord(key=call_key("openai/llama-3.1-8b", messages, params, 0), model="llama-3.1-8b",
                               endpoint="openai/llama-3.1-8b", messages=messages, params=params,
                               reply=f"The answer is {i + i % 97}.", prompt_tokens=12, completion_tokens=7,
                               latency_s=0.4, usd=2e-6, flops=1.6e11, study=study))
        led.close()
    finally:
        store.close()
    return {"ledger_put": n, "ledger_write_s": round(time.perf_counter() - t0, 2),
            "ledger_batches": led.stats.batches}


def time_commands(storage: str, work: Path, repeat: int, cold: bool = True) -> dict:
    """Each read command's own time (forked, imports done) and its cold process time; the best
    and worst of ``repeat`` runs."""
    out = {}
    for name in COMMANDS:
        args = [name] if name == "studies" else [name, STUDY]
        args += ["--storage", storage]
        warm, cold_s = [], []
        for _ in range(repeat):
            _, wall = run_cli(args, cwd=work, log=work / f"{name}.out")
            warm.append(wall)
            if not cold:
                continue
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "graphtune.cli", *args], cwd=work, capture_output=True,
                               text=True, env={**os.environ, "COLUMNS": "120"})
            cold_s.append(time.perf_counter() - t0)
            if p.returncode != 0:
                raise RuntimeError(f"graphtune {' '.join(args)} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
        cold_s = cold_s or [float("nan")]
        out[name] = {"command_s": round(min(warm), 3), "command_max_s": round(max(warm), 3),
                     "process_s": round(min(cold_s), 3), "process_max_s": round(max(cold_s), 3),
                     "output_lines": len((work / f"{name}.out").read_text().splitlines())}
    return out


def consistency(storage: str, *, ledger_expected: int | None = None) -> dict:
    """Counts and sums of the study, checked against each other; ``problems`` lists what
    does not add up."""
    from sqlalchemy import text

    from graphtune.store.storage import Storage

    store = Storage(storage, create=False)
    problems = []
    try:
        st = store.get_study(STUDY)
        listed = {s.name: s for s in store.list_studies()}[STUDY]
        trials = store.list_trials(st.id)
        with store.engine.connect() as c:
            q = lambda sql: c.execute(text(sql), {"sid": st.id}).all()  # noqa: E731
            n_trials = q("select count(*) from gt_trials where study_id = :sid")[0][0]
            by_status = dict(q("select status, count(*) from gt_trials where study_id = :sid group by status"))
            dup_places = q("select split, batch, slot from gt_trials where study_id = :sid "
                           "group by split, batch, slot having count(*) > 1")
            dev_runs = q("select coalesce(sum(new_runs), 0) from gt_trials where study_id = :sid and split = 'dev'")[0][0]
            paid = q("select coalesce(sum(case when r.reused then 0 else 1 end), 0) from gt_question_results r "
                     "join gt_trials t on t.id = r.trial_id where t.study_id = :sid and t.split = 'dev' "
                     "and r.error is null")[0][0]
            dup_results = q("select t.graph_hash, t.split, r.question_id from gt_question_results r "
                            "join gt_trials t on t.id = r.trial_id where t.study_id = :sid and not r.reused "
                            "and r.error is null group by t.graph_hash, t.split, r.question_id having count(*) > 1")
            n_results = q("select count(*) from gt_question_results r join gt_trials t on t.id = r.trial_id "
                          "where t.study_id = :sid")[0][0]
            worker_trials = q("select coalesce(sum(trials_done), 0), count(*) from gt_workers where study_id = :sid")[0]
            ledger = c.execute(text("select count(*) from gt_llm_calls")).scalar()
            ledger_dups = c.execute(text("select count(*) from (select key from gt_llm_calls where error is null "
                                         "group by key having count(*) > 1) d")).scalar()
    finally:
        store.close()
    if not (len(trials) == n_trials == listed.n_trials == st.n_trials):
        problems.append(f"trial counts differ: listed {len(trials)}, counted {n_trials}, `studies` "
                        f"{listed.n_trials}, get_study {st.n_trials}")
    if set(by_status) - {"complete", "failed"}:
        problems.append(f"unfinished trials: {by_status}")
    if dup_places:
        problems.append(f"{len(dup_places)} (split, batch, slot) places hold two trials")
    if st.runs_spent != dev_runs:
        problems.append(f"runs_spent {st.runs_spent} != sum of the dev trials' new_runs {dev_runs}")
    if paid != dev_runs:
        problems.append(f"{paid} dev results paid (not reused) != sum of new_runs {dev_runs}")
    if dup_results:
        problems.append(f"{len(dup_results)} (graph, split, question) results paid twice")
    if worker_trials[1] and worker_trials[0] != n_trials:
        problems.append(f"workers report {worker_trials[0]} trials, the store holds {n_trials}")
    if ledger_expected is not None and ledger != ledger_expected:
        problems.append(f"ledger holds {ledger} calls, {ledger_expected} were put")
    if ledger_dups:
        problems.append(f"{ledger_dups} calls recorded twice in the ledger")
    if st.status != "complete":
        problems.append(f"study status {st.status}")
    return {"trials": n_trials, "dev_trials": sum(t.split == "dev" for t in trials), "by_status": by_status,
            "runs_spent": st.runs_spent, "sum_new_runs_dev": dev_runs, "question_results": n_results,
            "duplicate_places": len(dup_places), "duplicate_results": len(dup_results),
            "workers_trials_done": worker_trials[0], "workers": worker_trials[1], "ledger_calls": ledger,
            "ledger_duplicates": ledger_dups, "problems": problems}


def run(storage: str, work: Path, *, workers: int, trials: int, ledger: int, batch_size: int = 32,
        dev_size: int = 20, seed: int = 0, repeat: int = 3, cold: bool = True, timeout_s: float = 3600) -> dict:
    res = {"storage": storage.split(":")[0]}
    res.update(run_workers(storage, work, workers=workers, trials=trials, batch_size=batch_size,
                           dev_size=dev_size, seed=seed, timeout_s=timeout_s))
    res.update(fill_ledger(storage, ledger))
    res["commands"] = time_commands(storage, work, repeat, cold)
    res["consistency"] = consistency(storage, ledger_expected=ledger)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storage", help="store URL (default: a new database on $GRAPHTUNE_TEST_POSTGRES_URL's server, "
                                      "else a SQLite file)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--trials", type=int, default=1000, help="dev trials (the search budget, in full-dev evaluations)")
    ap.add_argument("--ledger", type=int, default=100_000, help="call records to put in the ledger")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dev-size", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cold", action="store_true", help="do not time the commands as new processes")
    ap.add_argument("--keep", action="store_true", help="keep the new database (its URL is printed)")
    ap.add_argument("--measure-only", action="store_true",
                    help="only time the commands and check the study already at --storage (a kept run)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.measure_only:
        if not a.storage:
            ap.error("--measure-only needs --storage")
        preload(None)
        with tempfile.TemporaryDirectory(prefix="gt-load-") as tmp:
            res = {"storage": a.storage.split(":")[0], "commands": time_commands(a.storage, Path(tmp), a.repeat, not a.no_cold),
                   "consistency": consistency(a.storage)}
        for name, t in res["commands"].items():
            print(f"graphtune {name}: {t['command_s']:.3f} s (max {t['command_max_s']:.3f}) imports done; "
                  f"{t['process_s']:.3f} s (max {t['process_max_s']:.3f}) as a new process; "
                  f"{t['output_lines']} lines")
        print(f"consistency: {res['consistency']}")
        return 0 if not res["consistency"]["problems"] else 1
    preload(None)
    drop = None
    with tempfile.TemporaryDirectory(prefix="gt-load-") as tmp:
        storage = a.storage
        if storage is None and os.environ.get("GRAPHTUNE_TEST_POSTGRES_URL"):
            storage, drop = fresh_postgres_db(os.environ["GRAPHTUNE_TEST_POSTGRES_URL"])
        storage = storage or f"sqlite:///{Path(tmp) / 'load.db'}"
        try:
            t0 = time.perf_counter()
            res = run(storage, Path(tmp), workers=a.workers, trials=a.trials, ledger=a.ledger,
                      batch_size=a.batch_size, dev_size=a.dev_size, seed=a.seed, repeat=a.repeat,
                      cold=not a.no_cold)
            res["total_s"] = round(time.perf_counter() - t0, 1)
        finally:
            if drop is not None and not a.keep:
                drop()
            elif drop is not None:
                print(f"kept: --storage {storage}")
    c = res["consistency"]
    print(f"command: python benchmarks/load_bench.py --workers {a.workers} --trials {a.trials} --ledger {a.ledger} "
          f"--batch-size {a.batch_size} --dev-size {a.dev_size} --repeat {a.repeat} ({res['storage']})")
    print(f"{a.workers} workers: {c['trials']} trials ({c['dev_trials']} dev), {c['question_results']} question "
          f"results in {res['workers_wall_s']} s; ledger: {res['ledger_put']} calls put in {res['ledger_write_s']} s "
          f"({res['ledger_batches']} transactions)")
    for name, t in res["commands"].items():
        print(f"graphtune {name}: {t['command_s']:.3f} s (max {t['command_max_s']:.3f}) imports done; "
              f"{t['process_s']:.3f} s (max {t['process_max_s']:.3f}) as a new process; {t['output_lines']} lines")
    print("consistency: " + ", ".join(f"{k} {v}" for k, v in c.items() if k != "problems")
          + (": ok" if not c["problems"] else ": FAILED: " + "; ".join(c["problems"])))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1, default=str))
    return 0 if not c["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
