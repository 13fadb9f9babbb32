"""Plain result values: what a graph did on one question, and their summary.

Every environment returns these (simulated, live, replayed), the store keeps them, the
agent's reports and the searchers read them; they live here, at the bottom, so none of
those packages needs another to name them. ``graphtune.envs.base`` re-exports them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class NodeOutcome:
    """What one node of a graph did on one question."""

    node_id: str
    answer: str
    correct: bool | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0


@dataclass(frozen=True)
class StageOutcome:
    """What one stage of a pipeline did on one question: its sink's answer, whether that
    answer is right for the stage (None when the scorer cannot tell), and the stage's own
    tokens, FLOPs, dollars and duration."""

    stage: str
    answer: str
    correct: bool | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    flops: float = 0.0
    usd: float = 0.0
    latency_s: float = 0.0


@dataclass(frozen=True)
class QuestionResult:
    """A graph's outcome on one question."""

    question_id: str
    answer: str | None
    correct: bool | None
    score: float = 0.0  # in [0, 1]; 1.0 when correct for exact-match tasks
    prompt_tokens: int = 0
    completion_tokens: int = 0
    flops: float = 0.0
    usd: float = 0.0
    latency_s: float = 0.0  # critical path
    error: str | None = None  # infrastructure failure: excluded from accuracy
    modelled: bool = False  # outcome modelled rather than observed (replay)
    nodes: tuple[NodeOutcome, ...] = ()
    #: infrastructure failure: the pool model whose call failed (None when unknown); kept
    #: in the trial's ``metrics["excluded"]``, not in the per-question rows
    failed_model: str | None = None
    #: a pipeline's per-stage outcomes, in pipeline order (empty for a single graph); its
    #: node outcomes are then named ``<stage>/<node id>``. Left out of ``repr`` so a single
    #: graph's result prints (and is pinned, tests/test_synthesis_pins.py) as before.
    stages: tuple[StageOutcome, ...] = field(default=(), repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def lost_at(self) -> str | None:
        """The stage that lost the answer: the first stage whose outcome is wrong, when the
        pipeline's answer is wrong; None when it is right or no stage outcome tells."""
        if self.correct is not False:
            return None
        return next((s.stage for s in self.stages if s.correct is False), None)


def outcomes_to_json(nodes: Sequence[NodeOutcome], stages: Sequence[StageOutcome] = (),
                     text: Callable[[str | None], str | None] = lambda t: t) -> list:
    """The JSON a store keeps of a result's node and stage outcomes (one list): a node as
    ``[id, answer, correct, prompt_tokens, completion_tokens, latency_s]`` (unchanged), a
    stage as a mapping with a ``stage`` key. ``text`` redacts answers."""
    out: list = [[n.node_id, text(n.answer), n.correct, n.prompt_tokens, n.completion_tokens, n.latency_s]
                 for n in nodes]
    out += [{"stage": s.stage, "answer": text(s.answer), "correct": s.correct, "prompt_tokens": s.prompt_tokens,
             "completion_tokens": s.completion_tokens, "flops": s.flops, "usd": s.usd, "latency_s": s.latency_s}
            for s in stages]
    return out


def outcomes_from_json(data: Sequence | None) -> tuple[tuple[NodeOutcome, ...], tuple[StageOutcome, ...]]:
    """Inverse of :func:`outcomes_to_json` (also reads rows written before stages existed)."""
    nodes, stages = [], []
    for item in data or ():
        if isinstance(item, Mapping):
            stages.append(StageOutcome(**item))
        else:
            nodes.append(NodeOutcome(*item))
    return tuple(nodes), tuple(stages)


@dataclass(frozen=True)
class Metrics:
    """Aggregate of a list of question results."""

    n: int
    n_scored: int
    n_errors: int
    accuracy: float  # mean score over scored questions (nan when none)
    mean_flops: float
    mean_usd: float
    mean_latency_s: float
    prompt_tokens: int
    completion_tokens: int
    #: scored results whose outcome was modelled rather than observed (replay)
    n_modelled: int = 0

    @property
    def modelled_share(self) -> float:
        """The fraction of the scored results that were modelled (nan when none is scored)."""
        return self.n_modelled / self.n_scored if self.n_scored else float("nan")

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def summarize(results: Sequence[QuestionResult]) -> Metrics:
    """The :class:`Metrics` of ``results``: means over the scored (error-free) ones,
    token totals over all."""
    scored = [r for r in results if r.ok]
    n = len(results)
    k = len(scored)

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else float("nan")

    return Metrics(
        n=n, n_scored=k, n_errors=n - k,
        accuracy=mean(r.score for r in scored),
        mean_flops=mean(r.flops for r in scored),
        mean_usd=mean(r.usd for r in scored),
        mean_latency_s=mean(r.latency_s for r in scored),
        prompt_tokens=sum(r.prompt_tokens for r in results),
        completion_tokens=sum(r.completion_tokens for r in results),
        n_modelled=sum(bool(r.modelled) for r in scored),
    )


@dataclass(frozen=True)
class StageSummary:
    """One stage of a pipeline over many questions: how often its answer was right (among
    the questions its correctness is known on), how often it lost the pipeline's answer,
    and its mean cost per question."""

    stage: str
    n: int  # questions with an outcome of this stage
    n_scored: int  # of those, questions where the stage's correctness is known
    n_correct: int
    n_lost: int  # questions the pipeline got wrong because of this stage first
    mean_flops: float
    mean_usd: float
    mean_latency_s: float
    mean_tokens: float

    @property
    def accuracy(self) -> float | None:
        return self.n_correct / self.n_scored if self.n_scored else None

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "n": self.n, "n_scored": self.n_scored, "n_correct": self.n_correct,
                "accuracy": self.accuracy, "n_lost": self.n_lost, "mean_flops": self.mean_flops,
                "mean_usd": self.mean_usd, "mean_latency_s": self.mean_latency_s, "mean_tokens": self.mean_tokens}


def summarize_stages(results: Sequence[QuestionResult]) -> list[StageSummary]:
    """Per-stage summaries of pipeline results, in pipeline order (empty for single graphs).
    Infrastructure failures are left out, as from accuracy."""
    order: list[str] = []
    acc: dict[str, list[StageOutcome]] = {}
    lost: dict[str, int] = {}
    for r in results:
        if not r.ok:
            continue
        for s in r.stages:
            if s.stage not in acc:
                order.append(s.stage)
                acc[s.stage] = []
            acc[s.stage].append(s)
        at = r.lost_at
        if at is not None:
            lost[at] = lost.get(at, 0) + 1
    out = []
    for name in order:
        xs = acc[name]
        n = len(xs)
        scored = [x for x in xs if x.correct is not None]
        out.append(StageSummary(stage=name, n=n, n_scored=len(scored), n_correct=sum(1 for x in scored if x.correct),
                                n_lost=lost.get(name, 0), mean_flops=sum(x.flops for x in xs) / n,
                                mean_usd=sum(x.usd for x in xs) / n, mean_latency_s=sum(x.latency_s for x in xs) / n,
                                mean_tokens=sum(x.prompt_tokens + x.completion_tokens for x in xs) / n))
    return out
