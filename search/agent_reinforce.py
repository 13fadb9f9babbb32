"""``agent-reinforce``: REINFORCE on a probabilistic graph plus an agent's structured
feedback (the paper's method, with a real distribution, paired evaluation, racing, and
the agent's own cost on record).

Flow (see ``docs``/the design note "Agent-REINFORCE as graphtune implements it"):

* batch 0, *probes*: every affordable model alone on the first minibatch. The agent
  reads the task, pool, budget, the general test-time-scaling insights and the probe
  results, and answers with initial preferences and first graphs to try.
* every later batch: racing of the best graphs, the incumbent on the new minibatch, the
  agent's validated proposals from its last step, and samples from the distribution,
  all on the same minibatch (paired). Then the numeric REINFORCE step
  (:class:`~graphtune.search.reinforce.PolicySearcher`), then the agent's feedback on a
  compact report, applied as ``lr_agent * confidence * deltas`` (clipped), then the
  entropy floor.

Every agent step (prompt, reply, parsed update, what was applied or rejected and why,
calls, tokens, dollars, seconds) is returned by :meth:`drain_agent_steps` and stored;
trials of agent proposals carry ``info["agent_step"]`` and the trial numbers of the
graph they came from as ``parents``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import Field

from graphtune.agent import make_agent
from graphtune.agent.base import AgentStep
from graphtune.agent.proposals import proposal_to_graph
from graphtune.agent.report import BatchReport, GraphEntry, InitReport, ProblemInfo, node_flips
from graphtune.agent.schema import MAX_STORED_REPLY_CHARS, AgentUpdate, GraphProposal, reply_excerpt
from graphtune.errors import GraphError
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.io import from_dict, to_dict
from graphtune.graphs.model import Graph
from graphtune.search.base import Candidate, Evaluation, SearchContext
from graphtune.search.reinforce import PolicyOptions, PolicySearcher

_HASH = re.compile(r"\b[0-9a-f]{16}\b")


class AgentReinforceOptions(PolicyOptions):
    lr_agent: float = Field(1.0, ge=0, le=100, description="scale of the agent's deltas (times its confidence)")
    max_agent_delta: float = Field(2.0, gt=0, le=100, description="clip of one agent delta on a logit")
    proposals: int = Field(3, ge=0, le=1024, description="graphs the agent may propose per batch")


class AgentReinforceSearcher(PolicySearcher):
    """REINFORCE + agent feedback. The agent is ``ctx.agent["model"]``: ``heuristic``
    (default; an offline statistical critic, not an LLM) or a litellm model string.

    Options (``search.options``, :class:`AgentReinforceOptions`), besides those of
    :class:`~graphtune.search.reinforce.PolicySearcher` (``n0``, ``eta``, ``samples``,
    ``lr``, ``max_step``, ``entropy_floor``, ``edge_init``, ``race_top``,
    ``final_race_frac``, ``pareto``, ``pareto_weights``):

    - ``lr_agent`` (1.0): scale of the agent's deltas (times its confidence);
    - ``max_agent_delta`` (2.0): clip of one agent delta on a logit;
    - ``proposals`` (3): graphs the agent may propose per batch (validated, evaluated
      on the next minibatch);
    - ``samples`` defaults to ``search.batch_size - proposals`` (at least 2) here;
    - ``pareto`` / ``pareto_weights``: search the accuracy-vs-cost front (see
      :class:`~graphtune.search.reinforce.PolicySearcher`); the agent is told so.

    ``complete`` is the LLM client an LLM agent calls (:func:`graphtune.llm.complete`'s
    signature; ``graphtune.api.make_searcher`` passes it); the heuristic needs none.
    """

    name = "agent-reinforce"
    Options = AgentReinforceOptions
    uses_llm = True  # takes the app's LLM client (``complete``)
    probes = True

    def __init__(self, ctx: SearchContext, *, complete: Callable[..., Any] | None = None):
        super().__init__(ctx)
        o = self.opts
        self.lr_agent = o.lr_agent
        self.max_agent_delta = o.max_agent_delta
        self.max_proposals = o.proposals
        if o.samples is None:
            self.n_samples = max(2, ctx.batch_size - self.max_proposals)
        slots = tuple(self.pg.slot_id(i) for i in range(self.pg.S))
        objective = "accuracy" if ctx.objective.is_accuracy else (
            f"accuracy - {ctx.objective.cost_weight:g}/unit - {ctx.objective.latency_weight:g}/s latency "
            f"- {ctx.objective.usd_weight:g}/$")
        if self.pareto:  # search.options.pareto: the agent is told it is after a front
            objective += f" (Pareto mode: trading accuracy against {self.pareto}; cheap graphs matter too)"
        self.problem = ProblemInfo(task_description=ctx.task_description, space=ctx.space, costs=ctx.costs,
                                   budget=ctx.budget, objective=objective, slots=slots,
                                   max_proposals=self.max_proposals, seed=ctx.seed)
        self.agent = make_agent(ctx.agent or {}, self.problem, complete=complete)
        #: proposals waiting for the next batch: {"graph": plain graph, "step": key, "parents": [...]}
        self.pending: list[dict[str, Any]] = []
        self.usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0, "seconds": 0.0}
        self._steps: list[dict[str, Any]] = []

    # -- proposals ---------------------------------------------------------------------
    def _extra_candidates(self, mb: tuple[str, ...], taken: set[str]) -> list[Candidate]:
        out = []
        for p in self.pending:
            g = from_dict(p["graph"])
            h = graph_hash(g)
            if h in taken:
                continue
            taken.add(h)
            out.append(Candidate(graph=g, question_ids=mb, origin="agent", parents=tuple(p["parents"]),
                                 info={"agent_step": p["step"]}))
        self.pending = []
        return out

    def _proposal_graph(self, prop: GraphProposal) -> Graph:
        """Build and validate one proposal; raises GraphError/BudgetError with the reason
        (one line: :func:`graphtune.agent.proposals.proposal_to_graph`, llm-opt's builder too)."""
        return proposal_to_graph(prop, self.ctx.space, self.ctx.costs, self.ctx.budget)

    def _queue_proposals(self, upd: AgentUpdate, key: str, default_parents: Sequence[int]) -> list[dict[str, Any]]:
        report: list[dict[str, Any]] = []
        limit = self.max_proposals + (2 if key.endswith("init") else 0)
        for i, prop in enumerate(upd.proposals):
            if i >= limit:
                report.append({"index": i, "status": "rejected", "reason": f"over the limit of {limit} proposals"})
                continue
            try:
                g = self._proposal_graph(prop)
            except GraphError as e:
                report.append({"index": i, "status": "rejected", "reason": str(e)})
                continue
            h = graph_hash(g)
            if h in self.evidence or any(graph_hash(from_dict(p["graph"])) == h for p in self.pending):
                report.append({"index": i, "status": "rejected", "reason": f"graph {h} was already evaluated"})
                continue
            parents = list(default_parents)
            m = _HASH.search(prop.rationale or "")
            if m and m.group(0) in self.evidence:
                parents = list(self.evidence[m.group(0)]["trials"][-1:])
            self.pending.append({"graph": to_dict(g), "step": key, "parents": parents})
            report.append({"index": i, "status": "queued", "graph_hash": h})
        return report

    # -- applying a step -----------------------------------------------------------------
    def _apply(self, step: AgentStep, key: str, trial_numbers: list[int], default_parents: Sequence[int]) -> None:
        for k in ("calls", "prompt_tokens", "completion_tokens", "usd", "seconds"):
            self.usage[k] += getattr(step, k)
        applied: dict[str, Any] = {"fallback": "numeric update only"}
        rejected = step.rejected_reason
        u = step.update
        if u is not None:
            scale = self.lr_agent * u.confidence
            try:
                deltas = self.pg.apply_deltas(
                    model_preference=u.model_preference, role_preference=u.role_preference,
                    edge_changes=[c.model_dump() for c in u.edge_changes], target_width=u.target_width,
                    target_depth=u.target_depth, scale=scale, max_delta=self.max_agent_delta)
            except GraphError as e:  # a non-finite value: the distribution refused it, unchanged
                rejected = f"{e}; fell back to the numeric update"
            else:
                applied = {"deltas": deltas, "proposals": self._queue_proposals(u, key, default_parents)}
        self._steps.append({
            "key": key, "batch": self.batches_told, "kind": step.kind, "backend": self.agent.backend,
            "is_llm": self.agent.is_llm, "prompt": step.prompt,
            # bounded whatever the backend: a reply is stored as an excerpt with its length and hash
            "reply": reply_excerpt(step.reply, MAX_STORED_REPLY_CHARS),
            "parsed": step.update.model_dump(mode="json") if step.update is not None else None,
            "applied": applied, "rejected_reason": rejected, "feedback": step.feedback,
            "trial_numbers": trial_numbers, "calls": step.calls, "prompt_tokens": step.prompt_tokens,
            "completion_tokens": step.completion_tokens, "usd": step.usd, "seconds": step.seconds})

    def _entry(self, e: Evaluation, mb: Sequence[str]) -> GraphEntry:
        r = e.rewards_by_question(self.ctx.objective, self.ctx.costs.unit_flops)
        on_mb = [r[q] for q in mb if q in r] or list(r.values())
        mbset = set(mb)
        res = [x for x in e.results if x.question_id in mbset] or list(e.results)
        flips, chances = node_flips(e.candidate.graph, res)
        return GraphEntry(key=e.graph_hash, graph=e.candidate.graph, trial_numbers=(e.trial_number,),
                          origin=e.candidate.origin, rewards=dict(self.evidence[e.graph_hash]["rewards"]),
                          reward=float(np.mean(on_mb)), cost_units=e.cost.units, latency_s=e.cost.latency_s,
                          flips=flips, flip_chances=chances,
                          failed=tuple(x.question_id for x in res if x.ok and x.score <= 0)[:5])

    def _after_probes(self, evaluations: Sequence[Evaluation]) -> None:
        mb = self._minibatch
        probes = tuple(self._entry(e, mb) for e in evaluations if e.ok)
        step = self.agent.initial(InitReport(problem=self.problem, probes=probes))
        trials = [e.trial_number for e in evaluations]
        self._apply(step, f"b{self.batches_told}-init", trials, [])

    def _after_numeric(self, evaluations: Sequence[Evaluation], mb: tuple[str, ...], numeric: dict) -> None:
        if not mb:
            return  # a racing-only batch: nothing paired to report
        batch = tuple(self._entry(e, mb) for e in evaluations if e.ok and e.candidate.origin != "race")
        if not batch:
            return
        inc = self.incumbent()
        # questions of the minibatch most graphs failed
        fails = {q: np.mean([x.score <= 0 for e in evaluations for x in e.results if x.question_id == q and x.ok])
                 for q in mb}
        hard = tuple(q for q, f in sorted(fails.items(), key=lambda kv: -kv[1]) if f >= 0.75)[:5]
        sink = self.pg.sink
        policy = {"model_marginals": {m: round(p, 3) for m, p in self.pg.model_marginals().items()},
                  "expected_sink_inputs": round(self.pg.expected_in_degree(sink), 2),
                  "entropy": round(self.pg.entropy(), 2), "numeric_step": round(float(numeric.get("step", 0.0)), 3)}
        report = BatchReport(problem=self.problem, round=self.batches_told, minibatch=mb, batch=batch,
                             history=tuple(self._entries()), incumbent=inc, earlier=tuple(self.earlier),
                             policy=policy, hard_questions=hard)
        step = self.agent.feedback(report)
        parents = self.evidence[inc]["trials"][-1:] if inc else []
        self._apply(step, f"b{self.batches_told}-feedback", [e.trial_number for e in evaluations], parents)

    # -- contract ------------------------------------------------------------------------
    def drain_agent_steps(self) -> list[dict[str, Any]]:
        out, self._steps = self._steps, []
        return out

    def agent_usage(self) -> dict[str, Any]:
        """The agent's own calls, tokens, dollars and seconds (apart from the environment)."""
        return {"backend": self.agent.backend, "is_llm": self.agent.is_llm, **self.usage}

    def state_dict(self) -> dict[str, Any]:
        st = super().state_dict()
        st.update({"pending": list(self.pending), "usage": dict(self.usage)})
        return st

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.pending = [dict(p) for p in state.get("pending", [])]
        self.usage = dict(state.get("usage", self.usage))

    def close(self) -> None:
        self.agent.close()
