"""What the simulator and the replay environment share: the execution plan of a graph and
the synthesis rule that decides the answer of a node with inputs (``docs/simulator.md``).

The simulator (:mod:`graphtune.envs.simulated.simulator`) applies the rule to numpy arrays
over many questions at once, the replay environment (:mod:`graphtune.envs.replay`) to one
question at a time on recorded inputs; both take every quantity of the rule from here, so
the rule is written once. Each keeps its own randomness (the simulator's splitmix64
streams, the replay's hashed uniforms) and its own way of drawing wrong answers.

The rule, for a node of model m with d inputs (``x`` is the node's ability on the
question in logits: ``a_m - b_q`` in the simulator, the logit of ``p_qm`` in replay):

* its tolerance of long contexts is ``z_m = max(params_m / 1e9, 1e-3) ** size_exponent``;
* its own attempt is right with probability ``sigmoid(x - penalty)``, where ``penalty =
  context_penalty * d ** context_power / z_m``;
* each distinct candidate answer gets ``votes ** gamma`` (inputs giving it, plus the own
  attempt with the role's own weight; gamma the role's sharpness), the right one times
  ``exp(beta)`` with ``beta = (synthesis_gain + weak_synth_penalty) * verify -
  weak_synth_penalty`` and ``verify = sigmoid(x + verify_offset - penalty)``;
* the pick uses the node's own selection randomness with probability
  ``synthesis_diversity``, else the randomness shared by every node of its model and role
  that sees the same inputs;
* a right pick at topological level l is garbled with probability ``1 - exp(-corruption *
  l / z_m)``.

A role users define (:class:`~graphtune.graphs.model.RoleSpec`) is modelled as the built-in
role it ``acts_like``: :func:`execution_plan` gives its nodes that role, so a graph with a
``verifier`` acting like a fuser has the outcomes of the same graph with a fuser there.

Every function keeps the exact order of floating-point operations the two environments
used before they shared it, so their outcomes are bit-for-bit unchanged
(``tests/test_synthesis_pins.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scipy.special import expit

from graphtune.errors import EnvError
from graphtune.graphs.canonical import canonical_form, canonical_order
from graphtune.graphs.model import ASSISTANT, FUSER, Graph, Node, RoleSpec

if TYPE_CHECKING:  # at run time the profile is duck-typed: the simulator's package imports this module
    from graphtune.envs.simulated.profile import Profile

__all__ = ["SUPPORTED_ROLES", "NodePlan", "Plan", "acts_like_map", "check_graph", "execution_plan", "SynthesisRule"]

#: the roles the synthesis rule models
SUPPORTED_ROLES = (ASSISTANT, FUSER)

# -- the execution plan -------------------------------------------------------------------


@dataclass(frozen=True)
class NodePlan:
    """One node of a graph in canonical form."""

    pos: int  # canonical position: the node is n{pos} of the canonical form
    model: str
    role: str
    preds: tuple[int, ...]  # canonical positions of its predecessors, sorted
    level: int  # topological level (0 for a source)
    rank: int  # a source: its rank among the same-model sources in canonical order; else -1


@dataclass(frozen=True)
class Plan:
    """The order a graph's nodes run in and what each reads."""

    nodes: tuple[NodePlan, ...]  # in topological order
    sink: int  # canonical position of the node whose answer is the graph's
    original_ids: tuple[str, ...]  # original id of canonical node n{i}


def acts_like_map(roles: Iterable[RoleSpec] = ()) -> dict[str, str]:
    """Role name -> the built-in role the rule models it as (built-ins map to themselves)."""
    out = {r: r for r in SUPPORTED_ROLES}
    out.update({r.name: r.acts_like for r in roles})
    return out


