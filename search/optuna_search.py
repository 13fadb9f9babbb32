"""Optuna baselines behind the Searcher interface: ``tpe``, ``gp``, ``cmaes``, ``qmc``,
``nsga2``.

Encoding (define-by-run, but the same parameters in every trial). A graph has
``space.max_nodes`` slots in a fixed order; the last slot is the sink and always exists.
Per slot: ``on_i`` (non-sink slots only), ``model_i``, ``role_i``; per slot pair i < j:
``edge_i_j``. Decoding keeps the active slots and the sink, adds the edges between kept
slots (i < j, so the graph is a DAG by construction), prunes every node without a path
to the sink and turns a fuser left without inputs into an assistant (the one repair: it
would answer alone anyway, and random parameters put fusers on source slots most of the
time). A parameter with a single possible value is not suggested at all.

Pipelines (a multi-stage study): every stage's graph is encoded as above in its own
stage's space (its slots, models in its cost order, roles), each parameter prefixed with
the stage's name (``retrieve.on_0``, ``answer.model_3``), the stages in pipeline order;
decoding builds each stage's graph and the pipeline from them. A pipeline that breaks a
stage's space, a stage's cap or the total budget is handled as an invalid graph is below
(penalty, never proposed); the fallback is a random pipeline (``random_design``).

Every sampler sees the *same* parameter set in every trial on purpose: GP, CMA-ES and
QMC only model the intersection of the trials' search spaces and silently fall back to
random sampling for conditional parameters, so a conditional encoding ("model_3 only if
on_3") would turn them into random search.

Two flavours of the same parameters:

* categorical (TPE, GP, NSGA-II): ``on``/``edge`` in {0, 1}, model and role as categories;
* continuous (CMA-ES, QMC), floats in [0, 1]: ``on``/``edge`` true at >= 0.5, model and
  role the ``floor(x * n)``-th choice. Models are ordered by cost, so neighbouring values
  are neighbouring sizes and the ordinal encoding means something. CMA-ES needs this (it
  hands categorical parameters to a random sampler), and QMC's low-discrepancy sequence
  only covers numeric parameters.

Constraints. A decoded graph that breaks the space (in-degree, depth, width, a fuser
without input) or the budget is never proposed to the loop: it is told to Optuna at
once with a penalty value below every reward seen (``min(0, worst reward) - 1 -
violation``, violation = relative budget overshoot, or 1 + 0.1 per structural problem,
capped at 10), so samplers learn the feasible region without spending evaluations.
NSGA-II also gets the violation through ``constraints_func``, so a feasible graph always
dominates an infeasible one. Repairing to the budget (dropping or shrinking nodes) was
rejected: mapping many parameter vectors onto one repaired graph flattens the landscape
the samplers model. If ``max_rejects`` asks in a
row produce nothing new (infeasible or already evaluated), a random valid graph the
study has not seen is enqueued (``study.enqueue_trial``), so tight budgets and converged
samplers still make progress; when even that finds nothing new the search ends.

Duplicates. A graph with the canonical hash of one already evaluated is told the stored
values and not proposed; a duplicate of a graph pending in the current batch is told the
same values when that graph's result arrives. Each proposed graph is evaluated on the
whole dev split (``question_ids=None``).

Exact resume. The study is in memory. ``state_dict`` stores every finished trial
(parameters, values, state, sampler system attributes), the study's system attributes
and the searcher's own counters; ``load_state_dict`` rebuilds the study with
``create_trial``/``add_trial`` (same order, hence the same trial ids that NSGA-II's
caches refer to). The sampler is re-created before every ask with a seed derived from
(seed, trial number): samplers keep RNG state that Optuna cannot save, and this makes
the next ask a pure function of the seed and the history, so a resumed search asks
exactly what an uninterrupted one would. (QMC keeps one fixed seed for its scrambled
sequence; its position lives in the study's system attributes.) Of CMA-ES's pickled
optimiser only the latest copy is kept, the only one Optuna reads back.

Objectives: single-objective samplers maximise the reward; NSGA-II maximises the reward
and minimises the analytic cost in budget units.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from pydantic import Field

from graphtune.errors import GraphtuneError
from graphtune.graphs.cost import Budget, CostModel, GraphCost, PipelineBudget
from graphtune.graphs.design import Design, PipelineSpace, design_hash, random_design
from graphtune.graphs.model import ASSISTANT, Graph, Node
from graphtune.graphs.pipeline import Pipeline
from graphtune.graphs.space import Space, prune_to_sink, structural_errors
from graphtune.search.base import (Candidate, Evaluation, SearchContext, Searcher, SearcherOptions, rng_from_state,
                                   rng_state)

optuna.logging.set_verbosity(optuna.logging.WARNING)

STATE_VERSION = 1
#: cap on the violation used in penalties (keeps penalty values bounded)
MAX_VIOLATION = 10.0


@contextmanager
def _quiet():
    """Silence Optuna's ExperimentalWarning (QMC, multivariate TPE...) and scipy's Sobol
    balance warnings; they say nothing a user of graphtune can act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message=".*balance properties of Sobol.*")
        warnings.filterwarnings("ignore", message=".*fast_forward.*")
        yield


