"""The YAML spec: a good spec resolves; each kind of mistake is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from graphtune.errors import BudgetError, GraphError, SpecError
from graphtune.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


def quick_with(tmp_path, mutate) -> Path:
    data = yaml.safe_load(QUICKSTART.read_text())
    mutate(data)
    return write(tmp_path, yaml.safe_dump(data, sort_keys=False))


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_quickstart_resolves_with_defaults():
    spec = load_spec(QUICKSTART)
    assert spec.study == "quickstart" and spec.task.profile == "math"
    assert spec.space_obj().models == ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b")
    assert spec.pool()["llama-3.1-8b"].params == 8e9
    assert spec.budget.budget().units == 18
    assert spec.resolved()["search"]["agent"]["model"] == "heuristic"


def test_overrides_from_the_cli():
    spec = load_spec(QUICKSTART, overrides={"search.seed": 7, "study": "x", "search.method": None})
    assert spec.search.seed == 7 and spec.study == "x" and spec.search.method == "agent-reinforce"


def test_typo_names_file_line_field_and_suggestion(tmp_path):
    text = QUICKSTART.read_text().replace("  units: 18", "  unitz: 18")
    p = write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = one_line(e)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "unitz" in l)
    assert f"{p}:{line}: budget.unitz: unknown field; did you mean 'units'?" in msg


def test_typo_in_a_section_name(tmp_path):
    p = write(tmp_path, QUICKSTART.read_text().replace("objective:", "objectiv:"))
    with pytest.raises(SpecError, match=r"objectiv: unknown field; did you mean 'objective'"):
        load_spec(p)


def test_wrong_type_names_the_field_and_value(tmp_path):
    p = quick_with(tmp_path, lambda d: d["search"].__setitem__("evaluations", "lots"))
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = one_line(e)
    assert "search.evaluations" in msg and "integer" in msg and "'lots'" in msg
    assert e.value.exit_code == 2


def test_unknown_model_without_constants(tmp_path):
    p = quick_with(tmp_path, lambda d: d["models"].append({"name": "my-model"}))
    with pytest.raises(SpecError, match=r"models\[4\]: model 'my-model' is not a known model .*give its params, layers and hidden"):
        load_spec(p)


def test_unknown_model_in_the_space(tmp_path):
    p = quick_with(tmp_path, lambda d: d["space"].__setitem__("models", ["llama-3.2-1b", "gpt-5"]))
    with pytest.raises(SpecError, match=r"space.models: unknown model\(s\) \['gpt-5'\]"):
        load_spec(p)


def test_unknown_method_lists_the_known_ones(tmp_path):
    p = quick_with(tmp_path, lambda d: d["search"].__setitem__("method", "genetic"))
    with pytest.raises(SpecError, match=r"search.method: unknown method 'genetic'; known methods: .*random"):
        load_spec(p)


def test_inline_secret_is_refused(tmp_path):
    p = quick_with(tmp_path, lambda d: d["models"][0].__setitem__("api_key", "sk-123"))
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert "api_key_env" in one_line(e) and "sk-123" not in str(e.value)


def test_missing_budget_and_empty_budget(tmp_path):
    p = quick_with(tmp_path, lambda d: d.pop("budget"))
    with pytest.raises(SpecError, match="budget: required field is missing"):
        load_spec(p)
    p = quick_with(tmp_path, lambda d: d.__setitem__("budget", {}))
    with pytest.raises(SpecError, match="give at least one of units"):
        load_spec(p)


def test_bad_yaml_and_missing_file(tmp_path):
    p = write(tmp_path, "task: [\n")
    with pytest.raises(SpecError, match=r"spec.yaml:\d+: not valid YAML"):
        load_spec(p)
    with pytest.raises(SpecError, match="not found; create one with `graphtune init"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="empty"):
        load_spec(write(tmp_path, ""))


def test_impossible_budget_is_caught_before_anything_runs(tmp_path):
    from graphtune.api import build_problem

    spec = load_spec(quick_with(tmp_path, lambda d: d["budget"].__setitem__("units", 0.5)))
    with pytest.raises(BudgetError, match="budget is impossible: even the cheapest graph"):
        build_problem(spec)


def test_empty_space_is_caught(tmp_path):
    from graphtune.api import build_problem

    spec = load_spec(quick_with(tmp_path, lambda d: d["space"].__setitem__("roles", ["fuser"])))
    with pytest.raises(GraphError, match="the space is empty"):
        build_problem(spec)


def test_multi_stage_is_refused_clearly(tmp_path):
    def two(d):
        d["stages"] = [{"name": "a", "task": {"profile": "math"}}, {"name": "b", "task": {"profile": "math"}}]

    with pytest.raises(SpecError, match="multi-stage pipelines are not supported yet"):
        load_spec(quick_with(tmp_path, two))


# -- hostile spec files: one line with the file (and line), never "internal error" ---------


def raw_spec(tmp_path, data: bytes) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_bytes(data)
    return p


def test_invalid_utf8_names_file_and_line(tmp_path):
    p = raw_spec(tmp_path, QUICKSTART.read_bytes().replace(b"study: quickstart", b"study: quick\xff\xfestart"))
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert f"{p}:3: not valid UTF-8 text" in one_line(e) and e.value.exit_code == 2


def test_utf16_with_a_bom_is_read_and_broken_utf16_is_refused(tmp_path):
    good = raw_spec(tmp_path, QUICKSTART.read_text().encode("utf-16"))
    assert load_spec(good).study == "quickstart"
    bad = raw_spec(tmp_path, QUICKSTART.read_text().encode("utf-16")[:-1] + b"\x00\xd8")  # odd length, lone surrogate
    with pytest.raises(SpecError) as e:
        load_spec(bad)
    assert f"{bad}:" in one_line(e) and "not valid UTF-16 text" in str(e.value)


def test_control_characters_name_the_line(tmp_path):
    p = raw_spec(tmp_path, QUICKSTART.read_bytes().replace(b"profile: math", b"profile: ma\x00th"))
    with pytest.raises(SpecError) as e:
        load_spec(p)
    line = next(i for i, ln in enumerate(QUICKSTART.read_text().splitlines(), 1) if "profile: math" in ln)
    assert f"{p}:{line}: not valid YAML" in one_line(e)


def test_recursive_anchor_is_refused(tmp_path):
    p = write(tmp_path, QUICKSTART.read_text() + "stages: &s [{name: a, task: *s}]\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert "recursive" in one_line(e) and f"{p}:" in str(e.value)


def test_very_deep_nesting_is_refused(tmp_path):
    p = write(tmp_path, QUICKSTART.read_text().replace("  scorer_options", "") +
              "stages: " + "[" * 20_000 + "]" * 20_000 + "\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert "nested more than" in one_line(e) and f"{p}:" in str(e.value)


def alias_bomb() -> bytes:
    """Nine levels of nine aliases: under 1 KB that expands to 9**9 (387 million) values."""
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    return ("\n".join(lines) + "\nstudy: *i\n").encode()


def test_alias_bomb_is_refused_at_once(tmp_path):
    import time

    bomb = alias_bomb()
    assert len(bomb) < 1024
    p = raw_spec(tmp_path, bomb)
    t0 = time.perf_counter()
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert time.perf_counter() - t0 < 5  # was minutes and 6 GB
    assert f"{p}:" in one_line(e) and "expands to more than" in str(e.value)


def test_ordinary_aliases_still_work(tmp_path):
    text = QUICKSTART.read_text().replace("  roles: [assistant, fuser]", "  roles: &roles [assistant, fuser]\n"
                                          "  sink_roles: *roles")
    assert load_spec(write(tmp_path, text)).space.sink_roles == ("assistant", "fuser")


def test_a_value_yaml_cannot_build_names_its_line(tmp_path):
    p = write(tmp_path, QUICKSTART.read_text().replace("study: quickstart", "study: 2024-13-45"))
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert f"{p}:3: not valid YAML: cannot read the value '2024-13-45'" in one_line(e)


def test_negative_seed_is_refused_with_its_line_or_its_flag(tmp_path):
    p = quick_with(tmp_path, lambda d: d["search"].__setitem__("seed", -1))
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert f"{p}:" in one_line(e) and "search.seed: Input should be greater than or equal to 0" in str(e.value)
    with pytest.raises(SpecError) as e:
        load_spec(QUICKSTART, overrides={"search.seed": -1}, flags={"search.seed": "--seed"})
    assert one_line(e).startswith("--seed: search.seed:") and str(QUICKSTART) not in str(e.value)


@pytest.mark.parametrize("value", [1e308, float("inf"), float("nan")])
def test_absurd_token_counts_are_refused(tmp_path, value):
    p = quick_with(tmp_path, lambda d: d["task"].__setitem__("input_tokens", value))
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert f"{p}:" in one_line(e) and "task.input_tokens" in str(e.value)


def test_infinite_budget_is_refused(tmp_path):
    p = write(tmp_path, QUICKSTART.read_text().replace("units: 18", "units: .inf"))
    with pytest.raises(SpecError, match=r"budget.units: Input should be a finite number"):
        load_spec(p)


# -- search.options: typed per method, checked when the spec is loaded ----------------------


def with_options(tmp_path, options: str, method: str = "agent-reinforce") -> tuple[Path, int]:
    text = QUICKSTART.read_text().replace("  method: agent-reinforce", f"  method: {method}")
    text = text.replace("  seed: 0\n", f"  seed: 0\n  options:\n{options}")
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if ln == "  options:") + 1
    return write(tmp_path, text), line


def test_unknown_option_names_file_line_and_the_allowed_ones(tmp_path):
    p, line = with_options(tmp_path, "    minibatch: 5\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = one_line(e)
    assert msg.startswith(f"{p}:{line}: search.options.minibatch: not an option of method 'agent-reinforce'")
    assert "allowed: n0, eta" in msg and "proposals" in msg


def test_option_typo_gets_a_suggestion(tmp_path):
    p, line = with_options(tmp_path, "    max_redraw: 5\n", method="random")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert f"{p}:{line}: search.options.max_redraw" in one_line(e) and "did you mean 'max_redraws'?" in str(e.value)


@pytest.mark.parametrize("options,field", [("    lr: fast\n", "lr"), ("    n0: 0\n", "n0"),
                                           ("    pareto: joules\n", "pareto"), ("    lr: .nan\n", "lr")])
def test_bad_option_values_name_their_line(tmp_path, options, field):
    p, line = with_options(tmp_path, "    eta: 3\n" + options)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert one_line(e).startswith(f"{p}:{line + 1}: search.options.{field}:")


def test_good_options_load(tmp_path):
    p, _ = with_options(tmp_path, "    n0: 8\n    pareto: units\n    proposals: 2\n")
    assert load_spec(p).search.options == {"n0": 8, "pareto": "units", "proposals": 2}


def test_method_flag_rechecks_the_options(tmp_path):
    p, line = with_options(tmp_path, "    n_startup_trials: 4\n", method="tpe")
    assert load_spec(p).search.method == "tpe"
    with pytest.raises(SpecError) as e:
        load_spec(p, overrides={"search.method": "random"}, flags={"search.method": "--method"})
    assert one_line(e).startswith(f"{p}:{line}: search.options.n_startup_trials: not an option of method "
                                  "'random' (chosen by --method)")


def test_a_bad_method_flag_is_blamed_on_the_flag(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(QUICKSTART, overrides={"search.method": "genetic"}, flags={"search.method": "--method"})
    msg = one_line(e)
    assert msg.startswith("--method: search.method: unknown method 'genetic'") and str(QUICKSTART) not in msg


def test_every_method_declares_a_strict_options_model():
    from graphtune.search.base import SearcherOptions
    from graphtune.search.registry import SEARCHERS, options_model

    for name in SEARCHERS:
        model = options_model(name)
        assert issubclass(model, SearcherOptions) and model.model_config.get("extra") == "forbid", name
        model()  # every option has a default


def test_a_searcher_built_from_python_checks_its_options_too():
    from graphtune.api import build_problem
    from graphtune.search.base import SearchContext
    from graphtune.search.reinforce import ReinforceSearcher

    ctx = build_problem(load_spec(QUICKSTART)).ctx
    bad = SearchContext(**{**ctx.__dict__, "options": {"minibatch": 5}})
    with pytest.raises(SpecError, match="search.options.minibatch: not an option of method 'reinforce'"):
        ReinforceSearcher(bad)


# -- a failed start leaves no study behind -------------------------------------------------


def test_spec_failing_at_searcher_construction_leaves_no_study(tmp_path):
    from graphtune.api import optimize
    from graphtune.store.storage import Storage

    db = f"sqlite:///{tmp_path / 'g.db'}"
    bad, _ = with_options(tmp_path, "    max_graphs: 10\n", method="exhaustive")  # the space has more graphs
    spec = load_spec(bad, overrides={"storage": db, "search.evaluations": 1})
    with pytest.raises(GraphError):
        optimize(spec)
    store = Storage(db)
    assert store.get_study("quickstart") is None
    good = load_spec(QUICKSTART, overrides={"storage": db, "search.evaluations": 1, "search.method": "random"})
    _, st, out = optimize(good)
    assert st.status == "complete" and out.n_trials >= 1


def test_failure_before_the_first_trial_removes_the_new_study(tmp_path, monkeypatch):
    from graphtune.api import optimize
    from graphtune.envs.simulated import SimulatedEnvironment
    from graphtune.errors import EnvError
    from graphtune.store.storage import Storage

    db = f"sqlite:///{tmp_path / 'g.db'}"
    spec = load_spec(QUICKSTART, overrides={"storage": db, "search.evaluations": 1, "search.method": "random"})

    def refuse(self, graph, ids):
        raise EnvError("endpoint refused the first call")

    with monkeypatch.context() as m:
        m.setattr(SimulatedEnvironment, "evaluate", refuse)
        with pytest.raises(EnvError):
            optimize(spec)
    assert Storage(db).get_study("quickstart") is None
    _, st, _ = optimize(spec)  # the same spec runs once the endpoint answers
    assert st.status == "complete" and st.n_trials >= 1


# -- env: one model per kind; stages: absent or one stage equal to the top level -----------

LIVE = """
study: l
task: {dataset: qs.jsonl, scorer: numeric}
models: [{name: llama-3.2-1b, litellm: openai/echo, api_base: "http://127.0.0.1:9/v1"}]
budget: {units: 10}
env:
  kind: live
  concurrency: 4
  max_tokens: 32
