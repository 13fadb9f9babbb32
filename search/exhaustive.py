"""``exhaustive``: every graph of a small space, one per isomorphism class; on a
multi-stage study, every pipeline of the product of the stages' spaces.

The oracle for benchmarks: with enough budget it finds the true optimum of the space.
Graphs are evaluated in order of size, then canonical hash, so a run cut short by its
budget has covered all smaller graphs first.

Pipelines: each stage's graphs are enumerated in the stage's own space under
:func:`graphtune.graphs.design.stage_budget` (its cap, and what of the total is left once
every other stage runs its cheapest graph); the product of the stages' lists is filtered
by the pipeline budget (the total and every cap) and ordered by total cost (budget units),
then pipeline hash, so a run cut short has covered all cheaper pipelines first. A product
larger than ``max_graphs`` is refused before it is built, with a one-line error naming its
size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import product
from typing import Any

from pydantic import Field

from graphtune.errors import SearchError
from graphtune.graphs.cost import GraphCost, PipelineBudget, PipelineCost, PipelineCostModel
from graphtune.graphs.design import PipelineSpace, design_hash, stage_budget
from graphtune.graphs.model import Graph
from graphtune.graphs.pipeline import Pipeline
from graphtune.graphs.space import SpaceTooLarge, enumerate_graphs
from graphtune.search.base import Candidate, Evaluation, SearchContext, Searcher, SearcherOptions


class ExhaustiveOptions(SearcherOptions):
    max_graphs: int = Field(200_000, ge=1, le=10_000_000,
                            description="refuse spaces with more graphs (or pipelines) than this")


class ExhaustiveSearcher(Searcher):
    name = "exhaustive"
    Options = ExhaustiveOptions

    def __init__(self, ctx: SearchContext):
        super().__init__(ctx)
        limit = self.opts.max_graphs
        if isinstance(ctx.space, PipelineSpace):
            self.graphs = enumerate_pipelines(ctx.space, ctx.costs, ctx.budget, limit=limit)
        else:
            self.graphs = enumerate_graphs(ctx.space, ctx.costs, ctx.budget, limit=limit)
        self.position = 0

    @property
    def size(self) -> int:
        return len(self.graphs)

    def ask(self) -> list[Candidate]:
        batch = self.graphs[self.position:self.position + self.ctx.batch_size]
        self.position += len(batch)
        return [Candidate(graph=g, origin="enumerated") for g in batch]

    def tell(self, evaluations: Sequence[Evaluation]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "size": len(self.graphs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.position = int(state["position"])


def enumerate_pipelines(space: PipelineSpace, costs: PipelineCostModel, budget: PipelineBudget, *,
                        limit: int = 200_000) -> list[Pipeline]:
    """Every pipeline of ``space`` within ``budget``: the product of each stage's
    enumerated graphs (under the stage's :func:`stage_budget`), those fitting the total and
    every cap, sorted by (total units, pipeline hash). A SearchError when the product has
    more than ``limit`` pipelines."""
    per_stage: list[list[tuple[Graph, GraphCost]]] = []
    for s in space.stages:
        b = stage_budget(space, costs, budget, s.name)
        try:
            graphs = enumerate_graphs(s.space, costs.of(s.name), b, limit=limit)
        except SpaceTooLarge:
            raise SearchError(f"exhaustive: stage {s.name!r} alone has more than {limit} graphs (search.options."
                              "max_graphs); shrink the stage's space or budget, raise max_graphs, or use a "
                              "sampling method") from None
        per_stage.append([(g, _in_pipeline_units(costs.of(s.name).cost(g), costs)) for g in graphs])
    sizes = [len(x) for x in per_stage]
    total = math.prod(sizes)
    if total > limit:
        raise SearchError(f"exhaustive: the pipeline space has {' x '.join(map(str, sizes))} = {total} pipelines, "
                          f"more than search.options.max_graphs ({limit}); shrink the stages' spaces or budget, "
                          "raise max_graphs, or use a sampling method")
    names = space.names
    inputs = [s.inputs for s in space.stages]
    keep: list[tuple[float, Pipeline]] = []
    for combo in product(*per_stage):
        finish: dict[str, float] = {}
        for name, ins, (_, c) in zip(names, inputs, combo):
            finish[name] = max((finish[i] for i in ins if i in finish), default=0.0) + c.latency_s
        stages = tuple((n, c) for n, (_, c) in zip(names, combo))
        tot = GraphCost(flops=sum(c.flops for _, c in stages), units=sum(c.units for _, c in stages),
                        usd=sum(c.usd for _, c in stages), latency_s=max(finish.values()),
                        prompt_tokens=sum(c.prompt_tokens for _, c in stages),
                        completion_tokens=sum(c.completion_tokens for _, c in stages))
        if budget.fits(PipelineCost(total=tot, stages=stages)):
            keep.append((tot.units, space.pipeline({n: g for n, (g, _) in zip(names, combo)})))
    keyed = [(u, design_hash(p), p) for u, p in keep]
    keyed.sort(key=lambda t: (round(t[0], 9), t[1]))
    return [p for _, _, p in keyed]


def _in_pipeline_units(c: GraphCost, costs: PipelineCostModel) -> GraphCost:
    """A stage's cost with its units counted in the pipeline's unit (as
    :meth:`PipelineCostModel.cost` counts them)."""
    return GraphCost(flops=c.flops, units=c.flops / costs.unit_flops, usd=c.usd, latency_s=c.latency_s,
                     prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens)
