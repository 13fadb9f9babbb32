"""Rebuild the small in-repo data subsets (examples/data/) from the full shared data.

    python scripts/make_data_subsets.py [FULL_DATA_DIR]   # default: ../shared/data

Each file is the first rows of the full file, copied byte for byte (the recorded RouteLLM
CSV: its header and the rows of the same questions), so ids, gold answers and recorded
verdicts are those of the full data. Sizes are in ROWS; examples/data/README.md names the
sources and their licences."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "examples" / "data"
#: relative path -> rows kept (the first ones)
ROWS = {
    "gsm8k/test.jsonl": 100,
    "math500/test.jsonl": 40,
    "mmlu/test.jsonl": 20,
    "humaneval/HumanEval.jsonl": 20,
    "mbpp/mbpp.jsonl": 20,
    "recorded/gsm8k_gpt3_solutions.jsonl": 100,
}
ROUTELLM = "recorded/gsm8k_routellm_responses.csv"
LICENCE_FILES = ["gsm8k/LICENSE", "recorded/LICENSE.RouteLLM"]


def head_lines(src: Path, dst: Path, n: int) -> None:
    with src.open("rb") as fh:
        lines = [fh.readline() for _ in range(n)]
    assert all(lines), f"{src} has fewer than {n} rows"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(b"".join(lines))


def routellm_rows(src: Path, dst: Path, questions: set[str]) -> int:
    """The header and the rows whose prompt is one of ``questions`` (whitespace-normalised),
    each copied as its raw lines (a quoted field may span lines)."""
    with src.open(encoding="utf-8", newline="") as fh:
        raw = re.findall(r"[^\n]*\n|[^\n]+$", fh.read())
    consumed: list[int] = []

    def lines():
        for i, line in enumerate(raw):
            consumed.append(i)
            yield line

    reader = csv.reader(lines())
    header = next(reader)
    out, start, kept = [*raw[: consumed[-1] + 1]], consumed[-1] + 1, 0
    for row in reader:
        end = consumed[-1] + 1
        if " ".join(row[header.index("prompt")].split()) in questions:
            out += raw[start:end]
            kept += 1
        start = end
    with dst.open("w", encoding="utf-8", newline="") as fh:
        fh.write("".join(out))
    return kept


def main(argv: list[str]) -> int:
    full = Path(argv[0]) if argv else ROOT.parent / "shared" / "data"
    for rel, n in ROWS.items():
        head_lines(full / rel, OUT / rel, n)
    gpt3 = [json.loads(line) for line in (OUT / "recorded/gsm8k_gpt3_solutions.jsonl").open(encoding="utf-8")]
    kept = routellm_rows(full / ROUTELLM, OUT / ROUTELLM, {" ".join(r["question"].split()) for r in gpt3})
    assert kept == len(gpt3), (kept, len(gpt3))
    for rel in LICENCE_FILES:
        shutil.copyfile(full / rel, OUT / rel)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1024:.0f} KiB in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
