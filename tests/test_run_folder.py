"""Long runs that survive: graceful stop, resume that really continues, crash safety, fallback."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import folders, inference, models, monitoring, run_folder, trainer

import train
from conftest import assert_adapter_loaded, one_error_line, train_argv

ROOT = Path(__file__).resolve().parent.parent


def run_args(model, prepared, out, *extra):
    """A short run at a learning rate that moves the demo's weights visibly; the steps and saves as `extra` says."""
    return train_argv(model, prepared, out, *extra, max_steps=None, save_steps=None, keep_last=None, lr="1e-3")


def logged(checkpoint: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, learning rate) from a checkpoint's trainer_state.json."""
    history = json.loads((checkpoint / run_folder.TRAINER_STATE).read_text(encoding="utf-8"))["log_history"]
    return {entry["step"]: (entry["loss"], entry["learning_rate"]) for entry in history if "loss" in entry}


# 8 steps of 8 x 2 examples, 5 steps an epoch: a log every 2 steps, an evaluation and a checkpoint every 4.
SCHEDULE = ("--max-steps", "8", "--batch-size", "8", "--grad-accum", "2", "--logging-steps", "2", "--save-steps", "4")
TIMING = {"tokens_per_second", "trained_tokens_per_second", "memory_gib", "elapsed_s"}  # the machine's, not the run's


def reproducible(out: Path) -> tuple[list[dict], dict, bytes]:
    """What a run logged and ended with, but for its timing: metrics.json's rows, the result, the adapter's bytes."""
    rows = [{key: value for key, value in row.items() if key not in TIMING}
            for row in folders.read_json(out / monitoring.METRICS)["history"]]
    result = folders.read_json(out / folders.FINAL_ADAPTER / folders.TRAINING_SETTINGS)["result"]
    return rows, {key: result[key] for key in ("global_step", "train_loss", "last_train_loss", "eval_loss")}, (
        out / folders.FINAL_ADAPTER / folders.ADAPTER_WEIGHTS).read_bytes()


@pytest.fixture(scope="module")
def uninterrupted(demo_model, demo_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "checkpoints"
    assert train.main(run_args(demo_model, demo_prepared, out, *SCHEDULE)) == 0
    return out


def test_ctrl_c_saves_a_checkpoint_and_resume_logs_what_an_uninterrupted_run_logs(demo_model, demo_prepared,
                                                                                    uninterrupted, tmp_path,
                                                                                    monkeypatch, capsys):
    """Stopped at step 3, mid-epoch, between two logs, with LoRA dropout: the resumed run trains the rest of that epoch
    on the same batches, logs the same losses (step 4's log averages steps 3 and 4), and ends with the same weights,
    bit for bit."""
    on_step_end = trainer.GracefulStop.on_step_end

    def press_ctrl_c_at_step_3(self, args, state, control, **kwargs):
        if state.global_step == 3 and self.signal_name is None:
            signal.raise_signal(signal.SIGINT)  # handled by the real signal handler
        return on_step_end(self, args, state, control, **kwargs)

    out = tmp_path / "checkpoints"
    monkeypatch.setattr(trainer.GracefulStop, "on_step_end", press_ctrl_c_at_step_3)
    # --overwrite, as a user starting over types it: the resume command printed must not carry it (--resume and
    # --overwrite contradict each other)
    assert train.main(run_args(demo_model, demo_prepared, out, *SCHEDULE, "--overwrite")) == 128 + signal.SIGINT
    printed = capsys.readouterr()
    assert "SIGINT received" in printed.err
    assert [p.name for p in run_folder.find_checkpoints(out)] == ["checkpoint-3"]
    assert not (out / folders.FINAL_ADAPTER).exists()

    monkeypatch.setattr(trainer.GracefulStop, "on_step_end", on_step_end)
    (resume,) = [line for line in printed.out.splitlines() if line.startswith("resume with: python train.py ")]
    assert train.main(shlex.split(resume)[4:]) == 0, capsys.readouterr().err  # the command, as printed
    resumed, reference = reproducible(out), reproducible(uninterrupted)
    assert [(row["step"], "eval_loss" in row) for row in reference[0]] == [
        (2, False), (4, False), (4, True), (6, False), (8, False), (8, True)]
    assert resumed[0] == reference[0]  # losses, gradient norms, learning rates, tokens: equal, not close
    assert resumed[1:] == reference[1:]


def test_resume_falls_back_when_the_newest_checkpoint_is_broken(demo_model, demo_prepared, tmp_path, capsys):
    out = tmp_path / "checkpoints"
    args = run_args(demo_model, demo_prepared, out, "--max-steps", "4", "--save-steps", "2")
    assert train.main(args) == 0
    weights = out / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated, as by a full disk
    assert run_folder.latest_valid_checkpoint(out) == out / "checkpoint-2"
    assert "skipping" in capsys.readouterr().err
    optimizer = out / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])  # the optimiser state cut short
    assert run_folder.checkpoint_problem(out / "checkpoint-2").startswith("optimizer.pt is damaged")
    optimizer.unlink()
    assert run_folder.checkpoint_problem(out / "checkpoint-2") == "optimizer.pt is missing"
    assert run_folder.latest_valid_checkpoint(out) is None


