"""Alembic migrations of the graphtune store (packaged with graphtune; no alembic.ini).

``HEAD`` is the revision the code's tables (``graphtune.store.models``) correspond to;
``tests/test_migrations.py`` checks it is the head of ``versions/`` and that upgrading an
empty database to it builds exactly ``Base.metadata``.

A fresh store is built with ``create_all`` and stamped ``HEAD`` (one transaction, no
Alembic import on the hot path); an existing store at an older revision is refused until
``graphtune storage upgrade`` runs :func:`upgrade`.

To add a migration: change ``models.py``, write ``versions/NNNN_what.py`` with
``down_revision`` = the previous head, and bump ``HEAD``.
"""

from __future__ import annotations

from pathlib import Path

#: the revision of the tables defined in graphtune.store.models
HEAD = "0002"
#: the revision of stores created before migrations existed (tables present, no alembic_version)
BASELINE = "0001"
#: every revision of versions/, oldest first (an older one than HEAD needs `graphtune storage upgrade`)
REVISIONS = ("0001", "0002")

MIGRATIONS_DIR = Path(__file__).resolve().parent


def alembic_config(url: str, connection=None):
    """An Alembic ``Config`` for this package's migrations on ``url`` (or an open connection)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # '%' must be escaped for configparser (URL-encoded passwords)
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def script_head() -> str:
    """The head revision of ``versions/`` (reads the scripts; for tests and ``upgrade``)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def upgrade(engine, revision: str = "head") -> None:
    """Upgrade the database behind ``engine`` to ``revision``."""
    from alembic import command

    with engine.begin() as conn:
        command.upgrade(alembic_config(str(engine.url), conn), revision)
