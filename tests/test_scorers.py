"""Scorers: tricky outputs, and infrastructure failures that must not count as wrong."""

from __future__ import annotations

import importlib.util
import os
import sys
import textwrap

import pytest

from graphtune.envs import scorers as sc
from graphtune.envs.datasets import Example, load_dataset
from graphtune.envs.sandbox import SandboxResult, sandbox_mode
from graphtune.envs.scorers import SCORERS, Score, Scorer, default_scorer_for, get_scorer, last_boxed
from graphtune.errors import EnvError, LLMFatalError, LLMTransientError, SpecError

from datafiles import DATA, SOURCES

HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None
needs_math_verify = pytest.mark.skipif(not HAS_MATH_VERIFY, reason="math-verify is not installed")
needs_sandbox = pytest.mark.skipif(sandbox_mode() == "unavailable", reason="no code sandbox can start here")


def ex(answer, **meta) -> Example:
    return Example(id="t1", question="q?", answer=answer, meta=meta)


# ----------------------------------------------------------------------------- registry


def test_registry_and_errors():
    assert set(SCORERS) == {"exact", "numeric", "math", "choice", "code", "llm-judge"}
    for name in ("exact", "numeric", "math", "choice", "code"):
        s = get_scorer(name)
        assert isinstance(s, Scorer) and s.name == name
    with pytest.raises(SpecError, match="unknown scorer 'exakt'; known scorers: exact, numeric, math, choice"):
        get_scorer("exakt")
    with pytest.raises(SpecError, match="scorer numeric: bad option"):
        get_scorer("numeric", tolerance=3)
    assert [default_scorer_for(p) for p in ("gsm8k", "math500", "mmlu", "humaneval", "mbpp")] == \
        ["numeric", "math", "choice", "code", "code"]
    with pytest.raises(SpecError, match="no default scorer"):
        default_scorer_for("nope")
    with pytest.raises(SpecError, match="task.scorer is needed"):
        default_scorer_for(None)


# ----------------------------------------------------------------------------- exact


@pytest.mark.parametrize("output,answer,correct", [
    ("Paris", "paris", True),
    ("  The answer is Paris.", "Paris", True),
    ("\\boxed{Paris}", "Paris", True),
    ("**Paris**", "Paris", True),
    ("paris france", "Paris", False),
    ("Yes", ["yes", "y"], True),
    ("", "Paris", False),
])
def test_exact(output, answer, correct):
    assert get_scorer("exact").score(output, ex(answer)).correct is correct


def test_exact_options():
    assert get_scorer("exact", case_sensitive=True).score("paris", ex("Paris")).correct is False
    assert get_scorer("exact", extract=False).score("The answer is Paris", ex("Paris")).correct is False


# ----------------------------------------------------------------------------- numeric


@pytest.mark.parametrize("output,answer,correct,extracted", [
    ("9 * 2 = 18 dollars.\n#### 18", "She makes 9*2 = <<9*2=18>>18.\n#### 18", True, "18"),
    ("The answer is $1,000.", "#### 1000", True, "1,000"),
    ("So she has 18.00 dollars", "18", True, "18.00"),
    ("#### -3", "-3", True, "-3"),
    ("The answer is 5 apples. Then she buys 6 more.", "5", True, "5"),  # 'answer is' beats the last number
    ("I got 7 and then 8", "8", True, "8"),
    ("3/4", "0.75", True, "3/4"),
    ("\\boxed{42}", "#### 42", True, "42"),
    ("#### 1. Setup\nstuff\n#### 2. Total\nThe answer is 18.", "18", True, "18"),  # headings are not answers
    ("#### 17", "18", False, "17"),
    ("no number at all", "3", False, None),
    ("Answer: 1,234,567", "1234567", True, "1,234,567"),
    ("answer is .5", "0.5", True, ".5"),
    ("18", 18, True, "18"),
    ("12.5%", 12.5, True, "12.5"),
])
def test_numeric(output, answer, correct, extracted):
    s = get_scorer("numeric").score(output, ex(answer))
    assert (s.correct, s.extracted) == (correct, extracted)
    assert s.score == (1.0 if correct else 0.0) and s.error is None


