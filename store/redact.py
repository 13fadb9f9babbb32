"""Secret values kept out of everything a store writes.

A :class:`Redactor` holds secret strings (the values of the spec's ``api_key_env``
variables, a database password), given to it by the app; the store runs every text it
writes through it (call-ledger prompts and replies, agent steps, trial info and errors,
question results, searcher state). The store does not know where secrets come from: it
imports neither the environments nor the agent.

Values shorter than :data:`MIN_SECRET_LEN` are ignored: replacing a two-letter password
everywhere would mangle ordinary text while protecting nothing.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import Any

#: shorter values are not treated as secrets
MIN_SECRET_LEN = 6
#: what a secret is replaced with
MASK = "[redacted]"


class Redactor:
    """Replaces known secret strings (longest first) in text and in JSON-like values."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern | None = None
        self._lock = threading.Lock()
        self.add(secrets)

    def add(self, secrets: Iterable[str | None]) -> None:
        """Add secret values (None, empty and short ones are skipped)."""
        new = {s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_LEN}
        with self._lock:
            if new <= self._secrets:
                return
            self._secrets |= new
            ordered = sorted(self._secrets, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(s) for s in ordered))

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def text(self, s: str | None) -> str | None:
        """``s`` with every secret replaced by :data:`MASK` (None stays None)."""
        p = self._pattern
        if p is None or not isinstance(s, str):
            return s
        return p.sub(MASK, s)

    def value(self, v: Any) -> Any:
        """A copy of a JSON-like value (dicts, lists, tuples, strings) with every string
        (keys too) redacted; other values are returned as they are."""
        if self._pattern is None:
            return v
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, dict):
            return {self.text(k) if isinstance(k, str) else k: self.value(x) for k, x in v.items()}
        if isinstance(v, list):
            return [self.value(x) for x in v]
        if isinstance(v, tuple):
            return tuple(self.value(x) for x in v)
        return v
