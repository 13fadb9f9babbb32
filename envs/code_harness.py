"""Run a dataset's tests against an answer's code so that the answer cannot forge the verdict.

The code scorer used to run the answer and the tests as one program and read "all
tests passed" from a fixed exit status: an answer calling ``os._exit(<status>)``, or
returning an object whose ``__eq__`` is always True, was scored correct. Anything that
runs in the same interpreter as the tests can rewrite them (``builtins``,
``AssertionError``, ``sys.exit``, stack frames, ``gc``), so here the answer and the tests
run in **two processes** inside one sandbox run (:func:`graphtune.envs.sandbox.run_python`):

* the **tests process** (the sandboxed program itself) holds the only copy of the
  report channel (fd 3) and of a per-run random token, and runs only trusted code: the
  dataset's prelude (HumanEval's prompt with its helpers, and ``check``) and its tests;
* the **answer process** is forked from it *before* the tests process reads the token
  and the tests from its standard input, closes fd 3 and its standard input, and then
  runs the answer's code. The tests process calls the answer's functions through a pipe:
  arguments go in, and results come back as **plain values** (None, bool, int, float,
  complex, str, bytes, tuples, lists, dicts, sets, Fraction, Decimal -- a subclass such as
  a namedtuple arrives as its base type) rebuilt by the tests process's own decoder. Any
  other object stays in the answer process and is represented by a handle whose
  equality is identity and whose truth is True, whatever its class defines; calls,
  attribute reads and writes, ``len``, indexing and iteration on it are forwarded.
  So ``assert candidate(x) == y`` compares two plain values with Python's own ``==``.

The tests process writes ``pass <token>`` to the report channel only after every test
ran to its end. What the answer process can reach does not let it write that line: it
never had the token (forked before it was read), fd 3 is closed in it, and the tests
process is non-dumpable (its memory, ``/proc/<pid>/fd`` and ``ptrace`` are closed to
same-uid processes); in the sandbox's kernel mode the tests process is also PID 1 of the
run's namespace, which its children cannot kill. It can kill the tests process in the
weaker modes, or crash, loop, or exhaust memory: each of those is a wrong answer, since
no ``pass`` line is written. The tests never reach the answer process (it cannot read the
expected values), and a name bound to a module in the answer (``math``) is imported
afresh by the tests process, so monkeypatching it does not carry over.

An infrastructure failure (the sandbox cannot start, the tests' own prelude fails before
the answer is loaded) is reported as ``error <token> ...`` and becomes an error score,
never a wrong answer.
"""

from __future__ import annotations

import builtins
import json
import secrets
from dataclasses import dataclass

__all__ = ["HarnessResult", "run_tests"]

