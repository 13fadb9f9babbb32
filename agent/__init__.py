"""The feedback agent of ``agent-reinforce``: reports, the update schema and backends.

Backends: :class:`HeuristicAgent` (an offline statistical critic, *not an LLM*, the
default) and :class:`LLMAgent` (any litellm model string). :func:`make_agent` picks one
from the spec's ``search.agent`` settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from graphtune.agent.base import Agent, AgentStep
from graphtune.agent.report import BatchReport, GraphEntry, InitReport, ProblemInfo
from graphtune.agent.schema import AgentUpdate, update_json_schema

HEURISTIC = "heuristic"


def make_agent(settings: Mapping[str, Any], problem: ProblemInfo, *, complete=None) -> Agent:
    """The agent named by ``settings["model"]`` ("heuristic" when unset). ``complete`` is
    the LLM client an LLM agent calls (required for one; see :class:`LLMAgent`)."""
    model = str(settings.get("model") or HEURISTIC)
    if model == HEURISTIC:
        from graphtune.agent.heuristic import HeuristicAgent

        return HeuristicAgent(problem)
    from graphtune.agent.llm_agent import LLMAgent

    return LLMAgent(problem, settings, complete=complete)


__all__ = ["Agent", "AgentStep", "AgentUpdate", "BatchReport", "GraphEntry", "HEURISTIC", "InitReport",
           "ProblemInfo", "make_agent", "update_json_schema"]
