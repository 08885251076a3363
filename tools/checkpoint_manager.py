"""Manage the checkpoints of a run: list them, keep the last N, delete one, find the best, try one out.

Run:
    python tools/checkpoint_manager.py list
    python tools/checkpoint_manager.py best                  # highest held-out pass@1 if scored, else lowest eval loss
    python tools/checkpoint_manager.py best --scores results # by the scores of evaluate.py --checkpoints
    python tools/checkpoint_manager.py cleanup --keep 2
    python tools/checkpoint_manager.py delete checkpoints/checkpoint-50
    python tools/checkpoint_manager.py test checkpoints/checkpoint-100   # its completions beside the base model's

Reads:  checkpoints/ (train.py), model/ for `test`, results/ for `best --scores` (evaluate.py --checkpoints)
Writes: only `cleanup` and `delete` remove checkpoint folders; checkpoints/final/ is never removed by cleanup.
Needs:  pipeline/ (in the folder above)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import cli, folders, inference, merging, models, run_folder  # noqa: E402
from pipeline.cli import StageError  # noqa: E402

TEST_PROBLEMS = 3  # bundled problems used by `test`


def figures_at(folder: Path, step: int) -> dict:
    """The last train loss logged up to `step`, and the eval loss and held-out pass@1 (train.py
    --score-checkpoints) at `step`, from a checkpoint's trainer state."""
    state_path = folder / run_folder.TRAINER_STATE
    history = json.loads(state_path.read_text(encoding="utf-8")).get("log_history", []) if state_path.is_file() else []
    train = [entry["loss"] for entry in history if "loss" in entry and entry["step"] <= step]
    evals = [entry for entry in history if "eval_loss" in entry and entry["step"] == step]
    return {"train_loss": train[-1] if train else None, "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "pass@1": evals[-1].get("eval_pass@1") if evals else None}


def describe(run: Path) -> list[dict]:
    rows = []
    for folder in run_folder.find_checkpoints(run):
        step = run_folder.step_of(folder)
        rows.append({"path": folder, "step": step, **figures_at(folder, step), "final": False,
                     "problem": run_folder.checkpoint_problem(folder)})
    final = run / folders.FINAL_ADAPTER
    if (final / folders.ADAPTER_CONFIG).is_file():
        settings_path = final / folders.TRAINING_SETTINGS
        settings = json.loads(settings_path.read_text(encoding="utf-8")) if settings_path.is_file() else {}
        result = settings.get("result", {})
        rows.append({"path": final, "step": result.get("global_step"), "train_loss": result.get("last_train_loss"),
                     "eval_loss": result.get("eval_loss"), "pass@1": result.get("eval_pass@1"), "final": True,
                     "problem": None})
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
    scored = any(row["pass@1"] is not None for row in rows)
    print(f"{'checkpoint':28s} {'step':>6s} {'train loss':>11s} {'eval loss':>10s}"
          + (f" {'pass@1':>7s}" if scored else "") + f" {'size':>9s}  date")
    for row in rows:
        note = "  <- final adapter" if row["final"] else (f"  (unusable: {row['problem']})" if row["problem"] else "")
        score = f" {fmt(row['pass@1'] and 100 * row['pass@1'], '{:.1f}%'):>7s}" if scored else ""
        print(f"{str(row['path']):28s} {fmt(row['step'], '{}'):>6s} {fmt(row['train_loss']):>11s} "
              f"{fmt(row['eval_loss']):>10s}{score} {row['size_mb']:7.1f}MB  {row['date']}{note}")
    return 0


def command_best(run: Path, scores: str | None) -> int:
    """By held-out pass@1 where checkpoints were scored (evaluate.py --checkpoints, or train.py
    --score-checkpoints), else by eval loss; ties are said to be ties."""
    if scores:
        return best_by_evaluation(run, Path(scores))
    rows = [row for row in describe(run) if not row["problem"]]
    scored = [row for row in rows if row["pass@1"] is not None]
    if scored:
        top = max(row["pass@1"] for row in scored)
        steps = {row["step"] for row in scored if row["final"]}  # a checkpoint of the final step is final/ again
        best = [row for row in scored if row["pass@1"] == top and (row["final"] or row["step"] not in steps)]
        tied = (f"; tied with {', '.join(str(row['path']) for row in best[:-1])} (a tie: either will do)"
                if len(best) > 1 else "")
        print(f"best by held-out pass@1: {best[-1]['path']} (step {best[-1]['step']}, {100 * top:.1f}%, scored "
              f"during training){tied}; how sure: {cli.command('evaluate.py', ('--checkpoints', run, None))}")
        return 0
    rated = [row for row in rows if row["eval_loss"] is not None]
    if not rated:
        raise StageError(f"no checkpoint in {run}/ has an eval loss yet (train.py evaluates every --save-steps)")
    best = min(rated, key=lambda row: (row["eval_loss"], row["final"]))
    print(f"best by eval loss: {best['path']} (step {best['step']}, eval loss {best['eval_loss']:.4f}); the loss is "
          f"not the score: {cli.command('evaluate.py', ('--checkpoints', run, None))} runs their code")
    return 0


def best_by_evaluation(run: Path, results: Path) -> int:
    """The best checkpoint as evaluate.py --checkpoints found it, with how sure that is."""
    summary_path = results / folders.SUMMARY
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    found = summary.get("checkpoints")
    adapters = [model["identity"].get("adapter", "") for model in summary.get("models", {}).values()]
    if not found or not any(Path(adapter).parent == run.resolve() for adapter in adapters):
        raise StageError(f"{results}/ holds no scores of the checkpoints of {run}/: run "
                         f"{cli.command('evaluate.py', ('--checkpoints', run, None), ('--out', results, None))} first")
    best, scores = found["best"], summary["models"]
    where = {label: Path(os.path.relpath(scores[label]["identity"]["adapter"])) for label in found["steps"]}
    for label, step in sorted(found["steps"].items(), key=lambda item: item[1]):
        low, high = scores[label]["intervals"]["pass@1"]
        print(f"{str(where[label]):28s} step {step:>6} pass@1 {100 * scores[label]['pass@1']:5.1f}% [{100 * low:.1f}, "
              f"{100 * high:.1f}]" + ("  <- best" if label == best else ""))
    against = found.get("best_against_runner_up")
    tied = [str(where[label]) for label in found["steps"]
            if label != best and scores[label]["pass@1"] == scores[best]["pass@1"]]
    sure = (f"; against the runner-up, {where[found['runner_up']]}: {against['verdict'].split(': ', 1)[1]}"
            if against else " (the only one)")
    sure += f"; tied with {', '.join(tied)}: on these problems the choice makes no difference" if tied else ""
    print(f"best by held-out pass@1: {where[best]} (step {found['best_step']}){sure}")
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
    choice, load_in_4bit = inference.loading(model_dir, path, models.pick_device())  # the base it was trained on
    tokenizer = models.load_tokenizer(model_dir)
    titles, prompts = zip(*merging.bundled_prompts(template, tokenizer, TEST_PROBLEMS))
    model = inference.load_model_as(model_dir, None, choice, load_in_4bit)
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
    # --run after the command too (`list --run runs/r8`): the same flag, taken wherever it is typed
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--run", default=argparse.SUPPRESS, help="the run's folder (default: checkpoints)")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser
    commands.add_parser = lambda *args, **kwargs: add(*args, parents=[run], **kwargs)
    commands.add_parser("list", help="every checkpoint with its step, losses, size and date")
    best = commands.add_parser("best", help="the checkpoint with the highest held-out pass@1 where checkpoints were "
                                            "scored, else the lowest eval loss")
    best.add_argument("--scores", default=None, metavar="RESULTS",
                      help="the folder of evaluate.py --checkpoints (its summary.json)")
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
        return command_best(run, args.scores)
    if args.command == "cleanup":
        return command_cleanup(run, args.keep)
    if args.command == "delete":
        return command_delete(run, Path(args.path))
    return command_test(run, Path(args.path), args.model, args.max_new_tokens)


if __name__ == "__main__":
    sys.exit(main())
