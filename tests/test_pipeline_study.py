"""Multi-stage studies end to end: the spec's `pipeline.stages`, designs in the engine and
the store, and a search on a simulated pipeline from the CLI."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from graphtune.api import build_problem
from graphtune.cli import app
from graphtune.errors import GraphError, SpecError
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.cost import Budget, PipelineBudget
from graphtune.graphs.design import (PipelineSpace, design_from_dict, design_hash, design_to_dict, random_design,
                                     stage_budget, validate_design)
from graphtune.graphs.model import Graph, Node
from graphtune.graphs.pipeline import single
from graphtune.spec import load_spec

POOL = """
models:
  - name: llama-3.2-1b
  - name: llama-3.2-3b
  - name: llama-3.1-8b
  - name: llama-3.1-70b
"""

RAG = """
study: rag
task: {profile: pipeline-rag, dev_size: 40, test_size: 100}
""" + POOL + """
pipeline:
  stages:
    - name: retrieve
      description: pick the supporting passages
      space: {max_nodes: 3}
    - name: answer
      space: {models: [llama-3.2-3b, llama-3.1-8b], max_nodes: 5}
      budget: {units: 300}
budget: {units: 600}
search: {method: random, evaluations: 6, batch_size: 3}
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def one(model: str, role: str = "assistant") -> Graph:
    return Graph.build([Node.make("n0", role, model)])


def test_a_pipeline_spec_builds_one_space_per_stage_and_the_pipeline_budget(tmp_path):
    spec = load_spec(write(tmp_path, RAG))
    space = spec.search_space()
    assert isinstance(space, PipelineSpace)
    assert space.names == ("retrieve", "answer")
    # inputs default to the question plus the previous stage
    assert space.stage("retrieve").inputs == ("question",)
    assert space.stage("answer").inputs == ("question", "retrieve")
    assert space.stage("answer").space.models == ("llama-3.2-3b", "llama-3.1-8b")
    assert space.stage("retrieve").space.max_nodes == 3
    b = spec.search_budget()
    assert isinstance(b, PipelineBudget) and b.total.units == 600 and b.cap("answer").units == 300
    assert b.cap("retrieve") is None


@pytest.mark.parametrize("change, message, line", [
    # a model not in the pool, on the stage's line
    (("pipeline", "stages", 1, "space", "models"), ["gpt-9"], "pipeline.stages[1].space.models: unknown model"),
    # a stage reading a later stage
    (("pipeline", "stages", 0, "inputs"), ["question", "answer"], "reads stage 'answer', which runs after it"),
    # a stage prompt naming something it does not read
    (("pipeline", "stages", 1, "prompt"), "{question} {plan}", "placeholder(s) ['plan']"),
    # a typo in a stage's keys
    (("pipeline", "stages", 0, "spcae"), {}, "unknown field; did you mean 'space'?"),
], ids=["model", "later-stage", "prompt", "typo"])
def test_pipeline_spec_mistakes_are_one_line_with_the_file_and_line(tmp_path, change, message, line):
    data = yaml.safe_load(textwrap.dedent(RAG))
    cur = data
    *head, last = change
    for k in head:
        cur = cur[k]
    cur[last] = message
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(SpecError) as e:
        load_spec(p)
    text = str(e.value)
    assert "\n" not in text and line in text
    assert text.startswith(f"{p}:") and text.split(":")[1].isdigit(), text


def test_a_pipeline_spec_refuses_a_top_level_space_and_a_replay_env(tmp_path):
    with pytest.raises(SpecError, match=r"space: a multi-stage spec gives each stage its space"):
        load_spec(write(tmp_path, RAG + "space: {max_nodes: 2}\n"))
    with pytest.raises(SpecError, match="stage 'question'|'question' names the task's question"):
        load_spec(write(tmp_path, RAG.replace("name: retrieve", "name: question").replace(
            "- name: answer", "- name: answer\n      inputs: [question]")))


def test_the_spec_stages_must_be_the_simulated_pipelines(tmp_path):
    bad = RAG.replace("name: retrieve", "name: fetch")
    spec = load_spec(write(tmp_path, bad))
    with pytest.raises(SpecError, match=r"has the stages \(inputs\) \[\('retrieve'"):
        build_problem(spec)
    over = RAG.replace("budget: {units: 600}", "budget: {units: 5}")
    with pytest.raises(Exception, match="cheapest pipeline"):
        build_problem(load_spec(write(tmp_path, over)))


