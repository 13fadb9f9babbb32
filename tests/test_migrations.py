"""Schema migrations: the migrations build exactly the code's tables, old stores are
refused with the command that fixes them, and `graphtune storage upgrade` works; a
graphtune store and an Optuna storage share a database without harm."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from graphtune.errors import StoreError
from graphtune.store import Storage
from graphtune.store.migrations import HEAD, LEGACY_VERSION_TABLE, REVISIONS, VERSION_TABLE, script_head
from graphtune.store.models import Base
from graphtune.store.storage import shared_sqlite_warning

#: written by graphtune at revision 0002 (before the gt_ prefix): `graphtune optimize
#: examples/quickstart.yaml` with dev_size 10, test_size 10, --evaluations 3, then a worker
#: row and one call-ledger row; its counts are below
STORE_0002 = Path(__file__).parent / "data" / "store_0002.db"
STORE_0002_ROWS = {"studies": 1, "trials": 4, "question_results": 40, "agent_steps": 1, "llm_calls": 1, "workers": 2,
                   "llm_call_claims": 0}
GT_TABLES = {f"gt_{t}" for t in STORE_0002_ROWS} | {"gt_alembic_version"}


def _diff(url: str) -> list:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    eng = create_engine(url)
    try:
        with eng.connect() as c:
            return compare_metadata(MigrationContext.configure(c, opts={"compare_type": True, "version_table": VERSION_TABLE}), Base.metadata)
    finally:
        eng.dispose()


def test_head_constant_is_the_head_of_the_versions_folder():
    assert script_head() == HEAD == REVISIONS[-1]


def _tables(db) -> set[str]:
    con = sqlite3.connect(db)
    try:
        return {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
    finally:
        con.close()


def _names(db) -> set[str]:
    """Every table and index name in the SQLite file ``db`` (SQLite's own autoindexes aside)."""
    con = sqlite3.connect(db)
    try:
        return {r[0] for r in con.execute("select name from sqlite_master where name not like 'sqlite_%'")}
    finally:
        con.close()


def test_migrating_an_empty_database_builds_exactly_the_models_tables(tmp_path):
    from graphtune.store.migrations import upgrade

    url = f"sqlite:///{tmp_path / 'm.db'}"
    eng = create_engine(url)
    upgrade(eng)  # 0001, 0002, 0003 in turn
    eng.dispose()
    assert _diff(url) == []
    assert _tables(tmp_path / "m.db") == GT_TABLES
    s = Storage(url)  # opens at head without complaint
    assert s.schema_revision() == HEAD
    s.close()
    Storage(f"sqlite:///{tmp_path / 'f.db'}").close()  # a fresh store has the very same names
    assert _names(tmp_path / "m.db") == _names(tmp_path / "f.db")
    assert all(n.startswith(("gt_", "ix_gt_")) for n in _names(tmp_path / "m.db"))


def test_upgrading_an_empty_database_creates_the_store(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    assert Storage.upgrade(url) == (None, HEAD)
    assert _diff(url) == []
    assert _tables(tmp_path / "m.db") == GT_TABLES


def test_a_fresh_store_is_created_and_stamped_at_head(tmp_path):
    url = f"sqlite:///{tmp_path / 'f.db'}"
    s = Storage(url)
    assert s.schema_revision() == HEAD
    s.close()
    assert _diff(url) == []
    assert Storage.upgrade(url) == (HEAD, HEAD)  # nothing to do


def _store_at(url: str, revision: str) -> None:
    """A store built by the migrations up to ``revision`` (< 0003: as an older graphtune left
    it, its revision in Alembic's default table)."""
    from graphtune.store.migrations import upgrade

    eng = create_engine(url)
    upgrade(eng, revision, version_table=LEGACY_VERSION_TABLE if revision < "0003" else VERSION_TABLE)
    eng.dispose()


def test_a_store_made_before_migrations_is_stamped_with_the_baseline(tmp_path):
    from graphtune.store.migrations import BASELINE

    db = tmp_path / "old.db"
    url = f"sqlite:///{db}"
    _store_at(url, BASELINE)
    con = sqlite3.connect(db)
    con.execute("drop table alembic_version")  # made before migrations existed
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="graphtune storage upgrade"):
        Storage(url)  # stamped with the baseline, which is older than the code's head
    con = sqlite3.connect(db)
    assert con.execute("select version_num from alembic_version").fetchone() == (BASELINE,)
    con.close()
    assert Storage.upgrade(url) == (BASELINE, HEAD)
    assert _diff(url) == []


def test_upgrading_a_0001_store_keeps_its_studies_and_adds_the_worker_columns(tmp_path):
    db = tmp_path / "v1.db"
    url = f"sqlite:///{db}"
    _store_at(url, "0001")
    con = sqlite3.connect(db)
    con.execute("insert into studies (name, method, spec, spec_hash, status, batch_index, runs_spent, created_at, "
                "updated_at, schema_version) values ('s', 'random', '{}', 'h', 'complete', 3, 40, '2026-01-01', "
                "'2026-01-01', 1)")
    con.execute("insert into trials (study_id, number, split, batch, slot, status, graph, graph_hash, method, "
                "origin, parents, info, question_ids, metrics, new_runs, started_at) values (1, 1, 'dev', 0, 0, "
                "'complete', '{}', 'g', 'random', 'sample', '[]', '{}', '[]', '{}', 10, '2026-01-01')")
    con.execute("insert into question_results (trial_id, position, question_id, score, prompt_tokens, "
                "completion_tokens, flops, usd, latency_s, modelled, reused, nodes) values "
                "(1, 0, 'q1', 1.0, 0, 0, 0, 0, 0, 0, 0, '[]')")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="revision 0001, this graphtune needs"):
        Storage(url)
    assert Storage.upgrade(url) == ("0001", HEAD)
    assert _diff(url) == []
    assert _tables(db) == GT_TABLES
    s = Storage(url)
    st = s.get_study("s")
    assert (st.batch_index, st.runs_spent, st.n_trials) == (3, 40, 1)
    assert s.list_trials(st.id)[0].new_runs == 10
    # 0002 rebuilds `trials` on SQLite: with foreign keys on, that cascaded to every question result
    assert [r.question_id for r in s.trial_results(s.list_trials(st.id)[0].id)] == ["q1"]
    assert s.list_workers(st.id) == []
    s.close()


