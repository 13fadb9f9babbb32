"""Roles users define: a spec declares a `verifier` besides assistant and fuser; it is
validated with file and line, every searcher may use it (and only where its rules allow),
the simulator models it as the role it acts like, the live environment and the exported
LangGraph module prompt it with its template, and graph files keep it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from graphtune.errors import GraphError, SpecError
from graphtune.graphs import Graph, Node, RoleSpec, Space
from graphtune.graphs.canonical import graph_hash
from graphtune.graphs.cost import Budget, CostModel, TaskShape
from graphtune.graphs.space import check_space_not_empty, enumerate_graphs, random_graph, structural_errors
from graphtune.spec import load_spec, parse_spec

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

TEMPLATE = "Check this answer to {question}: {inputs}. Reply with the corrected final answer."
MODELS = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b")

SPEC = f"""\
study: roles
task:
  profile: math
  dev_size: 30
  test_size: 30
models:
  - name: llama-3.2-1b
  - name: llama-3.2-3b
  - name: llama-3.1-8b
roles:
  verifier:
    prompt: "{TEMPLATE}"
    inputs: required
    sink: true
    acts_like: fuser
space:
  max_nodes: 4
  max_width: 3
  max_depth: 3
  max_in_degree: 3
budget:
  units: 18
search:
  method: random
  evaluations: 6
  batch_size: 3
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def verifier_space(**kw) -> Space:
    base = dict(models=MODELS, roles=("assistant", "fuser", "verifier"), max_nodes=4, max_width=3, max_depth=3,
                max_in_degree=3, role_specs=(RoleSpec("verifier", "required", True, "fuser"),))
    base.update(kw)
    return Space(**base)


def costs() -> CostModel:
    from graphtune.spec import ModelEntry

    return CostModel({m: ModelEntry(name=m).info() for m in MODELS}, TaskShape(202, 275))


# -- the spec ---------------------------------------------------------------------------


def test_a_spec_with_a_verifier_validates_and_the_space_uses_it(tmp_path):
    spec = load_spec(write(tmp_path, SPEC))
    space = spec.space_obj()
    assert space.roles == ("assistant", "fuser", "verifier")  # declared roles join the default roles
    assert space.role_spec("verifier") == RoleSpec("verifier", "required", True, "fuser", TEMPLATE)
    assert spec.role_templates() == {"verifier": TEMPLATE}


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


BAD_ROLES = [  # (what the user got wrong, edit of SPEC, the line to blame (text on it), message)
    ("unknown key", lambda t: t.replace("    sink: true\n", "    sink: true\n    promt: x\n"), "promt:",
     "roles.verifier.promt: unknown field; did you mean 'prompt'?"),
    ("a built-in name", lambda t: t.replace("  verifier:\n", "  fuser:\n"), "  fuser:",
     "roles.fuser: role 'fuser' is built in"),
    ("a bad name", lambda t: t.replace("  verifier:\n", "  Verifier:\n"), "  Verifier:",
     "must start with a letter and use only lower-case letters"),
    ("no {question}", lambda t: t.replace("to {question}", "to it"), "prompt:",
     "roles.verifier.prompt: the prompt must contain {question}"),
    ("no {inputs} though inputs are required", lambda t: t.replace(": {inputs}", ""), "prompt:",
     "roles.verifier.prompt: a role with `inputs: required` shows its predecessors' outputs: put {inputs}"),
    ("{inputs} though it takes none",
     lambda t: t.replace("inputs: required", "inputs: none").replace("acts_like: fuser", "acts_like: assistant"),
     "prompt:", "drop {inputs} from the prompt"),
    ("an unknown placeholder", lambda t: t.replace("{inputs}", "{inputs} {answer}"), "prompt:",
     "unknown placeholder {answer}; allowed: {question}, {inputs}, {answer_format}"),
    ("an unclosed brace", lambda t: t.replace("{inputs}", "{inputs"), "prompt:", "bad template"),
    ("no acts_like", lambda t: t.replace("    acts_like: fuser\n", ""), "  verifier:",
     "roles.verifier.acts_like: required field is missing"),
    ("an unknown acts_like", lambda t: t.replace("acts_like: fuser", "acts_like: critic"), "acts_like:",
     "roles.verifier.acts_like: must be 'assistant' or 'fuser'"),
    ("an unknown inputs rule", lambda t: t.replace("inputs: required", "inputs: maybe"), "inputs:",
     "roles.verifier.inputs: must be 'required', 'optional' or 'none'"),
    ("a fuser that takes no inputs",
     lambda t: t.replace("inputs: required", "inputs: none").replace(": {inputs}", ""), "  verifier:",
     "roles.verifier: acts_like `fuser` selects among inputs"),
    ("space.roles names an undeclared role",
     lambda t: t.replace("space:\n", "space:\n  roles: [assistant, verifier, critic]\n"), "  roles: [",
     "space.roles: unknown roles ['critic']; known roles: ['assistant', 'fuser', 'verifier']"),
    ("space.roles leaves a declared role out",
     lambda t: t.replace("space:\n", "space:\n  roles: [assistant, fuser]\n"), "  roles: [",
     "space.roles: ['assistant', 'fuser'] leaves out the declared role(s) ['verifier']"),
    ("a role that may not be the sink listed as a sink role",
     lambda t: t.replace("sink: true", "sink: false").replace("space:\n", "space:\n  sink_roles: [verifier]\n"),
     "  sink_roles:", "space.sink_roles: ['verifier'] have `sink: false`"),
]


