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