def test_numeric_reference_without_number_is_a_config_error():
    with pytest.raises(EnvError, match="numeric scorer found no number"):
        get_scorer("numeric").score("5", ex("five"))


@pytest.mark.parametrize("data", SOURCES)
def test_numeric_agrees_with_recorded_gsm8k_labels(data):
    import json
    rows = [json.loads(ln) for ln in (DATA[data] / "recorded" / "gsm8k_gpt3_solutions.jsonl").open()][:300]
    gold = {" ".join(e.question.split()): e for e in load_dataset(str(DATA[data] / "gsm8k/test.jsonl"), preset="gsm8k")}
    scorer = get_scorer("numeric")
    for r in rows:
        e = gold[" ".join(r["question"].split())]
        assert scorer.score(e.meta["solution"], e).correct
        for system in ("6b_finetuning", "175b_verification"):
            assert scorer.score(r[system]["solution"], e).correct == r[system]["is_correct"], r[system]


# ----------------------------------------------------------------------------- math


def test_last_boxed_keeps_nested_braces():
    # the paper's code cut this at the first closing brace, giving '\frac{1'
    assert last_boxed("so \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\frac{\\sqrt{3}}{2}}") == "\\frac{\\sqrt{3}}{2}"
    assert last_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"  # escaped braces do not close the group
    assert last_boxed("\\fbox{7}") == "7" and last_boxed("\\boxed 5$") == "5"
    assert last_boxed("\\boxed{\\frac{1}{2}") is None  # truncated
    assert last_boxed("no box") is None


@pytest.mark.parametrize("output,answer,correct", [
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{1/2}", "\\frac{1}{2}", True),
    ("The final answer is $\\frac12$.", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{x = 5}", "5", True),
    ("\\boxed{10\\%}", "10", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", True),
    ("first \\boxed{2}, finally \\boxed{3}", "3", True),
    ("\\boxed{2}", "3", False),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{3}", False),
    ("\\boxed{\\frac{1}{3}}", "0.33", False),
    ("\\boxed{\\frac{1}{2}", "\\frac{1}{2}", False),  # never closed: truncated reply
    ("no answer here 5", "5", False),
    ("", "5", False),
])
def test_math(output, answer, correct):
    assert get_scorer("math").score(output, ex(answer)).correct is correct


@needs_math_verify
@pytest.mark.parametrize("output,answer,correct", [
    ("\\boxed{x^2+2x}", "x(x+2)", True),
    ("\\boxed{3\\sqrt{2}}", "\\sqrt{18}", True),
    ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{[1,2]}", "[1,2)", False),
    ("\\boxed{x^2+2x}", "x(x+3)", False),
])
def test_math_equivalence_via_math_verify(output, answer, correct):
    assert get_scorer("math").score(output, ex(answer)).correct is correct
    if correct:
        assert get_scorer("math", use_math_verify=False).score(output, ex(answer)).correct is False


def test_math_reference_with_a_box():
    assert get_scorer("math").score("\\boxed{4}", ex("so \\boxed{4}.")).correct


def test_math_in_a_worker_thread():
    from concurrent.futures import ThreadPoolExecutor
    scorer = get_scorer("math")
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda a: scorer.score(f"\\boxed{{{a}}}", ex("x(x+2)")).correct, ["x^2+2x", "x^2"]))
    assert got == [HAS_MATH_VERIFY, False]


