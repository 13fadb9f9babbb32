"""Python API: build the pieces a spec describes and run or continue a study.

This is the composition root: the layers below (graphs, envs, agent, store, search) do
not import each other sideways or the app, so the pieces they need from elsewhere are
wired here: the store's call ledger into the live environment, the LLM client
(:mod:`graphtune.llm`) into the live environment, the ``llm-judge`` scorer and the
searchers whose proposals come from an LLM. The CLI is a thin layer over these
functions; nothing here imports the CLI.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphtune.envs.base import Environment
from graphtune.errors import BudgetError, GraphError, SpecError
from graphtune.graphs.cost import Budget, CostModel, GraphCost, PipelineCost, PipelineCostModel, TaskShape
from graphtune.graphs.space import check_space_not_empty
from graphtune.search.base import Objective, SearchContext, Searcher
from graphtune.spec import Spec

#: spec fields that may change when a stored study is continued (they change how graphs
#: are run, not what a result means)
SAFE_TO_CHANGE = {("search", "evaluations"), ("storage",), ("env", "cache"), ("env", "concurrency"),
                  ("env", "timeout_s"), ("env", "max_retries"), ("env", "max_consecutive_failures"),
                  ("env", "retry_after_max_s")}


#: every secret value this process has seen in a spec (API keys from `api_key_env`, storage
#: passwords): the CLI runs its messages through it (``redact``); stores get their own set
_SEEN_SECRETS = None


def spec_secrets(spec: Spec) -> set[str]:
    """The secret values a spec refers to: the values of its models' ``api_key_env``
    variables (when set) and the password of its storage URL. Stores are given these so
    that nothing they write holds them (a key pasted into a question, echoed in a reply)."""
    import os

    from graphtune.store.storage import url_password

    out = {os.environ.get(m.api_key_env) for m in spec.models if getattr(m, "api_key_env", None)}
    out.add(url_password(spec.storage))
    out = {v for v in out if v}
    _seen().add(out)
    return out


def _seen():
    global _SEEN_SECRETS
    if _SEEN_SECRETS is None:
        from graphtune.store.redact import Redactor

        _SEEN_SECRETS = Redactor()
    return _SEEN_SECRETS


def redact(text: str) -> str:
    """``text`` without any secret value a spec of this process referred to."""
    return _seen().text(text)


@dataclass
class Problem:
    """Everything built from a spec: environment, costing, search context."""

    spec: Spec
    env: Environment
    costs: CostModel
    ctx: SearchContext
    test_ids: list[str]


def task_shape(spec: Spec) -> TaskShape:
    from graphtune.envs.simulated import load_profile

    prof = load_profile(spec.task.profile)
    a = spec.task.input_tokens or prof.input_tokens
    b = spec.task.output_tokens or prof.output_tokens
    return TaskShape(a, b)


def live_acomplete(settings):
    """The live environment's LLM client: :func:`graphtune.llm.acomplete` with the spec's
    ``retry_after_max_s`` cap (``settings``: the environment's ``CallSettings``)."""
    from functools import partial

    from graphtune.llm import acomplete

    return partial(acomplete, retry_after_max_s=settings.retry_after_max_s)


def llm_complete():
    """The synchronous LLM client handed to the judge scorer, the LLM agent and llm-opt:
    :func:`graphtune.llm.complete` (imports no litellm until a call is made)."""
    from graphtune.llm import complete

    return complete


def build_live_env(spec: Spec, examples: list | None = None):
    """The live environment a spec describes: its dataset split into dev and test, its
    scorer and prompts, an endpoint per model (local llama.cpp servers and managed vLLM
    servers are started on first use and stopped by ``env.close()``), and the call ledger
    in the spec's store.

    The task shape (A, B) is ``task.input_tokens``/``task.output_tokens`` when given, else
    estimated from the data: A from the dev questions' from-scratch prompts (chars / 4),
    B = ``env.max_tokens`` (the completion cap; conservative)."""
    from graphtune.envs.datasets import load_dataset, split_examples
    from graphtune.envs.live import CallSettings, Endpoint, LiveEnvironment, estimate_shape
    from graphtune.envs.prompts import build_prompts
    from graphtune.envs.scorers import default_scorer_for, get_scorer
    from graphtune.store.ledger import open_ledger

    t = spec.task
    if examples is None:
        examples = load_dataset(spec.dataset_source(), fields=t.fields, preset=t.preset)
        dev, test = split_examples(examples, dev_size=t.dev_size, test_size=t.test_size, seed=spec.env.seed)
    else:  # `graphtune run --dataset`: every example is a question to run
        dev, test = list(examples), []
    scorer_name = t.scorer or default_scorer_for(t.preset)
    if "complete" in t.scorer_options:  # the LLM client is the app's to give, not an option
        raise SpecError(f"scorer {scorer_name}: unknown option 'complete' in task.scorer_options")
    scorer = get_scorer(scorer_name, complete=llm_complete(), **t.scorer_options)
    prompts = build_prompts(t.prompts.style, t.prompts.model_dump(), scorer=scorer_name, preset=t.preset,
                            roles=spec.role_templates())
    e = spec.env
    settings = CallSettings(temperature=e.temperature, max_tokens=e.max_tokens, timeout_s=e.timeout_s,
                            max_retries=e.max_retries, seed=e.seed, max_consecutive_failures=e.max_consecutive_failures,
                            retry_after_max_s=e.retry_after_max_s)
    pool = spec.pool()
    endpoints, servers = {}, {}
    for m in spec.models:
        if m.provider == "local":
            from graphtune.local_server import LocalLLMServer, smollm2_path

            path = m.model_path or str(smollm2_path())
            slots = 1 if m.deterministic else (m.max_concurrency or 4)
            servers[m.name] = LocalLLMServer(path, alias=m.name, n_parallel=slots, seed=e.seed,
                                             deterministic=m.deterministic,
                                             startup_timeout_s=m.startup_timeout_s or 120.0)
            # the ledger names the model file, not the server's random port; a deterministic
            # server's replies are kept apart from replies that depended on batching
            identity = f"local:{Path(path).name}" + (":deterministic" if m.deterministic else "")
            endpoints[m.name] = Endpoint(m.name, f"openai/{m.name}", pool[m.name], identity=identity,
                                         max_concurrency=slots if m.deterministic else m.max_concurrency)
        elif m.provider == "vllm":
            from graphtune.vllm_server import VLLMServer

            servers[m.name] = VLLMServer(m.model, name=m.name, command=m.vllm_command, port=m.port or 0,
                                         args=m.vllm_args, gpu_memory_utilization=m.gpu_memory_utilization,
                                         max_num_seqs=m.max_concurrency, startup_timeout_s=m.startup_timeout_s)
            # the ledger names the served model and its arguments, not the port
            identity = "vllm:" + " ".join([m.model, *m.vllm_args])
            endpoints[m.name] = Endpoint(m.name, f"hosted_vllm/{m.model}", pool[m.name], identity=identity,
                                         max_concurrency=m.max_concurrency)
        else:
            endpoints[m.name] = Endpoint(m.name, m.litellm or m.name, pool[m.name], api_base=m.api_base,
                                         api_key_env=m.api_key_env, max_concurrency=m.max_concurrency)
    shape = None
    if t.input_tokens and t.output_tokens:
        shape = TaskShape(t.input_tokens, t.output_tokens)
    elif t.input_tokens or t.output_tokens:
        est = estimate_shape(dev or test, prompts, settings)
        shape = TaskShape(t.input_tokens or est.input_tokens, t.output_tokens or est.output_tokens)
    return LiveEnvironment(dev, test, scorer, prompts, endpoints, settings=settings, concurrency=e.concurrency,
                           ledger=lambda: open_ledger(spec.storage, secrets=spec_secrets(spec)), cache=e.cache,
                           study=spec.study, task_shape=shape,
                           servers=servers, description=t.description, acomplete=live_acomplete(settings))


def build_live_pipeline_env(spec: Spec, examples: list | None = None, pipeline=None):
    """The live environment of a multi-stage spec (``env.kind: live`` with ``pipeline``):
    :func:`build_live_env`'s questions, scorer, endpoints and ledger, and per stage its
    inputs, ``prompt`` template and prompts (the task's ``prompts`` with the stage's own
    fields over them) and its task shape (the stage's ``input_tokens``/``output_tokens``,
    else the task's, else estimated: ``graphtune.envs.live_pipeline.estimate_stage_shapes``).

    ``pipeline`` (``graphtune run``): the stages to run are this pipeline's; with a
    multi-stage spec they must be the spec's (names and inputs), with a single-stage spec
    every stage takes the task's prompts and the default stage text."""
    from graphtune.envs.live_pipeline import LivePipelineEnvironment, LiveStage
    from graphtune.envs.prompts import build_prompts
    from graphtune.envs.scorers import default_scorer_for

    declared = {}
    if spec.is_pipeline:
        declared = {s.name: s for s in spec.pipeline.stages}
        want = [(s.name, tuple(s.inputs)) for s in spec.pipeline_space().stages]
    if pipeline is None:
        wiring = want if spec.is_pipeline else None
        if wiring is None:
            raise SpecError("this spec has no `pipeline` section; give the pipeline's stages under pipeline.stages")
    else:
        wiring = [(s.name, tuple(s.inputs)) for s in pipeline.stages]
        if spec.is_pipeline and wiring != want:
            raise SpecError(f"the pipeline's stages (inputs) {[(n, list(i)) for n, i in wiring]} are not the spec's "
                            f"pipeline.stages {[(n, list(i)) for n, i in want]}; run it with the spec of its study")
    t = spec.task
    scorer_name = t.scorer or default_scorer_for(t.preset)
    base = t.prompts.model_dump()
    stages = []
    for name, inputs in wiring:
        st = declared.get(name)
        over = {**base, **{k: v for k, v in st.prompts.model_dump().items() if v is not None}} if st else base
        try:
            prompts = build_prompts(over.get("style"), over, scorer=scorer_name, preset=t.preset,
                                    roles=spec.role_templates())
        except SpecError as e:
            raise SpecError(f"pipeline stage {name!r}: {e}") from None
        stages.append(LiveStage(name, inputs, prompts, prompt=st.prompt if st else None,
                                input_tokens=(st.input_tokens if st else None) or t.input_tokens,
                                output_tokens=(st.output_tokens if st else None) or t.output_tokens,
                                description=(st.description or "") if st else ""))
    live = build_live_env(spec, examples)
    return LivePipelineEnvironment(live, stages, description=t.description)


def check_endpoints(spec: Spec) -> list[tuple[str, bool, str]]:
    """``graphtune validate --check-endpoints``: per pool model, ``(name, ok, detail)``
    after checking that its ``api_key_env`` variable is set and making one cheap call
    (one completion token, no retry, not recorded). A local or vLLM model is not started
    (for vLLM only its executable is looked up)."""
    import os

    from graphtune.errors import LLMError
    from graphtune.llm import ping

    if spec.env.kind != "live":
        raise SpecError(f"--check-endpoints checks the endpoints of a live spec; this one has env.kind "
                        f"{spec.env.kind!r} (set `env: {{kind: live}}`)")
    out = []
    timeout_s = min(spec.env.timeout_s, 30.0)
    for m in spec.models:
        if m.provider == "local":
            out.append((m.name, True, "local llama.cpp server: started on first use, not checked"))
            continue
        if m.provider == "vllm":
            import shutil

            exe = m.vllm_command or "vllm"
            if shutil.which(exe) is None:
                out.append((m.name, False, f"vLLM executable `{exe}` not found; install it with `pip install vllm` "
                                           "or name it with the model's `vllm_command` option"))
            else:
                out.append((m.name, True, f"vLLM server ({exe} serve {m.model}): started on first use, not checked"))
            continue
        if m.api_key_env and not os.environ.get(m.api_key_env):
            out.append((m.name, False, f"environment variable {m.api_key_env} (api_key_env) is not set; "
                                       f"export {m.api_key_env}=<your key>"))
            continue
        try:
            secs = ping(m.litellm or m.name, api_base=m.api_base, api_key_env=m.api_key_env, timeout_s=timeout_s)
        except LLMError as e:
            out.append((m.name, False, str(e)))
        else:
            out.append((m.name, True, f"answered in {secs:.2f} s"))
    return out


def build_replay_env(spec: Spec):
    """The replay environment: recorded outcomes from a generic record table (or the
    folder of the shared recorded-GSM8K fixture); outcomes that were not recorded are
    modelled with the simulator's rules and flagged (docs/replay.md)."""
    from graphtune.envs.replay import ReplayEnvironment, import_gsm8k_recorded

    src = Path(spec.records_source())
    records = import_gsm8k_recorded(src) if src.is_dir() else src
    t, e = spec.task, spec.env
    # either override alone replaces its half of the estimated shape, as in live
    return ReplayEnvironment(records, spec.pool(), seed=e.seed, dev_size=t.dev_size, test_size=t.test_size,
                             task=e.task, synthesis=e.synthesis, input_tokens=t.input_tokens,
                             output_tokens=t.output_tokens, roles=spec.space_obj().role_specs, answers=e.answers,
                             recorded_only=e.recorded_only, wrong_agreement=e.wrong_agreement)


def records_from_ledger(source, examples, scorer, *, prompts=None, task: str = "task"):
    """:func:`graphtune.envs.replay.records_from_ledger` with the store's ledger opener, so
    ``source`` may be a store URL (its ``gt_llm_calls`` table) as well as a ledger or call
    records: a :class:`~graphtune.envs.replay.RecordTable` of the from-scratch calls."""
    from graphtune.envs.replay import records_from_ledger as from_ledger
    from graphtune.store.ledger import open_ledger

    return from_ledger(source, examples, scorer, prompts=prompts, task=task, open_ledger=open_ledger)


def _live_env_and_costs(spec: Spec, space, budget):
    env = build_live_env(spec)
    try:
        costs = CostModel(spec.pool(), env.shape)
        check_space_not_empty(space, costs, budget)
    except BaseException:
        env.close()
        raise
    return env, costs


def _replay_env_and_costs(spec: Spec, space, budget):
    env = build_replay_env(spec)
    costs = env.costs
    if env.recorded_only:  # a model missing on some split question would be modelled there
        for m in space.models:
            missing = env.unrecorded_questions(m)
            if missing:
                n = len(env.split("dev")) + len(env.split("test"))
                raise SpecError(f"model {m!r} has no record on {len(missing)} of the {n} dev and test questions (e.g. "
                                f"{missing[0]!r}), so env.recorded_only cannot replay it there; remove it from "
                                "space.models, or set env.recorded_only: false")
    check_space_not_empty(space, costs, budget)
    return env, costs


def _simulated_env_and_costs(spec: Spec, space, budget):
    from graphtune.envs.simulated import SimulatedEnvironment

    shape = task_shape(spec)
    costs = CostModel(spec.pool(), shape)
    check_space_not_empty(space, costs, budget)
    env = SimulatedEnvironment(spec.task.profile, costs, seed=spec.env.seed, dev_size=spec.task.dev_size,
                               test_size=spec.task.test_size, roles=space.role_specs)
    return env, costs


#: env kind (graphtune.spec.ENV_KINDS) -> ``(spec, space, budget) -> (environment, cost model)``
ENV_BUILDERS = {"simulated": _simulated_env_and_costs, "live": _live_env_and_costs, "replay": _replay_env_and_costs}


def _check_pipeline_not_empty(space, costs, budget) -> None:
    """Raise a one-line error unless each stage's space has a graph and every stage's
    cheapest graph together (the cheapest pipeline there is) fits the budget and the caps."""
    per = []
    for st in space.stages:
        try:
            c = check_space_not_empty(st.space, costs.of(st.name), Budget())
        except (BudgetError, GraphError) as e:
            raise type(e)(f"pipeline stage {st.name!r}: {e}") from None
        per.append((st.name, dataclasses.replace(c, units=c.flops / costs.unit_flops)))
    total = GraphCost(flops=sum(c.flops for _, c in per), units=sum(c.units for _, c in per),
                      usd=sum(c.usd for _, c in per), latency_s=sum(c.latency_s for _, c in per),
                      prompt_tokens=0.0, completion_tokens=0.0)
    v = budget.violations(PipelineCost(total=total, stages=tuple(per)))
    if v:
        raise BudgetError(f"budget is impossible: even the cheapest pipeline (each stage's cheapest graph) breaks "
                          f"it ({'; '.join(v)}); raise `budget` or the stage's cap")


def _live_pipeline_env_and_costs(spec: Spec, space, budget):
    """A live pipeline: one cost model per stage over the pool, with the stage's task shape
    (its prompt includes its input stages' answers; ``build_live_pipeline_env``)."""
    env = build_live_pipeline_env(spec)
    try:
        pool = spec.pool()
        costs = PipelineCostModel({name: CostModel(pool, shape) for name, shape in env.shapes.items()})
        _check_pipeline_not_empty(space, costs, budget)
    except BaseException:
        env.close()
        raise
    return env, costs


#: the same for multi-stage specs (besides the simulator's, below): ``(spec, pipeline space,
#: pipeline budget) -> (environment, pipeline cost model)``
PIPELINE_ENV_BUILDERS: dict = {"live": _live_pipeline_env_and_costs}


def _simulated_pipeline_env_and_costs(spec: Spec, space, budget):
    """The simulated pipeline of ``task.profile`` (``pipeline-rag``, ``pipeline-tool-use`` or
    a pipeline profile file); the spec's stages must be the profile's, with the same inputs,
    and each stage's models ones the profile models for that stage."""
    from graphtune.envs.simulated.pipelines import BUILTIN_PIPELINES, SimulatedPipelineEnvironment

    name = spec.task.profile
    key = name.removeprefix("pipeline-") if name.startswith("pipeline-") else name
    if key not in BUILTIN_PIPELINES and not Path(name).exists():
        raise SpecError(f"task.profile {name!r} is not a pipeline profile; a multi-stage spec on the simulator takes "
                        f"{', '.join('pipeline-' + k for k in sorted(BUILTIN_PIPELINES))} or a pipeline profile "
                        "file")
    env = SimulatedPipelineEnvironment(key if key in BUILTIN_PIPELINES else name, seed=spec.env.seed,
                                       dev_size=spec.task.dev_size, test_size=spec.task.test_size, pool=spec.pool())
    want = [(s.name, s.inputs) for s in env.profile.stages]
    got = [(s.name, s.inputs) for s in space.stages]
    if want != got:
        raise SpecError(f"pipeline.stages: the simulated pipeline {name!r} has the stages (inputs) "
                        f"{[(n, list(i)) for n, i in want]}, the spec {[(n, list(i)) for n, i in got]}; give its "
                        "stages in that order with those inputs")
    for st in space.stages:
        modelled = env.profile.stage(st.name).profile.model_names
        bad = [m for m in st.space.models if m not in modelled]
        if bad:
            raise SpecError(f"pipeline.stages: stage {st.name!r} uses model(s) {bad}, which the simulated pipeline "
                            f"{name!r} does not model for it; its models: {list(modelled)} (set the stage's "
                            "space.models)")
    _check_pipeline_not_empty(space, env.costs, budget)
    return env, env.costs


def build_problem(spec: Spec) -> Problem:
    """Resolve a spec into an environment and a search context; raises a one-line error
    for an unknown model, an impossible budget or an empty space."""
    space = spec.search_space()
    budget = spec.search_budget()
    if spec.is_pipeline:
        builders = {"simulated": _simulated_pipeline_env_and_costs, **PIPELINE_ENV_BUILDERS}
        if spec.env.kind not in builders:
            raise SpecError(f"env.kind {spec.env.kind!r} does not run multi-stage pipelines; use "
                            f"{' or '.join(repr(k) for k in builders)}")
        env, costs = builders[spec.env.kind](spec, space, budget)
    else:
        env, costs = ENV_BUILDERS[spec.env.kind](spec, space, budget)
    obj = Objective(cost_weight=spec.objective.cost_weight, latency_weight=spec.objective.latency_weight,
                    usd_weight=spec.objective.usd_weight)
    dev = tuple(env.split("dev"))
    ctx = SearchContext(space=space, costs=costs, budget=budget, objective=obj, dev_ids=dev,
                        seed=spec.search.seed, batch_size=spec.search.batch_size,
                        budget_runs=spec.search.evaluations * len(dev), options=dict(spec.search.options),
                        task_description=spec.task.description or env.describe(),
                        agent=spec.search.agent.model_dump())
    return Problem(spec=spec, env=env, costs=costs, ctx=ctx, test_ids=env.split("test"))


@dataclass
class GraphRun:
    """What ``graphtune run`` did: per-question results (and, for one question text, every
    node's run), the graph's cost, and how many calls were made versus served by the ledger."""

    results: list
    node_runs: dict | None
    calls: dict
    #: a pipeline on one question text: every stage's run in order
    #: (``graphtune.envs.live_pipeline.StageRun``: its question text, node runs, answer)
    stage_runs: list | None = None


def check_runnable(graph, spec: Spec) -> None:
    """Raise a GraphError unless every node's model is in the spec's pool and every role
    is one the live environment can prompt (a built-in role or one the spec declares),
    with the inputs its rules ask for."""
    from graphtune.errors import GraphError
    from graphtune.graphs.model import BUILTIN_ROLES

    names = [m.name for m in spec.models]
    space = spec.space_obj()
    known = [*BUILTIN_ROLES, *(spec.roles or {})]
    for n in graph.nodes:
        if n.model not in names:
            raise GraphError(f"node {n.id!r} uses model {n.model!r}, which is not in the spec's pool {names}; "
                             "add it under `models` or change the graph")
        if n.role not in known:
            raise GraphError(f"node {n.id!r} has role {n.role!r}; the live environment runs the roles {known} "
                             "(declare a custom role under `roles` in the spec)")
        rs = space.role_spec(n.role)
        if rs.needs_input and not graph.preds[n.id]:
            alt = " or make it an assistant" if n.role == "fuser" else ""
            raise GraphError(f"node {n.id!r} is a {n.role} without predecessors; give it an input{alt}")
        if not rs.accepts_input and graph.preds[n.id]:
            raise GraphError(f"node {n.id!r} is a {n.role}, which takes no inputs, but has predecessors "
                             f"{list(graph.preds[n.id])}")
    sink = graph.node_map[graph.sink]  # raises unless exactly one sink
    if not space.role_spec(sink.role).may_be_sink:
        raise GraphError(f"the sink {sink.id!r} is a {sink.role}, which may not be the graph's final node "
                         "(`sink: false` under `roles`); end the graph with another node")
    graph.topo_order  # noqa: B018 - raises on a cycle


def run_graph(spec: Spec, graph, *, question: str | None = None, dataset: str | None = None,
              limit: int | None = None) -> GraphRun:
    """Run one graph on live endpoints: on one question text, or on every example of a
    dataset file (read with the spec's fields and preset, scored with its scorer)."""
    from graphtune.envs.datasets import Example, load_dataset
    from graphtune.envs.live import critical_path_s
    from graphtune.graphs.results import QuestionResult

    if spec.env.kind != "live":
        raise SpecError(f"graphtune run needs a spec with `env: {{kind: live}}` (this one is {spec.env.kind!r})")
    if (question is None) == (dataset is None):
        raise SpecError("give exactly one of --question TEXT and --dataset PATH")
    if getattr(graph, "stages", None) is not None:
        return _run_pipeline(spec, graph, question=question, dataset=dataset, limit=limit)
    check_runnable(graph, spec)
    if question is not None:
        examples = [Example(id="question", question=question, answer=None)]
    else:
        examples = load_dataset(dataset, fields=spec.task.fields, preset=spec.task.preset, limit=limit)
    env = build_live_env(spec, examples)
    try:
        if question is not None:
            runs = env.run_text(graph, question)
            pt = sum(r.prompt_tokens for r in runs.values())
            ct = sum(r.completion_tokens for r in runs.values())
            sink = runs[graph.sink]
            errors = [r.error for r in runs.values() if r.error and not r.skipped]

            res = QuestionResult(question_id="question", answer=sink.text, correct=None, prompt_tokens=pt,
                                 completion_tokens=ct, flops=sum(r.flops for r in runs.values()),
                                 usd=sum(r.usd for r in runs.values()), latency_s=critical_path_s(graph, runs),
                                 error=errors[0] if errors else None)
            return GraphRun([res], runs, env.executor.stats.as_dict())
        results = env.evaluate(graph, env.split("dev"))
        return GraphRun(results, None, env.executor.stats.as_dict())
    finally:
        env.close()


def _run_pipeline(spec: Spec, pipeline, *, question: str | None, dataset: str | None,
                  limit: int | None) -> GraphRun:
    """``run_graph`` of a multi-stage pipeline: each stage's graph checked against the spec
    (``check_runnable``), then run stage by stage with the stages' prompts."""
    from graphtune.envs.datasets import Example, load_dataset
    from graphtune.envs.live_pipeline import pipeline_result
    from graphtune.errors import GraphError

    for s in pipeline.stages:
        try:
            check_runnable(s.graph, spec)
        except GraphError as e:
            raise GraphError(f"stage {s.name!r}: {e}") from None
    if question is not None:
        examples = [Example(id="question", question=question, answer=None)]
    else:
        examples = load_dataset(dataset, fields=spec.task.fields, preset=spec.task.preset, limit=limit)
    env = build_live_pipeline_env(spec, examples, pipeline=pipeline)
    try:
        if question is not None:
            runs = env.run_text(pipeline, question)
            res = pipeline_result(pipeline, examples[0], runs, None)
            node_runs = {f"{r.stage}/{nid}": nr for r in runs for nid, nr in r.runs.items()}
            return GraphRun([res], node_runs, env.executor.stats.as_dict(), stage_runs=runs)
        results = env.evaluate(pipeline, env.split("dev"))
        return GraphRun(results, None, env.executor.stats.as_dict())
    finally:
        env.close()


def make_searcher(spec: Spec, ctx: SearchContext) -> Searcher:
    """The searcher the spec names, for ``ctx``; one whose proposals may come from an LLM
    (``uses_llm``) is given the LLM client."""
    from graphtune.search.registry import searcher_class

    cls = searcher_class(spec.search.method)
    if getattr(cls, "uses_llm", False):
        return cls(ctx, complete=llm_complete())
    return cls(ctx)


def spec_changes(old: Mapping[str, Any], new: Mapping[str, Any], prefix: tuple = ()) -> list[tuple]:
    """Dotted paths whose values differ between two resolved specs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += spec_changes(a, b, prefix + (k,))
        elif a != b:
            out.append(prefix + (k,))
    return out


#: spec fields holding local file paths: stored absolute, so `graphtune resume` finds them from anywhere
PATH_FIELDS = (("task", "dataset"), ("env", "records"))


def stored_spec(spec: Spec) -> dict[str, Any]:
    """The resolved spec as a study stores it: local dataset/record paths made absolute
    (resolved like the loader does: working directory, else beside the spec file), so the
    stored spec alone can run the study again (``resume``); the storage URL without its
    password (``resume`` and ``worker`` are given the URL again)."""
    from graphtune.store.storage import url_without_password

    out = spec.resolved()
    if isinstance(out.get("storage"), str):
        out["storage"] = url_without_password(out["storage"])
    for (sec, key), src in zip(PATH_FIELDS, (spec.dataset_source(), spec.records_source())):
        val = (out.get(sec) or {}).get(key)
        if val and src and not str(val).startswith("hf:") and Path(src).exists():
            out[sec][key] = str(Path(src).resolve())
    return out


def _same_path(old: Any, new: Any) -> bool:
    """A path stored relative (before paths were stored absolute) naming the same file."""
    if not isinstance(old, str) or not isinstance(new, str) or Path(old).is_absolute():
        return False
    o, n = Path(old).parts, Path(new).parts
    return len(o) <= len(n) and n[-len(o):] == o


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple]:
    """Fields of a stored spec that changed in a way a continued study cannot take
    (everything but ``SAFE_TO_CHANGE``). ``old`` may be in a store's older shape
    (``graphtune.spec.stored_spec_data``)."""
    from graphtune.spec import stored_spec_data

    old, new = stored_spec_data(old), stored_spec_data(new)  # both in today's shape (a pipeline's: no `space`)
    out = []
    for c in spec_changes(old, new):
        if c in SAFE_TO_CHANGE:
            continue
        if c in PATH_FIELDS and _same_path((old.get(c[0]) or {}).get(c[1]), (new.get(c[0]) or {}).get(c[1])):
            continue
        out.append(c)
    return out


def _changed_names(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """The spec fields that differ (first five, dotted), or None when none do."""
    changed = changed_fields(old, new)
    return ", ".join(".".join(c) for c in changed[:5]) if changed else None


def _spec_of_study(stored: Mapping[str, Any], name: str, storage: str, *,
                   evaluations: int | None = None) -> Spec:
    """The spec a stored study runs with (its stored spec, in this store)."""
    import copy

    from graphtune.spec import parse_spec, stored_spec_data

    data = stored_spec_data(copy.deepcopy(dict(stored)))
    data["study"], data["storage"] = name, storage
    if evaluations is not None:
        data.setdefault("search", {})["evaluations"] = evaluations
    return parse_spec(data, where=f"stored spec of study {name!r}")


def optimize(spec: Spec, *, force: bool = False, progress=None, take_over: bool = False, options=None):
    """Run the study ``spec.study`` in ``spec.storage``, continuing it if it exists.

    Returns ``(problem, study, outcome)``. A stored study whose spec differs in anything
    but the number of evaluations (and how graphs are run: ``SAFE_TO_CHANGE``) is refused
    unless ``force``. A forced change of ``search.method`` resets the searcher: the old
    method's state is not loaded into the new searcher (the study's trials, its batch
    counter and spent budget stay; the new searcher starts after them).

    Everything a spec can get wrong (environment, dataset, scorer, space, the searcher and
    its options) is built before the study row is written, and a study this call created
    is removed again when the run fails before its first trial: a bad spec leaves no study.

    The search runs as a worker of the study's queue (``graphtune.search.worker``; the
    rules are the batch engine's, as for every worker): a second ``optimize`` (or
    ``graphtune worker``) on a running study joins it and shares the work instead of
    duplicating it, and a process killed mid-run leaves its claimed trial to whoever comes
    next (at once on the same machine, or with ``take_over``; elsewhere after the stale
    timeout). A spec change is refused while other processes run the study.
    """
    from graphtune.errors import StoreError
    from graphtune.search.engine import BatchEngine
    from graphtune.search.worker import Worker, WorkerOptions
    from graphtune.store.storage import LEASE_STALE_S, Storage, require_persistent

    require_persistent(spec.storage, "optimize")
    problem = build_problem(spec)
    opts = options or WorkerOptions()
    if take_over:
        opts = dataclasses.replace(opts, take_over=True)
    created = False
    try:
        make_searcher(spec, problem.ctx).close()  # a bad searcher or option fails before anything is stored
        storage = Storage(spec.storage, secrets=spec_secrets(spec))
        study = storage.get_study(spec.study)
        resolved = stored_spec(spec)
        if study is None:
            try:
                study = storage.create_study(spec.study, spec.search.method, resolved)
                created = True
            except StoreError:  # another process created it between our look and our write
                study = storage.get_study(spec.study)
                if study is None:
                    raise
        try:
            names = _changed_names(study.spec, resolved)
            if names and not force:
                raise SpecError(f"study {spec.study!r} exists with a different spec ({names} changed); "
                                "use another --study name, or --force to continue it anyway")
            changes = spec_changes(study.spec, resolved) or study.method != spec.search.method
            running = 0 if take_over else storage.live_workers(study.id, opts.stale_after_s or LEASE_STALE_S)
            if changes and running:
                raise SpecError(f"study {spec.study!r} is being run by {running} other process(es) with its stored "
                                f"spec; a process that joins runs that spec: drop the change (`graphtune worker "
                                f"--study {spec.study}` joins as it is), or change it after they finish")
            if spec_changes(study.spec, resolved):
                storage.update_study_spec(study.id, resolved)
            if study.method != spec.search.method:
                storage.reset_searcher(study.id, spec.search.method)
            study = storage.get_study(spec.study)
            if study.status == "complete" and study.runs_spent < problem.ctx.budget_runs:
                storage.set_status(study.id, "running")  # more evaluations: the search goes on
                study = storage.get_study(spec.study)
            w = Worker(env=problem.env, ctx=problem.ctx, test_ids=problem.test_ids,
                       make_searcher=lambda: make_searcher(spec, problem.ctx), storage=storage, study=study,
                       options=opts, progress=_optimize_progress(storage, study, problem, progress))
            w.run()
        except BaseException:
            if created:  # our worker row is stopped: a study nobody else joined and that has no trial goes
                try:
                    storage.delete_study_if_empty(study.id)
                except Exception:  # noqa: BLE001 - the failure being raised is the one to report
                    pass
            raise
        st = storage.get_study(spec.study)
        engine = BatchEngine(env=problem.env, storage=storage, study=st, ctx=problem.ctx, test_ids=problem.test_ids)
        searcher = make_searcher(spec, problem.ctx)
        try:
            engine.resume(searcher, st)
            outcome = engine.outcome(engine.recommend(searcher), engine.stop_reason(st), st.runs_spent)
        finally:
            searcher.close()
    finally:
        problem.env.close()
    return problem, storage.get_study(spec.study), outcome


def _optimize_progress(storage, study, problem, progress):
    """``optimize``'s progress events (runs spent, budget, the best reward on the full dev
    set, counting trials stored before this run) from the worker's per-trial events."""
    if progress is None:
        return None
    n_dev = len(problem.ctx.dev_ids)
    state = {"spent": study.runs_spent,
             "best": max((t.reward for t in storage.list_trials(study.id, split="dev")
                          if t.status == "complete" and t.reward is not None and math.isfinite(t.reward)
                          and len(t.question_ids) == n_dev), default=float("-inf"))}

    def on(ev: dict) -> None:
        if ev["split"] != "dev" or not ev.get("stored", True):
            return
        state["spent"] += ev["new_runs"]
        r = ev["reward"]
        if r is not None and math.isfinite(r) and ev.get("n_questions") == n_dev:
            state["best"] = max(state["best"], r)
        progress({"runs_spent": state["spent"], "budget_runs": problem.ctx.budget_runs, "trial": ev["trial"],
                  "reward": r, "best_full_dev": state["best"]})
    return on


