"""The structured update an agent returns, validated with pydantic (outside text).

Both backends fill the same schema: the LLM agent as JSON (structured output where the
provider supports it), the heuristic critic directly. Semantic checks that need the
search space (unknown models or slots, budget, cycles) happen where the update is
applied, each failure stored with its reason; this schema only checks shape and ranges.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EdgeChange(_Strict):
    """Logit delta on the edge ``src -> dst`` between two slots (``s0``..)."""

    src: str = Field(min_length=1, max_length=64)
    dst: str = Field(min_length=1, max_length=64)
    delta: float = Field(ge=-5.0, le=5.0)


class ProposedNode(_Strict):
    id: str = Field(min_length=1, max_length=64)
    role: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=200)


class GraphProposal(_Strict):
    """A concrete graph to evaluate next: nodes and ``[src, dst]`` edges; exactly one
    node without successors (the sink) gives the final answer."""

    nodes: list[ProposedNode] = Field(min_length=1, max_length=64)
    edges: list[tuple[str, str]] = Field(default_factory=list, max_length=512)
    rationale: str = Field("", max_length=2000)


class AgentUpdate(_Strict):
    """Free-text feedback plus a structured update of the probabilistic graph."""

    feedback: str = Field(max_length=8000, description="what the evidence says and what to change")
    model_preference: dict[str, float] = Field(default_factory=dict,
                                               description="logit delta per model (positive: use more)")
    role_preference: dict[str, float] = Field(default_factory=dict, description="logit delta per role")
    edge_changes: list[EdgeChange] = Field(default_factory=list, max_length=64)
    target_width: int | None = Field(None, ge=1, le=64)
    target_depth: int | None = Field(None, ge=1, le=64)
    proposals: list[GraphProposal] = Field(default_factory=list, max_length=16)
    confidence: float = Field(0.5, ge=0.0, le=1.0)


def update_json_schema() -> dict[str, Any]:
    """JSON schema of :class:`AgentUpdate` for structured-output requests."""
    return AgentUpdate.model_json_schema()


def extract_json(text: str) -> str:
    """The JSON object inside a reply (strips code fences and prose around it)."""
    t = text.strip()
    if t.startswith("```"):
        t = t.split("\n", 1)[1] if "\n" in t else ""
        if "```" in t:
            t = t[: t.rindex("```")]
    start, end = t.find("{"), t.rfind("}")
    if start < 0 or end < start:
        return t
    return t[start:end + 1]


def parse_update(text: str) -> AgentUpdate:
    """Parse and validate a reply; raises ``ValueError`` (pydantic's ValidationError or
    json's JSONDecodeError) with a message fit to send back to the model."""
    raw = extract_json(text)
    json.loads(raw)  # a clear "not JSON" error before schema errors
    return AgentUpdate.model_validate_json(raw)
