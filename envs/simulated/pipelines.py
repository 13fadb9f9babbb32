"""Simulated multi-stage pipelines, calibrated to AgentTTS's findings (``docs/pipelines.md``).

A pipeline profile (``profiles/pipeline-<name>.yaml``) gives every stage a simulator
profile of its own (task shape, per-model accuracies, synthesis parameters: the model of
``docs/simulator.md``) and an ``upstream_penalty``: the logits every model of the stage
loses on a question when an input stage's answer to it was wrong (a wrong retrieval makes
a right answer much less likely, not impossible). Each stage's graph runs on the
single-stage simulator, twice over the same questions: once as the stage's *clean* task
(its inputs were right) and once as its *degraded* task (abilities lowered by the
penalty, optionally other parameters changed); a question takes the degraded outcome when
any of its input stages answered it wrongly. Both runs share the question's difficulty
and the simulator's systematic sampling, so a question the degraded task gets right the
clean one almost always gets right too. A stage's "correct" means its output is what the
next stage needs (the right passages, the right tool list, ...); the last stage's is the
pipeline's answer.

Deterministic by seed: every stage environment derives its randomness from (seed, stage
profile, question index, node), never from a global generator.

``python -m graphtune.envs.simulated.pipelines --profile rag`` prints the calibration
table (the targets of ``docs/pipelines.md`` with the measured figures).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from graphtune.envs.base import Environment, NodeOutcome, QuestionResult
from graphtune.envs.simulated.profile import PROFILE_DIR, Profile, expected_accuracy, profile_from_dict
from graphtune.envs.simulated.simulator import SPLITS, SimulatedEnvironment
from graphtune.errors import EnvError, GraphError
from graphtune.graphs.catalog import KNOWN_MODELS
from graphtune.graphs.cost import CostModel, ModelInfo, PipelineCostModel, TaskShape
from graphtune.graphs.model import ASSISTANT, FUSER, Graph, Node
from graphtune.graphs.pipeline import QUESTION, Pipeline, Stage
from graphtune.graphs.results import StageOutcome

__all__ = ["BUILTIN_PIPELINES", "PipelineProfile", "SimulatedPipelineEnvironment", "StageProfile",
           "calibration", "load_pipeline_profile", "sampling_graph"]

#: the profile fields a stage's `degraded` mapping may change
_PROFILE_FIELDS = {f.name for f in fields(Profile)} - {"name", "models", "mixes", "source", "task", "answer_format"}
#: built-in pipeline profiles by name
BUILTIN_PIPELINES: dict[str, Path] = {p: PROFILE_DIR / f"pipeline-{p}.yaml" for p in ("rag", "tool-use")}


@dataclass(frozen=True)
class StageProfile:
    """One stage of a simulated pipeline: its default inputs, its task (a simulator
    profile) and what a wrong input costs it."""

    name: str
    inputs: tuple[str, ...]
    profile: Profile
    upstream_penalty: float = 0.0  # logits every model loses when an input stage was wrong
    degraded_params: tuple[tuple[str, Any], ...] = ()  # other profile changes then

    @cached_property
    def degraded(self) -> Profile:
        """The stage's task when an input stage answered wrongly."""
        p = self.profile.with_params(**dict(self.degraded_params)) if self.degraded_params else self.profile
        spread = p.total_spread
        models = tuple(replace(m, ability=m.ability - self.upstream_penalty,
                               accuracy=expected_accuracy(m.ability - self.upstream_penalty, spread))
                       for m in p.models)
        return replace(p, models=models)


@dataclass(frozen=True)
class PipelineProfile:
    """A simulated pipeline task: its stages in order (the last one answers)."""

    name: str
    task: str
    stages: tuple[StageProfile, ...]
    #: calibration settings (stage caps, sample grids, the reference pipeline); see docs/pipelines.md
    calibration: Mapping[str, Any]
    source: str = "<memory>"

    def stage(self, name: str) -> StageProfile:
        for s in self.stages:
            if s.name == name:
                return s
        raise EnvError(f"pipeline profile {self.name!r} has no stage {name!r}; its stages: "
                       f"{[s.name for s in self.stages]}")


