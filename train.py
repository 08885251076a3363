"""Stage 4: fine-tune the base model with 4-bit QLoRA on the prepared problems.

Run:
    python train.py                          # 3 epochs, micro-batch 4 x accumulation 4
    python train.py --max-steps 20           # a short smoke run
    python train.py --resume                 # continue from the newest checkpoint in checkpoints/

Reads:  model/ (download_model.py), prepared_data/ (prepare_data.py)
Stop:   Ctrl-C (or SIGTERM; Ctrl-Break on Windows) finishes the current step, saves a checkpoint and says how
        to resume; a second Ctrl-C stops at once. Checkpoints are written atomically (see pipeline/trainer.py).
Writes: checkpoints/run_settings.json, checkpoints/checkpoint-<step>/ (every --save-steps, the last --keep-last
        kept), checkpoints/final/ (adapter_config.json, adapter_model.safetensors, tokenizer,
        training_settings.json), metrics.json, training_curves.png, logs/ (TensorBoard)
Needs:  pipeline/ (cli, data, folders, inference, loss, memory, models, monitoring, platforms, prompts, run_folder,
        sandbox, sandbox_runner, scoring, stats, trainer)
Next:   verify_model.py --adapter checkpoints/final

The recipe is QLoRA (Dettmers et al. 2023): the base weights frozen in 4-bit NF4 with double quantisation,
LoRA adapters on every linear projection, gradient checkpointing, paged 8-bit AdamW, cosine schedule with
warm-up. Two things keep it within a 6 GB GPU: the loss projects only the labelled positions onto the
151,936-entry vocabulary, a chunk at a time, instead of materialising logits for the whole batch
(pipeline/loss.py); and batches are padded only to their longest example, with examples of similar length
batched together.

The code reads top to bottom in the order it runs: main() checks the flags and folders (nothing heavy) and
takes the run folder's lock; run() loads the inputs, builds the 4-bit model with its LoRA adapters, plans (every
setting settled once into a frozen RunSettings; after the build, because --auto-batch-size measures the built
model), trains and saves.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from pipeline import cli, data, folders, memory, models, monitoring, platforms, prompts, run_folder
from pipeline.cli import StageError

# The Trainer's optimisers (transformers' OptimizerNames) that run on this project's packages, torch and
# bitsandbytes; the others need one more (torchao, galore-torch, lomo-optim, schedulefree, ...). Checked as the flag
# is parsed, in a line, without importing torch: run_pipeline.py refuses a wrong name before its first stage.
OPTIMIZERS = ["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop", "adamw_8bit",
              "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "lion_32bit", "paged_lion_8bit",
              "paged_lion_32bit", "ademamix", "ademamix_8bit", "paged_ademamix_8bit", "paged_ademamix_32bit",
              "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit"]
# --demo: the demo model is tiny and the demo data has 65 training problems. A larger learning rate and more epochs
# than the real run's let it visibly learn in under a minute on a CPU; no LoRA dropout (peft's and Unsloth's
# default): on a CPU its random masks take a fifth of every step.
DEMO = {"--epochs": "20", "--batch-size": "8", "--grad-accum": "1", "--lr": "3e-3", "--lora-dropout": "0",
        "--save-steps": "40"}


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(__doc__)
    positive_int, positive_float = cli.positive(int), cli.positive(float)
    # folders
    parser.add_argument("--model", default=folders.MODEL_DIR, help="base model folder (default: %(default)s)")
    parser.add_argument("--data", default=folders.PREPARED_DIR,
                        help="folder written by prepare_data.py (default: %(default)s)")
    parser.add_argument("--out", default=folders.CHECKPOINTS_DIR,
                        help="checkpoint and adapter folder (default: %(default)s)")
    # optimisation
    parser.add_argument("--epochs", type=positive_float, default=3,
                        help="passes over the training split (default: %(default)s)")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="stop after this many optimiser steps; overrides --epochs (smoke runs)")
    parser.add_argument("--batch-size", type=positive_int, default=4,
                        help="micro-batch: examples per forward pass (default: %(default)s)")
    parser.add_argument("--grad-accum", type=positive_int, default=4,
                        help="micro-batches per optimiser step (default: %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=2e-4, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--warmup-ratio", type=cli.fraction(), default=0.05,
                        help="share of steps for linear warm-up, in [0, 1) (default: %(default)s)")
    parser.add_argument("--optim", type=optimizer, default=None, metavar="NAME",
                        help="the Trainer's optimiser: " + ", ".join(OPTIMIZERS) + " (default: paged_adamw_8bit on "
                             "CUDA with 4-bit, adamw_8bit on CPU, else adamw_torch)")
    parser.add_argument("--seed", type=cli.SEED, default=42,
                        help="seed for LoRA initialisation and data order (default: %(default)s)")
    # LoRA
    parser.add_argument("--lora-r", type=positive_int, default=16, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--lora-alpha", type=positive_float, default=None,
                        help="LoRA scaling alpha (default: 2 x rank)")
    parser.add_argument("--lora-dropout", type=cli.fraction(), default=0.05,
                        help="dropout on the LoRA input, in [0, 1) (default: %(default)s)")
    parser.add_argument("--no-4bit", action="store_true",
                        help="load the base model unquantised in the compute dtype (needs more memory)")
    # memory
    parser.add_argument("--loss", choices=["chunked", "standard"], default="chunked",
                        help="chunked: project only labelled positions, in chunks (default); standard: the model's "
                             "own loss")
    parser.add_argument("--cpu-dtype", choices=models.CPU_DTYPES, default="auto",
                        help="compute dtype on the CPU; auto: bf16 where the CPU multiplies bf16 natively "
                             "(AVX512-BF16, AMX) and the model is at least 512 wide, else fp32 (default: "
                             "%(default)s)")
    parser.add_argument("--cpu-memory", choices=memory.CPU_MEMORY_MODES, default="auto",
                        help="on the CPU: fast (the C allocator as it is) or lean (freed memory given back: about half "
                             "the memory, up to ~15 %% slower); auto: fast where the run fits in the memory available "
                             "(default: %(default)s)")
    parser.add_argument("--auto-batch-size", action="store_true",
                        help="on CUDA, use the largest micro-batch that fits and keep the effective batch by raising "
                             "--grad-accum")
    # checkpoints and logging
    parser.add_argument("--save-steps", type=positive_int, default=50,
                        help="checkpoint and eval loss every N steps (default: %(default)s)")
    parser.add_argument("--keep-last", type=positive_int, default=3,
                        help="checkpoints to keep, and with --score-checkpoints the best-scoring one (default: "
                             "%(default)s)")
    parser.add_argument("--score-checkpoints", action="store_true",
                        help="at every evaluation also run the held-out problems' tests (greedy pass@1, as "
                             "evaluate.py scores), since the loss is not the score; slower: one generation per save")
    parser.add_argument("--score-max-new-tokens", type=positive_int, default=384,
                        help="longest answer when scoring checkpoints (default: %(default)s, as evaluate.py)")
    parser.add_argument("--logging-steps", type=positive_int, default=10,
                        help="one log line every N steps (default: %(default)s)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue from the newest checkpoint in --out, or from PATH")
    parser.add_argument("--force-resume", action="store_true",
                        help="resume even though key settings (model, data, LoRA) differ from the checkpoint's")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the checkpoints of an earlier run in --out and start over")
    parser.add_demo_preset(DEMO, "a tiny random model learning 65 problems in half a minute on a CPU")
    return parser


def optimizer(name: str) -> str:
    """--optim's type: one of OPTIMIZERS, else one line with the nearest names."""
    if name in OPTIMIZERS:
        return name
    near = difflib.get_close_matches(name, OPTIMIZERS, n=3, cutoff=0.5) or ["adamw_torch", "adamw_8bit",
                                                                             "paged_adamw_8bit"]
    raise argparse.ArgumentTypeError(f"{name!r} is not an optimiser train.py runs; for example {', '.join(near)}")


