"""Named families of graphs, for baselines that search a restricted space.

Repeated sampling is AgentTTS's (arXiv 2508.00890) knob per stage: ``(model, samples)``,
here :func:`sampling_graph`: ``samples`` assistants of one model feeding one fuser of the
same model, or a single call when ``samples`` is 1. :func:`sampling_params` reads the pair
back from a graph of that family.
"""

from __future__ import annotations

from graphtune.errors import GraphError
from graphtune.graphs.model import ASSISTANT, FUSER, Graph, Node

__all__ = ["sampling_graph", "sampling_params"]


def sampling_graph(model: str, samples: int) -> Graph:
    """Repeated sampling: one call of ``model`` when ``samples`` is 1, else ``samples``
    assistants of it feeding one fuser of it (AgentTTS's (model, samples) per stage)."""
    if samples < 1:
        raise GraphError(f"samples must be at least 1, got {samples}")
    if samples == 1:
        return Graph.build([Node.make("a0", ASSISTANT, model)])
    nodes = [Node.make(f"a{i}", ASSISTANT, model) for i in range(samples)] + [Node.make("f", FUSER, model)]
    return Graph.build(nodes, [(f"a{i}", "f") for i in range(samples)])


def sampling_params(graph: Graph) -> tuple[str, int] | None:
    """``(model, samples)`` when ``graph`` is a :func:`sampling_graph` (up to node names),
    else None."""
    models = {n.model for n in graph.nodes}
    if len(models) != 1:
        return None
    model = next(iter(models))
    if graph.size == 1:
        return (model, 1) if graph.nodes[0].role == ASSISTANT else None
    sink = graph.sink
    sources = [n for n in graph.nodes if n.id != sink]
    if graph.node_map[sink].role != FUSER or any(n.role != ASSISTANT for n in sources):
        return None
    if sorted(graph.edges) != sorted((n.id, sink) for n in sources):
        return None
    return model, len(sources)