# -- encoding ----------------------------------------------------------------------------


class GraphEncoding:
    """Graph <-> Optuna parameters for one space (see the module docstring).

    ``space``/``costs`` default to the context's; ``prefix`` goes before every parameter
    name (a pipeline's stage encodings use ``"<stage>."``; a single graph has none)."""

    def __init__(self, ctx: SearchContext | None = None, *, continuous: bool, space: Space | None = None,
                 costs: CostModel | None = None, prefix: str = ""):
        space = space if space is not None else ctx.space
        costs = costs if costs is not None else ctx.costs
        self.continuous = continuous
        self.prefix = prefix
        self.k = space.max_nodes
        # cost order makes the continuous (ordinal) encoding meaningful
        self.models = tuple(sorted(space.models, key=lambda m: (costs.node_units(m, 0), m)))
        self.space = space
        self.roles = tuple(space.roles)
        # roles the sink may take with or without inputs (a role with `sink: false` never)
        self.sink_roles = tuple(r for r in (space.sink_roles or space.roles) if space.role_spec(r).may_be_sink) \
            or self.roles
        self.sink = self.k - 1
        p = prefix
        #: full parameter name -> its choices
        self.choices: dict[str, tuple] = {}
        for i in range(self.k):
            if i != self.sink:
                self.choices[f"{p}on_{i}"] = (0, 1)
            self.choices[f"{p}model_{i}"] = self.models
            self.choices[f"{p}role_{i}"] = self.sink_roles if i == self.sink else self.roles
        for j in range(self.k):
            for i in range(j):
                self.choices[f"{p}edge_{i}_{j}"] = (0, 1)
        #: parameters actually suggested, in suggestion order (single choices are fixed)
        self.names = [n for n, c in self.choices.items() if len(c) > 1]
        if continuous:
            self.distributions: dict[str, BaseDistribution] = {n: FloatDistribution(0.0, 1.0) for n in self.names}
        else:
            self.distributions = {n: CategoricalDistribution(self.choices[n]) for n in self.names}

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Suggest every parameter (define-by-run) and return them."""
        out: dict[str, Any] = {}
        for n in self.names:
            if self.continuous:
                out[n] = trial.suggest_float(n, 0.0, 1.0)
            else:
                out[n] = trial.suggest_categorical(n, self.choices[n])
        return out

    def _value(self, params: Mapping[str, Any], name: str):
        name = self.prefix + name
        ch = self.choices[name]
        if len(ch) == 1:
            return ch[0]
        x = params[name]
        if not self.continuous:
            return x
        return ch[min(int(float(x) * len(ch)), len(ch) - 1)]

    def decode(self, params: Mapping[str, Any]) -> Graph:
        """The graph the parameters describe, pruned to the sink (may break the space)."""
        active = [i for i in range(self.k) if i == self.sink or self._value(params, f"on_{i}")]
        nodes = [Node.make(f"n{i}", self._value(params, f"role_{i}"), self._value(params, f"model_{i}"))
                 for i in active]
        edges = [(f"n{i}", f"n{j}") for j in active for i in active
                 if i < j and self._value(params, f"edge_{i}_{j}")]
        g = prune_to_sink(Graph.build(nodes, edges), f"n{self.sink}")
        return self._sources_answer(g)

    def _sources_answer(self, g: Graph) -> Graph:
        """A fuser (or any role needing input) without inputs becomes an assistant: with
        nothing to combine it would answer alone anyway. Without this, most random
        parameter vectors put a fuser on a source slot and are rejected (about 60% of
        them on a 9-slot space), which only wastes asks. Likewise a role that takes no
        inputs given some becomes an assistant."""
        fixed, changed = [], False
        for n in g.nodes:
            place = dict(has_inputs=bool(g.preds[n.id]), is_sink=n.id == f"n{self.sink}")
            if not self.space.role_allowed(n.role, **place) and self.space.role_allowed(ASSISTANT, **place):
                n, changed = Node(id=n.id, role=ASSISTANT, model=n.model, params=n.params), True
            fixed.append(n)
        return Graph.build(fixed, g.edges) if changed else g

    def encode(self, graph: Graph) -> dict[str, Any]:
        """Parameters that decode to ``graph`` (up to node naming): nodes in topological
        order fill the first slots, the sink the last one."""
        order = [n for n in graph.topo_order if n != graph.sink]
        if len(order) + 1 > self.k:
            raise GraphtuneError(f"graph has {graph.size} nodes, more than the {self.k} slots of the encoding")
        slot = {nid: i for i, nid in enumerate(order)}
        slot[graph.sink] = self.sink
        on = set(slot.values())
        edges = {(slot[u], slot[v]) for u, v in graph.edges}
        values: dict[str, Any] = {}
        for i in range(self.k):
            if i != self.sink:
                values[f"on_{i}"] = int(i in on)
            nid = next((n for n, s in slot.items() if s == i), None)
            node = graph.node_map[nid] if nid is not None else None
            values[f"model_{i}"] = node.model if node else self.models[0]
            values[f"role_{i}"] = node.role if node else self.choices[f"{self.prefix}role_{i}"][0]
        for j in range(self.k):
            for i in range(j):
                values[f"edge_{i}_{j}"] = int((i, j) in edges)
        out: dict[str, Any] = {}
        for n in self.names:
            v = values[n[len(self.prefix):]]
            if self.continuous:
                ch = self.choices[n]
                out[n] = (ch.index(v) + 0.5) / len(ch)  # middle of the value's interval
            else:
                out[n] = v
        return out


class PipelineEncoding:
    """Pipeline <-> Optuna parameters: each stage's graph encoded as a single graph is
    (:class:`GraphEncoding`), every parameter prefixed with the stage's name
    (``retrieve.model_2``, ``answer.edge_0_4``), stages in pipeline order."""

    def __init__(self, ctx: SearchContext, *, continuous: bool):
        space: PipelineSpace = ctx.space
        self.space = space
        self.continuous = continuous
        self.stages = tuple((s.name, GraphEncoding(space=s.space, costs=ctx.costs.of(s.name), continuous=continuous,
                                                   prefix=f"{s.name}."))
                            for s in space.stages)
        #: parameters actually suggested, in suggestion order (stage by stage)
        self.names = [n for _, e in self.stages for n in e.names]
        self.distributions = {n: d for _, e in self.stages for n, d in e.distributions.items()}

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Suggest every stage's parameters (define-by-run) and return them."""
        out: dict[str, Any] = {}
        for _, e in self.stages:
            out.update(e.suggest(trial))
        return out

    def decode(self, params: Mapping[str, Any]) -> Pipeline:
        """The pipeline the parameters describe (each stage's graph decoded and pruned to
        its sink as a single graph's is; it may break a stage's space or the budget)."""
        return self.space.pipeline({name: e.decode(params) for name, e in self.stages})

    def encode(self, pipeline: Pipeline) -> dict[str, Any]:
        """Parameters that decode to ``pipeline`` (up to node naming)."""
        out: dict[str, Any] = {}
        for name, e in self.stages:
            out.update(e.encode(pipeline.stage(name).graph))
        return out


