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
  * a resumed run logs the losses, weights and mean train loss of the uninterrupted one, bit for bit on the same
    machine: each checkpoint also carries (resume_state.json) the random state the order of its epoch was drawn
    from, so the rest of that epoch gets the same batches (ResumableLengthGroupedSampler), and what its logs had not
    reported yet (the loss of the steps since the last log, the run's loss total, tokens and time);
  * with a scorer (train.py --score-checkpoints) every evaluation also runs the held-out problems' tests: the
    pass@1 is logged beside the eval loss (eval_pass@1), and rotation keeps the best-scoring checkpoint too.

Used by train.py, which imports it once training starts (this module imports torch and transformers).
"""

from __future__ import annotations

import base64
import json
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
from transformers.trainer_pt_utils import LengthGroupedSampler
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
        self._trained_at_start = 0  # the count when this session started training (a resumed run's is not 0)
        self._elapsed_before = 0.0  # seconds trained before the checkpoint this run resumed from
        self._carried: dict | None = None  # the resume_state.json of the checkpoint resumed from (carried_over)
        self._train_sampler = None  # the training batches' sampler, told each epoch (see _run_epoch)
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

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._monitor_start = time.time()
        if resume_from_checkpoint is not None:
            self._carried = carried_over(Path(resume_from_checkpoint))
            self._trained_tokens, self._elapsed_before = self._carried["trained_tokens"], self._carried["elapsed_s"]
        self._trained_at_start = self._trained_tokens
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        # The Trainer's mean covers this call's steps only: a resumed run's is the whole run's, as if uninterrupted.
        mean = self._total_loss_scalar / max(self.state.global_step, 1)
        output.metrics["train_loss"] = mean
        return output._replace(training_loss=mean)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._carried is not None:  # the first micro-batch after a resume, the Trainer's loss sums just reset
            self._restore_unlogged(self._carried)
            self._carried = None
        # Trained tokens: the positions the loss is computed on (a label after the first position, not -100),
        # summed over every process, as the Trainer sums num_input_tokens_seen.
        labelled = trained_positions(inputs["labels"]).reshape(1).to(self.args.device)
        self._trained_tokens += int(self.accelerator.gather(labelled).sum())
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The Trainer reads this loss on the host every micro-batch anyway (its NaN filter), so no extra wait.
        self._loss_finite = self._loss_finite and bool(torch.isfinite(loss).all())
        return loss

    def _restore_unlogged(self, carried: dict) -> None:
        """Where the logs of the checkpoint resumed from stood: the loss summed since the last log (this process's),
        that log's step and the run's loss total, so that the next log averages over the steps it would have."""
        unlogged = carried["unlogged_loss"]
        own = (unlogged[self.args.process_index] if len(unlogged) == self.args.world_size
               else sum(unlogged) / len(unlogged))  # another number of processes: their mean
        self._tr_loss = torch.tensor(own, dtype=self._tr_loss.dtype, device=self._tr_loss.device)
        self._globalstep_last_logged = carried["last_logged_step"]
        self._total_loss_scalar = carried["total_loss"]

    # ---- the data order of the epoch a checkpoint was taken in ----------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            order = (self._carried or {}).get("data_order")  # resuming: the order of the checkpoint's epoch
            replay = decode_order(order, self.args.process_index, self.args.world_size) if order else None
            sampler = ResumableLengthGroupedSampler(sampler.lengths, sampler.batch_size, sampler.generator, replay)
        self._train_sampler = sampler
        return sampler

    def _run_epoch(self, model, epoch, *args, **kwargs):
        # accelerate passes the epoch on to the sampler, but not through the wrappers of a resumed multi-process run
        # (batches skipped, then sharded): told here, always.
        if isinstance(self._train_sampler, ResumableLengthGroupedSampler):
            self._train_sampler.set_epoch(epoch)
        return super()._run_epoch(model, epoch, *args, **kwargs)

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
        if not hasattr(self, "_last_log"):  # first log of this session: rates count from the start (or the resume)
            self._last_log = (self._monitor_start, getattr(self, "_initial_num_input_tokens_seen", 0),
                              self._trained_at_start)
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
        # What a resumed run needs beyond the Trainer's files, from every process, in order.
        unlogged = self.accelerator.gather(self._tr_loss.detach().reshape(1)).tolist()
        drawn = getattr(self._train_sampler, "drawn", None)
        states = self.accelerator.gather(drawn["state"].unsqueeze(0)) if drawn else None
        if self.args.should_save:
            # The adapter knows its template and base model wherever it is taken from, as in final/.
            folders.write_json(staging / final.name / folders.TRAINING_SETTINGS, self.settings)
            folders.write_json(staging / final.name / run_folder.RESUME_STATE, {
                "data_order": encode_order(drawn["epoch"], states) if drawn else None,
                "last_logged_step": self._globalstep_last_logged, "unlogged_loss": unlogged,
                "total_loss": self._total_loss_scalar, "trained_tokens": self._trained_tokens,
                "elapsed_s": round(time.time() - self._monitor_start + self._elapsed_before, 1)})
        self.accelerator.wait_for_everyone()  # all of it written before the rename
        if self.args.should_save:
            if final.exists():  # a checkpoint of the same step from an earlier, interrupted run
                shutil.rmtree(final)
            os.replace(staging / final.name, final)
            shutil.rmtree(staging, ignore_errors=True)
            best = self.best_scored()
            rotate_checkpoints(output_dir=str(self.run_dir), save_total_limit=limit, use_mtime=False,
                               best_model_checkpoint=str(best) if best else None)


class ResumableLengthGroupedSampler(LengthGroupedSampler):
    """The Trainer's length-grouped sampler (examples of similar length batched together, the batches shuffled),
    remembering the random state each epoch's order was drawn from, and drawing from a remembered one again.

    The stock sampler draws an epoch's order from the global random state (each process its own) as the epoch
    starts. A checkpoint holds the state of its own step, so a run resumed mid-epoch drew another order and trained
    the rest of that epoch on other batches (and its losses differed from there on). Here the checkpoint also carries
    each process's state at its epoch's start (`drawn`), and the resumed run draws that epoch from it (`replay`):
    the same batches. An uninterrupted run draws as before."""

    def __init__(self, lengths: list[int], batch_size: int, generator=None, replay: dict | None = None):
        super().__init__(batch_size, lengths=lengths, generator=generator)
        self.epoch = 0  # set by the Trainer before each epoch
        self.replay = replay  # {"epoch": e, "state": ...}: the order to draw again when epoch e starts
        self.drawn: dict | None = None  # the epoch and random state of the last order drawn

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = self.generator if self.generator is not None else torch.default_generator
        replay, self.replay = self.replay, None
        if replay is not None and replay["epoch"] == self.epoch:  # resumed mid-epoch: that epoch's order again
            generator.set_state(replay["state"])  # (the Trainer restores the checkpoint's RNG state after it)
        self.drawn = {"epoch": self.epoch, "state": generator.get_state()}
        return super().__iter__()


def encode_order(epoch: int, states: torch.Tensor) -> dict:
    """The random states an epoch's order was drawn from, one row per process, as JSON (base64)."""
    return {"epoch": epoch, "states": [base64.b64encode(row.numpy().tobytes()).decode("ascii") for row in states]}


def decode_order(order: dict, process: int, processes: int) -> dict | None:
    """This process's state of an encode_order(); None when the run had another number of processes (other shards)."""
    if len(order["states"]) != processes:
        return None
    state = torch.frombuffer(bytearray(base64.b64decode(order["states"][process])), dtype=torch.uint8)
    return {"epoch": order["epoch"], "state": state}


def carried_over(checkpoint: Path) -> dict:
    """The checkpoint's resume_state.json (written by PipelineTrainer._save_checkpoint): its epoch's data order and
    what its logs had not reported yet. A checkpoint written before there was one: what its log history tells (the
    losses since its last log are lost, and the rest of its epoch is drawn in another order)."""
    if (checkpoint / run_folder.RESUME_STATE).is_file():
        return folders.read_json(checkpoint / run_folder.RESUME_STATE)
    state = json.loads((checkpoint / run_folder.TRAINER_STATE).read_text(encoding="utf-8"))
    history, logged, total = state["log_history"], 0, 0.0
    for entry in (entry for entry in history if "loss" in entry):  # each log's loss is its steps' mean
        total, logged = total + entry["loss"] * (entry["step"] - logged), entry["step"]
    return {"data_order": None, "last_logged_step": state["global_step"], "unlogged_loss": [0.0], "total_loss": total,
            "trained_tokens": max((entry.get("trained_tokens", 0) for entry in history), default=0),
            "elapsed_s": max((entry.get("elapsed_s", 0.0) for entry in history), default=0.0)}


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

    def on_train_begin(self, args, state, control, **kwargs):
        # ProgressCallback's bar, drawn only where train.py asks for bars (on a terminal: platforms.progress_bars);
        # a disabled bar still writes the step lines
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, disable=args.disable_tqdm)
        self.current_step = 0

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
