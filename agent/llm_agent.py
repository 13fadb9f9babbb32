"""An agent backed by any litellm model string, through the LLM client the app passes in
(``complete``: :func:`graphtune.llm.complete`; the agent does not import it).

Each step renders the report to a prompt, asks for JSON matching
:class:`graphtune.agent.schema.AgentUpdate` (structured output where the provider
supports it), validates the reply with pydantic and, when it is unusable, asks again
with the validation error (up to ``max_retries`` more times). If no usable reply comes,
the step carries ``update=None`` and a ``rejected_reason``: the search falls back to its
numeric update. Calls, tokens, seconds and dollars (from ``usd_per_mtok_in/out``) are
counted per step, apart from the environment's cost.

Replies are read under :class:`~graphtune.agent.schema.ReplyLimits` (``max_reply_chars``,
``max_reply_depth`` of the settings): a longer or deeper reply, or one holding a
non-finite number, is an unusable reply like any other. What the step keeps of a reply
(and what is sent back to the model when it is asked again) is its bounded excerpt
(:func:`~graphtune.agent.schema.reply_excerpt`), never a multi-megabyte text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from graphtune.agent.base import Agent, AgentStep
from graphtune.agent.report import BatchReport, InitReport, ProblemInfo, render_batch, render_init
from graphtune.agent.schema import (AgentUpdate, ReplyLimits, ReplyRejected, parse_update, reply_excerpt,
                                    short_location, update_json_schema)
from graphtune.errors import AgentError, LLMFatalError, LLMTransientError

SYSTEM = (
    "You optimise a collaboration graph of LLM calls for a task under a per-query compute budget. Each node is "
    "one call with a role and a model; an edge u->v appends u's answer to v's prompt; the single sink gives the "
    "final answer. You read paired measurements and reply with ONE JSON object matching this JSON schema, and "
    "nothing else:\n{schema}"
)


def _short_error(e: Exception) -> str:
    if isinstance(e, ValidationError):
        errs = e.errors()
        first = errs[0]
        loc = short_location(first.get("loc", ()))
        more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
        return f"wrong schema: {loc}: {first.get('msg')}{more}"
    if isinstance(e, json.JSONDecodeError):
        return f"not JSON: {e.msg} at line {e.lineno} column {e.colno}"
    if isinstance(e, ReplyRejected):
        return f"refused: {e}"
    return f"{type(e).__name__}: {e}"


class LLMAgent(Agent):
    """Feedback from an LLM. ``settings`` is the spec's ``search.agent`` (model,
    api_base, api_key_env, temperature, max_retries, timeout_s, max_tokens,
    usd_per_mtok_in/out, max_reply_chars, max_reply_depth). ``complete`` (required) makes
    the calls: a function with the signature of :func:`graphtune.llm.complete`, which the
    app passes (tests pass a fake LLM)."""

    is_llm = True

    def __init__(self, problem: ProblemInfo, settings: Mapping[str, Any], *,
                 complete: Callable[..., Any] | None = None):
        self.problem = problem
        self.settings = dict(settings)
        self.model = str(self.settings["model"])
        self.backend = self.model
        if complete is None:
            raise AgentError(f"the LLM agent {self.model!r} needs an LLM client: pass complete=, a completion "
                             "function such as graphtune.llm.complete (graphtune.api passes it to the searcher)")
        self._complete = complete
        self.schema = update_json_schema()
        self.limits = ReplyLimits.from_settings(self.settings)

    def initial(self, report: InitReport) -> AgentStep:
        return self._ask("init", render_init(report))

    def feedback(self, report: BatchReport) -> AgentStep:
        return self._ask("feedback", render_batch(report))

    def _ask(self, kind: str, prompt: str) -> AgentStep:
        s = self.settings
        messages: list[dict[str, str]] = [
            {"role": "system", "content": SYSTEM.format(schema=json.dumps(self.schema))},
            {"role": "user", "content": prompt},
        ]
        calls = pt = ct = 0
        seconds = 0.0
        replies: list[str] = []
        reason: str | None = None
        update: AgentUpdate | None = None
        attempts = 1 + int(s.get("max_retries", 2))
        for attempt in range(attempts):
            t0 = time.perf_counter()
            try:
                reply = self._complete(self.model, messages, api_base=s.get("api_base"),
                                       api_key_env=s.get("api_key_env"), temperature=float(s.get("temperature", 0.2)),
                                       max_tokens=s.get("max_tokens"), json_schema=self.schema,
                                       timeout_s=float(s.get("timeout_s", 60.0)), max_retries=int(s.get("max_retries", 2)))
            except LLMTransientError as e:
                # the endpoint failed after its own retries: fall back, never score it
                seconds += time.perf_counter() - t0
                calls += 1
                reason = f"LLM call failed ({e}); fell back to the numeric update"
                break
            except LLMFatalError:
                raise
            calls += 1
            seconds += float(getattr(reply, "seconds", 0.0) or (time.perf_counter() - t0))
            pt += int(getattr(reply, "prompt_tokens", 0) or 0)
            ct += int(getattr(reply, "completion_tokens", 0) or 0)
            text = str(getattr(reply, "text", "") or "")
            replies.append(reply_excerpt(text))
            try:
                update = parse_update(text, self.limits)
                reason = None
                break
            except (ValueError, ValidationError) as e:
                reason = f"unusable reply after {attempt + 1} attempt(s): {_short_error(e)}"
                # the excerpt, not a multi-megabyte reply, goes back into the context
                messages += [{"role": "assistant", "content": replies[-1]},
                             {"role": "user", "content": f"That reply was rejected: {_short_error(e)}. Reply again "
                              "with one JSON object matching the schema, nothing else."}]
        if update is None and reason is None:
            reason = "no reply"
        if update is None:
            reason = f"{reason}; fell back to the numeric update" if "fell back" not in reason else reason
        usd = (pt * float(s.get("usd_per_mtok_in", 0.0)) + ct * float(s.get("usd_per_mtok_out", 0.0))) / 1e6
        reply_text = replies[-1] if len(replies) == 1 else (
            json.dumps({"attempts": replies}, ensure_ascii=False) if replies else None)
        return AgentStep(kind=kind, prompt=prompt, reply=reply_text, update=update, rejected_reason=reason,
                         calls=calls, prompt_tokens=pt, completion_tokens=ct, usd=usd, seconds=seconds)
