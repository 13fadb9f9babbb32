"""The replay environment: evaluate graphs from recorded outcomes instead of calling models.

Records come from a table in a generic schema (:class:`~graphtune.envs.records.Record`,
one row per recorded answer of one model to one question; CSV or JSONL, see
``docs/replay.md``; reading and writing in :mod:`graphtune.envs.records`), from the
recorded GSM8K answers of six real systems, or from the call ledger of earlier live runs
(both in :mod:`graphtune.envs.record_importers`). Every public name of those modules is
importable from here too; ``python -m graphtune.envs.replay`` runs the record tables'
command line (:mod:`graphtune.envs.records_cli`).

Semantics (details and the parameters in ``docs/replay.md``):

* **Source nodes are replayed.** A node with no predecessors, model m, on question q,
  uses recorded sample number k of (q, m), where k is the node's rank among the graph's
  same-model source nodes in canonical order (:func:`graphtune.graphs.canonical.
  canonical_order`). Distinct nodes of one model therefore use distinct recorded samples;
  when fewer samples are recorded than a graph needs, the extra ones are **modelled**.
* **Everything else is modelled**, with the simulator's rules (``docs/simulator.md``)
  and the synthesis parameters of a simulator profile (default ``math``): a node with
  predecessors makes its own attempt (lowered by the context penalty), weighs the
  distinct input answers by votes and its ability to verify the right one, and may
  garble a right answer at depth. Its inputs' correctness and answers are the recorded
  (or modelled) ones, so collisions between recorded wrong answers are real.
* A modelled attempt of model m on q is right with probability ``p_qm``: the mean
  recorded ``p_correct`` of (q, m) when the table has it, else a shared-difficulty
  estimate (a Rasch fit over every model's recorded correctness, recentred so each
  model's mean equals its recorded accuracy) pulled toward the model's own recorded
  samples of q (``prior_strength`` pseudo-samples). A modelled wrong answer is drawn
  from the recorded wrong answers of q by popularity (the model's own counted twice),
  or is a new, never-recorded answer with weight ``novel_weight``.
* A result that used any modelled outcome has ``QuestionResult.modelled = True``; a
  graph of one source node is fully recorded. ``recorded_only=True`` refuses to evaluate a
  graph any of whose outcomes would be modelled.
* An empty wrong ``answer`` is "no answer": no candidate, no vote. ``answers="unknown"``
  declares a table of verdicts only: correctness is replayed, and which recorded wrong
  answers of a question agree is modelled (two agree with probability ``wrong_agreement``).

Randomness comes from a hash of (seed, task, question, node, model, role, inputs), never
from a global RNG; graphs are evaluated in canonical form, so results do not depend on
node naming, question order or evaluation order.

Tokens: recorded ``prompt_tokens``/``completion_tokens`` when present; otherwise the
prompt is estimated as ``len(question) / 4`` and the completion as ``len(text) / 4``
(chars per token; the recorded GSM8K fixture has no token counts); for a model with
neither, ``output_tokens`` (else the other models' mean, else 256, with a
:class:`ReplayWarning` saying so once). Cost from the pool's
constants (``node_flops``/``node_usd``/``node_latency_s``); a recorded ``cost_usd`` /
``latency_s`` is used for a recorded call when the pool gives the model no price / the
row has a latency.
"""

from __future__ import annotations

import hashlib
import math
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit

from graphtune.envs.base import Environment, NodeOutcome, QuestionResult
from graphtune.envs.record_importers import GSM8K_SYSTEMS, import_gsm8k_recorded, records_from_ledger
from graphtune.envs.records import (OPTIONAL_COLUMNS, REQUIRED_COLUMNS, Record, RecordTable, load_records,
                                    normalize_answer, save_records)
