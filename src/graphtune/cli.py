"""The ``graphtune`` command line (typer + rich).

Start-up stays fast: every heavy import (numpy, SQLAlchemy, pydantic, the simulator,
litellm...) happens inside the command that needs it.
"""

from __future__ import annotations

import enum
import math
import os
import sys
from pathlib import Path
from typing import Optional

import typer

try:  # typer >= 0.20 ships its own copy of click
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - older typer uses click itself
    import click.exceptions as _click_errors
from typer.core import TyperGroup


class _OneLineUsageErrors(TyperGroup):
    """A usage error (unknown flag, bad value, missing argument) is one line naming the
    flag, exit code 2, like every other bad input; no usage box."""

    def make_context(self, *args, **kwargs):
        with _one_line_usage():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_usage():
            return super().invoke(ctx)


class _one_line_usage:
    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if not isinstance(e, _click_errors.ClickException) or isinstance(e, _click_errors.NoArgsIsHelpError):
            return False
        ctx = getattr(e, "ctx", None)
        hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
        msg = " ".join(e.format_message().split()).rstrip(".")
        typer.echo(f"error: {msg}{hint}", err=True)
        raise typer.Exit(e.exit_code)


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  cls=_OneLineUsageErrors,
                  help="Find the compute-optimal multi-LLM collaboration graph for a task.")

_state = {"debug": False}


def _console():
    from rich.console import Console

    # graphs render with [brackets]: never let rich read them as markup
    return Console(markup=False, highlight=False)


def _fail(e: Exception) -> None:
    from graphtune.errors import GraphtuneError

    if _state["debug"]:
        raise e
    code = e.exit_code if isinstance(e, GraphtuneError) else 1
    msg = str(e) if isinstance(e, GraphtuneError) else f"internal error: {type(e).__name__}: {e} (rerun with --debug)"
    typer.echo(f"error: {_safe_line(msg)}", err=True)
    raise typer.Exit(code)


def _safe_line(msg: str) -> str:
    """One line, without any secret value a spec of this process referred to."""
    api = sys.modules.get("graphtune.api")
    if api is not None:
        msg = api.redact(msg)
    return " ".join(msg.split())


def _url(url: str) -> str:
    """A storage URL as it may be shown (password masked)."""
    from graphtune.store.storage import mask_url

    return mask_url(url)


def _guard(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted; finished trials are stored, rerun the same command to continue", err=True)
            raise typer.Exit(130)
        except Exception as e:  # translated once, here
            _fail(e)

    return wrapper


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    _state["debug"] = debug
    _one_line_warnings()


def _one_line_warnings() -> None:
    """Print graphtune's own warnings as one ``warning:`` line on stderr (others as Python does)."""
    import warnings

    from graphtune.errors import GraphtuneWarning

    shown = getattr(warnings.showwarning, "__graphtune__", None)
    original = shown or warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, GraphtuneWarning):
            typer.echo(f"warning: {_safe_line(str(message))}", err=True)
        else:
            original(message, category, filename, lineno, file, line)

    show.__graphtune__ = original
    warnings.showwarning = show


def _is_replay(spec: dict | None) -> bool:
    return ((spec or {}).get("env") or {}).get("kind") == "replay"


def _modelled(metrics: dict | None) -> str:
    """A replay score's modelled share, to show next to it: how much of it rests on
    outcomes the records did not hold (docs/replay.md)."""
    m = metrics or {}
    if "n_modelled" not in m:
        return "modelled share not stored"
    if not m.get("n_scored"):
        return "-"
    k, n = m["n_modelled"], m["n_scored"]
    return "all recorded" if k == 0 else f"{k / n:.0%} modelled"


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


# -- init ------------------------------------------------------------------------------


@app.command()
@_guard
def init(path: Path = typer.Argument(Path("graphtune.yaml"), help="where to write the example spec"),
         force: bool = typer.Option(False, "--force", help="overwrite an existing file")) -> None:
    """Write a commented example spec."""
    from importlib.resources import files

    from graphtune.errors import SpecError

    if path.exists() and not force:
        raise SpecError(f"{path} exists; pass --force to overwrite it or choose another path")
    import re

    text = files("graphtune").joinpath("templates/example.yaml").read_text()
    # the study is named after the file, so a first own spec does not continue the quickstart's study
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).strip("-.") or "study"
    text, n = re.subn(r"(?m)^study: .*$", f"study: {name}", text, count=1)
    if n != 1:
        raise SpecError("the example spec has no `study:` line (a packaging error); reinstall graphtune")
    path.write_text(text)
    typer.echo(f"wrote {path}; next: graphtune validate {path} && graphtune optimize {path}")


# -- validate --------------------------------------------------------------------------


@app.command()
@_guard
def validate(spec_path: Path = typer.Argument(..., metavar="SPEC"),
             max_enumerate: int = typer.Option(3000, help="enumerate at most this many graphs to size the space"),
             check_endpoints: bool = typer.Option(False, "--check-endpoints",
                                                  help="live env: check every model's api_key_env variable and make "
                                                       "one cheap call per model (1 completion token)"),
             full: bool = typer.Option(False, "--full", help="also print the whole resolved spec (every default)"))\
        -> None:
    """Check a spec; print what it searches (models, roles, space size, cost range, budget),
    the models that can never fit the budget, and with --full the whole resolved spec."""
    import yaml

    from graphtune.api import build_problem, make_searcher
    from graphtune.spec import load_spec

    spec = load_spec(spec_path)
    problem = build_problem(spec)
    try:  # the searcher too: what `validate` accepts, `optimize` can start
        make_searcher(spec, problem.ctx).close()
    finally:
        problem.env.close()  # validate runs nothing (a live env has started nothing yet)
    con = _console()
    missing = [(m.name, m.api_key_env) for m in spec.models
               if getattr(m, "api_key_env", None) and not os.environ.get(m.api_key_env)]
    if missing and spec.env.kind == "live" and not check_endpoints:  # the check reports every model
        from graphtune.errors import EnvError

        name, var = missing[0]
        more = f" (and {len(missing) - 1} more models)" if len(missing) > 1 else ""
        raise EnvError(f"{spec_path}: model {name!r}: environment variable {var} (api_key_env) is not set{more}; "
                       f"export {var}=<your key> before running a search")
    con.print(f"{spec_path}: valid")
    ctx = problem.ctx
    if full:
        shown = spec.resolved()
        shown["storage"] = _url(spec.storage)
        con.print(yaml.safe_dump(shown, sort_keys=False).rstrip())
    else:
        con.print(f"study {spec.study} in {_url(spec.storage)}; env {spec.env.kind}; method {spec.search.method}, "
                  f"{spec.search.evaluations} evaluations, batch {spec.search.batch_size}, seed {spec.search.seed}",
                  soft_wrap=True, markup=False)
        if not hasattr(ctx.space, "stages"):
            con.print(f"models: {', '.join(m.name for m in spec.models)}; roles: {', '.join(ctx.space.roles)}; "
                      f"at most {ctx.space.max_nodes} nodes, depth {ctx.space.max_depth}"
                      + (f" ({ctx.space.note})" if ctx.space.note else ""), soft_wrap=True, markup=False)
            con.print(f"budget per query: {_budget_text(ctx.budget)}  (--full prints the whole resolved spec)",
                      soft_wrap=True, markup=False)
    if hasattr(ctx.space, "stages"):
        _validate_pipeline(con, ctx, problem, full=full, max_enumerate=max_enumerate)
    else:
        _validate_graphs(con, ctx, problem, max_enumerate)
    if check_endpoints:
        from graphtune.api import check_endpoints as check

        results = check(spec)
        for name, ok, detail in results:
            con.print(f"endpoint {name}: {'ok' if ok else 'failed'}: {detail}", soft_wrap=True, markup=False)
        bad = [name for name, ok, _ in results if not ok]
        if bad:
            from graphtune.errors import EnvError

            raise EnvError(f"{len(bad)} of {len(results)} endpoints failed the check ({', '.join(bad)}); fix them "
                           "before running a search")


