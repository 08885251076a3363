"""Benchmark: the whole train.py process as a user runs it, against the standard loss and against TRL's SFTTrainer.

Run:
    pip install -r bench/requirements.txt             # TRL, for the peer; not needed by the pipeline
    python bench/whole_run.py                         # every variant, ~12 minutes on a 2-core CPU
    python bench/whole_run.py --variants project trl --steps 4

Every variant is a process of its own, run one after the other on the same model folder and the same prepared
problems: the Qwen2.5-Coder-0.5B architecture with random weights (built once, bf16 safetensors, no download),
loaded in 4-bit NF4 with double quantisation, LoRA as train.py's defaults (r=16, alpha 32) on every linear
projection of the decoder blocks, gradient checkpointing, 8-bit AdamW (paged on CUDA), micro-batch 4 x
accumulation 1, `--steps` optimiser steps, then an evaluation, a checkpoint and the final save, as train.py does
with `--max-steps N --save-steps N`. The problems are MBPP-sized (420-512 tokens, the first 45 % a masked
prompt), 4 per step, 4 held out.

Variants (train.py's recipe is its parser's defaults, apart from the batch and the steps above):
  project         train.py as a user runs it: every default (on a CPU: --cpu-memory auto, --cpu-dtype auto)
  project-lean    train.py --cpu-memory lean: freed memory given back to the system (CPU)
  project-fp32    train.py --cpu-dtype float32: fp32 compute on a CPU that has bf16 (CPU)
  project-auto    train.py --auto-batch-size (CUDA): the largest micro-batch that fits, the effective batch kept
  standard        train.py --loss standard: the model's own loss, full-vocabulary logits
  trl             TRL's SFTTrainer on the same tokens (completion-only loss), the same model, 4-bit config, LoRA
                  targets and rank, batch, optimiser and gradient checkpointing, as its users run it (fp32 on a
                  CPU); its memory options that exist on this hardware enabled (on CUDA: activation offloading;
                  padding-free and Liger need FlashAttention and Triton kernels, absent here)
  trl-lean        TRL with the allocator setting of train.py's lean mode, set before the interpreter starts

On CUDA every process is capped at 6 GiB (torch.cuda.set_per_process_memory_fraction), the reference card's
memory: a variant that needs more fails there as it would on the card.

Reported per variant, from inside its process: the peak of each phase (model load and everything before the first
step, the first step, the steady steps, evaluation, checkpoint save, final save) and of the whole process
(resident memory on CPU, VmHWM reset at each phase boundary; on CUDA torch.cuda.max_memory_allocated and
max_memory_reserved), trained tokens per second (labelled tokens, i.e. the loss's, over the training loop's wall
time, evaluation and saves included), the seconds of each phase, and the whole process's wall time, start-up and
imports included, measured from outside. Prints the tables, the ratios to TRL, and last one line of JSON.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from pipeline import cli, data, folders, memory, models, prompts  # noqa: E402

from train_step import build_model_folder, read_status  # noqa: E402  (the same model, the same /proc reading)

VARIANTS = ["project", "project-lean", "project-fp32", "project-auto", "standard", "trl", "trl-lean"]
CPU_ONLY, CUDA_ONLY = {"project-lean", "project-fp32", "trl-lean"}, {"project-auto"}
PROJECT_FLAGS = {"project": [], "project-lean": ["--cpu-memory", "lean"], "project-fp32": ["--cpu-dtype", "float32"],
                 "project-auto": ["--auto-batch-size"], "standard": ["--loss", "standard"]}
REFERENCE_GPU_GIB = 6  # the reference card: an RTX 3050 laptop GPU
BATCH, MAX_LEN, EVAL_ROWS, PROMPT_SHARE = 4, 512, 4, 0.45
PHASES = ["load", "first step", "steady steps", "evaluation", "checkpoint save", "final save"]


# ----------------------------------------------------------------------------------------------------------
# The shared inputs: one model folder and one prepared_data folder, built once.


def build_inputs(cache: Path, steps: int) -> tuple[Path, Path]:
    """The random-weight Qwen2.5-Coder-0.5B folder (with the demo tokenizer, whose ids it covers) and prepared
    problems in train.py's format, for `steps` steps."""
    import download_model

    model_dir, data_dir = cache / "model", cache / f"prepared-{steps}"
    build_model_folder(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        download_model.build_demo_tokenizer().save_pretrained(str(model_dir))
    if (data_dir / folders.PREPARED_STATS).is_file():
        return model_dir, data_dir
    from datasets import Dataset, DatasetDict

    rng = random.Random(0)

    def rows(n: int, prefix: str) -> list[dict]:
        made = []
        for i in range(n):
            length = rng.randint(420, MAX_LEN)
            ids = [rng.randrange(1, 1024) for _ in range(length)]
            prompt = int(PROMPT_SHARE * length)
            made.append({"task_id": f"{prefix}-{i}", "input_ids": ids, "attention_mask": [1] * length,
                         "labels": [prompts.IGNORE_INDEX] * prompt + ids[prompt:], "length": length})
        return made

    splits = {"train": rows(steps * BATCH, "train"), "eval": rows(EVAL_ROWS, "eval")}
    settings = {"format": "mbpp", "template": "tests", "max_length": MAX_LEN, "eval_fraction": 0.1, "seed": 0,
                "model": models.model_id(model_dir), "data": "bench", "eos_token_id": 151643,
                "tokenizer": models.tokenizer_fingerprint(model_dir)}
    task_ids = {name: [row["task_id"] for row in split] for name, split in splits.items()}
    stats = {"settings": settings, "rows": {name: len(split) for name, split in splits.items()}, "task_ids": task_ids,
             "fingerprint": data.data_fingerprint(task_ids, settings)}
    with folders.atomic_output_dir(data_dir, "prepare_data") as tmp:
        DatasetDict({name: Dataset.from_list(split) for name, split in splits.items()}).save_to_disk(str(tmp))
        folders.write_json(tmp / folders.PREPARED_STATS, stats)
    return model_dir, data_dir


# ----------------------------------------------------------------------------------------------------------
# Inside a variant's process: phase peaks, trained tokens, then the run itself.


class Probe:
    """Peaks per phase, read and reset at each phase boundary; trained tokens counted as the Trainer sees them."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.phases: dict[str, dict] = {}
        self.trained_tokens, self.train_start, self.train_end = 0, None, None
        self.started = self.boundary = time.time()
        # Resident memory mixes anonymous memory (what must fit) with pages of files mapped from disk (the
        # safetensors weights while they load), which the kernel can drop: the anonymous part is sampled too.
        self.anon_peak = 0
        if not self.cuda:
            import threading

            threading.Thread(target=self._sample_anonymous, daemon=True).start()

    def _sample_anonymous(self) -> None:
        while True:
            self.anon_peak = max(self.anon_peak, read_status("RssAnon"))
            time.sleep(0.005)

    def close(self, phase: str) -> None:
        """The peak since the last boundary belongs to `phase` (the highest, if the phase recurs)."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            peak = {"allocated_gib": torch.cuda.max_memory_allocated() / folders.GIB,
                    "reserved_gib": torch.cuda.max_memory_reserved() / folders.GIB}
            torch.cuda.reset_peak_memory_stats()
        else:
            peak = {"rss_gib": read_status("VmHWM") / folders.GIB,
                    "anon_gib": max(self.anon_peak, read_status("RssAnon")) / folders.GIB}
            with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
                f.write("5")  # VmHWM := the current resident size
            self.anon_peak = 0
        held = self.phases.setdefault(phase, {})
        for key, value in peak.items():
            held[key] = round(max(held.get(key, 0.0), value), 3)
        now = time.time()  # a phase's seconds add up when it recurs (the steady steps)
        held["s"], self.boundary = round(held.get("s", 0.0) + now - self.boundary, 2), now

    def install(self) -> None:
        """A callback in every Trainer of this process (train.py's and TRL's), and a count of trained tokens."""
        import transformers.trainer as hf_trainer
        from transformers import Trainer, TrainerCallback

        from pipeline.loss import trained_positions

        probe = self

        class PhaseCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                probe.close("load")
                probe.train_start = time.time()

            def on_step_end(self, args, state, control, **kwargs):
                probe.close("first step" if state.global_step == 1 else "steady steps")

            def on_evaluate(self, args, state, control, **kwargs):
                probe.close("evaluation")

            def on_save(self, args, state, control, **kwargs):
                probe.close("checkpoint save")

            def on_train_end(self, args, state, control, **kwargs):
                probe.train_end = time.time()

        hf_trainer.DEFAULT_CALLBACKS.append(PhaseCallback)
        training_step = Trainer.training_step

        def counted(trainer, model, inputs, num_items_in_batch=None):
            probe.trained_tokens += int(trained_positions(inputs["labels"]))
            return training_step(trainer, model, inputs, num_items_in_batch)

        Trainer.training_step = counted
        atexit.register(self.report)

    def report(self) -> None:
        self.close("final save")  # what ran after training: the final evaluation and save
        key = "allocated_gib" if self.cuda else "rss_gib"
        result = {"phases": self.phases, "peak_gib": max(phase[key] for phase in self.phases.values()),
                  "device": "cuda" if self.cuda else "cpu", "trained_tokens": self.trained_tokens,
                  "train_s": round((self.train_end or time.time()) - (self.train_start or self.started), 1),
                  "wall_s": round(time.time() - self.started, 1)}
        if self.cuda:
            result["peak_reserved_gib"] = max(phase["reserved_gib"] for phase in self.phases.values())
        else:
            result["peak_anon_gib"] = max(phase["anon_gib"] for phase in self.phases.values())
        result["trained_tokens_per_s"] = round(result["trained_tokens"] / max(result["train_s"], 1e-9), 1)
        print("RESULT " + json.dumps(result), flush=True)


