"""Export a graph: a framework-neutral graph file, a standalone LangGraph module, a
mermaid flowchart or a PNG drawing.

* ``yaml`` / ``json``: :func:`graphtune.graphs.io.to_dict` plus ``name`` and ``metrics``
  (ignored by the loader), the file ``graphtune run GRAPH --spec S`` executes.
* ``langgraph``: one Python module holding a plain LangGraph graph (module-level
  ``graph``, loadable from a ``langgraph.json`` entry ``"./mod.py:graph"``) that needs only
  ``langgraph`` and ``litellm``. It builds the same ``StateGraph`` as
  :func:`graphtune.envs.live.compile_graph` and sends each node exactly the messages
  graphtune sends (the study's prompt templates are copied into it), with the same
  sampling parameters and per-run sample seeds. ``graph.invoke({"question": q})`` and
  ``await graph.ainvoke(...)`` return ``answer`` and ``outputs``; every node has a sync
  and an async body, so a level's nodes run in parallel either way. Models and endpoints
  come from the run's typed ``context`` (class ``Context``), else environment variables
  (``GRAPHTUNE_MODEL_<NAME>``, ``GRAPHTUNE_API_BASE_<NAME>``, ``GRAPHTUNE_API_KEY_ENV_<NAME>``,
  ``<NAME>`` upper-cased with non-alphanumerics as ``_``; ``GRAPHTUNE_API_BASE`` applies
  to every model), else a ``MODELS`` block (litellm model string, ``api_base``,
  ``api_key_env`` = the *name* of a key variable) that ``model_map`` (``--models``) fills
  for a simulated study's names. No key is ever written into it.
* ``mermaid``: :func:`graphtune.graphs.render.to_mermaid`.
* ``png``: networkx layout by topological level, drawn with matplotlib (Agg, nothing
  fetched); each node shows its id, role and model.

A multi-stage pipeline (:class:`graphtune.graphs.pipeline.Pipeline`) exports in every
format: its ``to_dict`` file, a mermaid subgraph per stage, a drawing with one box per
stage (:func:`pipeline_figure`), and a LangGraph module where each stage is a compiled
graph added as a node (subgraph) of the parent graph, its question text built by
:func:`graphtune.envs.prompts.stage_question` (:func:`to_langgraph_pipeline_module`).
"""

from __future__ import annotations

import json
import pprint
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from graphtune.errors import GraphtuneError
from graphtune.graphs.design import is_pipeline
from graphtune.graphs.io import to_dict
from graphtune.graphs.model import Graph
from graphtune.graphs.pipeline import Pipeline
from graphtune.graphs.render import to_mermaid

FORMATS = ("yaml", "json", "langgraph", "mermaid", "png")
SUFFIX = {"yaml": ".yaml", "json": ".json", "langgraph": ".py", "mermaid": ".mmd", "png": ".png"}


class ExportError(GraphtuneError):
    """An export could not be written (unknown format, missing folder, missing plotting
    library): bad input or setup, exit code 2."""

    exit_code = 2


def check_format(fmt: str) -> str:
    f = fmt.strip().lower()
    if f not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; known formats: {', '.join(FORMATS)}")
    return f


# -- graph files -----------------------------------------------------------------------


def graph_document(graph: Graph, *, name: str | None = None, metrics: Mapping[str, Any] | None = None) -> dict:
    d = to_dict(graph)
    if name:
        d["name"] = name
    if metrics:
        d["metrics"] = {k: v for k, v in metrics.items() if v is not None}
    return d


def to_graph_text(graph: Graph, fmt: str, *, name: str | None = None,
                  metrics: Mapping[str, Any] | None = None) -> str:
    d = graph_document(graph, name=name, metrics=metrics)
    if fmt == "json":
        return json.dumps(d, indent=2) + "\n"
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


# -- PNG drawing -----------------------------------------------------------------------

ROLE_COLOURS = {"assistant": "#cfe3ff", "fuser": "#ffe2b8"}


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ExportError("PNG drawings and reports need matplotlib; install it with `pip install matplotlib`") \
            from None
    return plt


def draw_graph(graph: Graph, ax, *, title: str | None = None) -> None:
    """Draw ``graph`` on a matplotlib axis: levels left to right, role as colour and
    shape, id/role/model on every node."""
    import networkx as nx

    g = nx.DiGraph()
    g.add_nodes_from(n.id for n in graph.nodes)
    g.add_edges_from(graph.edges)
    by_level: dict[int, list[str]] = {}
    for nid, lv in sorted(graph.levels.items(), key=lambda kv: (kv[1], kv[0])):
        by_level.setdefault(lv, []).append(nid)
    pos = {}
    for lv, ids in by_level.items():
        for i, nid in enumerate(ids):
            pos[nid] = (lv * 2.2, (len(ids) - 1) / 2.0 - i)
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowstyle="-|>", arrowsize=14, node_size=2600,
                           edge_color="#555555", width=1.2)
    for n in graph.nodes:
        x, y = pos[n.id]
        face = ROLE_COLOURS.get(n.role, "#d9f2d0")  # a role users define: one colour, its name on the node
        style = "round,pad=0.35" if n.role != "fuser" else "square,pad=0.35"
        sink = n.id == graph.sink
        ax.text(x, y, f"{n.id}\n{n.role}\n{n.model.split('/')[-1]}", ha="center", va="center", fontsize=8,
                bbox=dict(boxstyle=style, fc=face, ec="#c0392b" if sink else "#333333", lw=2.0 if sink else 1.0))
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 1.3, max(xs) + 1.3)
    ax.set_ylim(min(ys) - 0.9, max(ys) + 0.9)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)


