"""Property-based tests (hypothesis) of spec files and command-line arguments.

Every input, however damaged, ends in one of two ways: a one-line GraphtuneError (exit
code 2 for bad input on the CLI) or a valid spec / a valid run. Never a traceback, an
"internal error", a hang, or a study left half-written in the store. Each property is
bounded (``max_examples``) to stay under ~20 s on two cores; the number of inputs tried
per category is printed at the end of the module (``-s``) for docs/reliability.md.
"""

from __future__ import annotations

import copy
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis (the `test` extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from graphtune.errors import GraphtuneError, SpecError  # noqa: E402
from graphtune.spec import load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "examples").glob("*.yaml"))}
QUICK = ROOT / "examples" / "quickstart.yaml"

#: inputs tried per category (bad = ended in a one-line error, ok = valid spec or run)
COUNTS: Counter = Counter()

#: GRAPHTUNE_FUZZ_SCALE=20 tries 20 times as many inputs, with a random seed (a deeper local run)
SCALE = float(os.environ.get("GRAPHTUNE_FUZZ_SCALE", "1"))


def n(examples: int) -> int:
    return max(1, int(examples * SCALE))


FUZZ = settings(max_examples=n(150), deadline=None, derandomize=SCALE == 1, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    if COUNTS:
        line = ", ".join(f"{k}: {v}" for k, v in sorted(COUNTS.items()))
        print(f"\n[graphtune fuzz] inputs tried: {line}", file=sys.__stderr__)


def assert_one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    assert "internal error" not in msg and "Traceback" not in msg
    return msg


# -- spec mutations -----------------------------------------------------------------------


def key_paths(data, prefix=()):
    """Every key path of nested dicts/lists (dict keys and list indices)."""
    out = []
    if isinstance(data, dict):
        for k, v in data.items():
            out.append(prefix + (k,))
            out += key_paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out.append(prefix + (i,))
            out += key_paths(v, prefix + (i,))
    return out


BAD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([-1, 0, 10**400, 2**64, 1e308, -1e308]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["", " ", "😀" * 500, "x" * 100_000, "\u202e", "null", "~", "yes", "0x1F", "1e999", ".inf"]),
    st.lists(st.integers(-5, 5), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)

#: text-level damage: YAML syntax characters, anchors, tabs, control and non-UTF-8 bytes
DAMAGE = st.sampled_from([b"[", b"]", b"{", b"}", b":", b": :", b"&a ", b"*a", b"*zz", b"\t", b"- ", b"'", b'"',
                          b"\x00", b"\xff\xfe", b"\xc3", b"!!python/object:os.system ", b"!!binary ", b"<<: *a",
                          b"%YAML 9.9\n", b"---\n", b"\n...\n", b"? ", b"|\n", b">-\n", b"#", b"\r", b"\xef\xbb\xbf",
                          b"2024-13-45", b"!!int abc", b"!!float x", b"[" * 200, b"{a: " * 100])


@st.composite
def mutated_spec(draw) -> bytes:
    name = draw(st.sampled_from(sorted(EXAMPLES)))
    data = copy.deepcopy(EXAMPLES[name])
    for _ in range(draw(st.integers(1, 3))):
        paths = key_paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        last = path[-1]
        op = draw(st.sampled_from(["delete", "rename", "value", "value", "value"]))
        if op == "delete":
            del parent[last]
        elif op == "rename" and isinstance(parent, dict):
            new = draw(st.one_of(st.text(min_size=1, max_size=12), st.just(str(last) + "s"),
                                 st.just(str(last)[:-1] or "x"), st.just(str(last).upper())))
            parent[new] = parent.pop(last)
        else:
            parent[last] = draw(BAD_VALUES)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()
    if draw(st.booleans()):  # damage the YAML text itself
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(DAMAGE) + text[at:]
    if draw(st.integers(0, 9)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    return text


def check_spec_bytes(tmp_path: Path, raw: bytes, category: str) -> None:
    """Load ``raw`` as a spec and build everything a run builds before its study row;
    only one-line GraphtuneErrors may come out."""
    from graphtune.api import build_problem, make_searcher

    p = tmp_path / "spec.yaml"
    p.write_bytes(raw)
    try:
        spec = load_spec(p, overrides={"storage": f"sqlite:///{tmp_path / 'never.db'}"})
    except SpecError as e:
        assert_one_line(e)
        assert e.exit_code == 2 and str(e).startswith(str(p))
        COUNTS[f"{category} (bad)"] += 1
        return
    try:
        problem = build_problem(spec)
        try:
            if spec.search.method != "exhaustive" or spec.space.max_nodes <= 4:
                make_searcher(spec, problem.ctx).close()
        finally:
            problem.env.close()
    except GraphtuneError as e:
        assert_one_line(e)
        COUNTS[f"{category} (bad)"] += 1
        return
    assert not (tmp_path / "never.db").exists()  # nothing is stored before optimize
    COUNTS[f"{category} (ok)"] += 1


@FUZZ
@given(raw=mutated_spec())
def test_mutated_example_specs_end_in_one_line_or_a_valid_spec(tmp_path, raw):
    check_spec_bytes(tmp_path, raw, "specs")


@settings(FUZZ, max_examples=n(100))
@given(raw=st.binary(max_size=400))
def test_random_bytes_as_a_spec(tmp_path, raw):
    check_spec_bytes(tmp_path, raw, "spec bytes")


@settings(FUZZ, max_examples=n(100))
@given(options=st.dictionaries(st.sampled_from(["n0", "eta", "lr", "samples", "pareto", "pareto_weights", "proposals",
                                                "max_redraws", "n_startup_trials", "popsize", "qmc_type", "minibatch",
                                                "population_size", "max_rejects", "elite", "x"]),
                               BAD_VALUES, max_size=3),
       method=st.sampled_from(["agent-reinforce", "reinforce", "random", "tpe", "cmaes", "qmc", "nsga2", "llm-opt"]))
def test_search_options_are_checked_when_the_spec_is_loaded(tmp_path, options, method):
    data = copy.deepcopy(EXAMPLES["quickstart.yaml"])
    data["search"].update(method=method, options=options)
    check_spec_bytes(tmp_path, yaml.safe_dump(data, sort_keys=False).encode(), "search options")


# -- command-line arguments ---------------------------------------------------------------

COMMANDS = ["validate", "optimize", "studies", "trials", "show", "export", "pareto", "compare", "report", "resume",
            "dump", "init", "delete", "storage", "run", "nope", ""]
FLAGS = ["--study", "--storage", "--evaluations", "-n", "--method", "--seed", "--force", "--no-cache", "-q",
         "--top", "--format", "--select", "-o", "--output", "--spec", "--question", "-y", "--bogus", "--help"]
VALUES = st.one_of(st.sampled_from(["-1", "0", "1", "2", "99999999999999999999", "1e308", "nan", "random", "tpe",
                                    "nope", "", "x" * 300, "😀", "-", "--", "sqlite://", "sqlite:///", "postgresql://x",
                                    "best", "yaml", "mermaid", "quick", "SPEC", "STORE"]),
                   st.text(max_size=8))


def _resolve(arg: str, spec: str, store: str) -> str:
    return {"SPEC": spec, "STORE": store}.get(arg, arg)


@settings(FUZZ, max_examples=n(60))
@given(cmd=st.sampled_from(COMMANDS),
       args=st.lists(st.one_of(st.sampled_from(FLAGS), VALUES), max_size=6),
       with_spec=st.booleans())
def test_cli_arguments_end_in_one_line_or_a_valid_run(tmp_path, monkeypatch, cmd, args, with_spec):
    from typer.testing import CliRunner

    from graphtune.cli import app
    from graphtune.store.storage import Storage

    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'g.db'}"
    argv = [cmd] if cmd else []
    if with_spec and cmd in ("validate", "optimize"):
        argv.append(str(QUICK))
    argv += [_resolve(a, str(QUICK), store) for a in args]
    if cmd == "optimize":  # keep valid runs short and in the test's own store
        argv += ["--storage", store, "-n", "1", "--method", "random", "-q"]
    if cmd == "delete":
        argv.append("-y")
    r = CliRunner().invoke(app, argv)
    out = r.output
    assert "Traceback" not in out and "internal error" not in out, (argv, out)
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), (argv, r.exception)
    if r.exit_code != 0:
        last = [ln for ln in out.splitlines() if ln.strip()]
        bare_group = [a for a in argv if a != "-y"] in ([], ["storage"])  # a group alone prints its help
        if "--help" not in argv and not bare_group:
            errors = [ln for ln in last if ln.startswith("error:")]
            assert len(errors) == 1 and errors[0] == last[-1], (argv, out)
        COUNTS["cli arguments (bad)"] += 1
    else:
        COUNTS["cli arguments (ok)"] += 1
    if (tmp_path / "g.db").exists():
        s = Storage(store)
        try:
            for study in s.list_studies():  # a study is complete, or has trials to resume from
                assert study.status == "complete" or study.n_trials > 0, (argv, study)
        finally:
            s.close()


