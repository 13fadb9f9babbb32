"""Initial schema: studies, trials, question_results, agent_steps, llm_calls.

Exactly the tables of ``graphtune.store.models`` at schema version 1 (stores created
before migrations existed have this schema and are stamped with this revision).

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('llm_calls',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('key', sa.String(length=64), nullable=False),
        sa.Column('model', sa.String(length=300), nullable=False),
        sa.Column('endpoint', sa.String(length=300), nullable=False),
        sa.Column('messages', sa.JSON(), nullable=False),
        sa.Column('params', sa.JSON(), nullable=False),
        sa.Column('sample_index', sa.Integer(), nullable=False),
        sa.Column('reply', sa.Text(), nullable=True),
        sa.Column('prompt_tokens', sa.Integer(), nullable=False),
        sa.Column('completion_tokens', sa.Integer(), nullable=False),
        sa.Column('latency_s', sa.Float(), nullable=False),
        sa.Column('usd', sa.Float(), nullable=False),
        sa.Column('flops', sa.Float(), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('study', sa.String(length=200), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_llm_calls_key', 'llm_calls', ['key'], unique=False)
    op.create_table('studies',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('method', sa.String(length=64), nullable=False),
        sa.Column('spec', sa.JSON(), nullable=False),
        sa.Column('spec_hash', sa.String(length=64), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('searcher_state', sa.JSON(), nullable=True),
        sa.Column('batch_index', sa.Integer(), nullable=False),
        sa.Column('runs_spent', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('schema_version', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('name')
    )
    op.create_table('agent_steps',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('study_id', sa.Integer(), nullable=False),
        sa.Column('key', sa.String(length=64), nullable=False),
        sa.Column('batch', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=32), nullable=False),
        sa.Column('backend', sa.String(length=200), nullable=False),
        sa.Column('is_llm', sa.Boolean(), nullable=False),
        sa.Column('prompt', sa.Text(), nullable=True),
        sa.Column('reply', sa.Text(), nullable=True),
        sa.Column('parsed', sa.JSON(), nullable=True),
        sa.Column('applied', sa.JSON(), nullable=True),
        sa.Column('rejected_reason', sa.Text(), nullable=True),
        sa.Column('feedback', sa.Text(), nullable=True),
        sa.Column('trial_numbers', sa.JSON(), nullable=False),
        sa.Column('calls', sa.Integer(), nullable=False),
        sa.Column('prompt_tokens', sa.Integer(), nullable=False),
        sa.Column('completion_tokens', sa.Integer(), nullable=False),
        sa.Column('usd', sa.Float(), nullable=False),
        sa.Column('seconds', sa.Float(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('study_id', 'key', name='uq_agent_step_key')
    )
    op.create_index(op.f('ix_agent_steps_study_id'), 'agent_steps', ['study_id'], unique=False)
    op.create_table('trials',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('study_id', sa.Integer(), nullable=False),
        sa.Column('number', sa.Integer(), nullable=False),
        sa.Column('split', sa.String(length=16), nullable=False),
        sa.Column('batch', sa.Integer(), nullable=False),
        sa.Column('slot', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('graph', sa.JSON(), nullable=False),
        sa.Column('graph_hash', sa.String(length=32), nullable=False),
        sa.Column('method', sa.String(length=64), nullable=False),
        sa.Column('origin', sa.String(length=32), nullable=False),
        sa.Column('parents', sa.JSON(), nullable=False),
        sa.Column('info', sa.JSON(), nullable=False),
        sa.Column('question_ids', sa.JSON(), nullable=False),
        sa.Column('metrics', sa.JSON(), nullable=False),
        sa.Column('reward', sa.Float(), nullable=True),
        sa.Column('accuracy', sa.Float(), nullable=True),
        sa.Column('cost_units', sa.Float(), nullable=True),
        sa.Column('flops', sa.Float(), nullable=True),
        sa.Column('usd', sa.Float(), nullable=True),
        sa.Column('latency_s', sa.Float(), nullable=True),
        sa.Column('new_runs', sa.Integer(), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('feedback', sa.Text(), nullable=True),
        sa.Column('agent_step_id', sa.Integer(), nullable=True),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['agent_step_id'], ['agent_steps.id']),
        sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('study_id', 'number', name='uq_trial_number')
    )
    op.create_index('ix_trials_study_hash', 'trials', ['study_id', 'graph_hash'], unique=False)
    op.create_index('ix_trials_study_slot', 'trials', ['study_id', 'split', 'batch', 'slot'], unique=False)
    op.create_table('question_results',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('trial_id', sa.Integer(), nullable=False),
        sa.Column('position', sa.Integer(), nullable=False),
        sa.Column('question_id', sa.String(length=200), nullable=False),
        sa.Column('answer', sa.Text(), nullable=True),
        sa.Column('correct', sa.Boolean(), nullable=True),
        sa.Column('score', sa.Float(), nullable=False),
        sa.Column('prompt_tokens', sa.Integer(), nullable=False),
        sa.Column('completion_tokens', sa.Integer(), nullable=False),
        sa.Column('flops', sa.Float(), nullable=False),
        sa.Column('usd', sa.Float(), nullable=False),
        sa.Column('latency_s', sa.Float(), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('modelled', sa.Boolean(), nullable=False),
        sa.Column('reused', sa.Boolean(), nullable=False),
        sa.Column('nodes', sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(['trial_id'], ['trials.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_qr_trial', 'question_results', ['trial_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_qr_trial', table_name='question_results')
    op.drop_table('question_results')
    op.drop_index('ix_trials_study_slot', table_name='trials')
    op.drop_index('ix_trials_study_hash', table_name='trials')
    op.drop_table('trials')
    op.drop_index(op.f('ix_agent_steps_study_id'), table_name='agent_steps')
    op.drop_table('agent_steps')
    op.drop_table('studies')
    op.drop_index('ix_llm_calls_key', table_name='llm_calls')
    op.drop_table('llm_calls')
