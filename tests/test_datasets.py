"""Loading datasets from files and the Hub, presets, and the dev/test split."""

from __future__ import annotations

import csv
import json
import sys
import time
import types
from pathlib import Path

import pytest

from graphtune.envs import datasets as ds
from graphtune.envs.datasets import PRESETS, Example, load_dataset, split_examples
from graphtune.errors import EnvError

from datafiles import DATA, SOURCES


ROWS = [
    {"qid": "a", "prompt": "1+1?", "gold": "2", "level": 1},
    {"qid": "b", "prompt": "2+2?", "gold": "4", "level": 2},
    {"qid": "c", "prompt": "3+3?", "gold": "6", "level": 3},
]


def _write(path: Path, rows=ROWS) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".parquet":
        pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (parquet support is optional)")
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


FIELDS = {"id": "qid", "question": "prompt", "answer": "gold"}


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_format_with_field_mapping(tmp_path, suffix):
    path = _write(tmp_path / f"data{suffix}")
    exs = load_dataset(str(path), fields=FIELDS)
    assert [e.id for e in exs] == ["a", "b", "c"]
    assert exs[0].question == "1+1?" and str(exs[0].answer) == "2"
    assert str(exs[2].meta["level"]) == "3"  # unmapped columns land in meta
    assert "prompt" not in exs[0].meta and "qid" not in exs[0].meta
    assert isinstance(exs[0], Example)
    with pytest.raises(TypeError):
        exs[0].meta["x"] = 1  # read-only


def test_default_names_numbering_extras_and_limit(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"question": "q1", "answer": 1, "src": "x"},
                                         {"question": "q2", "answer": 2, "src": "y"}])
    exs = load_dataset(str(path))
    assert [e.id for e in exs] == ["0", "1"] and exs[1].answer == 2
    exs = load_dataset(str(path), fields={"origin": "src"}, limit=1)
    assert len(exs) == 1 and exs[0].meta["origin"] == "x"


def test_json_object_with_data_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [{"question": "q", "answer": "a"}]}))
    assert load_dataset(str(path))[0].answer == "a"


