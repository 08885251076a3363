"""Stage 3: format, tokenize and split the problems for training.

Run:
    python prepare_data.py
    python prepare_data.py --template guide    # the original guide's prompt, without the asserts
    python prepare_data.py --template chat     # an instruct model: its own chat template, the answer as its turn
    python prepare_data.py --format text       # force a data shape instead of detecting it from the columns
    python prepare_data.py --eval-files 200    # a streamed source (download_dataset.py --streaming): raw text

Reads:  data/ (from download_dataset.py), model/ (its tokenizer, from download_model.py)
Writes: prepared_data/ (DatasetDict with `train` and `eval` splits, stats.json)
Needs:  pipeline/ (cli, data, folders, models, platforms, prompts, sandbox, sandbox_runner)
Next:   train.py

The data shape (mbpp, humaneval, instruction or raw text; see pipeline/data.py) is detected from the columns.
Each example is `prompt + answer + EOS` (a chat template's end-of-turn token with --template chat). The prompt
tokens are masked in the labels (-100) so that only the answer and its end are trained; masking is by position,
so the EOS survives although Qwen's pad token is the same token. Raw text has no prompt: whole files are joined,
EOS between them, cut into --max-length blocks, every token trained. The held-out `eval` split is drawn by
task_id with a fixed seed, so it is the same every run and no problem is in both splits. Examples longer than
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

from pipeline import cli, data, folders, models, prompts
from pipeline.cli import StageError

CHECK_ALL_UP_TO = 1000  # --check-tests auto: every problem of a dataset this size, a seeded sample above
# --demo: a quarter held out, 22 problems, 10 of them string-family members (seed 42), enough for a real lift to show
# as one (an exact McNemar test needs 6 problems gained and none lost to reach p < 0.05; the 9 problems of the
# default tenth, 4 of them members, could never show it).
DEMO = {"--eval-fraction": "0.25"}


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(__doc__)
    parser.add_argument("--data", default=folders.DATA_DIR,
                        help="folder written by download_dataset.py (default: %(default)s)")
    parser.add_argument("--model", default=folders.MODEL_DIR,
                        help="model folder whose tokenizer is used (default: %(default)s)")
    parser.add_argument("--out", default=folders.PREPARED_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--format", choices=["auto", *data.FORMATS], default="auto",
                        help="data shape (default: detected from the columns; see pipeline/data.py)")
    parser.add_argument("--max-length", type=cli.number(int, 2), default=512,
                        help="longest example in tokens, 2 or more; longer ones are dropped (default: %(default)s)")
    parser.add_argument("--eval-fraction", type=cli.fraction(low_open=True), default=0.1,
                        help="share of problems held out for evaluation, in (0, 1) (default: %(default)s)")
    parser.add_argument("--seed", type=cli.SEED, default=42, help="seed of the train/eval split (default: %(default)s)")
    parser.add_argument("--template", choices=sorted(prompts.TEMPLATES), default=None,
                        help="prompt template (default: 'chat' for an instruct model, its own chat template; else "
                             "the data shape's: 'tests' for mbpp, shows the asserts; 'code' for humaneval; 'guide' for "
                             "instructions; 'none' for raw text)")
    parser.add_argument("--check-tests", choices=["auto", "all", "off"], default="auto",
                        help=f"run each reference solution and a do-nothing stub against the tests and drop problems "
                             f"whose tests are broken or cannot fail (default: auto, every problem up to "
                             f"{CHECK_ALL_UP_TO}, a sample above)")
    parser.add_argument("--eval-files", type=cli.positive(int), default=100,
                        help="a streamed source: how many of its first files are held out for evaluation "
                             "(default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="prepare again even when --out already holds this data prepared with these settings")
    parser.add_demo_preset(DEMO, "22 held-out demo problems, enough to tell a lift from luck")
    return parser


@cli.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    stream = check(args)
    if already_prepared(args):
        print(f"✓ {args.out}/ already holds {args.data}/ prepared with these settings for this tokenizer: skipping "
              f"(use --force to prepare again)")
        print("next: " + next_training(args))
        return 0
    return run(args, stream)


def check(args) -> dict | None:
    """Every problem with the flags and folders at once, before minutes of tokenizing and checking. Returns the
    streamed source that download_dataset.py --streaming recorded, or None for a saved dataset."""
    problems = []
    if folders.out_problem(args.out, "prepare_data"):  # before minutes of tokenizing and checking, not after
        problems.append(folders.out_problem(args.out, "prepare_data"))
    recorded = folders.download_info(args.data)
    stream = recorded if recorded.get("streaming") else None
    checks = [lambda: models.require_model_dir(args.model)]
    if stream is None:
        checks.append(lambda: folders.require_dataset_dir(args.data, "download_dataset.py"))
    for check_one in checks:
        try:
            check_one()
        except StageError as error:
            problems.append(str(error))
    cli.fail_on_problems(problems)
    return stream


def made_from(args) -> dict | None:
    """What prepared data is made from: these flags, the data's recorded source and the model's tokenizer. None
    for a data folder that records no source (made by hand): its content cannot be told from another's."""
    source = folders.download_info(args.data)
    if not source:
        return None
    flags = {key: value for key, value in vars(args).items() if key not in ("data", "model", "out", "force", "demo")}
    return {"flags": flags, "data": source, "model": models.model_id(args.model),
            "tokenizer": models.tokenizer_fingerprint(args.model)}


