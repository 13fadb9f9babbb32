"""The collaboration graph as data: model, validation, measures, costing, rendering."""

from graphtune.graphs.canonical import canonical_form, graph_hash, isomorphic
from graphtune.graphs.cost import Budget, CostModel, GraphCost, ModelInfo, TaskShape
from graphtune.graphs.model import ASSISTANT, BUILTIN_ROLES, FUSER, Graph, Node
from graphtune.graphs.space import (Space, enumerate_graphs, prune_to_sink, random_graph,
                                    structural_errors, validate)

__all__ = [
    "ASSISTANT", "BUILTIN_ROLES", "FUSER", "Budget", "CostModel", "Graph", "GraphCost",
    "ModelInfo", "Node", "Space", "TaskShape", "canonical_form", "enumerate_graphs",
    "graph_hash", "isomorphic", "prune_to_sink", "random_graph", "structural_errors", "validate",
]
