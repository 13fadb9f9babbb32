"""A stand-in for the ``vllm`` executable in tests (vLLM needs a GPU; this machine has none).

Accepts what graphtune runs, ``serve MODEL --host H --port P [vLLM options...]``, appends
one JSON line ``{"pid", "argv"}`` to the file named by ``$FAKE_VLLM_RECORD`` (so a test can
count starts and check the process is gone afterwards), then serves the OpenAI API on
H:P with ``tests/fake_openai_server.py`` (``/health``, ``/v1/chat/completions``) until
SIGTERM. ``$FAKE_VLLM_FAIL`` set: print it as vLLM's log and exit 1 (a server that cannot
start, e.g. no GPU)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fake_openai_server  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "serve":
        print("usage: vllm serve MODEL [--host H] [--port P] ...", file=sys.stderr)
        return 2
    record = os.environ.get("FAKE_VLLM_RECORD")
    if record:
        with open(record, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "argv": argv}) + "\n")
    if os.environ.get("FAKE_VLLM_FAIL"):
        print(os.environ["FAKE_VLLM_FAIL"], flush=True)
        return 1
    host, port, rest = "127.0.0.1", 8000, argv[2:]
    for i, a in enumerate(rest[:-1]):
        if a == "--host":
            host = rest[i + 1]
        elif a == "--port":
            port = int(rest[i + 1])
    return fake_openai_server.main(["--host", host, "--port", str(port)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