from graphtune.envs.records_cli import main
from graphtune.envs.simulated.profile import Profile, load_profile
from graphtune.envs.synthesis import SUPPORTED_ROLES  # noqa: F401  (kept importable from here)
from graphtune.envs.synthesis import NodePlan, Plan, SynthesisRule, acts_like_map, check_graph, execution_plan
from graphtune.errors import EnvError, GraphtuneWarning
from graphtune.graphs.cost import CostModel, ModelInfo, TaskShape, node_flops, node_latency_s, node_usd
from graphtune.graphs.model import Graph, Node, RoleSpec

__all__ = ["Record", "RecordTable", "ReplayEnvironment", "REQUIRED_COLUMNS", "OPTIONAL_COLUMNS", "GSM8K_SYSTEMS",
           "load_records", "save_records", "import_gsm8k_recorded", "records_from_ledger", "normalize_answer",
           "main"]

#: characters per token, for estimating tokens from text (as the live environment does)
CHARS_PER_TOKEN = 4.0
SPLITS = ("dev", "test")
#: with ``answers: unknown``, the probability that two wrong answers to one question agree
#: (on the recorded GSM8K answers of six systems, 9.2% of 5,852 pairs of wrong answers do)
WRONG_AGREEMENT = 0.1
#: what a table's ``answer`` column holds: ``known``, the normalised answers (empty: the
#: model gave no answer); ``unknown``, nothing usable (only correctness was recorded)
ANSWERS = ("known", "unknown")
#: completion tokens of a call when the records give no count and no reply text for its
#: model (and the caller gives no ``output_tokens``); a prompt's, likewise without counts or
#: question texts (``input_tokens``)
DEFAULT_COMPLETION_TOKENS = 256.0
DEFAULT_PROMPT_TOKENS = 100.0


class ReplayWarning(GraphtuneWarning):
    """Something a replay rests on that the records did not give (said once)."""

# ------------------------------------------------------------------------------- hashing