@cli.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ranks = Ranks.from_environment()
    stats, finished, checkpoint = check(args)
    if finished:
        ranks.say(f"✓ {args.out}/{folders.FINAL_ADAPTER}/ already holds an adapter trained with these settings: "
                  f"skipping (use --overwrite to train again)")
        return 0
    # One train.py at a time per run folder (the first process of a multi-process run holds it for all).
    with run_folder.run_lock(args.out) if ranks.is_main else contextlib.nullcontext():
        return run(args, stats, checkpoint, ranks, argv)


@dataclasses.dataclass(frozen=True)
class Ranks:
    """Under torchrun or accelerate launch every process runs this script; only the first one writes and talks.
    The only place that reads the launcher's environment."""

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


def check(args) -> tuple[dict, bool, Path | None]:
    """Every problem with the flags and folders at once, before anything heavy is loaded. Returns the prepared
    data's stats.json, whether --out already holds this very run, finished, and the checkpoint to resume from."""
    problems, stats, checkpoint = [], {}, None
    if args.resume and args.overwrite:
        problems.append("--resume and --overwrite contradict each other: choose one")
    model_problem = models.model_folder_problem(args.model)
    if model_problem:
        problems.append(model_problem)
    try:
        folders.require_dataset_dir(args.data, "prepare_data.py")
        stats = data.prepared_stats(args.data)
    except StageError as error:
        problems.append(str(error))
    if stats and not model_problem:
        problems += data_problems(args, stats)
    out = Path(args.out)
    finished = run_folder.finished_before(out, vars(args), stats)
    problems += run_folder_problems(args, out, finished, stats)
    if args.resume and stats and not model_problem and not problems:
        checkpoint, problem = run_folder.resume_from(args, stats, out, lora_alpha(args))
        problems += [problem] if problem else []
    cli.fail_on_problems(problems)
    return stats, finished and not args.overwrite, checkpoint