# -- the same guarantees, as plain examples (regressions) ----------------------------------


def _cli(*argv):
    from typer.testing import CliRunner

    from graphtune.cli import app

    return CliRunner().invoke(app, [str(a) for a in argv])


def test_usage_errors_are_one_line_with_exit_2(tmp_path):
    for argv in (["optimize", QUICK, "-n", "0"], ["optimize", "--bogus"], ["--bogus"], ["nope"], ["optimize"],
                 ["trials"]):
        r = _cli(*argv)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, r.output)
        assert "--help" in lines[0]


def test_a_bad_method_flag_names_the_flag_on_the_cli(tmp_path):
    r = _cli("optimize", QUICK, "--method", "genetic", "--storage", f"sqlite:///{tmp_path / 'g.db'}")
    assert r.exit_code == 2 and r.output.strip().startswith("error: --method: search.method: unknown method 'genetic'")
    assert not (tmp_path / "g.db").exists()


def test_method_flag_with_options_of_another_method_is_refused_before_anything_is_stored(tmp_path):
    p = tmp_path / "tpe.yaml"
    p.write_text(QUICK.read_text().replace("  seed: 0\n", "  seed: 0\n  options: {n_startup_trials: 4}\n")
                 .replace("method: agent-reinforce", "method: tpe"))
    r = _cli("optimize", p, "--method", "random", "--storage", f"sqlite:///{tmp_path / 'g.db'}")
    assert r.exit_code == 2 and "search.options.n_startup_trials: not an option of method 'random' (chosen by " \
                                "--method)" in r.output
    assert not (tmp_path / "g.db").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_worker_with_a_spec_that_cannot_run_creates_no_study(tmp_path):
    from graphtune.api import work
    from graphtune.errors import GraphError
    from graphtune.store.storage import Storage

    url = f"sqlite:///{tmp_path / 'w.db'}"
    p = tmp_path / "ex.yaml"
    p.write_text(QUICK.read_text().replace("  seed: 0\n", "  seed: 0\n  options: {max_graphs: 10}\n")
                 .replace("method: agent-reinforce", "method: exhaustive"))
    with pytest.raises(GraphError):
        work("w", url, spec=load_spec(p, overrides={"study": "w", "storage": url}))
    assert Storage(url).get_study("w") is None
