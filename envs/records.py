"""Record tables: recorded outcomes in a generic schema, read and written as CSV or JSONL.

A :class:`Record` is one recorded answer of one model to one question; a
:class:`RecordTable` holds many (``docs/replay.md`` describes the schema). The replay
environment (:mod:`graphtune.envs.replay`) evaluates graphs from such a table; the
importers (:mod:`graphtune.envs.record_importers`) build tables from other sources.
:func:`normalize_answer` is the canonical form of an extracted answer that both use.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Any

from graphtune.errors import EnvError

__all__ = ["Record", "RecordTable", "REQUIRED_COLUMNS", "OPTIONAL_COLUMNS", "load_records", "save_records",
           "normalize_answer", "parse_bool"]

# ------------------------------------------------------------------------------- the schema


@dataclass(frozen=True)
class Record:
    """One recorded answer of one model to one question (a row of the generic schema).

    ``answer`` is the normalised final answer (e.g. the extracted number for GSM8K, a
    letter for multiple choice, or any answer id); answers of one question that are equal
    strings are the same answer, so wrong answers collide as they did. ``correct`` is the
    recorded verdict (it decides, not a comparison of strings). ``sample`` numbers the
    samples of one (question, model) from 0."""

    task: str
    question_id: str
    model: str
    sample: int
    answer: str
    correct: bool
    p_correct: float | None = None  # the model's probability of answering q right, if known
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    latency_s: float | None = None
    text: str | None = None  # the full reply (token estimate when no counts are recorded)
    question: str | None = None  # the question text (prompt-token estimate)
    reference: str | None = None  # the question's reference answer (normalised), if known

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.task, self.question_id, self.model, self.sample)


#: columns every table must have (``answer`` may be empty: the model gave no answer)
REQUIRED_COLUMNS = ("task", "question_id", "model", "sample", "answer", "correct")
#: columns a table may have
OPTIONAL_COLUMNS = ("p_correct", "prompt_tokens", "completion_tokens", "cost_usd", "latency_s", "text", "question",
                    "reference")
_ALL_COLUMNS = tuple(f.name for f in fields(Record))  # the schema is the dataclass: required, then optional


@dataclass(frozen=True)
class RecordTable:
    """Recorded outcomes (immutable). ``source`` says where they came from (a file, the
    fixture, a ledger) for messages. Build with :func:`load_records`,
    :func:`import_gsm8k_recorded`, :func:`records_from_ledger` or from records directly;
    two rows with the same (task, question_id, model, sample) are an error."""

    records: tuple[Record, ...]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        seen: set[tuple] = set()
        for r in self.records:
            if r.key in seen:
                raise EnvError(f"records {self.source}: duplicate record for task {r.task!r}, question "
                               f"{r.question_id!r}, model {r.model!r}, sample {r.sample}; each sample once")
            seen.add(r.key)

    def __len__(self) -> int:
        return len(self.records)

    @cached_property
    def tasks(self) -> tuple[str, ...]:
        return tuple(sorted({r.task for r in self.records}))

    @cached_property
    def models(self) -> tuple[str, ...]:
        return tuple(sorted({r.model for r in self.records}))

    def questions(self, task: str | None = None) -> tuple[str, ...]:
        """Question ids with at least one record (of ``task``), sorted."""
        return tuple(sorted({r.question_id for r in self.records if task is None or r.task == task}))

    def accuracy(self, model: str, task: str | None = None) -> float:
        """Recorded fraction correct of ``model`` over all its rows (of ``task``)."""
        rows = [r.correct for r in self.records if r.model == model and (task is None or r.task == task)]
        if not rows:
            raise EnvError(f"records {self.source}: no records of model {model!r}; recorded models: "
                           f"{list(self.models)}")
        return sum(rows) / len(rows)

    def for_task(self, task: str) -> RecordTable:
        return RecordTable(tuple(r for r in self.records if r.task == task), source=self.source)

    def save(self, path: str | Path) -> Path:
        """Write the table as CSV or JSONL (by the file's suffix); see :func:`save_records`."""
        return save_records(self, path)


# ------------------------------------------------------------------------------- reading / writing

_INT_COLUMNS = ("sample", "prompt_tokens", "completion_tokens")
_FLOAT_COLUMNS = ("p_correct", "cost_usd", "latency_s")
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


def parse_bool(value: Any) -> bool | None:
    """``True``/``False`` for the spellings of a boolean a table may use (true/false,
    1/0, yes/no, y/n, t/f, any case), else ``None``."""
    s = str(value).strip().lower()
    return True if s in _TRUE else False if s in _FALSE else None



class _BadValue(Exception):
    def __init__(self, column: str, why: str):
        super().__init__(why)
        self.column, self.why = column, why


def _cell(raw: Mapping[str, Any], column: str) -> Any:
    v = raw.get(column)
    if column == "answer" and v is None:
        return ""  # JSON null: the model gave no answer
    if isinstance(v, str) and column != "answer" and column != "text" and column != "question":
        v = v.strip()
    return None if v is None or (isinstance(v, str) and v == "" and column != "answer") else v


def _parse_row(raw: Mapping[str, Any]) -> Record:
    values: dict[str, Any] = {}
    for col in _ALL_COLUMNS:
        v = _cell(raw, col)
        if v is None:
            if col in REQUIRED_COLUMNS:
                raise _BadValue(col, "is empty; every row needs a value")
            values[col] = None
            continue
        if col == "correct":
            if isinstance(v, bool):
                values[col] = v
            elif str(v).strip().lower() in _TRUE:
                values[col] = True
            elif str(v).strip().lower() in _FALSE:
                values[col] = False
            else:
                raise _BadValue(col, f"{v!r} is not a boolean; write true/false (or 1/0)")
        elif col in _INT_COLUMNS:
            try:
                if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                    raise ValueError
                n = int(v) if not isinstance(v, str) else int(v.strip())
            except (TypeError, ValueError):
                raise _BadValue(col, f"{v!r} is not a whole number") from None
            if n < 0:
                raise _BadValue(col, f"{n} is negative; it must be >= 0")
            values[col] = n
        elif col in _FLOAT_COLUMNS:
            try:
                if isinstance(v, bool):
                    raise ValueError
                x = float(v)
            except (TypeError, ValueError):
                raise _BadValue(col, f"{v!r} is not a number") from None
            if not math.isfinite(x) or x < 0 or (col == "p_correct" and x > 1):
                allowed = "between 0 and 1" if col == "p_correct" else ">= 0"
                raise _BadValue(col, f"{v!r} is out of range; it must be {allowed}")
            values[col] = x
        else:
            values[col] = str(v)
    return Record(**values)


def _check_columns(path: Path, line: int, columns: Iterable[str]) -> None:
    cols = list(columns)
    for col in REQUIRED_COLUMNS:
        if col not in cols:
            raise EnvError(f"{path}:{line}: missing column `{col}`; the record schema needs columns "
                           f"{', '.join(REQUIRED_COLUMNS)} (optional: {', '.join(OPTIONAL_COLUMNS)}); "
                           "see docs/replay.md")
    for col in cols:
        if col not in _ALL_COLUMNS:
            near = difflib.get_close_matches(str(col), _ALL_COLUMNS, n=1)
            hint = f"did you mean `{near[0]}`? " if near else ""
            raise EnvError(f"{path}:{line}: unknown column `{col}`; {hint}allowed columns: {', '.join(_ALL_COLUMNS)}")


def load_records(path: str | Path) -> RecordTable:
    """Read a record table in the generic schema from a ``.csv`` or ``.jsonl`` file.

    Columns (CSV header, or keys of each JSON object): ``task``, ``question_id``,
    ``model``, ``sample`` (int >= 0), ``answer`` (may be empty), ``correct`` (true/false,
    1/0) and optionally ``p_correct`` (0..1), ``prompt_tokens``, ``completion_tokens``
    (ints >= 0), ``cost_usd``, ``latency_s`` (>= 0), ``text``, ``question``,
    ``reference``. Any problem is one :class:`EnvError` line ``FILE:LINE: column `C`:
    what is wrong``."""
    p = Path(path)
    if not p.is_file():
        raise EnvError(f"records {p}: file not found; give a .csv or .jsonl table of records (docs/replay.md), "
                       "e.g. written by `python -m graphtune.envs.replay import-gsm8k DATA_DIR -o records.csv`")
    suffix = p.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise EnvError(f"records {p}: unsupported file type {suffix or '(none)'!r}; use .csv or .jsonl")
    records: list[Record] = []
    first_line: dict[tuple, int] = {}

    def add(raw: Mapping[str, Any], line: int) -> None:
        try:
            rec = _parse_row(raw)
        except _BadValue as e:
            raise EnvError(f"{p}:{line}: column `{e.column}`: {e.why}") from None
        if rec.key in first_line:
            raise EnvError(f"{p}:{line}: duplicate record (task {rec.task!r}, question_id {rec.question_id!r}, "
                           f"model {rec.model!r}, sample {rec.sample}) first seen on line {first_line[rec.key]}; "
                           "number the samples of one question and model 0, 1, ...")
        first_line[rec.key] = line
        records.append(rec)

    try:
        with p.open(newline="" if suffix == ".csv" else None, encoding="utf-8") as fh:
            if suffix == ".csv":
                reader = csv.DictReader(fh)
                if reader.fieldnames is None:
                    raise EnvError(f"{p}:1: the file is empty; it needs a header row with columns "
                                   f"{', '.join(REQUIRED_COLUMNS)}")
                _check_columns(p, 1, reader.fieldnames)
                for raw in reader:
                    line = reader.line_num
                    if None in raw:
                        raise EnvError(f"{p}:{line}: more cells than header columns; quote cells that contain commas")
                    if any(v is None for v in raw.values()):
                        missing = next(k for k, v in raw.items() if v is None)
                        raise EnvError(f"{p}:{line}: column `{missing}`: the row has fewer cells than the header")
                    add(raw, line)
            else:
                for line, text in enumerate(fh, start=1):
                    if not text.strip():
                        continue
                    try:
                        raw = json.loads(text)
                    except json.JSONDecodeError as e:
                        raise EnvError(f"{p}:{line}: not valid JSON ({e.msg} at column {e.colno})") from None
                    if not isinstance(raw, dict):
                        raise EnvError(f"{p}:{line}: expected a JSON object per line, got {type(raw).__name__}")
                    _check_columns(p, line, raw.keys())
                    add(raw, line)
    except UnicodeDecodeError as e:
        raise EnvError(f"records {p}: not UTF-8 text ({e.reason})") from None
    except csv.Error as e:
        raise EnvError(f"records {p}: not valid CSV ({e})") from None
    if not records:
        raise EnvError(f"records {p}: the table has no rows")
    return RecordTable(tuple(records), source=str(p))


def save_records(table: RecordTable, path: str | Path) -> Path:
    """Write ``table`` as CSV or JSONL (by suffix). Optional columns are written only
    when some row has them; :func:`load_records` reads the file back to an equal table."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise EnvError(f"records {p}: unsupported file type {suffix or '(none)'!r}; use .csv or .jsonl")
    used = [c for c in _ALL_COLUMNS
            if c in REQUIRED_COLUMNS or any(getattr(r, c) is not None for r in table.records)]
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="" if suffix == ".csv" else None, encoding="utf-8") as fh:
        if suffix == ".csv":
            w = csv.writer(fh)
            w.writerow(used)
            for r in table.records:
                row = []
                for c in used:
                    v = getattr(r, c)
                    row.append("" if v is None else ("true" if v is True else "false" if v is False else
                                                     repr(v) if isinstance(v, float) else v))
                w.writerow(row)
        else:
            for r in table.records:
                d = asdict(r)
                fh.write(json.dumps({c: d[c] for c in used if d[c] is not None or c in REQUIRED_COLUMNS},
                                    ensure_ascii=False) + "\n")
    return p


# ------------------------------------------------------------------------------- answers

_NUMBER = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+(?:\.\d+)?)?$")


def normalize_answer(answer: Any) -> str:
    """A canonical string for an extracted answer: numbers compared as numbers
    (``1,000.00`` and ``$1000`` -> ``1000``; ``0.50`` -> ``0.5``; ``6/4`` -> ``3/2``),
    anything else whitespace-collapsed and case-folded."""
    if answer is None:
        return ""
    s = " ".join(str(answer).split())
    t = s.replace(",", "").replace("$", "").replace("%", "").strip().rstrip(".")
    if _NUMBER.match(t):
        try:
            if "/" in t:
                a, b = t.split("/", 1)
                v = Fraction(a) / Fraction(b)
            else:
                v = Fraction(t)
        except (ValueError, ZeroDivisionError):
            return s.casefold()
        if v.denominator == 1:
            return str(v.numerator)
        d = v.denominator
        while d % 2 == 0:
            d //= 2
        while d % 5 == 0:
            d //= 5
        if d == 1:  # a terminating decimal
            return format(v.numerator / v.denominator, "f").rstrip("0").rstrip(".") if abs(v) < 1e15 else str(v)
        return f"{v.numerator}/{v.denominator}"
    return s.casefold()