def graph_png(graph: Graph, path: str | Path, *, title: str | None = None, dpi: int = 110) -> Path:
    plt = _matplotlib()
    width = max(3.5, 2.0 + 1.6 * graph.depth)
    height = max(2.4, 1.0 + 1.0 * graph.width)
    fig, ax = plt.subplots(figsize=(width, height))
    try:
        draw_graph(graph, ax, title=title)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)


def pipeline_figure(pipeline: Pipeline, *, title: str | None = None):
    """A matplotlib figure of a pipeline: one box per stage, left to right in pipeline
    order, each holding its stage's graph (:func:`draw_graph`) and headed by the stage's
    name and inputs, with an arrow from each input stage's box to the box reading it."""
    plt = _matplotlib()
    from matplotlib.patches import ConnectionPatch, FancyBboxPatch

    stages = pipeline.stages
    ratios = [max(1.0, 0.8 * s.graph.depth) for s in stages]
    width = max(4.0, 1.2 + 2.4 * sum(ratios))
    height = max(2.8, 1.6 + 1.0 * max(s.graph.width for s in stages))
    fig, axes = plt.subplots(1, len(stages), figsize=(width, height), squeeze=False, layout="constrained",
                             gridspec_kw={"width_ratios": ratios})
    fig.get_layout_engine().set(w_pad=0.25, wspace=0.12)
    axes = list(axes[0])
    for s, ax in zip(stages, axes):
        draw_graph(s.graph, ax, title=f"stage {s.name}\nreads: {', '.join(s.inputs)}")
        ax.title.set_y(1.06)  # above the box
        ax.add_patch(FancyBboxPatch((-0.02, -0.02), 1.04, 1.04, boxstyle="round,pad=0.01,rounding_size=0.03",
                                    transform=ax.transAxes, fill=False, ec="#7a7a7a", lw=1.3, clip_on=False))
    pos = {s.name: i for i, s in enumerate(stages)}
    for i, s in enumerate(stages):
        for inp in s.inputs:
            if inp not in pos:
                continue
            j = pos[inp]
            bend = 0.0 if i - j == 1 else -0.35  # a stage further back: an arc over the boxes between
            fig.add_artist(ConnectionPatch((1.04, 0.5), (-0.04, 0.5), coordsA="axes fraction",
                                           coordsB="axes fraction", axesA=axes[j], axesB=axes[i],
                                           arrowstyle="-|>", mutation_scale=14, lw=1.4, color="#c0392b",
                                           connectionstyle=f"arc3,rad={bend}"))
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def design_png(design, path: str | Path, *, title: str | None = None, dpi: int = 110) -> Path:
    """A PNG drawing of a graph (:func:`graph_png`) or a pipeline (:func:`pipeline_figure`)."""
    if not is_pipeline(design):
        return graph_png(design, path, title=title, dpi=dpi)
    plt = _matplotlib()
    fig = pipeline_figure(design, title=title)
    try:
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


# -- the LangGraph module ----------------------------------------------------------------


def _env_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", model).upper()


