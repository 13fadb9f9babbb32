"""The agent toolkit: ask an LLM for a reply that validates against a pydantic schema.

:func:`ask_structured` is the one loop behind every LLM step of graphtune (the
``agent-reinforce`` critic, :class:`graphtune.agent.llm_agent.LLMAgent`, and ``llm-opt``'s
proposer): call the injected client, read the reply under
:class:`~graphtune.agent.schema.ReplyLimits` (length and nesting bounded before parsing,
non-finite numbers and unstorable strings refused: :func:`load_reply_json`), validate it
against the caller's schema and, when it is unusable, ask again with the reason, the
previous reply sent back as its bounded excerpt (:func:`reply_excerpt`), never whole.

The client is injected (``complete``: a function with the signature of
:func:`graphtune.llm.complete`, which the app passes; tests pass a fake): this layer
never imports the app. A transient LLM failure (the client's own retries spent) ends the
loop and is returned as data; a fatal one (bad key, unknown model) propagates.

What comes back is a :class:`StructuredReply` value: the parsed model or the reason there
is none, and one :class:`Attempt` per call (bounded excerpt, tokens, seconds), from
which each caller derives what it stores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from graphtune.agent.schema import ReplyLimits, describe_reply_error, load_reply_json, reply_excerpt
from graphtune.errors import LLMFatalError, LLMTransientError

M = TypeVar("M", bound=BaseModel)

#: A completion function with the signature of :func:`graphtune.llm.complete`.
CompleteFn = Callable[..., Any]


@dataclass(frozen=True)
class Attempt:
    """One answered call: the bounded excerpt of its reply, its usage, and the reason
    the reply was refused (``None`` for the accepted one). ``seconds`` is what the client
    reported (``0.0`` if nothing), ``wall_s`` the wall-clock time of the call."""

    excerpt: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    wall_s: float
    error: str | None = None


@dataclass(frozen=True)
class StructuredReply(Generic[M]):
    """The outcome of :func:`ask_structured`.

    ``value`` is the validated model, or ``None``; then ``transient`` holds the LLM
    failure that ended the loop (its call is not an :class:`Attempt`; its wall-clock time
    is ``transient_wall_s``), else ``error`` holds the last reply's rejection reason
    (``None`` too if no call was made).
    ``messages`` is the conversation as last sent, retries included."""

    value: M | None
    attempts: tuple[Attempt, ...]
    messages: tuple[Mapping[str, str], ...]
    error: str | None = None
    transient: LLMTransientError | None = None
    transient_wall_s: float = 0.0

    @property
    def excerpts(self) -> list[str]:
        """The bounded excerpt of each answered call, in order."""
        return [a.excerpt for a in self.attempts]

    @property
    def calls(self) -> int:
        """Calls that returned a reply (a transient failure not included)."""
        return len(self.attempts)

    @property
    def prompt_tokens(self) -> int:
        return sum(a.prompt_tokens for a in self.attempts)

    @property
    def completion_tokens(self) -> int:
        return sum(a.completion_tokens for a in self.attempts)

    def usd(self, usd_per_mtok_in: float = 0.0, usd_per_mtok_out: float = 0.0) -> float:
        """Dollars of the answered calls at the given prices per million tokens."""
        return (self.prompt_tokens * usd_per_mtok_in + self.completion_tokens * usd_per_mtok_out) / 1e6


def retry_message(reason: str) -> str:
    """The default message asking again after a refused reply."""
    return f"Your reply was invalid: {reason}. Reply again with JSON that matches the schema."


def parse_structured(text: str, schema: type[M], limits: ReplyLimits = ReplyLimits()) -> M:
    """A reply read under ``limits`` (:func:`load_reply_json`) and validated against
    ``schema``. Raises ``ValueError``: :class:`~graphtune.agent.schema.ReplyRejected`,
    ``json.JSONDecodeError`` or pydantic's ``ValidationError``."""
    return schema.model_validate(load_reply_json(text, limits))


def ask_structured(complete: CompleteFn, model: str, messages: Sequence[Mapping[str, str]], schema: type[M], *,
                   limits: ReplyLimits = ReplyLimits(), parse_retries: int = 1,
                   json_schema: Mapping[str, Any] | None = None,
                   describe_error: Callable[[Exception], str] = describe_reply_error,
                   retry_prompt: Callable[[str], str] = retry_message,
                   **call_kwargs: Any) -> StructuredReply[M]:
    """Ask ``model`` through ``complete`` until a reply validates against ``schema``.

    At most ``1 + parse_retries`` calls (the client's own ``max_retries`` on transient
    failures, like every other client option, goes in ``call_kwargs``). Each call is ``complete(model, messages,
    json_schema=..., **call_kwargs)``; ``json_schema`` defaults to the schema's own
    (pass a provider-friendly one where the pydantic schema has constraints strict
    providers refuse). An unusable reply (refused by the reply guards, not JSON, or not
    matching ``schema``) is described by ``describe_error`` (by default
    :func:`~graphtune.agent.schema.describe_reply_error`, the one-line reason every agent
    step stores) and the next call appends the
    reply's excerpt and ``retry_prompt(reason)`` to the conversation. A transient LLM
    failure ends the loop (returned in ``transient``); :class:`LLMFatalError` and any
    other exception propagate."""
    msgs: list[Mapping[str, str]] = list(messages)
    js = dict(json_schema) if json_schema is not None else schema.model_json_schema()
    attempts: list[Attempt] = []
    error: str | None = None
    for _ in range(1 + parse_retries):
        t0 = time.perf_counter()
        try:
            reply = complete(model, msgs, json_schema=js, **call_kwargs)
        except LLMFatalError:
            raise  # a bad key or model: asking again would only fail again
        except LLMTransientError as e:
            return StructuredReply(value=None, attempts=tuple(attempts), messages=tuple(msgs), error=error,
                                   transient=e, transient_wall_s=time.perf_counter() - t0)
        wall = time.perf_counter() - t0
        text = str(getattr(reply, "text", "") or "")
        excerpt = reply_excerpt(text) or ""
        usage = dict(excerpt=excerpt, prompt_tokens=int(getattr(reply, "prompt_tokens", 0) or 0),
                     completion_tokens=int(getattr(reply, "completion_tokens", 0) or 0),
                     seconds=float(getattr(reply, "seconds", 0.0) or 0.0), wall_s=wall)
        try:
            value = parse_structured(text, schema, limits)
        except (ValueError, ValidationError) as e:
            error = describe_error(e)
            attempts.append(Attempt(**usage, error=error))
            # the excerpt, not a multi-megabyte reply, goes back into the context
            msgs = msgs + [{"role": "assistant", "content": excerpt}, {"role": "user", "content": retry_prompt(error)}]
            continue
        attempts.append(Attempt(**usage))
        return StructuredReply(value=value, attempts=tuple(attempts), messages=tuple(msgs))
    return StructuredReply(value=None, attempts=tuple(attempts), messages=tuple(msgs), error=error)
