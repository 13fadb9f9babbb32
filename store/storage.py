"""The study store over SQLAlchemy (SQLite by default, any SQLAlchemy URL).

Invariants every backend keeps:

* A trial is written in one transaction when it finishes, with all its question results;
  a crash never leaves a half-written finished trial.
* Finished trials are read-only.
* ``save_progress`` writes the searcher state, the batch counter and the spent budget
  in one transaction, after the batch's trials: a resumed search restarts at the first
  batch whose state was not saved, and finds that batch's finished trials by their
  ``(batch, slot)`` instead of running them again.
* Distributed evaluation (``graphtune worker``): a trial is claimed by one conditional
  update (``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite serialises writers),
  finished only by the worker that still holds the claim, and retaken by another worker
  once its heartbeat is older than the stale timeout. The searcher's batch update runs in
  :meth:`Storage.coordination`, which holds the study row's lock (PostgreSQL) or SQLite's
  write lock for the whole update and commits state, counters, agent steps and the next
  batch's trials in one transaction, fenced by the batch counter.
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
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (Column, MetaData, String, Table, and_, create_engine, event, func, inspect, or_, select,
                        update)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from graphtune.envs.base import NodeOutcome, QuestionResult
from graphtune.errors import StoreError
from graphtune.store.models import AgentStepRow, Base, QuestionResultRow, StudyRow, TrialRow, WorkerRow, utcnow

SQLITE_BUSY_TIMEOUT_MS = 30_000

#: filesystem types on which several machines may open one SQLite file (its locks are not reliable there)
NETWORK_FS_TYPES = ("nfs", "nfs4", "cifs", "smb", "smb3", "smbfs", "fuse.sshfs", "sshfs", "9p", "afs",
                    "glusterfs", "fuse.glusterfs", "ceph", "fuse.ceph", "lustre", "gpfs", "beegfs")

# the table Alembic keeps its revision in (same definition as Alembic's own)
_VERSION_TABLE = Table("alembic_version", MetaData(), Column("version_num", String(32), primary_key=True))


_NULL_HANDLER = logging.NullHandler()


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
    worker: str | None = None  # the worker holding (or that held) the claim (graphtune worker)


def _study_info(r: StudyRow, n_trials: int = 0) -> StudyInfo:
    return StudyInfo(r.id, r.name, r.method, r.spec, r.spec_hash, r.status, r.searcher_state,
                     r.batch_index, r.runs_spent, n_trials, r.created_at)


def _trial_info(r: TrialRow) -> TrialInfo:
    return TrialInfo(r.id, r.number, r.split, r.batch, r.slot, r.status, r.graph, r.graph_hash, r.method,
                     r.origin, r.parents, r.info, r.question_ids, r.metrics, r.reward, r.accuracy,
                     r.cost_units, r.flops, r.usd, r.latency_s, r.new_runs, r.error, r.feedback,
                     r.started_at, r.finished_at, r.worker)


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

        if self.engine.dialect.name == "sqlite":
            # one process at a time looks at (and creates) the schema: pysqlite runs DDL
            # outside transactions, so a second process could see the tables before the
            # revision stamp and take a brand-new store for a pre-migration one
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                c.exec_driver_sql("BEGIN IMMEDIATE")
                try:
                    rev = self._look_or_create(c, create)
                    c.exec_driver_sql("COMMIT")
                except BaseException:
                    c.exec_driver_sql("ROLLBACK")
                    raise
        else:
            for attempt in range(2):  # a concurrent process may create the schema between our look and write
                try:
                    with self.engine.begin() as c:
                        rev = self._look_or_create(c, create)
                    break
                except SQLAlchemyError:
                    if attempt:
                        raise
        if rev is None:
            return
        if rev == HEAD:
            return
        if rev in REVISIONS:
            raise StoreError(f"storage {self._safe_url()} has schema revision {rev}, this graphtune needs {HEAD}; "
                             f"run `graphtune storage upgrade --storage {self._safe_url()}` (back it up first)")
        raise StoreError(f"storage {self._safe_url()} has schema revision {rev!r}, unknown to this graphtune "
                         f"(needs {HEAD}); it was written by a newer graphtune: upgrade graphtune")

    @staticmethod
    def _look_or_create(c, create: bool) -> str | None:
        """The store's revision (creating an empty store at the head revision when
        ``create``); None for an empty store left empty."""
        from graphtune.store.migrations import BASELINE, HEAD

        names = set(inspect(c).get_table_names())
        rev = c.scalar(select(_VERSION_TABLE.c.version_num)) if "alembic_version" in names else None
        if rev is None and "studies" not in names:
            if not create:
                return None
            Base.metadata.create_all(c)
            _VERSION_TABLE.create(c, checkfirst=True)
            c.execute(_VERSION_TABLE.insert().values(version_num=HEAD))
            return HEAD
        if rev is None:  # made before migrations existed: its schema is the baseline
            _VERSION_TABLE.create(c, checkfirst=True)
            c.execute(_VERSION_TABLE.insert().values(version_num=BASELINE))
            rev = BASELINE
        return rev

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
        # psycopg logs "error ignored terminating <Pipeline>" itself when a connection drops
        # mid-batch; with no logging configured Python prints it to stderr beside our one-line
        # StoreError. A NullHandler (the library convention) silences only that fallback.
        logging.getLogger("psycopg").addHandler(_NULL_HANDLER)
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

    def known_question_ids(self, study_id: int, graph_hash: str, split: str, *, before_batch: int) -> set[str]:
        """Questions of ``split`` this graph has a reusable result on, from batches before
        ``before_batch`` (what a batch's runs are predicted from)."""
        with self.session() as s:
            return set(s.scalars(select(QuestionResultRow.question_id).join(TrialRow).where(
                TrialRow.study_id == study_id, TrialRow.graph_hash == graph_hash, TrialRow.split == split,
                TrialRow.status == "complete", TrialRow.batch < before_batch, QuestionResultRow.error.is_(None))))

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
            r = TrialRow(
                study_id=study_id, number=number, split=split, batch=batch, slot=slot, graph=graph,
                graph_hash=graph_hash, method=method, origin=origin, parents=list(parents),
                info=json.loads(json.dumps(dict(info), default=str)), question_ids=list(question_ids),
                feedback=feedback, agent_step_id=step_id, started_at=started_at or utcnow())
            _fill_outcome(r, status=status, results=results, reused=reused, metrics=metrics, reward=reward,
                          cost=cost, new_runs=new_runs, error=error)
            s.add(r)
            s.flush()
            return _trial_info(r)

    # -- distributed evaluation (graphtune worker) -------------------------------------
    def _now(self):
        """The database's clock on PostgreSQL (workers on several machines agree on it),
        this machine's on SQLite (one machine)."""
        return func.now() if self.engine.dialect.name == "postgresql" else utcnow()

    def _retrying(self, fn, what: str, tries: int = 8):
        """Run ``fn`` again when SQLite reports a write conflict (a stale snapshot is not
        waited for by its busy handler); PostgreSQL conflicts are resolved by row locks."""
        for i in range(tries):
            try:
                return fn()
            except StoreError as e:
                if "locked" not in str(e) and "busy" not in str(e).lower() or i == tries - 1:
                    raise StoreError(f"{what}: {e}") from None
                time.sleep(0.02 * (i + 1))

    def register_worker(self, study_id: int, name: str, host: str, pid: int) -> None:
        with self.session() as s:
            now = self._now()
            s.add(WorkerRow(study_id=study_id, name=name, host=host, pid=pid, status="running", started_at=now,
                            heartbeat_at=now))

    def worker_heartbeat(self, study_id: int, name: str, *, trial_id: int | None = None, trials_done: int = 0,
                         batches_updated: int = 0, status: str = "running") -> None:
        """Refresh the worker's heartbeat (and that of the trial it holds)."""
        def go():
            with self.session() as s:
                now = self._now()
                s.execute(update(WorkerRow).where(WorkerRow.study_id == study_id, WorkerRow.name == name).values(
                    heartbeat_at=now, trials_done=trials_done, batches_updated=batches_updated, status=status))
                if trial_id is not None:
                    s.execute(update(TrialRow).where(TrialRow.id == trial_id, TrialRow.worker == name,
                                                     TrialRow.status == "running").values(heartbeat_at=now))
        self._retrying(go, "worker heartbeat")

    def live_workers(self, study_id: int, stale_after_s: float) -> int:
        """Workers of the study whose heartbeat is fresher than ``stale_after_s``."""
        with self.session() as s:
            cutoff = self._now() - timedelta(seconds=stale_after_s)
            return int(s.scalar(select(func.count()).select_from(WorkerRow).where(
                WorkerRow.study_id == study_id, WorkerRow.status == "running", WorkerRow.heartbeat_at > cutoff)) or 0)

    def list_workers(self, study_id: int) -> list[dict]:
        with self.session() as s:
            rows = s.scalars(select(WorkerRow).where(WorkerRow.study_id == study_id).order_by(WorkerRow.id))
            return [{c.name: getattr(r, c.name) for c in WorkerRow.__table__.columns} for r in rows]

    def claim_trial(self, study_id: int, worker: str, *, stale_after_s: float) -> TrialInfo | None:
        """Claim the first pending trial of the study (or a running one whose worker's
        heartbeat is older than ``stale_after_s``) for ``worker``; None when there is none.
        At most one worker gets a given claim."""
        def go():
            with self.session() as s:
                now = self._now()
                cutoff = now - timedelta(seconds=stale_after_s)
                r = s.scalar(select(TrialRow).where(
                    TrialRow.study_id == study_id,
                    or_(TrialRow.status == "pending", and_(TrialRow.status == "running", TrialRow.heartbeat_at < cutoff)))
                    .order_by(TrialRow.batch, TrialRow.slot).limit(1).with_for_update(skip_locked=True))
                if r is None:
                    return None
                got = s.execute(update(TrialRow).where(
                    TrialRow.id == r.id, TrialRow.status == r.status, TrialRow.attempts == r.attempts).values(
                    status="running", worker=worker, heartbeat_at=now, started_at=now, attempts=r.attempts + 1))
                if got.rowcount != 1:
                    return False  # taken by another worker between our read and write: look again
                s.flush()
                s.refresh(r)
                return _trial_info(r)

        for _ in range(20):
            t = self._retrying(go, "claiming a trial")
            if t is not False:
                return t
        return None

    def finish_claim(self, trial_id: int, worker: str, *, status: str, results: Sequence[QuestionResult],
                     reused: set[str], metrics: Mapping[str, Any], reward: float | None,
                     cost: Mapping[str, float] | None, new_runs: int, error: str | None = None) -> bool:
        """Store a claimed trial's outcome with its results, atomically, if ``worker`` still
        holds the claim (False: it was retaken after a stale heartbeat; nothing written).
        Trials of the same graph waiting for this one become claimable."""
        def go():
            with self.session() as s:
                r = s.scalar(select(TrialRow).where(TrialRow.id == trial_id).with_for_update())
                if r is None or r.status != "running" or r.worker != worker:
                    return False
                _fill_outcome(r, status=status, results=results, reused=reused, metrics=metrics, reward=reward,
                              cost=cost, new_runs=new_runs, error=error)
                s.execute(update(TrialRow).where(TrialRow.study_id == r.study_id, TrialRow.status == "waiting",
                                                 TrialRow.after_trial == r.number).values(status="pending"))
                return True
        return self._retrying(go, "storing a trial")

    def release_claim(self, trial_id: int, worker: str) -> None:
        """Give a claimed trial back (the worker stops without finishing it)."""
        def go():
            with self.session() as s:
                s.execute(update(TrialRow).where(TrialRow.id == trial_id, TrialRow.worker == worker,
                                                 TrialRow.status == "running").values(status="pending", worker=None,
                                                                                     heartbeat_at=None))
        self._retrying(go, "releasing a trial")

    def unfinished_trials(self, study_id: int) -> int:
        """Trials queued for or held by workers (pending, waiting, running)."""
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(TrialRow).where(
                TrialRow.study_id == study_id, TrialRow.status.in_(("pending", "waiting", "running")))) or 0)

    def idle_batches(self, study_id: int, before: int) -> int:
        """How many dev batches up to ``before`` (exclusive), counted back from it, paid for
        no new run."""
        with self.session() as s:
            rows = dict(s.execute(select(TrialRow.batch, func.sum(TrialRow.new_runs)).where(
                TrialRow.study_id == study_id, TrialRow.split == "dev", TrialRow.batch < before,
                TrialRow.batch >= 0).group_by(TrialRow.batch)).all())
        n = 0
        for b in range(before - 1, -1, -1):
            if rows.get(b, 0):
                break
            n += 1
        return n

    @contextlib.contextmanager
    def coordination(self, study_id: int) -> Iterator[Coordination | None]:
        """The study's batch-update lock: yields a :class:`Coordination` holding it, or None
        when another worker holds it. Everything written through the coordination commits
        in one transaction when the block ends (nothing if it raises)."""
        with self.session() as s:
            try:
                if self.engine.dialect.name == "sqlite":
                    # a write first: SQLite's write lock is held until commit (others wait or skip)
                    s.execute(update(StudyRow).where(StudyRow.id == study_id).values(status=StudyRow.status))
                r = s.scalar(select(StudyRow).where(StudyRow.id == study_id).with_for_update(skip_locked=True))
            except SQLAlchemyError as e:
                if "locked" not in str(e):
                    raise
                s.rollback()  # SQLite: another worker held the write lock past the busy timeout
                r = None
            yield Coordination(self, s, r) if r is not None else None

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


