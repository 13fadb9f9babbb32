"""Alembic migrations of the graphtune store (packaged with graphtune; no alembic.ini).

``HEAD`` is the revision the code's tables (``graphtune.store.models``) correspond to;
``tests/test_migrations.py`` checks it is the head of ``versions/`` and that upgrading an
empty database to it builds exactly ``Base.metadata``.

A fresh store is built with ``create_all`` and stamped ``HEAD`` (one transaction, no
Alembic import on the hot path); an existing store at an older revision is refused until
``graphtune storage upgrade`` runs :func:`upgrade`.

Alembic keeps the revision in ``gt_alembic_version`` (``VERSION_TABLE``), not in its
default ``alembic_version``, which is Optuna's in a database both use. Stores written
before revision 0003 keep theirs in ``alembic_version`` (``LEGACY_VERSION_TABLE``), at one
of ``LEGACY_REVISIONS``; ``graphtune storage upgrade`` moves it (see
``graphtune.store.storage``).

To add a migration: change ``models.py``, write ``versions/NNNN_what.py`` with
``down_revision`` = the previous head, and bump ``HEAD``.
"""

from __future__ import annotations

from pathlib import Path

#: the revision of the tables defined in graphtune.store.models
HEAD = "0003"
#: the revision of stores created before migrations existed (tables present, no alembic_version)
BASELINE = "0001"
#: every revision of versions/, oldest first (an older one than HEAD needs `graphtune storage upgrade`)
REVISIONS = ("0001", "0002", "0003")
#: where Alembic records a store's revision
VERSION_TABLE = "gt_alembic_version"
#: where graphtune recorded it before revision 0003 (Alembic's default name, which Optuna uses too)
LEGACY_VERSION_TABLE = "alembic_version"
#: the revisions a store may be at with its revision in LEGACY_VERSION_TABLE
LEGACY_REVISIONS = ("0001", "0002")

MIGRATIONS_DIR = Path(__file__).resolve().parent


def alembic_config(url: str, connection=None, *, version_table: str = VERSION_TABLE):
    """An Alembic ``Config`` for this package's migrations on ``url`` (or an open connection);
    ``version_table``: where the revision is kept (tests build pre-0003 stores with
    ``LEGACY_VERSION_TABLE``)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # '%' must be escaped for configparser (URL-encoded passwords)
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    cfg.attributes["version_table"] = version_table
    return cfg


def script_head() -> str:
    """The head revision of ``versions/`` (reads the scripts; for tests and ``upgrade``)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def upgrade(engine, revision: str = "head", *, version_table: str = VERSION_TABLE) -> None:
    """Upgrade the database behind ``engine`` to ``revision``.

    On SQLite the migrations run with foreign keys off (``PRAGMA foreign_keys`` cannot change
    inside a transaction, so it is set before): ``batch_alter_table`` rebuilds a table by
    copying it and dropping the old one, and with foreign keys on that drop would cascade to
    the rows referencing it (revision 0002 rebuilding ``trials`` deleted every question
    result). The references are checked once the migrations are done."""
    from alembic import command

    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
        try:
            with conn.begin():
                command.upgrade(alembic_config(str(engine.url), conn, version_table=version_table), revision)
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        from graphtune.errors import StoreError

                        raise StoreError(f"the migration to {revision} left {len(broken)} rows with broken "
                                         f"references (first: {tuple(broken[0])}); restore the store's backup")
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()
