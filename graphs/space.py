"""The search space: which graphs a search may propose, and checks against it.

``validate`` is the one gate every graph passes before it is evaluated (proposals from any
searcher, agent replies, user graph files). Nodes without a path to the sink do no work:
``prune_to_sink`` removes them; ``validate`` *rejects* a graph that still has them, so a
caller always states which behaviour it wants.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from graphtune.errors import BudgetError, GraphError
from graphtune.graphs.canonical import canonical_form, graph_hash
from graphtune.graphs.cost import Budget, CostModel, GraphCost, node_flops, node_latency_s, node_usd
from graphtune.graphs.model import BUILTIN_ROLE_SPECS, BUILTIN_ROLES, Graph, Node, RoleSpec


@dataclass(frozen=True)
class Space:
    """Limits of the graphs a search may propose."""

    models: tuple[str, ...]
    roles: tuple[str, ...] = ("assistant", "fuser")
    max_nodes: int = 9
    max_width: int = 9
    max_depth: int = 4
    max_in_degree: int = 4
    #: Roles the sink may take (default: any role of the space that may be a sink).
    sink_roles: tuple[str, ...] | None = None
    #: Roles users define besides the built-in ones (their rules; see :class:`RoleSpec`).
    role_specs: tuple[RoleSpec, ...] = ()
    #: Why the limits are narrower than a user asked (added to every refusal), or None.
    note: str | None = None

    def __post_init__(self) -> None:
        names = [r.name for r in self.role_specs]
        clash = sorted(set(names) & set(BUILTIN_ROLES))
        if clash:
            raise GraphError(f"role(s) {clash} are built in; give a custom role another name")
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise GraphError(f"roles {dups} are declared twice; each role needs a unique name")

    def role_spec(self, role: str) -> RoleSpec:
        """The rules of ``role``: a declared custom role's, a built-in's, else those of an
        undeclared role (may take inputs, may be the sink: how every role but the fuser
        was treated before roles could be declared)."""
        for r in self.role_specs:
            if r.name == role:
                return r
        return BUILTIN_ROLE_SPECS.get(role) or RoleSpec(role)

    def role_allowed(self, role: str, *, has_inputs: bool, is_sink: bool) -> bool:
        """Whether a node of ``role`` may sit where it has (or lacks) inputs and is (or is
        not) the sink. The one predicate every sampler and enumerator masks roles with."""
        if role not in self.roles or is_sink and self.sink_roles is not None and role not in self.sink_roles:
            return False
        return self.role_spec(role).allowed(has_inputs=has_inputs, is_sink=is_sink)

    def roles_for(self, *, has_inputs: bool, is_sink: bool) -> tuple[str, ...]:
        """The space's roles a node may take at such a position, in the space's order."""
        return tuple(r for r in self.roles if self.role_allowed(r, has_inputs=has_inputs, is_sink=is_sink))


def prune_to_sink(graph: Graph, sink: str) -> Graph:
    """Drop every node with no path to ``sink`` (they would do no work)."""
    keep = graph.ancestors(sink) | {sink}
    if len(keep) == graph.size:
        return graph
    return Graph.build([n for n in graph.nodes if n.id in keep],
                       [(u, v) for u, v in graph.edges if u in keep and v in keep])


def structural_errors(graph: Graph, space: Space) -> list[str]:
    """Every way the graph breaks the space's rules (empty list when valid)."""
    errs: list[str] = []
    try:
        graph.topo_order
    except GraphError as e:
        return [str(e)]
    sinks = graph.sinks
    if len(sinks) != 1:
        errs.append(f"graph must have exactly one sink; nodes {list(sinks)} have no successors "
                    "(connect them or prune the ones that do no work)")
    for n in graph.nodes:
        if n.model not in space.models:
            errs.append(f"node {n.id!r} uses model {n.model!r}, not in the pool {list(space.models)}")
        if n.role not in space.roles:
            errs.append(f"node {n.id!r} has role {n.role!r}, not allowed; allowed roles: {list(space.roles)}")
        rs = space.role_spec(n.role)
        if rs.needs_input and not graph.preds[n.id]:
            errs.append(f"node {n.id!r} is a {n.role} with no predecessor; a {n.role} needs at least one input")
        if not rs.accepts_input and graph.preds[n.id]:
            errs.append(f"node {n.id!r} is a {n.role} with predecessors {list(graph.preds[n.id])}; a {n.role} "
                        "takes no inputs")
        if len(graph.preds[n.id]) > space.max_in_degree:
            errs.append(f"node {n.id!r} has in-degree {len(graph.preds[n.id])} > max_in_degree {space.max_in_degree}")
    if len(sinks) == 1 and space.sink_roles is not None:
        s = graph.node_map[sinks[0]]
        if s.role not in space.sink_roles:
            errs.append(f"sink {s.id!r} has role {s.role!r}; the sink must be one of {list(space.sink_roles)}")
    if len(sinks) == 1:
        s = graph.node_map[sinks[0]]
        if not space.role_spec(s.role).may_be_sink:
            errs.append(f"sink {s.id!r} has role {s.role!r}, which may not be the sink; end the graph with one of "
                        f"{list(space.roles_for(has_inputs=True, is_sink=True))}")
    if graph.size > space.max_nodes:
        errs.append(f"graph has {graph.size} nodes > max_nodes {space.max_nodes}")
    if graph.width > space.max_width:
        errs.append(f"graph has width {graph.width} > max_width {space.max_width}")
    if graph.depth > space.max_depth:
        errs.append(f"graph has depth {graph.depth} > max_depth {space.max_depth}")
    return errs