@pytest.mark.parametrize("case", BAD_ROLES, ids=[c[0] for c in BAD_ROLES])
def test_every_role_mistake_is_one_line_with_file_and_line(tmp_path, case):
    _, edit, blamed, message = case
    text = edit(SPEC)
    p = write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{p}:{_line_of(text, blamed)}: "), msg
    assert message in msg, msg


def test_the_verifier_example_runs(tmp_path):
    from graphtune.api import optimize

    spec = load_spec(Path(__file__).resolve().parents[1] / "examples" / "verifier.yaml",
                     overrides={"storage": f"sqlite:///{tmp_path / 'g.db'}", "search.evaluations": 4})
    assert "verifier" in spec.space_obj().roles
    _, _, outcome = optimize(spec)
    assert outcome.best is not None and not structural_errors(outcome.best.graph, spec.space_obj())


def test_a_spec_without_roles_is_unchanged(tmp_path):
    text = SPEC[:SPEC.index("roles:")] + SPEC[SPEC.index("space:"):]
    spec = load_spec(write(tmp_path, text))
    assert spec.space.roles == ("assistant", "fuser") and spec.space_obj().role_specs == ()
    assert spec.resolved()["roles"] is None  # a study stored before roles existed compares equal
    with pytest.raises(SpecError, match=r"spec.yaml:\d+: space.roles: unknown roles \['verifier'\]"):
        load_spec(write(tmp_path, text.replace("space:\n", "space:\n  roles: [assistant, verifier]\n")))


# -- the graph layer's rules --------------------------------------------------------------


def test_the_space_checks_each_roles_rules():
    space = verifier_space(role_specs=(RoleSpec("verifier", "required", False, "fuser"),
                                       RoleSpec("planner", "none", True, "assistant")),
                           roles=("assistant", "verifier", "planner"))
    a, v, p = (Node.make(i, r, "llama-3.2-1b") for i, r in (("a", "assistant"), ("v", "verifier"), ("p", "planner")))
    lonely = Graph.build([v, a], [("v", "a")])
    assert any("needs at least one input" in e for e in structural_errors(lonely, space))
    fed_planner = Graph.build([a, p], [("a", "p")])
    assert any("takes no inputs" in e for e in structural_errors(fed_planner, space))
    verifier_sink = Graph.build([a, v], [("a", "v")])
    assert any("may not be the sink" in e for e in structural_errors(verifier_sink, space))
    ok = Graph.build([p, v, Node.make("s", "assistant", "llama-3.2-1b")], [("p", "v"), ("v", "s")])
    assert structural_errors(ok, space) == []
    with pytest.raises(GraphError, match="built in"):
        Space(models=MODELS, role_specs=(RoleSpec("fuser"),))


