"""Canonical form and a stable hash, equal for graphs that differ only by node naming.

Exact, not a heuristic hash: colour refinement (1-WL over predecessor and successor
multisets, seeded with each node's label) followed by individualisation-refinement over
the remaining ties, keeping the lexicographically smallest edge encoding. Structurally
identical "twin" nodes (same label, same predecessors, same successors) are swapped by an
automorphism, so only one twin of each group is branched on; that keeps the typical
"k identical assistants into one fuser" graphs linear instead of k!.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

from graphtune.graphs.model import Graph, Node


def _label_key(n: Node) -> str:
    return json.dumps([n.role, n.model, [[k, v] for k, v in n.params]], sort_keys=True, default=str)


def _refine(colors: dict[str, int], preds: dict, succs: dict) -> dict[str, int]:
    """Order-preserving colour refinement until stable."""
    n_classes = len(set(colors.values()))
    while True:
        sig = {v: (colors[v], tuple(sorted(colors[p] for p in preds[v])),
                   tuple(sorted(colors[s] for s in succs[v]))) for v in colors}
        ranks = {s: i for i, s in enumerate(sorted(set(sig.values())))}
        new = {v: ranks[sig[v]] for v in colors}
        k = len(ranks)
        if k == n_classes:
            return new
        colors, n_classes = new, k


def _encode(colors: dict[str, int], edges) -> tuple:
    return tuple(sorted((colors[u], colors[v]) for u, v in edges))


def canonical_order(graph: Graph) -> list[str]:
    """Node ids in canonical order (same order for isomorphic graphs)."""
    return list(_canonical(graph)[0])


def _canonical(graph: Graph) -> tuple[tuple[str, ...], tuple]:
    preds, succs = graph.preds, graph.succs
    keys = {n.id: _label_key(n) for n in graph.nodes}
    order = sorted(set(keys.values()))
    colors = {v: order.index(k) for v, k in keys.items()}
    twin_key = {v: (keys[v], preds[v], succs[v]) for v in keys}

    best: list = [None, None]  # (encoding, colors)

    def search(cols: dict[str, int]) -> None:
        cols = _refine(cols, preds, succs)
        cells: dict[int, list[str]] = {}
        for v, c in cols.items():
            cells.setdefault(c, []).append(v)
        target = next((c for c in sorted(cells) if len(cells[c]) > 1), None)
        if target is None:
            enc = _encode(cols, graph.edges)
            if best[0] is None or enc < best[0]:
                best[0], best[1] = enc, cols
            return
        seen_twins = set()
        for v in sorted(cells[target]):
            if twin_key[v] in seen_twins:
                continue
            seen_twins.add(twin_key[v])
            nxt = {u: 2 * c for u, c in cols.items()}
            nxt[v] = 2 * cols[v] - 1
            search(nxt)

    search(colors)
    final = best[1]
    ids = tuple(sorted(final, key=lambda v: final[v]))
    return ids, best[0]


def canonical_form(graph: Graph) -> Graph:
    """The graph with nodes renamed ``n0..n{k-1}`` in canonical order."""
    return _canonical_cached(graph)


@lru_cache(maxsize=65536)
def _canonical_cached(graph: Graph) -> Graph:
    ids, _ = _canonical(graph)
    rename = {old: f"n{i}" for i, old in enumerate(ids)}
    nodes = [Node(id=rename[n.id], role=n.role, model=n.model, params=n.params) for n in graph.nodes]
    edges = [(rename[u], rename[v]) for u, v in graph.edges]
    return Graph.build(nodes, edges)


def graph_hash(graph: Graph) -> str:
    """Stable 16-hex-digit hash of the canonical form (naming-independent). A pipeline
    hashes as :func:`graphtune.graphs.design.design_hash` says."""
    if getattr(graph, "stages", None) is not None:
        from graphtune.graphs.design import design_hash

        return design_hash(graph)
    return _hash_cached(graph)


@lru_cache(maxsize=65536)
def _hash_cached(graph: Graph) -> str:
    c = canonical_form(graph)
    payload = json.dumps({
        "nodes": [[n.id, n.role, n.model, [[k, v] for k, v in n.params]] for n in c.nodes],
        "edges": [list(e) for e in c.edges],
    }, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def isomorphic(a: Graph, b: Graph) -> bool:
    return graph_hash(a) == graph_hash(b)