def validate(graph: Graph, space: Space, costs: CostModel | None = None,
             budget: Budget | None = None) -> GraphCost | None:
    """Raise GraphError/BudgetError naming the first problems; return the graph's cost."""
    errs = structural_errors(graph, space)
    if errs:
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        raise GraphError(errs[0] + more + (f"; {space.note}" if space.note else ""))
    if costs is None:
        return None
    if budget is not None:
        return budget.check(graph, costs)
    return costs.cost(graph)


def is_valid(graph: Graph, space: Space, costs: CostModel, budget: Budget) -> bool:
    try:
        validate(graph, space, costs, budget)
        return True
    except GraphError:
        return False


# -- enumeration ---------------------------------------------------------------------


class SpaceTooLarge(GraphError):
    pass


def enumerate_graphs(space: Space, costs: CostModel, budget: Budget, *,
                     limit: int = 200_000) -> list[Graph]:
    """All valid in-budget graphs of the space, one per isomorphism class, in canonical
    form, sorted by (size, hash).

    Grows graphs one node at a time: every DAG arises from a smaller one by adding a new
    node whose predecessors are existing nodes (remove the sink to see why). Each level is
    de-duplicated up to isomorphism. A partial graph is kept only if some completion of it
    could still be valid: adding nodes never changes the existing nodes' in-degrees,
    levels or costs, so a partial graph that already breaks the budget, width, depth or
    size is dropped, and so is one whose cheapest possible completion would (see
    :func:`_completion_bound`). Candidates are costed incrementally before a graph is
    built. Raises SpaceTooLarge past ``limit`` partial graphs.
    """
    labels = [(r, m) for m in space.models for r in space.roles]
    bound = _CompletionBound(space, costs)
    frontier: dict[str, Graph] = {}
    out: dict[str, Graph] = {}

    def too_large() -> SpaceTooLarge:
        return SpaceTooLarge(f"space has more than {limit} graphs; shrink `space` or `budget`, "
                             "or use a sampling method")

    for role, model in labels:
        if not space.role_spec(role).allowed(has_inputs=False, is_sink=False):
            continue
        g = Graph.build([Node.make("n0", role, model)])
        st = _Partial.of(g, costs)
        if bound.may_complete(st, budget):
            frontier[graph_hash(g)] = canonical_form(g)
    for _ in range(space.max_nodes):
        for h, g in frontier.items():
            if not structural_errors(g, space):
                out[h] = g
        if len(out) + len(frontier) > limit:
            raise too_large()
        nxt: dict[str, Graph] = {}
        for g in frontier.values():
            if g.size >= space.max_nodes:
                continue
            st = _Partial.of(g, costs)
            ids = [n.id for n in g.nodes]
            new_id = f"x{g.size}"
            for k in range(0, min(space.max_in_degree, len(ids)) + 1):
                for pset in itertools.combinations(ids, k):
                    for role, model in labels:
                        if not space.role_spec(role).allowed(has_inputs=bool(pset), is_sink=False):
                            continue
                        grown = st.grow(pset, new_id, role, model, costs)
                        if not bound.may_complete(grown, budget):
                            continue
                        cand = Graph.build(list(g.nodes) + [Node.make(new_id, role, model)],
                                           list(g.edges) + [(p, new_id) for p in pset])
                        h = graph_hash(cand)
                        if h not in nxt and h not in out:
                            nxt[h] = canonical_form(cand)
                            if len(nxt) + len(out) > limit:
                                raise too_large()
        frontier = nxt
        if not frontier:
            break
    for h, g in frontier.items():
        if not structural_errors(g, space):
            out[h] = g
    return sorted(out.values(), key=lambda g: (g.size, graph_hash(g)))