def load_pipeline_profile(profile: PipelineProfile | str | Path) -> PipelineProfile:
    """A pipeline profile by built-in name (``rag``, ``tool-use``), by path, or passed through."""
    if isinstance(profile, PipelineProfile):
        return profile
    key = str(profile)
    path = BUILTIN_PIPELINES.get(key, Path(key))
    if not path.exists():
        raise EnvError(f"pipeline profile {key!r} is neither built in ({sorted(BUILTIN_PIPELINES)}) nor a file")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise EnvError(f"pipeline profile {path}: cannot read it ({str(err).splitlines()[0]})") from None
    return pipeline_profile_from_dict(data, source=str(path))


def pipeline_profile_from_dict(data: Any, *, source: str = "<memory>") -> PipelineProfile:
    if not isinstance(data, Mapping) or not isinstance(data.get("stages"), Mapping) or not data["stages"]:
        raise EnvError(f"pipeline profile {source}: expected a mapping with `name` and a non-empty `stages` mapping")
    unknown = set(data) - {"name", "task", "stages", "calibration"}
    if unknown:
        raise EnvError(f"pipeline profile {source}: unknown keys {sorted(unknown)}; allowed: name, task, stages, "
                       "calibration")
    name = str(data.get("name") or Path(source).stem)
    stages = []
    for sname, sd in data["stages"].items():
        if not isinstance(sd, Mapping) or "profile" not in sd:
            raise EnvError(f"pipeline profile {source}: stage {sname!r} needs a `profile` mapping")
        extra = set(sd) - {"inputs", "profile", "upstream_penalty", "degraded"}
        if extra:
            raise EnvError(f"pipeline profile {source}: stage {sname!r} has unknown keys {sorted(extra)}; allowed: "
                           "inputs, profile, upstream_penalty, degraded")
        if not isinstance(sd["profile"], Mapping):
            raise EnvError(f"pipeline profile {source}: stage {sname!r}: `profile` must be a mapping of a simulator "
                           "profile's fields (docs/simulator.md)")
        prof = profile_from_dict({"name": f"{name}-{sname}", **sd["profile"]}, source=f"{source} stage {sname}")
        degraded = sd.get("degraded") or {}
        bad = sorted(set(degraded) - _PROFILE_FIELDS) if isinstance(degraded, Mapping) else ["(not a mapping)"]
        if bad:
            raise EnvError(f"pipeline profile {source}: stage {sname!r}: `degraded` changes unknown profile fields "
                           f"{bad}; allowed: the scalar fields of docs/simulator.md")
        stages.append(StageProfile(name=str(sname), inputs=tuple(sd.get("inputs", [QUESTION])), profile=prof,
                                   upstream_penalty=float(sd.get("upstream_penalty", 0.0)),
                                   degraded_params=tuple(sorted(degraded.items()))))
    try:  # the stages' wiring follows the rules of graphtune.graphs.pipeline
        Pipeline(tuple(Stage(s.name, sampling_graph(s.profile.model_names[0], 1), s.inputs) for s in stages))
    except GraphError as err:
        raise EnvError(f"pipeline profile {source}: {err}") from None
    return PipelineProfile(name=name, task=str(data.get("task", "")), stages=tuple(stages),
                           calibration=dict(data.get("calibration") or {}), source=source)


def sampling_graph(model: str, samples: int) -> Graph:
    """Repeated sampling: one call of ``model`` when ``samples`` is 1, else ``samples``
    assistants of it feeding one fuser of it (AgentTTS's (model, samples) per stage)."""
    if samples < 1:
        raise EnvError(f"samples must be at least 1, got {samples}")
    if samples == 1:
        return Graph.build([Node.make("a0", ASSISTANT, model)])
    nodes = [Node.make(f"a{i}", ASSISTANT, model) for i in range(samples)] + [Node.make("f", FUSER, model)]
    return Graph.build(nodes, [(f"a{i}", "f") for i in range(samples)])


