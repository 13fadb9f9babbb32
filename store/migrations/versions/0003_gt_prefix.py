"""Prefix graphtune's tables with ``gt_`` so that they cannot collide with Optuna's.

Optuna (installed with graphtune) keeps ``studies``, ``trials``, ``alembic_version``...:
``optuna studies --storage`` on a graphtune store took graphtune's tables for its own,
failed with "no longer compatible with the table schema" and left its other tables
behind. This revision renames every graphtune table (``studies`` -> ``gt_studies``...)
and its indexes (``ix_trials_study_hash`` -> ``ix_gt_trials_study_hash``...); on
PostgreSQL also the keys and sequences named after the tables (``trials_pkey`` ->
``gt_trials_pkey``, ``studies_id_seq`` -> ``gt_studies_id_seq``...), so that a migrated
store has the names a fresh one gets. Every row is kept: tables are renamed, never copied,
and foreign keys follow the renames (PostgreSQL keeps them by object; SQLite 3.26+ rewrites
the references). The empty tables a failed ``optuna`` command left behind are dropped.

The revision itself moves from ``alembic_version`` to ``gt_alembic_version``
(``graphtune.store.storage.Storage.upgrade`` does that before it runs this revision).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = ("studies", "trials", "question_results", "agent_steps", "llm_calls", "workers", "llm_call_claims")
#: old index name -> (new name, old table, columns)
INDEXES = {
    "ix_trials_study_hash": ("ix_gt_trials_study_hash", "trials", ["study_id", "graph_hash"]),
    "ix_trials_study_slot": ("ix_gt_trials_study_slot", "trials", ["study_id", "split", "batch", "slot"]),
    "ix_trials_study_status": ("ix_gt_trials_study_status", "trials", ["study_id", "status"]),
    "ix_qr_trial": ("ix_gt_qr_trial", "question_results", ["trial_id"]),
    "ix_agent_steps_study_id": ("ix_gt_agent_steps_study_id", "agent_steps", ["study_id"]),
    "ix_llm_calls_key": ("ix_gt_llm_calls_key", "llm_calls", ["key"]),
    "ix_workers_study_id": ("ix_gt_workers_study_id", "workers", ["study_id"]),
}
#: what `optuna` (5.0) creates next to tables it takes for its own, children first; in a
#: graphtune store before this revision they can only be leftovers of a failed Optuna
#: command (Optuna's `studies` was graphtune's, so it never stored anything in them)
OPTUNA_LEFTOVERS = ("trial_heartbeats", "trial_intermediate_values", "trial_values", "trial_params",
                    "trial_system_attributes", "trial_user_attributes", "study_system_attributes",
                    "study_user_attributes", "study_directions", "version_info")


def _drop_optuna_leftovers(bind) -> None:
    names = set(sa.inspect(bind).get_table_names())
    present = [t for t in OPTUNA_LEFTOVERS if t in names]
    if not present:
        return
    # version_info holds Optuna's one row of versions; any other row means someone used them: keep all
    if any(bind.execute(sa.text(f'SELECT COUNT(*) FROM "{t}"')).scalar() for t in present if t != "version_info"):
        return
    for t in present:
        op.drop_table(t)


def _rename_postgresql(bind, old_prefix: str, new_prefix: str) -> None:
    """Keys, unique constraints, foreign keys and sequences named after a renamed table."""
    insp = sa.inspect(bind)
    for t in TABLES:
        old_t, new_t = old_prefix + t, new_prefix + t
        names = [insp.get_pk_constraint(new_t).get("name")]
        names += [u["name"] for u in insp.get_unique_constraints(new_t)]
        names += [f["name"] for f in insp.get_foreign_keys(new_t)]
        for name in names:
            if name and name.startswith(old_t + "_"):
                op.execute(f'ALTER TABLE "{new_t}" RENAME CONSTRAINT "{name}" TO "{new_t}{name[len(old_t):]}"')
        op.execute(f'ALTER SEQUENCE IF EXISTS "{old_t}_id_seq" RENAME TO "{new_t}_id_seq"')


def _rename(old_prefix: str, new_prefix: str) -> None:
    bind = op.get_bind()
    for t in TABLES:
        op.rename_table(old_prefix + t, new_prefix + t)
    forward = old_prefix == ""
    for old, (new, table, columns) in INDEXES.items():
        src, dst = (old, new) if forward else (new, old)
        if bind.dialect.name == "postgresql":
            op.execute(f'ALTER INDEX "{src}" RENAME TO "{dst}"')
        else:  # SQLite has no ALTER INDEX ... RENAME
            op.drop_index(src, table_name=new_prefix + table)
            op.create_index(dst, new_prefix + table, columns, unique=False)
    if bind.dialect.name == "postgresql":
        _rename_postgresql(bind, old_prefix, new_prefix)


def upgrade() -> None:
    _drop_optuna_leftovers(op.get_bind())
    _rename("", "gt_")


def downgrade() -> None:
    _rename("gt_", "")