def _cost_table(con, costs: list, how: str) -> None:
    from rich.table import Table

    t = Table(title=f"cost per query, {how}")
    for col in ("", "min", "max"):
        t.add_column(col)
    for name, key, f in (("units", "units", ".2f"), ("FLOPs", "flops", ".3g"), ("USD / query", "usd", ".2e"),
                         ("latency s", "latency_s", ".2f")):
        vals = [getattr(c, key) for c in costs]
        t.add_row(name, format(min(vals), f), format(max(vals), f))
    con.print(t)


def _validate_graphs(con, ctx, problem, max_enumerate: int) -> None:
    import numpy as np

    from graphtune.graphs.space import SpaceTooLarge, enumerate_graphs, random_graph

    for warn in _never_fit(ctx):
        con.print(f"warning: {warn}", soft_wrap=True, markup=False)
    try:
        graphs = enumerate_graphs(ctx.space, ctx.costs, ctx.budget, limit=max_enumerate)
        size = f"{len(graphs)} graphs (exact, up to isomorphism)"
        costs = [ctx.costs.cost(g) for g in graphs]
        how = "over all graphs"
    except SpaceTooLarge:
        size = f"more than {max_enumerate} graphs (up to isomorphism)"
        rng = np.random.default_rng(0)
        costs = [ctx.costs.cost(random_graph(ctx.space, ctx.costs, ctx.budget, rng)) for _ in range(500)]
        how = "over 500 random graphs (the space is too large to enumerate)"
    con.print(f"space: {size}")
    _cost_table(con, costs, how)
    con.print(f"dev questions: {len(ctx.dev_ids)}, test questions: {len(problem.test_ids)}, "
              f"search budget: {ctx.budget_runs} graph-question runs")


def _validate_pipeline(con, ctx, problem, *, full: bool, max_enumerate: int) -> None:
    """``validate`` of a multi-stage spec: per stage its models, roles, limits, cap and
    graph count, the models that can never fit; the cost range of random pipelines."""
    import numpy as np

    from graphtune.errors import GraphError
    from graphtune.graphs.design import random_design, stage_budget
    from graphtune.graphs.model import ASSISTANT, Graph, Node
    from graphtune.graphs.space import SpaceTooLarge, enumerate_graphs
    from graphtune.graphs.space import validate as check

    sizes = []
    for st in ctx.space.stages:
        sp, cm = st.space, ctx.costs.of(st.name)
        room = stage_budget(ctx.space, ctx.costs, ctx.budget, st.name)  # the others at their cheapest
        cap = ctx.budget.cap(st.name)
        if not full:
            con.print(f"stage {st.name} (<- {', '.join(st.inputs)}): models {', '.join(sp.models)}; roles "
                      f"{', '.join(sp.roles)}; at most {sp.max_nodes} nodes, depth {sp.max_depth}"
                      + (f"; cap {_budget_text(cap)}" if cap is not None else ""), soft_wrap=True, markup=False)
        for m in sp.models:
            try:
                check(Graph((Node("n0", ASSISTANT, m),), ()), sp, cm, room)
            except GraphError as e:
                con.print(f"warning: stage {st.name!r}: model {m!r} can never be used there: a single call, with "
                          f"the other stages at their cheapest, breaks the budget ({e})", soft_wrap=True, markup=False)
        try:
            n = len(enumerate_graphs(sp, cm, room, limit=max_enumerate))
            sizes.append(f"{st.name} {n}")
        except SpaceTooLarge:
            sizes.append(f"{st.name} more than {max_enumerate}")
    if not full:
        con.print(f"budget per query, whole pipeline: {_budget_text(ctx.budget.total)}  (--full prints the whole "
                  "resolved spec)", soft_wrap=True, markup=False)
    con.print(f"space: graphs per stage (up to isomorphism, the other stages at their cheapest): {', '.join(sizes)}",
              soft_wrap=True, markup=False)
    rng = np.random.default_rng(0)
    costs = [ctx.costs.cost(random_design(ctx.space, ctx.costs, ctx.budget, rng)).total for _ in range(200)]
    _cost_table(con, costs, "over 200 random pipelines")
    con.print(f"dev questions: {len(ctx.dev_ids)}, test questions: {len(problem.test_ids)}, "
              f"search budget: {ctx.budget_runs} pipeline-question runs")


def _budget_text(budget) -> str:
    parts = [f"{k} <= {v:g}" for k, v in (("units", budget.units), ("FLOPs", budget.flops),
                                          ("USD", budget.usd), ("latency s", budget.latency_s))
             if v is not None]
    return ", ".join(parts) or "none"


def _never_fit(ctx) -> list[str]:
    """Pool models whose single call already breaks the budget: no graph can use them."""
    from graphtune.errors import GraphError
    from graphtune.graphs.model import ASSISTANT, Graph, Node
    from graphtune.graphs.space import validate as check

    out = []
    for m in ctx.space.models:
        g = Graph((Node("n0", ASSISTANT, m),), ())
        try:
            check(g, ctx.space, ctx.costs, ctx.budget)
        except GraphError as e:
            out.append(f"model {m!r} can never be used: a single call breaks the budget ({e}); drop it from "
                       "space.models or raise the budget")
    return out


# -- optimize --------------------------------------------------------------------------