"""

REPLAY = """
study: r
task: {dev_size: 5, test_size: 5}
models: [{name: llama-3.2-1b}]
budget: {units: 10}
env:
  kind: replay
  records: table.csv
  synthesis: math
"""


def line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")) +
                         sorted((ROOT / "src" / "graphtune" / "templates").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_loads(path):
    spec = load_spec(path)
    assert spec.env.kind in ("simulated", "live", "replay")


def test_each_env_kind_loads_with_only_its_own_fields(tmp_path):
    from graphtune.spec import LiveEnv, ReplayEnv, SimulatedEnv

    sim = load_spec(QUICKSTART)
    assert isinstance(sim.env, SimulatedEnv) and sim.env.seed == 0 and not hasattr(sim.env, "concurrency")
    live = load_spec(write(tmp_path, LIVE))
    assert isinstance(live.env, LiveEnv)
    assert (live.env.concurrency, live.env.max_tokens, live.env.cache) == (4, 32, True)
    rep = load_spec(write(tmp_path, REPLAY))
    assert isinstance(rep.env, ReplayEnv) and rep.env.records == "table.csv" and rep.env.synthesis == "math"
    assert rep.records_source().endswith("table.csv")
    assert set(live.resolved()["env"]) == set(LiveEnv.model_fields)
    assert sim.resolved()["env"] == {"kind": "simulated", "seed": 0}


def test_env_without_kind_is_the_simulator(tmp_path):
    for env in ("env: {seed: 3}\n", "env: {}\n", ""):
        spec = load_spec(write(tmp_path, QUICKSTART.read_text().replace("env:\n  kind: simulated\n", env)))
        assert spec.env.kind == "simulated"
    assert load_spec(write(tmp_path, QUICKSTART.read_text().replace("  kind: simulated", "  seed: 3"))).env.seed == 3


def test_a_field_of_another_env_kind_is_refused_with_its_line(tmp_path):
    text = LIVE + "  records: table.csv\n"
    p = write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = one_line(e)
    assert msg.startswith(f"{p}:{line_of(text, 'records:')}: env.records: not a field of env kind 'live', "
                          "only of kind 'replay'; allowed: kind, seed, concurrency, cache,")
    text = REPLAY + "  concurrency: 4\n"
    p = write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert f"{p}:{line_of(text, 'concurrency')}: env.concurrency: not a field of env kind 'replay', only of kind " \
           "'live'; allowed: kind, seed, records, task, synthesis" in one_line(e)
    # no kind: the simulator's, which has no call cache
    text = QUICKSTART.read_text().replace("  kind: simulated", "  cache: false")
    p = write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert f"{p}:{line_of(text, 'cache: false')}: env.cache: not a field of env kind 'simulated' (the default when " \
           "`kind` is omitted), only of kind 'live'; allowed: kind, seed" in one_line(e)


def test_an_unknown_env_field_or_kind_is_refused_with_its_line(tmp_path):
    text = LIVE + "  concurency: 4\n"
    p = write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert f"{p}:{line_of(text, 'concurency')}: env.concurency: not a field of env kind 'live'; did you mean " \
           "'concurrency'? allowed: kind, seed," in one_line(e)
    text = QUICKSTART.read_text().replace("kind: simulated", "kind: simulator")
    p = write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert f"{p}:{line_of(text, 'kind: simulator')}: env.kind: must be one of 'simulated', 'live', 'replay' " \
           "(got 'simulator')" in one_line(e)


def test_no_cache_turns_off_a_live_cache_and_leaves_other_kinds_alone(tmp_path):
    from graphtune.spec import without_cache

    live = load_spec(write(tmp_path, LIVE))
    off = without_cache(live)
    assert off.env.cache is False and live.env.cache is True and off._source_dir == live._source_dir
    sim = load_spec(QUICKSTART)
    assert without_cache(sim) is sim


def test_a_store_written_with_the_flat_env_loads_dropping_other_kinds_fields():
    from graphtune.api import _spec_of_study, changed_fields, stored_spec

    spec = load_spec(QUICKSTART)
    new = stored_spec(spec)
    old = dict(new, env={"kind": "simulated", "seed": 0, "concurrency": 16, "cache": True, "timeout_s": 60.0,
                         "max_retries": 2, "max_consecutive_failures": 20, "retry_after_max_s": 60.0,
                         "temperature": 0.0, "max_tokens": 256, "records": None, "task": None, "synthesis": "math"})
    assert _spec_of_study(old, "quickstart", "sqlite://").env == spec.env
    assert changed_fields(old, new) == []
    assert changed_fields(dict(old, env=dict(old["env"], seed=1)), new) == [("env", "seed")]


def test_one_stage_equal_to_the_top_level_is_accepted(tmp_path):
    text = QUICKSTART.read_text() + "stages:\n  - name: only\n    task: {profile: math, dev_size: 100, " \
                                    "test_size: 500}\n    budget: {units: 18}\n"
    spec = load_spec(write(tmp_path, text))
    assert len(spec.stages) == 1 and spec.stages[0].task == spec.task
    again = load_spec(write(tmp_path, QUICKSTART.read_text() + "stages: [{name: only, task: {profile: math}}]\n"))
    from graphtune.api import _spec_of_study, stored_spec

    assert _spec_of_study(stored_spec(again), "q", "sqlite://").stages == again.stages  # a stored one reloads


@pytest.mark.parametrize("stages, why", [
    ("[]", "got 0 stages"),
    ("[{name: a, task: {profile: math}}, {name: b, task: {profile: math}}]", "got 2 stages"),
    ("[{name: a, task: {profile: mmlu}}]", "stages[0].task differs from the top-level task"),
    ("[{name: a, task: {profile: math}, space: {max_nodes: 2}}]", "stages[0].space differs"),
    ("[{name: a, task: {profile: math}, budget: {units: 5}}]", "stages[0].budget differs"),
])
def test_stages_a_single_run_would_not_honour_are_refused_with_their_line(tmp_path, stages, why):
    text = QUICKSTART.read_text() + f"stages: {stages}\n"
    p = write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = one_line(e)
    assert msg.startswith(f"{p}:{line_of(text, 'stages:')}: stages: multi-stage pipelines are not supported yet")
    assert why in msg
