"""Reports of stored studies: one self-contained HTML file, and side-by-side comparisons.

The HTML report needs nothing at view time: plots are PNGs inlined as base64, the CSS is
inline, there is no script from elsewhere (one inline line counts the loaded plots into
``body[data-plots-loaded]`` so a headless browser test can check them). Sections: the
best-so-far curve, the Pareto plot, a drawing of the recommended graph, per-question
results of the top graphs (with a legend), a per-question drill-down (each node's output
on each question, for the top graphs, the recommended trial and the held-out test trial),
the agent's feedback timeline (what each step changed, in words and rounded numbers, its
proposals as graph text and the trials they became), and a cost breakdown (environment vs
agent, per model).

Everything a model or an agent wrote is HTML-escaped and bounded: a text longer than its
limit is cut at a word boundary, with its full length noted (or kept whole behind a
"more" expander where it is short enough), so the page stays small and inert whatever
the models replied. The size does not grow with the number of trials except through the
Pareto front and the timeline (one row per agent step).

A pipeline study's report names the recommended pipeline, draws it one box per stage,
tables its stages (models, cost share, dev and held-out stage accuracy, answers lost:
:func:`graphtune.stages.stage_rows`), and its drill-down shows each stage's answer per
question (bounded like node outputs) before the nodes, named ``<stage>/<node id>``.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from graphtune.export import _matplotlib, draw_graph, pipeline_figure
from graphtune.graphs.io import from_dict
from graphtune.graphs.render import to_text
from graphtune.pareto import (METRIC_LABELS, FrontPoint, cost_attr, default_ref_cost, hypervolume_points,
                              pareto_front, study_points)

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd;
       padding-bottom: 0.2em; margin-top: 1.8em; }
.sub { color: #666; } .grid { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #666; font-size: 0.85em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.ok { background: #e3f6e3; } td.bad { background: #fbe4e4; }
td.err { background: #eee; color: #777; } code, pre { font-size: 0.85em; background: #f7f7f7; }
pre { padding: 0.5em; overflow-x: auto; white-space: pre-wrap; }
.kv td:first-child { color: #666; }
.legend { font-size: 0.85em; color: #444; } .legend span.ok, .legend span.bad, .legend span.err { padding: 0 4px; }
span.ok { background: #e3f6e3; } span.bad { background: #fbe4e4; } span.err { background: #eee; color: #777; }
td a, th a { color: inherit; text-decoration: none; } td a:hover, th a:hover { text-decoration: underline; }
details.more > summary { cursor: pointer; list-style: none; }
details.more > summary::-webkit-details-marker { display: none; }
details.more > summary .m { color: #1f5fbf; font-size: 0.85em; } details.more[open] > summary .pv { display: none; }
details.q { margin: 2px 0; } details.q > summary { cursor: pointer; }
details.q:target, details.q[open] { background: #fcfcf4; }
.note { color: #888; font-size: 0.85em; } ul.steps { margin: 0; padding-left: 1.1em; }
"""


