"""Stage 4: fine-tune the base model with 4-bit QLoRA on the prepared problems.

Run:
    python train.py                          # 3 epochs, micro-batch 4 x accumulation 4
    python train.py --max-steps 20           # a short smoke run
    python train.py --resume                 # continue from the newest checkpoint in checkpoints/

Reads:  model/ (download_model.py), prepared_data/ (prepare_data.py)
Stop:   Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and says how to resume; a second
        Ctrl-C stops at once. Checkpoints are written atomically (see trainer.py).
Writes: checkpoints/run_settings.json, checkpoints/checkpoint-<step>/ (every --save-steps, the last --keep-last
        kept), checkpoints/final/ (adapter_config.json, adapter_model.safetensors, tokenizer,
        training_settings.json), metrics.json, training_curves.png, logs/ (TensorBoard)
Needs:  common.py, checkpoints.py, formats.py, monitoring.py, and once training starts trainer.py and chunked_loss.py
Next:   verify_model.py --adapter checkpoints/final

The recipe is QLoRA (Dettmers et al. 2023): the base weights frozen in 4-bit NF4 with double quantisation,
LoRA adapters on every linear projection, gradient checkpointing, paged 8-bit AdamW, cosine schedule with
warm-up. Two things keep it within a 6 GB GPU: the loss projects only the labelled positions onto the
151,936-entry vocabulary, a chunk at a time, instead of materialising logits for the whole batch
(chunked_loss.py); and batches are padded only to their longest example, with examples of similar length
batched together.

The code reads top to bottom in five phases: main() checks (flags and folders, nothing heavy) and takes the run
folder's lock; run() plans (every setting settled into one frozen RunSettings), builds (tokenizer, 4-bit model,
LoRA, Trainer), trains and saves.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import checkpoints
import common
import formats
import monitoring
from common import StageError

# Settings that make a checkpoint meaningless for another run if they differ.
RESUME_KEYS = ("model", "prepared_data", "prepared_fingerprint", "template", "lora_r", "lora_alpha", "load_in_4bit")


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


# ----------------------------------------------------------------------------------------------------------
# Processes: under torchrun or accelerate launch every process runs this script; only the first one writes
# and talks. This is the only place that reads the launcher's environment.


@dataclasses.dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environment(cls) -> Ranks:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def say(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Check: every problem with the flags and folders at once, before anything heavy is loaded.


def check(args) -> tuple[dict, bool]:
    """Returns the prepared data's stats.json and whether --out already holds this very run, finished."""
    problems, stats = [], {}
    if not 0 <= args.warmup_ratio < 1:
        problems.append(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if not 0 <= args.lora_dropout < 1:
        problems.append(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.resume and args.overwrite:
        problems.append("--resume and --overwrite contradict each other: choose one")
    model_problem = common.model_folder_problem(args.model)
    if model_problem:
        problems.append(model_problem)
    try:
        common.require_dataset_dir(args.data, "prepare_data.py")
        stats = common.prepared_stats(args.data)
    except StageError as error:
        problems.append(str(error))
    if stats and not model_problem:
        recorded_id = (Path(args.model) / common.DOWNLOAD_INFO).is_file()  # a Hub id, not just a path
        model_id = common.model_id(args.model)
        if recorded_id and stats["settings"]["model"] != model_id:
            problems.append(f"{args.data}/ was tokenized for {stats['settings']['model']} but {args.model}/ holds "
                            f"{model_id}: run prepare_data.py --model {args.model}")
        elif stats["settings"].get("tokenizer") != common.tokenizer_fingerprint(args.model):
            problems.append(f"{args.data}/ was tokenized with another tokenizer than the one in {args.model}/: "
                            f"run prepare_data.py --model {args.model}")
    if stats.get("settings", {}).get("streaming") and not args.max_steps:
        problems.append(f"{args.data}/ streams its training text, whose length is unknown: pass --max-steps (e.g. --max-steps 1000)")
    out = Path(args.out)
    finished = finished_before(out, vars(args), stats)
    earlier = out.is_dir() and (checkpoints.find_checkpoints(out) or (out / common.FINAL_ADAPTER).exists())
    if not args.resume and not args.overwrite and earlier and not finished:
        problems.append(f"{out}/ holds an earlier run: pass --resume to continue it, --overwrite to start over, or --out for a new folder")
    if common.out_file_problem(out):
        problems.append(common.out_file_problem(out))
    if args.resume and args.resume != "latest" and not Path(args.resume).is_dir():
        problems.append(f"--resume {args.resume}: no such checkpoint folder")
    common.fail_on_problems(problems)
    return stats, finished and not args.overwrite


def finished_before(out: Path, arguments: dict, stats: dict) -> bool:
    """Whether out/final already holds an adapter trained with this very command line and prepared data, on the
    same download of the base model (a model/ downloaded again at another revision keeps its id and tokenizer)."""
    saved = out / common.FINAL_ADAPTER / common.TRAINING_SETTINGS
    if not saved.is_file():
        return False
    previous = common.read_json(saved)
    return (previous.get("arguments") == arguments and previous.get("prepared_stats") == stats
            and previous.get("base_model_source") == common.download_info(arguments["model"]))


# ----------------------------------------------------------------------------------------------------------
# Plan: every setting of the run, settled once and frozen.


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What the run does, written to run_settings.json, every checkpoint and final/training_settings.json."""

    arguments: dict  # the command line as parsed, so that rerunning the same command is recognised
    prepared_stats: dict
    model: str
    base_model_id: str
    base_model_source: dict  # model/download_info.json: which download (revision, demo recipe) the weights are from
    prepared_data: str
    prepared_fingerprint: str  # which problems are in which split, and how they were tokenized
    template: str
    max_length: int
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    lora_target_modules: list
    load_in_4bit: bool
    device: str
    compute_dtype: str
    processes: int
    batch_size: int  # micro-batch per process, after --auto-batch-size
    grad_accum: int
    steps_per_epoch: int
    epochs: float
    max_steps: int | None
    total_steps: int
    lr: float
    lr_scheduler: str
    warmup_ratio: float
    optim: str
    loss: str
    seed: int
    save_steps: int
    keep_last: int
    logging_steps: int

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.processes

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def find_lora_targets(model_dir: str) -> list[str]:
    """The names of every linear projection in the model's decoder blocks, in the order they appear: q_proj ...
    down_proj for Qwen2 and Llama, c_attn, c_proj, c_fc for GPT-2. Never the output layer (nor the embeddings),
    as in QLoRA. Read from the architecture built on the meta device: no weights are loaded."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    output = skeleton.get_output_embeddings()
    names: list[str] = []
    for path, module in skeleton.named_modules():
        name = path.rsplit(".", 1)[-1]
        if module is not output and isinstance(module, (torch.nn.Linear, Conv1D)) and name not in names:
            names.append(name)
    if not names:
        raise StageError(f"the {skeleton.config.model_type} model in {model_dir}/ has no linear layers for LoRA adapters")
    return names


def default_optimizer(device: str, load_in_4bit: bool) -> str:
    """Paged 8-bit AdamW on CUDA (pages optimiser state to RAM under memory pressure); bitsandbytes' 8-bit
    AdamW on CPU, where paging does not exist; plain AdamW when the model is not quantised."""
    if not load_in_4bit:
        return "adamw_torch"
    return "paged_adamw_8bit" if device == "cuda" else "adamw_8bit"


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(math.ceil(n_examples / batch_size) / grad_accum))


def plan_run(args, stats: dict, choice, load_in_4bit: bool, n_train: int, processes: int, lora_targets: list[str],
             fitted_batch: tuple[int, int] | None = None) -> RunSettings:
    """Every setting of the run from the flags, the data, the device and the model's LoRA targets. `fitted_batch`
    is the (micro-batch, accumulation) that --auto-batch-size measured on the GPU; it replaces the asked ones."""
    batch_size, grad_accum = fitted_batch or (args.batch_size, args.grad_accum)
    per_epoch = steps_per_epoch(n_train, batch_size * processes, grad_accum)
    return RunSettings(
        arguments=dict(vars(args)),
        prepared_stats=stats,
        model=str(Path(args.model).resolve()),
        base_model_id=common.model_id(args.model),
        base_model_source=common.download_info(args.model),
        prepared_data=str(Path(args.data).resolve()),
        prepared_fingerprint=stats.get("fingerprint", ""),
        template=stats["settings"]["template"],
        max_length=stats["settings"]["max_length"],
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha or 2 * args.lora_r,
        lora_dropout=args.lora_dropout,
        lora_target_modules=list(lora_targets),
        load_in_4bit=load_in_4bit,
        device=choice.device,
        compute_dtype=choice.dtype_name,
        processes=processes,
        batch_size=batch_size,
        grad_accum=grad_accum,
        steps_per_epoch=per_epoch,
        epochs=args.epochs,
        max_steps=args.max_steps,
        total_steps=args.max_steps or math.ceil(per_epoch * args.epochs),
        lr=args.lr,
        lr_scheduler="cosine",
        warmup_ratio=args.warmup_ratio,
        optim=args.optim or default_optimizer(choice.device, load_in_4bit),
        loss=args.loss,
        seed=args.seed,
        save_steps=args.save_steps,
        keep_last=args.keep_last,
        logging_steps=args.logging_steps,
    )


def resume_point(resume: str | None, force: bool, out: Path, settings: RunSettings, say=print) -> str | None:
    """The checkpoint to resume from, after checking it belongs to a run with the same key settings."""
    if not resume:
        return None
    if resume == "latest":
        checkpoint = checkpoints.latest_valid_checkpoint(out)
        if checkpoint is None:
            say(f"--resume: no usable checkpoint in {out}/ yet: starting from step 0")
            return None
    else:
        checkpoint = Path(resume)
        problem = checkpoints.checkpoint_problem(checkpoint)
        if problem:
            raise StageError(f"cannot resume from {checkpoint}: {problem}; try --resume without a path to pick the newest good one")
    saved_path = out / common.RUN_SETTINGS
    if saved_path.is_file():
        saved, current = common.read_json(saved_path), settings.to_json()
        differing = [f"{key} {saved.get(key)!r} -> {current[key]!r}" for key in RESUME_KEYS if saved.get(key) != current[key]]
        if differing and not force:
            raise StageError(f"cannot resume {checkpoint}: it was trained with other settings or data ({'; '.join(differing)}); "
                             f"use --overwrite to start over, or --force-resume")
    return str(checkpoint)


# ----------------------------------------------------------------------------------------------------------
# Memory: an estimate printed before training, and the batch fit of --auto-batch-size (CUDA).


def estimate_peak_memory(config, micro_batch: int, seq_len: int, lora_r: int, load_in_4bit: bool = True,
                         dtype_bytes: int = 2, optimizer_bytes: float = 2.0, chunked_loss: bool = True,
                         labelled_share: float = 0.5, chunk_size: int = 128) -> dict:
    """Estimated bytes of GPU memory at the peak of a training step, by component. Deliberately simple: which
    terms dominate, and how they scale.

    config: a transformers config of a decoder-only model (Qwen2, Llama, GPT-2, ...); optimizer_bytes: bytes of optimiser state per trainable
    parameter (2 for 8-bit AdamW's two moments, 8 for fp32 AdamW); labelled_share: share of positions that carry
    a label (the solution; the prompt is masked); chunk_size: rows of logits the chunked loss projects at a time.
    """
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden  # GPT-2: n_inner or 4 x
    kv = hidden * (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) // config.num_attention_heads
    embedding_copies = 1 if getattr(config, "tie_word_embeddings", True) else 2  # an untied output layer is a second one
    per_layer_linear = hidden * hidden * 2 + hidden * kv * 2 + hidden * inter * 3  # q, o, k, v, gate, up, down
    linear_params = per_layer_linear * layers
    # NF4 with double quantisation: 4 bits per weight plus ~0.13 bits of quantisation constants.
    weight_bytes = linear_params * (4.13 / 8 if load_in_4bit else dtype_bytes) + embedding_copies * vocab * hidden * dtype_bytes
    lora_params = lora_r * layers * (2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + inter))
    lora_bytes = lora_params * (4 + 4 + optimizer_bytes)  # fp32 weights, fp32 gradients, optimiser state
    tokens = micro_batch * seq_len
    # Gradient checkpointing keeps each layer's input; one layer's activations are live during recompute.
    kept_inputs = tokens * hidden * dtype_bytes * layers
    one_layer = tokens * (10 * hidden + 3 * inter) * dtype_bytes
    if chunked_loss:
        # one chunk of logits in the compute dtype and in fp32, and the gradient of the labelled hidden states
        loss = min(chunk_size, tokens) * vocab * (dtype_bytes + 4) + tokens * labelled_share * hidden * 4 * 2
    else:
        # logits in the compute dtype, their fp32 upcast, log-softmax and its gradient, over every position
        loss = tokens * vocab * (dtype_bytes + 4 + 4 + 4)
    parts = {"weights": weight_bytes, "lora_and_optimizer": lora_bytes, "activations": kept_inputs + one_layer, "loss": loss}
    parts["total"] = sum(parts.values())
    return parts


