"""Scorers: is a model's output a correct answer to an example?

A :class:`Scorer` turns ``(output, example)`` into a :class:`Score`. Contract:

* ``correct`` is True/False for a judged answer and ``score`` in ``[0, 1]`` (1.0 when
  correct; a custom scorer may give partial credit); ``extracted`` is the answer the
  scorer read from the output (None when it found none -- which is wrong, not an error).
* An infrastructure failure (the code sandbox could not start, the judge endpoint is
  down, a custom scorer crashed) is ``Score(correct=None, score=0.0, error=...)``: the
  caller excludes it from accuracy; it is never a wrong answer.
* A mistake in the task's configuration (an example with no tests for ``code``) raises
  :class:`~graphtune.errors.EnvError`; an unknown scorer name or bad option raises
  :class:`~graphtune.errors.SpecError` from :func:`get_scorer`.
* Scorers hold no per-call state: one instance may score from several threads.

Names (see ``docs/scorers.md`` for what each accepts): ``exact``, ``numeric``,
``math``, ``choice``, ``code``, ``llm-judge`` and ``python:module:fn``.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from graphtune.envs.datasets import Example
from graphtune.errors import EnvError, LLMError, LLMFatalError, SpecError

__all__ = ["Score", "Scorer", "SCORERS", "get_scorer", "default_scorer_for", "last_boxed"]


@dataclass(frozen=True)
class Score:
    """The verdict on one output. ``error`` set means the scorer could not judge
    (infrastructure failure): then ``correct`` is None and the example is not counted."""

    correct: bool | None
    score: float
    extracted: str | None = None
    error: str | None = None


def _verdict(ok: bool, extracted: str | None) -> Score:
    return Score(correct=bool(ok), score=1.0 if ok else 0.0, extracted=extracted)


class Scorer(ABC):
    """Judges outputs against examples. Subclasses set ``name`` and implement
    :meth:`score`; options are constructor keywords (unknown ones are a SpecError)."""

    name: str = "abstract"

    @abstractmethod
    def score(self, output: str, example: Example) -> Score:
        """Judge ``output`` (a model's full reply) against ``example.answer`` (and
        ``example.meta``). Never raises for a bad output; see the module docstring."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


# --------------------------------------------------------------------------- text helpers


def _balanced(text: str, start: int) -> int | None:
    """Index just past the brace group opening at ``text[start] == '{'``; escaped braces
    (``\\{``, ``\\}``) do not count. None when the group is not closed."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in
    ``text``, with nested braces kept whole: ``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``.
    None when there is none, or the last one is not closed (a truncated reply)."""
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    i = m.end()
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        end = _balanced(text, i)
        return text[i + 1:end - 1].strip() if end is not None else None
    tail = re.match(r"[^\s$]+", text[i:])  # `\boxed 5`
    return tail.group(0) if tail and i > m.end() else None


_ANSWER_PHRASE = re.compile(
    r"\banswer\s*(?:is|was|:|=|would\s+be|should\s+be)\s*:?\s*(.+)", re.IGNORECASE)


def _answer_phrase(text: str) -> str | None:
    """The rest of the line after the last 'answer is' / 'Answer:' (markdown and a
    trailing period stripped)."""
    hits = list(_ANSWER_PHRASE.finditer(text))
    for m in reversed(hits):
        s = m.group(1).strip().strip("*").strip()
        s = re.sub(r"[.\s]+$", "", s)
        if s:
            return s
    return None


# --------------------------------------------------------------------------- exact


def _norm_text(s: str, case_sensitive: bool) -> str:
    s = " ".join(str(s).split())
    s = s.strip().strip("*").strip().rstrip(".").strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'`":
        s = s[1:-1].strip()
    return s if case_sensitive else s.casefold()


def _golds(answer: Any) -> list[str]:
    if isinstance(answer, (list, tuple, set, frozenset)):
        return [str(a) for a in answer]
    return [str(answer)]


