"""The command line as a user drives it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from graphtune.cli import app
from graphtune.store import Storage

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "examples" / "quickstart.yaml")
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def db(tmp_path):
    return f"sqlite:///{tmp_path / 'g.db'}"


def test_init_writes_a_spec_that_validates(tmp_path):
    p = tmp_path / "my.yaml"
    r = run("init", p)
    assert r.exit_code == 0 and p.exists()
    assert "secrets never go in this file" in p.read_text()
    r = run("init", p)
    assert r.exit_code == 2 and "--force" in r.output
    r = run("validate", p)
    assert r.exit_code == 0, r.output
    assert "valid" in r.output and "space:" in r.output and "units" in r.output


def test_validate_sizes_a_small_space_exactly(tmp_path):
    text = Path(QUICK).read_text().replace("max_nodes: 9", "max_nodes: 2")
    p = tmp_path / "small.yaml"
    p.write_text(text)
    r = run("validate", p)
    assert r.exit_code == 0, r.output
    assert "(exact, up to isomorphism)" in r.output


def test_optimize_prints_best_graph_and_costs_then_rerun_pays_nothing(db):
    r = run("optimize", QUICK, "--storage", db, "--evaluations", 4, "--study", "t1", "--quiet")
    assert r.exit_code == 0, r.output
    for needle in ("best graph", "dev reward", "test accuracy", "units", "FLOPs", "$", "latency"):
        assert needle in r.output
    store = Storage(db)
    st = store.get_study("t1")
    n_trials, spent = st.n_trials, st.runs_spent
    assert spent == 400  # exactly the budget: the trial at the edge runs on the questions it pays for
    r2 = run("optimize", QUICK, "--storage", db, "--evaluations", 4, "--study", "t1", "--quiet")
    assert r2.exit_code == 0
    st2 = store.get_study("t1")
    assert (st2.n_trials, st2.runs_spent) == (n_trials, spent)
    best_line = next(l for l in r.output.splitlines() if "test accuracy" in l)
    assert best_line in r2.output
    # more evaluations continue the same study
    r3 = run("optimize", QUICK, "--storage", db, "--evaluations", 6, "--study", "t1", "--quiet")
    assert r3.exit_code == 0 and store.get_study("t1").runs_spent == 600


def test_changed_spec_is_refused_unless_forced(db):
    assert run("optimize", QUICK, "--storage", db, "-n", 2, "--study", "t2", "-q").exit_code == 0
    r = run("optimize", QUICK, "--storage", db, "-n", 2, "--study", "t2", "--seed", 5, "-q")
    assert r.exit_code == 2 and "search.seed changed" in r.output


def test_listing_commands(db):
    run("optimize", QUICK, "--storage", db, "-n", 2, "--study", "t3", "-q")
    r = run("studies", "--storage", db)
    assert "t3" in r.output and "complete" in r.output
    r = run("trials", "t3", "--storage", db, "--top", 2)
    assert r.exit_code == 0 and "A:" in r.output
    r = run("show", "t3", "--storage", db)
    assert "best graph" in r.output and "flowchart" in r.output and "test: accuracy" in r.output
    r = run("show", "t3", "1", "--storage", db)
    assert "trial #1" in r.output and "reward" in r.output
    r = run("show", "t3", "999", "--storage", db)
    assert r.exit_code == 1 and "no trial #999" in r.output
    r = run("show", "nope", "--storage", db)
    assert "no study named 'nope'" in r.output and "t3" in r.output


def test_bad_spec_is_one_line_exit_2_and_writes_nothing(tmp_path, db):
    p = tmp_path / "bad.yaml"
    p.write_text(Path(QUICK).read_text().replace("max_depth: 4", "max_depht: 4"))
    r = run("optimize", p, "--storage", db)
    assert r.exit_code == 2
    assert r.output.strip().count("\n") == 0 and "did you mean 'max_depth'" in r.output
    assert not (tmp_path / "g.db").exists()


def test_unknown_method_flag(db):
    r = run("optimize", QUICK, "--storage", db, "--method", "nope")
    assert r.exit_code == 2 and "known methods" in r.output


def test_missing_store_is_a_clear_error(tmp_path):
    r = run("studies", "--storage", f"sqlite:///{tmp_path / 'none.db'}")
    assert r.exit_code == 1 and "no store at" in r.output


def test_console_script_help_runs():
    r = subprocess.run([sys.executable, "-m", "graphtune.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "optimize" in r.stdout
    # heavy modules stay out of start-up
    r = subprocess.run([sys.executable, "-c", "import sys, graphtune.cli; "
                        "print(sorted(m for m in ('litellm','sqlalchemy','numpy','optuna','scipy') if m in sys.modules))"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("method", ["agent-reinforce", "reinforce", "random", "tpe", "cmaes", "qmc", "nsga2",
                                    "llm-opt"])
def test_every_searcher_runs_from_the_cli_on_the_quickstart(method, db):
    r = run("optimize", QUICK, "--storage", db, "--method", method, "-n", 3, "--study", method, "-q")
    assert r.exit_code == 0, r.output
    assert "best graph" in r.output and "test accuracy" in r.output
    assert Storage(db).get_study(method).runs_spent == 300  # exactly the budget


def test_exhaustive_from_the_cli_on_a_small_space(tmp_path, db):
    p = tmp_path / "small.yaml"
    p.write_text(Path(QUICK).read_text().replace("max_nodes: 9", "max_nodes: 2"))
    r = run("optimize", p, "--storage", db, "--method", "exhaustive", "-n", 1000, "-q")
    assert r.exit_code == 0, r.output
    assert "stopped: exhausted" in r.output


# -- two optimize processes on one study join as workers (issue 11): real processes -------------

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

PG_URL = os.environ.get("GRAPHTUNE_TEST_POSTGRES_URL")
SQL = ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(
    not PG_URL, reason="set GRAPHTUNE_TEST_POSTGRES_URL (bash scripts/postgres.sh start) to test PostgreSQL"))]

# an optimize process slowed down per trial (so a second process meets it running)
SLOW_OPTIMIZE = r"""
import sys, time
from graphtune.api import optimize
from graphtune.spec import load_spec
spec = load_spec(sys.argv[1], overrides={"storage": sys.argv[2], "study": sys.argv[3], "search.evaluations": 8})
def slow(ev):
    print("TRIAL", ev["trial"], flush=True)
    time.sleep(0.3)
