"""`graphtune report`: one self-contained HTML file (checked statically, and rendered in
headless Chromium when it is installed: the plots load, the page logs nothing to the
console), PNGs on request, the cost breakdown and the agent timeline."""

from __future__ import annotations

import re
import shutil
import subprocess
from html import unescape
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


def copy_study(src, dst, name: str, *, result=lambda r: r, steps=lambda s: s):
    """Copy a study between stores through the storage contract only (what a report reads);
    ``result`` and ``steps`` may rewrite question results and agent steps on the way."""
    from graphtune.store import TrialRecord

    st = src.get_study(name)
    out = dst.create_study(name, st.method, st.spec)
    dst.save_progress(out.id, state=st.searcher_state or {}, batch_index=st.batch_index, runs_spent=st.runs_spent,
                      agent_steps=steps(src.agent_steps(st.id)))
    dst.set_status(out.id, st.status)
    paid: dict[int, set[str]] = {}
    for trial_id, r in src.paid_results(st.id):
        paid.setdefault(trial_id, set()).add(r.question_id)
    for t in src.list_trials(st.id):
        res = [result(r) for r in src.trial_results(t.id)]
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


# -- what a person reads: the legend, the timeline, the drill-down ------------------------------


def _section(html: str, title: str) -> str:
    start = html.index(f"<h2>{title}")
    end = html.find("<h2>", start + 4)
    return html[start:end if end > 0 else len(html)]


def _build(store, name: str = "ar") -> str:
    from graphtune.report import build_report

    return build_report(store, store.get_study(name))[0]


def test_cut_words_cuts_at_a_word_boundary():
    from graphtune.report import cut_words

    assert cut_words("short", 10) == "short"
    assert cut_words("alpha beta gamma delta", 12) == "alpha beta\u2026"
    assert cut_words("ends with a full stop. Then more", 22) == "ends with a full stop\u2026"
    assert cut_words("x" * 50, 10) == "x" * 10 + "\u2026"  # one long word: a hard cut


def test_the_per_question_table_has_a_legend_and_every_cell_opens_its_drilldown(study):
    from graphtune.store import Storage

    _, db = study
    html = _build(Storage(db, readonly=True))
    table = _section(html, "Per-question results")
    assert "How to read it" in table and "not scored on" in table and "infrastructure failure" in table
    assert "answer class, 0 the right answer" in table  # a simulated study says what its answers are
    # every header links to its trial's drill-down, every cell to its question's entry
    heads = re.findall(r"<th><a href='#(trial-\d+)'>#\d+ \([0-9.]+\)</a></th>", table)
    cells = re.findall(r"<td class=\"(?:ok|bad)\"><a href='#(q-\d+-\d+)'>", table)
    assert len(heads) == 3 and len(cells) >= 30
    ids = set(re.findall(r"""\bid=['"]([^'"]+)['"]""", html))
    links = set(re.findall(r"""href=['"]#([^'"]+)['"]""", html))
    assert set(heads) | set(cells) <= links and links <= ids  # no in-page link leads nowhere
    drill = _section(html, "Per-question drill-down")
    entry = re.search(r"<details class='q' id='%s'>.*?</details>" % cells[0], drill).group(0)
    # each node of the graph with its output, correctness, tokens and latency
    assert "(sink)" in entry and "llama-3." in entry and re.search(r"<td>\d[\d,]* / \d[\d,]*</td>", entry)
    assert "(test)" in drill  # the held-out test trial is drilled into too


def test_the_agent_timeline_reads_as_text_not_data(study):
    from graphtune.store import Storage

    _, db = study
    store = Storage(db, readonly=True)
    html = _build(store)
    tl = _section(html, "Agent feedback timeline")
    # no data dumps: no braces, no JSON lists, no long floats
    assert "{" not in tl and "[[" not in tl and "&#x27;:" not in tl and "&quot;:" not in tl
    assert not re.search(r"\d\.\d{4,}", tl), re.search(r".{40}\d\.\d{4,}.{20}", tl)
    # preference changes with signed, rounded numbers; proposals as graph text with their status
    assert re.search(r"model preference: (llama-[0-9.]+-\d+b [+-]\d\.\d\d(, )?)+", tl)
    assert re.search(r"<b>queued</b>: <code>\[\w+:(assistant|fuser):llama", tl)
    # a long feedback is cut at a word, with the whole text behind "more"
    m = re.search(r"<span class='pv'>(.*?)\u2026 </span><span class='m'>more</span></summary>(.*?)</details>", tl)
    preview, full = unescape(m.group(1)), unescape(m.group(2))
    source = next(s["feedback"] for s in store.agent_steps(store.get_study("ar").id) if s["feedback"] == full)
    assert source.startswith(preview) and source[len(preview)] in " .,;:" and len(preview) <= 220