class ExactScorer(Scorer):
    """String equality after normalising whitespace, case (unless ``case_sensitive``),
    surrounding quotes/markdown and a final period. With ``extract`` (default) the answer
    is read from ``\\boxed{}``, ``#### X`` or an 'answer is X' line when present, else the
    whole output. ``answer`` may be a list of accepted answers."""

    name = "exact"

    def __init__(self, *, case_sensitive: bool = False, extract: bool = True):
        self.case_sensitive = case_sensitive
        self.extract = extract

    def _extract(self, output: str) -> str:
        if self.extract:
            for found in (last_boxed(output), _after_hashes(output), _answer_phrase(output)):
                if found:
                    return found
        return output.strip()

    def score(self, output: str, example: Example) -> Score:
        got = self._extract(output or "")
        norm = _norm_text(got, self.case_sensitive)
        ok = any(norm == _norm_text(g, self.case_sensitive) for g in _golds(example.answer))
        return _verdict(ok, got)


# --------------------------------------------------------------------------- numeric

_NUM_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|(?<![\w.])-?\.\d+")


def _after_hashes(text: str, numeric: bool = False) -> str | None:
    """What follows the last GSM8K-style ``#### `` marker. With ``numeric`` only markers
    followed by a number count, so markdown headings (``#### Step 2``) are not answers."""
    pattern = (r"(?m)####[ \t]*\$?[ \t]*(-?(?:\d[\d,]*)?\.?\d+(?:/\d+)?)[ \t]*[.%]?[ \t]*$" if numeric
               else r"####[ \t]*([^\n]+)")
    hits = re.findall(pattern, text)
    return hits[-1].strip() if hits else None


def _to_fraction(s: str) -> Fraction | None:
    s = s.strip().replace(",", "")
    try:
        if "/" in s:
            a, b = s.split("/", 1)
            return Fraction(a) / Fraction(b) if Fraction(b) != 0 else None
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _first_number(s: str | None) -> str | None:
    if not s:
        return None
    s = s.replace("$", " ").replace("\\$", " ")
    m = _NUM_RE.search(s)
    return m.group(0) if m else None


def _last_number(s: str) -> str | None:
    hits = _NUM_RE.findall(s.replace("$", " "))
    return hits[-1] if hits else None


class NumericScorer(Scorer):
    """Numbers compared as numbers (``1,000`` = ``1000.00``; ``-3``; ``3/4``).

    The output's answer is the first number after the last ``####``, else in the last
    ``\\boxed{}``, else after the last 'answer is'/'Answer:', else the last number in the
    output. The reference may be a GSM8K solution (``... #### 18``) or a number.
    Equal when exactly equal as fractions or within ``rel_tol`` (default 1e-6)."""

    name = "numeric"

    def __init__(self, *, rel_tol: float = 1e-6):
        self.rel_tol = float(rel_tol)

    @staticmethod
    def extract(output: str) -> str | None:
        for part in (_after_hashes(output, numeric=True), last_boxed(output), _answer_phrase(output)):
            n = _first_number(part)
            if n is not None:
                return n
        return _last_number(output)

    @staticmethod
    def gold(answer: Any) -> Fraction | None:
        if isinstance(answer, bool):
            return None
        if isinstance(answer, (int, Fraction)):
            return Fraction(answer)
        if isinstance(answer, float):
            return Fraction(answer) if math.isfinite(answer) else None
        text = str(answer)
        n = _first_number(_after_hashes(text, numeric=True)) or _last_number(text)
        return _to_fraction(n) if n else None

    def score(self, output: str, example: Example) -> Score:
        gold = self.gold(example.answer)
        if gold is None:
            raise EnvError(f"example {example.id}: the numeric scorer found no number in its answer "
                           f"{str(example.answer)[:60]!r}; use the exact or math scorer for this task")
        got = self.extract(output or "")
        value = _to_fraction(got) if got is not None else None
        if value is None:
            return _verdict(False, got)
        ok = value == gold or abs(value - gold) <= self.rel_tol * max(abs(gold), 1)
        return _verdict(ok, got)


# --------------------------------------------------------------------------- math

_MATH_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad", "\\displaystyle", "\\$",
              "^\\circ", "^{\\circ}", "°", "\\%", "%", "$")
_TEXT_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")


def _strip_math_delims(s: str) -> str:
    s = s.strip()
    for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(a) and s.endswith(b) and len(s) >= len(a) + len(b):
            s = s[len(a):len(s) - len(b)].strip()
    return s


