"""What a user watches: log lines, TensorBoard, curves, metrics.json, and the four tools."""

import json
import math
import shutil
import sys
from pathlib import Path

import monitoring

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import checkpoint_manager  # noqa: E402
import gpu_monitor  # noqa: E402
import system_check  # noqa: E402
import training_dashboard  # noqa: E402


def test_loss_warnings_for_nan_and_a_rising_loss():
    assert "not a number" in monitoring.loss_warning([1.0, math.nan])
    assert "rose 3 logs in a row" in monitoring.loss_warning([2.0, 1.0, 1.1, 1.2, 1.3])
    assert monitoring.loss_warning([2.0, 1.5, 1.6, 1.2, 1.3]) is None
    assert monitoring.loss_warning([]) is None


def test_metrics_json_history_matches_the_trained_steps(trained_smoke):
    metrics = json.loads((trained_smoke / monitoring.METRICS).read_text())
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
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "train/tokens_per_second", "train/memory_gib"} <= tags
    assert [event.step for event in accumulator.Scalars("train/loss")] == [1, 2, 3, 4]


def test_training_curves_png_is_written(trained_smoke):
    assert (trained_smoke / monitoring.CURVES).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_log_lines_are_readable(demo_model, demo_prepared, tmp_path, capsys):
    import train

    assert train.main(["--model", str(demo_model), "--data", str(demo_prepared), "--out", str(tmp_path / "c"),
                       "--max-steps", "2", "--logging-steps", "1", "--save-steps", "2", "--batch-size", "2", "--grad-accum", "1"]) == 0
    out = capsys.readouterr().out + capsys.readouterr().err
    line = next(line for line in out.splitlines() if line.startswith("step 2/2 · epoch"))
    for part in ("loss ", "lr ", "grad norm ", "tok/s", "RAM ", "elapsed", "ETA"):
        assert part in line, line


def test_dashboard_on_a_finished_run(trained_smoke, capsys):
    assert training_dashboard.main([str(trained_smoke)]) == 0
    out = capsys.readouterr().out
    assert "(finished)" in out and "4/4 steps (100%)" in out and "eval loss: best" in out and "trend:" in out


def test_dashboard_without_metrics_says_what_to_do(tmp_path, capsys):
    assert training_dashboard.main([str(tmp_path)]) == 2
    assert "train.py" in capsys.readouterr().err


def test_checkpoint_manager_list_best_test_cleanup_delete(trained_smoke, demo_model, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_smoke, run)
    assert checkpoint_manager.main(["--run", str(run), "list"]) == 0
    listing = capsys.readouterr().out
    assert "checkpoint-4" in listing and "<- final adapter" in listing and "MB" in listing
    assert checkpoint_manager.main(["--run", str(run), "best"]) == 0
    assert "best: " in capsys.readouterr().out
    assert checkpoint_manager.main(["--run", str(run), "test", str(run / "checkpoint-4"), "--model", str(demo_model),
                                    "--max-new-tokens", "8"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("--- base model:") == checkpoint_manager.TEST_PROBLEMS and "checkpoint-4:" in shown
    assert checkpoint_manager.main(["--run", str(run), "delete", str(run / "logs")]) == 2  # not a checkpoint
    assert (run / "logs").is_dir()
    assert checkpoint_manager.main(["--run", str(run), "cleanup", "--keep", "0"]) == 0
    assert not list(run.glob("checkpoint-*")) and (run / "final").is_dir()
    assert checkpoint_manager.main(["--run", str(run), "delete", str(run / "final")]) == 0
    assert not (run / "final").exists()


def test_system_check_reports_4bit_and_a_recommendation(capsys):
    code = system_check.main([])
    out = capsys.readouterr().out
    assert "bitsandbytes 4-bit: NF4 forward and backward ran" in out and "recommendation:" in out
    assert code == (0 if "all required checks passed" in out else 1)


def test_gpu_monitor_once_without_a_gpu(capsys):
    assert gpu_monitor.main(["--once"]) == 0
    out = capsys.readouterr().out
    assert ("no NVIDIA GPU found" in out and "RAM:" in out) or out.startswith("GPU 0")
