"""Run every stage in order: download_model -> download_dataset -> prepare_data -> train -> verify_model -> export
-> evaluate (the base, the adapter and the export, side by side).

Run:
    python run_pipeline.py --demo                 # offline demo on the CPU, about a minute
    python run_pipeline.py                        # the real run: Qwen2.5-Coder-0.5B on MBPP (needs a GPU and the Hub)
    python run_pipeline.py --max-steps 20 --lr 1e-4 --template guide

Any other flag goes to every stage that has it (--force to both downloads, --seed to prepare_data and train,
--max-steps to train, ...). Folder flags (--model, --data, --out) mean a different folder in each stage, so the
pipeline always uses the default folders; run the stages one by one to use others.

Reads/writes: model/, data/, prepared_data/, checkpoints/, results/, export/ (see each stage's header).
Needs:  every stage file above, and pipeline/
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from pipeline import cli, folders
from pipeline.cli import StageError

# export before evaluate: the export is scored beside the adapter, so the table shows the shipped model's score.
STAGES = ["download_model", "download_dataset", "prepare_data", "train", "verify_model", "export", "evaluate"]
FOLDER_FLAGS = {"--model", "--data", "--out", "--adapter"}

# A held-out member of the demo's string family (with the default seed), asked the way the demo trained: the demo
# model learned that pattern, not Python, so other tasks or other test words get fragments of training solutions.
DEMO_TRY = ("--prompt \"Write a function to convert a given title to lower case.\" "
            "--test \"assert lower_title('hello') == 'hello'\" --test \"assert lower_title('Python') == 'python'\" "
            "--test \"assert lower_title('data Science') == 'data science'\"")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(__doc__)
    parser.add_argument("--demo", action="store_true",
                        help="run offline on the tiny demo model and the bundled problems")
    return parser


@cli.report_errors
def main(argv=None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    stage_args = check(args, extra)
    return run(args, stage_args)


def check(args, extra: list[str]) -> dict[str, list[str]]:
    """Each stage's command line, after checking that every flag given belongs to some stage and that every stage
    accepts its command line: a bad value ends here, not after the stages before the one it reaches."""
    groups = group_flags(extra)
    parsers = {stage: importlib.import_module(stage).build_parser() for stage in STAGES}
    known = {stage: stage_flags(parser) for stage, parser in parsers.items()}
    problems = [f"{flag} means a different folder in each stage: run the stages one by one to change folders"
                for flag in groups if flag in FOLDER_FLAGS]
    problems += [f"no stage has the flag {flag}" for flag in groups
                 if flag not in FOLDER_FLAGS and not any(flag in flags for flags in known.values())]
    cli.fail_on_problems(problems)
    stage_args = {stage: stage_argv(stage, known[stage], groups, args.demo) for stage in STAGES}
    cli.fail_on_problems([problem for stage in STAGES
                          if (problem := parse_problem(stage, parsers[stage], stage_args[stage]))])
    return stage_args


def run(args, stage_args: dict[str, list[str]]) -> int:
    """Each stage's main() in this process, in order; stop at the first that fails."""
    started = time.time()
    for number, stage in enumerate(STAGES, start=1):
        print(f"\n=== [{number}/{len(STAGES)}] {stage}.py {' '.join(stage_args[stage])}", flush=True)
        code = importlib.import_module(stage).main(stage_args[stage])
        if code != 0:
            print(f"\nstopped: {stage}.py failed (exit {code}); fix the problem above and rerun (finished stages are "
                  f"skipped)", file=sys.stderr)
            return code
    print(f"\n✓ pipeline finished in {time.time() - started:.0f}s. {verdict()}.\n"
          f"  The adapter is in {folders.CHECKPOINTS_DIR}/{folders.FINAL_ADAPTER}/, the evaluation in "
          f"{folders.RESULTS_DIR}/, the merged model in {folders.EXPORT_DIR}/; try: python generate.py "
          + (DEMO_TRY if args.demo else '--prompt "Write a function to ..."'))
    return 0


def verdict() -> str:
    """What evaluate.py found for the fine-tune against the base, in its own words (interval and p-value)."""
    summary = json.loads((Path(folders.RESULTS_DIR) / folders.SUMMARY).read_text(encoding="utf-8"))
    comparisons = summary.get("comparisons", {})
    if not comparisons:  # data without tests: held-out losses
        losses = {label: model["eval_loss"] for label, model in summary["models"].items()}
        return "held-out loss " + ", ".join(f"{label} {loss:.3f}" for label, loss in losses.items())
    return next(iter(comparisons.values()))["verdict"]


def group_flags(extra: list[str]) -> dict[str, list[str]]:
    """['--lr', '1e-4', '--force'] -> {'--lr': ['1e-4'], '--force': []}"""
    groups: dict[str, list[str]] = {}
    current = None
    for token in extra:
        if token.startswith("--"):
            flag, _, value = token.partition("=")
            current = flag
            groups[current] = [value] if value else []
        elif current is None:
            raise StageError(f"unexpected argument {token!r}: flags start with --")
        else:
            groups[current].append(token)
    return groups


def parse_problem(stage: str, parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """What the stage's own parser says of its command line, as one line naming the stage, or None."""
    def refuse(message: str):
        raise StageError(f"{stage}.py: {message}")

    parser.error = refuse  # argparse's way out is to print its usage and exit
    try:
        parser.parse_args(argv)
    except StageError as problem:
        return str(problem)
    return None


def stage_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings if option.startswith("--")}


def stage_argv(stage: str, flags: set[str], groups: dict[str, list[str]], demo: bool) -> list[str]:
    chosen = dict(groups)
    if demo and "--demo" in flags:  # the stage's own demo settings (its --help lists them); the user's flags win
        chosen["--demo"] = []
    if stage in ("verify_model", "evaluate"):
        chosen["--adapter"] = [f"{folders.CHECKPOINTS_DIR}/{folders.FINAL_ADAPTER}"]
    if stage == "evaluate":
        chosen["--compare-base"] = []
        chosen["--merged"] = [folders.EXPORT_DIR]
    if stage in ("evaluate", "export"):
        # The pipeline's results/ and export/ hold this run's: the stage line printed below says it replaces them.
        chosen["--overwrite"] = []
    argv = []
    for flag, values in chosen.items():
        if flag in flags:
            argv += [flag, *values]
    return argv


if __name__ == "__main__":
    sys.exit(main())
