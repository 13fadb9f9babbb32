"""The critic part of ``agent-reinforce``: the agent's initial step and its feedback.

:class:`AgentCritic` reads the searcher's :class:`~graphtune.search.racing.Racing` (the
evidence, the incumbent) and :class:`~graphtune.search.policy.PolicyUpdate` (the
distribution) through their public methods, and acts on them in two ways:

* it moves the distribution by the agent's deltas, ``lr_agent * confidence * delta``,
  each clipped to ``max_agent_delta`` (``ProbabilisticGraph.apply_deltas``);
* it queues the agent's proposals (validated by ``build_graph``; at most
  ``max_proposals`` per step, two more on the initial step) for the next batch
  (:meth:`AgentCritic.proposals`).

A proposal's lineage comes from its ``parent`` field (a trial number the agent was
shown): a known trial becomes the proposed trial's ``parents``; an unknown one is dropped
with a warning stored next to that proposal; no field, no parent.

Memory (``memory_tokens`` > 0): every step's hypothesis (feedback text, the preferences
it moved, its proposals) is kept in the state, and every feedback report carries them
next to what was measured since (:mod:`graphtune.agent.memory`): each proposal's paired
difference to the incumbent with its 95% interval, and for each pushed preference the
paired effect of the graphs measured since that follow it against those that do not. The
outcomes are computed from the racing evidence when the report is made, so a resumed
search (whose evidence is rebuilt from the store) sends the same prompts; the state
keeps only the hypotheses, no more of them than the token bound could ever show.

Attribution: :meth:`AgentCritic.note_round` stores, in the batch's agent step
(``applied["attribution"]``), how much of each logit's change in that batch came from the
numeric gradient, from the agent and from the entropy floor
(:meth:`graphtune.search.policy.PolicyUpdate.attribution`).

Every step (prompt, reply excerpt, parsed update, what was applied or rejected and why,
calls, tokens, dollars, seconds) is kept for :meth:`AgentCritic.drain_steps`. Its state
(the proposals still queued, the agent's running usage, the last rounds' one-line
summaries it is shown, the memory's hypotheses) is what the store cannot give back, so it
is saved whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphtune.agent.base import Agent, AgentStep
from graphtune.agent.memory import FEEDBACK_CHARS, CHARS_PER_TOKEN, Outcome, RoundMemory, classify, cut_words, \
    select_memory
from graphtune.agent.report import BatchReport, GraphEntry, InitReport, ProblemInfo, graph_effects, node_flips, \
    paired_difference
from graphtune.agent.schema import MAX_STORED_REPLY_CHARS, AgentUpdate, GraphProposal, one_line, reply_excerpt
from graphtune.errors import GraphError
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.io import from_dict, to_dict
from graphtune.graphs.model import Graph, Node
from graphtune.graphs.render import to_text
from graphtune.graphs.space import is_valid
from graphtune.search.base import Candidate, Evaluation, Objective, SearchContext
from graphtune.search.policy import PolicyUpdate
from graphtune.search.racing import Racing

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


class CriticSteps:
    """What every critic keeps besides its policy: the agent, its usage, the proposals
    queued for the next batch, the last rounds' one-line summaries and the step rows not
    yet stored (``drain_steps``). :class:`AgentCritic` and
    :class:`~graphtune.search.pipeline_critic.PipelineCritic` build on it."""

    def __init__(self, agent: Agent):
        self.agent = agent
        #: proposals waiting for the next batch: {"graph": plain design, "step": key, "parents": [...]}
        self.pending: list[dict[str, Any]] = []
        self.usage: dict[str, Any] = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0,
                                      "seconds": 0.0}
        #: one line per earlier round (the last 8), shown to the agent
        self.earlier: list[str] = []
        self._steps: list[dict[str, Any]] = []

    def _record(self, step: AgentStep, key: str, batch: int, trial_numbers: Sequence[int],
                applied: Mapping[str, Any] | None, rejected: str | None) -> None:
        """Queue one agent step as a row for ``store.models.AgentStepRow``."""
        self._steps.append({
            "key": key, "batch": batch, "kind": step.kind, "backend": self.agent.backend,
            "is_llm": self.agent.is_llm, "prompt": step.prompt,
            # bounded whatever the backend: a reply is stored as an excerpt with its length and hash
            "reply": reply_excerpt(step.reply, MAX_STORED_REPLY_CHARS),
            "parsed": step.update.model_dump(mode="json") if step.update is not None else None,
            "applied": applied, "rejected_reason": rejected, "feedback": step.feedback,
            "trial_numbers": list(trial_numbers), "calls": step.calls, "prompt_tokens": step.prompt_tokens,
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


class AgentCritic(CriticSteps):
    """The agent's steps on a searcher's racing and policy parts (see the module docstring)."""

    def __init__(self, agent: Agent, problem: ProblemInfo, racing: Racing, policy: PolicyUpdate, *,
                 build_graph: Callable[[GraphProposal], Graph], lr_agent: float, max_agent_delta: float,
                 max_proposals: int, objective: Objective, unit_flops: float, memory_tokens: int = 0):
        super().__init__(agent)
        self.problem = problem
        self.racing = racing
        self.policy = policy
        self.build_graph = build_graph
        self.lr_agent = lr_agent
        self.max_agent_delta = max_agent_delta
        self.max_proposals = max_proposals
        self.objective = objective
        self.unit_flops = unit_flops
        #: token bound of the memory section of each feedback report (0: no memory)
        self.memory_tokens = int(memory_tokens)
        #: the agent's hypotheses, one per step, oldest first (see :meth:`_remember`)
        self.memory: list[dict[str, Any]] = []

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

    def _queue_proposals(self, upd: AgentUpdate, key: str) -> list[dict[str, Any]]:
        report: list[dict[str, Any]] = []
        # every measured graph is in the report's history: its trials are the names a parent may take
        shown = {t for d in self.racing.records.values() for t in d.trials}
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
            row: dict[str, Any] = {"index": i, "status": "queued", "graph_hash": h}
            parents: list[int] = []
            if prop.parent is not None:
                if prop.parent in shown:
                    parents = [prop.parent]
                else:
                    row["warning"] = (f"parent #{prop.parent} is not a trial of a graph measured so far; "
                                      "the parent was dropped")
            self.pending.append({"graph": to_dict(g), "step": key, "parents": parents})
            report.append(row)
        return report

    # -- steps -------------------------------------------------------------------------
    def initial(self, evaluations: Sequence[Evaluation], questions: Sequence[str], batch: int) -> None:
        """The agent's initial step on the probes (batch ``batch``, scored on ``questions``)."""
        probes = tuple(self._entry(e, questions) for e in evaluations if e.ok)
        step = self.agent.initial(InitReport(problem=self.problem, probes=probes))
        self._apply(step, f"b{batch}-init", batch, [e.trial_number for e in evaluations])

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
                             policy=policy, hard_questions=hard, memory=self.recall(),
                             memory_tokens=self.memory_tokens)
        step = self.agent.feedback(report)
        self._apply(step, f"b{batch}-feedback", batch, [e.trial_number for e in evaluations])

    def note_round(self, batch: int, n_graphs: int, attribution: Mapping[str, Any] | None = None) -> None:
        """One line on round ``batch`` (its leader) for the agent's later reports; and
        ``attribution`` (the batch's logit changes by source) into the batch's agent step."""
        if attribution is not None:
            self.attribute(batch, attribution)
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

    def attribute(self, batch: int, attribution: Mapping[str, Any]) -> None:
        """Store ``attribution`` in the agent step of batch ``batch`` (not yet drained) as
        ``applied["attribution"]``; nothing when the batch had no agent step."""
        for st in reversed(self._steps):
            if st["batch"] == batch:
                st["applied"] = {**st["applied"], "attribution": dict(attribution)}
                return

    # -- memory ------------------------------------------------------------------------
    def _remember(self, step: AgentStep, batch: int, trial_numbers: Sequence[int], applied: Mapping[str, Any],
                  rejected: str | None) -> None:
        """Keep the hypothesis of ``step`` (plain data, for the state): its feedback (cut
        at a word), the preferences it moved, its proposals; then drop the oldest
        hypotheses the token bound could never show."""
        if self.memory_tokens <= 0:
            return
        u = step.update
        said = u.feedback if u is not None else f"(no usable reply: {rejected})"
        push: list[list[Any]] = []
        d = applied.get("deltas") or {}
        for kind in ("model", "role"):
            for name, x in (d.get(kind) or {}).items():
                if abs(x) >= 0.01:
                    push.append([kind, name, round(float(x), 3)])
        for kind in ("width", "depth"):
            t = d.get(f"target_{kind}")
            if isinstance(t, dict):
                push.append([kind, int(t[kind]), 1.0])
        props: list[dict[str, Any]] = []
        for row in applied.get("proposals") or []:
            if row["status"] == "queued":
                props.append({"hash": row["graph_hash"]})
            elif len(props) < 8:
                props.append({"rejected": cut_words(one_line(str(row.get("reason", ""))), 120)})
        self.memory.append({"round": batch, "kind": step.kind, "after": max(trial_numbers, default=-1),
                            "feedback": cut_words(one_line(said or ""), FEEDBACK_CHARS),
                            "confidence": round(float(u.confidence), 3) if u is not None else 0.0,
                            "push": push, "proposals": props})
        # a rendered round is at least its head line, its feedback, 35 characters per
        # pushed preference and 20 per proposal (plus their line heads): a hypothesis past
        # the bound that way could never be shown
        room, used = self.memory_tokens * CHARS_PER_TOKEN, 0
        for k in range(len(self.memory) - 1, -1, -1):
            r = self.memory[k]
            used += (45 + len(r["feedback"]) + (50 + 35 * len(r["push"]) if r["push"] else 0)
                     + (38 + 20 * len(r["proposals"]) if r["proposals"] else 0))
            if used > room and k < len(self.memory) - 1:
                self.memory = self.memory[k + 1:]
                break

    def recall(self) -> tuple[RoundMemory, ...]:
        """The memory a feedback report carries: the kept hypotheses with their outcomes
        measured now, newest rounds first in, within ``memory_tokens``."""
        if self.memory_tokens <= 0 or not self.memory:
            return ()
        entries = [e for e in self.racing.entries() if e.rewards]
        eff = graph_effects(entries)
        inc = self.racing.incumbent()
        rounds = []
        for r in self.memory:
            since = [e for e in entries if min(e.trial_numbers) > r["after"] and e.key in eff]
            prefs = tuple(self._pushed(kind, name, x, since, eff) for kind, name, x in r["push"])
            props = tuple(self._proposed(k, p, inc) for k, p in enumerate(r["proposals"]))
            rounds.append(RoundMemory(round=int(r["round"]), kind=str(r["kind"]), feedback=str(r["feedback"]),
                                      confidence=float(r["confidence"]), preferences=prefs, proposals=props))
        return select_memory(rounds, self.memory_tokens)

    @staticmethod
    def _pushed(kind: str, name: Any, x: float, since: Sequence[GraphEntry],
                eff: Mapping[str, tuple[float, float, int]]) -> Outcome:
        """What the graphs measured since say about one pushed preference: the mean paired
        effect of those that follow it minus those that do not, with a 95% interval
        (pooled variance of the effects)."""
        if kind == "model":
            follows, claim = (lambda g: any(n.model == name for n in g.nodes)), f"{name} {x:+.2f}"
        elif kind == "role":
            follows, claim = (lambda g: any(n.role == name for n in g.nodes)), f"role {name} {x:+.2f}"
        elif kind == "width":
            follows, claim = (lambda g: g.width == name), f"width {name}"
        else:
            follows, claim = (lambda g: g.depth == name), f"depth {name}"
        direction = 1 if x > 0 else -1
        a = [eff[e.key][0] for e in since if follows(e.graph)]
        b = [eff[e.key][0] for e in since if not follows(e.graph)]
        note = f"({len(a)} vs {len(b)} graphs)"
        nan = float("nan")
        if not a or not b or len(since) < 3:
            return Outcome(claim, direction, nan, nan, nan, len(since), "untested", f"{len(a)} vs {len(b)} graphs since")
        diff = float(np.mean(a) - np.mean(b))
        se = math.sqrt(float(np.var(a + b, ddof=1)) * (1 / len(a) + 1 / len(b)))
        lo, hi = diff - 1.96 * se, diff + 1.96 * se
        return Outcome(claim, direction, diff, lo, hi, len(since), classify(direction, lo, hi, len(a), len(b)), note)

    def _proposed(self, k: int, p: Mapping[str, Any], inc: str | None) -> Outcome:
        """A proposal's paired difference to the incumbent ``inc``, or why it has none."""
        nan = float("nan")
        if "rejected" in p:
            return Outcome(f"proposal {k}", 0, nan, nan, nan, 0, "rejected", str(p["rejected"]))
        h = str(p["hash"])
        if h not in self.racing:
            return Outcome(f"proposal {k}", 0, nan, nan, nan, 0, "not measured")
        claim = f"#{self.racing.trials(h)[-1]} {to_text(self.racing.graph(h))}"
        if inc is None or h == inc:
            return Outcome(claim, 0, nan, nan, nan, len(self.racing.rewards(h)), "incumbent",
                           f"now the best, {len(self.racing.rewards(h))} questions")
        d, se, n = paired_difference(self.racing.rewards(h), self.racing.rewards(inc))
        if n < 2 or not math.isfinite(se):
            return Outcome(claim, 0, nan, nan, nan, n, "not measured", f"{n} shared questions")
        lo, hi = d - 1.96 * se, d + 1.96 * se
        verdict = "better" if lo > 0 else "worse" if hi < 0 else "unclear"
        return Outcome(claim, 0, d, lo, hi, n, verdict, f"on {n} shared questions")

    def _apply(self, step: AgentStep, key: str, batch: int, trial_numbers: list[int]) -> None:
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
                applied = {"deltas": deltas, "proposals": self._queue_proposals(u, key)}
        self._remember(step, batch, trial_numbers, applied, rejected)
        self._record(step, key, batch, trial_numbers, applied, rejected)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "memory": [dict(r) for r in self.memory]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.memory = [dict(r) for r in state.get("memory", [])]