optimize(spec, progress=slow)
print("DONE", flush=True)
"""


def cli(*args, as_nobody: bool = False, **kw):
    # root may write anything: a read-only store is only read-only to another user
    who = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if as_nobody else []
    return subprocess.run([*who, sys.executable, "-m", "graphtune.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, **kw)


def store_url(kind, tmp_path):
    if kind == "postgresql":
        from test_store import fresh_postgres

        return fresh_postgres(PG_URL)
    return f"sqlite:///{tmp_path / 'g.db'}"


def _slow_optimize(url: str, study: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_OPTIMIZE, QUICK, url, study], stdout=subprocess.PIPE,
                            text=True)


def _check_study(url: str, study: str) -> list[dict]:
    store = Storage(url, readonly=True)
    st = store.get_study(study)
    trials = store.list_trials(st.id)
    places = [(t.split, t.batch, t.slot) for t in trials]
    assert len(places) == len(set(places)), "a place of the search was evaluated twice"
    assert sum(t.new_runs for t in trials if t.split == "dev") == st.runs_spent  # nothing paid twice
    assert st.status == "complete" and st.runs_spent == 800
    assert all(t.status == "complete" for t in trials)
    workers = store.list_workers(st.id)
    store.close()
    return workers


@pytest.mark.parametrize("kind", SQL)
def test_a_second_optimize_joins_the_first_as_a_worker_and_a_killed_one_is_taken_over_at_once(kind, tmp_path):
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    from workers_check import compare, snapshot

    url = store_url(kind, tmp_path)
    ref = f"sqlite:///{tmp_path / 'ref.db'}"
    assert cli("optimize", QUICK, "--storage", ref, "--study", "twice", "-n", 8, "-q").returncode == 0
    first = _slow_optimize(url, "twice")
    try:
        for _ in range(3):  # it runs the study and has stored trials
            assert first.stdout.readline().startswith("TRIAL")
        second = cli("optimize", QUICK, "--storage", url, "--study", "twice", "-n", 8, "-q")
        assert second.returncode == 0, second.stderr
        assert "best graph" in second.stdout and "held out" in second.stdout
        rest = first.communicate(timeout=120)[0]
        assert first.returncode == 0 and rest.rstrip().endswith("DONE")  # the first one finished too
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        first.stdout.close()
    workers = _check_study(url, "twice")
    assert [w["status"] for w in workers] == ["stopped", "stopped"]
    assert all(w["trials_done"] > 0 for w in workers), workers  # the work was shared
    assert compare(snapshot(url, "twice"), snapshot(ref, "twice")) == []  # the one search, not two

    # a killed optimize: the next one takes its claimed trial over at once (same machine)
    killed = _slow_optimize(url, "killed")
    try:
        for _ in range(3):
            assert killed.stdout.readline().startswith("TRIAL")
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        killed.stdout.close()
    t0 = time.monotonic()
    again = cli("optimize", QUICK, "--storage", url, "--study", "killed", "-n", 8, "-q")
    assert again.returncode == 0, again.stderr
    assert time.monotonic() - t0 < 45  # not the 60 s stale timeout
    assert [w["status"] for w in _check_study(url, "killed")] == ["stopped", "stopped"]


# -- read-only stores and in-memory URLs (defect 12) -------------------------------------------


def test_read_only_commands_work_on_a_store_nobody_may_write():
    """The store's file and folder are read-only (as another user when the tests run as root)."""
    import shutil

    base = Path(tempfile.mkdtemp(prefix="gt-ro-"))
    out = Path(tempfile.mkdtemp(prefix="gt-out-"))
    os.chmod(base, 0o755)
    os.chmod(out, 0o777)
    try:
        url = f"sqlite:///{base / 'g.db'}"
        r = cli("optimize", QUICK, "--storage", url, "-n", 2, "--study", "ro", "-q")
        assert r.returncode == 0, r.stderr
        os.chmod(base / "g.db", 0o444)
        os.chmod(base, 0o555)
        if os.geteuid() == 0 and not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot make a store read-only")
        kw = {"as_nobody": os.geteuid() == 0, "cwd": out}
        commands = [["studies"], ["trials", "ro"], ["show", "ro"], ["show", "ro", "1"],
                    ["report", "ro", "-o", str(out / "r.html")], ["export", "ro", "-o", str(out / "g.yaml")],
                    ["pareto", "ro"], ["dump", "ro", "-o", str(out / "d.json")],
                    ["optimize", QUICK, "-n", "3", "--study", "ro", "-q"]]
        # one process (one start-up) runs them all, as the other user
        script = ("import json, sys; from typer.testing import CliRunner; from graphtune.cli import app; "
                  "print(json.dumps([(lambda r: [r.exit_code, r.output])(CliRunner().invoke(app, a + ['--storage', "
                  f"{url!r}])) for a in json.loads(sys.argv[1])]))")
        who = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if kw["as_nobody"] else []
        r = subprocess.run([*who, sys.executable, "-c", script, json.dumps(commands)], capture_output=True,
                           text=True, cwd=out, timeout=300)
        assert r.returncode == 0, r.stderr
        results = json.loads(r.stdout.strip().splitlines()[-1])
        for args, (code, output) in zip(commands[:-1], results[:-1]):
            assert code == 0, (args, output)
        assert "ro" in results[0][1] and "best graph" in results[2][1]
        # a command that writes says the store is read-only, in one line
        code, output = results[-1]
        assert code == 1 and output.strip().count("\n") == 0 and "read-only" in output, output
    finally:
        os.chmod(base, 0o755)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///"])
