"""Task datasets: load questions and reference answers, split them into dev and test.

A dataset is a list of :class:`Example` values. :func:`load_dataset` reads them from a
local file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``) or from the Hugging Face Hub
(``hf:NAME[:config][@split]``, through the optional ``datasets`` package), maps the
file's columns to ours (``fields``) and, for the benchmark sets graphtune knows
(``preset``), formats the question the way the benchmark expects:

========== ============================================ ==================================
preset     question                                     answer / meta
========== ============================================ ==================================
gsm8k      ``question``                                 final number (after ``####``);
                                                        meta ``solution``
math500    ``problem``                                  ``answer`` (LaTeX); meta
                                                        ``solution``, ``subject``, ``level``
mmlu       question + ``A. ..`` .. ``D. ..`` options    letter A-D; meta ``options``,
                                                        ``topic``
humaneval  ``prompt``                                   ``canonical_solution``; meta
                                                        ``prompt``, ``test``, ``entry_point``
mbpp       ``text`` + its test asserts                  ``code``; meta ``test_list``,
                                                        ``test_setup_code``,
                                                        ``challenge_test_list``
========== ============================================ ==================================

Every error is an :class:`~graphtune.errors.EnvError` of one line naming the file or
field and the fix.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from graphtune.errors import DatasetError, EnvError

__all__ = ["Example", "PRESETS", "load_dataset", "split_examples"]

_HF_HOST = "huggingface.co"
_HF_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Example:
    """One question of a task. ``meta`` holds what scorers need beyond the answer
    (HumanEval ``test``/``entry_point``/``prompt``; MBPP ``test_list``; MMLU ``options``)."""

    id: str
    question: str
    answer: Any
    meta: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


# --------------------------------------------------------------------------- presets


def _gsm8k_final(solution: Any) -> str:
    """The final number of a GSM8K worked solution (``... #### 1,234`` -> ``1234``)."""
    m = re.search(r"####\s*(.+?)\s*$", str(solution).strip())
    return m.group(1).replace(",", "").strip() if m else str(solution).strip()


def _text(value: Any) -> str:
    """A question cell as text; a missing value (null, an empty CSV cell) is empty, not "None"."""
    return "" if value is None else str(value)


def _columns(raw: Mapping[str, Any], most: int = 20) -> str:
    """A row's column names for an error line (odd ones quoted: a name may hold a newline)."""
    names = [(str(c) if str(c).isprintable() and str(c).strip() else repr(str(c)))[:40] for c in list(raw)[:most]]
    return ", ".join(names) + (f", ... ({len(raw)} in all)" if len(raw) > most else "") if names else "(none)"


class _MissingColumn(Exception):
    def __init__(self, ours: str, column: str):
        super().__init__(column)
        self.ours, self.column = ours, column


class _Row:
    """One raw row seen through ``fields`` (our name -> the file's column), with the
    preset's own column names as defaults."""

    def __init__(self, raw: Mapping[str, Any], fields: Mapping[str, str]):
        self.raw, self.fields = raw, fields

    def has(self, ours: str, default: str | None = None) -> bool:
        return self.fields.get(ours, default or ours) in self.raw

    def get(self, ours: str, default: str | None = None, *, required: bool = True) -> Any:
        column = self.fields.get(ours, default or ours)
        if column not in self.raw:
            if required:
                raise _MissingColumn(ours, column)
            return None
        return self.raw[column]

    def used(self, *ours_defaults: tuple[str, str]) -> set[str]:
        return {self.fields.get(o, d) for o, d in ours_defaults}


def _build_gsm8k(r: _Row):
    solution = r.get("answer")
    return r.get("id", required=False), _text(r.get("question")), _gsm8k_final(solution), {"solution": solution}


def _build_math500(r: _Row):
    meta = {k: r.raw[k] for k in ("solution", "subject", "level", "unique_id") if k in r.raw}
    return (r.get("id", "unique_id", required=False), _text(r.get("question", "problem")), str(r.get("answer")),
            meta)


_LETTERS = "ABCD"


def _build_mmlu(r: _Row):
    if r.has("options", "choices"):  # the Hub's cais/mmlu: a choices list and an answer index
        options = [str(c) for c in r.get("options", "choices")]
        ans = r.get("answer")
        topic = r.get("topic", "subject", required=False)
    else:  # the shared copy: answer_a..answer_d and correct_answer
        options = [str(r.get(f"option_{c}", f"answer_{c}")) for c in "abcd"]
        ans = r.get("answer", "correct_answer")
        topic = r.get("topic", required=False)
    if len(options) != len(_LETTERS):
        raise ValueError(f"an MMLU question needs {len(_LETTERS)} options, this one has {len(options)}")
    if isinstance(ans, str) and not ans.strip().isdigit():
        answer = ans.strip().strip("()").upper()
    else:
        k = int(ans)
        if not 0 <= k < len(_LETTERS):
            raise ValueError(f"answer index {k} is not 0..{len(_LETTERS) - 1}")
        answer = _LETTERS[k]
    text = _text(r.get("question")).strip() + "\n\n" + "\n".join(f"{_LETTERS[k]}. {o}" for k, o in enumerate(options))
    return r.get("id", required=False), text, answer, {"options": tuple(options), "topic": topic}


def _build_humaneval(r: _Row):
    prompt = _text(r.get("question", "prompt"))
    meta = {"prompt": prompt, "test": r.get("test"), "entry_point": r.get("entry_point")}
    return r.get("id", "task_id"), prompt, r.get("answer", "canonical_solution", required=False), meta


def _build_mbpp(r: _Row):
    text = r.get("question", "text" if "text" in r.raw or "prompt" not in r.raw else "prompt")  # sanitized: prompt
    tests = [str(x) for x in r.get("test_list")]
    question = str(text).strip() + "\nYour code should pass these tests:\n\n" + "\n".join(tests)
    meta = {"test_list": tuple(tests), "test_setup_code": r.get("test_setup_code", required=False) or "",
            "challenge_test_list": tuple(r.get("challenge_test_list", required=False) or ())}
    return r.get("id", "task_id", required=False), question, r.get("answer", "code", required=False), meta


@dataclass(frozen=True)
class _Preset:
    build: Callable[[_Row], tuple[Any, str, Any, dict]]
    hf: str  # the same set on the Hub


#: The benchmark sets graphtune formats itself, with where each lives on the Hub.
PRESETS: Mapping[str, _Preset] = MappingProxyType({
    "gsm8k": _Preset(_build_gsm8k, "hf:openai/gsm8k:main@test"),
    "math500": _Preset(_build_math500, "hf:HuggingFaceH4/MATH-500@test"),
    "mmlu": _Preset(_build_mmlu, "hf:cais/mmlu:all@test"),
    "humaneval": _Preset(_build_humaneval, "hf:openai/openai_humaneval@test"),
    "mbpp": _Preset(_build_mbpp, "hf:mbpp:full@test"),
})


# --------------------------------------------------------------------------- reading


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows: list[dict] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"dataset {path}:{n}: not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise DatasetError(f"dataset {path}:{n}: each line must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: Path, limit: int | None = None) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"dataset {path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict):
        key = next((k for k in ("data", "examples", "rows") if isinstance(data.get(k), list)), None)
        if key is None:
            raise DatasetError(f"dataset {path}: expected a JSON list of objects (or an object with a 'data' list)")
        data = data[key]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DatasetError(f"dataset {path}: expected a JSON list of objects")
    return data