def already_prepared(args) -> bool:
    """Whether --out holds what this command would write (stats.json is written last, in an atomic folder)."""
    stats = Path(args.out) / folders.PREPARED_STATS
    inputs = None if args.force else made_from(args)
    return inputs is not None and stats.is_file() and folders.read_json(stats).get("made_from") == inputs


def run(args, stream: dict | None) -> int:
    models.quiet_libraries()
    from datasets import load_from_disk
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    tokenizer = models.load_tokenizer(args.model)
    if stream is not None:
        return prepare_stream(args, stream, tokenizer)
    raw = load_from_disk(args.data)
    column_names = next(iter(raw.values())).column_names
    fmt = data.detect(column_names) if args.format == "auto" else args.format
    template = choose_template(args, fmt, tokenizer)
    problems, duplicates = read_problems(raw, fmt, data.columns_for(fmt, column_names), template)
    flagged = {}
    if data.HAS_TESTS[fmt] and args.check_tests != "off":
        checked = min(len(problems), CHECK_ALL_UP_TO) if args.check_tests == "auto" else len(problems)
        print(f"checking the tests of {checked} problems (reference must pass, a do-nothing stub must fail; "
              f"--check-tests off skips this)", flush=True)
        flagged = check_tests(problems, args.check_tests, args.seed)
        problems = [p for p in problems if p["task_id"] not in flagged]
    if len(problems) < 2:
        raise StageError(f"{args.data}/ holds {len(problems)} usable problem(s); at least 2 are needed for a train "
                         f"and an eval split")
    splits, dropped, task_ids = make_splits(args, problems, fmt, template, tokenizer)
    summary = describe_splits(args, fmt, template, tokenizer, splits, dropped, task_ids)
    if not summary["tokens"]["trained"]:
        raise StageError(f"no training example has a token to learn (each is a single token, or all prompt): raise "
                         f"--max-length (it is {args.max_length})")
    summary.update(problems=len(problems), duplicates_skipped=duplicates, failed_test_check=flagged,
                   made_from=made_from(args))
    save(args.out, splits, summary)
    report(args, fmt, summary)
    return 0


