"""Stage 3: format, tokenize and split the problems for training.

Run:
    python prepare_data.py
    python prepare_data.py --template guide    # the original guide's prompt, without the asserts
    python prepare_data.py --template chat     # an instruct model: its own chat template, the answer as its turn
    python prepare_data.py --format text       # force a data shape instead of detecting it from the columns
    python prepare_data.py --eval-files 200    # a streamed source (download_dataset.py --streaming): raw text

Reads:  data/ (from download_dataset.py), model/ (its tokenizer, from download_model.py)
Writes: prepared_data/ (DatasetDict with `train` and `eval` splits, stats.json)
Needs:  common.py, formats.py, sandbox.py
Next:   train.py

The data shape (mbpp, humaneval, instruction or raw text; see formats.py) is detected from the columns. Each
example is `prompt + answer + EOS` (a chat template's end-of-turn token with --template chat). The prompt tokens
are masked in the labels (-100) so that only the answer and its end are trained; masking is by position, so the
EOS survives although Qwen's pad token is the same token. Raw text has no prompt: whole files are joined, EOS
between them, cut into --max-length blocks, every token trained. The held-out `eval` split is drawn by task_id
with a fixed seed, so it is the same every run and no problem is in both splits. Examples longer than
--max-length are dropped and counted, never cut.

A streamed source (download_dataset.py --streaming) is raw text larger than memory: its first --eval-files files
are held out and packed here; train.py reads the rest lazily, after them, and runs by --max-steps.

Datasets with tests are checked first (--check-tests): each reference solution must pass its tests in the
sandbox and a do-nothing stub of it must fail them. Problems that break either rule (a broken reference, a test
that cannot fail, such as a HumanEval `check` that is never called) are dropped and listed in stats.json.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import random
import sys
from pathlib import Path

import common
import formats
from common import StageError

CHECK_ALL_UP_TO = 1000  # --check-tests auto: every problem of a dataset this size, a seeded sample above


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


def encode_problems(problems: list[dict], tokenizer, fmt: str, template: str, max_length: int) -> tuple[list[dict], list[str]]:
    """Tokenized rows that fit in max_length, and the task ids of those that did not."""
    end_id = common.end_of_turn_id(tokenizer) if template == "chat" else None
    kept, dropped = [], []
    for problem in problems:
        prompt = formats.prompt_for(fmt, problem, template, tokenizer)
        encoded = common.encode_example(tokenizer, prompt, problem["code"], end_id)
        if len(encoded["input_ids"]) > max_length:
            dropped.append(problem["task_id"])
            continue
        kept.append({**problem, **encoded, "length": len(encoded["input_ids"])})
    return kept, dropped


def stub_of(code: str) -> str | None:
    """The same program with every function body replaced by `pass` (a do-nothing answer), or None when it has
    no function to empty (or does not parse)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for function in functions:
        function.body = [ast.Pass()]
    return ast.unparse(tree) if functions else None


def check_tests(problems: list[dict], mode: str, seed: int) -> dict[str, str]:
    """task_id -> why its tests are unusable, for the problems checked: the reference solution must pass and a
    do-nothing stub must fail. `mode`: all, auto (all up to CHECK_ALL_UP_TO problems, a seeded sample above)."""
    import sandbox

    chosen = problems
    if mode == "auto" and len(problems) > CHECK_ALL_UP_TO:
        chosen = random.Random(seed).sample(problems, CHECK_ALL_UP_TO)
    jobs = []  # (task_id, what, program)
    for problem in chosen:
        code, tests, setup = formats.program(problem, problem["code"])
        jobs.append((problem["task_id"], "reference", sandbox.build_program(code, tests, setup)))
        stub = stub_of(code)
        if stub is not None:
            jobs.append((problem["task_id"], "stub", sandbox.build_program(stub, tests, setup)))
    verdicts = sandbox.Sandbox().run_many([program for _, _, program in jobs])
    flagged: dict[str, str] = {}
    for (task_id, what, _), verdict in zip(jobs, verdicts):
        if what == "reference" and verdict.status != "passed":
            flagged[task_id] = f"the reference solution does not pass its tests ({verdict.status}: {verdict.message[:80]})"
        elif what == "stub" and verdict.status == "passed" and task_id not in flagged:
            flagged[task_id] = "the tests cannot fail: a do-nothing stub passes them"
    return flagged


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=common.DATA_DIR, help="folder written by download_dataset.py (default: %(default)s)")
    parser.add_argument("--model", default=common.MODEL_DIR, help="model folder whose tokenizer is used (default: %(default)s)")
    parser.add_argument("--out", default=common.PREPARED_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--format", choices=["auto", *formats.FORMATS], default="auto",
                        help="data shape (default: detected from the columns; see formats.py)")
    parser.add_argument("--max-length", type=common.positive(int), default=512, help="longest example in tokens; longer ones are dropped (default: %(default)s)")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="share of problems held out for evaluation, in (0, 1) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/eval split (default: %(default)s)")
    parser.add_argument("--template", choices=sorted(common.TEMPLATES), default=None,
                        help="prompt template (default: the data shape's: 'tests' for mbpp, shows the asserts; 'code' for "
                             "humaneval; 'guide' for instructions; 'none' for raw text); 'chat' uses the tokenizer's chat template")
    parser.add_argument("--check-tests", choices=["auto", "all", "off"], default="auto",
                        help=f"run each reference solution and a do-nothing stub against the tests and drop problems whose "
                             f"tests are broken or cannot fail (default: auto, every problem up to {CHECK_ALL_UP_TO}, a sample above)")
    parser.add_argument("--eval-files", type=common.positive(int), default=100,
                        help="a streamed source: how many of its first files are held out for evaluation (default: %(default)s)")
    return parser


