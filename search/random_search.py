"""``random``: uniform-ish random valid graphs (or pipelines: a graph per stage) within budget
(the simplest baseline)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from graphtune.graphs.design import design_hash, random_design
from graphtune.search.base import (Candidate, Evaluation, SearchContext, Searcher, SearcherOptions, rng_from_state,
                                   rng_state)


class RandomOptions(SearcherOptions):
    max_redraws: int = Field(200, ge=1, le=100_000, description="redraws per slot before giving up on a new graph")


class RandomSearcher(Searcher):
    """Samples ``batch_size`` distinct new graphs per ask, each on the whole dev split.

    Graphs already proposed are skipped (up to ``max_redraws`` redraws per slot), so the
    search never spends budget on a graph twice; in a tiny space it stops when no new
    graph turns up. On a multi-stage study each candidate is a pipeline whose stage graphs
    are drawn under a random split of the budget (``graphs.design.random_design``).
    """

    name = "random"
    Options = RandomOptions

    def __init__(self, ctx: SearchContext):
        super().__init__(ctx)
        self.rng = ctx.rng(salt=1)
        self.seen: set[str] = set()
        self.max_redraws = self.opts.max_redraws

    def ask(self) -> list[Candidate]:
        out: list[Candidate] = []
        for _ in range(self.ctx.batch_size):
            for _ in range(self.max_redraws):
                g = random_design(self.ctx.space, self.ctx.costs, self.ctx.budget, self.rng)
                h = design_hash(g)
                if h not in self.seen:
                    self.seen.add(h)
                    out.append(Candidate(graph=g, origin="random"))
                    break
        return out

    def tell(self, evaluations: Sequence[Evaluation]) -> None:
        pass  # random search does not learn

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(self.rng), "seen": sorted(self.seen)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rng = rng_from_state(state["rng"])
        self.seen = set(state["seen"])
