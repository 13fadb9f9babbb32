"""The live environment: run collaboration graphs on real LLM endpoints and score them.

A graph compiles to a LangGraph ``StateGraph`` (:func:`compile_graph`): one LangGraph node
per graph node, an edge per graph edge, a join where a node has several predecessors,
``START`` into the sources and the sink into ``END``. The compiled graph is the run-time
both of a search and of an exported graph, so what a search evaluates is what users run.
Its node functions do not call a model themselves: they ask a *caller* passed in the
run's config (``configurable["graphtune_caller"]``), which here is the :class:`Executor`:

* the nodes of one topological level run concurrently (one LangGraph superstep), the
  questions of an evaluation run concurrently, all under a global concurrency limit and
  the per-model limits of the spec;
* every call goes through the ``acomplete`` function the app passes in
  (:func:`graphtune.llm.acomplete`: transient errors retried with backoff there); a call
  that still fails makes its question an infrastructure failure
  (``QuestionResult.error``, ``correct=None``, excluded from accuracy), its successors are
  skipped; an authentication or bad-model error (``LLMFatalError``) cancels the
  evaluation and propagates, so a search stops before spending more; so does a run of
  ``max_consecutive_failures`` failed calls in a row to one model (``EndpointDownError``:
  the endpoint looks down; calls already recorded are kept, so a resumed search pays
  nothing twice);
* every call is recorded in the call ledger passed in (a
  :class:`~graphtune.envs.base.CallLedger`; the app opens the store's), and an
  identical call (same endpoint, messages, sampling parameters and sample index) is
  served from it; concurrent identical calls are made once;
* cost is measured: prompt and completion tokens per node, FLOPs from the measured tokens
  (``node_flops``), dollars from the spec's price table, latency per node and the
  critical path per question (nodes of one level in parallel).

Sample indices: within one graph run, the k-th call with the same endpoint, messages and
parameters is sample k (and gets seed ``seed + k``), so width-k repeated sampling makes k
distinct calls, while sample 0 of a prompt is shared by every graph that asks it.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol, TypedDict

from graphtune.envs.base import CallLedger, Environment, NodeOutcome, QuestionResult
from graphtune.envs.prompts import PromptSet
from graphtune.errors import EndpointDownError, EnvError, GraphtuneError, LLMFatalError, LLMTransientError
from graphtune.graphs.calls import CallRecord, call_key
from graphtune.graphs.cost import ModelInfo, TaskShape, node_flops, node_usd
from graphtune.graphs.model import Graph, Node

#: chars per token, for estimating a task's prompt length before any call is made
CHARS_PER_TOKEN = 4.0
#: scorers cheap enough to run on the event loop; any other (code execution, an LLM
#: judge, a user's Python function) runs in a worker thread
INLINE_SCORERS = frozenset({"ExactScorer", "NumericScorer", "MathScorer", "ChoiceScorer"})


# -- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """How to reach one model of the pool. ``identity`` is what the ledger key names
    (default: the litellm model string and ``api_base``); a local server uses its model
    file, so its random port does not defeat the cache."""

    name: str
    model: str
    info: ModelInfo
    api_base: str | None = None
    api_key_env: str | None = None
    identity: str | None = None
    max_concurrency: int | None = None

    @property
    def key_identity(self) -> str:
        if self.identity:
            return self.identity
        return self.model + (f"@{self.api_base}" if self.api_base else "")


@dataclass(frozen=True)
class CallSettings:
    """Sampling and retry settings of every call (a node's own ``params`` override
    ``temperature`` and ``max_tokens``)."""

    temperature: float = 0.0
    max_tokens: int | None = 256
    timeout_s: float = 60.0
    max_retries: int = 2
    seed: int = 0
    #: stop (EndpointDownError) after this many calls in a row to one model failed, each
    #: after its retries; 0 never stops
    max_consecutive_failures: int = 20
    #: longest wait a 429/503 reply's Retry-After can impose before the next attempt
    retry_after_max_s: float = 60.0


@dataclass(frozen=True)
class NodeRun:
    """What one node did on one question."""

    node_id: str
    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    usd: float = 0.0
    flops: float = 0.0
    cached: bool = False
    error: str | None = None
    skipped: bool = False  # not run because a predecessor failed

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class CallStats:
    """Counters of an executor: ``made`` calls reached an endpoint (successful or not),
    ``cached`` were served by the ledger, ``shared`` awaited an identical call in flight."""

    made: int = 0
    cached: int = 0
    shared: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Caller(Protocol):
    """What a compiled graph's nodes call (one caller per graph run)."""

    async def call(self, node: Node, messages: list[dict[str, str]]) -> NodeRun: ...


