"""Alembic environment: runs with the connection graphtune passes in (``config.attributes``),
or opens one from ``sqlalchemy.url``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from graphtune.store.migrations import VERSION_TABLE
from graphtune.store.models import Base

config = context.config
target_metadata = Base.metadata
# graphtune's own version table: Optuna keeps its revision in Alembic's default one
version_table = config.attributes.get("version_table", VERSION_TABLE)


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True,
                      version_table=version_table)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    conn = config.attributes.get("connection")
    if conn is not None:
        _run(conn)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.begin() as c:
            _run(c)
    finally:
        engine.dispose()


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, version_table=version_table)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
