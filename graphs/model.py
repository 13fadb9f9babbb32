"""The collaboration graph as immutable data.

A node is one LLM call with a role and a model; an edge ``u -> v`` appends u's output to
v's prompt; exactly one sink produces the final answer. Graph operations elsewhere in
``graphtune.graphs`` are pure functions that return new graphs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from graphtune.errors import GraphError

#: Roles with built-in semantics. The role set is open: environments decide what they
#: support, the spec's ``space.roles`` decides what a search may use.
ASSISTANT = "assistant"
FUSER = "fuser"
BUILTIN_ROLES = (ASSISTANT, FUSER)
#: Roles that must have at least one predecessor (built-in ones; a space's custom roles
#: say it themselves: :meth:`graphtune.graphs.space.Space.role_spec`).
ROLES_NEEDING_INPUT = frozenset({FUSER})

#: how a role takes its predecessors' outputs
INPUTS_REQUIRED, INPUTS_OPTIONAL, INPUTS_NONE = "required", "optional", "none"
INPUT_RULES = (INPUTS_REQUIRED, INPUTS_OPTIONAL, INPUTS_NONE)


@dataclass(frozen=True)
class RoleSpec:
    """What the graph layer knows of a role: whether a node of it takes predecessors'
    outputs (``takes_inputs``: ``required``, ``optional`` or ``none``), whether it may be
    the graph's sink, and which built-in role it behaves like where an environment models
    roles rather than prompting them (the simulator, replay). ``description`` is what
    search agents are told about it. Prompt templates live with the environments."""

    name: str
    takes_inputs: str = INPUTS_OPTIONAL
    may_be_sink: bool = True
    acts_like: str = ASSISTANT
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise GraphError("a role needs a name")
        if self.takes_inputs not in INPUT_RULES:
            raise GraphError(f"role {self.name!r}: takes_inputs {self.takes_inputs!r} is not one of "
                             f"{list(INPUT_RULES)}")
        if self.acts_like not in BUILTIN_ROLES:
            raise GraphError(f"role {self.name!r}: acts_like {self.acts_like!r} is not one of {list(BUILTIN_ROLES)}")

    @property
    def needs_input(self) -> bool:
        return self.takes_inputs == INPUTS_REQUIRED

    @property
    def accepts_input(self) -> bool:
        return self.takes_inputs != INPUTS_NONE

    def allowed(self, *, has_inputs: bool, is_sink: bool) -> bool:
        """Whether a node of this role may have (or lack) inputs and be (or not be) the sink."""
        if has_inputs and not self.accepts_input or not has_inputs and self.needs_input:
            return False
        return self.may_be_sink or not is_sink

    def rule_text(self) -> str:
        """The role's rules in a few words (for agents' prompts and error messages)."""
        inputs = {INPUTS_REQUIRED: "needs at least one input", INPUTS_OPTIONAL: "may take inputs",
                  INPUTS_NONE: "takes no inputs"}[self.takes_inputs]
        return inputs + ("" if self.may_be_sink else "; may not be the sink")


#: the built-in roles' rules
BUILTIN_ROLE_SPECS: dict[str, RoleSpec] = {
    ASSISTANT: RoleSpec(ASSISTANT, INPUTS_OPTIONAL, True, ASSISTANT,
                        "answers the question; if it has inputs, it sees their answers and may use them"),
    FUSER: RoleSpec(FUSER, INPUTS_REQUIRED, True, FUSER,
                    "combines the answers of its inputs into one final answer; needs at least one input"),
}


@dataclass(frozen=True, order=True)
class Node:
    """One LLM call: ``id`` is a name local to its graph; ``params`` are sampling
    parameters (temperature, max_tokens, ...) as a sorted tuple of pairs so the node is
    hashable."""

    id: str
    role: str
    model: str
    params: tuple[tuple[str, Any], ...] = ()

    @staticmethod
    def make(id: str, role: str, model: str, params: Mapping[str, Any] | None = None) -> Node:
        return Node(id=str(id), role=str(role), model=str(model),
                    params=tuple(sorted((params or {}).items())))

    @property
    def params_dict(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def label(self) -> tuple:
        """What makes two nodes interchangeable: everything but the id."""
        return (self.role, self.model, self.params)


@dataclass(frozen=True)
class Graph:
    """An immutable collaboration graph. Construct with :meth:`Graph.build`, which
    checks structure (known endpoints, no duplicate ids, no self loops); semantic checks
    against a space and a pool live in :mod:`graphtune.graphs.validate`."""

    nodes: tuple[Node, ...]
    edges: tuple[tuple[str, str], ...]

    @staticmethod
    def build(nodes: Iterable[Node], edges: Iterable[tuple[str, str]] = ()) -> Graph:
        nodes = tuple(sorted(nodes, key=lambda n: n.id))
        ids = [n.id for n in nodes]
        if not nodes:
            raise GraphError("graph has no nodes; add at least one node")
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise GraphError(f"graph has duplicate node ids {dup}; give every node a unique id")
        known = set(ids)
        clean: set[tuple[str, str]] = set()
        for e in edges:
            if len(e) != 2:
                raise GraphError(f"edge {e!r} must be a pair [src, dst]")
            u, v = str(e[0]), str(e[1])
            for end in (u, v):
                if end not in known:
                    raise GraphError(f"edge {u}->{v} names unknown node {end!r}; known nodes: {sorted(known)}")
            if u == v:
                raise GraphError(f"edge {u}->{v} is a self loop; a node cannot feed itself")
            clean.add((u, v))
        return Graph(nodes=nodes, edges=tuple(sorted(clean)))

    # -- structure -------------------------------------------------------------------
    @cached_property
    def node_map(self) -> dict[str, Node]:
        return {n.id: n for n in self.nodes}

    @cached_property
    def preds(self) -> dict[str, tuple[str, ...]]:
        p: dict[str, list[str]] = {n.id: [] for n in self.nodes}
        for u, v in self.edges:
            p[v].append(u)
        return {k: tuple(sorted(v)) for k, v in p.items()}

    @cached_property
    def succs(self) -> dict[str, tuple[str, ...]]:
        s: dict[str, list[str]] = {n.id: [] for n in self.nodes}
        for u, v in self.edges:
            s[u].append(v)
        return {k: tuple(sorted(v)) for k, v in s.items()}

    @cached_property
    def topo_order(self) -> tuple[str, ...]:
        """Kahn order with ties broken by id; raises GraphError on a cycle."""
        indeg = {n: len(p) for n, p in self.preds.items()}
        ready = sorted(n for n, d in indeg.items() if d == 0)
        out: list[str] = []
        while ready:
            n = ready.pop(0)
            out.append(n)
            for s in self.succs[n]:
                indeg[s] -= 1
                if indeg[s] == 0:
                    ready.append(s)
                    ready.sort()
        if len(out) != len(self.nodes):
            cyc = sorted(n for n, d in indeg.items() if d > 0)
            raise GraphError(f"graph has a cycle through nodes {cyc}; edges must form a DAG")
        return tuple(out)

    @cached_property
    def levels(self) -> dict[str, int]:
        """Topological level of each node: 0 for sources, else 1 + max level of preds."""
        lv: dict[str, int] = {}
        for n in self.topo_order:
            lv[n] = 1 + max((lv[p] for p in self.preds[n]), default=-1)
        return lv

    @property
    def sinks(self) -> tuple[str, ...]:
        return tuple(n for n, s in self.succs.items() if not s)

    @property
    def sink(self) -> str:
        sinks = self.sinks
        if len(sinks) != 1:
            raise GraphError(f"graph must have exactly one sink (a node with no successors); it has {len(sinks)}: {list(sinks)}")
        return sinks[0]

    def in_degree(self, node_id: str) -> int:
        return len(self.preds[node_id])

    @property
    def width(self) -> int:
        """Largest number of nodes on one topological level."""
        counts: dict[int, int] = {}
        for lv in self.levels.values():
            counts[lv] = counts.get(lv, 0) + 1
        return max(counts.values())

    @property
    def depth(self) -> int:
        """Number of nodes on the longest path (to the sink)."""
        return 1 + max(self.levels.values())

    @property
    def max_in_degree(self) -> int:
        return max((len(p) for p in self.preds.values()), default=0)

    @property
    def size(self) -> int:
        return len(self.nodes)

    def ancestors(self, node_id: str) -> set[str]:
        seen: set[str] = set()
        stack = [node_id]
        while stack:
            for p in self.preds[stack.pop()]:
                if p not in seen:
                    seen.add(p)
                    stack.append(p)
        return seen

    def model_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            out[n.model] = out.get(n.model, 0) + 1
        return dict(sorted(out.items()))

    def role_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            out[n.role] = out.get(n.role, 0) + 1
        return dict(sorted(out.items()))

    def __str__(self) -> str:  # compact, one line
        from graphtune.graphs.render import to_text

        return to_text(self)
