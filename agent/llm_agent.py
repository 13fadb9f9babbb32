"""An agent backed by any litellm model string, through the LLM client the app passes in
(``complete``: :func:`graphtune.llm.complete`; the agent does not import it).

Each step renders the report to a prompt, asks for JSON matching
:class:`graphtune.agent.schema.AgentUpdate` (structured output where the provider
supports it), validates the reply with pydantic and, when it is unusable, asks again
with the validation error (up to ``max_retries`` more times): the loop is
:func:`graphtune.agent.toolkit.ask_structured`, shared with ``llm-opt``. If no usable reply comes,
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
from collections.abc import Callable, Mapping
from typing import Any

from graphtune.agent.base import Agent, AgentStep
from graphtune.agent.pipeline import PipelineBatchReport, PipelineInitReport, PipelineProblemInfo
from graphtune.agent.report import BatchReport, InitReport, ProblemInfo, render_batch, render_init
from graphtune.agent.schema import AgentUpdate, ReplyLimits, describe_reply_error, update_json_schema
from graphtune.agent.toolkit import ask_structured
from graphtune.errors import AgentError

SYSTEM = (
    "You optimise a collaboration graph of LLM calls for a task under a per-query compute budget. Each node is "
    "one call with a role and a model; an edge u->v appends u's answer to v's prompt; the single sink gives the "
    "final answer. You read paired measurements and reply with ONE JSON object matching this JSON schema, and "
    "nothing else:\n{schema}"
)

#: the same, for a multi-stage study (agent/pipeline.py renders its per-stage reports)
SYSTEM_PIPELINE = (
    "You optimise a multi-stage pipeline of LLM calls for a task under one per-query compute budget for all stages. "
    "Each stage is a collaboration graph (nodes are calls with a role and a model; an edge u->v appends u's answer "
    "to v's prompt; the stage's single sink gives its answer, which the later stages read). You read paired, "
    "per-stage measurements and reply with ONE JSON object matching this JSON schema, and nothing else (name stages "
    "in stage_preferences, budget_split, edge_changes[].stage and proposals[].stage):\n{schema}"
)


def _retry_prompt(reason: str) -> str:
    return f"That reply was rejected: {reason}. Reply again with one JSON object matching the schema, nothing else."


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
        # a multi-stage study's report renders itself (per-stage prompt, agent/pipeline.py)
        return self._ask("init", report.render() if isinstance(report, PipelineInitReport) else render_init(report))

    def feedback(self, report: BatchReport) -> AgentStep:
        return self._ask("feedback", report.render() if isinstance(report, PipelineBatchReport)
                         else render_batch(report))

    def _ask(self, kind: str, prompt: str) -> AgentStep:
        s = self.settings
        messages = [
            {"role": "system", "content": (SYSTEM_PIPELINE if isinstance(self.problem, PipelineProblemInfo)
                                           else SYSTEM).format(schema=json.dumps(self.schema))},
            {"role": "user", "content": prompt},
        ]
        retries = int(s.get("max_retries", 2))
        r = ask_structured(self._complete, self.model, messages, AgentUpdate, limits=self.limits,
                           parse_retries=retries, json_schema=self.schema, describe_error=describe_reply_error,
                           retry_prompt=_retry_prompt, api_base=s.get("api_base"),
                           api_key_env=s.get("api_key_env"), temperature=float(s.get("temperature", 0.2)),
                           max_tokens=s.get("max_tokens"), timeout_s=float(s.get("timeout_s", 60.0)),
                           max_retries=retries)
        update: AgentUpdate | None = r.value
        calls = r.calls
        seconds = 0.0
        for a in r.attempts:
            seconds += a.seconds or a.wall_s
        reason: str | None = None
        if r.transient is not None:
            # the endpoint failed after its own retries: fall back, never score it
            seconds += r.transient_wall_s
            calls += 1
            reason = f"LLM call failed ({r.transient}); fell back to the numeric update"
        elif update is None and r.error is not None:
            reason = f"unusable reply after {r.calls} attempt(s): {r.error}"
        if update is None and reason is None:
            reason = "no reply"
        if update is None:
            reason = f"{reason}; fell back to the numeric update" if "fell back" not in reason else reason
        pt, ct = r.prompt_tokens, r.completion_tokens
        usd = (pt * float(s.get("usd_per_mtok_in", 0.0)) + ct * float(s.get("usd_per_mtok_out", 0.0))) / 1e6
        replies = r.excerpts
        reply_text = replies[-1] if len(replies) == 1 else (
            json.dumps({"attempts": replies}, ensure_ascii=False) if replies else None)
        return AgentStep(kind=kind, prompt=prompt, reply=reply_text, update=update, rejected_reason=reason,
                         calls=calls, prompt_tokens=pt, completion_tokens=ct, usd=usd, seconds=seconds)
