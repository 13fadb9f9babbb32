"""The Agent contract: read a report, answer with feedback and a structured update.

Lifecycle (driven by the ``agent-reinforce`` searcher)::

    agent = SomeAgent(problem, ...)
    step = agent.initial(init_report)     # once, after the cheap single-model probes
    step = agent.feedback(batch_report)   # after every batch
    agent.close()

Contract every backend keeps:

* It never raises for a bad reply: an unusable reply is an ``AgentStep`` with
  ``update=None`` and ``rejected_reason`` set, so the search falls back to its numeric
  update and goes on. Only an unrecoverable failure (bad credentials, unknown model)
  raises ``graphtune.errors.LLMFatalError``.
* It counts its own calls, tokens, dollars and seconds in the step, apart from the
  environment's cost.
* ``is_llm`` and ``backend`` say truthfully what produced the step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from graphtune.agent.report import BatchReport, InitReport
from graphtune.agent.schema import AgentUpdate


@dataclass(frozen=True)
class AgentStep:
    """What one agent call produced (before the searcher applies it)."""

    kind: str  # "init" | "feedback"
    prompt: str | None
    reply: str | None
    update: AgentUpdate | None  # None when the reply was unusable
    rejected_reason: str | None = None
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0
    seconds: float = 0.0

    @property
    def feedback(self) -> str | None:
        return self.update.feedback if self.update is not None else None


class Agent(ABC):
    """Base of the feedback agents (see the module docstring)."""

    #: label stored with every step ("heuristic (statistical critic, not an LLM)" or a model string)
    backend: str = "abstract"
    #: whether an LLM produced the steps
    is_llm: bool = False

    @abstractmethod
    def initial(self, report: InitReport) -> AgentStep:
        """Initial preferences (and proposals) from the task, the pool, the budget and the
        probe results."""

    @abstractmethod
    def feedback(self, report: BatchReport) -> AgentStep:
        """Feedback and a structured update after one batch."""

    def close(self) -> None:
        """Release connections. Idempotent."""
