"""What a search proposes: a *design*, either one collaboration graph or a multi-stage pipeline.

A single-stage study searches :class:`~graphtune.graphs.model.Graph` values in a
:class:`~graphtune.graphs.space.Space`; a multi-stage study searches
:class:`~graphtune.graphs.pipeline.Pipeline` values in a :class:`PipelineSpace` (one space
per stage, the stages' inputs fixed by the spec) under a
:class:`~graphtune.graphs.cost.PipelineBudget`. The functions here take either kind, so the
engine, the store and the app handle both through one seam:

* :func:`design_hash`: a graph's canonical hash; a pipeline's :func:`pipeline_hash` (a
  one-stage pipeline reading only the question hashes as its graph, as it *is* that graph);
* :func:`design_to_dict` / :func:`design_from_dict`: the stored form (a pipeline's has
  ``stages``);
* :func:`validate_design`: the one gate before evaluation, returning the design's cost;
* :func:`design_text`: one line per stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from graphtune.errors import BudgetError, GraphError
from graphtune.graphs import io as graph_io
from graphtune.graphs import pipeline as P
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.cost import Budget, CostModel, GraphCost, PipelineBudget, PipelineCost, PipelineCostModel
from graphtune.graphs.model import Graph
from graphtune.graphs.pipeline import QUESTION, Pipeline, Stage
from graphtune.graphs.render import to_text
from graphtune.graphs.space import Space, check_space_not_empty, random_graph, structural_errors

#: what a searcher proposes and an environment evaluates
Design = Union[Graph, Pipeline]

__all__ = ["Design", "PipelineSpace", "StageSpace", "design_from_dict", "design_hash", "design_text",
           "design_to_dict", "is_pipeline", "random_design", "stage_budget", "validate_design"]


def is_pipeline(design: Any) -> bool:
    return isinstance(design, Pipeline)


def design_hash(design: Design) -> str:
    """A graph's canonical hash, or a pipeline's (see the module docstring)."""
    if isinstance(design, Pipeline):
        g = P.as_single(design)
        return graph_hash(g) if g is not None else P.pipeline_hash(design)
    return graph_hash(design)


def design_to_dict(design: Design) -> dict[str, Any]:
    return P.to_dict(design) if isinstance(design, Pipeline) else graph_io.to_dict(design)


def design_from_dict(data: Any, *, where: str = "design") -> Design:
    """A stored design: a pipeline when the mapping has ``stages``, else a graph."""
    if isinstance(data, Mapping) and "stages" in data:
        return P.from_dict(data, where=where)
    return graph_io.from_dict(data, where=where)


def design_text(design: Design) -> str:
    return P.to_text_pipeline(design) if isinstance(design, Pipeline) else to_text(design)


@dataclass(frozen=True)
class StageSpace:
    """One stage of a pipeline search: its name, its inputs (``question`` and/or earlier
    stages, fixed) and the space its graph is searched in."""

    name: str
    space: Space
    inputs: tuple[str, ...] = (QUESTION,)
    #: what the stage does, for the agent's prompt and reports
    description: str = ""


@dataclass(frozen=True)
class PipelineSpace:
    """The joint space of a multi-stage search: a graph per stage, each from its own space."""

    stages: tuple[StageSpace, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        # the shape must itself be a valid pipeline (names, inputs in order, every stage read)
        self.skeleton()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def stage(self, name: str) -> StageSpace:
        for s in self.stages:
            if s.name == name:
                return s
        raise GraphError(f"the pipeline has no stage {name!r}; its stages: {list(self.names)}")

    @property
    def models(self) -> tuple[str, ...]:
        """Every model some stage may use, in first-seen order."""
        out: list[str] = []
        for s in self.stages:
            out += [m for m in s.space.models if m not in out]
        return tuple(out)

    def skeleton(self, graphs: Mapping[str, Graph] | None = None) -> Pipeline:
        """The pipeline running ``graphs`` (stage name -> graph) on this space's stages; a
        placeholder one-node graph for stages not given (used to check the shape)."""
        from graphtune.graphs.model import Node

        out = []
        for s in self.stages:
            g = (graphs or {}).get(s.name)
            if g is None:
                role = (s.space.roles_for(has_inputs=False, is_sink=True) or s.space.roles or ("assistant",))[0]
                g = Graph.build([Node.make("n0", role, s.space.models[0] if s.space.models else "?")])
            out.append(Stage(s.name, g, s.inputs))
        return Pipeline(tuple(out))

    def pipeline(self, graphs: Mapping[str, Graph]) -> Pipeline:
        """The pipeline running ``graphs`` (one per stage, by name)."""
        missing = [n for n in self.names if n not in graphs]
        if missing:
            raise GraphError(f"no graph for stage(s) {missing}; give one graph per stage {list(self.names)}")
        extra = sorted(set(graphs) - set(self.names))
        if extra:
            raise GraphError(f"graphs for unknown stage(s) {extra}; the stages are {list(self.names)}")
        return self.skeleton(graphs)

    def errors(self, pipeline: Pipeline) -> list[str]:
        """Every way ``pipeline`` breaks this space (its stages, their inputs, each stage's
        graph against the stage's space), one phrase each naming the stage."""
        want = [(s.name, s.inputs) for s in self.stages]
        got = [(s.name, s.inputs) for s in pipeline.stages]
        if want != got:
            return [f"the pipeline's stages {[(n, list(i)) for n, i in got]} are not the space's "
                    f"{[(n, list(i)) for n, i in want]}; propose one graph per stage of the spec"]
        out = []
        for s in self.stages:
            out += [f"stage {s.name!r}: {e}" + (f"; {s.space.note}" if s.space.note else "")
                    for e in structural_errors(pipeline.stage(s.name).graph, s.space)]
        return out


def stage_budget(space: PipelineSpace, costs: PipelineCostModel, budget: PipelineBudget, name: str, *,
                 share: float | None = None) -> Budget:
    """A budget for stage ``name``'s graph alone, in the stage's own cost model's units:
    its cap (if any), and of the pipeline total what remains once every other stage runs its
    cheapest graph (or, with ``share``, that fraction of the total, never below the stage's
    cheapest graph). Latency: the total's, less the other stages' cheapest (a bound; the
    total is checked on the whole pipeline)."""
    cm = costs.of(name)
    scale = costs.unit_flops / cm.unit_flops  # pipeline units -> the stage's own units
    cheapest = {s.name: check_space_not_empty(s.space, costs.of(s.name), Budget()) for s in space.stages}
    others_flops = sum(c.flops for n, c in cheapest.items() if n != name)
    others_usd = sum(c.usd for n, c in cheapest.items() if n != name)
    others_lat = sum(c.latency_s for n, c in cheapest.items() if n != name)
    t = budget.total
    units = flops = usd = lat = None
    if t.units is not None:
        units = t.units * scale * share if share is not None else (t.units * costs.unit_flops - others_flops) / cm.unit_flops
    if t.flops is not None:
        flops = t.flops * share if share is not None else t.flops - others_flops
    if t.usd is not None:
        usd = t.usd * share if share is not None else t.usd - others_usd
    if t.latency_s is not None:
        lat = t.latency_s - others_lat
    if share is not None:  # a share never goes below the stage's cheapest graph
        own = cheapest[name]
        units = None if units is None else max(units, own.units)
        flops = None if flops is None else max(flops, own.flops)
        usd = None if usd is None else max(usd, own.usd)
    cap = budget.cap(name)
    if cap is not None:
        cap_units = None if cap.units is None else cap.units * scale
        units = _min(units, cap_units)
        flops = _min(flops, cap.flops)
        usd = _min(usd, cap.usd)
        lat = _min(lat, cap.latency_s)
    return Budget(units=units, flops=flops, usd=usd, latency_s=lat)


def _min(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else min(a, b)


def validate_design(design: Design, space: Space | PipelineSpace, costs: CostModel | PipelineCostModel,
                    budget: Budget | PipelineBudget) -> GraphCost | PipelineCost:
    """The gate every proposal passes before evaluation: a GraphError/BudgetError naming the
    first problem (and the stage), else the design's cost."""
    if isinstance(space, PipelineSpace):
        if not isinstance(design, Pipeline):
            raise GraphError("this study searches multi-stage pipelines; propose a pipeline (one graph per stage "
                             f"{list(space.names)}), not a single graph")
        errs = space.errors(design)
        if errs:
            more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
            raise GraphError(errs[0] + more)
        return budget.check(design, costs)
    if isinstance(design, Pipeline):
        g = P.as_single(design)
        if g is None:
            raise GraphError("this study searches single graphs; a multi-stage pipeline needs a spec with "
                             "`pipeline.stages`")
        design = g
    from graphtune.graphs.space import validate

    return validate(design, space, costs, budget)


def random_design(space: Space | PipelineSpace, costs: CostModel | PipelineCostModel,
                  budget: Budget | PipelineBudget, rng: np.random.Generator, *, max_tries: int = 200) -> Design:
    """A random valid in-budget design: a graph, or a pipeline whose stage graphs are drawn
    one by one, each under a random share of the total (Dirichlet over the stages, a stage
    never below its cheapest graph) and its cap, redrawn until the whole fits."""
    if not isinstance(space, PipelineSpace):
        return random_graph(space, costs, budget, rng)
    n = len(space.stages)
    for _ in range(max_tries):
        shares = rng.dirichlet(np.ones(n))
        graphs = {}
        for s, share in zip(space.stages, shares):
            b = stage_budget(space, costs, budget, s.name, share=float(share))
            graphs[s.name] = random_graph(s.space, costs.of(s.name), b, rng)
        p = space.pipeline(graphs)
        if budget.fits(costs.cost(p)):
            return p
    raise BudgetError(f"could not sample a pipeline that fits the space and budget in {max_tries} tries; raise "
                      "`budget` or relax the stages' spaces")