@app.command()
@_guard
def optimize(spec_path: Path = typer.Argument(..., metavar="SPEC"),
             study: Optional[str] = typer.Option(None, "--study", help="study name (default: the spec's `study`)"),
             storage: Optional[str] = typer.Option(None, "--storage", help="SQLAlchemy URL (default: the spec's)"),
             evaluations: Optional[int] = typer.Option(None, "--evaluations", "-n", min=1,
                                                       help="search budget in full-dev graph evaluations"),
             method: Optional[str] = typer.Option(None, "--method", help="search method"),
             seed: Optional[int] = typer.Option(None, "--seed"),
             force: bool = typer.Option(False, "--force", help="continue a study whose spec changed"),
             take_over: bool = typer.Option(False, "--take-over",
                                            help="declare every other process running this study dead (its "
                                                 "claimed trials are taken over at once instead of after 60 s "
                                                 "without a heartbeat); never use it on a live one"),
             no_cache: bool = typer.Option(False, "--no-cache",
                                           help="live env: make every LLM call again instead of serving identical "
                                                "calls from the call ledger (calls are still recorded)"),
             quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar")) -> None:
    """Run a search (or continue the stored study of the same name) and print the best graph."""
    from graphtune.api import optimize as run
    from graphtune.spec import load_spec, without_cache

    spec = load_spec(spec_path, overrides={"study": study, "storage": storage, "search.evaluations": evaluations,
                                           "search.method": method, "search.seed": seed},
                     flags={"study": "--study", "storage": "--storage", "search.evaluations": "--evaluations",
                            "search.method": "--method", "search.seed": "--seed"})
    if no_cache:  # a live env's field: the other kinds have no call cache
        spec = without_cache(spec)
    from graphtune.store.storage import require_persistent

    require_persistent(spec.storage, "optimize")  # before the progress bar: one line
    con = _console()
    if quiet:
        problem, st, out = run(spec, force=force, take_over=take_over)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("runs  best {task.fields[best]}"), TimeElapsedColumn(), console=con,
                      transient=False) as bar:
            task = bar.add_task(f"{spec.study} ({spec.search.method})", total=None, best="-")

            def progress(ev: dict) -> None:
                best = ev["best_full_dev"]
                bar.update(task, total=ev["budget_runs"], completed=min(ev["runs_spent"], ev["budget_runs"]),
                           best="-" if best == float("-inf") else f"{best:.3f}")

            problem, st, out = run(spec, force=force, progress=progress, take_over=take_over)
    _print_outcome(con, spec, problem, st, out)


def _shape(g) -> str:
    """A design's size: a graph's nodes, width and depth; a pipeline's stages and nodes."""
    if hasattr(g, "stages"):
        return f"{len(g.stages)} stages, {g.size} nodes (" + ", ".join(f"{s.name} {s.graph.size}" for s in g.stages) + ")"
    return f"{g.size} nodes, width {g.width}, depth {g.depth}"


def _stage_lines(cost, results, split: str) -> list[str]:
    """One line per stage of a pipeline: its cost per query and, from ``results``, how often
    its answer was right and how often it lost the pipeline's answer."""
    from graphtune.graphs.results import summarize_stages

    summ = {s.stage: s for s in summarize_stages(results)}
    out = []
    for name, c in cost.stages:
        s = summ.get(name)
        acc = (f"; {split} stage accuracy {_fmt(s.accuracy)} (n={s.n_scored}), lost {s.n_lost}"
               if s is not None and s.n_scored else "")
        out.append(f"  stage {name:<9} {c.units:.2f} units, ${c.usd:.6f}, {c.latency_s:.2f} s{acc}")
    return out


def _print_outcome(con, spec, problem, st, out) -> None:
    from rich.panel import Panel
    from rich.text import Text

    from graphtune.envs.base import summarize
    from graphtune.graphs.render import to_text

    if out.best is None:
        con.print("no graph was evaluated successfully; see `graphtune trials " + spec.study + "`")
        raise SystemExit(1)
    g = out.best.graph
    cost = problem.costs.cost(g)
    c = getattr(cost, "total", cost)  # a pipeline's cost: its total, with the stages' beside it
    lo, hi = out.best.ci95()
    test = summarize(out.test_results) if out.test_results else None
    replay = spec.env.kind == "replay"
    dev_note = f"; {_modelled(out.best_trial.metrics if out.best_trial else None)}" if replay else ""
    test_note = f"; {_modelled(test.as_dict() if test else None)}" if replay else ""
    lines = [
        f"best graph      {to_text(g)}",
        f"                {_shape(g)}; trial #{out.best.best_trial}",
        f"dev reward      {out.best.mean:.3f}  (95% CI {lo:.3f}-{hi:.3f}, n={out.best.n}{dev_note})",
        f"test accuracy   {_fmt(test.accuracy if test else None)}  (n={test.n_scored if test else 0}, held out"
        f"{test_note})",
        f"cost / query    {c.units:.2f} units, {c.flops:.3g} FLOPs, ${c.usd:.6f}, {c.latency_s:.2f} s latency",
        f"search          {out.n_trials} trials, {out.runs_spent} graph-question runs "
        f"({out.runs_spent / max(1, len(problem.ctx.dev_ids)):.1f} x dev set), stopped: {out.stopped}",
        f"study           {spec.study} in {_url(spec.storage)}",
    ]
    if hasattr(cost, "stages"):
        lines[6:6] = _stage_lines(cost, out.test_results or (), "test")
    if test and test.n_errors:
        lines.append(f"infrastructure  {test.n_errors} test questions failed to run (excluded from accuracy, not "
                     "scored wrong); see `graphtune trials`")
    excluded = getattr(out, "excluded", None) or {}
    if excluded:
        per = ", ".join(f"{m} {n}" for m, n in excluded.items())
        lines.append(f"excluded        {sum(excluded.values())} question runs (infrastructure failures: {per}); "
                     "not scored wrong")
    if replay and any(r.modelled for r in out.test_results):
        lines.append("modelled        outcomes the records do not hold, modelled with the simulator's rules "
                     "(docs/replay.md); env.recorded_only: true searches fully recorded graphs only")
    con.print(Panel(Text("\n".join(lines)), title="graphtune result", expand=False))
    url = _url(spec.storage)
    con.print(f"next: graphtune show {spec.study} --storage {url}")
    con.print(f"      graphtune export {spec.study} --format langgraph -o {spec.study}_graph.py --storage {url}")
    con.print(f"      graphtune report {spec.study} -o {spec.study}_report.html --storage {url}")


# -- run -------------------------------------------------------------------------------


