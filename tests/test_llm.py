"""graphtune.llm against a scripted OpenAI-compatible server on 127.0.0.1: error mapping,
retries, structured output, keys. Needs litellm (skipped without it)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from graphtune import llm
from graphtune.errors import LLMFatalError, LLMTransientError

pytest.importorskip("litellm", reason="litellm not installed: pip install 'graphtune[llm]'")
# litellm's own pydantic types warn while building schemas lazily; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*ReadOnly.*:UserWarning")

MODEL = "openai/fake-model"
KEY = "sk-test-secret-123"


def _ok(text: str, pt: int = 11, ct: int = 7) -> tuple[int, dict]:
    return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "fake-model",
                 "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                 "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}}


def _err(status: int, message: str) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": "error", "code": status}}


class FakeOpenAI:
    """Answers /v1/chat/completions from a script of (status, body) or ("sleep", s)."""

    def __init__(self):
        self.script: list = []
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                owner.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                step = owner.script.pop(0) if len(owner.script) > 1 else owner.script[0]
                if step[0] == "sleep":
                    time.sleep(step[1])
                    step = _ok("late")
                status, payload = step
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.api_base = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(llm, "BACKOFF_BASE_S", 0.01)
    monkeypatch.setenv("FAKE_KEY", KEY)
    s = FakeOpenAI()
    yield s
    s.close()


def _call(server, **kw):
    kw.setdefault("api_key_env", "FAKE_KEY")
    kw.setdefault("timeout_s", 10)
    return llm.complete(MODEL, [{"role": "user", "content": "hi"}], api_base=server.api_base, **kw)


def test_a_plain_completion_returns_text_tokens_and_latency(server):
    server.script = [_ok("hello there", 12, 3)]
    r = _call(server, max_tokens=20, seed=5)
    assert (r.text, r.prompt_tokens, r.completion_tokens) == ("hello there", 12, 3)
    assert r.seconds > 0 and "fake-model" in r.model
    req = server.requests[0]
    assert req["path"].endswith("/chat/completions") and req["auth"] == f"Bearer {KEY}"
    assert req["body"]["max_tokens"] == 20 and req["body"]["seed"] == 5 and req["body"]["temperature"] == 0.0


def test_json_schema_goes_out_as_response_format_and_the_reply_parses(server):
    schema = {"title": "Answer", "type": "object", "properties": {"answer": {"type": "integer"}},
              "required": ["answer"], "additionalProperties": False}
    server.script = [_ok('```json\n{"answer": 5}\n```')]
    r = _call(server, json_schema=schema)
    rf = server.requests[0]["body"]["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["name"] == "Answer"
    assert rf["json_schema"]["schema"] == schema
    assert llm.parse_json(r.text) == {"answer": 5}


def test_rate_limit_and_server_errors_are_retried(server):
    server.script = [_err(429, "slow down"), _err(503, "busy"), _ok("finally")]
    assert _call(server, max_retries=2).text == "finally"
    assert len(server.requests) == 3


def test_an_empty_reply_is_retried(server):
    server.script = [_ok(""), _ok("now")]
    assert _call(server, max_retries=1).text == "now"


def test_transient_errors_that_outlive_the_retries_raise_transient(server):
    server.script = [_err(500, "boom")]
    with pytest.raises(LLMTransientError, match="after 3 attempts"):
        _call(server, max_retries=2)
    assert len(server.requests) == 3


@pytest.mark.parametrize("status,hint", [(401, "FAKE_KEY"), (404, "model string"), (400, "request parameters")])
def test_auth_not_found_and_bad_request_are_fatal_at_once(server, status, hint):
    server.script = [_err(status, f"nope {KEY}")]  # a server echoing the key must not leak it
    with pytest.raises(LLMFatalError) as e:
        _call(server, max_retries=3)
    msg = str(e.value)
    assert len(server.requests) == 1
    assert MODEL in msg and hint in msg and "\n" not in msg
    assert KEY not in msg


def test_a_missing_key_variable_is_fatal_and_names_it(server, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(LLMFatalError, match="NO_SUCH_KEY_VAR"):
        _call(server, api_key_env="NO_SUCH_KEY_VAR")
    assert server.requests == []


def test_a_timeout_is_transient(server):
    server.script = [("sleep", 1.5)]
    with pytest.raises(LLMTransientError):
        _call(server, timeout_s=0.3, max_retries=0)


def test_a_closed_port_is_transient(monkeypatch):
    monkeypatch.setattr(llm, "BACKOFF_BASE_S", 0.01)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LLMTransientError, match="after 2 attempts"):
        llm.complete(MODEL, [{"role": "user", "content": "hi"}], api_base=f"http://127.0.0.1:{port}/v1",
                     timeout_s=5, max_retries=1)


def test_acomplete_has_the_same_behaviour(server):
    server.script = [_err(429, "slow"), _ok("async hello")]
    r = asyncio.run(llm.acomplete(MODEL, [{"role": "user", "content": "hi"}], api_base=server.api_base,
                                  api_key_env="FAKE_KEY", timeout_s=10))
    assert r.text == "async hello" and len(server.requests) == 2
    server.script = [_err(401, "bad key")]
    with pytest.raises(LLMFatalError):
        asyncio.run(llm.acomplete(MODEL, [{"role": "user", "content": "hi"}], api_base=server.api_base,
                                  api_key_env="FAKE_KEY", timeout_s=10))


def test_parse_json_tolerates_fences_and_prose():
    assert llm.parse_json('{"a": 1}') == {"a": 1}
    assert llm.parse_json('```\n{"a": 1}\n```') == {"a": 1}
    assert llm.parse_json('Sure! {"a": [1, 2]} Hope that helps.') == {"a": [1, 2]}
    with pytest.raises(ValueError):
        llm.parse_json("no json here")


def test_importing_graphtune_llm_does_not_import_litellm():
    code = "import sys, graphtune.llm; print('litellm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
