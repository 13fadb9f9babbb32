"""Graph mutations: pure functions over :mod:`graphtune.graphs` values, shared by the
heuristic critic's proposals (:func:`local_mutations`, every neighbour of a graph) and
``llm-opt``'s offline proposer (:func:`random_mutation`, one random edit drawn from the
caller's generator). Each returns new graphs and leaves its input alone; none checks
space or budget (callers validate what they keep)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from graphtune.errors import GraphError
from graphtune.graphs.model import Graph, Node
from graphtune.graphs.space import Space, prune_to_sink


def fresh_id(g: Graph, prefix: str = "a", start: int = 0) -> str:
    """The first id ``{prefix}{k}``, ``k >= start``, not used in ``g``."""
    k = start
    while f"{prefix}{k}" in g.node_map:
        k += 1
    return f"{prefix}{k}"


def prune(nodes: Sequence[Node], edges: Sequence[tuple[str, str]], sink: str) -> Graph | None:
    """The graph of ``nodes`` and ``edges`` without the nodes that cannot reach ``sink``,
    or ``None`` when they do not make a graph."""
    try:
        return prune_to_sink(Graph.build(nodes, edges), sink)
    except GraphError:
        return None


def local_mutations(g: Graph, space: Space) -> list[Graph]:
    """Every local edit of ``g`` (not yet checked against space or budget): each other
    model or role per node, a node dropped (its inputs feed its successors), a source
    added before any node, a non-sink node duplicated, an edge added or dropped, a new
    sink on top. Deterministic: the heuristic critic ranks them."""
    out: list[Graph] = []
    nodes, edges, sink = list(g.nodes), list(g.edges), g.sink
    models, roles = list(space.models), list(space.roles)

    def with_node(i: int, **kw) -> list[Node]:
        ns = list(nodes)
        n = ns[i]
        ns[i] = Node(id=n.id, role=kw.get("role", n.role), model=kw.get("model", n.model), params=n.params)
        return ns

    for i, n in enumerate(nodes):
        for m in models:
            if m != n.model:
                out.append(Graph.build(with_node(i, model=m), edges))
        for r in roles:
            rs = space.role_spec(r)
            if r != n.role and (rs.accepts_input if g.preds[n.id] else not rs.needs_input):
                out.append(Graph.build(with_node(i, role=r), edges))
    # drop a node (its inputs feed its successors instead)
    for n in nodes:
        if n.id == sink:
            continue
        ns = [x for x in nodes if x.id != n.id]
        es = [(u, v) for u, v in edges if n.id not in (u, v)]
        es += [(u, s) for u in g.preds[n.id] for s in g.succs[n.id]]
        h = prune(ns, list(set(es)), sink)
        if h is not None:
            out.append(h)
    # add a source node feeding an existing node
    for target in nodes:
        for m in models:
            new = fresh_id(g)
            src = next((r for r in roles if space.role_allowed(r, has_inputs=False, is_sink=False)), roles[0])
            out.append(Graph.build(nodes + [Node.make(new, src, m)], edges + [(new, target.id)]))
    # duplicate a non-sink node (same model, same successors): more width
    for n in nodes:
        if n.id == sink:
            continue
        new = fresh_id(g)
        out.append(Graph.build(nodes + [Node(new, n.role, n.model, n.params)],
                               edges + [(u, new) for u in g.preds[n.id]] + [(new, s) for s in g.succs[n.id]]))
    # add or drop an edge
    order = list(g.topo_order)
    for a in range(len(order)):
        for b in range(a + 1, len(order)):
            u, v = order[a], order[b]
            if (u, v) in g.edges:
                h = prune(nodes, [e for e in edges if e != (u, v)], sink)
                if h is not None:
                    out.append(h)
            else:
                out.append(Graph.build(nodes, edges + [(u, v)]))
    # a new synthesiser on top of the sink (more depth), or replacing the sink's role
    for m in models:
        for r in roles:
            new = fresh_id(g, "t")
            out.append(Graph.build(nodes + [Node.make(new, r, m)], edges + [(sink, new)]))
    return out


def random_mutation(g: Graph | None, space: Space, models: Sequence[str],
                    rng: np.random.Generator) -> tuple[Graph | None, str]:
    """One random local edit of ``g`` and its name (``model``, ``role``, ``add_node``,
    ``remove_node``, ``add_edge``, ``remove_edge``), not yet checked against space or
    budget; ``None`` when the edit breaks the graph. ``models`` is the pool in cost order
    (a model edit moves a node to a neighbouring size); draws only from ``rng``."""
    if g is None:
        return None, "none"
    models = list(models)
    nodes, edges = list(g.nodes), list(g.edges)
    sink = g.sink
    ops = ["model", "role", "add_node", "remove_node", "add_edge", "remove_edge"]
    op = ops[int(rng.integers(len(ops)))]
    if op == "model":
        i = int(rng.integers(len(nodes)))
        n = nodes[i]
        j = models.index(n.model) + (1 if rng.random() < 0.5 else -1)
        j = min(max(j, 0), len(models) - 1)
        nodes[i] = Node(id=n.id, role=n.role, model=models[j], params=n.params)
    elif op == "role" and len(space.roles) > 1:
        i = int(rng.integers(len(nodes)))
        n = nodes[i]
        allowed = (space.sink_roles or space.roles) if n.id == sink else space.roles
        roles = [r for r in allowed if r != n.role and (n.id != sink or space.role_spec(r).may_be_sink)]
        if roles:
            nodes[i] = Node(id=n.id, role=roles[int(rng.integers(len(roles)))], model=n.model, params=n.params)
    elif op == "add_node":
        new = fresh_id(g, "m", g.size)
        target = [n.id for n in nodes][int(rng.integers(len(nodes)))]
        model = models[int(rng.integers(len(models)))]
        nodes.append(Node.make(new, "assistant" if "assistant" in space.roles else space.roles[0], model))
        edges.append((new, target))
    elif op == "remove_node" and len(nodes) > 1:
        victims = [n.id for n in nodes if n.id != sink]
        v = victims[int(rng.integers(len(victims)))]
        # reconnect the victim's inputs to its outputs so the rest of the graph stays wired
        ins = [u for u, w in edges if w == v]
        outs = [w for u, w in edges if u == v]
        nodes = [n for n in nodes if n.id != v]
        edges = [(u, w) for u, w in edges if v not in (u, w)] + [(u, w) for u in ins for w in outs]
    elif op == "add_edge":
        order = list(g.topo_order)
        pairs = [(order[i], order[j]) for j in range(len(order)) for i in range(j)
                 if (order[i], order[j]) not in g.edges]
        if pairs:
            edges.append(pairs[int(rng.integers(len(pairs)))])
    elif op == "remove_edge" and edges:
        edges.pop(int(rng.integers(len(edges))))
    try:
        return prune_to_sink(Graph.build(nodes, edges), sink), op
    except GraphError:
        return None, op
