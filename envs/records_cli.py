"""The command line of record tables: ``python -m graphtune.envs.replay import-gsm8k
DATA_DIR -o records.csv`` and ``python -m graphtune.envs.replay summary TABLE``
(``docs/replay.md``); :mod:`graphtune.envs.replay` runs :func:`main`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from graphtune.envs.record_importers import import_gsm8k_recorded
from graphtune.envs.records import load_records, save_records
from graphtune.errors import GraphtuneError

__all__ = ["main"]



def main(argv: Sequence[str] | None = None) -> int:
    """``python -m graphtune.envs.replay import-gsm8k DATA_DIR -o records.csv`` writes the
    recorded GSM8K fixture as a generic table; ``summary TABLE`` prints per-model accuracy."""
    ap = argparse.ArgumentParser(prog="python -m graphtune.envs.replay",
                                 description="Record tables for the replay environment (docs/replay.md).")
    sub = ap.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-gsm8k", help="write the recorded answers of six systems on GSM8K as a table")
    imp.add_argument("data_dir", help="folder with gsm8k_routellm_responses.csv and gsm8k_gpt3_solutions.jsonl")
    imp.add_argument("-o", "--output", required=True, help="the table to write (.csv or .jsonl)")
    imp.add_argument("--task", default="gsm8k", help="task name of the records (default gsm8k)")
    summ = sub.add_parser("summary", help="questions, models and recorded accuracy of a table")
    summ.add_argument("table", help="a .csv or .jsonl record table")
    args = ap.parse_args(argv)
    try:
        if args.command == "import-gsm8k":
            table = import_gsm8k_recorded(args.data_dir, task=args.task)
            path = save_records(table, args.output)
            print(f"wrote {len(table)} records to {path}")
        else:
            table = load_records(args.table)
        for task in table.tasks:
            t = table.for_task(task)
            print(f"task {task}: {len(t.questions())} questions, {len(t.models)} models")
            for m in t.models:
                print(f"  {m:<28} {t.accuracy(m):6.1%}  ({sum(r.model == m for r in t.records)} records)")
    except GraphtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