def _fill_outcome(r: TrialRow, *, status: str, results: Sequence[QuestionResult], reused: set[str],
                  metrics: Mapping[str, Any], reward: float | None, cost: Mapping[str, float] | None,
                  new_runs: int, error: str | None) -> None:
    cost = cost or {}
    r.status = status
    r.metrics = json.loads(json.dumps(dict(metrics), default=str))
    r.reward, r.accuracy = _finite(reward), _finite(metrics.get("accuracy"))
    r.cost_units, r.flops, r.usd, r.latency_s = (cost.get("units"), cost.get("flops"), cost.get("usd"),
                                                 cost.get("latency_s"))
    r.new_runs, r.error, r.finished_at = new_runs, error, utcnow()
    r.results = [_result_row(i, q, q.question_id in reused) for i, q in enumerate(results)]


class Coordination:
    """The batch-update lock of one study, held (see :meth:`Storage.coordination`)."""

    def __init__(self, storage: Storage, session: Session, row: StudyRow):
        self._storage, self._s, self._r = storage, session, row

    @property
    def study(self) -> StudyInfo:
        return _study_info(self._r)

    def trials(self, split: str, batch: int) -> list[TrialInfo]:
        """The study's trials of one batch, by slot."""
        q = select(TrialRow).where(TrialRow.study_id == self._r.id, TrialRow.split == split, TrialRow.batch == batch)
        return [_trial_info(r) for r in self._s.scalars(q.order_by(TrialRow.slot, TrialRow.number))]

    def advance(self, *, expect_batch_index: int, state: Mapping[str, Any] | None, batch_index: int,
                runs_spent: int, agent_steps: Sequence[Mapping[str, Any]] = (), enqueue: Sequence[Mapping] = (),
                status: str | None = None) -> list[int]:
        """Save the searcher state and counters, the agent steps, and queue ``enqueue``
        (trial fields; ``after_slot``: the slot of this batch it must wait for); returns the
        new trials' numbers. Refused if the batch counter moved (another update won)."""
        s, r = self._s, self._r
        if r.batch_index != expect_batch_index:
            raise StoreError(f"study {r.name!r} moved to batch {r.batch_index} during the update of batch "
                             f"{expect_batch_index}; it is retried")
        if state is not None:
            r.searcher_state = json.loads(json.dumps(state))
        r.batch_index, r.runs_spent = batch_index, runs_spent
        if status:
            r.status = status
        for step in agent_steps:
            if s.scalar(select(AgentStepRow.id).where(AgentStepRow.study_id == r.id,
                                                      AgentStepRow.key == step["key"])) is None:
                s.add(AgentStepRow(study_id=r.id, **step))
        s.flush()
        number = s.scalar(select(func.max(TrialRow.number)).where(TrialRow.study_id == r.id)) or 0
        by_slot: dict[int, int] = {}
        out = []
        for item in enqueue:
            item = dict(item)
            after = item.pop("after_slot", None)
            if after is not None and after not in by_slot:  # the slot it waits for was queued earlier
                prev = s.scalar(select(TrialRow).where(TrialRow.study_id == r.id, TrialRow.split == item["split"],
                                                       TrialRow.batch == item["batch"], TrialRow.slot == after))
                if prev is None or prev.status in ("complete", "failed"):
                    after = None
                else:
                    by_slot[after] = prev.number
            info = json.loads(json.dumps(dict(item.pop("info", {})), default=str))
            step_id = None
            if info.get("agent_step"):
                step_id = s.scalar(select(AgentStepRow.id).where(AgentStepRow.study_id == r.id,
                                                                 AgentStepRow.key == info["agent_step"]))
            number += 1
            row = TrialRow(study_id=r.id, number=number, info=info, agent_step_id=step_id, metrics={}, new_runs=0,
                           status="waiting" if after is not None else "pending",
                           after_trial=by_slot[after] if after is not None else None, **item)
            row.parents = list(row.parents or [])
            row.question_ids = list(row.question_ids or [])
            s.add(row)
            by_slot[item["slot"]] = number
            out.append(number)
        s.flush()
        return out

    def set_status(self, status: str) -> None:
        self._r.status = status
