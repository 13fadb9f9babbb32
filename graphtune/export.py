"""Export a graph: a framework-neutral graph file, a standalone LangGraph module, a
mermaid flowchart or a PNG drawing.

* ``yaml`` / ``json``: :func:`graphtune.graphs.io.to_dict` plus ``name`` and ``metrics``
  (ignored by the loader), the file ``graphtune run GRAPH --spec S`` executes.
* ``langgraph``: one Python module that needs only ``langgraph`` and ``litellm``. It
  builds the same ``StateGraph`` as :func:`graphtune.envs.live.compile_graph` and sends
  each node exactly the messages graphtune sends (the study's prompt templates are copied
  into it), with the same sampling parameters and per-run sample seeds. It exposes
  ``run(question) -> answer``, ``arun(question)`` (async) and ``run_nodes`` (every
  node's output). Models and endpoints come from a small ``MODELS`` block (litellm model
  string, ``api_base``, ``api_key_env`` = the *name* of a key variable) that environment
  variables override (``GRAPHTUNE_MODEL_<NAME>``, ``GRAPHTUNE_API_BASE_<NAME>``,
  ``GRAPHTUNE_API_KEY_ENV_<NAME>``, ``<NAME>`` upper-cased with non-alphanumerics as
  ``_``; ``GRAPHTUNE_API_BASE`` applies to every model). No key is ever written into it.
* ``mermaid``: :func:`graphtune.graphs.render.to_mermaid`.
* ``png``: networkx layout by topological level, drawn with matplotlib (Agg, nothing
  fetched); each node shows its id, role and model.
"""

from __future__ import annotations

import json
import pprint
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from graphtune.errors import GraphtuneError
from graphtune.graphs.io import to_dict
from graphtune.graphs.model import Graph
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
    ps = build_prompts(style, prompts_over, scorer=task.get("scorer"), preset=task.get("preset"), roles=roles)
    env = spec.get("env") or {}
    models = {}
    for m in spec.get("models") or []:
        name = m["name"]
        if m.get("provider") == "local":
            models[name] = {"model": f"openai/{name}", "api_base": None, "api_key_env": None,
                            "note": "local llama.cpp server: set GRAPHTUNE_API_BASE_" + _env_name(name)}
        else:
            models[name] = {"model": m.get("litellm") or name, "api_base": m.get("api_base"),
                            "api_key_env": m.get("api_key_env")}
    return {
        "prompts": {"system": ps.system, "assistant": ps.assistant, "synthesize": ps.synthesize,
                    "fuser": ps.fuser, "answer_format": ps.answer_format, "response": ps.response,
                    "roles": dict(ps.roles)},
        "models": models,
        "settings": {"temperature": float(env.get("temperature", 0.0) or 0.0),
                     "max_tokens": env.get("max_tokens", 256),
                     "seed": int(env.get("seed", 0) or 0),
                     "timeout_s": float(env.get("timeout_s", 60.0) or 60.0),
                     "max_retries": int(env.get("max_retries", 2) if env.get("max_retries") is not None else 2)},
    }