@app.command("run")
@_guard
def run_cmd(graph_path: Path = typer.Argument(..., metavar="GRAPH", help="a graph or pipeline file (YAML or JSON, "
                                                                          "as `graphtune export` writes)"),
            spec_path: Path = typer.Option(..., "--spec", help="a spec with `env: {kind: live}` (models, prompts)"),
            question: Optional[str] = typer.Option(None, "--question", help="run on this question text"),
            dataset: Optional[str] = typer.Option(None, "--dataset",
                                                  help="run on every example of this file (the spec's task.fields, "
                                                       "preset and scorer apply) and print accuracy"),
            limit: Optional[int] = typer.Option(None, "--limit", min=1, help="with --dataset: the first N examples"),
            storage: Optional[str] = typer.Option(None, "--storage", help="store of the call ledger (default: the "
                                                                           "spec's)"),
            no_cache: bool = typer.Option(False, "--no-cache", help="make every call again (ignore the ledger)"),
            nodes: bool = typer.Option(False, "--nodes", help="with --question: print every node's output (and, for "
                                                              "a pipeline, each stage's question and answer)")) -> None:
    """Execute one graph or multi-stage pipeline on live endpoints; print the answer, its cost and latency."""
    from graphtune.api import redact, run_graph
    from graphtune.envs.base import summarize
    from graphtune.graphs.io import load
    from graphtune.graphs.render import to_text
    from graphtune.spec import load_spec, without_cache

    spec = load_spec(spec_path, overrides={"storage": storage}, flags={"storage": "--storage"})
    if no_cache:
        spec = without_cache(spec)
    graph = load(graph_path)
    out = run_graph(spec, graph, question=question, dataset=dataset, limit=limit)
    con = _console()
    pipeline = getattr(graph, "stages", None) is not None
    if pipeline:
        con.print("pipeline  " + to_text(graph).replace("\n", "\n          "))
    else:
        con.print(f"graph     {to_text(graph)}")
    calls = f"{out.calls['made']} made, {out.calls['cached'] + out.calls['shared']} served from the ledger"
    if out.node_runs is not None:
        r = out.results[0]
        if nodes and pipeline:
            _print_stage_runs(con, out.stage_runs)
        elif nodes:
            for nid in graph.topo_order:
                n, nr = graph.node_map[nid], out.node_runs[nid]
                tag = " (ledger)" if nr.cached else ""
                head = f"[{nid}] {n.role} {n.model}: {nr.prompt_tokens}+{nr.completion_tokens} tokens, " \
                       f"{nr.latency_s:.2f} s{tag}"
                con.print(head)
                con.print("    " + redact(nr.text or f"error: {nr.error}").strip().replace("\n", "\n    "))
        if r.error:
            con.print(f"error     {redact(r.error)}")
        else:
            con.print("answer    " + redact(r.answer or "").strip().replace("\n", "\n          "))
        con.print(f"cost      {r.prompt_tokens} prompt + {r.completion_tokens} completion tokens, "
                  f"{r.flops:.3g} FLOPs, ${r.usd:.6f}")
        con.print(f"latency   {r.latency_s:.2f} s (critical path)")
        con.print(f"calls     {calls}")
        if r.error:
            raise typer.Exit(1)
        return
    m = summarize(out.results)
    con.print(f"accuracy  {_fmt(m.accuracy)} on {m.n_scored} scored of {m.n} questions "
              f"({m.n_errors} infrastructure failures)")
    if pipeline:
        from graphtune.graphs.results import summarize_stages

        for st in summarize_stages(out.results):
            acc = f"accuracy {_fmt(st.accuracy)}, " if st.n_scored else ""
            con.print(f"  stage {st.stage:<9} {acc}{st.mean_tokens:.0f} tokens, {_fmt(st.mean_flops, '.3g')} FLOPs, "
                      f"${_fmt(st.mean_usd, '.6f')}, {_fmt(st.mean_latency_s, '.2f')} s per query")
    con.print(f"per query {_fmt(m.mean_flops, '.3g')} FLOPs, ${_fmt(m.mean_usd, '.6f')}, "
              f"{_fmt(m.mean_latency_s, '.2f')} s latency (critical path); "
              f"{m.prompt_tokens} prompt + {m.completion_tokens} completion tokens in all")
    con.print(f"calls     {calls}")
    errs = [r.error for r in out.results if r.error]
    if errs:
        con.print(f"first failure: {redact(errs[0])}")


def _print_stage_runs(con, stage_runs) -> None:
    """``graphtune run PIPELINE --nodes``: per stage, the text its graph ran on, every
    node's output and the stage's answer."""
    from graphtune.api import redact

    def block(text: str) -> str:
        return "    " + redact(text).strip().replace("\n", "\n    ")

    for sr in stage_runs:
        con.print(f"== stage {sr.stage}: {sr.latency_s:.2f} s")
        con.print("  question:")
        con.print(block(sr.text))
        for nid in sr.graph.topo_order:
            n, nr = sr.graph.node_map[nid], sr.runs.get(nid)
            if nr is None:
                continue
            tag = " (ledger)" if nr.cached else ""
            con.print(f"  [{sr.stage}/{nid}] {n.role} {n.model}: {nr.prompt_tokens}+{nr.completion_tokens} tokens, "
                      f"{nr.latency_s:.2f} s{tag}")
            con.print(block(nr.text or f"error: {nr.error}"))
        if sr.error is None:
            con.print(f"  stage answer ({sr.stage}):")
            con.print(block(sr.answer or ""))


# -- studies / trials / show -----------------------------------------------------------


def _storage(url: str, *, readonly: bool = False):
    """Open an existing store (a missing SQLite file is an error, not a new empty store);
    ``readonly`` for commands that only read (they work on a store the user may not write)."""
    from graphtune.errors import StoreError
    from graphtune.store.storage import Storage

    if url.startswith("sqlite") and "///" in url:
        path = url.split("///", 1)[1]
        if path and path != ":memory:" and not Path(path).exists():
            raise StoreError(f"no store at {path}; run `graphtune optimize SPEC` first or pass --storage")
    return Storage(url, readonly=readonly)


def _study(store, name: str):
    from graphtune.errors import StoreError

    st = store.get_study(name)
    if st is None:
        known = [s.name for s in store.list_studies()]
        raise StoreError(f"no study named {name!r} in {_url(store.url)}; known studies: {known or 'none'}")
    return st


STORAGE_OPT = typer.Option("sqlite:///graphtune.db", "--storage", help="SQLAlchemy URL of the store")


class Format(str, enum.Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


FORMAT_OPT = typer.Option(Format.table, "--format", "-f", help="output as a table, json or yaml (as Optuna's CLI)")


@app.command()
@_guard
def studies(storage: str = STORAGE_OPT, fmt: Format = FORMAT_OPT) -> None:
    """List the studies of a store."""
    store = _storage(storage, readonly=True)
    rows = [{"name": s.name, "method": s.method, "status": s.status, "trials": s.n_trials, "runs_spent": s.runs_spent,
             "created": str(s.created_at)[:19]} for s in store.list_studies()]
    if _print_records(rows, fmt):
        return
    # plain aligned columns: no word is ever broken at the terminal's width (a long line wraps whole)
    typer.echo("\n".join([f"studies in {_url(storage)} ({len(rows)})"] + _columns(
        ("name", "method", "status", "trials", "runs spent", "created"),
        [(r["name"], r["method"], r["status"], str(r["trials"]), str(r["runs_spent"]), r["created"]) for r in rows],
        right=(3, 4))))


def _columns(head: tuple[str, ...], cells: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> list[str]:
    """Rows of plain text columns aligned by padding; the last column is not padded."""
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(head[:-1])]
    return ["  ".join([x.rjust(w) if i in right else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths))]
                      + [c[-1]]) for c in [head, *cells]]


