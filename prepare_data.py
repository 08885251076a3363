"""Stage 3: format, tokenize and split the problems for training.

Run:
    python prepare_data.py
    python prepare_data.py --template guide    # the original guide's prompt, without the asserts

Reads:  data/ (from download_dataset.py), model/ (its tokenizer, from download_model.py)
Writes: prepared_data/ (DatasetDict with `train` and `eval` splits, stats.json)
Needs:  common.py
Next:   train.py

Each example is `prompt + solution + EOS`. The prompt tokens are masked in the labels (-100) so that only the
solution and the EOS are trained; masking is by position, so the EOS survives although Qwen's pad token is the
same token. The held-out `eval` split is drawn by task_id with a fixed seed, so it is the same every run and
no problem is in both splits. Examples longer than --max-length are dropped and counted, never cut.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import common
from common import StageError

# Column names used by the MBPP variants on the Hub, in order of preference.
COLUMN_ALIASES = {
    "task": ["text", "prompt"],  # the original mbpp has `text`, mbpp/sanitized has `prompt`
    "code": ["code"],
    "tests": ["test_list", "test"],
}
SETUP_ALIASES = ["test_setup_code", "test_imports"]  # optional; test_imports (sanitized) is a list of lines


def resolve_columns(columns: list[str]) -> dict[str, str | None]:
    """Map our field names to the dataset's columns; fail naming what is missing."""
    resolved = {}
    for field, aliases in COLUMN_ALIASES.items():
        found = next((name for name in aliases if name in columns), None)
        if found is None:
            raise StageError(
                f"the dataset has no {' or '.join(repr(a) for a in aliases)} column (needed for the {field}); "
                f"its columns are: {', '.join(columns)}"
            )
        resolved[field] = found
    resolved["setup"] = next((name for name in SETUP_ALIASES if name in columns), None)
    resolved["task_id"] = "task_id" if "task_id" in columns else None
    return resolved


def normalize_row(row: dict, columns: dict, position: int) -> dict:
    """One problem as {task_id, task, code, tests, setup}; refuses empty or non-string fields."""
    task_id = row[columns["task_id"]] if columns["task_id"] else None
    if task_id is None or not str(task_id).strip():
        task_id = f"row-{position}"  # rows without an id get one of their own, never a shared one
    where = f"row {position} (task_id {task_id})"
    task, code, tests = row[columns["task"]], row[columns["code"]], row[columns["tests"]]
    for name, value in (("task", task), ("code", code)):
        if not isinstance(value, str) or not value.strip():
            raise StageError(f"{where}: the {name} column {columns[name]!r} is empty or not text; fix or remove that row")
    if isinstance(tests, str):
        tests = [tests]
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
        raise StageError(f"{where}: {columns['tests']!r} must be a non-empty list of assert statements")
    setup = row[columns["setup"]] if columns["setup"] else ""
    if isinstance(setup, list):
        setup = "\n".join(setup)
    return {"task_id": str(task_id), "task": task.strip(), "code": code.rstrip(), "tests": tests, "test_setup_code": setup or ""}


def held_out_split(task_ids: list[str], eval_fraction: float, seed: int) -> set[str]:
    """The task ids of the eval split: deterministic for a seed, independent of row order."""
    ordered = sorted(set(task_ids))
    random.Random(seed).shuffle(ordered)
    n_eval = max(1, round(eval_fraction * len(ordered)))
    return set(ordered[:n_eval])


def percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]  # noqa: E731
    return {"min": ordered[0], "p50": pick(50), "p90": pick(90), "p95": pick(95), "p99": pick(99), "max": ordered[-1]}


