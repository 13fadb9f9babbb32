"""The structured update an agent returns, validated with pydantic (outside text), and
the guarded reading of every agent reply.

Both backends fill the same schema: the LLM agent as JSON (structured output where the
provider supports it), the heuristic critic directly. ``llm-opt``'s proposer answers a
:class:`ProposalReply`, a list of the same :class:`GraphProposal` (one proposal model;
:mod:`graphtune.agent.proposals` builds any of them into a graph). Semantic checks that need the
search space (unknown models or slots, budget, cycles) happen where the update is
applied, each failure stored with its reason; this schema only checks shape and ranges.

A reply is outside text, possibly hostile. :func:`load_reply_json` reads it in this
order, each step raising :class:`ReplyRejected` (a ``ValueError``) with a one-line
reason, so a caller treats it like any other unusable reply (stored reason, fallback;
:func:`describe_reply_error` words every refusal the same way for every agent step):

1. its length is bounded (``max_reply_chars``) before anything else looks at it;
2. the nesting depth of the JSON is bounded (``max_reply_depth``) by a linear scan
   before the recursive parser runs (100,000 ``[`` used to end in RecursionError);
3. ``NaN``, ``Infinity`` and numbers that overflow a float (``1e999``) are refused while
   parsing; the schemas refuse non-finite floats given any other way (``"nan"``), so
   no non-finite number ever reaches the probabilistic graph;
4. strings holding a NUL character or an unpaired UTF-16 surrogate (``"\\ud800"``) are
   refused: neither can be written to PostgreSQL (NUL) or encoded as UTF-8.

What is stored of a reply is :func:`reply_excerpt`: the reply itself up to
``REPLY_EXCERPT_CHARS`` characters, else its first ``REPLY_EXCERPT_CHARS`` characters
plus its full length and sha256, so a 5 MB reply costs the store about 4 KB.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from itertools import accumulate
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

#: Default bound on a reply's length in characters. The agent is asked for one JSON
#: object of at most a few KB (``max_tokens`` defaults to 1024 tokens, ~4 KB); 200,000
#: characters (~50k tokens) leaves room for any sane ``max_tokens`` while a hostile or
#: runaway reply is refused before it is parsed, re-sent or stored.
MAX_REPLY_CHARS = 200_000
#: Default bound on the nesting depth of a reply's JSON (objects and arrays). The deepest
#: valid reply is 5 levels (``{"proposals": [{"edges": [["a", "b"]]}]}``); 32 leaves room
#: for prose-wrapped or pretty replies and stays far below the parsers' recursion limits.
MAX_REPLY_DEPTH = 32
#: Characters of a reply kept in the store (agent steps) when it is longer.
REPLY_EXCERPT_CHARS = 4096
#: Bound on the stored reply field of one agent step, whatever the backend (the LLM
#: agent stores one excerpt per attempt: 11 attempts at most with the spec's max_retries).
MAX_STORED_REPLY_CHARS = 16 * REPLY_EXCERPT_CHARS


@dataclass(frozen=True)
class ReplyLimits:
    """Bounds applied to a reply before it is parsed (see the module docstring)."""

    max_chars: int = MAX_REPLY_CHARS
    max_depth: int = MAX_REPLY_DEPTH

    @classmethod
    def from_settings(cls, settings: Any) -> ReplyLimits:
        """The limits of the spec's ``search.agent`` (``max_reply_chars``,
        ``max_reply_depth``), defaults for the missing ones."""
        get = getattr(settings, "get", lambda k, d=None: d)
        return cls(max_chars=int(get("max_reply_chars") or MAX_REPLY_CHARS),
                   max_depth=int(get("max_reply_depth") or MAX_REPLY_DEPTH))


class ReplyRejected(ValueError):
    """A reply refused before or while it was parsed; the message is one line, fit to
    store as the step's reason and to send back to the model."""


class _Strict(BaseModel):
    # allow_inf_nan=False: NaN/inf given as strings ("nan", "-inf") are refused too
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

#: bounds of a preference map (checked by a validator, so the JSON schema sent to
#: providers is unchanged): every unknown name costs a stored rejection line
_MAX_PREFERENCES = 64
_MAX_NAME_CHARS = 200


_StageName = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class EdgeChange(_Strict):
    """Logit delta on the edge ``src -> dst`` between two slots (``s0``..); in a
    multi-stage study, of the graph of stage ``stage`` (default: the last stage)."""

    src: str = Field(min_length=1, max_length=64)
    dst: str = Field(min_length=1, max_length=64)
    delta: float = Field(ge=-5.0, le=5.0)
    stage: _StageName | None = None


