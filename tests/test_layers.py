"""The layers: which package of graphtune may import which.

``graphs`` is at the bottom (the graph as data and the plain values every layer shares);
``envs``, ``agent`` and ``store`` stand on it, unaware of each other; ``search`` stands on
those; the app (``graphtune/``: spec, api, cli, export, report, dashboard, llm,
local_server, pareto) is the composition root on top and wires the rest together. The
error tree (``graphtune.errors``) may be imported from anywhere.

Every module of the layered packages is parsed with ``ast``: every import counts, at the
top, inside a function or under ``TYPE_CHECKING`` alike, and so does a constant string
given to ``importlib.import_module``. A violation is reported as ``file:line``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: layered package -> the packages of ours it may import (besides itself and the errors)
ALLOWED: dict[str, set[str]] = {
    "graphs": set(),
    "envs": {"graphs"},
    "agent": {"graphs"},
    "store": {"graphs"},
    "search": {"graphs", "envs", "agent", "store"},
}
#: importable from anywhere
ANYWHERE = {"errors"}
#: the app: nothing below it imports these
APP = {"api", "cli", "spec", "llm", "local_server", "export", "report", "dashboard", "pareto"}


def modules() -> list[tuple[str, Path]]:
    out = []
    for pkg in ALLOWED:
        out += [(pkg, p) for p in sorted((ROOT / pkg).rglob("*.py"))]
    return out


def package_of(path: Path) -> list[str]:
    """``["graphtune", <pkg>, ...]``: the package holding the module at ``path``."""
    return ["graphtune", *path.relative_to(ROOT).parent.parts]


def imported_names(tree: ast.AST, path: Path) -> list[tuple[int, str]]:
    """``(line, dotted module name)`` of every import in ``tree``."""
    here = package_of(path)
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            # `from graphtune import llm` imports graphtune.llm
            if mod == "graphtune":
                out += [(node.lineno, f"graphtune.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, mod))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            out.append((node.lineno, node.args[0].value))
    return out


def violations() -> list[str]:
    bad = []
    for pkg, path in modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = path.relative_to(ROOT)
        for line, name in imported_names(tree, path):
            parts = name.split(".")
            if parts[0] != "graphtune":
                continue
            if len(parts) == 1:
                bad.append(f"{rel}:{line}: imports the graphtune package itself (the app); import a module "
                           "of its own layer or below")
                continue
            target = parts[1]
            if target == pkg or target in ANYWHERE or target in ALLOWED[pkg]:
                continue
            if target in APP:
                bad.append(f"{rel}:{line}: {pkg} imports {name}, part of the app; the app passes what is "
                           "needed in (src/graphtune/api.py)")
            else:
                may = ", ".join(sorted(ALLOWED[pkg] | ANYWHERE)) or "nothing"
                bad.append(f"{rel}:{line}: {pkg} imports {name}; {pkg} may import {may} (besides itself)")
    return bad


def test_the_scan_sees_every_layered_package():
    mods = modules()
    assert {pkg for pkg, _ in mods} == set(ALLOWED)
    assert len(mods) > 30


def test_no_import_crosses_a_layer():
    bad = violations()
    assert not bad, "imports across the layers:\n" + "\n".join(bad)


@pytest.mark.parametrize("code, pkg, want", [
    ("from graphtune.store.ledger import CallRecord", "envs", "envs imports graphtune.store.ledger"),
    ("def f():\n    from graphtune import llm", "agent", "agent imports graphtune.llm, part of the app"),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from graphtune.envs.base import QuestionResult",
     "store", "store imports graphtune.envs.base"),
    ("import graphtune.local_server", "search", "search imports graphtune.local_server, part of the app"),
    ("from ..envs import base", "graphs", "graphs imports graphtune.envs"),
    ("import importlib\nimportlib.import_module('graphtune.agent.schema')", "envs", "envs imports graphtune.agent"),
])
def test_the_scan_catches_each_kind_of_import(tmp_path, monkeypatch, code, pkg, want):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    for p in ALLOWED:
        (tmp_path / p).mkdir()
    (tmp_path / pkg / "mod.py").write_text(code + "\n")
    bad = violations()
    assert len(bad) == 1 and want in bad[0] and bad[0].startswith(f"{pkg}/mod.py:"), bad


def test_the_store_ledgers_are_call_ledgers():
    """The live environment's ledger protocol is met by the store's ledgers structurally
    (the store does not import the environments)."""
    from graphtune.envs.base import CallLedger
    from graphtune.store.ledger import MemoryLedger, SQLLedger

    assert isinstance(MemoryLedger(), CallLedger)
    for name in ("may_have", "get", "put", "flush", "records", "close", "claim", "claim_status", "release",
                 "share"):
        assert callable(getattr(SQLLedger, name)), name


def test_the_result_values_are_one_set_of_classes():
    import graphtune.envs.base as base
    import graphtune.graphs as graphs
    import graphtune.store.ledger as ledger

    for name in ("QuestionResult", "NodeOutcome", "Metrics", "summarize"):
        assert getattr(base, name) is getattr(graphs, name)
    assert ledger.CallRecord is graphs.CallRecord and ledger.call_key is graphs.call_key


# -- the composition root wires what the layers below do not import -----------------------


def _live_spec(tmp_path, task=None, **search):
    import yaml

    from graphtune.spec import parse_spec

    data = yaml.safe_load((ROOT / "examples" / "local-live.yaml").read_text())
    data["task"]["dataset"] = str(ROOT / "examples" / "data" / "easy-arith.jsonl")
    data["models"][0].update(provider="litellm", litellm="openai/smollm2", api_base="http://127.0.0.1:9/v1")
    data["storage"] = f"sqlite:///{tmp_path / 'g.db'}"
    data["search"].update(search)
    data["task"].update(task or {})
    return parse_spec(data)


def test_the_app_wires_the_llm_client_and_the_ledger_into_the_live_env(tmp_path):
    from graphtune import llm
    from graphtune.api import build_live_env
    from graphtune.envs.base import CallLedger

    spec = _live_spec(tmp_path, task={"scorer": "llm-judge", "scorer_options": {"model": "openai/judge"}})
    env = build_live_env(spec)
    try:
        assert env.acomplete.func is llm.acomplete
        assert env.acomplete.keywords == {"retry_after_max_s": spec.env.retry_after_max_s}
        assert env.scorer._complete is llm.complete  # the judge gets the client too
        assert env.ledger is not None and not isinstance(env.ledger, CallLedger)  # opened on first use
        env.start()
        assert isinstance(env.ledger, CallLedger) and env.executor.ledger is env.ledger
    finally:
        env.close()
    from graphtune.errors import SpecError

    bad = _live_spec(tmp_path, task={"scorer": "llm-judge", "scorer_options": {"model": "j", "complete": "x"}})
    with pytest.raises(SpecError, match="unknown option 'complete'"):
        build_live_env(bad)


@pytest.mark.parametrize("method", ["llm-opt", "agent-reinforce"])
def test_the_app_gives_the_llm_client_to_the_searchers_that_use_one(tmp_path, method):
    from graphtune import llm
    from graphtune.api import build_problem, make_searcher

    spec = _live_spec(tmp_path, method=method, agent={"model": "openai/agent"})
    problem = build_problem(spec)
    try:
        s = make_searcher(spec, problem.ctx)
        client = s._complete if method == "llm-opt" else s.agent._complete
        assert client is llm.complete
    finally:
        problem.env.close()


def test_the_layers_below_the_app_require_the_llm_client(costs):
    from graphtune.agent import make_agent
    from graphtune.agent.report import ProblemInfo
    from graphtune.envs.live import Endpoint, Executor
    from graphtune.errors import AgentError, EnvError, SearchError
    from graphtune.graphs import Budget, Space
    from graphtune.graphs.catalog import KNOWN_MODELS, LLAMA_POOL
    from graphtune.search.base import Objective, SearchContext
    from graphtune.search.llm_opt import LLMOptSearcher

    with pytest.raises(EnvError, match="needs an LLM client: pass acomplete="):
        Executor({"m": Endpoint("m", "openai/m", KNOWN_MODELS["llama-3.2-1b"])})
    space = Space(models=LLAMA_POOL, max_nodes=4, max_in_degree=3)
    problem = ProblemInfo(task_description="t", space=space, costs=costs, budget=Budget(units=18),
                          objective="accuracy", slots=("s0",), max_proposals=1, seed=0)
    with pytest.raises(AgentError, match="needs an LLM client: pass complete="):
        make_agent({"model": "openai/agent"}, problem)
    assert make_agent({}, problem).is_llm is False  # the heuristic needs none
    ctx = SearchContext(space=space, costs=costs, budget=Budget(units=18), objective=Objective(), dev_ids=("q",),
                        agent={"model": "openai/agent"})
    with pytest.raises(SearchError, match="needs an LLM client: pass complete="):
        LLMOptSearcher(ctx)