def encoding(ctx: SearchContext, *, continuous: bool) -> GraphEncoding | PipelineEncoding:
    """The encoding of the context's space: a graph's, or a pipeline's (one per stage)."""
    if isinstance(ctx.space, PipelineSpace):
        return PipelineEncoding(ctx, continuous=continuous)
    return GraphEncoding(ctx, continuous=continuous)


def violation(design: Design, ctx: SearchContext) -> tuple[float, GraphCost]:
    """0 for a design that fits the space and the budget, else a positive amount: the
    largest relative budget overshoot (a pipeline's: of its total or of any stage over its
    cap), or 1 + 0.1 per structural problem (of every stage). The cost is the design's
    total."""
    if isinstance(design, Pipeline):
        pc = ctx.costs.cost(design)
        errs = ctx.space.errors(design)
        if errs:
            return 1.0 + 0.1 * len(errs), pc.total
        b: PipelineBudget = ctx.budget
        worst = _overshoot(pc.total, b.total)
        for name, cap in b.stages:
            if cap is not None:
                worst = max(worst, _overshoot(pc.stage(name), cap))
        return worst, pc.total
    cost = ctx.costs.cost(design)
    errs = structural_errors(design, ctx.space)
    if errs:
        return 1.0 + 0.1 * len(errs), cost
    return _overshoot(cost, ctx.budget), cost