def test_enumeration_and_random_graphs_only_make_valid_graphs_and_use_the_verifier():
    space, cm, budget = verifier_space(max_nodes=3), costs(), Budget(units=12)
    graphs = enumerate_graphs(space, cm, budget)
    assert graphs and all(not structural_errors(g, space) for g in graphs)
    with_verifier = [g for g in graphs if "verifier" in g.role_counts()]
    assert with_verifier and all(g.preds[n.id] for g in with_verifier for n in g.nodes if n.role == "verifier")
    rng = np.random.default_rng(0)
    drawn = [random_graph(space, cm, budget, rng) for _ in range(200)]
    assert all(not structural_errors(g, space) for g in drawn)
    assert sum("verifier" in g.role_counts() for g in drawn) > 20


def test_a_space_whose_sink_must_be_a_verifier_is_not_empty():
    space, cm = verifier_space(sink_roles=("verifier",)), costs()
    cheapest = check_space_not_empty(space, cm, Budget(units=12))
    assert cheapest.flops > 0  # the cheapest graph: one call feeding the verifier


# -- search through the api ---------------------------------------------------------------


def _study(tmp_path: Path, method: str, **space) -> dict:
    data = yaml.safe_load(SPEC)
    data["study"] = f"roles-{method}"
    data["storage"] = f"sqlite:///{tmp_path / 'g.db'}"
    data["search"]["method"] = method
    data["space"].update(space)
    return data


@pytest.mark.parametrize("method", ["random", "agent-reinforce", "tpe", "reinforce", "exhaustive", "llm-opt"])
def test_every_searcher_can_make_the_verifier_the_final_node(tmp_path, method):
    from graphtune.api import optimize
    from graphtune.store.storage import Storage

    data = _study(tmp_path, method, sink_roles=["verifier"], max_nodes=3)
    if method == "exhaustive":
        data["budget"]["units"] = 8
    spec = parse_spec(data)
    problem, study, outcome = optimize(spec)
    assert outcome.best is not None
    best = outcome.best.graph
    assert best.node_map[best.sink].role == "verifier" and best.preds[best.sink]
    trials = Storage(spec.storage).list_trials(study.id)
    assert trials and all(t.graph["nodes"] for t in trials)


@pytest.mark.parametrize("method", ["random", "agent-reinforce", "tpe"])
def test_searchers_propose_the_verifier_among_the_other_roles(tmp_path, method):
    from graphtune.api import optimize
    from graphtune.graphs.io import from_dict
    from graphtune.store.storage import Storage

    data = _study(tmp_path, method)
    data["search"]["evaluations"] = 10
    spec = parse_spec(data)
    problem, study, outcome = optimize(spec)
    graphs = [from_dict(t.graph) for t in Storage(spec.storage).list_trials(study.id)]
    space = spec.space_obj()
    assert all(not structural_errors(g, space) for g in graphs)
    assert any("verifier" in g.role_counts() for g in graphs), [str(g) for g in graphs]


def test_the_simulator_models_a_verifier_as_the_role_it_acts_like(tmp_path):
    from graphtune.api import build_problem

    env = build_problem(load_spec(write(tmp_path, SPEC))).env

    def vote(role: str) -> Graph:
        return Graph.build([Node.make("a", "assistant", "llama-3.2-3b"), Node.make("b", "assistant", "llama-3.2-3b"),
                            Node.make("v", role, "llama-3.1-8b")], [("a", "v"), ("b", "v")])

    ids = env.split("dev")
    as_verifier, as_fuser = env.evaluate(vote("verifier"), ids), env.evaluate(vote("fuser"), ids)
    assert [r.correct for r in as_verifier] == [r.correct for r in as_fuser]
    assert [r.flops for r in as_verifier] == [r.flops for r in as_fuser]  # its calls cost like any node's
    assert {n.node_id for n in as_verifier[0].nodes} == {"a", "b", "v"}


