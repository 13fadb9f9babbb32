"""``exhaustive``: every graph of a small space, one per isomorphism class.

The oracle for benchmarks: with enough budget it finds the true optimum of the space.
Graphs are evaluated in order of size, then canonical hash, so a run cut short by its
budget has covered all smaller graphs first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from graphtune.graphs.space import enumerate_graphs
from graphtune.search.base import Candidate, Evaluation, SearchContext, Searcher, SearcherOptions


class ExhaustiveOptions(SearcherOptions):
    max_graphs: int = Field(200_000, ge=1, le=10_000_000, description="refuse spaces with more graphs than this")


class ExhaustiveSearcher(Searcher):
    name = "exhaustive"
    Options = ExhaustiveOptions

    def __init__(self, ctx: SearchContext):
        super().__init__(ctx)
        limit = self.opts.max_graphs
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