def check_graph(graph: Graph, who: str, check_model: Callable[[Node], Any],
                roles: Iterable[RoleSpec] = ()) -> None:
    """Refuse a graph the rule cannot run, node by node: a role it does not model (neither
    built in nor one of the custom ``roles``), a model ``check_model`` refuses (it
    raises), a node without the inputs its role needs or with inputs it takes none of.
    ``who`` names the environment in the message."""
    custom = {r.name: r for r in roles}
    for n in graph.nodes:
        if n.role not in SUPPORTED_ROLES and n.role not in custom:
            raise EnvError(f"node {n.id!r} has role {n.role!r}, which {who} does not model; "
                           f"supported roles: {[*SUPPORTED_ROLES, *custom]}")
        check_model(n)
        if n.role == FUSER and not graph.preds[n.id]:
            raise EnvError(f"node {n.id!r} is a fuser with no predecessor; a fuser needs at least one input")
        rs = custom.get(n.role)
        if rs is not None and rs.needs_input and not graph.preds[n.id]:
            raise EnvError(f"node {n.id!r} is a {n.role} with no predecessor; a {n.role} needs at least one input")
        if rs is not None and not rs.accepts_input and graph.preds[n.id]:
            raise EnvError(f"node {n.id!r} is a {n.role}, which takes no inputs, but has predecessors")


def execution_plan(graph: Graph, acts_like: Mapping[str, str] | None = None) -> Plan:
    """The plan of ``graph`` in canonical form, so node naming changes nothing; a custom
    role's nodes get the built-in role they act like (``acts_like``: role -> built-in)."""
    if acts_like and any(acts_like.get(n.role, n.role) != n.role for n in graph.nodes):
        graph = Graph.build([Node(n.id, acts_like.get(n.role, n.role), n.model, n.params) for n in graph.nodes],
                            graph.edges)
    canon = canonical_form(graph)
    order = canonical_order(graph)
    levels = canon.levels
    ranks: dict[str, int] = {}
    rank_of: dict[int, int] = {}
    for i in range(len(order)):  # canonical order: n0, n1, ...
        n = canon.node_map[f"n{i}"]
        if not canon.preds[n.id]:
            rank_of[i] = ranks.get(n.model, 0)
            ranks[n.model] = rank_of[i] + 1
    nodes = []
    for nid in canon.topo_order:
        n = canon.node_map[nid]
        pos = int(nid[1:])
        nodes.append(NodePlan(pos=pos, model=n.model, role=n.role,
                              preds=tuple(sorted(int(p[1:]) for p in canon.preds[nid])),
                              level=levels[nid], rank=rank_of.get(pos, -1)))
    return Plan(nodes=tuple(nodes), sink=int(canon.sink[1:]), original_ids=tuple(order))


# -- the synthesis rule ----------------------------------------------------------------------


@dataclass(frozen=True)
class SynthesisRule:
    """The synthesis rule with the parameters of a simulator profile. ``x`` (a float or a
    numpy array) is the node's ability on the question in logits."""

    profile: Profile

    def tolerance(self, params: float) -> float:
        """``z_m``: how well a model of ``params`` parameters bears long contexts and depth."""
        return max(params / 1e9, 1e-3) ** self.profile.size_exponent

    def context_penalty(self, n_inputs: int, z: float) -> float:
        """The logits a node with ``n_inputs`` inputs loses to its longer prompt."""
        p = self.profile
        return p.context_penalty * n_inputs ** p.context_power / z

    def own_right(self, x: Any, penalty: float) -> Any:
        """Probability that the node's own attempt is right."""
        return expit(x - penalty)

    def beta(self, x: Any, penalty: float) -> Any:
        """The log-weight bonus of the right candidate: positive when the node can verify
        it, negative (drawn to wrong answers) when it cannot."""
        p = self.profile
        verify = expit(x + p.verify_offset - penalty)
        return (p.synthesis_gain + p.weak_synth_penalty) * verify - p.weak_synth_penalty

    def own_weight(self, role: str) -> float:
        """Votes of the node's own attempt (a fuser leans on its inputs)."""
        return self.profile.fuser_own_weight if role == FUSER else self.profile.assistant_own_weight

    def sharpness(self, role: str) -> float:
        """gamma: how strongly the pick follows the plurality."""
        return self.profile.fuser_sharpness if role == FUSER else self.profile.assistant_sharpness

    @property
    def diversity(self) -> float:
        """The chance that a pick uses the node's own randomness rather than the shared."""
        return self.profile.synthesis_diversity

    def garble(self, level: int, z: float) -> float:
        """Probability that a right pick at topological ``level`` is garbled."""
        return 1.0 - math.exp(-self.profile.corruption * level / z)