def resume(name: str, storage: str, *, evaluations: int | None = None, force: bool = False, progress=None,
           take_over: bool = False):
    """Continue the stored study ``name`` in ``storage`` from its stored spec (the same
    checks and exact resume as ``optimize``); ``evaluations`` raises its search budget.
    Returns ``(problem, study, outcome)``."""
    from graphtune.errors import StoreError
    from graphtune.store.storage import Storage, require_persistent, sqlite_path

    require_persistent(storage, "resume")
    path = sqlite_path(storage)
    if path is not None and not path.exists():
        raise StoreError(f"no store at {path}; pass the --storage the study was run with")
    store = Storage(storage, create=False, readonly=True)
    try:
        study = store.get_study(name)
        if study is None:
            known = [s.name for s in store.list_studies()]
            raise StoreError(f"no study named {name!r} in {store.safe_url()}; known studies: {known or 'none'}")
        stored = study.spec
    finally:
        store.close()
    return optimize(_spec_of_study(stored, name, storage, evaluations=evaluations), force=force, progress=progress,
                    take_over=take_over)


def work(name: str, storage: str, *, spec: Spec | None = None, options=None, progress=None,
         worker_name: str | None = None):
    """Join the workers of study ``name`` in ``storage`` (``graphtune worker``) until the
    study is complete. The study is created from ``spec`` when it does not exist yet (by
    whichever worker comes first); an existing study runs from its stored spec, and a
    ``spec`` that differs from it is refused. Returns ``(problem, study, WorkerReport)``."""
    from graphtune.errors import StoreError
    from graphtune.search.worker import Worker, WorkerOptions
    from graphtune.store.storage import Storage, require_persistent

    require_persistent(storage, "worker")
    store = Storage(storage, workers=True, secrets=spec_secrets(spec) if spec is not None else ())
    study = store.get_study(name)
    if spec is not None:
        resolved = stored_spec(spec)
        if study is None:
            _check_buildable(spec)  # a spec that cannot run creates no study
            try:
                study = store.create_study(name, spec.search.method, resolved)
            except StoreError:  # another worker created it first
                study = store.get_study(name)
                if study is None:
                    raise
        names = _changed_names(study.spec, resolved)
        if names:
            raise SpecError(f"study {name!r} exists with a different spec ({names} changed); workers run the stored "
                            "spec: drop --spec, or use another --study name")
    if study is None:
        known = [s.name for s in store.list_studies()]
        raise StoreError(f"no study named {name!r} in {store.safe_url()} (known: {known or 'none'}); create it by "
                         "passing --spec SPEC to the first worker")
    sp = _spec_of_study(study.spec, name, storage)
    store.redactor.add(spec_secrets(sp))
    problem = build_problem(sp)
    try:
        w = Worker(env=problem.env, ctx=problem.ctx, test_ids=problem.test_ids,
                   make_searcher=lambda: make_searcher(sp, problem.ctx), storage=store, study=study,
                   options=options or WorkerOptions(), name=worker_name, progress=progress)
        report = w.run()
    finally:
        problem.env.close()
    return problem, store.get_study(name), report