@pytest.mark.parametrize("data", SOURCES)
def test_math_accepts_every_math500_reference_solution(data):
    exs = load_dataset(str(DATA[data] / "math500/test.jsonl"), preset="math500")
    scorer = get_scorer("math")
    wrong = [e.id for e in exs if not scorer.score(e.meta["solution"], e).correct]
    assert wrong == []
    # and rejects other problems' answers (sample: math-verify makes each comparison ~20 ms)
    for a, b in zip(exs[:60], exs[1:61]):
        if sc.normalize_math(a.answer) != sc.normalize_math(b.answer):
            assert not scorer.score(f"\\boxed{{{b.answer}}}", a).correct, (a.answer, b.answer)


# ----------------------------------------------------------------------------- choice

OPTIONS = ("London", "Paris", "Rome", "Berlin")


@pytest.mark.parametrize("output,answer,extracted", [
    ("B", "B", "B"),
    ("(C)", "C", "C"),
    ("The answer is (b).", "B", "B"),
    ("Answer: **D**", "D", "D"),
    ("A good choice would be C.", "C", "C"),  # the article 'A' is not an answer
    ("A reasonable pick is C.", "C", "C"),
    ("A. London", "A", "A"),
    ("A) is right", "A", "A"),
    ("I think the answer is B, but actually the correct answer is D.", "D", "D"),
    ("\\boxed{C}", "C", "C"),
    ("\\boxed{\\text{(B)}}", "B", "B"),
    ("B) Paris", "B", "B"),
    ("**B.** Paris is the capital", "B", "B"),
    ("The answer is a bit unclear, maybe (A)", "A", "A"),  # 'answer is a' is not a letter
    ("Paris", "B", "B"),  # the option's text
    ("A", 0, "A"),  # index as reference
    ("None of them", "A", None),
    ("The answer is Alpha Centauri", "A", None),
    ("Options A and B are wrong, so C", "C", None),  # ambiguous: no guess
    ("E", "A", None),
])
def test_choice(output, answer, extracted):
    s = get_scorer("choice").score(output, ex(answer, options=OPTIONS))
    assert s.extracted == extracted
    gold = "ABCD"[answer] if isinstance(answer, int) else answer
    assert s.correct is (extracted == gold)


def test_choice_letters_option_and_bad_reference():
    s = get_scorer("choice", letters="ABCDEFGHIJ")
    assert s.score("The answer is (H)", ex("H")).correct
    with pytest.raises(SpecError):
        get_scorer("choice", letters="abc")
    with pytest.raises(EnvError, match="choice scorer needs a letter"):
        get_scorer("choice").score("A", ex("Paris"))


# ----------------------------------------------------------------------------- code

HE_PROMPT = 'from typing import List\n\n\ndef add_all(xs: List[int]) -> int:\n    """Sum of xs."""\n'
HE_TEST = textwrap.dedent("""
    def check(candidate):
        assert candidate([]) == 0
        assert candidate([1, 2]) == 3
        assert candidate([5]) == 5
        assert candidate([-1, 1, 10]) == 10
""")
HE = dict(prompt=HE_PROMPT, test=HE_TEST, entry_point="add_all")
MBPP = dict(test_list=("assert sq(2) == 4", "assert sq(-3) == 9", "assert sq(0) == 0"), test_setup_code="",
            challenge_test_list=("assert sq(10**3) == 10**6",))


@needs_sandbox
@pytest.mark.parametrize("output,correct", [
    ("    return sum(xs)\n", True),  # a body completing the prompt
    ("```python\ndef add_all(xs):\n    return sum(xs)\n```\nThis sums the list.", True),
    ("Here you go:\n```python\nimport math\n\ndef helper():\n    pass\n\n```\n```python\ndef add_all(xs: List[int]) -> int:\n"
     "    return sum(xs)\n```", True),  # the block defining the entry point; List from the prompt
    ("```python\ndef add_all(xs):\n    return sum(xs)", True),  # unclosed fence (truncated)
    # passes the first three asserts, fails the last: ALL must pass (the paper passed on one random assert)
    ("    return sum(xs) if len(xs) < 3 else 0\n", False),
    ("    import sys\n    sys.exit(0)\n", False),  # exiting early with status 0 is not a pass
    ("import os\nos._exit(0)\n", False),
    ("    while True:\n        pass\n", False),  # timeout
    ("def add_all(xs) return", False),  # syntax error
    ("", False),  # the empty stub returns None
])
def test_code_humaneval(output, correct):
    s = get_scorer("code", timeout_s=2).score(output, ex("canonical", **HE))
    assert s.correct is correct and s.error is None, s


