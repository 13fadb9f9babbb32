"""From an agent's proposal to a graph: the one builder and validity check behind every
proposed graph (``agent-reinforce``'s critic and ``llm-opt``'s proposer alike).

A :class:`~graphtune.agent.schema.GraphProposal` has passed the reply's shape checks
(:mod:`graphtune.agent.schema`); what needs the search space is checked here: known
endpoints, no duplicate ids or self loops, no cycle, one sink, the space's models, roles
and limits, and the budget. A proposal that fails is refused with a
:class:`~graphtune.errors.GraphError` (``BudgetError`` when only the budget is broken)
whose message is one line naming what is wrong; the caller stores it as that proposal's
reason and goes on.
"""

from __future__ import annotations

from graphtune.agent.schema import GraphProposal, one_line
from graphtune.errors import GraphError
from graphtune.graphs.cost import Budget, CostModel
from graphtune.graphs.model import Graph, Node
from graphtune.graphs.space import Space, validate


def check_graph(graph: Graph, space: Space, costs: CostModel | None = None, budget: Budget | None = None) -> Graph:
    """``graph`` itself once it is a DAG that fits ``space`` (and ``budget`` at
    ``costs``, when given); else a one-line :class:`GraphError` naming the first problem."""
    try:
        graph.topo_order  # raises on a cycle
        validate(graph, space, costs, budget)
    except GraphError as e:  # node ids come from a reply: keep the reason on one line
        raise type(e)(one_line(str(e))) from None
    return graph


def proposal_to_graph(proposal: GraphProposal, space: Space, costs: CostModel | None = None,
                      budget: Budget | None = None) -> Graph:
    """The graph ``proposal`` describes, checked by :func:`check_graph`; raises a
    one-line :class:`GraphError` (or ``BudgetError``) naming what is wrong."""
    try:
        g = Graph.build([Node.make(n.id, n.role, n.model) for n in proposal.nodes],
                        [tuple(e) for e in proposal.edges])
    except GraphError as e:
        raise type(e)(one_line(str(e))) from None
    return check_graph(g, space, costs, budget)
