"""The agent's memory: its earlier hypotheses next to what was measured afterwards.

Every feedback report carries a bounded record of the agent's earlier rounds
(:class:`RoundMemory`): what it said (its feedback text, cut at a word), the preferences
it pushed and the graphs it proposed, each next to its measured :class:`Outcome`:

* a proposal: its paired difference to the current incumbent (mean over the questions
  both were scored on, with a 95% interval), or why it was never measured;
* a pushed preference (a model, a role, a target width or depth): among the graphs first
  measured after that round, the paired effect (two-way graph + question fit) of those
  that follow it minus those that do not, with a 95% interval, and a verdict: ``held``
  (the interval lies on the side the agent pushed), ``contradicted`` (on the other
  side), ``unclear`` or ``untested`` (too few graphs since).

The searcher computes the outcomes from its evidence (so a resumed search, whose
evidence is rebuilt from the store, shows the same memory); this module words them and
keeps them inside a token bound. Tokens are estimated as characters / 4
(:func:`estimate_tokens`, the usual rule of thumb for English and JSON with BPE
tokenizers; a bound, not a count): :func:`select_memory` keeps the newest rounds whose
rendered text fits ``max_tokens`` and drops the oldest first; a newest round that alone
is over the bound is cut at a word boundary. ``max_tokens = 0`` means no memory (the
prompt is the memoryless one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: characters per token of the estimate (see the module docstring)
CHARS_PER_TOKEN = 4
#: the most of one round's feedback text the memory keeps (cut at a word)
FEEDBACK_CHARS = 480

MEMORY_HEADER = ("YOUR EARLIER ROUNDS (your hypotheses, oldest first, each next to what was measured since; "
                 "pts = reward x 100, [95% interval]):")
MEMORY_ASK = ("Begin `feedback` by saying which of your earlier hypotheses the measurements confirm and which "
              "you revise, and why.")


def estimate_tokens(text: str) -> int:
    """Tokens of ``text`` as the memory bound counts them: characters / 4, rounded up."""
    return -(-len(text) // CHARS_PER_TOKEN)


def cut_words(text: str, limit: int) -> str:
    """``text`` when it has at most ``limit`` characters, else its longest prefix of at
    most ``limit`` characters that ends at a word boundary (a hard cut when one word is
    longer than half the limit), with "…" appended."""
    if len(text) <= limit:
        return text
    head = text[:limit + 1]
    cut = max(head.rfind(c) for c in (" ", "\n", "\t"))
    if cut < limit // 2:
        cut = limit
    return text[:cut].rstrip().rstrip(".,;:") + "\u2026"


@dataclass(frozen=True)
class Outcome:
    """One claim of an earlier round and what was measured about it.

    ``direction``: +1 / -1 for a preference pushed up / down, 0 for a proposal.
    ``diff``, ``lo``, ``hi``: the measured difference (reward units) and its 95% interval
    (nan when not measured); ``n``: questions (a proposal) or graphs (a preference)
    behind it; ``verdict``: held | contradicted | unclear | untested for a preference,
    better | worse | unclear | incumbent | not measured | rejected for a proposal;
    ``note``: a reason (a rejection) or what was compared."""

    claim: str
    direction: int
    diff: float
    lo: float
    hi: float
    n: int
    verdict: str
    note: str = ""

    def text(self) -> str:
        if math.isnan(self.diff):
            return f"{self.claim}: {self.verdict}" + (f" ({self.note})" if self.note else "")
        interval = f" [{self.lo * 100:+.1f}, {self.hi * 100:+.1f}]" if math.isfinite(self.lo) else ""
        return (f"{self.claim}: {self.diff * 100:+.1f} pts{interval} {self.note} -> {self.verdict}").replace("  ", " ")


@dataclass(frozen=True)
class RoundMemory:
    """One earlier agent step (``kind`` init or feedback, after batch ``round``): its
    hypothesis and the measured outcomes of its preferences and proposals."""

    round: int
    kind: str
    feedback: str
    confidence: float
    preferences: tuple[Outcome, ...] = ()
    proposals: tuple[Outcome, ...] = ()

    def verdicts(self) -> dict[str, int]:
        """How many of its preferences held, were contradicted, unclear or untested."""
        out: dict[str, int] = {}
        for o in self.preferences:
            out[o.verdict] = out.get(o.verdict, 0) + 1
        return out


def classify(direction: int, lo: float, hi: float, n_with: int, n_without: int) -> str:
    """The verdict on a pushed preference from the 95% interval of its measured effect."""
    if n_with < 1 or n_without < 1 or not (math.isfinite(lo) and math.isfinite(hi)):
        return "untested"
    if lo > 0:
        return "held" if direction > 0 else "contradicted"
    if hi < 0:
        return "held" if direction < 0 else "contradicted"
    return "unclear"


def render_round(r: RoundMemory) -> str:
    """One round of the memory as prompt text."""
    what = "initial step" if r.kind == "init" else f"after round {r.round}"
    lines = [f"- {what} (confidence {r.confidence:.2f}): you said \"{r.feedback}\""]
    if r.preferences:
        lines.append("  pushed (graphs measured since, with vs without): "
                     + "; ".join(o.text() for o in r.preferences))
    if r.proposals:
        lines.append("  proposed (vs the current incumbent): " + "; ".join(o.text() for o in r.proposals))
    return "\n".join(lines)


def select_memory(rounds: Sequence[RoundMemory], max_tokens: int) -> tuple[RoundMemory, ...]:
    """The newest rounds whose rendered memory fits ``max_tokens`` (estimated), oldest
    dropped first; the newest round is kept even when it alone is over the bound (its
    text is then cut by :func:`render_memory`). Empty for ``max_tokens <= 0``."""
    if max_tokens <= 0 or not rounds:
        return ()
    budget = max_tokens * CHARS_PER_TOKEN - len(MEMORY_HEADER) - len(MEMORY_ASK) - 2
    kept: list[RoundMemory] = []
    used = 0
    for r in reversed(rounds):
        size = len(render_round(r)) + 1
        if kept and used + size > budget:
            break
        kept.append(r)
        used += size
    return tuple(reversed(kept))


def render_memory(rounds: Sequence[RoundMemory], max_tokens: int) -> list[str]:
    """The memory section's lines (empty when there is no memory), at most
    ``max_tokens`` tokens (estimated) in all."""
    kept = select_memory(rounds, max_tokens)
    if not kept:
        return []
    body = "\n".join(render_round(r) for r in kept)
    room = max(0, max_tokens * CHARS_PER_TOKEN - len(MEMORY_HEADER) - len(MEMORY_ASK) - 2)
    return [MEMORY_HEADER, cut_words(body, room), MEMORY_ASK]
