"""Kill -9 a live search at random moments, resume it each time, and compare with an
uninterrupted run of the same seed.

For each method (default: ``agent-reinforce`` and the Optuna ``tpe`` sampler) it runs:

1. a reference: ``graphtune optimize SPEC`` uninterrupted (its own store);
2. ``graphtune resume`` of the finished reference, which must evaluate and call nothing;
3. the same spec in a second store: ``graphtune optimize SPEC``, killed with SIGKILL after
   a random delay, then ``graphtune resume STUDY`` killed again, ...: at least ``--kills`` kills land inside
   the search (a random moment after the process's first LLM request), about one in five
   more at a random moment of start-up; then it is resumed until it finishes.

Then it checks: the same trials (place in the search, graph, questions, reward), the same
best graph and test score, the same searcher state and agent steps, no duplicate trial,
no LLM call recorded twice in the call ledger; and it counts every request at the fake
OpenAI-compatible endpoint (tests/fake_openai_server.py, deterministic replies): requests
beyond the reference's are only ones in flight when a process was killed (a request the
server received but whose reply the dead process had not yet committed to the ledger:
the calls in flight, plus replies within the ledger's 50 ms write-behind window).

Usage: python tests/kill9_resume.py [--kills 10] [--methods agent-reinforce,tpe] [--seed 0]
           [--json FILE] [--pipeline]
``--pipeline`` runs the same checks on a two-stage live pipeline (a draft, then a check whose
prompt holds the draft) searched by the given methods (e.g. ``--methods random``).
Every run is a real process forked from this one after it imported graphtune and litellm
(start-up in milliseconds), killed with a real SIGKILL. Exit status 0 when every check
holds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from fake_openai_server import FakeOpenAIServer  # noqa: E402

DATASET = ROOT / "examples" / "data" / "easy-arith.jsonl"
CONCURRENCY = 4
#: requests a kill may leave unrecorded: the ``CONCURRENCY`` in flight, plus replies that
#: arrived within the call ledger's write-behind window (store/ledger.py WRITE_LINGER_S)
IN_FLIGHT_PER_KILL = 3 * CONCURRENCY

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
  method: {method}
  evaluations: {evaluations}
  batch_size: 4
  seed: {seed}
  options: {options}
env:
  kind: live
  concurrency: {concurrency}
  max_tokens: 32
storage: {storage}
"""


#: a two-stage live pipeline on the same endpoint (``--pipeline``): a draft, then a check
#: whose prompt holds the draft
PIPELINE_SPEC = """\
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
pipeline:
  stages:
    - name: draft
      space: {{max_nodes: 3, max_depth: 2}}
    - name: check
      prompt: "Check this draft answer: {{draft}}\\nQuestion: {{question}}"
      space: {{max_nodes: 3, max_depth: 2}}
budget:
  units: 12
objective:
  cost_weight: 0.01
search:
  method: {method}
  evaluations: {evaluations}
  batch_size: 4
  seed: {seed}
  options: {options}
env:
  kind: live
  concurrency: {concurrency}
  max_tokens: 32
storage: {storage}
"""


def preload(api_base: str) -> None:
    """Import everything a live search imports, once, in this process, and make one call
    (litellm initialises lazily on its first call): every run below is a child forked from
    here (a real process, killed with a real SIGKILL), so its start-up takes milliseconds
    instead of litellm's import (about 10 s on two busy cores). No thread survives this
    (checked), so forking is safe."""
    import asyncio
    import threading

    import graphtune.api  # noqa: F401
    import graphtune.cli  # noqa: F401
    import graphtune.envs.live  # noqa: F401
    import graphtune.search.agent_reinforce  # noqa: F401
    import graphtune.search.optuna_search  # noqa: F401
    import graphtune.store.ledger  # noqa: F401
    import litellm  # noqa: F401

    try:
        import math_verify  # noqa: F401
    except ImportError:
        pass

    async def call():
        return await litellm.acompletion(model="openai/echo", api_base=api_base, api_key="unused",
                                         messages=[{"role": "user", "content": "warm-up"}], max_tokens=4)

    asyncio.run(call())
    if threading.active_count() != 1:
        raise RuntimeError(f"threads alive before fork: {threading.enumerate()}")