def data_problems(args, stats: dict) -> list[str]:
    """The prepared data must have been tokenized for this model (its Hub id) with this very tokenizer, have a
    token to train on, and, streamed, a length given by --max-steps."""
    prepared, problems = stats["settings"], []
    recorded_id = (Path(args.model) / folders.DOWNLOAD_INFO).is_file()  # a Hub id, not just a path
    model_id = models.model_id(args.model)
    if recorded_id and prepared["model"] != model_id:
        problems.append(f"{args.data}/ was tokenized for {prepared['model']} but {args.model}/ holds {model_id}: run "
                        f"prepare_data.py --model {args.model}")
    elif prepared.get("tokenizer") != models.tokenizer_fingerprint(args.model):
        problems.append(f"{args.data}/ was tokenized with another tokenizer than the one in {args.model}/: run "
                        f"prepare_data.py --model {args.model}")
    if prepared.get("streaming") and not args.max_steps:
        problems.append(f"{args.data}/ streams its training text, whose length is unknown: pass --max-steps "
                        f"(e.g. --max-steps 1000)")
    fmt = data.prepared_format(prepared)
    if args.score_checkpoints and not data.HAS_TESTS[fmt]:
        problems.append(f"--score-checkpoints runs the held-out problems' tests: {fmt} data has none (its eval loss "
                        f"is what there is to compare)")
    if stats.get("tokens", {}).get("trained") == 0:
        problems.append(f"{args.data}/ holds no token to train on: prepare it again with a larger --max-length")
    return problems


def run_folder_problems(args, out: Path, finished: bool, stats: dict) -> list[str]:
    """--out must be train.py's folder (or new), and an earlier run in it is continued or replaced only on request;
    --resume is offered only where these settings and data could continue it."""
    if folders.out_problem(out, "train"):
        return [folders.out_problem(out, "train")]
    earlier = out.is_dir() and (run_folder.find_checkpoints(out) or (out / folders.FINAL_ADAPTER).exists())
    if args.resume or args.overwrite or not earlier or finished:
        return []
    recorded = out / folders.RUN_SETTINGS
    differing = run_folder.changed_settings(folders.read_json(recorded), args, stats, lora_alpha(args)) if (
        recorded.is_file() and stats) else []
    if differing:
        return [f"{out}/ holds a run trained with other settings or data ({'; '.join(differing)}): pass --overwrite "
                f"to replace it with this one, or --out for a new folder"]
    return [f"{out}/ holds an earlier run: pass --resume to continue it, --overwrite to start over, or --out for "
            f"a new folder"]


# ----------------------------------------------------------------------------------------------------------
# Run: load -> build -> plan -> train -> save.