def test_replay_models_a_verifier_as_the_role_it_acts_like():
    from graphtune.envs.replay import Record, RecordTable, ReplayEnvironment
    from graphtune.errors import EnvError
    from graphtune.graphs.cost import ModelInfo

    recs = [Record(task="toy", question_id=f"q{q:02d}", model=m, sample=k, answer="42" if ok else str(q % 3),
                   correct=ok, p_correct=None, prompt_tokens=50, completion_tokens=20, text=None, question=None,
                   reference="42")
            for q in range(30) for m, acc in (("big", 8), ("small", 4)) for k in range(2)
            for ok in [(q * 7 + k * 3 + len(m)) % 10 < acc]]
    pool = {"big": ModelInfo("big", 8e9, 32, 4096, 0.2, 0.2), "small": ModelInfo("small", 1e9, 16, 2048, 0.02, 0.02)}
    env = ReplayEnvironment(RecordTable(tuple(recs), source="toy"), pool, dev_size=10,
                            roles=(RoleSpec("verifier", "required", True, "fuser"),))

    def vote(role: str) -> Graph:
        return Graph.build([Node.make("a", "assistant", "small"), Node.make("b", "assistant", "small"),
                            Node.make("v", role, "big")], [("a", "v"), ("b", "v")])

    ids = env.split("dev")
    as_verifier, as_fuser = env.evaluate(vote("verifier"), ids), env.evaluate(vote("fuser"), ids)
    assert [r.correct for r in as_verifier] == [r.correct for r in as_fuser]
    with pytest.raises(EnvError, match="verifier with no predecessor"):
        env.evaluate(Graph.build([Node.make("v", "verifier", "big")]), ids)


# -- agents' schemas and prompts -------------------------------------------------------------


def test_agents_are_offered_the_verifier_with_its_rules():
    from graphtune.agent.proposals import proposal_to_graph
    from graphtune.agent.schema import GraphProposal
    from graphtune.search.base import Objective, SearchContext
    from graphtune.search.llm_opt import LLMOptSearcher, reply_schema

    space = verifier_space()
    schema = reply_schema(space.models, space.roles)
    node = schema["properties"]["proposals"]["items"]["properties"]["nodes"]["items"]
    assert node["properties"]["role"]["enum"] == ["assistant", "fuser", "verifier"]
    ctx = SearchContext(space=space, costs=costs(), budget=Budget(units=18), objective=Objective(),
                        dev_ids=("q0",), seed=0, batch_size=2, budget_runs=10)
    prompt = LLMOptSearcher(ctx).prompt()
    assert "- verifier: " in prompt and "needs at least one input" in prompt
    alone = GraphProposal.model_validate({"nodes": [{"id": "v", "role": "verifier", "model": "llama-3.2-1b"}]})
    with pytest.raises(GraphError, match="verifier with no predecessor"):
        proposal_to_graph(alone, space)


# -- exports -------------------------------------------------------------------------------


def verified_graph() -> Graph:
    return Graph.build([Node.make("a", "assistant", "llama-3.2-1b"), Node.make("b", "assistant", "llama-3.2-3b"),
                        Node.make("v", "verifier", "llama-3.2-3b")], [("a", "v"), ("b", "v")])