# -- the LangGraph run-time ------------------------------------------------------------------


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    out.update(b)
    return out


class GraphState(TypedDict):
    question: str
    outputs: Annotated[dict, _merge]


def lg_name(node_id: str) -> str:
    """LangGraph node name of a graph node (never clashes with state keys or START/END)."""
    return f"node_{node_id}"


def compile_graph(graph: Graph, prompts: PromptSet):
    """Compile ``graph`` into a LangGraph runnable.

    Invoke it with ``{"question": text, "outputs": {}}`` and
    ``config={"configurable": {"graphtune_caller": caller}}``; the final state's
    ``outputs`` maps every node id to its :class:`NodeRun` and ``graph.sink`` is the answer.
    """
    try:
        from langgraph.graph import END, START, StateGraph
    except ImportError:
        raise EnvError("the live environment needs LangGraph; install it with `pip install 'graphtune[llm]'` "
                       "(or `pip install langgraph`)") from None
    sink = graph.sink  # raises GraphError unless exactly one sink
    order = graph.topo_order  # raises GraphError on a cycle
    builder = StateGraph(GraphState)
    for nid in order:
        builder.add_node(lg_name(nid), _node_fn(graph.node_map[nid], graph.preds[nid], prompts))
    for nid in order:
        preds = graph.preds[nid]
        if not preds:
            builder.add_edge(START, lg_name(nid))
        elif len(preds) == 1:
            builder.add_edge(lg_name(preds[0]), lg_name(nid))
        else:  # a join: runs once, after all predecessors
            builder.add_edge([lg_name(p) for p in preds], lg_name(nid))
    builder.add_edge(lg_name(sink), END)
    return builder.compile()


def _node_fn(node: Node, preds: tuple[str, ...], prompts: PromptSet):
    async def run(state: GraphState, config) -> dict:
        caller: Caller = config["configurable"]["graphtune_caller"]
        outs = state["outputs"]
        failed = [p for p in preds if not outs[p].ok]
        if failed:
            return {"outputs": {node.id: NodeRun(node.id, None, error=outs[failed[0]].error, skipped=True)}}
        msgs = prompts.messages(node.role, state["question"], [outs[p].text for p in preds])
        return {"outputs": {node.id: await caller.call(node, msgs)}}

    run.__name__ = f"graphtune_{node.role}"
    return run


# -- the executor ------------------------------------------------------------------------------

AcompleteFn = Callable[..., Awaitable[Any]]
NO_ACOMPLETE = ("the live environment needs an LLM client: pass acomplete=, an async completion function such "
                "as graphtune.llm.acomplete (graphtune.api passes it when it builds the environment from a spec)")