def run(args, stats: dict, checkpoint: Path | None, ranks: Ranks, argv) -> int:
    """Trains for checked arguments, with the run folder held."""
    say, out = ranks.say, Path(args.out)
    models.quiet_libraries()
    inputs = load_inputs(args, stats, say)
    choose_cpu_memory(args, inputs, say)  # before the model is loaded: every large buffer from here on
    targets = models.find_lora_targets(args.model)
    model = build_model(args.model, inputs.choice, inputs.load_in_4bit, args.lora_r, lora_alpha(args),
                        args.lora_dropout, args.seed, targets)
    # Inside this block the model returns its last hidden states instead of logits, and compute_loss projects only
    # the labelled positions onto the vocabulary (pipeline/loss.py); the output layer is back on leaving, so the
    # adapter is saved with the real model. compute_loss is None with --loss standard: the model's own loss.
    with loss_for(model, args.loss) as compute_loss:
        settings = plan(args, stats, inputs, model, compute_loss, targets, ranks)
        if finished_at(checkpoint, settings, out):
            say(f"✓ {out}/ already finished its {settings.total_steps} steps ({out / folders.FINAL_ADAPTER}/ holds "
                f"the adapter): nothing to resume; pass a larger --max-steps or --epochs to train further")
            return 0
        if args.resume and checkpoint is None:
            say(f"--resume: no usable checkpoint in {out}/ yet: starting from step 0")
        scorer = held_out_scorer(args, stats, inputs) if args.score_checkpoints else None
        if ranks.is_main:
            prepare_run_folder(out, args.overwrite, settings)
        trainer, padding = build_trainer(settings, model, compute_loss, inputs, out, say, scorer)
        started = time.time()
        train_loss = fit(trainer, model, checkpoint, settings, say)
        if trainer.stop.signal_name is not None:
            return stopped(trainer, settings, out, argv, say)
        if trainer.nonfinite is not None:
            raise StageError(trainer.describe_nonfinite(), cli.EXIT_FAILED)
        history = trainer.state.log_history
        result = {"global_step": trainer.state.global_step, "train_loss": train_loss,
                  "padding_share": round(padding, 4),
                  "last_train_loss": next((e["loss"] for e in reversed(history) if "loss" in e), None),
                  "eval_loss": trainer.final_eval_loss(), "runtime_s": round(time.time() - started, 1)}
        scored = [entry for entry in history if "eval_pass@1" in entry and entry["step"] == result["global_step"]]
        result.update({key: scored[-1][key] for key in ("eval_pass@1", "eval_solved")} if scored else {})
    if ranks.is_main:  # the first process saves the adapter
        save(model, inputs.tokenizer, settings, result, out, say)
        if scorer is not None:
            say(describe_scores(trainer, out))
        say("next: " + cli.command("verify_model.py", ("--model", args.model, folders.MODEL_DIR),
                                   ("--adapter", out / folders.FINAL_ADAPTER, None)))
    return 0


@dataclasses.dataclass
class Inputs:
    """What the run trains on and where: the model's config, the device, the tokenizer, the two splits."""

    config: object  # the base model's transformers config
    choice: models.DeviceChoice
    load_in_4bit: bool
    tokenizer: object
    train_rows: object  # a Dataset, or an IterableDataset of packed blocks for a streamed source
    eval_rows: object
    stream: dict | None  # a streamed source's settings, from stats.json
    longest: int  # tokens in the longest training example

    @property
    def n_train(self) -> int | None:
        return None if self.stream else len(self.train_rows)


def load_inputs(args, stats: dict, say) -> Inputs:
    from datasets import load_from_disk
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model)
    choice = models.training_choice(models.pick_device(), args.cpu_dtype, config.hidden_size)
    load_in_4bit = models.use_4bit(choice, args.no_4bit, say)
    prepared = load_from_disk(args.data)
    tokenizer = models.load_tokenizer(args.model)
    settings = stats["settings"]
    stream = settings.get("streaming")
    if stream:
        train_rows, longest = streamed_blocks(stream, tokenizer, settings["max_length"]), settings["max_length"]
        if next(iter(train_rows), None) is None:  # reads the stream's first block, no more
            raise StageError(f"{stream['source']['dataset']} has no text after the {stream['skip_files']} files "
                             f"prepare_data.py held out for evaluation (the source has shrunk since): prepare it "
                             f"again with a smaller --eval-files")
    else:
        train_rows = prepared["train"]
        longest = max(train_rows["length"])
    return Inputs(config, choice, load_in_4bit, tokenizer, train_rows, prepared["eval"], stream, longest)


