"""Live multi-stage pipelines: each stage's collaboration graph runs on real endpoints, the
stages in order, each stage's final answer entering the prompts of the stages that read it.

A :class:`LivePipelineEnvironment` is a thin layer over a
:class:`~graphtune.envs.live.LiveEnvironment`: it uses that environment's questions,
scorer, endpoints, executor (concurrency limits, the call ledger, sharing of identical
calls), local servers and event loop, and adds what a pipeline needs:

* **The stage's question.** Each stage's graph runs on a text of its own (the ``{question}``
  of its nodes' prompts): the stage's ``prompt`` template (``str.format`` over
  ``{question}`` and the names of its input stages, each replaced by that stage's final
  answer), or by default the stage's inputs in order: the question, then each input
  stage's final answer under a heading (:func:`stage_text`).
* **The stage's prompts.** Each stage has its own :class:`~graphtune.envs.prompts.PromptSet`
  (style, answer format, templates).
* **Scoring.** Only the last stage's answer is scored, with the task's scorer (its nodes
  too, as in a single graph). Intermediate stages have no scorer of their own: their stage
  outcome's ``correct`` (and their nodes') is None, "cannot tell".
* **Results** carry one :class:`~graphtune.graphs.results.StageOutcome` per stage (answer,
  tokens, FLOPs, dollars, duration) and node outcomes named ``<stage>/<node id>``; tokens,
  FLOPs and dollars add up over the stages, latency follows the critical path through them
  (a stage starts when all its input stages have ended).
* **Failures.** A call that fails in any stage makes the question an infrastructure
  failure (``error`` set, naming the stage; ``correct`` None: never scored wrong); the
  stages that read the failed stage do not run. ``LLMFatalError`` and
  ``EndpointDownError`` stop the evaluation as in a single graph.
* **Caching.** Every call goes through the executor and its ledger; a stage's prompt holds
  its upstream answers, so a call is served from the ledger only when everything it was
  given is identical. Each stage is one graph run: within it the k-th identical request is
  sample k (seed ``seed + k``), as in a single graph.
* **Concurrency.** Questions run concurrently; within a question a stage starts as soon as
  its input stages have ended, so stages that do not read each other run side by side.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from graphtune.envs.base import CallLedger, Environment, NodeOutcome, QuestionResult
from graphtune.envs.live import (CHARS_PER_TOKEN, INLINE_SCORERS, LiveEnvironment, NodeRun, compile_graph,
                                 critical_path_s, question_result)
from graphtune.envs.prompts import STAGE_INPUT_HEADING, PromptSet, stage_question
from graphtune.errors import EnvError
from graphtune.graphs.cost import TaskShape
from graphtune.graphs.model import Graph
from graphtune.graphs.pipeline import QUESTION, Pipeline
from graphtune.graphs.results import StageOutcome

__all__ = ["LivePipelineEnvironment", "LiveStage", "StageRun", "estimate_stage_shapes", "stage_text"]

#: how an input stage's answer is headed in a stage's default question text
HEADING = STAGE_INPUT_HEADING  # "Output of the {stage} stage:"


@dataclass(frozen=True)
class LiveStage:
    """How one stage runs live: its name and inputs (``question`` and/or earlier stages),
    its ``prompt`` template (None: the default text, see :func:`stage_text`), its prompt set,
    and optionally its average prompt and completion tokens (A, B) for analytic costing
    (None: estimated, :func:`estimate_stage_shapes`)."""

    name: str
    inputs: tuple[str, ...]
    prompts: PromptSet
    prompt: str | None = None
    input_tokens: float | None = None
    output_tokens: float | None = None
    description: str = ""


@dataclass(frozen=True)
class StageRun:
    """What one stage did on one question: the text its graph ran on, every node's run and
    the stage's duration (its graph's critical path)."""

    stage: str
    text: str
    graph: Graph
    runs: Mapping[str, NodeRun]

    @property
    def latency_s(self) -> float:
        return critical_path_s(self.graph, self.runs)

    @property
    def error(self) -> str | None:
        """The first failed call's reason (or why the sink gave nothing); None when it ran."""
        failed = [r.error for _, r in sorted(self.runs.items()) if r.error and not r.skipped]
        if failed:
            return failed[0]
        sink = self.runs.get(self.graph.sink)
        if sink is None:
            return "the sink did not run"
        return sink.error

    @property
    def answer(self) -> str | None:
        """The sink's output (None when the stage failed)."""
        sink = self.runs.get(self.graph.sink)
        return sink.text if sink is not None and self.error is None else None

    @property
    def failed_model(self) -> str | None:
        failed = [nid for nid, r in sorted(self.runs.items()) if r.error and not r.skipped]
        return self.graph.node_map[failed[0]].model if failed else None