_NodeId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class ProposedNode(_Strict):
    id: str = Field(min_length=1, max_length=64)
    role: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=200)


class StageGraph(_Strict):
    """The graph of one named stage of a multi-stage pipeline (inside a proposal)."""

    stage: _StageName
    nodes: list[ProposedNode] = Field(min_length=1, max_length=64)
    edges: list[tuple[_NodeId, _NodeId]] = Field(default_factory=list, max_length=512)


class GraphProposal(_Strict):
    """A concrete graph to evaluate next: nodes and ``[src, dst]`` edges; exactly one
    node without successors (the sink) gives the final answer. ``parent`` (optional)
    names the graph it was derived from by a trial number the agent was shown; the
    searcher checks it (an unknown trial is dropped with a recorded warning) and the
    proposed trial's lineage (``parents``) comes from it.

    In a multi-stage study a proposal is a pipeline: the incumbent pipeline with the graph
    of stage ``stage`` (default: the last stage) replaced by ``nodes``/``edges``, and those
    of ``other_stages`` by theirs (a whole pipeline names every stage). Single-stage studies
    leave both unset."""

    nodes: list[ProposedNode] = Field(min_length=1, max_length=64)
    edges: list[tuple[_NodeId, _NodeId]] = Field(default_factory=list, max_length=512)
    rationale: str = Field("", max_length=2000)
    parent: int | None = Field(None, ge=0, le=2**31 - 1,
                               description="trial number (#N in the report) of the graph this one changes; "
                                           "omit for a new graph")
    stage: _StageName | None = None
    other_stages: list[StageGraph] = Field(default_factory=list, max_length=16)


class StagePreference(_Strict):
    """Preferences for the graph of one stage of a multi-stage pipeline (as the top-level
    fields of :class:`AgentUpdate` are for a single graph)."""

    stage: _StageName
    model_preference: dict[str, float] = Field(default_factory=dict)
    role_preference: dict[str, float] = Field(default_factory=dict)
    target_width: int | None = Field(None, ge=1, le=64)
    target_depth: int | None = Field(None, ge=1, le=64)

    @field_validator("model_preference", "role_preference")
    @classmethod
    def _bounded_names(cls, v: dict[str, float]) -> dict[str, float]:
        return _check_preferences(v)


def _check_preferences(v: dict[str, float]) -> dict[str, float]:
    if len(v) > _MAX_PREFERENCES:
        raise ValueError(f"at most {_MAX_PREFERENCES} names, got {len(v)}")
    for k in v:
        if not 1 <= len(k) <= _MAX_NAME_CHARS:
            raise ValueError(f"a name must have 1 to {_MAX_NAME_CHARS} characters, got {len(k)}")
    return v


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
    #: multi-stage studies only: preferences per stage, and logit deltas of the budget split
    #: (stage -> delta, positive: give the stage a larger share of the pipeline's budget)
    stage_preferences: list[StagePreference] = Field(default_factory=list, max_length=16)
    budget_split: dict[str, float] = Field(default_factory=dict,
                                           description="multi-stage: logit delta of each stage's budget share")

    @field_validator("model_preference", "role_preference", "budget_split")
    @classmethod
    def _bounded_names(cls, v: dict[str, float]) -> dict[str, float]:
        return _check_preferences(v)


class ProposalReply(_Strict):
    """What ``llm-opt``'s proposer answers: its reasoning and the graphs it proposes, each
    a :class:`GraphProposal` (the agent's own proposal model, so both searchers accept
    and refuse the same proposals). ``reasoning`` is free text, bounded only by the
    reply's length (it is stored as an excerpt)."""

    reasoning: str = ""
    proposals: list[GraphProposal] = Field(max_length=1024)  # the spec's largest batch_size


def update_json_schema() -> dict[str, Any]:
    """JSON schema of :class:`AgentUpdate` for structured-output requests."""
    return AgentUpdate.model_json_schema()