def _child(args: list[str], cwd: Path, log: Path, setup=None) -> None:
    code = 1
    try:
        os.setsid()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(cwd)
        sys.argv = ["graphtune", *args]
        if setup is not None:  # a fault hook of tests/process_faults.py, installed in this child only
            setup()
        from graphtune.cli import main

        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported through the exit status and the log
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def run_cli(args: list[str], *, cwd: Path, kill=None, setup=None, check: bool = True,
            log: Path | None = None) -> tuple[int | None, float]:
    """Run a graphtune command in a forked child. ``kill(t)`` (optional) is polled every
    20 ms while it runs and returns True to SIGKILL it; ``setup()`` (optional) runs in the
    child before the command (a fault hook). Returns (exit code, or None when killed; wall
    seconds); a non-zero exit raises unless ``check`` is False."""
    log = log or cwd / "last-run.log"
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        _child(args, cwd, log, setup)
    status = None
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            t = time.perf_counter() - t0
            if t > 300:
                raise RuntimeError(f"graphtune {' '.join(args)} did not finish in 300 s")
            if kill is not None and kill(t):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None, time.perf_counter() - t0
            time.sleep(0.02)
    finally:
        if status is None:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and check:
        raise RuntimeError(f"graphtune {' '.join(args)} failed ({code}):\n{log.read_text()[-3000:]}")
    return code, time.perf_counter() - t0


def snapshot(db: Path, study: str) -> dict:
    """What must be identical between the reference and the killed-and-resumed run."""
    con = sqlite3.connect(db)
    try:
        sid, state, status, spent, nb = con.execute(
            "select id, searcher_state, status, runs_spent, batch_index from gt_studies where name=?", (study,)).fetchone()
        trials = con.execute(
            "select number, split, batch, slot, status, graph_hash, question_ids, reward, accuracy, new_runs, error "
            "from gt_trials where study_id=? order by number", (sid,)).fetchall()
        places = con.execute("select split, batch, slot, count(*) from gt_trials where study_id=? "
                             "group by split, batch, slot having count(*) > 1", (sid,)).fetchall()
        steps = con.execute("select key, batch, kind, parsed, applied, rejected_reason from gt_agent_steps "
                            "where study_id=? order by key", (sid,)).fetchall()
        dup_calls = con.execute("select key, count(*) from gt_llm_calls where error is null group by key "
                                "having count(*) > 1").fetchall()
        n_calls = con.execute("select count(*) from gt_llm_calls").fetchone()[0]
        test = con.execute("select graph_hash, parents, accuracy from gt_trials where study_id=? and split='test'",
                           (sid,)).fetchall()
    finally:
        con.close()
    return {"status": status, "runs_spent": spent, "batch_index": nb, "state": json.loads(state) if state else None,
            "trials": trials, "duplicate_places": places, "agent_steps": steps, "duplicate_ledger_calls": dup_calls,
            "ledger_rows": n_calls, "test": test}


def _comparable(state):
    """A searcher state without wall-clock measurements (the agent's own seconds)."""
    state = json.loads(json.dumps(state))
    if isinstance(state, dict) and isinstance(state.get("usage"), dict):
        state["usage"].pop("seconds", None)
    return state


def study_exists(db: Path, study: str) -> bool:
    if not db.exists():
        return False
    con = sqlite3.connect(db, timeout=30)
    try:
        names = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        return "gt_studies" in names and con.execute("select 1 from gt_studies where name=?", (study,)).fetchone() is not None
    finally:
        con.close()