def _png(fig, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    if fig.get_layout_engine() is None:  # a pipeline's drawing lays itself out (constrained)
        fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


#: how much of a free text (agent feedback, a reason) a timeline cell shows before "more"
PREVIEW_CHARS = 220
#: the most of one free text the page keeps (the rest is summarised by its length)
TEXT_CHARS = 2000
#: the most of one node's output the drill-down keeps
NODE_OUTPUT_CHARS = 400
#: the most of an agent reply the timeline keeps
REPLY_CHARS = 4000
#: proposals listed per agent step (a proposer may return up to 1,024)
MAX_PROPOSALS_SHOWN = 12
#: questions shown per trial, in the table and in the drill-down
MAX_QUESTIONS = 150
#: inline handler: open the <details> the address's fragment names
OPEN_TARGET = ("var d=document.getElementById(location.hash.slice(1));"
               "if(d&&d.tagName=='DETAILS'){d.open=true;d.scrollIntoView();}")


def cut_words(text: str, limit: int) -> str:
    """``text`` when it has at most ``limit`` characters, else its longest prefix of at
    most ``limit`` characters that ends at a word boundary (a hard cut when one word is
    longer than half the limit), with "…" appended."""
    if len(text) <= limit:
        return text
    head = text[:limit + 1]
    cut = max(head.rfind(c) for c in (" ", "\n", "\t"))
    if cut < limit // 2:
        cut = limit
    return text[:cut].rstrip().rstrip(".,;:") + "\u2026"


def bounded(text: str | None, limit: int = TEXT_CHARS) -> str:
    """HTML for a text kept to ``limit`` characters (cut at a word), with a note of its
    full length when it was cut."""
    text = "" if text is None else str(text)
    if len(text) <= limit:
        return _esc(text)
    return (f"{_esc(cut_words(text, limit))} <span class='note'>(up to {limit:,} of {len(text):,} "
            "characters)</span>")


def more(text: str | None, preview: int = PREVIEW_CHARS, limit: int = TEXT_CHARS) -> str:
    """HTML for a free text: whole when short, else its first words with a "more"
    expander (no script) that holds the text bounded to ``limit``."""
    text = "" if text is None else str(text)
    if len(text) <= preview:
        return _esc(text)
    return (f"<details class='more'><summary><span class='pv'>{_esc(cut_words(text, preview))} </span>"
            f"<span class='m'>more</span></summary>{bounded(text, limit)}</details>")


def _num(x: Any, spec: str = "+.2f") -> str:
    try:
        return format(float(x), spec)
    except (TypeError, ValueError):
        return str(x)


def plain(value: Any, limit: int = 300) -> str:
    """A stored value of unknown shape as short readable text (numbers rounded, no
    brackets or quotes of a data dump)."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "-"
    if isinstance(value, float):
        return format(value, ".3g")
    if isinstance(value, dict):
        out = "; ".join(f"{k}: {plain(v, limit)}" for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        out = ", ".join(plain(v, limit) for v in value)
    else:
        out = str(value)
    return cut_words(out, limit)


def proposal_text(prop: Any) -> str:
    """A proposed graph as graph text: :func:`to_text` when it is a valid graph, else its
    nodes and edges as written (an invalid proposal is shown as the agent wrote it)."""
    if not isinstance(prop, dict):
        return plain(prop)
    if "stages" in prop:  # a proposed pipeline: its stages' text, else as the agent wrote it
        try:
            return to_text(from_dict({k: prop[k] for k in ("stages", "schema_version") if k in prop}))
        except Exception:  # noqa: BLE001 - an invalid proposal (its rejection reason says why)
            return plain(prop.get("stages"), 600)
    data = {k: prop[k] for k in ("nodes", "edges", "sink") if k in prop}
    try:
        return to_text(from_dict(data))
    except Exception:  # noqa: BLE001 - an invalid proposal (its rejection reason says why)
        nodes = [f"{n.get('id')}:{n.get('role')}:{n.get('model')}" if isinstance(n, dict) else str(n)
                 for n in (prop.get("nodes") or [])[:64]]
        edges = [f"{e[0]}->{e[1]}" if isinstance(e, (list, tuple)) and len(e) == 2 else str(e)
                 for e in (prop.get("edges") or [])[:128]]
        return cut_words(", ".join(nodes) + ("; edges " + ", ".join(edges) if edges else ""), 600)


# -- data ----------------------------------------------------------------------------------


def best_so_far(trials: Sequence[Any]) -> tuple[list[int], list[float]]:
    """(runs spent, best dev accuracy so far among graphs on the full dev coverage)."""
    dev = [t for t in trials if t.split == "dev"]
    top = max((len(t.question_ids) for t in dev if t.status == "complete"), default=0)
    xs, ys, spent, best = [], [], 0, -math.inf
    for t in sorted(dev, key=lambda t: t.number):
        spent += t.new_runs
        if t.status == "complete" and t.accuracy is not None and len(t.question_ids) >= top:
            best = max(best, t.accuracy)
        if best > -math.inf:
            xs.append(spent)
            ys.append(best)
    return xs, ys


def _pool_prices(spec: dict) -> dict:
    try:
        from graphtune.spec import Spec, stored_spec_data

        return Spec.model_validate(stored_spec_data(spec)).pool()
    except Exception:  # noqa: BLE001 - an old or foreign spec: no per-model prices
        return {}


def cost_breakdown(store, study) -> dict[str, Any]:
    """What the study paid: environment runs (tokens, FLOPs, dollars, per model, counting
    only runs actually paid for, not reused results) and the agent's own calls."""
    from graphtune.graphs.cost import node_flops, node_usd

    pool = _pool_prices(study.spec)
    env = {"runs": 0, "prompt_tokens": 0, "completion_tokens": 0, "flops": 0.0, "usd": 0.0}
    per_model: dict[str, dict[str, float]] = {}
    graphs = {t.id: t.graph for t in store.list_trials(study.id)}
    for trial_id, r in store.paid_results(study.id):
        env["runs"] += 1
        env["prompt_tokens"] += r.prompt_tokens or 0
        env["completion_tokens"] += r.completion_tokens or 0
        env["flops"] += r.flops or 0.0
        env["usd"] += r.usd or 0.0
        models = _node_models(graphs[trial_id])
        for n in r.nodes:
            m = models.get(n.node_id, "?")
            d = per_model.setdefault(m, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "flops": 0.0,
                                         "usd": 0.0})
            npt, nct = int(n.prompt_tokens or 0), int(n.completion_tokens or 0)
            d["calls"] += 1
            d["prompt_tokens"] += npt
            d["completion_tokens"] += nct
            if m in pool:
                d["flops"] += node_flops(pool[m], npt, nct)
                d["usd"] += node_usd(pool[m], npt, nct)
    agent = {"steps": 0, "calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0, "seconds": 0.0,
             "backend": None}
    for st in store.agent_steps(study.id):
        agent["steps"] += 1
        agent["backend"] = st.get("backend")
        for k in ("calls", "prompt_tokens", "completion_tokens", "usd", "seconds"):
            agent[k] += st.get(k) or 0
    return {"environment": env, "per_model": dict(sorted(per_model.items())), "agent": agent}


def _node_models(graph: dict) -> dict[str, str]:
    """Node id -> model of a stored graph; of a stored pipeline, ``<stage>/<node id>`` (how
    its results name node outcomes) -> model."""
    if "stages" in graph:
        return {f"{st['name']}/{n['id']}": n["model"] for st in graph["stages"] for n in st["graph"].get("nodes", [])}
    return {n["id"]: n["model"] for n in graph.get("nodes", [])}


