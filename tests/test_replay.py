"""The replay environment: the recorded GSM8K fixture, recorded vs modelled outcomes,
determinism, distinct samples, the generic table format and the ledger importer."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from graphtune.api import records_from_ledger as app_records_from_ledger
from graphtune.envs.base import summarize
from graphtune.envs.datasets import Example, split_examples
from graphtune.envs.prompts import build_prompts
from graphtune.envs.replay import (GSM8K_SYSTEMS, OPTIONAL_COLUMNS, REQUIRED_COLUMNS, Record, RecordTable,
                                   ReplayEnvironment, import_gsm8k_recorded, load_records, main, normalize_answer,
                                   records_from_ledger, save_records)
from graphtune.envs.scorers import get_scorer
from graphtune.errors import EnvError
from graphtune.graphs.cost import CostModel, ModelInfo, TaskShape, node_flops
from graphtune.graphs.model import Graph, Node
from graphtune.store.ledger import CallRecord, MemoryLedger, SQLLedger, call_key
from graphtune.store.storage import Storage

from datafiles import DATA

#: the full recorded GSM8K answers have 1,319 questions; the in-repo subset (examples/data)
#: its first 100. Counts below that the full data pins are scaled by n / FULL_N on the subset.
FULL_N = 1319

MIX, GPT4 = "mixtral-8x7b-instruct", "gpt-4-1106-preview"
G6F, G6V, G175F, G175V = "gpt3-6b-finetuning", "gpt3-6b-verification", "gpt3-175b-finetuning", "gpt3-175b-verification"

#: Plausible constants of the six systems (the same as docs/replay.md). Mixtral: active
#: parameters; GPT-4: a guess; "verification" systems sample 100 solutions and rank them
#: with a verifier, so their per-call compute and price are ~100x the generator's.
SIX = {
    MIX: ModelInfo(MIX, 12.9e9, 32, 4096, 0.6, 0.6, prefill_tok_s=5000, decode_tok_s=60),
    GPT4: ModelInfo(GPT4, 220e9, 120, 12288, 10.0, 30.0, prefill_tok_s=2000, decode_tok_s=30),
    G6F: ModelInfo(G6F, 6.7e9, 32, 4096, 1.2, 1.2, prefill_tok_s=8000, decode_tok_s=100),
    G6V: ModelInfo(G6V, 6.7e11, 32, 4096, 120.0, 120.0, prefill_tok_s=8000, decode_tok_s=100),
    G175F: ModelInfo(G175F, 175e9, 96, 12288, 20.0, 20.0, prefill_tok_s=2000, decode_tok_s=30),
    G175V: ModelInfo(G175V, 175e11, 96, 12288, 2000.0, 2000.0, prefill_tok_s=2000, decode_tok_s=30),
}


def single(model: str, nid: str = "a") -> Graph:
    return Graph.build([Node.make(nid, "assistant", model)])


def fan_in(models: list[str], fuser: str, prefix: str = "a") -> Graph:
    nodes = [Node.make(f"{prefix}{i}", "assistant", m) for i, m in enumerate(models)] + [Node.make("f", "fuser", fuser)]
    return Graph.build(nodes, [(f"{prefix}{i}", "f") for i in range(len(models))])


def raw_rates(recorded: Path) -> dict[str, float]:
    """The recorded correctness rates, read straight from the two files."""
    gpt3 = [json.loads(line) for line in (recorded / "gsm8k_gpt3_solutions.jsonl").open(encoding="utf-8")]
    with (recorded / "gsm8k_routellm_responses.csv").open(newline="", encoding="utf-8") as fh:
        routellm = list(csv.DictReader(fh))
    rates = {}
    for model, (fname, col) in GSM8K_SYSTEMS.items():
        if fname.endswith(".jsonl"):
            rates[model] = sum(bool(r[col]["is_correct"]) for r in gpt3) / len(gpt3)
        else:
            rates[model] = sum(r[col] == "True" for r in routellm) / len(routellm)
    return rates


@pytest.fixture(scope="module", params=list(DATA))
def recorded(request) -> Path:
    """The recorded GSM8K answers: the in-repo subset, and the full data where it is found."""
    return DATA[request.param] / "recorded"


@pytest.fixture(scope="module")
def gsm8k(recorded) -> RecordTable:
    return import_gsm8k_recorded(recorded)


@pytest.fixture(scope="module")
def env(gsm8k) -> ReplayEnvironment:
    return ReplayEnvironment(gsm8k, CostModel(SIX, TaskShape(60, 80)), seed=0,
                             dev_size=min(100, len(gsm8k.questions()) // 2))


# -- the fixture ------------------------------------------------------------------------------


def test_fixture_imports_six_systems_with_their_recorded_accuracy(gsm8k, recorded):
    n = len(gsm8k.questions())
    assert n == (100 if recorded.parent == DATA["subset"] else FULL_N)
    assert set(gsm8k.questions()) == {f"gsm8k/{i}" for i in range(n)}  # the subset: the first rows, same ids
    assert gsm8k.models == tuple(sorted(SIX))
    assert len(gsm8k) == 6 * n
    rates = raw_rates(recorded)
    for m in sorted(SIX):
        print(f"{m:<26} recorded {rates[m]:.2%}  imported {gsm8k.accuracy(m):.2%}")
        assert gsm8k.accuracy(m) == rates[m]
    r = next(r for r in gsm8k.records if r.question_id == "gsm8k/0" and r.model == MIX)
    assert (r.answer, r.correct, r.reference, r.sample) == ("18", True, "18", 0)
    assert r.question.startswith("Janet")
    # answers are normalised numbers, so wrong answers of different systems collide
    wrong = {}
    for r in gsm8k.records:
        if not r.correct:
            wrong.setdefault(r.question_id, []).append(r.answer)
    # (329 questions of 1,319 have such a collision, 28 of the subset's 100)
    assert sum(len(v) != len(set(v)) for v in wrong.values()) > 50 * n / FULL_N


def test_single_model_graph_replays_the_record_exactly_and_is_not_modelled(env, gsm8k):
    qs = list(gsm8k.questions())
    by_key = {(r.question_id, r.model): r for r in gsm8k.records}
    for m in SIX:
        res = env.evaluate(single(m), qs)
        assert summarize(res).accuracy == gsm8k.accuracy(m)  # exactly
        assert not any(r.modelled for r in res)
        assert all(r.answer == by_key[(r.question_id, m)].answer for r in res)
    # cost: tokens estimated from text (chars / 4), FLOPs by the pool's formula
    r0 = env.evaluate(single(MIX), ["gsm8k/0"])[0]
    rec = by_key[("gsm8k/0", MIX)]
    assert r0.prompt_tokens == -(-len(rec.question) // 4) and r0.completion_tokens == -(-len(rec.text) // 4)
    assert r0.flops == pytest.approx(node_flops(SIX[MIX], r0.prompt_tokens, r0.completion_tokens))


def test_graphs_with_a_fuser_are_modelled_on_recorded_inputs(env, gsm8k):
    qs = list(gsm8k.questions())
    by_key = {(r.question_id, r.model): r for r in gsm8k.records}
    g = fan_in([MIX, GPT4, G175V], GPT4)
    res = env.evaluate(g, qs)
    assert all(r.modelled for r in res)
    # the sources are the recorded answers (one sample each model, so none is modelled)
    for r in res[:50]:
        for n in r.nodes:
            if n.node_id != "f":
                model = g.node_map[n.node_id].model
                rec = by_key[(r.question_id, model)]
                assert (n.answer, n.correct) == (rec.answer, rec.correct)
    acc = summarize(res).accuracy
    print(f"3 systems into a GPT-4 fuser: {acc:.1%} (GPT-4 alone {gsm8k.accuracy(GPT4):.1%})")
    assert 0.8 < acc < 1.0
    # a fuser that sees only wrong inputs is rarely right; all right inputs keep it right mostly
    assert sum(r.correct for r in res if all(not n.correct for n in r.nodes[:-1])) < 0.6 * sum(
        1 for r in res if all(not n.correct for n in r.nodes[:-1]))


def test_deterministic_whatever_the_order_naming_or_instance(env, gsm8k):
    qs = list(gsm8k.questions())[:300]
    g = fan_in([MIX, MIX, G175F], G175V)
    renamed = fan_in([G175F, MIX, MIX], G175V, prefix="z")  # same graph, other names and order

    def key(res):
        return [(r.question_id, r.answer, r.correct, r.prompt_tokens, r.completion_tokens, r.flops) for r in res]

    a = key(env.evaluate(g, qs))
    b = key(env.evaluate(renamed, list(reversed(qs))))[::-1]
    dev = len(env.split("dev"))
    fresh = ReplayEnvironment(gsm8k, CostModel(SIX, TaskShape(60, 80)), seed=0, dev_size=dev)
    c = key(fresh.evaluate(g, qs))
    assert a == b == c
    other = ReplayEnvironment(gsm8k, CostModel(SIX, TaskShape(60, 80)), seed=1, dev_size=dev)
    assert key(other.evaluate(g, qs)) != a  # the seed drives the modelled parts


def test_distinct_same_model_nodes_are_distinct_samples(env, gsm8k):
    qs = list(gsm8k.questions())
    by_key = {(r.question_id, r.model): r for r in gsm8k.records}
    res = env.evaluate(fan_in([MIX, MIX, MIX], GPT4), qs)
    differ = 0
    extra_right = []
    for r in res:
        src = [n for n in r.nodes if n.node_id != "f"]
        rec = by_key[(r.question_id, MIX)]
        # exactly one node replays the single recorded sample... (twins: either may be rank 0)
        assert any((n.answer, n.correct) == (rec.answer, rec.correct) for n in src)
        differ += len({(n.answer, n.correct) for n in src}) > 1
        extra_right += [n.correct for n in src[1:]]
    assert differ > 100 * len(qs) / FULL_N  # ...and the extra samples are not copies of it
    # the modelled extra samples keep the model's recorded accuracy: within 0.03 (over 1,319
    # questions, 3.2 standard errors), or 3 standard errors of the sample mean where that is
    # wider (the subset: 200 samples, one standard error 0.035)
    rate, p = sum(extra_right) / len(extra_right), gsm8k.accuracy(MIX)
    print(f"Mixtral: recorded {p:.1%}, modelled extra samples {rate:.1%}")
    assert abs(rate - p) < max(0.03, 3 * (p * (1 - p) / len(extra_right)) ** 0.5)


def small_table(samples: int = 3, with_tokens: bool = True) -> RecordTable:
    recs = []
    for q in range(40):
        for m, acc in (("big", 0.8), ("small", 0.4)):
            for k in range(samples):
                ok = (q * 7 + k * 3 + len(m)) % 10 < acc * 10
                recs.append(Record(task="toy", question_id=f"q{q:02d}", model=m, sample=k,
                                   answer="42" if ok else f"{(q + k) % 3}", correct=ok,
                                   p_correct=None, prompt_tokens=50 if with_tokens else None,
                                   completion_tokens=(20 + k) if with_tokens else None,
                                   text=None if with_tokens else "x" * (80 + k), question=None, reference="42"))
    return RecordTable(tuple(recs), source="toy")


TOY_POOL = {"big": ModelInfo("big", 8e9, 32, 4096, 0.2, 0.2), "small": ModelInfo("small", 1e9, 16, 2048, 0.02, 0.02)}


def test_recorded_samples_are_used_before_any_is_modelled():
    table = small_table(samples=3)
    env = ReplayEnvironment(table, CostModel(TOY_POOL, TaskShape(50, 20)), dev_size=10)
    qs = list(table.questions())
    recs = {(r.question_id, r.model, r.sample): r for r in table.records}
    three = env.evaluate(fan_in(["small"] * 3, "big"), qs)
    for r in three:
        got = sorted(n.completion_tokens for n in r.nodes if n.node_id != "f")
        assert got == [20, 21, 22]  # samples 0, 1, 2: each once
        answers = sorted((n.answer, n.correct) for n in r.nodes if n.node_id != "f")
        assert answers == sorted((recs[(r.question_id, "small", k)].answer, recs[(r.question_id, "small", k)].correct)
                                 for k in range(3))
    # a fourth node needs a sample nobody recorded: modelled (tokens: the model's mean)
    four = env.evaluate(fan_in(["small"] * 4, "big"), qs)
    assert all(sorted(n.completion_tokens for n in r.nodes if n.node_id != "f") == [20, 21, 21, 22] for r in four)
    # a single node of a recorded model is not modelled
    assert not any(r.modelled for r in env.evaluate(single("small"), qs))
    assert summarize(env.evaluate(single("big"), qs)).accuracy == pytest.approx(
        sum(recs[(q, "big", 0)].correct for q in qs) / len(qs))


def test_p_correct_column_drives_modelled_samples():
    recs = [Record("t", f"q{i}", "m", 0, "1", False, p_correct=0.9 if i % 2 else 0.0, completion_tokens=5,
                   prompt_tokens=5) for i in range(400)]
    env = ReplayEnvironment(RecordTable(tuple(recs)), CostModel({"m": TOY_POOL["big"]}, TaskShape(5, 5)), dev_size=10)
    res = env.evaluate(fan_in(["m", "m"], "m"), [r.question_id for r in recs])
    second = [[n for n in r.nodes if n.node_id != "f"] for r in res]
    odd = [any(n.correct for n in s) for i, s in enumerate(second) if i % 2]
    even = [any(n.correct for n in s) for i, s in enumerate(second) if not i % 2]
    assert not any(even) and 0.8 < sum(odd) / len(odd) < 0.97


def test_splits_are_seeded_disjoint_and_match_the_live_split():
    table = small_table()
    env = ReplayEnvironment(table, CostModel(TOY_POOL, TaskShape(50, 20)), seed=3, dev_size=10, test_size=20)
    dev, test = env.split("dev"), env.split("test")
    assert len(dev) == 10 and len(test) == 20 and not set(dev) & set(test)
    exs = [Example(id=q, question="", answer="") for q in table.questions()]
    live_dev, live_test = split_examples(exs, dev_size=10, test_size=20, seed=3)
    assert dev == [e.id for e in live_dev] and test == [e.id for e in live_test]
    assert ReplayEnvironment(table, CostModel(TOY_POOL, TaskShape(50, 20)), seed=4, dev_size=10).split("dev") != dev
    with pytest.raises(EnvError, match="dev_size"):
        ReplayEnvironment(table, CostModel(TOY_POOL, TaskShape(50, 20)), dev_size=30, test_size=20)


def test_clear_errors_for_models_questions_and_roles():
    table = small_table()
    with pytest.raises(EnvError, match="model 'other' of the pool has no records"):
        ReplayEnvironment(table, CostModel({**TOY_POOL, "other": TOY_POOL["big"]}, TaskShape(5, 5)), dev_size=5)
    env = ReplayEnvironment(table, CostModel(TOY_POOL, TaskShape(5, 5)), dev_size=5)
    with pytest.raises(EnvError, match="unknown question id 'nope'"):
        env.evaluate(single("big"), ["nope"])
    with pytest.raises(EnvError, match="role 'critic'"):
        env.evaluate(Graph.build([Node.make("a", "critic", "big")]), ["q00"])


def test_a_pool_alone_gives_a_cost_model_over_the_recorded_shape():
    env = ReplayEnvironment(small_table(), TOY_POOL, dev_size=5)
    assert env.costs.shape == env.shape == TaskShape(50.0, 21.0)
    assert env.evaluate(single("big"), ["q00"])[0].usd == pytest.approx((50 + 20) * 0.2 / 1e6)


def test_tokens_are_estimated_from_text_when_not_recorded():
    table = small_table(samples=1, with_tokens=False)
    env = ReplayEnvironment(table, CostModel(TOY_POOL, TaskShape(5, 5)), dev_size=5)
    r = env.evaluate(single("big"), ["q00"])[0]
    assert r.completion_tokens == 20  # 80 chars / 4
    assert env.shape.output_tokens == 20


# -- the table format -----------------------------------------------------------------------


def rich_table() -> RecordTable:
    return RecordTable((
        Record("gsm8k", "gsm8k/0", "m1", 0, "18", True, 0.75, 120, 80, 0.0012, 1.5, 'text, with "quotes"\nand lines',
               "Janet's ducks, €", "18"),
        Record("gsm8k", "gsm8k/0", "m1", 1, "", False),
        Record("gsm8k", "gsm8k/1", "m2", 0, "3/2", False, None, None, 7, None, None, None, None, None),
    ), source="rich")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_generic_schema_round_trip(tmp_path, suffix):
    t = rich_table()
    back = load_records(save_records(t, tmp_path / f"r{suffix}"))
    assert back.records == t.records
    assert back.source == str(tmp_path / f"r{suffix}")


def test_cli_writes_the_fixture_as_a_table(tmp_path, gsm8k, recorded, capsys):
    out = tmp_path / "records.csv"
    assert main(["import-gsm8k", str(recorded), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{6 * len(gsm8k.questions())} records" in text and GPT4 in text
    back = load_records(out)
    assert back.records == gsm8k.records
    assert main(["summary", str(out)]) == 0
    assert main(["summary", str(tmp_path / "missing.csv")]) == 1 and "file not found" in capsys.readouterr().err


HEADER = ",".join(REQUIRED_COLUMNS)


@pytest.mark.parametrize("content, where, what", [
    ("task,question_id,model,sample,answer\nt,q,m,0,1\n", ":1:", "missing column `correct`"),
    (HEADER + ",p_corect\nt,q,m,0,1,true,0.5\n", ":1:", "unknown column `p_corect`; did you mean `p_correct`"),
    (HEADER + "\nt,q,m,0,1,true\nt,q,m,zero,1,true\n", ":3:", "column `sample`: 'zero' is not a whole number"),
    (HEADER + "\nt,q,m,0,1,maybe\n", ":2:", "column `correct`: 'maybe' is not a boolean"),
    (HEADER + ",p_correct\nt,q,m,0,1,true,1.5\n", ":2:", "column `p_correct`: '1.5' is out of range"),
    (HEADER + "\nt,,m,0,1,true\n", ":2:", "column `question_id`: is empty"),
    (HEADER + "\nt,q,m,0,1,true\nt,q,m,0,2,false\n", ":3:", "duplicate record"),
    (HEADER + "\nt,q,m,0,1\n", ":2:", "column `correct`: the row has fewer cells"),
    (HEADER + ",prompt_tokens\nt,q,m,0,1,true,-3\n", ":2:", "column `prompt_tokens`: -3 is negative"),
])
def test_bad_csv_tables_give_one_line_errors(tmp_path, content, where, what):
    f = tmp_path / "bad.csv"
    f.write_text(content)
    with pytest.raises(EnvError) as ei:
        load_records(f)
    msg = str(ei.value)
    print(msg)
    assert "\n" not in msg and f"{f}{where}" in msg and what in msg


@pytest.mark.parametrize("lines, where, what", [
    (['{"task": "t", "question_id": "q", "model": "m", "sample": 0, "answer": "1", "correct": true}', "{oops"],
     ":2:", "not valid JSON"),
    (['{"task": "t", "question_id": "q", "model": "m", "sample": 0, "answer": "1"}'], ":1:",
     "missing column `correct`"),
    (['{"task": "t", "question_id": "q", "model": "m", "sample": 1.5, "answer": "1", "correct": true}'], ":1:",
     "column `sample`"),
    (['[1, 2]'], ":1:", "expected a JSON object"),
])
def test_bad_jsonl_tables_give_one_line_errors(tmp_path, lines, where, what):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(EnvError) as ei:
        load_records(f)
    assert "\n" not in str(ei.value) and f"{f}{where}" in str(ei.value) and what in str(ei.value)


def test_unsupported_or_missing_files(tmp_path):
    with pytest.raises(EnvError, match="file not found"):
        load_records(tmp_path / "x.csv")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(EnvError, match="use .csv or .jsonl"):
        load_records(tmp_path / "x.parquet")
    with pytest.raises(EnvError, match="several tasks"):
        ReplayEnvironment(RecordTable((Record("a", "q", "m", 0, "1", True), Record("b", "q", "m", 0, "1", True))),
                          CostModel({"m": TOY_POOL["big"]}, TaskShape(5, 5)), dev_size=1)


def test_normalize_answer():
    assert normalize_answer("1,000.00") == "1000" == normalize_answer("$1000")
    assert normalize_answer("0.50") == "0.5" and normalize_answer("6/4") == "1.5" and normalize_answer("2/6") == "1/3"
    assert normalize_answer("-3") == "-3"
    assert normalize_answer("  The  Answer ") == "the answer" and normalize_answer(None) == ""


# -- the ledger -----------------------------------------------------------------------------


def ledger_calls() -> tuple[list[Example], list[CallRecord]]:
    exs = [Example(id=f"gsm8k/{i}", question=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(4)]
    prompts = build_prompts(scorer="numeric")
    calls = []
    for e in exs:
        i = int(e.id.split("/")[1])
        msgs = prompts.messages("assistant", e.question)
        for k, reply in enumerate([f"The answer is {2 * i}", f"The answer is {2 * i + 1}"]):
            params = {"temperature": 0.7, "max_tokens": 64, "seed": k}
            calls.append(CallRecord(key=call_key("openai/m", msgs, params, k), model="m", endpoint="openai/m",
                                    messages=msgs, params=params, sample_index=k, reply=reply, prompt_tokens=30,
                                    completion_tokens=6, latency_s=0.4, usd=2e-6))
        synth = prompts.messages("assistant", e.question, ["The answer is 1", "The answer is 2"])
        calls.append(CallRecord(key="s" + e.id, model="m", endpoint="openai/m", messages=synth,
                                reply="The answer is 3"))
    calls.append(CallRecord(key="bad", model="m", endpoint="openai/m", messages=[], error="503"))
    calls.append(calls[0])  # the same call recorded twice
    return exs, calls


def check_ledger_table(t: RecordTable) -> None:
    assert len(t) == 8 and t.models == ("m",) and t.tasks == ("gsm8k",)
    assert "8 from-scratch calls; skipped 4 other calls" in t.source and "1 failed" in t.source
    r0 = next(r for r in t.records if r.question_id == "gsm8k/1" and r.sample == 0)
    r1 = next(r for r in t.records if r.question_id == "gsm8k/1" and r.sample == 1)
    assert (r0.answer, r0.correct, r1.answer, r1.correct) == ("2", True, "3", False)
    assert (r0.prompt_tokens, r0.completion_tokens, r0.cost_usd, r0.latency_s) == (30, 6, 2e-6, 0.4)


def test_records_from_ledger_memory_and_sql(tmp_path):
    exs, calls = ledger_calls()
    scorer = get_scorer("numeric")
    mem = MemoryLedger()
    for c in calls:
        mem.put(c)
    check_ledger_table(records_from_ledger(mem, exs, scorer, task="gsm8k"))
    url = f"sqlite:///{tmp_path / 'live.db'}"
    sql = SQLLedger(Storage(url))
    for c in calls:
        sql.put(c)
    sql.close()
    with pytest.raises(EnvError, match="needs open_ledger"):  # envs do not import the store: the app opens it
        records_from_ledger(url, exs, scorer, task="gsm8k")
    t = app_records_from_ledger(url, exs, scorer, task="gsm8k")
    check_ledger_table(t)
    # ... and the table replays: two samples recorded, so two nodes of m are both recorded
    env = ReplayEnvironment(t, CostModel({"m": TOY_POOL["big"]}, TaskShape(30, 6)), dev_size=2)
    res = env.evaluate(fan_in(["m", "m"], "m"), [e.id for e in exs])
    assert all(sorted(n.correct for n in r.nodes[:2]) == [False, True] for r in res)
    with pytest.raises(EnvError, match="no store at"):
        app_records_from_ledger(f"sqlite:///{tmp_path / 'none.db'}", exs, scorer)
    with pytest.raises(EnvError, match="in-memory store"):
        app_records_from_ledger("sqlite:///:memory:", exs, scorer)
    check_ledger_table(app_records_from_ledger(mem, exs, scorer, task="gsm8k"))  # a ledger object as well


def test_schema_columns_are_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "replay.md").read_text()
    for col in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
        assert f"`{col}`" in doc


# -- someone else's records: correctness only ------------------------------------------------

SEVEN = [f"m{i}" for i in range(7)]
SEVEN_POOL = {m: ModelInfo(m, (i + 1) * 2e9, 32, 4096, 0.1 * (i + 1), 0.1 * (i + 1)) for i, m in enumerate(SEVEN)}


def foreign_table(n: int = 60, missing: tuple[str, ...] = ()) -> RecordTable:
    """Seven models, correctness flags only (``answer`` empty), no token counts, no texts:
    what another group's evaluation table often holds. ``missing``: (model) rows left out
    on every fifth question."""
    recs = []
    for q in range(n):
        for i, m in enumerate(SEVEN):
            if m in missing and q % 5 == 0:
                continue
            right = (q * 7 + i * 3) % 10 < 3 + i
            recs.append(Record(task="t", question_id=f"q{q:03d}", model=m, sample=0, answer="", correct=right))
    return RecordTable(tuple(recs), source="foreign.csv")


def test_records_without_answers_must_be_declared_unknown():
    with pytest.raises(EnvError, match=r"foreign.csv: no record has an `answer`.*env.answers: unknown"):
        ReplayEnvironment(foreign_table(), SEVEN_POOL, dev_size=30, output_tokens=50)


def test_unknown_answers_replay_single_nodes_and_model_which_wrong_answers_agree():
    from collections import Counter

    table = foreign_table()
    env = ReplayEnvironment(table, SEVEN_POOL, dev_size=30, answers="unknown", output_tokens=50, input_tokens=50)
    qs = env.split("dev") + env.split("test")
    for m in SEVEN:  # correctness is recorded: a single node is replayed exactly
        res = env.evaluate(single(m), qs)
        assert summarize(res).accuracy == table.accuracy(m) and not any(r.modelled for r in res)
    # the wrong answers of a question are not one shared answer: they agree about as often
    # as wrong_agreement says (pairs of wrong answers to one question)
    labels: dict[str, list[str]] = {}
    for r in env.table.records:
        if not r.correct:
            labels.setdefault(r.question_id, []).append(r.answer)
    pairs = [(a == b) for v in labels.values() for i, a in enumerate(v) for b in v[i + 1:]]
    assert 0.02 < sum(pairs) / len(pairs) < 0.25
    assert all(a.startswith("<unrecorded wrong answer") for v in labels.values() for a in v)
    # a vote of seven is modelled (flagged) and beats the plurality a shared wrong answer would make
    res = env.evaluate(fan_in(SEVEN, "m6"), qs)
    assert all(r.modelled for r in res)
    assert summarize(res).accuracy > max(table.accuracy(m) for m in SEVEN) - 0.05
    assert Counter(r.answer for r in res if not r.correct).most_common(1)[0][1] < len(qs)
    with pytest.raises(EnvError, match="wrong_agreement"):
        ReplayEnvironment(table, SEVEN_POOL, dev_size=30, answers="unknown", wrong_agreement=1.0)


def test_no_answer_casts_no_vote():
    """Three inputs that gave no answer (empty ``answer``) and one right one: the right one is
    the only candidate besides the fuser's own attempt, where a shared wrong answer "7" given
    by the three would outvote it."""
    def table(blank: str) -> RecordTable:
        recs = []
        for q in range(200):
            recs.append(Record(task="t", question_id=f"q{q}", model="good", sample=0, answer="1", correct=True,
                               completion_tokens=20, prompt_tokens=20))
            for s in range(3):
                recs.append(Record(task="t", question_id=f"q{q}", model="bad", sample=s, answer=blank, correct=False,
                                   completion_tokens=20, prompt_tokens=20))
        return RecordTable(tuple(recs))

    pool = {m: ModelInfo(m, 8e9, 32, 4096, 0.1, 0.1) for m in ("good", "bad")}
    g = fan_in(["good", "bad", "bad", "bad"], "bad")
    acc = {}
    for blank in ("", "7"):
        env = ReplayEnvironment(table(blank), pool, dev_size=100)
        acc[blank] = summarize(env.evaluate(g, env.split("dev") + env.split("test"))).accuracy
    assert acc[""] > acc["7"] + 0.3, acc


def test_missing_token_counts_are_warned_once_and_output_tokens_sets_them():
    from graphtune.envs.replay import ReplayWarning

    with pytest.warns(ReplayWarning) as got:
        env = ReplayEnvironment(foreign_table(), SEVEN_POOL, dev_size=30, answers="unknown")
    lines = [str(w.message) for w in got]
    comp = [m for m in lines if "completion" in m]
    assert len(comp) == 1 and "foreign.csv" in comp[0] and "256 tokens (the default)" in comp[0]
    assert "task.output_tokens" in comp[0] and all("\n" not in m for m in lines)
    assert env.shape.output_tokens == 256
    fused = env.evaluate(fan_in(SEVEN[:3], "m6"), ["q001"])[0]
    assert fused.nodes[-1].completion_tokens == 256  # the default set the fuser's cost

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReplayWarning)
        env = ReplayEnvironment(foreign_table(), SEVEN_POOL, dev_size=30, answers="unknown", output_tokens=40,
                                input_tokens=70)
    assert (env.shape.input_tokens, env.shape.output_tokens) == (70, 40)
    fused = env.evaluate(fan_in(SEVEN[:3], "m6"), ["q001"])[0]
    assert fused.completion_tokens == 4 * 40 and fused.nodes[0].prompt_tokens == 70


def test_recorded_only_refuses_modelled_outcomes():
    env = ReplayEnvironment(foreign_table(missing=("m3",)), SEVEN_POOL, dev_size=30, answers="unknown",
                            output_tokens=50, input_tokens=50, recorded_only=True)
    qs = env.split("dev") + env.split("test")
    assert not any(r.modelled for r in env.evaluate(single("m0"), qs))
    with pytest.raises(EnvError, match="has inputs, so its outcome would be modelled, and recorded_only"):
        env.evaluate(fan_in(["m0", "m1"], "m2"), qs[:1])
    assert len(env.unrecorded_questions("m3")) == 12 and not env.unrecorded_questions("m0")
    with pytest.raises(EnvError, match="no recorded sample 0 on question 'q000'"):
        env.evaluate(single("m3"), ["q000"])
