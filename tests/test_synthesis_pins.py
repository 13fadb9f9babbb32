"""Pinned outcomes of the simulator and the replay environment: the execution plan and
the synthesis rule they share (``graphtune.envs.synthesis``) must not move a single bit.

The digests were computed on the code before the rule was factored out; a change to them
is a change of behaviour (recompute them only on purpose, and say so in the commit)."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from graphtune.envs.base import QuestionResult
from graphtune.envs.replay import Record, RecordTable, ReplayEnvironment
from graphtune.envs.simulated.calibrate import make_env
from graphtune.graphs.cost import CostModel, ModelInfo, TaskShape
from graphtune.graphs.model import Graph, Node

from datafiles import DATA

B1, B3, B8 = "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"


def digest(results: list[QuestionResult]) -> str:
    return hashlib.sha256(repr(results).encode()).hexdigest()[:16]


def graphs(m1: str, m2: str, m3: str) -> dict[str, Graph]:
    N = Node.make
    return {
        "single": Graph.build([N("x", "assistant", m1)]),
        "fan_in": Graph.build([N("a", "assistant", m1), N("b", "assistant", m1), N("c", "assistant", m2),
                               N("f", "fuser", m3)], [("a", "f"), ("b", "f"), ("c", "f")]),
        "deep": Graph.build([N("a", "assistant", m1), N("b", "assistant", m2), N("c", "assistant", m1),
                             N("d", "assistant", m2), N("f", "fuser", m3)],
                            [("a", "d"), ("b", "d"), ("c", "f"), ("d", "f"), ("a", "f")]),
        "chain": Graph.build([N("a", "assistant", m2), N("b", "assistant", m2), N("c", "assistant", m2)],
                             [("a", "b"), ("b", "c")]),
    }


SIM_PINS = {
    "math/single": "de99c96b3c1259cb", "math/fan_in": "c4f4daa1f37e7e23", "math/deep": "9b40834ea82f8633",
    "math/chain": "a004f3b12c119efb", "mmlu/single": "dc15b20c0d56b0da", "mmlu/fan_in": "dd04e30e500a4af9",
    "mmlu/deep": "f7a8430cd3eb97f0", "mmlu/chain": "b8bd1a75b45e592d",
}


@pytest.mark.parametrize("task", ["math", "mmlu"])
@pytest.mark.parametrize("name", ["single", "fan_in", "deep", "chain"])
def test_simulator_outcomes_are_pinned(task, name):
    env = make_env(task, seed=3, test_size=60)
    got = digest(env.evaluate(graphs(B1, B3, B8)[name], env.split("test")))
    assert got == SIM_PINS[f"{task}/{name}"]


def small_table() -> RecordTable:
    """Three models on 40 questions, some samples missing, wrong answers that collide."""
    recs = []
    for q in range(40):
        for j, m in enumerate(("m-small", "m-mid", "m-big")):
            for s in range(1 + (q + j) % 2):
                if (q * 7 + j) % 11 == 0:
                    continue
                right = (q * 13 + j * 5 + s * 3) % (4 - j) != 0
                recs.append(Record(task="t", question_id=f"q{q:02d}", model=m, sample=s,
                                   answer=str(q) if right else str(q + 1 + (q + s) % 2), correct=right,
                                   text="x" * (20 + q + j), question="y" * (40 + q)))
    return RecordTable(tuple(recs))


POOL = {"m-small": ModelInfo("m-small", 1e9, 16, 2048, 0.1, 0.1),
        "m-mid": ModelInfo("m-mid", 8e9, 32, 4096, 0.3, 0.6),
        "m-big": ModelInfo("m-big", 70e9, 80, 8192, 1.0, 3.0)}

REPLAY_PINS = {
    "single": "2ea1c17c1c0577d4", "fan_in": "9237409a5f6732e5", "deep": "df697348b546a379", "chain": "bed956851d15c127",
}


@pytest.mark.parametrize("name", ["single", "fan_in", "deep", "chain"])
def test_replay_outcomes_are_pinned(name):
    env = ReplayEnvironment(small_table(), CostModel(POOL, TaskShape(50, 40)), seed=5, dev_size=10)
    qids = env.split("dev") + env.split("test")
    got = digest(env.evaluate(graphs("m-small", "m-mid", "m-big")[name], qids))
    assert got == REPLAY_PINS[name]


#: digests of four graphs replayed on the dev split of the recorded GSM8K answers, by data:
#: the full 1,319 questions (dev 100; run where the full data is found) and the in-repo
#: subset of the first 100 (dev 50; its pins recorded from the code of the full pins above)
GSM8K_PINS = {
    "full": (100, {"single": "bfdf5784a1c95e2b", "fan_in": "b287127057ec02d0", "deep": "077f009592f4c394",
                   "chain": "f20acfcbdcd4cae4"}),
    "subset": (50, {"single": "e781536d35becde3", "fan_in": "68b1a5cfad21a911", "deep": "99a631e015c19c81",
                    "chain": "6eda367f4c2d7da4"}),
}


@pytest.mark.parametrize("data", list(DATA))
def test_replay_of_the_recorded_gsm8k_answers_is_pinned(data):
    from graphtune.envs.replay import import_gsm8k_recorded

    dev_size, pins = GSM8K_PINS[data]
    pool = {m: ModelInfo(m, 10e9, 32, 4096, 1.0, 1.0) for m in
            ("mixtral-8x7b-instruct", "gpt-4-1106-preview", "gpt3-6b-finetuning")}
    env = ReplayEnvironment(import_gsm8k_recorded(DATA[data] / "recorded"), CostModel(pool, TaskShape(60, 80)),
                            seed=0, dev_size=dev_size)
    gs = graphs("gpt3-6b-finetuning", "mixtral-8x7b-instruct", "gpt-4-1106-preview")
    got = {name: digest(env.evaluate(g, env.split("dev"))) for name, g in gs.items()}
    assert got == pins


def test_the_execution_plan_is_canonical_and_ranks_same_model_sources():
    from graphtune.envs.synthesis import execution_plan

    g = graphs(B1, B3, B8)["deep"]
    renamed = Graph.build([Node.make(f"z{n.id}", n.role, n.model) for n in g.nodes],
                          [(f"z{a}", f"z{b}") for a, b in g.edges])
    plan, plan2 = execution_plan(g), execution_plan(renamed)
    assert plan.nodes == plan2.nodes and plan.sink == plan2.sink
    assert sorted(plan.original_ids) == sorted(n.id for n in g.nodes)
    sources = [n for n in plan.nodes if not n.preds]
    for model, k in Counter(n.model for n in sources).items():  # distinct samples of one model
        assert sorted(n.rank for n in sources if n.model == model) == list(range(k))
    assert all(n.rank == -1 and n.level > 0 for n in plan.nodes if n.preds)
    seen: set[int] = set()
    for n in plan.nodes:  # topological: inputs run first
        assert set(n.preds) <= seen
        seen.add(n.pos)