def top_points(points: Sequence[FrontPoint], k: int) -> list[FrontPoint]:
    """The k most accurate graphs among the best-covered ones."""
    if not points:
        return []
    top = max(p.n for p in points)
    pool = [p for p in points if p.n == top]
    return sorted(pool, key=lambda p: (-p.accuracy, p.cost_units, p.trial_number))[:k]


# -- figures -----------------------------------------------------------------------------------


def fig_best_so_far(trials, title: str):
    plt = _matplotlib()
    xs, ys = best_so_far(trials)
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    if xs:
        ax.step(xs, ys, where="post", color="#1f77b4", lw=2)
        ax.scatter(xs[-1:], ys[-1:], color="#1f77b4", zorder=3)
    ax.set_xlabel("graph-question runs spent")
    ax.set_ylabel("best dev accuracy so far")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def fig_pareto(points: Sequence[FrontPoint], metric: str, recommended: FrontPoint | None, title: str):
    plt = _matplotlib()
    attr = cost_attr(metric)
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    if points:
        ax.scatter([getattr(p, attr) for p in points], [p.accuracy for p in points], s=14, color="#999999",
                   alpha=0.7, label="graphs")
        front = pareto_front(points, metric)
        ax.step([getattr(p, attr) for p in front], [p.accuracy for p in front], where="post", color="#d62728",
                lw=1.5)
        ax.scatter([getattr(p, attr) for p in front], [p.accuracy for p in front], s=30, color="#d62728",
                   label="Pareto front", zorder=3)
        if recommended is not None:
            ax.scatter([getattr(recommended, attr)], [recommended.accuracy], marker="*", s=220, color="#ff9900",
                       edgecolor="k", label="recommended", zorder=4)
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel(METRIC_LABELS.get(attr, attr))
    ax.set_ylabel("dev accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def fig_graph(graph, title: str):
    """A drawing of a graph, or of a pipeline (one box per stage)."""
    if hasattr(graph, "stages"):
        return pipeline_figure(graph, title=title)
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(max(3.5, 2.0 + 1.6 * graph.depth), max(2.4, 1.0 + 1.0 * graph.width)))
    draw_graph(graph, ax, title=title)
    return fig


# -- the HTML report -----------------------------------------------------------------------------