def describe_estimate(parts: dict) -> str:
    detail = ", ".join(f"{name.replace('_', ' ')} {value / common.GIB:.2f}" for name, value in parts.items() if name != "total")
    return f"{parts['total'] / common.GIB:.2f} GiB ({detail}; CUDA's own context adds ~0.3-0.5 GiB outside this)"


def fit_batch(requested_batch: int, grad_accum: int, fits) -> tuple[int, int]:
    """Largest micro-batch <= the effective batch for which fits(batch) holds, and the accumulation that keeps
    the effective batch (micro-batch x accumulation) as close as possible to what was asked."""
    effective = requested_batch * grad_accum
    batch = effective
    while batch > 1 and not fits(batch):
        batch //= 2
    return batch, max(1, math.ceil(effective / batch))


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


# ----------------------------------------------------------------------------------------------------------
# Build: batches, the model with its LoRA adapters, the loss.


def padding_share(batches: list[list[int]], pad_to: int | None = None) -> float:
    """Share of padding among the tokens of `batches` (lists of example lengths), each padded to its longest
    example, or to `pad_to` tokens."""
    padded = sum((pad_to or max(lengths)) * len(lengths) for lengths in batches)
    return 1 - sum(map(sum, batches)) / max(1, padded)


def show_trained_span(tokenizer, example: dict) -> str:
    """Decode one example with the trained tokens (labels != -100) between ⟦ and ⟧."""
    ids, labels = example["input_ids"], example["labels"]
    first = next(i for i, label in enumerate(labels) if label != common.IGNORE_INDEX)
    return tokenizer.decode(ids[:first]) + "⟦" + tokenizer.decode(ids[first:]) + "⟧"


