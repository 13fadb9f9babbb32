"""``llm-opt``: an LLM proposes the next graphs directly from the full history
(AgentTTS / OPRO style): no distribution, no gradient.

Each ``ask`` shows the LLM the task, the model pool with its costs, the space's rules,
the budget and every evaluated graph with its reward and cost (worst first, best last,
as OPRO does), and asks for ``batch_size`` new graphs as JSON::

    {"reasoning": str, "proposals": [{"nodes": [{"id", "role", "model"}], "edges": [[src, dst]]}]}

Each proposal is the agent's own proposal model
(:class:`~graphtune.agent.schema.GraphProposal`, which also accepts an optional
``rationale``), so llm-opt and agent-reinforce accept and refuse the same proposals. The
reply is constrained by a JSON schema where the provider supports it and validated as a
:class:`~graphtune.agent.schema.ProposalReply` either way, after the agent's guards
(length and nesting bounded before parsing, non-finite numbers refused:
``search.agent.max_reply_chars`` / ``max_reply_depth``, see
:mod:`graphtune.agent.schema`); an unusable reply is re-asked once with the agent's
one-line reason. The step stores a bounded excerpt of each reply (its first 4 KB, length
and sha256), never a multi-megabyte text. Each proposal is then built and checked
(structure, space, budget) by :func:`graphtune.agent.proposals.proposal_to_graph`, as
agent-reinforce's are, and against the graphs already proposed; rejected proposals keep
their reason in the step record, and random valid graphs fill the batch, so every batch
is full. Each proposed graph is evaluated on the whole dev split.

Multi-stage studies (a :class:`~graphtune.graphs.design.PipelineSpace`): the prompt shows
the stages (inputs, models with their costs in the pipeline's budget units, roles, rules,
caps), the total budget and every evaluated pipeline with its trial number; the reply is the
same :class:`~graphtune.agent.schema.ProposalReply`, each proposal one stage's graph naming
its ``stage`` as the agent's proposals do (:mod:`graphtune.agent.pipeline`): that stage's
graph replaces the stage's in the best pipeline so far (the incumbent, shown last), and the
graphs of ``other_stages`` replace theirs (a whole pipeline names every stage); the strict
schema lists the stage names and requires both fields. Each proposal is built and checked
by :func:`graphtune.agent.pipeline.proposal_to_pipeline` (each stage's graph against its
stage's space, then the pipeline against the caps and the total budget), so llm-opt and
agent-reinforce accept and refuse the same pipeline proposals; every refusal is one line
naming the stage. The offline heuristic mutates one stage of the best pipelines.

With ``agent.model: heuristic`` (no LLM configured) an offline proposer mutates the best
graphs so far (model swaps, role swaps, node and edge insertions and deletions); its
steps are labelled ``heuristic (mutation proposer, not an LLM)``, so a study never
passes it off as an LLM. It makes the method run offline and deterministic.

Steps (prompt, reply, parsed JSON, per-proposal outcome, tokens, cost, seconds) come out
of :meth:`LLMOptSearcher.drain_agent_steps` as ``AgentStepRow`` rows. An LLM failure
that outlived its retries is recorded and the batch is filled with random graphs; a fatal
one (bad key, unknown model) stops the search.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from graphtune.agent.mutations import random_mutation
from graphtune.agent.pipeline import proposal_to_pipeline
from graphtune.agent.proposals import check_graph, proposal_to_graph
from graphtune.agent.schema import (MAX_STORED_REPLY_CHARS, GraphProposal, ProposalReply, ReplyLimits,
                                    describe_reply_error, one_line, parse_proposal_reply, proposal_reply_json_schema,
                                    reply_excerpt)
from graphtune.agent.toolkit import CompleteFn, ask_structured
from graphtune.errors import GraphError, GraphtuneError, SearchError
from graphtune.graphs.design import (Design, PipelineSpace, design_from_dict, design_hash, design_to_dict,
                                     random_design, validate_design)
from graphtune.graphs.model import Graph
from graphtune.graphs.pipeline import Pipeline
from graphtune.search.base import (Candidate, Evaluation, SearchContext, Searcher, SearcherOptions, rng_from_state,
                                   rng_state)

HEURISTIC = "heuristic"
HEURISTIC_BACKEND = "heuristic (mutation proposer, not an LLM)"
STATE_VERSION = 1

ROLE_HELP = {
    "assistant": "answers the question; if it has inputs, it sees their answers and may use them",
    "fuser": "combines the answers of its inputs into one final answer; needs at least one input",
}

SYSTEM_PROMPT = (
    "You design collaboration graphs of LLM calls that answer questions of a task. A graph is a DAG: each node "
    "is one call of a model in a role; an edge [a, b] appends a's answer to b's prompt; exactly one node (the "
    "sink, with no outgoing edge) gives the final answer, and every other node must have a path to it. You see "
    "every graph evaluated so far with its reward; propose new graphs that you expect to score higher while "
    "staying within the budget. Reply with JSON only."
)


PIPELINE_SYSTEM_PROMPT = (
    "You design multi-stage pipelines of LLM calls that answer questions of a task. The stages run in a fixed "
    "order; each stage is a collaboration graph, a DAG whose nodes are calls of a model in a role (an edge [a, b] "
    "appends a's answer to b's prompt; exactly one node, the sink, gives the stage's output, which later stages "
    "read). One budget covers the whole pipeline. You see every pipeline evaluated so far with its reward; propose "
    "new pipelines that you expect to score higher while staying within the budget. Reply with JSON only."
)


# -- the reply -----------------------------------------------------------------------------
# One proposal schema for every agent step: the reply is the agent's ProposalReply (a list
# of graphtune.agent.schema.GraphProposal), refused with the agent's one-line reasons, and
# each proposal is built by graphtune.agent.proposals.proposal_to_graph, as agent-reinforce's are.


def reply_schema(models: Sequence[str], roles: Sequence[str], stages: Sequence[str] | None = None) -> dict:
    """JSON schema of a reply for strict structured output: every field required, no
    extra fields, the space's models and roles as enums (with ``stages``, each proposal's
    ``stage`` and ``other_stages`` too), no length or count constraints
    (:func:`graphtune.agent.schema.proposal_reply_json_schema`); every reply it admits
    parses as a :class:`~graphtune.agent.schema.ProposalReply`, whose bounds pydantic checks."""
    return proposal_reply_json_schema(models, roles, stages)


def parse_reply(text: str, limits: ReplyLimits = ReplyLimits()) -> ProposalReply:
    """Validate a reply read under ``limits`` (length and nesting bounded before parsing,
    non-finite numbers and unstorable strings refused: see ``graphtune.agent.schema``);
    raises ValueError with the agent's one-line reason (:func:`describe_reply_error`)."""
    try:
        return parse_proposal_reply(text, limits)
    except ValueError as e:  # ReplyRejected, JSONDecodeError, ValidationError
        raise ValueError(describe_reply_error(e)) from None