def encode_problems(problems: list[dict], tokenizer, template: str, max_length: int) -> tuple[list[dict], list[str]]:
    """Tokenized rows that fit in max_length, and the task ids of those that did not."""
    kept, dropped = [], []
    for problem in problems:
        prompt = common.format_prompt(template, problem["task"], problem["tests"])
        encoded = common.encode_example(tokenizer, prompt, problem["code"])
        if len(encoded["input_ids"]) > max_length:
            dropped.append(problem["task_id"])
            continue
        kept.append({**problem, **encoded, "length": len(encoded["input_ids"])})
    return kept, dropped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=common.DATA_DIR, help="folder written by download_dataset.py (default: %(default)s)")
    parser.add_argument("--model", default=common.MODEL_DIR, help="model folder whose tokenizer is used (default: %(default)s)")
    parser.add_argument("--out", default=common.PREPARED_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--max-length", type=common.positive(int), default=512, help="longest example in tokens; longer ones are dropped (default: %(default)s)")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="share of problems held out for evaluation, in (0, 1) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/eval split (default: %(default)s)")
    parser.add_argument("--template", choices=sorted(common.TEMPLATES), default=common.DEFAULT_TEMPLATE,
                        help="prompt template: 'tests' shows the asserts (default), 'guide' is the original guide's")
    return parser


@common.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    problems_found = []
    if not 0 < args.eval_fraction < 1:
        problems_found.append(f"--eval-fraction must be between 0 and 1 (exclusive), got {args.eval_fraction}")
    for check in (lambda: common.require_dataset_dir(args.data, "download_dataset.py"), lambda: common.require_model_dir(args.model)):
        try:
            check()
        except StageError as error:
            problems_found.append(str(error))
    common.fail_on_problems(problems_found)

    common.quiet_libraries()
    from datasets import Dataset, DatasetDict, load_from_disk
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    raw = load_from_disk(args.data)
    tokenizer = common.load_tokenizer(args.model)

    columns = resolve_columns(next(iter(raw.values())).column_names)
    problems, seen, duplicates = [], set(), 0
    for split in raw.values():  # the splits of the source (mbpp has four) are pooled, then split our way
        for row in split:
            problem = normalize_row(row, columns, len(problems) + duplicates)
            if problem["task_id"] in seen:
                duplicates += 1
                continue
            seen.add(problem["task_id"])
            problems.append(problem)
    if len(problems) < 2:
        raise StageError(f"{args.data}/ holds {len(problems)} usable problem(s); at least 2 are needed for a train and an eval split")

    eval_ids = held_out_split([p["task_id"] for p in problems], args.eval_fraction, args.seed)
    splits, stats = {}, {"dropped_too_long": {}, "rows": {}}
    for name, members in (("train", [p for p in problems if p["task_id"] not in eval_ids]),
                          ("eval", [p for p in problems if p["task_id"] in eval_ids])):
        if not members:
            raise StageError(f"--eval-fraction {args.eval_fraction} leaves no problem for the {name} split "
                             f"({len(problems)} problems in all): choose a fraction between them")
        kept, dropped = encode_problems(members, tokenizer, args.template, args.max_length)
        if not kept:
            raise StageError(f"no {name} example fits in --max-length {args.max_length}; raise it")
        splits[name] = Dataset.from_list(kept)
        stats["rows"][name] = len(kept)
        stats["dropped_too_long"][name] = dropped
    lengths = [row["length"] for split in splits.values() for row in split]
    solution_lengths = [sum(1 for label in row["labels"] if label != common.IGNORE_INDEX) for split in splits.values() for row in split]

    data_info_path = Path(args.data) / common.DOWNLOAD_INFO
    summary = {
        "settings": {
            "template": args.template, "max_length": args.max_length, "eval_fraction": args.eval_fraction, "seed": args.seed,
            "model": common.model_id(args.model),
            "data": common.read_json(data_info_path).get("dataset") if data_info_path.is_file() else str(args.data),
            "eos_token_id": tokenizer.eos_token_id, "tokenizer": common.tokenizer_fingerprint(args.model),
        },
        "problems": len(problems), "duplicates_skipped": duplicates, **stats,
        "tokens": {"example": percentiles(lengths), "solution_with_eos": percentiles(solution_lengths), "total": sum(lengths)},
        "task_ids": {name: list(split["task_id"]) for name, split in splits.items()},
    }
    summary["fingerprint"] = common.data_fingerprint(summary["task_ids"], summary["settings"])
    with common.atomic_output_dir(args.out) as tmp:
        DatasetDict(splits).save_to_disk(str(tmp))
        common.write_json(tmp / common.PREPARED_STATS, summary)

    dropped_total = sum(len(ids) for ids in stats["dropped_too_long"].values())
    tokens = summary["tokens"]["example"]
    print(f"{len(problems)} problems -> train {stats['rows']['train']}, eval {stats['rows']['eval']} "
          f"(held out by task_id, seed {args.seed}); template '{args.template}'")
    print(f"tokens per example: median {tokens['p50']}, p95 {tokens['p95']}, max {tokens['max']}; "
          f"dropped as longer than {args.max_length}: {dropped_total}" + (f"; duplicates skipped: {duplicates}" if duplicates else ""))
    print(f"✓ saved in {args.out}/ (stats in {args.out}/{common.PREPARED_STATS})")
    print("next: python train.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