# Runs in the sandbox as __main__, with the report channel on fd 3. Only the standard library.
HARNESS = r'''
import builtins, json, os, signal, sys

REPORT = 3
if hasattr(sys, "set_int_max_str_digits"):
    sys.set_int_max_str_digits(0)


class AnswerLost(BaseException):
    """The answer process died, exited or sent something unreadable: no verdict."""


class AnswerError(Exception):
    """An exception of the answer's own class, raised in the answer process."""


def send(f, obj):
    data = json.dumps(obj).encode()
    f.write(b"%d\n" % len(data) + data)
    f.flush()


def recv(f):
    head = f.readline(32)
    if not head.endswith(b"\n"):
        raise AnswerLost("the answer process ended")
    n = int(head)
    data = f.read(n)
    if len(data) != n:
        raise AnswerLost("the answer process ended")
    return json.loads(data)


_PLAIN = {list: "l", tuple: "t", set: "s", frozenset: "fs"}


def enc(v, handle):
    """A plain value as JSON; other objects through ``handle`` (None: refuse them)."""
    t = type(v)
    if v is None or t is bool or t is int or t is str or t is float:
        return v
    tag = _PLAIN.get(t)
    if tag:
        return [tag, [enc(x, handle) for x in v]]
    if t is dict:
        return ["d", [[enc(k, handle), enc(x, handle)] for k, x in v.items()]]
    if t is bytes:
        return ["b", v.hex()]
    if t is bytearray:
        return ["ba", v.hex()]
    if t is complex:
        return ["c", v.real, v.imag]
    name = (getattr(t, "__module__", ""), getattr(t, "__name__", ""))
    if name == ("fractions", "Fraction"):
        return ["F", str(v)]
    if name == ("decimal", "Decimal"):
        return ["D", str(v)]
    if t is Remote:
        return ["h", object.__getattribute__(v, "_gt_ref")]
    if t is type and getattr(builtins, getattr(v, "__name__", ""), None) is v:
        return ["ty", v.__name__]  # a builtin type (MBPP passes int, str, float)
    if handle is None:
        raise TypeError("the tests cannot pass a %s to the answer" % t.__name__)
    # the answer process: subclasses of plain types travel as their base type
    if isinstance(v, bool):
        return bool(v)
    if isinstance(v, int):
        return int.__index__(v)
    if isinstance(v, float):
        return float.__float__(v)
    if isinstance(v, str):
        return str.__str__(v)
    if isinstance(v, tuple):
        return ["t", [enc(x, handle) for x in tuple.__iter__(v)]]
    if isinstance(v, list):
        return ["l", [enc(x, handle) for x in list.__iter__(v)]]
    if isinstance(v, dict):
        return ["d", [[enc(k, handle), enc(x, handle)] for k, x in dict.items(v)]]
    if isinstance(v, (set, frozenset)):
        return ["fs" if isinstance(v, frozenset) else "s", [enc(x, handle) for x in set.__iter__(set(v))]]
    import numbers
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return ["h", handle(v), t.__name__]


def dec(x, lookup):
    """A value from ``enc``; handles through ``lookup(ref, kind)``. Builds plain values only."""
    t = type(x)
    if x is None or t is bool or t is int or t is float or t is str:
        return x
    if t is list and x and type(x[0]) is str:
        tag = x[0]
        if tag == "l":
            return [dec(i, lookup) for i in x[1]]
        if tag == "t":
            return tuple(dec(i, lookup) for i in x[1])
        if tag == "s":
            return {dec(i, lookup) for i in x[1]}
        if tag == "fs":
            return frozenset(dec(i, lookup) for i in x[1])
        if tag == "d":
            return {dec(k, lookup): dec(v, lookup) for k, v in x[1]}
        if tag == "b":
            return bytes.fromhex(x[1])
        if tag == "ba":
            return bytearray.fromhex(x[1])
        if tag == "c":
            return complex(float(x[1]), float(x[2]))
        if tag == "F":
            from fractions import Fraction
            return Fraction(str(x[1]))
        if tag == "D":
            from decimal import Decimal
            return Decimal(str(x[1]))
        if tag == "ty":
            v = getattr(builtins, str(x[1]), None)
            if type(v) is type:
                return v
        if tag == "h":
            return lookup(x[1], str(x[2]) if len(x) > 2 else "object")
    raise AnswerLost("unreadable value from the answer process")


# ------------------------------------------------------------------ the answer process

def serve(rfd, wfd):
    rf, wf = os.fdopen(rfd, "rb"), os.fdopen(wfd, "wb")
    objs = {}

    def handle(o):
        objs[len(objs)] = o
        return len(objs) - 1

    def lookup(ref, kind=None):
        return objs[ref]

    msg = recv(rf)
    g = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(msg[1], "answer.py", "exec"), g)
        send(wf, ["ok", None])
    except BaseException as e:
        send(wf, ["raise", type(e).__name__, str(e)[:500]])
        return
    import types
    while True:
        msg = recv(rf)
        op = msg[0]
        try:
            if op == "names":
                out = []
                for name in msg[1]:
                    if name in g:
                        v = g[name]
                        if isinstance(v, types.ModuleType):
                            out.append([name, "m", str(getattr(v, "__name__", name))])
                        else:
                            out.append([name, "v", enc(v, handle)])
                send(wf, ["ok", out])
                continue
            obj = objs[msg[1]]
            if op == "call":
                r = obj(*[dec(a, lookup) for a in msg[2]], **{k: dec(v, lookup) for k, v in msg[3]})
            elif op == "getattr":
                r = getattr(obj, msg[2])
            elif op == "setattr":
                r = setattr(obj, msg[2], dec(msg[3], lookup))
            elif op == "iter":
                r = list(obj)
            elif op == "len":
                r = len(obj)
            elif op == "getitem":
                r = obj[dec(msg[2], lookup)]
            else:
                raise ValueError("unknown request %r" % (op,))
            reply = ["ok", enc(r, handle)]
        except BaseException as e:
            reply = ["raise", type(e).__name__, str(e)[:500]]
        send(wf, reply)


# ------------------------------------------------------------------ the tests process

class Remote:
    """An object that lives in the answer process. Equality is identity, truth is True."""

    __slots__ = ("_gt_ref", "_gt_kind")

    def __init__(self, ref, kind):
        object.__setattr__(self, "_gt_ref", ref)
        object.__setattr__(self, "_gt_kind", kind)

    def __call__(self, *args, **kwargs):
        return CONN.ask(["call", self._gt_ref, [enc(a, None) for a in args],
                         [[k, enc(v, None)] for k, v in kwargs.items()]])

    def __getattr__(self, name):
        if name.startswith("_gt_"):
            raise AttributeError(name)
        return CONN.ask(["getattr", self._gt_ref, name])

    def __setattr__(self, name, value):
        CONN.ask(["setattr", self._gt_ref, name, enc(value, None)])

    def __iter__(self):
        return iter(CONN.ask(["iter", self._gt_ref]))

    def __len__(self):
        return CONN.ask(["len", self._gt_ref])

    def __getitem__(self, key):
        return CONN.ask(["getitem", self._gt_ref, enc(key, None)])

    def __repr__(self):
        return "<answer's %s>" % self._gt_kind


class Conn:
    def __init__(self, wfd, rfd):
        self.w, self.r = os.fdopen(wfd, "wb"), os.fdopen(rfd, "rb")
        self.remotes = {}

    def lookup(self, ref, kind):
        if type(ref) is not int:
            raise AnswerLost("unreadable value from the answer process")
        if ref not in self.remotes:
            self.remotes[ref] = Remote(ref, kind)
        return self.remotes[ref]

    def raw(self, msg):
        try:
            send(self.w, msg)
            reply = recv(self.r)
        except (OSError, ValueError) as e:
            raise AnswerLost("the answer process ended: %s" % e)
        if type(reply) is not list or not reply:
            raise AnswerLost("unreadable reply from the answer process")
        if reply[0] == "raise":
            name, text = str(reply[1]), str(reply[2])
            cls = getattr(builtins, name, None)
            if isinstance(cls, type) and issubclass(cls, Exception):
                raise cls(text)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                raise AnswerLost("%s in the answer: %s" % (name, text))
            raise AnswerError("%s: %s" % (name, text))
        if reply[0] != "ok" or len(reply) != 2:
            raise AnswerLost("unreadable reply from the answer process")
        return reply[1]

    def ask(self, msg):
        return dec(self.raw(msg), self.lookup)


def report(line):
    os.write(REPORT, (line + "\n").encode())


def main():
    # SIGINT would be a KeyboardInterrupt here; as PID 1 of a namespace, ignored signals
    # cannot be sent by the answer at all
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM):
        signal.signal(sig, signal.SIG_IGN)
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the answer process: no report channel, no stdin, never the token or the tests
        code = 1
        try:
            os.close(REPORT)
            os.close(req_w)
            os.close(resp_r)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            serve(req_r, resp_w)
            code = 0
        except BaseException:
            pass
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except BaseException:
                pass
            os._exit(code)
    os.close(req_r)
    os.close(resp_w)
    global CONN
    try:
        job = json.loads(sys.stdin.buffer.read())
        token = job["token"]
        os.close(0)
    except Exception as e:
        report("error - the harness could not read its job: %s" % e)
        os._exit(2)
    CONN = Conn(req_w, resp_r)
    g = {"__name__": "__graphtune_tests__", "__builtins__": builtins}
    try:  # before the answer runs: a failure here is the task's, not the answer's
        exec(compile(job["prelude"], "tests.py", "exec"), g)
        tests = compile(job["tests"], "tests.py", "exec")
    except BaseException as e:
        report("error %s the tests' own code failed before the answer ran: %s: %s"
               % (token, type(e).__name__, str(e)[:300]))
        os._exit(2)
    try:
        CONN.raw(["load", job["answer"]])
        wanted = sorted(set(job["resolve"].values()))
        found = {}
        for name, kind, value in CONN.raw(["names", wanted]):
            if name not in wanted:
                continue
            if kind == "m":
                import importlib
                try:
                    found[name] = importlib.import_module(str(value))
                except ImportError:
                    pass
            else:
                found[name] = dec(value, CONN.lookup)
        for local, remote in job["resolve"].items():
            if remote in found:
                g[local] = found[remote]
        exec(tests, g)
    except BaseException as e:
        sys.stderr.write("graphtune-harness: FAILED: %s: %s\n" % (type(e).__name__, str(e)[:500]))
        import traceback
        tb = traceback.extract_tb(e.__traceback__)
        for fr in tb[-3:]:
            if fr.filename == "tests.py":
                sys.stderr.write("graphtune-harness: at tests.py line %s: %s\n" % (fr.lineno, fr.line))
        sys.stderr.flush()
        os._exit(1)
    report("pass " + token)
    sys.stdout.flush()
    os._exit(0)


CONN = None
main()
'''


