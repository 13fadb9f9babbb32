"""Every output of a pipeline study: `trials`, `show`, `pareto`, `validate`, `compare`,
`resume`, `dump`, `export` in every format (the LangGraph module run through LangGraph's
own interfaces against the fake OpenAI-compatible server), the HTML report and the
dashboard's mirror, on a simulated RAG study (retrieve -> answer)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before the first litellm import

from graphtune.cli import app  # noqa: E402
from graphtune.envs.prompts import STAGE_INPUT_HEADING, stage_question  # noqa: E402
from graphtune.graphs.design import design_hash  # noqa: E402
from graphtune.graphs.io import from_dict, load  # noqa: E402
from graphtune.graphs.pipeline import Pipeline  # noqa: E402
from graphtune.graphs.results import summarize_stages  # noqa: E402
from graphtune.store.storage import Storage  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline_study import RAG  # noqa: E402

STAGES = ("retrieve", "answer")


@pytest.fixture(scope="module")
def rag(tmp_path_factory):
    """(storage URL, spec path, folder) of a finished simulated RAG study."""
    tmp = tmp_path_factory.mktemp("rag")
    url = f"sqlite:///{tmp / 'rag.db'}"
    spec = tmp / "rag.yaml"
    spec.write_text(RAG + f"storage: {url}\n")
    r = CliRunner().invoke(app, ["optimize", str(spec), "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return url, spec, tmp


def cli(*args: str) -> str:
    r = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def _trials(url: str):
    store = Storage(url, readonly=True)
    st = store.get_study("rag")
    return store, st, store.list_trials(st.id)


# -- the stage question text ---------------------------------------------------------------


def test_stage_question_default_wording_and_templates():
    text = stage_question(None, " What is X? ", {"retrieve": " passage 1\npassage 2 "})
    assert text == "What is X?\n\n" + STAGE_INPUT_HEADING.format(stage="retrieve") + "\npassage 1\npassage 2"
    # a stage that does not read the question: only its inputs, in order
    two = stage_question(None, None, {"a": "x", "b-c": "y"})
    assert two == "Output of the a stage:\nx\n\nOutput of the b-c stage:\ny"
    # the stage's input order: a stage may read an earlier stage before the question, or not the question
    assert stage_question(None, "q", {"a": "x"}, order=("a", "question")) == "Output of the a stage:\nx\n\nq"
    assert stage_question(None, "q", {"a": "x"}, order=("a",)) == "Output of the a stage:\nx"
    assert stage_question("Q: {question}\nP: {retrieve}", "q?", {"retrieve": "p"}) == "Q: q?\nP: p"
    assert stage_question("{question} / {a}", "q", {"a": "x"}, order=("a",)) == "q / x"  # a template may name it
    with pytest.raises(KeyError, match=r"names \{answer\}.*it may name \{retrieve\}, \{question\}"):
        stage_question("{answer}", "q", {"retrieve": "p"})
    with pytest.raises(KeyError, match=r"names \{a positional field\}"):
        stage_question("{0}", "q", {"retrieve": "p"})


# -- listings ------------------------------------------------------------------------------


def test_trials_lists_pipelines_stage_by_stage_and_ranks_as_before(rag):
    url, _, _ = rag
    out = cli("trials", "rag", "--storage", url)
    rows = [line for line in out.splitlines()[2:] if line.strip()]
    assert len(rows) == 7 and all("retrieve: " in r and " / answer: " in r for r in rows)
    assert "*" in out  # the recommended pipeline's trial is marked
    recs = json.loads(cli("trials", "rag", "--storage", url, "-f", "json"))
    assert all(r["graph"].startswith("retrieve: ") for r in recs)
    # --top ranks pipelines as it ranks graphs: by dev reward among the well-covered trials
    dev = sorted((r for r in recs if r["split"] == "dev"), key=lambda r: -r["reward"])
    top = json.loads(cli("trials", "rag", "--storage", url, "--top", "2", "-f", "json"))
    assert [r["number"] for r in top][:2] == [r["number"] for r in dev[:2]]
    front = cli("pareto", "rag", "--storage", url)
    assert "Pareto front of rag" in front and "hypervolume" in front


def test_show_prints_each_stage_with_models_cost_and_accuracy(rag):
    url, _, _ = rag
    store, st, trials = _trials(url)
    test = [t for t in trials if t.split == "test"][-1]
    best = store.get_trial(st.id, test.parents[0])
    out = cli("show", "rag", "--storage", url)
    assert "best pipeline: retrieve(<-question)" in out
    assert f"stages of trial #{best.number}" in out and "dev stage acc" in out and "test stage acc" in out
    dev_summ = {s.stage: s for s in summarize_stages(store.trial_results(best.id))}
    test_summ = {s.stage: s for s in summarize_stages(store.trial_results(test.id))}
    design = from_dict(best.graph)
    for name in STAGES:
        line = next(x for x in out.splitlines() if x.startswith(name + " "))
        d, t = dev_summ[name], test_summ[name]
        assert f"{d.accuracy:.3f} (n={d.n_scored})" in line and f"{t.accuracy:.3f} (n={t.n_scored})" in line
        for m, k in design.stage(name).graph.model_counts().items():
            assert f"{m} x{k}" in line
        assert f"{d.mean_usd:.6f}" in line
    # the stages' units add up to the trial's
    units = [float(x.split()[3]) for x in out.splitlines() if x.split()[:1] and x.split()[0] in STAGES]
    assert abs(sum(units) - best.cost_units) < 0.02
    # one trial: its own stages and split
    one = cli("show", "rag", str(test.number), "--storage", url)
    assert "test stage acc" in one and "dev stage acc" not in one and "subgraph" in one


def test_validate_compare_resume_dump_worker_on_a_pipeline_study(rag):
    url, spec, tmp = rag
    out = cli("validate", str(spec))
    assert "stage retrieve (<- question)" in out and "stage answer (<- question, retrieve)" in out
    assert "cap units <= 300" in out and "pipeline-question" in out
    assert "rag" in cli("compare", "rag", "--storage", url)
    # a stored pipeline study continues from its stored spec (which holds no top-level space)
    before = len(_trials(url)[2])
    assert "best graph" in cli("resume", "rag", "--storage", url, "-q")
    assert "stopped" in cli("optimize", str(spec), "-q")
    assert len(_trials(url)[2]) == before
    cli("dump", "rag", "-o", str(tmp / "d.json"), "--storage", url)
    assert json.loads((tmp / "d.json").read_text())["trials"][0]["graph"]["stages"]


# -- export: files and drawings ------------------------------------------------------------


def test_export_writes_pipeline_files_mermaid_and_a_drawing_with_a_box_per_stage(rag):
    url, _, tmp = rag
    store, st, trials = _trials(url)
    test = [t for t in trials if t.split == "test"][-1]
    for fmt in ("yaml", "json"):
        path = tmp / f"best.{fmt}"
        out = cli("export", "rag", "-f", fmt, "-o", str(path), "--storage", url)
        assert "graphtune run" in out
        p = load(path)  # what `graphtune run FILE` reads
        assert isinstance(p, Pipeline) and p.names == STAGES and design_hash(p) == test.graph_hash
        doc = json.loads(path.read_text()) if fmt == "json" else None
        if doc:
            assert doc["metrics"]["test_accuracy"] == test.accuracy and doc["name"].startswith("rag trial")
    mmd = tmp / "best.mmd"
    cli("export", "rag", "-f", "mermaid", "-o", str(mmd), "--storage", url)
    text = mmd.read_text()
    assert 'subgraph s0["retrieve"]' in text and 'subgraph s1["answer"]' in text and "question --> s0" in text
    png = tmp / "best.png"
    cli("export", "rag", "-f", "png", "-o", str(png), "--storage", url)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from graphtune.export import _matplotlib, pipeline_figure

    fig = pipeline_figure(from_dict(test.graph), title="t")
    try:  # one box (axis) per stage, titled with the stage and its inputs; an arrow between them
        assert [ax.get_title() for ax in fig.axes] == ["stage retrieve\nreads: question",
                                                       "stage answer\nreads: question, retrieve"]
        assert len(fig.artists) == 1
    finally:
        _matplotlib().close(fig)
    # the front, one file per pipeline
    out = cli("export", "rag", "--select", "pareto", "-f", "yaml", "-o", str(tmp / "front"), "--storage", url)
    files = sorted((tmp / "front").glob("*.yaml"))
    assert files and len(files) == out.count("wrote ") and all(isinstance(load(f), Pipeline) for f in files)


# -- export: the LangGraph module ------------------------------------------------------------

pytest.importorskip("litellm")
pytest.importorskip("langgraph")
from fake_openai_server import FakeOpenAIServer  # noqa: E402


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer() as srv:
        yield srv


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_langgraph_export_runs_each_stage_as_a_subgraph(rag, server):
    from langgraph.graph.state import CompiledStateGraph

    url, _, tmp = rag
    path = tmp / "rag_graph.py"
    plain = CliRunner().invoke(app, ["export", "rag", "-f", "langgraph", "-o", str(tmp / "plain.py"), "--storage", url])
    assert plain.exit_code == 0 and "no endpoint for" in plain.output and "graphtune[llm]" in plain.output
    maps = [a for m in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b")
            for a in ("--models", f"{m}=openai/echo")]
    out = cli("export", "rag", "-f", "langgraph", "-o", str(path), *maps, "--storage", url)
    assert "no endpoint for" not in out and "./rag_graph.py:graph" in out
    src = path.read_text()
    assert "import graphtune" not in src and "from graphtune" not in src
    mod = _load(path)
    g = mod.graph
    assert isinstance(g, CompiledStateGraph)
    # the parent graph: one node per stage; each stage a compiled subgraph (its nodes under xray)
    assert set(g.get_graph().nodes) == {"__start__", "__end__", "stage_retrieve", "stage_answer"}
    xray = set(g.get_graph(xray=True).nodes)
    assert {"stage_retrieve:node_n0", "stage_answer:prompt"} <= xray
    assert isinstance(mod.build_stage("answer"), CompiledStateGraph)
    assert set(g.get_input_jsonschema()["properties"]) == {"question"}
    assert set(g.get_output_jsonschema()["properties"]) == {"answer", "stages", "prompts", "outputs"}

    seen = []

    def rec(**kw):
        import litellm

        seen.append(kw["messages"][-1]["content"])
        return litellm.completion(**kw)

    q = "What is 5 + 2? ANSWER=7"
    state = g.invoke({"question": q}, context={"api_base": server.api_base},
                     config={"configurable": {"completion": rec}})
    assert state["answer"].startswith("The answer is 7") and state["answer"] == state["stages"]["answer"]
    retrieved = state["stages"]["retrieve"]
    # stage 2's question text: the question, then stage 1's answer under its heading (graphtune's wording)
    assert state["prompts"]["retrieve"] == q
    assert state["prompts"]["answer"] == stage_question(None, q, {"retrieve": retrieved})
    assert retrieved in state["prompts"]["answer"]
    design = mod.PIPELINE["stages"]
    n_answer = len(design[1]["graph"]["nodes"])
    answer_calls = [c for c in seen if "Output of the retrieve stage:" in c]
    assert len(seen) == sum(len(s["graph"]["nodes"]) for s in design) and len(answer_calls) == n_answer
    assert all(retrieved in c for c in answer_calls)  # every answer-stage prompt holds stage 1's answer
    assert set(state["outputs"]) == {f"{s['name']}/{n['id']}" for s in design for n in s["graph"]["nodes"]}
    # async: the same requests, so the same replies (the fake's reply carries a digest of prompt and seed)
    astate = asyncio.run(g.ainvoke({"question": q}, context=mod.Context(api_base=server.api_base)))
    assert astate == state
    # the convenience helpers, and streaming into the stages as LangGraph streams subgraphs
    assert mod.run(q, context={"api_base": server.api_base}) == state["answer"]
    assert asyncio.run(mod.arun_stages(q, context={"api_base": server.api_base})) == state["stages"]
    chunks = list(g.stream({"question": q}, context={"api_base": server.api_base}, stream_mode="updates",
                           subgraphs=True))
    assert any(ns and ns[0].startswith("stage_answer:") for ns, _ in chunks)


def test_exported_pipeline_runs_without_graphtune(rag, server, tmp_path):
    import subprocess

    from test_export import _deps_path

    url, _, _ = rag
    out = tmp_path / "pipe.py"
    cli("export", "rag", "-f", "langgraph", "-o", str(out), "--storage", url)
    work = tmp_path / "elsewhere"
    work.mkdir()
    script = ("import sys, importlib.util\n"
              f"sys.path.insert(0, {str(out.parent)!r})\n"
              "import pipe\n"
              "print('STAGES:', pipe.run_stages('What is 5 + 2? ANSWER=7'))\n"
              "assert not any(m == 'graphtune' or m.startswith('graphtune.') for m in sys.modules), 'imported'\n"
              "assert importlib.util.find_spec('graphtune') is None, 'graphtune importable'\n")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": _deps_path(), "GRAPHTUNE_API_BASE": server.api_base,
           "HOME": str(tmp_path)}
    for m in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b"):
        env["GRAPHTUNE_MODEL_" + m.upper().replace("-", "_").replace(".", "_")] = "openai/echo"
    p = subprocess.run([sys.executable, "-S", "-c", script], cwd=work, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "'retrieve': 'The answer is 7" in p.stdout and "'answer': 'The answer is 7" in p.stdout


def test_langgraph_export_uses_a_stage_prompt_template_and_stage_prompts(tmp_path, server):
    from graphtune.export import to_langgraph_module
    from graphtune.graphs import Graph, Node
    from graphtune.graphs.pipeline import Stage

    p = Pipeline((Stage("plan", Graph.build([Node.make("a", "assistant", "m1")])),
                  Stage("solve", Graph.build([Node.make("a", "assistant", "m1"), Node.make("b", "assistant", "m1"),
                                              Node.make("f", "fuser", "m1")], [("a", "f"), ("b", "f")]),
                        ("question", "plan"))))
    spec = {"task": {"scorer": "numeric"}, "env": {"kind": "live", "seed": 3},
            "models": [{"name": "m1", "litellm": "openai/echo", "api_base": server.api_base}],
            "pipeline": {"stages": [{"name": "plan", "prompts": {"answer_format": "Give a plan."}},
                                    {"name": "solve", "prompt": "Plan:\n{plan}\n\nTask: {question}"}]}}
    path = tmp_path / "tmpl.py"
    path.write_text(to_langgraph_module(p, spec, modname="tmpl"))
    mod = _load(path)
    assert mod.PROMPTS["plan"]["answer_format"] == "Give a plan." and "The answer is" in mod.PROMPTS["solve"][
        "answer_format"]
    seen = []

    def rec(**kw):
        import litellm

        seen.append(kw)
        return litellm.completion(**kw)

    state = mod.graph.invoke({"question": "q ANSWER=4"}, config={"configurable": {"completion": rec}})
    assert state["prompts"]["solve"] == f"Plan:\n{state['stages']['plan']}\n\nTask: q ANSWER=4"
    plan_msgs = [k["messages"][-1]["content"] for k in seen if k["messages"][-1]["content"].endswith("Give a plan.")]
    assert len(plan_msgs) == 1 and len(seen) == 4
    # the solve stage's two identical assistants are two samples (seeds 3 and 4), as graphtune numbers them
    solve_seeds = sorted(k["seed"] for k in seen if "Plan:" in k["messages"][-1]["content"]
                         and "Response 1" not in k["messages"][-1]["content"])
    assert solve_seeds == [3, 4]


def test_langgraph_export_wires_parallel_stages_and_a_join(tmp_path, server):
    """Two stages on the question (one named with a dash) run side by side; a third reads
    both and not the question: its text is their answers in its input order."""
    from graphtune.export import to_langgraph_module
    from graphtune.graphs import Graph, Node
    from graphtune.graphs.pipeline import Stage

    def one(m):
        return Graph.build([Node.make("n0", "assistant", m)])

    p = Pipeline((Stage("a", one("m1")), Stage("b-two", one("m2")), Stage("c", one("m1"), ("b-two", "a"))))
    spec = {"task": {"scorer": "numeric"}, "env": {"kind": "live", "seed": 1},
            "models": [{"name": "m1", "litellm": "openai/echo", "api_base": server.api_base},
                       {"name": "m2", "litellm": "openai/echo-acc0", "api_base": server.api_base}]}
    path = tmp_path / "dag.py"
    path.write_text(to_langgraph_module(p, spec, modname="dag"))
    mod = _load(path)
    edges = {(e.source, e.target) for e in mod.graph.get_graph().edges}
    assert {("__start__", "stage_a"), ("__start__", "stage_b-two"), ("stage_a", "stage_c"),
            ("stage_b-two", "stage_c"), ("stage_c", "__end__")} <= edges
    q = "q ANSWER=9"
    steps = [list(u) for u in mod.graph.stream({"question": q}, stream_mode="updates")]
    assert sorted(k for u in steps[:2] for k in u) == ["stage_a", "stage_b-two"] and steps[2] == ["stage_c"]
    state = mod.graph.invoke({"question": q})
    st = state["stages"]
    assert st["a"] != st["b-two"]  # different models
    assert state["prompts"]["c"] == f"Output of the b-two stage:\n{st['b-two']}\n\nOutput of the a stage:\n{st['a']}"
    assert state["answer"] == st["c"]


# -- the report and the dashboard ------------------------------------------------------------


def test_report_shows_each_stage_and_each_stages_answer_per_question(rag):
    from graphtune.report import NODE_OUTPUT_CHARS, build_report

    url, _, tmp = rag
    store, st, trials = _trials(url)
    test = [t for t in trials if t.split == "test"][-1]
    best = store.get_trial(st.id, test.parents[0])
    html, pngs = build_report(store, st)
    assert "<h2>Recommended pipeline</h2>" in html and "best_graph.png" in pngs
    assert html.count("<tr class='stage-row'>") == 2 and "dev stage accuracy" in html and "test answers lost" in html
    summ = {s.stage: s for s in summarize_stages(store.trial_results(best.id))}
    design = from_dict(best.graph)
    for name in STAGES:
        row = html.split(f"<tr class='stage-row'><td>{name}</td>", 1)[1].split("</tr>", 1)[0]
        assert f"{summ[name].accuracy:.3f} on {summ[name].n_scored}" in row
        assert all(f"{m} x{k}" in row for m, k in design.stage(name).graph.model_counts().items())
    # the drill-down: each question opens to each stage's answer, then the nodes as stage/node
    assert html.count("<tr class='stage'><td>retrieve") >= 40 and "answer/n0" in html
    # a long stage answer is cut at a word, its full length noted
    from graphtune.graphs.results import QuestionResult, StageOutcome
    from graphtune.report import _stage_answer_rows

    long = QuestionResult("q", "x", False, stages=(StageOutcome("retrieve", "word " * 2000, False),
                                                   StageOutcome("answer", "x", False)))
    cell = _stage_answer_rows(long)
    assert f"(up to {NODE_OUTPUT_CHARS:,} of 10,000 characters)" in cell and len(cell) < 2 * NODE_OUTPUT_CHARS + 600
    assert "retrieve <span class='note'>(lost the answer)</span>" in cell
    out = cli("report", "rag", "-o", str(tmp / "r.html"), "--storage", url)
    assert "wrote" in out and (tmp / "r.html").stat().st_size > 10_000


def test_dashboard_mirrors_a_pipeline_study_with_its_stages(rag):
    from optuna_dashboard import get_note

    import optuna
    from graphtune.dashboard import DashboardServer, StudyMirror

    url, _, _ = rag
    store, st, trials = _trials(url)
    mirror = StudyMirror(store, "rag")
    stats = mirror.refresh()
    assert stats.added == len([t for t in trials if t.split == "dev"])
    t0 = mirror.study.trials[0]
    assert t0.user_attrs["stages"].startswith("retrieve: ") and " / answer: " in t0.user_attrs["stages"]
    assert {"retrieve:n_nodes", "answer:n_nodes", "answer:sink_model", "retrieve:model:llama-3.1-70b"} <= set(
        t0.params)
    body = get_note(optuna.trial.Trial(mirror.study, t0._trial_id))
    assert "### Stages" in body and "| retrieve | question |" in body and "| answer | question, retrieve |" in body
    assert "retrieve (reads question):" in body
    assert "**Recommended pipeline**" in get_note(mirror.study)
    with DashboardServer(store, "rag", port=0, refresh_s=0.5).start() as server:
        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(base + "/api/studies", timeout=30) as resp:
            sid = json.loads(resp.read())["study_summaries"][0]["study_id"]
        with urllib.request.urlopen(f"{base}/api/studies/{sid}", timeout=30) as resp:
            detail = json.loads(resp.read())
        assert len(detail["trials"]) == stats.added
        assert any(p["name"] == "answer:n_nodes" for p in detail["trials"][0]["params"])


def test_a_pipeline_report_renders_in_headless_chromium(rag):
    """The pipeline report as a browser shows it: every plot (the stage drawing included)
    decodes and nothing is logged to the console."""
    import re

    from test_report import CHROMIUM, _chromium

    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    url, _, tmp = rag
    out = tmp / "chromium.html"
    cli("report", "rag", "-o", str(out), "--storage", url)
    plots = len(re.findall(r"<img class=['\"]plot", out.read_text()))
    assert plots >= 3
    p = _chromium(tmp, out.as_uri(), "--dump-dom")
    assert p.returncode == 0, p.stderr[-2000:]
    assert f'data-plots-loaded="{plots}"' in p.stdout, p.stdout[:500]
    assert [ln for ln in p.stderr.splitlines() if ":CONSOLE" in ln] == []
