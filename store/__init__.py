"""Persistence of studies, trials, per-question results and agent steps.

``Storage`` (SQLAlchemy: SQLite by default, PostgreSQL by URL) and ``MemoryStorage``
(in-process, for benchmarks) keep the same contract, checked by one shared test suite.
"""

from graphtune.store.memory import MemoryStorage
from graphtune.store.storage import Storage, StudyInfo, TrialInfo

__all__ = ["MemoryStorage", "Storage", "StudyInfo", "TrialInfo"]
