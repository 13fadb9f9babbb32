"""The Searcher contract and the values that pass between a searcher and the loop.

Lifecycle (driven by the batch engine, :mod:`graphtune.search.engine`)::

    searcher = SomeSearcher(ctx)            # ctx: space, costs, budget, dev ids, seed...
    searcher.load_state_dict(state)         # only when resuming a stored study
    searcher.restore(history)               # then: the trials it was already told, from the store
    while budget left:
        batch = searcher.ask()              # [] means "nothing more to propose"
        evals = [evaluate(c) for c in batch]    # the loop; cached results cost nothing
        searcher.tell(evals)                # same order as ``batch``
        store(searcher.state_dict())        # after every tell
    best = searcher.recommend(history)

Contract every searcher keeps:

* ``ask`` only proposes graphs that pass ``graphs.space.validate`` with the context's
  space and budget (the loop re-checks and records an invalid proposal as a failed
  trial, it never evaluates it).
* Given the same context and the same state, ``ask`` returns the same batch: all
  randomness comes from generators owned by the searcher and saved in ``state_dict``.
  That is what makes a killed search resume exactly.
* ``state_dict`` is plain JSON-able data (no numpy arrays, no objects).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from graphtune.graphs.cost import Budget, CostModel, GraphCost
from graphtune.graphs.model import Graph
from graphtune.graphs.results import Metrics, QuestionResult
from graphtune.errors import SpecError
from graphtune.graphs.space import Space


@dataclass(frozen=True)
class Objective:
    """Reward of one question: score - cost_weight*units - latency_weight*latency_s -
    usd_weight*usd (all weights default to 0: plain accuracy)."""

    cost_weight: float = 0.0
    latency_weight: float = 0.0
    usd_weight: float = 0.0

    def question_reward(self, r: QuestionResult, unit_flops: float) -> float:
        return (r.score - self.cost_weight * r.flops / unit_flops
                - self.latency_weight * r.latency_s - self.usd_weight * r.usd)

    @property
    def is_accuracy(self) -> bool:
        return not (self.cost_weight or self.latency_weight or self.usd_weight)


@dataclass(frozen=True)
class SearchContext:
    """Everything a searcher may know about the problem (never the test split)."""

    space: Space
    costs: CostModel
    budget: Budget
    objective: Objective
    dev_ids: tuple[str, ...]
    seed: int = 0
    batch_size: int = 8
    #: total search budget in graph-question runs, so a searcher can plan its schedule
    budget_runs: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)
    task_description: str = ""
    #: agent settings (``model``: "heuristic" or a litellm model string, ...)
    agent: Mapping[str, Any] = field(default_factory=dict)
    #: optional: evaluate a graph outside the loop's accounting is NOT offered; searchers
    #: only see results through ``tell``.

    def rng(self, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, salt])


@dataclass(frozen=True)
class Candidate:
    """A graph to evaluate, on ``question_ids`` (None: the whole dev split)."""

    graph: Graph
    question_ids: tuple[str, ...] | None = None
    #: trial numbers this candidate was derived from (lineage)
    parents: tuple[int, ...] = ()
    #: where it came from: "sample", "incumbent", "agent", "probe", "random", ...
    origin: str = "sample"
    #: free-form, JSON-able, stored with the trial
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Evaluation:
    """The loop's answer to one candidate."""

    candidate: Candidate
    trial_number: int
    graph_hash: str
    results: tuple[QuestionResult, ...]
    metrics: Metrics
    reward: float  # mean question reward over scored questions (nan if none)
    cost: GraphCost  # analytic cost of the graph
    new_runs: int  # graph-question runs actually paid for (0 when served from the store)
    error: str | None = None  # the candidate was rejected (invalid graph...)

    @property
    def ok(self) -> bool:
        return self.error is None and not math.isnan(self.reward)

    def rewards_by_question(self, objective: Objective, unit_flops: float) -> dict[str, float]:
        return {r.question_id: objective.question_reward(r, unit_flops) for r in self.results if r.ok}


