"""The call ledger: keys, the shared contract of both backends, batching off the caller."""

from __future__ import annotations

import threading
import time

import pytest

from graphtune.store.ledger import CallRecord, MemoryLedger, SQLLedger, call_key, open_ledger
from graphtune.store.storage import Storage

MSGS = [{"role": "user", "content": "What is 2+2?"}]
P = {"temperature": 0.0, "max_tokens": 32, "seed": 0}


def rec(key: str, reply: str | None = "4", error: str | None = None, **kw) -> CallRecord:
    return CallRecord(key=key, model="m", endpoint="openai/m", messages=MSGS, params=P, reply=reply,
                      prompt_tokens=10, completion_tokens=2, latency_s=0.5, usd=1e-6, flops=1e9, error=error, **kw)


def test_key_separates_everything_that_decides_a_reply():
    k = call_key("openai/m", MSGS, P, 0)
    assert k == call_key("openai/m", [dict(MSGS[0])], dict(reversed(list(P.items()))), 0)  # stable
    assert k != call_key("openai/m", MSGS, P, 1)  # another sample is another call
    assert k != call_key("openai/m2", MSGS, P, 0)
    assert k != call_key("openai/m", [{"role": "user", "content": "What is 2+3?"}], P, 0)
    assert k != call_key("openai/m", MSGS, {**P, "temperature": 0.7}, 0)


@pytest.fixture(params=["memory", "sql"])
def ledger(request, tmp_path):
    led = MemoryLedger() if request.param == "memory" else SQLLedger(Storage(f"sqlite:///{tmp_path / 'l.db'}"))
    yield led
    led.close()


def test_contract_put_is_visible_at_once_and_failures_are_never_served(ledger):
    assert not ledger.may_have("a") and ledger.get("a") is None
    ledger.put(rec("a"))
    assert ledger.may_have("a") and ledger.get("a").reply == "4"  # before any flush
    ledger.put(rec("b", reply=None, error="503 after 3 attempts"))
    assert ledger.get("b") is None and not ledger.may_have("b")
    ledger.flush()
    assert ledger.get("a").prompt_tokens == 10
    assert ledger.count() == 2 and ledger.count(ok=True) == 1 and ledger.count(ok=False) == 1
    assert [r.key for r in ledger.records()] == ["a", "b"]
    assert ledger.records()[1].error.startswith("503")


def test_sql_ledger_survives_a_new_process_and_stores_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-very-secret")
    url = f"sqlite:///{tmp_path / 'l.db'}"
    led = SQLLedger(Storage(url))
    led.put(rec("a", study="s1"))
    led.close()
    led2 = open_ledger(url)
    assert isinstance(led2, SQLLedger) and led2.get("a").reply == "4" and led2.get("a").study == "s1"
    led2.close()
    raw = (tmp_path / "l.db").read_bytes()
    assert b"sk-very-secret" not in raw


def test_in_memory_store_gets_a_memory_ledger():
    assert isinstance(open_ledger("sqlite:///:memory:"), MemoryLedger)


def test_writes_are_batched_off_the_calling_thread(tmp_path):
    led = SQLLedger(Storage(f"sqlite:///{tmp_path / 'l.db'}"))
    slow = threading.Event()
    real_write = led._write

    def slow_write(records):  # a slow disk: 0.2 s per transaction
        slow.set()
        time.sleep(0.2)
        real_write(records)

    led._write = slow_write
    t0 = time.perf_counter()
    for i in range(2000):
        led.put(rec(f"k{i}"))
    put_s = time.perf_counter() - t0
    assert put_s < 0.5, put_s  # put never waits for the database
    led.flush()
    assert led.count() == 2000
    assert led.stats.batches <= 10  # drained in a few transactions, not one per call
    led.close()


def test_writer_errors_surface_on_flush(tmp_path):
    from graphtune.errors import StoreError

    led = SQLLedger(Storage(f"sqlite:///{tmp_path / 'l.db'}"))
    led.put(rec("a"))
    led.flush()
    with led.storage.engine.begin() as c:
        c.exec_driver_sql("DROP TABLE gt_llm_calls")
    led.put(rec("b"))
    with pytest.raises(StoreError):
        led.flush()
    led.close()