def _read_csv(path: Path, limit: int | None = None) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return [dict(r) for _, r in zip(range(limit) if limit is not None else iter(int, 1), reader)]


def _read_parquet(path: Path, limit: int | None = None) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        try:
            import pandas as pd
        except ImportError:
            raise DatasetError(f"dataset {path}: reading parquet needs pyarrow; `pip install pyarrow` "
                           "or convert the file to .jsonl") from None
        return pd.read_parquet(path).to_dict(orient="records")
    return pq.read_table(path).to_pylist()


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _read_file(source: str, limit: int | None) -> list[dict]:
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise DatasetError(f"dataset {source}: unknown file type {suffix or '(none)'!r}; use .jsonl, .json, .csv, "
                       ".parquet or hf:NAME[:config][@split]")
    if not path.is_file():
        raise DatasetError(f"dataset {source}: file not found; point task.dataset at an existing "
                       ".jsonl/.json/.csv/.parquet file (relative paths are from the working directory)")
    try:
        return _READERS[suffix](path, limit)
    except EnvError:
        raise
    except UnicodeDecodeError as e:
        raise DatasetError(f"dataset {source}: not valid UTF-8 text ({e.reason}); save it as UTF-8") from None
    except (OSError, csv.Error, ValueError) as e:
        raise DatasetError(f"dataset {source}: cannot read it ({type(e).__name__}: {e})") from None
    except Exception as e:  # parquet readers raise their own types
        raise DatasetError(f"dataset {source}: cannot read it ({type(e).__name__}: {e})") from None