def proposal_json_schema(models: Sequence[str], roles: Sequence[str],
                         stages: Sequence[str] | None = None) -> dict[str, Any]:
    """JSON schema of one :class:`GraphProposal` in the subset every schema-enforcing
    provider accepts in strict mode: every listed field required, no extra fields, the
    space's models and roles as enums, and no length or count constraints (OpenAI's
    strict mode rejects them; pydantic checks them instead). ``rationale`` is left out:
    optional in the model, and a grammar-constrained model cannot see its length bound.
    Every reply this schema admits has the fields the model requires. ``parent`` (the trial
    number of the graph the proposal changes) is required and nullable: strict mode has no
    optional fields. With ``stages`` (a multi-stage study) ``stage`` (one of them) and
    ``other_stages`` (each a stage and its graph) are required too."""
    node = {"type": "object", "additionalProperties": False, "required": ["id", "role", "model"],
            "properties": {"id": {"type": "string"}, "role": {"type": "string", "enum": list(roles)},
                           "model": {"type": "string", "enum": list(models)}}}
    graph = {"nodes": {"type": "array", "items": node},
             "edges": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}}}
    # the trial this proposal changes, or null for a new graph: strict mode has no optional
    # fields, so the field is required and nullable (its range is pydantic's check)
    parent = {"parent": {"type": ["integer", "null"]}}
    if stages is None:
        return {"type": "object", "additionalProperties": False, "required": ["nodes", "edges", "parent"],
                "properties": {**graph, **parent}}
    stage = {"type": "string", "enum": list(stages)}
    other = {"type": "object", "additionalProperties": False, "required": ["stage", "nodes", "edges"],
             "properties": {"stage": stage, **graph}}
    return {"type": "object", "additionalProperties": False,
            "required": ["stage", "nodes", "edges", "other_stages", "parent"],
            "properties": {"stage": stage, **graph, "other_stages": {"type": "array", "items": other}, **parent}}


def proposal_reply_json_schema(models: Sequence[str], roles: Sequence[str],
                               stages: Sequence[str] | None = None) -> dict[str, Any]:
    """JSON schema of a :class:`ProposalReply` for strict structured output (see
    :func:`proposal_json_schema`). Reasoning comes first so a model constrained by a
    grammar thinks before it proposes."""
    return {"title": "GraphProposals", "type": "object", "additionalProperties": False,
            "required": ["reasoning", "proposals"],
            "properties": {"reasoning": {"type": "string"},
                           "proposals": {"type": "array", "items": proposal_json_schema(models, roles, stages)}}}


def describe_reply_error(e: Exception) -> str:
    """The one-line reason a reply was refused, the same for every agent step (stored
    as the step's reason and sent back to the model): ``reply is not JSON: ...``,
    ``reply refused: ...`` (the guards of :func:`load_reply_json`) or ``wrong schema:
    reply does not match the schema at <field>: ...``."""
    if isinstance(e, ValidationError):
        errs = e.errors()
        first = errs[0]
        more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
        why = (f"wrong schema: reply does not match the schema at {short_location(first.get('loc', ()))}: "
               f"{first.get('msg')}{more}")
    elif isinstance(e, json.JSONDecodeError):
        why = f"reply is not JSON: {e.msg} at line {e.lineno} column {e.colno}"
    elif isinstance(e, ReplyRejected):
        why = f"reply refused: {e}"
    else:
        why = f"reply unusable: {type(e).__name__}: {e}"
    return one_line(why)