def test_an_older_revision_is_refused_with_the_upgrade_command(tmp_path, monkeypatch):
    import graphtune.store.migrations as mig

    url = f"sqlite:///{tmp_path / 'o.db'}"
    Storage(url).close()
    # pretend the code moved on to a revision 0004 the store has not seen
    monkeypatch.setattr(mig, "HEAD", "0004")
    monkeypatch.setattr(mig, "REVISIONS", ("0001", "0002", "0003", "0004"))
    with pytest.raises(StoreError, match=r"revision 0003, this graphtune needs 0004; run `graphtune storage upgrade"):
        Storage(url)


def test_an_unknown_revision_is_refused(tmp_path):
    db = tmp_path / "n.db"
    Storage(f"sqlite:///{db}").close()
    con = sqlite3.connect(db)
    con.execute("update gt_alembic_version set version_num='9999'")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="newer graphtune"):
        Storage(f"sqlite:///{db}")


def test_cli_storage_upgrade(tmp_path):
    from typer.testing import CliRunner

    from graphtune.cli import app

    url = f"sqlite:///{tmp_path / 'c.db'}"
    r = CliRunner().invoke(app, ["storage", "upgrade", "--storage", url])
    assert r.exit_code == 0, r.output
    assert f"at revision {HEAD}" in r.output
    r = CliRunner().invoke(app, ["storage", "upgrade", "--storage", url])
    assert r.exit_code == 0 and "already" in r.output


def test_network_filesystem_and_workers_warn(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"server:/export {tmp_path} nfs4 rw 0 0\n/dev/sda1 / ext4 rw 0 0\n")
    msg = shared_sqlite_warning(f"sqlite:///{tmp_path / 'g.db'}", mounts=str(mounts))
    assert msg and "network filesystem (nfs4)" in msg and "PostgreSQL" in msg
    local = tmp_path / "local_mounts"
    local.write_text("/dev/sda1 / ext4 rw 0 0\n")
    assert shared_sqlite_warning(f"sqlite:///{tmp_path / 'g.db'}", mounts=str(local)) is None
    assert "workers" in shared_sqlite_warning(f"sqlite:///{tmp_path / 'g.db'}", workers=True, mounts=str(local))
    assert shared_sqlite_warning("postgresql://u@h/db", workers=True) is None


