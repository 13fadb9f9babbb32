"""The graph model: validation, measures, canonical hash, costing, serialisation."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from graphtune.errors import BudgetError, GraphError
from graphtune.graphs import (Budget, CostModel, Graph, ModelInfo, Node, Space, TaskShape, canonical_form,
                              enumerate_graphs, graph_hash, prune_to_sink, random_graph, validate)
from graphtune.graphs.io import from_dict, load, to_dict, to_json, to_yaml
from graphtune.graphs.render import to_mermaid, to_text

B1, B3, B8, B70 = "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b"


def fan_in(models, sink_model=B3, sink_role="fuser", prefix="a"):
    nodes = [Node.make(f"{prefix}{i}", "assistant", m) for i, m in enumerate(models)]
    nodes.append(Node.make("s", sink_role, sink_model))
    return Graph.build(nodes, [(f"{prefix}{i}", "s") for i in range(len(models))])


def chain(models):
    nodes = [Node.make(f"c{i}", "assistant", m) for i, m in enumerate(models)]
    return Graph.build(nodes, [(f"c{i}", f"c{i + 1}") for i in range(len(models) - 1)])


# -- structure and measures --------------------------------------------------------------

def test_measures_of_fan_in_and_chain():
    g = fan_in([B1, B1, B3])
    assert (g.width, g.depth, g.max_in_degree, g.sink) == (3, 2, 3, "s")
    assert g.in_degree("s") == 3 and g.in_degree("a0") == 0
    c = chain([B1, B3, B8])
    assert (c.width, c.depth, c.sink) == (1, 3, "c2")


def test_cycle_is_rejected_with_the_nodes_named():
    g = Graph.build([Node.make("a", "assistant", B1), Node.make("b", "assistant", B1)], [("a", "b"), ("b", "a")])
    with pytest.raises(GraphError, match="cycle"):
        g.topo_order


@pytest.mark.parametrize("nodes,edges,msg", [
    ([], [], "no nodes"),
    ([("a", "assistant", B1), ("a", "assistant", B3)], [], "duplicate node ids"),
    ([("a", "assistant", B1)], [("a", "zz")], "unknown node 'zz'"),
    ([("a", "assistant", B1)], [("a", "a")], "self loop"),
])
def test_malformed_graphs(nodes, edges, msg):
    with pytest.raises(GraphError, match=msg):
        Graph.build([Node.make(*n) for n in nodes], edges)


def test_validate_names_each_violation(space, costs, budget18):
    two_sinks = Graph.build([Node.make("a", "assistant", B1), Node.make("b", "assistant", B1)])
    with pytest.raises(GraphError, match="exactly one sink"):
        validate(two_sinks, space)
    lonely_fuser = Graph.build([Node.make("f", "fuser", B1)])
    with pytest.raises(GraphError, match="fuser with no predecessor"):
        validate(lonely_fuser, space)
    alien = Graph.build([Node.make("a", "assistant", "gpt-9")])
    with pytest.raises(GraphError, match="not in the pool"):
        validate(alien, space)
    with pytest.raises(GraphError, match="in-degree 5 > max_in_degree 4"):
        validate(fan_in([B1] * 5), space)
    with pytest.raises(GraphError, match="depth 5 > max_depth 4"):
        validate(chain([B1] * 5), space)
    with pytest.raises(BudgetError, match="over budget"):
        validate(Graph.build([Node.make("x", "assistant", B70)]), space, costs, budget18)
    narrow = Space(models=space.models, max_width=2)
    with pytest.raises(GraphError, match="width 3 > max_width 2"):
        validate(fan_in([B1, B1, B1]), narrow)


def test_unreachable_nodes_are_pruned_by_prune_to_sink_and_rejected_by_validate(space):
    g = Graph.build([Node.make("a", "assistant", B1), Node.make("dead", "assistant", B3),
                     Node.make("s", "fuser", B3)], [("a", "s")])
    with pytest.raises(GraphError, match="exactly one sink"):
        validate(g, space)
    p = prune_to_sink(g, "s")
    assert sorted(p.node_map) == ["a", "s"]
    validate(p, space)


# -- canonical form ----------------------------------------------------------------------

def test_hash_ignores_naming_and_order():
    g1 = fan_in([B1, B3, B1], prefix="a")
    g2 = fan_in([B3, B1, B1], prefix="zz")
    assert graph_hash(g1) == graph_hash(g2)
    assert canonical_form(g1) == canonical_form(g2)


def test_hash_distinguishes_structure_labels_and_params():
    base = fan_in([B1, B1])
    assert graph_hash(base) != graph_hash(fan_in([B1, B3]))
    assert graph_hash(base) != graph_hash(fan_in([B1, B1], sink_role="assistant"))
    hot = Graph.build([Node.make("a0", "assistant", B1, {"temperature": 1.0}), Node.make("a1", "assistant", B1),
                       Node.make("s", "fuser", B3)], [("a0", "s"), ("a1", "s")])
    assert graph_hash(base) != graph_hash(hot)
    # shared vs separate intermediate nodes: same unfolding, different graphs
    shared = Graph.build([Node.make(i, r, m) for i, r, m in [("x", "assistant", B1), ("b", "assistant", B3),
                                                               ("c", "assistant", B8), ("s", "fuser", B3)]],
                         [("x", "b"), ("x", "c"), ("b", "s"), ("c", "s")])
    sep = Graph.build([Node.make(i, r, m) for i, r, m in [("x", "assistant", B1), ("y", "assistant", B1),
                                                            ("b", "assistant", B3), ("c", "assistant", B8),
                                                            ("s", "fuser", B3)]],
                      [("x", "b"), ("y", "c"), ("b", "s"), ("c", "s")])
    assert graph_hash(shared) != graph_hash(sep)


def test_hash_is_exact_on_random_relabellings(space, costs):
    rng = np.random.default_rng(7)
    big = Budget(units=60)
    for _ in range(40):
        g = random_graph(space, costs, big, rng)
        perm = rng.permutation(g.size)
        ren = {n.id: f"q{perm[i]}" for i, n in enumerate(g.nodes)}
        h = Graph.build([Node(ren[n.id], n.role, n.model, n.params) for n in g.nodes],
                        [(ren[u], ren[v]) for u, v in g.edges])
        assert graph_hash(g) == graph_hash(h)


def test_hash_agrees_with_networkx_isomorphism_on_small_graphs():
    import networkx as nx

    # all DAGs on 4 nodes with two labels, compared pairwise with VF2
    labels = [("assistant", B1), ("assistant", B3)]
    graphs = []
    pairs = [(i, j) for j in range(4) for i in range(j)]
    rng = np.random.default_rng(0)
    for _ in range(120):
        keep = [p for p in pairs if rng.random() < 0.5]
        lab = [labels[int(rng.integers(2))] for _ in range(4)]
        graphs.append(Graph.build([Node.make(f"v{i}", *lab[i]) for i in range(4)],
                                  [(f"v{i}", f"v{j}") for i, j in keep]))

    def nxg(g):
        d = nx.DiGraph()
        for n in g.nodes:
            d.add_node(n.id, label=n.label)
        d.add_edges_from(g.edges)
        return d

    for a, b in itertools.combinations(graphs[:60], 2):
        iso = nx.is_isomorphic(nxg(a), nxg(b), node_match=lambda x, y: x["label"] == y["label"])
        assert iso == (graph_hash(a) == graph_hash(b))


# -- costing -----------------------------------------------------------------------------

def test_units_match_the_papers_relative_costs(costs):
    assert costs.node_units(B1, 0) == pytest.approx(1.0)
    assert costs.node_units("llama-3.2-3b", 0) == pytest.approx(3.0, abs=0.05)
    assert costs.node_units(B8, 0) == pytest.approx(7.9, abs=0.1)
    assert costs.node_units(B70, 0) == pytest.approx(69, abs=0.5)


def test_flops_formula_and_quadratic_in_degree(pool):
    m = ModelInfo("m", 1e9, 16, 2048)
    cm = CostModel({"m": m}, TaskShape(100, 50))
    one = cm.cost(Graph.build([Node.make("a", "assistant", "m")]))
    np_, nd = 100, 50
    expect = 2e9 * np_ + 2 * 16 * 2048 * np_ * (np_ + 1) + 2e9 * nd + 2 * 16 * 2048 * nd * (2 * np_ + nd + 1)
    assert one.flops == pytest.approx(expect)
    # in-degree cost grows faster than linearly
    u = [cm.node_units("m", d) for d in range(4)]
    assert (u[2] - u[1]) > (u[1] - u[0])


def test_latency_is_the_critical_path_and_usd_from_prices(costs):
    g = fan_in([B1, B8])
    c = costs.cost(g)
    from graphtune.graphs.cost import node_latency_s

    lat8 = node_latency_s(costs.model(B8), 202, 275)
    lat_s = node_latency_s(costs.model("llama-3.2-3b"), 202 + 2 * 275, 275)
    assert c.latency_s == pytest.approx(lat8 + lat_s)  # the 1B runs in parallel with the 8B
    assert c.usd == pytest.approx((202 + 275) * (0.02 + 0.18) / 1e6 + (202 + 550 + 275) * 0.06 / 1e6)


def test_budget_in_flops_usd_and_latency(costs):
    g = fan_in([B1, B8])
    c = costs.cost(g)
    assert Budget(flops=c.flops * 1.01).fits(c) and not Budget(flops=c.flops * 0.99).fits(c)
    assert not Budget(usd=c.usd / 2).fits(c)
    assert "latency" in Budget(latency_s=c.latency_s / 2).violations(c)[0]


# -- enumeration and sampling --------------------------------------------------------------

def test_enumeration_counts_small_space_up_to_isomorphism(costs):
    sp = Space(models=(B1,), roles=("assistant", "fuser"), max_nodes=3, max_in_degree=2)
    gs = enumerate_graphs(sp, costs, Budget(units=100))
    hashes = {graph_hash(g) for g in gs}
    assert len(hashes) == len(gs)
    # 1 node: A. 2 nodes: A->A, A->F. 3 nodes (single sink): chains x->y->z with 2 choices
    # for each non-source (4), fan-ins a,a->{A,F} (2), and the triangle a->b, a->c, b->c (4)
    assert len(gs) == 1 + 2 + 4 + 2 + 4
    for g in gs:
        validate(g, sp, costs, Budget(units=100))


def test_enumeration_respects_budget(space, costs, budget18):
    sp = Space(models=space.models, max_nodes=3, max_in_degree=2)
    for g in enumerate_graphs(sp, costs, budget18):
        assert costs.cost(g).units <= 18 + 1e-9


#: a replay-like pool of similar-sized models (issue 14: seven models, at most three nodes fit)
SIMILAR_POOL = {n: ModelInfo(n, p, 32, 4096) for n, p in [
    ("mistral-7b-v0.1", 7.2e9), ("zephyr-7b-beta", 7.2e9), ("qwen-7B", 7.7e9), ("llama-3-8b", 8e9),
    ("Llama-3-8B", 8e9), ("llama-2-7b", 6.7e9), ("gemma-7b", 8.5e9)]}


@pytest.mark.timeout(300)  # a hang guard, not a speed target (benchmarks/enumerate_bench.py measures that)
def test_enumeration_prunes_partial_graphs_that_cannot_complete_in_budget():
    """Five sources fit the budget but no single-sink graph of more than three nodes does:
    max_nodes 6 used to grow every forest of sources (over ten minutes); it must give the
    max_nodes 3 result, exactly."""
    costs = CostModel(SIMILAR_POOL, TaskShape(200, 250))
    budget = Budget(units=5)
    small = enumerate_graphs(Space(models=tuple(SIMILAR_POOL), max_nodes=3, max_in_degree=4), costs, budget)
    big = enumerate_graphs(Space(models=tuple(SIMILAR_POOL), max_nodes=6, max_in_degree=4), costs, budget)
    assert max(g.size for g in big) == 3
    assert [graph_hash(g) for g in big] == [graph_hash(g) for g in small]
    assert len(big) == 1891


@pytest.mark.parametrize("budget", [Budget(units=3), Budget(units=8), Budget(latency_s=6),
                                    Budget(units=6, latency_s=8), Budget(usd=1e-4)])
@pytest.mark.parametrize("limits", [dict(max_nodes=4, max_in_degree=4), dict(max_nodes=4, max_in_degree=2, max_depth=3,
                                                                             max_width=2),
                                    dict(max_nodes=4, max_in_degree=1)])
def test_enumeration_equals_brute_force_filter(costs, budget, limits):
    """The pruned enumeration keeps exactly the valid in-budget graphs: compare with every
    graph of the space grown without any cost pruning, then filtered."""
    from graphtune.graphs.space import is_valid, structural_errors

    sp = Space(models=("llama-3.2-1b", "llama-3.1-8b"), roles=("assistant", "fuser"), **limits)
    got = {graph_hash(g) for g in enumerate_graphs(sp, costs, budget)}
    unbounded = enumerate_graphs(sp, costs, Budget())
    want = {graph_hash(g) for g in unbounded if is_valid(g, sp, costs, budget)}
    assert got == want
    assert all(not structural_errors(g, sp) for g in unbounded)


def test_random_graphs_are_valid_and_in_budget(space, costs, budget18):
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(100):
        g = random_graph(space, costs, budget18, rng)
        validate(g, space, costs, budget18)
        seen.add(graph_hash(g))
    assert len(seen) > 50


def test_impossible_budget_is_reported(space, costs):
    with pytest.raises(BudgetError, match="could not sample"):
        random_graph(space, costs, Budget(units=0.5), np.random.default_rng(0), max_tries=20)


# -- serialisation and rendering -----------------------------------------------------------

def test_round_trip_json_yaml(tmp_path):
    g = fan_in([B1, B3])
    assert from_dict(json.loads(to_json(g))) == g
    p = tmp_path / "g.yaml"
    p.write_text(to_yaml(g))
    assert load(p) == g
    assert to_dict(g)["schema_version"] == 1


def test_from_dict_errors_and_sink_pruning(tmp_path):
    with pytest.raises(GraphError, match="schema_version 99"):
        from_dict({"schema_version": 99, "nodes": []})
    with pytest.raises(GraphError, match=r"nodes\[0\] must have id, role and model"):
        from_dict({"nodes": [{"id": "a"}]})
    with pytest.raises(GraphError, match="unknown keys"):
        from_dict({"nodes": [{"id": "a", "role": "assistant", "model": B1}], "edgez": []})
    d = {"nodes": [{"id": "a", "role": "assistant", "model": B1}, {"id": "b", "role": "assistant", "model": B1}],
         "edges": [], "sink": "b"}
    assert sorted(from_dict(d).node_map) == ["b"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [\n")
    with pytest.raises(GraphError, match="not valid YAML"):
        load(bad)


def test_renderings_show_roles_and_models():
    g = fan_in([B1, B8])
    txt = to_text(g)
    assert "fuser:llama-3.2-3b" in txt and "assistant:llama-3.1-8b" in txt
    mm = to_mermaid(g)
    assert mm.startswith("flowchart") and "a0 --> s" in mm and "fuser" in mm


def test_short_labels_are_unique_within_the_pool():
    from graphtune.graphs.render import short_labels, to_short

    # unique today: kept as they are
    assert short_labels([B1, B3, B8, B70]) == {B1: "1b", B3: "3b", B8: "8b", B70: "70b"}
    foreign = ["mistralai/Mistral-7B-Instruct-v0.1", "HuggingFaceH4/zephyr-7b-beta", "meta-llama/Llama-2-7b",
               "Qwen/Qwen-7B", "meta-llama/Meta-Llama-3-8B", "a/llama-3-8b", "b/llama-3-8b",
               "lmsys/vicuna-7b-v0.1", "x/foo-beta"]
    labels = short_labels(foreign)
    assert len({v.lower() for v in labels.values()}) == len(foreign), labels
    assert labels["HuggingFaceH4/zephyr-7b-beta"] == "7b-beta"
    # one graph rendered against the pool: the same model reads the same in every graph
    g = fan_in(["Qwen/Qwen-7B", "meta-llama/Llama-2-7b"], sink_model="HuggingFaceH4/zephyr-7b-beta")
    text = to_short(g, foreign)
    assert text == to_short(g, labels) == "A:2-7b A:Qwen-7B > F:7b-beta"
    # without a pool, unique among the graph's own models
    assert to_short(fan_in([B1, B3], sink_model=B8)) == "A:1b A:3b > F:8b"
    assert to_short(fan_in(["org/m-7b", "org/n-7B"], sink_model="org/m-7b")) == "A:m-7b A:n-7B > F:m-7b"