def choose_template(args, fmt: str, tokenizer) -> prompts.Template:
    """--template, else the chat template for an instruct model (prompted as it was tuned), else the data shape's
    own; one line when it does not fit the data or the tokenizer."""
    template = prompts.get(args.template) if args.template else prompts.default_for(fmt)
    if not args.template and fmt in prompts.CHAT.fits and models.is_instruct(args.model, tokenizer):
        template = prompts.CHAT
        print(f"template 'chat': {models.model_id(args.model)} is an instruct model (a chat template, and an EOS that "
              f"ends a chat turn), prompted as it was tuned; --template {prompts.default_for(fmt).name} to prompt it "
              f"raw")
    prompts.require_fit(template, fmt)
    if template.chat:
        prompts.render_chat(tokenizer, "x")  # one clear line when the tokenizer has no chat template
    return template


def read_problems(raw, fmt: str, columns: dict, template: prompts.Template) -> tuple[list[dict], int]:
    """Every row of every split of the source (mbpp has four) as a problem dict, pooled to be split our way;
    and how many rows repeated another row exactly (skipped). Two different rows under one task id are refused:
    which of them is the problem is the user's to say."""
    problems, seen, duplicates = [], {}, 0
    for split in raw.values():
        for row in split:
            position = len(problems) + duplicates
            problem = data.normalize(fmt, row, columns, position)
            first = seen.setdefault(problem["task_id"], (position, problem))
            if first[0] != position:
                if first[1] != problem:
                    raise StageError(f"rows {first[0]} and {position} share the task_id {problem['task_id']} but "
                                     f"differ: give each problem its own id, or remove one of them")
                duplicates += 1
                continue
            problems.append(data.as_chat(problem) if template.chat else problem)
    return problems, duplicates


def check_tests(problems: list[dict], mode: str, seed: int) -> dict[str, str]:
    """task_id -> why its tests are unusable, for the problems checked: the reference solution must pass and a
    do-nothing stub must fail. `mode`: all, auto (all up to CHECK_ALL_UP_TO problems, a seeded sample above)."""
    from pipeline import sandbox

    chosen = problems
    if mode == "auto" and len(problems) > CHECK_ALL_UP_TO:
        chosen = random.Random(seed).sample(problems, CHECK_ALL_UP_TO)
    jobs = []  # (task_id, what, program)
    for problem in chosen:
        code, tests, setup = data.program(problem, problem["code"])
        jobs.append((problem["task_id"], "reference", sandbox.build_program(code, tests, setup)))
        stub = stub_of(code)
        if stub is not None:
            jobs.append((problem["task_id"], "stub", sandbox.build_program(stub, tests, setup)))
    box = sandbox.Sandbox()
    broken = box.self_test()
    if broken:  # else every reference would "fail" and every problem be dropped
        raise StageError(f"{broken}: the dataset check cannot tell good tests from broken ones; fix that, or pass "
                         f"--check-tests off")
    verdicts = box.run_many([program for _, _, program in jobs])
    flagged: dict[str, str] = {}
    for (task_id, what, _), verdict in zip(jobs, verdicts):
        if what == "reference" and verdict.status != "passed":
            flagged[task_id] = (f"the reference solution does not pass its tests ({verdict.status}: "
                                f"{verdict.message[:80]})")
        elif what == "stub" and verdict.status == "passed" and task_id not in flagged:
            flagged[task_id] = "the tests cannot fail: a do-nothing stub passes them"
    return flagged


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


def make_splits(args, problems: list[dict], fmt: str, template: prompts.Template, tokenizer):
    """The train and eval splits as tokenized rows, the task ids dropped as too long per split, and the task ids of
    each split (for raw text: its files, not its blocks)."""
    eval_ids = held_out_split([p["task_id"] for p in problems], args.eval_fraction, args.seed)
    splits, dropped, task_ids = {}, {}, {}
    for name, members in (("train", [p for p in problems if p["task_id"] not in eval_ids]),
                          ("eval", [p for p in problems if p["task_id"] in eval_ids])):
        if not members:
            raise StageError(f"--eval-fraction {args.eval_fraction} leaves no problem for the {name} split "
                             f"({len(problems)} problems in all): choose a fraction between them")
        if fmt == "text":
            kept, dropped[name] = list(data.pack_blocks((p["code"] for p in members), tokenizer, args.max_length)), []
            task_ids[name] = [p["task_id"] for p in members]
        else:
            kept, dropped[name] = encode_problems(members, tokenizer, fmt, template, args.max_length)
            task_ids[name] = [p["task_id"] for p in kept]
        if not kept:
            raise StageError(f"no {name} example fits in --max-length {args.max_length}; raise it")
        splits[name] = kept
    return splits, dropped, task_ids