def _overshoot(c: GraphCost, b: Budget) -> float:
    if b.fits(c):
        return 0.0
    worst = 0.0
    for limit, value in ((b.units, c.units), (b.flops, c.flops), (b.usd, c.usd), (b.latency_s, c.latency_s)):
        if limit is not None and limit > 0:
            worst = max(worst, value / limit - 1.0)
    return max(worst, 1e-6)


def derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0])


# -- the searchers ------------------------------------------------------------------------


class OptunaOptions(SearcherOptions):
    max_rejects: int = Field(30, ge=1, le=100_000,
                             description="asks in a row with nothing new before a random unseen graph is enqueued")


class OptunaSearcher(Searcher):
    """Base of the Optuna baselines; subclasses choose the sampler and the encoding."""

    name = "optuna"
    #: continuous [0, 1] encoding instead of categorical
    continuous = False
    #: objectives (reward up, units down) instead of reward alone
    multi_objective = False

    def __init__(self, ctx: SearchContext):
        super().__init__(ctx)
        self.check_available()
        self.max_rejects = self.opts.max_rejects
        self.enc = encoding(ctx, continuous=self.continuous)
        self.rng = ctx.rng(salt=7)  # fallback random graphs
        self.values: dict[str, list[float]] = {}  # graph hash -> told values (evaluated graphs)
        self.n_fallbacks = 0
        self.study = self._new_study()
        self._batch: list[tuple[optuna.trial.Trial, str]] = []
        self._dups: dict[str, list[optuna.trial.Trial]] = {}

    # -- subclass hooks ---------------------------------------------------------------
    @classmethod
    def check_available(cls) -> None:
        """Raise a one-line GraphtuneError when an optional dependency is missing."""

    def make_sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        raise NotImplementedError

    # -- study -------------------------------------------------------------------------
    def _new_study(self) -> optuna.Study:
        directions = ["maximize", "minimize"] if self.multi_objective else ["maximize"]
        with _quiet():
            return optuna.create_study(directions=directions, sampler=self.make_sampler(self.ctx.seed),
                                       storage=optuna.storages.InMemoryStorage())

    def _ask(self) -> optuna.trial.Trial:
        n = len(self.study.get_trials(deepcopy=False))
        with _quiet():
            self.study.sampler = self.make_sampler(derived_seed(self.ctx.seed, n, 0x0A7))
            return self.study.ask()

    def _tell(self, trial: optuna.trial.Trial, values: Sequence[float] | None, viol: float = 0.0) -> None:
        if self.multi_objective:
            if _HAS_SET_CONSTRAINT:  # Optuna >= 5: constraints are set on the trial
                trial.set_constraint("violation", float(viol))
            else:  # Optuna 4: NSGA-II reads them through constraints_func
                trial.set_user_attr("violation", float(viol))
        with _quiet():
            if values is None:
                self.study.tell(trial, state=TrialState.FAIL)
            else:
                self.study.tell(trial, list(values) if self.multi_objective else float(values[0]))

    def _floor(self) -> float:
        return min([0.0] + [v[0] for v in self.values.values()]) - 1.0

    def _penalty(self, viol: float, cost: GraphCost) -> list[float]:
        r = self._floor() - min(viol, MAX_VIOLATION)
        return [r, cost.units] if self.multi_objective else [r]

    # -- Searcher API ----------------------------------------------------------------
    def ask(self) -> list[Candidate]:
        out: list[Candidate] = []
        self._batch, self._dups = [], {}
        rejects = 0
        while len(out) < self.ctx.batch_size:
            fallback = False
            if rejects >= self.max_rejects:
                g = self._fallback_graph()
                if g is None:
                    break  # nothing new left to find
                self.study.enqueue_trial(self.enc.encode(g))
                self.n_fallbacks += 1
                fallback, rejects = True, 0
            trial = self._ask()
            with _quiet():
                params = self.enc.suggest(trial)
            graph = self.enc.decode(params)
            viol, cost = violation(graph, self.ctx)
            if viol > 0:
                self._tell(trial, self._penalty(viol, cost), viol)
                rejects += 1
                continue
            h = design_hash(graph)
            if h in self.values:  # evaluated before: never pay twice
                self._tell(trial, self.values[h])
                rejects += 1
                continue
            if h in self._dups:  # pending in this batch: told with that graph's result
                self._dups[h].append(trial)
                rejects += 1
                continue
            self._dups[h] = []
            self._batch.append((trial, h))
            rejects = 0
            out.append(Candidate(graph=graph, origin="fallback" if fallback else "sample",
                                 info={"optuna_trial": trial.number, "sampler": self.name}))
        return out

    def tell(self, evaluations: Sequence[Evaluation]) -> None:
        for i, (trial, h) in enumerate(self._batch):
            ev = evaluations[i] if i < len(evaluations) else None
            if ev is None or not ev.ok:
                # not evaluated (the loop ran out of budget) or an infrastructure failure:
                # a FAILED trial, and the graph may be proposed again later
                values = None
            else:
                values = [float(ev.reward), float(ev.cost.units)] if self.multi_objective else [float(ev.reward)]
                self.values[h] = values
            for t in [trial, *self._dups.get(h, [])]:
                self._tell(t, values)
        self._batch, self._dups = [], {}

    def _fallback_graph(self, tries: int = 200) -> Design | None:
        """A random valid design (graph or pipeline) that is neither evaluated nor
        pending, or None."""
        for _ in range(tries):
            try:
                g = random_design(self.ctx.space, self.ctx.costs, self.ctx.budget, self.rng)
            except GraphtuneError:
                return None
            h = design_hash(g)
            if h not in self.values and h not in self._dups:
                return g
        return None

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        trials = [t for t in self.study.get_trials(deepcopy=False) if t.state.is_finished()]
        # only the newest pickled CMA-ES optimiser on a COMPLETE trial is ever read back
        keep_opt = next((t.number for t in reversed(trials)
                         if t.state == TrialState.COMPLETE and any(_is_optimizer_key(k) for k in t.system_attrs)),
                        None)
        rows = []
        for t in trials:
            sa = {k: v for k, v in t.system_attrs.items()
                  if "relative_params" not in k and (not _is_optimizer_key(k) or t.number == keep_opt)}
            rows.append({"number": t.number, "state": t.state.name,
                         "params": [t.params[n] for n in self.enc.names],
                         "values": list(t.values) if t.values is not None else None,
                         "system_attrs": sa, "user_attrs": dict(t.user_attrs)})
        return {"version": STATE_VERSION, "sampler": self.name, "continuous": self.continuous,
                "param_names": list(self.enc.names), "trials": rows,
                "study_system_attrs": dict(self.study._storage.get_study_system_attrs(self.study._study_id)),
                "values": {h: list(v) for h, v in self.values.items()}, "rng": rng_state(self.rng),
                "n_fallbacks": self.n_fallbacks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("sampler") != self.name:
            raise GraphtuneError(f"stored searcher state is for {state.get('sampler')!r} (version "
                                 f"{state.get('version')}), not {self.name!r}; start a new study")
        if list(state["param_names"]) != self.enc.names:
            raise GraphtuneError("stored searcher state was made for a different space; start a new study")
        self.study = self._new_study()
        storage, sid = self.study._storage, self.study._study_id
        for k, v in state["study_system_attrs"].items():
            storage.set_study_system_attr(sid, k, v)
        for row in state["trials"]:
            params = dict(zip(self.enc.names, row["params"]))
            st = TrialState[row["state"]]
            self.study.add_trial(optuna.trial.create_trial(
                state=st, params=params, distributions=self.enc.distributions,
                values=row["values"] if st == TrialState.COMPLETE else None,
                system_attrs=row["system_attrs"], user_attrs=row["user_attrs"]))
        self.values = {h: list(v) for h, v in state["values"].items()}
        self.rng = rng_from_state(state["rng"])
        self.n_fallbacks = int(state.get("n_fallbacks", 0))
        self._batch, self._dups = [], {}


def _is_optimizer_key(key: str) -> bool:
    return key.startswith("cma") and "optimizer" in key


class TPEOptions(OptunaOptions):
    n_startup_trials: int = Field(10, ge=0, le=100_000, description="random trials before the model is used")
    multivariate: bool = True


class TPESearcher(OptunaSearcher):
    """Tree-structured Parzen estimator (multivariate, constant liar for batches).
    Options: ``n_startup_trials`` (10), ``multivariate`` (true), ``max_rejects``."""

    name = "tpe"
    Options = TPEOptions

    def make_sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        o = self.opts
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=o.n_startup_trials,
                                          multivariate=o.multivariate, constant_liar=True)