@pytest.mark.skipif(not __import__("os").environ.get("GRAPHTUNE_TEST_POSTGRES_URL"),
                    reason="set GRAPHTUNE_TEST_POSTGRES_URL (bash scripts/postgres.sh start) to test PostgreSQL")
def test_postgresql_upgrade_builds_the_models_tables_and_opens():
    from test_store import fresh_postgres

    url = fresh_postgres(__import__("os").environ["GRAPHTUNE_TEST_POSTGRES_URL"])
    assert Storage.upgrade(url) == (None, HEAD)
    assert _diff(url) == []
    s = Storage(url)
    assert s.schema_revision() == HEAD
    s.close()
    fresh_postgres(url)
    s = Storage(url)  # a fresh PostgreSQL store: create_all + stamp
    assert s.schema_revision() == HEAD
    s.close()
    assert _diff(url) == []


def _open(url: str) -> str:
    s = Storage(url)
    try:
        return s.schema_revision()
    finally:
        s.close()


def test_processes_opening_a_new_sqlite_store_at_once_all_get_the_head_revision(tmp_path):
    """pysqlite runs DDL outside transactions: without the schema lock a second process
    saw the tables before the stamp and marked a brand-new store as pre-migration."""
    import multiprocessing as mp

    for i in range(3):
        url = f"sqlite:///{tmp_path / f'race{i}.db'}"
        with mp.get_context("fork").Pool(6) as pool:
            revs = pool.map(_open, [url] * 6)
        assert revs == [HEAD] * 6
        assert _open(url) == HEAD


def _count(db, tables) -> dict[str, int]:
    con = sqlite3.connect(db)
    try:
        return {t: con.execute(f"select count(*) from {t}").fetchone()[0] for t in tables}
    finally:
        con.close()


def _dump(db, tables) -> dict[str, list]:
    con = sqlite3.connect(db)
    try:
        return {t: con.execute(f"select * from {t} order by 1").fetchall() for t in tables}
    finally:
        con.close()


def test_a_store_written_before_the_gt_prefix_is_refused_then_upgraded_keeping_every_row(tmp_path):
    db = tmp_path / "old.db"
    shutil.copy(STORE_0002, db)
    url = f"sqlite:///{db}"
    before = _dump(db, STORE_0002_ROWS)
    assert {t: len(rows) for t, rows in before.items()} == STORE_0002_ROWS
    for readonly in (True, False):
        with pytest.raises(StoreError) as e:
            Storage(url, readonly=readonly)
        assert str(e.value) == (f"storage {url} has schema revision 0002, this graphtune needs {HEAD}; "
                                f"run `graphtune storage upgrade --storage {url}` (back it up first)")
    assert Storage.upgrade(url) == ("0002", HEAD)
    assert _diff(url) == []
    assert _tables(db) == GT_TABLES  # Alembic's default alembic_version went with the old names
    assert _dump(db, [f"gt_{t}" for t in STORE_0002_ROWS]) == {f"gt_{t}": rows for t, rows in before.items()}
    assert sqlite3.connect(db).execute("pragma foreign_key_check").fetchall() == []
    s = Storage(url)
    st = s.get_study("quickstart")
    trials = s.list_trials(st.id)
    assert (st.status, st.n_trials, len(trials)) == ("complete", 4, 4)
    assert sum(len(s.trial_results(t.id)) for t in trials) == 40
    assert len(s.list_workers(st.id)) == 2 and len(s.agent_steps(st.id)) == 1
    # the foreign keys followed the renames: deleting the study takes its trials and results
    assert s.delete_study("quickstart")
    s.close()
    assert _count(db, ["gt_studies", "gt_trials", "gt_question_results", "gt_agent_steps", "gt_workers"]) == dict.fromkeys(
        ["gt_studies", "gt_trials", "gt_question_results", "gt_agent_steps", "gt_workers"], 0)
    assert _count(db, ["gt_llm_calls"]) == {"gt_llm_calls": 1}  # the call ledger stays