def test_missing_column_lists_available_columns(tmp_path):
    path = _write(tmp_path / "d.jsonl")
    with pytest.raises(EnvError) as e:
        load_dataset(str(path))
    msg = str(e.value)
    assert "d.jsonl" in msg and "'question'" in msg and "qid, prompt, gold, level" in msg
    assert "fields.question" in msg and "\n" not in msg
    with pytest.raises(EnvError, match="no column 'answr' for field 'answer'"):
        load_dataset(str(path), fields={"question": "prompt", "answer": "answr"})


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(EnvError, match="nope.jsonl: file not found"):
        load_dataset(str(tmp_path / "nope.jsonl"))
    with pytest.raises(EnvError, match="unknown file type '.txt'"):
        load_dataset(str(tmp_path / "x.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": 1}\n{not json\n')
    with pytest.raises(EnvError, match=r"bad.jsonl:2: not valid JSON"):
        load_dataset(str(bad))
    dup = _write(tmp_path / "dup.jsonl", [{"id": 1, "question": "q", "answer": 1}] * 2)
    with pytest.raises(EnvError, match="duplicate id '1'"):
        load_dataset(str(dup))
    with pytest.raises(EnvError, match="preset 'gsm9k' is unknown; known presets: gsm8k"):
        load_dataset(str(dup), preset="gsm9k")


def test_preset_with_renamed_columns(tmp_path):
    path = _write(tmp_path / "m.jsonl", [{"prob": "What is 1/2 + 0?", "ans": "\\frac12"}])
    exs = load_dataset(str(path), preset="math500", fields={"question": "prob", "answer": "ans"})
    assert exs[0].question == "What is 1/2 + 0?" and exs[0].answer == "\\frac12" and exs[0].id == "math500/0"
    with pytest.raises(EnvError, match=r"no column 'problem' for field 'question' \(preset math500\)"):
        load_dataset(str(path), preset="math500")


def test_mmlu_preset_accepts_the_hub_shape(tmp_path):
    path = _write(tmp_path / "mmlu.jsonl", [{"question": "Capital of France?", "subject": "geo",
                                             "choices": ["London", "Paris", "Rome", "Berlin"], "answer": 1}])
    ex = load_dataset(str(path), preset="mmlu")[0]
    assert ex.answer == "B" and ex.meta["options"][1] == "Paris" and ex.meta["topic"] == "geo"
    assert ex.question.endswith("A. London\nB. Paris\nC. Rome\nD. Berlin")


# ----------------------------------------------------------------------------- shared data


@pytest.mark.parametrize("data", SOURCES)
@pytest.mark.parametrize("preset,path", [("gsm8k", "gsm8k/test.jsonl"), ("math500", "math500/test.jsonl"),
                                         ("mmlu", "mmlu/test.jsonl"), ("humaneval", "humaneval/HumanEval.jsonl"),
                                         ("mbpp", "mbpp/mbpp.jsonl")])
def test_presets_on_shared_data(preset, path, data):
    exs = load_dataset(str(DATA[data] / path), preset=preset, limit=20)
    assert len(exs) == 20 and len({e.id for e in exs}) == 20
    e = exs[0]
    if preset == "gsm8k":
        assert e.answer == "18" and e.meta["solution"].endswith("#### 18")
    elif preset == "math500":
        assert e.answer == "\\left( 3, \\frac{\\pi}{2} \\right)" and e.meta["subject"] == "Precalculus"
    elif preset == "mmlu":
        assert e.answer in "ABCD" and "\nA. " in e.question and "\nD. " in e.question
        assert len(e.meta["options"]) == 4
    elif preset == "humaneval":
        assert e.id == "HumanEval/0" and e.question == e.meta["prompt"]
        assert e.meta["entry_point"] == "has_close_elements" and "def check" in e.meta["test"]
    elif preset == "mbpp":
        assert e.id == "1" and e.meta["test_list"][0].startswith("assert min_cost")
        assert "Your code should pass these tests" in e.question and e.meta["test_list"][0] in e.question


#: rows of each set: the full data, and the in-repo subsets (examples/data/README.md)
SIZES = {"full": {"gsm8k": 1319, "math500": 500, "humaneval": 164, "mbpp": 974},
         "subset": {"gsm8k": 100, "math500": 40, "humaneval": 20, "mbpp": 20}}


@pytest.mark.parametrize("data", SOURCES)
def test_whole_sets_load_quickly(data):
    t0 = time.monotonic()
    n = {p: len(load_dataset(str(DATA[data] / f), preset=p)) for p, f in
         [("gsm8k", "gsm8k/test.jsonl"), ("math500", "math500/test.jsonl"), ("humaneval", "humaneval/HumanEval.jsonl"),
          ("mbpp", "mbpp/mbpp.jsonl")]}
    assert n == SIZES[data]
    assert time.monotonic() - t0 < 10


def test_every_preset_has_a_hub_source():
    assert set(PRESETS) == {"gsm8k", "math500", "mmlu", "humaneval", "mbpp"}
    assert all(p.hf.startswith("hf:") for p in PRESETS.values())


# ----------------------------------------------------------------------------- the Hub


def test_hf_offline_env_var_fails_fast_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(EnvError) as e:
        load_dataset("hf:openai/gsm8k:main@test")
    assert time.monotonic() - t0 < 1
    msg = str(e.value)
    assert msg.startswith("cannot reach the Hugging Face Hub to load hf:openai/gsm8k:main@test")
    assert msg.endswith("download the file and point task.dataset at it") and "\n" not in msg


def test_hf_unreachable_host_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(ds, "_HF_HOST", "graphtune-test.invalid")  # never resolves
    t0 = time.monotonic()
    with pytest.raises(EnvError, match="cannot reach the Hugging Face Hub to load hf:mbpp"):
        load_dataset("hf:mbpp")
    assert time.monotonic() - t0 < ds._HF_PROBE_TIMEOUT_S + 1.5


def test_hf_bad_source_syntax():
    with pytest.raises(EnvError, match="expected hf:NAME"):
        load_dataset("hf:")


def test_hf_loads_through_datasets_when_online(monkeypatch):
    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return [{"question": "Q?", "answer": "steps\n#### 1,234"}]

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(ds, "_hub_reachable", lambda *a, **k: True)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load))
    exs = load_dataset("hf:openai/gsm8k:main@train", preset="gsm8k", limit=5)
    assert calls == [("openai/gsm8k", "main", "train[:5]")]
    assert exs[0].answer == "1234" and exs[0].id == "gsm8k/0"
    load_dataset("hf:mbpp", fields={"question": "question", "answer": "answer"})
    assert calls[-1] == ("mbpp", None, "test")

    def broken(name, config, split):
        raise ValueError("BuilderConfig 'nope' not found.\nAvailable: ['main']")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=broken))
    with pytest.raises(EnvError, match=r"hf:openai/gsm8k:nope: the Hub could not load it \(ValueError: Builder"):
        load_dataset("hf:openai/gsm8k:nope")


