"""``agenttts``: the search space and a plain search procedure of AgentTTS (Wang et al.,
arXiv 2508.00890), the baseline that shows what searching full graphs per stage adds.

The space: per stage only a model and a number of samples, i.e.
:func:`graphtune.graphs.families.sampling_graph` (``k`` assistants of one model into a
fuser of the same model; one call when ``k`` = 1), ``k`` on the grid ``samples`` (default
1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), keeping the graphs the stage's space allows
(nodes, width, in-degree, roles) and the pipelines the budget allows (the total and every
cap). On a single-stage study it is the same with one stage.

The procedure is agent-free coordinate search, the order AgentTTS's findings suggest
(``../shared/design/multistage.md``: stages prefer different models; returns diminish;
allocations interact). Start from every stage at one sample of the largest model that fits
(stage by stage in pipeline order, the later stages at their cheapest model), so each stage
is first judged with capable neighbours. Round 1, stage by stage in pipeline order:

1. *model*: every other model of the stage at one sample (the others fixed at the
   current pick); keep the best;
2. *samples*: grow ``k`` of the kept model along the grid, ``samples_per_step`` values at
   a time, while the step's largest count is not clearly worse than the pick (within one
   standard error of the pick's dev reward, so dev noise does not stop the growth on a
   plateau); the pick is the best count seen. Stop when the largest count is clearly worse
   or the budget allows no more.

Later rounds (only while the previous one changed something, at most ``max_rounds``)
revisit each stage with the others at their new picks: every model at the stage's
current count (or the largest count that fits), then one count below and one above,
going on upwards as in round 1, or downwards while fewer samples score higher (which frees
budget for the other stages). Picks compare the mean dev reward (ties: the
cheaper pipeline). Every candidate is evaluated on the whole dev split; a pipeline
evaluated before is never paid again (its reward is reused). The search ends when a round
changes nothing.

State: the current pick, the step being evaluated and every evaluated pipeline's reward
and cost, all plain data; ``ask`` is a pure function of it, so a resumed search asks
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from graphtune.errors import GraphtuneError, SearchError
from graphtune.graphs.cost import CostModel
from graphtune.graphs.design import PipelineSpace, design_hash
from graphtune.graphs.families import sampling_graph
from graphtune.graphs.space import Space, structural_errors
from graphtune.search.base import Candidate, Evaluation, SearchContext, Searcher, SearcherOptions

STATE_VERSION = 1
SINGLE = "graph"  # the stage name used for a single-stage study
DEFAULT_SAMPLES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

Config = dict[str, tuple[str, int]]  # stage -> (model, samples)


class AgentTTSOptions(SearcherOptions):
    samples: list[int] = Field(default_factory=lambda: list(DEFAULT_SAMPLES), min_length=1, max_length=64,
                               description="the sample counts tried per stage (each >= 1)")
    samples_per_step: int = Field(2, ge=1, le=64, description="sample counts evaluated per growing step")
    max_rounds: int = Field(3, ge=1, le=100, description="coordinate rounds over the stages at most")


class AgentTTSSearcher(Searcher):
    """Coordinate search over (model, samples) per stage (see the module docstring).
    Options: ``samples`` (the grid), ``samples_per_step`` (2), ``max_rounds`` (3)."""

    name = "agenttts"
    Options = AgentTTSOptions

    def __init__(self, ctx: SearchContext):
        super().__init__(ctx)
        if any(k < 1 for k in self.opts.samples):
            raise SearchError(f"search.options.samples: every sample count must be >= 1, got {self.opts.samples}")
        self.grid = tuple(sorted(set(int(k) for k in self.opts.samples)))
        self.is_pipeline = isinstance(ctx.space, PipelineSpace)
        spaces: list[tuple[str, Space, CostModel]] = (
            [(s.name, s.space, ctx.costs.of(s.name)) for s in ctx.space.stages] if self.is_pipeline
            else [(SINGLE, ctx.space, ctx.costs)])
        self.stages = tuple(n for n, _, _ in spaces)
        #: per stage: model -> the grid's counts whose sampling graph the stage's space allows
        self.options: dict[str, dict[str, tuple[int, ...]]] = {}
        for name, space, costs in spaces:
            models = sorted(space.models, key=lambda m: (costs.node_units(m, 0), m))
            opts = {m: tuple(k for k in self.grid if not structural_errors(sampling_graph(m, k), space))
                    for m in models}
            opts = {m: ks for m, ks in opts.items() if ks}
            if not opts:
                where = f"stage {name!r}" if self.is_pipeline else "the space"
                raise SearchError(f"agenttts: {where} allows no (model, samples) graph (assistants into a fuser of "
                                  "one model, or one assistant); allow the roles assistant and fuser there, or use "
                                  "another method")
            self.options[name] = opts
        start = {n: (next(iter(self.options[n])), min(self.options[n][next(iter(self.options[n]))]))
                 for n in self.stages}
        if not self._fits(start):
            raise SearchError("agenttts: even every stage's cheapest model at its fewest samples is over the budget; "
                              "raise `budget` or allow cheaper models")
        # the starting pick: stage by stage, the largest model at one sample that still fits
        # with the later stages at their cheapest (a stage is judged with strong neighbours)
        for n in self.stages:
            for m in reversed(list(self.options[n])):
                c = {**start, n: (m, min(self.options[n][m]))}
                if self._fits(c):
                    start = c
                    break
        self.ref: Config = start
        self.round = 1
        self.stage_i = 0
        self.phase = "init"
        self.direction = "up"
        self.cursor = 1  # the count a samples step moves away from
        self.queue: list[Config] = [dict(start)]
        self.step: list[Config] = [dict(start)]
        self.changed = False
        self.done = False
        self.known: dict[str, tuple[float, float]] = {}  # design hash -> (reward, units)
        self._pending: list[tuple[str, Config]] = []

    # -- designs ---------------------------------------------------------------------
    def design(self, cfg: Config):
        graphs = {n: sampling_graph(*cfg[n]) for n in self.stages}
        return self.ctx.space.pipeline(graphs) if self.is_pipeline else graphs[SINGLE]

    def _fits(self, cfg: Config) -> bool:
        d = self.design(cfg)
        return self.ctx.budget.fits(self.ctx.costs.cost(d))

    def _hash(self, cfg: Config) -> str:
        return design_hash(self.design(cfg))

    def _with(self, stage: str, model: str, k: int) -> Config:
        return {**self.ref, stage: (model, k)}

    # -- Searcher API ----------------------------------------------------------------
    def ask(self) -> list[Candidate]:
        self._pending = []
        while not self.done:
            unknown = [c for c in self.queue if self._hash(c) not in self.known]
            if unknown:
                batch, self.queue = unknown[:self.ctx.batch_size], unknown[self.ctx.batch_size:]
                out = []
                for c in batch:
                    h = self._hash(c)
                    self._pending.append((h, c))
                    out.append(Candidate(graph=self.design(c), origin="agenttts",
                                         info={"phase": self.phase, "round": self.round,
                                               "stage": self.stages[self.stage_i] if self.phase != "init" else None,
                                               "config": {n: list(v) for n, v in c.items()}}))
                return out
            self.queue = []
            self._conclude()
        return []

    def tell(self, evaluations: Sequence[Evaluation]) -> None:
        for (h, _), ev in zip(self._pending, evaluations):
            reward = float(ev.reward) if ev.ok else -math.inf
            self.known[h] = (reward, float(ev.cost.units) if ev.error is None else math.inf)
        self._pending = []

    # -- the procedure ---------------------------------------------------------------
    def _score(self, cfg: Config) -> tuple[float, float]:
        r, u = self.known.get(self._hash(cfg), (-math.inf, math.inf))
        return (r, -u)

    def _conclude(self) -> None:
        """The step's results are in: update the pick and plan the next step."""
        if self.phase == "init":
            self._start_stage(0)
            return
        stage = self.stages[self.stage_i]
        before = self._score(self.ref)
        best = max([self.ref, *self.step], key=self._score)  # max keeps the first on ties: the pick stays
        if self._score(best) > before:
            self.ref, self.changed = dict(best), True
        if self.phase == "model":
            k = self.ref[stage][1]
            self._samples_step(stage, "up" if self.round == 1 else "both", k)
            return
        # samples: go on past the step's extreme value while it is not clearly worse than the
        # pick was (within one standard error of its reward: dev noise must not stop the growth)
        margin = self._noise(before[0])
        k0 = self.cursor
        ups = [c for c in self.step if c[stage][1] > k0]
        downs = [c for c in self.step if c[stage][1] < k0]
        if self.direction in ("up", "both") and ups:
            top = max(ups, key=lambda c: c[stage][1])
            if self._score(top)[0] >= before[0] - margin:
                self._samples_step(stage, "up", top[stage][1])
                return
        if self.direction in ("down", "both") and downs:
            low = min(downs, key=lambda c: c[stage][1])
            if self._score(low)[0] > before[0]:
                self._samples_step(stage, "down", low[stage][1])
                return
        self._next_stage()

    def _noise(self, reward: float) -> float:
        """One standard error of a mean 0/1 reward over the dev split (0 outside [0, 1])."""
        if not 0.0 <= reward <= 1.0 or not self.ctx.dev_ids:
            return 0.0
        return math.sqrt(reward * (1.0 - reward) / len(self.ctx.dev_ids))

    def _start_stage(self, i: int) -> None:
        self.stage_i = i
        stage = self.stages[i]
        model, k = self.ref[stage]
        step = []
        for m, ks in self.options[stage].items():
            if m == model:
                continue
            want = 1 if self.round == 1 else k
            fit = [kk for kk in ks if kk <= want and self._fits(self._with(stage, m, kk))]
            if fit:
                step.append(self._with(stage, m, max(fit)))
        self.phase = "model"
        self.step, self.queue = step, list(step)

    def _samples_step(self, stage: str, direction: str, k: int) -> None:
        """Counts of the pick's model next to ``k`` (the cursor) in ``direction``."""
        model = self.ref[stage][0]
        ks = self.options[stage][model]
        up = [kk for kk in ks if kk > k]
        down = [kk for kk in ks if kk < k][::-1]
        n = self.opts.samples_per_step
        step: list[Config] = []
        if direction in ("up", "both"):
            for kk in up[:n if direction == "up" else 1]:
                c = self._with(stage, model, kk)
                if not self._fits(c):
                    break
                step.append(c)
        if direction in ("down", "both"):
            step += [self._with(stage, model, kk) for kk in down[:n if direction == "down" else 1]]
        self.phase, self.direction, self.cursor = "samples", direction, k
        if not step:
            self._next_stage()
            return
        self.step, self.queue = step, list(step)

    def _next_stage(self) -> None:
        if self.stage_i + 1 < len(self.stages):
            self._start_stage(self.stage_i + 1)
            return
        if self.changed and self.round < self.opts.max_rounds:
            self.round, self.changed = self.round + 1, False
            self._start_stage(0)
            return
        self.done, self.step, self.queue = True, [], []

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        def cfg(c: Config) -> dict[str, list]:
            return {n: [m, int(k)] for n, (m, k) in c.items()}

        return {"version": STATE_VERSION, "ref": cfg(self.ref), "round": self.round, "stage_i": self.stage_i,
                "phase": self.phase, "direction": self.direction, "cursor": self.cursor, "queue": [cfg(c) for c in self.queue],
                "step": [cfg(c) for c in self.step], "changed": self.changed, "done": self.done,
                "known": {h: [r if math.isfinite(r) else None, u if math.isfinite(u) else None]
                          for h, (r, u) in self.known.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise GraphtuneError(f"stored agenttts state has version {state.get('version')}, expected "
                                 f"{STATE_VERSION}; start a new study")

        def cfg(d: Mapping[str, Any]) -> Config:
            return {n: (str(v[0]), int(v[1])) for n, v in d.items()}

        self.ref = cfg(state["ref"])
        self.round, self.stage_i = int(state["round"]), int(state["stage_i"])
        self.phase, self.direction = str(state["phase"]), str(state["direction"])
        self.cursor = int(state["cursor"])
        self.queue = [cfg(c) for c in state["queue"]]
        self.step = [cfg(c) for c in state["step"]]
        self.changed, self.done = bool(state["changed"]), bool(state["done"])
        self.known = {h: (-math.inf if r is None else float(r), math.inf if u is None else float(u))
                      for h, (r, u) in state["known"].items()}
        self._pending = []


__all__ = ["AgentTTSSearcher", "DEFAULT_SAMPLES"]
