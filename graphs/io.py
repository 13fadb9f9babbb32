"""Serialisation of graphs to plain data, JSON and YAML, with a schema version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from graphtune.errors import GraphError
from graphtune.graphs.model import Graph, Node
from graphtune.graphs.space import prune_to_sink

SCHEMA_VERSION = 1


def to_dict(graph: Graph) -> dict[str, Any]:
    """Plain data of a graph (or of a pipeline: its stages, :mod:`graphtune.graphs.pipeline`)."""
    if getattr(graph, "stages", None) is not None:
        from graphtune.graphs.pipeline import to_dict as pipeline_dict

        return pipeline_dict(graph)
    return {
        "schema_version": SCHEMA_VERSION,
        "nodes": [{"id": n.id, "role": n.role, "model": n.model, **({"params": n.params_dict} if n.params else {})}
                  for n in graph.nodes],
        "edges": [[u, v] for u, v in graph.edges],
        "sink": graph.sink if len(graph.sinks) == 1 else None,
    }


def check_header(data, where: str, fields: tuple[str, ...]) -> None:
    """The checks every graph file format shares: a supported ``schema_version`` and no keys
    beyond ``fields`` (plus ``schema_version`` and the informative ``name`` and ``metrics``)."""
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise GraphError(f"{where}: schema_version {version} is not supported (this graphtune reads {SCHEMA_VERSION})")
    unknown = set(data) - {"schema_version", "name", "metrics", *fields}
    if unknown:
        raise GraphError(f"{where}: unknown keys {sorted(unknown)}; allowed: {', '.join(fields)}, schema_version")


def from_dict(data: Any, *, where: str = "graph") -> Graph:
    """Parse plain data. If ``sink`` is given, nodes with no path to it are pruned (they
    would do no work); without it the graph must already have exactly one sink. A mapping
    with ``stages`` is a pipeline's and parses as one."""
    if isinstance(data, dict) and "stages" in data:
        from graphtune.graphs.pipeline import from_dict as pipeline_from_dict

        return pipeline_from_dict(data, where=where)
    if not isinstance(data, dict):
        raise GraphError(f"{where}: expected a mapping with `nodes` and `edges`, got {type(data).__name__}")
    check_header(data, where, ("nodes", "edges", "sink"))
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise GraphError(f"{where}: `nodes` must be a non-empty list of {{id, role, model}}")
    nodes = []
    for i, rn in enumerate(raw_nodes):
        if not isinstance(rn, dict) or not {"id", "role", "model"} <= set(rn):
            raise GraphError(f"{where}: nodes[{i}] must have id, role and model")
        extra = set(rn) - {"id", "role", "model", "params"}
        if extra:
            raise GraphError(f"{where}: nodes[{i}] has unknown keys {sorted(extra)}; allowed: id, role, model, params")
        nodes.append(Node.make(rn["id"], rn["role"], rn["model"], rn.get("params") or {}))
    edges = data.get("edges") or []
    if not isinstance(edges, list):
        raise GraphError(f"{where}: `edges` must be a list of [src, dst] pairs")
    g = Graph.build(nodes, [tuple(e) if isinstance(e, (list, tuple)) else (e,) for e in edges])
    g.topo_order  # raises on cycles
    sink = data.get("sink")
    if sink is not None:
        if sink not in g.node_map:
            raise GraphError(f"{where}: sink {sink!r} is not a node; nodes: {sorted(g.node_map)}")
        g = prune_to_sink(g, sink)
    return g


def to_json(graph: Graph) -> str:
    return json.dumps(to_dict(graph), indent=2)


def to_yaml(graph: Graph) -> str:
    import yaml

    return yaml.safe_dump(to_dict(graph), sort_keys=False)


def load(path: str | Path) -> Graph:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise GraphError(f"cannot read graph file {p}: {e.strerror}") from None
    import yaml

    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise GraphError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {str(e).splitlines()[0]}") from None
    return from_dict(data, where=str(p))