def run_project(model_dir: Path, data_dir: Path, out: Path, steps: int, flags: list[str]) -> int:
    import train

    return train.main(["--model", str(model_dir), "--data", str(data_dir), "--out", str(out), "--max-steps", str(steps),
                       "--save-steps", str(steps), "--batch-size", str(BATCH), "--grad-accum", "1",
                       "--logging-steps", "1", "--overwrite", *flags])


def run_trl(model_dir: Path, data_dir: Path, out: Path, steps: int) -> int:
    """TRL's SFTTrainer with the settings train.py uses (its parser's defaults, its 4-bit config, its LoRA targets
    and optimiser), on the same tokens: the answer tokens are its completion."""
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    import train

    models.quiet_libraries()
    recipe = train.build_parser().parse_args([])
    choice = models.pick_device()
    splits = load_from_disk(str(data_dir))

    def as_completion(split):
        def mask(row):
            return {"completion_mask": [int(label != prompts.IGNORE_INDEX) for label in row["labels"]]}

        return split.map(mask, remove_columns=["labels", "task_id", "length", "attention_mask"])

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=choice.dtype, device_map={"": choice.device},
                                                 quantization_config=models.quantization_config(choice.dtype))
    cuda = choice.device == "cuda"
    config = SFTConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
        gradient_accumulation_steps=1, learning_rate=recipe.lr, lr_scheduler_type="cosine",
        warmup_steps=recipe.warmup_ratio, optim=train.default_optimizer(choice.device, load_in_4bit=True),
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, eval_strategy="steps",
        eval_steps=steps, save_strategy="steps", save_steps=steps, logging_steps=1, report_to="none",
        bf16=cuda and choice.dtype == torch.bfloat16, fp16=cuda and choice.dtype == torch.float16, use_cpu=not cuda,
        max_length=MAX_LEN, completion_only_loss=True, activation_offloading=cuda, dataloader_num_workers=0,
        seed=recipe.seed,
    )
    lora = LoraConfig(r=recipe.lora_r, lora_alpha=train.lora_alpha(recipe), lora_dropout=recipe.lora_dropout,
                      target_modules=models.find_lora_targets(model_dir), bias="none", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=as_completion(splits["train"]),
                         eval_dataset=as_completion(splits["eval"]), peft_config=lora,
                         processing_class=models.load_tokenizer(model_dir))
    trainer.train()
    trainer.save_model(str(out / "final"))
    return 0


