"""Reports of stored studies: one self-contained HTML file, and side-by-side comparisons.

The HTML report needs nothing at view time: plots are PNGs inlined as base64, the CSS is
inline, there is no script from elsewhere (one inline line counts the loaded plots into
``body[data-plots-loaded]`` so a headless browser test can check them). Sections: the
best-so-far curve, the Pareto plot, a drawing of the recommended graph, per-question
results of the top graphs, the agent's feedback timeline with the updates it caused
and the trials of its proposals, and a cost breakdown (environment vs agent, per model).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from graphtune.export import _matplotlib, draw_graph
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
"""


def _png(fig, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


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
        models = {n["id"]: n["model"] for n in graphs[trial_id].get("nodes", [])}
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


def _question_table(store, trials, tops: Sequence[FrontPoint], limit: int = 150) -> str:
    if not tops:
        return "<p>No finished dev trials.</p>"
    by_trial = {}
    qids: list[str] = []
    for p in tops:
        t_id = next(t.id for t in trials if t.number == p.trial_number)
        res = store.trial_results(t_id)
        by_trial[p.trial_number] = {r.question_id: r for r in res}
        for r in res:
            if r.question_id not in qids:
                qids.append(r.question_id)
    head = ["question"] + [f"#{p.trial_number} ({p.accuracy:.2f})" for p in tops]
    rows = []
    for q in qids[:limit]:
        cells = [f"<td>{_esc(q)}</td>"]
        for p in tops:
            r = by_trial[p.trial_number].get(q)
            if r is None:
                cells.append('<td class="err">-</td>')
            elif r.error:
                cells.append(f'<td class="err" title="{_esc(r.error)}">error</td>')
            else:
                ans = _esc((r.answer or "")[:24])
                cells.append(f'<td class="{"ok" if r.correct else "bad"}">{"&#10003;" if r.correct else "&#10007;"} '
                             f"{ans}</td>")
        rows.append(cells)
    more = f"<p class='sub'>first {limit} of {len(qids)} questions</p>" if len(qids) > limit else ""
    legend = "".join(f"<li>#{p.trial_number}: <code>{_esc(to_text(from_dict(p.graph)))}</code></li>" for p in tops)
    return f"<ul>{legend}</ul>" + _table(head, [["".join(r)] for r in rows], raw=True) + more


def _timeline(store, study, trials) -> str:
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
        applied = st.get("applied") or {}
        deltas = applied.get("deltas") if isinstance(applied, dict) else None
        props = applied.get("proposals") if isinstance(applied, dict) else None
        upd = json.dumps(deltas, default=str)[:400] if deltas else (json.dumps(applied, default=str)[:200] or "-")
        if st.get("rejected_reason"):
            upd += f" (rejected: {st['rejected_reason']})"
        prop_txt = ", ".join(f"{p.get('status')}" + (f" ({p.get('reason')})" if p.get("reason") else "")
                             for p in (props or [])) or "-"
        tr = from_step.get(st["key"], [])
        tr_txt = ", ".join(f"#{t.number} acc {_fmt(t.accuracy, '.2f')} on {len(t.question_ids)}q" for t in tr) or "-"
        rows.append([str(st.get("batch")), st.get("kind") or "", st.get("backend") or "",
                     (st.get("feedback") or "")[:600], upd, prop_txt, tr_txt])
    return _table(["batch", "kind", "agent", "feedback", "update applied", "proposals", "trials of its proposals"],
                  rows)


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
    summary = [
        ("method", study.method), ("status", study.status),
        ("dev trials", f"{len(dev)} ({sum(t.status == 'failed' for t in dev)} failed)"),
        ("graph-question runs spent", str(study.runs_spent)),
        ("recommended graph", to_text(from_dict(best.graph)) if best else "-"),
        ("dev accuracy", f"{best.accuracy:.3f} on {best.n} questions (trial #{best.trial_number})" if best else "-"),
        ("test accuracy", f"{_fmt(test.accuracy)} on {len(test.question_ids)} held-out questions" if test else
         "not scored yet"),
        ("cost / query", f"{best.cost_units:.2f} units, {best.flops:.3g} FLOPs, ${best.usd:.6f}, "
                         f"{best.latency_s:.2f} s" if best else "-"),
        ("Pareto front", f"{len(front)} of {len(sp.points)} well-evaluated graphs; hypervolume {hv:.4g} "
                         f"(reference {metric} {ref:g})"),
    ]
    front_rows = [[f"#{p.trial_number}", f"{p.accuracy:.3f}", str(p.n), f"{p.cost_units:.2f}", f"{p.usd:.2e}",
                   f"{p.latency_s:.2f}", to_text(from_dict(p.graph))] for p in front]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>graphtune report: {_esc(study.name)}</title><style>{CSS}</style></head>",
        "<body onload=\"document.body.dataset.plotsLoaded=Array.from(document.images)"
        ".filter(function(i){return i.complete&&i.naturalWidth>0;}).length\">",
        f"<h1>graphtune report: {_esc(study.name)}</h1>",
        f"<p class='sub'>store {_esc(store.safe_url())}; created {_esc(str(study.created_at)[:19])}</p>",
        "<h2>Summary</h2>", _table(None, [[k, v] for k, v in summary], cls="kv"),
        "<h2>Search</h2><div class='grid'>",
        _img(pngs["best_so_far.png"], "best-so-far curve", "best dev accuracy among fully evaluated graphs, "
                                                             "against the search budget spent"),
        _img(pngs["pareto.png"], "Pareto plot", "well-evaluated graphs (grey), the front (red), the recommended "
                                                "graph (star)"),
        "</div>",
        "<h2>Recommended graph</h2>",
        _img(pngs["best_graph.png"], "drawing of the best graph", "levels left to right; fusers square; the sink "
                                                                   "outlined red") if "best_graph.png" in pngs else "",
        "<h2>Pareto front</h2>",
        _table(["trial", "accuracy", "questions", "units", "USD / query", "latency s", "graph"], front_rows),
        f"<h2>Per-question results of the top {top} graphs</h2>",
        _question_table(store, trials, top_points(sp.points, top)),
        "<h2>Agent feedback timeline</h2>", _timeline(store, study, trials),
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
