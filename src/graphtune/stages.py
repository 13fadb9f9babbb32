"""Per-stage figures of a stored pipeline trial, for every output that shows one
(``graphtune show``, the HTML report, the dashboard's notes).

A stage row holds what the stage *is* (its inputs, graph, models, calls) and what it did
on the trial's questions (:func:`graphtune.graphs.results.summarize_stages` over the
trial's stored results): how often its answer was right, how many of the pipeline's wrong
answers it lost first, and its mean cost per query. A stage's units are its share of the
trial's units by FLOPs (a pipeline's units are FLOPs over one unit's FLOPs, the same for
every stage, so the shares add up to the trial's units).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from graphtune.graphs.render import short_labels
from graphtune.graphs.results import QuestionResult, summarize_stages


@dataclass(frozen=True)
class StageRow:
    """One stage of a pipeline trial: structure and measured figures (None where the
    trial's results hold no outcome of the stage)."""

    name: str
    inputs: tuple[str, ...]
    graph: Any  # the stage's Graph
    calls: int
    models: dict[str, int]  # pool model -> calls
    n: int = 0  # questions with an outcome of this stage
    n_scored: int = 0
    accuracy: float | None = None
    n_lost: int = 0
    units: float | None = None
    usd: float | None = None
    flops: float | None = None
    latency_s: float | None = None
    tokens: float | None = None

    def models_text(self, short: bool = False) -> str:
        """``llama-3.2-3b x3, llama-3.1-8b x1`` (``short``: ``3b x3, 8b x1``)."""
        labels = short_labels(self.models) if short else {m: m for m in self.models}
        return ", ".join(f"{labels[m]} x{k}" for m, k in self.models.items())

    def as_dict(self) -> dict[str, Any]:
        from graphtune.graphs.render import to_short

        return {"stage": self.name, "inputs": list(self.inputs), "graph": to_short(self.graph), "calls": self.calls,
                "models": dict(self.models), "n": self.n, "n_scored": self.n_scored, "accuracy": self.accuracy,
                "n_lost": self.n_lost, "units": self.units, "usd": self.usd, "flops": self.flops,
                "latency_s": self.latency_s, "tokens": self.tokens}


def stage_rows(pipeline, results: Sequence[QuestionResult] = (), *, trial_units: float | None = None
               ) -> list[StageRow]:
    """One row per stage of ``pipeline`` (in order), with the figures ``results`` (a
    trial's stored results) give; ``trial_units`` (the trial's units per query) is split
    among the stages by their FLOPs."""
    summ = {s.stage: s for s in summarize_stages(results)}
    total_flops = sum(s.mean_flops for s in summ.values())
    rows = []
    for st in pipeline.stages:
        s = summ.get(st.name)
        base = dict(name=st.name, inputs=tuple(st.inputs), graph=st.graph, calls=st.graph.size,
                    models=dict(sorted(st.graph.model_counts().items(), key=lambda kv: (-kv[1], kv[0]))))
        if s is None:
            rows.append(StageRow(**base))
            continue
        units = (trial_units * s.mean_flops / total_flops if trial_units is not None and total_flops > 0 else None)
        rows.append(StageRow(**base, n=s.n, n_scored=s.n_scored, accuracy=s.accuracy, n_lost=s.n_lost, units=units,
                             usd=s.mean_usd, flops=s.mean_flops, latency_s=s.mean_latency_s, tokens=s.mean_tokens))
    return rows