def test_graph_files_keep_the_verifier_and_drawings_name_it(tmp_path):
    from graphtune.export import export_graph
    from graphtune.graphs.io import load
    from graphtune.graphs.render import to_text

    g = verified_graph()
    for fmt in ("yaml", "json"):
        back = load(export_graph(g, fmt, tmp_path / f"g.{fmt}"))
        assert back == g and graph_hash(back) == graph_hash(g)
    mermaid = export_graph(g, "mermaid", tmp_path / "g.mmd").read_text()
    assert "v: verifier" in mermaid
    assert "v:verifier:llama-3.2-3b" in to_text(g)
    png = export_graph(g, "png", tmp_path / "g.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


# -- live: the verifier's prompt comes from its template --------------------------------------

pytest.importorskip("litellm")
sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer() as srv:
        yield srv


def live_spec(tmp_path: Path, srv) -> Path:
    (tmp_path / "qs.jsonl").write_text("".join(json.dumps({"id": f"x{i}", "question": f"q ANSWER={i}",
                                                           "answer": str(i)}) + "\n" for i in range(2)))
    return write(tmp_path, f"""
study: live-roles
task: {{dataset: qs.jsonl, scorer: numeric, dev_size: 1, test_size: 1}}
models:
  - {{name: llama-3.2-1b, litellm: openai/echo, api_base: {srv.api_base}}}
  - {{name: llama-3.2-3b, litellm: openai/echo-3b, api_base: {srv.api_base}}}
roles:
  verifier:
    prompt: "{TEMPLATE}"
    inputs: required
    acts_like: fuser
budget: {{units: 30}}
env: {{kind: live, temperature: 0.0, max_tokens: 40, seed: 5}}
storage: sqlite:///{tmp_path / 'live.db'}
""", "live.yaml")


def _calls(spec) -> list[tuple[str, list[dict]]]:
    from graphtune.store.storage import Storage

    rows = Storage(spec.storage).engine.connect().exec_driver_sql("select endpoint, messages from gt_llm_calls").all()
    return [(e, json.loads(m) if isinstance(m, str) else m) for e, m in rows]


def test_live_env_prompts_the_verifier_with_its_template(tmp_path, server):
    from graphtune.api import run_graph
    from graphtune.envs.prompts import ANSWER_FORMATS

    spec = load_spec(live_spec(tmp_path, server))
    q = "What is 20 + 22? ANSWER=42"
    out = run_graph(spec, verified_graph(), question=q)
    assert "42" in out.results[0].answer
    users = [m[-1]["content"] for _, m in _calls(spec)]
    verifier = [u for u in users if u.startswith("Check this answer to")]
    assert len(verifier) == 1
    text = verifier[0]
    assert text.startswith(f"Check this answer to {q}: Response 1:\nThe answer is 42")
    assert "Response 2:\nThe answer is 42" in text
    assert ". Reply with the corrected final answer.\n\n" + ANSWER_FORMATS["math"] in text  # answer format appended


def test_run_refuses_a_verifier_without_inputs(tmp_path, server):
    from graphtune.api import run_graph

    spec = load_spec(live_spec(tmp_path, server))
    g = Graph.build([Node.make("v", "verifier", "llama-3.2-1b")])
    with pytest.raises(GraphError, match="'v' is a verifier without predecessors"):
        run_graph(spec, g, question="q ANSWER=1")


def test_exported_module_prompts_the_verifier_as_graphtune_does(tmp_path, server):
    pytest.importorskip("langgraph")
    import importlib.util

    from graphtune.api import run_graph
    from graphtune.export import to_langgraph_module

    spec = load_spec(live_spec(tmp_path, server))
    q = "What is 3 + 4? ANSWER=7"
    run_graph(spec, verified_graph(), question=q)
    ours = sorted(json.dumps(m) for _, m in _calls(spec))
    path = tmp_path / "verified.py"
    path.write_text(to_langgraph_module(verified_graph(), spec.resolved(), modname="verified"))
    mspec = importlib.util.spec_from_file_location("verified", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    seen = []

    async def recorder(**kw):
        import litellm

        seen.append(json.dumps(kw["messages"]))
        return await litellm.acompletion(**kw)

    outputs = mod.run_nodes(q, acompletion=recorder)
    assert sorted(seen) == ours and "7" in outputs["v"]


def test_graphtune_run_executes_an_exported_graph_file_with_a_verifier(tmp_path, server):
    from typer.testing import CliRunner

    from graphtune.cli import app
    from graphtune.export import export_graph

    spec = live_spec(tmp_path, server)
    graph = export_graph(verified_graph(), "yaml", tmp_path / "best.yaml", name="best")
    r = CliRunner().invoke(app, ["run", str(graph), "--spec", str(spec), "--question", "What? ANSWER=17", "--nodes"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "The answer is 17" in r.output and "verifier" in r.output and "3 made" in r.output
