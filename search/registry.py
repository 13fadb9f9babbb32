"""The one name table of search methods (for the spec and the CLI).

Entries are import paths so that choosing ``random`` never imports Optuna or litellm.
Each searcher class declares its ``search.options`` as a typed model (``Options``, a
:class:`~graphtune.search.base.SearcherOptions`); :func:`options_model` exposes it so the
spec can check the options when it is loaded.
"""

from __future__ import annotations

import importlib

from graphtune.errors import SpecError

SEARCHERS: dict[str, str] = {
    "random": "graphtune.search.random_search:RandomSearcher",
    "exhaustive": "graphtune.search.exhaustive:ExhaustiveSearcher",
    "reinforce": "graphtune.search.reinforce:ReinforceSearcher",
    "agent-reinforce": "graphtune.search.agent_reinforce:AgentReinforceSearcher",
    "tpe": "graphtune.search.optuna_search:TPESearcher",
    "gp": "graphtune.search.optuna_search:GPSearcher",
    "cmaes": "graphtune.search.optuna_search:CmaEsSearcher",
    "qmc": "graphtune.search.optuna_search:QMCSearcher",
    "nsga2": "graphtune.search.optuna_search:NSGA2Searcher",
    "llm-opt": "graphtune.search.llm_opt:LLMOptSearcher",
    "agenttts": "graphtune.search.agenttts:AgentTTSSearcher",
}


def searcher_class(name: str):
    try:
        path = SEARCHERS[name]
    except KeyError:
        raise SpecError(f"unknown search method {name!r}; known methods: {', '.join(sorted(SEARCHERS))}") from None
    mod, _, attr = path.partition(":")
    return getattr(importlib.import_module(mod), attr)


def options_model(name: str):
    """The pydantic model of method ``name``'s ``search.options`` (extra keys forbidden)."""
    return searcher_class(name).Options