def streamed_source(data_dir: str) -> dict | None:
    """download_info.json of a folder that download_dataset.py --streaming wrote, or None for a saved dataset."""
    info = Path(data_dir) / common.DOWNLOAD_INFO
    recorded = common.read_json(info) if info.is_file() else {}
    return recorded if recorded.get("streaming") else None


def prepare_stream(args, source: dict, tokenizer) -> int:
    """A streamed source: its first --eval-files files, packed, are the eval split; train.py streams the rest."""
    from datasets import Dataset, DatasetDict

    stream = iter(common.open_stream(source))
    held_out = list(itertools.islice(stream, args.eval_files))
    if not held_out:
        raise StageError(f"{source['dataset']} has no rows")
    fmt = formats.detect(list(held_out[0])) if args.format == "auto" else args.format
    if fmt != "text":
        raise StageError(f"{source['dataset']} holds {fmt} data, which fits in memory: run download_dataset.py without "
                         f"--streaming (streaming is for raw text, one file per row)")
    if next(stream, None) is None:
        raise StageError(f"{source['dataset']} has only {len(held_out)} files, all held out by --eval-files "
                         f"{args.eval_files}: lower it, or download it without --streaming")
    column = formats.columns_for("text", list(held_out[0]))["code"]
    blocks = list(formats.pack_blocks((row[column] for row in held_out), tokenizer, args.max_length))
    settings = {"format": "text", "template": "none", "max_length": args.max_length, "eval_files": args.eval_files,
                "seed": args.seed, "model": common.model_id(args.model), "data": source["dataset"],
                "eos_token_id": tokenizer.eos_token_id, "tokenizer": common.tokenizer_fingerprint(args.model),
                "streaming": {"source": source, "column": column, "skip_files": len(held_out)}}
    lengths = [block["length"] for block in blocks]
    summary = {"settings": settings, "rows": {"eval": len(blocks)}, "tokens": {"example": percentiles(lengths), "total": sum(lengths)},
               "task_ids": {"eval": [f"file-{n}" for n in range(len(held_out))]}}
    summary["fingerprint"] = common.data_fingerprint(summary["task_ids"], settings)
    with common.atomic_output_dir(args.out) as tmp:
        DatasetDict({"eval": Dataset.from_list(blocks)}).save_to_disk(str(tmp))
        common.write_json(tmp / common.PREPARED_STATS, summary)
    print(f"streamed text: the first {len(held_out)} files held out -> eval {len(blocks)} blocks of up to "
          f"{args.max_length} tokens; the rest is read lazily by train.py (run it with --max-steps)")
    print(f"✓ saved in {args.out}/ (stats in {args.out}/{common.PREPARED_STATS})")
    print("next: python train.py --max-steps 1000")
    return 0


def looks_instruct(model_dir: str) -> bool:
    name = common.model_id(model_dir).lower()
    return any(word in name for word in ("instruct", "-chat", "-it"))