def export_config(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """Prompts, models and call settings an exported module needs, from a resolved spec
    (a stored study's ``spec`` or ``Spec.resolved()``). Keys are never included: only
    the *names* of the variables that hold them."""
    from graphtune.envs.prompts import build_prompts, style_for

    spec = dict(spec or {})
    task = spec.get("task") or {}
    prompts_over = dict(task.get("prompts") or {})
    style = prompts_over.pop("style", None)
    if not style and not task.get("scorer") and not task.get("preset") and task.get("profile"):
        prof = str(task["profile"])
        style = {"math": "math", "mmlu": "choice", "humaneval": "code"}.get(prof, None) or style_for(prof)
    roles = {name: d["prompt"] for name, d in (spec.get("roles") or {}).items()}

    def prompt_set(over: Mapping[str, Any], style_: str | None) -> dict[str, Any]:
        ps = build_prompts(style_, over, scorer=task.get("scorer"), preset=task.get("preset"), roles=roles)
        return {"system": ps.system, "assistant": ps.assistant, "synthesize": ps.synthesize,
                "fuser": ps.fuser, "answer_format": ps.answer_format, "response": ps.response,
                "roles": dict(ps.roles)}

    # a pipeline's stages: each its own templates (the stage's `prompts` over the task's)
    # and its question template (`prompt`; None: graphtune's default text)
    stages = {}
    for st in ((spec.get("pipeline") or {}).get("stages") or []):
        own = {k: v for k, v in (st.get("prompts") or {}).items() if v is not None}
        st_style = own.pop("style", None) or style
        stages[st["name"]] = {"prompts": prompt_set({**prompts_over, **own}, st_style), "prompt": st.get("prompt")}
    env = spec.get("env") or {}
    models = {}
    for m in spec.get("models") or []:
        name = m["name"]
        if m.get("provider") == "local":
            models[name] = {"model": f"openai/{name}", "api_base": None, "api_key_env": None,
                            "note": "local llama.cpp server: set GRAPHTUNE_API_BASE_" + _env_name(name)}
        elif m.get("provider") == "vllm":
            models[name] = {"model": f"hosted_vllm/{m.get('model')}", "api_base": None, "api_key_env": None,
                            "note": f"vLLM server graphtune started: run `vllm serve {m.get('model')}` and set "
                                    "GRAPHTUNE_API_BASE_" + _env_name(name)}
        else:
            models[name] = {"model": m.get("litellm") or name, "api_base": m.get("api_base"),
                            "api_key_env": m.get("api_key_env")}
    return {
        "prompts": prompt_set(prompts_over, style),
        "stages": stages,
        "models": models,
        "settings": {"temperature": float(env.get("temperature", 0.0) or 0.0),
                     "max_tokens": env.get("max_tokens", 256),
                     "seed": int(env.get("seed", 0) or 0),
                     "timeout_s": float(env.get("timeout_s", 60.0) or 60.0),
                     "max_retries": int(env.get("max_retries", 2) if env.get("max_retries") is not None else 2)},
    }


#: the endpoint resolution both module kinds share (plain text, inserted as a value)
#: the parts every exported module shares (single graph and pipeline)
_MODEL_RESOLUTION = '''\
Models and endpoints, first match wins:
  1. the run's context (class Context): models / api_bases / api_key_envs by pool model
     name, api_base for every model;
  2. environment variables
       GRAPHTUNE_MODEL_<NAME>        litellm model string   (e.g. openai/gpt-4o-mini)
       GRAPHTUNE_API_BASE_<NAME>     endpoint URL           (GRAPHTUNE_API_BASE: every model)
       GRAPHTUNE_API_KEY_ENV_<NAME>  the NAME of the variable holding the API key
     <NAME> is the model name upper-cased, non-alphanumerics as "_";
  3. the MODELS block below (written at export time).
No key is stored here, and none travels in the context: only names of key variables.
'''

_MODULE_IMPORTS = '''\
import asyncio
import json
import os
from dataclasses import dataclass, field
from typing import Annotated, Any, Optional

from typing_extensions import TypedDict

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch at import

import litellm  # noqa: E402  (at import: its first import does file I/O an event loop must not wait on)
from langchain_core.runnables import RunnableLambda  # noqa: E402  (installed with langgraph)
from langgraph.config import get_config  # noqa: E402
from langgraph.graph import END, START, StateGraph  # noqa: E402
from langgraph.runtime import get_runtime  # noqa: E402
'''

_ENDPOINTS = '''\
#: a self-hosted endpoint without authentication still needs some key for litellm
NO_KEY = "sk-no-key-required"


@dataclass
class Context:
    """Call-time settings of one run (LangGraph's typed context): pass
    ``context=Context(...)`` or a dict with these keys to ``invoke``/``ainvoke``.
    Unset fields fall back to the environment, then to MODELS and SETTINGS."""

    models: dict[str, str] = field(default_factory=dict)  # pool model name -> litellm model string
    api_bases: dict[str, str] = field(default_factory=dict)  # pool model name -> endpoint URL
    api_base: Optional[str] = None  # endpoint of every model without its own
    api_key_envs: dict[str, str] = field(default_factory=dict)  # pool model name -> NAME of its key variable
    temperature: Optional[float] = None
    max_tokens: Optional[int] = None
    seed: Optional[int] = None


def _env_name(model: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in model).upper()


def endpoint(name: str, context: Optional[Context] = None) -> dict[str, Any]:
    """litellm model string, api_base and api key of a pool model (context, environment,
    then MODELS)."""
    ctx = context or Context()
    cfg = dict(MODELS.get(name) or {"model": name, "api_base": None, "api_key_env": None})
    e = _env_name(name)
    model = ctx.models.get(name) or os.environ.get("GRAPHTUNE_MODEL_" + e) or cfg.get("model") or name
    api_base = (ctx.api_bases.get(name) or ctx.api_base or os.environ.get("GRAPHTUNE_API_BASE_" + e)
                or os.environ.get("GRAPHTUNE_API_BASE") or cfg.get("api_base"))
    key_env = ctx.api_key_envs.get(name) or os.environ.get("GRAPHTUNE_API_KEY_ENV_" + e) or cfg.get("api_key_env")
    key = None
    if key_env:
        key = os.environ.get(key_env)
        if not key:
            raise RuntimeError(f"model {name!r}: environment variable {key_env} is not set; export it first")
    elif api_base:
        key = NO_KEY
    return {"model": model, "api_base": api_base, "api_key": key}


'''


_MODULE = '''\
"""{title}

Exported by graphtune: a plain LangGraph graph (needs only `langgraph` and `litellm`:
`pip install 'langgraph>=1.0' 'litellm>=1.50'`, or `pip install 'graphtune[llm]'`). It
runs the collaboration graph below, sending every node the same messages graphtune sent
while searching. Use it as LangGraph documents:

    from {modname} import graph
    state = graph.invoke({{"question": "What is 2 + 3?"}})          # or: await graph.ainvoke(...)
    state["answer"]                                              # the sink's output
    state["outputs"]                                             # every node's output, by node id
    graph.invoke({{"question": "..."}}, context={{"api_base": "http://localhost:8000/v1",
                                               "models": {{"{example_model}": "openai/my-model"}}}})

LangGraph's server (`langgraph dev`, `langgraph up`) loads it from a langgraph.json entry
`"graphs": {{"{modname}": "./{modname}.py:graph"}}`; the run's `context` is the same object.
Nodes of one level run in parallel (async under ainvoke, threads under invoke).

{model_resolution}
Graph:
{graph_text}
"""

{module_imports}
GRAPH = {graph}

PROMPTS = {prompts}

MODELS = {models}

SETTINGS = {settings}

{endpoints}def messages(role: str, question: str, responses: list[str]) -> list[dict[str, str]]:
    """The chat messages of one node (graphtune's PromptSet.messages)."""
    if role == "fuser":
        template = PROMPTS["fuser"]
    elif role == "assistant":
        template = PROMPTS["synthesize"] if responses else PROMPTS["assistant"]
    elif role in PROMPTS["roles"]:  # a role the study's spec defined, with its template
        template = PROMPTS["roles"][role]
    else:
        raise ValueError(f"role {{role!r}} has no prompt template")
    block = "\\n\\n".join(PROMPTS["response"].format(index=i + 1, response=r.strip())
                         for i, r in enumerate(responses))
    user = template.format(question=question.strip(), responses=block, inputs=block,
                           answer_format=PROMPTS["answer_format"])
    out = [{{"role": "system", "content": PROMPTS["system"]}}] if PROMPTS["system"] else []
    out.append({{"role": "user", "content": user}})
    return out


NODES = {{n["id"]: n for n in GRAPH["nodes"]}}
PREDS = {{nid: sorted(u for u, v in GRAPH["edges"] if v == nid) for nid in NODES}}


def _levels() -> dict[str, int]:
    lv: dict[str, int] = {{}}
    for nid in GRAPH["order"]:
        lv[nid] = max((lv[p] + 1 for p in PREDS[nid]), default=0)
    return lv


LEVEL = _levels()
#: nodes by level: a node runs in LangGraph's superstep LEVEL[node], so when it runs every
#: node before it here has its inputs in the state
ORDER = sorted(GRAPH["order"], key=lambda nid: (LEVEL[nid], GRAPH["order"].index(nid)))


class Input(TypedDict):
    question: str


class Output(TypedDict):
    answer: str
    outputs: dict[str, str]


def _merge(a: dict, b: dict) -> dict:
    out = dict(a or {{}})
    out.update(b or {{}})
    return out


class State(TypedDict, total=False):
    question: str
    outputs: Annotated[dict[str, str], _merge]
    answer: str


def _request(nid: str, state: dict, ctx: Context) -> tuple[str, dict[str, Any]]:
    """(identity, litellm keyword arguments without the seed) of node ``nid``'s call."""
    node = NODES[nid]
    ep = endpoint(node["model"], ctx)
    outs = state.get("outputs") or {{}}
    msgs = messages(node["role"], state["question"], [outs[p] for p in PREDS[nid]])
    p = node.get("params") or {{}}
    t = ctx.temperature if ctx.temperature is not None else p.get("temperature", SETTINGS["temperature"])
    params: dict[str, Any] = {{"temperature": float(t)}}
    mt = ctx.max_tokens if ctx.max_tokens is not None else p.get("max_tokens", SETTINGS["max_tokens"])
    if mt is not None:
        params["max_tokens"] = int(mt)
    ident = json.dumps([ep["model"], ep["api_base"], msgs, params], sort_keys=True)
    kw = dict(model=ep["model"], messages=msgs, timeout=SETTINGS["timeout_s"], drop_params=True,
              num_retries=SETTINGS["max_retries"], **params)
    if ep["api_base"]:
        kw["api_base"] = ep["api_base"]
    if ep["api_key"]:
        kw["api_key"] = ep["api_key"]
    return ident, kw


def _call_args(nid: str, state: dict) -> dict[str, Any]:
    """litellm keyword arguments of node ``nid``, with its sample seed: identical requests
    within one run are samples 0, 1, ... (seed + k), numbered in ORDER, as graphtune does,
    so width-k sampling stays k distinct samples."""
    ctx = get_runtime(Context).context or Context()
    ident, kw = _request(nid, state, ctx)
    k = 0
    for other in ORDER:
        if other == nid:
            break
        if _request(other, state, ctx)[0] == ident:
            k += 1
    seed = ctx.seed if ctx.seed is not None else SETTINGS["seed"]
    kw["seed"] = int(seed) + k
    return kw


def _result(nid: str, reply) -> dict[str, Any]:
    text = reply.choices[0].message.content or ""
    out: dict[str, Any] = {{"outputs": {{nid: text}}}}
    if nid == GRAPH["sink"]:
        out["answer"] = text
    return out


def _hooks() -> dict:
    """Call hooks a Python caller may put in ``config["configurable"]``: ``completion``
    (replaces litellm.completion) and ``acompletion`` (replaces litellm.acompletion),
    e.g. to record, mock or proxy calls."""
    try:
        return get_config().get("configurable") or {{}}
    except RuntimeError:
        return {{}}


def _node(nid: str) -> RunnableLambda:
    def call(state: State) -> dict:
        kw = _call_args(nid, state)
        hooks = _hooks()
        if hooks.get("completion"):
            return _result(nid, hooks["completion"](**kw))
        if hooks.get("acompletion"):  # an async hook under a sync run: run it on this worker thread
            return _result(nid, asyncio.run(hooks["acompletion"](**kw)))
        return _result(nid, litellm.completion(**kw))

    async def acall(state: State) -> dict:
        kw = _call_args(nid, state)
        return _result(nid, await (_hooks().get("acompletion") or litellm.acompletion)(**kw))

    return RunnableLambda(call, afunc=acall, name="node_" + nid)


def build():
    """A new compiled LangGraph graph (input: question; output: answer, outputs;
    context: Context)."""
    builder = StateGraph(State, context_schema=Context, input_schema=Input, output_schema=Output)
    for nid in GRAPH["order"]:
        builder.add_node("node_" + nid, _node(nid))
    for nid in GRAPH["order"]:
        ps = PREDS[nid]
        if not ps:
            builder.add_edge(START, "node_" + nid)
        elif len(ps) == 1:
            builder.add_edge("node_" + ps[0], "node_" + nid)
        else:
            builder.add_edge(["node_" + p for p in ps], "node_" + nid)
    builder.add_edge("node_" + GRAPH["sink"], END)
    return builder.compile(name={modname!r})


#: the compiled graph: `graph.invoke({{"question": ...}})`, `await graph.ainvoke(...)`,
#: `graph.stream(...)`; a langgraph.json entry "./{modname}.py:graph" loads it
graph = build()


def _config(completion=None, acompletion=None) -> dict:
    hooks = {{k: v for k, v in (("completion", completion), ("acompletion", acompletion)) if v is not None}}
    return {{"configurable": hooks, "recursion_limit": len(GRAPH["nodes"]) + 8}}


async def arun_nodes(question: str, *, context=None, acompletion=None) -> dict[str, str]:
    """Every node's output on one question (async)."""
    state = await graph.ainvoke({{"question": question}}, config=_config(acompletion=acompletion),
                                context=context)
    return state["outputs"]


async def arun(question: str, *, context=None, acompletion=None) -> str:
    """The graph's answer (the sink's output) to one question (async)."""
    return (await arun_nodes(question, context=context, acompletion=acompletion))[GRAPH["sink"]]


def run_nodes(question: str, *, context=None, completion=None, acompletion=None) -> dict[str, str]:
    """Every node's output on one question (``graph.invoke``; with an async
    ``acompletion`` hook, ``graph.ainvoke`` in a new event loop)."""
    if acompletion is not None and completion is None:
        return asyncio.run(arun_nodes(question, context=context, acompletion=acompletion))
    state = graph.invoke({{"question": question}}, config=_config(completion=completion), context=context)
    return state["outputs"]


def run(question: str, *, context=None, completion=None, acompletion=None) -> str:
    """The graph's answer to one question."""
    return run_nodes(question, context=context, completion=completion, acompletion=acompletion)[GRAPH["sink"]]


if __name__ == "__main__":
    import sys

    print(run(" ".join(sys.argv[1:]) or input("question: ")))
'''


_PIPELINE_MODULE = '''\
"""{title}

Exported by graphtune: a plain LangGraph graph of a multi-stage pipeline (needs only
`langgraph` and `litellm`: `pip install 'langgraph>=1.0' 'litellm>=1.50'`, or
`pip install 'graphtune[llm]'`). Each stage is its own compiled LangGraph graph, added as a
node (a subgraph) of the parent graph, which wires the question and the stages' answers as
the pipeline's inputs say. A stage's graph is given as its question the text graphtune
builds (the question, then each input stage's answer under a heading, or the stage's
`prompt` template), and every node the same messages graphtune sends. Use it as LangGraph
documents:

    from {modname} import graph
    state = graph.invoke({{"question": "..."}})            # or: await graph.ainvoke(...)
    state["answer"]                                       # the last stage's answer
    state["stages"]                                       # every stage's answer, by stage name
    state["prompts"]                                      # the question text each stage was given
    state["outputs"]                                      # every node's output, as "<stage>/<node id>"
    graph.invoke({{"question": "..."}}, context={{"api_base": "http://localhost:8000/v1",
                                               "models": {{"{example_model}": "openai/my-model"}}}})
    graph.get_graph(xray=True)                            # the stages' nodes inside the parent graph

LangGraph's server (`langgraph dev`, `langgraph up`) loads it from a langgraph.json entry
`"graphs": {{"{modname}": "./{modname}.py:graph"}}`; the run's `context` is the same object
(it reaches every stage). Independent stages run in parallel, and so do the nodes of one
level of a stage (async under ainvoke, threads under invoke).

{model_resolution}
Pipeline:
{pipeline_text}
"""

{module_imports}
#: the stages in order: name, inputs ("question" and/or earlier stages), the stage's prompt
#: template (None: graphtune's default text) and its graph (nodes, edges, sink, order)
PIPELINE = {pipeline}

#: each stage's prompt templates, by stage name
PROMPTS = {prompts}

MODELS = {models}

SETTINGS = {settings}

QUESTION = "question"

{endpoints}{stage_question_source}

def messages(prompts: dict, role: str, question: str, responses: list[str]) -> list[dict[str, str]]:
    """The chat messages of one node of a stage (graphtune's PromptSet.messages, with the
    stage's templates ``prompts``)."""
    if role == "fuser":
        template = prompts["fuser"]
    elif role == "assistant":
        template = prompts["synthesize"] if responses else prompts["assistant"]
    elif role in prompts["roles"]:  # a role the study's spec defined, with its template
        template = prompts["roles"][role]
    else:
        raise ValueError(f"role {{role!r}} has no prompt template")
    block = "\\n\\n".join(prompts["response"].format(index=i + 1, response=r.strip())
                         for i, r in enumerate(responses))
    user = template.format(question=question.strip(), responses=block, inputs=block,
                           answer_format=prompts["answer_format"])
    out = [{{"role": "system", "content": prompts["system"]}}] if prompts["system"] else []
    out.append({{"role": "user", "content": user}})
    return out


STAGES = {{s["name"]: s for s in PIPELINE["stages"]}}
FINAL = PIPELINE["stages"][-1]["name"]


class _Stage:
    """One stage's graph: its nodes, predecessors and the order its nodes run in."""

    def __init__(self, spec: dict):
        self.name = spec["name"]
        self.inputs = list(spec["inputs"])
        self.template = spec.get("prompt")
        g = spec["graph"]
        self.sink = g["sink"]
        self.nodes = {{n["id"]: n for n in g["nodes"]}}
        self.preds = {{nid: sorted(u for u, v in g["edges"] if v == nid) for nid in self.nodes}}
        level: dict[str, int] = {{}}
        for nid in g["order"]:
            level[nid] = max((level[p] + 1 for p in self.preds[nid]), default=0)
        self.order_in = list(g["order"])
        #: nodes by level: a node runs in its stage's superstep level[node], so when it runs
        #: every node before it here has its inputs in the state
        self.order = sorted(g["order"], key=lambda nid: (level[nid], g["order"].index(nid)))

    def question(self, state: dict) -> str:
        """The text this stage's graph is given as its question."""
        answers = state.get("stages") or {{}}
        return stage_question(self.template, state["question"],
                              {{i: answers[i] for i in self.inputs if i != QUESTION}}, order=self.inputs)


class Input(TypedDict):
    question: str


class Output(TypedDict):
    answer: str
    stages: dict[str, str]
    prompts: dict[str, str]
    outputs: dict[str, str]


def _merge(a: dict, b: dict) -> dict:
    out = dict(a or {{}})
    out.update(b or {{}})
    return out


class State(TypedDict, total=False):
    """The parent graph's state; a stage's subgraph shares these keys."""

    question: str
    stages: Annotated[dict[str, str], _merge]  # stage name -> its final (sink) answer
    prompts: Annotated[dict[str, str], _merge]  # stage name -> the question text it was given
    outputs: Annotated[dict[str, str], _merge]  # "<stage>/<node id>" -> the node's output
    answer: str


class StageInput(TypedDict):
    question: str
    stages: dict[str, str]


class StageOutput(TypedDict):
    stages: dict[str, str]
    prompts: dict[str, str]
    outputs: dict[str, str]


class FinalOutput(StageOutput):
    answer: str


def _request(stage: _Stage, nid: str, state: dict, ctx: Context) -> tuple[str, dict[str, Any]]:
    """(identity, litellm keyword arguments without the seed) of node ``nid``'s call."""
    node = stage.nodes[nid]
    ep = endpoint(node["model"], ctx)
    outs = state.get("outputs") or {{}}
    msgs = messages(PROMPTS[stage.name], node["role"], state["prompts"][stage.name],
                    [outs[stage.name + "/" + p] for p in stage.preds[nid]])
    p = node.get("params") or {{}}
    t = ctx.temperature if ctx.temperature is not None else p.get("temperature", SETTINGS["temperature"])
    params: dict[str, Any] = {{"temperature": float(t)}}
    mt = ctx.max_tokens if ctx.max_tokens is not None else p.get("max_tokens", SETTINGS["max_tokens"])
    if mt is not None:
        params["max_tokens"] = int(mt)
    ident = json.dumps([ep["model"], ep["api_base"], msgs, params], sort_keys=True)
    kw = dict(model=ep["model"], messages=msgs, timeout=SETTINGS["timeout_s"], drop_params=True,
              num_retries=SETTINGS["max_retries"], **params)
    if ep["api_base"]:
        kw["api_base"] = ep["api_base"]
    if ep["api_key"]:
        kw["api_key"] = ep["api_key"]
    return ident, kw


def _call_args(stage: _Stage, nid: str, state: dict) -> dict[str, Any]:
    """litellm keyword arguments of node ``nid``, with its sample seed: identical requests
    within one stage are samples 0, 1, ... (seed + k), numbered in the stage's order, as
    graphtune does, so width-k sampling stays k distinct samples."""
    ctx = get_runtime(Context).context or Context()
    ident, kw = _request(stage, nid, state, ctx)
    k = 0
    for other in stage.order:
        if other == nid:
            break
        if _request(stage, other, state, ctx)[0] == ident:
            k += 1
    seed = ctx.seed if ctx.seed is not None else SETTINGS["seed"]
    kw["seed"] = int(seed) + k
    return kw


def _result(stage: _Stage, nid: str, reply) -> dict[str, Any]:
    text = reply.choices[0].message.content or ""
    out: dict[str, Any] = {{"outputs": {{stage.name + "/" + nid: text}}}}
    if nid == stage.sink:
        out["stages"] = {{stage.name: text}}
        if stage.name == FINAL:
            out["answer"] = text
    return out


def _hooks() -> dict:
    """Call hooks a Python caller may put in ``config["configurable"]``: ``completion``
    (replaces litellm.completion) and ``acompletion`` (replaces litellm.acompletion),
    e.g. to record, mock or proxy calls."""
    try:
        return get_config().get("configurable") or {{}}
    except RuntimeError:
        return {{}}


def _node(stage: _Stage, nid: str) -> RunnableLambda:
    def call(state: dict) -> dict:
        kw = _call_args(stage, nid, state)
        hooks = _hooks()
        if hooks.get("completion"):
            return _result(stage, nid, hooks["completion"](**kw))
        if hooks.get("acompletion"):  # an async hook under a sync run: run it on this worker thread
            return _result(stage, nid, asyncio.run(hooks["acompletion"](**kw)))
        return _result(stage, nid, litellm.completion(**kw))

    async def acall(state: dict) -> dict:
        kw = _call_args(stage, nid, state)
        return _result(stage, nid, await (_hooks().get("acompletion") or litellm.acompletion)(**kw))

    return RunnableLambda(call, afunc=acall, name="node_" + nid)


def build_stage(name: str):
    """A new compiled LangGraph graph of one stage (input: question, stages; output:
    stages, prompts, outputs, and answer for the last stage; context: Context). Its first
    node builds the stage's question text from the question and its input stages' answers."""
    stage = _Stage(STAGES[name])
    builder = StateGraph(State, context_schema=Context, input_schema=StageInput,
                         output_schema=FinalOutput if name == FINAL else StageOutput)
    builder.add_node("prompt", lambda state: {{"prompts": {{name: stage.question(state)}}}})
    builder.add_edge(START, "prompt")
    for nid in stage.order_in:
        builder.add_node("node_" + nid, _node(stage, nid))
    for nid in stage.order_in:
        ps = stage.preds[nid]
        if not ps:
            builder.add_edge("prompt", "node_" + nid)
        elif len(ps) == 1:
            builder.add_edge("node_" + ps[0], "node_" + nid)
        else:
            builder.add_edge(["node_" + p for p in ps], "node_" + nid)
    builder.add_edge("node_" + stage.sink, END)
    return builder.compile(name=name)


def build():
    """A new compiled LangGraph graph of the pipeline (input: question; output: answer,
    stages, prompts, outputs; context: Context): one node per stage, each a compiled
    stage graph (a subgraph), run after the stages it reads."""
    builder = StateGraph(State, context_schema=Context, input_schema=Input, output_schema=Output)
    for s in PIPELINE["stages"]:
        builder.add_node("stage_" + s["name"], build_stage(s["name"]))
    for s in PIPELINE["stages"]:
        ups = [i for i in s["inputs"] if i != QUESTION]
        if not ups:
            builder.add_edge(START, "stage_" + s["name"])
        elif len(ups) == 1:
            builder.add_edge("stage_" + ups[0], "stage_" + s["name"])
        else:
            builder.add_edge(["stage_" + u for u in ups], "stage_" + s["name"])
    builder.add_edge("stage_" + FINAL, END)
    return builder.compile(name={modname!r})


#: the compiled graph: `graph.invoke({{"question": ...}})`, `await graph.ainvoke(...)`,
#: `graph.stream(..., subgraphs=True)`; a langgraph.json entry "./{modname}.py:graph" loads it
graph = build()


def _config(completion=None, acompletion=None) -> dict:
    hooks = {{k: v for k, v in (("completion", completion), ("acompletion", acompletion)) if v is not None}}
    steps = sum(len(s["graph"]["nodes"]) + 1 for s in PIPELINE["stages"])
    return {{"configurable": hooks, "recursion_limit": steps + 8}}


async def arun_stages(question: str, *, context=None, acompletion=None) -> dict[str, str]:
    """Every stage's answer on one question (async)."""
    state = await graph.ainvoke({{"question": question}}, config=_config(acompletion=acompletion),
                                context=context)
    return state["stages"]


async def arun(question: str, *, context=None, acompletion=None) -> str:
    """The pipeline's answer (the last stage's) to one question (async)."""
    return (await arun_stages(question, context=context, acompletion=acompletion))[FINAL]


def run_stages(question: str, *, context=None, completion=None, acompletion=None) -> dict[str, str]:
    """Every stage's answer on one question (``graph.invoke``; with an async
    ``acompletion`` hook, ``graph.ainvoke`` in a new event loop)."""
    if acompletion is not None and completion is None:
        return asyncio.run(arun_stages(question, context=context, acompletion=acompletion))
    state = graph.invoke({{"question": question}}, config=_config(completion=completion), context=context)
    return state["stages"]


def run(question: str, *, context=None, completion=None, acompletion=None) -> str:
    """The pipeline's answer to one question."""
    return run_stages(question, context=context, completion=completion, acompletion=acompletion)[FINAL]


if __name__ == "__main__":
    import sys

    print(run(" ".join(sys.argv[1:]) or input("question: ")))
'''


def _py(value: Any) -> str:
    return pprint.pformat(value, indent=1, width=100, sort_dicts=False)


def parse_model_map(pairs: list[str] | tuple[str, ...] = (), path: str | Path | None = None
                    ) -> dict[str, dict[str, Any]]:
    """Where an exported module sends each pool model: ``NAME=LITELLM_STRING`` pairs
    (``--models``) over a YAML/JSON file (``--models-file``) mapping a name to a litellm
    string or to ``{litellm, api_base, api_key_env}``. Returns name -> those three keys
    (absent ones omitted). Keys themselves are refused: only the *name* of their variable."""
    out: dict[str, dict[str, Any]] = {}
    if path is not None:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ExportError(f"model mapping file {p} does not exist")
        try:
            doc = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ExportError(f"model mapping file {p}: not YAML/JSON ({e})") from None
        if not isinstance(doc, dict):
            raise ExportError(f"model mapping file {p}: expected a mapping NAME: LITELLM_STRING "
                              f"or NAME: {{litellm, api_base, api_key_env}}")
        for name, v in doc.items():
            if isinstance(v, str):
                out[str(name)] = {"model": v}
            elif isinstance(v, dict):
                bad = sorted(set(v) - {"litellm", "model", "api_base", "api_key_env"})
                if bad:
                    raise ExportError(f"model mapping file {p}: model {name!r}: unknown key(s) {', '.join(bad)}; "
                                      "known: litellm, api_base, api_key_env (a key's variable name, never a key)")
                entry = {"model": v.get("litellm") or v.get("model"), "api_base": v.get("api_base"),
                         "api_key_env": v.get("api_key_env")}
                out[str(name)] = {k: x for k, x in entry.items() if x}
            else:
                raise ExportError(f"model mapping file {p}: model {name!r}: expected a litellm model string "
                                  "or a mapping")
    for pair in pairs:
        name, sep, target = pair.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise ExportError(f"--models {pair!r}: write NAME=LITELLM_STRING, e.g. "
                              "llama-3.2-1b=openai/gpt-4o-mini")
        out.setdefault(name.strip(), {})["model"] = target.strip()
    return out


def _models_of(design) -> set[str]:
    """The pool models a graph or a pipeline calls."""
    if is_pipeline(design):
        return {n.model for s in design.stages for n in s.graph.nodes}
    return {n.model for n in design.nodes}


def unmapped_models(graph: Graph, spec: Mapping[str, Any] | None,
                    model_map: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """The graph's (or pipeline's) models an exported module has no endpoint for: a
    simulated or replayed study's names (no litellm string, no api_base, not local) that no
    mapping covers."""
    cfg = export_config(spec)
    out = []
    for m in sorted(_models_of(graph)):
        if m in (model_map or {}):
            continue
        c = cfg["models"].get(m)
        if c is None or (c["model"] == m and not c.get("api_base") and "note" not in c):
            out.append(m)
    return out


def _module_models(cfg: dict, used: set[str], model_map: Mapping[str, Mapping[str, Any]] | None) -> dict:
    """The MODELS block of an exported module: the study's endpoints of the models it
    calls, with ``model_map`` applied (it must name models of the study)."""
    model_map = dict(model_map or {})
    known = used | set(cfg["models"])
    unknown = sorted(set(model_map) - known)
    if unknown:
        raise ExportError(f"--models: {', '.join(unknown)} is not a model of the study; its models: "
                          f"{', '.join(sorted(known))}")
    models = {k: {kk: vv for kk, vv in v.items() if kk != "note"} for k, v in cfg["models"].items() if k in used}
    for m in sorted(used - set(models)):
        models[m] = {"model": m, "api_base": None, "api_key_env": None}
    for m, entry in model_map.items():
        if m in used:
            models[m] = {**models[m], **{k: v for k, v in entry.items() if v}}
    return models


def _graph_data(graph: Graph) -> dict[str, Any]:
    return {"nodes": [{"id": n.id, "role": n.role, "model": n.model, **({"params": n.params_dict} if n.params else {})}
                      for n in graph.nodes],
            "edges": [[u, v] for u, v in graph.edges], "sink": graph.sink, "order": list(graph.topo_order)}


def to_langgraph_module(graph: Graph, spec: Mapping[str, Any] | None = None, *, title: str | None = None,
                        modname: str = "graph", model_map: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """Source of a standalone LangGraph module running ``graph`` with the prompts,
    models and call settings of ``spec`` (a resolved spec). ``model_map`` (from
    :func:`parse_model_map`) sets where pool models go (a simulated study's names have no
    endpoint otherwise); it must name models of the graph. A pipeline: see
    :func:`to_langgraph_pipeline_module`."""
    from graphtune.graphs.render import to_text

    if is_pipeline(graph):
        return to_langgraph_pipeline_module(graph, spec, title=title, modname=modname, model_map=model_map)
    cfg = export_config(spec)
    used = _models_of(graph)
    models = _module_models(cfg, used, model_map)
    src = _MODULE.format(title=(title or "A graphtune collaboration graph").replace('"""', "'''"),
                         modname=modname, graph_text="    " + to_text(graph), graph=_py(_graph_data(graph)),
                         prompts=_py(cfg["prompts"]), models=_py(models), settings=_py(cfg["settings"]),
                         example_model=sorted(used)[0], endpoints=_ENDPOINTS,
                         model_resolution=_MODEL_RESOLUTION, module_imports=_MODULE_IMPORTS)
    compile(src, "<exported module>", "exec")  # a template bug must fail here, not at the user's
    return src


def to_langgraph_pipeline_module(pipeline: Pipeline, spec: Mapping[str, Any] | None = None, *,
                                 title: str | None = None, modname: str = "graph",
                                 model_map: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """Source of a standalone LangGraph module running a multi-stage ``pipeline``: each
    stage a compiled LangGraph graph added as a node (subgraph) of the parent graph, which
    runs a stage after the stages it reads. A stage's question text is
    :func:`graphtune.envs.prompts.stage_question` over the spec's ``pipeline.stages[i].prompt``
    (its source is copied into the module, so the export builds the text exactly as the
    live environment does); each stage's node prompts are the spec's templates with the
    stage's ``prompts`` over the task's. Models, endpoints and settings as
    :func:`to_langgraph_module`."""
    import inspect

    from graphtune.envs import prompts as prompt_mod
    from graphtune.graphs.pipeline import to_text_pipeline

    cfg = export_config(spec)
    used = _models_of(pipeline)
    models = _module_models(cfg, used, model_map)
    stages = [{"name": s.name, "inputs": list(s.inputs),
               "prompt": (cfg["stages"].get(s.name) or {}).get("prompt"), "graph": _graph_data(s.graph)}
              for s in pipeline.stages]
    prompts = {s.name: (cfg["stages"].get(s.name) or {}).get("prompts") or cfg["prompts"] for s in pipeline.stages}
    source = (f"#: the heading above an input stage's answer (graphtune.envs.prompts)\n"
              f"STAGE_INPUT_HEADING = {prompt_mod.STAGE_INPUT_HEADING!r}\n\n\n"
              + inspect.getsource(prompt_mod.stage_question))
    text = "\n".join("    " + line for line in to_text_pipeline(pipeline).splitlines())
    src = _PIPELINE_MODULE.format(
        title=(title or "A graphtune multi-stage pipeline").replace('"""', "'''"), modname=modname,
        pipeline_text=text, pipeline=_py({"stages": stages}), prompts=_py(prompts), models=_py(models),
        settings=_py(cfg["settings"]), example_model=sorted(used)[0], endpoints=_ENDPOINTS,
        model_resolution=_MODEL_RESOLUTION, module_imports=_MODULE_IMPORTS,
        stage_question_source=source.replace("Mapping[str, str]", "dict[str, str]").replace(
            "Sequence[str] | None", "Optional[list[str]]"))
    compile(src, "<exported module>", "exec")  # a template bug must fail here, not at the user's
    return src


# -- one entry point -------------------------------------------------------------------------


def export_graph(graph: Graph, fmt: str, path: str | Path, *, spec: Mapping[str, Any] | None = None,
                 name: str | None = None, metrics: Mapping[str, Any] | None = None,
                 model_map: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write ``graph`` (or a pipeline) to ``path`` in ``fmt`` (see the module docstring)."""
    fmt = check_format(fmt)
    p = Path(path)
    if p.parent and not p.parent.exists():
        raise ExportError(f"directory {p.parent} does not exist; create it or choose another -o path")
    if fmt in ("yaml", "json"):
        p.write_text(to_graph_text(graph, fmt, name=name, metrics=metrics))
    elif fmt == "mermaid":
        p.write_text(to_mermaid(graph) + "\n")
    elif fmt == "png":
        design_png(graph, p, title=name)
    else:
        title = (f"Pipeline {name!r}" if is_pipeline(graph) else f"Graph {name!r}") if name else None
        p.write_text(to_langgraph_module(graph, spec, title=title, modname=p.stem, model_map=model_map))
    return p
