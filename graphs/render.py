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


def to_mermaid(graph: Graph) -> str:
    """A mermaid flowchart; roles and models appear on the nodes."""
    lines = ["flowchart LR"]
    for n in graph.nodes:
        shape = ("[[", "]]") if n.role == "fuser" else ("[", "]")
        lines.append(f'    {n.id}{shape[0]}"{n.id}: {n.role}<br/>{_short(n.model)}"{shape[1]}')
    for u, v in graph.edges:
        lines.append(f"    {u} --> {v}")
    return "\n".join(lines)
