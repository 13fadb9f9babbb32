"""The study store over SQLAlchemy (SQLite by default, any SQLAlchemy URL).

How it keeps the invariants of :class:`~graphtune.store.base.StudyStorage` (every backend)
and of :class:`~graphtune.store.base.WorkerStorage` (stores workers share):

* A trial is written in one transaction when it finishes, with all its question results;
  a crash never leaves a half-written finished trial.
* Finished trials are read-only.
* ``save_progress`` writes the searcher state, the batch counter and the spent budget
  in one transaction, after the batch's trials: a resumed search restarts at the first
  batch whose state was not saved, and finds that batch's finished trials by their
  ``(batch, slot)`` instead of running them again.
* Workers (``graphtune worker``, and ``graphtune optimize``, which runs as one): a trial
  is claimed by one conditional update (``SELECT ... FOR UPDATE SKIP LOCKED`` on
  PostgreSQL; SQLite serialises writers), finished only by the worker that still holds the
  claim, and retaken by another worker once its holder is dead (heartbeat older than the
  stale timeout, pid gone from this machine, or taken over). One worker at a time holds
  the study's update claim (:meth:`Storage.claim_update`) and computes the searcher's
  batch update outside any lock; :meth:`Storage.coordination` then commits state,
  counters, agent steps and the next batch's trials in one short transaction under the
  study row's lock, fenced by the batch counter.
* Secrets are never stored: the spec references API keys by environment-variable name,
  the stored spec's ``storage`` URL has no password, and every text written (trial info
  and errors, question results, agent steps, searcher state; the call ledger too) goes
  through the store's :class:`~graphtune.store.redact.Redactor`, to which the app gives
  the secret values it knows (``Storage(url, secrets=...)``).

Schema: versioned with Alembic (``graphtune.store.migrations``). A database without
graphtune's tables (empty, or an Optuna storage: every graphtune name has the ``gt_``
prefix, so the two share a database) gets ``create_all`` plus a ``gt_alembic_version``
stamped with the code's head revision (one transaction; the same tables the migrations
build, checked by tests/test_migrations.py); a database at an older revision is refused
until ``graphtune storage upgrade`` runs; one at an unknown (newer) revision is refused
too. Stores written before revision 0003 keep their revision in ``alembic_version``
(Alembic's default table, Optuna's too): they are recognised by a graphtune revision
there, and the upgrade moves it to ``gt_alembic_version``. Stores made before migrations
existed (graphtune's ``studies`` table, no ``alembic_version``) are stamped with the
baseline revision.

SQLite: WAL and a busy timeout, so several processes of one machine can share a file; a
file on a network filesystem (NFS, SMB/CIFS, sshfs...), or one shared by ``workers``,
gets a warning: SQLite's locking is not reliable there; use PostgreSQL.

Read-only use (``Storage(url, readonly=True)``: ``studies``, ``trials``, ``show``,
``report``...): no schema creation, no stamping, no pragma that writes; SQLite files are
opened with ``mode=ro``, PostgreSQL sessions are read-only, so a store the user may only
read still works.

SQLAlchemy errors are translated to ``StoreError`` here, in one place
(:func:`store_error`): one line, the password masked, with what to do for a full disk or a
read-only store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (Column, MetaData, String, Table, and_, create_engine, delete, event, func, inspect, or_,
                        select, update)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from graphtune.errors import StoreError
from graphtune.graphs.results import QuestionResult, outcomes_from_json, outcomes_to_json
from graphtune.store.models import AgentStepRow, Base, QuestionResultRow, StudyRow, TrialRow, WorkerRow, utcnow
from graphtune.store.base import (StudyInfo, StudyStorage, TrialInfo, TrialRecord, WorkerStorage, _finite,
                                  spec_hash)
from graphtune.store.redact import Redactor

#: a worker (``optimize`` included) whose heartbeat is older than this is dead: its claims
#: are taken over (at once when its pid is gone from this machine)
LEASE_STALE_S = 60.0
#: statuses of a worker row whose process runs (``updating``: it holds the batch-update claim)
LIVE = ("running", "updating")

SQLITE_BUSY_TIMEOUT_MS = 30_000

#: filesystem types on which several machines may open one SQLite file (its locks are not reliable there)
NETWORK_FS_TYPES = ("nfs", "nfs4", "cifs", "smb", "smb3", "smbfs", "fuse.sshfs", "sshfs", "9p", "afs",
                    "glusterfs", "fuse.glusterfs", "ceph", "fuse.ceph", "lustre", "gpfs", "beegfs")

# the table Alembic keeps graphtune's revision in (same definition as Alembic's own)
_VERSION_TABLE = Table("gt_alembic_version", MetaData(), Column("version_num", String(32), primary_key=True))
# where graphtune kept it before revision 0003 (Alembic's default, which Optuna uses too)
_LEGACY_VERSION_TABLE = Table("alembic_version", MetaData(), Column("version_num", String(32), primary_key=True))


def _legacy_revision(c, names: set[str]) -> str | None:
    """The revision of a store written before revision 0003 (unprefixed tables, the revision
    in ``alembic_version``, or none before migrations existed); None when the database holds
    no such store (it may hold Optuna's tables, which have the same names)."""
    from graphtune.store.migrations import BASELINE, LEGACY_REVISIONS

    if "studies" not in names or "spec_hash" not in {col["name"] for col in inspect(c).get_columns("studies")}:
        return None  # no graphtune studies table (Optuna's has no spec_hash)
    if _LEGACY_VERSION_TABLE.name not in names:
        return BASELINE
    rev = c.scalar(select(_LEGACY_VERSION_TABLE.c.version_num))
    return rev if rev in LEGACY_REVISIONS else None


_NULL_HANDLER = logging.NullHandler()


class SharedSQLiteWarning(UserWarning):
    """An SQLite store that several machines (or workers) would share."""


def mask_url(url: str) -> str:
    """``url`` as it may be shown: the password replaced by ``***``."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        # not a URL (a plain file name has no password to hide): shown as given
        return url if "://" not in url and "@" not in url else "<storage url>"


def url_password(url: str) -> str | None:
    """The password of a storage URL (None when it has none)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).password
    except Exception:
        return None


