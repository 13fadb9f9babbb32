"""Schema migrations: the migrations build exactly the code's tables, old stores are
refused with the command that fixes them, and `graphtune storage upgrade` works."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import create_engine

from graphtune.errors import StoreError
from graphtune.store import Storage
from graphtune.store.migrations import HEAD, REVISIONS, script_head
from graphtune.store.models import Base
from graphtune.store.storage import shared_sqlite_warning


def _diff(url: str) -> list:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    eng = create_engine(url)
    try:
        with eng.connect() as c:
            return compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata)
    finally:
        eng.dispose()


def test_head_constant_is_the_head_of_the_versions_folder():
    assert script_head() == HEAD == REVISIONS[-1]


def test_upgrading_an_empty_database_builds_exactly_the_models_tables(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    assert Storage.upgrade(url) == (None, HEAD)
    assert _diff(url) == []
    names = {r[0] for r in sqlite3.connect(tmp_path / "m.db").execute("select name from sqlite_master where type='table'")}
    assert names == {"studies", "trials", "question_results", "agent_steps", "llm_calls", "workers", "llm_call_claims",
                     "alembic_version"}
    s = Storage(url)  # opens at head without complaint
    assert s.schema_revision() == HEAD
    s.close()


def test_a_fresh_store_is_created_and_stamped_at_head(tmp_path):
    url = f"sqlite:///{tmp_path / 'f.db'}"
    s = Storage(url)
    assert s.schema_revision() == HEAD
    s.close()
    assert _diff(url) == []
    assert Storage.upgrade(url) == (HEAD, HEAD)  # nothing to do


def _store_at(url: str, revision: str) -> None:
    """A store built by the migrations up to ``revision`` (as an older graphtune left it)."""
    from graphtune.store.migrations import upgrade

    eng = create_engine(url)
    upgrade(eng, revision)
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
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="revision 0001, this graphtune needs"):
        Storage(url)
    assert Storage.upgrade(url) == ("0001", HEAD)
    assert _diff(url) == []
    s = Storage(url)
    st = s.get_study("s")
    assert (st.batch_index, st.runs_spent, st.n_trials) == (3, 40, 1)
    assert s.list_trials(st.id)[0].new_runs == 10
    assert s.list_workers(st.id) == []
    s.close()


def test_an_older_revision_is_refused_with_the_upgrade_command(tmp_path, monkeypatch):
    import graphtune.store.migrations as mig

    url = f"sqlite:///{tmp_path / 'o.db'}"
    Storage(url).close()
    # pretend the code moved on to a revision 0003 the store has not seen
    monkeypatch.setattr(mig, "HEAD", "0003")
    monkeypatch.setattr(mig, "REVISIONS", ("0001", "0002", "0003"))
    with pytest.raises(StoreError, match=r"revision 0002, this graphtune needs 0003; run `graphtune storage upgrade"):
        Storage(url)


def test_an_unknown_revision_is_refused(tmp_path):
    db = tmp_path / "n.db"
    Storage(f"sqlite:///{db}").close()
    con = sqlite3.connect(db)
    con.execute("update alembic_version set version_num='9999'")
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