# ----------------------------------------------------------------------------- split


def _exs(n):
    return [Example(id=f"q{i}", question=f"question {i}", answer=i, meta={}) for i in range(n)]


def test_split_is_deterministic_disjoint_and_order_independent():
    exs = _exs(50)
    dev, test = split_examples(exs, dev_size=10, test_size=15, seed=7)
    assert len(dev) == 10 and len(test) == 15
    assert not {e.id for e in dev} & {e.id for e in test}
    again = split_examples(list(reversed(exs)), dev_size=10, test_size=15, seed=7)
    assert [e.id for e in again[0]] == [e.id for e in dev] and [e.id for e in again[1]] == [e.id for e in test]
    other = split_examples(exs, dev_size=10, test_size=15, seed=8)
    assert [e.id for e in other[0]] != [e.id for e in dev]
    # pinned: the split must not change across versions and platforms
    dev, test = split_examples(_exs(10), dev_size=3, test_size=2, seed=0)
    assert [e.id for e in dev] == ["q8", "q7", "q5"] and [e.id for e in test] == ["q2", "q4"]


def test_split_sizes_are_checked():
    with pytest.raises(EnvError, match="has 5 examples but dev_size \\+ test_size = 6"):
        split_examples(_exs(5), dev_size=3, test_size=3, seed=0)
    with pytest.raises(EnvError, match=">= 0"):
        split_examples(_exs(5), dev_size=-1, test_size=3, seed=0)
    dev, test = split_examples(_exs(5), dev_size=5, test_size=0, seed=0)
    assert len(dev) == 5 and test == []


# ----------------------------------------------------------------------------- hostile rows


def test_bad_rows_name_the_row_not_an_internal_error(tmp_path):
    from graphtune.errors import DatasetError

    cases = [
        ({"question": "q", "correct_answer": 7, "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d"},
         "mmlu", "answer index 7 is not 0..3"),
        ({"question": "q", "choices": 5, "answer": 0}, "mmlu", "TypeError"),
        ({"text": "q", "test_list": 3, "code": "x"}, "mbpp", "TypeError"),
        ({"question": None, "answer": "2"}, None, "the question (column 'question') is empty"),
        ({"question": None, "answer": "#### 2"}, "gsm8k", "the question (column 'question') is empty"),
    ]
    for row, preset, why in cases:
        p = _write(tmp_path / "bad.jsonl", [row])
        with pytest.raises(DatasetError) as e:
            load_dataset(str(p), preset=preset)
        msg = str(e.value)
        assert "\n" not in msg and "row 1" in msg and why in msg, msg
        assert e.value.exit_code == 2


def test_invalid_utf8_dataset_is_one_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"question": "1+1?", "answer": "2"}\n{"question": "\xff\xfe", "answer": "3"}\n')
    with pytest.raises(EnvError, match="not valid UTF-8 text") as e:
        load_dataset(str(p))
    assert e.value.exit_code == 2


# Property-based: whatever the rows hold, loading ends in examples or one DatasetError line.
hyp = pytest.importorskip("hypothesis", reason="property tests need hypothesis (the `test` extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DATASET_TRIES: dict[str, int] = {}

CELL = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True),
                 st.text(max_size=30), st.sampled_from(["", "😀" * 50, "x" * 200_000, "\x00", "#### 12", "(B)", "7"]),
                 st.lists(st.text(max_size=5), max_size=5), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                           max_size=2))
COLUMNS = st.sampled_from(["id", "question", "answer", "prompt", "problem", "text", "test_list", "code", "choices",
                           "option_a", "option_b", "option_c", "option_d", "correct_answer", "test", "entry_point",
                           "task_id", "canonical_solution", "unique_id", "subject", "extra", ""])
