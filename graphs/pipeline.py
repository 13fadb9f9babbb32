"""A multi-stage pipeline as immutable data: stages, each its own collaboration graph.

A :class:`Stage` is a named collaboration graph whose prompt holds the question and/or the
final (sink) answers of earlier stages, named in ``inputs``. A :class:`Pipeline` is a
sequence of stages forming a DAG: every input names ``"question"`` or an *earlier* stage
(so there can be no cycle), every stage but the last feeds some later stage (a stage whose
output nobody reads would do no work), and the last stage's sink gives the pipeline's
answer. Like :class:`~graphtune.graphs.model.Graph`, construction validates and every
problem is a one-line :class:`~graphtune.errors.GraphError` naming the stage.

A one-stage pipeline reading only the question is today's single graph:
:func:`as_single` returns that graph, so single-stage studies keep their graph hashes
(:func:`pipeline_hash` is a different hash, for pipelines proper).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from graphtune.errors import GraphError
from graphtune.graphs import io as graph_io
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.model import Graph
from graphtune.graphs.render import _short, to_text

#: the input name of the task's question (a stage may not take this name)
QUESTION = "question"
SCHEMA_VERSION = graph_io.SCHEMA_VERSION  # one graph-file format version for graphs and pipelines
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")

__all__ = ["QUESTION", "Pipeline", "Stage", "as_single", "from_dict", "pipeline_hash", "single",
           "to_dict", "to_mermaid", "to_text_pipeline"]


@dataclass(frozen=True)
class Stage:
    """One stage: ``graph`` runs on a prompt holding ``inputs`` (``"question"`` and/or the
    names of earlier stages, whose sink answers are appended in this order)."""

    name: str
    graph: Graph
    inputs: tuple[str, ...] = (QUESTION,)

    def __post_init__(self) -> None:
        # a list (or one name) given for inputs still makes a hashable, comparable value
        inputs = (self.inputs,) if isinstance(self.inputs, str) else tuple(self.inputs)
        object.__setattr__(self, "inputs", inputs)

    @staticmethod
    def make(name: str, graph: Graph, inputs: Iterable[str] = (QUESTION,)) -> Stage:
        return Stage(name=str(name), graph=graph, inputs=tuple(str(i) for i in inputs))


@dataclass(frozen=True)
class Pipeline:
    """An immutable, validated DAG of stages in execution order; the last stage's answer is
    the pipeline's."""

    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise GraphError("pipeline has no stages; add at least one stage")
        seen: set[str] = set()
        for i, s in enumerate(self.stages):
            if not isinstance(s, Stage):
                raise GraphError(f"pipeline stage {i} is a {type(s).__name__}, not a Stage")
            if not isinstance(s.name, str) or not _NAME.match(s.name):
                raise GraphError(f"stage {s.name!r}: a stage name starts with a letter and holds only letters, "
                                 "digits, '_' and '-'")
            if s.name == QUESTION:
                raise GraphError(f"stage {s.name!r}: {QUESTION!r} names the task's question; rename the stage")
            if s.name in seen:
                raise GraphError(f"stage {s.name!r} appears twice; give every stage a unique name")
            if not isinstance(s.graph, Graph):
                raise GraphError(f"stage {s.name!r}: its graph is a {type(s.graph).__name__}, not a Graph")
            s.graph.topo_order  # a cycle inside the stage's graph raises
            try:
                s.graph.sink
            except GraphError as err:
                raise GraphError(f"stage {s.name!r}: {err}") from None
            if not s.inputs:
                raise GraphError(f"stage {s.name!r} has no inputs; give it {QUESTION!r} and/or earlier stages")
            if len(set(s.inputs)) != len(s.inputs):
                raise GraphError(f"stage {s.name!r} lists an input twice: {list(s.inputs)}")
            later = {t.name for t in self.stages[i:]}
            for inp in s.inputs:
                if inp == QUESTION or inp in seen:
                    continue
                if inp in later:
                    why = "itself" if inp == s.name else f"stage {inp!r}, which runs after it"
                    raise GraphError(f"stage {s.name!r} reads {why}; a stage reads only {QUESTION!r} and earlier "
                                     "stages (stages form a DAG, in order)")
                raise GraphError(f"stage {s.name!r} reads unknown input {inp!r}; known: "
                                 f"{[QUESTION, *sorted(seen)]}")
            seen.add(s.name)
        read = {inp for s in self.stages for inp in s.inputs}
        for s in self.stages[:-1]:
            if s.name not in read:
                raise GraphError(f"stage {s.name!r} feeds no later stage, so it would do no work; read it from a "
                                 f"later stage's inputs or remove it (the last stage, {self.stages[-1].name!r}, "
                                 "gives the answer)")

    @staticmethod
    def build(stages: Iterable[Stage]) -> Pipeline:
        return Pipeline(stages=tuple(stages))

    # -- structure -------------------------------------------------------------------
    @cached_property
    def stage_map(self) -> dict[str, Stage]:
        return {s.name: s for s in self.stages}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def stage(self, name: str) -> Stage:
        try:
            return self.stage_map[name]
        except KeyError:
            raise GraphError(f"pipeline has no stage {name!r}; its stages: {list(self.names)}") from None

    @property
    def final(self) -> Stage:
        """The stage whose sink answer is the pipeline's."""
        return self.stages[-1]

    def upstream(self, name: str) -> tuple[str, ...]:
        """The stages ``name`` reads (not the question), in input order."""
        return tuple(i for i in self.stage(name).inputs if i != QUESTION)

    @property
    def size(self) -> int:
        """Total number of nodes (LLM calls) over all stages."""
        return sum(s.graph.size for s in self.stages)

    def model_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.stages:
            for m, c in s.graph.model_counts().items():
                out[m] = out.get(m, 0) + c
        return dict(sorted(out.items()))

    def replace_stage(self, name: str, graph: Graph) -> Pipeline:
        """A new pipeline with stage ``name`` running ``graph`` instead."""
        self.stage(name)
        return Pipeline(tuple(Stage(s.name, graph, s.inputs) if s.name == name else s for s in self.stages))

    def __str__(self) -> str:
        return to_text_pipeline(self)


