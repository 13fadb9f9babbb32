"""``provider: vllm``: graphtune starts ``vllm serve`` itself, routes the model's calls to
it and stops it at the end. vLLM needs a GPU, so these tests put a stand-in ``vllm``
executable first on PATH (tests/fake_vllm.py: it accepts ``serve MODEL --host H --port P
...``, records its pid and arguments, and serves the OpenAI API with the fake server)."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import sys
from pathlib import Path

import pytest

pytest.importorskip("litellm")

from typer.testing import CliRunner  # noqa: E402

from graphtune.errors import EnvError  # noqa: E402
from graphtune.spec import load_spec  # noqa: E402

FAKE_VLLM = Path(__file__).resolve().parent / "fake_vllm.py"


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """A `vllm` executable first on PATH; returns the file its starts are recorded in."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "vllm"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_VLLM}" "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    record = tmp_path / "vllm-starts.jsonl"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    return record


def starts(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def write_spec(tmp_path: Path, models: str, *, evaluations: int = 3) -> Path:
    data = tmp_path / "qs.jsonl"
    data.write_text("".join(json.dumps({"id": f"x{i}", "question": f"What is {i}+1? ANSWER={i + 1}",
                                        "answer": str(i + 1)}) + "\n" for i in range(8)))
    spec = tmp_path / "vllm.yaml"
    spec.write_text(f"""
study: vllm
task:
  dataset: qs.jsonl
  scorer: numeric
  dev_size: 4
  test_size: 4
models:
{models}
space:
  max_nodes: 3
  max_depth: 2
budget:
  units: 10
search:
  method: random
  evaluations: {evaluations}
  batch_size: 2
env:
  kind: live
  concurrency: 8
  max_tokens: 32
  timeout_s: 10
storage: sqlite:///{tmp_path / 'g.db'}
""")
    return spec


TWO_MODELS = """\
  - name: llama-3.2-1b
    provider: vllm
    model: org/echo-acc60
    gpu_memory_utilization: 0.45
    max_concurrency: 4
    vllm_args: [--dtype, half, --max-model-len, 2048]
  - name: llama-3.2-3b
    provider: vllm
    model: org/echo-acc85
    startup_timeout_s: 60
"""


def test_a_live_optimize_starts_one_vllm_server_per_model_once_and_stops_them_at_the_end(stand_in, tmp_path):
    from graphtune.cli import app

    r = CliRunner().invoke(app, ["optimize", str(write_spec(tmp_path, TWO_MODELS)), "--quiet"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got = starts(stand_in)
    assert len(got) == 2  # once per model, for the whole search and its test trial
    by_model = {s["argv"][1]: s for s in got}
    a, b = by_model["org/echo-acc60"]["argv"], by_model["org/echo-acc85"]["argv"]
    assert a[0] == "serve" and a[2:4] == ["--host", "127.0.0.1"] and a[4] == "--port"
    assert a[6:] == ["--gpu-memory-utilization", "0.45", "--max-num-seqs", "4", "--dtype", "half", "--max-model-len",
                     "2048"]  # a number in YAML is passed as text
    assert b[6:] == [] and a[5] != b[5]  # no options given: none passed; each on its own free port
    assert not any(alive(s["pid"]) for s in got)  # stopped when the search ended
    with sqlite3.connect(tmp_path / "g.db") as c:
        rows = c.execute("select endpoint, count(*) from gt_llm_calls where error is null group by endpoint").fetchall()
    # the calls reached the servers (through litellm's hosted_vllm route); the ledger names
    # the served model and its arguments, not the random port
    assert dict(rows).keys() <= {"vllm:org/echo-acc60 --dtype half --max-model-len 2048", "vllm:org/echo-acc85"} and rows


def test_a_rerun_is_served_by_the_ledger_though_the_server_gets_another_port(stand_in, tmp_path):
    from graphtune.api import optimize

    spec = load_spec(write_spec(tmp_path, TWO_MODELS, evaluations=2))
    problem, _, _ = optimize(spec)
    assert problem.env.executor.stats.made > 0
    spec2 = load_spec(write_spec(tmp_path, TWO_MODELS, evaluations=2), overrides={"study": "vllm-again"})
    problem2, _, _ = optimize(spec2)
    assert problem2.env.executor.stats.made == 0 and problem2.env.executor.stats.cached > 0
    assert len(starts(stand_in)) == 4 and not any(alive(s["pid"]) for s in starts(stand_in))


def test_vllm_command_and_port_pick_the_executable_and_the_port(tmp_path, monkeypatch):
    from graphtune.api import run_graph
    from graphtune.graphs.io import from_dict
    from graphtune.local_server import _free_port

    exe = tmp_path / "my-vllm"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_VLLM}" "$@"\n')
    exe.chmod(0o755)
    record = tmp_path / "starts.jsonl"
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no `vllm` anywhere on PATH
    port = _free_port("127.0.0.1")
    models = (f"  - name: llama-3.2-1b\n    provider: vllm\n    model: /models/echo\n    vllm_command: {exe}\n"
              f"    port: {port}\n")
    spec = load_spec(write_spec(tmp_path, models))
    graph = from_dict({"nodes": [{"id": "a", "role": "assistant", "model": "llama-3.2-1b"}], "edges": []})
    out = run_graph(spec, graph, question="What is 2+3? ANSWER=5")
    assert out.results[0].answer.startswith("The answer is 5") and out.calls["made"] == 1
    (s,) = starts(record)
    assert s["argv"][:6] == ["serve", "/models/echo", "--host", "127.0.0.1", "--port", str(port)]
    assert not alive(s["pid"])


def test_a_missing_vllm_executable_is_one_line_naming_pip_install_and_vllm_command(tmp_path, monkeypatch):
    from graphtune.cli import app

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    r = CliRunner().invoke(app, ["optimize", str(write_spec(tmp_path, TWO_MODELS)), "--quiet"])
    assert r.exit_code != 0
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    assert lines[0].startswith("error: model 'llama-3.2-1b': cannot start vLLM: `vllm` is not on PATH")
    assert "pip install vllm" in lines[0] and "vllm_command" in lines[0]


def test_a_vllm_server_that_cannot_start_is_one_line_with_the_end_of_its_log(stand_in, tmp_path, monkeypatch):
    from graphtune.vllm_server import VLLMServer

    monkeypatch.setenv("FAKE_VLLM_FAIL", "RuntimeError: No CUDA GPUs are available")
    srv = VLLMServer("org/echo", name="m")
    with pytest.raises(EnvError) as e:
        srv.start()
    msg = str(e.value)
    assert "\n" not in msg and "exited with code 1" in msg and "No CUDA GPUs are available" in msg
    assert not srv.running and len(starts(stand_in)) == 1


def test_validate_check_endpoints_reports_a_missing_vllm_executable(tmp_path, monkeypatch):
    from graphtune.api import check_endpoints

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    spec = load_spec(write_spec(tmp_path, TWO_MODELS))
    (name, ok, detail), _ = check_endpoints(spec)
    assert name == "llama-3.2-1b" and not ok and "pip install vllm" in detail and "vllm_command" in detail


def test_an_export_names_the_vllm_model_and_how_to_reach_it(tmp_path):
    from graphtune.export import export_config

    spec = load_spec(write_spec(tmp_path, TWO_MODELS))
    m = export_config(spec.resolved())["models"]["llama-3.2-1b"]
    assert m["model"] == "hosted_vllm/org/echo-acc60"
    assert "vllm serve org/echo-acc60" in m["note"] and "GRAPHTUNE_API_BASE_" in m["note"]


@pytest.mark.parametrize("entry, message", [
    ("provider: vllm", "provider `vllm` needs `model`"),
    ("provider: vllm\n    model: org/x\n    api_base: http://x/v1", "provider `vllm` runs its own server"),
    ("litellm: openai/x\n    model: org/x", "model need `provider: vllm`"),
    ("litellm: openai/x\n    vllm_args: [--dtype, half]", "vllm_args need `provider: vllm`"),
    ("provider: local\n    port: 8000", "port need `provider: vllm`"),
    ("litellm: openai/x\n    deterministic: true", "deterministic needs `provider: local`"),
    ("provider: local\n    deterministic: true\n    max_concurrency: 4", "serves one call at a time"),
    ("litellm: openai/x\n    startup_timeout_s: 30", "startup_timeout_s needs `provider: local`"),
    ("provider: vllm\n    model: org/x\n    gpu_memory_utilization: 1.5", "less than or equal to 1"),
])
def test_model_entry_mistakes_are_one_line_errors(tmp_path, entry, message):
    from graphtune.errors import SpecError

    models = f"  - name: llama-3.2-1b\n    {entry}\n"
    with pytest.raises(SpecError) as e:
        load_spec(write_spec(tmp_path, models))
    assert message in str(e.value) and "\n" not in str(e.value).strip()


def test_a_vllm_server_stops_when_graphtune_is_killed(stand_in, tmp_path):
    """kill -9 of the process that started the server: its supervisor notices and stops it,
    so no server is left holding the GPU."""
    import subprocess
    import time

    script = ("from graphtune.vllm_server import VLLMServer\n"
              "import time\n"
              "VLLMServer('org/echo', name='m').start()\n"
              "print('up', flush=True)\n"
              "time.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "up"
        (s,) = starts(stand_in)
        assert alive(s["pid"])
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 20
        while alive(s["pid"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(s["pid"])
    finally:
        if owner.poll() is None:
            owner.kill()
        owner.stdout.close()


def test_a_study_stored_before_the_new_model_options_continues_unrefused(tmp_path):
    """Stores written before `deterministic`, `model`, `vllm_args`, ... existed hold model
    entries without them: continuing such a study is not a spec change."""
    from graphtune.api import optimize
    from graphtune.spec import load_spec

    spec_path = tmp_path / "sim.yaml"
    spec_path.write_text(f"""
study: old
task: {{profile: math}}
models: [{{name: llama-3.2-1b}}, {{name: llama-3.2-3b}}]
budget: {{units: 10}}
search: {{method: random, evaluations: 2, batch_size: 2}}
storage: sqlite:///{tmp_path / 'old.db'}
""")
    optimize(load_spec(spec_path))
    with sqlite3.connect(tmp_path / "old.db") as c:
        (raw,) = c.execute("select spec from gt_studies where name = 'old'").fetchone()
        stored = json.loads(raw)
        for m in stored["models"]:
            for k in ("deterministic", "model", "vllm_args", "vllm_command", "port", "gpu_memory_utilization",
                      "startup_timeout_s"):
                del m[k]
        c.execute("update gt_studies set spec = ? where name = 'old'", (json.dumps(stored),))
        (before,) = c.execute("select count(*) from gt_trials").fetchone()
    optimize(load_spec(spec_path, overrides={"search.evaluations": 4}))  # refused before: "models" changed
    with sqlite3.connect(tmp_path / "old.db") as c:
        (after,) = c.execute("select count(*) from gt_trials").fetchone()
    assert after > before
