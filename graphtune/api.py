"""Python API: build the pieces a spec describes and run or continue a study.

The CLI is a thin layer over these functions; nothing here imports the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from graphtune.envs.base import Environment
from graphtune.errors import SpecError
from graphtune.graphs.cost import CostModel, TaskShape
from graphtune.graphs.space import check_space_not_empty
from graphtune.search.base import Objective, SearchContext, Searcher
from graphtune.spec import Spec

#: spec fields that may change when a stored study is continued
SAFE_TO_CHANGE = {("search", "evaluations"), ("storage",)}


@dataclass
class Problem:
    """Everything built from a spec: environment, costing, search context."""

    spec: Spec
    env: Environment
    costs: CostModel
    ctx: SearchContext
    test_ids: list[str]


def task_shape(spec: Spec) -> TaskShape:
    from graphtune.envs.simulated import load_profile

    prof = load_profile(spec.task.profile)
    a = spec.task.input_tokens or prof.input_tokens
    b = spec.task.output_tokens or prof.output_tokens
    return TaskShape(a, b)


def build_problem(spec: Spec) -> Problem:
    """Resolve a spec into an environment and a search context; raises a one-line error
    for an unknown model, an impossible budget or an empty space."""
    from graphtune.envs.simulated import SimulatedEnvironment

    shape = task_shape(spec)
    costs = CostModel(spec.pool(), shape)
    space = spec.space_obj()
    budget = spec.budget.budget()
    check_space_not_empty(space, costs, budget)
    env = SimulatedEnvironment(spec.task.profile, costs, seed=spec.env.seed, dev_size=spec.task.dev_size,
                               test_size=spec.task.test_size)
    obj = Objective(cost_weight=spec.objective.cost_weight, latency_weight=spec.objective.latency_weight,
                    usd_weight=spec.objective.usd_weight)
    dev = tuple(env.split("dev"))
    ctx = SearchContext(space=space, costs=costs, budget=budget, objective=obj, dev_ids=dev,
                        seed=spec.search.seed, batch_size=spec.search.batch_size,
                        budget_runs=spec.search.evaluations * len(dev), options=dict(spec.search.options),
                        task_description=spec.task.description or env.describe(),
                        agent=spec.search.agent.model_dump())
    return Problem(spec=spec, env=env, costs=costs, ctx=ctx, test_ids=env.split("test"))


def make_searcher(spec: Spec, ctx: SearchContext) -> Searcher:
    from graphtune.search.registry import searcher_class

    return searcher_class(spec.search.method)(ctx)


def spec_changes(old: Mapping[str, Any], new: Mapping[str, Any], prefix: tuple = ()) -> list[tuple]:
    """Dotted paths whose values differ between two resolved specs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += spec_changes(a, b, prefix + (k,))
        elif a != b:
            out.append(prefix + (k,))
    return out


def optimize(spec: Spec, *, force: bool = False, progress=None):
    """Run the study ``spec.study`` in ``spec.storage``, continuing it if it exists.

    Returns ``(problem, study, outcome)``. A stored study whose spec differs in anything
    but the number of evaluations is refused unless ``force``.
    """
    from graphtune.search.loop import run_search
    from graphtune.store.storage import Storage

    problem = build_problem(spec)
    storage = Storage(spec.storage)
    study = storage.get_study(spec.study)
    resolved = spec.resolved()
    if study is None:
        study = storage.create_study(spec.study, spec.search.method, resolved)
    else:
        changed = [c for c in spec_changes(study.spec, resolved) if c not in SAFE_TO_CHANGE]
        if changed and not force:
            names = ", ".join(".".join(c) for c in changed[:5])
            raise SpecError(f"study {spec.study!r} exists with a different spec ({names} changed); "
                            "use another --study name, or --force to continue it anyway")
        if changed or spec_changes(study.spec, resolved):
            storage.update_study_spec(study.id, resolved)
    searcher = make_searcher(spec, problem.ctx)
    try:
        outcome = run_search(searcher, problem.env, storage, study, problem.ctx,
                             budget_runs=problem.ctx.budget_runs, test_ids=problem.test_ids, progress=progress)
    finally:
        searcher.close()
        problem.env.close()
    return problem, storage.get_study(spec.study), outcome
