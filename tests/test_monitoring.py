"""What a user watches during training: log lines, TensorBoard, curves, metrics.json."""

import json
import math

import pytest

from pipeline import monitoring, prompts


def test_loss_warnings_for_nan_and_a_rising_loss():
    assert "not a number" in monitoring.loss_warning([1.0, math.nan])
    assert "rose 3 logs in a row" in monitoring.loss_warning([2.0, 1.0, 1.1, 1.2, 1.3])
    assert monitoring.loss_warning([2.0, 1.5, 1.6, 1.2, 1.3]) is None
    assert monitoring.loss_warning([]) is None


def test_metrics_json_history_matches_the_trained_steps(trained_smoke):
    metrics = json.loads((trained_smoke / monitoring.METRICS).read_text(encoding="utf-8"))
    train = [row for row in metrics["history"] if "loss" in row]
    assert [row["step"] for row in train] == [1, 2, 3, 4]
    assert metrics["totals"]["step"] == 4 and metrics["totals"]["finished"] is True
    assert all(row["tokens_per_second"] > 0 and row["memory_gib"] > 0 and "learning_rate" in row for row in train)
    assert [row["step"] for row in metrics["history"] if "eval_loss" in row] == [2, 4]


def test_tensorboard_events_hold_the_loss_and_the_extra_scalars(trained_smoke):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((trained_smoke / monitoring.LOGS).rglob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "train/tokens_per_second",
            "train/trained_tokens_per_second", "train/trained_tokens", "train/memory_gib"} <= tags
    assert [event.step for event in accumulator.Scalars("train/loss")] == [1, 2, 3, 4]


def test_training_curves_png_is_written(trained_smoke):
    assert (trained_smoke / monitoring.CURVES).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_log_lines_are_readable(demo_model, demo_prepared, tmp_path, capsys):
    import train

    assert train.main(["--model", str(demo_model), "--data", str(demo_prepared), "--out", str(tmp_path / "c"),
                       "--max-steps", "2", "--logging-steps", "1", "--save-steps", "2", "--batch-size", "2",
                       "--grad-accum", "1"]) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    line = next(line for line in out.splitlines() if line.startswith("step 2/2 · epoch"))
    for part in ("loss ", "lr ", "grad norm ", "trained tok/s (", "all)", "RAM ", "elapsed", "ETA"):
        assert part in line, line
    # the output is not a terminal (a log file, an IDE's pane): the step lines, no progress bar redrawn with \r
    assert "\r" not in out and "it/s]" not in out


@pytest.mark.slow
def test_trained_tokens_are_the_labelled_ones_and_speeds_divide_totals_by_time(demo_trained):
    """The demo run (epochs of 9 steps of 8, the last of 1) logs every 10 steps: at steps 90 and 180, the ends of
    epochs, it has seen every problem exactly 10 and 20 times; between, a part of one more epoch."""
    from datasets import load_from_disk

    rows = load_from_disk(str(demo_trained["prepared"]))["train"]
    assert len(rows) == 65
    trained_per_epoch = sum(sum(label != prompts.IGNORE_INDEX for label in row["labels"][1:]) for row in rows)
    all_per_epoch = sum(len(row["input_ids"]) for row in rows)
    metrics = json.loads((demo_trained["adapter"].parent / monitoring.METRICS).read_text(encoding="utf-8"))
    train = [row for row in metrics["history"] if "loss" in row]
    assert [row["step"] for row in train] == list(range(10, 181, 10))
    for row in train:
        epochs = row["step"] // 9
        if row["step"] % 9 == 0:
            assert row["trained_tokens"] == epochs * trained_per_epoch
            assert row["num_input_tokens_seen"] == epochs * all_per_epoch  # prompts too, no padding
        else:
            assert epochs * trained_per_epoch < row["trained_tokens"] < (epochs + 1) * trained_per_epoch
    assert all(0 < row["trained_tokens_per_second"] < row["tokens_per_second"] for row in train)
    totals = metrics["totals"]
    assert totals["trained_tokens"] == 20 * trained_per_epoch
    assert totals["trained_tokens_per_second"] == round(totals["trained_tokens"] / totals["elapsed_s"], 1)