class GPOptions(OptunaOptions):
    n_startup_trials: int = Field(10, ge=0, le=100_000, description="random trials before the model is used")


class GPSearcher(OptunaSearcher):
    """Gaussian-process Bayesian optimisation (Optuna's GPSampler; needs PyTorch).
    Options: ``n_startup_trials`` (10)."""

    name = "gp"
    Options = GPOptions

    @classmethod
    def check_available(cls) -> None:
        if importlib.util.find_spec("torch") is None:
            raise GraphtuneError("search method `gp` needs PyTorch (Optuna's GPSampler): install it with "
                                 "`pip install 'graphtune[gp]'` (or `pip install torch`), or choose `tpe`")

    def make_sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=self.opts.n_startup_trials,
                                         deterministic_objective=False)


class CmaEsOptions(OptunaOptions):
    popsize: int | None = Field(None, ge=2, le=100_000, description="population size (default 4 + 3 ln(dim))")
    n_startup_trials: int = Field(0, ge=0, le=100_000, description="random trials before CMA-ES starts")


class CmaEsSearcher(OptunaSearcher):
    """CMA-ES on the continuous [0, 1] encoding (needs the ``cmaes`` package).
    Options: ``popsize`` (CMA-ES default 4 + 3 ln(dim)), ``n_startup_trials`` (0)."""

    name = "cmaes"
    Options = CmaEsOptions
    continuous = True

    @classmethod
    def check_available(cls) -> None:
        if importlib.util.find_spec("cmaes") is None:
            raise GraphtuneError("search method `cmaes` needs the `cmaes` package: install it with "
                                 "`pip install 'graphtune[cmaes]'` (or `pip install cmaes`), or choose `tpe`")

    def make_sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        o = self.opts
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=o.n_startup_trials, popsize=o.popsize,
                                            independent_sampler=optuna.samplers.RandomSampler(seed=seed),
                                            warn_independent_sampling=False)


