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
    assert 400 <= spent < 500  # the candidate in progress when the budget ran out is finished
    r2 = run("optimize", QUICK, "--storage", db, "--evaluations", 4, "--study", "t1", "--quiet")
    assert r2.exit_code == 0
    st2 = store.get_study("t1")
    assert (st2.n_trials, st2.runs_spent) == (n_trials, spent)
    best_line = next(l for l in r.output.splitlines() if "test accuracy" in l)
    assert best_line in r2.output
    # more evaluations continue the same study
    r3 = run("optimize", QUICK, "--storage", db, "--evaluations", 6, "--study", "t1", "--quiet")
    assert r3.exit_code == 0 and 600 <= store.get_study("t1").runs_spent < 700


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
    assert Storage(db).get_study(method).runs_spent >= 300


def test_exhaustive_from_the_cli_on_a_small_space(tmp_path, db):
    p = tmp_path / "small.yaml"
    p.write_text(Path(QUICK).read_text().replace("max_nodes: 9", "max_nodes: 2"))
    r = run("optimize", p, "--storage", db, "--method", "exhaustive", "-n", 1000, "-q")
    assert r.exit_code == 0, r.output
    assert "stopped: exhausted" in r.output
