"""Progress of a training run from its metrics.json: steps, loss trend, best eval loss, speed, ETA.

Run:
    python tools/training_dashboard.py                            # the run in checkpoints/
    python tools/training_dashboard.py --run runs/r8 --watch      # refresh every 5 s while it trains

Reads:  <run>/metrics.json (written by train.py at every log), or a metrics.json path.
Writes: nothing. Works on a running or a finished run.
Needs:  pipeline/ (in the folder above)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import cli, folders, monitoring  # noqa: E402


def smoothed(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average, as TensorBoard's smoothing slider."""
    out, last = [], None
    for value in values:
        last = value if last is None else weight * last + (1 - weight) * value
        out.append(last)
    return out


def trend(values: list[float], window: int = 10) -> str:
    recent = smoothed(values)[-window:]
    if len(recent) < 3:
        return "too early to tell"
    change = (recent[-1] - recent[0]) / max(abs(recent[0]), 1e-9)
    if change < -0.02:
        return f"falling ({100 * change:+.1f}% over the last {len(recent)} logs)"
    if change > 0.02:
        return f"rising ({100 * change:+.1f}% over the last {len(recent)} logs): consider a lower --lr"
    return f"flat ({100 * change:+.1f}% over the last {len(recent)} logs)"


def render(metrics: dict, source: Path) -> str:
    history, totals = metrics["history"], metrics["totals"]
    train = [row for row in history if "loss" in row]
    evals = [row for row in history if "eval_loss" in row]
    step, total = totals["step"], max(1, totals["total_steps"])
    elapsed = totals.get("elapsed_s") or 0.0
    per_step = elapsed / step if step else 0.0
    state = "finished" if totals.get("finished") else "running or stopped"
    lines = [f"run: {source} ({state})",
             f"progress: {monitoring.text_bar(step / total)} {step}/{total} steps ({100 * step / total:.0f}%) · "
             f"elapsed {monitoring.format_seconds(elapsed)} · {per_step:.2f} s/step · "
             f"ETA {monitoring.format_seconds(per_step * (total - step)) if not totals.get('finished') else '-'}"]
    if train:
        losses = [row["loss"] for row in train]
        best = min(train, key=lambda row: row["loss"])
        lines.append(f"train loss: last {losses[-1]:.4f} · smoothed {smoothed(losses)[-1]:.4f} · lowest "
                     f"{best['loss']:.4f} at step {best['step']} · first {losses[0]:.4f}")
        lines.append(f"trend: {trend(losses)}")
    if evals:
        lines.append(f"eval loss: best {totals['best_eval_loss']:.4f} at step {totals['best_eval_step']} · last "
                     f"{evals[-1]['eval_loss']:.4f} ({len(evals)} evaluations)")
    else:
        lines.append("eval loss: not computed yet")
    if totals.get("best_pass_at_1") is not None:  # train.py --score-checkpoints
        scored = [row for row in evals if "eval_pass@1" in row]
        lines.append(f"held-out pass@1: best {100 * totals['best_pass_at_1']:.1f}% at step "
                     f"{totals['best_pass_at_1_step']} · last {100 * scored[-1]['eval_pass@1']:.1f}%")
    if elapsed and totals.get("tokens"):  # totals over time, not an average of per-log rates
        trained = totals.get("trained_tokens", 0)
        lines.append(f"speed: {trained / elapsed:,.0f} trained tok/s, {totals['tokens'] / elapsed:,.0f} tok/s in all "
                     f"(prompts included) · {trained:,} trained of {totals['tokens']:,} tokens so far")
    lines.append(f"peak memory: {totals.get('peak_memory_gib', 0):.2f} GiB")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(__doc__)
    # --run, as in checkpoint_manager.py: one flag style across the tools
    parser.add_argument("--run", default=folders.CHECKPOINTS_DIR,
                        help="the run's folder, or its metrics.json (default: %(default)s)")
    parser.add_argument("--watch", action="store_true", help="refresh until the run finishes (Ctrl-C to quit)")
    parser.add_argument("--interval", type=cli.positive(float), default=5.0,
                        help="seconds between refreshes (default: %(default)s)")
    return parser


@cli.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    source = Path(args.run)
    path = source if source.suffix == ".json" else source / monitoring.METRICS
    while True:
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise cli.StageError(f"{path} not found: train.py writes it at the first log of a run") from None
        except json.JSONDecodeError:
            raise cli.StageError(f"{path} is not valid JSON") from None
        try:
            text = render(metrics, source)
        except (KeyError, TypeError, AttributeError, IndexError, ValueError):
            raise cli.StageError(f"{path} is not a metrics.json written by train.py (its fields are not what "
                                    f"train.py writes): pass a run folder or its metrics.json") from None
        if not args.watch:
            print(text)
            return 0
        print("\033[2J\033[H" + time.strftime("%H:%M:%S ") + "(Ctrl-C to quit)\n" + text, flush=True)
        if metrics["totals"].get("finished"):  # render() checked the shape
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
