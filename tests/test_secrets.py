"""Secrets suite (issue 10): a planted API key and database password are found nowhere.

The key is the value of the variable a model's ``api_key_env`` names; the password is in
the ``--storage`` URL (PostgreSQL only: SQLite URLs have none). Both are made to appear in
questions, so the prompts carry them and the fake endpoint's replies echo them (it answers
``The answer is <x>`` for the last ``ANSWER=<x>`` of a prompt). Then a live search runs
through the real CLI, in its own processes, and every place a secret could leak is read:
the database (SQLite: the file, its WAL and shared-memory files, byte for byte;
PostgreSQL: every row of every table as text), the call-ledger rows, ``graphtune dump``,
every export format (yaml, json, langgraph, mermaid), the ``graphtune report`` HTML, and
stdout/stderr of every command run (optimize, resume, studies, trials, show, dump, export,
report, run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("litellm")
pytest.importorskip("langgraph")

from fake_openai_server import FakeOpenAIServer  # noqa: E402
from graphtune.store.redact import MASK  # noqa: E402

KEY = "sk-planted-KEY-7f3a9c2e4b1d8f60"
PASSWORD = "pw-planted-5e8d2c1b9a"
PG_URL = os.environ.get("GRAPHTUNE_TEST_POSTGRES_URL")
KINDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(
    not PG_URL, reason="set GRAPHTUNE_TEST_POSTGRES_URL (bash scripts/postgres.sh start) to test PostgreSQL"))]


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer() as srv:
        yield srv


def write_spec(tmp_path: Path, srv, storage: str, secrets: list[str]) -> Path:
    rows = []
    for i in range(10):
        s = secrets[i % len(secrets)]
        # the secret is in the question and is the answer the endpoint gives back
        rows.append({"id": f"x{i}", "question": f"Repeat the token {s} exactly. ANSWER={s}", "answer": str(i)})
    (tmp_path / "qs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tmp_path / "live.yaml"
    spec.write_text(f"""
study: leak
task:
  dataset: qs.jsonl
  scorer: numeric
  dev_size: 5
  test_size: 5
models:
  - name: llama-3.2-1b
    litellm: openai/echo
    api_base: {srv.api_base}
    api_key_env: GT_PLANTED_KEY
  - name: llama-3.2-3b
    litellm: openai/echo-3b
    api_base: {srv.api_base}
    api_key_env: GT_PLANTED_KEY
space:
  max_nodes: 3
  max_depth: 2
budget:
  units: 10
search:
  method: random
  evaluations: 3
  batch_size: 2
env:
  kind: live
  concurrency: 4
  max_tokens: 32
storage: {storage}
""")
    return spec


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    """A command in its own process: its real stdout and stderr (warnings, library logs)."""
    env = dict(os.environ, GT_PLANTED_KEY=KEY, LITELLM_LOCAL_MODEL_COST_MAP="True")
    r = subprocess.run([sys.executable, "-m", "graphtune.cli", *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=cwd, timeout=300)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


def cli_here(*args) -> subprocess.CompletedProcess:
    """A read-only command in this process (they load no spec: faster, same output)."""
    from typer.testing import CliRunner

    from graphtune.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (args, r.output)
    return subprocess.CompletedProcess(["graphtune", "-", "-", *map(str, args[:2])], 0, r.output, "")


def database_text(url: str, tmp_path: Path) -> bytes:
    """Everything the database holds: SQLite's files byte for byte (the WAL too), or every
    row of every PostgreSQL table as text."""
    if url.startswith("sqlite"):
        files = [p for p in tmp_path.iterdir() if p.name.startswith("g.db")]
        assert files
        return b"".join(p.read_bytes() for p in files)
    from sqlalchemy import create_engine, inspect, text

    eng = create_engine(url)
    out = []
    with eng.connect() as c:
        for t in inspect(c).get_table_names():
            out.append(repr(c.execute(text(f'SELECT * FROM "{t}"')).fetchall()))
    eng.dispose()
    return "\n".join(out).encode()


@pytest.mark.parametrize("kind", KINDS)
def test_a_planted_key_and_password_are_found_nowhere(kind, server, tmp_path):
    from sqlalchemy.engine import make_url

    if kind == "postgresql":
        from test_store import fresh_postgres

        url = make_url(fresh_postgres(PG_URL)).set(password=PASSWORD).render_as_string(hide_password=False)
        secrets = [KEY, PASSWORD]
    else:
        url = f"sqlite:///{tmp_path / 'g.db'}"
        secrets = [KEY]
    spec = write_spec(tmp_path, server, url, secrets)
    logs = []
    r = cli("optimize", spec, "--storage", url, cwd=tmp_path)  # with its progress bar
    assert "best graph" in r.stdout
    logs.append(r)
    logs.append(cli("resume", "leak", "--storage", url, "-n", 4, cwd=tmp_path))
    for args in (("studies",), ("trials", "leak"), ("show", "leak"), ("show", "leak", "1")):
        logs.append(cli_here(*args, "--storage", url))
    files = {"dump": tmp_path / "dump.json", "report": tmp_path / "report.html"}
    logs.append(cli_here("dump", "leak", "-o", files["dump"], "--storage", url))
    logs.append(cli_here("report", "leak", "-o", files["report"], "--storage", url))
    for fmt, suffix in (("yaml", "yaml"), ("json", "json"), ("langgraph", "py"), ("mermaid", "mmd")):
        files[fmt] = tmp_path / f"graph.{suffix}"
        logs.append(cli_here("export", "leak", "--format", fmt, "-o", files[fmt], "--storage", url))
    logs.append(cli("run", files["yaml"], "--spec", spec, "--storage", url, "--nodes",
                    "--question", f"What is {KEY}? ANSWER={KEY}", cwd=tmp_path))

    # the secrets did reach the store's door: prompts and replies held them, and were redacted
    from graphtune.store.ledger import SQLLedger
    from graphtune.store.storage import Storage

    store = Storage(url, readonly=True)
    records = SQLLedger(store).records()
    assert records and any(MASK in (r.reply or "") for r in records)
    assert any(MASK in json.dumps(r.messages) for r in records)
    found = {}
    found["ledger rows"] = repr(records)
    st = store.get_study("leak")
    found["stored spec"] = json.dumps(st.spec)
    store.close()
    found["database"] = database_text(url, tmp_path).decode("latin-1")
    for name, path in files.items():
        found[name] = path.read_text()
    for i, r in enumerate(logs):
        found[f"stdout of {r.args[3:5]}"] = r.stdout
        found[f"stderr of {r.args[3:5]}"] = r.stderr
    for secret in secrets:
        leaks = [where for where, text in found.items() if secret in text]
        assert not leaks, f"{secret} found in {leaks}"
