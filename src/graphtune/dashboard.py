"""A live, read-only view of a stored study in optuna-dashboard.

We do not write a web app: :class:`StudyMirror` copies one graphtune study into an Optuna
storage (an ``InMemoryStorage`` by default, so nothing is written to the user's store),
and optuna-dashboard serves that storage. A background thread (:class:`Poller`) reads the
store every few seconds and mirrors only what changed, so the view follows a running
search, from any number of workers, on SQLite, PostgreSQL or the in-memory store: it
reads only through the storage contract (:class:`graphtune.store.base.StudyStorage`).

What goes where (docs/dashboard.md):

* one Optuna study named like the graphtune study, two objectives: dev accuracy
  (maximize) and cost units per query (minimize), so the dashboard draws the history
  and the Pareto front;
* one Optuna trial per stored **dev** trial, in the store's order: ``complete`` ->
  COMPLETE with values, ``failed`` (or complete without a scored question) -> FAIL,
  ``running`` -> RUNNING (updated in place when it finishes);
* **trial numbers**: Optuna numbers its trials from 0 and graphtune from 1, and the
  held-out test trials are not Optuna trials (below), so the "Trial N" the dashboard
  shows is not graphtune's number. graphtune's number is where users read it: the user
  attr ``graphtune_trial`` and the title of the trial's note ("graphtune trial #60");
* **the held-out test trial** (graphtune scores the recommended graph once on the test
  split) is left out of the Optuna trials, so it is neither in the objective history
  nor on the Pareto front of dev evidence: its score is in the study note, in the study
  user attrs ``test_trial`` / ``test_accuracy`` / ``test_questions``, and in the note
  of the dev trial it tested;
* **the recommended graph**: the dev trial graphtune recommends (the rule of
  ``graphtune show`` / ``export --select best``: :func:`graphtune.pareto.study_points`)
  has the user attr ``recommended = True`` and says so in its note; the study user attr
  ``recommended_trial`` is its graphtune number. Optuna keeps finished trials read-only,
  so when a recommendation appears (or changes) after its trial was mirrored, the mirror
  is rebuilt from the store (into a fresh in-memory storage, under the same study id);
* **the best line**: a dev score resting on fewer questions than graphtune ranks on (half
  the best-covered trial's: :func:`graphtune.pareto.well_measured_threshold`) is mirrored
  with an Optuna constraint > 0, so optuna-dashboard draws it as infeasible and leaves it
  out of the best line and its Pareto front; when the threshold moves the mirror is
  rebuilt, as for a new recommendation;
* times: a trial's evaluation span, as naive local times like Optuna's own (the timeline);
  notes are wrapped and capped so they stay inside the note pane;
* params: features of the graph (size, edges, depth, width, in-degree, sink model and
  role, nodes per model and per role) with distributions fixed per study from the
  spec's space, so parameter importance works;
* user attrs: graphtune's trial number, graph hash, batch, slot, origin, parents,
  method, runs paid, reward, USD, FLOPs, latency, split, error, worker, recommended;
* trial notes: the graph as text and mermaid, its metrics, and the feedback agent's
  steps of its batch; the study note: method, status, budget, the recommendation and
  its test score, and the agent timeline.

The mirror needs neither LLM packages nor network; optuna-dashboard is imported only by
the functions that use it.
"""

from __future__ import annotations

import hashlib
import logging
import textwrap
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.storages import BaseStorage, InMemoryStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from graphtune.errors import GraphtuneError, StoreError
from graphtune.graphs.io import from_dict
from graphtune.graphs.model import BUILTIN_ROLES, Graph
from graphtune.graphs.render import to_mermaid, to_text
from graphtune.pareto import StudyPoints, study_points, well_measured_threshold
from graphtune.store.base import StudyInfo, StudyStorage, TrialInfo

log = logging.getLogger(__name__)

OBJECTIVE_NAMES = ("accuracy", "cost units")
DIRECTIONS = (StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE)
DEFAULT_REFRESH_S = 5.0
_STATES = {"complete": TrialState.COMPLETE, "failed": TrialState.FAIL, "running": TrialState.RUNNING}
_HTTP_READ_METHODS = ("GET", "HEAD", "OPTIONS")


class DashboardError(GraphtuneError):
    """The dashboard cannot start (port in use, optuna-dashboard missing...)."""

    exit_code = 2


def _optuna_dashboard():
    try:
        import optuna_dashboard
    except ImportError:
        raise DashboardError("optuna-dashboard is not installed; install it with "
                             "`pip install optuna-dashboard`") from None
    return optuna_dashboard


# -- graph features (the Optuna params) ------------------------------------------------------