def choose_cpu_memory(args, inputs: Inputs, say) -> None:
    """On the CPU, fast (glibc's allocator as it is) or lean (freed memory given back), by this run's memory
    estimate against the memory available now; said in one line. Nothing to choose on a GPU."""
    if inputs.choice.device != "cpu":
        return
    if platforms.glibc_function("mallopt") is None:
        say("CPU memory: this system's allocator, as it is (fast or lean is a setting of glibc, Linux's C library)")
        return
    estimate = memory.estimate_for_run(inputs.config, args.batch_size, inputs.longest, args.lora_r, inputs.load_in_4bit,
                                       inputs.choice.dtype_name,
                                       args.optim or default_optimizer("cpu", inputs.load_in_4bit), args.loss)
    mode, why = memory.cpu_memory_mode(args.cpu_memory, estimate["total"], memory.available_memory())
    if mode == "lean" and not memory.return_freed_memory():
        why += "; MALLOC_MMAP_THRESHOLD_ or PIPELINE_GLIBC_DEFAULTS is set: the allocator is left as that says"
    say(f"CPU memory: {mode}: {why}")


def streamed_blocks(stream: dict, tokenizer, block: int):
    """The training blocks of a streamed source: its files after the held-out ones, packed as prepare_data.py
    packs text, read lazily (an IterableDataset: the Trainer takes batches as it needs them, and starts over at its
    end)."""
    from datasets import IterableDataset

    def blocks():
        rows = data.open_stream(stream["source"]).skip(stream["skip_files"])
        yield from data.pack_blocks((row[stream["column"]] for row in rows), tokenizer, block)

    return IterableDataset.from_generator(blocks)


def lora_alpha(args) -> float:
    return args.lora_alpha or 2 * args.lora_r


def build_model(model_dir: str, choice, load_in_4bit: bool, lora_r: int, lora_alpha: float, lora_dropout: float,
                seed: int, lora_targets: list[str] | None = None):
    """The base model (4-bit NF4 or plain) prepared for training, with LoRA adapters on `lora_targets` (by default
    every linear projection of its decoder blocks, see models.find_lora_targets)."""
    lora_targets = lora_targets or models.find_lora_targets(model_dir)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    from pipeline import loss

    model = models.load_model(model_dir, choice, load_in_4bit)
    # Gradient checkpointing recomputes activations in backward: far less memory for ~30% more compute.
    # The non-reentrant form works with frozen inputs and under DDP.
    checkpointing = {"use_reentrant": False}
    if load_in_4bit:
        # Casts norms to fp32 for stability and makes the frozen inputs carry gradients for checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=checkpointing)
        # The frozen tied embedding / output layer gains nothing from the fp32 upcast done above.
        loss.keep_embedding_in_compute_dtype(model, choice.dtype)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    set_seed(seed)  # LoRA's A matrices are random: same seed, same start
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=lora_targets,
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def loss_for(model, loss: str):
    """A context manager yielding the Trainer's compute_loss_func: the chunked loss with the output layer
    skipped inside the block (put back on leaving), or None for the model's own loss."""
    if loss == "standard":
        return contextlib.nullcontext(None)
    from pipeline.loss import output_layer_skipped

    return output_layer_skipped(model)