def build_model(model_dir: str, choice, load_in_4bit: bool, lora_r: int, lora_alpha: float, lora_dropout: float, seed: int,
                lora_targets: list[str] | None = None):
    """The base model (4-bit NF4 or plain) prepared for training, with LoRA adapters on `lora_targets` (by default
    every linear projection of its decoder blocks, see find_lora_targets)."""
    lora_targets = lora_targets or find_lora_targets(model_dir)
    import chunked_loss
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    model = common.load_model(model_dir, choice, load_in_4bit)
    # Gradient checkpointing recomputes activations in backward: far less memory for ~30% more compute.
    # The non-reentrant form works with frozen inputs and under DDP.
    checkpointing = {"use_reentrant": False}
    if load_in_4bit:
        # Casts norms to fp32 for stability and makes the frozen inputs carry gradients for checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=checkpointing)
        # The frozen tied embedding / output layer gains nothing from the fp32 upcast done above.
        chunked_loss.keep_embedding_in_compute_dtype(model, choice.dtype)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    if load_in_4bit and choice.device == "cpu":
        # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer for its inference kernel the first time
        # it runs in eval mode without gradients (the mid-run evaluation), and from then on training goes
        # through that kernel, which has no backward and adds the bias in place (a crash under DDP). Keep the
        # trainable layout for the whole run.
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    set_seed(seed)  # LoRA's A matrices are random: same seed, same start
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=lora_targets,
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def loss_for(model, loss: str):
    """A context manager yielding the Trainer's compute_loss_func: the chunked loss with the output layer
    skipped inside the block (put back on leaving), or None for the model's own loss."""
    if loss == "standard":
        return contextlib.nullcontext(None)
    import chunked_loss

    return chunked_loss.output_layer_skipped(model)