def child(variant: str, model_dir: Path, data_dir: Path, steps: int) -> int:
    import torch

    if torch.cuda.is_available():  # the reference card's memory, whatever this GPU has
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, REFERENCE_GPU_GIB * folders.GIB / total))
    probe = Probe()
    probe.install()
    out = Path(tempfile.mkdtemp(prefix=f"bench-{variant}-"))
    try:
        if variant.startswith("trl"):
            return run_trl(model_dir, data_dir, out, steps)
        return run_project(model_dir, data_dir, out, steps, PROJECT_FLAGS[variant])
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# The parent: one process per variant, one after the other, and the table.


def variant_env(variant: str) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    if variant == "trl-lean":
        # what train.py's lean mode sets, given to TRL by its environment
        env["MALLOC_MMAP_THRESHOLD_"] = str(memory.GLIBC_MMAP_THRESHOLD)
    return env


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(__doc__)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--steps", type=cli.positive(int), default=2,
                        help="optimiser steps per run (default: %(default)s)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "qwen2.5-coder-0.5b-random"),
                        help="folder for the random-weight model and the prepared problems (default: %(default)s)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for every variant's process (experiments, e.g. "
                             "MALLOC_ARENA_MAX=2)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one variant in this process
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cache = Path(args.cache)
    model_dir, data_dir = build_inputs(cache, args.steps)
    if args.child:
        return child(args.child, model_dir, data_dir, args.steps)
    import torch

    skipped = CUDA_ONLY if not torch.cuda.is_available() else CPU_ONLY
    results = {}
    for variant in [variant for variant in args.variants if variant not in skipped]:
        print(f"running {variant} ...", flush=True)
        command = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps), "--cache", str(cache)]
        started = time.time()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                              env={**variant_env(variant), **dict(item.split("=", 1) for item in args.env)},
                              encoding="utf-8", errors="replace")
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(f"{variant} failed (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[variant] = {**json.loads(lines[-1][len("RESULT "):]), "process_s": round(time.time() - started, 1),
                            "said": [line for line in done.stdout.splitlines()
                                     if line.startswith(("CPU memory:", "device:", "micro-batch"))]}
    print_table(results)
    print(json.dumps(results))
    return 0


