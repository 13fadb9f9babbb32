"""Where tests find task data: the small subsets shipped in ``examples/data`` (always there),
and the full sets when present (``$GRAPHTUNE_DATA``, else ``../shared/data`` beside the
repository). Tests parametrised over :data:`SOURCES` run on the subset on every clone and on
the full data too where it is found; a variant that needs the full data is not collected
without it (``pytest``'s header says which data it found), so a fresh clone skips nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ROOT / "examples" / "data"
_ENV = os.environ.get("GRAPHTUNE_DATA")
FULL = Path(_ENV).expanduser() if _ENV else ROOT.parent / "shared" / "data"
HAS_FULL = (FULL / "recorded" / "gsm8k_gpt3_solutions.jsonl").is_file() and (FULL / "gsm8k" / "test.jsonl").is_file()
if _ENV and not HAS_FULL:
    raise RuntimeError(f"GRAPHTUNE_DATA={_ENV}: no full task data there (expected recorded/gsm8k_gpt3_solutions.jsonl "
                       "and gsm8k/test.jsonl); unset it to test on the in-repo subsets")

#: data folder by name: "subset" always, "full" where the full data is found
DATA = {"subset": SUBSET, **({"full": FULL} if HAS_FULL else {})}
#: pytest parameters over DATA's names
SOURCES = [pytest.param(name, id=name) for name in DATA]


def describe() -> str:
    """One line for pytest's header."""
    full = f"full data at {FULL}" if HAS_FULL else (f"full data not found at {FULL} (set GRAPHTUNE_DATA to a copy); "
                                                    "its variants are not collected")
    return f"task data: subsets in {SUBSET.relative_to(ROOT)}; {full}"