@dataclass(frozen=True)
class GraphStats:
    """All dev evidence about one graph (pooled over its trials)."""

    graph: Graph
    graph_hash: str
    rewards: Mapping[str, float]  # question id -> reward (questions with an ok result)
    first_trial: int
    best_trial: int
    #: every question the graph was run on, including infrastructure failures (which are
    #: not in ``rewards``); empty when unknown (then ``rewards`` stands for it)
    asked: frozenset[str] = frozenset()

    @property
    def n(self) -> int:
        return len(self.rewards)

    @property
    def coverage(self) -> int:
        """Questions the graph was run on, failed runs included: an infrastructure
        failure costs a graph a scored question, not its place among the best covered."""
        return max(len(self.asked), self.n)

    def mean_on(self, questions: Sequence[str]) -> float:
        vals = [self.rewards[q] for q in questions]
        return sum(vals) / len(vals) if vals else float("nan")

    @property
    def mean(self) -> float:
        return sum(self.rewards.values()) / len(self.rewards) if self.rewards else float("nan")

    def ci95(self) -> tuple[float, float]:
        """95% interval of the mean reward: when every reward is 0 or 1 (plain accuracy)
        the Wilson score interval, which stays inside [0, 1] and is honest for few
        questions (4 of 6 correct: 0.300-0.903); otherwise the normal approximation.
        Unbounded for fewer than 2 questions (Wilson: 1 question suffices)."""
        n = self.n
        vals = list(self.rewards.values())
        if n and all(v in (0.0, 1.0) for v in vals):
            return wilson_interval(int(sum(vals)), n)
        if n < 2:
            return (float("-inf"), float("inf"))
        m = self.mean
        var = sum((v - m) ** 2 for v in vals) / (n - 1)
        half = 1.96 * math.sqrt(var / n)
        return (m - half, m + half)


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (95% by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (0.0 if k == 0 else max(0.0, mid - half), 1.0 if k == n else min(1.0, mid + half))


def pool_stats(evals: Sequence[Evaluation], objective: Objective, unit_flops: float) -> dict[str, GraphStats]:
    """Pool every evaluation's per-question rewards by graph hash. A graph with no scored
    question (every run of it an infrastructure failure) has no evidence and is left out:
    nothing may be recommended on zero questions."""
    acc: dict[str, dict] = {}
    for e in evals:
        if e.error is not None:
            continue
        d = acc.setdefault(e.graph_hash, {"graph": e.candidate.graph, "rewards": {}, "first": e.trial_number,
                                          "best": e.trial_number, "best_n": -1, "asked": set()})
        d["rewards"].update(e.rewards_by_question(objective, unit_flops))
        d["asked"].update(r.question_id for r in e.results)
        if len(e.results) > d["best_n"]:
            d["best"], d["best_n"] = e.trial_number, len(e.results)
    return {h: GraphStats(d["graph"], h, dict(d["rewards"]), d["first"], d["best"], frozenset(d["asked"]))
            for h, d in acc.items() if d["rewards"]}


def paired_better(a: GraphStats, b: GraphStats) -> bool:
    """Whether ``a`` has a higher mean reward than ``b`` on the questions both have an ok
    result for (infrastructure failures of either leave a question out of the pair, so a
    fault does not change what two graphs are compared on); their own means when they
    share no question."""
    shared = sorted(q for q in a.rewards if q in b.rewards)
    if shared:
        return a.mean_on(shared) > b.mean_on(shared)
    return a.mean > b.mean


def best_paired(pool: Sequence[GraphStats]) -> GraphStats | None:
    """The winner of pairwise comparisons (``paired_better``) in order of first trial: a
    later graph replaces the holder only when strictly better, so ties go to the earlier
    graph. With every graph scored on the same questions it is simply the best mean."""
    best = None
    for s in sorted(pool, key=lambda s: s.first_trial):
        if best is None or paired_better(s, best):
            best = s
    return best


def recommend_by_coverage(stats: Mapping[str, GraphStats]) -> GraphStats | None:
    """Default pick: among the graphs with the most dev evidence, the best mean reward.

    A graph seen on 5 lucky questions must not beat one measured on the whole dev set,
    so only graphs at the maximum coverage (questions run on, infrastructure failures
    included) compete, compared pairwise on the questions both have ok results for
    (``best_paired``); ties go to the earlier graph. None when no graph was scored on
    any question.
    """
    stats = {h: s for h, s in stats.items() if s.n}
    if not stats:
        return None
    top = max(s.coverage for s in stats.values())
    return best_paired([s for s in stats.values() if s.coverage == top])


class SearcherOptions(BaseModel):
    """Base of a searcher's ``search.options``: typed, finite, no unknown keys.

    Each searcher declares its options as a subclass next to its class (``Options``); the
    spec checks ``search.options`` against it when it is loaded (with the file and line of
    a bad key) and the searcher reads the parsed model, never the raw dict."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def parse_options(model: type[SearcherOptions], options: Mapping[str, Any], method: str) -> SearcherOptions:
    """``options`` as ``model``; a one-line SpecError naming the first bad key otherwise
    (for options that did not come through a spec file, e.g. the Python API)."""
    try:
        return model.model_validate(dict(options))
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(all)"
        if err["type"] == "extra_forbidden":
            raise SpecError(f"search.options.{key}: not an option of method {method!r}; "
                            f"allowed: {', '.join(model.model_fields) or 'none'}") from None
        raise SpecError(f"search.options.{key}: {err['msg']} (got {err.get('input')!r:.80})") from None


class Searcher(ABC):
    """Base of every search method. See the module docstring for the lifecycle."""

    #: the name used in specs and on the CLI
    name: str = "abstract"
    #: the searcher's ``search.options`` (subclasses declare their own)
    Options: type[SearcherOptions] = SearcherOptions
    #: True when the constructor takes the app's LLM client as ``complete=`` (a function
    #: with the signature of :func:`graphtune.llm.complete`): searchers never import it
    uses_llm: bool = False

    def __init__(self, ctx: SearchContext):
        self.ctx = ctx
        #: ``ctx.options`` parsed by ``Options`` (a SpecError for unknown keys or bad values)
        self.opts = parse_options(self.Options, ctx.options, self.name)

    @abstractmethod
    def ask(self) -> list[Candidate]:
        """The next batch of graphs to evaluate; an empty list ends the search."""

    @abstractmethod
    def tell(self, evaluations: Sequence[Evaluation]) -> None:
        """Results for the last ``ask``, in the same order."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Plain-data state from which ``load_state_dict`` resumes exactly."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state produced by ``state_dict`` (same context)."""

    def restore(self, history: Sequence[Evaluation]) -> None:
        """Called once after ``load_state_dict`` when a stored study is resumed, with every
        finished dev evaluation the searcher was already told (batches before the saved
        batch index, in trial order), rebuilt from the store. A searcher that keeps
        evidence the store holds (per-question results) rebuilds it here instead of
        saving a copy in its state. The default does nothing."""

    def recommend(self, history: Sequence[Evaluation]) -> GraphStats | None:
        """The graph to return, from all dev evaluations of the study (never simply the
        last one). Override to use confidence intervals, racing results, etc."""
        return recommend_by_coverage(pool_stats(history, self.ctx.objective, self.ctx.costs.unit_flops))

    def drain_agent_steps(self) -> list[dict[str, Any]]:
        """Agent steps (prompt, reply, parsed and applied update...) made since the last
        call, as rows for ``store.models.AgentStepRow``; the loop stores them with the
        searcher state after each batch. Candidates refer to a step by
        ``info["agent_step"] = step["key"]``."""
        return []

    def close(self) -> None:
        """Release resources (agent connections...). Idempotent."""


# -- helpers for searchers ----------------------------------------------------------


def rng_state(rng: np.random.Generator) -> dict:
    """JSON-able state of a numpy Generator (PCG64)."""
    st = rng.bit_generator.state
    return {"bit_generator": st["bit_generator"], "state": {k: int(v) for k, v in st["state"].items()},
            "has_uint32": int(st["has_uint32"]), "uinteger": int(st["uinteger"])}


def rng_from_state(state: Mapping[str, Any]) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = {"bit_generator": state["bit_generator"], "state": dict(state["state"]),
                               "has_uint32": state["has_uint32"], "uinteger": state["uinteger"]}
    return rng


ProgressCallback = Callable[[dict[str, Any]], None]
