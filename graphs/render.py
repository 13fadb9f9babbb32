"""Text and mermaid renderings of a graph."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from graphtune.graphs.model import Graph


def _short(model: str) -> str:
    return model.split("/")[-1]


def _stages(design) -> tuple | None:
    """A pipeline's stages (a design with ``stages``), None for a graph: the renderings
    below take either (:mod:`graphtune.graphs.design`)."""
    return getattr(design, "stages", None)


def to_text(graph: Graph) -> str:
    """One line per level, e.g. ``[assistant:3b, assistant:3b] -> fuser:8b``; a pipeline:
    one line per stage (``name(<-inputs): ...``)."""
    if _stages(graph) is not None:
        return "\n".join(f"{s.name}(<-{','.join(s.inputs)}): {to_text(s.graph)}" for s in graph.stages)
    by_level: dict[int, list[str]] = {}
    for nid, lv in sorted(graph.levels.items(), key=lambda kv: (kv[1], kv[0])):
        n = graph.node_map[nid]
        preds = graph.preds[nid]
        src = f"<-{','.join(preds)}" if preds else ""
        by_level.setdefault(lv, []).append(f"{nid}:{n.role}:{_short(n.model)}{src}")
    return " | ".join("[" + ", ".join(v) + "]" for _, v in sorted(by_level.items()))


def _tiny(model: str) -> str:
    """``llama-3.1-8b`` -> ``8b``: the last dash-separated part of the model name."""
    return _short(model).split("-")[-1]


def short_labels(models: Iterable[str]) -> dict[str, str]:
    """A short label per model, unique within ``models`` (the pool being shown).

    Each model starts with the last dash-separated part of its name (``llama-3.2-1b`` ->
    ``1b``); models whose labels clash, ignoring case (``7b`` and ``7B`` read the same),
    take one more part from the right (``zephyr-7b-beta`` -> ``7b-beta``) until they
    differ; names that still clash keep their whole name, provider prefix included. A
    label that is unique stays as it is, so adding a model to the pool changes only
    the labels it clashes with.
    """
    names = sorted(set(models))
    take = dict.fromkeys(names, 1)

    def label(m: str) -> str:
        parts = _short(m).split("-")
        return m if take[m] > len(parts) else "-".join(parts[-take[m]:])

    while True:
        groups: dict[str, list[str]] = {}
        for m in names:
            groups.setdefault(label(m).lower(), []).append(m)
        clashes = [ms for ms in groups.values() if len(ms) > 1 and any(label(m) != m for m in ms)]
        if not clashes:
            return {m: label(m) for m in names}
        for ms in clashes:
            for m in ms:
                if label(m) != m:
                    take[m] += 1


def to_short(graph: Graph, labels: Mapping[str, str] | Iterable[str] | None = None) -> str:
    """Levels joined by arrows, role initial and short model: ``A:3b A:8b > F:3b``.

    ``labels`` is the pool being shown (its model names) or the labels
    :func:`short_labels` made for it; a listing of many graphs passes the same pool to
    every call so one model reads the same everywhere. Without it the labels are unique
    among the graph's own models. A pipeline: its stages as ``name: ...`` joined by `` / ``."""
    if _stages(graph) is not None:
        pool = labels if labels is not None else short_labels(n.model for s in graph.stages for n in s.graph.nodes)
        return " / ".join(f"{s.name}: {to_short(s.graph, pool)}" for s in graph.stages)
    if labels is None:
        labels = short_labels(n.model for n in graph.nodes)
    elif not isinstance(labels, Mapping):
        labels = short_labels(list(labels) + [n.model for n in graph.nodes])
    elif any(n.model not in labels for n in graph.nodes):
        labels = short_labels(list(labels) + [n.model for n in graph.nodes])
    by_level: dict[int, list[str]] = {}
    for nid, lv in sorted(graph.levels.items(), key=lambda kv: (kv[1], kv[0])):
        n = graph.node_map[nid]
        by_level.setdefault(lv, []).append(f"{n.role[0].upper()}:{labels[n.model]}")
    return " > ".join(" ".join(sorted(v)) for _, v in sorted(by_level.items()))


def to_mermaid(graph: Graph) -> str:
    """A mermaid flowchart; roles and models appear on the nodes (a pipeline: one subgraph
    per stage)."""
    if _stages(graph) is not None:
        from graphtune.graphs.pipeline import to_mermaid as pipeline_mermaid

        return pipeline_mermaid(graph)
    lines = ["flowchart LR"]
    for n in graph.nodes:
        shape = ("[[", "]]") if n.role == "fuser" else ("[", "]")
        lines.append(f'    {n.id}{shape[0]}"{n.id}: {n.role}<br/>{_short(n.model)}"{shape[1]}')
    for u, v in graph.edges:
        lines.append(f"    {u} --> {v}")
    return "\n".join(lines)
