"""Distributed evaluation: trial claims (worker, heartbeat, attempts, dependency), the
``workers`` table and the ``llm_call_claims`` table, for ``graphtune worker``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trials") as t:
        t.add_column(sa.Column("worker", sa.String(length=200), nullable=True))
        t.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        t.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        t.add_column(sa.Column("after_trial", sa.Integer(), nullable=True))
    with op.batch_alter_table("trials") as t:  # rows exist now: the default was only for them
        t.alter_column("attempts", server_default=None)
    op.create_index("ix_trials_study_status", "trials", ["study_id", "status"], unique=False)
    op.create_table(
        "workers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("trials_done", sa.Integer(), nullable=False),
        sa.Column("batches_updated", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_id", "name", name="uq_worker_name"),
    )
    op.create_index(op.f("ix_workers_study_id"), "workers", ["study_id"], unique=False)
    op.create_table(
        "llm_call_claims",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )


def downgrade() -> None:
    op.drop_table("llm_call_claims")
    op.drop_index(op.f("ix_workers_study_id"), table_name="workers")
    op.drop_table("workers")
    op.drop_index("ix_trials_study_status", table_name="trials")
    with op.batch_alter_table("trials") as t:
        for c in ("after_trial", "attempts", "heartbeat_at", "worker"):
            t.drop_column(c)
