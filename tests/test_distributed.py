"""train.py under torchrun with 2 CPU processes (gloo): one adapter, weights in sync, data split, loss falls,
mid-run evaluations and checkpoints, and a resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import folders, inference, models, monitoring

from conftest import assert_adapter_loaded

pytestmark = pytest.mark.slow  # the demo's whole fine-tune, or several training processes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runs(demo_model, demo_prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    common_flags = ["--model", str(demo_model), "--data", str(demo_prepared), "--grad-accum", "1", "--lr", "2e-3",
                    "--max-steps", "36", "--save-steps", "1000", "--logging-steps", "1"]
    # The 2-process run evaluates and saves a checkpoint every 6 of its 36 steps: both ranks keep training after.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29533",
                          str(ROOT / "tests" / "ddp_probe.py"), str(root), *common_flags, "--batch-size", "2",
                          "--save-steps", "6",
                          "--out", str(root / "two")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
                          encoding="utf-8")
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(ROOT / "train.py"), *common_flags, "--batch-size", "4", "--out",
                          str(root / "one")],
                         capture_output=True, text=True, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "2"}, timeout=600,
                         encoding="utf-8")
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    return {"root": root, "two": root / "two", "one": root / "one", "stdout": two.stdout}


def test_one_final_adapter_and_one_metrics_history(runs, demo_model):
    out = runs["two"]
    assert (out / folders.FINAL_ADAPTER / "adapter_model.safetensors").is_file()
    assert [p.name for p in out.iterdir() if p.name.startswith((folders.FINAL_ADAPTER, ".staging",
                                                                ".final"))] == [folders.FINAL_ADAPTER]
    assert (len(list(out.rglob(monitoring.METRICS))) == 1
            and len(list((out / monitoring.LOGS).rglob("events.out.tfevents.*"))) == 1)
    model = inference.load_for_inference(demo_model, out / folders.FINAL_ADAPTER, models.pick_device())
    assert_adapter_loaded(model, out / folders.FINAL_ADAPTER)
    assert "x 2 processes = 4" in runs["stdout"]  # effective batch: micro-batch x accumulation x processes
    assert runs["stdout"].count("trainable parameters") == 1  # only the first process talks


def test_both_processes_end_with_identical_lora_weights(runs):
    rank0 = json.loads((runs["root"] / "rank0.json").read_text(encoding="utf-8"))["weights"]
    rank1 = json.loads((runs["root"] / "rank1.json").read_text(encoding="utf-8"))["weights"]
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    assert rank0 == rank1


def test_each_process_saw_a_different_half_of_the_data(runs, demo_prepared):
    from datasets import load_from_disk

    train_ids = set(load_from_disk(str(demo_prepared))["train"]["task_id"])
    # The recording also holds the final evaluation's batches: keep the training examples.
    seen0 = [t for t in json.loads((runs["root"] / "rank0.json").read_text(encoding="utf-8"))["seen"] if t in train_ids]
    seen1 = [t for t in json.loads((runs["root"] / "rank1.json").read_text(encoding="utf-8"))["seen"] if t in train_ids]
    # 36 steps of 2 examples each, together more than an epoch (the loader may fetch one batch ahead)
    assert len(seen0) == len(seen1) and 36 * 2 <= len(seen0) <= 37 * 2
    first_epoch0, first_epoch1 = set(seen0[: len(train_ids) // 2]), set(seen1[: len(train_ids) // 2])
    assert len(first_epoch0 & first_epoch1) <= 2  # at most the examples repeated to even out the last batch
    assert set(seen0) | set(seen1) == train_ids


def test_loss_falls_as_in_a_single_process_run_with_the_same_effective_batch(runs):
    def train_losses(out):
        history = json.loads((out / monitoring.METRICS).read_text(encoding="utf-8"))["history"]
        return [row["loss"] for row in history if "loss" in row]

    two, one = train_losses(runs["two"]), train_losses(runs["one"])
    assert len(two) == len(one)  # same number of optimiser steps
    assert two[-1] < 0.8 * two[0] and one[-1] < 0.8 * one[0]
    late_two, late_one = sum(two[-6:]) / 6, sum(one[-6:]) / 6  # one step's loss depends on its batch's problems
    assert abs(late_two - late_one) < 0.15 * late_one


def saved_sums(adapter_dir: Path) -> dict[str, float]:
    from safetensors.torch import load_file

    return {name: float(t.double().sum()) for name, t in load_file(str(adapter_dir / folders.ADAPTER_WEIGHTS)).items()}


def test_mid_run_checkpoints_and_evaluations_under_two_processes(runs):
    history = json.loads((runs["two"] / monitoring.METRICS).read_text(encoding="utf-8"))["history"]
    assert [row["step"] for row in history if "eval_loss" in row] == [6, 12, 18, 24, 30, 36]
    assert sorted(p.name for p in runs["two"].glob("checkpoint-*")) == ["checkpoint-24", "checkpoint-30",
                                                                        "checkpoint-36"]
    # The final adapter is what rank 0 held at the end (the probe's sums of the same tensors).
    rank0 = json.loads((runs["root"] / "rank0.json").read_text(encoding="utf-8"))["weights"]
    final = saved_sums(runs["two"] / folders.FINAL_ADAPTER)
    assert final.keys() == {name.replace(".default.", ".") for name in rank0}
    assert all(abs(final[name.replace(".default.", ".")] - value) < 1e-6 for name, value in rank0.items())


def test_resume_under_two_processes(demo_model, demo_prepared, tmp_path):
    flags = ["--model", str(demo_model), "--data", str(demo_prepared), "--out", str(tmp_path / "run"), "--batch-size",
             "2",
             "--grad-accum", "1", "--save-steps", "2", "--logging-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def torchrun(*extra):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                               "29534",
                               str(ROOT / "tests" / "ddp_probe.py"), str(tmp_path), *flags, *extra],
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
                          encoding="utf-8")

    first = torchrun("--max-steps", "2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = torchrun("--max-steps", "4", "--resume")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming from {tmp_path / 'run' / 'checkpoint-2'}" in second.stdout
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text(encoding="utf-8"))
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3, 4]
    rank0 = json.loads((tmp_path / "rank0.json").read_text(encoding="utf-8"))["weights"]
    rank1 = json.loads((tmp_path / "rank1.json").read_text(encoding="utf-8"))["weights"]
    final = saved_sums(tmp_path / "run" / folders.FINAL_ADAPTER)
    assert rank0 == rank1 and all(abs(final[name.replace(".default.", ".")] - value) < 1e-6 for name,
                                  value in rank0.items())