def held_out_split(task_ids: list[str], eval_fraction: float, seed: int) -> set[str]:
    """The task ids of the eval split: deterministic for a seed, independent of row order."""
    ordered = sorted(set(task_ids))
    random.Random(seed).shuffle(ordered)
    n_eval = max(1, round(eval_fraction * len(ordered)))
    return set(ordered[:n_eval])


def encode_problems(problems: list[dict], tokenizer, fmt: str, template: prompts.Template,
                    max_length: int) -> tuple[list[dict], list[str]]:
    """Tokenized rows that fit in max_length, and the task ids of those that did not."""
    end_id = template.end_id(tokenizer)
    kept, dropped = [], []
    for problem in problems:
        prompt = data.prompt_for(fmt, problem, template, tokenizer)
        encoded = prompts.encode_example(tokenizer, prompt, problem["code"], end_id)
        if len(encoded["input_ids"]) > max_length:
            dropped.append(problem["task_id"])
            continue
        kept.append({**problem, **encoded, "length": len(encoded["input_ids"])})
    return kept, dropped


def describe_splits(args, fmt: str, template: prompts.Template, tokenizer, splits: dict, dropped: dict,
                    task_ids: dict) -> dict:
    """stats.json: the settings the data was made with, its counts and lengths, and its fingerprint."""
    rows = [row for split in splits.values() for row in split]
    settings = {
        "format": fmt, "template": template.name, "max_length": args.max_length, "eval_fraction": args.eval_fraction,
        "seed": args.seed, "model": models.model_id(args.model),
        "data": folders.download_info(args.data).get("dataset") or str(args.data),
        "eos_token_id": tokenizer.eos_token_id, "tokenizer": models.tokenizer_fingerprint(args.model),
    }
    answer_lengths = [sum(1 for label in row["labels"] if label != prompts.IGNORE_INDEX) for row in rows]
    # What each training problem asks, hashed: evaluate.py refuses to score the same problem as held out under
    # another id (or none).
    trained = [row for row in splits["train"] if "task" in row]
    return {
        "settings": settings, "dropped_too_long": dropped, "rows": {name: len(split) for name, split in splits.items()},
        "tokens": {"example": percentiles([row["length"] for row in rows]),
                   "solution_with_eos": percentiles(answer_lengths), "total": sum(row["length"] for row in rows),
                   "trained": sum(trained_tokens(row) for row in splits["train"])},
        "task_ids": task_ids, "content_keys": {"train": sorted({data.content_key(row) for row in trained})},
        "fingerprint": data.data_fingerprint(task_ids, settings),
    }


def trained_tokens(row: dict) -> int:
    """Positions of an example the loss is computed on: a label after the first position (which predicts
    nothing), not -100."""
    return sum(1 for label in row["labels"][1:] if label != prompts.IGNORE_INDEX)


def percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]  # noqa: E731
    return {"min": ordered[0], "p50": pick(50), "p90": pick(90), "p95": pick(95), "p99": pick(99), "max": ordered[-1]}


def save(out: str, splits: dict[str, list[dict]], summary: dict) -> None:
    from datasets import Dataset, DatasetDict

    with folders.atomic_output_dir(out, "prepare_data") as tmp:
        DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(str(tmp))
        folders.write_json(tmp / folders.PREPARED_STATS, summary)