def test_designs_hash_store_and_validate_as_graphs_or_pipelines(tmp_path):
    spec = load_spec(write(tmp_path, RAG))
    problem = build_problem(spec)
    space, costs, budget = problem.ctx.space, problem.ctx.costs, problem.ctx.budget
    p = space.pipeline({"retrieve": one("llama-3.1-70b"), "answer": one("llama-3.2-3b")})
    assert design_from_dict(design_to_dict(p)) == p
    assert design_hash(p) == graph_hash(p) and len(design_hash(p)) == 16
    # a one-stage pipeline on the question is its graph: same hash
    g = one("llama-3.1-8b")
    assert design_hash(single(g)) == graph_hash(g)
    cost = validate_design(p, space, costs, budget)
    assert cost.total.units == pytest.approx(sum(c.units for _, c in cost.stages))
    # the answer stage's cap (300 units) is checked on its own
    big = Graph.build([Node.make(f"a{i}", "assistant", "llama-3.1-8b") for i in range(4)]
                      + [Node.make("f", "fuser", "llama-3.1-8b")], [(f"a{i}", "f") for i in range(4)])
    over = space.pipeline({"retrieve": one("llama-3.2-1b"), "answer": big})
    if costs.cost(over).stage("answer").units > 300:
        with pytest.raises(GraphError, match="stage 'answer'"):
            validate_design(over, space, costs, budget)
    # a model the stage's space does not allow
    with pytest.raises(GraphError, match=r"stage 'answer': node 'n0' uses model 'llama-3.1-70b'"):
        validate_design(space.pipeline({"retrieve": one("llama-3.2-1b"), "answer": one("llama-3.1-70b")}),
                        space, costs, budget)
    # a single graph is not a design of a pipeline study
    with pytest.raises(GraphError, match="searches multi-stage pipelines"):
        validate_design(g, space, costs, budget)


def test_random_pipelines_fit_the_budget_and_every_stage_cap(tmp_path):
    problem = build_problem(load_spec(write(tmp_path, RAG)))
    space, costs, budget = problem.ctx.space, problem.ctx.costs, problem.ctx.budget
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(30):
        p = random_design(space, costs, budget, rng)
        validate_design(p, space, costs, budget)  # raises if not
        seen.add(design_hash(p))
    assert len(seen) > 20  # not one pipeline over and over
    # a stage's budget is in its own units and leaves room for the other stage's cheapest graph
    b = stage_budget(space, costs, budget, "answer")
    assert b.units is not None and b.units > 0


def test_optimize_runs_a_pipeline_study_and_shows_each_stage(tmp_path):
    spec_path = write(tmp_path, RAG + f"storage: sqlite:///{tmp_path / 's.db'}\n")
    r = CliRunner().invoke(app, ["optimize", str(spec_path)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.replace("│", " ").split())  # the panel may wrap any line
    assert "2 stages" in out and "retrieve(<-question)" in out and "answer(<-question,retrieve)" in out
    assert "stage retrieve" in out and "stage answer" in out and "test stage accuracy" in out
    assert "stopped: budget" in out
    # the study resumes as a finished one: no new runs
    r2 = CliRunner().invoke(app, ["optimize", str(spec_path)], catch_exceptions=False)
    assert r2.exit_code == 0, r2.output
    show = CliRunner().invoke(app, ["show", "rag", "--storage", f"sqlite:///{tmp_path / 's.db'}"])
    assert show.exit_code == 0, show.output
    assert "subgraph" in show.output  # the mermaid drawing has a subgraph per stage


def test_validate_prints_each_stage_its_cap_and_the_pipeline_cost_range(tmp_path):
    spec_path = write(tmp_path, RAG.replace("budget: {units: 600}", "budget: {units: 120}"))
    r = CliRunner().invoke(app, ["validate", str(spec_path)])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "budget per query, whole pipeline: units <= 120" in out
    assert "stage retrieve (<- question)" in out and "stage answer (<- question, retrieve)" in out
    assert "cap units <= 300" in out
    # one call of the 70B retrieval (3000-token prompt) leaves no room for answering in 120 units
    assert "stage 'retrieve': model 'llama-3.1-70b' can never be used" in out
    assert "space: graphs per stage" in out
    assert "over 200 random pipelines" in out and "pipeline-question runs" in out