def one_line(text: str) -> str:
    """``text`` on one line (line breaks, which may come from a reply, escaped)."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


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


# A JSON string literal, or an unterminated one running to the end of the text. Every
# match attempt that starts at a quote succeeds, so the scan stays linear: with a closing
# quote required, each quote of `"\"\"\"...` (never closed) would rescan the rest of the
# text (quadratic: 20,000 characters took 2.7 s).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """Deepest nesting of ``[``/``{`` in JSON text, outside string literals (a linear
    scan). Exact on valid JSON and on the prefix a parser accepts before its first error
    (an unterminated string hides what follows it from both), which is all the recursive
    parser can descend into."""
    brackets = _BRACKETS.findall(_STRING.sub("", text))
    return max(accumulate(_STEP[c] for c in brackets), default=0)


def _refuse_constant(name: str) -> Any:
    raise ReplyRejected(f"non-finite number {name} in the reply; numbers must be finite")


def _finite_float(token: str) -> float:
    x = float(token)
    if not math.isfinite(x):
        raise ReplyRejected(f"number {token[:40]} is out of range (not finite); numbers must be finite")
    return x


def _check_values(obj: Any, where: str = "") -> None:
    """Refuse non-finite floats and strings that cannot be stored (NUL, lone surrogates).
    Depth is already bounded, so the recursion is too."""
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ReplyRejected(f"non-finite number at {where or '(top level)'}; numbers must be finite")
    elif isinstance(obj, str):
        if obj.isascii():
            if "\x00" in obj:
                raise ReplyRejected(f"NUL character in a string at {where or '(top level)'}")
        else:
            try:
                obj.encode("utf-8")
            except UnicodeEncodeError:
                raise ReplyRejected(f"unpaired UTF-16 surrogate in a string at {where or '(top level)'}") from None
            if "\x00" in obj:
                raise ReplyRejected(f"NUL character in a string at {where or '(top level)'}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_values(k, where)
            _check_values(v, short_location([where, k] if where else [k]))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_values(v, f"{where}[{i}]")


def short_location(loc: Any) -> str:
    """A validation error's location, each part cut to 40 characters: dict keys come from
    the reply, and a reason is stored and sent back to the model."""
    parts = [str(p) if len(str(p)) <= 40 else str(p)[:40] + "..." for p in loc]
    return ".".join(parts) or "(top level)"


def check_reply_size(text: str, limits: ReplyLimits) -> None:
    """Refuse a reply over ``limits.max_chars`` characters (before any other work)."""
    if len(text) > limits.max_chars:
        raise ReplyRejected(f"reply of {len(text)} characters is over the limit of {limits.max_chars} "
                            "(search.agent.max_reply_chars)")


def load_reply_json(text: str, limits: ReplyLimits = ReplyLimits()) -> Any:
    """The JSON value of a reply (code fences and prose around one object tolerated),
    read under ``limits`` (see the module docstring). Raises :class:`ReplyRejected` for
    a refused reply and ``json.JSONDecodeError`` (a ``ValueError``) for text that is not
    JSON."""
    check_reply_size(text, limits)
    data = loads_finite(extract_json(text), max_depth=limits.max_depth)
    _check_values(data)
    return data


def loads_finite(raw: str, *, max_depth: int = MAX_REPLY_DEPTH) -> Any:
    """``json.loads`` for outside text: nesting deeper than ``max_depth`` is refused by a
    linear scan before the recursive parser runs, and ``NaN``, ``Infinity`` and numbers
    that overflow a float are refused while parsing (:class:`ReplyRejected`); text that
    is not JSON raises ``json.JSONDecodeError``. Both are ``ValueError``."""
    depth = json_depth(raw)
    if depth > max_depth:
        raise ReplyRejected(f"reply nested {depth} levels deep, over the limit of {max_depth} "
                            "(search.agent.max_reply_depth)")
    try:
        return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:  # the scan bounds depth; this only guards a parser change
        raise ReplyRejected("reply nested too deeply to parse") from None


def parse_update(text: str, limits: ReplyLimits = ReplyLimits()) -> AgentUpdate:
    """Parse and validate a reply under ``limits``; raises ``ValueError`` (ReplyRejected,
    json's JSONDecodeError or pydantic's ValidationError) with a message fit to send
    back to the model."""
    return AgentUpdate.model_validate(load_reply_json(text, limits))


def parse_proposal_reply(text: str, limits: ReplyLimits = ReplyLimits()) -> ProposalReply:
    """Parse and validate a proposer's reply under ``limits``; raises ``ValueError`` like
    :func:`parse_update` (:func:`describe_reply_error` gives its one-line reason)."""
    return ProposalReply.model_validate(load_reply_json(text, limits))


def reply_excerpt(text: str | None, limit: int = REPLY_EXCERPT_CHARS) -> str | None:
    """What is stored of a reply (or of any text that came from one, such as a long list
    of rejection reasons): the text when it has at most ``limit`` characters,
    else its first ``limit`` characters and a last line with its full length and sha256
    (of its UTF-8 bytes). NUL characters and unpaired surrogates, which some stores
    cannot hold, are replaced by U+FFFD in what is kept."""
    if text is None:
        return None
    kept = text if len(text) <= limit else text[:limit]
    kept = _storable(kept)
    if len(text) <= limit:
        return kept
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return (f"{kept}\n[graphtune: truncated for storage: first {limit} of {len(text)} characters kept; "
            f"sha256 of the whole text {digest}]")


def _storable(s: str) -> str:
    if "\x00" in s:
        s = s.replace("\x00", "\ufffd")
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:  # unpaired surrogates: pairs are joined, lone ones replaced
            s = s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return s
