"""Persistence of studies, trials, per-question results and agent steps.

``Storage`` (SQLAlchemy: SQLite by default, PostgreSQL by URL) and ``MemoryStorage``
(in-process, for benchmarks) keep the same contract, :class:`StudyStorage` (store/base.py),
checked by one shared test suite; ``Storage`` is also a :class:`WorkerStorage` (leases and
claims for ``graphtune worker`` processes).
"""

from graphtune.store.base import StudyInfo, StudyStorage, TrialInfo, TrialRecord, WorkerStorage
from graphtune.store.memory import MemoryStorage
from graphtune.store.storage import Storage

__all__ = ["MemoryStorage", "Storage", "StudyInfo", "StudyStorage", "TrialInfo", "TrialRecord", "WorkerStorage"]
