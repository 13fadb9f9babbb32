"""The call ledger: every LLM call of a live environment, and the cache it serves.

A call is identified by :func:`~graphtune.graphs.calls.call_key`, a digest of the
endpoint, the messages, the sampling parameters and the **sample index** (the how-manieth
identical request this is within one graph run), so two nodes of one model with the same
prompt in one graph stay two samples, while a repeated or resumed search finds every call
it already paid for. The record (:class:`~graphtune.graphs.calls.CallRecord`) and the key
are plain values in :mod:`graphtune.graphs.calls` (re-exported here); the ledgers satisfy
the live environment's :class:`~graphtune.envs.base.CallLedger` protocol structurally,
without importing it, and the app (:mod:`graphtune.api`) hands one to the environment.

Invariants every ledger keeps:

* ``put`` never blocks on the database: records are queued and written in batches by a
  writer thread (one transaction per batch), so ledger writes never serialise the calls.
* A record put is visible to ``get`` at once (from memory until its batch is written).
* Only successful calls are served; failed calls are recorded (with their reason) but
  a later identical call is made again.
* ``flush`` returns when everything put before it is durable; ``close`` flushes.
* No secret is ever stored: records hold the model string and sampling parameters, never
  an API key or a header; and a secret value that appears in a prompt, a reply or an
  error (a key pasted into a question, echoed by the model) is replaced by
  :data:`~graphtune.store.redact.MASK` when the record is put (``secrets``: the values
  the app gives the ledger). The record served back from the ledger is the redacted one,
  in this process as after a resume.

``SQLLedger`` stores the ``gt_llm_calls`` table next to the studies (the same database);
with :meth:`SQLLedger.share` (``graphtune worker``) it also shares calls *in flight*
between processes: a process claims a call's key in ``llm_call_claims`` before calling,
and the others wait for its reply to appear instead of paying for it again (the claim
is deleted in the transaction that writes the reply; a dead owner's claim is taken over
once its worker heartbeat is stale).
``MemoryLedger`` is its in-process twin (for ``sqlite:///:memory:`` stores and tests).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.exc import SQLAlchemyError

from graphtune.errors import StoreError
# the call record and its key are plain values shared with the live environment
from graphtune.graphs.calls import CallRecord, call_key
from graphtune.store.models import LLMCallClaimRow, LLMCallRow, WorkerRow
from graphtune.store.redact import Redactor

#: the writer thread commits at most this many records per transaction
WRITE_BATCH = 500
#: after the first record of a batch the writer waits this long for more (fewer, larger
#: transactions: less time holding the GIL); a flush never waits for it
WRITE_LINGER_S = 0.05

__all__ = ["CallRecord", "Ledger", "LedgerStats", "MemoryLedger", "SQLLedger", "call_key", "open_ledger"]


@dataclass
class LedgerStats:
    puts: int = 0
    batches: int = 0
    rows_written: int = 0
    write_s: float = 0.0  # time the writer thread spent in transactions
    max_queue: int = 0


class Ledger:
    """Base of the call ledgers (see the module docstring for the contract)."""

    def __init__(self, secrets=()) -> None:
        self.stats = LedgerStats()
        self.redactor = secrets if isinstance(secrets, Redactor) else Redactor(secrets)

    def _redacted(self, r: CallRecord) -> CallRecord:
        red = self.redactor
        if not red:
            return r
        return CallRecord(key=r.key, model=red.text(r.model), endpoint=red.text(r.endpoint),
                          messages=red.value(list(r.messages)), params=red.value(dict(r.params)),
                          sample_index=r.sample_index, reply=red.text(r.reply), prompt_tokens=r.prompt_tokens,
                          completion_tokens=r.completion_tokens, latency_s=r.latency_s, usd=r.usd, flops=r.flops,
                          error=red.text(r.error), study=r.study)

    #: shares calls in flight with other processes (SQLLedger.share)
    shared = False

    def may_have(self, key: str) -> bool:
        """Cheap, in-memory: False means ``get`` would return None."""
        raise NotImplementedError

    def get(self, key: str) -> CallRecord | None:
        """The successful record of ``key``, or None."""
        raise NotImplementedError

    def put(self, record: CallRecord) -> None:
        """Queue a record (never blocks on the database)."""
        raise NotImplementedError

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every record put so far is durable."""

    def count(self, *, ok: bool | None = None) -> int:
        """Number of records (all, or only successful / failed ones)."""
        raise NotImplementedError

    def records(self) -> list[CallRecord]:
        """Every record, oldest first (for inspection and tests)."""
        raise NotImplementedError

    def close(self) -> None:
        self.flush()


