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
