"""Shared fixtures: the LLaMA pool, a cost model, small spaces."""

from __future__ import annotations

import pytest

from graphtune.graphs import Budget, CostModel, Space, TaskShape
from graphtune.graphs.catalog import KNOWN_MODELS, LLAMA_POOL

MATH_SHAPE = TaskShape(202, 275)


@pytest.fixture
def pool():
    return {m: KNOWN_MODELS[m] for m in LLAMA_POOL}


@pytest.fixture
def costs(pool):
    return CostModel(pool, MATH_SHAPE)


@pytest.fixture
def space():
    return Space(models=LLAMA_POOL, max_nodes=9, max_width=9, max_depth=4, max_in_degree=4)


@pytest.fixture
def budget18():
    return Budget(units=18)


def pytest_report_header(config):
    from datafiles import describe
    return describe()