def _print_records(rows: list[dict], fmt: Format) -> bool:
    """Print ``rows`` as JSON or YAML (True), or leave the table to the caller (False)."""
    if fmt == Format.table:
        return False
    if fmt == Format.json:
        import json

        typer.echo(json.dumps(rows, indent=1, default=str))
    else:
        import yaml

        typer.echo(yaml.safe_dump(rows, sort_keys=False, allow_unicode=True).rstrip())
    return True


@app.command()
@_guard
def trials(study: str = typer.Argument(...), storage: str = STORAGE_OPT,
           split: Optional[str] = typer.Option(None, help="dev or test"),
           top: Optional[int] = typer.Option(None, help="only the N best dev trials, ranked as the recommendation "
                                                        "ranks graphs: scores resting on at least half the questions "
                                                        "of the best-covered trial first, then by reward"),
           fmt: Format = FORMAT_OPT) -> None:
    """List the trials of a study; `n` is the number of questions a score rests on, `*`
    marks the recommended graph's trial."""
    from graphtune.graphs.io import from_dict
    from graphtune.graphs.render import short_labels, to_short

    store = _storage(storage, readonly=True)
    st = _study(store, study)
    replay = _is_replay(st.spec)
    rows = store.list_trials(st.id, split=split)
    graphs = {r.number: from_dict(r.graph) for r in rows if r.status != "failed"}
    # one label per model across the listing, unique within the study's models
    labels = short_labels(m for g in graphs.values() for m in g.model_counts())  # a graph's or a pipeline's
    tests = [t for t in store.list_trials(st.id, split="test") if t.status == "complete" and t.parents]
    rec = tests[-1].parents[0] if tests else None
    if top:
        dev = [r for r in rows if r.split == "dev" and r.reward is not None and math.isfinite(r.reward)] \
            if split != "test" else [r for r in rows if r.reward is not None]
        most = max((len(r.question_ids) for r in dev), default=0)
        ranked = sorted(dev, key=lambda r: (len(r.question_ids) >= max(1, most // 2), r.reward,
                                            len(r.question_ids), -r.number), reverse=True)
        rows = ranked[:top] + [r for r in ranked[top:] if r.number == rec]  # the recommended one, always
    if _print_records([{"number": r.number, "split": r.split, "batch": r.batch, "slot": r.slot, "status": r.status,
                        "questions": len(r.question_ids), "reward": r.reward, "accuracy": r.accuracy,
                        "units": r.cost_units, "usd": r.usd, "latency_s": r.latency_s, "new_runs": r.new_runs,
                        "recommended": r.number == rec, "origin": r.origin, "error": r.error,
                        **({"modelled": _share_of(r.metrics)} if replay else {}),
                        "graph": to_short(graphs[r.number], labels) if r.status != "failed" else None} for r in rows], fmt):
        return
    # plain aligned columns, one line per trial: a rich Table takes seconds to lay out
    # thousands of rows (3 s for 1,000 trials, benchmarks/load_bench.py)
    head = ("#", "split", "status", "n", "reward", *(("modelled",) if replay else ()), "units", "graph")
    cells = [(str(r.number) + ("*" if r.number == rec else ""), r.split, r.status, str(len(r.question_ids)),
              _fmt(r.reward), *((_share(r.metrics),) if replay else ()), _fmt(r.cost_units, ".2f"),
              to_short(graphs[r.number], labels) if r.status != "failed" else (r.error or "")[:80]) for r in rows]
    lines = [f"trials of {study} ({len(rows)})" + ("; * = the recommended graph's trial" if rec is not None else "")
             + ("; modelled = the share of the score's outcomes the records do not hold" if replay else "")]
    typer.echo("\n".join(lines + _columns(head, cells, right=(0, 3, 4, 5, *((6,) if replay else ())))))


def _share_of(metrics: dict | None) -> float | None:
    """The fraction of a trial's scored outcomes that were modelled (None when not stored)."""
    m = metrics or {}
    return m["n_modelled"] / m["n_scored"] if "n_modelled" in m and m.get("n_scored") else None


def _share(metrics: dict | None) -> str:
    """The modelled share as a table cell: a percentage, or - when not stored."""
    share = _share_of(metrics)
    return "-" if share is None else f"{share:.0%}"


@app.command()
@_guard
def show(study: str = typer.Argument(...), trial: Optional[int] = typer.Argument(None),
         storage: str = STORAGE_OPT) -> None:
    """Show a study's best graph, or one trial: graph, metrics and cost."""
    from graphtune.errors import StoreError
    from graphtune.graphs.io import from_dict
    from graphtune.graphs.render import to_mermaid, to_text

    store = _storage(storage, readonly=True)
    st = _study(store, study)
    con = _console()

    def replay_note(trial) -> str:
        if not _is_replay(st.spec):
            return ""
        m = dict(trial.metrics or {})
        if "n_modelled" not in m:  # stored before the count was: count it from the trial's results
            scored = [r for r in store.trial_results(trial.id) if r.ok]
            m.update(n_scored=len(scored), n_modelled=sum(bool(r.modelled) for r in scored))
        return f", {_modelled(m)}"

    if trial is None:
        dev = [t for t in store.list_trials(st.id, split="dev") if t.status == "complete" and t.reward is not None]
        tests = store.list_trials(st.id, split="test")
        con.print(f"{st.name}: method {st.method}, status {st.status}, {len(dev)} finished dev trials, "
                  f"{st.runs_spent} graph-question runs spent")
        if not tests:
            con.print("no test evaluation yet (the search has not finished)")
            return
        t = tests[-1]
        best = store.get_trial(st.id, t.parents[0]) if t.parents else None
        g = from_dict(t.graph)
        con.print(f"{'best pipeline' if hasattr(g, 'stages') else 'best graph'}: {to_text(g)}")
        if best:
            con.print(f"dev: reward {_fmt(best.reward)}, accuracy {_fmt(best.accuracy)} on {len(best.question_ids)} "
                      f"questions{replay_note(best)} (trial #{best.number})")
        con.print(f"test: accuracy {_fmt(t.accuracy)} on {t.metrics.get('n_scored', 0)} questions"
                  f"{replay_note(t)} (trial #{t.number})")
        con.print(f"cost / query: {_fmt(t.cost_units, '.2f')} units, {_fmt(t.flops, '.3g')} FLOPs, "
                  f"${_fmt(t.usd, '.6f')}, {_fmt(t.latency_s, '.2f')} s")
        if hasattr(g, "stages"):
            _print_stages(con, store, g, best or t, test=t)
        con.print(to_mermaid(g))
        return
    t = store.get_trial(st.id, trial)
    if t is None:
        raise StoreError(f"study {study!r} has no trial #{trial}; list them with `graphtune trials {study}`")
    con.print(f"trial #{t.number} ({t.split}, {t.status}, origin {t.origin}, batch {t.batch})")
    if t.error:
        con.print(f"error: {t.error}")
    g = from_dict(t.graph)
    con.print(f"graph: {to_text(g)}  (hash {t.graph_hash})")
    con.print(to_mermaid(g))
    m = t.metrics
    con.print(f"reward {_fmt(t.reward)}, accuracy {_fmt(t.accuracy)} on {m.get('n_scored', 0)} scored of "
              f"{m.get('n', 0)} questions ({m.get('n_errors', 0)} infrastructure failures{replay_note(t)}), "
              f"{t.new_runs} runs paid")
    con.print(f"cost / query: {_fmt(t.cost_units, '.2f')} units, {_fmt(t.flops, '.3g')} FLOPs, ${_fmt(t.usd, '.6f')}, "
              f"{_fmt(t.latency_s, '.2f')} s")
    if hasattr(g, "stages"):
        _print_stages(con, store, g, t)
    if t.parents:
        con.print(f"parents: {t.parents}")
    if t.feedback:
        con.print(f"feedback: {t.feedback}")


def _print_stages(con, store, pipeline, trial, *, test=None) -> None:
    """A pipeline trial's stages, one line each: inputs, models, calls, cost per query (its
    share of the trial's units by FLOPs, dollars, latency), stage accuracy on the trial's
    questions and how many of the pipeline's wrong answers the stage lost first; with
    ``test`` (the held-out trial) its stage accuracy there too."""
    from graphtune.stages import stage_rows

    split = trial.split
    rows = stage_rows(pipeline, store.trial_results(trial.id), trial_units=trial.cost_units)
    tests = ({r.name: r for r in stage_rows(pipeline, store.trial_results(test.id), trial_units=test.cost_units)}
             if test is not None and test.id != trial.id else {})
    head = ("stage", "reads", "calls", "units", "USD / query", "latency s", f"{split} stage acc", "lost",
            *(("test stage acc",) if tests else ()), "models")
    cells = []
    for r in rows:
        tr = tests.get(r.name)
        cells.append((r.name, ",".join(r.inputs), str(r.calls), _fmt(r.units, ".2f"), _fmt(r.usd, ".6f"),
                      _fmt(r.latency_s, ".2f"),
                      f"{_fmt(r.accuracy)} (n={r.n_scored})" if r.n_scored else "-", str(r.n_lost) if r.n else "-",
                      *((f"{_fmt(tr.accuracy)} (n={tr.n_scored})" if tr is not None and tr.n_scored else "-",)
                        if tests else ()), r.models_text()))
    con.print(f"stages of trial #{trial.number} (stage accuracy: the stage's own answer right; lost: the pipeline's "
              "wrong answers this stage lost first):", soft_wrap=True)
    con.print("\n".join(_columns(head, cells, right=(2, 3, 4, 5, 7))), soft_wrap=True)


# -- export / pareto / report / compare ---------------------------------------------------


def _points(store, name: str, min_questions: Optional[int]):
    from graphtune.pareto import study_points

    return study_points(store, _study(store, name), min_questions=min_questions)


@app.command("export")
@_guard
def export_cmd(study: str = typer.Argument(..., metavar="NAME", help="study name"),
               select: str = typer.Option("best", "--select",
                                          help="best | pareto | #TRIAL | METRIC<=X (cost_usd, units, flops, "
                                               "latency_s, accuracy; also <, >=, >)"),
               fmt: str = typer.Option("yaml", "--format", "-f", help="yaml | json | langgraph | mermaid | png"),
               out: Path = typer.Option(..., "-o", "--output",
                                        help="output file (a folder when --select pareto picks several graphs)"),
               metric: str = typer.Option("units", "--metric", help="cost axis of the front: units, flops, "
                                                                     "cost_usd, latency_s"),
               min_questions: Optional[int] = typer.Option(None, "--min-questions", min=1,
                                                           help="graphs need this many dev questions (default: "
                                                                "half the best coverage)"),
               models: Optional[list[str]] = typer.Option(
                   None, "--models", metavar="NAME=LITELLM_STRING",
                   help="langgraph: send pool model NAME to this litellm model, e.g. "
                        "llama-3.2-1b=openai/gpt-4o-mini (repeatable; a simulated study's names have no endpoint)"),
               models_file: Optional[Path] = typer.Option(
                   None, "--models-file", metavar="FILE",
                   help="langgraph: YAML/JSON mapping NAME: LITELLM_STRING or NAME: {litellm, api_base, "
                        "api_key_env}; --models entries win"),
               storage: str = STORAGE_OPT) -> None:
    """Export a study's graph(s): graph file (yaml/json), standalone LangGraph module, mermaid or PNG."""
    from graphtune.export import SUFFIX, ExportError, check_format, export_graph, parse_model_map, unmapped_models
    from graphtune.graphs.io import from_dict
    from graphtune.pareto import select as pick

    fmt = check_format(fmt)
    model_map = parse_model_map(tuple(models or ()), models_file)
    if model_map and fmt != "langgraph":
        raise ExportError("--models/--models-file apply to --format langgraph only; graph files keep pool "
                          "names (a live spec maps them: graphtune run FILE --spec SPEC)")
    store = _storage(storage, readonly=True)
    sp = _points(store, study, min_questions)
    chosen = pick(sp.points, select, metric=metric, recommended=sp.recommended)
    paths = []
    if len(chosen) == 1 and not (select.strip() == "pareto" and out.is_dir()):
        targets = [out]
    else:
        out.mkdir(parents=True, exist_ok=True)
        targets = [out / f"{study}-trial{p.trial_number}{SUFFIX[fmt]}" for p in chosen]
    for p, path in zip(chosen, targets):
        metrics = {"trial": p.trial_number, "dev_accuracy": round(p.accuracy, 4), "dev_questions": p.n,
                   "cost_units": round(p.cost_units, 4), "flops": p.flops, "usd": p.usd,
                   "latency_s": round(p.latency_s, 4)}
        if sp.test_trial is not None and p.graph_hash == sp.test_trial.graph_hash:
            metrics["test_accuracy"] = sp.test_trial.accuracy
        paths.append(export_graph(from_dict(p.graph), fmt, path, spec=sp.study.spec,
                                  name=f"{study} trial {p.trial_number}", metrics=metrics, model_map=model_map))
    con = _console()
    for p, path in zip(chosen, paths):
        con.print(f"wrote {path}  (trial #{p.trial_number}: dev accuracy {p.accuracy:.3f} on {p.n} questions, "
                  f"{p.cost_units:.2f} units, ${p.usd:.6f}, {p.latency_s:.2f} s)")
    if fmt in ("yaml", "json") and len(paths) == 1:
        con.print(f"run it: graphtune run {paths[0]} --spec SPEC --question TEXT")
    if fmt == "langgraph":
        missing = sorted({m for p in chosen for m in unmapped_models(from_dict(p.graph), sp.study.spec, model_map)})
        if missing:
            con.print(f"no endpoint for {', '.join(missing)} (the study's own names): map them with "
                      f"--models NAME=LITELLM_STRING, or at run time through the graph's context or "
                      f"GRAPHTUNE_MODEL_<NAME> / GRAPHTUNE_API_BASE")
        con.print("needs: pip install 'langgraph>=1.0' 'litellm>=1.50' (or 'graphtune[llm]'); "
                  f"serve it: langgraph.json {{\"graphs\": {{\"{paths[0].stem}\": \"./{paths[0].name}:graph\"}}}}")


@app.command("pareto")
@_guard
def pareto_cmd(study: str = typer.Argument(..., metavar="NAME"),
               metric: str = typer.Option("units", "--metric", help="cost axis: units, flops, cost_usd, latency_s"),
               min_questions: Optional[int] = typer.Option(None, "--min-questions", min=1,
                                                           help="graphs need this many dev questions (default: "
                                                                "half the best coverage)"),
               storage: str = STORAGE_OPT) -> None:
    """List a study's Pareto front (dev accuracy against a cost) from its stored dev trials."""
    from rich.table import Table

    from graphtune.graphs.io import from_dict
    from graphtune.graphs.render import short_labels, to_short
    from graphtune.pareto import cost_attr, default_ref_cost, hypervolume_points, pareto_front

    cost_attr(metric)
    store = _storage(storage, readonly=True)
    sp = _points(store, study, min_questions)
    front = pareto_front(sp.points, metric)
    ref = default_ref_cost(sp.study.spec, metric, sp.points)
    t = Table(title=f"Pareto front of {study}: dev accuracy vs {metric} ({len(front)} of {len(sp.points)} graphs)")
    for col in ("#", "accuracy", "n", "units", "USD / query", "latency s", "FLOPs"):
        t.add_column(col, no_wrap=True)
    t.add_column("graph", overflow="fold")
    labels = short_labels(m for p in sp.points for m in from_dict(p.graph).model_counts())
    for p in front:
        mark = " *" if sp.recommended is not None and p.graph_hash == sp.recommended.graph_hash else ""
        t.add_row(f"{p.trial_number}{mark}", f"{p.accuracy:.3f}", str(p.n), f"{p.cost_units:.2f}", f"{p.usd:.2e}",
                  f"{p.latency_s:.2f}", f"{p.flops:.3g}", to_short(from_dict(p.graph), labels))
    con = _console()
    con.print(t)
    con.print(f"hypervolume {hypervolume_points(sp.points, metric, ref):.4g} (accuracy x {metric}, reference "
              f"{metric} {ref:g}); * = the study's recommended graph")
    con.print(f"export one: graphtune export {study} --select \"{metric}<=X\" --format yaml -o graph.yaml")


@app.command("report")
@_guard
def report_cmd(study: str = typer.Argument(..., metavar="NAME"),
               out: Path = typer.Option(Path("report.html"), "-o", "--output", help="the HTML file to write"),
               png_dir: Optional[Path] = typer.Option(None, "--png-dir", help="also write the plots as PNG files here"),
               metric: str = typer.Option("units", "--metric", help="cost axis of the Pareto plot"),
               top: int = typer.Option(3, "--top", min=1, help="graphs in the per-question table"),
               storage: str = STORAGE_OPT) -> None:
    """Write one self-contained HTML report of a study (plots inline; no network needed to view it)."""
    from graphtune.report import write_report

    store = _storage(storage, readonly=True)
    path, pngs = write_report(store, _study(store, study), out, png_dir=png_dir, metric=metric, top=top)
    con = _console()
    con.print(f"wrote {path}")
    for p in pngs:
        con.print(f"wrote {p}")


@app.command("dashboard")
@_guard
def dashboard_cmd(study: str = typer.Argument(..., metavar="NAME"), storage: str = STORAGE_OPT,
                  host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every "
                                                                         "interface; the view has no login)"),
                  port: int = typer.Option(8080, "--port", min=0, max=65535, help="port to listen on (0: any "
                                                                                  "free one)"),
                  refresh: float = typer.Option(5.0, "--refresh", min=0.1, help="seconds between reads of the "
                                                                                "store")) -> None:
    """Serve a live, read-only view of a study in optuna-dashboard (history, Pareto front,
    parameter importance, graphs and agent feedback in the trial notes); Ctrl-C stops it."""
    from graphtune.dashboard import DashboardServer

    last = {"error": None}

    def on_error(e: Exception) -> None:  # once per distinct failure, not every refresh
        if str(e) != last["error"]:
            last["error"] = str(e)
            typer.echo(f"warning: cannot refresh {study!r}: {e}; showing the last data read", err=True)

    server = DashboardServer(_storage(storage, readonly=True), study, host=host, port=port, refresh_s=refresh,
                             on_error=on_error)
    typer.echo(f"graphtune dashboard of {study!r}: {server.url}  (read-only, refreshed every {refresh:g} s; "
               "Ctrl-C stops it)")
    import signal

    def stop(signum, frame):  # SIGTERM (a service manager, `kill`) stops it as Ctrl-C does
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("dashboard stopped")
    finally:
        signal.signal(signal.SIGTERM, before)
        server.shutdown()


