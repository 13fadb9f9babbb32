"""The Environment contract: run a graph on questions and score it.

An environment owns a task's questions (split into ``dev`` and ``test``), knows the
task's shape (average prompt/completion tokens, for costing), and evaluates a graph on a
list of question ids. Its results have the same shape whatever runs them (simulator,
live LLMs, replayed records), so nothing downstream can tell which produced them.

Invariants every environment keeps:

* ``evaluate`` returns one ``QuestionResult`` per requested id, in the same order.
* An infrastructure failure (endpoint down, timeout, ...) is a result with ``error`` set
  and ``correct=None``; it is excluded from accuracy, never scored as wrong.
* Deterministic environments return the same result for the same graph (up to node
  naming) and question, whatever the order or process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from graphtune.graphs.calls import CallRecord
from graphtune.graphs.cost import TaskShape
from graphtune.graphs.model import Graph
# the result values live at the bottom (graphs); re-exported here for existing users
from graphtune.graphs.results import Metrics, NodeOutcome, QuestionResult, summarize

__all__ = ["CallLedger", "Environment", "Metrics", "NodeOutcome", "QuestionResult", "summarize"]


@runtime_checkable
class CallLedger(Protocol):
    """What an environment needs of a call ledger: the cache and record of its LLM calls.

    The store's ledgers (:mod:`graphtune.store.ledger`) have these methods without
    importing this module (a structural type); the app builds one from the spec's store
    and hands it to the environment, so environments never import the store.

    * ``may_have(key)`` is cheap and in memory: False means ``get`` would return None.
    * ``get(key)`` is the successful record of ``key`` (served instead of a new call), or None.
    * ``put(record)`` queues a record, successful or failed, and never blocks on a database.
    * ``flush()`` returns when every record put so far is durable; ``close()`` flushes.
    * ``records()`` is every record, oldest first.
    * ``shared`` is True when calls in flight are shared with other processes; such a
      ledger also has ``claim(key) -> bool``, ``claim_status(key) -> "held" | "free"``,
      ``release(key)`` and ``share(owner, stale_after_s=...)`` (``graphtune worker``).
    """

    shared: bool

    def may_have(self, key: str) -> bool: ...

    def get(self, key: str) -> CallRecord | None: ...

    def put(self, record: CallRecord) -> None: ...

    def flush(self, timeout_s: float | None = None) -> None: ...

    def records(self) -> list[CallRecord]: ...

    def close(self) -> None: ...


class Environment(ABC):
    """Runs graphs on a task's questions. Subclasses: simulated, live, replay."""

    #: short name used in the spec (`env.kind`) and in stored trials
    kind: str = "abstract"

    @abstractmethod
    def split(self, name: str) -> list[str]:
        """Question ids of split ``name`` (``"dev"`` or ``"test"``), in a fixed order."""

    @abstractmethod
    def evaluate(self, graph: Graph, question_ids: Sequence[str]) -> list[QuestionResult]:
        """Run ``graph`` on each question; one result per id, same order."""

    @property
    @abstractmethod
    def shape(self) -> TaskShape:
        """Average prompt and completion tokens of the task (for analytic costing)."""

    def describe(self) -> str:
        """A short description of the task for the agent's prompt (no answers!)."""
        return self.kind

    def share_limits(self, workers: int) -> None:
        """Use ``1/workers`` of the spec's concurrency limits from the next evaluation on
        (``graphtune worker``: the limits then hold across all workers of a study). Only
        environments that call endpoints have limits."""

    def share_calls(self, owner: str, *, stale_after_s: float) -> None:
        """Share LLM calls in flight with the other worker processes of the store
        (``graphtune worker``; ``owner`` is this worker's name). Only environments that
        call endpoints through the call ledger make calls."""

    def close(self) -> None:
        """Release resources (servers, pools). Idempotent."""
