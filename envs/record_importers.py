"""Importers: record tables (:mod:`graphtune.envs.records`) built from other sources:
the recorded GSM8K answers of six real systems (:func:`import_gsm8k_recorded`) and the
call ledger of earlier live runs (:func:`records_from_ledger`)."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from graphtune.envs.base import CallLedger
from graphtune.envs.records import Record, RecordTable, normalize_answer, parse_bool
from graphtune.errors import EnvError
from graphtune.graphs.calls import CallRecord
from graphtune.graphs.model import ASSISTANT

__all__ = ["GSM8K_SYSTEMS", "import_gsm8k_recorded", "records_from_ledger"]

# ------------------------------------------------------------------------------- the GSM8K fixture

ROUTELLM_FILE = "gsm8k_routellm_responses.csv"
GPT3_FILE = "gsm8k_gpt3_solutions.jsonl"

#: our model name -> (file, column/key) of the six recorded GSM8K systems
GSM8K_SYSTEMS: dict[str, tuple[str, str]] = {
    "mixtral-8x7b-instruct": (ROUTELLM_FILE, "mistralai/Mixtral-8x7B-Instruct-v0.1"),
    "gpt-4-1106-preview": (ROUTELLM_FILE, "gpt-4-1106-preview"),
    "gpt3-6b-finetuning": (GPT3_FILE, "6b_finetuning"),
    "gpt3-6b-verification": (GPT3_FILE, "6b_verification"),
    "gpt3-175b-finetuning": (GPT3_FILE, "175b_finetuning"),
    "gpt3-175b-verification": (GPT3_FILE, "175b_verification"),
}


def _ws(text: str) -> str:
    return " ".join(str(text).split())


def import_gsm8k_recorded(data_dir: str | Path, *, task: str = "gsm8k") -> RecordTable:
    """Records of the six real systems on the 1,319 GSM8K test questions, from the two
    files in ``data_dir`` (``../shared/data/recorded``), joined on the whitespace-
    normalised question text.

    Question ids are ``gsm8k/<row>`` (the row of the GPT-3 file, which is the GSM8K test
    order, so they equal the ids of the live ``gsm8k`` dataset preset). ``answer`` is the
    number the numeric scorer reads from the reply, normalised; ``correct`` is the
    *recorded* verdict (it differs from re-scoring on a few dozen replies, e.g. GPT-4's
    ``$20.00`` judged wrong); ``reference`` is the gold number; ``text`` and ``question``
    are kept, so tokens are estimated from their lengths."""
    from graphtune.envs.scorers import NumericScorer

    d = Path(data_dir)
    gpt3_path, routellm_path = d / GPT3_FILE, d / ROUTELLM_FILE
    for f in (gpt3_path, routellm_path):
        if not f.is_file():
            raise EnvError(f"recorded GSM8K answers: {f} not found; point at the folder holding {GPT3_FILE} and "
                           f"{ROUTELLM_FILE} (../shared/data/recorded)")
    gpt3: list[dict] = []
    with gpt3_path.open(encoding="utf-8") as fh:
        for line, text in enumerate(fh, start=1):
            if text.strip():
                try:
                    gpt3.append(json.loads(text))
                except json.JSONDecodeError as e:
                    raise EnvError(f"{gpt3_path}:{line}: not valid JSON ({e.msg})") from None
    with routellm_path.open(newline="", encoding="utf-8") as fh:
        routellm = list(csv.DictReader(fh))
    by_text: dict[str, int] = {}
    for i, row in enumerate(gpt3):
        by_text.setdefault(_ws(row.get("question", "")), i)
    by_row: dict[int, dict] = {}
    for line, row in enumerate(routellm, start=2):
        i = by_text.get(_ws(row.get("prompt", "")))
        if i is None:
            raise EnvError(f"{routellm_path}:{line}: question not found in {gpt3_path.name} (joined on "
                           "whitespace-normalised text)")
        by_row[i] = row

    def verdict(v: Any, where: str) -> bool:
        ok = parse_bool(v)
        if ok is not None:
            return ok
        raise EnvError(f"{where}: correctness {v!r} is not a boolean")

    records: list[Record] = []
    for i, row in enumerate(gpt3):
        qid = f"{task}/{i}"
        question = str(row.get("question", ""))
        gold = NumericScorer.gold(row.get("ground_truth", ""))
        reference = normalize_answer(str(gold)) if gold is not None else None
        for model, (fname, col) in GSM8K_SYSTEMS.items():
            if fname == GPT3_FILE:
                cell = row.get(col)
                if not isinstance(cell, dict) or "is_correct" not in cell:
                    raise EnvError(f"{gpt3_path}:{i + 1}: field `{col}` needs {{is_correct, solution}}")
                text, ok = str(cell.get("solution") or ""), verdict(cell["is_correct"], f"{gpt3_path}:{i + 1}")
            else:
                rr = by_row.get(i)
                if rr is None:  # not recorded for this question: the replay models it
                    continue
                text, ok = str(rr.get(col + "_response") or ""), verdict(rr.get(col), f"{routellm_path}: {col}")
            records.append(Record(task=task, question_id=qid, model=model, sample=0,
                                  answer=normalize_answer(NumericScorer.extract(text)), correct=ok, text=text,
                                  question=question, reference=reference))
    return RecordTable(tuple(records), source=f"recorded GSM8K answers in {d}")


# ------------------------------------------------------------------------------- the call ledger


def records_from_ledger(source: Any, examples: Sequence[Any], scorer: Any, *, prompts: Any = None,
                        task: str = "task", open_ledger: Callable[[str], CallLedger] | None = None) -> RecordTable:
    """Records of the *from-scratch* calls found in the call ledger of earlier live runs.

    ``source`` is a store URL (its ``gt_llm_calls`` table, opened with ``open_ledger``: the
    environments do not import the store, so :func:`graphtune.api.records_from_ledger`
    passes :func:`graphtune.store.ledger.open_ledger`), a
    :class:`~graphtune.envs.base.CallLedger`, or an iterable of
    :class:`~graphtune.graphs.calls.CallRecord`. The ledger stores no question id, node
    role or verdict, so they are recovered: a successful call is a source-node call on
    example e when its messages equal ``prompts.messages("assistant", e.question)``
    (``prompts``: the live run's :class:`~graphtune.envs.prompts.PromptSet`, default the
    scorer's style), and ``scorer`` judges its reply again. ``sample`` is the ledger's
    sample index; tokens, dollars and latency are the measured ones. Calls of
    synthesisers and fusers (prompts with predecessors' responses), failed calls and
    replies the scorer could not judge are skipped (counted in ``source``)."""
    from graphtune.envs.prompts import build_prompts

    if prompts is None:
        prompts = build_prompts(scorer=getattr(scorer, "name", None))
    label = "call records"
    owned = None
    if isinstance(source, str):
        if source.startswith("sqlite") and ":memory:" in source:
            raise EnvError(f"records_from_ledger: {source} is an in-memory store; its ledger lives in the process "
                           "that ran the search: pass that Ledger object instead")
        if source.startswith("sqlite:///") and not Path(source[len("sqlite:///"):]).is_file():
            raise EnvError(f"records_from_ledger: no store at {source}; give the `storage` URL of the live runs")
        if open_ledger is None:
            raise EnvError("records_from_ledger: a store URL needs open_ledger= to open its ledger; call "
                           "graphtune.api.records_from_ledger, which passes the store's")
        owned = open_ledger(source)
        calls: Iterable[CallRecord] = owned.records()
        label = f"ledger {source}"
    elif isinstance(source, CallLedger):
        calls = source.records()
        label = f"ledger {type(source).__name__}"
    else:
        calls = list(source)
    try:
        by_prompt: dict[str, Any] = {}
        for ex in examples:
            by_prompt.setdefault(_msg_key(prompts.messages(ASSISTANT, ex.question)), ex)
        records: dict[tuple, Record] = {}
        failed = other = unscored = dup = 0
        for rec in calls:
            if not rec.ok:
                failed += 1
                continue
            ex = by_prompt.get(_msg_key(rec.messages))
            if ex is None:
                other += 1
                continue
            s = scorer.score(rec.reply or "", ex)
            if s.correct is None:
                unscored += 1
                continue
            ref = ex.answer if isinstance(ex.answer, (str, int, float)) and not isinstance(ex.answer, bool) else None
            r = Record(task=task, question_id=str(ex.id), model=rec.model, sample=int(rec.sample_index),
                       answer=normalize_answer(s.extracted), correct=bool(s.correct),
                       prompt_tokens=int(rec.prompt_tokens) or None,
                       completion_tokens=int(rec.completion_tokens) or None,
                       cost_usd=float(rec.usd) if rec.usd else None, latency_s=float(rec.latency_s) or None,
                       text=rec.reply, question=ex.question,
                       reference=normalize_answer(ref) if ref is not None else None)
            if r.key in records:
                dup += 1  # the same sample served again (a cache hit recorded twice): keep the first
                continue
            records[r.key] = r
    finally:
        if owned is not None:
            owned.close()
    note = (f"{label}: {len(records)} from-scratch calls; skipped {other} other calls (synthesisers, fusers, other "
            f"prompts), {failed} failed, {unscored} unscored, {dup} repeated")
    return RecordTable(tuple(records.values()), source=note)


def _msg_key(messages: Any) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False, default=str)