#: a well-formed row per preset (None: generic columns), mutated by the property below
TEMPLATES = {
    None: {"id": "a", "question": "1+1?", "answer": "2"},
    "gsm8k": {"question": "1+1?", "answer": "so #### 2"},
    "math500": {"problem": "x?", "answer": "1", "unique_id": "u1", "level": 1},
    "mmlu": {"question": "q?", "choices": ["a", "b", "c", "d"], "answer": 1, "subject": "s"},
    "humaneval": {"task_id": "t", "prompt": "def f():", "test": "assert 1", "entry_point": "f",
                  "canonical_solution": "  pass"},
    "mbpp": {"task_id": 1, "text": "write f", "test_list": ["assert f()"], "code": "def f(): pass"},
}


@st.composite
def preset_rows(draw):
    preset = draw(st.sampled_from(list(TEMPLATES)))
    rows = []
    for i in range(draw(st.integers(0, 5))):
        row = dict(TEMPLATES[preset])
        if "id" in row or "task_id" in row or "unique_id" in row:
            row[next(k for k in ("id", "task_id", "unique_id") if k in row)] = f"r{i}"
        for _ in range(draw(st.integers(0, 3))):
            op = draw(st.sampled_from(["delete", "value", "value", "junk"]))
            key = draw(st.sampled_from(sorted(row) or ["question"]))
            if op == "delete":
                row.pop(key, None)
            elif op == "value":
                row[key] = draw(CELL)
            else:
                row[draw(COLUMNS)] = draw(CELL)
        rows.append(row)
    return preset, rows


#: GRAPHTUNE_FUZZ_SCALE=20 tries 20 times as many inputs, with a random seed (a deeper local run)
_SCALE = float(__import__("os").environ.get("GRAPHTUNE_FUZZ_SCALE", "1"))
HOSTILE = settings(max_examples=max(1, int(150 * _SCALE)), deadline=None, derandomize=_SCALE == 1, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                          HealthCheck.data_too_large])


def _try_load(path: Path, preset, fields, category: str) -> None:
    try:
        exs = load_dataset(str(path), preset=preset, fields=fields)
        split_examples(exs, dev_size=min(1, len(exs)), test_size=0, seed=0)
        ok = "ok"
    except EnvError as e:
        msg = str(e)
        assert msg and "\n" not in msg, msg
        ok = "bad"
    key = f"datasets {category} ({ok})"
    DATASET_TRIES[key] = DATASET_TRIES.get(key, 0) + 1


@HOSTILE
@given(preset_and_rows=preset_rows(), fmt=st.sampled_from([".jsonl", ".json", ".csv"]),
       fields=st.one_of(st.none(), st.none(), st.dictionaries(st.sampled_from(["id", "question", "answer", "topic"]),
                                                              COLUMNS, max_size=2)))
def test_any_rows_load_or_fail_in_one_line(tmp_path, preset_and_rows, fmt, fields):
    preset, rows = preset_and_rows
    p = tmp_path / f"data{fmt}"
    if fmt == ".jsonl":
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == ".json":
        p.write_text(json.dumps(rows))
    else:
        cols = sorted({k for r in rows for k in r}) or ["question"]
        with p.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    _try_load(p, preset, fields, "rows")


@HOSTILE
@given(raw=st.one_of(st.binary(max_size=300),
                     st.lists(st.sampled_from([b'"', b'""', b",", b"\n", b"\r\n", b"question,answer\n", b'"a,b"',
                                               b"\xff", b"\x00", b"q", b"1", b"{", b"}", b'{"question": "x"}',
                                               b"[", b"]", b"null", b"NaN", b"[" * 5000]),
                              max_size=40).map(b"".join)),
       fmt=st.sampled_from([".jsonl", ".json", ".csv"]), preset=st.sampled_from([None, "gsm8k", "mmlu"]))
def test_any_bytes_load_or_fail_in_one_line(tmp_path, raw, fmt, preset):
    p = tmp_path / f"data{fmt}"
    p.write_bytes(raw)
    _try_load(p, preset, None, "bytes")


def test_zz_dataset_counts_reported():
    if DATASET_TRIES:
        print(f"\n[graphtune fuzz] inputs tried: {DATASET_TRIES}", file=sys.__stderr__)
