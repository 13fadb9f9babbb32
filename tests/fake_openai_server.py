"""A fake OpenAI-compatible chat-completions server for tests and benchmarks.

Runs in its own process (``FakeOpenAIServer`` starts ``python tests/fake_openai_server.py``
as a child), on a raw asyncio HTTP/1.1 server with keep-alive, so it costs the client
process nothing and serves thousands of requests per second on one core.

Behaviour is chosen by the *model name* of a request, so one server covers every case:

* ``echo...`` (any other name too): replies ``"The answer is <x>. [<tag>]"`` where ``<x>``
  is the last ``ANSWER=<x>`` found in the prompt (or ``42``) and ``<tag>`` a digest of the
  prompt and seed in letters, with ``usage`` (prompt tokens = words of the prompt,
  completion tokens = 7);
* ``flaky-<k>...``: the first ``k`` requests with a given prompt get HTTP 503, then it
  answers like ``echo``;
* ``down...``: always HTTP 503;
* ``empty...``: an empty reply (``content: ""``);
* ``badauth...``: HTTP 401 (authentication error);
* ``missing...``: HTTP 404 (unknown model).

* ``...-acc<NN>...`` (e.g. ``echo-acc60``): like ``echo``, but only about NN% of the
  prompts get the right answer (which ones is fixed by a hash of model and prompt), so
  graphs and models differ in accuracy.

Fault injection (any model): ``--fault-rates 429=0.1,500=0.1,...`` (or ``POST /faults``
with ``{"rates": {...}, "seed": s, ...}`` at run time) makes that fraction of chat
requests fail with that fault. Which requests fail is deterministic by ``--fault-seed``:
the draw hashes the seed, the request (model, prompt, sampling seed) and how many times
that request was seen, so it does not depend on the order concurrent requests arrive in.
Faults:

* ``429``: HTTP 429 with ``Retry-After: <--retry-after>`` (delta-seconds, or
  ``date:<s>`` for an HTTP-date that many seconds ahead);
* ``503``: HTTP 503 with the same ``Retry-After``;
* ``500``: HTTP 500;
* ``timeout``: the reply comes after ``--hang-s`` seconds (the client should time out);
* ``truncated``: HTTP 200 whose JSON body is cut in half;
* ``empty``: HTTP 200 with ``content: ""``;
* ``slow``: a correct reply after ``--slow-s`` seconds (not a failure unless the client's
  timeout is shorter).

Latency: ``--latency-s`` (mean) and ``--jitter-s`` (uniform +-), per request.
``GET /stats`` returns ``{"requests": N, "by_model": {...}, "faults": {kind: n}, "ok": n}``
(chat requests only; ``ok``: answers a client could use, i.e. paid calls); ``POST /reset`` zeroes the counters.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

READY = "FAKE_OPENAI_READY "
FAULTS = ("429", "503", "500", "timeout", "truncated", "empty", "slow")
_ANSWER = re.compile(r"ANSWER=([^\s\]\"]+)")
_LETTERS = str.maketrans("0123456789", "ghijklmnop")


class _State:
    def __init__(self, latency_s: float, jitter_s: float, seed: int, faults: dict | None = None):
        self.latency_s = latency_s
        self.jitter_s = jitter_s
        self.rng = random.Random(seed)
        self.requests = 0
        self.by_model: dict[str, int] = {}
        self.seen: dict[str, int] = {}
        self.attempts: dict[str, int] = {}
        self.fault_counts: dict[str, int] = {}
        self.ok = 0
        self.rates: dict[str, float] = {}
        self.fault_seed = 0
        self.retry_after = "0"
        self.hang_s = 5.0
        self.slow_s = 0.5
        self.configure(faults or {})

    def configure(self, cfg: dict) -> None:
        rates = {str(k): float(v) for k, v in (cfg.get("rates") or {}).items()}
        unknown = set(rates) - set(FAULTS)
        if unknown or sum(rates.values()) > 1.0 + 1e-9 or any(v < 0 for v in rates.values()):
            raise ValueError(f"bad fault rates {rates} (kinds: {', '.join(FAULTS)}; rates >= 0, sum <= 1)")
        if "rates" in cfg:
            self.rates = rates
        for k in ("fault_seed", "retry_after", "hang_s", "slow_s"):
            if k in cfg:
                setattr(self, k, type(getattr(self, k))(cfg[k]))

    def fault(self, key: str) -> str | None:
        """The fault of this request (deterministic: seed, request, how often it was seen)."""
        n = self.attempts.get(key, 0)
        self.attempts[key] = n + 1
        if not self.rates:
            return None
        h = hashlib.sha256(f"{self.fault_seed}|{key}|{n}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2.0 ** 64
        acc = 0.0
        for kind in FAULTS:
            acc += self.rates.get(kind, 0.0)
            if u < acc:
                self.fault_counts[kind] = self.fault_counts.get(kind, 0) + 1
                return kind
        return None

    def retry_after_header(self) -> str:
        if self.retry_after.startswith("date:"):
            from email.utils import formatdate

            return formatdate(time.time() + float(self.retry_after[5:]), usegmt=True)
        return self.retry_after


def _completion(model: str, text: str, pt: int, ct: int) -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}}


def _error(status: int, message: str, typ: str) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": typ, "code": status}}


async def _chat(st: _State, body: dict) -> tuple[int, dict, dict[str, str], bytes | None]:
    """(status, payload, extra headers, raw body to send instead of the payload)."""
    model = str(body.get("model", ""))
    msgs = body.get("messages") or []
    prompt = "\n".join(str(m.get("content", "")) for m in msgs)
    st.requests += 1
    st.by_model[model] = st.by_model.get(model, 0) + 1
    delay = st.latency_s + (st.rng.uniform(-st.jitter_s, st.jitter_s) if st.jitter_s else 0.0)
    if delay > 0:
        await asyncio.sleep(delay)
    fault = st.fault(hashlib.sha256(f"{model}|{prompt}|{body.get('seed')}".encode()).hexdigest())
    if fault in ("429", "503"):
        status, payload = _error(int(fault), "Rate limit reached" if fault == "429" else "Service unavailable",
                                 "rate_limit_error" if fault == "429" else "server_error")
        return status, payload, {"Retry-After": st.retry_after_header()}, None
    if fault == "500":
        return (*_error(500, "Internal server error", "server_error"), {}, None)
    if fault == "timeout":
        await asyncio.sleep(st.hang_s)
    elif fault == "slow":
        await asyncio.sleep(st.slow_s)
    elif fault == "empty":
        return 200, _completion(model, "", len(prompt.split()), 0), {}, None
    status, payload = _answer(st, model, prompt, body)
    if fault == "truncated" and status == 200:
        data = json.dumps(payload).encode()
        return 200, payload, {}, data[: len(data) // 2]
    if status == 200 and fault != "timeout":  # a timed-out client never sees this reply
        st.ok += 1
    return status, payload, {}, None


def _answer(st: _State, model: str, prompt: str, body: dict) -> tuple[int, dict]:
    if model.startswith("badauth"):
        return _error(401, "Incorrect API key provided", "invalid_request_error")
    if model.startswith("missing"):
        return _error(404, f"The model `{model}` does not exist", "invalid_request_error")
    if model.startswith("down"):
        return _error(503, "Service unavailable", "server_error")
    if model.startswith("flaky-"):
        k = int(re.match(r"flaky-(\d+)", model).group(1))
        key = hashlib.sha256(prompt.encode()).hexdigest()
        st.seen[key] = st.seen.get(key, 0) + 1
        if st.seen[key] <= k:
            return _error(503, "Service temporarily unavailable", "server_error")
    if model.startswith("empty"):
        return 200, _completion(model, "", len(prompt.split()), 0)
    found = _ANSWER.findall(prompt)
    answer = found[-1] if found else "42"
    acc = re.search(r"acc(\d+)", model)
    if acc and int(hashlib.sha256(f"{model}|{prompt}".encode()).hexdigest()[:4], 16) % 100 >= int(acc.group(1)):
        answer = answer + "7"  # a wrong answer, the same one every time
    # a tag that differs per prompt and seed (letters only: scorers look for numbers)
    tag = hashlib.sha256((prompt + str(body.get("seed"))).encode()).hexdigest()[:8].translate(_LETTERS)
    text = f"The answer is {answer}. [{tag}]"
    return 200, _completion(model, text, len(prompt.split()), 7)


async def _handle(st: _State, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            method, path, _ = line.decode("latin-1").split(" ", 2)
            length = 0
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                k, _, v = h.decode("latin-1").partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v.strip())
            raw = await reader.readexactly(length) if length else b""
            extra, body = {}, None
            if method == "POST" and path.rstrip("/").endswith("/chat/completions"):
                try:
                    status, payload, extra, body = await _chat(st, json.loads(raw or b"{}"))
                except (ValueError, KeyError) as e:
                    status, payload = _error(400, f"bad request: {e}", "invalid_request_error")
            elif method == "GET" and path.startswith("/stats"):
                status, payload = 200, {"requests": st.requests, "by_model": st.by_model,
                                        "faults": st.fault_counts, "ok": st.ok}
            elif method == "POST" and path.startswith("/reset"):
                st.requests, st.by_model, st.seen, st.attempts, st.fault_counts, st.ok = 0, {}, {}, {}, {}, 0
                status, payload = 200, {"ok": True}
            elif method == "POST" and path.startswith("/faults"):
                try:
                    st.configure(json.loads(raw or b"{}"))
                    status, payload = 200, {"ok": True}
                except (ValueError, TypeError) as e:
                    status, payload = _error(400, str(e), "invalid_request_error")
            elif path.startswith("/health"):
                status, payload = 200, {"status": "ok"}
            else:
                status, payload = _error(404, f"no route {method} {path}", "not_found")
            data = json.dumps(payload).encode() if body is None else body
            reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
                      500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Error")
            more = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{more}"
                         f"Content-Length: {len(data)}\r\nConnection: keep-alive\r\n\r\n".encode() + data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError, asyncio.CancelledError):
        pass  # client went away, or the server is shutting down
    finally:
        writer.close()


async def _serve(host: str, port: int, st: _State) -> None:
    server = await asyncio.start_server(lambda r, w: _handle(st, r, w), host, port, backlog=1024)
    addr = server.sockets[0].getsockname()
    print(f"{READY}http://{addr[0]}:{addr[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


class FakeOpenAIServer:
    """Start the fake server in a child process; ``api_base`` is its ``/v1`` URL."""

    def __init__(self, latency_s: float = 0.0, jitter_s: float = 0.0, seed: int = 0, *,
                 fault_rates: dict[str, float] | None = None, fault_seed: int = 0, retry_after: str = "0",
                 hang_s: float = 5.0, slow_s: float = 0.5, port: int = 0):
        self.latency_s, self.jitter_s, self.seed = latency_s, jitter_s, seed
        self.faults = {"rates": dict(fault_rates or {}), "fault_seed": fault_seed, "retry_after": retry_after,
                       "hang_s": hang_s, "slow_s": slow_s}
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    @property
    def api_base(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> FakeOpenAIServer:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--port", str(self.port), "--latency-s",
             str(self.latency_s), "--jitter-s", str(self.jitter_s), "--seed", str(self.seed),
             "--faults-json", json.dumps(self.faults)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        if not line.startswith(READY):
            self.stop()
            raise RuntimeError(f"fake OpenAI server did not start: {line!r}")
        self.url = line[len(READY):].strip()
        return self

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/stats", timeout=5) as r:
            return json.loads(r.read())

    def requests(self) -> int:
        return int(self.stats()["requests"])

    def set_faults(self, rates: dict[str, float] | None = None, **cfg) -> None:
        """Change the fault rates (and ``fault_seed``, ``retry_after``, ``hang_s``, ``slow_s``)."""
        if rates is not None:
            cfg["rates"] = rates
        req = urllib.request.Request(self.url + "/faults", data=json.dumps(cfg).encode(), method="POST")
        urllib.request.urlopen(req, timeout=5).close()

    def reset(self) -> None:
        req = urllib.request.Request(self.url + "/reset", data=b"", method="POST")
        urllib.request.urlopen(req, timeout=5).close()

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency-s", type=float, default=0.0)
    ap.add_argument("--jitter-s", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fault-rates", default="", help="e.g. 429=0.1,500=0.05 (kinds: " + ", ".join(FAULTS) + ")")
    ap.add_argument("--fault-seed", type=int, default=0)
    ap.add_argument("--retry-after", default="0", help="Retry-After of 429/503 faults: seconds, or date:<s>")
    ap.add_argument("--hang-s", type=float, default=5.0, help="delay of a timeout fault")
    ap.add_argument("--slow-s", type=float, default=0.5, help="delay of a slow reply")
    ap.add_argument("--faults-json", default=None, help="all fault settings as JSON (overrides the above)")
    a = ap.parse_args(argv)
    if a.faults_json:
        faults = json.loads(a.faults_json)
    else:
        rates = dict(kv.split("=", 1) for kv in a.fault_rates.split(",") if kv)
        faults = {"rates": rates, "fault_seed": a.fault_seed, "retry_after": a.retry_after, "hang_s": a.hang_s,
                  "slow_s": a.slow_s}
    port = a.port  # 0: the OS picks a free port, printed on the ready line
    try:
        import uvloop  # noqa: F401  (optional: a faster loop when available)

        uvloop.install()
    except ImportError:
        pass
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(_serve(a.host, port, _State(a.latency_s, a.jitter_s, a.seed, faults)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