# glibc serves allocations below a threshold from its heap and keeps what is freed there; the threshold starts at
# 128 KiB but rises to the size of any large buffer freed (up to 32 MiB). A CPU training step frees and
# reallocates hundreds of 3-40 MB buffers (dequantised weights, activations), and the heap fragments: 4.3 GiB
# resident for 1.8 GiB in use (bench/whole_run.py). With a fixed threshold of 4 MiB those buffers are mapped and
# unmapped, and freed memory goes back: 2.3 GiB, for up to ~15 % of CPU speed (1 MiB: the same memory, slower;
# 16 MiB: no gain). CUDA tensors are not concerned: they live in CUDA's caching allocator.
GLIBC_MMAP_THRESHOLD = 4 << 20


def return_freed_memory() -> bool:
    """Make glibc give large freed buffers back to the system (see GLIBC_MMAP_THRESHOLD). Not where the user set
    MALLOC_MMAP_THRESHOLD_ themselves, nor with PIPELINE_GLIBC_DEFAULTS=1 (the benchmark's baseline)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ or os.environ.get("PIPELINE_GLIBC_DEFAULTS"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    return mallopt(-3, GLIBC_MMAP_THRESHOLD) == 1  # M_MMAP_THRESHOLD; 1 means it took


def streamed_blocks(stream: dict, tokenizer, block: int):
    """The training blocks of a streamed source: its files after the held-out ones, packed as prepare_data.py packs
    text, read lazily (an IterableDataset: the Trainer takes batches as it needs them, and starts over at its end)."""
    from datasets import IterableDataset

    def blocks():
        rows = common.open_stream(stream["source"]).skip(stream["skip_files"])
        yield from formats.pack_blocks((row[stream["column"]] for row in rows), tokenizer, block)

    return IterableDataset.from_generator(blocks)


def training_arguments(settings: RunSettings, out: Path, grouped: bool = True):
    from transformers import TrainingArguments

    cuda, cpu = settings.device == "cuda", settings.device == "cpu"
    return TrainingArguments(
        output_dir=str(out),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_ratio,  # a float below 1 is a share of the total steps
        optim=settings.optim,
        bf16=cuda and settings.compute_dtype == "bfloat16",
        fp16=cuda and settings.compute_dtype == "float16",
        logging_steps=settings.logging_steps,
        eval_strategy="steps",
        eval_steps=settings.save_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.keep_last,
        seed=settings.seed,
        # Batches of similar length: little padding (a stream of packed blocks has nothing to group).
        train_sampling_strategy="group_by_length" if grouped else "sequential",
        length_column_name="length",
        remove_unused_columns=False,  # common.pad_batch picks the model inputs itself
        prediction_loss_only=True,  # evaluation needs the loss only, not every position's logits
        report_to="none",  # the Trainer's TensorBoard callback is added by trainer.py, writing to <out>/logs
        include_num_input_tokens_seen="non_padding",  # for tokens per second
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient: no search needed
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and settings.processes > 1 else None,  # several CPU processes (tests)
        disable_tqdm=False,
    )


def prepare_run_folder(out: Path, overwrite: bool, resuming: bool, settings: RunSettings) -> None:
    """Clear an earlier run on --overwrite, drop half-written checkpoints, record this run's settings."""
    if overwrite:
        for old in checkpoints.find_checkpoints(out) + [out / common.FINAL_ADAPTER]:
            shutil.rmtree(old, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints.remove_staging(out)  # half-written checkpoints of an interrupted save
    if not (resuming and (out / common.RUN_SETTINGS).is_file()):
        common.write_json(out / common.RUN_SETTINGS, settings.to_json())


def describe_plan(settings: RunSettings, choice, trainable: int, total: int, n_train: int, n_eval: int) -> str:
    precision = "4-bit NF4" if settings.load_in_4bit else settings.compute_dtype
    processes = f" x {settings.processes} processes" if settings.processes > 1 else ""
    return "\n".join([
        f"device: {choice.reason}",
        f"model: {settings.model} ({precision}), LoRA r={settings.lora_r} alpha={settings.lora_alpha:g} on "
        f"{', '.join(settings.lora_target_modules)}",
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)",
        f"examples: train {n_train}, eval {n_eval} · effective batch {settings.batch_size} x {settings.grad_accum}"
        f"{processes} = {settings.effective_batch} · {settings.steps_per_epoch} steps/epoch · "
        f"{settings.total_steps} steps in total · optimiser {settings.optim}",
    ])


