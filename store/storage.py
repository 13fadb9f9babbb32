"""The study store over SQLAlchemy (SQLite by default, any SQLAlchemy URL).

Invariants every backend keeps:

* A trial is written in one transaction when it finishes, with all its question results;
  a crash never leaves a half-written finished trial.
* Finished trials are read-only.
* ``save_progress`` writes the searcher state, the batch counter and the spent budget
  in one transaction, after the batch's trials: a resumed search restarts at the first
  batch whose state was not saved, and finds that batch's finished trials by their
  ``(batch, slot)`` instead of running them again.
* Secrets are never stored (the spec references them by environment-variable name).

Schema: versioned with Alembic (``graphtune.store.migrations``). A fresh database gets
``create_all`` plus an ``alembic_version`` stamped with the code's head revision (one
transaction; the same tables the migrations build, checked by tests/test_migrations.py);
a database at an older revision is refused until ``graphtune storage upgrade`` runs; one
at an unknown (newer) revision is refused too. Stores made before migrations existed (the
tables, no ``alembic_version``) are stamped with the baseline revision.

SQLite: WAL and a busy timeout, so several processes of one machine can share a file; a
file on a network filesystem (NFS, SMB/CIFS, sshfs...), or one shared by ``workers``,
gets a warning: SQLite's locking is not reliable there; use PostgreSQL.

SQLAlchemy errors are translated to ``StoreError`` here, in one place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Column, MetaData, String, Table, create_engine, event, func, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from graphtune.envs.base import NodeOutcome, QuestionResult
from graphtune.errors import StoreError
from graphtune.store.models import AgentStepRow, Base, QuestionResultRow, StudyRow, TrialRow, utcnow

SQLITE_BUSY_TIMEOUT_MS = 30_000

#: filesystem types on which several machines may open one SQLite file (its locks are not reliable there)
NETWORK_FS_TYPES = ("nfs", "nfs4", "cifs", "smb", "smb3", "smbfs", "fuse.sshfs", "sshfs", "9p", "afs",
                    "glusterfs", "fuse.glusterfs", "ceph", "fuse.ceph", "lustre", "gpfs", "beegfs")

# the table Alembic keeps its revision in (same definition as Alembic's own)
_VERSION_TABLE = Table("alembic_version", MetaData(), Column("version_num", String(32), primary_key=True))


class SharedSQLiteWarning(UserWarning):
    """An SQLite store that several machines (or workers) would share."""


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite URL (None for in-memory or other databases)."""
    if not url.startswith("sqlite") or "///" not in url:
        return None
    path = url.split("///", 1)[1].split("?", 1)[0]
    return None if not path or path == ":memory:" else Path(path).expanduser()


def filesystem_type(path: Path, mounts: str = "/proc/mounts") -> str | None:
    """The filesystem type of the mount holding ``path`` (Linux ``/proc/mounts``; None elsewhere)."""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path if path.exists() else path.parent)
    best, fstype = "", None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, parts[2]
    return fstype


def shared_sqlite_warning(url: str, *, workers: bool = False, mounts: str = "/proc/mounts") -> str | None:
    """Why this SQLite store must not be shared between machines, or None when it is fine."""
    path = sqlite_path(url)
    if path is None:
        return None
    fs = filesystem_type(path, mounts)
    if fs and (fs in NETWORK_FS_TYPES or fs.split(".")[-1] in NETWORK_FS_TYPES):
        return (f"SQLite store {path} is on a network filesystem ({fs}): SQLite's locking is unreliable when "
                "several machines share one file and the store can be corrupted; use a PostgreSQL `storage` URL")
    if workers:
        return (f"workers share the SQLite store {path}: fine for processes on this machine only; workers on "
                "several machines need a PostgreSQL `storage` URL")
    return None


