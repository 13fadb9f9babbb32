"""``agent-reinforce``: REINFORCE on a probabilistic graph plus an agent's structured
feedback (the paper's method, with a real distribution, paired evaluation, racing, and
the agent's own cost on record).

Flow (see ``docs``/the design note "Agent-REINFORCE as graphtune implements it"):

* batch 0, *probes*: every affordable model alone on the first minibatch. The agent
  reads the task, pool, budget, the general test-time-scaling insights and the probe
  results, and answers with initial preferences and first graphs to try.
* every later batch: racing of the best graphs, the incumbent on the new minibatch, the
  agent's validated proposals from its last step, and samples from the distribution,
  all on the same minibatch (paired). Then the numeric REINFORCE step, then the agent's
  feedback on a compact report, applied as ``lr_agent * confidence * deltas`` (clipped),
  then the entropy floor.

The searcher holds three parts and says in ``ask`` / ``tell`` when each acts:
:class:`~graphtune.search.racing.Racing` (evidence, promotions, the final race),
:class:`~graphtune.search.policy.PolicyUpdate` (the distribution and its numeric step)
and :class:`~graphtune.search.critic.AgentCritic` (the agent's steps and proposals).

Every agent step (prompt, reply, parsed update, what was applied or rejected and why,
calls, tokens, dollars, seconds) is returned by :meth:`drain_agent_steps` and stored;
trials of agent proposals carry ``info["agent_step"]`` and, as ``parents``, the trial the
proposal names in its ``parent`` field (when it is a trial of a measured graph).

Each step's memory (the agent's earlier hypotheses next to what was measured since), a
proposal's ``parent`` and the per-batch attribution of the logit changes (gradient, agent,
entropy floor) are described in :mod:`graphtune.search.critic` and ``docs/agent.md``.

On a multi-stage study (``ctx.space`` a PipelineSpace) the policy is a
:class:`~graphtune.search.pipeline_policy.PipelinePolicy` (a distribution per stage and a
learned budget split), the critic a :class:`~graphtune.search.pipeline_critic.PipelineCritic`
(per-stage reports and updates) and the probes one pipeline per model; the memory, the
``parent`` field and the attribution are those of single-stage studies only.

Saved state: the policy, the counters and phase, and the critic's queued proposals, usage,
last rounds' summaries and remembered hypotheses; the evidence is rebuilt from the store's
trials by ``restore``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from pydantic import Field

from graphtune.agent import make_agent
from graphtune.agent.pipeline import PipelineProblemInfo
from graphtune.agent.proposals import proposal_to_graph
from graphtune.agent.report import ProblemInfo
from graphtune.agent.schema import GraphProposal
from graphtune.errors import SpecError
from graphtune.graphs.model import Graph
from graphtune.search.base import Candidate, Evaluation, GraphStats, SearchContext, Searcher
from graphtune.search.critic import AgentCritic, probe_candidates
from graphtune.search.pipeline_critic import PipelineCritic, pipeline_probe_candidates
from graphtune.search.pipeline_policy import is_pipeline_study
from graphtune.search.probgraph import ProbabilisticGraph
from graphtune.search.reinforce import PolicyOptions, policy_batch, policy_parts, policy_recommend


class AgentReinforceOptions(PolicyOptions):
    lr_agent: float = Field(1.0, ge=0, le=100, description="scale of the agent's deltas (times its confidence)")
    max_agent_delta: float = Field(2.0, gt=0, le=100, description="clip of one agent delta on a logit")
    proposals: int = Field(3, ge=0, le=1024, description="graphs the agent may propose per batch")
    memory_tokens: int = Field(1000, ge=0, le=100_000,
                               description="token bound (chars/4) of the agent's memory of its earlier rounds; "
                                           "0: no memory")
    insight_init: bool = Field(True, description="probe every model and let the agent set the initial "
                                                 "distribution from the insights; false: start uniform")
    roles: Literal["space", "assistant-only"] = Field("space", description="roles the search uses: the space's, "
                                                                          "or only 'assistant'")


class AgentReinforceSearcher(Searcher):
    """REINFORCE + agent feedback. The agent is ``ctx.agent["model"]``: ``heuristic``
    (default; an offline statistical critic, not an LLM) or a litellm model string.

    Options (``search.options``, :class:`AgentReinforceOptions`), besides those of
    :class:`~graphtune.search.reinforce.ReinforceSearcher` (``n0``, ``eta``, ``samples``,
    ``lr``, ``max_step``, ``entropy_floor``, ``edge_init``, ``race_top``,
    ``final_race_frac``, ``pareto``, ``pareto_weights``, ``pick``; ``pick`` defaults to
    ``surrogate`` here: the critic's surrogate refines the paired pick, docs/agent.md):

    - ``lr_agent`` (1.0): scale of the agent's deltas (times its confidence);
    - ``max_agent_delta`` (2.0): clip of one agent delta on a logit;
    - ``proposals`` (3): graphs the agent may propose per batch (validated, evaluated
      on the next minibatch);
    - ``samples`` defaults to ``search.batch_size - proposals`` (at least 2) here;
    - ``pareto`` / ``pareto_weights``: search the accuracy-vs-cost front (see
      :class:`~graphtune.search.reinforce.ReinforceSearcher`); the agent is told so;
    - ``memory_tokens`` (1000): token bound (characters / 4) of the agent's memory of its
      earlier rounds (its hypotheses next to what was measured since; see
      :mod:`graphtune.agent.memory`), oldest rounds dropped first; 0 = no memory (the
      paper's "agent without memory" ablation);
    - ``insight_init`` (true): batch 0 probes every affordable model and the agent's
      initial step sets the distribution from the task, the pool, the insights and the
      probes; false: no probes and no initial step, the distribution starts uniform
      (the paper's "no insight-based initialisation" ablation);
    - ``roles`` (``space``): ``assistant-only`` searches only graphs whose nodes are all
      ``assistant`` (the paper's "assistant-only roles" ablation): the distribution, the
      probes, the agent's report and the check of its proposals use the space with that
      one role.

    ``complete`` is the LLM client an LLM agent calls (:func:`graphtune.llm.complete`'s
    signature; ``graphtune.api.make_searcher`` passes it); the heuristic needs none.
    """

    name = "agent-reinforce"
    Options = AgentReinforceOptions
    uses_llm = True  # takes the app's LLM client (``complete``)

    def __init__(self, ctx: SearchContext, *, complete: Callable[..., Any] | None = None):
        super().__init__(ctx)
        o = self.opts
        if o.roles == "assistant-only":
            if is_pipeline_study(ctx):
                raise SpecError("search.options.roles: assistant-only is for single-stage studies; on a pipeline "
                                "set each stage's space.roles to [assistant]")
            ctx = self.ctx = dataclasses.replace(ctx, space=assistant_only(ctx.space))
        self.racing, self.policy = policy_parts(ctx, o)
        self.n_samples = o.samples if o.samples is not None else max(2, ctx.batch_size - o.proposals)
        objective = "accuracy" if ctx.objective.is_accuracy else (
            f"accuracy - {ctx.objective.cost_weight:g}/unit - {ctx.objective.latency_weight:g}/s latency "
            f"- {ctx.objective.usd_weight:g}/$")
        if o.pareto:  # search.options.pareto: the agent is told it is after a front
            objective += f" (Pareto mode: trading accuracy against {o.pareto}; cheap graphs matter too)"
        agent_settings = ctx.agent or {}
        if is_pipeline_study(ctx):
            # a multi-stage study: per-stage reports and updates (search/pipeline_critic.py)
            pol = self.policy
            self.problem = PipelineProblemInfo(
                task_description=ctx.task_description, space=ctx.space, costs=ctx.costs, budget=ctx.budget,
                objective=objective, slots={n: tuple(pg.slot_id(i) for i in range(pg.S)) for n, pg in pol.pgs.items()},
                max_proposals=o.proposals, seed=ctx.seed)
            self.critic = PipelineCritic(make_agent(agent_settings, self.problem, complete=complete), self.problem,
                                         self.racing, pol, lr_agent=o.lr_agent, max_agent_delta=o.max_agent_delta,
                                         max_proposals=o.proposals, objective=ctx.objective)
        else:
            pg = self.policy.pg
            slots = tuple(pg.slot_id(i) for i in range(pg.S))
            self.problem = ProblemInfo(task_description=ctx.task_description, space=ctx.space, costs=ctx.costs,
                                       budget=ctx.budget, objective=objective, slots=slots,
                                       max_proposals=o.proposals, seed=ctx.seed)
            self.critic = AgentCritic(make_agent(agent_settings, self.problem, complete=complete), self.problem,
                                      self.racing, self.policy, build_graph=self._proposal_graph,
                                      lr_agent=o.lr_agent, max_agent_delta=o.max_agent_delta,
                                      max_proposals=o.proposals, objective=ctx.objective,
                                      unit_flops=ctx.costs.unit_flops, memory_tokens=o.memory_tokens)
        self.batches_told = 0
        #: "probe" until the probes (every affordable model alone) were told, then "search"
        #: (no probes without ``insight_init``)
        self.phase = "probe" if o.insight_init else "search"
        self._minibatch: tuple[str, ...] = ()

    @property
    def pg(self) -> ProbabilisticGraph:
        """The distribution over graphs (the policy part's; a multi-stage study has one per
        stage instead: ``policy.pgs``)."""
        return self.policy.pg

    @property
    def agent(self):
        """The critic's agent (``heuristic`` or an LLM backend)."""
        return self.critic.agent

    def _proposal_graph(self, prop: GraphProposal) -> Graph:
        """Build and validate one proposal; raises GraphError/BudgetError with the reason
        (one line: :func:`graphtune.agent.proposals.proposal_to_graph`, llm-opt's builder too)."""
        return proposal_to_graph(prop, self.ctx.space, self.ctx.costs, self.ctx.budget)

    def ask(self) -> list[Candidate]:
        if self.phase == "probe":
            # probes seed the agent's prior: measured on the second level's questions
            qs = self.racing.questions(min(1, len(self.racing.levels) - 1))
            cands = (pipeline_probe_candidates(self.ctx, qs) if is_pipeline_study(self.ctx)
                     else probe_candidates(self.ctx, self.policy, qs))
            if cands:
                self._minibatch = tuple(cands[0].question_ids or ())
                return cands
            self.phase = "search"
        cands, self._minibatch = policy_batch(self.racing, self.policy, self.n_samples, self.batches_told,
                                              extra=self.critic.proposals)
        return cands

    def tell(self, evaluations: Sequence[Evaluation]) -> None:
        self.racing.record(evaluations)
        if isinstance(self.critic, PipelineCritic):
            self.critic.remember(evaluations)
        mb = self._minibatch
        # single-stage: how far each logit moves in this batch and by whom (critic.attribute)
        track = isinstance(self.critic, AgentCritic)
        before = self.policy.snapshot() if track else None
        if self.phase == "probe":
            self.critic.initial(evaluations, mb, self.batches_told)
            if track:
                self.critic.attribute(self.batches_told,
                                      self.policy.attribution(before, before, self.policy.snapshot()))
            self.phase = "search"
            self.batches_told += 1
            return
        numeric = (self.policy.step(evaluations, self.racing.minibatch_reward(mb, self.batches_told)) if mb
                   else {"samples": 0, "step": 0.0})
        after_gradient = self.policy.snapshot() if track else None
        self.critic.feedback(evaluations, mb, numeric, self.batches_told)
        after_agent = self.policy.snapshot() if track else None
        self.policy.enforce_entropy_floor()
        if track:
            self.critic.note_round(self.batches_told, len(evaluations),
                                   self.policy.attribution(before, after_gradient, after_agent))
        else:
            self.critic.note_round(self.batches_told, len(evaluations))
        self.batches_told += 1

    def recommend(self, history: Sequence[Evaluation]) -> GraphStats | None:
        """``pick: surrogate`` (the default here): the paired pick refined by the critic's
        surrogate (:func:`~graphtune.search.racing.recommend_shrunk`); ``pick: paired``:
        as ``reinforce`` (:func:`~graphtune.search.racing.recommend_paired`)."""
        return policy_recommend(history, self.ctx, self.opts, self.problem, default="surrogate")

    # -- contract ------------------------------------------------------------------------
    def drain_agent_steps(self) -> list[dict[str, Any]]:
        return self.critic.drain_steps()

    def agent_usage(self) -> dict[str, Any]:
        """The agent's own calls, tokens, dollars and seconds (apart from the environment)."""
        return self.critic.agent_usage()

    def state_dict(self) -> dict[str, Any]:
        return {**self.policy.state_dict(), **self.racing.state_dict(), **self.critic.state_dict(),
                "batches_told": self.batches_told, "phase": self.phase}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """A state of ``state_dict``, or of the previous version (with ``evidence``: the
        evidence is rebuilt by ``restore`` instead)."""
        self.policy.load_state_dict(state)
        self.racing.load_state_dict(state)
        self.critic.load_state_dict(state)
        self.batches_told = int(state["batches_told"])
        self.phase = str(state["phase"])

    def restore(self, history: Sequence[Evaluation]) -> None:
        self.racing.restore(history)
        if isinstance(self.critic, PipelineCritic):
            self.critic.remember(history)

    def close(self) -> None:
        self.critic.close()


def assistant_only(space):
    """``space`` with ``assistant`` as its only role (``roles: assistant-only``); a
    one-line SpecError when the space has no ``assistant`` or it may not be the sink."""
    if "assistant" not in space.roles or (space.sink_roles is not None and "assistant" not in space.sink_roles):
        raise SpecError("search.options.roles: assistant-only needs the role 'assistant' in space.roles "
                        f"(and in space.sink_roles when set); the space has roles {list(space.roles)}")
    return dataclasses.replace(space, roles=("assistant",),
                               sink_roles=None if space.sink_roles is None else ("assistant",))
