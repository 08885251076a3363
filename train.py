"""Stage 4: fine-tune the base model with 4-bit QLoRA on the prepared problems.

Run:
    python train.py                          # 3 epochs, micro-batch 4 x accumulation 4
    python train.py --max-steps 20           # a short smoke run
    python train.py --resume                 # continue from the newest checkpoint in checkpoints/

Reads:  model/ (download_model.py), prepared_data/ (prepare_data.py)
Stop:   Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and says how to resume; a second
        Ctrl-C stops at once. Checkpoints are written atomically (see checkpoints.py).
Writes: checkpoints/checkpoint-<step>/ (every --save-steps, the last --keep-last kept),
        checkpoints/final/ (adapter_config.json, adapter_model.safetensors, tokenizer, training_settings.json)
Next:   verify_model.py --adapter checkpoints/final

The recipe is QLoRA (Dettmers et al. 2023): the base weights frozen in 4-bit NF4 with double quantisation,
LoRA adapters on every linear projection, gradient checkpointing, paged 8-bit AdamW, cosine schedule with
warm-up. Two things keep it within a 6 GB GPU (see memory.py): the loss projects only the labelled positions
onto the 151,936-entry vocabulary, a chunk at a time, instead of materialising logits for the whole batch;
and batches are padded only to their longest example, with examples of similar length batched together.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import checkpoints
import common
import memory
import monitoring
from checkpoints import find_checkpoints
from common import StageError

RUN_SETTINGS = "run_settings.json"  # in checkpoints/: what a --resume must agree with
# Settings that make a checkpoint meaningless for another run if they differ.
RESUME_KEYS = ("model", "prepared_data", "template", "lora_r", "lora_alpha", "load_in_4bit")


def pad_batch(features: list[dict], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict:
    """Right-pad a list of examples to the longest one (dynamic padding); pads get label -100 and mask 0."""
    import torch

    longest = max(len(f["input_ids"]) for f in features)
    longest = math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        pad = longest - len(f["input_ids"])
        batch["input_ids"].append(list(f["input_ids"]) + [pad_token_id] * pad)
        batch["attention_mask"].append(list(f["attention_mask"]) + [0] * pad)
        batch["labels"].append(list(f["labels"]) + [common.IGNORE_INDEX] * pad)
    return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def show_trained_span(tokenizer, example: dict) -> str:
    """Decode one example with the trained tokens (labels != -100) between ⟦ and ⟧."""
    ids, labels = example["input_ids"], example["labels"]
    first = next(i for i, label in enumerate(labels) if label != common.IGNORE_INDEX)
    return tokenizer.decode(ids[:first]) + "⟦" + tokenizer.decode(ids[first:]) + "⟧"


def padding_share(dataloader) -> float:
    """Share of the tokens of one epoch that are padding, with the batches the Trainer will really form."""
    padded = total = 0
    for batch in dataloader:
        mask = batch["attention_mask"]
        padded += int((mask == 0).sum())
        total += mask.numel()
    return padded / max(1, total)


def cuda_batch_fits(model, compute_loss, batch: int, seq_len: int) -> bool:
    """Try one forward and backward pass of `batch` examples of `seq_len` tokens, every position labelled (the
    worst case), and keep 10 % of the GPU free for the optimiser state and fragmentation."""
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    try:
        if compute_loss:
            loss = compute_loss(model(input_ids=ids, attention_mask=torch.ones_like(ids)), ids)
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        fits = torch.cuda.max_memory_allocated() < 0.9 * torch.cuda.get_device_properties(0).total_memory
    except torch.cuda.OutOfMemoryError:
        fits = False
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return fits


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(math.ceil(n_examples / batch_size) / grad_accum))


def default_optimizer(choice, load_in_4bit: bool) -> str:
    """Paged 8-bit AdamW on CUDA (pages optimiser state to RAM under memory pressure); bitsandbytes' 8-bit
    AdamW on CPU, where paging does not exist; plain AdamW when the model is not quantised."""
    if not load_in_4bit:
        return "adamw_torch"
    return "paged_adamw_8bit" if choice.device == "cuda" else "adamw_8bit"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # folders
    parser.add_argument("--model", default=common.MODEL_DIR, help="base model folder (default: %(default)s)")
    parser.add_argument("--data", default=common.PREPARED_DIR, help="folder written by prepare_data.py (default: %(default)s)")
    parser.add_argument("--out", default=common.CHECKPOINTS_DIR, help="checkpoint and adapter folder (default: %(default)s)")
    # optimisation
    parser.add_argument("--epochs", type=common.positive(float), default=3, help="passes over the training split (default: %(default)s)")
    parser.add_argument("--max-steps", type=common.positive(int), default=None, help="stop after this many optimiser steps; overrides --epochs (smoke runs)")
    parser.add_argument("--batch-size", type=common.positive(int), default=4, help="micro-batch: examples per forward pass (default: %(default)s)")
    parser.add_argument("--grad-accum", type=common.positive(int), default=4, help="micro-batches per optimiser step (default: %(default)s)")
    parser.add_argument("--lr", type=common.positive(float), default=2e-4, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--warmup-ratio", type=float, default=0.05, help="share of steps for linear warm-up, in [0, 1) (default: %(default)s)")
    parser.add_argument("--optim", default=None, help="Trainer optimiser name (default: paged_adamw_8bit on CUDA with 4-bit, adamw_8bit on CPU, else adamw_torch)")
    parser.add_argument("--seed", type=int, default=42, help="seed for LoRA initialisation and data order (default: %(default)s)")
    # LoRA
    parser.add_argument("--lora-r", type=common.positive(int), default=16, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--lora-alpha", type=common.positive(float), default=None, help="LoRA scaling alpha (default: 2 x rank)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input, in [0, 1) (default: %(default)s)")
    parser.add_argument("--no-4bit", action="store_true", help="load the base model unquantised in the compute dtype (needs more memory)")
    # memory
    parser.add_argument("--loss", choices=["chunked", "standard"], default="chunked",
                        help="chunked: project only labelled positions, in chunks (default); standard: the model's own loss")
    parser.add_argument("--auto-batch-size", action="store_true",
                        help="on CUDA, use the largest micro-batch that fits and keep the effective batch by raising --grad-accum")
    # checkpoints and logging
    parser.add_argument("--save-steps", type=common.positive(int), default=50, help="checkpoint and eval loss every N steps (default: %(default)s)")
    parser.add_argument("--keep-last", type=common.positive(int), default=3, help="checkpoints to keep (default: %(default)s)")
    parser.add_argument("--logging-steps", type=common.positive(int), default=10, help="one log line every N steps (default: %(default)s)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue from the newest checkpoint in --out, or from PATH")
    parser.add_argument("--force-resume", action="store_true", help="resume even though key settings (model, data, LoRA) differ from the checkpoint's")
    parser.add_argument("--overwrite", action="store_true", help="delete the checkpoints of an earlier run in --out and start over")
    return parser


def check_args(args) -> dict:
    """Validate everything before any heavy work; report all problems at once. Returns the prepared stats."""
    problems, stats = [], {}
    if not 0 <= args.warmup_ratio < 1:
        problems.append(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if not 0 <= args.lora_dropout < 1:
        problems.append(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.resume and args.overwrite:
        problems.append("--resume and --overwrite contradict each other: choose one")
    try:
        common.require_model_dir(args.model)
    except StageError as error:
        problems.append(str(error))
    try:
        common.require_dataset_dir(args.data, "prepare_data.py")
        stats = common.read_json(Path(args.data) / common.PREPARED_STATS)
    except (StageError, FileNotFoundError) as error:
        problems.append(str(error) if isinstance(error, StageError) else f"{args.data}/ has no {common.PREPARED_STATS}: run prepare_data.py again")
    model_info = Path(args.model) / common.DOWNLOAD_INFO
    if stats and model_info.is_file():
        prepared_for, model_id = stats["settings"]["model"], common.read_json(model_info).get("model_id")
        if prepared_for != model_id:
            problems.append(f"{args.data}/ was tokenized for {prepared_for} but {args.model}/ holds {model_id}: run prepare_data.py --model {args.model}")
    out = Path(args.out)
    if not args.resume and not args.overwrite and (find_checkpoints(out) or (out / common.FINAL_ADAPTER).exists()) and not finished_before(args, stats):
        problems.append(f"{out}/ holds an earlier run: pass --resume to continue it, --overwrite to start over, or --out for a new folder")
    if args.resume and args.resume != "latest" and not Path(args.resume).is_dir():
        problems.append(f"--resume {args.resume}: no such checkpoint folder")
    common.fail_on_problems(problems)
    return stats


def finished_before(args, stats: dict) -> bool:
    """Whether --out/final already holds an adapter trained with these very flags and prepared data."""
    saved = Path(args.out) / common.FINAL_ADAPTER / common.TRAINING_SETTINGS
    if not saved.is_file():
        return False
    previous = common.read_json(saved)
    return previous.get("arguments") == vars(args) and previous.get("prepared_stats") == stats


def run_settings(args, stats: dict, choice, load_in_4bit: bool, optim: str) -> dict:
    return {
        "arguments": vars(args),
        "prepared_stats": stats,
        "model": str(Path(args.model).resolve()),
        "prepared_data": str(Path(args.data).resolve()),
        "template": stats["settings"]["template"],
        "max_length": stats["settings"]["max_length"],
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "lora_target_modules": common.LORA_TARGET_MODULES,
        "load_in_4bit": load_in_4bit,
        "device": choice.device,
        "compute_dtype": choice.dtype_name,
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "lr": args.lr,
        "lr_scheduler": "cosine",
        "warmup_ratio": args.warmup_ratio,
        "optim": optim,
        "loss": args.loss,
        "seed": args.seed,
    }


def resume_point(args, settings: dict, say=print) -> str | None:
    """The checkpoint to resume from, after checking it belongs to a run with the same key settings."""
    if not args.resume:
        return None
    out = Path(args.out)
    if args.resume == "latest":
        checkpoint = checkpoints.latest_valid_checkpoint(out)
        if checkpoint is None:
            say(f"--resume: no usable checkpoint in {out}/ yet: starting from step 0")
            return None
    else:
        checkpoint = Path(args.resume)
        problem = checkpoints.checkpoint_problem(checkpoint)
        if problem:
            raise StageError(f"cannot resume from {checkpoint}: {problem}; try --resume without a path to pick the newest good one")
    saved_path = out / RUN_SETTINGS
    if saved_path.is_file():
        saved = common.read_json(saved_path)
        differing = [f"{key} {saved.get(key)!r} -> {settings[key]!r}" for key in RESUME_KEYS if saved.get(key) != settings[key]]
        if differing and not args.force_resume:
            raise StageError(f"cannot resume {checkpoint}: it was trained with other settings ({'; '.join(differing)}); use --overwrite to start over, or --force-resume")
    return str(checkpoint)


def build_model(args, choice, load_in_4bit: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    model = common.load_model(args.model, choice, load_in_4bit)
    # Gradient checkpointing recomputes activations in backward: far less memory for ~30% more compute.
    # The non-reentrant form works with frozen inputs and under DDP.
    checkpointing = {"use_reentrant": False}
    if load_in_4bit:
        # Casts norms to fp32 for stability and makes the frozen inputs carry gradients for checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=checkpointing)
        # The frozen tied embedding / output layer gains nothing from the fp32 upcast done above.
        memory.keep_embedding_in_compute_dtype(model, choice.dtype)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    set_seed(args.seed)  # LoRA's A matrices are random: same seed, same start
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=common.LORA_TARGET_MODULES,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


@common.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.lora_alpha = args.lora_alpha or 2 * args.lora_r
    # Under torchrun or accelerate launch every process runs this; only the first one writes and talks.
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    say = print if rank == 0 else (lambda *_, **__: None)
    stats = check_args(args)
    if finished_before(args, stats):
        say(f"✓ {args.out}/{common.FINAL_ADAPTER}/ already holds an adapter trained with these settings: skipping "
            f"(use --overwrite to train again)")
        return 0

    common.quiet_libraries()
    import torch
    from datasets import load_from_disk
    from transformers import Trainer, TrainingArguments
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    choice = common.pick_device()
    load_in_4bit = not args.no_4bit
    if load_in_4bit and not common.can_load_4bit(choice):
        say(f"note: bitsandbytes 4-bit does not run on {choice.device}: loading the model unquantised")
        load_in_4bit = False
    optim = args.optim or default_optimizer(choice, load_in_4bit)
    settings = run_settings(args, stats, choice, load_in_4bit, optim)
    out = Path(args.out)
    checkpoint = resume_point(args, settings, say)
    if rank == 0:
        if args.overwrite:
            import shutil

            for old in find_checkpoints(out) + [out / common.FINAL_ADAPTER]:
                shutil.rmtree(old, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        checkpoints.remove_staging(out)  # half-written checkpoints of an interrupted save
        if not (checkpoint and (out / RUN_SETTINGS).is_file()):
            common.write_json(out / RUN_SETTINGS, settings)

    data = load_from_disk(args.data)
    train_rows, eval_rows = data["train"], data["eval"]
    tokenizer = common.load_tokenizer(args.model)
    model = build_model(args, choice, load_in_4bit)

    compute_loss, restore_head = memory.install_chunked_loss(model) if args.loss == "chunked" else (None, lambda: None)
    longest = max(train_rows["length"])
    if args.auto_batch_size:
        if choice.device == "cuda":
            model.train()  # gradient checkpointing is active in train mode only
            fitted = memory.fit_batch(args.batch_size, args.grad_accum, lambda b: cuda_batch_fits(model, compute_loss, b, longest))
            say(f"--auto-batch-size: micro-batch {fitted[0]} x accumulation {fitted[1]} (asked {args.batch_size} x {args.grad_accum})")
            args.batch_size, args.grad_accum = fitted
        else:
            say(f"--auto-batch-size measures GPU memory and needs CUDA: keeping micro-batch {args.batch_size}")
    per_epoch = steps_per_epoch(len(train_rows), args.batch_size * world_size, args.grad_accum)
    total_steps = args.max_steps or math.ceil(per_epoch * args.epochs)
    trainable, total = model.get_nb_trainable_parameters()
    say(f"device: {choice.reason}")
    say(f"model: {settings['model']} ({'4-bit NF4' if load_in_4bit else choice.dtype_name}), "
        f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} on {', '.join(common.LORA_TARGET_MODULES)}")
    say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    processes = f" x {world_size} processes" if world_size > 1 else ""
    say(f"examples: train {len(train_rows)}, eval {len(eval_rows)} · effective batch {args.batch_size} x {args.grad_accum}"
        f"{processes} = {args.batch_size * args.grad_accum * world_size} · {per_epoch} steps/epoch · "
        f"{total_steps} steps in total · optimiser {optim}")
    estimate = memory.estimate_peak_memory(model.config, args.batch_size, longest, args.lora_r, load_in_4bit,
                                           dtype_bytes=2 if choice.device == "cuda" else 4,
                                           optimizer_bytes=2 if "8bit" in optim else 8, chunked_loss=args.loss == "chunked")
    where = "" if choice.device == "cuda" else " (were this a GPU run)"
    say(f"estimated peak GPU memory{where} at micro-batch {args.batch_size} x {longest} tokens: {memory.describe_estimate(estimate)}")
    say("one training example (only the part in ⟦ ⟧ is trained):\n" + show_trained_span(tokenizer, train_rows[0]))

    multiple = 8 if choice.device == "cuda" else 1  # tensor cores like multiples of 8
    training_args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_ratio,  # a float below 1 is a share of the total steps
        optim=optim,
        bf16=choice.device == "cuda" and choice.dtype_name == "bfloat16",
        fp16=choice.device == "cuda" and choice.dtype_name == "float16",
        logging_steps=args.logging_steps,
        eval_strategy="steps",
        eval_steps=args.save_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.keep_last,
        seed=args.seed,
        train_sampling_strategy="group_by_length",  # batches of similar length: little padding
        length_column_name="length",
        remove_unused_columns=False,  # pad_batch picks the model inputs itself
        prediction_loss_only=True,  # evaluation needs the loss only, not every position's logits
        report_to="none",  # TensorBoard is added below, writing to <out>/logs
        include_num_input_tokens_seen="non_padding",  # for trained tokens per second
        dataloader_num_workers=0,
        dataloader_pin_memory=choice.device == "cuda",
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient: no search needed
        use_cpu=choice.device == "cpu",
        ddp_backend="gloo" if choice.device == "cpu" and world_size > 1 else None,  # several CPU processes (tests)
        disable_tqdm=False,
    )
    trainer_class = checkpoints.atomic_checkpoint_trainer(monitoring.monitored_trainer(Trainer), trainable)
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=lambda features: pad_batch(features, tokenizer.pad_token_id, multiple),
        compute_loss_func=compute_loss,
    )
    padding = padding_share(trainer.get_train_dataloader())
    say(f"padding: {100 * padding:.1f}% of the tokens of an epoch (batches grouped by length, padded to their longest)")
    trainer.remove_callback(PrinterCallback)  # which of the two the Trainer adds depends on the log level
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(monitoring.run_monitor(out, total_steps))
    tensorboard = TensorBoardCallback()
    tensorboard.logging_dir = str(out / monitoring.LOGS)
    trainer.add_callback(tensorboard)
    stop = checkpoints.graceful_stop_callback()
    trainer.add_callback(stop)

    started = time.time()
    if checkpoint:
        say(f"resuming from {checkpoint}")
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if stop.signal_name is not None:
        saved = find_checkpoints(out)
        command = [arg for arg in (argv if argv is not None else sys.argv[1:]) if arg != "--resume"]
        say(f"stopped by {stop.signal_name} at step {trainer.state.global_step}/{total_steps}; checkpoint saved in {saved[-1]}/\n"
            f"resume with: python train.py {shlex.join(command + ['--resume'])}")
        return 128 + getattr(signal, stop.signal_name)
    # The last step is often an evaluation step already; evaluate again only when it was not.
    last = trainer.state.log_history[-2:] if trainer.state.log_history else []
    logged = [entry["eval_loss"] for entry in last if "eval_loss" in entry and entry.get("step") == trainer.state.global_step]
    eval_loss = logged[0] if logged else trainer.evaluate()["eval_loss"]
    runtime = time.time() - started
    restore_head()

    final = out / common.FINAL_ADAPTER
    if rank != 0:
        return 0  # the first process saves the adapter
    with common.atomic_output_dir(final) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        model_info = Path(args.model) / common.DOWNLOAD_INFO
        common.write_json(tmp / common.TRAINING_SETTINGS, {
            **settings,
            "base_model_id": common.read_json(model_info).get("model_id") if model_info.is_file() else settings["model"],
            "result": {"global_step": trainer.state.global_step, "train_loss": result.training_loss, "padding_share": round(padding, 4),
                       "last_train_loss": next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None),
                       "eval_loss": eval_loss, "runtime_s": round(runtime, 1)},
        })
    say(f"✓ trained {trainer.state.global_step} steps in {runtime:.0f}s: mean train loss {result.training_loss:.4f}, "
        f"eval loss {eval_loss:.4f}")
    say(f"✓ adapter saved in {final}/; curves in {out / monitoring.CURVES}, history in {out / monitoring.METRICS}, "
        f"TensorBoard: tensorboard --logdir {out / monitoring.LOGS}")
    if torch.cuda.is_available():
        say(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    say(f"next: python verify_model.py --model {args.model} --adapter {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
