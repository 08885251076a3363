"""train.py under torchrun with 2 CPU processes (gloo): one adapter, weights in sync, data split, loss falls,
mid-run evaluations and checkpoints, and a resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import folders, inference, models, monitoring

import train
from conftest import assert_adapter_loaded

pytestmark = pytest.mark.slow  # the demo's whole fine-tune, or several training processes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runs(demo_model, demo_prepared, tmp_path_factory):
    """A 2-process run of 20 steps, evaluated and saved every 5, stopped by a Ctrl-C of the first process after
    step 10 and resumed; and a 1-process run of the same effective batch."""
    root = tmp_path_factory.mktemp("ddp")
    common_flags = ["--model", str(demo_model), "--data", str(demo_prepared), "--grad-accum", "1", "--lr", "2e-3",
                    "--max-steps", "20", "--save-steps", "1000", "--logging-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def torchrun(*extra, **environment):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", "29533", str(ROOT / "tests" / "ddp_probe.py"), str(root),
                               *common_flags, "--batch-size", "2", "--save-steps", "5", "--out", str(root / "two"),
                               *extra], capture_output=True, text=True, cwd=ROOT, env={**env, **environment},
                              timeout=600, encoding="utf-8")

    stopped = torchrun(PROBE_STOP_AT="10")  # each process exits 130, as a Ctrl-C; torchrun reports a failure
    assert stopped.returncode == 1 and "exitcode  : 130" in stopped.stderr, stopped.stderr[-3000:]
    resumed = torchrun("--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert train.main([*common_flags, "--batch-size", "4", "--out", str(root / "one")]) == 0  # in this process
    return {"root": root, "two": root / "two", "one": root / "one", "stopped": stopped.stdout,
            "resumed": resumed.stdout}


def test_one_final_adapter_and_one_metrics_history(runs, demo_model):
    out = runs["two"]
    assert (out / folders.FINAL_ADAPTER / "adapter_model.safetensors").is_file()
    assert [p.name for p in out.iterdir() if p.name.startswith((folders.FINAL_ADAPTER, ".staging",
                                                                ".final"))] == [folders.FINAL_ADAPTER]
    assert (len(list(out.rglob(monitoring.METRICS))) == 1
            and len(list((out / monitoring.LOGS).rglob("events.out.tfevents.*"))) == 2)  # one a launch, rank 0's
    model = inference.load_for_inference(demo_model, out / folders.FINAL_ADAPTER, models.pick_device())
    assert_adapter_loaded(model, out / folders.FINAL_ADAPTER)
    assert "x 2 processes = 4" in runs["stopped"]  # effective batch: micro-batch x accumulation x processes
    assert runs["stopped"].count("trainable parameters") == 1  # only the first process talks


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
    # 20 steps of 2 examples each, together more than an epoch of 78 (the loader may fetch one batch ahead)
    assert len(seen0) == len(seen1) and 20 * 2 <= len(seen0) <= 21 * 2
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
    assert [row["step"] for row in history if "eval_loss" in row] == [5, 10, 15, 20]
    assert sorted(p.name for p in runs["two"].glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-15",
                                                                        "checkpoint-20"]
    # The final adapter is what rank 0 held at the end (the probe's sums of the same tensors).
    rank0 = json.loads((runs["root"] / "rank0.json").read_text(encoding="utf-8"))["weights"]
    final = saved_sums(runs["two"] / folders.FINAL_ADAPTER)
    assert final.keys() == {name.replace(".default.", ".") for name in rank0}
    assert all(abs(final[name.replace(".default.", ".")] - value) < 1e-6 for name, value in rank0.items())


def test_a_ctrl_c_of_one_process_stops_both_after_the_same_step_and_resume_finishes(runs):
    """The first process alone got the Ctrl-C: both stopped after step 10 with a checkpoint, and --resume went on
    from it to step 20 with the same weights in both processes."""
    assert "stopped by SIGINT at step 10/20" in runs["stopped"] and "resume with:" in runs["stopped"]
    assert f"resuming from {runs['two'] / 'checkpoint-10'}" in runs["resumed"]
    state = json.loads((runs["two"] / "checkpoint-20" / "trainer_state.json").read_text(encoding="utf-8"))
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == list(range(1, 21))
    records = [json.loads((runs["root"] / f"rank{rank}.json").read_text(encoding="utf-8")) for rank in (0, 1)]
    assert [record["step"] for record in records] == [20, 20]
