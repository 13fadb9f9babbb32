"""The LLM call as a plain value: its record and the key that identifies it.

A call is identified by :func:`call_key`, a digest of the endpoint, the messages, the
sampling parameters and the **sample index** (the how-manieth identical request this is
within one graph run), so two nodes of one model with the same prompt in one graph stay
two samples, while a repeated or resumed search finds every call it already paid for.

The live environment makes :class:`CallRecord` values and the store's call ledger keeps
them (:mod:`graphtune.store.ledger`); they live here, at the bottom, so that neither
package imports the other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def call_key(endpoint: str, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any],
             sample_index: int) -> str:
    """Digest of everything that determines a reply (and the sample it is)."""
    payload = json.dumps({"e": endpoint, "m": list(messages), "p": dict(params), "s": int(sample_index)},
                         sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class CallRecord:
    """One LLM call as the ledger keeps it."""

    key: str
    model: str
    endpoint: str
    messages: list = field(default_factory=list)
    params: dict = field(default_factory=dict)
    sample_index: int = 0
    reply: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    usd: float = 0.0
    flops: float = 0.0
    error: str | None = None
    study: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.reply is not None