# ----------------------------------------------------------------------------------------------------------
# Plan: every setting of the run, settled once and frozen.


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What the run does, written to run_settings.json, every checkpoint and final/training_settings.json."""

    arguments: dict  # the command line as parsed, so that rerunning the same command is recognised
    prepared_stats: dict
    model: str  # the base model's folder, relative to the run folder
    base_model_id: str
    base_model_source: dict  # model/download_info.json: which download (revision, demo recipe) the weights are from
    prepared_data: str  # relative to the run folder
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


def plan(args, stats: dict, inputs: Inputs, model, compute_loss, lora_targets: list[str], ranks: Ranks) -> RunSettings:
    """The run's settings, with the micro-batch that --auto-batch-size measured on the built model (CUDA)."""
    batch = (args.batch_size, args.grad_accum)
    if args.auto_batch_size and inputs.choice.device == "cuda":
        model.train()  # gradient checkpointing is active in train mode only
        batch = memory.fit_batch(*batch, lambda b: memory.cuda_batch_fits(model, compute_loss, b, inputs.longest))
        ranks.say(f"--auto-batch-size: micro-batch {batch[0]} x accumulation {batch[1]} (asked {args.batch_size} x "
                  f"{args.grad_accum})")
    elif args.auto_batch_size:
        ranks.say(f"--auto-batch-size measures GPU memory and needs CUDA: keeping micro-batch {args.batch_size}")
    return plan_run(args, stats, inputs.choice, inputs.load_in_4bit, inputs.n_train, ranks.world_size, lora_targets,
                    batch)


def plan_run(args, stats: dict, choice, load_in_4bit: bool, n_train: int | None, processes: int,
             lora_targets: list[str], batch: tuple[int, int] | None = None) -> RunSettings:
    """Every setting of the run from the flags, the data, the device, the model's LoRA targets and the micro-batch
    and accumulation to use (the asked ones unless given). `n_train` is None for a streamed source, whose length
    is unknown: its "epoch" is the --max-steps that check() required."""
    batch_size, grad_accum = batch or (args.batch_size, args.grad_accum)
    per_epoch = args.max_steps if n_train is None else steps_per_epoch(n_train, batch_size * processes, grad_accum)
    return RunSettings(
        arguments=dict(vars(args)),
        prepared_stats=stats,
        model=relative_to_run(args.model, args.out),
        base_model_id=models.model_id(args.model),
        base_model_source=folders.download_info(args.model),
        prepared_data=relative_to_run(args.data, args.out),
        prepared_fingerprint=stats.get("fingerprint", ""),
        template=stats["settings"]["template"],
        max_length=stats["settings"]["max_length"],
        lora_r=args.lora_r,
        lora_alpha=lora_alpha(args),
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


def relative_to_run(path: str, out: str) -> str:
    """A folder as seen from the run folder: a project moved or copied elsewhere keeps its run's records true."""
    return os.path.relpath(Path(path).resolve(), Path(out).resolve())


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(math.ceil(n_examples / batch_size) / grad_accum))


def default_optimizer(device: str, load_in_4bit: bool) -> str:
    """Paged 8-bit AdamW on CUDA (pages optimiser state to RAM under memory pressure); bitsandbytes' 8-bit
    AdamW on CPU, where paging does not exist; plain AdamW when the model is not quantised."""
    if not load_in_4bit:
        return "adamw_torch"
    return "paged_adamw_8bit" if device == "cuda" else "adamw_8bit"


def finished_at(checkpoint: Path | None, settings: RunSettings, out: Path) -> bool:
    """Whether the checkpoint to resume from is the run's last step and the final adapter was saved after it."""
    final = out / folders.FINAL_ADAPTER / folders.TRAINING_SETTINGS
    return (checkpoint is not None and run_folder.checkpoint_step(checkpoint) >= settings.total_steps
            and final.is_file() and folders.read_json(final).get("result", {}).get("global_step", 0)
            >= settings.total_steps)


def prepare_run_folder(out: Path, overwrite: bool, settings: RunSettings) -> None:
    """Clear an earlier run on --overwrite (everything but the lock: check() made sure the folder is train.py's),
    drop half-written checkpoints, record this run's settings and who wrote the folder."""
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for old in out.iterdir():
            if old.name != folders.RUN_LOCK:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    folders.mark_owner(out, "train")
    run_folder.remove_staging(out)  # half-written checkpoints of an interrupted save
    folders.write_json(out / folders.RUN_SETTINGS, settings.to_json())  # a resumed run's, with --force-resume too


# ----------------------------------------------------------------------------------------------------------
# Train: the Trainer, what it will do printed first.