class MemoryLedger(Ledger):
    """In-process ledger with the same contract."""

    def __init__(self, secrets=()) -> None:
        super().__init__(secrets)
        self._rows: list[CallRecord] = []
        self._ok: dict[str, CallRecord] = {}
        self._lock = threading.Lock()

    def may_have(self, key: str) -> bool:
        return key in self._ok

    def get(self, key: str) -> CallRecord | None:
        return self._ok.get(key)

    def put(self, record: CallRecord) -> None:
        record = self._redacted(record)
        with self._lock:
            self._rows.append(record)
            self.stats.puts += 1
            if record.ok:
                self._ok.setdefault(record.key, record)

    def count(self, *, ok: bool | None = None) -> int:
        return sum(1 for r in self._rows if ok is None or r.ok == ok)

    def records(self) -> list[CallRecord]:
        return list(self._rows)


_STOP = object()


class SQLLedger(Ledger):
    """The ledger in a graphtune store's database (table ``gt_llm_calls``).

    ``storage`` is a :class:`graphtune.store.storage.Storage` (its engine and error
    translation are reused). The keys of successful calls are loaded once into memory,
    so a miss costs no database read; a hit is one indexed read."""

    def __init__(self, storage, *, batch: int = WRITE_BATCH, linger_s: float = WRITE_LINGER_S) -> None:
        super().__init__(storage.redactor)  # the store's secrets
        self.storage = storage
        self.batch = int(batch)
        self.linger_s = float(linger_s)
        with storage.session() as s:
            self._ok_keys: set[str] = set(s.scalars(select(LLMCallRow.key).where(LLMCallRow.error.is_(None))))
        self._pending: dict[str, CallRecord] = {}  # put, successful, not yet written
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    owner: str | None = None  # set by share(): this process's worker name
    stale_after_s: float = 60.0

    # -- reads ---------------------------------------------------------------------
    def may_have(self, key: str) -> bool:
        # shared: another process may have recorded it since we loaded the keys
        return key in self._ok_keys or self.owner is not None

    def get(self, key: str) -> CallRecord | None:
        if key not in self._ok_keys and self.owner is None:
            return None
        with self._lock:
            rec = self._pending.get(key)
        if rec is not None:
            return rec
        with self.storage.session() as s:
            row = s.scalars(select(LLMCallRow).where(LLMCallRow.key == key, LLMCallRow.error.is_(None))
                            .order_by(LLMCallRow.id).limit(1)).first()
            if row is None:
                return None
            self._ok_keys.add(key)
            return _record(row)

    # -- calls in flight across processes (graphtune worker) -------------------------
    def share(self, owner: str, *, stale_after_s: float) -> None:
        """Share calls with the other worker processes of the store: see the module doc.
        ``owner`` is this worker's name (its row in ``workers`` carries its heartbeat)."""
        self.owner, self.stale_after_s = owner, float(stale_after_s)

    @property
    def shared(self) -> bool:
        return self.owner is not None

    def claim(self, key: str) -> bool:
        """Claim the call ``key`` for this process: True, or False when another process
        holds it (then wait for its reply with :meth:`get` / :meth:`claim_status`)."""
        try:
            with self.storage.session() as s:
                s.add(LLMCallClaimRow(key=key, owner=self.owner, claimed_at=self.storage._now()))
            return True
        except StoreError as e:
            msg = str(e).lower()
            if "unique" in msg or "duplicate" in msg:
                return False
            raise

    def claim_status(self, key: str) -> str:
        """``"held"`` (a live process is making the call) or ``"free"`` (no claim; a dead
        or stopped owner's claim is removed)."""
        from datetime import timedelta

        with self.storage.session() as s:
            c = s.get(LLMCallClaimRow, key)
            if c is None:
                return "free"
            cutoff = self.storage._now() - timedelta(seconds=self.stale_after_s)
            alive = s.scalar(select(func.count()).select_from(WorkerRow).where(
                WorkerRow.name == c.owner, WorkerRow.status.in_(("running", "updating")), WorkerRow.heartbeat_at > cutoff))
            if alive:
                return "held"
            s.execute(delete(LLMCallClaimRow).where(LLMCallClaimRow.key == key, LLMCallClaimRow.owner == c.owner))
            return "free"

    def release(self, key: str) -> None:
        """Drop this process's claim on ``key`` (its call failed without a record)."""
        with self.storage.session() as s:
            s.execute(delete(LLMCallClaimRow).where(LLMCallClaimRow.key == key, LLMCallClaimRow.owner == self.owner))

    def count(self, *, ok: bool | None = None) -> int:
        self.flush()
        with self.storage.session() as s:
            q = select(func.count()).select_from(LLMCallRow)
            if ok is True:
                q = q.where(LLMCallRow.error.is_(None))
            elif ok is False:
                q = q.where(LLMCallRow.error.is_not(None))
            return int(s.scalar(q) or 0)

    def records(self) -> list[CallRecord]:
        self.flush()
        with self.storage.session() as s:
            return [_record(r) for r in s.scalars(select(LLMCallRow).order_by(LLMCallRow.id))]

    # -- writes --------------------------------------------------------------------
    def put(self, record: CallRecord) -> None:
        if self._closed:
            raise StoreError("the call ledger is closed; open a new environment to record calls")
        self._raise_writer_error()
        record = self._redacted(record)
        if record.ok:
            with self._lock:
                self._pending.setdefault(record.key, record)
            self._ok_keys.add(record.key)
        self.stats.puts += 1
        self._ensure_thread()
        self._queue.put(record)
        self.stats.max_queue = max(self.stats.max_queue, self._queue.qsize())

    def flush(self, timeout_s: float | None = None) -> None:
        if self._thread is None:
            self._raise_writer_error()
            return
        done = threading.Event()
        self._queue.put(done)
        if not done.wait(timeout_s):
            raise StoreError(f"the call ledger did not finish writing within {timeout_s:g} s")
        self._raise_writer_error()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            if self._thread is not None:
                self._queue.put(_STOP)
                self._thread.join(10)
                self._thread = None

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            if isinstance(e, StoreError):
                raise e
            from graphtune.store.storage import store_error

            raise store_error(e, f"the call ledger could not be written to {self.storage.safe_url()}") from None

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._writer, name="graphtune-ledger", daemon=True)
            self._thread.start()

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            items = [item]
            deadline = time.monotonic() + self.linger_s
            while len(items) < self.batch and isinstance(items[-1], CallRecord):  # gather one transaction
                try:
                    items.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            records = [i for i in items if isinstance(i, CallRecord)]
            if records:
                self._write(records)
            for i in items:
                if isinstance(i, threading.Event):
                    i.set()
            if any(i is _STOP for i in items):
                return

    def _write(self, records: list[CallRecord]) -> None:
        t0 = time.perf_counter()
        try:
            with self.storage.engine.begin() as conn:
                conn.execute(insert(LLMCallRow), [_row(r) for r in records])
                if self.owner is not None:  # the replies are visible: other workers stop waiting
                    conn.execute(delete(LLMCallClaimRow).where(LLMCallClaimRow.key.in_([r.key for r in records]),
                                                               LLMCallClaimRow.owner == self.owner))
        except SQLAlchemyError as e:  # surfaced on the next put/flush, as one line
            from graphtune.store.storage import store_error

            self._error = store_error(e, f"the call ledger could not be written to {self.storage.safe_url()}")
            return
        except StoreError as e:
            self._error = e
            return
        finally:
            self.stats.write_s += time.perf_counter() - t0
        self.stats.batches += 1
        self.stats.rows_written += len(records)
        with self._lock:
            for r in records:
                if self._pending.get(r.key) is r:
                    del self._pending[r.key]


def _row(r: CallRecord) -> dict[str, Any]:
    d = asdict(r)
    d["endpoint"] = d["endpoint"][:300]
    d["model"] = d["model"][:300]
    return d


def _record(row: LLMCallRow) -> CallRecord:
    return CallRecord(key=row.key, model=row.model, endpoint=row.endpoint, messages=row.messages,
                      params=row.params, sample_index=row.sample_index, reply=row.reply,
                      prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens,
                      latency_s=row.latency_s, usd=row.usd, flops=row.flops, error=row.error, study=row.study)


def open_ledger(storage_url: str, *, secrets=()) -> Ledger:
    """The ledger of the store at ``storage_url``: in its database, or in memory for an
    in-memory SQLite store (whose connections cannot be shared with a writer thread).
    ``secrets``: values never written (see the module docstring)."""
    if storage_url.startswith("sqlite") and (":memory:" in storage_url or storage_url.rstrip("/") == "sqlite:"):
        return MemoryLedger(secrets)
    from graphtune.store.storage import Storage

    return SQLLedger(Storage(storage_url, secrets=secrets))