def test_the_timeline_shows_each_batchs_logit_changes_split_into_gradient_and_agent(study):
    from graphtune.store import Storage

    _, db = study
    store = Storage(db, readonly=True)
    steps = store.agent_steps(store.get_study("ar").id)
    tl = _section(_build(store), "Agent feedback timeline")
    heads = re.findall(r"logit change this batch \(sum of \|change\|\): gradient (\d+\.\d\d), agent (\d+\.\d\d), "
                       r"entropy floor (\d+\.\d\d)(?:; agent share (\d+)%)?", unescape(tl))
    assert len(heads) == len(steps) >= 3  # one per batch with an agent step
    for (g, a, f, share), st in zip(heads, steps):
        att = st["applied"]["attribution"]
        assert (float(g), float(a), float(f)) == pytest.approx((att["gradient_l1"], att["agent_l1"],
                                                                att["floor_l1"]), abs=0.006)
    # the logits that moved most, each split into its parts, rounded to two decimals
    tables = re.findall(r"<table class='attr'>(.*?)</table>", tl)
    assert tables
    for table in tables:
        rows = re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td></tr>",
                          table)
        assert 1 <= len(rows) <= 5
        for name, *nums in rows:
            assert re.fullmatch(r"s\d (model|role) \S+|edge s\d->s\d|s\d activation", unescape(name)), name
            assert all(re.fullmatch(r"[+-]\d+\.\d\d", x) for x in nums), nums
    assert any(float(r[2]) != 0 for t in tables for r in re.findall(
        r"<tr><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td>", t))  # the agent moved something
    # no text cut mid-word: every preview ends where its source has a word boundary
    texts = [x for st in steps for x in (st.get("feedback"), st.get("rejected_reason")) if x]
    previews = [unescape(p) for p in re.findall(r"<span class='pv'>(.*?)\u2026 </span>", tl)]
    assert previews
    for pv in previews:
        src = next(t for t in texts if t.startswith(pv))
        assert src[len(pv)] in " .,;:\n\t"


HOSTILE = '<script>alert("x")</script>\'"><img src=x onerror=alert(1)>'


def _hostile_copy(db: str):
    """The fixture study in a memory store, with every answer, node output and agent text
    replaced by markup, and one node output 5,000 characters long."""
    import dataclasses

    from graphtune.store import MemoryStorage, Storage

    def result(r):
        nodes = tuple(dataclasses.replace(n, answer=(HOSTILE + " " + "y" * 5000)[:5000] if i == 0 else HOSTILE)
                      for i, n in enumerate(r.nodes))
        err = HOSTILE if r.error else None
        return dataclasses.replace(r, answer=HOSTILE, nodes=nodes, error=err)

    def steps(st):
        out = []
        for s in st:
            s = dict(s, feedback=HOSTILE * 40, reply=HOSTILE * 400, is_llm=True, rejected_reason=HOSTILE)
            parsed = dict(s.get("parsed") or {})
            parsed["proposals"] = [{"nodes": [{"id": HOSTILE, "role": "assistant", "model": HOSTILE}], "edges": []}]
            s["parsed"] = parsed
            s["applied"] = {"proposals": [{"index": 0, "status": HOSTILE, "reason": HOSTILE}], "accepted": 0}
            out.append(s)
        return out

    sql = Storage(db, readonly=True)
    mem = MemoryStorage()
    copy_study(sql, mem, "ar", result=result, steps=steps)
    sql.close()
    return mem


def test_hostile_model_answers_are_escaped_and_bounded(study):
    from html.parser import HTMLParser

    from graphtune.report import NODE_OUTPUT_CHARS

    _, db = study
    html = _build(_hostile_copy(db))
    assert "<script" not in html.lower() and "<img src=x" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&#x27;&quot;&gt;" in html

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.handlers = set(), []

        def handle_starttag(self, tag, attrs):
            self.tags.add(tag)
            self.handlers += [(tag, k) for k, _ in attrs if k.startswith("on")]

    p = Tags()
    p.feed(html)
    # only the report's own markup: no script element, no image but the three plots, and
    # no event handler but the report's own two on <body>
    assert "script" not in p.tags and html.count("<img ") == 3
    assert sorted(p.handlers) == [("body", "onhashchange"), ("body", "onload")]
    # a long node output is cut, with its full length noted; long agent texts are bounded
    assert f"(up to {NODE_OUTPUT_CHARS} of 5,000 characters)" in html and "y" * 1000 not in html
    tl = _section(html, "Agent feedback timeline")
    assert "the model's reply" in tl and "characters)" in tl
    assert len(tl) < 40 * len(HOSTILE) * 10 * 60  # far below the stored texts' total


def test_the_report_size_is_bounded_by_its_caps(study):
    from graphtune.report import MAX_QUESTIONS, NODE_OUTPUT_CHARS
    from graphtune.store import Storage

    _, db = study
    store = Storage(db, readonly=True)
    html = _build(store)
    drill = _section(html, "Per-question drill-down")
    n_trials = drill.count("<h3 id='trial-")
    assert 1 <= n_trials <= 3 + 2  # top graphs, the recommended trial, the test trial
    assert drill.count("<details class='q'") <= n_trials * MAX_QUESTIONS
    # at most one bounded output per node per question shown
    assert len(drill) < n_trials * MAX_QUESTIONS * 6 * (NODE_OUTPUT_CHARS + 300)