_HF_RE = re.compile(r"^hf:(?P<name>[^:@]+)(?::(?P<config>[^@]+))?(?:@(?P<split>.+))?$")


def _hub_reachable(timeout_s: float = _HF_PROBE_TIMEOUT_S) -> bool:
    """A fast check (DNS and TCP in a thread, bounded) so that an offline machine gets a
    clear error at once instead of ``datasets``' long retries."""
    result: list[bool] = []

    def probe():
        try:
            with socket.create_connection((_HF_HOST, 443), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout_s + 0.5)
    return bool(result and result[0])


def _offline_error(source: str, why: str) -> EnvError:
    return EnvError(f"cannot reach the Hugging Face Hub to load {source} ({why}); download the file and "
                    "point task.dataset at it")


def _read_hf(source: str, limit: int | None) -> list[dict]:
    m = _HF_RE.match(source)
    if not m:
        raise DatasetError(f"dataset {source}: expected hf:NAME[:config][@split], e.g. hf:openai/gsm8k:main@test")
    name, config, split = m.group("name"), m.group("config"), m.group("split") or "test"
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            raise _offline_error(source, f"{var} is set")
    # Behind a proxy a direct connection may fail while the Hub is reachable: let
    # `datasets` try (it has its own timeouts).
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if not proxied and not _hub_reachable():
        raise _offline_error(source, f"no connection to {_HF_HOST}")
    try:
        import datasets as hf_datasets
    except ImportError:
        raise EnvError(f"dataset {source}: loading from the Hub needs the `datasets` package; "
                       "`pip install datasets`, or download the file and point task.dataset at it") from None
    split_arg = f"{split}[:{limit}]" if limit is not None else split
    try:
        ds = hf_datasets.load_dataset(name, config, split=split_arg)
    except Exception as e:  # datasets raises many types (connection, missing config, ...)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EnvError(f"dataset {source}: the Hub could not load it ({type(e).__name__}: {msg[:300]}); "
                       "check the name, config and split, or download the file") from None
    return [dict(r) for r in ds]


# --------------------------------------------------------------------------- mapping