def check_method(method: str, *, kills: int, seed: int, work: Path, server: FakeOpenAIServer,
                 rng: random.Random, evaluations: int, pipeline: bool = False) -> dict:
    options = "{n_startup_trials: 4}" if method == "tpe" else "{}"
    label = f"pipeline-{method}" if pipeline else method
    study = f"k9-{label}"
    template = PIPELINE_SPEC if pipeline else SPEC

    def write_spec(name: str, db: Path) -> Path:
        p = work / f"{name}.yaml"
        p.write_text(template.format(study=study, dataset=DATASET, api_base=server.api_base, method=method,
                                 evaluations=evaluations, seed=seed, options=options, concurrency=CONCURRENCY,
                                 storage=f"sqlite:///{db}"))
        return p

    # 1. the uninterrupted reference
    ref_db = work / f"ref-{label}.db"
    ref_spec = write_spec(f"ref-{label}", ref_db)
    server.reset()
    first: list[float] = []

    def watch(t):  # when does the first LLM request arrive? (the search proper starts there)
        if not first and server.requests() > 0:
            first.append(t)
        return False

    _, ref_wall = run_cli(["optimize", str(ref_spec), "--quiet"], cwd=work, kill=watch)
    ref_requests = server.requests()
    ref = snapshot(ref_db, study)

    # 2. resuming a finished study runs nothing (and tells how long a start-up takes)
    _, startup_s = run_cli(["resume", study, "--storage", f"sqlite:///{ref_db}", "--quiet"], cwd=work)
    if server.requests() != ref_requests:
        raise AssertionError(f"{label}: resuming a finished study made {server.requests() - ref_requests} calls")
    # each kill inside the search lets it progress by about half a slice
    search_s = ref_wall - (first[0] if first else startup_s)
    slice_s = max(0.05, search_s / kills)

    # 3. killed again and again; when a search finishes before enough kills landed inside
    #    it, another round starts in a new store (each round is checked on its own)
    n_kills = n_mid = attempts = requests = extra_total = 0
    delays: list[float] = []
    problems: list[str] = []
    rounds = 0
    got = ref
    while n_mid < kills and rounds < 4:
        rounds += 1
        db = work / f"kill-{label}-{rounds}.db"
        spec = write_spec(f"kill-{label}-{rounds}", db)
        server.reset()
        finished = False
        round_kills = 0
        while not finished:
            attempts += 1
            if attempts > 20 * kills:
                raise AssertionError(f"{label}: no progress after {attempts} attempts")
            # until the study is in the store (a kill during the first start-up), start it again
            args = (["resume", study, "--storage", f"sqlite:///{db}", "--quiet"] if study_exists(db, study) else
                    ["optimize", str(spec), "--quiet"])
            kill = None
            base = server.requests()
            if n_mid < kills:
                if rng.random() < 0.2:
                    # a random moment of start-up (imports, opening the store, building the problem)
                    at = rng.uniform(0.0, startup_s)
                    kill = lambda t, at=at: t >= at  # noqa: E731
                else:
                    # a random moment of the search: once this process has made its first LLM request
                    extra = rng.uniform(0.0, slice_s)
                    seen: list[float] = []

                    def kill(t, base=base, extra=extra, seen=seen):  # noqa: F811
                        if not seen:
                            if server.requests() > base:
                                seen.append(t)
                            return False
                        return t >= seen[0] + extra
            code, wall = run_cli(args, kill=kill, cwd=work)
            if code is None:
                n_kills += 1
                round_kills += 1
                delays.append(round(wall, 2))
                if server.requests() > base:  # it had started calling: the kill landed inside the search
                    n_mid += 1
            else:
                finished = True
        round_requests = server.requests()
        requests += round_requests
        got = snapshot(db, study)
        problems += [f"round {rounds}: {p}" for p in compare(got, ref, round_requests - ref_requests, round_kills,
                                                             ref_requests)]
        extra_total += round_requests - ref_requests
    if n_mid < kills:
        problems.append(f"only {n_mid} kills inside the search")
    return {"method": label, "rounds": rounds, "kills": n_kills, "kills_mid_search": n_mid,
            "resumes": attempts - rounds, "kill_delays_s": delays, "trials": len(got["trials"]),
            "trials_match": not any("trials differ" in p for p in problems),
            "best_graph_match": not any("best graph" in p for p in problems),
            "state_match": not any("searcher state" in p for p in problems),
            "duplicate_trials": len(got["duplicate_places"]),
            "repeated_llm_calls": len(got["duplicate_ledger_calls"]),
            "reference_requests": ref_requests * rounds, "requests": requests,
            "extra_requests_in_flight_at_kills": extra_total, "reference_wall_s": round(ref_wall, 2),
            "startup_s": round(startup_s, 2), "search_s": round(search_s, 2), "problems": problems}


