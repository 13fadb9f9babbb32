"""The critic part of ``agent-reinforce``: the agent's initial step and its feedback.

:class:`AgentCritic` reads the searcher's :class:`~graphtune.search.racing.Racing` (the
evidence, the incumbent) and :class:`~graphtune.search.policy.PolicyUpdate` (the
distribution) through their public methods, and acts on them in two ways:

* it moves the distribution by the agent's deltas, ``lr_agent * confidence * delta``,
  each clipped to ``max_agent_delta`` (``ProbabilisticGraph.apply_deltas``);
* it queues the agent's proposals (validated by ``build_graph``; at most
  ``max_proposals`` per step, two more on the initial step) for the next batch
  (:meth:`AgentCritic.proposals`).

Every step (prompt, reply excerpt, parsed update, what was applied or rejected and why,
calls, tokens, dollars, seconds) is kept for :meth:`AgentCritic.drain_steps`. Its state
(the proposals still queued, the agent's running usage, the last rounds' one-line
summaries it is shown) is what the store cannot give back, so it is saved whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphtune.agent.base import Agent, AgentStep
from graphtune.agent.report import BatchReport, GraphEntry, InitReport, ProblemInfo, node_flips
from graphtune.agent.schema import MAX_STORED_REPLY_CHARS, AgentUpdate, GraphProposal, reply_excerpt
from graphtune.errors import GraphError
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.io import from_dict, to_dict
from graphtune.graphs.model import Graph, Node
from graphtune.graphs.space import is_valid
from graphtune.search.base import Candidate, Evaluation, Objective, SearchContext
from graphtune.search.policy import PolicyUpdate
from graphtune.search.racing import Racing

_HASH = re.compile(r"\b[0-9a-f]{16}\b")
USAGE_KEYS = ("calls", "prompt_tokens", "completion_tokens", "usd", "seconds")


def probe_candidates(ctx: SearchContext, policy: PolicyUpdate, questions: tuple[str, ...]) -> list[Candidate]:
    """Every affordable model alone (on the sink's slot), on ``questions``: what the agent's
    initial step reads."""
    out = []
    # a role that may run alone (no inputs) as the sink: assistant, or a custom role allowing it
    src = next((r for r in ctx.space.roles if ctx.space.role_allowed(r, has_inputs=False, is_sink=True)),
               ctx.space.roles[0])
    for m in ctx.space.models:
        g = Graph.build([Node.make(policy.pg.slot_id(policy.pg.sink), src, m)])
        if is_valid(g, ctx.space, ctx.costs, ctx.budget):
            out.append(Candidate(graph=g, question_ids=questions, origin="probe"))
    return out


class AgentCritic:
    """The agent's steps on a searcher's racing and policy parts (see the module docstring)."""

    def __init__(self, agent: Agent, problem: ProblemInfo, racing: Racing, policy: PolicyUpdate, *,
                 build_graph: Callable[[GraphProposal], Graph], lr_agent: float, max_agent_delta: float,
                 max_proposals: int, objective: Objective, unit_flops: float):
        self.agent = agent
        self.problem = problem
        self.racing = racing
        self.policy = policy
        self.build_graph = build_graph
        self.lr_agent = lr_agent
        self.max_agent_delta = max_agent_delta
        self.max_proposals = max_proposals
        self.objective = objective
        self.unit_flops = unit_flops
        #: proposals waiting for the next batch: {"graph": plain graph, "step": key, "parents": [...]}
        self.pending: list[dict[str, Any]] = []
        self.usage: dict[str, Any] = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0,
                                      "seconds": 0.0}
        #: one line per earlier round (the last 8), shown to the agent
        self.earlier: list[str] = []
        self._steps: list[dict[str, Any]] = []

    # -- proposals ---------------------------------------------------------------------
    def proposals(self, questions: tuple[str, ...], taken: set[str]) -> list[Candidate]:
        """The queued proposals on ``questions`` (those not in ``taken``; extended); the queue
        is emptied."""
        out = []
        for p in self.pending:
            g = from_dict(p["graph"])
            h = graph_hash(g)
            if h in taken:
                continue
            taken.add(h)
            out.append(Candidate(graph=g, question_ids=questions, origin="agent", parents=tuple(p["parents"]),
                                 info={"agent_step": p["step"]}))
        self.pending = []
        return out

    def _queue_proposals(self, upd: AgentUpdate, key: str, default_parents: Sequence[int]) -> list[dict[str, Any]]:
        report: list[dict[str, Any]] = []
        limit = self.max_proposals + (2 if key.endswith("init") else 0)
        for i, prop in enumerate(upd.proposals):
            if i >= limit:
                report.append({"index": i, "status": "rejected", "reason": f"over the limit of {limit} proposals"})
                continue
            try:
                g = self.build_graph(prop)
            except GraphError as e:
                report.append({"index": i, "status": "rejected", "reason": str(e)})
                continue
            h = graph_hash(g)
            if h in self.racing or any(graph_hash(from_dict(p["graph"])) == h for p in self.pending):
                report.append({"index": i, "status": "rejected", "reason": f"graph {h} was already evaluated"})
                continue
            parents = list(default_parents)
            m = _HASH.search(prop.rationale or "")
            if m and m.group(0) in self.racing:
                parents = self.racing.trials(m.group(0))[-1:]
            self.pending.append({"graph": to_dict(g), "step": key, "parents": parents})
            report.append({"index": i, "status": "queued", "graph_hash": h})
        return report

    # -- steps -------------------------------------------------------------------------
    def initial(self, evaluations: Sequence[Evaluation], questions: Sequence[str], batch: int) -> None:
        """The agent's initial step on the probes (batch ``batch``, scored on ``questions``)."""
        probes = tuple(self._entry(e, questions) for e in evaluations if e.ok)
        step = self.agent.initial(InitReport(problem=self.problem, probes=probes))
        self._apply(step, f"b{batch}-init", batch, [e.trial_number for e in evaluations], [])

    def feedback(self, evaluations: Sequence[Evaluation], questions: tuple[str, ...], numeric: Mapping[str, Any],
                 batch: int) -> None:
        """The agent's feedback on batch ``batch`` (its new graphs paired on ``questions``),
        after the numeric step ``numeric``. Nothing for a racing-only batch."""
        if not questions:
            return  # a racing-only batch: nothing paired to report
        rows = tuple(self._entry(e, questions) for e in evaluations if e.ok and e.candidate.origin != "race")
        if not rows:
            return
        inc = self.racing.incumbent()
        # questions of the minibatch most graphs failed
        fails = {q: np.mean([x.score <= 0 for e in evaluations for x in e.results if x.question_id == q and x.ok])
                 for q in questions}
        hard = tuple(q for q, f in sorted(fails.items(), key=lambda kv: -kv[1]) if f >= 0.75)[:5]
        pg = self.policy.pg
        policy = {"model_marginals": {m: round(p, 3) for m, p in pg.model_marginals().items()},
                  "expected_sink_inputs": round(pg.expected_in_degree(pg.sink), 2),
                  "entropy": round(pg.entropy(), 2), "numeric_step": round(float(numeric.get("step", 0.0)), 3)}
        report = BatchReport(problem=self.problem, round=batch, minibatch=questions, batch=rows,
                             history=tuple(self.racing.entries()), incumbent=inc, earlier=tuple(self.earlier),
                             policy=policy, hard_questions=hard)
        step = self.agent.feedback(report)
        parents = self.racing.trials(inc)[-1:] if inc else []
        self._apply(step, f"b{batch}-feedback", batch, [e.trial_number for e in evaluations], parents)

    def note_round(self, batch: int, n_graphs: int) -> None:
        """One line on round ``batch`` (its leader) for the agent's later reports."""
        inc = self.racing.incumbent()
        if inc is None:
            return
        r = self.racing.rewards(inc)
        self.earlier.append(f"round {batch}: {n_graphs} graphs, leader {self.racing.graph(inc)} mean "
                            f"{np.mean(list(r.values())):.3f} over {len(r)} questions")
        self.earlier = self.earlier[-8:]

    def _entry(self, e: Evaluation, questions: Sequence[str]) -> GraphEntry:
        r = e.rewards_by_question(self.objective, self.unit_flops)
        on_mb = [r[q] for q in questions if q in r] or list(r.values())
        qset = set(questions)
        res = [x for x in e.results if x.question_id in qset] or list(e.results)
        flips, chances = node_flips(e.candidate.graph, res)
        return GraphEntry(key=e.graph_hash, graph=e.candidate.graph, trial_numbers=(e.trial_number,),
                          origin=e.candidate.origin, rewards=dict(self.racing.rewards(e.graph_hash)),
                          reward=float(np.mean(on_mb)), cost_units=e.cost.units, latency_s=e.cost.latency_s,
                          flips=flips, flip_chances=chances,
                          failed=tuple(x.question_id for x in res if x.ok and x.score <= 0)[:5])

    def _apply(self, step: AgentStep, key: str, batch: int, trial_numbers: list[int],
               default_parents: Sequence[int]) -> None:
        for k in USAGE_KEYS:
            self.usage[k] += getattr(step, k)
        applied: dict[str, Any] = {"fallback": "numeric update only"}
        rejected = step.rejected_reason
        u = step.update
        if u is not None:
            scale = self.lr_agent * u.confidence
            try:
                deltas = self.policy.pg.apply_deltas(
                    model_preference=u.model_preference, role_preference=u.role_preference,
                    edge_changes=[c.model_dump() for c in u.edge_changes], target_width=u.target_width,
                    target_depth=u.target_depth, scale=scale, max_delta=self.max_agent_delta)
            except GraphError as e:  # a non-finite value: the distribution refused it, unchanged
                rejected = f"{e}; fell back to the numeric update"
            else:
                applied = {"deltas": deltas, "proposals": self._queue_proposals(u, key, default_parents)}
        self._steps.append({
            "key": key, "batch": batch, "kind": step.kind, "backend": self.agent.backend,
            "is_llm": self.agent.is_llm, "prompt": step.prompt,
            # bounded whatever the backend: a reply is stored as an excerpt with its length and hash
            "reply": reply_excerpt(step.reply, MAX_STORED_REPLY_CHARS),
            "parsed": step.update.model_dump(mode="json") if step.update is not None else None,
            "applied": applied, "rejected_reason": rejected, "feedback": step.feedback,
            "trial_numbers": trial_numbers, "calls": step.calls, "prompt_tokens": step.prompt_tokens,
            "completion_tokens": step.completion_tokens, "usd": step.usd, "seconds": step.seconds})

    # -- contract ------------------------------------------------------------------------
    def drain_steps(self) -> list[dict[str, Any]]:
        out, self._steps = self._steps, []
        return out

    def agent_usage(self) -> dict[str, Any]:
        """The agent's own calls, tokens, dollars and seconds (apart from the environment)."""
        return {"backend": self.agent.backend, "is_llm": self.agent.is_llm, **self.usage}

    def state_dict(self) -> dict[str, Any]:
        return {"pending": [dict(p) for p in self.pending], "usage": dict(self.usage), "earlier": list(self.earlier)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pending = [dict(p) for p in state.get("pending", [])]
        self.usage = dict(state.get("usage", self.usage))
        self.earlier = list(state.get("earlier", []))

    def close(self) -> None:
        self.agent.close()
