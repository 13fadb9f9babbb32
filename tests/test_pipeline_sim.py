"""Simulated pipelines: the Environment contract, stage-by-stage outcomes, determinism, and
the calibration targets of docs/pipelines.md (AgentTTS's three findings), asserted on the
simulator's true accuracies (seed 0, 2000 test questions: the figures the docs print)."""

from __future__ import annotations

import numpy as np
import pytest

from graphtune.envs.simulated.pipelines import (BUILTIN_PIPELINES, SimulatedPipelineEnvironment, calibration,
                                                sampling_graph)
from graphtune.errors import EnvError
from graphtune.graphs.pipeline import QUESTION, Pipeline, Stage

L, E, M = "llama-3.1-70b", "llama-3.1-8b", "llama-3.2-3b"


@pytest.fixture(scope="module")
def env():
    return SimulatedPipelineEnvironment("rag", seed=0, dev_size=50, test_size=400)


def rag(env, retrieve=(L, 1), answer=(M, 8)):
    return env.pipeline({"retrieve": sampling_graph(*retrieve), "answer": sampling_graph(*answer)})


# -- the contract -----------------------------------------------------------------------------


def test_evaluate_returns_one_result_per_id_in_order_with_stage_outcomes(env):
    ids = env.split("test")[:60][::-1]
    res = env.evaluate(rag(env), ids)
    assert [r.question_id for r in res] == ids
    r = res[0]
    assert [s.stage for s in r.stages] == ["retrieve", "answer"]
    assert r.answer == r.stages[-1].answer and r.correct == r.stages[-1].correct
    assert {n.node_id.split("/")[0] for n in r.nodes} == {"retrieve", "answer"}
    assert len(r.nodes) == 1 + 9
    # totals add up over stages; latency is the chain of the two stages
    assert r.flops == pytest.approx(sum(s.flops for s in r.stages))
    assert r.prompt_tokens == sum(s.prompt_tokens for s in r.stages)
    assert r.latency_s == pytest.approx(r.stages[0].latency_s + r.stages[1].latency_s)
    # the fast path agrees with the results
    fast = env.stage_correct(rag(env), ids)
    assert list(fast["answer"]) == [x.correct for x in res]
    assert list(fast["retrieve"]) == [x.stages[0].correct for x in res]


def test_the_stage_that_lost_the_answer_is_reported(env):
    res = env.evaluate(rag(env, retrieve=(M, 1)), env.split("test"))
    lost = [r.lost_at for r in res]
    assert {"retrieve", "answer", None} <= set(lost)
    for r in res:
        if r.lost_at == "retrieve":
            assert r.stages[0].correct is False and r.correct is False
        if r.lost_at == "answer":
            assert r.stages[0].correct is True and r.correct is False


def test_a_wrong_first_stage_makes_a_right_answer_much_less_likely(env):
    ok = env.stage_correct(rag(env, retrieve=(E, 1)), env.split("test"))
    after_right = ok["answer"][ok["retrieve"]].mean()
    after_wrong = ok["answer"][~ok["retrieve"]].mean()
    assert after_right - after_wrong > 0.25
    assert after_wrong > 0.05  # much less likely, not impossible


def test_outcomes_are_deterministic_by_seed_whatever_the_order_or_naming(env):
    ids = env.split("test")[:100]
    p = rag(env)
    a = env.evaluate(p, ids)
    other = SimulatedPipelineEnvironment("rag", seed=0, dev_size=50, test_size=400)
    assert other.evaluate(p, ids[::-1])[::-1] == a
    renamed = Pipeline((Stage("retrieve", p.stage("retrieve").graph),
                        Stage("answer", sampling_graph(M, 8), (QUESTION, "retrieve"))))
    assert [r.correct for r in other.evaluate(renamed, ids)] == [r.correct for r in a]
    seeded = SimulatedPipelineEnvironment("rag", seed=1, dev_size=50, test_size=400)
    assert [r.correct for r in seeded.evaluate(p, ids)] != [r.correct for r in a]


def test_a_pipeline_that_is_not_the_profiles_is_refused_in_one_line(env):
    p = Pipeline((Stage("answer", sampling_graph(M, 2)),))
    with pytest.raises(EnvError, match="do not match simulated pipeline 'rag'"):
        env.evaluate(p, env.split("dev")[:3])
    with pytest.raises(EnvError, match="unknown question id"):
        env.evaluate(rag(env), ["nope"])
    with pytest.raises(EnvError, match="no graph for stage"):
        env.pipeline({"retrieve": sampling_graph(L, 1)})