def _map_rows(rows: list[dict], source: str, fields: Mapping[str, str] | None, preset: str | None) -> list[Example]:
    fields = dict(fields or {})
    builder = PRESETS[preset].build if preset else None
    core = ("id", "question", "answer")
    examples: list[Example] = []
    seen: set[str] = set()
    for i, raw in enumerate(rows):
        r = _Row(raw, fields)
        try:
            if builder is not None:
                ex_id, question, answer, meta = builder(r)
                meta = dict(meta)
            else:
                ex_id, question, answer = r.get("id", required=False), r.get("question"), r.get("answer")
                used = r.used(*((k, k) for k in core))
                meta = {k: v for k, v in raw.items() if k not in used}
            for ours in fields:  # extra names the user mapped land in meta under our name
                if ours not in core:
                    meta[ours] = r.get(ours)
        except _MissingColumn as e:
            via = f" (preset {preset})" if preset else ""
            raise DatasetError(f"dataset {source}: no column {e.column!r} for field {e.ours!r}{via}; available "
                               f"columns: {_columns(raw)}; set fields.{e.ours} to one of them") from None
        except (TypeError, ValueError, IndexError, KeyError, AttributeError, OverflowError) as e:
            # a column of the wrong type or shape (a number where a list of tests belongs...)
            via = f"preset {preset}" if preset else "the row"
            msg = " ".join(str(e).split())[:200]
            raise DatasetError(f"dataset {source}: row {i + 1}: {via} cannot read it ({type(e).__name__}: {msg}); "
                               "fix the row or its columns' types") from None
        if question is None or (isinstance(question, str) and not question.strip()):
            column = fields.get("question", "question")
            raise DatasetError(f"dataset {source}: row {i + 1}: the question (column {column!r}) is empty; fill it "
                               "or remove the row")
        ex_id = str(ex_id) if ex_id is not None else (f"{preset}/{i}" if preset else str(i))
        if ex_id in seen:
            raise DatasetError(f"dataset {source}: duplicate id {ex_id!r} (row {i + 1}); map fields.id to a unique "
                           "column, or leave it out to number the rows")
        seen.add(ex_id)
        examples.append(Example(id=ex_id, question=str(question), answer=answer, meta=MappingProxyType(meta)))
    return examples


def load_dataset(source: str, *, fields: Mapping[str, str] | None = None, preset: str | None = None,
                 limit: int | None = None) -> list[Example]:
    """Load examples from a local file or ``hf:NAME[:config][@split]`` (default split
    ``test``).

    ``fields`` maps our names to the file's columns: ``id``, ``question``, ``answer`` and
    any extra names, which land in ``meta`` (without ``id`` the rows are numbered). Other
    columns also go to ``meta``. ``preset`` (one of :data:`PRESETS`) formats a known
    benchmark. ``limit`` keeps the first N rows.
    """
    if preset is not None and preset not in PRESETS:
        raise DatasetError(f"dataset preset {preset!r} is unknown; known presets: {', '.join(PRESETS)}")
    if limit is not None and limit < 0:
        raise DatasetError(f"dataset {source}: limit must be >= 0, got {limit}")
    source = str(source)
    rows = _read_hf(source, limit) if source.startswith("hf:") else _read_file(source, limit)
    if limit is not None:
        rows = rows[:limit]
    return _map_rows(rows, source, fields, preset)


def split_examples(examples: Sequence[Example], *, dev_size: int, test_size: int,
                   seed: int) -> tuple[list[Example], list[Example]]:
    """Split into disjoint dev and test lists, deterministically.

    Each example is ranked by a hash of ``(seed, id)``, so the split depends only on the
    ids and the seed -- not on the file's order, the Python version or ``PYTHONHASHSEED``
    -- and adding examples to a file moves few of the others. Both lists keep that order.
    """
    if dev_size < 0 or test_size < 0:
        raise DatasetError(f"dev_size and test_size must be >= 0, got {dev_size} and {test_size}")
    if dev_size + test_size > len(examples):
        raise DatasetError(f"the dataset has {len(examples)} examples but dev_size + test_size = "
                       f"{dev_size + test_size}; lower task.dev_size/task.test_size")
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise DatasetError("the dataset has duplicate example ids; they must be unique to split it")

    def rank(e: Example) -> bytes:
        return hashlib.sha256(f"{seed}\x00{e.id}".encode()).digest()

    ordered = sorted(examples, key=rank)
    return list(ordered[:dev_size]), list(ordered[dev_size:dev_size + test_size])
