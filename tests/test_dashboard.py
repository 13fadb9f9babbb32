"""`graphtune dashboard`: the mirror of a stored study into an Optuna storage (values,
params, user attrs, notes; incremental refreshes; the same from the SQL and the memory
store; graphtune's trial numbers, the held-out test trial kept out of the history, the
recommended graph marked), optuna-dashboard's JSON API over it,
the CLI command in a subprocess, and the page rendered in headless Chromium when it is
installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (pip install optuna-dashboard)")

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from optuna_dashboard import get_note  # noqa: E402

from graphtune.cli import app  # noqa: E402
from graphtune.dashboard import DashboardError, DashboardServer, StudyMirror, graph_features  # noqa: E402
from graphtune.graphs.io import from_dict  # noqa: E402
from graphtune.graphs.render import to_text  # noqa: E402
from graphtune.store import MemoryStorage, Storage, TrialRecord  # noqa: E402
from test_export import make_study  # noqa: E402

CHROMIUM = next((shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0"]
WAIT_S = 60  # generous: the machine may be loaded


@pytest.fixture(scope="module")
def study_db(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dashboard")
    make_study(tmp, name="ar", method="agent-reinforce", evaluations=8)
    return tmp / "gt.db"


def copy_db(src: Path, dst: Path) -> str:
    """A private copy of the study (SQLite's backup API: safe with WAL)."""
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    return f"sqlite:///{dst}"


def note(study: optuna.Study, trial_id: int | None = None) -> str:
    return get_note(study if trial_id is None else optuna.trial.Trial(study, trial_id))


def wait_for(fn, what: str, timeout_s: float = WAIT_S):
    """Poll ``fn`` until it returns something truthy (no fixed sleeps)."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            out = fn()
            if out:
                return out
        except (OSError, urllib.error.URLError, ValueError):
            pass
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def assert_note_fits(body: str) -> None:
    """A note stays inside the dashboard's note pane: code blocks (not wrapped there) have
    lines of at most NOTE_WIDTH characters, inline code spans are short, and so is every
    line but a table row."""
    from graphtune.dashboard import NOTE_WIDTH

    fence = None
    for line in body.splitlines():
        if line.startswith("```"):
            fence = None if fence else line[3:]
            continue
        if fence == "text":
            assert len(line) <= NOTE_WIDTH, line
        elif fence is None and not line.startswith("|"):
            assert len(line) <= 600, line
            assert all(len(span) <= NOTE_WIDTH for span in re.findall(r"`([^`]*)`", line)), line


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def add_trial(store: Storage, st, like, *, status: str = "complete", batch: int = 99, accuracy: float = 0.9):
    """Record one more trial with the graph of ``like`` (what a worker would write)."""
    metrics = {"accuracy": accuracy, "n": 10, "n_scored": 10, "n_errors": 0}
    return store.record_trial(st.id, TrialRecord(
        split="dev", batch=batch, slot=0, status=status, graph=like.graph,
        graph_hash=like.graph_hash, method=st.method, origin="sample", parents=[like.number],
        info={}, question_ids=[f"q{i}" for i in range(10)], results=[], reused=set(),
        metrics=metrics, reward=accuracy,
        cost={"units": 3.5, "flops": 1e12, "usd": 1e-5, "latency_s": 2.0}, new_runs=10))


# -- the mirror -------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:PedAnovaImportanceEvaluator computes")  # we do pass -accuracy
def test_mirror_copies_trials_values_params_attrs_and_notes(study_db):
    store = Storage(f"sqlite:///{study_db}")
    st = store.get_study("ar")
    ours = store.list_trials(st.id, split="dev")  # the held-out test trial is not an Optuna trial
    mirror = StudyMirror(store, "ar")
    stats = mirror.refresh()
    assert stats.added == len(ours) and stats.updated == 0
    study = mirror.study
    assert study.study_name == "ar" and study.metric_names == ["accuracy", "cost units"]
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    trials = study.get_trials()
    assert len(trials) == len(ours) and {t.user_attrs["split"] for t in trials} == {"dev"}
    for t, o in zip(trials, ours):
        assert t.user_attrs["graphtune_trial"] == o.number and t.user_attrs["graph_hash"] == o.graph_hash
        assert t.user_attrs["batch"] == o.batch and t.user_attrs["origin"] == o.origin
        assert t.user_attrs["parents"] == list(o.parents) and t.user_attrs["new_runs"] == o.new_runs
        assert t.state == TrialState.COMPLETE and t.values == [o.accuracy, o.cost_units]
        g = from_dict(o.graph)
        feats = graph_features(g)
        assert t.params["n_nodes"] == g.size == feats["n_nodes"] and t.params["depth"] == g.depth
        assert t.params["width"] == g.width and t.params["n_edges"] == len(g.edges)
        assert t.params["sink_model"] == g.node_map[g.sink].model
        assert sum(v for k, v in t.params.items() if k.startswith("model:")) == g.size
        assert sum(v for k, v in t.params.items() if k.startswith("role:")) == g.size
        body = note(study, t._trial_id)
        assert f"graphtune trial #{o.number}" in body and "flowchart LR" in body
        # the graph as text, one level per line (a whole graph on one line ran off the note pane)
        assert all(level in body for level in to_text(g).split(" | "))
        assert_note_fits(body)
    # one fixed distribution per param across the study (parameter importance needs that)
    dists = {}
    for t in trials:
        for k, d in t.distributions.items():
            assert dists.setdefault(k, d) == d, k
    assert {"model:llama-3.2-1b", "model:llama-3.1-70b", "role:assistant", "role:fuser"} <= set(dists)
    # the agent's feedback of a trial's batch is in its note; the study note has the timeline
    steps = store.agent_steps(st.id)
    batch1 = next(t for t in trials if t.user_attrs["batch"] == 1)
    fb = next(s["feedback"] for s in steps if s["batch"] == 1)
    assert "Agent steps of batch 1" in note(study, batch1._trial_id) and fb[:60] in note(study, batch1._trial_id)
    assert "agent-reinforce" in note(study) and "Agent timeline" in note(study)
    assert study.user_attrs["status"] == "complete" and study.user_attrs["runs_spent"] == st.runs_spent
    # parameter importance runs on the mirror
    imp = optuna.importance.get_param_importances(study, target=lambda t: -t.values[0])
    assert imp and set(imp) <= set(dists)
    assert mirror.refresh() == type(stats)(0, 0, 0)  # nothing changed, nothing written


def test_mirror_refresh_is_incremental(study_db, tmp_path):
    from graphtune.store.models import TrialRow

    store = Storage(copy_db(study_db, tmp_path / "copy.db"))
    st = store.get_study("ar")
    like = store.list_trials(st.id, split="dev")[-1]
    mirror = StudyMirror(store, "ar")
    mirror.refresh()
    n0 = len(mirror.study.get_trials())
    # a running trial (a worker is evaluating it), then it finishes
    with store.session() as s:
        row = TrialRow(study_id=st.id, number=like.number + 100, split="dev", batch=99, slot=1, status="running",
                       graph=like.graph, graph_hash=like.graph_hash, method=st.method, origin="sample",
                       parents=[], info={}, question_ids=[], metrics={})
        s.add(row)
        s.flush()
        row_id = row.id
    stats = mirror.refresh()
    assert (stats.added, stats.updated) == (1, 0)
    running = mirror.study.get_trials()[-1]
    assert running.state == TrialState.RUNNING and running.values is None
    assert running.params["n_nodes"] == from_dict(like.graph).size
    with store.session() as s:
        r = s.get(TrialRow, row_id)
        r.status, r.accuracy, r.reward, r.cost_units, r.new_runs = "complete", 0.75, 0.75, 4.25, 12
        r.question_ids, r.metrics = [f"q{i}" for i in range(12)], {"accuracy": 0.75, "n_scored": 12}
    stats = mirror.refresh()
    assert (stats.added, stats.updated) == (0, 1)
    done = mirror.study.get_trials()[-1]
    assert done._trial_id == running._trial_id and done.number == running.number
    assert done.state == TrialState.COMPLETE and done.values == [0.75, 4.25]
    assert done.user_attrs["new_runs"] == 12 and "(dev, complete)" in note(mirror.study, done._trial_id)
    # a new finished trial, a failed one, then the agent's feedback of their batch
    new = add_trial(store, st, like)
    add_trial(store, st, like, status="failed", accuracy=None)
    stats = mirror.refresh()
    assert (stats.added, stats.updated) == (2, 0)
    trials = mirror.study.get_trials()
    assert len(trials) == n0 + 3 and trials[-2].user_attrs["graphtune_trial"] == new.number
    assert trials[-2].values == [0.9, 3.5] and trials[-1].state == TrialState.FAIL and trials[-1].values is None
    fresh = store.get_study("ar")
    store.save_progress(st.id, state=fresh.searcher_state or {}, batch_index=fresh.batch_index,
                        runs_spent=fresh.runs_spent,
                        agent_steps=[{"key": "b99-feedback", "batch": 99, "kind": "feedback", "backend": "test critic",
                                      "feedback": "try a second fuser", "trial_numbers": [new.number]}])
    stats = mirror.refresh()
    assert (stats.added, stats.updated) == (0, 0) and stats.notes == 3  # the three trials of batch 99
    assert "try a second fuser" in note(mirror.study, trials[-2]._trial_id)
    assert "try a second fuser" in note(mirror.study)
    assert mirror.refresh() == type(stats)(0, 0, 0)


def test_dashboard_unknown_study_is_one_line_error(study_db):
    r = CliRunner().invoke(app, ["dashboard", "nope", "--storage", f"sqlite:///{study_db}"])
    assert r.exit_code == 1 and r.output.startswith("error: no study named 'nope'"), r.output
    assert len(r.output.strip().splitlines()) == 1


def copy_trials(src, st_src, dst, st_dst, trials) -> None:
    """Write ``trials`` of ``st_src`` into ``st_dst`` through the storage contract only."""
    paid: dict[int, set[str]] = {}
    for trial_id, r in src.paid_results(st_src.id):
        paid.setdefault(trial_id, set()).add(r.question_id)
    for t in trials:
        res = src.trial_results(t.id)
        cost = {"units": t.cost_units, "flops": t.flops, "usd": t.usd, "latency_s": t.latency_s}
        dst.record_trial(st_dst.id, TrialRecord(
            split=t.split, batch=t.batch, slot=t.slot, status=t.status, graph=t.graph, graph_hash=t.graph_hash,
            method=t.method, origin=t.origin, parents=t.parents, info=t.info, question_ids=t.question_ids,
            results=res, reused={r.question_id for r in res} - paid.get(t.id, set()), metrics=t.metrics,
            reward=t.reward, cost=cost, new_runs=t.new_runs, error=t.error, feedback=t.feedback,
            started_at=t.started_at))


def copy_study(src, dst, name: str, *, split: str | None = None):
    """The study ``name`` of ``src`` (its trials of ``split`` if given) in ``dst``, written
    through the storage contract only; agent steps as searchers write them (without the
    SQL row's own id)."""
    st = src.get_study(name)
    out = dst.create_study(name, st.method, st.spec)
    steps = [{k: v for k, v in s.items() if k not in ("id", "study_id")} for s in src.agent_steps(st.id)]
    dst.save_progress(out.id, state=st.searcher_state or {}, batch_index=st.batch_index, runs_spent=st.runs_spent,
                      agent_steps=steps)
    dst.set_status(out.id, st.status)
    copy_trials(src, st, dst, out, src.list_trials(st.id, split=split))
    return dst.get_study(name)


def mirrored(store, name: str = "ar"):
    """What a user sees of a study in the dashboard (apart from times and where it is stored)."""
    mirror = StudyMirror(store, name)
    mirror.refresh()
    study = mirror.study
    trials = [(t.number, t.state, t.values, t.params, t.distributions, t.user_attrs, note(study, t._trial_id))
              for t in study.get_trials()]
    attrs = {k: v for k, v in study.user_attrs.items() if k != "storage"}
    return mirror, trials, attrs, note(study)


def shown_recommendation(db: str) -> int:
    """The dev trial `graphtune show` names as the study's best graph."""
    r = CliRunner().invoke(app, ["show", "ar", "--storage", db], catch_exceptions=False)
    m = re.search(r"dev: reward .*?\(trial\s+#(\d+)\)", r.output, re.S)
    assert r.exit_code == 0 and m, r.output
    return int(m.group(1))


def test_a_memory_store_mirrors_like_sqlite(study_db):
    sql = Storage(f"sqlite:///{study_db}", readonly=True)
    mem = MemoryStorage()
    copy_study(sql, mem, "ar")
    m_sql, trials_sql, attrs_sql, note_sql = mirrored(sql)
    m_mem, trials_mem, attrs_mem, note_mem = mirrored(mem)
    st = sql.get_study("ar")
    assert len(trials_mem) == len(sql.list_trials(st.id, split="dev")) > 0
    # which process ran a trial is the SQL store's (optimize runs as a worker); the rest is the study's
    trials_sql = [(*t[:5], {k: v for k, v in t[5].items() if k != "worker"}, *t[6:]) for t in trials_sql]
    assert trials_mem == trials_sql  # values, params, user attrs, notes: trial by trial
    assert attrs_mem == attrs_sql and note_mem == note_sql
    assert m_mem.study.user_attrs["storage"] == "memory://" and "Agent timeline" in note_mem
    assert sum(1 for t in trials_mem if t[5].get("recommended")) == 1
    sql.close()


def test_trial_numbers_are_graphtunes_where_users_read_them(study_db):
    import graphtune.dashboard

    store = Storage(f"sqlite:///{study_db}", readonly=True)
    st = store.get_study("ar")
    ours = store.list_trials(st.id, split="dev")
    _, trials, _, _ = mirrored(store)
    for (number, *_, attrs, body), o in zip(trials, ours):
        assert attrs["graphtune_trial"] == o.number == number + 1  # Optuna counts from 0, graphtune from 1
        assert body.startswith(f"## graphtune trial #{o.number} (dev, ") and f"Optuna's Trial {number} here" in body
    assert "numbers its trials from 0" in graphtune.dashboard.__doc__


def test_the_test_trial_is_left_out_and_the_recommended_graph_is_marked(study_db):
    db = f"sqlite:///{study_db}"
    store = Storage(db, readonly=True)
    st = store.get_study("ar")
    test = store.list_trials(st.id, split="test")[-1]
    rec = shown_recommendation(db)
    assert test.parents == [rec]
    mirror, trials, attrs, study_note = mirrored(store)
    # the held-out test is no Optuna trial (not in the history, not on the Pareto front)...
    assert test.number not in [a["graphtune_trial"] for *_, a, _ in trials]
    assert all(a["split"] == "dev" for *_, a, _ in trials)
    assert all(t.user_attrs["split"] == "dev" for t in mirror.study.best_trials)
    # ...its score is in the study's attrs and note, and in the note of the trial it tested
    assert (attrs["test_trial"], attrs["test_accuracy"], attrs["test_questions"]) == (
        test.number, test.accuracy, len(test.question_ids))
    assert f"Held-out test (graphtune trial #{test.number}): accuracy {test.accuracy:.3f}" in study_note
    # the recommended graph: exactly the trial `graphtune show` names
    marked = [(a, body) for *_, a, body in trials if a.get("recommended")]
    assert [a["graphtune_trial"] for a, _ in marked] == [rec] and attrs["recommended_trial"] == rec
    assert marked[0][1].startswith(f"## graphtune trial #{rec} (dev, complete) · recommended")
    assert f"held-out test (graphtune trial #{test.number}): accuracy {test.accuracy:.3f}" in marked[0][1]
    assert f"**Recommended graph** (user attr `recommended`): graphtune trial #{rec}" in study_note


def test_a_recommendation_made_while_the_dashboard_runs_is_marked_under_the_same_url(study_db):
    sql = Storage(f"sqlite:///{study_db}", readonly=True)
    st_sql = sql.get_study("ar")
    rec = shown_recommendation(f"sqlite:///{study_db}")
    mem = MemoryStorage()
    st = copy_study(sql, mem, "ar", split="dev")  # the search before its held-out test
    mem.set_status(st.id, "running")
    with DashboardServer(mem, "ar", port=0, refresh_s=3600).start() as server:  # refreshed by hand below
        mirror = server.mirror
        url, storage0 = server.url, mirror.optuna_storage
        assert not any(t.user_attrs.get("recommended") for t in mirror.study.get_trials())
        assert "Nothing recommended yet" in note(mirror.study)
        base = f"http://127.0.0.1:{server.port}"
        sid = mirror.study._study_id
        before = wait_for(lambda: get_json(f"{base}/api/studies/{sid}")["trials"], "the study")
        # the search ends: graphtune tests its recommendation on the held-out split
        copy_trials(sql, st_sql, mem, st, sql.list_trials(st_sql.id, split="test"))
        mem.set_status(st.id, "complete")
        stats = mirror.refresh()
        assert mirror.optuna_storage is not storage0 and server.url == url  # rebuilt aside, same study id
        assert stats.added == len(before) and len(mirror.study.get_trials()) == len(before)
        marked = [t.user_attrs["graphtune_trial"] for t in mirror.study.get_trials() if t.user_attrs.get("recommended")]
        assert marked == [rec] and mirror.study.user_attrs["recommended_trial"] == rec
        assert mirror.refresh() == type(stats)(0, 0, 0)

        def served_mark():
            trials = get_json(f"{base}/api/studies/{sid}")["trials"]
            return [t for t in trials if {"key": "recommended", "value": "True"} in t["user_attrs"]]

        served = wait_for(served_mark, "the recommended trial served")
        assert len(served) == 1 and len(get_json(f"{base}/api/studies/{sid}")["trials"]) == len(before)
    # a mirror into an Optuna storage the caller gave: rebuilt there, one study under the name
    given = optuna.storages.InMemoryStorage()
    mem2 = MemoryStorage()
    st2 = copy_study(sql, mem2, "ar", split="dev")
    mirror = StudyMirror(mem2, "ar", optuna_storage=given)
    mirror.refresh()
    copy_trials(sql, st_sql, mem2, st2, sql.list_trials(st_sql.id, split="test"))
    mirror.refresh()
    assert mirror.optuna_storage is given and [s.study_name for s in given.get_all_studies()] == ["ar"]
    assert [t.user_attrs["graphtune_trial"] for t in mirror.study.get_trials() if t.user_attrs.get("recommended")] \
        == [rec]
    sql.close()


# -- serving ----------------------------------------------------------------------------------


def test_server_api_lists_the_study_live_and_read_only(study_db, tmp_path):
    store = Storage(copy_db(study_db, tmp_path / "copy.db"))
    st = store.get_study("ar")
    n = len(store.list_trials(st.id, split="dev"))  # the dashboard's trials: dev trials only
    with DashboardServer(store, "ar", port=0, refresh_s=0.3).start() as server:
        base = f"http://127.0.0.1:{server.port}"
        assert server.url.startswith(base + "/dashboard/studies/")
        studies = wait_for(lambda: get_json(base + "/api/studies")["study_summaries"], "/api/studies")
        assert [s["study_name"] for s in studies] == ["ar"]
        assert studies[0]["directions"] == ["maximize", "minimize"]
        sid = studies[0]["study_id"]
        detail = get_json(f"{base}/api/studies/{sid}")
        assert len(detail["trials"]) == n and detail["objective_names"] == ["accuracy", "cost units"]
        assert detail["best_trials"] and all(t["state"] == "Complete" for t in detail["trials"])
        assert {p["name"] for p in detail["trials"][0]["params"]} >= {"n_nodes", "depth", "width", "sink_model"}
        imp = get_json(f"{base}/api/studies/{sid}/param_importances")["param_importances"]
        assert len(imp) == 2 and {"n_nodes", "sink_model"} <= {p["name"] for p in imp[0]}
        # live: a trial stored while the dashboard runs shows up (the dashboard caches trials ~2 s)
        add_trial(store, st, store.list_trials(st.id, split="dev")[-1])
        wait_for(lambda: len(get_json(f"{base}/api/studies/{sid}")["trials"]) == n + 1, "the new trial")
        # read-only: writes are refused, nothing reaches the store
        req = urllib.request.Request(f"{base}/api/studies/{sid}/note", data=b'{"version": 1, "body": "x"}',
                                     method="PUT", headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 403 and b"read-only" in e.value.read()
        # the port is taken: one line naming the flag
        with pytest.raises(DashboardError, match="cannot listen on 127.0.0.1:.*pass another --port"):
            DashboardServer(store, "ar", port=server.port)
    assert len(store.list_trials(st.id, split="dev")) == n + 1


def _chromium(tmp: Path, url: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=15000",
                           "--window-size=1400,1200", "--dump-dom", url], capture_output=True, text=True, timeout=180)


def test_cli_serves_the_dashboard_and_chromium_renders_it(study_db, tmp_path):
    db = copy_db(study_db, tmp_path / "copy.db")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "graphtune.cli", "dashboard", "ar", "--storage", db, "--port", "0",
                             "--refresh", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).parent)
    try:
        line = proc.stdout.readline()  # blocks until the URL is printed (or the process dies)
        m = re.search(r"(http://127\.0\.0\.1:\d+)(/dashboard/studies/\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        base, page = m.groups()
        wait_for(lambda: get_json(base + "/api/studies")["study_summaries"], "the dashboard API")
        if CHROMIUM is None:
            pytest.skip("Chromium is not installed (apt-get install chromium); the API was checked")
        p = _chromium(tmp_path, base + page)
        assert p.returncode == 0, p.stderr[-2000:]
        assert "Optuna Dashboard" in p.stdout and re.search(r">\s*ar \(id=\d+\)\s*<", p.stdout), p.stdout[-2000:]
        assert "Pareto Front" in p.stdout and "accuracy" in p.stdout and "cost units" in p.stdout
        # the trials page: one row per trial, the selected trial's note shows its graph
        p = _chromium(tmp_path, base + page + "/trials")
        n = len(Storage(db).list_trials(Storage(db).get_study("ar").id, split="dev"))
        assert f">{n} Trials<" in p.stdout and ">Trial 0<" in p.stdout, p.stdout[-2000:]
        assert "graphtune trial #1" in p.stdout and "flowchart" in p.stdout
        errors = [ln for ln in p.stderr.splitlines() if ":CONSOLE" in ln and "error" in ln.lower()]
        assert errors == []
    finally:
        # SIGTERM, not SIGINT: a background job ignores SIGINT (the suite may run as one)
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0 and "dashboard stopped" in out, (out, err)


# -- one notion of best; the timeline; bounded notes -------------------------------------------


def record(store: Storage, st, like, *, n: int, accuracy: float, feedback: str = "", error: str | None = None):
    """A finished dev trial scored on ``n`` questions (racing stops trials on few)."""
    metrics = {"accuracy": accuracy, "n": n, "n_scored": n, "n_errors": 0}
    return store.record_trial(st.id, TrialRecord(
        split="dev", batch=98, slot=0, status="complete", graph=like.graph, graph_hash=like.graph_hash,
        method=st.method, origin="sample", parents=[like.number], info={}, question_ids=[f"q{i}" for i in range(n)],
        results=[], reused=set(), metrics=metrics, reward=accuracy, feedback=feedback, error=error,
        cost={"units": 3.5, "flops": 1e12, "usd": 1e-5, "latency_s": 2.0}, new_runs=n))


def dashboard_best(study: optuna.Study) -> float:
    """The top of optuna-dashboard's best line for the accuracy objective: COMPLETE
    trials whose constraints are all <= 0 (its bundle's history plot)."""
    ok = [t for t in study.get_trials() if t.state == TrialState.COMPLETE
          and all(c <= 0 for c in t.system_attrs.get("constraints", []))]
    return max(t.values[0] for t in ok)


def test_the_best_line_follows_the_trials_graphtune_ranks(study_db, tmp_path):
    from graphtune.pareto import study_points

    store = Storage(copy_db(study_db, tmp_path / "copy.db"))
    st = store.get_study("ar")
    like = store.list_trials(st.id, split="dev")[-1]
    mirror = StudyMirror(store, "ar")
    mirror.refresh()
    top = max(p.accuracy for p in study_points(store, st).points)
    assert dashboard_best(mirror.study) == pytest.approx(top)
    lucky = record(store, st, like, n=3, accuracy=1.0)  # 3 of 3 right: a small sample, not the best
    mirror.refresh()
    t = next(x for x in mirror.study.get_trials() if x.user_attrs["graphtune_trial"] == lucky.number)
    assert t.state == TrialState.COMPLETE and t.values[0] == 1.0  # its score is still shown...
    assert t.system_attrs["constraints"][0] > 0 and t.user_attrs["well_measured"] is False  # ...as infeasible
    assert "Infeasible" in note(mirror.study, t._trial_id)
    assert dashboard_best(mirror.study) == pytest.approx(top) and top < 1.0
    # the best coverage doubles: earlier full-dev scores now rest on too few questions too
    wide = record(store, st, like, n=64, accuracy=0.5)
    mirror.refresh()
    trials = mirror.study.get_trials()
    assert len(trials) == len(store.list_trials(st.id, split="dev"))
    assert dashboard_best(mirror.study) == pytest.approx(0.5)
    assert [x.user_attrs["graphtune_trial"] for x in trials if x.user_attrs.get("well_measured")] == [wide.number]
    assert max(p.accuracy for p in study_points(store, st).points) == pytest.approx(0.5)


def test_timeline_times_are_local_like_optunas_and_span_each_evaluation(study_db, monkeypatch):
    import datetime as dt

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        store = Storage(f"sqlite:///{study_db}")
        st = store.get_study("ar")
        ours = store.list_trials(st.id, split="dev")
        mirror = StudyMirror(store, "ar")
        mirror.refresh()
        for t, o in zip(mirror.study.get_trials(), ours):
            assert t.datetime_start.tzinfo is None and t.datetime_complete.tzinfo is None  # as Optuna's own
            utc = o.started_at.replace(tzinfo=dt.timezone.utc) if o.started_at.tzinfo is None else o.started_at
            assert t.datetime_start == utc.astimezone().replace(tzinfo=None)
            # the evaluation's span, not the instant the trial was written
            assert t.datetime_complete > t.datetime_start
        # Optuna's timeline (what optuna-dashboard draws with plotly) reads them against datetime.now()
        from optuna.visualization._timeline import _get_timeline_info

        info = _get_timeline_info(mirror.study)
        now = dt.datetime.now()
        assert len(info.bars) == len(ours)
        assert all(b.start <= b.complete <= now for b in info.bars)
        assert now - max(b.complete for b in info.bars) < dt.timedelta(hours=1)  # not hours off
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_long_texts_stay_inside_the_note_pane(study_db, tmp_path):
    store = Storage(copy_db(study_db, tmp_path / "copy.db"))
    st = store.get_study("ar")
    like = store.list_trials(st.id, split="dev")[-1]
    long_line = "step " + "x" * 5000 + " " + "y" * 300
    t = record(store, st, like, n=30, accuracy=0.5, feedback=long_line, error="E" * 3000)
    fresh = store.get_study("ar")
    store.save_progress(st.id, state=fresh.searcher_state or {}, batch_index=fresh.batch_index,
                        runs_spent=fresh.runs_spent,
                        agent_steps=[{"key": "b98-feedback", "batch": 98, "kind": "feedback", "backend": "critic",
                                      "feedback": long_line, "reply": "r" * 20000, "applied": {"k": "v" * 3000},
                                      "trial_numbers": [t.number]}])
    mirror = StudyMirror(store, "ar")
    mirror.refresh()
    mt = next(x for x in mirror.study.get_trials() if x.user_attrs["graphtune_trial"] == t.number)
    body = note(mirror.study, mt._trial_id)
    assert_note_fits(body)
    assert "more characters, in the store]" in body and len(body) < 20000
    assert_note_fits(note(mirror.study))