def _check_buildable(spec: Spec) -> None:
    """Build (and release) the problem and searcher ``spec`` describes, so its one-line
    error comes before anything is stored."""
    problem = build_problem(spec)
    try:
        make_searcher(spec, problem.ctx).close()
    finally:
        problem.env.close()


def dump_study(store, name: str) -> dict[str, Any]:
    """A study's records as plain JSON-able data: the study (with its resolved spec), every
    trial with its per-question results, and the agent steps. No secrets: specs name API
    keys by environment variable only, and a password in a storage URL is masked."""
    from dataclasses import asdict

    from graphtune.errors import StoreError

    st = store.get_study(name)
    if st is None:
        known = [s.name for s in store.list_studies()]
        raise StoreError(f"no study named {name!r}; known studies: {known or 'none'}")
    from graphtune.store.base import WorkerStorage
    from graphtune.store.storage import mask_url

    spec = dict(st.spec)
    if isinstance(spec.get("storage"), str):
        spec["storage"] = mask_url(spec["storage"])
    trials = []
    for t in store.list_trials(st.id):
        d = asdict(t)
        d["results"] = [asdict(r) for r in store.trial_results(t.id)]
        trials.append(d)
    return {
        "format": "graphtune-study-dump/1",
        "study": {"name": st.name, "method": st.method, "status": st.status, "spec_hash": st.spec_hash,
                  "batch_index": st.batch_index, "runs_spent": st.runs_spent, "created_at": st.created_at,
                  "n_trials": st.n_trials},
        "spec": spec,
        "searcher_state": st.searcher_state,
        "trials": trials,
        "agent_steps": store.agent_steps(st.id),
        "workers": store.list_workers(st.id) if isinstance(store, WorkerStorage) else [],
    }