def _limits_text(b) -> str:
    return ", ".join(f"{v:g} {name}" for name, v in (("units", b.units), ("FLOPs", b.flops), ("USD", b.usd),
                                                     ("s latency", b.latency_s)) if v is not None) or "none"


def _retry_prompt(reason: str) -> str:
    return f"Your reply was invalid: {reason}. Reply again with JSON that matches the schema."


# -- the searcher ------------------------------------------------------------------------


class LLMOptOptions(SearcherOptions):
    max_history: int = Field(200, ge=1, le=100_000, description="graphs shown to the proposer (the best ones)")
    elite: int = Field(4, ge=1, le=1000, description="graphs the heuristic mutates")
    parse_retries: int = Field(1, ge=0, le=10, description="re-asks after an unparsable reply")


class LLMOptSearcher(Searcher):
    """OPRO-style proposer. ``complete`` is the LLM client it calls (required when
    ``ctx.agent["model"]`` is an LLM; :func:`graphtune.llm.complete`'s signature, passed by
    ``graphtune.api.make_searcher``; tests pass a fake).

    Options: ``max_history`` (200 graphs shown, the best ones), ``elite`` (4: graphs the
    heuristic mutates), ``parse_retries`` (1: re-asks after an unparsable reply).
    """

    name = "llm-opt"
    Options = LLMOptOptions
    uses_llm = True  # takes the app's LLM client (``complete``)

    def __init__(self, ctx: SearchContext, *, complete: CompleteFn | None = None):
        super().__init__(ctx)
        agent = dict(ctx.agent or {})
        self.model = str(agent.get("model") or HEURISTIC)
        self.is_llm = self.model != HEURISTIC
        self.agent = agent
        if self.is_llm and complete is None:
            raise SearchError(f"llm-opt with the LLM {self.model!r} needs an LLM client: pass complete=, a completion "
                              "function such as graphtune.llm.complete (graphtune.api.make_searcher passes it)")
        self._complete = complete
        self.max_history = self.opts.max_history
        self.elite = self.opts.elite
        self.parse_retries = self.opts.parse_retries
        self.limits = ReplyLimits.from_settings(agent)
        self.rng = ctx.rng(salt=13)
        self.history: list[dict[str, Any]] = []  # evaluated graphs, in trial order
        self.seen: set[str] = set()  # every hash proposed (never proposed twice)
        self.batch = 0
        self._steps: list[dict[str, Any]] = []
        #: the heuristic's proposals of this ask: hash -> the trial it mutated (lineage)
        self._mutated_from: dict[str, int] = {}
        self.is_pipeline = isinstance(ctx.space, PipelineSpace)
        # cost order: the heuristic moves a node to a neighbouring size
        if self.is_pipeline:
            self._stage_models = {s.name: sorted(s.space.models, key=lambda m: (ctx.costs.of(s.name).node_units(m, 0), m))
                                  for s in ctx.space.stages}
        else:
            self._models = sorted(ctx.space.models, key=lambda m: (ctx.costs.node_units(m, 0), m))

    @property
    def backend(self) -> str:
        return self.model if self.is_llm else HEURISTIC_BACKEND

    # -- Searcher API ----------------------------------------------------------------
    def ask(self) -> list[Candidate]:
        key = f"llm-opt-{self.ctx.seed}-{self.batch}"
        step: dict[str, Any] = {"key": key, "batch": self.batch, "kind": "propose", "backend": self.backend,
                                "is_llm": self.is_llm, "prompt": None, "reply": None, "parsed": None,
                                "applied": None, "rejected_reason": None, "feedback": None,
                                "trial_numbers": [h["trial"] for h in self.history], "calls": 0,
                                "prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0, "seconds": 0.0}
        if self.is_llm:
            proposals, failure = self._llm_proposals(step)
        else:
            proposals, failure = self._heuristic_proposals(step), None
        out: list[Candidate] = []
        outcomes: list[dict[str, Any]] = []
        shown = {h["trial"] for h in self._shown()}
        for i, raw in enumerate(proposals):
            if len(out) >= self.ctx.batch_size:
                outcomes.append({"index": i, "status": "ignored", "reason": "beyond the batch size"})
                continue
            g, reason = self._check(raw)
            if g is None:
                outcomes.append({"index": i, "status": "rejected", "reason": reason})
                continue
            h = design_hash(g)
            self.seen.add(h)
            outcome: dict[str, Any] = {"index": i, "status": "accepted", "graph_hash": h}
            # lineage from the reply's `parent` field (a trial the prompt showed), or for the
            # heuristic the trial it mutated; never guessed from free text
            parent = raw.parent if isinstance(raw, GraphProposal) else self._mutated_from.get(h)
            if parent is not None and parent not in shown:
                outcome["warning"] = f"parent #{parent} is not a trial the agent was shown; dropped"
                parent = None
            outcomes.append(outcome)
            out.append(Candidate(graph=g, origin="agent" if self.is_llm else "mutation",
                                 parents=(parent,) if parent is not None else (),
                                 info={"agent_step": key, "proposal": i}))
        n_random = 0
        while len(out) < self.ctx.batch_size:
            g = self._random_unseen()
            if g is None:
                break  # the space has nothing new left
            self.seen.add(design_hash(g))
            out.append(Candidate(graph=g, origin="random", info={"agent_step": key, "filled": True}))
            n_random += 1
        rejected = [f"proposal {o['index']}: {o['reason']}" for o in outcomes if o["status"] == "rejected"]
        reasons = ([failure] if failure else []) + rejected
        step["applied"] = {"proposals": outcomes, "accepted": sum(o["status"] == "accepted" for o in outcomes),
                           "random_fill": n_random}
        # one reason per rejected proposal (up to 1,024): bounded like a reply
        step["rejected_reason"] = reply_excerpt("; ".join(reasons), MAX_STORED_REPLY_CHARS) if reasons else None
        self._steps.append(step)
        self.batch += 1
        return out

    def tell(self, evaluations: Sequence[Evaluation]) -> None:
        for ev in evaluations:
            if not ev.ok:
                continue
            self.history.append({"trial": ev.trial_number, "hash": ev.graph_hash,
                                 "graph": design_to_dict(ev.candidate.graph),
                                 "reward": float(ev.reward), "units": float(ev.cost.units),
                                 "usd": float(ev.cost.usd), "latency_s": float(ev.cost.latency_s),
                                 "accuracy": float(ev.metrics.accuracy)})

    def drain_agent_steps(self) -> list[dict[str, Any]]:
        out, self._steps = self._steps, []
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "history": list(self.history), "seen": sorted(self.seen),
                "rng": rng_state(self.rng), "batch": self.batch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise GraphtuneError(f"stored llm-opt state has version {state.get('version')}, expected "
                                 f"{STATE_VERSION}; start a new study")
        self.history = [dict(h) for h in state["history"]]
        self.seen = set(state["seen"])
        self.rng = rng_from_state(state["rng"])
        self.batch = int(state["batch"])

    # -- checks ----------------------------------------------------------------------
    def _check(self, raw: GraphProposal | Design) -> tuple[Design | None, str | None]:
        """A proposal (the LLM's, or a design the heuristic made) as a valid, new,
        in-budget design, or None and the one-line reason. On a pipeline study an LLM
        proposal changes the incumbent (``proposal_to_pipeline``)."""
        ctx = self.ctx
        try:
            if isinstance(raw, Pipeline):
                validate_design(raw, ctx.space, ctx.costs, ctx.budget)
                g = raw
            elif self.is_pipeline:
                if isinstance(raw, Graph):
                    return None, "a pipeline study needs a graph per stage, not a single graph"
                g = proposal_to_pipeline(raw, ctx.space, ctx.costs, ctx.budget, self._incumbent())
            else:
                if isinstance(raw, GraphProposal) and (raw.stage is not None or raw.other_stages):
                    return None, "`stage` and `other_stages` are for multi-stage studies; this study searches one graph"
                g = (check_graph(raw, ctx.space, ctx.costs, ctx.budget) if isinstance(raw, Graph)
                     else proposal_to_graph(raw, ctx.space, ctx.costs, ctx.budget))
        except GraphError as e:  # BudgetError included
            return None, one_line(str(e))
        if design_hash(g) in self.seen:
            what = "pipeline" if self.is_pipeline else "graph"
            return None, f"already proposed (a {what} isomorphic to it was evaluated or is in this batch)"
        return g, None

    def _incumbent(self) -> Pipeline | None:
        """The best pipeline evaluated so far (ties: the earliest), None before any."""
        if not self.history:
            return None
        best = min(self.history, key=lambda h: (-h["reward"], h["trial"]))
        d = design_from_dict(best["graph"])
        return d if isinstance(d, Pipeline) else None

    def _random_unseen(self, tries: int = 200) -> Design | None:
        for _ in range(tries):
            try:
                g = random_design(self.ctx.space, self.ctx.costs, self.ctx.budget, self.rng)
            except GraphError:
                return None
            if design_hash(g) not in self.seen:
                return g
        return None

    # -- the LLM proposer ------------------------------------------------------------
    def _shown(self) -> list[dict[str, Any]]:
        """The evaluated graphs a prompt shows (worst first, best last): the trials a
        proposal's ``parent`` may name."""
        return sorted(self.history, key=lambda h: (h["reward"], -h["trial"]))[-self.max_history:]

    def prompt(self) -> str:
        """The user message: problem, rules, budget, the full history, the request."""
        if self.is_pipeline:
            return self.pipeline_prompt()
        ctx, costs = self.ctx, self.ctx.costs
        space = ctx.space
        lines = []
        if ctx.task_description:
            lines.append(f"Task: {ctx.task_description}")
        lines.append("Models (cost of one call in budget units, with 0 / 1 / 2 inputs):")
        for m in self._models:
            lines.append(f"- {m}: " + " / ".join(f"{costs.node_units(m, d):.2f}" for d in range(3)))
        lines.append("Roles:")
        for r in space.roles:
            rs = space.role_spec(r)
            help_ = ROLE_HELP.get(r) or f"{rs.description or 'a node role'} ({rs.rule_text()})"
            lines.append(f"- {r}: {help_}")
        no_input = sorted(r for r in space.roles if not space.role_spec(r).accepts_input)
        lines.append(f"Rules: at most {space.max_nodes} nodes, width <= {space.max_width}, depth (nodes on the "
                     f"longest path) <= {space.max_depth}, in-degree <= {space.max_in_degree}; "
                     f"the sink's role must be one of "
                     f"{[r for r in (space.sink_roles or space.roles) if space.role_spec(r).may_be_sink]}; roles "
                     f"{sorted(r for r in space.roles if space.role_spec(r).needs_input)} need an input"
                     + (f"; roles {no_input} take no input." if no_input else "."))
        b = ctx.budget
        limits = [f"{v:g} {name}" for name, v in (("units", b.units), ("FLOPs", b.flops), ("USD", b.usd),
                                                  ("s latency", b.latency_s)) if v is not None]
        lines.append(f"Budget per question (the graph's total cost): {', '.join(limits)}.")
        obj = ctx.objective
        if obj.is_accuracy:
            lines.append("Reward: accuracy on the dev questions (0 to 1).")
        else:
            lines.append(f"Reward: accuracy - {obj.cost_weight:g} x units - {obj.latency_weight:g} x latency_s - "
                         f"{obj.usd_weight:g} x usd.")
        shown = self._shown()
        if shown:
            lines.append(f"Graphs evaluated so far ({len(shown)} of {len(self.history)}, worst first, best last):")
            for h in shown:
                g = {"nodes": h["graph"]["nodes"], "edges": h["graph"]["edges"]}
                lines.append(f"#{h['trial']} {json.dumps(g, separators=(',', ':'))}  reward={h['reward']:.4f} "
                             f"units={h['units']:.2f}")
        else:
            lines.append("No graph has been evaluated yet.")
        lines.append(f"Propose {ctx.batch_size} new graphs, different from all of the above, that you expect to "
                     "reach a higher reward within the budget. Node ids are free names; edges are [src, dst] "
                     'pairs of ids; a proposal that changes a graph above may name it in "parent" (its #trial number). '
                     'Answer as JSON: {"reasoning": "...", "proposals": [{"nodes": '
                     '[{"id": "a", "role": "assistant", "model": "..."}], "edges": [["a", "b"]], "parent": 12}]}')
        return "\n".join(lines)

    def pipeline_prompt(self) -> str:
        """The user message of a multi-stage study: the stages (each with its inputs,
        models and their costs in the pipeline's units, roles, rules and cap), the budget,
        every evaluated pipeline (worst first, best last, each with its trial number) and
        the request (whole pipelines, or one stage changed in a shown pipeline)."""
        ctx, costs = self.ctx, self.ctx.costs
        space: PipelineSpace = ctx.space
        lines = []
        if ctx.task_description:
            lines.append(f"Task: {ctx.task_description}")
        lines.append(f"Stages, in order (the last one answers): {', '.join(space.names)}.")
        for st in space.stages:
            sp, cm = st.space, costs.of(st.name)
            scale = cm.unit_flops / costs.unit_flops
            lines.append(f"Stage {st.name!r}" + (f": {st.description}" if st.description else "")
                         + f". Reads: {', '.join(st.inputs)}.")
            lines.append("  Models (cost of one call in budget units, with 0 / 1 / 2 inputs): " + "; ".join(
                f"{m}: " + " / ".join(f"{cm.node_units(m, d) * scale:.2f}" for d in range(3))
                for m in self._stage_models[st.name]))
            lines.append("  Roles: " + "; ".join(
                f"{r}: {ROLE_HELP.get(r) or (sp.role_spec(r).description or 'a node role') + ' (' + sp.role_spec(r).rule_text() + ')'}"
                for r in sp.roles))
            sink_roles = [r for r in (sp.sink_roles or sp.roles) if sp.role_spec(r).may_be_sink]
            lines.append(f"  Rules: at most {sp.max_nodes} nodes, width <= {sp.max_width}, depth <= {sp.max_depth}, "
                         f"in-degree <= {sp.max_in_degree}; the sink's role one of {sink_roles}; roles "
                         f"{sorted(r for r in sp.roles if sp.role_spec(r).needs_input)} need an input.")
            cap = ctx.budget.cap(st.name)
            if cap is not None:
                lines.append("  Cap on this stage alone: " + _limits_text(cap) + ".")
        lines.append(f"Budget per question (the whole pipeline's total cost): {_limits_text(ctx.budget.total)}.")
        obj = ctx.objective
        if obj.is_accuracy:
            lines.append("Reward: accuracy of the pipeline's answer on the dev questions (0 to 1).")
        else:
            lines.append(f"Reward: accuracy - {obj.cost_weight:g} x units - {obj.latency_weight:g} x latency_s - "
                         f"{obj.usd_weight:g} x usd.")
        shown = sorted(self.history, key=lambda h: (h["reward"], -h["trial"]))[-self.max_history:]
        if shown:
            lines.append(f"Pipelines evaluated so far ({len(shown)} of {len(self.history)}, worst first, best last):")
            for h in shown:
                d = design_from_dict(h["graph"])
                stages = {s.name: {"nodes": [{"id": n.id, "role": n.role, "model": n.model} for n in s.graph.nodes],
                                   "edges": [list(e) for e in s.graph.edges]}
                          for s in (d.stages if isinstance(d, Pipeline) else ())}
                per = costs.cost(d) if isinstance(d, Pipeline) else None
                units = ", ".join(f"{n} {c.units:.1f}" for n, c in per.stages) if per else ""
                lines.append(f"trial {h['trial']}: {json.dumps(stages, separators=(',', ':'))}  "
                             f"reward={h['reward']:.4f} units={h['units']:.2f} ({units})")
        else:
            lines.append("No pipeline has been evaluated yet.")
        lines.append(
            f"Propose {ctx.batch_size} new pipelines, different from all of the above, that you expect to reach a "
            "higher reward within the budget. Each proposal gives the graph of one stage (`stage`, `nodes`, "
            "`edges`): it replaces that stage of the best pipeline so far (shown last), whose other stages are kept; "
            "`other_stages` lists more stages' graphs to replace too (name every stage for a whole new pipeline; "
            "before any pipeline is evaluated you must). Node ids are free names; edges are [src, dst] pairs of ids. "
            'Answer as JSON: {"reasoning": "...", "proposals": [{"stage": "...", "nodes": [{"id": "a", "role": '
            '"assistant", "model": "..."}], "edges": [], "other_stages": [{"stage": "...", "nodes": [...], '
            '"edges": []}]}]}')
        return "\n".join(lines)

    def _llm_proposals(self, step: dict[str, Any]) -> tuple[list[GraphProposal], str | None]:
        space, a = self.ctx.space, self.agent
        prompt = self.prompt()
        system = PIPELINE_SYSTEM_PROMPT if self.is_pipeline else SYSTEM_PROMPT
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        step["prompt"] = prompt
        if self.is_pipeline:
            roles = list(dict.fromkeys(r for st in space.stages for r in st.space.roles))
            schema = reply_schema(space.models, roles, space.names)
        else:
            schema = reply_schema(space.models, space.roles)
        r = ask_structured(self._complete, self.model, messages, ProposalReply, limits=self.limits,
                           parse_retries=self.parse_retries, json_schema=schema,
                           describe_error=describe_reply_error, retry_prompt=_retry_prompt,
                           api_base=a.get("api_base"), api_key_env=a.get("api_key_env"),
                           temperature=float(a.get("temperature", 0.2)), max_tokens=a.get("max_tokens"),
                           timeout_s=float(a.get("timeout_s", 120.0)), max_retries=int(a.get("max_retries", 2)),
                           seed=self.ctx.seed * 1000 + self.batch)
        price_in = float(a.get("usd_per_mtok_in", 0.0))
        price_out = float(a.get("usd_per_mtok_out", 0.0))
        for at in r.attempts:
            step["calls"] += 1
            step["prompt_tokens"] += at.prompt_tokens
            step["completion_tokens"] += at.completion_tokens
            step["usd"] += (at.prompt_tokens * price_in + at.completion_tokens * price_out) / 1e6
            step["seconds"] += at.seconds
        replies = r.excerpts  # stored and re-sent bounded, never whole
        if replies:
            step["reply"] = replies[0] if len(replies) == 1 else reply_excerpt(
                json.dumps(replies, ensure_ascii=False), MAX_STORED_REPLY_CHARS)
        if r.transient is not None:
            return [], f"LLM call failed, batch filled with random graphs: {r.transient}"
        if r.value is None:
            return [], f"unusable reply after {len(replies)} attempt(s), batch filled with random graphs: {r.error}"
        parsed = r.value
        step["parsed"] = parsed.model_dump(mode="json")
        # the reasoning is free text of any length: stored as a bounded excerpt
        step["parsed"]["reasoning"] = reply_excerpt(parsed.reasoning)
        step["feedback"] = step["parsed"]["reasoning"] or None
        return list(parsed.proposals), None

    # -- the offline heuristic proposer ------------------------------------------------
    def _heuristic_proposals(self, step: dict[str, Any]) -> list[Graph]:
        """Mutations of the best graphs so far (random graphs while there is no history)."""
        ranked = sorted(self.history, key=lambda h: (-h["reward"], h["trial"]))[:self.elite]
        parents = [design_from_dict(h["graph"]) for h in ranked]
        out: list[Graph] = []
        hashes: set[str] = set()
        why: list[str] = []
        self._mutated_from = {}
        for _ in range(self.ctx.batch_size):
            if not parents:
                break
            for _ in range(50):
                k = int(self.rng.integers(len(parents))) if self.rng.random() < 0.5 else 0  # favour the best
                g, ops = parents[k], []
                if self.is_pipeline:  # mutate one stage's graph in its own space
                    g, ops = self._mutate_stage(g)
                else:
                    for _ in range(1 + int(self.rng.integers(2))):
                        g, op = random_mutation(g, self.ctx.space, self._models, self.rng)
                        ops.append(op)
                if g is None:
                    continue
                h = design_hash(g)
                if h in self.seen or h in hashes:
                    continue
                ok, _ = self._check(g)
                if ok is None:
                    continue
                hashes.add(h)
                out.append(g)
                self._mutated_from[h] = int(ranked[k]["trial"])
                why.append(f"best #{k + 1} (trial #{ranked[k]['trial']}): {', '.join(ops)}")
                break
        step["parsed"] = {"proposals": [design_to_dict(g) for g in out], "reasoning": "; ".join(why)}
        step["feedback"] = (f"{HEURISTIC_BACKEND}: mutated the {len(parents)} best graphs"
                            if parents else f"{HEURISTIC_BACKEND}: no history yet, random graphs")
        return out

    def _mutate_stage(self, p: Pipeline) -> tuple[Pipeline | None, list[str]]:
        """One or two random edits of one random stage's graph (in that stage's space)."""
        space: PipelineSpace = self.ctx.space
        st = space.stages[int(self.rng.integers(len(space.stages)))]
        g, ops = p.stage(st.name).graph, []
        for _ in range(1 + int(self.rng.integers(2))):
            g, op = random_mutation(g, st.space, self._stage_models[st.name], self.rng)
            ops.append(f"{st.name}: {op}")
        if g is None:
            return None, ops
        try:
            return space.pipeline({**{s.name: s.graph for s in p.stages}, st.name: g}), ops
        except GraphError:
            return None, ops
