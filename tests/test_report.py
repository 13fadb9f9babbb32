"""`graphtune report`: one self-contained HTML file (checked statically, and rendered in
headless Chromium when it is installed: the plots load, the page logs nothing to the
console), PNGs on request, the cost breakdown and the agent timeline."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from graphtune.cli import app
from test_export import make_study

CHROMIUM = next((shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    db = make_study(tmp, name="ar", method="agent-reinforce", evaluations=8)
    return tmp, db


def make_report(tmp: Path, db: str, *extra: str) -> tuple[Path, str]:
    out = tmp / "report.html"
    r = CliRunner().invoke(app, ["report", "ar", "-o", str(out), "--storage", db, *extra], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out, r.output


def test_report_is_self_contained_with_every_section(study):
    tmp, db = study
    out, _ = make_report(tmp, db)
    html = out.read_text()
    # nothing is fetched at view time: no external src/href/url(), no script files
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html, re.I)
    assert "url(" not in html and "<script src" not in html and "@import" not in html
    imgs = re.findall(r'<img class="plot"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(imgs) == 3  # best-so-far, Pareto plot, best graph
    for h in ("Summary", "best-so-far", "Pareto front", "Recommended graph", "Per-question results",
              "Agent feedback timeline", "Cost breakdown", "environment, per model"):
        assert h in html, h
    # the agent ran (heuristic critic): its steps and the trials of its proposals are listed
    assert "heuristic" in html and "feedback" in html and re.search(r"#\d+ acc [0-9.]+ on \d+q", html)
    assert "llama-3.2-1b" in html and "&#10003;" in html


def test_report_png_dir_and_errors(study):
    tmp, db = study
    _, output = make_report(tmp, db, "--png-dir", str(tmp / "pngs"))
    names = sorted(p.name for p in (tmp / "pngs").glob("*.png"))
    assert names == ["best_graph.png", "best_so_far.png", "pareto.png"]
    assert all((tmp / "pngs" / n).read_bytes()[:4] == b"\x89PNG" for n in names)
    r = CliRunner().invoke(app, ["report", "ar", "-o", str(tmp / "no" / "r.html"), "--storage", db])
    assert r.exit_code == 2 and r.output.startswith("error: directory")


def test_cost_breakdown_counts_only_paid_runs(study):
    from graphtune.report import cost_breakdown
    from graphtune.store.storage import Storage

    _, db = study
    store = Storage(db)
    st = store.get_study("ar")
    cb = cost_breakdown(store, st)
    paid = sum(t.new_runs for t in store.list_trials(st.id))
    assert cb["environment"]["runs"] == paid
    assert set(cb["per_model"]) <= {"llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b"}
    assert sum(d["calls"] for d in cb["per_model"].values()) >= paid
    assert cb["agent"]["steps"] == len(store.agent_steps(st.id)) > 0
    assert abs(sum(d["flops"] for d in cb["per_model"].values()) - cb["environment"]["flops"]) \
        <= 1e-6 * cb["environment"]["flops"]


def copy_study(src, dst, name: str):
    """Copy a study between stores through the storage contract only (what a report reads)."""
    from graphtune.store import TrialRecord

    st = src.get_study(name)
    out = dst.create_study(name, st.method, st.spec)
    dst.save_progress(out.id, state=st.searcher_state or {}, batch_index=st.batch_index, runs_spent=st.runs_spent,
                      agent_steps=src.agent_steps(st.id))
    dst.set_status(out.id, st.status)
    paid: dict[int, set[str]] = {}
    for trial_id, r in src.paid_results(st.id):
        paid.setdefault(trial_id, set()).add(r.question_id)
    for t in src.list_trials(st.id):
        res = src.trial_results(t.id)
        cost = {"units": t.cost_units, "flops": t.flops, "usd": t.usd, "latency_s": t.latency_s}
        dst.record_trial(out.id, TrialRecord(
            split=t.split, batch=t.batch, slot=t.slot, status=t.status, graph=t.graph, graph_hash=t.graph_hash,
            method=t.method, origin=t.origin, parents=t.parents, info=t.info, question_ids=t.question_ids,
            results=res, reused={r.question_id for r in res} - paid.get(t.id, set()), metrics=t.metrics,
            reward=t.reward, cost=cost, new_runs=t.new_runs, error=t.error, feedback=t.feedback,
            started_at=t.started_at))
    return dst.get_study(name)


def test_a_report_is_built_from_a_memory_store_like_from_sqlite(study):
    from graphtune.report import build_report, cost_breakdown
    from graphtune.store import MemoryStorage, Storage

    _, db = study
    sql = Storage(db, readonly=True)
    mem = MemoryStorage()
    st_sql, st_mem = sql.get_study("ar"), copy_study(sql, mem, "ar")
    assert cost_breakdown(mem, st_mem) == cost_breakdown(sql, st_sql)
    assert cost_breakdown(mem, st_mem)["environment"]["runs"] == sum(t.new_runs for t in mem.list_trials(st_mem.id))
    html_sql, pngs_sql = build_report(sql, st_sql)
    html_mem, pngs_mem = build_report(mem, st_mem)
    sql.close()
    assert "store memory://" in html_mem and set(pngs_mem) == set(pngs_sql)

    def body(html: str) -> str:  # the same study: the same page, apart from where it is stored and when
        html = re.sub(r"<p class='sub'>store .*?</p>", "", html)
        return re.sub(r'src="data:image/png;base64,[^"]+"', "", html)

    assert body(html_mem) == body(html_sql)


def _chromium(tmp: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                           *extra, url], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(study):
    tmp, db = study
    out, _ = make_report(tmp, db)
    # the detector works: a page with a broken image and console output is caught
    bad = tmp / "bad.html"
    bad.write_text('<html><body onload="document.body.dataset.plotsLoaded=Array.from(document.images).filter('
                   'function(i){return i.complete&&i.naturalWidth>0;}).length">'
                   '<img class="plot" src="data:image/png;base64,AAAA"><script>console.error("boom")</script>'
                   "</body></html>")
    p = _chromium(tmp, bad.as_uri(), "--dump-dom")
    assert 'data-plots-loaded="0"' in p.stdout and ":CONSOLE" in p.stderr and "boom" in p.stderr
    # the report: every plot decoded, nothing logged to the console
    p = _chromium(tmp, out.as_uri(), "--dump-dom")
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'data-plots-loaded="3"' in p.stdout, p.stdout[:500]
    console = [ln for ln in p.stderr.splitlines() if ":CONSOLE" in ln]
    assert console == []
    shot = tmp / "shot.png"
    p = _chromium(tmp, out.as_uri(), "--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}")
    assert shot.exists() and shot.stat().st_size > 10_000, p.stderr[-2000:]