def build_trainer(settings: RunSettings, model, compute_loss, inputs: Inputs, out: Path, say, scorer=None):
    """The Trainer, and the share of padding in an epoch of its batches; what it will do is printed first."""
    from pipeline.trainer import PipelineTrainer

    trainable, total = model.get_nb_trainable_parameters()
    say(describe_plan(settings, inputs, trainable, total))
    estimate = memory.estimate_for_run(model.config, settings.batch_size, inputs.longest, settings.lora_r,
                                       settings.load_in_4bit, settings.compute_dtype, settings.optim, settings.loss)
    where = "" if settings.device == "cuda" else " (were this a GPU run)"
    say(f"estimated peak GPU memory{where} at micro-batch {settings.batch_size} x {inputs.longest} tokens: "
        f"{memory.describe_estimate(estimate)}")
    example = (inputs.eval_rows if inputs.stream else inputs.train_rows)[0]
    say("one training example (only the part in ⟦ ⟧ is trained):\n" + show_trained_span(inputs.tokenizer, example))
    multiple = 8 if settings.device == "cuda" else 1  # tensor cores like multiples of 8
    pad_id = inputs.tokenizer.pad_token_id
    trainer = PipelineTrainer(
        model=model,
        args=training_arguments(settings, out, grouped=not inputs.stream),
        train_dataset=inputs.train_rows,
        eval_dataset=inputs.eval_rows,
        data_collator=lambda features: data.pad_batch(features, pad_id, multiple),
        compute_loss_func=compute_loss,
        run_dir=out,
        total_steps=settings.total_steps,
        settings=settings.to_json(),
        trainable_params=trainable,
        scorer=scorer,
    )
    if inputs.stream:  # full blocks of packed text: nothing to pad, and the stream is not read twice
        say(f"training text streamed from {inputs.stream['source']['dataset']} after its first "
            f"{inputs.stream['skip_files']} files (held out), packed in blocks of {inputs.longest} tokens")
        return trainer, 0.0
    lengths = [batch["attention_mask"].sum(dim=1).tolist() for batch in trainer.get_train_dataloader()]
    padding = data.padding_share(lengths)
    say(f"padding: {100 * padding:.1f}% of the tokens of an epoch (batches grouped by length, padded to their "
        f"longest)")
    return trainer, padding


def held_out_scorer(args, stats: dict, inputs: Inputs):
    """--score-checkpoints: the held-out problems' tests run at every evaluation (pipeline/scoring.py)."""
    from pipeline import scoring

    return scoring.held_out_scorer(args.data, stats, inputs.tokenizer, inputs.choice, args.score_max_new_tokens)


def describe_plan(settings: RunSettings, inputs: Inputs, trainable: int, total: int) -> str:
    precision = "4-bit NF4" if settings.load_in_4bit else settings.compute_dtype
    processes = f" x {settings.processes} processes" if settings.processes > 1 else ""
    n_train = "streamed" if inputs.n_train is None else inputs.n_train
    return "\n".join([
        f"device: {inputs.choice.reason}",
        f"model: {settings.base_model_id} ({precision}), LoRA r={settings.lora_r} alpha={settings.lora_alpha:g} on "
        f"{', '.join(settings.lora_target_modules)}",
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)",
        f"examples: train {n_train}, eval {len(inputs.eval_rows)} · effective batch {settings.batch_size} x "
        f"{settings.grad_accum}{processes} = {settings.effective_batch} · {settings.steps_per_epoch} steps/epoch · "
        f"{settings.total_steps} steps in total · optimiser {settings.optim}",
    ])


def show_trained_span(tokenizer, example: dict) -> str:
    """Decode one example with the trained tokens (labels != -100) between ⟦ and ⟧."""
    ids, labels = example["input_ids"], example["labels"]
    first = next(i for i, label in enumerate(labels) if label != prompts.IGNORE_INDEX)
    return tokenizer.decode(ids[:first]) + "⟦" + tokenizer.decode(ids[first:]) + "⟧"


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
        **models.half_precision_training(settings.device, settings.compute_dtype),  # autocast on a CPU too
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
        remove_unused_columns=False,  # data.pad_batch picks the model inputs itself
        prediction_loss_only=True,  # evaluation needs the loss only, not every position's logits
        report_to="none",  # the Trainer's TensorBoard callback is added by pipeline/trainer.py, writing to <out>/logs
        include_num_input_tokens_seen="non_padding",  # for tokens per second
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient: no search needed
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and settings.processes > 1 else None,  # several CPU processes (tests)
        disable_tqdm=not platforms.progress_bars(),
    )