@needs_sandbox
def test_code_mbpp_runs_every_test_and_setup_after_the_code():
    scorer = get_scorer("code", timeout_s=3)
    assert scorer.score("```python\ndef sq(x):\n    return x * x\n```", ex("", **MBPP)).correct
    assert not scorer.score("def sq(x):\n    return abs(x) * 2 if x < 0 else x * x", ex("", **MBPP)).correct
    assert not get_scorer("code", challenge_tests=True).score("def sq(x):\n    return x * x if x < 100 else 0",
                                                              ex("", **MBPP)).correct
    setup = dict(MBPP, test_setup_code="p = Pt(3)", test_list=("assert sq(p.x) == 9",))
    assert scorer.score("class Pt:\n    def __init__(self, x):\n        self.x = x\ndef sq(x):\n    return x*x",
                        ex("", **setup)).correct


def test_code_sandbox_failure_is_an_error_not_wrong(monkeypatch):
    import graphtune.envs.sandbox as sandbox
    monkeypatch.setattr(sandbox, "run_python", lambda *a, **k: SandboxResult(
        False, None, "", "", False, error="sandbox cannot start: unshare: Operation not permitted"))
    s = get_scorer("code").score("    return sum(xs)\n", ex("", **HE))
    assert s.correct is None and s.score == 0.0 and "unshare" in s.error


def test_code_without_tests_is_a_config_error():
    with pytest.raises(EnvError, match="code scorer needs tests in meta"):
        get_scorer("code").score("print(1)", ex("x"))


@needs_sandbox
@pytest.mark.parametrize("data", SOURCES)
def test_code_on_shared_canonical_solutions(data):
    scorer = get_scorer("code")
    he = load_dataset(str(DATA[data] / "humaneval/HumanEval.jsonl"), preset="humaneval", limit=3)
    mbpp = load_dataset(str(DATA[data] / "mbpp/mbpp.jsonl"), preset="mbpp", limit=3)
    for e in he + mbpp:
        assert scorer.score(f"```python\n{e.answer}\n```", e).correct, e.id
        assert not scorer.score("```python\npass\n```", e).correct, e.id


# ----------------------------------------------------------------------------- code: forged verdicts (issue 10)

# Each answer below tries to be scored correct without computing add_all. Each ends by
# exiting with the status the old harness read as "all tests passed", so on the old
# harness every one of them was scored correct.
_OLD_PASS = "\nimport os as _o\n_o._exit(86)\n"
FORGERIES = {
    "exit-status": "import os\nos._exit(86)\n",
    "sys-exit-in-call": "def add_all(xs):\n    import sys\n    sys.exit(0)\n" + _OLD_PASS,
    "always-true-eq": "class Yes:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
                      "def add_all(xs):\n    return Yes()\n",
    "int-subclass-eq": "class Yes(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
                       "def add_all(xs):\n    return Yes(7)\n",
    "patched-builtins": "import builtins\nclass Never(Exception):\n    pass\nbuiltins.AssertionError = Never\n"
                        "builtins.len = lambda x: 0\ndef add_all(xs):\n    return 0\n" + _OLD_PASS,
    # look for the token and the report channel everywhere the answer can reach, then write
    # every candidate line to every descriptor
    "token-hunt": """
import gc, os, re, sys
found = set()
for o in gc.get_objects():
    for s in ([o] if isinstance(o, str) else list(o.values()) if isinstance(o, dict) else []):
        if isinstance(s, str):
            found.update(re.findall(r"[0-9a-f]{32}", s))
f = sys._getframe()
while f:
    found.update(v for v in f.f_locals.values() if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{32}", v))
    f = f.f_back
for path in ("/proc/%d/mem" % os.getppid(), "/proc/%d/environ" % os.getppid(), "/proc/1/environ", "main.py"):
    try:
        found.update(re.findall(r"[0-9a-f]{32}", open(path, "rb").read(1 << 20).decode("latin-1")))
    except (OSError, ValueError):
        pass
fds = []
for pid in ("self", str(os.getppid()), "1"):
    try:
        fds += ["/proc/%s/fd/%s" % (pid, n) for n in os.listdir("/proc/%s/fd" % pid)]
    except OSError:
        pass
lines = [b"pass " + t.encode() + b"\\n" for t in found] or [b"pass x\\n"]
for fd in list(range(3, 64)):
    for line in lines:
        try:
            os.write(fd, line)
        except OSError:
            pass
for path in fds:
    try:
        with open(path, "wb") as fh:
            for line in lines:
                fh.write(line)
    except OSError:
        pass
def add_all(xs):
    return 0
""" + _OLD_PASS,
    "kill-the-tests": "import os, signal\nfor sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):\n"
                      "    try:\n        os.kill(os.getppid(), sig)\n    except OSError:\n        pass\n"
                      "def add_all(xs):\n    return 0\n" + _OLD_PASS,
}