def single(graph: Graph, name: str = "answer") -> Pipeline:
    """The one-stage pipeline running ``graph`` on the question."""
    return Pipeline((Stage(name, graph, (QUESTION,)),))


def as_single(pipeline: Pipeline) -> Graph | None:
    """The graph of a one-stage pipeline that reads only the question (today's single-stage
    case, hashed with :func:`graphtune.graphs.canonical.graph_hash`); None otherwise."""
    if len(pipeline.stages) == 1 and pipeline.stages[0].inputs == (QUESTION,):
        return pipeline.stages[0].graph
    return None


def pipeline_hash(pipeline: Pipeline) -> str:
    """Stable 16-hex-digit hash of the stages in order: names, inputs and each graph's
    canonical hash (so node naming inside a stage changes nothing)."""
    payload = json.dumps({"pipeline": [[s.name, list(s.inputs), graph_hash(s.graph)] for s in pipeline.stages]},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# -- serialisation -----------------------------------------------------------------------


def to_dict(pipeline: Pipeline) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION,
            "stages": [{"name": s.name, "inputs": list(s.inputs), "graph": graph_io.to_dict(s.graph)}
                       for s in pipeline.stages]}


def from_dict(data: Any, *, where: str = "pipeline") -> Pipeline:
    """Parse plain data (as written by :func:`to_dict`); every problem is one line naming
    ``where`` and the stage."""
    if not isinstance(data, Mapping):
        raise GraphError(f"{where}: expected a mapping with `stages`, got {type(data).__name__}")
    graph_io.check_header(data, where, ("stages",))
    raw = data.get("stages")
    if not isinstance(raw, list) or not raw:
        raise GraphError(f"{where}: `stages` must be a non-empty list of {{name, inputs, graph}}")
    stages = []
    for i, rs in enumerate(raw):
        if not isinstance(rs, Mapping) or not {"name", "graph"} <= set(rs):
            raise GraphError(f"{where}: stages[{i}] must have name and graph (and optionally inputs)")
        extra = set(rs) - {"name", "inputs", "graph"}
        if extra:
            raise GraphError(f"{where}: stage {rs['name']!r} has unknown keys {sorted(extra)}; "
                             "allowed: name, inputs, graph")
        inputs = rs.get("inputs", [QUESTION])
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
            raise GraphError(f"{where}: stage {rs['name']!r}: `inputs` must be a list of names")
        at = f"{where}: stage {rs['name']!r}"
        try:
            graph = graph_io.from_dict(rs["graph"], where=at)
        except GraphError as err:
            raise GraphError(str(err) if str(err).startswith(at) else f"{at}: {err}") from None
        stages.append(Stage.make(rs["name"], graph, inputs))
    return Pipeline(tuple(stages))


# -- rendering -----------------------------------------------------------------------------


def to_text_pipeline(pipeline: Pipeline) -> str:
    """One line per stage: ``name(<- inputs): <the stage graph's text>``."""
    return "\n".join(f"{s.name}(<-{','.join(s.inputs)}): {to_text(s.graph)}" for s in pipeline.stages)


def to_mermaid(pipeline: Pipeline) -> str:
    """A mermaid flowchart with one subgraph per stage (ids ``s0``, ``s1``, ... labelled with
    the stage names, which may hold characters mermaid ids may not); an input edge runs from
    the question node or the input stage's sink to the reading stage's subgraph."""
    sid = {s.name: f"s{i}" for i, s in enumerate(pipeline.stages)}
    lines = ["flowchart LR", f'    {QUESTION}(["{QUESTION}"])']

    def nid(stage: str, node: str) -> str:
        return f"{sid[stage]}_{node}"

    for s in pipeline.stages:
        g = s.graph
        lines.append(f'    subgraph {sid[s.name]}["{s.name}"]')
        for n in g.nodes:
            shape = ("[[", "]]") if n.role == "fuser" else ("[", "]")
            lines.append(f'        {nid(s.name, n.id)}{shape[0]}"{n.id}: {n.role}<br/>{_short(n.model)}"{shape[1]}')
        for u, v in g.edges:
            lines.append(f"        {nid(s.name, u)} --> {nid(s.name, v)}")
        lines.append("    end")
    for s in pipeline.stages:
        for inp in s.inputs:
            src = QUESTION if inp == QUESTION else nid(inp, pipeline.stage(inp).graph.sink)
            lines.append(f"    {src} --> {sid[s.name]}")
    return "\n".join(lines)