def compare(got: dict, ref: dict, extra: int, n_kills: int, ref_requests: int) -> list[str]:
    """What differs between a killed-and-resumed run and the reference."""
    problems = []
    if got["status"] != "complete":
        problems.append(f"status {got['status']}")
    if got["trials"] != ref["trials"]:
        diff = next((i for i, (a, b) in enumerate(zip(got["trials"], ref["trials"])) if a != b),
                    min(len(got["trials"]), len(ref["trials"])))
        problems.append(f"trials differ from the reference (first at index {diff}: "
                        f"{got['trials'][diff:diff + 1]} vs {ref['trials'][diff:diff + 1]}; "
                        f"{len(got['trials'])} vs {len(ref['trials'])} trials)")
    if got["test"] != ref["test"]:
        problems.append(f"best graph / test trial differ: {got['test']} vs {ref['test']}")
    if _comparable(got["state"]) != _comparable(ref["state"]):
        problems.append("final searcher state differs from the reference")
    if got["agent_steps"] != ref["agent_steps"]:
        problems.append("agent steps differ from the reference")
    if (got["runs_spent"], got["batch_index"]) != (ref["runs_spent"], ref["batch_index"]):
        problems.append(f"budget/batches {got['runs_spent']}/{got['batch_index']} vs "
                        f"{ref['runs_spent']}/{ref['batch_index']}")
    if got["duplicate_places"]:
        problems.append(f"duplicate trials: {got['duplicate_places']}")
    if got["duplicate_ledger_calls"]:
        problems.append(f"{len(got['duplicate_ledger_calls'])} LLM calls recorded twice in the ledger")
    if extra < 0 or extra > n_kills * IN_FLIGHT_PER_KILL:
        problems.append(f"{extra} requests beyond the reference's {ref_requests}: more than the "
                        f"{n_kills * IN_FLIGHT_PER_KILL} that can be in flight at {n_kills} kills")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10, help="kills per method (at least)")
    ap.add_argument("--methods", default="agent-reinforce,tpe")
    ap.add_argument("--seed", type=int, default=0, help="search seed (also seeds the kill moments)")
    ap.add_argument("--evaluations", type=int, default=8, help="search budget in full-dev evaluations")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--workdir", type=Path, help="keep the stores here (default: a temporary folder)")
    ap.add_argument("--pipeline", action="store_true", help="search a two-stage live pipeline (draft, then check) "
                                                            "instead of single graphs; its results are named "
                                                            "pipeline-METHOD")
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="graphtune-kill9-") as tmp, FakeOpenAIServer() as server:
        preload(server.api_base)
        work = a.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for method in a.methods.split(","):
            r = check_method(method.strip(), kills=a.kills, seed=a.seed, work=work, server=server, rng=rng,
                             evaluations=a.evaluations, pipeline=a.pipeline)
            results.append(r)
            status = "ok" if not r["problems"] else "FAILED: " + "; ".join(r["problems"])
            print(f"{r['method']}: {r['rounds']} round(s), {r['kills']} kills ({r['kills_mid_search']} mid-search), {r['resumes']} resumes, "
                  f"{r['trials']} trials identical={r['trials_match']}, best graph identical={r['best_graph_match']}, "
                  f"state identical={r['state_match']}, duplicate trials {r['duplicate_trials']}, repeated LLM calls "
                  f"{r['repeated_llm_calls']}, endpoint requests {r['requests']} vs {r['reference_requests']} "
                  f"uninterrupted ({r['extra_requests_in_flight_at_kills']} in flight at kills): {status}", flush=True)
    total = time.perf_counter() - t0
    print(f"total {total:.1f} s")
    if a.json:
        a.json.write_text(json.dumps({"results": results, "total_s": total}, indent=1))
    return 0 if all(not r["problems"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