def url_without_password(url: str) -> str:
    """``url`` as it may be stored: without its password (the same URL when it has none)."""
    try:
        from sqlalchemy.engine import make_url

        u = make_url(url)
    except Exception:
        return url
    if u.password is None:
        return url
    from sqlalchemy.engine import URL

    bare = URL.create(u.drivername, username=u.username, host=u.host, port=u.port, database=u.database, query=u.query)
    return bare.render_as_string(hide_password=False)


def is_unnamed_memory_url(url: str) -> bool:
    """``sqlite://`` and ``sqlite:///``: an in-memory SQLite store nobody asked for by name
    (``sqlite:///:memory:`` is asked for by name)."""
    return url.startswith("sqlite") and "://" in url and url.split("://", 1)[1].split("?", 1)[0] in ("", "/")


def require_persistent(url: str, command: str) -> None:
    """Refuse a store that keeps nothing for a command that writes a study."""
    if is_unnamed_memory_url(url):
        raise StoreError(f"storage {url!r} is an in-memory SQLite store: `graphtune {command}` would keep nothing; "
                         "give a file, e.g. --storage sqlite:///graphtune.db")


def store_error(e: BaseException, what: str) -> StoreError:
    """The one-line ``StoreError`` for a database error (SQLAlchemy's or the driver's):
    its first line, without SQLAlchemy's background link, with what to do when the disk is
    full or the store is read-only."""
    orig = getattr(e, "orig", None) or e
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    msg = lines[0] if lines else type(orig).__name__
    msg = msg.split("(Background on this error at:")[0].strip()
    low = msg.lower()
    if "disk is full" in low or "no space left" in low or "could not extend file" in low:
        msg += ("; free disk space, then rerun the same command (the interrupted write was rolled back, "
                "nothing stored is lost)")
    elif "readonly database" in low or "read-only" in low or "read only" in low:
        msg += "; the store is read-only here: make it writable, or use a read-only command (studies, show, report)"
    return StoreError(f"{what}: {msg}")


