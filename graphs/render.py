"""Text and mermaid renderings of a graph."""

from __future__ import annotations

from graphtune.graphs.model import Graph


def _short(model: str) -> str:
    return model.split("/")[-1]


def to_text(graph: Graph) -> str:
    """One line per level, e.g. ``[assistant:3b, assistant:3b] -> fuser:8b``."""
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


def to_short(graph: Graph) -> str:
    """Levels joined by arrows, role initial and short model: ``A:3b A:8b > F:3b``."""
    by_level: dict[int, list[str]] = {}
    for nid, lv in sorted(graph.levels.items(), key=lambda kv: (kv[1], kv[0])):
        n = graph.node_map[nid]
        by_level.setdefault(lv, []).append(f"{n.role[0].upper()}:{_tiny(n.model)}")
    return " > ".join(" ".join(sorted(v)) for _, v in sorted(by_level.items()))


def to_mermaid(graph: Graph) -> str:
    """A mermaid flowchart; roles and models appear on the nodes."""
    lines = ["flowchart LR"]
    for n in graph.nodes:
        shape = ("[[", "]]") if n.role == "fuser" else ("[", "]")
        lines.append(f'    {n.id}{shape[0]}"{n.id}: {n.role}<br/>{_short(n.model)}"{shape[1]}')
    for u, v in graph.edges:
        lines.append(f"    {u} --> {v}")
    return "\n".join(lines)