def test_resume_continues_from_the_previous_good_checkpoint(demo_model, demo_prepared, tmp_path, capsys):
    out = tmp_path / "checkpoints"
    args = run_args(demo_model, demo_prepared, out, "--max-steps", "4", "--save-steps", "2")
    assert train.main(args) == 0
    (out / "checkpoint-4" / "adapter_model.safetensors").unlink()
    assert train.main(args + ["--resume"]) == 0
    assert "resuming from " + str(out / "checkpoint-2") in capsys.readouterr().out
    assert run_folder.checkpoint_problem(out / "checkpoint-4") is None


def test_resume_with_other_key_settings_is_refused_unless_forced(demo_model, demo_prepared, tmp_path, capsys):
    out = tmp_path / "checkpoints"
    assert train.main(run_args(demo_model, demo_prepared, out, "--max-steps", "2", "--save-steps", "2")) == 0
    capsys.readouterr()
    other = run_args(demo_model, demo_prepared, out, "--max-steps", "4", "--save-steps", "2", "--lr", "5e-4",
                     "--lora-alpha", "8", "--resume")
    assert train.main(other) == 2
    refusal = one_error_line(capsys.readouterr())
    assert "LoRA alpha 32 -> 8" in refusal and "--lr 0.001 -> 0.0005" in refusal
    assert not (out / "checkpoint-4").exists()
    # Forced: it continues from step 2 with the checkpoint's weights, to step 4.
    assert train.main(other + ["--force-resume"]) == 0
    assert "resuming from " + str(out / "checkpoint-2") in capsys.readouterr().out
    assert sorted(logged(out / "checkpoint-4")) == [1, 2, 3, 4]
    assert folders.read_json(out / folders.FINAL_ADAPTER / folders.TRAINING_SETTINGS)["result"]["global_step"] == 4


def start_training(model, prepared, out, *extra) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "train.py"), *run_args(model, prepared, out, *extra)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, encoding="utf-8")


def wait_for_line(process, text: str, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    for line in process.stdout:
        if text in line:
            return
        if time.monotonic() > deadline:
            break
    process.kill()
    raise AssertionError(f"never printed {text!r}")


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_and_resume_finishes(demo_model, demo_prepared, tmp_path):
    out = tmp_path / "checkpoints"
    process = start_training(demo_model, demo_prepared, out, "--max-steps", "40", "--save-steps", "100")
    wait_for_line(process, "step 2/40 · epoch")
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, output
    saved = run_folder.find_checkpoints(out)
    assert len(saved) == 1 and run_folder.checkpoint_problem(saved[0]) is None
    assert train.main(run_args(demo_model, demo_prepared, out, "--max-steps", "6", "--save-steps", "100", "--resume",
                               "--force-resume")) == 0


@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_a_run_that_resume_completes(demo_model, demo_prepared, tmp_path):
    """kill -9 during steps and during checkpoint writes (a checkpoint every step): never a half checkpoint
    that --resume would take, never the last good one deleted; the resumed run reaches the target step."""
    out = tmp_path / "checkpoints"
    args = ("--max-steps", "8", "--save-steps", "1", "--keep-last", "2")
    for delay in (0.0, 0.3):  # after a log line: mid-step, mid-save, or between
        process = start_training(demo_model, demo_prepared, out, *args,
                                 *(["--resume"] if run_folder.find_checkpoints(out) else []))
        wait_for_line(process, "/8 · epoch")
        wait_for_line(process, "/8 · epoch")  # a second step trained: the first one's checkpoint was saved before it
        time.sleep(delay)
        process.kill()
        process.wait()
        good = run_folder.latest_valid_checkpoint(out)
        assert good is not None, f"no resumable checkpoint after kill -9 (delay {delay})"
    assert train.main(run_args(demo_model, demo_prepared, out, *args, "--resume")) == 0
    final = out / folders.FINAL_ADAPTER
    assert json.loads((final / folders.TRAINING_SETTINGS).read_text(encoding="utf-8"))["result"]["global_step"] == 8
    model = inference.load_for_inference(demo_model, final, models.pick_device())
    assert_adapter_loaded(model, final)
    assert not list(out.glob(run_folder.STAGING + "*"))


def test_a_full_disk_stops_the_run_with_a_clear_message(demo_model, demo_prepared, tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 0))
    out = tmp_path / "checkpoints"
    assert train.main(run_args(demo_model, demo_prepared, out, "--max-steps", "2", "--save-steps", "1")) == 1
    err = capsys.readouterr().err
    assert "not enough disk space for checkpoint 1" in err and "Traceback" not in err
    assert run_folder.find_checkpoints(out) == [] and not list(out.glob(run_folder.STAGING + "*"))