def spec_hash(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StudyInfo:
    id: int
    name: str
    method: str
    spec: dict
    spec_hash: str
    status: str
    searcher_state: dict | None
    batch_index: int
    runs_spent: int
    n_trials: int = 0
    created_at: Any = None


@dataclass(frozen=True)
class TrialInfo:
    id: int
    number: int
    split: str
    batch: int
    slot: int
    status: str
    graph: dict
    graph_hash: str
    method: str
    origin: str
    parents: list
    info: dict
    question_ids: list
    metrics: dict
    reward: float | None
    accuracy: float | None
    cost_units: float | None
    flops: float | None
    usd: float | None
    latency_s: float | None
    new_runs: int
    error: str | None
    feedback: str | None
    started_at: Any
    finished_at: Any


def _study_info(r: StudyRow, n_trials: int = 0) -> StudyInfo:
    return StudyInfo(r.id, r.name, r.method, r.spec, r.spec_hash, r.status, r.searcher_state,
                     r.batch_index, r.runs_spent, n_trials, r.created_at)


def _trial_info(r: TrialRow) -> TrialInfo:
    return TrialInfo(r.id, r.number, r.split, r.batch, r.slot, r.status, r.graph, r.graph_hash, r.method,
                     r.origin, r.parents, r.info, r.question_ids, r.metrics, r.reward, r.accuracy,
                     r.cost_units, r.flops, r.usd, r.latency_s, r.new_runs, r.error, r.feedback,
                     r.started_at, r.finished_at)


def _result_row(i: int, r: QuestionResult, reused: bool) -> QuestionResultRow:
    return QuestionResultRow(
        position=i, question_id=r.question_id, answer=r.answer, correct=r.correct, score=r.score,
        prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens, flops=r.flops, usd=r.usd,
        latency_s=r.latency_s, error=r.error, modelled=r.modelled, reused=reused,
        nodes=[[n.node_id, n.answer, n.correct, n.prompt_tokens, n.completion_tokens, n.latency_s]
               for n in r.nodes])


def result_from_row(r: QuestionResultRow) -> QuestionResult:
    return QuestionResult(
        question_id=r.question_id, answer=r.answer, correct=r.correct, score=r.score,
        prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens, flops=r.flops, usd=r.usd,
        latency_s=r.latency_s, error=r.error, modelled=r.modelled,
        nodes=tuple(NodeOutcome(*n) for n in (r.nodes or [])))


class Storage:
    """A graphtune store at a SQLAlchemy URL (e.g. ``sqlite:///graphtune.db``).

    ``create``: build the schema in an empty database (else an empty one is left alone);
    ``workers``: this process is one of several sharing the store (warns for SQLite)."""

    def __init__(self, url: str, *, create: bool = True, workers: bool = False):
        self.url = url
        why = shared_sqlite_warning(url, workers=workers)
        if why:
            warnings.warn(why, SharedSQLiteWarning, stacklevel=2)
        try:
            self.engine = self._make_engine(url)
            self._check_schema(create)
        except SQLAlchemyError as e:
            raise StoreError(f"cannot open storage {self._safe_url()}: {str(e.orig if hasattr(e, 'orig') else e).splitlines()[0]}; "
                             "check the `storage` URL") from None
        except ImportError as e:
            raise StoreError(f"storage {self._safe_url()} needs a database driver: {e}; install it with pip") from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    # -- schema ----------------------------------------------------------------------
    def schema_revision(self) -> str | None:
        """The store's Alembic revision (None: no graphtune tables yet)."""
        from graphtune.store.migrations import BASELINE

        with self.engine.connect() as c:
            names = set(inspect(c).get_table_names())
            if "alembic_version" in names:
                return c.scalar(select(_VERSION_TABLE.c.version_num))
            return BASELINE if "studies" in names else None

    def _check_schema(self, create: bool) -> None:
        from graphtune.store.migrations import HEAD, REVISIONS

        for attempt in range(2):  # a concurrent process may create the schema between our look and write
            try:
                with self.engine.begin() as c:
                    names = set(inspect(c).get_table_names())
                    rev = c.scalar(select(_VERSION_TABLE.c.version_num)) if "alembic_version" in names else None
                    if rev is None and "studies" not in names:
                        if not create:
                            return
                        Base.metadata.create_all(c)
                        _VERSION_TABLE.create(c, checkfirst=True)
                        c.execute(_VERSION_TABLE.insert().values(version_num=HEAD))
                        return
                    if rev is None:  # made before migrations existed: its schema is the baseline
                        from graphtune.store.migrations import BASELINE

                        _VERSION_TABLE.create(c, checkfirst=True)
                        c.execute(_VERSION_TABLE.insert().values(version_num=BASELINE))
                        rev = BASELINE
                break
            except SQLAlchemyError:
                if attempt:
                    raise
        if rev == HEAD:
            return
        if rev in REVISIONS:
            raise StoreError(f"storage {self._safe_url()} has schema revision {rev}, this graphtune needs {HEAD}; "
                             f"run `graphtune storage upgrade --storage {self._safe_url()}` (back it up first)")
        raise StoreError(f"storage {self._safe_url()} has schema revision {rev!r}, unknown to this graphtune "
                         f"(needs {HEAD}); it was written by a newer graphtune: upgrade graphtune")

    @classmethod
    def upgrade(cls, url: str) -> tuple[str | None, str]:
        """Migrate the store at ``url`` to the code's head revision (creating it when empty);
        returns ``(revision before, revision after)``."""
        from graphtune.store.migrations import BASELINE, HEAD, upgrade

        self = cls.__new__(cls)
        self.url = url
        try:
            self.engine = self._make_engine(url)
            try:
                before = self.schema_revision()
                if before == BASELINE:  # a pre-migration store: record its baseline first
                    with self.engine.begin() as c:
                        if "alembic_version" not in set(inspect(c).get_table_names()):
                            _VERSION_TABLE.create(c)
                            c.execute(_VERSION_TABLE.insert().values(version_num=BASELINE))
                upgrade(self.engine, "head")
                after = self.schema_revision()
            finally:
                self.engine.dispose()
        except SQLAlchemyError as e:
            raise StoreError(f"cannot upgrade storage {self._safe_url()}: "
                             f"{str(getattr(e, 'orig', e) or e).splitlines()[0]}") from None
        except ImportError as e:
            raise StoreError(f"storage {self._safe_url()} needs a database driver: {e}; install it with pip") from None
        if after != HEAD:
            raise StoreError(f"storage {self._safe_url()} is at revision {after} after the upgrade, expected {HEAD}")
        return before, after

    def _safe_url(self) -> str:
        try:
            from sqlalchemy.engine import make_url

            return make_url(self.url).render_as_string(hide_password=True)
        except Exception:
            return "<storage url>"

    @staticmethod
    def _make_engine(url: str) -> Engine:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                parent = Path(path).expanduser().parent
                if not parent.exists():
                    raise StoreError(f"storage directory {parent} does not exist; create it or change `storage`")
            engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn, _record):  # WAL: readers never block the writer
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

            return engine
        return create_engine(url, pool_pre_ping=True)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        s = self._sessions()
        try:
            yield s
            s.commit()
        except SQLAlchemyError as e:
            s.rollback()
            raise StoreError(f"storage {self._safe_url()}: {str(getattr(e, 'orig', e) or e).splitlines()[0]}") from None
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def close(self) -> None:
        self.engine.dispose()

    # -- studies ---------------------------------------------------------------------
    def get_study(self, name: str) -> StudyInfo | None:
        with self.session() as s:
            r = s.scalar(select(StudyRow).where(StudyRow.name == name))
            if r is None:
                return None
            n = s.scalar(select(func.count()).select_from(TrialRow).where(TrialRow.study_id == r.id))
            return _study_info(r, n or 0)

    def create_study(self, name: str, method: str, spec: Mapping[str, Any]) -> StudyInfo:
        with self.session() as s:
            if s.scalar(select(StudyRow.id).where(StudyRow.name == name)) is not None:
                raise StoreError(f"study {name!r} already exists; pick another --study name or resume it")
            r = StudyRow(name=name, method=method, spec=dict(spec), spec_hash=spec_hash(spec))
            s.add(r)
            s.flush()
            return _study_info(r)

    def list_studies(self) -> list[StudyInfo]:
        with self.session() as s:
            counts = dict(s.execute(select(TrialRow.study_id, func.count()).group_by(TrialRow.study_id)).all())
            return [_study_info(r, counts.get(r.id, 0)) for r in s.scalars(select(StudyRow).order_by(StudyRow.id))]

    def update_study_spec(self, study_id: int, spec: Mapping[str, Any]) -> None:
        with self.session() as s:
            r = s.get(StudyRow, study_id)
            r.spec, r.spec_hash = dict(spec), spec_hash(spec)

    def delete_study(self, name: str) -> bool:
        with self.session() as s:
            r = s.scalar(select(StudyRow).where(StudyRow.name == name))
            if r is None:
                return False
            s.delete(r)
            return True

    def reset_searcher(self, study_id: int, method: str) -> None:
        """Forget the searcher state (a study continued with another method); trials, the
        batch counter and the spent budget stay."""
        with self.session() as s:
            r = s.get(StudyRow, study_id)
            r.method, r.searcher_state = method, None

    def set_status(self, study_id: int, status: str) -> None:
        with self.session() as s:
            s.get(StudyRow, study_id).status = status

    def save_progress(self, study_id: int, *, state: Mapping[str, Any], batch_index: int, runs_spent: int,
                      agent_steps: Sequence[Mapping[str, Any]] = ()) -> None:
        """Searcher state + counters + the batch's agent steps, in one transaction."""
        with self.session() as s:
            r = s.get(StudyRow, study_id)
            r.searcher_state = json.loads(json.dumps(state))
            r.batch_index = batch_index
            r.runs_spent = runs_spent
            for step in agent_steps:
                if s.scalar(select(AgentStepRow.id).where(AgentStepRow.study_id == study_id,
                                                          AgentStepRow.key == step["key"])) is None:
                    s.add(AgentStepRow(study_id=study_id, **step))

    # -- trials ----------------------------------------------------------------------
    def find_trial(self, study_id: int, split: str, batch: int, slot: int, graph_hash: str) -> TrialInfo | None:
        with self.session() as s:
            r = s.scalar(select(TrialRow).where(
                TrialRow.study_id == study_id, TrialRow.split == split, TrialRow.batch == batch,
                TrialRow.slot == slot, TrialRow.graph_hash == graph_hash, TrialRow.status == "complete"))
            return _trial_info(r) if r else None

    def known_results(self, study_id: int, graph_hash: str, split: str) -> dict[str, QuestionResult]:
        """Every stored result of this graph on this split (any trial), by question id;
        infrastructure failures are not reused (they are retried)."""
        with self.session() as s:
            rows = s.scalars(select(QuestionResultRow).join(TrialRow).where(
                TrialRow.study_id == study_id, TrialRow.graph_hash == graph_hash, TrialRow.split == split,
                TrialRow.status == "complete", QuestionResultRow.error.is_(None)))
            return {r.question_id: result_from_row(r) for r in rows}

    def record_trial(self, study_id: int, *, split: str, batch: int, slot: int, status: str, graph: dict,
                     graph_hash: str, method: str, origin: str, parents: Sequence[int], info: Mapping[str, Any],
                     question_ids: Sequence[str], results: Sequence[QuestionResult], reused: set[str],
                     metrics: Mapping[str, Any], reward: float | None, cost: Mapping[str, float] | None,
                     new_runs: int, error: str | None = None, feedback: str | None = None,
                     started_at=None) -> TrialInfo:
        """Write one finished (or failed) trial with its results, atomically."""
        with self.session() as s:
            number = (s.scalar(select(func.max(TrialRow.number)).where(TrialRow.study_id == study_id)) or 0) + 1
            step_id = None
            if info.get("agent_step"):
                step_id = s.scalar(select(AgentStepRow.id).where(AgentStepRow.study_id == study_id,
                                                                 AgentStepRow.key == info["agent_step"]))
            cost = cost or {}
            r = TrialRow(
                study_id=study_id, number=number, split=split, batch=batch, slot=slot, status=status,
                graph=graph, graph_hash=graph_hash, method=method, origin=origin, parents=list(parents),
                info=json.loads(json.dumps(dict(info), default=str)), question_ids=list(question_ids),
                metrics=json.loads(json.dumps(dict(metrics), default=str)),
                reward=_finite(reward), accuracy=_finite(metrics.get("accuracy")),
                cost_units=cost.get("units"), flops=cost.get("flops"), usd=cost.get("usd"),
                latency_s=cost.get("latency_s"), new_runs=new_runs, error=error, feedback=feedback,
                agent_step_id=step_id, started_at=started_at or utcnow(), finished_at=utcnow())
            r.results = [_result_row(i, q, q.question_id in reused) for i, q in enumerate(results)]
            s.add(r)
            s.flush()
            return _trial_info(r)

    def list_trials(self, study_id: int, split: str | None = None) -> list[TrialInfo]:
        with self.session() as s:
            q = select(TrialRow).where(TrialRow.study_id == study_id)
            if split:
                q = q.where(TrialRow.split == split)
            return [_trial_info(r) for r in s.scalars(q.order_by(TrialRow.number))]

    def get_trial(self, study_id: int, number: int) -> TrialInfo | None:
        with self.session() as s:
            r = s.scalar(select(TrialRow).where(TrialRow.study_id == study_id, TrialRow.number == number))
            return _trial_info(r) if r else None

    def trial_results(self, trial_id: int) -> list[QuestionResult]:
        with self.session() as s:
            rows = s.scalars(select(QuestionResultRow).where(QuestionResultRow.trial_id == trial_id)
                             .order_by(QuestionResultRow.position))
            return [result_from_row(r) for r in rows]

    def agent_steps(self, study_id: int) -> list[dict]:
        with self.session() as s:
            rows = s.scalars(select(AgentStepRow).where(AgentStepRow.study_id == study_id).order_by(AgentStepRow.id))
            return [{c.name: getattr(r, c.name) for c in AgentStepRow.__table__.columns} for r in rows]


def _finite(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None