def test_unnamed_in_memory_stores_are_refused_for_commands_that_keep_a_study(url):
    for args in (("optimize", QUICK, "--storage", url), ("resume", "quickstart", "--storage", url),
                 ("worker", "--study", "quickstart", "--storage", url, "--spec", QUICK)):
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 1, (args, r.output)
        assert r.output.strip().count("\n") == 0 and "in-memory SQLite store" in r.output, r.output
        assert "--storage sqlite:///graphtune.db" in r.output


def test_a_full_disk_is_one_line(tmp_path, monkeypatch):
    from test_store import _small_disk

    url = f"sqlite:///{tmp_path / 'full.db'}"
    Storage(url).close()
    _small_disk(monkeypatch, pages=60)
    r = runner.invoke(app, ["optimize", QUICK, "--storage", url, "-n", 20, "-q"])
    assert r.exit_code == 1
    assert r.output.strip().count("\n") == 0 and "disk is full" in r.output and "free disk space" in r.output


# -- passwords (defect 13) ---------------------------------------------------------------------


def test_a_storage_password_is_masked_in_errors_and_never_stored(tmp_path):
    from graphtune.api import stored_spec
    from graphtune.spec import load_spec

    url = "postgresql+psycopg://alice:hunter2secret@127.0.0.1:1/db"
    for args in (("studies",), ("show", "x"), ("optimize", QUICK, "-q"), ("storage", "upgrade")):
        r = runner.invoke(app, [*args, "--storage", url])
        assert r.exit_code != 0 and "hunter2secret" not in r.output and "***" in r.output, (args, r.output)
    spec = load_spec(QUICK, overrides={"storage": url})
    assert stored_spec(spec)["storage"] == "postgresql+psycopg://alice@127.0.0.1:1/db"


