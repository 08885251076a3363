"""Manage the checkpoints of a run: list them, keep the last N, delete one, find the best, try one out.

Run:
    python tools/checkpoint_manager.py list
    python tools/checkpoint_manager.py best                  # lowest eval loss
    python tools/checkpoint_manager.py cleanup --keep 2
    python tools/checkpoint_manager.py delete checkpoints/checkpoint-50
    python tools/checkpoint_manager.py test checkpoints/checkpoint-100   # its completions beside the base model's

Reads:  checkpoints/ (train.py), model/ for `test`
Writes: only `cleanup` and `delete` remove checkpoint folders; checkpoints/final/ is never removed by cleanup.
Needs:  pipeline/ (in the folder above)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import cli, folders, inference, models, run_folder  # noqa: E402
from pipeline.cli import StageError  # noqa: E402

TEST_PROBLEMS = 3  # bundled problems used by `test`


def losses_at(folder: Path, step: int) -> tuple[float | None, float | None]:
    """The last train loss logged up to `step` and the eval loss at `step`, from a checkpoint's trainer state."""
    state_path = folder / run_folder.TRAINER_STATE
    if not state_path.is_file():
        return None, None
    history = json.loads(state_path.read_text()).get("log_history", [])
    train = [entry["loss"] for entry in history if "loss" in entry and entry["step"] <= step]
    evals = [entry["eval_loss"] for entry in history if "eval_loss" in entry and entry["step"] == step]
    return (train[-1] if train else None), (evals[-1] if evals else None)


def describe(run: Path) -> list[dict]:
    rows = []
    for folder in run_folder.find_checkpoints(run):
        step = run_folder.step_of(folder)
        train_loss, eval_loss = losses_at(folder, step)
        rows.append({"path": folder, "step": step, "train_loss": train_loss, "eval_loss": eval_loss, "final": False,
                     "problem": run_folder.checkpoint_problem(folder)})
    final = run / folders.FINAL_ADAPTER
    if (final / folders.ADAPTER_CONFIG).is_file():
        settings_path = final / folders.TRAINING_SETTINGS
        result = json.loads(settings_path.read_text()).get("result", {}) if settings_path.is_file() else {}
        rows.append({"path": final, "step": result.get("global_step"), "train_loss": result.get("last_train_loss"),
                     "eval_loss": result.get("eval_loss"), "final": True, "problem": None})
    for row in rows:
        files = [f for f in row["path"].rglob("*") if f.is_file()]
        row["size_mb"] = sum(f.stat().st_size for f in files) / 1e6
        row["date"] = time.strftime("%Y-%m-%d %H:%M", time.localtime(max((f.stat().st_mtime for f in files),
                                                                         default=0)))
    return rows


def fmt(value, pattern="{:.4f}") -> str:
    return "-" if value is None else pattern.format(value)


def command_list(run: Path) -> int:
    rows = describe(run)
    if not rows:
        print(f"no checkpoints in {run}/")
        return 0
    print(f"{'checkpoint':28s} {'step':>6s} {'train loss':>11s} {'eval loss':>10s} {'size':>9s}  date")
    for row in rows:
        note = "  <- final adapter" if row["final"] else (f"  (unusable: {row['problem']})" if row["problem"] else "")
        print(f"{str(row['path']):28s} {fmt(row['step'], '{}'):>6s} {fmt(row['train_loss']):>11s} "
              f"{fmt(row['eval_loss']):>10s} {row['size_mb']:7.1f}MB  {row['date']}{note}")
    return 0


def command_best(run: Path) -> int:
    rated = [row for row in describe(run) if row["eval_loss"] is not None and not row["problem"]]
    if not rated:
        raise StageError(f"no checkpoint in {run}/ has an eval loss yet (train.py evaluates every --save-steps)")
    best = min(rated, key=lambda row: (row["eval_loss"], row["final"]))
    print(f"best: {best['path']} (step {best['step']}, eval loss {best['eval_loss']:.4f})")
    return 0


