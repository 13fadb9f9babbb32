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
#: Roles that must have at least one predecessor.
ROLES_NEEDING_INPUT = frozenset({FUSER})


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
