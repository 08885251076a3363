"""The Trainer this pipeline trains with: transformers' Trainer plus what a long run on a small GPU needs.

What it does beyond the stock Trainer, all in this file:
  * checkpoints are atomic: written into .staging-<step>/, renamed to checkpoint-<step>/ when complete, old ones
    rotated (--keep-last) only afterwards; each carries training_settings.json like the final adapter; the disk
    is checked for room first;
  * every log also carries the tokens seen so far and per second since the last log, both trained (labelled:
    the tokens the loss is computed on) and all (prompt and answer, no padding), memory and elapsed time
    (console, TensorBoard, metrics.json and the checkpoints' trainer_state.json all see them);
  * RunMonitor replaces the stock log printer: readable lines, loss warnings, metrics.json, training_curves.png;
  * GracefulStop: the first Ctrl-C or SIGTERM finishes the optimiser step, saves a checkpoint and stops (every
    process after the same step); a second Ctrl-C stops at once;
  * a loss or gradient that is not a finite number stops training at once, before the step is logged, evaluated or
    saved (describe_nonfinite() says where and what to lower); the last step is always logged;
  * final_eval_loss(): the held-out loss at the last step, measured again only when that step did not evaluate;
  * with a scorer (train.py --score-checkpoints) every evaluation also runs the held-out problems' tests: the
    pass@1 is logged beside the eval loss (eval_pass@1), and rotation keeps the best-scoring checkpoint too.

Used by train.py, which imports it once training starts (this module imports torch and transformers).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import rotate_checkpoints

from pipeline import folders, monitoring, platforms, run_folder
from pipeline.loss import trained_positions


class PipelineTrainer(Trainer):
    """Trainer(..., run_dir=, total_steps=, settings=, trainable_params=) with the additions listed above."""

    def __init__(self, *args, run_dir: Path, total_steps: int, settings: dict, trainable_params: int, scorer=None,
                 **kwargs):
        self.run_dir, self.settings, self.trainable_params = Path(run_dir), settings, trainable_params
        self.scorer = scorer  # model -> {"eval_pass@1": ..., "eval_solved": ...}, or None
        self._score: dict | None = None  # the scorer's figures, waiting for the evaluation's log
        self._trained_tokens = 0  # labelled tokens trained on, over every process (see training_step)
        self._monitor_start = time.time()  # reset when training starts
        self._loss_finite = True  # every micro-batch loss of the current step is a number
        self.nonfinite: dict | None = None  # where training stopped on a loss or gradient that is not a number
        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(self.run_dir / monitoring.LOGS)
        self.stop, self.monitor = GracefulStop(), RunMonitor(self.run_dir, total_steps)
        super().__init__(*args, callbacks=[self.monitor, tensorboard, self.stop], **kwargs)
        # The Trainer always adds its own printer of raw log dicts; RunMonitor (a ProgressCallback) replaces it.
        for stock in [c for c in self.callback_handler.callbacks if type(c) in (PrinterCallback, ProgressCallback)]:
            self.remove_callback(stock)

    # ---- monitoring: extra figures in every log -----------------------------------------------------------

    def train(self, *args, **kwargs):
        self._monitor_start = time.time()
        return super().train(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Trained tokens: the positions the loss is computed on (a label after the first position, not -100),
        # summed over every process, as the Trainer sums num_input_tokens_seen.
        labelled = trained_positions(inputs["labels"]).reshape(1).to(self.args.device)
        self._trained_tokens += int(self.accelerator.gather(labelled).sum())
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The Trainer reads this loss on the host every micro-batch anyway (its NaN filter), so no extra wait.
        self._loss_finite = self._loss_finite and bool(torch.isfinite(loss).all())
        return loss

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        # Called after every optimiser step: a step whose loss or gradient is not a number has already made the
        # weights NaN, so nothing of it is logged, evaluated or saved, and training stops here. Under fp16 a
        # non-finite gradient is the loss scaler's skipped step, not a failure.
        loss_finite, self._loss_finite = self._loss_finite, True
        norm = float(grad_norm) if grad_norm is not None else 0.0
        failed = torch.tensor([not loss_finite or (not math.isfinite(norm) and not self.args.fp16)],
                              device=self.args.device, dtype=torch.int32)
        if self.args.world_size > 1:  # every process stops after the same step
            torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
        if failed.item():
            losses = [(entry["step"], entry["loss"]) for entry in self.state.log_history if "loss" in entry]
            self.nonfinite = {"step": self.state.global_step, "grad_norm": norm, "last_logged": losses[-1:]}
            self.control.should_log = self.control.should_evaluate = self.control.should_save = False
            self.control.should_training_stop = True
            return None
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def describe_nonfinite(self) -> str:
        found, lr = self.nonfinite, self.args.learning_rate
        lower = 2e-4 if lr > 2e-4 else lr / 10  # the recipe's rate, or a tenth of a rate already below it
        last = (f"the last logged loss was {found['last_logged'][0][1]:.4f} at step {found['last_logged'][0][0]}"
                if found["last_logged"] else "no loss was logged before it")
        return (f"training stopped at step {found['step']}: the loss or its gradient is not a number (gradient norm "
                f"{found['grad_norm']}); {last}. Lower the learning rate (--lr is {lr:g}; try {lower:g}) "
                f"and train again; no final adapter was saved, earlier checkpoints are kept")

    def log(self, logs, start_time=None):
        now = time.time()
        if not hasattr(self, "_elapsed_before"):  # first log of this session
            # After a resume the history up to the checkpoint is restored: the clock and the count continue from it.
            self._elapsed_before = max((e.get("elapsed_s", 0.0) for e in self.state.log_history), default=0.0)
            trained_before = max((e.get("trained_tokens", 0) for e in self.state.log_history), default=0)
            self._trained_tokens += trained_before
            self._last_log = (self._monitor_start, getattr(self, "_initial_num_input_tokens_seen", 0), trained_before)
        if "loss" in logs:
            last_time, last_tokens, last_trained = self._last_log
            tokens, trained = self.state.num_input_tokens_seen, self._trained_tokens
            seconds = max(now - last_time, 1e-9)
            logs["trained_tokens"] = trained
            logs["trained_tokens_per_second"] = round((trained - last_trained) / seconds, 1)
            logs["tokens_per_second"] = round((tokens - last_tokens) / seconds, 1)
            self._last_log = (now, tokens, trained)
            logs["memory_gib"] = round(monitoring.memory_in_use(), 3)
        if "eval_loss" in logs and self._score:
            logs.update(self._score)
            self._score = None
        logs["elapsed_s"] = round(now - self._monitor_start + self._elapsed_before, 1)
        super().log(logs, start_time)

    def evaluate(self, *args, **kwargs):
        if self.scorer is not None:
            self._score = self.scorer(self.model)  # logged with the eval loss (see log)
        metrics = super().evaluate(*args, **kwargs)
        self._last_eval = (self.state.global_step, metrics["eval_loss"])
        return metrics

    def best_scored(self) -> Path | None:
        """The kept checkpoint with the highest held-out pass@1 (the later among equals), if any was scored."""
        scored = {entry["step"]: entry["eval_pass@1"] for entry in self.state.log_history if "eval_pass@1" in entry}
        kept = [(scored[step], step, path) for path in run_folder.find_checkpoints(self.run_dir)
                if (step := run_folder.step_of(path)) in scored]
        return max(kept)[2] if kept else None

    def final_eval_loss(self) -> float:
        """The held-out loss at the last step: the evaluation of that step when it had one, else a new one."""
        step, loss = getattr(self, "_last_eval", (None, None))
        return loss if step == self.state.global_step else self.evaluate()["eval_loss"]

    # ---- atomic checkpoints ---------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        step = self.state.global_step
        final = self.run_dir / f"{run_folder.PREFIX}{step}"
        previous = run_folder.find_checkpoints(self.run_dir)
        needed = run_folder.checkpoint_size(previous[-1] if previous else None, self.trainable_params)
        folders.check_free_space(self.run_dir, needed, f"checkpoint {step}")
        staging = self.run_dir / f"{run_folder.STAGING}{step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()  # every process writes its RNG state into the staging folder

        # The Trainer writes to <output_dir>/checkpoint-<step>: point output_dir at the staging folder while it
        # does, and keep its own rotation (which would run before the rename) off.
        limit, self.args.output_dir, self.args.save_total_limit = self.args.save_total_limit, str(staging), None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir, self.args.save_total_limit = str(self.run_dir), limit
        if self.args.should_save:
            # The adapter knows its template and base model wherever it is taken from, as in final/.
            folders.write_json(staging / final.name / folders.TRAINING_SETTINGS, self.settings)
        self.accelerator.wait_for_everyone()  # all of it written before the rename
        if self.args.should_save:
            if final.exists():  # a checkpoint of the same step from an earlier, interrupted run
                shutil.rmtree(final)
            os.replace(staging / final.name, final)
            shutil.rmtree(staging, ignore_errors=True)
            best = self.best_scored()
            rotate_checkpoints(output_dir=str(self.run_dir), save_total_limit=limit, use_mtime=False,
                               best_model_checkpoint=str(best) if best else None)


class GracefulStop(TrainerCallback):
    """First Ctrl-C, SIGTERM or (Windows) Ctrl-Break: finish the optimiser step, save a checkpoint, stop. Second
    Ctrl-C: stop now."""

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
        for sig in platforms.stop_signals():
            self.previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            # Every process must stop after the same step, whichever of them got the signal.
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


class RunMonitor(ProgressCallback):
    """The console progress bar and lines, warnings, metrics.json and the curves."""

    def __init__(self, out: Path, total_steps: int):
        super().__init__()
        self.out, self.total_steps = out, total_steps
        self.warned = None
        self.ended = False  # training is over: the final evaluation's log comes after on_train_end

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if state.global_step >= state.max_steps:  # the last step's loss, tokens and memory, whatever the interval
            control.should_log = True

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass  # a second, nested bar for a few seconds of evaluation is noise; the eval loss line follows

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        say = self.training_bar.write if self.training_bar is not None else print
        line = self.describe(state, logs)
        if line:
            say(line)
        losses = [row["loss"] for row in state.log_history if "loss" in row]
        warning = monitoring.loss_warning(losses) if "loss" in logs else None
        if warning and warning != self.warned:
            say(f"warning: {warning}")
        self.warned = warning
        self.write(state)

    def on_evaluate(self, args, state, control, **kwargs):
        super().on_evaluate(args, state, control, **kwargs)
        if state.is_world_process_zero:
            monitoring.plot_curves(monitoring.history_of(state.log_history), self.out / monitoring.CURVES)

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        self.ended = True
        if state.is_world_process_zero:
            self.write(state)
            monitoring.plot_curves(monitoring.history_of(state.log_history), self.out / monitoring.CURVES)

    def describe(self, state, logs) -> str | None:
        step = f"step {state.global_step}/{self.total_steps}"
        if "eval_loss" in logs:
            scored = (f" · held-out pass@1 {100 * logs['eval_pass@1']:.1f}% ({logs['eval_solved']} solved)"
                      if "eval_pass@1" in logs else "")
            return f"{step} · eval loss {logs['eval_loss']:.4f}{scored}"
        if "loss" not in logs:
            return None
        elapsed = logs.get("elapsed_s", 0.0)
        done = max(1, state.global_step)
        eta = elapsed / done * (self.total_steps - state.global_step) if state.global_step else 0.0
        parts = [step, f"epoch {logs.get('epoch', state.epoch or 0):.2f}", f"loss {logs['loss']:.4f}",
                 f"lr {logs.get('learning_rate', 0):.2e}", f"grad norm {logs.get('grad_norm', float('nan')):.3f}",
                 f"{logs.get('trained_tokens_per_second', 0):,.0f} trained tok/s "
                 f"({logs.get('tokens_per_second', 0):,.0f} all)",
                 f"{monitoring.memory_label()} {logs.get('memory_gib', 0):.2f} GiB",
                 f"{monitoring.format_seconds(elapsed)} elapsed", f"ETA {monitoring.format_seconds(eta)}"]
        return " · ".join(parts)

    def write(self, state) -> None:
        finished = self.ended and state.global_step >= self.total_steps
        history = monitoring.history_of(state.log_history)
        folders.write_json(self.out / monitoring.METRICS,
                          {"history": history, "totals": monitoring.totals_of(history, self.total_steps, finished)})