def _retry_locked(fn, timeout_s: float = SQLITE_BUSY_TIMEOUT_MS / 1000):
    """Run ``fn`` again while SQLite says "database is locked". Switching a new file to WAL
    needs the file to itself, and SQLite may answer that at once, without its busy handler,
    while other processes open the same new store (seen with 6 processes on a loaded machine)."""
    import sqlite3
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


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


def _study_info(r: StudyRow, n_trials: int = 0) -> StudyInfo:
    return StudyInfo(r.id, r.name, r.method, r.spec, r.spec_hash, r.status, r.searcher_state,
                     r.batch_index, r.runs_spent, n_trials, r.created_at)


def _trial_info(r: TrialRow) -> TrialInfo:
    return TrialInfo(r.id, r.number, r.split, r.batch, r.slot, r.status, r.graph, r.graph_hash, r.method,
                     r.origin, r.parents, r.info, r.question_ids, r.metrics, r.reward, r.accuracy,
                     r.cost_units, r.flops, r.usd, r.latency_s, r.new_runs, r.error, r.feedback,
                     r.started_at, r.finished_at, r.worker)


def _result_row(i: int, r: QuestionResult, reused: bool, red: Redactor) -> QuestionResultRow:
    return QuestionResultRow(
        position=i, question_id=r.question_id, answer=red.text(r.answer), correct=r.correct, score=r.score,
        prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens, flops=r.flops, usd=r.usd,
        latency_s=r.latency_s, error=red.text(r.error), modelled=r.modelled, reused=reused,
        nodes=outcomes_to_json(r.nodes, r.stages, red.text))


def result_from_row(r: QuestionResultRow) -> QuestionResult:
    nodes, stages = outcomes_from_json(r.nodes)
    return QuestionResult(
        question_id=r.question_id, answer=r.answer, correct=r.correct, score=r.score,
        prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens, flops=r.flops, usd=r.usd,
        latency_s=r.latency_s, error=r.error, modelled=r.modelled,
        nodes=nodes, stages=stages)