@needs_sandbox
@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_code_forged_verdicts_are_wrong(name):
    s = get_scorer("code", timeout_s=5).score(f"```python\n{FORGERIES[name]}\n```", ex("canonical", **HE))
    assert s.correct is False and s.error is None, (name, s)


@needs_sandbox
def test_code_always_true_eq_fails_on_mbpp_too():
    forged = "class Yes:\n    def __eq__(self, other):\n        return True\ndef sq(x):\n    return Yes()\n"
    assert get_scorer("code", timeout_s=5).score(forged, ex("", **MBPP)).correct is False


@needs_sandbox
def test_code_prompt_helpers_are_the_datasets_not_the_answers():
    # HumanEval/32 checks the answer with the prompt's poly(); an answer that redefines
    # poly() to return 0 used to pass with any number
    prompt = "def ref(x):\n    return x * 3\n\n\ndef triple(x):\n    \"\"\"3x.\"\"\"\n"
    test = "def check(candidate):\n    for x in range(5):\n        assert ref(candidate(x)) == ref(3 * x)\n"
    meta = dict(prompt=prompt, test=test, entry_point="triple")
    cheat = "```python\ndef ref(x):\n    return 0\n\ndef triple(x):\n    return 1\n```"
    assert get_scorer("code", timeout_s=5).score(cheat, ex("", **meta)).correct is False
    assert get_scorer("code", timeout_s=5).score("    return 3 * x\n", ex("", **meta)).correct is True


@needs_sandbox
def test_code_answer_cannot_read_the_expected_values():
    secret = "zebra-" + str(4821)
    test = f"def check(candidate):\n    assert candidate() == {secret!r}\n"
    meta = dict(prompt="def guess():\n    \"\"\"?\"\"\"\n", test=test, entry_point="guess")
    snoop = r"""
import gc, glob, os, re
def guess():
    texts = []
    for path in glob.glob("*") + glob.glob("/tmp/**", recursive=True) + glob.glob("/proc/*/cmdline"):
        try:
            texts.append(open(path, errors="replace").read())
        except OSError:
            pass
    texts += [o for o in gc.get_objects() if isinstance(o, str)]
    for t in texts:
        m = re.search(r"zebra-\d{4}", t)
        if m:
            return m.group(0)
    return ""
"""
    assert get_scorer("code", timeout_s=5).score(f"```python\n{snoop}\n```", ex("", **meta)).correct is False