def test_the_cost_model_prices_every_stage_with_its_own_shape(env):
    c = env.costs.cost(rag(env))
    assert c.stage("retrieve").units > c.stage("answer").units  # one 70B call on a long prompt
    assert c.total.units == pytest.approx(c.stage("retrieve").units + c.stage("answer").units)


# -- the calibration targets (docs/pipelines.md) ----------------------------------------------


@pytest.fixture(scope="module", params=sorted(BUILTIN_PIPELINES))
def cal(request):
    return calibration(request.param, seed=0, n=2000)


#: finding 1 per profile: stage -> (preferred model, fewest samples, most samples)
PREFERRED = {
    "rag": {"retrieve": (L, 1, 1), "answer": (M, 16, 48)},
    "tool-use": {"decompose": (E, 12, 32), "select": (L, 2, 4), "fill": (L, 1, 1)},
}


def test_finding_1_stages_prefer_different_models_and_sample_counts(cal):
    for stage, (model, lo, hi) in PREFERRED[cal["profile"]].items():
        m, k = cal["stages"][stage]["best"]
        assert m == model and lo <= k <= hi, (stage, m, k)
    # the preference is clear: the best beats every other model's best by a margin
    for stage, st in cal["stages"].items():
        best_model = st["best"][0]
        others = max(r["accuracy"] for r in st["rows"] if r["model"] != best_model)
        assert st["best_accuracy"] - others >= 0.01, stage


def test_finding_2_returns_diminish_with_an_interior_optimum(cal):
    pts = dict(cal["curve"]["points"])
    ks = sorted(pts)
    k_best = cal["curve"]["best_samples"]
    assert ks[0] < k_best < ks[-1] and k_best >= 8
    assert pts[ks[-1]] <= pts[k_best] - 0.015  # too many samples stop helping, then hurt
    assert pts[4] - pts[1] > 2 * (pts[k_best] - pts[4])  # the first samples buy the most


def test_finding_3_allocations_interact(cal):
    i = cal["interaction"]
    # a weaker first stage makes the downstream samples worth more
    assert i["weak"]["gain"] >= i["strong"]["gain"] + 0.005
    t = cal["tight"]
    # just under the sum of the per-stage optima, the optima do not fit ...
    assert t["optimum"]["units"] > t["budget_units"] >= t["best"]["units"]
    # ... and the best allocation, trading between the stages, gives up little
    assert t["best"]["accuracy"] >= t["optimum"]["accuracy"] - 0.02
    assert max(t["best_keeping_first"], t["best_cutting_first"]) == t["best"]["accuracy"]


def test_calibration_figures_are_deterministic():
    a = calibration("rag", seed=3, n=200)
    b = calibration("rag", seed=3, n=200)
    assert a == b
    assert np.isfinite(a["tight"]["best"]["accuracy"])


def test_a_bad_pipeline_profile_is_one_line_naming_the_file_and_stage(tmp_path):
    import yaml

    from graphtune.envs.simulated.pipelines import load_pipeline_profile

    good = yaml.safe_load(BUILTIN_PIPELINES["rag"].read_text())

    def write(data):
        p = tmp_path / "p.yaml"
        p.write_text(yaml.safe_dump(data))
        return p

    cases = [
        (lambda d: d["stages"]["answer"].update(inputs=["question", "rerank"]), "unknown input 'rerank'"),
        (lambda d: d["stages"]["answer"].update(degraded={"nonsense": 1}), "stage 'answer': `degraded`"),
        (lambda d: d["stages"]["retrieve"].update(extra=1), "stage 'retrieve' has unknown keys"),
        (lambda d: d["stages"]["retrieve"]["profile"]["models"].update({"llama-3.2-1b": {"accuracy": 2}}),
         "stage retrieve"),
        (lambda d: d.update(typo=1), "unknown keys ['typo']"),
    ]
    for change, needle in cases:
        d = yaml.safe_load(yaml.safe_dump(good))
        change(d)
        with pytest.raises(EnvError) as err:
            load_pipeline_profile(write(d))
        assert needle in str(err.value) and "\n" not in str(err.value), (needle, str(err.value))
    with pytest.raises(EnvError, match="neither built in"):
        load_pipeline_profile("no-such-profile")