def _img(data: bytes, alt: str, caption: str) -> str:
    b64 = base64.b64encode(data).decode()
    return (f'<figure><img class="plot" alt="{_esc(alt)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _table(head: Sequence[str] | None, rows: Sequence[Sequence[str]], raw: bool = False, cls: str = "") -> str:
    h = "".join(f"<th>{_esc(c)}</th>" for c in head or ())
    body = []
    for r in rows:
        body.append("<tr>" + "".join(c if raw else f"<td>{_esc(c)}</td>" for c in r) + "</tr>")
    thead = f"<thead><tr>{h}</tr></thead>" if h else ""
    return f'<table class="{cls}">{thead}<tbody>{"".join(body)}</tbody></table>'


QUESTION_LEGEND = (
    "<p class='legend'>How to read it: each column is one graph, headed by its trial number and, in brackets, its "
    "dev accuracy over all the questions that trial scored (click the header for the trial's node outputs). Each "
    "row is one dev question; each cell is that graph on that question: <span class='ok'>&#10003;</span> correct, "
    "<span class='bad'>&#10007;</span> wrong, followed by the graph's final (extracted) answer, cut to 24 "
    "characters; a number in brackets is a partial score (0 to 1); <sup>m</sup> marks an outcome modelled from "
    "records rather than observed (replay); <span class='err'>error</span> is an infrastructure failure, left "
    "out of the accuracy (hover for the reason); <span class='err'>-</span> means the graph was not scored on "
    "that question. Click a cell for what each node of the graph answered on that question.</p>")
#: added to the legend for a simulated study, whose answers are classes, not texts
SIMULATED_ANSWERS = ("<p class='legend'>This study ran on the simulator: an answer is an answer class, 0 the right "
                     "answer and every other number one distinct wrong answer (equal numbers are equal answers, "
                     "which is what majority votes count).</p>")


def _env_kind(spec: Any) -> str | None:
    env = spec.get("env") if isinstance(spec, dict) else None
    return env.get("kind") if isinstance(env, dict) else None


def _trial_of(trials, number: int):
    return next((t for t in trials if t.number == number), None)


def _cell_mark(r) -> str:
    """The mark, score and answer a per-question cell shows (escaped)."""
    mark = "&#10003;" if r.correct else "&#10007;"
    part = f" ({r.score:.2f})" if r.score is not None and 0.0 < r.score < 1.0 else ""
    modelled = "<sup>m</sup>" if r.modelled else ""
    return f"{mark}{modelled}{part} {_esc(cut_words(r.answer or '', 24))}"


def _question_table(store, trials, tops: Sequence[FrontPoint], drilled: dict[int, dict[str, str]],
                    limit: int = MAX_QUESTIONS, simulated: bool = False) -> str:
    if not tops:
        return "<p>No finished dev trials.</p>"
    by_trial = {}
    qids: list[str] = []
    for p in tops:
        t = _trial_of(trials, p.trial_number)
        res = store.trial_results(t.id) if t is not None else []
        by_trial[p.trial_number] = {r.question_id: r for r in res}
        for r in res:
            if r.question_id not in qids:
                qids.append(r.question_id)
    head = "".join(f"<th><a href='#trial-{p.trial_number}'>#{p.trial_number} ({p.accuracy:.2f})</a></th>"
                   for p in tops)
    rows = []
    for q in qids[:limit]:
        first = next((drilled[p.trial_number][q] for p in tops if q in drilled.get(p.trial_number, {})), None)
        qcell = f"<a href='#{first}'>{_esc(q)}</a>" if first else _esc(q)
        cells = [f"<td>{qcell}</td>"]
        for p in tops:
            r = by_trial[p.trial_number].get(q)
            anchor = drilled.get(p.trial_number, {}).get(q)
            if r is None:
                cells.append('<td class="err">-</td>')
                continue
            if r.error:
                cls, title, body = "err", f' title="{_esc(cut_words(r.error, 300))}"', "error"
            else:
                cls, title, body = "ok" if r.correct else "bad", "", _cell_mark(r)
            if anchor:
                body = f"<a href='#{anchor}'>{body}</a>"
            cells.append(f'<td class="{cls}"{title}>{body}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more_q = f"<p class='sub'>first {limit} of {len(qids)} questions</p>" if len(qids) > limit else ""
    graphs = "".join(f"<li>#{p.trial_number}: <code>{_esc(to_text(from_dict(p.graph)))}</code></li>" for p in tops)
    table = (f"<table><thead><tr><th>question</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    legend = QUESTION_LEGEND + (SIMULATED_ANSWERS if simulated else "")
    return f"<ul>{graphs}</ul>" + legend + table + more_q


def drill_trials(trials, tops: Sequence[FrontPoint], recommended: FrontPoint | None, test) -> list:
    """The trials the drill-down shows, in this order and each once: the top graphs of
    the per-question table, the recommended graph's trial, the held-out test trial."""
    out, seen = [], set()
    numbers = [p.trial_number for p in tops] + ([recommended.trial_number] if recommended else [])
    for n in numbers:
        t = _trial_of(trials, n)
        if t is not None and t.number not in seen:
            out.append(t)
            seen.add(t.number)
    if test is not None and test.number not in seen:
        out.append(test)
    return out


def _node_rows(r, models: dict[str, str], sink: str | None) -> str:
    rows = []
    for n in r.nodes:
        ok = "-" if n.correct is None else ("&#10003;" if n.correct else "&#10007;")
        cls = "" if n.correct is None else (" class='ok'" if n.correct else " class='bad'")
        name = _esc(n.node_id) + (" (sink)" if n.node_id == sink else "")
        out = bounded(n.answer, NODE_OUTPUT_CHARS) if n.answer else "<span class='note'>(empty)</span>"
        rows.append(f"<tr><td>{name}</td><td>{_esc(models.get(n.node_id, '?'))}</td><td>{out}</td>"
                    f"<td{cls}>{ok}</td><td>{n.prompt_tokens:,} / {n.completion_tokens:,}</td>"
                    f"<td>{n.latency_s:.2f}</td></tr>")
    if not rows:
        return "<p class='note'>No per-node outcomes were stored for this question.</p>"
    return ("<table><thead><tr><th>node</th><th>role : model</th><th>output (as scored)</th><th>correct</th>"
            f"<th>tokens in / out</th><th>latency s</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _stage_answer_rows(r) -> str:
    """A pipeline result's stages on one question: each stage's answer (bounded), whether
    it was right for the stage, its tokens, dollars and duration, and which stage lost the
    pipeline's answer; empty for a single graph's result."""
    if not r.stages:
        return ""
    lost = r.lost_at
    rows = []
    for s in r.stages:
        ok = "-" if s.correct is None else ("&#10003;" if s.correct else "&#10007;")
        cls = "" if s.correct is None else (" class='ok'" if s.correct else " class='bad'")
        out = bounded(s.answer, NODE_OUTPUT_CHARS) if s.answer else "<span class='note'>(empty)</span>"
        name = _esc(s.stage) + (" <span class='note'>(lost the answer)</span>" if s.stage == lost else "")
        rows.append(f"<tr class='stage'><td>{name}</td><td>{out}</td><td{cls}>{ok}</td>"
                    f"<td>{s.prompt_tokens:,} / {s.completion_tokens:,}</td><td>${s.usd:.6f}</td>"
                    f"<td>{s.latency_s:.2f}</td></tr>")
    return ("<table><thead><tr><th>stage</th><th>stage answer (as scored)</th><th>right for the stage</th>"
            f"<th>tokens in / out</th><th>USD</th><th>duration s</th></tr></thead><tbody>{''.join(rows)}"
            "</tbody></table>")


def _stages_html(store, trials, best: FrontPoint | None, test) -> str:
    """The recommended pipeline's stages: what each runs, its share of the cost, its
    stage accuracy on the dev questions (and the held-out ones) and the answers it lost."""
    from graphtune.stages import stage_rows

    if best is None:
        return ""
    design = from_dict(best.graph)
    if not hasattr(design, "stages"):
        return ""
    t = _trial_of(trials, best.trial_number)
    rows = stage_rows(design, store.trial_results(t.id) if t is not None else [],
                      trial_units=t.cost_units if t is not None else None)
    tested = (stage_rows(design, store.trial_results(test.id), trial_units=test.cost_units)
              if test is not None and test.graph_hash == best.graph_hash else [])
    by_test = {r.name: r for r in tested}
    head = ["stage", "reads", "graph", "models (calls)", "units", "USD / query", "FLOPs", "latency s",
            "dev stage accuracy", "dev answers lost"] + (["test stage accuracy", "test answers lost"] if tested else [])
    body = []
    for r in rows:
        tr = by_test.get(r.name)
        cells = [r.name, ", ".join(r.inputs), to_text(r.graph), r.models_text(), _fmt(r.units, ".2f"),
                 _fmt(r.usd, ".6f"), _fmt(r.flops, ".3g"), _fmt(r.latency_s, ".2f"),
                 f"{_fmt(r.accuracy)} on {r.n_scored}" if r.n_scored else "-", str(r.n_lost) if r.n else "-"]
        if tested:
            cells += [f"{_fmt(tr.accuracy)} on {tr.n_scored}" if tr is not None and tr.n_scored else "-",
                      str(tr.n_lost) if tr is not None and tr.n else "-"]
        body.append("<tr class='stage-row'>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    legend = ("<p class='legend'>One row per stage of the recommended pipeline (trial "
              f"#{best.trial_number}), in order. Units: the stage's share of the pipeline's units by FLOPs; USD, "
              "FLOPs and latency: means per query over the trial's questions. Stage accuracy: how often the stage's "
              "own answer was right for the stage (what the next stage needs); answers lost: the pipeline's wrong "
              "answers this stage was the first to get wrong.</p>")
    thead = "".join(f"<th>{_esc(h)}</th>" for h in head)
    return legend + f"<table class='stages'><thead><tr>{thead}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _drilldown(store, chosen: Sequence[Any], limit: int = MAX_QUESTIONS) -> tuple[str, dict[int, dict[str, str]]]:
    """The drill-down section, and per trial number the anchor of each question shown."""
    if not chosen:
        return "<p>No finished trials.</p>", {}
    anchors: dict[int, dict[str, str]] = {}
    parts = [f"<p class='legend'>Each question opens to what every node of the graph produced on it (for a "
             f"pipeline, first each stage's answer, then every node as stage/node), in the graph's order: the output as the scorer read it (the extracted answer where the task extracts one), "
             f"cut to {NODE_OUTPUT_CHARS} characters with the full length noted, whether it was right, its tokens "
             f"and latency. Shown for the top graphs, the recommended trial and the held-out test trial, first "
             f"{limit} questions each.</p>"]
    for t in chosen:
        res = store.trial_results(t.id)
        graph = from_dict(t.graph)
        if hasattr(graph, "stages"):  # a pipeline: its results name nodes <stage>/<node id>
            models = {f"{st.name}/{n.id}": f"{n.role} : {n.model}" for st in graph.stages for n in st.graph.nodes}
            sink = f"{graph.final.name}/{graph.final.graph.sink}"
        else:
            models = {n.id: f"{n.role} : {n.model}" for n in graph.nodes}
            sink = graph.sink
        acc = f"accuracy {_fmt(t.accuracy)} on {len(t.question_ids)} questions" if t.accuracy is not None else t.status
        parts.append(f"<h3 id='trial-{t.number}'>trial #{t.number} ({_esc(t.split)}): {acc}</h3>"
                     f"<p><code>{_esc(to_text(graph))}</code></p>")
        mine = anchors.setdefault(t.number, {})
        for i, r in enumerate(res[:limit]):
            aid = f"q-{t.number}-{i}"
            mine[r.question_id] = aid
            if r.error:
                head = f"<span class='err'>error</span> {_esc(r.question_id)}: {bounded(r.error, 300)}"
            else:
                head = (f"<span class='{'ok' if r.correct else 'bad'}'>{'&#10003;' if r.correct else '&#10007;'}"
                        f"</span> {_esc(r.question_id)}: {bounded(r.answer or '', 80)}"
                        + (" <span class='note'>(modelled)</span>" if r.modelled else ""))
            parts.append(f"<details class='q' id='{aid}'><summary>{head}</summary>"
                         f"{_stage_answer_rows(r)}{_node_rows(r, models, sink)}</details>")
        if len(res) > limit:
            parts.append(f"<p class='sub'>first {limit} of {len(res)} questions</p>")
    return "".join(parts), anchors


def _changes(st: dict) -> str:
    """What an agent step changed, in words and rounded numbers (escaped HTML)."""
    applied = st.get("applied")
    lines: list[str] = []
    if isinstance(applied, dict) and isinstance(applied.get("deltas"), dict):
        d = applied["deltas"]
        if d.get("scale") is not None:
            lines.append(f"applied at scale {_num(d['scale'], '.2f')} (the agent's confidence times its step size)")
        if isinstance(d.get("stages"), dict):  # a multi-stage study: per-stage deltas and the split
            lines += _stage_changes(d, applied.get("incumbent_stages"))
        if d.get("model"):
            lines.append("model preference: " + ", ".join(f"{m} {_num(x)}" for m, x in d["model"].items()))
        if d.get("role"):
            lines.append("role preference: " + ", ".join(f"{r} {_num(x)}" for r, x in d["role"].items()))
        if d.get("edges"):
            lines.append("edges: " + ", ".join(f"{e[0]}\u2192{e[1]} {_num(e[2])}" if isinstance(e, (list, tuple))
                                               and len(e) == 3 else plain(e) for e in d["edges"][:32]))
        if isinstance(d.get("target_width"), dict):
            w = d["target_width"]
            lines.append(f"aimed at width {w.get('width')} (sink inputs {_num(w.get('sink_edge_shift'))})")
        if isinstance(d.get("target_depth"), dict):
            w = d["target_depth"]
            lines.append(f"aimed at depth {w.get('depth')} (inner edges {_num(w.get('inner_edge_shift'))})")
        for why in d.get("rejected") or []:
            lines.append("not applied: " + plain(why))
        if not lines:
            lines.append("no preference change")
        lines = [_esc(x) for x in lines]
    elif isinstance(applied, dict) and "accepted" in applied:
        n = len(applied.get("proposals") or [])
        lines.append(_esc(f"accepted {applied['accepted']} of {n} proposals"
                          + (f"; {applied['random_fill']} random graphs filled the batch"
                             if applied.get("random_fill") else "")))
    elif isinstance(applied, dict) and applied.get("fallback"):
        lines.append(_esc(f"no structured update: {applied['fallback']}"))
    elif applied:
        lines.append(_esc(plain(applied)))
    if st.get("rejected_reason"):
        lines.append("<b>rejected:</b> " + more(st["rejected_reason"]))
    return "<ul class='steps'>" + "".join(f"<li>{x}</li>" for x in lines) + "</ul>" if lines else "-"


def _stage_changes(d: dict, incumbent: Any) -> list[str]:
    """A pipeline agent step, per stage: the deltas applied to each stage's distribution,
    the budget split's, and the incumbent's cost, stage accuracy and answers lost (plain
    text lines, escaped by the caller)."""
    lines = []
    for name, x in d["stages"].items():
        if not isinstance(x, dict):
            continue
        parts = []
        if x.get("model"):
            parts.append("models " + ", ".join(f"{m} {_num(v)}" for m, v in x["model"].items()))
        if x.get("role"):
            parts.append("roles " + ", ".join(f"{r} {_num(v)}" for r, v in x["role"].items()))
        if x.get("edges"):
            parts.append("edges " + ", ".join(f"{e[0]}\u2192{e[1]} {_num(e[2])}" for e in x["edges"][:16]
                                              if isinstance(e, (list, tuple)) and len(e) == 3))
        for k in ("target_width", "target_depth"):
            if isinstance(x.get(k), dict):
                parts.append(f"{k.removeprefix('target_')} {x[k].get(k.removeprefix('target_'))}")
        lines.append(f"stage {name}: " + ("; ".join(parts) if parts else "no change"))
    if d.get("budget_split"):
        lines.append("budget split: " + ", ".join(f"{n} {_num(v)}" for n, v in d["budget_split"].items()))
    if isinstance(d.get("expected_split"), dict):
        lines.append("expected budget shares now: " + ", ".join(f"{n} {_num(v)}" for n, v in d["expected_split"].items()))
    if isinstance(incumbent, dict):
        for name, v in incumbent.items():
            if isinstance(v, dict):
                acc = v.get("stage_accuracy")
                lines.append(f"incumbent's {name}: {v.get('graph')} ({_num(v.get('cost_units'), '.1f')} units, stage "
                             f"accuracy {'n/a' if acc is None else _num(acc)}, lost {v.get('lost')}/{v.get('n')})")
    return lines


def _proposals(st: dict) -> str:
    applied = st.get("applied") if isinstance(st.get("applied"), dict) else {}
    outcomes = applied.get("proposals") or []
    parsed = st.get("parsed") if isinstance(st.get("parsed"), dict) else {}
    props = parsed.get("proposals") or []
    items = []
    for o in outcomes[:MAX_PROPOSALS_SHOWN]:
        if not isinstance(o, dict):
            items.append(_esc(plain(o)))
            continue
        i = o.get("index")
        g = props[i] if isinstance(i, int) and 0 <= i < len(props) else None
        status = str(o.get("status") or "?")
        reason = f" ({more(o['reason'], 120, 600)})" if o.get("reason") else ""
        graph = f": <code>{_esc(proposal_text(g))}</code>" if g is not None else ""
        if o.get("stage"):  # a pipeline proposal: the stage it changes
            graph = f" stage {_esc(o['stage'])}" + graph
        items.append(f"<b>{_esc(status)}</b>{reason}{graph}")
    if len(outcomes) > MAX_PROPOSALS_SHOWN:
        items.append(f"<span class='note'>and {len(outcomes) - MAX_PROPOSALS_SHOWN} more</span>")
    return "<ul class='steps'>" + "".join(f"<li>{x}</li>" for x in items) + "</ul>" if items else "-"


def _timeline(store, study, trials, drilled: Sequence[int] = ()) -> str:
    steps = store.agent_steps(study.id)
    if not steps:
        return "<p>This search used no feedback agent.</p>"
    from_step: dict[str, list] = {}
    for t in trials:
        key = (t.info or {}).get("agent_step")
        if key:
            from_step.setdefault(key, []).append(t)
    rows = []
    for st in steps:
        feedback = more(st.get("feedback"))
        if st.get("is_llm") and st.get("reply"):
            feedback += (f"<details class='more'><summary><span class='m'>the model's reply "
                         f"({len(st['reply']):,} characters stored)</span></summary>"
                         f"<pre>{bounded(st['reply'], REPLY_CHARS)}</pre></details>")
        tr = from_step.get(st.get("key"), [])
        tr_txt = ", ".join((f"<a href='#trial-{t.number}'>" if t.number in drilled else "")
                           + f"#{t.number} acc {_fmt(t.accuracy, '.2f')} on {len(t.question_ids)}q"
                           + ("</a>" if t.number in drilled else "") for t in tr) or "-"
        rows.append([_esc(st.get("batch")), _esc(st.get("kind") or ""), _esc(st.get("backend") or ""),
                     feedback or "-", _changes(st), _proposals(st), tr_txt])
    head = "".join(f"<th>{h}</th>" for h in ("batch", "kind", "agent", "feedback", "what it changed", "proposals",
                                             "trials of its proposals"))
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    legend = ("<p class='legend'>One row per agent step. Preference changes are the logit deltas actually applied "
              "to the search distribution (positive: sampled more often), rounded to two decimals; a proposal is "
              "queued or accepted (it becomes a trial), or rejected with the reason.</p>")
    return legend + f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cost_html(cb: dict) -> str:
    e, a = cb["environment"], cb["agent"]
    rows = [["environment (graph runs paid for)", str(e["runs"]), f"{e['prompt_tokens']:,}",
             f"{e['completion_tokens']:,}", f"{e['flops']:.3g}", f"${e['usd']:.4f}", "-"],
            [f"agent ({a['backend'] or 'none'})", f"{a['calls']} calls / {a['steps']} steps",
             f"{a['prompt_tokens']:,}", f"{a['completion_tokens']:,}", "-", f"${a['usd']:.4f}", f"{a['seconds']:.1f}"]]
    head = ["who", "runs", "prompt tokens", "completion tokens", "FLOPs", "USD", "seconds"]
    pm = [[m, str(d["calls"]), f"{d['prompt_tokens']:,}", f"{d['completion_tokens']:,}", f"{d['flops']:.3g}",
           f"${d['usd']:.4f}"] for m, d in cb["per_model"].items()]
    return (_table(head, rows) + "<h3>environment, per model</h3>" +
            _table(["model", "calls", "prompt tokens", "completion tokens", "FLOPs", "USD"], pm))


def build_report(store, study, *, metric: str = "units", top: int = 3) -> tuple[str, dict[str, bytes]]:
    """The report's HTML and its plots as PNG bytes (by file name)."""
    plt = _matplotlib()
    cost_attr(metric)
    sp = study_points(store, study)
    trials = sp.trials
    pngs: dict[str, bytes] = {}
    fig = fig_best_so_far(trials, f"{study.name}: best-so-far ({study.method})")
    pngs["best_so_far.png"] = _png(fig)
    plt.close(fig)
    fig = fig_pareto(sp.points, metric, sp.recommended, f"{study.name}: dev accuracy vs {metric}")
    pngs["pareto.png"] = _png(fig)
    plt.close(fig)
    best = sp.recommended or (top_points(sp.points, 1) or [None])[0]
    if best is not None:
        fig = fig_graph(from_dict(best.graph), f"trial #{best.trial_number}: {best.accuracy:.3f} dev accuracy")
        pngs["best_graph.png"] = _png(fig)
        plt.close(fig)
    front = pareto_front(sp.points, metric)
    ref = default_ref_cost(study.spec, metric, sp.points)
    hv = hypervolume_points(sp.points, metric, ref)
    dev = [t for t in trials if t.split == "dev"]
    test = sp.test_trial
    pipeline = bool(best is not None and "stages" in best.graph)
    summary = [
        ("method", study.method), ("status", study.status),
        ("dev trials", f"{len(dev)} ({sum(t.status == 'failed' for t in dev)} failed)"),
        ("graph-question runs spent", str(study.runs_spent)),
        ("recommended pipeline" if pipeline else "recommended graph", to_text(from_dict(best.graph)) if best else "-"),
        ("dev accuracy", f"{best.accuracy:.3f} on {best.n} questions (trial #{best.trial_number})" if best else "-"),
        ("test accuracy", f"{_fmt(test.accuracy)} on {len(test.question_ids)} held-out questions" if test else
         "not scored yet"),
        ("cost / query", f"{best.cost_units:.2f} units, {best.flops:.3g} FLOPs, ${best.usd:.6f}, "
                         f"{best.latency_s:.2f} s" if best else "-"),
        ("Pareto front", f"{len(front)} of {len(sp.points)} well-evaluated graphs; hypervolume {hv:.4g} "
                         f"(reference {metric} {ref:g})"),
    ]
    tops = top_points(sp.points, top)
    drill_html, anchors = _drilldown(store, drill_trials(trials, tops, sp.recommended, test))
    front_rows = [[f"#{p.trial_number}", f"{p.accuracy:.3f}", str(p.n), f"{p.cost_units:.2f}", f"{p.usd:.2e}",
                   f"{p.latency_s:.2f}", to_text(from_dict(p.graph))] for p in front]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>graphtune report: {_esc(study.name)}</title><style>{CSS}</style></head>",
        # one inline handler counts the decoded plots (for the browser test); the other
        # opens the drill-down entry a link (or the address) points to, for browsers that
        # do not open a <details> on fragment navigation themselves
        f"<body onload=\"document.body.dataset.plotsLoaded=Array.from(document.images)"
        f".filter(function(i){{return i.complete&&i.naturalWidth>0;}}).length;{OPEN_TARGET}\" "
        f"onhashchange=\"{OPEN_TARGET}\">",
        f"<h1>graphtune report: {_esc(study.name)}</h1>",
        f"<p class='sub'>store {_esc(store.safe_url())}; created {_esc(str(study.created_at)[:19])}</p>",
        "<h2>Summary</h2>", _table(None, [[k, v] for k, v in summary], cls="kv"),
        "<h2>Search</h2><div class='grid'>",
        _img(pngs["best_so_far.png"], "best-so-far curve", "best dev accuracy among fully evaluated graphs, "
                                                             "against the search budget spent"),
        _img(pngs["pareto.png"], "Pareto plot", "well-evaluated graphs (grey), the front (red), the recommended "
                                                "graph (star)"),
        "</div>",
        "<h2>Recommended pipeline</h2>" if pipeline else "<h2>Recommended graph</h2>",
        _img(pngs["best_graph.png"], "drawing of the best graph",
             ("one box per stage, in order, an arrow from each stage to the stages reading it; in a box: "
              if pipeline else "") + "levels left to right; fusers square; the sink outlined red")
        if "best_graph.png" in pngs else "",
        *(["<h3>Stages</h3>", _stages_html(store, trials, best, test)] if pipeline else []),
        "<h2>Pareto front</h2>",
        _table(["trial", "accuracy", "questions", "units", "USD / query", "latency s", "graph"], front_rows),
        f"<h2>Per-question results of the top {top} graphs</h2>",
        _question_table(store, trials, tops, anchors, simulated=_env_kind(study.spec) == "simulated"),
        "<h2>Agent feedback timeline</h2>", _timeline(store, study, trials, set(anchors)),
        "<h2>Per-question drill-down</h2>", drill_html,
        "<h2>Cost breakdown</h2>", _cost_html(cost_breakdown(store, study)),
        "<p class='sub'>Generated by graphtune; self-contained (no network needed to view).</p>",
        "</body></html>",
    ]
    return "\n".join(parts), pngs


def write_report(store, study, out: str | Path, *, png_dir: str | Path | None = None, metric: str = "units",
                 top: int = 3) -> tuple[Path, list[Path]]:
    """Write the HTML report (and, with ``png_dir``, its plots as PNG files)."""
    from graphtune.export import ExportError

    out = Path(out)
    if not out.parent.exists():
        raise ExportError(f"directory {out.parent} does not exist; create it or choose another -o path")
    text, pngs = build_report(store, study, metric=metric, top=top)
    out.write_text(text, encoding="utf-8")
    written = []
    if png_dir is not None:
        d = Path(png_dir)
        d.mkdir(parents=True, exist_ok=True)
        for name, data in pngs.items():
            (d / name).write_bytes(data)
            written.append(d / name)
    return out, written


# -- comparisons ------------------------------------------------------------------------------


def compare_rows(store, studies: Sequence[Any], *, metric: str = "units") -> list[dict[str, str]]:
    """One row per study: method, budget spent, best graph, test accuracy, front size
    and hypervolume (a common reference cost, so the numbers compare)."""
    sps = [study_points(store, s) for s in studies]
    ref = max(default_ref_cost(s.spec, metric, sp.points) for s, sp in zip(studies, sps))
    rows = []
    for s, sp in zip(studies, sps):
        best = sp.recommended or (top_points(sp.points, 1) or [None])[0]
        rows.append({
            "study": s.name, "method": s.method, "trials": str(len([t for t in sp.trials if t.split == "dev"])),
            "runs": str(s.runs_spent), "dev acc": _fmt(best.accuracy if best else None),
            "test acc": _fmt(sp.test_trial.accuracy if sp.test_trial else None),
            "units": _fmt(best.cost_units if best else None, ".2f"),
            "front": str(len(pareto_front(sp.points, metric))),
            f"HV ({metric}<={ref:g})": f"{hypervolume_points(sp.points, metric, ref):.4g}",
            "best graph": to_text(from_dict(best.graph)) if best else "-"})
    return rows


def compare_png(store, studies: Sequence[Any], path: str | Path, *, metric: str = "units") -> Path:
    plt = _matplotlib()
    attr = cost_attr(metric)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for s in studies:
        sp = study_points(store, s)
        xs, ys = best_so_far(sp.trials)
        a1.step(xs, ys, where="post", label=f"{s.name} ({s.method})")
        fr = pareto_front(sp.points, metric)
        a2.step([getattr(p, attr) for p in fr], [p.accuracy for p in fr], where="post", marker="o", ms=4,
                label=s.name)
    a1.set_xlabel("graph-question runs spent")
    a1.set_ylabel("best dev accuracy so far")
    a2.set_xlabel(METRIC_LABELS.get(attr, attr))
    a2.set_ylabel("dev accuracy")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