def graph_features(g: Graph) -> dict[str, Any]:
    """The features of a graph that become Optuna params (plain values); of a pipeline,
    every stage's graph features named ``<stage>:<feature>`` (``answer:n_nodes``,
    ``retrieve:model:llama-3.1-70b``, ...)."""
    if hasattr(g, "stages"):
        return {f"{s.name}:{k}": v for s in g.stages for k, v in graph_features(s.graph).items()}
    feats: dict[str, Any] = {"n_nodes": g.size, "n_edges": len(g.edges), "depth": g.depth, "width": g.width,
                             "max_in_degree": g.max_in_degree}
    try:
        sink = g.node_map[g.sink]
        feats["sink_model"], feats["sink_role"] = sink.model, sink.role
    except GraphtuneError:  # several sinks: no single answering node
        pass
    for m, k in g.model_counts().items():
        feats[f"model:{m}"] = k
    for r, k in g.role_counts().items():
        feats[f"role:{r}"] = k
    return feats


@dataclass(frozen=True)
class FeatureSpace:
    """Fixed Optuna distributions for the graph features of one study: every trial uses
    the same ones (parameter importance and the dashboard's search-space views compare
    distributions), taken from the spec's space and widened to the graphs already
    stored when the mirror starts."""

    models: tuple[str, ...]
    roles: tuple[str, ...]
    max_nodes: int
    max_depth: int
    max_width: int
    max_in_degree: int

    @staticmethod
    def from_study(spec: dict, graphs: Sequence[Graph]) -> FeatureSpace | PipelineFeatureSpace:
        """The feature space of a study's spec, widened to ``graphs``; a pipeline study's
        (the spec has ``pipeline.stages``, or the graphs are pipelines): one space per stage."""
        stages = ((spec or {}).get("pipeline") or {}).get("stages")
        if stages or any(hasattr(g, "stages") for g in graphs):
            return PipelineFeatureSpace.from_study(spec, graphs)
        space = (spec or {}).get("space") or {}
        models = set(space.get("models") or [m.get("name") for m in (spec or {}).get("models") or []
                                             if isinstance(m, dict) and m.get("name")])
        roles = set(space.get("roles") or BUILTIN_ROLES)
        for g in graphs:
            models.update(n.model for n in g.nodes)
            roles.update(n.role for n in g.nodes)

        def bound(key: str, observed: Callable[[Graph], int], floor: int) -> int:
            return max([floor, int(space.get(key) or 0), *(observed(g) for g in graphs)])

        max_nodes = bound("max_nodes", lambda g: g.size, 1)
        return FeatureSpace(models=tuple(sorted(models)), roles=tuple(sorted(roles)), max_nodes=max_nodes,
                            max_depth=bound("max_depth", lambda g: g.depth, 1),
                            max_width=bound("max_width", lambda g: g.width, 1),
                            max_in_degree=bound("max_in_degree", lambda g: g.max_in_degree, 0))

    def distributions(self) -> dict[str, BaseDistribution]:
        n = self.max_nodes
        d: dict[str, BaseDistribution] = {
            "n_nodes": IntDistribution(1, n), "n_edges": IntDistribution(0, max(0, n * (n - 1) // 2)),
            "depth": IntDistribution(1, self.max_depth), "width": IntDistribution(1, self.max_width),
            "max_in_degree": IntDistribution(0, self.max_in_degree)}
        if self.models:
            d["sink_model"] = CategoricalDistribution(self.models)
        if self.roles:
            d["sink_role"] = CategoricalDistribution(self.roles)
        d.update({f"model:{m}": IntDistribution(0, n) for m in self.models})
        d.update({f"role:{r}": IntDistribution(0, n) for r in self.roles})
        return d

    def params(self, g: Graph) -> tuple[dict[str, Any], dict[str, BaseDistribution]]:
        """``(params, distributions)`` of a graph: zero counts for absent models and roles.
        A value outside the fixed space (the spec changed after the mirror started) keeps
        an integer feature on a range widened for that trial; an unknown category is left
        out (Optuna refuses other choices under one name)."""
        feats = graph_features(g)
        params: dict[str, Any] = {}
        dists: dict[str, BaseDistribution] = {}
        for name, dist in self.distributions().items():
            v = feats.get(name, 0 if name.startswith(("model:", "role:")) else None)
            if v is None:
                continue
            if isinstance(dist, CategoricalDistribution):
                if v not in dist.choices:
                    continue
            elif not dist.low <= v <= dist.high:
                dist = IntDistribution(min(dist.low, v), max(dist.high, v))
            params[name], dists[name] = v, dist
        return params, dists


@dataclass(frozen=True)
class PipelineFeatureSpace:
    """The feature space of a pipeline study: a :class:`FeatureSpace` per stage (from the
    stage's space in the spec, widened to the stage's graphs), its features and
    distributions named ``<stage>:<feature>``."""

    stages: tuple[tuple[str, FeatureSpace], ...]

    @staticmethod
    def from_study(spec: dict, graphs: Sequence[Any]) -> PipelineFeatureSpace:
        spec = spec or {}
        declared = [st for st in ((spec.get("pipeline") or {}).get("stages") or []) if isinstance(st, dict)]
        names = [st.get("name") for st in declared]
        for p in graphs:  # stages the spec does not name (a changed spec): from the stored pipelines
            for s in getattr(p, "stages", ()):
                if s.name not in names:
                    names.append(s.name)
        out = []
        for name in names:
            st = next((d for d in declared if d.get("name") == name), {})
            sub = {"space": st.get("space") or {}, "models": spec.get("models") or []}
            stage_graphs = [s.graph for p in graphs for s in getattr(p, "stages", ()) if s.name == name]
            out.append((name, FeatureSpace.from_study(sub, stage_graphs)))
        return PipelineFeatureSpace(tuple(out))

    def distributions(self) -> dict[str, BaseDistribution]:
        return {f"{name}:{k}": d for name, fs in self.stages for k, d in fs.distributions().items()}

    def params(self, p) -> tuple[dict[str, Any], dict[str, BaseDistribution]]:
        """``(params, distributions)`` of a pipeline, stage by stage (a stage the space does
        not know, or a single graph, gives none)."""
        params: dict[str, Any] = {}
        dists: dict[str, BaseDistribution] = {}
        spaces = dict(self.stages)
        for s in getattr(p, "stages", ()):
            if s.name not in spaces:
                continue
            ps, ds = spaces[s.name].params(s.graph)
            params.update({f"{s.name}:{k}": v for k, v in ps.items()})
            dists.update({f"{s.name}:{k}": v for k, v in ds.items()})
        return params, dists


# -- the mirror ----------------------------------------------------------------------------


def _short(text: str | None, n: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


#: notes stay readable in the dashboard's note pane, which does not wrap code blocks:
#: lines wrapped at NOTE_WIDTH characters, a free text (agent reply, feedback) cut at
#: NOTE_TEXT_CHARS with the cut said
NOTE_WIDTH = 100
NOTE_TEXT_CHARS = 4000


def _wrap(text: str, width: int = NOTE_WIDTH, limit: int = NOTE_TEXT_CHARS) -> str:
    """``text`` with every line wrapped at ``width`` (long words broken too) and cut at
    ``limit`` characters, saying how much was left out."""
    text = text or ""
    cut = ""
    if len(text) > limit:
        cut = f"\n[... {len(text) - limit} more characters, in the store]"
        text = text[:limit]
    out = []
    for line in text.splitlines() or [""]:
        out += textwrap.wrap(line, width, break_long_words=True, break_on_hyphens=False, replace_whitespace=False,
                             drop_whitespace=True, subsequent_indent="  ") or [""]
    return "\n".join(out) + cut


def _graph_block(g: Graph) -> str:
    """The graph as text, one topological level per line, each wrapped; a pipeline: each
    stage's name and inputs, then its graph's levels, indented."""
    if hasattr(g, "stages"):
        return "\n".join(f"{s.name} (reads {', '.join(s.inputs)}):\n"
                         + "\n".join("  " + line for line in _graph_block(s.graph).splitlines()) for s in g.stages)
    return _wrap("\n".join(to_text(g).split(" | ")), limit=10 * NOTE_TEXT_CHARS)


def _local(when: datetime | None) -> datetime | None:
    """A stored time (UTC: naive from SQLite, aware from PostgreSQL and memory) as Optuna
    keeps trial times: naive, in this machine's local time (it stamps them with
    ``datetime.now()``). optuna-dashboard reads a naive time as the browser's local time
    and compares it with "now": UTC passed as is puts a live study hours off (its
    timeline then empty), and an aware time breaks Optuna's own timeline plot."""
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone().replace(tzinfo=None)


def _well_measured(t: TrialInfo, need: int) -> bool | None:
    """Whether a scored trial's score rests on enough questions for graphtune to rank it
    (:func:`graphtune.pareto.well_measured_threshold`); None when it has no score."""
    if t.status != "complete" or t.accuracy is None or t.cost_units is None:
        return None
    return len(t.question_ids or []) >= need


def _constraints(t: TrialInfo, need: int) -> dict[str, Any]:
    """Optuna's constraint system attr (feasible when <= 0): a score on fewer questions
    than graphtune ranks on is *infeasible*, so optuna-dashboard draws it grey and leaves
    it out of the best line and the Pareto front, which then follow graphtune's best."""
    ok = _well_measured(t, need)
    return {} if ok is None else {"constraints": [float(need - len(t.question_ids or []))]}


@dataclass
class _Mirrored:
    trial_id: int  # Optuna's
    number: int  # Optuna's (from 0)
    status: str
    finished_at: Any
    note_digest: str = ""
    well_measured: bool | None = None  # as mirrored (None: no score)


@dataclass(frozen=True)
class RefreshStats:
    added: int
    updated: int
    notes: int


class StudyMirror:
    """Mirrors one stored graphtune study into an Optuna storage.

    ``store``: any :class:`~graphtune.store.base.StudyStorage` (only its methods are used).
    ``refresh()`` reads the study and writes to the Optuna storage only what changed since
    the last call: new trials, running trials that finished (or vanished), notes whose
    agent steps appeared; the whole study again when the recommendation changed after its
    trials were mirrored (see the module docstring). It never writes to ``store``. Not
    thread-safe: one thread refreshes (the :class:`Poller`); the Optuna storage may be
    read meanwhile (``optuna_storage`` is replaced, complete, when the mirror is rebuilt)."""

    def __init__(self, store: StudyStorage, name: str, optuna_storage: BaseStorage | None = None):
        self.store = store
        self.name = name
        self._owns_storage = optuna_storage is None
        self.optuna_storage = optuna_storage if optuna_storage is not None else InMemoryStorage()
        self._study: optuna.Study | None = None
        self._space: FeatureSpace | None = None
        self._graph_study_id: int | None = None
        self._trials: dict[int, _Mirrored] = {}  # by the store's trial id
        self._steps_sig: dict[Any, tuple] = {}  # batch -> keys of its agent steps, as last noted
        self._study_digest = ""
        self._recommended: int | None = None  # graphtune number of the recommended dev trial, as mirrored

    @property
    def study(self) -> optuna.Study:
        """The Optuna study (after the first ``refresh``)."""
        if self._study is None:
            raise DashboardError(f"study {self.name!r} is not mirrored yet; call refresh() first")
        return self._study

    def refresh(self) -> RefreshStats:
        st = self.store.get_study(self.name)
        if st is None:
            known = [s.name for s in self.store.list_studies()]
            raise StoreError(f"no study named {self.name!r} in {self.store.safe_url()}; "
                             f"known studies: {known or 'none'}")
        sp = study_points(self.store, st)  # graphtune's recommendation, as `graphtune show` gives it
        trials, test = sp.trials, sp.test_trial
        rec = sp.recommended.trial_number if sp.recommended is not None else None
        dev = [t for t in trials if t.split == "dev"]  # held-out test trials: not Optuna trials
        need = well_measured_threshold(dev)
        if self._study is not None and (st.id != self._graph_study_id or (rec != self._recommended and self._trials)
                                        or self._measure_changed(dev, need)):
            if self._owns_storage:  # build it whole aside, then swap: readers never see it half-built
                fresh = StudyMirror(self.store, self.name)
                stats = fresh.refresh()
                self._adopt(fresh)
                return stats
            self._study_gone()
        steps = self.store.agent_steps(st.id)
        if self._study is None:
            self._create(st, dev)
        self._recommended = rec
        steps_by_batch: dict[Any, list[dict]] = {}
        for s in steps:
            steps_by_batch.setdefault(s.get("batch"), []).append(s)
        sig = {b: tuple(s["key"] for s in v) for b, v in steps_by_batch.items()}
        tested = {test.parents[0]: test} if test is not None and test.parents else {}
        added = updated = notes = 0
        seen = set()
        for t in dev:
            seen.add(t.id)
            m = self._trials.get(t.id)
            if m is None and t.status in ("pending", "waiting"):
                continue  # queued for a worker (graphtune worker): shown once it runs
            if m is None:
                m = self._trials[t.id] = self._add(t, need, recommended=t.number == rec)
                added += 1
            elif m.status == "running" and t.status != "running":
                self._finish(m.trial_id, t, need, recommended=t.number == rec)
                m.status, m.finished_at, m.well_measured = t.status, t.finished_at, _well_measured(t, need)
                updated += 1
            elif not (m.note_digest == "" or sig.get(t.batch) != self._steps_sig.get(t.batch)):
                continue  # unchanged, and so are the agent steps of its batch
            body = self._trial_note(t, m.number, steps_by_batch.get(t.batch, []), recommended=t.number == rec,
                                    test=tested.get(t.number), need=need)
            if _digest(body) != m.note_digest:
                self._save_note(m.trial_id, body)
                m.note_digest = _digest(body)
                notes += 1
        for tid, m in self._trials.items():  # a running trial that left the store (its worker died)
            if tid not in seen and m.status == "running":
                self.optuna_storage.set_trial_user_attr(m.trial_id, "error", "no longer in the store")
                self.optuna_storage.set_trial_state_values(m.trial_id, TrialState.FAIL)
                m.status = "gone"
                updated += 1
        self._steps_sig = sig
        self._update_study(st, trials, steps, sp)
        return RefreshStats(added, updated, notes)

    def _measure_changed(self, dev: Sequence[TrialInfo], need: int) -> bool:
        """Whether a finished, mirrored trial crossed the well-measured line (the best
        coverage grew): Optuna keeps its constraint read-only, so the mirror is rebuilt."""
        for t in dev:
            m = self._trials.get(t.id)
            if m is not None and m.status not in ("running", "gone") and m.well_measured != _well_measured(t, need):
                return True
        return False

    def _adopt(self, fresh: StudyMirror) -> None:
        """Take over a mirror built from scratch; the storage goes last, so a reader
        following ``optuna_storage`` finds the study complete."""
        (self._study, self._space, self._graph_study_id, self._trials, self._steps_sig, self._study_digest,
         self._recommended) = (fresh._study, fresh._space, fresh._graph_study_id, fresh._trials, fresh._steps_sig,
                               fresh._study_digest, fresh._recommended)
        self.optuna_storage = fresh.optuna_storage

    def _study_gone(self) -> None:
        """Forget the mirrored study (in a storage the caller gave us: delete it there)."""
        self.optuna_storage.delete_study(self._study._study_id)
        self._study = None

    # -- study --------------------------------------------------------------------------
    def _create(self, st: StudyInfo, dev: Sequence[TrialInfo]) -> None:
        graphs = [g for g in (self._graph(t) for t in dev) if g is not None]
        self._space = FeatureSpace.from_study(st.spec, graphs)
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" line
        try:
            self.optuna_storage.create_new_study(list(DIRECTIONS), study_name=st.name)
        finally:
            optuna.logging.set_verbosity(verbosity)
        # a cheap sampler: the dashboard never samples, and Trial() asks the sampler before_trial
        self._study = optuna.Study(st.name, self.optuna_storage, sampler=optuna.samplers.RandomSampler(seed=0))
        with warnings.catch_warnings():  # experimental since Optuna 3.2, what optuna-dashboard reads
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._study.set_metric_names(list(OBJECTIVE_NAMES))
        self._graph_study_id = st.id
        self._trials, self._steps_sig, self._study_digest = {}, {}, ""

    def _update_study(self, st: StudyInfo, trials: Sequence[TrialInfo], steps: Sequence[dict], sp: StudyPoints) -> None:
        save_note = _optuna_dashboard().save_note
        attrs: dict[str, Any] = {"graphtune_study": st.name, "method": st.method, "status": st.status,
                                 "runs_spent": st.runs_spent, "batches": st.batch_index,
                                 "storage": self.store.safe_url()}
        if sp.recommended is not None:
            attrs["recommended_trial"] = sp.recommended.trial_number
        test = sp.test_trial
        if test is not None:
            attrs.update({"test_trial": test.number, "test_accuracy": test.accuracy,
                          "test_questions": len(test.question_ids or [])})
        attrs = {k: v for k, v in attrs.items() if v is not None}
        body = self._study_note(st, trials, steps, sp)
        digest = _digest(repr(sorted(attrs.items())) + body)
        if digest == self._study_digest:
            return
        for k, v in attrs.items():
            self.optuna_storage.set_study_user_attr(self.study._study_id, k, v)
        save_note(self.study, body)
        self._study_digest = digest

    def _study_note(self, st: StudyInfo, trials: Sequence[TrialInfo], steps: Sequence[dict], sp: StudyPoints) -> str:
        spec = st.spec or {}
        budget = {k: v for k, v in (spec.get("budget") or {}).items() if v is not None}
        search = spec.get("search") or {}
        dev = [t for t in trials if t.split == "dev"]
        done = [t for t in dev if t.status == "complete" and t.accuracy is not None]
        top = max((len(t.question_ids or []) for t in done), default=0)
        lines = [f"# graphtune study `{st.name}`", "",
                 "A read-only mirror of the graphtune store, refreshed while the dashboard runs.", "",
                 f"- method: **{st.method}**, status: **{st.status}**",
                 f"- trials: {len(dev)} dev ({len(done)} scored), {len(trials) - len(dev)} held-out test "
                 "(not plotted: see below)",
                 f"- runs spent: {st.runs_spent} graph-question runs (budget: {search.get('evaluations', '?')} "
                 f"full-dev evaluations), {st.batch_index} batches",
                 f"- cost budget per query: {budget or 'none'}",
                 "- objectives: dev **accuracy** (maximize), **cost units** per query (minimize)",
                 "- numbering: Optuna's \"Trial N\" counts dev trials from 0; graphtune's number is the user attr "
                 "`graphtune_trial` and the title of each trial's note",
                 f"- best line: only scores resting on at least {well_measured_threshold(dev)} questions (half the "
                 "best-covered trial's), as graphtune ranks; trials scored on fewer are *Infeasible* (grey)", ""]
        rec, test = sp.recommended, sp.test_trial
        if rec is not None:
            kind = "pipeline" if "stages" in (rec.graph or {}) else "graph"
            lines += [f"**Recommended {kind}** (user attr `recommended`): graphtune trial #{rec.trial_number}, "
                      f"dev accuracy {rec.accuracy:.3f} on {rec.n} questions, {rec.cost_units:.2f} units:", "",
                      "```text", _graph_block(from_dict(rec.graph)), "```", ""]
            if test is not None:
                lines += [f"Held-out test (graphtune trial #{test.number}): accuracy "
                          f"{'-' if test.accuracy is None else format(test.accuracy, '.3f')} on "
                          f"{len(test.question_ids or [])} questions.", ""]
        elif done:
            full = [t for t in done if len(t.question_ids or []) >= top]  # as `graphtune report`: full coverage
            best = max(full, key=lambda t: (t.accuracy, -(t.cost_units or 0)))
            g = self._graph(best)
            lines += [f"Nothing recommended yet (the search has not finished). Best dev accuracy so far on {top} "
                      f"questions: {best.accuracy:.3f} (graphtune trial #{best.number}, "
                      f"{best.cost_units or 0:.2f} units):", "",
                      "```text", _graph_block(g) if g is not None else "(unreadable graph)", "```", ""]
        if steps:
            lines += ["## Agent timeline", "", "| batch | kind | agent | feedback | update |", "|---|---|---|---|---|"]
            for s in steps:
                upd = "rejected: " + _short(s.get("rejected_reason"), 120) if s.get("rejected_reason") else (
                    "applied" if s.get("applied") else "-")
                lines.append(f"| {s.get('batch')} | {s.get('kind')} | {_short(s.get('backend'), 40)} | "
                             f"{_short(s.get('feedback'), 300).replace('|', '/')} | {upd.replace('|', '/')} |")
        return "\n".join(lines) + "\n"

    # -- trials -------------------------------------------------------------------------
    @staticmethod
    def _graph(t: TrialInfo) -> Graph | None:
        try:
            return from_dict(t.graph, where=f"trial #{t.number}")
        except GraphtuneError:
            return None

    @staticmethod
    def _state_values(t: TrialInfo) -> tuple[TrialState, list[float] | None]:
        state = _STATES.get(t.status, TrialState.FAIL)
        if state == TrialState.COMPLETE:
            if t.accuracy is None or t.cost_units is None:  # no question scored: nothing to plot
                return TrialState.FAIL, None
            return state, [float(t.accuracy), float(t.cost_units)]
        return state, None

    @staticmethod
    def _user_attrs(t: TrialInfo, recommended: bool = False, need: int | None = None) -> dict[str, Any]:
        attrs = {"graphtune_trial": t.number, "split": t.split, "status": t.status, "graph_hash": t.graph_hash,
                 "batch": t.batch, "slot": t.slot, "origin": t.origin, "parents": list(t.parents or []),
                 "method": t.method, "new_runs": t.new_runs, "n_questions": len(t.question_ids or []),
                 "well_measured": _well_measured(t, need) if need is not None else None, "reward": t.reward, "usd": t.usd, "flops": t.flops, "latency_s": t.latency_s, "error": t.error,
                 "worker": t.worker, "recommended": True if recommended else None}
        if t.status == "complete" and (t.accuracy is None or t.cost_units is None):
            attrs["error"] = t.error or "no question was scored (every run failed); nothing to plot"
        if isinstance(t.graph, dict) and "stages" in t.graph:  # a pipeline: its stages, short, in order
            try:
                from graphtune.graphs.render import to_short

                attrs["stages"] = to_short(from_dict(t.graph))
            except GraphtuneError:
                pass
        return {k: v for k, v in attrs.items() if v is not None}

    def _add(self, t: TrialInfo, need: int, *, recommended: bool) -> _Mirrored:
        state, values = self._state_values(t)
        g = self._graph(t)
        params, dists = self._space.params(g) if g is not None else ({}, {})
        start = _local(t.started_at or t.finished_at)
        end = _local(t.finished_at or t.started_at) if state.is_finished() else None
        template = FrozenTrial(number=-1, state=state, value=None, values=values, datetime_start=start,
                               datetime_complete=end, params=params, distributions=dists,
                               user_attrs=self._user_attrs(t, recommended, need), system_attrs=_constraints(t, need),
                               intermediate_values={}, trial_id=-1)
        trial_id = self.optuna_storage.create_new_trial(self.study._study_id, template_trial=template)
        return _Mirrored(trial_id, self.optuna_storage.get_trial_number_from_id(trial_id), t.status, t.finished_at,
                         well_measured=_well_measured(t, need) if state.is_finished() else None)

    def _finish(self, trial_id: int, t: TrialInfo, need: int, *, recommended: bool) -> None:
        """A running trial finished in the store: its final attrs, params, state and values
        (Optuna lets only unfinished trials change, so the state goes last)."""
        s = self.optuna_storage
        for k, v in self._user_attrs(t, recommended, need).items():
            s.set_trial_user_attr(trial_id, k, v)
        for k, v in _constraints(t, need).items():
            s.set_trial_system_attr(trial_id, k, v)
        g = self._graph(t)
        if g is not None:
            known = s.get_trial(trial_id).params
            params, dists = self._space.params(g)
            for k, v in params.items():
                if k not in known:
                    s.set_trial_param(trial_id, k, dists[k].to_internal_repr(v), dists[k])
        state, values = self._state_values(t)
        s.set_trial_state_values(trial_id, state, values)

    def _trial_note(self, t: TrialInfo, optuna_number: int, steps: Sequence[dict], *, recommended: bool = False,
                    test: TrialInfo | None = None, need: int = 1) -> str:
        g = self._graph(t)
        m = t.metrics or {}
        lines = [f"## graphtune trial #{t.number} ({t.split}, {t.status})"
                 + (" · recommended" if recommended else ""), "",
                 f"Optuna's Trial {optuna_number} here (Optuna numbers from 0); batch {t.batch}, slot {t.slot}, "
                 f"origin {t.origin}, method {t.method}" + (f", parents {list(t.parents)}" if t.parents else ""), ""]
        if recommended:
            lines += ["**The graph graphtune recommends** (as `graphtune show`)"
                      + (f"; held-out test (graphtune trial #{test.number}): accuracy "
                         f"{'-' if test.accuracy is None else format(test.accuracy, '.3f')} on "
                         f"{len(test.question_ids or [])} questions" if test is not None else "") + ".", ""]
        if _well_measured(t, need) is False:
            lines += [f"Scored on {len(t.question_ids or [])} questions, fewer than the {need} (half the best-covered "
                      "trial's) graphtune ranks on: shown as *Infeasible* (grey), not on the best line or the "
                      "Pareto front.", ""]
        if t.error:
            lines += ["**error:**", "", "```text", _wrap(t.error, limit=2000), "```", ""]
        if g is None:
            lines += ["The stored graph cannot be read by this graphtune.", ""]
        else:
            lines += ["### Graph", "", "```text", _graph_block(g), "```", "", "```mermaid", to_mermaid(g), "```", "",
                      f"hash `{t.graph_hash}`", ""]

        def f(x, spec):
            return "-" if x is None else format(x, spec)

        if g is not None and hasattr(g, "stages"):
            lines += self._stage_lines(t, g, f)

        lines += ["### Metrics", "", "| accuracy | reward | scored / questions | infra failures | runs paid | units "
                  "| FLOPs | USD / query | latency s |", "|---|---|---|---|---|---|---|---|---|",
                  f"| {f(t.accuracy, '.3f')} | {f(t.reward, '.3f')} | {m.get('n_scored', '-')} / "
                  f"{len(t.question_ids or [])} | {m.get('n_errors', 0)} | {t.new_runs} | {f(t.cost_units, '.2f')} "
                  f"| {f(t.flops, '.3g')} | {f(t.usd, '.2e')} | {f(t.latency_s, '.2f')} |", ""]
        if t.feedback:
            lines += ["### Feedback", "", _wrap(t.feedback), ""]
        if steps:
            lines += [f"### Agent steps of batch {t.batch}", ""]
            for s in steps:
                lines += [f"**{s.get('kind')}** ({s.get('backend')}), looked at trials {s.get('trial_numbers') or []}",
                          ""]
                if s.get("feedback"):
                    lines += ["> " + "\n> ".join(_wrap(str(s["feedback"])).splitlines()), ""]
                if s.get("reply") and s.get("reply") != s.get("feedback"):
                    lines += ["reply:", "", "```text", _wrap(str(s["reply"])), "```", ""]
                if s.get("rejected_reason"):
                    lines += ["update rejected:", "", "```text", _wrap(str(s["rejected_reason"]), limit=2000), "```",
                              ""]
                elif s.get("applied"):
                    lines += ["update applied:", "", "```text", _wrap(str(s["applied"]), limit=1000), "```", ""]
        return "\n".join(lines)

    def _stage_lines(self, t: TrialInfo, p, f) -> list[str]:
        """The note's table of a pipeline trial's stages (graphtune.stages.stage_rows over
        the trial's stored results)."""
        from graphtune.stages import stage_rows

        results = self.store.trial_results(t.id) if t.status == "complete" else []
        rows = stage_rows(p, results, trial_units=t.cost_units)
        out = ["### Stages", "", "| stage | reads | calls | models | stage accuracy | answers lost | units | "
               "USD / query | latency s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            acc = f"{f(r.accuracy, '.3f')} on {r.n_scored}" if r.n_scored else "-"
            out.append(f"| {r.name} | {', '.join(r.inputs)} | {r.calls} | {r.models_text()} | {acc} | "
                       f"{r.n_lost if r.n else '-'} | {f(r.units, '.2f')} | {f(r.usd, '.2e')} | "
                       f"{f(r.latency_s, '.2f')} |")
        return out + ["", "Stage accuracy: the stage's own answer right for the stage; answers lost: the "
                          "pipeline's wrong answers this stage got wrong first; units: the stage's share of the "
                          "trial's units by FLOPs.", ""]

    def _save_note(self, trial_id: int, body: str) -> None:
        _optuna_dashboard().save_note(optuna.trial.Trial(self.study, trial_id), body)


# -- the poller and the server -------------------------------------------------------------


class Poller(threading.Thread):
    """Calls ``mirror.refresh()`` every ``refresh_s`` seconds until ``stop()``; a failed
    refresh (database locked, connection lost) keeps the last mirror and is reported to
    ``on_error``, and the next refresh tries again."""

    def __init__(self, mirror: StudyMirror, refresh_s: float = DEFAULT_REFRESH_S,
                 on_error: Callable[[Exception], None] | None = None):
        super().__init__(name=f"graphtune-dashboard-{mirror.name}", daemon=True)
        self.mirror, self.refresh_s = mirror, refresh_s
        self.on_error = on_error or (lambda e: log.warning("dashboard refresh of %s failed: %s", mirror.name, e))
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.refresh_s):
            try:
                self.mirror.refresh()
            except Exception as e:  # keep serving the last mirror
                self.on_error(e)

    def stop(self) -> None:
        self._stop_event.set()


def read_only(app):
    """Wrap a WSGI app so that only reads pass: the mirror is rebuilt from the store, so
    an edit made in the dashboard (a note, a study deleted) would silently vanish."""

    def wrapped(environ, start_response):
        if environ.get("REQUEST_METHOD", "GET").upper() in _HTTP_READ_METHODS:
            return app(environ, start_response)
        body = (b'{"reason": "graphtune dashboard is read-only: it mirrors the graphtune store; '
                b'change the study with the graphtune command"}')
        start_response("403 Forbidden", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return wrapped


class DashboardServer:
    """optuna-dashboard over a :class:`StudyMirror`, on ``host:port`` (port 0: any free
    one), with a :class:`Poller` keeping the mirror live. The first refresh happens here,
    so an unknown study fails before anything listens."""

    def __init__(self, store: StudyStorage, name: str, *, host: str = "127.0.0.1", port: int = 8080,
                 refresh_s: float = DEFAULT_REFRESH_S, on_error: Callable[[Exception], None] | None = None):
        from socketserver import ThreadingMixIn
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        dashboard = _optuna_dashboard()
        if refresh_s <= 0:
            raise DashboardError(f"--refresh must be positive seconds, got {refresh_s}")
        self.mirror = StudyMirror(store, name)
        self.mirror.refresh()

        class _Server(ThreadingMixIn, WSGIServer):
            daemon_threads = True
            allow_reuse_address = True

        class _Quiet(WSGIRequestHandler):
            def log_message(self, *args) -> None:  # no line per request on the terminal
                pass

        served: list = [None, None]  # (Optuna storage, its app): a rebuilt mirror gets a fresh app and cache
        lock = threading.Lock()

        def app(environ, start_response):
            storage = self.mirror.optuna_storage
            with lock:
                if served[0] is not storage:
                    served[:] = [storage, read_only(dashboard.wsgi(storage))]
                wsgi_app = served[1]
            return wsgi_app(environ, start_response)

        try:
            self.httpd = make_server(host, port, app, server_class=_Server, handler_class=_Quiet)
        except OSError as e:
            raise DashboardError(f"cannot listen on {host}:{port}: {e.strerror or e}; pass another --port "
                                 "(or --host)") from None
        self.host, self.port = host, self.httpd.server_port
        self.poller = Poller(self.mirror, refresh_s, on_error)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/dashboard/studies/{self.mirror.study._study_id}"

    def serve_forever(self) -> None:
        """Serve in this thread until ``shutdown()`` (from another thread) or Ctrl-C."""
        if not self.poller.is_alive():
            self.poller.start()
        try:
            self.httpd.serve_forever(poll_interval=0.5)
        finally:
            self.poller.stop()

    def start(self) -> DashboardServer:
        """Serve in a background thread (tests, notebooks)."""
        self._thread = threading.Thread(target=self.serve_forever, name="graphtune-dashboard-http", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self.poller.stop()
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=30)
        self.httpd.server_close()

    def __enter__(self) -> DashboardServer:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
