"""``reinforce``: a policy-gradient search over a probabilistic graph (numeric only).

:class:`ReinforceSearcher` holds two parts, as ``agent-reinforce`` does (it adds a third,
the critic):

* :class:`~graphtune.search.racing.Racing`: the evidence per graph on one fixed order of
  the dev questions, prefix levels and ASHA promotions, the final race, the incumbent
  (the evaluation protocol is described there);
* :class:`~graphtune.search.policy.PolicyUpdate`: a
  :class:`~graphtune.search.probgraph.ProbabilisticGraph` that proposes graphs, the
  variance-reduced REINFORCE step with Adam and the entropy floor (GPTSwarm-style
  edge/role/model policy gradient).

One batch (``ask``): the pending promotions, then ``samples`` new graphs drawn from the
distribution, on the level-0 prefix. In the last ``final_race_frac`` of the budget, or as
soon as the distribution has no new graph to give (a small space, used up), no new graphs
are drawn: the best graphs by paired effect race to the full dev set.

``tell``: the samples of a batch share the level-0 questions, so their rewards are
directly comparable: leave-one-out baseline, normalised advantages, the gradient of the
marginal log-probability of each evaluated graph averaged and applied with Adam, then
the entropy floor.

``recommend``: among graphs measured on the most questions (at least half of the top
coverage), the best mean on the questions they share with the leader, with a 95% CI.

On a multi-stage study (``ctx.space`` a PipelineSpace) the policy part is a
:class:`~graphtune.search.pipeline_policy.PipelinePolicy`: a probabilistic graph per stage
and a learned split of the pipeline budget between the stages, updated by the same signal.

Saved state: the policy (logits, Adam moments, generator) and the counters; the evidence
is rebuilt from the store's trials by ``restore`` (see :mod:`graphtune.search.racing`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, field_validator

from graphtune.errors import SpecError
from graphtune.graphs.canonical import graph_hash
from graphtune.search.base import Candidate, Evaluation, GraphStats, SearchContext, Searcher, SearcherOptions
from graphtune.search.pipeline_policy import PipelinePolicy, is_pipeline_study
from graphtune.search.policy import PolicyUpdate
from graphtune.search.probgraph import ProbabilisticGraph
from graphtune.agent.report import ProblemInfo
from graphtune.search.racing import ParetoScalarisation, Racing, recommend_paired, recommend_shrunk


#: scalarisation weights cycled through in Pareto mode (reward lost per budget-sized cost)
DEFAULT_PARETO_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)
#: accepted names of the cost metric of ``search.options.pareto`` -> GraphCost field
PARETO_METRICS = {"units": "units", "cost_units": "units", "flops": "flops", "usd": "usd", "cost_usd": "usd",
                  "latency_s": "latency_s"}


def pareto_metric(value: Any) -> str | None:
    """The GraphCost field of ``search.options.pareto`` (a metric name or a one-element
    list), None when unset; a one-line SpecError otherwise."""
    if value is None or value is False or value == []:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise SpecError(f"search.options.pareto: give one cost metric (got {list(value)}); "
                            f"known: {', '.join(sorted(PARETO_METRICS))}")
        value = value[0]
    try:
        return PARETO_METRICS[str(value).strip().lower()]
    except KeyError:
        raise SpecError(f"search.options.pareto: unknown cost metric {value!r}; "
                        f"known: {', '.join(sorted(PARETO_METRICS))}") from None


class PolicyOptions(SearcherOptions):
    """``search.options`` of ``reinforce`` (see :class:`ReinforceSearcher` for what each does)."""

    n0: int | None = Field(None, ge=1, le=1_000_000, description="questions of the first level (default dev/8, 10..40)")
    eta: float = Field(3.0, ge=1.5, le=100, description="level growth factor and successive-halving ratio")
    samples: int | None = Field(None, ge=1, le=4096, description="graphs drawn per batch")
    lr: float = Field(0.3, gt=0, le=100, description="Adam step size on the logits")
    max_step: float = Field(1.0, gt=0, le=100, description="largest step per logit")
    entropy_floor: float = Field(0.35, ge=0, le=1, description="minimum entropy, a fraction of the maximum")
    edge_init: float = Field(-1.0, ge=-100, le=100, description="initial edge logit")
    race_top: int = Field(3, ge=1, le=1000, description="graphs raced at the end")
    final_race_frac: float = Field(0.15, ge=0, lt=1, description="share of the budget kept for the final race")
    pick: Literal["paired", "surrogate"] | None = Field(
        None, description="how the result is chosen: 'paired' (best paired mean) or 'surrogate' (paired effects "
                          "shrunk towards a feature surrogate's leave-one-out prediction); default: paired for "
                          "reinforce, surrogate for agent-reinforce")
    pareto: str | list[str] | bool | None = Field(None, description="a cost metric: search the accuracy-vs-cost front")
    pareto_weights: list[float] = Field(list(DEFAULT_PARETO_WEIGHTS), min_length=1, max_length=1000)

    @field_validator("pareto")
    @classmethod
    def _metric(cls, v: Any) -> str | None:
        try:
            return pareto_metric(v)
        except SpecError as e:
            raise ValueError(str(e).removeprefix("search.options.pareto: ")) from None

    @field_validator("pareto_weights")
    @classmethod
    def _weights(cls, v: list[float]) -> list[float]:
        if min(v) < 0:
            raise ValueError("pareto weights must be >= 0")
        return v


def policy_batch(racing: Racing, policy: PolicyUpdate, n_samples: int, batch: int,
                 extra=None) -> tuple[list[Candidate], tuple[str, ...]]:
    """The next batch of a policy searcher and its minibatch of questions: the final race
    once it is due; otherwise the ASHA promotions, ``extra(minibatch, taken)`` (the agent's
    proposals) and ``n_samples`` graphs drawn from the policy, no graph twice.

    When the policy finds no new graph to draw (a small space, used up), the racing part is
    marked exhausted and the final race starts at once: the batch's promotions and new
    proposals, then the contenders one level up (:meth:`Racing.catch_up_race`: the lowest
    level first, best first within it, up to ``max(race_top, n_samples)`` a batch); from
    then on every batch races, until each contender is on the full dev set or the budget
    is spent, so the pick rests on the full dev set rather than on the first levels' few
    questions."""
    wide = max(racing.race_top, n_samples)
    if racing.final_phase():
        race = racing.catch_up_race(batch, top=wide) if racing.exhausted else racing.final_race(batch)
        if race:
            return race, ()
    cands = racing.promotions(batch)
    taken = {graph_hash(c.graph) for c in cands}
    mb = racing.questions(0)
    if extra is not None:
        cands += extra(mb, taken)
    drawn = policy.sample(n_samples, mb, taken, racing)
    if n_samples and not drawn and not racing.exhausted:
        racing.exhausted = True
        cands += racing.catch_up_race(batch, top=wide, exclude=taken)
    return cands + drawn, mb


def policy_recommend(history: Sequence[Evaluation], ctx: SearchContext, o: PolicyOptions,
                     problem: ProblemInfo | None, *, default: str) -> GraphStats | None:
    """The result of a policy searcher: ``o.pick`` (else ``default``) on a single-stage
    study without ``pareto``; the paired pick otherwise (a pipeline's stages or a Pareto
    front have no single surrogate to shrink towards; an explicit ``pick: surrogate`` there
    is refused when the searcher is built, :func:`check_pick`)."""
    pick = o.pick or default
    if pick == "surrogate" and problem is not None and not o.pareto and not is_pipeline_study(ctx):
        return recommend_shrunk(history, ctx.objective, ctx.costs.unit_flops, problem)
    return recommend_paired(history, ctx.objective, ctx.costs.unit_flops)


def check_pick(ctx: SearchContext, o: PolicyOptions) -> None:
    """A one-line SpecError for ``pick: surrogate`` where it cannot apply."""
    if o.pick == "surrogate" and is_pipeline_study(ctx):
        raise SpecError("search.options.pick: surrogate is for single-stage studies; a pipeline is picked by its "
                        "paired mean (remove the option or set it to paired)")
    if o.pick == "surrogate" and o.pareto:
        raise SpecError("search.options.pick: surrogate picks one graph; with pareto the result is a front "
                        "(remove one of the two options)")


def policy_parts(ctx: SearchContext, o: PolicyOptions) -> tuple[Racing, PolicyUpdate | PipelinePolicy]:
    """The racing and policy-update parts both policy searchers hold, from their options."""
    # a multi-stage study's budget is a PipelineBudget: the Pareto scale is its total
    budget = ctx.budget.total if is_pipeline_study(ctx) else ctx.budget
    pareto = ParetoScalarisation.of(o.pareto, o.pareto_weights, budget) if o.pareto else None
    check_pick(ctx, o)
    racing = Racing.of(ctx, n0=o.n0, eta=o.eta, race_top=o.race_top, final_race_frac=o.final_race_frac,
                       pareto=pareto)
    # a multi-stage study: one distribution per stage and a budget split (search/pipeline_policy.py)
    kind = PipelinePolicy if is_pipeline_study(ctx) else PolicyUpdate
    policy = kind(ctx, lr=o.lr, max_step=o.max_step, entropy_floor=o.entropy_floor, edge_init=o.edge_init)
    return racing, policy


class ReinforceSearcher(Searcher):
    """``reinforce``: the numeric policy gradient with racing (no agent, no probes; see the
    module docstring). Options (``search.options``, :class:`PolicyOptions`):

    - ``n0`` (default: dev/8 clamped to 10..40): questions of the first level;
    - ``eta`` (3): level growth factor and successive-halving ratio;
    - ``samples`` (default ``search.batch_size``): graphs drawn per batch;
    - ``lr`` (0.3): Adam step size on the logits; ``max_step`` (1.0) per coordinate;
    - ``entropy_floor`` (0.35): minimum entropy as a fraction of the maximum;
    - ``edge_init`` (-1.0): initial edge logit (sparse graphs first);
    - ``race_top`` (3): graphs raced at the end; ``final_race_frac`` (0.15): share of
      the budget kept for that final race;
    - ``pareto`` (off): a cost metric (``units``, ``flops``, ``usd``/``cost_usd`` or
      ``latency_s``) to search the accuracy-vs-cost front instead of the best reward.
      Each batch uses one scalarisation ``reward - w * cost / scale`` (``w`` cycles
      through ``pareto_weights``, default ``[0, 0.25, 0.5, 1, 2]``; ``scale`` is the
      budget's limit on that metric, else the largest cost seen) for the policy
      gradient and the ASHA promotions, so cheap graphs earn questions too, and the
      final race extends the current front instead of the leader's rivals. Stored
      rewards, the recommended graph and everything without the option are unchanged;
    - ``pick`` (``paired``): how the result is chosen; ``surrogate`` shrinks each
      candidate's paired effect towards a feature surrogate's leave-one-out prediction
      (:func:`~graphtune.search.racing.recommend_shrunk`; agent-reinforce's default).
    """

    name = "reinforce"
    Options = PolicyOptions

    def __init__(self, ctx: SearchContext):
        super().__init__(ctx)
        self.racing, self.policy = policy_parts(ctx, self.opts)
        self.n_samples = self.opts.samples if self.opts.samples is not None else ctx.batch_size
        self.batches_told = 0
        self._minibatch: tuple[str, ...] = ()

    @property
    def pg(self) -> ProbabilisticGraph:
        """The distribution over graphs (the policy part's; a multi-stage study has one per
        stage instead: ``policy.pgs``)."""
        return self.policy.pg

    def ask(self) -> list[Candidate]:
        cands, self._minibatch = policy_batch(self.racing, self.policy, self.n_samples, self.batches_told)
        return cands

    def tell(self, evaluations: Sequence[Evaluation]) -> None:
        self.racing.record(evaluations)
        if self._minibatch:
            self.policy.step(evaluations, self.racing.minibatch_reward(self._minibatch, self.batches_told))
        self.policy.enforce_entropy_floor()
        self.batches_told += 1

    def recommend(self, history: Sequence[Evaluation]) -> GraphStats | None:
        """``pick: paired`` (the default here): among well-evaluated graphs (at least half
        the top coverage), the best mean on the questions they share with the best-covered
        leader (:func:`~graphtune.search.racing.recommend_paired`); ``pick: surrogate``:
        :func:`~graphtune.search.racing.recommend_shrunk`."""
        problem = None
        if self.opts.pick == "surrogate":  # the surrogate's features need the problem
            c = self.ctx
            problem = ProblemInfo(task_description=c.task_description, space=c.space, costs=c.costs,
                                  budget=c.budget)
        return policy_recommend(history, self.ctx, self.opts, problem, default="paired")

    def state_dict(self) -> dict[str, Any]:
        return {**self.policy.state_dict(), **self.racing.state_dict(), "batches_told": self.batches_told}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """A state of ``state_dict``, or of the previous version (with ``evidence``, ``phase``
        and ``earlier``: the evidence is rebuilt by ``restore`` instead)."""
        self.policy.load_state_dict(state)
        self.racing.load_state_dict(state)
        self.batches_told = int(state["batches_told"])

    def restore(self, history: Sequence[Evaluation]) -> None:
        self.racing.restore(history)
