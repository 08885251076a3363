"""Watching training: readable progress lines, warnings, TensorBoard scalars, metrics.json, training_curves.png.

Used by pipeline/trainer.py (during training) and tools/training_dashboard.py (which reads what it writes).
Nothing heavy is imported at module level. Everything a log line shows is also in
the Trainer's log history (and so in each checkpoint's trainer_state.json), which is why a resumed run's
metrics.json and curves continue where the interrupted run stopped.

Writes, in the run's folder (checkpoints/ by default):
  metrics.json           the full history (step, epoch, losses, learning rate, gradient norm, trained and all
                         tokens and their rates, memory, elapsed time) and the run's totals; rewritten
                         atomically at every log
  training_curves.png    train and eval loss, learning rate; refreshed at every evaluation and at the end
  logs/                  TensorBoard event files: tensorboard --logdir checkpoints/logs
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from pipeline.folders import GIB

METRICS = "metrics.json"
CURVES = "training_curves.png"
LOGS = "logs"
RISING_LOGS = 3  # warn when the training loss rose this many logs in a row


def memory_label() -> str:
    """What memory_in_use() measures here, for log lines."""
    import torch

    return "GPU peak" if torch.cuda.is_available() else "RAM"


def memory_in_use() -> float:
    """Peak GPU memory allocated by this process on CUDA, else this process's resident memory, in GiB."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / GIB
    import psutil

    return psutil.Process().memory_info().rss / GIB


def loss_warning(losses: list[float]) -> str | None:
    """A warning when the latest training loss is not a number, or has risen RISING_LOGS logs in a row."""
    if not losses:
        return None
    if not math.isfinite(losses[-1]):
        return ("the training loss is not a number: the usual causes are a learning rate that is too high (try "
                "--lr 1e-4) or fp16 overflow on a GPU without bf16 (lower --lr; --max-grad-norm is 1.0)")
    recent = losses[-(RISING_LOGS + 1):]
    if len(recent) == RISING_LOGS + 1 and all(b > a for a, b in zip(recent, recent[1:])):
        return (f"the training loss rose {RISING_LOGS} logs in a row ({recent[0]:.4f} -> {recent[-1]:.4f}): "
                f"if it keeps rising, lower the learning rate (try --lr 1e-4)")
    return None


def history_of(log_history: list[dict]) -> list[dict]:
    """The Trainer's log history reduced to the rows a user reads (train and eval logs)."""
    keys = ("step", "epoch", "loss", "eval_loss", "eval_pass@1", "eval_solved", "learning_rate", "grad_norm",
            "num_input_tokens_seen", "trained_tokens", "tokens_per_second", "trained_tokens_per_second", "memory_gib",
            "elapsed_s")
    return [{key: entry[key] for key in keys if key in entry} for entry in log_history
            if "loss" in entry or "eval_loss" in entry]


def totals_of(history: list[dict], total_steps: int, finished: bool) -> dict:
    train = [row for row in history if "loss" in row]
    evals = [row for row in history if "eval_loss" in row]
    best = min(evals, key=lambda row: row["eval_loss"]) if evals else None
    scored = max((row for row in evals if "eval_pass@1" in row), key=lambda row: (row["eval_pass@1"], row["step"]),
                 default=None)
    totals = {
        "step": history[-1]["step"] if history else 0,
        "total_steps": total_steps,
        "finished": finished,
        "elapsed_s": max((row.get("elapsed_s", 0) for row in history), default=0),
        "tokens": max((row.get("num_input_tokens_seen", 0) for row in history), default=0),
        "trained_tokens": max((row.get("trained_tokens", 0) for row in history), default=0),
        "last_train_loss": train[-1]["loss"] if train else None,
        "best_eval_loss": best["eval_loss"] if best else None,
        "best_eval_step": best["step"] if best else None,
        "best_pass_at_1": scored["eval_pass@1"] if scored else None,
        "best_pass_at_1_step": scored["step"] if scored else None,
        "peak_memory_gib": max((row.get("memory_gib", 0) for row in history), default=0),
    }
    # Speeds over the whole run: totals divided by the time they took (evaluations included), never an average of
    # per-log rates, which weighs a short interval as much as a long one.
    seconds = totals["elapsed_s"]
    totals["trained_tokens_per_second"] = round(totals["trained_tokens"] / seconds, 1) if seconds else 0.0
    totals["tokens_per_second"] = round(totals["tokens"] / seconds, 1) if seconds else 0.0
    return totals


def plot_curves(history: list[dict], path: Path) -> None:
    """Train and eval loss over steps, and the learning rate; written atomically, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [row for row in history if "loss" in row]
    evals = [row for row in history if "eval_loss" in row]
    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[2, 1])
    if train:
        loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", color="tab:blue")
        lr_ax.plot([r["step"] for r in train], [r.get("learning_rate", 0) for r in train], color="tab:green")
    if evals:
        loss_ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss",
                     color="tab:orange")
    scored = [row for row in evals if "eval_pass@1" in row]
    if scored:  # train.py --score-checkpoints: the score beside the loss, which it need not follow
        score_ax = loss_ax.twinx()
        score_ax.plot([r["step"] for r in scored], [100 * r["eval_pass@1"] for r in scored], "s--",
                      color="tab:purple", label="held-out pass@1 (%)")
        score_ax.set_ylabel("held-out pass@1 (%)", color="tab:purple")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimiser step")
    lr_ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60}:{seconds % 60:02d}"


def text_bar(fraction: float, width: int = 30) -> str:
    """[#####-----] for a fraction in [0, 1], for terminal views."""
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * filled + "-" * (width - filled) + "]"
