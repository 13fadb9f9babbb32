"""Graph mutations (agent/mutations.py): pure functions over graph values, shared by the
heuristic critic and llm-opt's offline proposer."""

from __future__ import annotations

import numpy as np

from graphtune.agent.mutations import fresh_id, local_mutations, prune, random_mutation
from graphtune.graphs.catalog import LLAMA_POOL
from graphtune.graphs.model import Graph, Node

G = Graph.build([Node.make("a", "assistant", LLAMA_POOL[0]), Node.make("b", "assistant", LLAMA_POOL[1]),
                 Node.make("f", "fuser", LLAMA_POOL[2])], [("a", "f"), ("b", "f")])


def test_fresh_id_skips_used_ids():
    assert fresh_id(G) == "a0"
    g = Graph.build([Node.make("m2", "assistant", LLAMA_POOL[0]), Node.make("m3", "assistant", LLAMA_POOL[0])],
                    [("m2", "m3")])
    assert fresh_id(g, "m", g.size) == "m4"


def test_prune_drops_nodes_that_cannot_reach_the_sink_and_refuses_broken_graphs():
    nodes = list(G.nodes) + [Node.make("x", "assistant", LLAMA_POOL[0])]
    assert prune(nodes, list(G.edges), "f") == G
    assert prune(nodes, [("a", "zz")], "f") is None


def test_local_mutations_are_new_graphs_and_leave_the_input_alone(space):
    before = (G.nodes, G.edges)
    out = local_mutations(G, space)
    assert out and all(isinstance(g, Graph) for g in out) and G not in out
    assert (G.nodes, G.edges) == before
    assert local_mutations(G, space) == out  # deterministic


def test_random_mutation_draws_only_from_the_given_generator(space):
    def run(seed):
        rng = np.random.default_rng(seed)
        return [random_mutation(G, space, LLAMA_POOL, rng) for _ in range(30)]

    a, b = run(3), run(3)
    assert a == b
    ops = {op for _, op in a}
    assert ops <= {"model", "role", "add_node", "remove_node", "add_edge", "remove_edge"} and len(ops) > 2
    assert random_mutation(None, space, LLAMA_POOL, np.random.default_rng(0)) == (None, "none")
