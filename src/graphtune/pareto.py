"""Pareto fronts of a stored study: accuracy against a cost metric, and selectors.

A *point* is one graph of the study with all its dev evidence: the dev trial that saw it
on the most questions (a trial's results include the questions reused from earlier
trials of the same graph, so that trial holds all of it), its accuracy there and its
cost per query (analytic units, FLOPs, dollars, latency). Graphs seen on only a few
questions have noisy accuracies, so by default only graphs evaluated on at least half
of the best-covered graph's questions compete (``min_questions`` overrides that).

The front maximises accuracy and minimises one cost metric. Selectors (``export
--select``) pick graphs from it:

* ``best``: the study's recommended graph (the one its test trial scored), else the
  most accurate point;
* ``pareto``: every point of the front, cheapest first;
* ``METRIC<=X`` (also ``<``, ``>=``, ``>``), e.g. ``cost_usd<=0.002``, ``latency_s<=2``,
  ``units<=10``, ``accuracy>=0.6``: the most accurate front point that satisfies it;
* ``#N`` or ``trial=N``: the graph of trial N.

Pure functions over plain values, apart from :func:`study_points`, which reads a store.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from graphtune.errors import GraphtuneError

#: cost metrics a front can use, by accepted name -> FrontPoint attribute
COST_METRICS: dict[str, str] = {
    "units": "cost_units", "cost_units": "cost_units",
    "flops": "flops", "cost_flops": "flops",
    "usd": "usd", "cost_usd": "usd",
    "latency_s": "latency_s", "latency": "latency_s",
}
METRIC_LABELS = {"cost_units": "cost (budget units / query)", "flops": "FLOPs / query",
                 "usd": "USD / query", "latency_s": "latency (s / query)"}


class SelectError(GraphtuneError):
    """A selector or cost metric is unknown, or a selector matched nothing (bad input:
    exit code 2)."""

    exit_code = 2


def cost_attr(metric: str) -> str:
    """The FrontPoint attribute of a cost metric name; a one-line error for unknown names."""
    try:
        return COST_METRICS[metric.strip().lower()]
    except KeyError:
        raise SelectError(f"unknown cost metric {metric!r}; known: units, flops, cost_usd, latency_s") from None


@dataclass(frozen=True)
class FrontPoint:
    """One graph of a study with its best-covered dev evidence."""

    graph_hash: str
    graph: dict
    trial_number: int
    accuracy: float
    n: int
    cost_units: float
    flops: float
    usd: float
    latency_s: float
    reward: float | None = None
    method: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def cost(self, metric: str) -> float:
        return float(getattr(self, cost_attr(metric)))


def well_measured_threshold(trials: Iterable[Any]) -> int:
    """The fewest questions a dev score must rest on for graphtune to rank it: half the
    coverage of the best-covered scored dev trial (at least 1). The one rule behind the
    recommendation, the Pareto front, ``trials --top`` and the dashboard's best line."""
    top = max((len(t.question_ids or []) for t in trials
               if getattr(t, "split", "dev") == "dev" and t.status == "complete" and t.accuracy is not None),
              default=0)
    return max(1, top // 2)


def points_from_trials(trials: Iterable[Any], *, min_questions: int | None = None) -> list[FrontPoint]:
    """One point per graph from finished dev trials (objects with ``graph_hash``,
    ``question_ids``, ``accuracy``, costs...). ``min_questions`` defaults to half the
    largest coverage."""
    best: dict[str, Any] = {}
    for t in trials:
        if getattr(t, "split", "dev") != "dev" or t.status != "complete" or t.accuracy is None:
            continue
        cur = best.get(t.graph_hash)
        if cur is None or len(t.question_ids) > len(cur.question_ids):
            best[t.graph_hash] = t
    if not best:
        return []
    need = well_measured_threshold(best.values()) if min_questions is None else max(1, int(min_questions))
    out = [FrontPoint(graph_hash=t.graph_hash, graph=t.graph, trial_number=t.number, accuracy=float(t.accuracy),
                      n=len(t.question_ids), cost_units=float(t.cost_units or 0.0), flops=float(t.flops or 0.0),
                      usd=float(t.usd or 0.0), latency_s=float(t.latency_s or 0.0), reward=t.reward,
                      method=getattr(t, "method", ""))
           for t in best.values() if len(t.question_ids) >= need]
    return sorted(out, key=lambda p: p.trial_number)


def pareto_front(points: Sequence[FrontPoint], metric: str = "units") -> list[FrontPoint]:
    """Non-dominated points (accuracy up, ``metric`` down), cheapest first. Of points
    with equal accuracy and cost the earliest trial stays."""
    attr = cost_attr(metric)
    pts = sorted(points, key=lambda p: (getattr(p, attr), -p.accuracy, p.trial_number))
    front: list[FrontPoint] = []
    best_acc = -math.inf
    for p in pts:
        if p.accuracy > best_acc:
            front.append(p)
            best_acc = p.accuracy
    return front


def front_of_pairs(pairs: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated ``(cost, accuracy)`` pairs, cheapest first."""
    out: list[tuple[float, float]] = []
    best = -math.inf
    for c, a in sorted(pairs, key=lambda t: (t[0], -t[1])):
        if a > best:
            out.append((c, a))
            best = a
    return out


def hypervolume(pairs: Iterable[tuple[float, float]], ref_cost: float, ref_accuracy: float = 0.0) -> float:
    """Area dominated by ``(cost, accuracy)`` pairs (cost down, accuracy up) inside the
    box ``cost <= ref_cost``, ``accuracy >= ref_accuracy``. Pairs outside count nothing."""
    front = [(c, a) for c, a in front_of_pairs(pairs) if c <= ref_cost and a > ref_accuracy]
    area = 0.0
    for i, (c, a) in enumerate(front):
        nxt = front[i + 1][0] if i + 1 < len(front) else ref_cost
        area += (nxt - c) * (a - ref_accuracy)
    return area


def hypervolume_points(points: Sequence[FrontPoint], metric: str, ref_cost: float) -> float:
    return hypervolume(((p.cost(metric), p.accuracy) for p in points), ref_cost)


_COND = re.compile(r"^\s*([A-Za-z_]+)\s*(<=|>=|<|>|=<|=>)\s*([-+0-9.eE]+)\s*$")
_TRIAL = re.compile(r"^\s*(?:#|trial\s*=\s*)(\d+)\s*$")


def select(points: Sequence[FrontPoint], selector: str, *, metric: str = "units",
           recommended: FrontPoint | None = None) -> list[FrontPoint]:
    """The points a selector picks (see the module docstring); raises SelectError with
    what exists when nothing matches."""
    if not points:
        raise SelectError("the study has no finished dev trials to select from; run `graphtune optimize` first")
    s = selector.strip()
    if s == "best":
        if recommended is not None:
            return [recommended]
        return [max(points, key=lambda p: (p.accuracy, -p.cost(metric), -p.trial_number))]
    if s == "pareto":
        return pareto_front(points, metric)
    m = _TRIAL.match(s)
    if m:
        num = int(m.group(1))
        hit = [p for p in points if p.trial_number == num]
        if not hit:
            raise SelectError(f"trial #{num} is not a selectable graph (finished, well-evaluated dev trials: "
                              f"{[p.trial_number for p in points][:20]})")
        return hit
    m = _COND.match(s)
    if not m:
        raise SelectError(f"cannot read selector {selector!r}; use best, pareto, #TRIAL or METRIC<=VALUE "
                          "(e.g. cost_usd<=0.002, latency_s<=2, units<=10, accuracy>=0.6)")
    name, op, val = m.group(1).lower(), m.group(2).replace("=<", "<=").replace("=>", ">="), float(m.group(3))
    attr = "accuracy" if name == "accuracy" else cost_attr(name)
    ops = {"<=": lambda x: x <= val, "<": lambda x: x < val, ">=": lambda x: x >= val, ">": lambda x: x > val}
    front = pareto_front(points, "units" if attr == "accuracy" else attr)
    ok = [p for p in front if ops[op](getattr(p, attr))]
    if not ok:
        lo = min(getattr(p, attr) for p in points)
        hi = max(getattr(p, attr) for p in points)
        raise SelectError(f"no graph on the front has {name} {op} {val:g} (the study's graphs range "
                          f"{lo:.4g}..{hi:.4g}); loosen the selector or list the front with `graphtune pareto`")
    return [max(ok, key=lambda p: (p.accuracy, -getattr(p, attr if attr != "accuracy" else "cost_units"),
                                   -p.trial_number))]


# -- reading a store -------------------------------------------------------------------


@dataclass(frozen=True)
class StudyPoints:
    """A study's points and its recommended graph (if it has a test trial)."""

    study: Any
    trials: list
    points: list[FrontPoint]
    recommended: FrontPoint | None
    test_trial: Any


def study_points(store, study, *, min_questions: int | None = None) -> StudyPoints:
    """Points of a stored study; the recommended graph is the one its last test trial
    scored (its parent dev trial), as ``graphtune show`` reports it."""
    trials = store.list_trials(study.id)
    dev = [t for t in trials if t.split == "dev"]
    pts = points_from_trials(dev, min_questions=min_questions)
    tests = [t for t in trials if t.split == "test" and t.status == "complete"]
    test = tests[-1] if tests else None
    rec = None
    if test is not None:
        rec = next((p for p in pts if p.graph_hash == test.graph_hash), None)
        if rec is None:  # recommended on less evidence than the threshold: still the answer
            allp = points_from_trials(dev, min_questions=1)
            rec = next((p for p in allp if p.graph_hash == test.graph_hash), None)
    return StudyPoints(study, trials, pts, rec, test)


def default_ref_cost(spec: dict | None, metric: str, points: Sequence[FrontPoint]) -> float:
    """Reference cost of a hypervolume: the spec's budget limit on that metric, else the
    largest cost seen (so every point counts)."""
    attr = cost_attr(metric)
    b = (spec or {}).get("budget") or {}
    key = {"cost_units": "units", "flops": "flops", "usd": "usd_per_query", "latency_s": "latency_s"}[attr]
    if b.get(key):
        return float(b[key])
    return max((getattr(p, attr) for p in points), default=1.0) or 1.0