def stage_text(stage: LiveStage, question: str, answers: Mapping[str, str]) -> str:
    """The text a stage's graph runs on: ``stage.prompt`` formatted with ``question`` and
    each input stage's final answer by name, or by default its inputs in order (the
    question, then each input stage's answer under its heading). One definition with the
    exported LangGraph module: :func:`graphtune.envs.prompts.stage_question`."""
    try:
        return stage_question(stage.prompt, question, {k: answers[k] for k in stage.inputs if k != QUESTION},
                              order=stage.inputs)
    except (KeyError, IndexError, ValueError) as e:
        raise EnvError(f"stage {stage.name!r}: its prompt template names {e}, which is not the question or an "
                       f"input of the stage ({list(stage.inputs)}); fix pipeline.stages[].prompt") from None


def estimate_stage_shapes(stages: Sequence[LiveStage], examples: Sequence[Any],
                          default_output_tokens: float) -> dict[str, TaskShape]:
    """Each stage's task shape (A, B) for analytic costing: the stage's own
    ``input_tokens``/``output_tokens`` where given, else B = ``default_output_tokens`` (the
    completion cap) and A = the mean length of its from-scratch prompt over ``examples``
    (chars / 4, as the single-stage live environment estimates) plus the input stages' B
    (their answers are in the prompt)."""
    out: dict[str, TaskShape] = {}
    for st in stages:
        b = float(st.output_tokens or default_output_tokens)
        if st.input_tokens is not None:
            out[st.name] = TaskShape(float(st.input_tokens), b)
            continue
        if not examples:
            raise EnvError(f"cannot estimate stage {st.name!r}'s prompt length without questions; give its "
                           "input_tokens")
        upstream = [i for i in st.inputs if i != QUESTION]
        empty = {u: "" for u in upstream}
        chars = [sum(len(m["content"]) for m in st.prompts.messages("assistant", stage_text(st, e.question, empty)))
                 + 12 * 2 for e in examples]
        a = max(1.0, math.ceil(sum(chars) / len(chars) / CHARS_PER_TOKEN)) + sum(out[u].output_tokens
                                                                               for u in upstream)
        out[st.name] = TaskShape(a, b)
    return out