@dataclass(frozen=True)
class _Partial:
    """What the enumerator needs of a partial graph, kept up to date node by node: its
    additive costs, each node's finish time and level, its sinks and its sink's role."""

    size: int
    flops: float
    usd: float
    finish: dict
    level: dict
    level_counts: dict
    sinks: frozenset
    last_role: str  # the role of the sink when there is one sink
    last_has_inputs: bool

    @staticmethod
    def of(g: Graph, costs: CostModel) -> _Partial:
        c = costs.cost(g)
        finish: dict[str, float] = {}
        for nid in g.topo_order:
            p, q = costs.node_tokens(g.in_degree(nid))
            start = max((finish[x] for x in g.preds[nid]), default=0.0)
            finish[nid] = start + node_latency_s(costs.model(g.node_map[nid].model), p, q)
        counts: dict[int, int] = {}
        for lv in g.levels.values():
            counts[lv] = counts.get(lv, 0) + 1
        sinks = g.sinks
        s = g.node_map[sinks[0]]
        return _Partial(g.size, c.flops, c.usd, finish, dict(g.levels), counts, frozenset(sinks),
                        s.role, bool(g.preds[s.id]))

    def grow(self, preds: tuple[str, ...], new_id: str, role: str, model: str, costs: CostModel) -> _Partial:
        info = costs.model(model)
        p, q = costs.node_tokens(len(preds))
        lv = 1 + max((self.level[x] for x in preds), default=-1)
        counts = dict(self.level_counts)
        counts[lv] = counts.get(lv, 0) + 1
        start = max((self.finish[x] for x in preds), default=0.0)
        return _Partial(self.size + 1, self.flops + node_flops(info, p, q), self.usd + node_usd(info, p, q),
                        {**self.finish, new_id: start + node_latency_s(info, p, q)}, {**self.level, new_id: lv},
                        counts, (self.sinks - set(preds)) | {new_id}, role, bool(preds))

    @property
    def depth(self) -> int:
        return 1 + max(self.level_counts)

    @property
    def width(self) -> int:
        return max(self.level_counts.values())

    @property
    def latency_s(self) -> float:
        return max(self.finish.values())


