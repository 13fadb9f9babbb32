"""The ``graphtune`` command line (typer + rich).

Start-up stays fast: every heavy import (numpy, SQLAlchemy, pydantic, the simulator,
litellm...) happens inside the command that needs it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
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
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


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
    text = files("graphtune").joinpath("templates/example.yaml").read_text()
    path.write_text(text)
    typer.echo(f"wrote {path}; next: graphtune validate {path} && graphtune optimize {path}")


# -- validate --------------------------------------------------------------------------


@app.command()
@_guard
def validate(spec_path: Path = typer.Argument(..., metavar="SPEC"),
             max_enumerate: int = typer.Option(3000, help="enumerate at most this many graphs to size the space")) -> None:
    """Check a spec; print it resolved, the size of its space and the cost range of its graphs."""
    import numpy as np
    import yaml
    from rich.table import Table

    from graphtune.api import build_problem
    from graphtune.graphs.space import SpaceTooLarge, enumerate_graphs, random_graph
    from graphtune.spec import load_spec

    spec = load_spec(spec_path)
    problem = build_problem(spec)
    problem.env.close()  # validate runs nothing (a live env has started nothing yet)
    con = _console()
    con.print(f"{spec_path}: valid")
    con.print(yaml.safe_dump(spec.resolved(), sort_keys=False).rstrip())
    ctx = problem.ctx
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
    t = Table(title=f"cost per query, {how}")
    for col in ("", "min", "max"):
        t.add_column(col)
    for name, key, f in (("units", "units", ".2f"), ("FLOPs", "flops", ".3g"), ("USD / query", "usd", ".2e"),
                         ("latency s", "latency_s", ".2f")):
        vals = [getattr(c, key) for c in costs]
        t.add_row(name, format(min(vals), f), format(max(vals), f))
    con.print(t)
    con.print(f"dev questions: {len(ctx.dev_ids)}, test questions: {len(problem.test_ids)}, "
              f"search budget: {ctx.budget_runs} graph-question runs")


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
             no_cache: bool = typer.Option(False, "--no-cache",
                                           help="live env: make every LLM call again instead of serving identical "
                                                "calls from the call ledger (calls are still recorded)"),
             quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar")) -> None:
    """Run a search (or continue the stored study of the same name) and print the best graph."""
    from graphtune.api import optimize as run
    from graphtune.spec import load_spec

    spec = load_spec(spec_path, overrides={"study": study, "storage": storage, "search.evaluations": evaluations,
                                           "search.method": method, "search.seed": seed,
                                           "env.cache": False if no_cache else None})
    con = _console()
    if quiet:
        problem, st, out = run(spec, force=force)
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

            problem, st, out = run(spec, force=force, progress=progress)
    _print_outcome(con, spec, problem, st, out)


def _print_outcome(con, spec, problem, st, out) -> None:
    from rich.panel import Panel
    from rich.text import Text

    from graphtune.envs.base import summarize
    from graphtune.graphs.render import to_text

    if out.best is None:
        con.print("no graph was evaluated successfully; see `graphtune trials " + spec.study + "`")
        raise SystemExit(1)
    g = out.best.graph
    c = problem.costs.cost(g)
    lo, hi = out.best.ci95()
    test = summarize(out.test_results) if out.test_results else None
    lines = [
        f"best graph      {to_text(g)}",
        f"                {g.size} nodes, width {g.width}, depth {g.depth}; trial #{out.best.best_trial}",
        f"dev reward      {out.best.mean:.3f}  (95% CI {lo:.3f}-{hi:.3f}, n={out.best.n})",
        f"test accuracy   {_fmt(test.accuracy if test else None)}  (n={test.n_scored if test else 0}, held out)",
        f"cost / query    {c.units:.2f} units, {c.flops:.3g} FLOPs, ${c.usd:.6f}, {c.latency_s:.2f} s latency",
        f"search          {out.n_trials} trials, {out.runs_spent} graph-question runs "
        f"({out.runs_spent / max(1, len(problem.ctx.dev_ids)):.1f} x dev set), stopped: {out.stopped}",
        f"study           {spec.study} in {spec.storage}",
    ]
    if test and test.n_errors:
        lines.append(f"infrastructure  {test.n_errors} test questions failed to run (excluded from accuracy, not "
                     "scored wrong); see `graphtune trials`")
    modelled = sum(r.modelled for r in out.test_results)
    if modelled:
        lines.append(f"replay          {modelled} of {len(out.test_results)} test outcomes were modelled, not "
                     "recorded (docs/replay.md)")
    con.print(Panel(Text("\n".join(lines)), title="graphtune result", expand=False))
    con.print(f"next: graphtune show {spec.study} --storage {spec.storage}")


# -- run -------------------------------------------------------------------------------


@app.command("run")
@_guard
def run_cmd(graph_path: Path = typer.Argument(..., metavar="GRAPH", help="a graph file (YAML or JSON)"),
            spec_path: Path = typer.Option(..., "--spec", help="a spec with `env: {kind: live}` (models, prompts)"),
            question: Optional[str] = typer.Option(None, "--question", help="run on this question text"),
            dataset: Optional[str] = typer.Option(None, "--dataset",
                                                  help="run on every example of this file (the spec's task.fields, "
                                                       "preset and scorer apply) and print accuracy"),
            limit: Optional[int] = typer.Option(None, "--limit", min=1, help="with --dataset: the first N examples"),
            storage: Optional[str] = typer.Option(None, "--storage", help="store of the call ledger (default: the "
                                                                           "spec's)"),
            no_cache: bool = typer.Option(False, "--no-cache", help="make every call again (ignore the ledger)"),
            nodes: bool = typer.Option(False, "--nodes", help="with --question: print every node's output")) -> None:
    """Execute one graph on live endpoints; print the answer, its cost and latency."""
    from graphtune.api import run_graph
    from graphtune.envs.base import summarize
    from graphtune.graphs.io import load
    from graphtune.graphs.render import to_text
    from graphtune.spec import load_spec

    spec = load_spec(spec_path, overrides={"storage": storage, "env.cache": False if no_cache else None})
    graph = load(graph_path)
    out = run_graph(spec, graph, question=question, dataset=dataset, limit=limit)
    con = _console()
    con.print(f"graph     {to_text(graph)}")
    calls = f"{out.calls['made']} made, {out.calls['cached'] + out.calls['shared']} served from the ledger"
    if out.node_runs is not None:
        r = out.results[0]
        if nodes:
            for nid in graph.topo_order:
                n, nr = graph.node_map[nid], out.node_runs[nid]
                tag = " (ledger)" if nr.cached else ""
                head = f"[{nid}] {n.role} {n.model}: {nr.prompt_tokens}+{nr.completion_tokens} tokens, " \
                       f"{nr.latency_s:.2f} s{tag}"
                con.print(head)
                con.print("    " + (nr.text or f"error: {nr.error}").strip().replace("\n", "\n    "))
        if r.error:
            con.print(f"error     {r.error}")
        else:
            con.print("answer    " + (r.answer or "").strip().replace("\n", "\n          "))
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
    con.print(f"per query {_fmt(m.mean_flops, '.3g')} FLOPs, ${_fmt(m.mean_usd, '.6f')}, "
              f"{_fmt(m.mean_latency_s, '.2f')} s latency (critical path); "
              f"{m.prompt_tokens} prompt + {m.completion_tokens} completion tokens in all")
    con.print(f"calls     {calls}")
    errs = [r.error for r in out.results if r.error]
    if errs:
        con.print(f"first failure: {errs[0]}")


# -- studies / trials / show -----------------------------------------------------------


def _storage(url: str):
    """Open an existing store (a missing SQLite file is an error, not a new empty store)."""
    from graphtune.errors import StoreError
    from graphtune.store.storage import Storage

    if url.startswith("sqlite") and "///" in url:
        path = url.split("///", 1)[1]
        if path and path != ":memory:" and not Path(path).exists():
            raise StoreError(f"no store at {path}; run `graphtune optimize SPEC` first or pass --storage")
    return Storage(url)


def _study(store, name: str):
    from graphtune.errors import StoreError

    st = store.get_study(name)
    if st is None:
        known = [s.name for s in store.list_studies()]
        raise StoreError(f"no study named {name!r} in {store.url}; known studies: {known or 'none'}")
    return st


STORAGE_OPT = typer.Option("sqlite:///graphtune.db", "--storage", help="SQLAlchemy URL of the store")


@app.command()
@_guard
def studies(storage: str = STORAGE_OPT) -> None:
    """List the studies of a store."""
    from rich.table import Table

    store = _storage(storage)
    t = Table(title=f"studies in {storage}")
    for col in ("name", "method", "status", "trials", "runs spent", "created"):
        t.add_column(col)
    for s in store.list_studies():
        t.add_row(s.name, s.method, s.status, str(s.n_trials), str(s.runs_spent), str(s.created_at)[:19])
    _console().print(t)


@app.command()
@_guard
def trials(study: str = typer.Argument(...), storage: str = STORAGE_OPT,
           split: Optional[str] = typer.Option(None, help="dev or test"),
           top: Optional[int] = typer.Option(None, help="only the N best by reward")) -> None:
    """List the trials of a study."""
    from rich.table import Table

    from graphtune.graphs.io import from_dict
    from graphtune.graphs.render import to_short

    store = _storage(storage)
    st = _study(store, study)
    rows = store.list_trials(st.id, split=split)
    if top:
        rows = sorted((r for r in rows if r.reward is not None), key=lambda r: -r.reward)[:top]
    t = Table(title=f"trials of {study} ({len(rows)})")
    for col in ("#", "split", "status", "n", "reward", "units"):
        t.add_column(col, no_wrap=True)
    t.add_column("graph", overflow="fold")
    for r in rows:
        graph = to_short(from_dict(r.graph)) if r.status != "failed" else (r.error or "")[:80]
        t.add_row(str(r.number), r.split, r.status, str(len(r.question_ids)), _fmt(r.reward),
                  _fmt(r.cost_units, ".2f"), graph)
    _console().print(t)


@app.command()
@_guard
def show(study: str = typer.Argument(...), trial: Optional[int] = typer.Argument(None),
         storage: str = STORAGE_OPT) -> None:
    """Show a study's best graph, or one trial: graph, metrics and cost."""
    from graphtune.errors import StoreError
    from graphtune.graphs.io import from_dict
    from graphtune.graphs.render import to_mermaid, to_text

    store = _storage(storage)
    st = _study(store, study)
    con = _console()
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
        con.print(f"best graph: {to_text(g)}")
        if best:
            con.print(f"dev: reward {_fmt(best.reward)}, accuracy {_fmt(best.accuracy)} on {len(best.question_ids)} "
                      f"questions (trial #{best.number})")
        con.print(f"test: accuracy {_fmt(t.accuracy)} on {t.metrics.get('n_scored', 0)} questions (trial #{t.number})")
        con.print(f"cost / query: {_fmt(t.cost_units, '.2f')} units, {_fmt(t.flops, '.3g')} FLOPs, "
                  f"${_fmt(t.usd, '.6f')}, {_fmt(t.latency_s, '.2f')} s")
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
              f"{m.get('n', 0)} questions ({m.get('n_errors', 0)} infrastructure failures), {t.new_runs} runs paid")
    con.print(f"cost / query: {_fmt(t.cost_units, '.2f')} units, {_fmt(t.flops, '.3g')} FLOPs, ${_fmt(t.usd, '.6f')}, "
              f"{_fmt(t.latency_s, '.2f')} s")
    if t.parents:
        con.print(f"parents: {t.parents}")
    if t.feedback:
        con.print(f"feedback: {t.feedback}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