def print_table(results: dict[str, dict]) -> None:
    first = next(iter(results.values()))
    unit = "peak RSS GiB" if first["device"] == "cpu" else "peak allocated GiB"
    key = "rss_gib" if first["device"] == "cpu" else "allocated_gib"
    print(f"\ndevice: {first['device']}; Qwen2.5-Coder-0.5B architecture, random weights, 4-bit NF4, LoRA r=16, "
          f"micro-batch {BATCH} x 420-512 tokens; {unit} by phase")
    second = "anonymous" if first["device"] == "cpu" else "reserved"  # what must fit / what the allocator holds
    print(f"{'variant':14s}" + "".join(f"{phase:>16s}" for phase in PHASES) + f"{'whole run':>11s}{second:>11s}"
          f"{'trained tok/s':>15s}{'process s':>11s}")
    for variant, r in results.items():
        cells = "".join(f"{r['phases'].get(phase, {}).get(key, float('nan')):16.2f}" for phase in PHASES)
        other = r.get("peak_anon_gib", r.get("peak_reserved_gib", float("nan")))
        print(f"{variant:14s}{cells}{r['peak_gib']:11.2f}{other:11.2f}{r['trained_tokens_per_s']:15.1f}"
              f"{r['process_s']:11.0f}")
    # Where the whole process's time goes: before the probe (interpreter, imports, the bench's inputs), each phase.
    print(f"\nseconds by phase\n{'variant':14s}{'start-up':>16s}" + "".join(f"{phase:>16s}" for phase in PHASES)
          + f"{'process s':>11s}")
    for variant, r in results.items():
        cells = "".join(f"{r['phases'].get(phase, {}).get('s', float('nan')):16.1f}" for phase in PHASES)
        print(f"{variant:14s}{r['process_s'] - r['wall_s']:16.1f}{cells}{r['process_s']:11.0f}")
    for variant, r in results.items():
        for line in r.get("said", []):
            print(f"{variant}: {line}")
    base = results.get("standard")
    if base:
        print("\nratios to the standard loss (peak, trained tok/s): " + ", ".join(
            f"{v} {r['peak_gib'] / base['peak_gib']:.2f}x, "
            f"{r['trained_tokens_per_s'] / base['trained_tokens_per_s']:.2f}x"
            for v, r in results.items() if v != "standard"))
    peer = results.get("trl")
    if peer:
        print("ratios to TRL (whole-process peak, whole-process wall time, trained tok/s of the training loop):")
        for v, r in results.items():
            if v != "trl":
                print(f"  {v:14s} {r['peak_gib'] / peer['peak_gib']:.2f}x memory, "
                      f"{r['process_s'] / peer['process_s']:.2f}x time, "
                      f"{r['trained_tokens_per_s'] / peer['trained_tokens_per_s']:.2f}x trained tok/s")


if __name__ == "__main__":
    sys.exit(main())