class Storage(StudyStorage, WorkerStorage):
    """A graphtune store at a SQLAlchemy URL (e.g. ``sqlite:///graphtune.db``).

    ``create``: build the schema in an empty database (else an empty one is left alone);
    ``workers``: this process is one of several sharing the store (warns for SQLite);
    ``readonly``: only read (no schema creation or stamping, SQLite opened ``mode=ro``);
    ``secrets``: values never to be written (see :class:`~graphtune.store.redact.Redactor`;
    more can be added later with ``storage.redactor.add``)."""

    def __init__(self, url: str, *, create: bool = True, workers: bool = False, readonly: bool = False,
                 secrets=()):
        self.url = url
        self.readonly = readonly
        self.redactor = Redactor(secrets)
        if "://" not in url:
            sqlite = f"sqlite:///{url}" if "@" not in url else "sqlite:///FILE"
            raise StoreError(f"storage {mask_url(url)!r} is not a database URL: for an SQLite file write {sqlite}; "
                             "for PostgreSQL, postgresql+psycopg://USER@HOST/DB")
        why = shared_sqlite_warning(url, workers=workers) if not readonly else None
        if why:
            warnings.warn(why, SharedSQLiteWarning, stacklevel=2)
        try:
            try:
                self.engine = self._make_engine(url, readonly=readonly)
                self._check_schema(create and not readonly)
            except SQLAlchemyError as e:
                if not (readonly and sqlite_path(url) and ("unable to open" in str(e) or "readonly" in str(e))):
                    raise
                # a WAL store in a folder we may not write: no -shm can be made; read the
                # file as it is (nobody can be writing it without that folder's rights)
                self.engine.dispose()
                self.engine = self._make_engine(url, readonly=True, immutable=True)
                self._check_schema(False)
        except SQLAlchemyError as e:
            raise store_error(e, f"cannot open storage {self.safe_url()}") from None
        except ImportError as e:
            raise StoreError(f"storage {self.safe_url()} needs a database driver: {e}; install it with pip") from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    # -- schema ----------------------------------------------------------------------
    def schema_revision(self) -> str | None:
        """The store's Alembic revision (None: no graphtune tables yet)."""
        with self.engine.connect() as c:
            names = set(inspect(c).get_table_names())
            if _VERSION_TABLE.name in names:
                return c.scalar(select(_VERSION_TABLE.c.version_num))
            return _legacy_revision(c, names)

    def _check_schema(self, create: bool) -> None:
        from graphtune.store.migrations import HEAD, REVISIONS

        if self.engine.dialect.name == "sqlite" and self.readonly:
            with self.engine.connect() as c:
                rev = self._look_or_create(c, False, readonly=True)
        elif self.engine.dialect.name == "sqlite":
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
                        rev = self._look_or_create(c, create, readonly=self.readonly)
                    break
                except SQLAlchemyError:
                    if attempt:
                        raise
        if rev is None:
            return
        if rev == HEAD:
            return
        if rev in REVISIONS:
            raise StoreError(f"storage {self.safe_url()} has schema revision {rev}, this graphtune needs {HEAD}; "
                             f"run `graphtune storage upgrade --storage {self.safe_url()}` (back it up first)")
        raise StoreError(f"storage {self.safe_url()} has schema revision {rev!r}, unknown to this graphtune "
                         f"(needs {HEAD}); it was written by a newer graphtune: upgrade graphtune")

    @staticmethod
    def _look_or_create(c, create: bool, readonly: bool = False) -> str | None:
        """The store's revision (creating an empty store at the head revision when
        ``create``); None for an empty store left empty."""
        from graphtune.store.migrations import BASELINE, HEAD

        names = set(inspect(c).get_table_names())
        rev = c.scalar(select(_VERSION_TABLE.c.version_num)) if _VERSION_TABLE.name in names else None
        if rev is not None:
            return rev
        legacy = _legacy_revision(c, names)
        if legacy is None:  # no graphtune tables (the database may hold Optuna's)
            if not create:
                return None
            Base.metadata.create_all(c)
            _VERSION_TABLE.create(c, checkfirst=True)
            c.execute(_VERSION_TABLE.insert().values(version_num=HEAD))
            return HEAD
        if legacy == BASELINE and _LEGACY_VERSION_TABLE.name not in names and not readonly:
            # made before migrations existed: its schema is the baseline
            _LEGACY_VERSION_TABLE.create(c)
            c.execute(_LEGACY_VERSION_TABLE.insert().values(version_num=BASELINE))
        return legacy

    @classmethod
    def upgrade(cls, url: str) -> tuple[str | None, str]:
        """Migrate the store at ``url`` to the code's head revision (creating it when it has
        no graphtune tables); returns ``(revision before, revision after)``."""
        from graphtune.store.migrations import HEAD, LEGACY_REVISIONS, upgrade

        self = cls.__new__(cls)
        self.url, self.readonly, self.redactor = url, False, Redactor()
        try:
            self.engine = self._make_engine(url)
            try:
                before = self.schema_revision()
                if before is None:  # no graphtune tables (perhaps Optuna's): a fresh store
                    with self.engine.begin() as c:
                        self._look_or_create(c, True)
                else:
                    with self.engine.begin() as c:
                        names = set(inspect(c).get_table_names())
                        if _VERSION_TABLE.name not in names:
                            # written before revision 0003: its revision moves to graphtune's own
                            # table, and Alembic's default one goes (Optuna would take it for its own)
                            _VERSION_TABLE.create(c)
                            c.execute(_VERSION_TABLE.insert().values(version_num=before))
                            if _LEGACY_VERSION_TABLE.name in names and \
                                    c.scalar(select(_LEGACY_VERSION_TABLE.c.version_num)) in LEGACY_REVISIONS:
                                _LEGACY_VERSION_TABLE.drop(c)
                    upgrade(self.engine, "head")
                after = self.schema_revision()
            finally:
                self.engine.dispose()
        except SQLAlchemyError as e:
            raise store_error(e, f"cannot upgrade storage {self.safe_url()}") from None
        except ImportError as e:
            raise StoreError(f"storage {self.safe_url()} needs a database driver: {e}; install it with pip") from None
        if after != HEAD:
            raise StoreError(f"storage {self.safe_url()} is at revision {after} after the upgrade, expected {HEAD}")
        return before, after

    def safe_url(self) -> str:
        return mask_url(self.url)

    @staticmethod
    def _make_engine(url: str, *, readonly: bool = False, immutable: bool = False) -> Engine:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                parent = Path(path).expanduser().parent
                if not parent.exists():
                    raise StoreError(f"storage directory {parent} does not exist; create it or change `storage`")
            args = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
            file = sqlite_path(url)
            if readonly and file is not None:
                from urllib.parse import quote

                # a URI filename: mode=ro never writes (not even the WAL pragma's header change)
                mode = "ro&immutable=1" if immutable else "ro"
                url = f"sqlite:///file:{quote(str(file.resolve()))}?mode={mode}&uri=true"
            engine = create_engine(url, connect_args=args)

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn, _record):  # WAL: readers never block the writer
                cur = dbapi_conn.cursor()
                if not readonly:
                    _retry_locked(lambda: cur.execute("PRAGMA journal_mode=WAL"))
                cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
                cur.execute("PRAGMA foreign_keys=ON")
                if not readonly:
                    cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

            return engine
        # psycopg logs "error ignored terminating <Pipeline>" itself when a connection drops
        # mid-batch; with no logging configured Python prints it to stderr beside our one-line
        # StoreError. A NullHandler (the library convention) silences only that fallback.
        logging.getLogger("psycopg").addHandler(_NULL_HANDLER)
        kw = {}
        if readonly:
            from sqlalchemy.engine import make_url

            if make_url(url).get_driver_name() in ("psycopg", "psycopg2"):  # every transaction read-only
                kw["connect_args"] = {"options": "-c default_transaction_read_only=on"}
        return create_engine(url, pool_pre_ping=True, **kw)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        s = self._sessions()
        try:
            yield s
            s.commit()
        except SQLAlchemyError as e:
            try:
                s.rollback()
            except SQLAlchemyError:
                pass  # the connection is gone; the transaction is rolled back with it
            raise store_error(e, f"storage {self.safe_url()}") from None
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
            spec = self.redactor.value(dict(spec))
            r = StudyRow(name=name, method=method, spec=spec, spec_hash=spec_hash(spec))
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
            spec = self.redactor.value(dict(spec))
            r.spec, r.spec_hash = spec, spec_hash(spec)

    def delete_study(self, name: str) -> bool:
        with self.session() as s:
            r = s.scalar(select(StudyRow).where(StudyRow.name == name))
            if r is None:
                return False
            s.delete(r)
            return True

    def delete_study_if_empty(self, study_id: int) -> bool:
        with self.session() as s:
            r = s.get(StudyRow, study_id, with_for_update=True)
            if r is None or r.runs_spent or r.batch_index:
                return False
            if s.scalar(select(TrialRow.id).where(TrialRow.study_id == study_id,
                                                  TrialRow.status.in_(("complete", "failed"))).limit(1)) is not None:
                return False
            cutoff = self._now() - timedelta(seconds=LEASE_STALE_S)
            if s.scalar(select(WorkerRow.id).where(WorkerRow.study_id == study_id, WorkerRow.status.in_(LIVE),
                                                   WorkerRow.heartbeat_at > cutoff).limit(1)) is not None:
                return False  # another process has joined it
            s.delete(r)
            return True

    def reset_searcher(self, study_id: int, method: str) -> None:
        """Forget the searcher state (a study continued with another method); finished
        trials, the batch counter and the spent budget stay; trials queued by the old
        searcher and not finished are dropped."""
        with self.session() as s:
            r = s.get(StudyRow, study_id)
            r.method, r.searcher_state = method, None
            s.execute(delete(TrialRow).where(TrialRow.study_id == study_id,
                                             TrialRow.status.in_(("pending", "waiting", "running"))))

    def set_status(self, study_id: int, status: str) -> None:
        with self.session() as s:
            s.get(StudyRow, study_id).status = status

    def save_progress(self, study_id: int, *, state: Mapping[str, Any] | None, batch_index: int, runs_spent: int,
                      agent_steps: Sequence[Mapping[str, Any]] = ()) -> None:
        """Searcher state + counters + the batch's agent steps, in one transaction."""
        with self.session() as s:
            r = s.get(StudyRow, study_id)
            if state is not None:
                r.searcher_state = self.redactor.value(json.loads(json.dumps(state)))
            r.batch_index = batch_index
            r.runs_spent = runs_spent
            for step in agent_steps:
                if s.scalar(select(AgentStepRow.id).where(AgentStepRow.study_id == study_id,
                                                          AgentStepRow.key == step["key"])) is None:
                    s.add(AgentStepRow(study_id=study_id, **self.redactor.value(dict(step))))

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

    def record_trial(self, study_id: int, record: TrialRecord) -> TrialInfo:
        """Write one finished (or failed) trial with its results, atomically."""
        t = record
        with self.session() as s:
            number = (s.scalar(select(func.max(TrialRow.number)).where(TrialRow.study_id == study_id)) or 0) + 1
            step_id = None
            if t.info.get("agent_step"):
                step_id = s.scalar(select(AgentStepRow.id).where(AgentStepRow.study_id == study_id,
                                                                 AgentStepRow.key == t.info["agent_step"]))
            r = TrialRow(
                study_id=study_id, number=number, split=t.split, batch=t.batch, slot=t.slot, graph=t.graph,
                graph_hash=t.graph_hash, method=t.method, origin=t.origin, parents=list(t.parents),
                info=self.redactor.value(json.loads(json.dumps(dict(t.info), default=str))),
                question_ids=list(t.question_ids), feedback=self.redactor.text(t.feedback), agent_step_id=step_id,
                started_at=t.started_at or utcnow())
            _fill_outcome(r, status=t.status, results=t.results, reused=set(t.reused), metrics=t.metrics,
                          reward=t.reward, cost=t.cost, new_runs=t.new_runs, error=t.error, redactor=self.redactor)
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

    def register_worker(self, study_id: int, name: str, host: str, pid: int, *, take_over: bool = False,
                        stale_after_s: float = LEASE_STALE_S) -> None:
        """Add a worker process (``graphtune worker``, or ``graphtune optimize``, which runs
        as one) to the study, in one transaction holding the study's lock. Workers already
        there that are dead are marked stopped first, so their claimed trials and update
        claim are taken over at once: a heartbeat older than ``stale_after_s``, a pid gone
        from this machine, or (``take_over``: the caller says so) every other one."""
        def go():
            with self.session() as s:
                self._lock_study(s, study_id)
                now = self._now()
                cutoff = now - timedelta(seconds=stale_after_s)
                s.execute(update(WorkerRow).where(WorkerRow.study_id == study_id, WorkerRow.status.in_(LIVE),
                                                  WorkerRow.heartbeat_at <= cutoff).values(status="stopped"))
                for w in s.scalars(select(WorkerRow).where(WorkerRow.study_id == study_id,
                                                           WorkerRow.status.in_(LIVE))):
                    if take_over or _process_gone(w.host, w.pid):
                        w.status = "stopped"
                s.add(WorkerRow(study_id=study_id, name=name, host=host, pid=pid, status="running", started_at=now,
                                heartbeat_at=now))
        self._retrying(go, "registering a worker")

    def _study_name(self, study_id: int) -> str:
        with self.session() as s:
            return s.scalar(select(StudyRow.name).where(StudyRow.id == study_id)) or f"#{study_id}"

    def _lock_study(self, s: Session, study_id: int) -> None:
        """Hold the study row's lock (SQLite: the database's write lock) until commit."""
        if self.engine.dialect.name == "sqlite":
            s.execute(update(StudyRow).where(StudyRow.id == study_id).values(status=StudyRow.status))
        s.scalar(select(StudyRow.id).where(StudyRow.id == study_id).with_for_update())

    def worker_heartbeat(self, study_id: int, name: str, *, trial_id: int | None = None, trials_done: int = 0,
                         batches_updated: int = 0, status: str = "running") -> None:
        """Refresh the worker's heartbeat (and that of the trial it holds)."""
        def go():
            with self.session() as s:
                now = self._now()
                s.execute(update(WorkerRow).where(WorkerRow.study_id == study_id, WorkerRow.name == name).values(
                    heartbeat_at=now, trials_done=trials_done, batches_updated=batches_updated))
                keep = [WorkerRow.status != "updating"] if status == "running" else []  # the update claim stays
                s.execute(update(WorkerRow).where(WorkerRow.study_id == study_id, WorkerRow.name == name, *keep)
                          .values(status=status))
                if trial_id is not None:
                    s.execute(update(TrialRow).where(TrialRow.id == trial_id, TrialRow.worker == name,
                                                     TrialRow.status == "running").values(heartbeat_at=now))
        self._retrying(go, "worker heartbeat")

    def live_workers(self, study_id: int, stale_after_s: float) -> int:
        """Workers of the study whose heartbeat is fresher than ``stale_after_s``."""
        with self.session() as s:
            cutoff = self._now() - timedelta(seconds=stale_after_s)
            return int(s.scalar(select(func.count()).select_from(WorkerRow).where(
                WorkerRow.study_id == study_id, WorkerRow.status.in_(LIVE), WorkerRow.heartbeat_at > cutoff)) or 0)

    def list_workers(self, study_id: int) -> list[dict]:
        with self.session() as s:
            rows = s.scalars(select(WorkerRow).where(WorkerRow.study_id == study_id).order_by(WorkerRow.id))
            return [{c.name: getattr(r, c.name) for c in WorkerRow.__table__.columns} for r in rows]

    def claim_trial(self, study_id: int, worker: str, *, stale_after_s: float) -> TrialInfo | None:
        """Claim the first pending trial of the study (or a running one whose worker's
        heartbeat is older than ``stale_after_s``, or whose worker was marked stopped: dead,
        or taken over) for ``worker``; None when there is none.
        At most one worker gets a given claim."""
        def go():
            with self.session() as s:
                now = self._now()
                cutoff = now - timedelta(seconds=stale_after_s)
                gone = select(WorkerRow.name).where(WorkerRow.study_id == study_id, WorkerRow.status == "stopped")
                r = s.scalar(select(TrialRow).where(
                    TrialRow.study_id == study_id,
                    or_(TrialRow.status == "pending",
                        and_(TrialRow.status == "running",
                             or_(TrialRow.heartbeat_at < cutoff, TrialRow.worker.in_(gone)))))
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

    def finish_claim(self, trial_id: int, worker: str, record: TrialRecord) -> bool:
        """Store a claimed trial's outcome with its results, atomically, if ``worker`` still
        holds the claim (False: it was retaken after a stale heartbeat; nothing written).
        Trials of the same graph waiting for this one become claimable."""
        def go():
            with self.session() as s:
                r = s.scalar(select(TrialRow).where(TrialRow.id == trial_id).with_for_update())
                if r is None or r.status != "running" or r.worker != worker:
                    return False
                _fill_outcome(r, status=record.status, results=record.results, reused=set(record.reused),
                              metrics=record.metrics, reward=record.reward, cost=record.cost, new_runs=record.new_runs,
                              error=record.error, redactor=self.redactor)
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
    def coordination(self, study_id: int, *, wait: bool = False) -> Iterator[Coordination | None]:
        """The study's batch-update lock: yields a :class:`Coordination` holding it, or None
        when another worker holds it (``wait``: wait for it, retrying SQLite's busy
        timeouts). Everything written through the coordination commits in one transaction
        when the block ends (nothing if it raises)."""
        for attempt in range(20 if wait else 1):
            with self.session() as s:
                try:
                    if self.engine.dialect.name == "sqlite":
                        # a write first: SQLite's write lock is held until commit (others wait or skip)
                        s.execute(update(StudyRow).where(StudyRow.id == study_id).values(status=StudyRow.status))
                    r = s.scalar(select(StudyRow).where(StudyRow.id == study_id)
                                 .with_for_update(skip_locked=not wait))
                except SQLAlchemyError as e:
                    if "locked" not in str(e):
                        raise
                    s.rollback()  # SQLite: another worker held the write lock past the busy timeout
                    r = None
                if r is not None or not wait or attempt == 19:
                    yield Coordination(self, s, r) if r is not None else None
                    return
            time.sleep(0.05 * (attempt + 1))

    def claim_update(self, study_id: int, worker: str, *, stale_after_s: float) -> bool:
        """See :meth:`WorkerStorage.claim_update`: the claim is the worker's row in status
        ``updating``; a holder whose heartbeat is stale, or whose process is gone from this
        machine, has lost it."""
        def go():
            with self.session() as s:
                self._lock_study(s, study_id)
                cutoff = self._now() - timedelta(seconds=stale_after_s)
                others = [w for w in s.scalars(select(WorkerRow).where(
                    WorkerRow.study_id == study_id, WorkerRow.status == "updating", WorkerRow.name != worker,
                    WorkerRow.heartbeat_at > cutoff)) if not _process_gone(w.host, w.pid)]
                if others:
                    return False
                got = s.execute(update(WorkerRow).where(WorkerRow.study_id == study_id, WorkerRow.name == worker,
                                                        WorkerRow.status.in_(LIVE)).values(status="updating"))
                return got.rowcount == 1
        return self._retrying(go, "claiming the study's batch update")

    def release_update(self, study_id: int, worker: str) -> None:
        def go():
            with self.session() as s:
                s.execute(update(WorkerRow).where(WorkerRow.study_id == study_id, WorkerRow.name == worker,
                                                  WorkerRow.status == "updating").values(status="running"))
        self._retrying(go, "releasing the study's batch update")

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

    def paid_results(self, study_id: int) -> list[tuple[int, QuestionResult]]:
        with self.session() as s:
            rows = s.scalars(select(QuestionResultRow).join(TrialRow).where(
                TrialRow.study_id == study_id, QuestionResultRow.reused.is_(False))
                .order_by(TrialRow.number, QuestionResultRow.position))
            return [(r.trial_id, result_from_row(r)) for r in rows]

    def agent_steps(self, study_id: int) -> list[dict]:
        with self.session() as s:
            rows = s.scalars(select(AgentStepRow).where(AgentStepRow.study_id == study_id).order_by(AgentStepRow.id))
            return [{c.name: getattr(r, c.name) for c in AgentStepRow.__table__.columns} for r in rows]


def _process_gone(host: str, pid: int) -> bool:
    """True when ``pid`` runs on this machine (same host name) and no such process exists;
    a process of another machine is judged by its heartbeat only."""
    import socket

    if host != socket.gethostname() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def _fill_outcome(r: TrialRow, *, status: str, results: Sequence[QuestionResult], reused: set[str],
                  metrics: Mapping[str, Any], reward: float | None, cost: Mapping[str, float] | None,
                  new_runs: int, error: str | None, redactor: Redactor) -> None:
    cost = cost or {}
    r.status = status
    r.metrics = redactor.value(json.loads(json.dumps(dict(metrics), default=str)))
    r.reward, r.accuracy = _finite(reward), _finite(metrics.get("accuracy"))
    r.cost_units, r.flops, r.usd, r.latency_s = (cost.get("units"), cost.get("flops"), cost.get("usd"),
                                                 cost.get("latency_s"))
    r.new_runs, r.error, r.finished_at = new_runs, redactor.text(error), utcnow()
    r.results = [_result_row(i, q, q.question_id in reused, redactor) for i, q in enumerate(results)]


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
        s, r, red = self._s, self._r, self._storage.redactor
        if r.batch_index != expect_batch_index:
            raise StoreError(f"study {r.name!r} moved to batch {r.batch_index} during the update of batch "
                             f"{expect_batch_index}; it is retried")
        if state is not None:
            r.searcher_state = red.value(json.loads(json.dumps(state)))
        r.batch_index, r.runs_spent = batch_index, runs_spent
        if status:
            r.status = status
        for step in agent_steps:
            if s.scalar(select(AgentStepRow.id).where(AgentStepRow.study_id == r.id,
                                                      AgentStepRow.key == step["key"])) is None:
                s.add(AgentStepRow(study_id=r.id, **red.value(dict(step))))
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
            info = red.value(json.loads(json.dumps(dict(item.pop("info", {})), default=str)))
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

    def release_update(self, worker: str) -> None:
        """End ``worker``'s update claim as part of this transaction."""
        self._s.execute(update(WorkerRow).where(WorkerRow.study_id == self._r.id, WorkerRow.name == worker,
                                                WorkerRow.status == "updating").values(status="running"))