def normalize_math(s: str) -> str:
    """A canonical string for simple LaTeX answers: no spacing commands, ``\\left``,
    degrees, percent or dollars; ``\\dfrac``/``\\tfrac`` -> ``\\frac``; ``\\frac12`` ->
    ``\\frac{1}{2}``; ``\\text{..}`` unwrapped; a leading ``x =`` dropped; no spaces."""
    s = _strip_math_delims(str(s))
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for d in _MATH_DROP:
        s = s.replace(d, "")
    for _ in range(3):
        s = _TEXT_RE.sub(r"\1", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt\s*(\d)", r"\\sqrt{\1}", s)
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"^[a-zA-Z]=(?!=)", "", s)
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def _simple_value(s: str) -> Fraction | None:
    """The value of a plain number, ``a/b`` or ``\\frac{a}{b}`` (normalised input)."""
    m = re.fullmatch(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    if m:
        a, b = _to_fraction(m.group(2)), _to_fraction(m.group(3))
        if a is None or b is None or b == 0:
            return None
        return (-1 if m.group(1) else 1) * a / b
    if re.fullmatch(r"-?[\d.]+(/-?[\d.]+)?", s):
        return _to_fraction(s)
    return None


_mv_lock = threading.Lock()
_mv: Any = None  # the math_verify module, False when not installed


def _math_verify():
    global _mv
    with _mv_lock:
        if _mv is None:
            try:
                import math_verify
                _mv = math_verify
            except ImportError:
                _mv = False
        return _mv


class MathScorer(Scorer):
    """MATH-style answers. The output's answer is its last ``\\boxed{...}`` (nested
    braces kept whole), else what follows the last 'answer is'/'Answer:'; the reference
    is ``example.answer`` (its last ``\\boxed{}`` if it has one).

    Equal when the normalised strings match (:func:`normalize_math`), or both are simple
    numbers of equal value (``\\frac{1}{2}`` = ``0.5`` = ``1/2``), or ``math-verify``
    (when installed) finds them equivalent (``x^2+2x`` = ``x(x+2)``, tuples, intervals,
    ``3\\sqrt{2}`` = ``\\sqrt{18}``). ``use_math_verify=False`` turns the last off.
    """

    name = "math"
    #: Longer answers skip math-verify: sympy can take very long on big expressions.
    MAX_VERIFY_CHARS = 400

    def __init__(self, *, use_math_verify: bool = True, timeout_s: int = 5):
        self.use_math_verify = use_math_verify
        self.timeout_s = int(timeout_s)

    @staticmethod
    def extract(output: str) -> str | None:
        boxed = last_boxed(output)
        if boxed is not None:
            return boxed
        if _BOX_RE.search(output):
            return None  # a box that never closed: truncated
        phrase = _answer_phrase(output)
        if phrase:
            m = re.search(r"\$([^$]+)\$", phrase)  # 'The answer is $\frac{1}{2}$.'
            return m.group(1).strip() if m else phrase
        return None

    def equivalent(self, got: str, gold: str) -> bool:
        a, b = normalize_math(got), normalize_math(gold)
        if a == b and a:
            return True
        va, vb = _simple_value(a), _simple_value(b)
        if va is not None and vb is not None:
            return va == vb
        if not self.use_math_verify or max(len(got), len(gold)) > self.MAX_VERIFY_CHARS:
            return False
        mv = _math_verify()
        if not mv:
            return False
        # math-verify's timeouts use SIGALRM, which only the main thread may set.
        t = self.timeout_s if threading.current_thread() is threading.main_thread() else None
        try:
            g = mv.parse(f"${_strip_math_delims(gold)}$", parsing_timeout=t)
            p = mv.parse(f"${_strip_math_delims(got)}$", parsing_timeout=t)
            return bool(g and p and mv.verify(g, p, timeout_seconds=t))
        except Exception:  # noqa: BLE001 - a parse failure is "not shown equal"
            return False

    def score(self, output: str, example: Example) -> Score:
        gold_text = str(example.answer)
        gold = last_boxed(gold_text) or gold_text
        got = self.extract(output or "")
        if got is None:
            return _verdict(False, None)
        return _verdict(self.equivalent(got, gold), got)


# --------------------------------------------------------------------------- choice


class ChoiceScorer(Scorer):
    """Multiple choice (letters ``A``-``D`` unless ``letters`` says otherwise). The
    reference is a letter (``"B"``, ``"(B)"``) or a 0-based index.

    The output's letter, first rule that matches: ``\\boxed{B}``; the last 'answer is
    (B)' / 'Answer: B' / 'option B'; the whole reply is a letter (``B``, ``(B)``,
    ``**B.**``, ``B) Paris``); the last ``(B)``; the reply equals one option's text
    (``meta['options']``); else the one distinct capital letter standing alone (the
    article 'A' before a lowercase word does not count)."""

    name = "choice"

    def __init__(self, *, letters: str = "ABCD"):
        if not letters or not letters.isalpha() or not letters.isupper():
            raise SpecError(f"scorer choice: letters must be capital letters like 'ABCD', got {letters!r}")
        self.letters = letters
        L = f"[{re.escape(letters)}]"
        self._boxed = re.compile(rf"^\s*(?:\\text\{{)?\s*\(?({L})\)?\s*\}}?\s*$")
        self._phrase = re.compile(
            rf"(?:answer|option|choice)\s*(?:is|would\s+be|should\s+be|:)?\s*:?\s*(?:option|choice)?\s*"
            rf"[*_]*([(\[])?({L})(?![\w'])", re.IGNORECASE)
        self._whole = re.compile(rf"^[\s*_#>]*[(\[]?({L})[)\].:]?(?:[\s*_]|$)")
        self._paren = re.compile(rf"\(({L})\)")
        self._alone = re.compile(rf"(?<![\w'\-])({L})(?![\w'\-])")

    def gold(self, answer: Any) -> str:
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(self.letters):
            return self.letters[answer]
        s = str(answer).strip().strip("()").strip().upper()
        if len(s) == 1 and s in self.letters:
            return s
        if s.isdigit() and int(s) < len(self.letters):
            return self.letters[int(s)]
        raise ValueError(f"not a choice: {answer!r}")

    def extract(self, output: str, options: Any = None) -> str | None:
        text = output or ""
        boxed = last_boxed(text)
        if boxed is not None:
            m = self._boxed.match(boxed)
            if m:
                return m.group(1)
        # a lowercase letter counts only in brackets: "the answer is (b)", not "answer is a bit"
        hits = [m.group(2).upper() for m in self._phrase.finditer(text) if m.group(2).isupper() or m.group(1)]
        if hits:
            return hits[-1]
        m = self._whole.match(text.strip())
        if m and not _article(text.strip(), m):
            return m.group(1)
        parens = self._paren.findall(text)
        if parens:
            return parens[-1]
        if options:
            norm = _norm_text(text, False)
            for k, opt in enumerate(options):
                if k < len(self.letters) and norm == _norm_text(str(opt), False):
                    return self.letters[k]
        alone = {m.group(1) for m in self._alone.finditer(text) if not _article(text, m)}
        return alone.pop() if len(alone) == 1 else None

    def score(self, output: str, example: Example) -> Score:
        try:
            gold = self.gold(example.answer)
        except ValueError:
            raise EnvError(f"example {example.id}: the choice scorer needs a letter in {self.letters} or an index as "
                           f"the answer, got {str(example.answer)[:40]!r}") from None
        got = self.extract(output or "", example.meta.get("options"))
        return _verdict(got == gold, got)


def _article(text: str, m: re.Match) -> bool:
    """Whether the matched letter is the English article: "A reasonable pick is C"."""
    return m.group(m.lastindex or 0).strip() == "A" and re.match(r"\s+[a-z]", text[m.end(m.lastindex or 0):]) is not None


# --------------------------------------------------------------------------- code

_FENCE_RE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(output: str, entry_point: str | None = None) -> str:
    """The code in a reply: the fenced block that defines ``entry_point`` (else the
    first ``python`` block, else the first block; an unclosed fence runs to the end);
    without fences, the reply itself."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE_RE.findall(output or "")]
    if not blocks:
        return output or ""
    if entry_point:
        for _, body in blocks:
            if re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", body, re.MULTILINE):
                return body
    for lang, body in blocks:
        if lang in ("python", "py", "python3"):
            return body
    return blocks[0][1]


@dataclass(frozen=True)
class CodeJob:
    """What the code harness runs: the answer's program, and the trusted ``prelude`` and
    ``tests`` with the names they take from the answer (``resolve``)."""

    code: str  # the code read from the reply
    answer: str  # the answer process's program
    prelude: str
    tests: str
    resolve: dict[str, str]


def _names_used(source: str, where: str, reference: str = "") -> list[str]:
    """Names the tests read that the answer may define: those that are not builtins, and
    builtin names the reference solution defines at top level (MBPP's ``def sum(a, b)``).
    A builtin the tests use for themselves (``len``) stays the real one."""
    import ast
    import builtins

    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise EnvError(f"{where}: the tests are not valid Python ({e.msg}, line {e.lineno}); fix the dataset") from None
    try:
        defined = {n.name for n in ast.parse(reference).body
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    except (SyntaxError, ValueError):
        defined = set()
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return sorted(n for n in names if not hasattr(builtins, n) or n in defined)


class CodeScorer(Scorer):
    """Runs the reply's code against *all* the example's tests in the sandbox
    (:mod:`graphtune.envs.sandbox`) through :mod:`graphtune.envs.code_harness`: the
    tests run in a process of their own and call the answer's functions in another, get
    plain values back and compare them themselves; correct only when the tests process
    reports, with its per-run token, that every test ran and passed.

    HumanEval (``meta['test']``, ``meta['entry_point']``, ``meta['prompt']``): the answer
    process runs the prompt then the reply when the reply defines the entry point (so the
    prompt's imports and helpers exist), else the prompt with the reply as its body; the
    tests process runs the prompt (its helpers, e.g. ``poly``, are the dataset's, not the
    reply's) and ``check(<the answer's entry point>)``. MBPP (``meta['test_list']``,
    optional ``meta['test_setup_code']``; ``challenge_tests=True`` adds
    ``challenge_test_list``): the answer process runs the reply's code; the tests process
    runs the setup code (it may build the reply's classes) then every assert, with each
    name they use that the reply defines bound to it (a module the reply imports is
    imported afresh in the tests process).

    A timeout, crash, failed assert or a result that is not equal as a plain value is
    wrong; a sandbox that cannot start, or tests that fail before the answer runs, is an
    error.
    """

    name = "code"

    def __init__(self, *, timeout_s: float = 10.0, memory_mb: int = 512, max_procs: int = 32,
                 challenge_tests: bool = False):
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.max_procs = int(max_procs)
        self.challenge_tests = challenge_tests

    def program(self, output: str, example: Example) -> CodeJob:
        """The harness job for ``output`` on ``example``."""
        meta = example.meta
        if meta.get("test") and meta.get("entry_point"):
            entry = str(meta["entry_point"])
            code = extract_code(output, entry)
            prompt = str(meta.get("prompt") or "")
            if re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
                answer = prompt + "\n\n" + code
            else:
                answer = prompt + code
            prelude = f"{prompt}\n\n{meta['test']}\n"
            _names_used(prelude, f"example {example.id}")
            # the entry point's own name too: some tests call it directly (HumanEval/33)
            return CodeJob(code, answer, prelude, "check(__graphtune_candidate__)\n",
                           {"__graphtune_candidate__": entry, entry: entry})
        if meta.get("test_list"):
            tests = list(meta["test_list"])
            if self.challenge_tests:
                tests += list(meta.get("challenge_test_list") or ())
            code = extract_code(output)
            setup = str(meta.get("test_setup_code") or "")
            # setup before the asserts, in the tests process: MBPP's setup builds objects of the answer's classes
            source = f"{setup}\n\n" + "\n".join(tests) + "\n"
            reference = example.answer if isinstance(example.answer, str) else ""
            names = _names_used(source, f"example {example.id}", reference)
            return CodeJob(code, code, "", source, {n: n for n in names})
        raise EnvError(f"example {example.id}: the code scorer needs tests in meta ('test' and 'entry_point' as in "
                       "HumanEval, or 'test_list' as in MBPP); use preset humaneval/mbpp or map them with fields")

    def score(self, output: str, example: Example) -> Score:
        from graphtune.envs.code_harness import run_tests

        job = self.program(output or "", example)
        r = run_tests(job.answer, tests=job.tests, prelude=job.prelude, resolve=job.resolve,
                      timeout_s=self.timeout_s, memory_mb=self.memory_mb, max_procs=self.max_procs)
        if r.error:
            return Score(correct=None, score=0.0, extracted=job.code, error=r.error)
        return _verdict(bool(r.passed), job.code)


# --------------------------------------------------------------------------- llm-judge

_JUDGE_PROMPT = """You are grading an answer to a question against a reference answer.
Judge only whether the candidate's final answer means the same as the reference answer;
ignore style, length and the reasoning that leads to it.

Question:
{question}

Reference answer:
{reference}

Candidate answer:
{output}

Reply with a JSON object: {"correct": true or false, "reason": "<one sentence>"}"""

_JUDGE_SCHEMA = {"type": "object", "properties": {"correct": {"type": "boolean"}, "reason": {"type": "string"}},
                 "required": ["correct"], "additionalProperties": False}


def _parse_verdict(text: str) -> bool | None:
    m = re.search(r"\{.*\}", text or "", re.DOTALL)
    if m:
        try:
            data = json.loads(m.group(0))
            if isinstance(data, dict) and isinstance(data.get("correct"), bool):
                return data["correct"]
        except json.JSONDecodeError:
            pass
    m = re.search(r'"?correct"?\s*[:=]\s*(true|false)', text or "", re.IGNORECASE)
    if m:
        return m.group(1).lower() == "true"
    m = re.search(r"\b(?:verdict|grade)\s*:\s*(correct|incorrect)\b", text or "", re.IGNORECASE)
    if m:
        return m.group(1).lower() == "correct"
    return None


class LLMJudgeScorer(Scorer):
    """Asks a judge model whether the output matches the reference. Options: ``model``
    (required, a litellm model string), ``api_base``, ``api_key_env``, ``timeout_s``,
    ``max_retries``, ``prompt`` (a template with ``{question}``, ``{reference}``,
    ``{output}``). ``complete`` (required, not an option) makes the call: a function with
    the signature of :func:`graphtune.llm.complete`, which the app passes
    (``get_scorer(..., complete=...)``); the environments do not import the LLM client.

    An endpoint that stays down (LLMTransientError) or a reply with no verdict is an
    error, not a wrong answer; LLMFatalError (bad key, unknown model) propagates, since
    every later call would fail the same way."""

    name = "llm-judge"
    #: takes the app's LLM client (``complete``): see :func:`get_scorer`
    uses_llm = True

    def __init__(self, *, model: str | None = None, api_base: str | None = None, api_key_env: str | None = None,
                 timeout_s: float = 60.0, max_retries: int = 2, prompt: str = _JUDGE_PROMPT, max_tokens: int = 200,
                 complete: Callable[..., Any] | None = None):
        if not model:
            raise SpecError("scorer llm-judge needs a judge model: give the scorer option model "
                            "(a litellm model string, e.g. openai/gpt-4o-mini)")
        for key in ("{question}", "{reference}", "{output}"):
            if key not in prompt:
                raise SpecError(f"scorer llm-judge: the prompt template must contain {key}")
        if complete is None:
            raise EnvError("scorer llm-judge needs an LLM client: pass complete=, a completion function such as "
                           "graphtune.llm.complete (graphtune.api passes it when it builds the scorer from a spec)")
        self._complete = complete
        self.model, self.api_base, self.api_key_env = model, api_base, api_key_env
        self.timeout_s, self.max_retries, self.prompt, self.max_tokens = timeout_s, max_retries, prompt, max_tokens

    def score(self, output: str, example: Example) -> Score:
        values = {"question": example.question, "reference": str(example.answer), "output": output or ""}
        # one pass, so a question that contains "{output}" is not filled in twice
        text = re.sub(r"\{(question|reference|output)\}", lambda m: values[m.group(1)], self.prompt)
        try:
            reply = self._complete(self.model, [{"role": "user", "content": text}], api_base=self.api_base,
                                   api_key_env=self.api_key_env, temperature=0.0, max_tokens=self.max_tokens,
                                   json_schema=_JUDGE_SCHEMA, timeout_s=self.timeout_s, max_retries=self.max_retries)
        except LLMFatalError:
            raise
        except LLMError as e:
            return Score(correct=None, score=0.0, error=f"judge {self.model} unavailable: {e}")
        verdict = _parse_verdict(reply.text)
        if verdict is None:
            return Score(correct=None, score=0.0, error=f"judge {self.model} gave no verdict: {reply.text[:120]!r}")
        return _verdict(verdict, None)


# --------------------------------------------------------------------------- python:module:fn


class PythonScorer(Scorer):
    """``python:module:fn``: ``fn(output, example)`` returns a bool, a number in
    ``[0, 1]`` (correct when ``>= threshold``, default 1.0) or a :class:`Score`. An
    exception inside ``fn`` is an error (reported, not counted), never a wrong answer."""

    def __init__(self, name: str, fn: Callable[[str, Example], Any], *, threshold: float = 1.0):
        self.name, self.fn, self.threshold = name, fn, float(threshold)

    def score(self, output: str, example: Example) -> Score:
        try:
            r = self.fn(output, example)
        except Exception as e:  # noqa: BLE001 - the user's code; its failure is data
            return Score(correct=None, score=0.0, error=f"scorer {self.name} raised {type(e).__name__}: {e}")
        if isinstance(r, Score):
            return r
        if isinstance(r, bool):
            return _verdict(r, None)
        if isinstance(r, (int, float)) and math.isfinite(r):
            s = min(max(float(r), 0.0), 1.0)
            return Score(correct=s >= self.threshold, score=s)
        return Score(correct=None, score=0.0,
                     error=f"scorer {self.name} returned {type(r).__name__}; return a bool, a float or a Score")


def _python_scorer(name: str, **options) -> PythonScorer:
    parts = name.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise SpecError(f"scorer {name!r}: write python:module:function, e.g. python:my_scorers:is_correct")
    _, module, attr = parts
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise SpecError(f"scorer {name}: cannot import module {module!r} ({e}); put it on PYTHONPATH") from None
    fn = mod
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise SpecError(f"scorer {name}: module {module!r} has no {attr!r}")
    if not callable(fn):
        raise SpecError(f"scorer {name}: {module}.{attr} is not callable")
    return PythonScorer(name, fn, **options)


# --------------------------------------------------------------------------- registry

#: The scorer name table (``python:module:fn`` is resolved separately).
SCORERS: Mapping[str, type[Scorer]] = {
    "exact": ExactScorer,
    "numeric": NumericScorer,
    "math": MathScorer,
    "choice": ChoiceScorer,
    "code": CodeScorer,
    "llm-judge": LLMJudgeScorer,
}

_DEFAULTS = {"gsm8k": "numeric", "math500": "math", "mmlu": "choice", "humaneval": "code", "mbpp": "code"}


def get_scorer(name: str, *, complete: Callable[..., Any] | None = None, **options) -> Scorer:
    """The scorer called ``name``, configured by ``options`` (see each class).
    ``complete`` is the LLM client (:func:`graphtune.llm.complete`'s signature), given to
    the scorers that call a model (``uses_llm``: ``llm-judge``) and ignored by the others."""
    if name.startswith("python:"):
        try:
            return _python_scorer(name, **options)
        except TypeError as e:
            raise SpecError(f"scorer {name}: bad option ({e})") from None
    cls = SCORERS.get(name)
    if cls is None:
        raise SpecError(f"unknown scorer {name!r}; known scorers: {', '.join(SCORERS)}, python:module:function")
    if getattr(cls, "uses_llm", False):
        options = {**options, "complete": complete}
    try:
        return cls(**options)
    except TypeError as e:
        raise SpecError(f"scorer {name}: bad option ({e})") from None


def default_scorer_for(preset: str | None) -> str:
    """The scorer name that fits a dataset preset."""
    if preset is None:
        raise SpecError(f"task.scorer is needed when the dataset has no preset; known scorers: "
                        f"{', '.join(SCORERS)}, python:module:function")
    try:
        return _DEFAULTS[preset]
    except KeyError:
        raise SpecError(f"no default scorer for dataset preset {preset!r}; known presets: "
                        f"{', '.join(_DEFAULTS)}") from None