@needs_sandbox
def test_code_plain_value_subclasses_and_objects_still_work():
    test = ("def check(candidate):\n    assert candidate(2) == (2, 4)\n    assert candidate(2)[1] == 4\n"
            "    assert isinstance(candidate(1), tuple)\n")
    meta = dict(prompt="def pair(x):\n    \"\"\"(x, 2x)\"\"\"\n", test=test, entry_point="pair")
    named = ("```python\nfrom collections import namedtuple\nP = namedtuple('P', 'a b')\n"
             "def pair(x):\n    return P(x, 2 * x)\n```")
    assert get_scorer("code", timeout_s=5).score(named, ex("", **meta)).correct is True
    # MBPP-style classes: objects stay in the answer's process, their attributes come back as values
    cls = dict(test_list=("assert Stack([1, 2]).top() == 2", "assert len(Stack([1, 2, 3]).items) == 3",
                          "s = Stack([]); s.items = [5]; assert s.top() == 5"), test_setup_code="")
    answer = "class Stack:\n    def __init__(self, items):\n        self.items = list(items)\n" \
             "    def top(self):\n        return self.items[-1]\n"
    assert get_scorer("code", timeout_s=5).score(answer, ex("", **cls)).correct is True


@needs_sandbox
def test_code_tests_failing_before_the_answer_runs_is_an_error_not_wrong():
    meta = dict(prompt="import no_such_module_graphtune\n\ndef f():\n    \"\"\"?\"\"\"\n",
                test="def check(candidate):\n    assert candidate() == 1\n", entry_point="f")
    s = get_scorer("code", timeout_s=5).score("    return 1\n", ex("", **meta))
    assert s.correct is None and "no_such_module_graphtune" in s.error


@needs_sandbox
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="the sandbox's uid mode needs root")
def test_code_forgeries_fail_in_uid_mode_too(monkeypatch):
    # uid mode: no PID namespace, so the answer sees the tests process and can signal it
    from graphtune.envs import sandbox as sb
    best = sb._get_setup()
    for python in sb._python_candidates():
        trial = sb._Setup("uid", python, cgroups=best.cgroups)
        if sb._run(trial, "print(1)", timeout_s=10, memory_mb=512, max_procs=8, file_mb=1, max_output_bytes=100).ok:
            break
    else:
        pytest.skip("uid mode does not start here")
    monkeypatch.setattr(sb, "_setup", trial)
    scorer = get_scorer("code", timeout_s=5)
    for name in ("token-hunt", "kill-the-tests", "exit-status", "always-true-eq"):
        s = scorer.score(f"```python\n{FORGERIES[name]}\n```", ex("canonical", **HE))
        assert s.correct is False and s.error is None, (name, s)
    assert scorer.score("    return sum(xs)\n", ex("canonical", **HE)).correct is True


def test_code_tests_that_are_not_python_are_a_config_error():
    with pytest.raises(EnvError, match="not valid Python"):
        get_scorer("code").program("def sq(x): return x*x", ex("", test_list=("assert sq(2) ==",)))


# ----------------------------------------------------------------------------- llm-judge


class _Reply:
    def __init__(self, text):
        self.text, self.prompt_tokens, self.completion_tokens, self.seconds, self.model = text, 10, 5, 0.1, "judge"


@pytest.fixture
def fake_llm():
    """``install(reply | exc)`` sets what the fake LLM client ``install.complete`` (the
    judge's ``complete``, as the app would pass graphtune.llm.complete) does next."""
    calls = []
    now: dict = {}

    def complete(model, messages, **kw):
        calls.append((model, messages, kw))
        if now["exc"]:
            raise now["exc"]
        return _Reply(now["reply"])

    def install(reply=None, exc=None):
        now.update(reply=reply, exc=exc)
        return calls
    install.complete = complete
    return install