def fit(trainer, model, checkpoint: Path | None, settings: RunSettings, say) -> float:
    """Train, from the checkpoint when resuming; returns the mean training loss."""
    if checkpoint is None:
        return trainer.train().training_loss
    if run_folder.checkpoint_step(checkpoint) < settings.total_steps:
        say(f"resuming from {checkpoint}")
        return trainer.train(resume_from_checkpoint=str(checkpoint)).training_loss
    # The run stopped after saving its last step and before its final save: that checkpoint is the trained adapter
    # (from it the Trainer would take one step more than planned).
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    say(f"{checkpoint} holds the last of the {settings.total_steps} steps: saving it as the final adapter")
    set_peft_model_state_dict(model, load_file(str(checkpoint / folders.ADAPTER_WEIGHTS)))
    trainer.state = TrainerState.load_from_json(str(checkpoint / run_folder.TRAINER_STATE))
    trainer.monitor.ended = True  # metrics.json: the run is finished
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return sum(losses) / len(losses) if losses else float("nan")


def stopped(trainer, settings: RunSettings, out: Path, argv, say) -> int:
    """A Ctrl-C, SIGTERM or Ctrl-Break: the Trainer saved a checkpoint; say how to resume, exit as the signal would."""
    say(f"stopped by {trainer.stop.signal_name} at step {trainer.state.global_step}/{settings.total_steps}; "
        f"checkpoint saved in {run_folder.find_checkpoints(out)[-1]}/\n"
        f"resume with: python train.py {platforms.shell_join(resume_command(argv))}")
    return platforms.exit_code_for(getattr(signal, trainer.stop.signal_name))


def resume_command(argv=None) -> list[str]:
    """The flags of this run that continue it: its own, less --overwrite (which would contradict --resume, and
    delete the checkpoint just saved) and any --resume [PATH] (the newest checkpoint is the one to continue from),
    plus --resume. A flag may be abbreviated, as argparse accepts it."""
    options = [option for action in build_parser()._actions for option in action.option_strings]

    def means(token: str, option: str) -> bool:
        name = token.split("=", 1)[0]
        return name == option or (name.startswith("--") and [o for o in options if o.startswith(name)] == [option])

    argv = list(sys.argv[1:] if argv is None else argv)
    kept, index = [], 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if means(token, "--overwrite"):
            continue
        if means(token, "--resume"):
            if "=" not in token and index < len(argv) and not argv[index].startswith("-"):
                index += 1  # its PATH
            continue
        kept.append(token)
    return kept + ["--resume"]


def describe_scores(trainer, out: Path) -> str:
    """--score-checkpoints: the held-out pass@1 of each evaluation, and which checkpoint scored best."""
    scored = [(entry["step"], entry["eval_pass@1"]) for entry in trainer.state.log_history if "eval_pass@1" in entry]
    best = trainer.best_scored()
    kept = (f"the best kept checkpoint by score: {best}/" if best else "no scored checkpoint kept")
    return (f"held-out pass@1 by step: {', '.join(f'{step}: {100 * score:.1f}%' for step, score in scored)}; {kept}; "
            f"how sure each difference is: {cli.command('evaluate.py', ('--checkpoints', out, None))}")


# ----------------------------------------------------------------------------------------------------------
# Save: the final adapter with the settings that made it, atomically.


def save(model, tokenizer, settings: RunSettings, result: dict, out: Path, say) -> None:
    final = out / folders.FINAL_ADAPTER
    with folders.atomic_output_dir(final, "train") as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        folders.write_json(tmp / folders.TRAINING_SETTINGS, {**settings.to_json(), "result": result})
    say(f"✓ trained {result['global_step']} steps in {result['runtime_s']:.0f}s: mean train loss "
        f"{result['train_loss']:.4f}, eval loss {result['eval_loss']:.4f}")
    say(f"✓ adapter saved in {final}/; curves in {out / monitoring.CURVES}, history in {out / monitoring.METRICS}, "
        f"TensorBoard: tensorboard --logdir {out / monitoring.LOGS}")
    if settings.device == "cuda":
        import torch

        say(f"peak GPU memory: {torch.cuda.max_memory_allocated() / folders.GIB:.2f} GiB")


if __name__ == "__main__":
    sys.exit(main())
