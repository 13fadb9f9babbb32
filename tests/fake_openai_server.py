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

Latency: ``--latency-s`` (mean) and ``--jitter-s`` (uniform +-), per request.
``GET /stats`` returns ``{"requests": N, "by_model": {...}}`` (chat requests only);
``POST /reset`` zeroes the counters.
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
_ANSWER = re.compile(r"ANSWER=([^\s\]\"]+)")
_LETTERS = str.maketrans("0123456789", "ghijklmnop")


class _State:
    def __init__(self, latency_s: float, jitter_s: float, seed: int):
        self.latency_s = latency_s
        self.jitter_s = jitter_s
        self.rng = random.Random(seed)
        self.requests = 0
        self.by_model: dict[str, int] = {}
        self.seen: dict[str, int] = {}


def _completion(model: str, text: str, pt: int, ct: int) -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}}


def _error(status: int, message: str, typ: str) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": typ, "code": status}}


async def _chat(st: _State, body: dict) -> tuple[int, dict]:
    model = str(body.get("model", ""))
    msgs = body.get("messages") or []
    prompt = "\n".join(str(m.get("content", "")) for m in msgs)
    st.requests += 1
    st.by_model[model] = st.by_model.get(model, 0) + 1
    delay = st.latency_s + (st.rng.uniform(-st.jitter_s, st.jitter_s) if st.jitter_s else 0.0)
    if delay > 0:
        await asyncio.sleep(delay)
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
            if method == "POST" and path.rstrip("/").endswith("/chat/completions"):
                try:
                    status, payload = await _chat(st, json.loads(raw or b"{}"))
                except (ValueError, KeyError) as e:
                    status, payload = _error(400, f"bad request: {e}", "invalid_request_error")
            elif method == "GET" and path.startswith("/stats"):
                status, payload = 200, {"requests": st.requests, "by_model": st.by_model}
            elif method == "POST" and path.startswith("/reset"):
                st.requests, st.by_model, st.seen = 0, {}, {}
                status, payload = 200, {"ok": True}
            elif path.startswith("/health"):
                status, payload = 200, {"status": "ok"}
            else:
                status, payload = _error(404, f"no route {method} {path}", "not_found")
            data = json.dumps(payload).encode()
            reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
                      503: "Service Unavailable"}.get(status, "Error")
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
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

    def __init__(self, latency_s: float = 0.0, jitter_s: float = 0.0, seed: int = 0):
        self.latency_s, self.jitter_s, self.seed = latency_s, jitter_s, seed
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    @property
    def api_base(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> FakeOpenAIServer:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--port", "0", "--latency-s", str(self.latency_s),
             "--jitter-s", str(self.jitter_s), "--seed", str(self.seed)],
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
    a = ap.parse_args(argv)
    port = a.port  # 0: the OS picks a free port, printed on the ready line
    try:
        import uvloop  # noqa: F401  (optional: a faster loop when available)

        uvloop.install()
    except ImportError:
        pass
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(_serve(a.host, port, _State(a.latency_s, a.jitter_s, a.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