@dataclass(eq=False)
class LivePipelineEnvironment(Environment):
    """Runs pipelines on real endpoints (see the module docstring) over ``live``, whose
    questions, scorer, endpoints, ledger and servers it uses; ``stages`` gives each stage's
    inputs, prompt template and prompts, in pipeline order. ``close`` closes ``live``."""

    live: LiveEnvironment
    stages: Sequence[LiveStage]
    description: str | None = None
    _shapes: dict[str, TaskShape] | None = field(default=None, init=False, repr=False)

    kind = "live"

    def __post_init__(self) -> None:
        self.stages = tuple(self.stages)
        if not self.stages:
            raise EnvError("a live pipeline needs at least one stage")
        self._by_name = {s.name: s for s in self.stages}
        self._compiled: dict[tuple[str, Graph], Any] = {}

    # -- Environment -----------------------------------------------------------------
    def split(self, name: str) -> list[str]:
        return self.live.split(name)

    @property
    def executor(self):
        return self.live.executor

    @property
    def shapes(self) -> dict[str, TaskShape]:
        """Each stage's task shape (A, B), estimated from the dev questions where not given."""
        if self._shapes is None:
            lv = self.live
            self._shapes = estimate_stage_shapes(self.stages, lv.dev or lv.test, lv.settings.max_tokens or 256)
        return self._shapes

    @property
    def shape(self) -> TaskShape:
        """The last stage's task shape (each stage's own is in :attr:`shapes`)."""
        return self.shapes[self.stages[-1].name]

    def describe(self) -> str:
        if self.description:
            return self.description
        names = ", ".join(f"{s.name} ({s.description})" if s.description else s.name for s in self.stages)
        return f"live pipeline with {len(self.live.dev)} dev questions; stages: {names}"

    def share_limits(self, workers: int) -> None:
        self.live.share_limits(workers)

    def share_calls(self, owner: str, *, stale_after_s: float) -> None:
        self.live.share_calls(owner, stale_after_s=stale_after_s)

    def close(self) -> None:
        self.live.close()

    def evaluate(self, pipeline: Pipeline, question_ids: Sequence[str]) -> list[QuestionResult]:
        """Run ``pipeline`` on each question (questions concurrently; a stage once its input
        stages have ended); one result per id, same order."""
        return self.live.run_sync(self.aevaluate(pipeline, question_ids))

    def run_text(self, pipeline: Pipeline, question: str) -> list[StageRun]:
        """Run ``pipeline`` once on a question text; every stage's run, in pipeline order (a
        stage whose input stage failed did not run and is left out)."""
        self._check(pipeline)

        async def go():
            try:
                return await self.run_stages(pipeline, question)
            finally:
                if isinstance(self.live.ledger, CallLedger):
                    await asyncio.to_thread(self.live.ledger.flush)

        return self.live.run_sync(go())

    # -- running ---------------------------------------------------------------------
    def _check(self, pipeline: Pipeline) -> None:
        if not isinstance(pipeline, Pipeline):
            raise EnvError(f"a live pipeline environment runs pipelines, not a {type(pipeline).__name__}")
        want = [(s.name, s.inputs) for s in self.stages]
        got = [(s.name, s.inputs) for s in pipeline.stages]
        if want != got:
            raise EnvError(f"the pipeline's stages (inputs) {[(n, list(i)) for n, i in got]} are not the ones this "
                           f"environment runs, {[(n, list(i)) for n, i in want]}")

    def compiled(self, stage: str, graph: Graph):
        key = (stage, graph)
        c = self._compiled.get(key)
        if c is None:
            if len(self._compiled) > 256:  # a long search sees many graphs: keep memory bounded
                self._compiled.clear()
            c = self._compiled[key] = compile_graph(graph, self._by_name[stage].prompts)
        return c

    async def run_stages(self, pipeline: Pipeline, question: str) -> list[StageRun]:
        """Run the stages of ``pipeline`` on ``question``: each stage as soon as its input
        stages have ended (stages that do not read each other run concurrently), each with
        a caller of its own (a stage is one graph run: the k-th identical request in it is
        sample k). A stage whose input stage failed does not run. Returns the runs of the
        stages that ran, in pipeline order."""
        tasks: dict[str, asyncio.Future] = {}

        async def run(s) -> StageRun | None:
            prev = [await tasks[i] for i in s.inputs if i != QUESTION]
            if any(p is None or p.error is not None for p in prev):
                return None
            text = stage_text(self._by_name[s.name], question, {p.stage: p.answer or "" for p in prev})
            state = await self.compiled(s.name, s.graph).ainvoke(
                {"question": text, "outputs": {}},
                config={"configurable": {"graphtune_caller": self.executor.caller()},
                        "recursion_limit": s.graph.depth + 8})
            return StageRun(s.name, text, s.graph, state["outputs"])

        for s in pipeline.stages:
            tasks[s.name] = asyncio.ensure_future(run(s))
        try:
            done = await asyncio.gather(*tasks.values())
        finally:
            for t in tasks.values():
                t.cancel()
        return [r for r in done if r is not None]

    async def aevaluate(self, pipeline: Pipeline, question_ids: Sequence[str]) -> list[QuestionResult]:
        """Run ``pipeline`` on the questions concurrently; one result per id, same order.
        An ``LLMFatalError`` cancels the rest and propagates."""
        self._check(pipeline)
        lv = self.live
        lv.start()
        lv.executor.reset_failures()
        examples = [lv.example(q) for q in question_ids]
        admit = asyncio.Semaphore(max(8, 2 * lv.concurrency))
        inline = type(lv.scorer).__name__ in INLINE_SCORERS

        async def one(ex):
            async with admit:
                runs = await self.run_stages(pipeline, ex.question)
            if inline:
                return pipeline_result(pipeline, ex, runs, lv.scorer, lv.score_nodes)
            return await asyncio.to_thread(pipeline_result, pipeline, ex, runs, lv.scorer, lv.score_nodes)

        tasks = [asyncio.ensure_future(one(ex)) for ex in examples]
        try:
            if tasks:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    if t.exception() is not None:
                        raise t.exception()
            return [t.result() for t in tasks]
        finally:
            for t in tasks:
                t.cancel()
            if isinstance(lv.ledger, CallLedger):
                await asyncio.to_thread(lv.ledger.flush)