@pytest.mark.skipif(not PG_URL, reason="set GRAPHTUNE_TEST_POSTGRES_URL to test PostgreSQL")
def test_a_storage_password_is_masked_in_the_result_panel_hints_and_studies_on_postgres():
    from sqlalchemy.engine import make_url

    from test_store import fresh_postgres

    url = make_url(fresh_postgres(PG_URL)).set(password="hunter2secret").render_as_string(hide_password=False)
    r = run("optimize", QUICK, "--storage", url, "-n", 2, "--study", "pw", "-q")
    assert r.exit_code == 0, r.output
    assert "hunter2secret" not in r.output and "***" in r.output and "next: graphtune show pw" in r.output
    for args in (("studies",), ("show", "pw"), ("trials", "pw")):
        r = run(*args, "--storage", url)
        assert r.exit_code == 0 and "hunter2secret" not in r.output
    st = Storage(url).get_study("pw")
    assert "hunter2secret" not in repr(st.spec) and st.spec["storage"].startswith("postgresql")
    r = run("resume", "pw", "--storage", url, "-n", 3, "-q")  # the URL is given again: the study runs on
    assert r.exit_code == 0 and "hunter2secret" not in r.output, r.output


# -- messages (issue 14) -------------------------------------------------------------------------


def test_init_names_the_study_after_the_file(tmp_path):
    from graphtune.spec import load_spec

    p = tmp_path / "my search.yaml"
    assert run("init", p).exit_code == 0
    assert load_spec(p).study == "my-search"  # not "quickstart": a first own spec starts its own study