def _optuna(*args: str):
    """Optuna's own CLI (``optuna ARGS``), as a user runs it."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", "import sys; from optuna.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, timeout=120)


def _graphtune(*args: str):
    from typer.testing import CliRunner

    from graphtune.cli import app

    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.output


def _optimize(tmp_path, url: str) -> None:
    spec = (Path(__file__).parents[1] / "examples" / "quickstart.yaml").read_text()
    spec = spec.replace("dev_size: 100", "dev_size: 10").replace("test_size: 500", "test_size: 10")
    (tmp_path / "q.yaml").write_text(spec.replace("storage: sqlite:///graphtune.db", f"storage: {url}"))
    _graphtune("optimize", str(tmp_path / "q.yaml"), "--evaluations", "3", "-q")


def _optuna_study(url: str, name: str = "opt", n_trials: int = 3):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=url)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1) - 0.5) ** 2, n_trials=n_trials)
    return study


def test_optuna_and_graphtune_share_a_database_without_touching_each_other(tmp_path):
    """`optuna studies --storage URL` on a graphtune store (the two are installed together)
    used to take graphtune's tables for Optuna's and fail with "no longer compatible with
    the table schema"; now it lists no studies, Optuna may add its own alongside, and
    graphtune reads its store exactly as before."""
    db = tmp_path / "g.db"
    url = f"sqlite:///{db}"
    _optimize(tmp_path, url)
    gt_tables = sorted(_tables(db))
    ours = _dump(db, gt_tables)
    shown = _graphtune("trials", "quickstart", "--storage", url)

    r = _optuna("studies", "--storage", url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1].split() == ["|", "name", "|", "direction", "|", "n_trials", "|", "datetime_start", "|"]
    assert len(r.stdout.splitlines()) == 4  # an empty table: graphtune's study is not Optuna's
    _optuna_study(url)
    r = _optuna("studies", "--storage", url)
    assert r.returncode == 0 and "| opt " in r.stdout and "quickstart" not in r.stdout, r.stdout + r.stderr
    assert {"studies", "trials", "alembic_version"} <= _tables(db)  # Optuna's own, next to ours

    assert _dump(db, gt_tables) == ours  # not a byte of graphtune's rows changed
    assert _graphtune("trials", "quickstart", "--storage", url) == shown
    assert "quickstart" in _graphtune("studies", "--storage", url) and " opt " not in _graphtune("studies", "--storage", url)
    assert Storage.upgrade(url) == (HEAD, HEAD)
    _optimize(tmp_path, url)  # graphtune writes to it again (the study is complete: nothing to do)
    import optuna

    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["opt"]
    assert len(optuna.load_study(study_name="opt", storage=url).trials) == 3


def test_graphtune_opens_an_optuna_storage_alongside_its_studies(tmp_path):
    db = tmp_path / "o.db"
    url = f"sqlite:///{db}"
    _optuna_study(url, n_trials=2)
    optuna_rows = _dump(db, ["studies", "trials", "trial_params", "alembic_version"])
    assert Storage(url).schema_revision() == HEAD  # a fresh graphtune store next to Optuna's tables
    _optimize(tmp_path, url)
    assert "quickstart" in _graphtune("studies", "--storage", url)
    assert _dump(db, ["studies", "trials", "trial_params", "alembic_version"]) == optuna_rows
    import optuna

    assert len(optuna.load_study(study_name="opt", storage=url).trials) == 2
    assert Storage.upgrade(f"sqlite:///{tmp_path / 'o2.db'}") == (None, HEAD)
    _optuna_study(f"sqlite:///{tmp_path / 'o3.db'}", n_trials=1)
    # `graphtune storage upgrade` on an Optuna-only database makes a fresh store there too
    assert Storage.upgrade(f"sqlite:///{tmp_path / 'o3.db'}") == (None, HEAD)
    assert len(optuna.load_study(study_name="opt", storage=f"sqlite:///{tmp_path / 'o3.db'}").trials) == 1


def test_upgrading_drops_what_a_failed_optuna_command_left_in_an_old_store(tmp_path):
    db = tmp_path / "old.db"
    shutil.copy(STORE_0002, db)
    url = f"sqlite:///{db}"
    r = _optuna("studies", "--storage", url)  # what users hit before the prefix
    assert r.returncode != 0 and "no longer compatible with the table schema" in r.stderr
    assert {"study_directions", "trial_params", "version_info"} <= _tables(db)
    assert Storage.upgrade(url) == ("0002", HEAD)
    assert _tables(db) == GT_TABLES
    assert _count(db, [f"gt_{t}" for t in STORE_0002_ROWS]) == {f"gt_{t}": n for t, n in STORE_0002_ROWS.items()}
    _optuna_study(url, n_trials=1)  # Optuna now starts clean next to graphtune
    assert "quickstart" in _graphtune("studies", "--storage", url)


def _pg_names(url: str) -> set[tuple[str, str]]:
    """(kind, name) of every relation (tables, indexes, sequences) and constraint in the schema."""
    from sqlalchemy import text

    eng = create_engine(url)
    try:
        with eng.connect() as c:
            rels = c.execute(text("select relkind, relname from pg_class where relnamespace = current_schema()::regnamespace "
                                  "and relkind in ('r', 'i', 'S')")).all()
            cons = c.execute(text("select contype, conname from pg_constraint "
                                  "where connamespace = current_schema()::regnamespace")).all()
        return {(str(k), n) for k, n in rels} | {("c" + str(k), n) for k, n in cons}
    finally:
        eng.dispose()


@pytest.mark.skipif(not __import__("os").environ.get("GRAPHTUNE_TEST_POSTGRES_URL"),
                    reason="set GRAPHTUNE_TEST_POSTGRES_URL (bash scripts/postgres.sh start) to test PostgreSQL")
def test_postgresql_upgrade_of_a_0002_store_renames_everything_and_keeps_its_rows(tmp_path):
    from sqlalchemy import text
    from test_store import fresh_postgres

    url = fresh_postgres(__import__("os").environ["GRAPHTUNE_TEST_POSTGRES_URL"])
    Storage(url).close()
    fresh = _pg_names(url)  # what a fresh store has
    # the uq_* constraints keep their names (Optuna never names one; see graphtune.store.models)
    assert {n for _, n in fresh if "gt_" not in n} == {"uq_trial_number", "uq_agent_step_key", "uq_worker_name"}

    fresh_postgres(url)
    _store_at(url, "0002")
    eng = create_engine(url)
    with eng.begin() as c:
        c.execute(text("insert into studies (name, method, spec, spec_hash, status, batch_index, runs_spent, created_at, "
                       "updated_at, schema_version) values ('s', 'random', '{}', 'h', 'complete', 3, 40, now(), now(), 2)"))
        c.execute(text("insert into trials (study_id, number, split, batch, slot, status, graph, graph_hash, method, "
                       "origin, parents, info, question_ids, metrics, new_runs, started_at, attempts) values (1, 1, 'dev', "
                       "0, 0, 'complete', '{}', 'g', 'random', 'sample', '[]', '{}', '[\"q1\"]', '{}', 10, now(), 0)"))
        c.execute(text("insert into question_results (trial_id, position, question_id, score, prompt_tokens, "
                       "completion_tokens, flops, usd, latency_s, modelled, reused, nodes) values "
                       "(1, 0, 'q1', 1.0, 0, 0, 0, 0, 0, false, false, '[]')"))
    eng.dispose()
    with pytest.raises(StoreError, match=f"revision 0002, this graphtune needs {HEAD}; run `graphtune storage upgrade"):
        Storage(url)
    assert Storage.upgrade(url) == ("0002", HEAD)
    assert _diff(url) == []
    assert _pg_names(url) == fresh  # keys, sequences, indexes: the names a fresh store has
    s = Storage(url)
    st = s.get_study("s")
    (t,) = s.list_trials(st.id)
    assert (st.runs_spent, t.new_runs, len(s.trial_results(t.id))) == (40, 10, 1)
    s.create_study("t", "random", {})  # the renamed sequences go on numbering
    assert s.get_study("t").id == 2
    s.close()
    _optuna_study(url, n_trials=1)  # and Optuna has the database to itself under its own names
    r = _optuna("studies", "--storage", url)
    assert r.returncode == 0 and "| opt " in r.stdout, r.stdout + r.stderr
    fresh_postgres(url)
