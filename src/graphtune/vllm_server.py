"""A vLLM OpenAI-compatible server that graphtune starts and stops itself
(``provider: vllm`` on a model entry).

graphtune runs ``vllm serve MODEL --host 127.0.0.1 --port P [...]`` in a process group of
its own (vLLM starts engine processes of its own: stopping signals the whole group), waits
until ``/health`` answers, sends the model's calls to it through litellm's
``hosted_vllm/`` route, and stops it (SIGTERM, then SIGKILL) when the search ends or the
interpreter exits. A small supervisor (``python -m graphtune.vllm_server``) leads the
group and stops the server when graphtune dies without stopping it (``kill -9``), so a
crashed search never leaves a server holding the GPU's memory.

Usage::

    with VLLMServer("meta-llama/Llama-3.2-3B-Instruct", name="llama-3b") as srv:
        reply = graphtune.llm.complete(srv.model, msgs, api_base=srv.api_base)

``command`` names the executable (default ``vllm`` on PATH); any program that accepts
``serve MODEL --host H --port P ...`` and serves the OpenAI API with ``/health`` works
(the tests use a stand-in).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from graphtune.errors import EnvError
from graphtune.local_server import _LIVE, ServerProcess, _free_port

VLLM_PIP = "pip install vllm"
#: vLLM loads weights and compiles CUDA graphs before it answers: minutes for large models
DEFAULT_STARTUP_TIMEOUT_S = 600.0


class VLLMServer(ServerProcess):
    """Start/stop one ``vllm serve`` child process for the pool model ``name``.

    ``model`` is what vLLM serves (a Hugging Face id or a local path) and the name calls
    use: :attr:`model` of this object is the litellm string ``hosted_vllm/<model>`` and
    :attr:`api_base` the ``/v1`` URL. ``port=0`` picks a free port;
    ``gpu_memory_utilization`` and ``max_num_seqs`` become vLLM's
    ``--gpu-memory-utilization`` and ``--max-num-seqs``; ``args`` are appended as given.
    The server's output goes to ``log_path`` (default: a temporary file whose tail is
    quoted when the server fails to start)."""

    def __init__(self, model: str, *, name: str | None = None, command: str | None = None, host: str = "127.0.0.1",
                 port: int = 0, args: Sequence[str] = (), gpu_memory_utilization: float | None = None,
                 max_num_seqs: int | None = None, startup_timeout_s: float | None = None,
                 log_path: str | os.PathLike | None = None):
        self.served = str(model)
        self.name = name or self.served
        self.command = command or "vllm"
        self.host = host
        self.port = int(port)
        self.args = tuple(str(a) for a in args)
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_num_seqs = max_num_seqs
        self.startup_timeout_s = float(startup_timeout_s or DEFAULT_STARTUP_TIMEOUT_S)
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
            raise EnvError(f"the vLLM server of model {self.name!r} is not running; call start() first")
        return self.url + "/v1"

    @property
    def model(self) -> str:
        """The litellm model string for this server."""
        return f"hosted_vllm/{self.served}"

    def argv(self, port: int) -> list[str]:
        """The command line that starts the server on ``port``."""
        exe = self._executable()
        cmd = [exe, "serve", self.served, "--host", self.host, "--port", str(port)]
        if self.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:g}"]
        if self.max_num_seqs is not None:
            cmd += ["--max-num-seqs", str(int(self.max_num_seqs))]
        return cmd + list(self.args)

    def _executable(self) -> str:
        found = shutil.which(self.command)
        if found is None:
            if os.sep in self.command:
                raise EnvError(f"model {self.name!r}: cannot start vLLM: `{self.command}` does not exist or is not "
                               f"executable; fix the model's `vllm_command` option (or install vLLM: `{VLLM_PIP}`)")
            raise EnvError(f"model {self.name!r}: cannot start vLLM: `{self.command}` is not on PATH; install it with "
                           f"`{VLLM_PIP}` (on a GPU machine) or name the executable with the model's `vllm_command` "
                           "option")
        return found

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> VLLMServer:
        """Start ``vllm serve`` and wait until ``/health`` answers; idempotent."""
        if self.running:
            return self
        port = self.port or _free_port(self.host)
        argv = self.argv(port)
        if self._log_path is not None:
            self._log_file = open(self._log_path, "w+b")
        else:
            self._log_file = tempfile.TemporaryFile(prefix="graphtune-vllm-")
        t0 = time.perf_counter()
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "graphtune.vllm_server", json.dumps(argv)],
                                          stdin=subprocess.DEVNULL, stdout=self._log_file,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            self._log_file.close()
            self._log_file = None
            raise EnvError(f"model {self.name!r}: cannot start `{argv[0]}` ({e.strerror or e}); check the model's "
                           "`vllm_command` option") from None
        _LIVE.add(self)
        self.url = f"http://{self.host}:{port}"
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def _wait_healthy(self) -> None:
        self._poll_health(
            exited=lambda code, log: (f"model {self.name!r}: the vLLM server exited with code {code} while starting "
                                      f"(vLLM needs a GPU and the model's weights): {log}"),
            timed_out=lambda log: (f"model {self.name!r}: the vLLM server at {self.url} did not answer within "
                                   f"{self.startup_timeout_s:g} s; raise the model's startup_timeout_s ({log})"),
            interval_s=0.2)

    def stop(self, timeout_s: float = 40.0) -> None:
        """Stop the server: SIGTERM to its supervisor, which passes it on and kills the
        server after 30 s; SIGKILL to the whole process group after ``timeout_s`` and, in
        any case, to whatever the server left behind. Idempotent."""
        proc, self._proc = self._proc, None
        _LIVE.discard(self)
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
            _signal_group(proc, signal.SIGKILL)  # engine processes the server left behind
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.url = None

    def __repr__(self) -> str:
        state = f"running at {self.url}" if self.running else "stopped"
        return f"VLLMServer({self.served!r}, {state})"


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the server's process group (its session: the server and its engine processes)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- the supervisor process --------------------------------------------------------------


def _supervise(argv: list[str], *, poll_s: float = 0.5, grace_s: float = 30.0) -> int:
    """Run ``argv`` (in this process's group) until it exits, SIGTERM/SIGINT arrives, or the
    parent dies; return its exit code. On a stop or an orphaning the server gets SIGTERM,
    then SIGKILL after ``grace_s``."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    parent = os.getppid()
    try:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    except OSError as e:
        print(f"cannot run {argv[0]}: {e}", flush=True)
        return 127
    while child.poll() is None:
        if stop.wait(poll_s) or os.getppid() != parent:  # stopped, or orphaned by a killed graphtune
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(grace_s)
            except subprocess.TimeoutExpired:
                child.kill()
            break
    return child.wait()


if __name__ == "__main__":
    sys.exit(_supervise(json.loads(sys.argv[1])))