def test_delete_without_a_terminal_asks_for_yes_in_one_line(db):
    assert run("optimize", QUICK, "--storage", db, "-n", 1, "--study", "gone", "-q").exit_code == 0
    r = cli("delete", "gone", "--storage", db, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert "no terminal" in r.stderr and "--yes" in r.stderr and "internal error" not in r.stderr
    assert Storage(db, readonly=True).get_study("gone") is not None  # nothing deleted
    assert cli("delete", "gone", "--storage", db, "--yes").returncode == 0


@pytest.mark.parametrize("arg", ["graphtune.db", "runs/g.db"])
def test_a_storage_that_is_not_a_url_is_answered_with_the_url_to_write(arg, tmp_path):
    for cmd in (["studies"], ["optimize", QUICK, "-q"]):
        r = cli(*cmd, "--storage", arg, cwd=tmp_path)
        assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
        assert f"write sqlite:///{arg}" in r.stderr and "<storage url>" not in r.stderr


def test_trials_top_ranks_well_measured_scores_first_and_marks_the_recommended_one(db):
    assert run("optimize", QUICK, "--storage", db, "-n", 6, "--study", "top", "-q").exit_code == 0
    r = run("trials", "top", "--storage", db, "--top", 8)
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert "* = the recommended graph's trial" in lines[0]
    rows = [ln.split() for ln in lines[2:]]
    n = [int(x[3]) for x in rows]
    most = max(n)
    assert all(a >= most // 2 or b < most // 2 for a, b in zip(n, n[1:]))  # small-sample scores come last
    assert sum(x[0].endswith("*") for x in rows) == 1  # the recommended trial is listed and marked
    st = Storage(db, readonly=True)
    s = st.get_study("top")
    rec = [t for t in st.list_trials(s.id, split="test")][-1].parents[0]
    assert any(x[0] == f"{rec}*" for x in rows)


def test_validate_prints_what_matters_and_refuses_an_unset_api_key(tmp_path, monkeypatch):
    r = run("validate", QUICK)
    assert r.exit_code == 0
    assert len(r.output.splitlines()) < 30 and "null" not in r.output  # was 130 lines of resolved spec
    assert "models: llama-3.2-1b" in r.output and "budget per query: units <= 18" in r.output
    # the quickstart's largest model cannot fit its budget: said, not silently dropped
    assert "warning: model 'llama-3.1-70b' can never be used" in r.output
    assert "search:" in run("validate", QUICK, "--full").output  # the whole resolved spec on request
    spec = tmp_path / "live.yaml"
    spec.write_text(f"""study: live
task: {{dataset: {ROOT / 'examples' / 'data' / 'easy-arith.jsonl'}, scorer: numeric, dev_size: 4, test_size: 4}}
models:
  - {{name: llama-3.2-1b, litellm: openai/gpt-4o-mini, api_key_env: GT_TEST_UNSET_KEY}}
budget: {{units: 4}}
env: {{kind: live}}
storage: sqlite:///{tmp_path / 'g.db'}
""")
    monkeypatch.delenv("GT_TEST_UNSET_KEY", raising=False)
    r = cli("validate", spec)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "model 'llama-3.2-1b': environment variable GT_TEST_UNSET_KEY (api_key_env) is not set" in r.stderr
    monkeypatch.setenv("GT_TEST_UNSET_KEY", "sk-test-000000")
    r = cli("validate", spec)
    assert r.returncode == 0, r.stderr


def test_studies_and_trials_print_json_and_yaml_and_tables_never_break_words(db):
    import yaml

    assert run("optimize", QUICK, "--storage", db, "-n", 2, "--study", "a-study-with-a-long-name", "-q").exit_code == 0
    got = json.loads(run("studies", "--storage", db, "-f", "json").output)
    assert [s["name"] for s in got] == ["a-study-with-a-long-name"] and got[0]["status"] == "complete"
    rows = yaml.safe_load(run("trials", "a-study-with-a-long-name", "--storage", db, "--format", "yaml").output)
    assert rows and {"number", "split", "questions", "reward", "recommended", "graph"} <= set(rows[0])
    assert sum(r["recommended"] for r in rows) == 1
    bad = run("studies", "--storage", db, "-f", "csv")
    assert bad.exit_code == 2 and "'csv' is not one of" in bad.output
    narrow = cli("studies", "--storage", db, env={**os.environ, "COLUMNS": "40"})
    assert "a-study-with-a-long-name" in narrow.stdout and "agent-reinforce" in narrow.stdout  # words whole