def report(args, fmt: str, summary: dict) -> None:
    rows, flagged, settings = summary["rows"], summary["failed_test_check"], summary["settings"]
    dropped = sum(len(ids) for ids in summary["dropped_too_long"].values())
    tokens, problems, duplicates = summary["tokens"]["example"], summary["problems"], summary["duplicates_skipped"]
    unit = "files" if fmt == "text" else "problems"
    blocks = f" blocks of {args.max_length} tokens" if fmt == "text" else ""
    print(f"{problems} {unit} ({fmt} data) -> train {rows['train']}, eval {rows['eval']}{blocks} (held out by "
          f"task_id, seed {args.seed}); template '{settings['template']}'")
    if flagged:
        shown = ", ".join(f"{task}: {why}" for task, why in list(flagged.items())[:3])
        print(f"dropped by the test check: {len(flagged)} ({shown}{', ...' if len(flagged) > 3 else ''}); all listed "
              f"in {args.out}/{folders.PREPARED_STATS}")
    print(f"tokens per example: median {tokens['p50']}, p95 {tokens['p95']}, max {tokens['max']}; dropped as longer "
          f"than {args.max_length}: {dropped}" + (f"; duplicates skipped: {duplicates}" if duplicates else ""))
    if dropped > 0.05 * problems:
        print(f"note: {dropped} of {problems} problems are longer than --max-length {args.max_length}; raise it to "
              f"keep them (memory grows with it)")
    print(f"✓ saved in {args.out}/ (stats in {args.out}/{folders.PREPARED_STATS})")
    print("next: " + next_training(args))


# ----------------------------------------------------------------------------------------------------------
# A streamed source: raw text larger than memory.


def prepare_stream(args, source: dict, tokenizer) -> int:
    """A streamed source: its first --eval-files files, packed, are the eval split; train.py streams the rest."""
    stream = iter(data.open_stream(source))
    held_out = list(itertools.islice(stream, args.eval_files))
    if not held_out:
        raise StageError(f"{source['dataset']} has no rows")
    fmt = data.detect(list(held_out[0])) if args.format == "auto" else args.format
    if fmt != "text":
        raise StageError(f"{source['dataset']} holds {fmt} data, which fits in memory: run download_dataset.py "
                         f"without --streaming (streaming is for raw text, one file per row)")
    if next(stream, None) is None:
        raise StageError(f"{source['dataset']} has only {len(held_out)} files, all held out by --eval-files "
                         f"{args.eval_files}: lower it, or download it without --streaming")
    column = data.columns_for("text", list(held_out[0]))["code"]
    blocks = list(data.pack_blocks((row[column] for row in held_out), tokenizer, args.max_length))
    settings = {"format": "text", "template": prompts.NONE.name, "max_length": args.max_length,
                "eval_files": args.eval_files, "seed": args.seed, "model": models.model_id(args.model),
                "data": source["dataset"], "eos_token_id": tokenizer.eos_token_id,
                "tokenizer": models.tokenizer_fingerprint(args.model),
                "streaming": {"source": source, "column": column, "skip_files": len(held_out)}}
    lengths = [block["length"] for block in blocks]
    task_ids = {"eval": [f"file-{n}" for n in range(len(held_out))]}
    summary = {"settings": settings, "rows": {"eval": len(blocks)},
               "tokens": {"example": percentiles(lengths), "total": sum(lengths)}, "task_ids": task_ids,
               "fingerprint": data.data_fingerprint(task_ids, settings), "made_from": made_from(args)}
    save(args.out, {"eval": blocks}, summary)
    print(f"streamed text: the first {len(held_out)} files held out -> eval {len(blocks)} blocks of up to "
          f"{args.max_length} tokens; the rest is read lazily by train.py (run it with --max-steps)")
    print(f"✓ saved in {args.out}/ (stats in {args.out}/{folders.PREPARED_STATS})")
    print("next: " + next_training(args) + " --max-steps 1000")
    return 0



def next_training(args) -> str:
    """train.py on what this stage wrote and the model it tokenised for."""
    return cli.command("train.py", ("--model", args.model, folders.MODEL_DIR),
                       ("--data", args.out, folders.PREPARED_DIR)) + (" --demo" if args.demo else "")


if __name__ == "__main__":
    sys.exit(main())
