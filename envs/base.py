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
from dataclasses import dataclass

from graphtune.graphs.cost import TaskShape
from graphtune.graphs.model import Graph


@dataclass(frozen=True)
class NodeOutcome:
    """What one node of a graph did on one question."""

    node_id: str
    answer: str
    correct: bool | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0


@dataclass(frozen=True)
class QuestionResult:
    """A graph's outcome on one question."""

    question_id: str
    answer: str | None
    correct: bool | None
    score: float = 0.0  # in [0, 1]; 1.0 when correct for exact-match tasks
    prompt_tokens: int = 0
    completion_tokens: int = 0
    flops: float = 0.0
    usd: float = 0.0
    latency_s: float = 0.0  # critical path
    error: str | None = None  # infrastructure failure: excluded from accuracy
    modelled: bool = False  # outcome modelled rather than observed (replay)
    nodes: tuple[NodeOutcome, ...] = ()
    #: infrastructure failure: the pool model whose call failed (None when unknown); kept
    #: in the trial's ``metrics["excluded"]``, not in the per-question rows
    failed_model: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Metrics:
    """Aggregate of a list of question results."""

    n: int
    n_scored: int
    n_errors: int
    accuracy: float  # mean score over scored questions (nan when none)
    mean_flops: float
    mean_usd: float
    mean_latency_s: float
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def summarize(results: Sequence[QuestionResult]) -> Metrics:
    scored = [r for r in results if r.ok]
    n = len(results)
    k = len(scored)

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else float("nan")

    return Metrics(
        n=n, n_scored=k, n_errors=n - k,
        accuracy=mean(r.score for r in scored),
        mean_flops=mean(r.flops for r in scored),
        mean_usd=mean(r.usd for r in scored),
        mean_latency_s=mean(r.latency_s for r in scored),
        prompt_tokens=sum(r.prompt_tokens for r in results),
        completion_tokens=sum(r.completion_tokens for r in results),
    )


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