class _CompletionBound:
    """A lower bound on what any completion of a partial graph adds: the test that lets
    the enumerator drop a partial graph before it grows.

    A partial graph with k sinks needs new nodes until one sink is left. A new node with
    d inputs lowers the sink count by at most d - 1, so with in-degrees capped at D it
    takes j >= ceil((k - 1) / (D - 1)) new nodes with sum(d) >= k - 1 + j; a lone sink
    whose role may not be the sink needs j >= 1 node with an input. A node's FLOPs and
    dollars are convex in d (the prompt grows linearly, attention quadratically), so
    cost(m, d) >= a + b*d with a = min over models of cost(m, 0) and b = min of
    cost(m, 1) - cost(m, 0): the new nodes add at least j*(a + b) + (k - 1)*b. The final
    sink runs after every existing node, so latency grows by at least the cheapest
    one-input call, depth by one and size by j.
    """

    def __init__(self, space: Space, costs: CostModel):
        self.space = space
        self.unit_flops = costs.unit_flops
        infos = [costs.model(m) for m in space.models]
        t0, t1 = costs.node_tokens(0), costs.node_tokens(1)
        self.a_flops = min(node_flops(m, *t0) for m in infos)
        self.b_flops = min(node_flops(m, *t1) - node_flops(m, *t0) for m in infos)
        self.a_usd = min(node_usd(m, *t0) for m in infos)
        self.b_usd = min(node_usd(m, *t1) - node_usd(m, *t0) for m in infos)
        self.latency1 = min(node_latency_s(m, *t1) for m in infos)

    def may_complete(self, st: _Partial, budget: Budget) -> bool:
        space = self.space
        if st.width > space.max_width or st.depth > space.max_depth:
            return False
        k = len(st.sinks)
        if k > 1:
            if space.max_in_degree < 2:
                return False
            j = -(-(k - 1) // (space.max_in_degree - 1))
        elif not space.role_allowed(st.last_role, has_inputs=st.last_has_inputs, is_sink=True):
            j = 1
        else:
            j = 0
        flops, usd, latency = st.flops, st.usd, st.latency_s
        if j:
            if st.size + j > space.max_nodes or st.depth + 1 > space.max_depth or space.max_in_degree < 1:
                return False
            flops += j * (self.a_flops + self.b_flops) + (k - 1) * self.b_flops
            usd += j * (self.a_usd + self.b_usd) + (k - 1) * self.b_usd
            latency += self.latency1
        return budget.fits(GraphCost(flops=flops, units=flops / self.unit_flops, usd=usd, latency_s=latency,
                                     prompt_tokens=0.0, completion_tokens=0.0))


# -- random graphs -------------------------------------------------------------------


def random_graph(space: Space, costs: CostModel, budget: Budget, rng: np.random.Generator,
                 *, max_tries: int = 1000) -> Graph:
    """A random valid in-budget graph.

    Node count uniform over 1..max_nodes; a random forward DAG over the slots (the last
    slot is the sink, every other slot feeds a later one, in-degrees capped); roles
    uniform among those the position allows; then models slot by slot, each uniform
    among the models that still leave room in the budget for the cheapest choice of
    every slot not yet assigned (FLOPs and dollars add up over nodes, so this never
    dead-ends). Latency, a critical path, is checked at the end. Structures that cannot
    fit even with the cheapest models are redrawn, so feasible sizes are roughly equally
    likely.
    """
    models = list(space.models)
    for _ in range(max_tries):
        n = int(rng.integers(1, space.max_nodes + 1))
        preds = _random_structure(space, rng, n)
        if preds is None:
            continue
        roles = []
        for i in range(n):
            allowed = space.roles_for(has_inputs=bool(preds[i]), is_sink=i == n - 1)
            if not allowed:
                break
            roles.append(str(rng.choice(list(allowed))))
        if len(roles) < n:
            continue
        chosen = _assign_models(costs, budget, models, [len(p) for p in preds], rng)
        if chosen is None:
            continue
        g = Graph.build([Node.make(f"n{i}", roles[i], chosen[i]) for i in range(n)],
                        [(f"n{j}", f"n{i}") for i in range(n) for j in preds[i]])
        if is_valid(g, space, costs, budget):
            return g
    raise BudgetError("could not sample a graph that fits the space and budget in "
                      f"{max_tries} tries; raise `budget` or relax `space`")


def _random_structure(space: Space, rng: np.random.Generator, n: int) -> list[list[int]] | None:
    """Predecessor lists of a random forward DAG on slots 0..n-1 with sink n-1, or None
    when the draw breaks the width/depth limits."""
    p_edge = float(rng.uniform(0.1, 0.7))
    cap = space.max_in_degree
    preds: list[list[int]] = [[] for _ in range(n)]
    for j in range(1, n):
        cand = [i for i in range(j) if rng.random() < p_edge]
        if len(cand) > cap:
            cand = sorted(int(x) for x in rng.choice(cand, size=cap, replace=False))
        preds[j] = cand
    has_succ = [False] * n
    for j in range(n):
        for i in preds[j]:
            has_succ[i] = True
    for i in range(n - 2, -1, -1):  # every non-sink slot feeds some later slot
        if not has_succ[i]:
            room = [j for j in range(i + 1, n) if len(preds[j]) < cap]
            if not room:
                return None
            j = int(rng.choice(room))
            preds[j] = sorted(preds[j] + [i])
            has_succ[i] = True
    level = [0] * n
    for j in range(n):
        level[j] = 1 + max((level[i] for i in preds[j]), default=-1)
    if max(level) + 1 > space.max_depth or max(np.bincount(level)) > space.max_width:
        return None
    return preds


def _assign_models(costs: CostModel, budget: Budget, models: list[str], in_degrees: list[int],
                   rng: np.random.Generator) -> list[str] | None:
    """Models per slot, uniform among those that keep the additive costs in budget;
    None when even the cheapest models do not fit."""
    caps = []
    if budget.units is not None:
        caps.append(("flops", budget.units * costs.unit_flops))
    if budget.flops is not None:
        caps.append(("flops", budget.flops))
    if budget.usd is not None:
        caps.append(("usd", budget.usd))
    table = {}
    for m in models:
        info = costs.model(m)
        for d in set(in_degrees):
            p, c = costs.node_tokens(d)
            table[(m, d)] = {"flops": node_flops(info, p, c), "usd": node_usd(info, p, c)}
    cheapest = [{k: min(table[(m, d)][k] for m in models) for k in ("flops", "usd")} for d in in_degrees]
    used = {"flops": 0.0, "usd": 0.0}
    rest = {k: sum(c[k] for c in cheapest) for k in used}
    if any(rest[key] > cap * (1 + 1e-9) for key, cap in caps):
        return None
    out = []
    for i, d in enumerate(in_degrees):
        for k in used:
            rest[k] -= cheapest[i][k]
        ok = [m for m in models
              if all(used[key] + table[(m, d)][key] + rest[key] <= cap * (1 + 1e-9) for key, cap in caps)]
        m = str(rng.choice(ok))
        out.append(m)
        for k in used:
            used[k] += table[(m, d)][k]
    return out


def check_space_not_empty(space: Space, costs: CostModel, budget: Budget) -> GraphCost:
    """Raise a clear error when no graph of the space fits the budget; return the cost of
    the cheapest single-node graph otherwise."""
    if not space.models:
        raise GraphError("the space has no models; list models under `models`")
    source_roles = space.roles_for(has_inputs=False, is_sink=False)
    alone = space.roles_for(has_inputs=False, is_sink=True)
    sinks_with_input = space.roles_for(has_inputs=True, is_sink=True)
    if not source_roles and not alone:
        raise GraphError(f"the space is empty: roles {list(space.roles)} have no role that can answer "
                         "without inputs; add `assistant` to space.roles")
    # the cheapest graph: one node alone, else one source feeding the sink
    candidates = [Graph.build([Node.make("n0", r, m)]) for m in space.models for r in alone]
    if not candidates and source_roles and sinks_with_input and space.max_nodes >= 2 and space.max_in_degree >= 1:
        m0 = min(space.models, key=lambda m: costs.cost(Graph.build([Node.make("n0", source_roles[0], m)])).flops)
        candidates = [Graph.build([Node.make("n0", source_roles[0], m0), Node.make("n1", r, m)], [("n0", "n1")])
                      for m in space.models for r in sinks_with_input]
    if not candidates:
        raise GraphError(f"the space is empty: no role of {list(space.roles)} may be the sink where it can stand; "
                         "allow `assistant` as the sink (space.sink_roles) or a role with `sink: true`")
    cheapest = min((costs.cost(g) for g in candidates), key=lambda c: c.flops)
    v = budget.violations(cheapest)
    if v:
        raise BudgetError(f"budget is impossible: even the cheapest graph (one call of the smallest model) "
                          f"costs {'; '.join(v)}; raise `budget`")
    return cheapest