@common.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    problems_found = []
    if not 0 < args.eval_fraction < 1:
        problems_found.append(f"--eval-fraction must be between 0 and 1 (exclusive), got {args.eval_fraction}")
    if common.out_file_problem(args.out):  # before minutes of tokenizing and checking, not after
        problems_found.append(common.out_file_problem(args.out))
    source = streamed_source(args.data)
    checks = [lambda: common.require_model_dir(args.model)]
    if source is None:
        checks.append(lambda: common.require_dataset_dir(args.data, "download_dataset.py"))
    for check in checks:
        try:
            check()
        except StageError as error:
            problems_found.append(str(error))
    common.fail_on_problems(problems_found)

    common.quiet_libraries()
    from datasets import Dataset, DatasetDict, load_from_disk
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    tokenizer = common.load_tokenizer(args.model)
    if source is not None:
        return prepare_stream(args, source, tokenizer)
    raw = load_from_disk(args.data)

    column_names = next(iter(raw.values())).column_names
    fmt = formats.detect(column_names) if args.format == "auto" else args.format
    columns = formats.columns_for(fmt, column_names)
    template = args.template or formats.DEFAULT_TEMPLATES[fmt]
    if template not in formats.TEMPLATES_FOR[fmt]:
        raise StageError(f"--template {template} does not fit {fmt} data: choose one of {', '.join(formats.TEMPLATES_FOR[fmt])}")
    if template == "chat":
        common.render_chat(tokenizer, "x")  # one clear line when the tokenizer has no chat template
    elif looks_instruct(args.model) and common.has_chat_template(tokenizer) and fmt != "text":
        print(f"note: {common.model_id(args.model)} looks like an instruct model: --template chat prompts it with its own "
              f"chat template, as it was trained")

    problems, seen, duplicates = [], set(), 0
    for split in raw.values():  # the splits of the source (mbpp has four) are pooled, then split our way
        for row in split:
            problem = formats.normalize(fmt, row, columns, len(problems) + duplicates)
            if problem["task_id"] in seen:
                duplicates += 1
                continue
            seen.add(problem["task_id"])
            problems.append(formats.as_chat(problem) if template == "chat" else problem)

    flagged = {}
    if formats.HAS_TESTS[fmt] and args.check_tests != "off":
        print(f"checking the tests of {min(len(problems), CHECK_ALL_UP_TO) if args.check_tests == 'auto' else len(problems)} "
              f"problems (reference must pass, a do-nothing stub must fail; --check-tests off skips this)", flush=True)
        flagged = check_tests(problems, args.check_tests, args.seed)
        problems = [p for p in problems if p["task_id"] not in flagged]
    if len(problems) < 2:
        raise StageError(f"{args.data}/ holds {len(problems)} usable problem(s); at least 2 are needed for a train and an eval split")

    eval_ids = held_out_split([p["task_id"] for p in problems], args.eval_fraction, args.seed)
    splits, stats = {}, {"dropped_too_long": {}, "rows": {}}
    task_ids = {}
    for name, members in (("train", [p for p in problems if p["task_id"] not in eval_ids]),
                          ("eval", [p for p in problems if p["task_id"] in eval_ids])):
        if not members:
            raise StageError(f"--eval-fraction {args.eval_fraction} leaves no problem for the {name} split "
                             f"({len(problems)} problems in all): choose a fraction between them")
        if fmt == "text":
            kept, dropped = list(formats.pack_blocks((p["code"] for p in members), tokenizer, args.max_length)), []
            task_ids[name] = [p["task_id"] for p in members]  # the files of each split, not the blocks
        else:
            kept, dropped = encode_problems(members, tokenizer, fmt, template, args.max_length)
            task_ids[name] = [p["task_id"] for p in kept]
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
            "format": fmt, "template": template, "max_length": args.max_length, "eval_fraction": args.eval_fraction, "seed": args.seed,
            "model": common.model_id(args.model),
            "data": common.read_json(data_info_path).get("dataset") if data_info_path.is_file() else str(args.data),
            "eos_token_id": tokenizer.eos_token_id, "tokenizer": common.tokenizer_fingerprint(args.model),
        },
        "problems": len(problems), "duplicates_skipped": duplicates, **stats,
        "failed_test_check": flagged,
        "tokens": {"example": percentiles(lengths), "solution_with_eos": percentiles(solution_lengths), "total": sum(lengths)},
        "task_ids": task_ids,
    }
    summary["fingerprint"] = common.data_fingerprint(summary["task_ids"], summary["settings"])
    with common.atomic_output_dir(args.out) as tmp:
        DatasetDict(splits).save_to_disk(str(tmp))
        common.write_json(tmp / common.PREPARED_STATS, summary)

    dropped_total = sum(len(ids) for ids in stats["dropped_too_long"].values())
    tokens = summary["tokens"]["example"]
    unit = "files" if fmt == "text" else "problems"
    print(f"{len(problems)} {unit} ({fmt} data) -> train {stats['rows']['train']}, eval {stats['rows']['eval']}"
          f"{' blocks of ' + str(args.max_length) + ' tokens' if fmt == 'text' else ''} (held out by task_id, seed {args.seed}); "
          f"template '{template}'")
    if flagged:
        print(f"dropped by the test check: {len(flagged)} ({', '.join(f'{task}: {why}' for task, why in list(flagged.items())[:3])}"
              f"{', ...' if len(flagged) > 3 else ''}); all listed in {args.out}/{common.PREPARED_STATS}")
    print(f"tokens per example: median {tokens['p50']}, p95 {tokens['p95']}, max {tokens['max']}; "
          f"dropped as longer than {args.max_length}: {dropped_total}" + (f"; duplicates skipped: {duplicates}" if duplicates else ""))
    if dropped_total > 0.05 * len(problems):
        print(f"note: {dropped_total} of {len(problems)} problems are longer than --max-length {args.max_length}; raise it to "
              f"keep them (memory grows with it)")
    print(f"✓ saved in {args.out}/ (stats in {args.out}/{common.PREPARED_STATS})")
    print("next: python train.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