def _u(*parts: object) -> float:
    """A uniform in [0, 1) from a stable hash of ``parts`` (same in every process)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) * (1.0 / (1 << 53))


def _split_rank(seed: int, qid: str) -> bytes:
    # the ranking of graphtune.envs.datasets.split_examples: with the same seed and ids
    # (gsm8k/<row>) the replay's splits are those of a live run on the same dataset
    return hashlib.sha256(f"{seed}\x00{qid}".encode()).digest()


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


# ------------------------------------------------------------------------------- the environment

_CORRECT = "\x00correct"  # the vote group of every right answer (correctness decides, not the string)


@dataclass(frozen=True)
class _Outcome:
    group: str  # _CORRECT or the wrong answer's string
    answer: str
    correct: bool
    prompt_tokens: int
    completion_tokens: int
    latency_s: float | None  # recorded latency, else None (priced from the pool)
    cost_usd: float | None  # recorded cost, else None
    modelled: bool


class ReplayEnvironment(Environment):
    """Evaluates graphs from recorded outcomes (see the module docstring for the rules).

    ``records`` is a :class:`RecordTable` or a path to a table file; ``costs`` a
    :class:`CostModel`, or just the pool (name -> :class:`ModelInfo`), in which case the
    environment builds ``self.costs`` over its own :attr:`shape` (every pool model must
    have records); ``task`` picks one task of a table with several. The questions are
    every question id with a record; ``dev``/``test`` are disjoint, chosen by ``seed``
    (``test_size=None``: all the rest); :meth:`evaluate` accepts any recorded question id.
    ``synthesis`` is the simulator profile whose synthesis parameters model nodes with
    predecessors (its models are not used). ``prior_strength``, ``novel_weight`` and
    ``difficulty_prior_sd`` shape modelled samples (``docs/replay.md``). ``shape``
    overrides the task shape (A, B) estimated from the records; ``input_tokens`` /
    ``output_tokens`` each override one half (and stand in for token counts the records
    lack). ``answers``: ``"known"`` (the ``answer`` column holds answers) or ``"unknown"``
    (verdicts only; ``wrong_agreement`` models which wrong answers agree).
    ``recorded_only``: refuse graphs with any modelled outcome."""

    kind = "replay"

    def __init__(self, records: RecordTable | str | Path, costs: CostModel | Mapping[str, ModelInfo], *,
                 seed: int = 0, dev_size: int = 100, test_size: int | None = None, task: str | None = None,
                 synthesis: Profile | str | Path = "math",
                 prior_strength: float = 2.0, novel_weight: float = 1.0, difficulty_prior_sd: float = 1.5,
                 shape: TaskShape | None = None, roles: Iterable[RoleSpec] = (), answers: str = "known",
                 recorded_only: bool = False, input_tokens: float | None = None,
                 output_tokens: float | None = None, wrong_agreement: float = WRONG_AGREEMENT):
        table = records if isinstance(records, RecordTable) else load_records(records)
        if answers not in ANSWERS:
            raise EnvError(f"answers must be one of {list(ANSWERS)}, got {answers!r}")
        if not 0 < wrong_agreement < 1:
            raise EnvError(f"wrong_agreement must be between 0 and 1 (exclusive), got {wrong_agreement}")
        for name, v in (("input_tokens", input_tokens), ("output_tokens", output_tokens)):
            if v is not None and not v > 0:
                raise EnvError(f"{name} must be > 0, got {v}")
        if not table.records:
            raise EnvError(f"records {table.source}: the table is empty")
        if task is None:
            if len(table.tasks) > 1:
                raise EnvError(f"records {table.source} hold several tasks {list(table.tasks)}; choose one with "
                               "env.task")
            task = table.tasks[0]
        elif task not in table.tasks:
            raise EnvError(f"records {table.source} have no task {task!r}; recorded tasks: {list(table.tasks)}")
        self.task = task
        self.table = table.for_task(task)
        self.answers = answers
        self.recorded_only = bool(recorded_only)
        self._input_tokens, self._output_tokens = input_tokens, output_tokens
        pool = costs.pool if isinstance(costs, CostModel) else dict(costs)
        self.seed = int(seed)
        self.profile = load_profile(synthesis)
        if prior_strength < 0 or novel_weight < 0 or difficulty_prior_sd <= 0:
            raise EnvError("prior_strength and novel_weight must be >= 0 and difficulty_prior_sd > 0")
        self.prior_strength = float(prior_strength)
        self.novel_weight = float(novel_weight)
        self.difficulty_prior_sd = float(difficulty_prior_sd)
        recorded = set(self.table.models)
        missing = [m for m in pool if m not in recorded]
        if missing:
            raise EnvError(f"model {missing[0]!r} of the pool has no records in {table.source} (task {task!r}); "
                           f"recorded models: {sorted(recorded)}; remove it from `models` or record it")
        #: weight of a never-recorded answer when a wrong answer is drawn; with unknown answers
        #: the one that makes two wrong answers agree with probability ``wrong_agreement``
        self._novel = self.novel_weight
        if answers == "unknown":
            self.wrong_agreement = float(wrong_agreement)
            self._novel = (1.0 - self.wrong_agreement) / self.wrong_agreement
            self.table = self._with_unknown_answers(self.table)
        else:
            self._check_answers_known()
        self._index_records()
        self._build_splits(dev_size, test_size)
        self._fit_difficulty()
        self._shape = shape or self._estimate_shape()
        self.costs = costs if isinstance(costs, CostModel) else CostModel(pool, self._shape)
        self._plans: dict[Graph, Plan] = {}
        #: roles users define, modelled as the built-in role each acts like
        self.roles = tuple(roles)
        self._acts_like = acts_like_map(self.roles)

    @property
    def rule(self) -> SynthesisRule:
        """The synthesis rule with the parameters of the ``synthesis`` profile."""
        return SynthesisRule(self.profile)

    # -- the Environment contract -------------------------------------------------------
    def split(self, name: str) -> list[str]:
        if name not in self._splits:
            raise EnvError(f"unknown split {name!r}; the replay environment has splits {list(SPLITS)}")
        return list(self._splits[name])

    @property
    def shape(self) -> TaskShape:
        return self._shape

    def describe(self) -> str:
        return (f"Task '{self.task}': {len(self._qids)} questions with recorded answers of "
                f"{len(self.table.models)} models. Prompts average about {self._shape.input_tokens:.0f} tokens and "
                f"answers about {self._shape.output_tokens:.0f} tokens; every predecessor's answer is appended to a "
                "node's prompt.")

    def evaluate(self, graph: Graph, question_ids: Sequence[str]) -> list[QuestionResult]:
        plan = self._plan_of(graph)
        out = []
        for qid in question_ids:
            if qid not in self._qindex:
                raise EnvError(f"unknown question id {qid!r}; recorded ids look like {self._qids[0]!r} "
                               f"({len(self._qids)} questions; use env.split(name))")
            if self.recorded_only:
                self._check_recorded(plan, qid)
            out.append(self._one(plan, qid))
        return out

    def _check_recorded(self, plan: Plan, qid: str) -> None:
        """``recorded_only``: refuse a graph any of whose outcomes on ``qid`` would be modelled."""
        for node in plan.nodes:
            nid = plan.original_ids[node.pos]
            if node.preds:
                raise EnvError(f"node {nid!r} has inputs, so its outcome would be modelled, and recorded_only is "
                               "set: only graphs of one node are replayed from records alone")
            if node.rank >= len(self._samples.get((qid, node.model), ())):
                raise EnvError(f"node {nid!r}: model {node.model!r} has no recorded sample {node.rank} on question "
                               f"{qid!r}, so its outcome would be modelled, and recorded_only is set")

    # -- introspection --------------------------------------------------------------------
    def recorded_accuracy(self, model: str) -> float:
        """The recorded accuracy of sample 0 of ``model`` over the questions that have it."""
        rows = [s[0].correct for (q, m), s in self._samples.items() if m == model]
        return sum(rows) / len(rows) if rows else float("nan")

    def p_correct(self, question_id: str, model: str) -> float:
        """Modelled probability that a new (unrecorded) attempt of ``model`` on the
        question is right (see the module docstring)."""
        if question_id not in self._qindex:
            raise EnvError(f"unknown question id {question_id!r}")
        return self._p(question_id, model)

    def unrecorded_questions(self, model: str, question_ids: Sequence[str] | None = None) -> list[str]:
        """The questions (of ``question_ids``, default both splits) on which ``model`` has no
        recorded sample: there even a graph of one node of it is modelled."""
        qids = self._splits["dev"] + self._splits["test"] if question_ids is None else question_ids
        return [q for q in qids if (q, model) not in self._samples]

    # -- answers ----------------------------------------------------------------------------
    def _check_answers_known(self) -> None:
        # every `answer` empty: every model gave no answer to every question, which no real
        # table means; it is a table of verdicts only, and must say so
        if any(not r.correct for r in self.table.records) and not any(r.answer for r in self.table.records):
            raise EnvError(f"records {self.table.source}: no record has an `answer` (all "
                           f"{len(self.table.records)} are empty, i.e. 'no answer'); if the records hold correctness "
                           "only, declare it with env.answers: unknown (ReplayEnvironment(answers='unknown'); "
                           "docs/replay.md)")

    def _with_unknown_answers(self, table: RecordTable) -> RecordTable:
        """``answers: unknown``: every recorded right answer is the right one (its text is
        the reference, else ``<correct>``); which recorded wrong answers of a question agree
        is modelled: in order of (model, sample), each joins an earlier wrong answer of that
        question with weight how many took it, or is a new one with weight ``(1 - a) / a``,
        ``a = wrong_agreement``, so two wrong answers agree with probability ``a`` (a
        Chinese restaurant process; modelled wrong answers are drawn by the same rule)."""
        out: list[Record] = []
        by_q: dict[str, list[Record]] = {}
        for r in table.records:
            if r.correct:
                out.append(replace(r, answer=""))
            else:
                by_q.setdefault(r.question_id, []).append(r)
        for qid, rows in by_q.items():
            counts: list[int] = []
            for r in sorted(rows, key=lambda r: (r.model, r.sample)):
                x = _u(self.seed, self.task, qid, "unknown answer", r.model, r.sample) * (sum(counts) + self._novel)
                k = len(counts)
                for i, c in enumerate(counts):
                    if x < c:
                        k = i
                        break
                    x -= c
                if k == len(counts):
                    counts.append(0)
                counts[k] += 1
                out.append(replace(r, answer=f"<unrecorded wrong answer {k + 1}>"))
        return RecordTable(tuple(out), source=table.source)

    # -- indexes ------------------------------------------------------------------------
    def _index_records(self) -> None:
        samples: dict[tuple[str, str], list[Record]] = {}
        for r in self.table.records:
            samples.setdefault((r.question_id, r.model), []).append(r)
        self._samples = {k: tuple(sorted(v, key=lambda r: r.sample)) for k, v in samples.items()}
        self._qids = self.table.questions()
        self._qindex = {q: i for i, q in enumerate(self._qids)}
        self._models = self.table.models
        self._mindex = {m: i for i, m in enumerate(self._models)}
        wrong_all: dict[str, Counter] = {}
        wrong_own: dict[tuple[str, str], Counter] = {}
        right: dict[str, Counter] = {}
        refs: dict[str, str] = {}
        for r in self.table.records:
            if r.correct:
                if r.answer:
                    right.setdefault(r.question_id, Counter())[r.answer] += 1
            else:
                wrong_all.setdefault(r.question_id, Counter())[r.answer] += 1
                wrong_own.setdefault((r.question_id, r.model), Counter())[r.answer] += 1
            if r.reference is not None:
                refs.setdefault(r.question_id, r.reference)
        self._wrong_all, self._wrong_own = wrong_all, wrong_own
        # the text of a modelled right answer: the reference, else the commonest recorded right answer
        self._right_text = {q: refs.get(q) or (right[q].most_common(1)[0][0] if q in right else "<correct>")
                            for q in self._qids}
        # tokens
        prompt: dict[str, list[int]] = {}
        qtext: dict[str, str] = {}
        comp_q: dict[tuple[str, str], list[int]] = {}
        comp_m: dict[str, list[int]] = {}
        for r in self.table.records:
            if r.prompt_tokens is not None:
                prompt.setdefault(r.question_id, []).append(r.prompt_tokens)
            if r.question is not None:
                qtext.setdefault(r.question_id, r.question)
            ct = self._recorded_completion(r)
            if ct is not None:
                comp_q.setdefault((r.question_id, r.model), []).append(ct)
                comp_m.setdefault(r.model, []).append(ct)
        est = {q: _est_tokens(t) for q, t in qtext.items()}
        known = [float(np.mean(v)) for v in prompt.values()] + list(est.values())
        if known:
            fallback_prompt = float(np.mean(known))
        elif self._input_tokens is not None:
            fallback_prompt = float(self._input_tokens)
        else:
            fallback_prompt = DEFAULT_PROMPT_TOKENS
            self._warn(f"records {self.table.source}: no record has prompt_tokens or a question text, so every "
                       f"prompt is taken as {DEFAULT_PROMPT_TOKENS:.0f} tokens (the default); set task.input_tokens "
                       "to your estimate")
        self._prompt_q = {q: int(round(np.mean(prompt[q]))) if q in prompt else int(est.get(q, round(fallback_prompt)))
                          for q in self._qids}
        all_comp = [c for v in comp_m.values() for c in v]
        uncounted = [m for m in self._models if m not in comp_m]
        if self._output_tokens is not None:  # the user's estimate, for the models the records give nothing
            fallback_comp, how = float(self._output_tokens), None
        elif all_comp:  # (the other models' mean, as before)
            fallback_comp, how = float(np.mean(all_comp)), "the other models' mean"
        else:
            fallback_comp, how = DEFAULT_COMPLETION_TOKENS, "the default"
        if uncounted and how is not None:
            self._warn(f"records {self.table.source}: no completion_tokens or reply text for model(s) "
                       f"{', '.join(uncounted)}, so each of their completions is taken as {fallback_comp:.0f} tokens "
                       f"({how}); that sets the cost of their calls and of every modelled node they run; set "
                       "task.output_tokens to your estimate")
        self._comp_m = {m: float(np.mean(comp_m[m])) if m in comp_m else fallback_comp for m in self._models}
        self._comp_qm = {k: float(np.mean(v)) for k, v in comp_q.items()}

    @staticmethod
    def _recorded_completion(r: Record) -> int | None:
        if r.completion_tokens is not None:
            return r.completion_tokens
        if r.text is not None:
            return _est_tokens(r.text)
        return None

    def _build_splits(self, dev_size: int, test_size: int | None) -> None:
        n = len(self._qids)
        if int(dev_size) < 1:
            raise EnvError(f"dev_size must be at least 1, got {dev_size}")
        if test_size is not None and int(test_size) < 1:
            raise EnvError(f"test_size must be at least 1, got {test_size}")
        test = n - int(dev_size) if test_size is None else int(test_size)
        if int(dev_size) + test > n or test < 1:
            raise EnvError(f"the records have {n} questions but dev_size + test_size = {int(dev_size) + max(test, 1)}; "
                           "lower task.dev_size/task.test_size")
        ranked = sorted(self._qids, key=lambda q: _split_rank(self.seed, q))
        self._splits = {"dev": tuple(ranked[:int(dev_size)]), "test": tuple(ranked[int(dev_size):int(dev_size) + test])}

    def _fit_difficulty(self) -> None:
        """A Rasch fit ``logit P(right) = a_m - b_q`` over every recorded verdict (MAP,
        ``b_q ~ N(0, difficulty_prior_sd)``), then each ``a_m`` recentred so that the mean
        over the questions it was recorded on equals the model's recorded accuracy."""
        recs = self.table.records
        qi = np.fromiter((self._qindex[r.question_id] for r in recs), dtype=np.int64, count=len(recs))
        mi = np.fromiter((self._mindex[r.model] for r in recs), dtype=np.int64, count=len(recs))
        y = np.fromiter((float(r.correct) for r in recs), dtype=np.float64, count=len(recs))
        nq, nm = len(self._qids), len(self._models)
        acc = np.clip(np.bincount(mi, y, nm) / np.maximum(np.bincount(mi, minlength=nm), 1), 1e-3, 1 - 1e-3)
        a = np.log(acc / (1 - acc))
        b = np.zeros(nq)
        inv_var = 1.0 / self.difficulty_prior_sd ** 2
        for _ in range(60):
            p = expit(a[mi] - b[qi])
            w = p * (1 - p)
            a = a - (np.bincount(mi, p - y, nm) + a / 100.0) / (np.bincount(mi, w, nm) + 1 / 100.0)
            p = expit(a[mi] - b[qi])
            w = p * (1 - p)
            step = (np.bincount(qi, y - p, nq) + b * inv_var) / (np.bincount(qi, w, nq) + inv_var)
            b = b - step
            if np.max(np.abs(step)) < 1e-8:
                break
        for j in range(nm):
            qs = np.unique(qi[mi == j])
            bj = b[qs]
            target = float(acc[j])
            a[j] = brentq(lambda x: float(expit(x - bj).mean()) - target, -40.0, 40.0, xtol=1e-10)
        self._ability, self._difficulty = a, b

    def _p(self, qid: str, model: str) -> float:
        """Probability that a new (modelled) attempt of ``model`` on ``qid`` is right."""
        recs = self._samples.get((qid, model), ())
        given = [r.p_correct for r in recs if r.p_correct is not None]
        if given:
            return float(np.mean(given))
        j = self._mindex.get(model)
        if j is None:
            raise EnvError(f"graph uses model {model!r}, which has no records; recorded models: {list(self._models)}")
        shared = float(expit(self._ability[j] - self._difficulty[self._qindex[qid]]))
        n0 = self.prior_strength
        right = sum(r.correct for r in recs)
        return (n0 * shared + right) / (n0 + len(recs)) if n0 + len(recs) > 0 else shared

    def _estimate_shape(self) -> TaskShape:
        """(A, B): ``input_tokens``/``output_tokens`` where given (either alone), else the
        mean recorded (or estimated) prompt and completion."""
        a = float(np.mean([self._prompt_q[q] for q in self._qids]))
        comps = [c for r in self.table.records if (c := self._recorded_completion(r)) is not None]
        b = float(np.mean(comps)) if comps else float(np.mean(list(self._comp_m.values())))
        if self._input_tokens is not None:
            a = float(self._input_tokens)
        if self._output_tokens is not None:
            b = float(self._output_tokens)
        return TaskShape(max(1.0, a), max(1.0, b))

    @staticmethod
    def _warn(message: str) -> None:
        warnings.warn(message, ReplayWarning, stacklevel=4)

    # -- plans ------------------------------------------------------------------------
    def _plan_of(self, graph: Graph) -> Plan:
        plan = self._plans.get(graph)
        if plan is not None:
            return plan
        check_graph(graph, "the replay environment", self._check_model, self.roles)
        plan = execution_plan(graph, self._acts_like)
        if len(self._plans) > 4096:
            self._plans.clear()
        self._plans[graph] = plan
        return plan

    def _check_model(self, n: Node) -> None:
        if n.model not in self._mindex:
            raise EnvError(f"node {n.id!r} uses model {n.model!r}, which has no records in {self.table.source}; "
                           f"recorded models: {list(self._models)}")
        self.costs.model(n.model)

    # -- one question -------------------------------------------------------------------
    def _draw_wrong(self, qid: str, model: str, u: float, *salt: object) -> str:
        """A wrong answer by popularity among the recorded wrong answers of ``qid`` (the
        model's own counted twice), or a never-recorded one (weight ``novel_weight``)."""
        weights = Counter(self._wrong_all.get(qid, {}))
        weights.update(self._wrong_own.get((qid, model), {}))
        items = sorted(weights.items())
        total = sum(w for _, w in items) + self._novel
        x = u * total
        for ans, w in items:
            if x < w:
                return ans
            x -= w
        tag = hashlib.blake2b("\x1f".join(map(str, (self.seed, qid, model, *salt))).encode(),
                              digest_size=4).hexdigest()
        return f"<modelled wrong answer {tag}>"

    def _completion(self, qid: str, model: str) -> int:
        return max(1, int(round(self._comp_qm.get((qid, model), self._comp_m[model]))))

    def _source(self, node: NodePlan, qid: str) -> _Outcome:
        recs = self._samples.get((qid, node.model), ())
        if node.rank < len(recs):
            r = recs[node.rank]
            pt = r.prompt_tokens if r.prompt_tokens is not None else self._prompt_q[qid]
            ct = self._recorded_completion(r)
            ct = ct if ct is not None else self._completion(qid, node.model)
            answer = self._right_text[qid] if r.correct and not r.answer else r.answer
            return _Outcome(_CORRECT if r.correct else r.answer, answer, r.correct, pt, ct, r.latency_s,
                            r.cost_usd, modelled=False)
        # an extra sample the records do not have: keyed by (question, model, rank) so every
        # graph that needs sample k of this model gets the same one
        salt = (self.seed, self.task, qid, "sample", node.model, node.rank)
        right = _u(*salt, "right") < self._p(qid, node.model)
        ans = self._right_text[qid] if right else self._draw_wrong(qid, node.model, _u(*salt, "wrong"), *salt)
        return _Outcome(_CORRECT if right else ans, ans, right, self._prompt_q[qid], self._completion(qid, node.model),
                        None, None, modelled=True)

    def _synthesise(self, node: NodePlan, qid: str, inputs: list[_Outcome]) -> _Outcome:
        """The simulator's synthesis rule (docs/simulator.md, graphtune.envs.synthesis) on
        recorded inputs."""
        rule = self.rule
        z = rule.tolerance(self.costs.model(node.model).params)
        penalty = rule.context_penalty(len(inputs), z)
        logit = _logit(self._p(qid, node.model))
        groups = tuple(sorted(o.group for o in inputs))
        salt = (self.seed, self.task, qid, "node", node.pos, node.model, node.role, *groups)
        own_right = _u(*salt, "own") < rule.own_right(logit, penalty)
        own = _CORRECT if own_right else self._draw_wrong(qid, node.model, _u(*salt, "wrong"), *salt, "own")
        votes: dict[str, float] = {}
        # "no answer" (an empty wrong answer) is no candidate: it casts no vote
        for o in inputs:
            if o.group:
                votes[o.group] = votes.get(o.group, 0.0) + 1.0
        if own:
            votes[own] = votes.get(own, 0.0) + rule.own_weight(node.role)
        gamma = rule.sharpness(node.role)
        beta = float(rule.beta(logit, penalty))
        cands = sorted(votes, key=lambda g: (g != _CORRECT, g))
        weights = [votes[g] ** gamma * (math.exp(beta) if g == _CORRECT else 1.0) for g in cands]
        total = sum(weights)
        # nodes of one model and role that see the same inputs share most of their selection
        # randomness (identical prompts pick alike); the rest is their own
        u_pick = _u(*salt, "pick")
        if _u(*salt, "mode") >= rule.diversity:
            u_pick = _u(self.seed, self.task, qid, "pick", node.model, node.role, *groups)
        pick = own
        if total > 0:
            x = u_pick * total
            for g, w in zip(cands, weights):
                pick = g
                if x < w:
                    break
                x -= w
        if pick == _CORRECT and _u(*salt, "garble") < rule.garble(node.level, z):
            pick = self._draw_wrong(qid, node.model, _u(*salt, "broken"), *salt, "broken")
        right = pick == _CORRECT
        answer = self._right_text[qid] if right else pick
        pt = self._prompt_q[qid] + sum(o.completion_tokens for o in inputs)
        return _Outcome(pick, answer, right, pt, self._completion(qid, node.model), None, None, modelled=True)

    def _one(self, plan: Plan, qid: str) -> QuestionResult:
        outs: dict[int, _Outcome] = {}
        finish: dict[int, float] = {}
        node_outcomes = []
        flops = usd = 0.0
        modelled = False
        for node in plan.nodes:
            if node.preds:
                o = self._synthesise(node, qid, [outs[q] for q in node.preds])
            else:
                o = self._source(node, qid)
            outs[node.pos] = o
            m: ModelInfo = self.costs.model(node.model)
            lat = o.latency_s if o.latency_s is not None else node_latency_s(m, o.prompt_tokens, o.completion_tokens)
            finish[node.pos] = max((finish[q] for q in node.preds), default=0.0) + lat
            flops += node_flops(m, o.prompt_tokens, o.completion_tokens)
            priced = m.usd_per_mtok_in > 0 or m.usd_per_mtok_out > 0
            usd += (o.cost_usd if (o.cost_usd is not None and not priced)
                    else node_usd(m, o.prompt_tokens, o.completion_tokens))
            modelled = modelled or o.modelled
            node_outcomes.append(NodeOutcome(node_id=plan.original_ids[node.pos], answer=o.answer, correct=o.correct,
                                             prompt_tokens=o.prompt_tokens, completion_tokens=o.completion_tokens,
                                             latency_s=lat))
        final = outs[plan.sink]
        return QuestionResult(
            question_id=qid, answer=final.answer, correct=final.correct, score=1.0 if final.correct else 0.0,
            prompt_tokens=sum(o.prompt_tokens for o in outs.values()),
            completion_tokens=sum(o.completion_tokens for o in outs.values()),
            flops=flops, usd=usd, latency_s=max(finish.values()), modelled=modelled, nodes=tuple(node_outcomes))


def _est_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


if __name__ == "__main__":
    sys.exit(main())