class QMCOptions(OptunaOptions):
    qmc_type: Literal["sobol", "halton"] = "sobol"


class QMCSearcher(OptunaSearcher):
    """Scrambled Sobol' sequence over the continuous encoding (space filling, no model).
    Options: ``qmc_type`` ("sobol" or "halton")."""

    name = "qmc"
    Options = QMCOptions
    continuous = True

    def make_sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        # the sequence's scrambling must keep one seed for the whole study; only the
        # random sampler of the very first trial takes the per-ask seed
        return optuna.samplers.QMCSampler(qmc_type=self.opts.qmc_type, scramble=True,
                                          seed=derived_seed(self.ctx.seed, 0x51C),
                                          independent_sampler=optuna.samplers.RandomSampler(seed=seed),
                                          warn_independent_sampling=False, warn_asynchronous_seeding=False)


_HAS_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")


def _nsga2_constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    return [float(trial.user_attrs.get("violation", 0.0))]


class NSGA2Options(OptunaOptions):
    population_size: int = Field(16, ge=2, le=100_000, description="NSGA-II population per generation")


class NSGA2Searcher(OptunaSearcher):
    """NSGA-II on two objectives: reward up, cost (budget units) down; infeasible graphs
    are constraint violations. Options: ``population_size`` (16)."""

    name = "nsga2"
    Options = NSGA2Options
    multi_objective = True

    def make_sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        extra = {} if _HAS_SET_CONSTRAINT else {"constraints_func": _nsga2_constraints}
        return optuna.samplers.NSGAIISampler(seed=seed,
                                             population_size=self.opts.population_size,
                                             **extra)


__all__ = ["CmaEsSearcher", "GPSearcher", "GraphEncoding", "NSGA2Searcher", "OptunaSearcher", "PipelineEncoding",
           "QMCSearcher", "TPESearcher", "encoding", "violation"]