@common.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ranks = Ranks.from_environment()
    say, out = ranks.say, Path(args.out)

    # ---- check ------------------------------------------------------------------------------------------
    stats, finished = check(args)
    if finished:
        say(f"✓ {out}/{common.FINAL_ADAPTER}/ already holds an adapter trained with these settings: skipping "
            f"(use --overwrite to train again)")
        return 0
    # One train.py at a time per run folder (the first process of a multi-process run holds it for all).
    with checkpoints.run_lock(out) if ranks.is_main else contextlib.nullcontext():
        return run(args, stats, ranks, argv)


def run(args, stats: dict, ranks: Ranks, argv) -> int:
    """plan -> build -> train -> save, for checked arguments, with the run folder held."""
    say, out = ranks.say, Path(args.out)
    return_freed_memory()  # before the model is loaded: every large buffer from here on
    common.quiet_libraries()
    from datasets import load_from_disk

    import trainer as pipeline_trainer

    # ---- plan -------------------------------------------------------------------------------------------
    choice = common.pick_device()
    load_in_4bit = common.use_4bit(choice, args.no_4bit, say)
    data = load_from_disk(args.data)
    tokenizer = common.load_tokenizer(args.model)
    stream = stats["settings"].get("streaming")
    train_rows, eval_rows = streamed_blocks(stream, tokenizer, stats["settings"]["max_length"]) if stream else data["train"], data["eval"]
    # A stream's length is unknown: its "epoch" is the --max-steps that check() required.
    n_train = args.max_steps * args.batch_size * args.grad_accum * ranks.world_size if stream else len(train_rows)
    settings = plan_run(args, stats, choice, load_in_4bit, n_train, ranks.world_size, find_lora_targets(args.model))
    checkpoint = resume_point(args.resume, args.force_resume, out, settings, say)

    # ---- build ------------------------------------------------------------------------------------------
    model = build_model(args.model, choice, load_in_4bit, settings.lora_r, settings.lora_alpha, settings.lora_dropout, settings.seed,
                        settings.lora_target_modules)
    longest = stats["settings"]["max_length"] if stream else max(train_rows["length"])
    with loss_for(model, settings.loss) as compute_loss:
        if args.auto_batch_size and choice.device == "cuda":
            # What fits can only be measured on the built model: the plan is settled again with the fitted batch.
            model.train()  # gradient checkpointing is active in train mode only
            fitted = fit_batch(args.batch_size, args.grad_accum, lambda b: cuda_batch_fits(model, compute_loss, b, longest))
            say(f"--auto-batch-size: micro-batch {fitted[0]} x accumulation {fitted[1]} (asked {args.batch_size} x {args.grad_accum})")
            settings = plan_run(args, stats, choice, load_in_4bit, len(train_rows), ranks.world_size, settings.lora_target_modules, fitted)
        elif args.auto_batch_size:
            say(f"--auto-batch-size measures GPU memory and needs CUDA: keeping micro-batch {args.batch_size}")
        if ranks.is_main:
            prepare_run_folder(out, args.overwrite, checkpoint is not None, settings)

        trainable, total = model.get_nb_trainable_parameters()
        say(describe_plan(settings, choice, trainable, total, "streamed" if stream else len(train_rows), len(eval_rows)))
        estimate = estimate_peak_memory(model.config, settings.batch_size, longest, settings.lora_r, load_in_4bit,
                                        dtype_bytes=2 if choice.device == "cuda" else 4,
                                        optimizer_bytes=2 if "8bit" in settings.optim else 8, chunked_loss=settings.loss == "chunked")
        where = "" if choice.device == "cuda" else " (were this a GPU run)"
        say(f"estimated peak GPU memory{where} at micro-batch {settings.batch_size} x {longest} tokens: {describe_estimate(estimate)}")
        say("one training example (only the part in ⟦ ⟧ is trained):\n" + show_trained_span(tokenizer, (eval_rows if stream else train_rows)[0]))

        multiple = 8 if choice.device == "cuda" else 1  # tensor cores like multiples of 8
        trainer = pipeline_trainer.PipelineTrainer(
            model=model,
            args=training_arguments(settings, out, grouped=not stream),
            train_dataset=train_rows,
            eval_dataset=eval_rows,
            data_collator=lambda features: common.pad_batch(features, tokenizer.pad_token_id, multiple),
            compute_loss_func=compute_loss,
            run_dir=out,
            total_steps=settings.total_steps,
            settings=settings.to_json(),
            trainable_params=trainable,
        )
        if stream:  # full blocks of packed text: nothing to pad, and the stream is not read twice
            padding = 0.0
            say(f"training text streamed from {stream['source']['dataset']} after its first {stream['skip_files']} files "
                f"(held out), packed in blocks of {longest} tokens")
        else:
            padding = padding_share([batch["attention_mask"].sum(dim=1).tolist() for batch in trainer.get_train_dataloader()])
            say(f"padding: {100 * padding:.1f}% of the tokens of an epoch (batches grouped by length, padded to their longest)")

        # ---- train ------------------------------------------------------------------------------------------
        started = time.time()
        if checkpoint:
            say(f"resuming from {checkpoint}")
        result = trainer.train(resume_from_checkpoint=checkpoint)
        if trainer.stop.signal_name is not None:
            command = [arg for arg in (argv if argv is not None else sys.argv[1:]) if arg != "--resume"]
            say(f"stopped by {trainer.stop.signal_name} at step {trainer.state.global_step}/{settings.total_steps}; "
                f"checkpoint saved in {checkpoints.find_checkpoints(out)[-1]}/\n"
                f"resume with: python train.py {shlex.join(command + ['--resume'])}")
            return 128 + getattr(signal, trainer.stop.signal_name)
        # The last step is often an evaluation step already; evaluate again only when it was not.
        last = trainer.state.log_history[-2:]
        logged = [entry["eval_loss"] for entry in last if "eval_loss" in entry and entry.get("step") == trainer.state.global_step]
        eval_loss = logged[0] if logged else trainer.evaluate()["eval_loss"]
        runtime = time.time() - started

    # ---- save (the output layer is back in place) ---------------------------------------------------------
    if not ranks.is_main:
        return 0  # the first process saves the adapter
    final = out / common.FINAL_ADAPTER
    last_train_loss = next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None)
    with common.atomic_output_dir(final) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        common.write_json(tmp / common.TRAINING_SETTINGS, {
            **settings.to_json(),
            "result": {"global_step": trainer.state.global_step, "train_loss": result.training_loss,
                       "padding_share": round(padding, 4), "last_train_loss": last_train_loss,
                       "eval_loss": eval_loss, "runtime_s": round(runtime, 1)},
        })
    say(f"✓ trained {trainer.state.global_step} steps in {runtime:.0f}s: mean train loss {result.training_loss:.4f}, "
        f"eval loss {eval_loss:.4f}")
    say(f"✓ adapter saved in {final}/; curves in {out / monitoring.CURVES}, history in {out / monitoring.METRICS}, "
        f"TensorBoard: tensorboard --logdir {out / monitoring.LOGS}")
    if choice.device == "cuda":
        import torch

        say(f"peak GPU memory: {torch.cuda.max_memory_allocated() / common.GIB:.2f} GiB")
    say(f"next: python verify_model.py --model {args.model} --adapter {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