def command_cleanup(run: Path, keep: int) -> int:
    """Delete all but the newest `keep` checkpoints that train.py wrote; folders merely named like one stay."""
    found = run_folder.find_checkpoints(run)
    ours = [folder for folder in found if run_folder.written_by_train(folder)]
    doomed = ours[:-keep] if keep else ours
    for folder in doomed:
        shutil.rmtree(folder)
        print(f"deleted {folder}")
    final = " and the final adapter" if (run / folders.FINAL_ADAPTER).is_dir() else ""
    print(f"kept {len(ours) - len(doomed)} checkpoint(s){final}")
    for folder in sorted(set(found) - set(ours)):
        print(f"note: left {folder}/ alone: train.py did not write it")
    return 0


def command_delete(run: Path, path: Path) -> int:
    """Delete one checkpoint-<step>/ or final/ of the run folder, and nothing else."""
    inside = path.resolve().parent == run.resolve()
    names = {p.name for p in run_folder.find_checkpoints(run)} | {folders.FINAL_ADAPTER}
    is_checkpoint = path.name in names
    if not (inside and is_checkpoint and (path / folders.ADAPTER_CONFIG).is_file()
            and run_folder.written_by_train(path)):
        raise StageError(f"{path} is not a checkpoint or the final adapter of the run {run}/ (pass --run for "
                         f"another run folder): nothing deleted")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
    shutil.rmtree(path)
    print(f"deleted {path}/ ({size:.1f} MB)")
    return 0


def command_test(run: Path, path: Path, model_dir: str, max_new_tokens: int) -> int:
    template = inference.adapter_template(path)  # also a clear line when it is not an adapter
    models.require_model_dir(model_dir)
    models.quiet_libraries()
    choice = models.pick_device()
    tokenizer = models.load_tokenizer(model_dir)
    titles, prompts = zip(*inference.bundled_prompts(template, tokenizer, TEST_PROBLEMS))
    model = inference.load_for_inference(model_dir, None, choice, models.use_4bit(choice, no_4bit=False))
    base = inference.generate(model, tokenizer, list(prompts), max_new_tokens, template=template)
    tuned = inference.attach_adapter(model, path, model_dir)
    tuned = inference.generate(tuned, tokenizer, list(prompts), max_new_tokens, template=template)
    for title, before, after in zip(titles, base, tuned):
        print(f"=== {title}")
        print(f"--- base model:\n{before[0]['completion'].rstrip()}")
        print(f"--- {path}:\n{after[0]['completion'].rstrip()}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(__doc__)
    parser.add_argument("--run", default=folders.CHECKPOINTS_DIR, help="the run's folder (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every checkpoint with its step, losses, size and date")
    commands.add_parser("best", help="the checkpoint with the lowest eval loss")
    cleanup = commands.add_parser("cleanup", help="delete all but the newest N checkpoints (never the final adapter)")
    cleanup.add_argument("--keep", type=cli.non_negative(int), required=True, help="checkpoints to keep")
    delete = commands.add_parser("delete", help="delete one checkpoint folder")
    delete.add_argument("path")
    test = commands.add_parser("test", help="completions of a few bundled problems: base model vs this checkpoint")
    test.add_argument("path")
    test.add_argument("--model", default=folders.MODEL_DIR, help="base model folder (default: %(default)s)")
    test.add_argument("--max-new-tokens", type=cli.positive(int), default=128)
    return parser


@cli.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run = Path(args.run)
    if args.command in ("list", "best", "cleanup") and not run.is_dir():
        raise StageError(f"{run}/ not found: train.py writes its checkpoints there (or pass --run)")
    if args.command in ("cleanup", "delete") and folders.owner(run) != "train":
        found = folders.owner(run)
        holds = "nothing" if found is None else folders.HOLDS.get(found, "files this pipeline did not write")
        raise StageError(f"{run}/ is not a folder train.py wrote (it holds {holds}): nothing deleted; pass --run "
                         f"with a training run's folder")
    if args.command == "list":
        return command_list(run)
    if args.command == "best":
        return command_best(run)
    if args.command == "cleanup":
        return command_cleanup(run, args.keep)
    if args.command == "delete":
        return command_delete(run, Path(args.path))
    return command_test(run, Path(args.path), args.model, args.max_new_tokens)


if __name__ == "__main__":
    sys.exit(main())
