"""The agent toolkit: ask_structured, the one structured-reply loop behind the LLM agent
and llm-opt (generic over the pydantic schema, the client injected)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field

from graphtune.agent.schema import REPLY_EXCERPT_CHARS, ReplyLimits
from graphtune.agent.toolkit import ask_structured, parse_structured
from graphtune.errors import LLMFatalError, LLMTransientError
from graphtune.llm import LLMReply


class Pick(BaseModel):
    model_config = ConfigDict(extra="forbid")
    choice: str = Field(max_length=10)
    score: float = 0.0


class Fake:
    def __init__(self, *replies):
        self.replies = list(replies)
        self.calls: list[dict] = []

    def __call__(self, model, messages, **kw):
        self.calls.append({"model": model, "messages": list(messages), **kw})
        r = self.replies.pop(0)
        if isinstance(r, Exception):
            raise r
        return LLMReply(text=r, prompt_tokens=10, completion_tokens=3, seconds=0.25, model=model)


MSGS = [{"role": "system", "content": "sys"}, {"role": "user", "content": "go"}]


def test_a_valid_reply_is_returned_with_its_usage():
    fake = Fake('{"choice": "a", "score": 1.5}')
    r = ask_structured(fake, "m", MSGS, Pick, temperature=0.1)
    assert r.value == Pick(choice="a", score=1.5) and r.error is None and r.transient is None
    assert (r.calls, r.prompt_tokens, r.completion_tokens) == (1, 10, 3)
    assert r.usd(1.0, 2.0) == pytest.approx((10 + 6) / 1e6)
    assert r.attempts[0].seconds == 0.25 and r.attempts[0].error is None
    call = fake.calls[0]
    assert call["messages"] == MSGS and call["temperature"] == 0.1
    assert call["json_schema"] == Pick.model_json_schema()


def test_an_unusable_reply_is_asked_again_with_the_reason_and_its_excerpt():
    long_junk = "x" * (10 * REPLY_EXCERPT_CHARS)
    fake = Fake(long_junk, '{"choice": "b"}')
    r = ask_structured(fake, "m", MSGS, Pick, parse_retries=1, describe_error=lambda e: "bad",
                       retry_prompt=lambda why: f"again: {why}")
    assert r.value == Pick(choice="b") and r.calls == 2
    assert r.attempts[0].error == "bad" and r.attempts[1].error is None
    resent = fake.calls[1]["messages"]
    assert resent[:2] == MSGS and resent[3] == {"role": "user", "content": "again: bad"}
    assert resent[2]["role"] == "assistant" and "truncated for storage" in resent[2]["content"]
    assert fake.calls[0]["messages"] == MSGS  # the first call's conversation is not mutated


@pytest.mark.parametrize("text", ["not json", '{"choice": "waytoolongchoice"}', '{"choice": "a", "score": NaN}',
                                  '[' * 100 + ']' * 100])
def test_every_unusable_reply_ends_as_a_reason_after_the_retries(text):
    fake = Fake(text, text, text)
    r = ask_structured(fake, "m", MSGS, Pick, parse_retries=2, limits=ReplyLimits(max_depth=8))
    assert r.value is None and r.calls == 3 and r.error and r.transient is None
    with pytest.raises(ValueError):
        parse_structured(text, Pick, ReplyLimits(max_depth=8))


def test_a_transient_failure_ends_the_loop_as_data_and_a_fatal_one_propagates():
    r = ask_structured(Fake("nope", LLMTransientError("503")), "m", MSGS, Pick, parse_retries=3)
    assert r.value is None and r.calls == 1 and isinstance(r.transient, LLMTransientError)
    assert r.error  # the earlier reply's reason is kept
    with pytest.raises(LLMFatalError):
        ask_structured(Fake(LLMFatalError("bad key")), "m", MSGS, Pick)


def test_the_toolkit_is_the_only_loop():
    # both LLM steps go through ask_structured (no second retry loop to drift apart)
    import inspect

    from graphtune.agent import llm_agent
    from graphtune.search import llm_opt
    for mod in (llm_agent, llm_opt):
        src = inspect.getsource(mod)
        assert "ask_structured(" in src and "self._complete(" not in src