class SimulatedPipelineEnvironment(Environment):
    """Runs pipelines on a simulated pipeline task; deterministic given ``seed``.

    ``evaluate(pipeline, question_ids)`` keeps the contract of
    :meth:`graphtune.envs.base.Environment.evaluate`: one :class:`QuestionResult` per id, in
    order, with the stages' outcomes in ``stages`` (``lost_at`` names the stage that lost
    the answer) and every node's outcome in ``nodes`` as ``<stage>/<node id>``. The
    pipeline's stages must be the profile's, with the same inputs.
    """

    kind = "simulated-pipeline"

    def __init__(self, profile: PipelineProfile | str | Path, *, seed: int = 0, dev_size: int = 100,
                 test_size: int = 500, pool: Mapping[str, ModelInfo] | None = None):
        self.profile = load_pipeline_profile(profile)
        self.seed = int(seed)
        self._sizes = {"dev": int(dev_size), "test": int(test_size)}
        self._envs: dict[str, tuple[SimulatedEnvironment, SimulatedEnvironment]] = {}
        self._runs: dict[tuple, np.ndarray] = {}
        costs: dict[str, CostModel] = {}
        for s in self.profile.stages:
            names = s.profile.model_names
            stage_pool = {m: (pool or KNOWN_MODELS)[m] for m in names if m in (pool or KNOWN_MODELS)}
            cm = CostModel(stage_pool, TaskShape(s.profile.input_tokens, s.profile.output_tokens))
            costs[s.name] = cm
            clean = SimulatedEnvironment(s.profile, cm, seed=seed, dev_size=dev_size, test_size=test_size)
            degraded = SimulatedEnvironment(s.degraded, cm, seed=seed, dev_size=dev_size, test_size=test_size)
            self._envs[s.name] = (clean, degraded)
        self.costs = PipelineCostModel(costs)
        self._ids = {sp: tuple(f"{self.profile.name}-{sp}-{i:04d}" for i in range(n)) for sp, n in self._sizes.items()}
        self._index = {q: (sp, i) for sp, ids in self._ids.items() for i, q in enumerate(ids)}

    # -- the Environment contract ----------------------------------------------------
    def split(self, name: str) -> list[str]:
        if name not in self._sizes:
            raise EnvError(f"unknown split {name!r}; the simulator has splits {list(SPLITS)}")
        return list(self._ids[name])

    @property
    def shape(self) -> TaskShape:
        """The last stage's task shape (each stage's own is in ``costs.of(stage).shape``)."""
        return self.costs.of(self.profile.stages[-1].name).shape

    def describe(self) -> str:
        return f"Pipeline '{self.profile.name}': {self.profile.task}. Stages: " + ", ".join(
            f"{s.name} ({s.profile.task})" for s in self.profile.stages)

    def evaluate(self, pipeline: Pipeline, question_ids: Sequence[str]) -> list[QuestionResult]:
        """Run ``pipeline`` on each question; one result per id, same order."""
        ids = list(question_ids)
        stage_ids = self._stage_ids(ids)
        per_stage: dict[str, list[QuestionResult]] = {}
        right: dict[str, np.ndarray] = {}
        for s in self._check(pipeline):
            clean_env, degraded_env = self._envs[s.name]
            bad = self._bad_inputs(s, right, len(ids))
            clean = clean_env.evaluate(s.graph, stage_ids[s.name])
            if bad.any():
                degraded = degraded_env.evaluate(s.graph, stage_ids[s.name])
                clean = [d if b else c for c, d, b in zip(clean, degraded, bad)]
            per_stage[s.name] = clean
            right[s.name] = np.array([r.correct is True for r in clean], dtype=bool)
        out = []
        for qi, qid in enumerate(ids):
            finish: dict[str, float] = {}
            stages, nodes = [], []
            for s in pipeline.stages:
                r = per_stage[s.name][qi]
                finish[s.name] = max((finish[i] for i in s.inputs if i in finish), default=0.0) + r.latency_s
                stages.append(StageOutcome(stage=s.name, answer=r.answer or "", correct=r.correct,
                                           prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                                           flops=r.flops, usd=r.usd, latency_s=r.latency_s))
                nodes += [NodeOutcome(f"{s.name}/{n.node_id}", n.answer, n.correct, n.prompt_tokens,
                                      n.completion_tokens, n.latency_s) for n in r.nodes]
            last = per_stage[pipeline.final.name][qi]
            out.append(QuestionResult(
                question_id=qid, answer=last.answer, correct=last.correct, score=last.score,
                prompt_tokens=sum(x.prompt_tokens for x in stages),
                completion_tokens=sum(x.completion_tokens for x in stages),
                flops=sum(x.flops for x in stages), usd=sum(x.usd for x in stages),
                latency_s=max(finish.values()), nodes=tuple(nodes), stages=tuple(stages)))
        return out

    def close(self) -> None:
        """Nothing to release (the Environment interface's idempotent close)."""

    # -- fast paths (calibration, benchmarks) -----------------------------------------
    def stage_correct(self, pipeline: Pipeline, question_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Per stage, (Q,) bool: the stage's answer to each question is right."""
        ids = list(question_ids)
        stage_ids = self._stage_ids(ids)
        key = tuple(ids)
        right: dict[str, np.ndarray] = {}
        for s in self._check(pipeline):
            ok = self._stage_run(s, 0, stage_ids[s.name], key)
            bad = self._bad_inputs(s, right, len(ids))
            if bad.any():
                ok = np.where(bad, self._stage_run(s, 1, stage_ids[s.name], key), ok)
            right[s.name] = ok
        return right

    def _stage_run(self, stage: Stage, degraded: int, stage_ids: list[str], key: tuple) -> np.ndarray:
        """(Q,) bool outcomes of a stage's graph on its clean (0) or degraded (1) task,
        memoised: searches and the calibration meet the same stage graphs again and again."""
        ck = (stage.name, degraded, stage.graph, key)
        hit = self._runs.get(ck)
        if hit is None:
            if len(self._runs) > 512:
                self._runs.clear()
            hit = self._envs[stage.name][degraded].simulate(stage.graph, stage_ids).correct
            hit.setflags(write=False)  # shared by every caller: nobody may change it
            self._runs[ck] = hit
        return hit

    def accuracy(self, pipeline: Pipeline, question_ids: Sequence[str]) -> float:
        """Fraction of questions the pipeline answers correctly."""
        return float(self.stage_correct(pipeline, question_ids)[pipeline.final.name].mean())

    def stage_accuracy(self, stage: str, graph: Graph, question_ids: Sequence[str], *, inputs_right: bool = True
                       ) -> float:
        """Accuracy of one stage's ``graph`` when all its inputs are right (or all wrong)."""
        env = self._envs[self.profile.stage(stage).name][0 if inputs_right else 1]
        return env.accuracy(graph, self._stage_ids(list(question_ids))[stage])

    def pipeline(self, graphs: Mapping[str, Graph]) -> Pipeline:
        """The profile's pipeline running ``graphs`` (stage name -> graph)."""
        missing = [s.name for s in self.profile.stages if s.name not in graphs]
        if missing:
            raise EnvError(f"no graph for stage(s) {missing} of pipeline profile {self.profile.name!r}")
        return Pipeline(tuple(Stage(s.name, graphs[s.name], s.inputs) for s in self.profile.stages))

    # -- helpers ----------------------------------------------------------------------
    def _check(self, pipeline: Pipeline) -> tuple[Stage, ...]:
        want = [(s.name, s.inputs) for s in self.profile.stages]
        got = [(s.name, s.inputs) for s in pipeline.stages]
        if got != want:
            raise EnvError(f"pipeline stages {got} do not match simulated pipeline {self.profile.name!r}: "
                           f"{want}; build it with env.pipeline({{stage: graph}})")
        return pipeline.stages

    @staticmethod
    def _bad_inputs(stage: Stage, right: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        bad = np.zeros(n, dtype=bool)
        for inp in stage.inputs:
            if inp != QUESTION:
                bad |= ~right[inp]
        return bad

    def _stage_ids(self, ids: list[str]) -> dict[str, list[str]]:
        try:
            pos = [self._index[q] for q in ids]
        except KeyError as err:
            raise EnvError(f"unknown question id {err.args[0]!r}; ids look like {self._ids['test'][0]!r} "
                           "(use env.split(name))") from None
        return {s.name: [f"{s.profile.name}-{sp}-{i:04d}" for sp, i in pos] for s in self.profile.stages}


# -- calibration ------------------------------------------------------------------------------


def _family(env: SimulatedPipelineEnvironment, stage: str, samples: Sequence[int]) -> list[tuple[str, int, Graph]]:
    models = env.profile.stage(stage).profile.model_names
    return [(m, k, sampling_graph(m, k)) for m in models for k in samples]


def calibration(profile: PipelineProfile | str = "rag", *, seed: int = 0, n: int = 2000) -> dict[str, Any]:
    """The figures behind the targets of ``docs/pipelines.md``, measured on ``n`` test
    questions (true accuracies; no sampling of questions beyond the split)."""
    env = SimulatedPipelineEnvironment(profile, seed=seed, dev_size=1, test_size=n)
    prof, cal = env.profile, env.profile.calibration
    q = env.split("test")
    grid = [int(k) for k in cal.get("samples", [1, 2, 4, 8, 16, 32])]

    def units(stage: str, g: Graph) -> float:  # in the pipeline's units, as PipelineCostModel counts them
        return env.costs.of(stage).cost(g).flops / env.costs.unit_flops

    out: dict[str, Any] = {"profile": prof.name, "seed": seed, "n": n, "stages": {}}
    # finding 1: per stage, the best (model, samples) under the stage's cap, inputs right
    best: dict[str, tuple[str, int]] = {}
    for s in prof.stages:
        cap = float(cal["stage_caps"][s.name])
        rows = []
        for m, k, g in _family(env, s.name, grid):
            u = units(s.name, g)
            if u <= cap:
                rows.append({"model": m, "samples": k, "units": round(u, 1),
                             "accuracy": env.stage_accuracy(s.name, g, q)})
        top = max(rows, key=lambda r: (round(r["accuracy"], 6), -r["units"]))
        best[s.name] = (top["model"], top["samples"])
        out["stages"][s.name] = {"cap_units": cap, "best": best[s.name], "best_accuracy": top["accuracy"],
                                 "rows": rows}
    # finding 2: accuracy against samples for the curve stage's preferred model
    curve_stage = cal["curve_stage"]
    cm = best[curve_stage][0]
    curve_grid = [int(k) for k in cal.get("curve_samples", grid)]
    curve = [(k, env.stage_accuracy(curve_stage, sampling_graph(cm, k), q)) for k in curve_grid]
    out["curve"] = {"stage": curve_stage, "model": cm, "points": curve,
                    "best_samples": max(curve, key=lambda p: (round(p[1], 6), -p[0]))[0]}
    # finding 3: interaction (upstream stage weak vs strong; total budget just under the optima)
    inter = cal.get("interaction", {})
    first, last = inter.get("upstream", prof.stages[0].name), inter.get("downstream", curve_stage)
    ref = {s.name: sampling_graph(*best[s.name]) for s in prof.stages}

    def pipe_acc(changes: Mapping[str, Graph]) -> float:
        return env.accuracy(env.pipeline({**ref, **changes}), q)

    lm = best[last][0]
    inter_grid = [int(k) for k in inter.get("samples", curve_grid)]
    lo = inter_grid[int(inter.get("gain_from_index", 0))]
    by_first = {}
    for label, g in (("strong", ref[first]), ("weak", sampling_graph(inter["weak"], 1))):
        pts = [(k, pipe_acc({first: g, last: sampling_graph(lm, k)})) for k in inter_grid]
        top_k, top_a = max(pts, key=lambda p: (round(p[1], 6), -p[0]))
        # the fewest samples within one point of the best: robust where the curve is flat
        enough = min(k for k, a in pts if a >= top_a - 0.01)
        by_first[label] = {"first": _label(g), "points": pts, "best_samples": top_k, "enough_samples": enough,
                           "gain": top_a - dict(pts)[lo]}
    out["interaction"] = {"upstream": first, "downstream": last, "model": lm, "gain_from": lo, **by_first}
    opt = env.pipeline(ref)
    opt_cost = env.costs.cost(opt).total.units
    budget = float(cal.get("tight_fraction", 0.97)) * opt_cost
    cands = []
    fams = {s.name: _family(env, s.name, grid) for s in prof.stages}
    # the preferred models of the two traded stages at every sample count up to the grid's
    # top, so the best allocation is not an artefact of a coarse grid
    for st in (first, last):
        have = {(m, k) for m, k, _ in fams[st]}
        fams[st] += [(best[st][0], k, sampling_graph(best[st][0], k)) for k in range(1, max(grid) + 1)
                     if (best[st][0], k) not in have]
    # every stage but the two traded keeps its optimum; the first and the curve stage vary
    for m1, k1, g1 in fams[first]:
        for m2, k2, g2 in fams[last]:
            p = env.pipeline({**ref, first: g1, last: g2})
            c = env.costs.cost(p).total.units
            if c <= budget:
                cands.append((m1, k1, m2, k2, c, p))
    scored = [(env.accuracy(p, q), m1, k1, m2, k2, c) for m1, k1, m2, k2, c, p in cands]
    top = max(scored, key=lambda r: (round(r[0], 6), -r[5]))
    keep_first = [r for r in scored if (r[1], r[2]) == best[first]]
    cut_first = [r for r in scored if (r[1], r[2]) != best[first]]
    out["tight"] = {
        "optimum": {"pipeline": {s: _label(g) for s, g in ref.items()}, "units": opt_cost,
                    "accuracy": env.accuracy(opt, q)},
        "budget_units": budget,
        "best": {"first": f"{top[1]} x{top[2]}", "last": f"{top[3]} x{top[4]}", "units": top[5],
                 "accuracy": top[0]},
        "best_keeping_first": max(r[0] for r in keep_first) if keep_first else float("nan"),
        "best_cutting_first": max(r[0] for r in cut_first) if cut_first else float("nan"),
    }
    return out


def _label(g: Graph) -> str:
    m = g.nodes[0].model
    k = sum(1 for n in g.nodes if n.role == ASSISTANT)
    return f"{m} x{k}"


def _print(cal: dict[str, Any]) -> None:
    print(f"pipeline profile {cal['profile']} (seed {cal['seed']}, {cal['n']} test questions)\n")
    print("1. per stage, best (model, samples) under the stage cap, inputs right")
    for name, st in cal["stages"].items():
        print(f"   {name}: cap {st['cap_units']:g} units -> {st['best'][0]} x{st['best'][1]} "
              f"({100 * st['best_accuracy']:.1f}%)")
        for r in sorted(st["rows"], key=lambda r: -r["accuracy"])[:6]:
            print(f"      {r['model']:>14} x{r['samples']:<3} {r['units']:>7.1f} units  {100 * r['accuracy']:.1f}%")
    c = cal["curve"]
    print(f"\n2. {c['stage']} accuracy against samples of {c['model']} (best at {c['best_samples']})")
    print("   " + "  ".join(f"{k}:{100 * a:.1f}" for k, a in c["points"]))
    i = cal["interaction"]
    print(f"\n3a. pipeline accuracy against samples of {i['model']} in stage {i['downstream']}, "
          f"stage {i['upstream']} strong vs weak")
    for label in ("strong", "weak"):
        d = i[label]
        print(f"   {label} ({d['first']}): best at {d['best_samples']} samples (within 1 point from "
              f"{d['enough_samples']}), +{100 * d['gain']:.1f} points over "
              f"{i['gain_from']}; " + "  ".join(f"{k}:{100 * a:.1f}" for k, a in d["points"]))
    t = cal["tight"]
    print(f"\n3b. per-stage optima {t['optimum']['pipeline']} cost {t['optimum']['units']:.1f} units "
          f"({100 * t['optimum']['accuracy']:.1f}%); at {t['budget_units']:.1f} units the best is "
          f"{t['best']['first']} then {t['best']['last']} ({t['best']['units']:.1f} units, "
          f"{100 * t['best']['accuracy']:.1f}%); best keeping the first stage {100 * t['best_keeping_first']:.1f}%, "
          f"best changing it {100 * t['best_cutting_first']:.1f}%")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m graphtune.envs.simulated.pipelines",
                                 description="Print the calibration table of a simulated pipeline profile.")
    ap.add_argument("--profile", default="rag", help=f"built-in ({', '.join(BUILTIN_PIPELINES)}) or a YAML path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=2000, help="test questions")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = ap.parse_args(argv)
    cal = calibration(a.profile, seed=a.seed, n=a.n)
    if a.json:
        print(json.dumps(cal, indent=1, default=str))
    else:
        _print(cal)


if __name__ == "__main__":
    main()