def pipeline_result(pipeline: Pipeline, example, runs: Sequence[StageRun], scorer,
                    score_nodes: bool = True) -> QuestionResult:
    """The result of one pipeline run on one question. The last stage's answer is scored
    with ``scorer`` (None: not scored, e.g. ``graphtune run --question``), through
    :func:`graphtune.envs.live.question_result` on its graph; earlier stages are not scored
    (``correct`` None). Costs add up over the stages that ran, latency follows the critical
    path through them, and a failed stage makes the question an infrastructure failure."""
    finish: dict[str, float] = {}
    stages: list[StageOutcome] = []
    nodes: list[NodeOutcome] = []
    by_name = {r.stage: r for r in runs}
    final = pipeline.final.name
    last: QuestionResult | None = None
    for s in pipeline.stages:
        r = by_name.get(s.name)
        if r is None:
            continue
        if s.name == final and r.error is None and scorer is not None:
            last = question_result(s.graph, example, r.runs, scorer, score_nodes)
            outs = last.nodes
            answer, correct = last.answer or "", last.correct
        else:
            outs = tuple(NodeOutcome(nid, (x.text or ""), None, x.prompt_tokens, x.completion_tokens, x.latency_s)
                         for nid in s.graph.topo_order if (x := r.runs.get(nid)) is not None)
            answer, correct = r.answer or "", None
        lat = r.latency_s
        finish[s.name] = max((finish[i] for i in s.inputs if i in finish), default=0.0) + lat
        vals = list(r.runs.values())
        stages.append(StageOutcome(stage=s.name, answer=answer, correct=correct,
                                   prompt_tokens=sum(x.prompt_tokens for x in vals),
                                   completion_tokens=sum(x.completion_tokens for x in vals),
                                   flops=sum(x.flops for x in vals), usd=sum(x.usd for x in vals), latency_s=lat))
        nodes += [NodeOutcome(f"{s.name}/{n.node_id}", n.answer, n.correct, n.prompt_tokens, n.completion_tokens,
                              n.latency_s) for n in outs]
    totals = dict(prompt_tokens=sum(x.prompt_tokens for x in stages),
                  completion_tokens=sum(x.completion_tokens for x in stages),
                  flops=sum(x.flops for x in stages), usd=sum(x.usd for x in stages),
                  latency_s=max(finish.values(), default=0.0), nodes=tuple(nodes), stages=tuple(stages))
    failed = next((r for r in runs if r.error is not None), None)
    if failed is not None:
        return QuestionResult(question_id=example.id, answer=None, correct=None, score=0.0,
                              error=f"infrastructure: stage {failed.stage!r}: {failed.error}",
                              failed_model=failed.failed_model, **totals)
    if len(runs) != len(pipeline.stages):  # cannot happen: a stage is left out only after a failure
        raise EnvError(f"pipeline run on {example.id!r} ended before its last stage")
    if last is None:  # not scored: the final stage's output is the answer
        return QuestionResult(question_id=example.id, answer=runs[-1].answer, correct=None, score=0.0, **totals)
    return QuestionResult(question_id=example.id, answer=last.answer, correct=last.correct, score=last.score,
                          error=last.error, **totals)