def test_llm_judge_verdicts(fake_llm):
    calls = fake_llm('{"correct": true, "reason": "same"}')
    judge = get_scorer("llm-judge", model="openai/judge", api_key_env="JUDGE_KEY", complete=fake_llm.complete)
    s = judge.score("It is Paris.", Example("q", "Capital of France?", "Paris", {}))
    assert s == Score(correct=True, score=1.0)
    model, messages, kw = calls[0]
    assert model == "openai/judge" and kw["api_key_env"] == "JUDGE_KEY" and kw["temperature"] == 0.0
    assert "Capital of France?" in messages[0]["content"] and "It is Paris." in messages[0]["content"]
    assert '{"correct": true or false' in messages[0]["content"] and kw["json_schema"]["required"] == ["correct"]
    fake_llm('Sure! {"correct": false}')
    assert judge.score("Rome", ex("Paris")).correct is False
    fake_llm("Verdict: CORRECT")
    assert judge.score("Paris", ex("Paris")).correct is True


def test_llm_judge_failures_are_errors(fake_llm):
    judge = get_scorer("llm-judge", model="openai/judge", complete=fake_llm.complete)
    fake_llm(exc=LLMTransientError("judge endpoint down after 2 retries"))
    s = judge.score("Paris", ex("Paris"))
    assert s.correct is None and "unavailable" in s.error
    fake_llm("I am not sure.")
    s = judge.score("Paris", ex("Paris"))
    assert s.correct is None and "no verdict" in s.error
    fake_llm(exc=LLMFatalError("bad key in JUDGE_KEY"))
    with pytest.raises(LLMFatalError):
        judge.score("Paris", ex("Paris"))


def test_llm_judge_options_are_validated():
    with pytest.raises(SpecError, match="needs a judge model"):
        get_scorer("llm-judge")
    with pytest.raises(SpecError, match="must contain {output}"):
        get_scorer("llm-judge", model="m", prompt="{question} {reference}")
    with pytest.raises(EnvError, match="needs an LLM client"):  # the app passes graphtune.llm.complete
        get_scorer("llm-judge", model="m")
    assert get_scorer("numeric", complete=lambda *a, **k: None).name == "numeric"  # no LLM: ignored


# ----------------------------------------------------------------------------- python:module:fn


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "gt_user_scorers.py").write_text(textwrap.dedent("""
        from graphtune.envs.scorers import Score
        def is_yes(output, example):
            return output.strip().lower() == example.answer
        def partial(output, example):
            return 0.5
        def full(output, example):
            return Score(correct=True, score=1.0, extracted="custom")
        def crash(output, example):
            raise KeyError("oops")
        def bad(output, example):
            return "yes"
        class NS:
            @staticmethod
            def nested(output, example):
                return True
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("gt_user_scorers", None)


def test_python_scorer(user_module):
    assert get_scorer("python:gt_user_scorers:is_yes").score(" YES ", ex("yes")) == Score(True, 1.0)
    assert get_scorer("python:gt_user_scorers:is_yes").score("no", ex("yes")).correct is False
    s = get_scorer("python:gt_user_scorers:partial").score("x", ex("y"))
    assert (s.correct, s.score) == (False, 0.5)
    assert get_scorer("python:gt_user_scorers:partial", threshold=0.5).score("x", ex("y")).correct is True
    assert get_scorer("python:gt_user_scorers:full").score("x", ex("y")).extracted == "custom"
    assert get_scorer("python:gt_user_scorers:NS.nested").score("x", ex("y")).correct
    s = get_scorer("python:gt_user_scorers:crash").score("x", ex("y"))
    assert s.correct is None and "raised KeyError" in s.error
    s = get_scorer("python:gt_user_scorers:bad").score("x", ex("y"))
    assert s.correct is None and "returned str" in s.error


def test_python_scorer_name_errors(user_module):
    with pytest.raises(SpecError, match="cannot import module 'no_such_mod_xyz'"):
        get_scorer("python:no_such_mod_xyz:f")
    with pytest.raises(SpecError, match="has no 'missing'"):
        get_scorer("python:gt_user_scorers:missing")
    with pytest.raises(SpecError, match="write python:module:function"):
        get_scorer("python:gt_user_scorers")
