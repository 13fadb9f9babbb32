"""Costing a graph before anything is spent: FLOPs, budget units, dollars and latency.

FLOPs per node (model with M non-embedding parameters, L layers, hidden size D; KV cache
reused while decoding), for a task with average input A and output B tokens:

    Np = A + d_in * B,  Nd = B
    prefill = 2*M*Np + 2*L*D*Np*(Np+1)
    decode  = 2*M*Nd + 2*L*D*Nd*(2*Np + Nd + 1)

One budget unit is one call of the pool's cheapest model with d_in = 0. Latency of a node
is Np / prefill_tok_s + Nd / decode_tok_s; a graph's latency is its critical path (nodes
of one level run in parallel). These analytic figures decide feasibility; live runs
report measured tokens as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from graphtune.errors import BudgetError, GraphError
from graphtune.graphs.model import Graph


@dataclass(frozen=True)
class ModelInfo:
    """A model of the pool as costing sees it."""

    name: str
    params: float  # M, non-embedding parameters
    layers: int  # L
    hidden: int  # D
    usd_per_mtok_in: float = 0.0
    usd_per_mtok_out: float = 0.0
    prefill_tok_s: float = 5000.0
    decode_tok_s: float = 100.0


@dataclass(frozen=True)
class TaskShape:
    """Average prompt (A) and completion (B) length of a task, in tokens."""

    input_tokens: float
    output_tokens: float


@dataclass(frozen=True)
class GraphCost:
    flops: float
    units: float
    usd: float
    latency_s: float
    prompt_tokens: float
    completion_tokens: float

    def as_dict(self) -> dict[str, float]:
        return {"flops": self.flops, "units": self.units, "usd": self.usd,
                "latency_s": self.latency_s, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens}


def node_flops(m: ModelInfo, prompt_tokens: float, completion_tokens: float) -> float:
    """FLOPs of one call with the given token counts (the design-note formula)."""
    np_, nd = float(prompt_tokens), float(completion_tokens)
    prefill = 2 * m.params * np_ + 2 * m.layers * m.hidden * np_ * (np_ + 1)
    decode = 2 * m.params * nd + 2 * m.layers * m.hidden * nd * (2 * np_ + nd + 1)
    return prefill + decode


def node_usd(m: ModelInfo, prompt_tokens: float, completion_tokens: float) -> float:
    return (prompt_tokens * m.usd_per_mtok_in + completion_tokens * m.usd_per_mtok_out) / 1e6


def node_latency_s(m: ModelInfo, prompt_tokens: float, completion_tokens: float) -> float:
    return prompt_tokens / m.prefill_tok_s + completion_tokens / m.decode_tok_s


class CostModel:
    """Analytic costs of graphs over one model pool and one task shape."""

    def __init__(self, pool: Mapping[str, ModelInfo], shape: TaskShape):
        if not pool:
            raise GraphError("model pool is empty; list at least one model under `models`")
        self.pool = dict(pool)
        self.shape = shape
        self.unit_flops = min(node_flops(m, shape.input_tokens, shape.output_tokens) for m in self.pool.values())

    def model(self, name: str) -> ModelInfo:
        try:
            return self.pool[name]
        except KeyError:
            raise GraphError(f"model {name!r} is not in the pool; known models: {sorted(self.pool)}") from None

    def node_tokens(self, in_degree: int) -> tuple[float, float]:
        return (self.shape.input_tokens + in_degree * self.shape.output_tokens, self.shape.output_tokens)

    def node_units(self, model: str, in_degree: int) -> float:
        return node_flops(self.model(model), *self.node_tokens(in_degree)) / self.unit_flops

    def cost(self, graph: Graph) -> GraphCost:
        flops = usd = pt = ct = 0.0
        finish: dict[str, float] = {}
        for nid in graph.topo_order:
            n = graph.node_map[nid]
            m = self.model(n.model)
            p, c = self.node_tokens(graph.in_degree(nid))
            flops += node_flops(m, p, c)
            usd += node_usd(m, p, c)
            pt += p
            ct += c
            start = max((finish[q] for q in graph.preds[nid]), default=0.0)
            finish[nid] = start + node_latency_s(m, p, c)
        return GraphCost(flops=flops, units=flops / self.unit_flops, usd=usd,
                         latency_s=max(finish.values()), prompt_tokens=pt, completion_tokens=ct)


@dataclass(frozen=True)
class Budget:
    """Per-query limits; any of them may be None (unbounded)."""

    units: float | None = None
    flops: float | None = None
    usd: float | None = None
    latency_s: float | None = None

    def violations(self, c: GraphCost) -> list[str]:
        out = []
        tol = 1e-9
        if self.units is not None and c.units > self.units * (1 + tol):
            out.append(f"{c.units:.2f} units > {self.units:g}")
        if self.flops is not None and c.flops > self.flops * (1 + tol):
            out.append(f"{c.flops:.3g} FLOPs > {self.flops:.3g}")
        if self.usd is not None and c.usd > self.usd * (1 + tol):
            out.append(f"${c.usd:.6f} > ${self.usd:g} per query")
        if self.latency_s is not None and c.latency_s > self.latency_s * (1 + tol):
            out.append(f"{c.latency_s:.2f} s > {self.latency_s:g} s latency")
        return out

    def fits(self, c: GraphCost) -> bool:
        return not self.violations(c)

    def check(self, graph: Graph, costs: CostModel) -> GraphCost:
        c = costs.cost(graph)
        v = self.violations(c)
        if v:
            raise BudgetError(f"graph is over budget ({'; '.join(v)}); use fewer or smaller nodes, or raise `budget`")
        return c


# -- pipelines -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineCost:
    """The cost of a pipeline: ``total`` adds FLOPs, units, dollars and tokens over every
    call of every stage; its latency is the critical path through the stages (a stage
    starts when all its input stages have ended). ``stages`` holds each stage's own cost
    (its latency is the stage's own duration), in pipeline order, in the pipeline's units."""

    total: GraphCost
    stages: tuple[tuple[str, GraphCost], ...]

    def stage(self, name: str) -> GraphCost:
        for n, c in self.stages:
            if n == name:
                return c
        raise GraphError(f"pipeline cost has no stage {name!r}; its stages: {[n for n, _ in self.stages]}")

    def as_dict(self) -> dict:
        return {**self.total.as_dict(), "stages": {n: c.as_dict() for n, c in self.stages}}


class PipelineCostModel:
    """Analytic costs of pipelines: one :class:`CostModel` per stage (its own pool and task
    shape, the shape's prompt including what its inputs feed it), or one for all stages.

    One pipeline budget unit is the cheapest unit of the stages (one call of the cheapest
    model, with no predecessor, on the stage with the shortest prompt), so units add up
    over stages like FLOPs do.
    """

    def __init__(self, costs: CostModel | Mapping[str, CostModel]):
        self._one = costs if isinstance(costs, CostModel) else None
        self._by_stage = {} if self._one is not None else dict(costs)
        if self._one is None and not self._by_stage:
            raise GraphError("pipeline cost model has no stages; give a CostModel per stage name")
        models = [self._one] if self._one is not None else list(self._by_stage.values())
        self.unit_flops = min(c.unit_flops for c in models)

    def of(self, stage: str) -> CostModel:
        """The cost model of ``stage``."""
        if self._one is not None:
            return self._one
        try:
            return self._by_stage[stage]
        except KeyError:
            raise GraphError(f"stage {stage!r} has no cost model; stages with one: {sorted(self._by_stage)}") from None

    def cost(self, pipeline) -> PipelineCost:
        """Cost of ``pipeline`` (a :class:`graphtune.graphs.pipeline.Pipeline`)."""
        per: list[tuple[str, GraphCost]] = []
        finish: dict[str, float] = {}
        for s in pipeline.stages:
            c = self.of(s.name).cost(s.graph)
            c = GraphCost(flops=c.flops, units=c.flops / self.unit_flops, usd=c.usd, latency_s=c.latency_s,
                          prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens)
            start = max((finish[i] for i in s.inputs if i in finish), default=0.0)
            finish[s.name] = start + c.latency_s
            per.append((s.name, c))
        total = GraphCost(flops=sum(c.flops for _, c in per), units=sum(c.units for _, c in per),
                          usd=sum(c.usd for _, c in per), latency_s=max(finish.values()),
                          prompt_tokens=sum(c.prompt_tokens for _, c in per),
                          completion_tokens=sum(c.completion_tokens for _, c in per))
        return PipelineCost(total=total, stages=tuple(per))


@dataclass(frozen=True)
class PipelineBudget:
    """A pipeline-wide :class:`Budget` on the total, plus optional caps per stage (name ->
    Budget; a stage not named, or named with None, has no cap of its own)."""

    total: Budget = Budget()
    stages: tuple[tuple[str, Budget | None], ...] = ()

    @staticmethod
    def make(total: Budget | None = None, stages: Mapping[str, Budget | None] | None = None) -> PipelineBudget:
        return PipelineBudget(total=total or Budget(), stages=tuple((stages or {}).items()))

    def cap(self, stage: str) -> Budget | None:
        return dict(self.stages).get(stage)

    def violations(self, c: PipelineCost) -> list[str]:
        """What breaks, one phrase each: the total's first, then each capped stage's."""
        out = [f"pipeline total: {v}" for v in self.total.violations(c.total)]
        for name, cap in self.stages:
            if cap is not None:
                out += [f"stage {name!r}: {v}" for v in cap.violations(c.stage(name))]
        return out

    def fits(self, c: PipelineCost) -> bool:
        return not self.violations(c)

    def check(self, pipeline, costs: PipelineCostModel) -> PipelineCost:
        """The pipeline's cost, or a one-line BudgetError naming what breaks (the total or the
        stage over its cap). A cap naming no stage of the pipeline is a GraphError."""
        names = {s.name for s in pipeline.stages}
        for name, _ in self.stages:
            if name not in names:
                raise GraphError(f"budget caps stage {name!r}, which the pipeline does not have; "
                                 f"its stages: {[s.name for s in pipeline.stages]}")
        c = costs.cost(pipeline)
        v = self.violations(c)
        if v:
            stage = next((n for n, cap in self.stages if cap is not None and cap.violations(c.stage(n))), None)
            fix = (f"use fewer or smaller nodes in stage {stage!r}, or raise its cap" if stage and
                   not self.total.violations(c.total) else "use fewer or smaller nodes, or raise `budget`")
            raise BudgetError(f"pipeline is over budget ({'; '.join(v)}); {fix}")
        return c
