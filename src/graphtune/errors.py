"""One error tree for graphtune.

Every error a user can cause is a ``GraphtuneError``; its message is one line naming the
object at fault and what to do about it. The CLI prints that line and exits non-zero
(code 2 for bad input, 1 otherwise); tracebacks only with ``--debug``.
"""

from __future__ import annotations


class GraphtuneError(Exception):
    """Base of every error graphtune raises on purpose."""

    exit_code = 1


class SpecError(GraphtuneError):
    """The YAML spec (or a CLI flag overriding it) is invalid."""

    exit_code = 2


class GraphError(GraphtuneError):
    """A graph is malformed or does not fit the search space."""

    exit_code = 2


class BudgetError(GraphError):
    """A graph, or every graph of a space, exceeds the budget."""


class StoreError(GraphtuneError):
    """The study store cannot be read or written."""


class SearchError(GraphtuneError):
    """A search cannot go on as asked (e.g. a searcher that is not deterministic when
    several workers rebuild it)."""


class EnvError(GraphtuneError):
    """An environment cannot evaluate (bad profile, dataset, endpoint...)."""


class DatasetError(EnvError):
    """A dataset file or its rows cannot be used as asked (bad input, like a spec error)."""

    exit_code = 2


class AgentError(GraphtuneError):
    """The feedback agent failed in a way the search cannot recover from."""


class LLMError(GraphtuneError):
    """A call to an LLM endpoint failed (after retries, where retrying made sense)."""


class LLMTransientError(LLMError):
    """Rate limit, 5xx, timeout, connection error or empty reply that outlived its
    retries: an infrastructure failure, never a wrong answer."""


class EndpointDownError(LLMError):
    """Every call to a model failed for ``max_consecutive_failures`` calls in a row (each
    after its retries): the endpoint looks down, so the search stops before spending its
    budget on failures. What finished is kept; the study continues once it is back."""


class LLMFatalError(LLMError):
    """Authentication failure, unknown model or bad request: retrying or continuing
    would only spend more money, so the search stops."""


class GraphtuneWarning(UserWarning):
    """Base of graphtune's warnings: something a result rests on that the user did not give
    (a default taken in its place); one line naming it and how to set it. The CLI prints
    each as one ``warning:`` line."""