@dataclass(frozen=True)
class HarnessResult:
    """``passed``: every test ran and passed (None: could not judge, see ``error``).
    ``detail``: the harness's own lines about a failure (which test, which exception)."""

    passed: bool | None
    error: str | None = None
    detail: str = ""
    timed_out: bool = False
    seconds: float = 0.0


def _builtin_names() -> frozenset[str]:
    return frozenset(dir(builtins))


def run_tests(answer: str, *, tests: str, prelude: str = "", resolve: dict[str, str], timeout_s: float = 10.0,
              memory_mb: int = 512, max_procs: int = 32) -> HarnessResult:
    """Run ``tests`` against ``answer`` in the sandbox (see the module docstring).

    ``answer``: the answer process's program. ``prelude``: trusted code the tests
    process runs first (helpers, ``check``). ``resolve``: names the tests use, bound to
    the answer's values (``{"candidate": "add"}``); names the answer does not define stay
    unbound (a NameError in the tests is a failed test)."""
    from graphtune.envs.sandbox import run_python

    token = secrets.token_hex(16)
    job = json.dumps({"token": token, "answer": answer, "prelude": prelude, "tests": tests,
                      "resolve": resolve}).encode()
    r = run_python(HARNESS, timeout_s=timeout_s, memory_mb=memory_mb, max_procs=max_procs, stdin=job, report=True)
    detail = "\n".join(ln for ln in r.stderr.splitlines() if ln.startswith("graphtune-harness:"))
    if r.error:
        return HarnessResult(None, error=r.error, seconds=r.seconds)
    lines = r.report.splitlines()
    if not r.timed_out and lines == ["pass " + token]:
        return HarnessResult(True, seconds=r.seconds)
    if len(lines) == 1 and lines[0].startswith(f"error {token} "):
        return HarnessResult(None, error="code tests: " + lines[0][len(f"error {token} "):], seconds=r.seconds)
    if len(lines) == 1 and lines[0].startswith("error - "):
        return HarnessResult(None, error="code tests: " + lines[0][len("error - "):], seconds=r.seconds)
    return HarnessResult(False, detail=detail or (r.stderr.strip().splitlines() or [""])[-1][:300],
                         timed_out=r.timed_out, seconds=r.seconds)
