"""The collaboration graph as data: model, validation, measures, costing, rendering; and
the plain values every layer above shares (question results, LLM call records)."""

from graphtune.graphs.calls import CallRecord, call_key
from graphtune.graphs.canonical import canonical_form, graph_hash, isomorphic
from graphtune.graphs.cost import (Budget, CostModel, GraphCost, ModelInfo, PipelineBudget, PipelineCost,
                                   PipelineCostModel, TaskShape)
from graphtune.graphs.model import ASSISTANT, BUILTIN_ROLE_SPECS, BUILTIN_ROLES, FUSER, Graph, Node, RoleSpec
from graphtune.graphs.pipeline import QUESTION, Pipeline, Stage, as_single, pipeline_hash
from graphtune.graphs.results import Metrics, NodeOutcome, QuestionResult, StageOutcome, summarize
from graphtune.graphs.space import (Space, enumerate_graphs, prune_to_sink, random_graph,
                                    structural_errors, validate)

__all__ = [
    "ASSISTANT", "BUILTIN_ROLE_SPECS", "BUILTIN_ROLES", "FUSER", "RoleSpec", "Budget", "CallRecord", "CostModel",
    "Graph", "GraphCost",
    "Metrics", "ModelInfo", "Node", "NodeOutcome", "Pipeline", "PipelineBudget", "PipelineCost", "PipelineCostModel",
    "QUESTION", "QuestionResult", "Space", "Stage", "StageOutcome", "TaskShape", "as_single", "call_key",
    "canonical_form", "enumerate_graphs", "graph_hash", "isomorphic", "pipeline_hash", "prune_to_sink", "random_graph",
    "structural_errors", "summarize", "validate",
]
