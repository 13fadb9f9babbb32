"""SQLAlchemy 2 tables of a graphtune store.

Every table graphtune makes starts with ``gt_``, and so does its Alembic version table
(``gt_alembic_version``); index names carry it too (``ix_gt_...``), and so, on
PostgreSQL, do the default names of keys and sequences (``gt_trials_pkey``...). A store is
often an Optuna storage URL too (Optuna is installed with graphtune) and Optuna's tables
are ``studies``, ``trials``, ``alembic_version``...: with the prefix the two share a
database without touching each other's tables. Schema revision 0003 renamed the older
unprefixed tables. (The ``uq_*`` constraint names are kept: Optuna never names a
constraint, and renaming one on SQLite would mean rebuilding its table.)

* ``gt_studies``: one search: its resolved spec, method, searcher state (saved after every
  batch, so a killed search resumes where its last batch ended), status.
* ``gt_trials``: one graph evaluated on a set of dev (or test) questions. ``(study_id,
  batch, slot)`` identifies the candidate's place in the search, so a resumed search
  that re-asks a batch finds the trials it already ran instead of duplicating them.
* ``gt_question_results``: per-question outcome of a trial (answer, correctness, tokens,
  cost, latency, infrastructure error, per-node outcomes as JSON).
* ``gt_agent_steps``: what the feedback agent was asked and answered, and what it changed
  (lineage: trials point to the step that proposed them).

Portable types only (JSON, Text, Float...), so the same schema runs on SQLite and
PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION = 3


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON}


class StudyRow(Base):
    __tablename__ = "gt_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    method: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict] = mapped_column(JSON)
    spec_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="running")  # running|complete
    searcher_state: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    batch_index: Mapped[int] = mapped_column(Integer, default=0)
    runs_spent: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    schema_version: Mapped[int] = mapped_column(Integer, default=SCHEMA_VERSION)

    trials: Mapped[list[TrialRow]] = relationship(back_populates="study", cascade="all, delete-orphan",
                                                  passive_deletes=True)


class TrialRow(Base):
    __tablename__ = "gt_trials"
    __table_args__ = (
        UniqueConstraint("study_id", "number", name="uq_trial_number"),
        Index("ix_gt_trials_study_hash", "study_id", "graph_hash"),
        Index("ix_gt_trials_study_slot", "study_id", "split", "batch", "slot"),
        Index("ix_gt_trials_study_status", "study_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("gt_studies.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(16), default="dev")
    batch: Mapped[int] = mapped_column(Integer, default=0)
    slot: Mapped[int] = mapped_column(Integer, default=0)
    # complete|failed; with `graphtune worker`: pending (claimable), waiting (for trial
    # `after_trial` of the same graph to finish first), running (claimed by `worker`)
    status: Mapped[str] = mapped_column(String(16))
    graph: Mapped[dict] = mapped_column(JSON)
    graph_hash: Mapped[str] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(64))
    origin: Mapped[str] = mapped_column(String(32), default="sample")
    parents: Mapped[list] = mapped_column(JSON, default=list)
    info: Mapped[dict] = mapped_column(JSON, default=dict)
    question_ids: Mapped[list] = mapped_column(JSON, default=list)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    reward: Mapped[float | None] = mapped_column(Float, nullable=True)
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    cost_units: Mapped[float | None] = mapped_column(Float, nullable=True)
    flops: Mapped[float | None] = mapped_column(Float, nullable=True)
    usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    new_runs: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    feedback: Mapped[str | None] = mapped_column(Text, nullable=True)
    agent_step_id: Mapped[int | None] = mapped_column(ForeignKey("gt_agent_steps.id"), nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # distributed evaluation (schema 2): who holds the claim, its last heartbeat, how many
    # times it was claimed, and the earlier trial of the same graph in the batch it waits for
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    after_trial: Mapped[int | None] = mapped_column(Integer, nullable=True)

    study: Mapped[StudyRow] = relationship(back_populates="trials")
    results: Mapped[list[QuestionResultRow]] = relationship(back_populates="trial", cascade="all, delete-orphan",
                                                            passive_deletes=True,
                                                            order_by="QuestionResultRow.position")


class QuestionResultRow(Base):
    __tablename__ = "gt_question_results"
    __table_args__ = (Index("ix_gt_qr_trial", "trial_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("gt_trials.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    question_id: Mapped[str] = mapped_column(String(200))
    answer: Mapped[str | None] = mapped_column(Text, nullable=True)
    correct: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    score: Mapped[float] = mapped_column(Float, default=0.0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    flops: Mapped[float] = mapped_column(Float, default=0.0)
    usd: Mapped[float] = mapped_column(Float, default=0.0)
    latency_s: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    modelled: Mapped[bool] = mapped_column(Boolean, default=False)
    reused: Mapped[bool] = mapped_column(Boolean, default=False)
    nodes: Mapped[list] = mapped_column(JSON, default=list)

    trial: Mapped[TrialRow] = relationship(back_populates="results")


class AgentStepRow(Base):
    __tablename__ = "gt_agent_steps"
    __table_args__ = (UniqueConstraint("study_id", "key", name="uq_agent_step_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("gt_studies.id", ondelete="CASCADE"), index=True)
    #: the searcher's own name for the step; candidates refer to it as info["agent_step"]
    key: Mapped[str] = mapped_column(String(64))
    batch: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))  # init|feedback|propose
    backend: Mapped[str] = mapped_column(String(200))  # "heuristic (not an LLM)" or a model string
    is_llm: Mapped[bool] = mapped_column(Boolean, default=False)
    prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    reply: Mapped[str | None] = mapped_column(Text, nullable=True)
    parsed: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    applied: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    rejected_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    feedback: Mapped[str | None] = mapped_column(Text, nullable=True)
    trial_numbers: Mapped[list] = mapped_column(JSON, default=list)  # trials this step looked at
    calls: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    usd: Mapped[float] = mapped_column(Float, default=0.0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LLMCallRow(Base):
    """One LLM call of a live environment (the call ledger; see ``graphtune.store.ledger``).

    ``key`` digests everything that determines a reply: the model, the messages, the
    sampling parameters and the sample index/seed (so distinct samples of one prompt are
    never collapsed). A row without ``error`` serves every later identical call; failed
    calls are recorded too but never served. API keys are never stored (the request
    carries only the model string and parameters)."""

    __tablename__ = "gt_llm_calls"
    __table_args__ = (Index("ix_gt_llm_calls_key", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(300))  # the pool's model name
    endpoint: Mapped[str] = mapped_column(String(300))  # litellm model string (or local:<file>)
    messages: Mapped[list] = mapped_column(JSON)
    params: Mapped[dict] = mapped_column(JSON, default=dict)  # temperature, max_tokens, seed, ...
    sample_index: Mapped[int] = mapped_column(Integer, default=0)
    reply: Mapped[str | None] = mapped_column(Text, nullable=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_s: Mapped[float] = mapped_column(Float, default=0.0)
    usd: Mapped[float] = mapped_column(Float, default=0.0)
    flops: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    study: Mapped[str | None] = mapped_column(String(200), nullable=True)  # who paid for it (informative)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WorkerRow(Base):
    """One ``graphtune worker`` process on a study (schema 2). Live workers (fresh
    heartbeat) split the spec's concurrency limits between them, so the limits hold for
    the study as a whole."""

    __tablename__ = "gt_workers"
    __table_args__ = (UniqueConstraint("study_id", "name", name="uq_worker_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("gt_studies.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))  # host:pid:random
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running|stopped
    trials_done: Mapped[int] = mapped_column(Integer, default=0)
    batches_updated: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LLMCallClaimRow(Base):
    """An LLM call being made right now by one ``graphtune worker`` process (schema 2):
    other workers that need the same call wait for its reply in the ledger instead of
    paying for it again. Deleted in the transaction that records the call; left by a
    dead worker, it is taken over once that worker's heartbeat is stale."""

    __tablename__ = "gt_llm_call_claims"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))  # the worker's name (workers.name)
    claimed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