_MODULE = '''\
"""{title}

Exported by graphtune: a standalone LangGraph module (needs only `langgraph` and
`litellm`). It runs the collaboration graph below, sending every node the same messages
graphtune sent while searching.

    from {modname} import run, arun
    answer = run("What is 2 + 3?")

Models and endpoints: the MODELS block, overridden by environment variables
    GRAPHTUNE_MODEL_<NAME>        litellm model string   (e.g. openai/gpt-4o-mini)
    GRAPHTUNE_API_BASE_<NAME>     endpoint URL           (GRAPHTUNE_API_BASE: every model)
    GRAPHTUNE_API_KEY_ENV_<NAME>  the NAME of the variable holding the API key
<NAME> is the model name upper-cased, non-alphanumerics as "_". No key is stored here.

Graph:
{graph_text}
"""

import asyncio
import json
import os
from typing import Annotated, Any, TypedDict

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch at import

GRAPH = {graph}

PROMPTS = {prompts}

MODELS = {models}

SETTINGS = {settings}

#: a self-hosted endpoint without authentication still needs some key for litellm
NO_KEY = "sk-no-key-required"


def _env_name(model: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in model).upper()


def endpoint(name: str) -> dict[str, Any]:
    """litellm model string, api_base and api key of a pool model (environment first)."""
    cfg = dict(MODELS.get(name) or {{"model": name, "api_base": None, "api_key_env": None}})
    e = _env_name(name)
    model = os.environ.get("GRAPHTUNE_MODEL_" + e) or cfg.get("model") or name
    api_base = os.environ.get("GRAPHTUNE_API_BASE_" + e) or os.environ.get("GRAPHTUNE_API_BASE") or cfg.get("api_base")
    key_env = os.environ.get("GRAPHTUNE_API_KEY_ENV_" + e) or cfg.get("api_key_env")
    key = None
    if key_env:
        key = os.environ.get(key_env)
        if not key:
            raise RuntimeError(f"model {{name!r}}: environment variable {{key_env}} is not set; export it first")
    elif api_base:
        key = NO_KEY
    return {{"model": model, "api_base": api_base, "api_key": key}}


def messages(role: str, question: str, responses: list[str]) -> list[dict[str, str]]:
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


class _Run:
    """One graph run: numbers identical requests as samples 0, 1, ... (seed + k)."""

    def __init__(self, acompletion=None):
        self.seen: dict[str, int] = {{}}
        self.acompletion = acompletion

    async def call(self, node: dict, msgs: list[dict[str, str]]) -> str:
        import litellm

        ep = endpoint(node["model"])
        p = node.get("params") or {{}}
        params: dict[str, Any] = {{"temperature": float(p.get("temperature", SETTINGS["temperature"]))}}
        mt = p.get("max_tokens", SETTINGS["max_tokens"])
        if mt is not None:
            params["max_tokens"] = int(mt)
        base = json.dumps([ep["model"], ep["api_base"], msgs, params], sort_keys=True)
        k = self.seen.get(base, 0)
        self.seen[base] = k + 1
        kw = dict(model=ep["model"], messages=msgs, timeout=SETTINGS["timeout_s"], drop_params=True,
                  num_retries=SETTINGS["max_retries"], seed=SETTINGS["seed"] + k, **params)
        if ep["api_base"]:
            kw["api_base"] = ep["api_base"]
        if ep["api_key"]:
            kw["api_key"] = ep["api_key"]
        reply = await (self.acompletion or litellm.acompletion)(**kw)
        return reply.choices[0].message.content or ""


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    out.update(b)
    return out


class State(TypedDict):
    question: str
    outputs: Annotated[dict, _merge]


def _node_fn(node: dict, preds: list[str]):
    async def fn(state: State, config) -> dict:
        run = config["configurable"]["graph_run"]
        msgs = messages(node["role"], state["question"], [state["outputs"][p] for p in preds])
        return {{"outputs": {{node["id"]: await run.call(node, msgs)}}}}

    fn.__name__ = "node_" + node["id"]
    return fn


def build():
    """The compiled LangGraph runnable (state: question, outputs by node id)."""
    from langgraph.graph import END, START, StateGraph

    nodes = {{n["id"]: n for n in GRAPH["nodes"]}}
    preds = {{nid: sorted(u for u, v in GRAPH["edges"] if v == nid) for nid in nodes}}
    builder = StateGraph(State)
    for nid in GRAPH["order"]:
        builder.add_node("node_" + nid, _node_fn(nodes[nid], preds[nid]))
    for nid in GRAPH["order"]:
        ps = preds[nid]
        if not ps:
            builder.add_edge(START, "node_" + nid)
        elif len(ps) == 1:
            builder.add_edge("node_" + ps[0], "node_" + nid)
        else:
            builder.add_edge(["node_" + p for p in ps], "node_" + nid)
    builder.add_edge("node_" + GRAPH["sink"], END)
    return builder.compile()


_APP = None


async def arun_nodes(question: str, *, acompletion=None) -> dict[str, str]:
    """Every node's output on one question (async). ``acompletion`` replaces
    ``litellm.acompletion`` (same signature), e.g. to record or mock calls."""
    global _APP
    if _APP is None:
        _APP = build()
    state = await _APP.ainvoke({{"question": question, "outputs": {{}}}},
                               config={{"configurable": {{"graph_run": _Run(acompletion)}},
                                       "recursion_limit": len(GRAPH["nodes"]) + 8}})
    return state["outputs"]


async def arun(question: str, *, acompletion=None) -> str:
    """The graph's answer (the sink's output) to one question (async)."""
    return (await arun_nodes(question, acompletion=acompletion))[GRAPH["sink"]]


def run_nodes(question: str, *, acompletion=None) -> dict[str, str]:
    return asyncio.run(arun_nodes(question, acompletion=acompletion))


def run(question: str, *, acompletion=None) -> str:
    """The graph's answer to one question."""
    return asyncio.run(arun(question, acompletion=acompletion))


if __name__ == "__main__":
    import sys

    print(run(" ".join(sys.argv[1:]) or input("question: ")))
'''


def _py(value: Any) -> str:
    return pprint.pformat(value, indent=1, width=100, sort_dicts=False)


def to_langgraph_module(graph: Graph, spec: Mapping[str, Any] | None = None, *, title: str | None = None,
                        modname: str = "graph") -> str:
    """Source of a standalone LangGraph module running ``graph`` with the prompts,
    models and call settings of ``spec`` (a resolved spec)."""
    from graphtune.graphs.render import to_text

    cfg = export_config(spec)
    used = {n.model for n in graph.nodes}
    models = {k: {kk: vv for kk, vv in v.items() if kk != "note"} for k, v in cfg["models"].items() if k in used}
    for m in sorted(used - set(models)):
        models[m] = {"model": m, "api_base": None, "api_key_env": None}
    g = {"nodes": [{"id": n.id, "role": n.role, "model": n.model, **({"params": n.params_dict} if n.params else {})}
                   for n in graph.nodes],
         "edges": [[u, v] for u, v in graph.edges], "sink": graph.sink, "order": list(graph.topo_order)}
    src = _MODULE.format(title=(title or "A graphtune collaboration graph").replace('"""', "'''"),
                         modname=modname, graph_text="    " + to_text(graph), graph=_py(g),
                         prompts=_py(cfg["prompts"]), models=_py(models), settings=_py(cfg["settings"]))
    compile(src, "<exported module>", "exec")  # a template bug must fail here, not at the user's
    return src


# -- one entry point -------------------------------------------------------------------------


def export_graph(graph: Graph, fmt: str, path: str | Path, *, spec: Mapping[str, Any] | None = None,
                 name: str | None = None, metrics: Mapping[str, Any] | None = None) -> Path:
    """Write ``graph`` to ``path`` in ``fmt`` (see the module docstring)."""
    fmt = check_format(fmt)
    p = Path(path)
    if p.parent and not p.parent.exists():
        raise ExportError(f"directory {p.parent} does not exist; create it or choose another -o path")
    if fmt in ("yaml", "json"):
        p.write_text(to_graph_text(graph, fmt, name=name, metrics=metrics))
    elif fmt == "mermaid":
        p.write_text(to_mermaid(graph) + "\n")
    elif fmt == "png":
        graph_png(graph, p, title=name)
    else:
        title = f"Graph {name!r}" if name else None
        p.write_text(to_langgraph_module(graph, spec, title=title, modname=p.stem))
    return p