class Executor:
    """Makes the LLM calls of graph runs: ledger, sharing, concurrency limits, costing.

    Use it from one event loop. ``acomplete`` makes one call: an async function with the
    signature of :func:`graphtune.llm.acomplete` (which the app passes, with the spec's
    ``retry_after_max_s``; tests and benchmarks may pass a fake). It is required: the
    environments do not import the LLM client."""

    def __init__(self, endpoints: Mapping[str, Endpoint], *, settings: CallSettings = CallSettings(),
                 concurrency: int = 16, ledger: CallLedger | None = None, cache: bool = True,
                 study: str | None = None, acomplete: AcompleteFn | None = None):
        if concurrency < 1:
            raise EnvError(f"concurrency must be >= 1 (got {concurrency})")
        if acomplete is None:
            raise EnvError(NO_ACOMPLETE)
        self.endpoints = dict(endpoints)
        self.settings = settings
        self.concurrency = int(concurrency)
        self.ledger = ledger
        self.cache = bool(cache)
        self.study = study
        self._acomplete = acomplete
        self.stats = CallStats()
        self._global: asyncio.Semaphore | None = None
        self._per_model: dict[str, asyncio.Semaphore] = {}
        self._inflight: dict[str, asyncio.Future] = {}
        self._fail_streak: dict[str, int] = {}  # model -> calls in a row that failed
        #: set when a model's failures tripped the early stop: every call then raises it
        #: until ``reset_failures`` (the next evaluation)
        self.tripped: EndpointDownError | None = None
        self.share = 1  # this process's part of the limits is 1/share (graphtune worker)

    def set_share(self, workers: int) -> None:
        """Use ``1/workers`` of the global and per-model limits (at least one call each)
        from the next graph run on; call it between evaluations."""
        workers = max(1, int(workers))
        if workers != self.share:
            self.share = workers
            self._global, self._per_model = None, {}

    def caller(self) -> _RunCaller:
        """A caller for one graph run (it numbers the samples of identical requests)."""
        return _RunCaller(self)

    def endpoint(self, name: str) -> Endpoint:
        try:
            return self.endpoints[name]
        except KeyError:
            raise EnvError(f"model {name!r} has no endpoint; known models: {sorted(self.endpoints)}") from None

    def request(self, node: Node) -> tuple[Endpoint, dict[str, Any]]:
        ep = self.endpoint(node.model)
        p = node.params_dict
        params: dict[str, Any] = {"temperature": float(p.get("temperature", self.settings.temperature))}
        mt = p.get("max_tokens", self.settings.max_tokens)
        if mt is not None:
            params["max_tokens"] = int(mt)
        return ep, params

    def _sems(self, ep: Endpoint) -> tuple[asyncio.Semaphore, asyncio.Semaphore | None]:
        if self._global is None:
            self._global = asyncio.Semaphore(max(1, self.concurrency // self.share))
        sem = None
        if ep.max_concurrency:
            sem = self._per_model.get(ep.name)
            if sem is None:
                sem = self._per_model[ep.name] = asyncio.Semaphore(max(1, ep.max_concurrency // self.share))
        return self._global, sem

    def cost(self, ep: Endpoint, prompt_tokens: int, completion_tokens: int) -> tuple[float, float]:
        """(usd, flops) of a call, from the spec's tables and the measured tokens."""
        return (node_usd(ep.info, prompt_tokens, completion_tokens),
                node_flops(ep.info, prompt_tokens, completion_tokens))

    async def call(self, node: Node, messages: list[dict[str, str]], sample_index: int,
                   ep: Endpoint, params: dict[str, Any], key: str) -> NodeRun:
        if self.cache:
            fut = self._inflight.get(key)
            if fut is not None:  # an identical call is in flight: make it once
                self.stats.shared += 1
                rec = await asyncio.shield(fut)
                return self._node_run(node, ep, rec, cached=True)
            if self.ledger is not None and self.ledger.may_have(key):
                rec = await asyncio.to_thread(self.ledger.get, key)
                if rec is not None:
                    self.stats.cached += 1
                    return self._node_run(node, ep, rec, cached=True)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        claimed = False
        try:
            rec = None
            if self.cache and self.ledger is not None and self.ledger.shared:
                rec, claimed = await self._claim_or_wait(key)
            made = rec is None
            if made:
                rec = await self._make_call(node, messages, sample_index, ep, params, key)
            fut.set_result(rec)
        except BaseException as e:
            if claimed:  # no record will release it (a record, even a failed call's, does)
                try:
                    self.ledger.release(key)
                except Exception:
                    pass  # a dead claim is taken over once this worker's heartbeat stops
            fut.set_exception(e)
            fut.exception()  # mark retrieved: nobody may be waiting on it
            raise
        finally:
            self._inflight.pop(key, None)
        if not made:
            self.stats.cached += 1
        return self._node_run(node, ep, rec, cached=not made)

    async def _claim_or_wait(self, key: str) -> tuple[CallRecord | None, bool]:
        """With a ledger shared between worker processes: ``(None, True)`` when this
        process now holds the call ``key``, or ``(record, False)`` with the reply another
        process made (waited for while it was in flight)."""
        led = self.ledger
        delay = 0.02
        while True:
            if await asyncio.to_thread(led.claim, key):
                rec = await asyncio.to_thread(led.get, key)  # recorded between our miss and our claim?
                if rec is not None:
                    await asyncio.to_thread(led.release, key)
                    return rec, False
                return None, True
            while True:  # another worker is making it: wait for its reply
                await asyncio.sleep(delay)
                delay = min(0.25, delay * 1.5)
                rec = await asyncio.to_thread(led.get, key)
                if rec is not None:
                    return rec, False
                if await asyncio.to_thread(led.claim_status, key) == "free":
                    break  # its call failed or its worker died: claim it ourselves

    async def _make_call(self, node: Node, messages, sample_index: int, ep: Endpoint, params: dict[str, Any],
                         key: str) -> CallRecord:
        acomplete = self._acomplete
        s = self.settings
        g, m = self._sems(ep)
        base = dict(key=key, model=ep.name, endpoint=ep.key_identity, messages=messages, params=params,
                    sample_index=sample_index, study=self.study)
        t0 = time.perf_counter()
        if self.tripped is not None:  # stopping: make no new call
            raise self.tripped
        try:
            if m is not None:
                async with m, g:
                    if self.tripped is not None:  # tripped while this call waited for a slot
                        raise self.tripped
                    reply = await acomplete(ep.model, messages, api_base=ep.api_base, api_key_env=ep.api_key_env,
                                            timeout_s=s.timeout_s, max_retries=s.max_retries, **params)
            else:
                async with g:
                    if self.tripped is not None:
                        raise self.tripped
                    reply = await acomplete(ep.model, messages, api_base=ep.api_base, api_key_env=ep.api_key_env,
                                            timeout_s=s.timeout_s, max_retries=s.max_retries, **params)
        except LLMTransientError as e:
            self.stats.made += 1
            self.stats.failed += 1
            rec = CallRecord(**base, latency_s=time.perf_counter() - t0, error=str(e))
            if self.ledger is not None:
                self.ledger.put(rec)
            self._failed(ep, e)
            return rec
        except LLMFatalError as e:
            self.stats.made += 1
            self.stats.failed += 1
            if self.ledger is not None:
                self.ledger.put(CallRecord(**base, latency_s=time.perf_counter() - t0, error=f"fatal: {e}"))
            raise
        self.stats.made += 1
        self._fail_streak[ep.name] = 0
        pt, ct = int(reply.prompt_tokens), int(reply.completion_tokens)
        self.stats.prompt_tokens += pt
        self.stats.completion_tokens += ct
        usd, flops = self.cost(ep, pt, ct)
        rec = CallRecord(**base, reply=reply.text, prompt_tokens=pt, completion_tokens=ct,
                         latency_s=float(reply.seconds), usd=usd, flops=flops)
        if self.ledger is not None:
            self.ledger.put(rec)
        return rec

    def _failed(self, ep: Endpoint, e: LLMTransientError) -> None:
        """Count a call that failed after its retries; raise EndpointDownError once
        ``max_consecutive_failures`` calls in a row to this model have failed."""
        n = self._fail_streak[ep.name] = self._fail_streak.get(ep.name, 0) + 1
        limit = self.settings.max_consecutive_failures
        if limit and n >= limit:
            self._fail_streak[ep.name] = 0  # a resumed run starts counting afresh
            self.tripped = EndpointDownError(
                f"model {ep.name!r}: {n} calls in a row failed, the last: {e}; stopped early, nothing finished is "
                "lost: run the same command again once the endpoint answers (`graphtune validate SPEC "
                "--check-endpoints` checks it), or raise env.max_consecutive_failures")
            raise self.tripped

    def reset_failures(self) -> None:
        """Allow calls again after an early stop (a new evaluation tries the endpoint anew)."""
        self.tripped = None

    def _node_run(self, node: Node, ep: Endpoint, rec: CallRecord, *, cached: bool) -> NodeRun:
        if not rec.ok:
            return NodeRun(node.id, None, latency_s=rec.latency_s, cached=cached, error=rec.error)
        # priced from the current spec's table, whenever the call was made
        usd, flops = self.cost(ep, rec.prompt_tokens, rec.completion_tokens)
        return NodeRun(node.id, rec.reply, rec.prompt_tokens, rec.completion_tokens, rec.latency_s, usd, flops,
                       cached=cached)


class _RunCaller:
    """The caller of one graph run: numbers identical requests as samples 0, 1, ..."""

    __slots__ = ("ex", "seen")

    def __init__(self, ex: Executor):
        self.ex = ex
        self.seen: dict[str, int] = {}

    async def call(self, node: Node, messages: list[dict[str, str]]) -> NodeRun:
        ep, params = self.ex.request(node)
        base = call_key(ep.key_identity, messages, params, 0)
        k = self.seen.get(base, 0)
        self.seen[base] = k + 1
        params = {**params, "seed": self.ex.settings.seed + k}
        key = call_key(ep.key_identity, messages, params, k)
        return await self.ex.call(node, messages, k, ep, params, key)


# -- results ---------------------------------------------------------------------------------


def critical_path_s(graph: Graph, runs: Mapping[str, NodeRun]) -> float:
    """Latency of a graph run: longest path of node latencies (nodes of a level in parallel)."""
    finish: dict[str, float] = {}
    for nid in graph.topo_order:
        start = max((finish[p] for p in graph.preds[nid]), default=0.0)
        r = runs.get(nid)
        finish[nid] = start + (r.latency_s if r is not None else 0.0)
    return max(finish.values(), default=0.0)


class _Example(Protocol):
    id: str
    question: str
    answer: Any


def question_result(graph: Graph, example: _Example, runs: Mapping[str, NodeRun], scorer,
                    score_nodes: bool = True) -> QuestionResult:
    """Score a finished graph run: the sink's output decides; every node is scored too
    (per-node correctness feeds the agent), unless ``score_nodes`` is False."""
    pt = sum(r.prompt_tokens for r in runs.values())
    ct = sum(r.completion_tokens for r in runs.values())
    flops = sum(r.flops for r in runs.values())
    usd = sum(r.usd for r in runs.values())
    latency = critical_path_s(graph, runs)
    sink = runs.get(graph.sink)
    failed = [(nid, r.error) for nid, r in sorted(runs.items()) if r.error and not r.skipped]
    errors = [e for _, e in failed]
    nodes = []
    for nid in graph.topo_order:
        r = runs.get(nid)
        if r is None:
            continue
        correct = None
        answer = r.text or ""
        if r.ok and score_nodes and nid != graph.sink:
            s = _score(scorer, r.text, example)
            correct, answer = s.correct, (s.extracted if s.extracted is not None else "")
        nodes.append((nid, r, answer, correct))
    if sink is None or not sink.ok or errors:
        reason = errors[0] if errors else (sink.error if sink is not None else "the sink did not run")
        outs = tuple(NodeOutcome(nid, str(a), c, r.prompt_tokens, r.completion_tokens, r.latency_s)
                     for nid, r, a, c in nodes)
        return QuestionResult(question_id=example.id, answer=None, correct=None, score=0.0, prompt_tokens=pt,
                              completion_tokens=ct, flops=flops, usd=usd, latency_s=latency,
                              error=f"infrastructure: {reason}", nodes=outs,
                              failed_model=graph.node_map[failed[0][0]].model if failed else None)
    s = _score(scorer, sink.text, example)
    outs = []
    for nid, r, a, c in nodes:
        if nid == graph.sink:
            a, c = (s.extracted if s.extracted is not None else ""), s.correct
        outs.append(NodeOutcome(nid, str(a), c, r.prompt_tokens, r.completion_tokens, r.latency_s))
    if s.correct is None:  # the scorer could not judge (e.g. its sandbox failed): not a wrong answer
        return QuestionResult(question_id=example.id, answer=s.extracted, correct=None, score=0.0,
                              prompt_tokens=pt, completion_tokens=ct, flops=flops, usd=usd, latency_s=latency,
                              error=f"scorer: {s.error or 'could not score the answer'}", nodes=tuple(outs))
    return QuestionResult(question_id=example.id, answer=s.extracted if s.extracted is not None else sink.text,
                          correct=bool(s.correct), score=float(s.score), prompt_tokens=pt, completion_tokens=ct,
                          flops=flops, usd=usd, latency_s=latency, nodes=tuple(outs))


@dataclass(frozen=True)
class _Score:
    correct: bool | None
    score: float
    extracted: str | None
    error: str | None = None


def _score(scorer, output: str, example) -> _Score:
    try:
        s = scorer.score(output, example)
    except (GraphtuneError, KeyboardInterrupt):  # a configuration mistake: stop, do not score on
        raise
    except Exception as e:  # noqa: BLE001 - a scorer bug must not look like a wrong answer
        return _Score(None, 0.0, None, f"{type(e).__name__}: {e}")
    return _Score(s.correct, float(s.score if s.score is not None else float(bool(s.correct))),
                  s.extracted, getattr(s, "error", None))


# -- the environment ---------------------------------------------------------------------------


class _LoopThread:
    """A private event loop in a daemon thread: ``evaluate`` is synchronous, and the
    endpoints' async clients stay bound to one loop for the environment's life."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="graphtune-live", daemon=True)
        self.thread.start()

    def run(self, coro):
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    def close(self) -> None:
        if self.loop.is_closed():
            return

        async def drain() -> None:  # as asyncio.run does: no task is left pending (litellm starts some)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()

        try:
            asyncio.run_coroutine_threadsafe(drain(), self.loop).result(10)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class LocalServerHandle(Protocol):
    model: str
    api_base: str

    def start(self) -> Any: ...

    def stop(self) -> None: ...


@dataclass(eq=False)
class LiveEnvironment(Environment):
    """Runs graphs on real endpoints (see the module docstring).

    ``dev`` and ``test`` are lists of examples (``id``, ``question``, ``answer``);
    ``scorer.score(output, example)`` judges an output; ``servers`` maps model names to
    local servers started on first use (their endpoints are filled in then) and stopped
    by :meth:`close`. ``shape`` (A, B for analytic costing) defaults to an estimate: A is
    the mean length of the from-scratch prompt over the dev questions (chars / 4), B the
    completion cap ``settings.max_tokens`` (256 when unset). ``acomplete`` (required) makes
    the LLM calls and ``ledger`` (a :class:`~graphtune.envs.base.CallLedger`, or a
    function that opens one on first use) records and serves them: see :class:`Executor`;
    :func:`graphtune.api.build_live_env` wires both from a spec."""

    dev: Sequence[Any]
    test: Sequence[Any]
    scorer: Any
    prompts: PromptSet
    endpoints: Mapping[str, Endpoint]
    settings: CallSettings = field(default_factory=CallSettings)
    concurrency: int = 16
    ledger: CallLedger | Callable[[], CallLedger] | None = None  # a factory is called on first use
    cache: bool = True
    study: str | None = None
    task_shape: TaskShape | None = None
    servers: Mapping[str, LocalServerHandle] = field(default_factory=dict)
    description: str | None = None
    score_nodes: bool = True
    acomplete: AcompleteFn | None = None

    kind = "live"

    def __post_init__(self) -> None:
        self._examples = {e.id: e for e in [*self.dev, *self.test]}
        if len(self._examples) != len(self.dev) + len(self.test):
            raise EnvError("the dataset has duplicate example ids; give every example a unique id")
        self.executor = Executor(self.endpoints, settings=self.settings, concurrency=self.concurrency,
                                 ledger=None, cache=self.cache, study=self.study, acomplete=self.acomplete)
        self._compiled: dict[Graph, Any] = {}
        self._loop: _LoopThread | None = None
        self._started = False
        self._closed = False

    # -- Environment -------------------------------------------------------------------
    def split(self, name: str) -> list[str]:
        if name not in ("dev", "test"):
            raise EnvError(f"unknown split {name!r}; known splits: dev, test")
        return [e.id for e in (self.dev if name == "dev" else self.test)]

    @property
    def shape(self) -> TaskShape:
        if self.task_shape is None:
            self.task_shape = estimate_shape(self.dev or self.test, self.prompts, self.settings)
        return self.task_shape

    def describe(self) -> str:
        return self.description or f"live {self.prompts.style} task with {len(self.dev)} dev questions"

    def share_limits(self, workers: int) -> None:
        self.executor.set_share(workers)

    def share_calls(self, owner: str, *, stale_after_s: float) -> None:
        self._share_calls = (owner, float(stale_after_s))
        if isinstance(self.ledger, CallLedger) and hasattr(self.ledger, "share"):
            self.ledger.share(owner, stale_after_s=stale_after_s)

    def evaluate(self, graph: Graph, question_ids: Sequence[str]) -> list[QuestionResult]:
        return self.run_sync(self.aevaluate(graph, question_ids))

    def run_sync(self, coro):
        """Run the coroutine ``coro`` on this environment's event loop (its servers started
        and ledger opened first) and return its result; what ``evaluate`` does, for layers
        over this environment (e.g. :mod:`graphtune.envs.live_pipeline`)."""
        if self._closed:
            coro.close()
            raise EnvError("the live environment is closed")
        try:
            self.start()
        except BaseException:  # a server that cannot start: the coroutine never runs
            coro.close()
            raise
        if self._loop is None:
            self._loop = _LoopThread()
        return self._loop.run(coro)

    def run_text(self, graph: Graph, question: str) -> dict[str, NodeRun]:
        """Run ``graph`` once on a question text (synchronous); every node's run."""

        async def go():
            try:
                return await self.run_graph(graph, question)
            finally:
                if isinstance(self.ledger, CallLedger):
                    await asyncio.to_thread(self.ledger.flush)

        return self.run_sync(go())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if isinstance(self.ledger, CallLedger):
                self.ledger.close()
        finally:
            if self._loop is not None:
                self._loop.close()
            for srv in self.servers.values():
                srv.stop()

    # -- async API -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the local servers (once) and point their models' endpoints at them."""
        if self._started:
            return
        if self.ledger is not None and not isinstance(self.ledger, CallLedger):
            self.ledger = self.ledger()  # opened on first use: `validate` writes nothing
            share = getattr(self, "_share_calls", None)
            if share is not None and hasattr(self.ledger, "share"):
                self.ledger.share(share[0], stale_after_s=share[1])
        self.executor.ledger = self.ledger
        eps = dict(self.executor.endpoints)
        for name, srv in self.servers.items():
            srv.start()
            ep = eps[name]
            eps[name] = Endpoint(ep.name, srv.model, ep.info, api_base=srv.api_base, api_key_env=None,
                                 identity=ep.identity, max_concurrency=ep.max_concurrency)
        self.executor.endpoints = eps
        self._started = True

    def compiled(self, graph: Graph):
        c = self._compiled.get(graph)
        if c is None:
            if len(self._compiled) > 256:  # a long search sees many graphs: keep memory bounded
                self._compiled.clear()
            c = self._compiled[graph] = compile_graph(graph, self.prompts)
        return c

    def example(self, qid: str):
        try:
            return self._examples[qid]
        except KeyError:
            raise EnvError(f"unknown question id {qid!r}") from None

    async def aevaluate(self, graph: Graph, question_ids: Sequence[str]) -> list[QuestionResult]:
        """Run ``graph`` on the questions concurrently; one result per id, same order.
        An ``LLMFatalError`` cancels the rest and propagates."""
        self.start()
        self.executor.reset_failures()
        examples = [self.example(q) for q in question_ids]
        app = self.compiled(graph)
        # questions in progress at once: enough to keep every call slot busy, few enough
        # that thousands of queued questions do not each hold a live LangGraph run
        admit = asyncio.Semaphore(max(8, 2 * self.concurrency))

        async def one(ex):
            async with admit:
                return await self._one(graph, app, ex)

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
            if isinstance(self.ledger, CallLedger):
                await asyncio.to_thread(self.ledger.flush)

    async def run_graph(self, graph: Graph, question: str) -> dict[str, NodeRun]:
        """Run ``graph`` once on a question text; every node's :class:`NodeRun`."""
        state = await self.compiled(graph).ainvoke(
            {"question": question, "outputs": {}},
            config={"configurable": {"graphtune_caller": self.executor.caller()},
                    "recursion_limit": graph.depth + 8})
        return state["outputs"]

    async def _one(self, graph: Graph, app, example) -> QuestionResult:
        state = await app.ainvoke({"question": example.question, "outputs": {}},
                                  config={"configurable": {"graphtune_caller": self.executor.caller()},
                                          "recursion_limit": graph.depth + 8})
        runs = state["outputs"]
        if type(self.scorer).__name__ not in INLINE_SCORERS:  # slow scorers stay off the loop
            return await asyncio.to_thread(question_result, graph, example, runs, self.scorer, self.score_nodes)
        return question_result(graph, example, runs, self.scorer, self.score_nodes)


def estimate_shape(examples: Sequence[Any], prompts: PromptSet, settings: CallSettings) -> TaskShape:
    """A (mean from-scratch prompt tokens, chars/4) and B (the completion cap)."""
    if not examples:
        raise EnvError("cannot estimate the task's prompt length without questions; give task.input_tokens")
    chars = [sum(len(m["content"]) for m in prompts.messages("assistant", e.question)) + 12 * 2 for e in examples]
    a = max(1.0, math.ceil(sum(chars) / len(chars) / CHARS_PER_TOKEN))
    b = float(settings.max_tokens or 256)
    return TaskShape(a, b)