@app.command("compare")
@_guard
def compare_cmd(studies_: list[str] = typer.Argument(..., metavar="NAME..."),
                metric: str = typer.Option("units", "--metric", help="cost axis of the fronts"),
                png: Optional[Path] = typer.Option(None, "--png", help="also draw the curves and fronts to this PNG"),
                storage: str = STORAGE_OPT) -> None:
    """Compare searches side by side: best dev reward, test accuracy, cost, front and hypervolume."""
    from rich.table import Table

    from graphtune.report import compare_rows, compare_png

    store = _storage(storage, readonly=True)
    infos = [_study(store, n) for n in studies_]
    rows = compare_rows(store, infos, metric=metric)
    t = Table(title=f"studies in {_url(storage)}")
    cols = [c for c in (rows[0].keys() if rows else []) if c != "best graph"]
    for c in cols:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[str(r[c]) for c in cols])
    con = _console()
    con.print(t)
    for r in rows:
        con.print(f"{r['study']}: {r['best graph']}")
    if png is not None:
        compare_png(store, infos, png, metric=metric)
        _console().print(f"wrote {png}")


# -- resume / storage upgrade / delete / dump (store management) -------------------------


def _run_with_progress(label: str, fn):
    """Call ``fn(progress=...)`` under a progress bar of budget spent and best-so-far."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("runs  best {task.fields[best]}"), TimeElapsedColumn(), console=_console(),
                  transient=False) as bar:
        task = bar.add_task(label, total=None, best="-")

        def progress(ev: dict) -> None:
            best = ev["best_full_dev"]
            bar.update(task, total=ev["budget_runs"], completed=min(ev["runs_spent"], ev["budget_runs"]),
                       best="-" if best == float("-inf") else f"{best:.3f}")

        return fn(progress=progress)


@app.command()
@_guard
def resume(study: str = typer.Argument(..., help="name of a stored study"), storage: str = STORAGE_OPT,
           evaluations: Optional[int] = typer.Option(None, "--evaluations", "-n", min=1,
                                                     help="raise the search budget (full-dev graph evaluations)"),
           force: bool = typer.Option(False, "--force", help="continue even if the stored spec no longer matches"),
           take_over: bool = typer.Option(False, "--take-over",
                                          help="declare every other process running this study dead (see "
                                               "optimize --take-over)"),
           quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar")) -> None:
    """Continue a stored study from its stored spec: finished trials are kept, interrupted
    ones are run again, and no LLM call is paid twice."""
    from graphtune.api import resume as run
    from graphtune.store.storage import require_persistent

    require_persistent(storage, "resume")
    if quiet:
        problem, st, out = run(study, storage, evaluations=evaluations, force=force, take_over=take_over)
    else:
        problem, st, out = _run_with_progress(f"{study} (resume)", lambda progress: run(
            study, storage, evaluations=evaluations, force=force, progress=progress, take_over=take_over))
    _print_outcome(_console(), problem.spec, problem, st, out)


@app.command()
@_guard
def worker(study: str = typer.Option(..., "--study", help="the study to work on"),
           storage: str = typer.Option(..., "--storage",
                                       help="SQLAlchemy URL every worker shares (postgresql://... for several "
                                            "machines)"),
           spec_path: Optional[Path] = typer.Option(None, "--spec", metavar="SPEC",
                                                    help="create the study from this spec if it does not exist"),
           heartbeat: float = typer.Option(5.0, "--heartbeat", min=0.1, help="seconds between heartbeats"),
           stale_after: float = typer.Option(60.0, "--stale-after", min=1.0,
                                             help="retake a trial whose worker's heartbeat is older than this"),
           poll: float = typer.Option(0.5, "--poll", min=0.01, help="seconds between looks when idle"),
           max_trials: Optional[int] = typer.Option(None, "--max-trials", min=1,
                                                    help="stop after this many trials (default: when the study "
                                                         "is complete)"),
           quiet: bool = typer.Option(False, "--quiet", "-q", help="no line per trial")) -> None:
    """Work on a study together with any number of other workers (processes or machines):
    claim and evaluate queued trials, update the searcher once per batch, stop when the
    study is complete."""
    from graphtune.api import work
    from graphtune.errors import SpecError
    from graphtune.search.worker import WorkerOptions
    from graphtune.spec import load_spec

    if stale_after < 3 * heartbeat:
        raise SpecError(f"--stale-after ({stale_after:g} s) must be at least 3 x --heartbeat ({heartbeat:g} s), or "
                        "live workers lose their trials; raise --stale-after")
    spec = load_spec(spec_path, overrides={"study": study, "storage": storage},
                     flags={"study": "--study", "storage": "--storage"}) if spec_path else None
    con = _console()
    import warnings

    from graphtune.store.storage import SharedSQLiteWarning, shared_sqlite_warning

    why = shared_sqlite_warning(storage, workers=True)
    if why:
        typer.echo(f"warning: {why}", err=True)
    warnings.filterwarnings("ignore", category=SharedSQLiteWarning)  # said once, above

    def progress(ev: dict) -> None:
        if not quiet:
            kept = "" if ev["stored"] else "  (retaken by another worker: not stored)"
            con.print(f"trial {ev['trial']:>4} {ev['split']} batch {ev['batch']} slot {ev['slot']}: "
                      f"reward {_fmt(ev['reward'])}, {ev['new_runs']} new runs{kept}")

    opts = WorkerOptions(heartbeat_s=heartbeat, stale_after_s=stale_after, poll_s=poll, max_trials=max_trials)
    problem, st, rep = work(study, storage, spec=spec, options=opts, progress=progress)
    con.print(f"worker {rep.name}: {rep.trials} trials, {rep.runs_paid} graph-question runs paid, "
              f"{rep.batch_updates} batch updates; study {study} is {rep.study_status}")
    if st is not None and st.status == "complete":
        store = _storage(storage, readonly=True)
        test = [t for t in store.list_trials(st.id, split="test")]
        if test:
            from graphtune.graphs.io import from_dict
            from graphtune.graphs.render import to_text

            t = test[-1]
            con.print(f"best graph {to_text(from_dict(t.graph))} (trial #{t.parents[0] if t.parents else '?'}); "
                      f"test accuracy {_fmt(t.accuracy)}")
        con.print(f"next: graphtune show {study} --storage {_url(storage)}")


storage_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Manage a store's schema.")
app.add_typer(storage_app, name="storage")


@storage_app.command("upgrade")
@_guard
def storage_upgrade(storage: str = STORAGE_OPT) -> None:
    """Migrate a store's schema to this graphtune's revision (creates an empty store)."""
    from graphtune.store.storage import Storage

    before, after = Storage.upgrade(storage)
    if before == after:
        typer.echo(f"{_url(storage)}: already at revision {after}")
    else:
        typer.echo(f"{_url(storage)}: upgraded from revision {before or '(empty)'} to {after}; now at revision {after}")


@app.command()
@_guard
def delete(study: str = typer.Argument(...), storage: str = STORAGE_OPT,
           yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation")) -> None:
    """Delete a study with its trials, results and agent steps (the call ledger stays)."""
    store = _storage(storage)
    st = _study(store, study)
    if not yes:
        import click

        try:
            sure = typer.confirm(f"delete study {study!r} ({st.n_trials} trials) from {_url(storage)}?")
        except (click.Abort, getattr(typer, "Abort", click.Abort)):  # stdin closed: nobody to answer
            from graphtune.errors import GraphtuneError

            raise GraphtuneError(f"delete asks before deleting study {study!r} and nobody answered (no terminal on "
                                 "stdin); nothing deleted; pass --yes to delete it without asking") from None
        if not sure:
            typer.echo("nothing deleted")
            raise typer.Exit(1)
    store.delete_study(study)
    typer.echo(f"deleted study {study!r} ({st.n_trials} trials)")


@app.command()
@_guard
def dump(study: str = typer.Argument(...), output: Path = typer.Option(..., "--output", "-o", help="JSON file to write"),
         storage: str = STORAGE_OPT) -> None:
    """Write a study's records as JSON: study, spec, trials with question results, agent steps."""
    import json

    from graphtune.api import dump_study

    data = dump_study(_storage(storage, readonly=True), study)
    output.write_text(json.dumps(data, indent=1, default=str))
    typer.echo(f"wrote {output}: study {study!r}, {len(data['trials'])} trials, {len(data['agent_steps'])} agent steps")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
