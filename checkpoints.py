"""Checkpoints that survive: atomic writes, validation before resuming, graceful stop, disk-room checks.

Used by train.py (and the checkpoint manager). A checkpoint is checkpoints/checkpoint-<step>/ holding the
adapter (adapter_config.json, adapter_model.safetensors), the optimiser, scheduler and RNG states and the
Trainer's state; together they let `train.py --resume` continue exactly where the run stopped.

Safety rules:
  * a checkpoint is written into a staging folder and renamed to checkpoint-<step> only when complete, so a
    crash or kill -9 while saving never leaves a checkpoint that looks finished but is not;
  * old checkpoints are deleted (--keep-last) only after the new one is complete;
  * before resuming, the newest checkpoint is validated (files present, safetensors and JSON readable); a broken
    one is skipped with a warning for the previous good one;
  * the first Ctrl-C or SIGTERM finishes the current optimiser step, saves a checkpoint and stops; a second
    Ctrl-C stops at once (the last complete checkpoint stays).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import common

PREFIX = "checkpoint-"
STAGING = ".staging-"  # checkpoints/.staging-<step>/checkpoint-<step>/ while being written
REQUIRED_FILES = ["adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt"]


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def find_checkpoints(out: str | Path) -> list[Path]:
    """checkpoint-<step> folders, oldest first."""
    found = [p for p in Path(out).glob(PREFIX + "*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=step_of)


def checkpoint_problem(path: Path) -> str | None:
    """Why this checkpoint cannot be resumed from, or None when it can."""
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        from safetensors import safe_open

        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as weights:
            for key in weights.keys():
                weights.get_tensor(key)  # reads every byte: a truncated file fails here
        json.loads((path / "trainer_state.json").read_text())
        json.loads((path / "adapter_config.json").read_text())
    except Exception as error:  # any unreadable file makes the checkpoint unusable
        return f"unreadable ({type(error).__name__}: {str(error)[:120]})"
    return None


def latest_valid_checkpoint(out: str | Path) -> Path | None:
    """The newest checkpoint that passes validation; warns about each broken one it skips."""
    for path in reversed(find_checkpoints(out)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        print(f"warning: skipping {path}: {problem}; trying the previous checkpoint", file=sys.stderr)
    return None


def remove_staging(out: str | Path) -> None:
    """Leftovers of a save that was interrupted: never complete, never used."""
    for path in Path(out).glob(STAGING + "*"):
        shutil.rmtree(path, ignore_errors=True)


def checkpoint_size(path: Path | None, trainable_params: int) -> int:
    """Bytes a checkpoint takes: the previous one's size, or an estimate from the trainable parameters
    (fp32 weights and two fp32 optimiser moments)."""
    if path is not None and path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return trainable_params * 12 + 2**20


def atomic_checkpoint_trainer(trainer_class, trainable_params: int):
    """A Trainer subclass whose checkpoints are written to a staging folder, renamed when complete, and
    rotated afterwards."""
    from transformers.trainer_utils import rotate_checkpoints

    class AtomicCheckpointTrainer(trainer_class):
        def _save_checkpoint(self, model, trial):
            run_dir = Path(self.args.output_dir)
            step = self.state.global_step
            final = run_dir / f"{PREFIX}{step}"
            checks = find_checkpoints(run_dir)
            common.check_free_space(run_dir, checkpoint_size(checks[-1] if checks else None, trainable_params), f"checkpoint {step}")
            staging = run_dir / f"{STAGING}{step}"
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            self.accelerator.wait_for_everyone()  # every process writes its RNG state into the staging folder

            # The Trainer writes to <output_dir>/checkpoint-<step>: point output_dir at the staging folder
            # while it does, and keep its own rotation (which would run before the rename) off.
            limit, self.args.output_dir, self.args.save_total_limit = self.args.save_total_limit, str(staging), None
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir, self.args.save_total_limit = str(run_dir), limit
            self.accelerator.wait_for_everyone()  # all of it written before the rename
            if self.args.should_save:
                if final.exists():  # a checkpoint of the same step from an earlier, interrupted run
                    shutil.rmtree(final)
                os.replace(staging / final.name, final)
                shutil.rmtree(staging, ignore_errors=True)
                rotate_checkpoints(output_dir=str(run_dir), save_total_limit=limit, use_mtime=False)

    return AtomicCheckpointTrainer


def graceful_stop_callback():
    """First SIGINT/SIGTERM: finish the optimiser step, save a checkpoint, stop. Second SIGINT: stop now."""
    from transformers import TrainerCallback

    class GracefulStop(TrainerCallback):
        def __init__(self):
            self.signal_name = None
            self.previous = {}

        def _handle(self, signum, frame):
            if self.signal_name is not None:
                raise KeyboardInterrupt  # the second one: stop at once
            self.signal_name = signal.Signals(signum).name
            print(f"\n{self.signal_name} received: finishing this step and saving a checkpoint "
                  f"(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

        def on_train_begin(self, args, state, control, **kwargs):
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

        def on_step_end(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                # Every process must stop after the same step, whichever of them got the signal.
                import torch

                flag = torch.tensor([getattr(signal, self.signal_name) if self.signal_name else 0], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                if flag.item() and self.signal_name is None:
                    self.signal_name = signal.Signals(int(flag.item())).name
            if self.signal_name is not None:
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_train_end(self, args, state, control, **kwargs):
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)

    return GracefulStop()
