"""Benchmark: one QLoRA training step of the real Qwen2.5-Coder-0.5B architecture, per loss and padding variant.

This is the isolated step only; a user lives with the whole train.py process (model loading, evaluation,
checkpoints), which this benchmark does not measure.

Run:
    python bench/train_step.py                      # all variants, ~10 minutes on a 2-core CPU, ~1 minute on a GPU
    python bench/train_step.py --variants guide project

The model is built from the configuration below with random weights (no download), saved once in bf16 to a
cache folder, and loaded like train.py loads it: 4-bit NF4 with double quantisation, LoRA r=16 on every linear
projection, gradient checkpointing, 8-bit AdamW. Each variant runs in a process of its own, so that memory
figures do not mix: on CPU, peak resident memory (VmHWM, reset after the model is loaded); on CUDA,
torch.cuda.max_memory_allocated. On CPU, glibc would otherwise keep freed buffers (bitsandbytes dequantises
every weight to fp32 in each pass) and the peak would measure its cache more than the step: the children run
with MALLOC_MMAP_THRESHOLD_=65536, so that large buffers go back to the system when freed, for every variant.
"Above the model" is the step's peak minus the memory held once the model was loaded. Trained tokens are the
labelled ones (the solutions); padding and masked prompts are not counted.

Variants:
  standard-4x512  standard loss, 4 full sequences of 512 tokens (30 % prompt)      - the stress case
  chunked-4x512   this project's chunked loss, the same batch
  guide           standard loss, 4 MBPP-like examples padded to 512 (the guides' way)
  dynamic         standard loss, 4 MBPP-like examples in random order, padded to the longest
  project         chunked loss, 4 MBPP-like examples grouped by length, padded to the longest (train.py's default)

MBPP-like examples have token lengths drawn from a log-normal distribution (median 200, clipped to 60-512; the
real MBPP under Qwen's tokenizer with the `tests` template is in that range) with the first 45 % masked.
Prints a table and, last, one line of JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import cli  # noqa: E402

# Qwen/Qwen2.5-Coder-0.5B's config.json (architecture fields).
QWEN_CONFIG = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                   rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643)
VARIANTS = ["standard-4x512", "chunked-4x512", "guide", "dynamic", "project"]
BATCH, MAX_LEN = 4, 512


def mbpp_like_lengths(n: int = 877, seed: int = 0) -> list[int]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    sample = torch.empty(n).log_normal_(mean=float(torch.log(torch.tensor(200.0))), std=0.4, generator=generator)
    return sample.clamp(60, MAX_LEN).int().tolist()


def epoch_padding(lengths: list[int], order: list[int], pad_to: int | None = None) -> float:
    from pipeline import data

    batches = [[lengths[i] for i in order[start:start + BATCH]] for start in range(0, len(order), BATCH)]
    return data.padding_share(batches, pad_to)


def make_batch(variant: str, vocab: int):
    """The batch of one step, as each strategy would form it, with its epoch-level padding share."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from pipeline import data

    generator = torch.Generator().manual_seed(1)
    if variant.endswith("4x512"):
        lengths, prompt_share, padding = [MAX_LEN] * BATCH, 0.30, 0.0
    else:
        all_lengths = mbpp_like_lengths()
        if variant == "project":
            order = list(LengthGroupedSampler(BATCH, lengths=all_lengths, generator=generator))
            padding = epoch_padding(all_lengths, order)
        else:
            order = torch.randperm(len(all_lengths), generator=generator).tolist()
            padding = epoch_padding(all_lengths, order, MAX_LEN if variant == "guide" else None)
        # a typical batch, not the longest first
        lengths, prompt_share = [all_lengths[i] for i in order[BATCH:2 * BATCH]], 0.45
    features = []
    for length in lengths:
        ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
        prompt = int(prompt_share * length)
        features.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]})
    batch = data.pad_batch(features, pad_token_id=QWEN_CONFIG["eos_token_id"])
    if variant == "guide":  # pad to max length, as the guides do
        extra = MAX_LEN - batch["input_ids"].shape[1]
        pads = {"input_ids": QWEN_CONFIG["eos_token_id"], "attention_mask": 0, "labels": -100}
        batch = {k: torch.nn.functional.pad(v, (0, extra), value=pads[k]) for k, v in batch.items()}
    return batch, padding


def build_model_folder(folder: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (folder / "config.json").is_file():
        return
    print(f"building the Qwen2.5-Coder-0.5B architecture with random weights in {folder}/ (once)", flush=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN_CONFIG)).to(torch.bfloat16)
    model.save_pretrained(str(folder))


def read_status(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def run_variant(variant: str, model_dir: str) -> dict:
    """One training step in this process; returns its measurements."""
    import torch

    from pipeline import loss, models

    import train

    models.quiet_libraries()
    choice = models.pick_device()
    recipe = train.build_parser().parse_args([])  # train.py's defaults: LoRA rank, alpha, dropout
    model = train.build_model(model_dir, choice, True, recipe.lora_r, train.lora_alpha(recipe), recipe.lora_dropout,
                              seed=0)
    model.train()
    chunked = variant in ("chunked-4x512", "project")
    # The loss stays installed until this function returns: the stack must stay referenced, since a collected
    # stack's generator is closed, which puts the output layer back.
    stack = contextlib.ExitStack()
    compute_loss = stack.enter_context(train.loss_for(model, "chunked" if chunked else "standard"))
    import bitsandbytes as bnb

    optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch, padding = make_batch(variant, QWEN_CONFIG["vocab_size"])
    batch = {k: v.to(choice.device) for k, v in batch.items()}
    trained_tokens = int(loss.trained_positions(batch["labels"]))

    if choice.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # what loading freed goes back: the baseline is the model
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")  # reset the peak resident set size (VmHWM) to the current one
        baseline = read_status("VmRSS")
    started = time.perf_counter()
    with torch.autocast(choice.device, dtype=choice.dtype, enabled=choice.device == "cuda"):
        if chunked:
            step_loss = compute_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                                     batch["labels"])
        else:
            step_loss = model(**batch).loss
    step_loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if choice.device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = read_status("VmHWM")
    seconds = time.perf_counter() - started
    return {"variant": variant, "device": choice.device, "batch_shape": list(batch["input_ids"].shape),
            "peak_gib": peak / 2**30, "above_model_gib": (peak - baseline) / 2**30, "step_s": seconds,
            "trained_tokens": trained_tokens, "trained_tokens_per_s": trained_tokens / seconds,
            "epoch_padding_share": padding, "loss": float(step_loss)}


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(__doc__)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "qwen2.5-coder-0.5b-random"),
                        help="folder for the random-weight model (default: %(default)s)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one variant here
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_variant(args.child, args.cache)))
        return 0
    build_model_folder(Path(args.cache))
    results = []
    for variant in args.variants:
        print(f"running {variant} ...", flush=True)
        done = subprocess.run([sys.executable, __file__, "--child", variant, "--cache", args.cache],
                              capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"},
                              encoding="utf-8", errors="replace")
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(f"{variant} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(lines[-1][len("RESULT "):]))
    memory_name = "peak RSS" if results[0]["device"] == "cpu" else "peak CUDA"
    print(f"\ndevice: {results[0]['device']}; Qwen2.5-Coder-0.5B architecture, random weights, 4-bit NF4, LoRA r=16")
    print(f"{'variant':16s} {'batch':>9s} {memory_name:>10s} {'above model':>12s} {'step':>8s} "
          f"{'trained tok/s':>14s} {'epoch padding':>14s}")
    for r in results:
        shape = "x".join(map(str, r["batch_shape"]))
        print(f"{r['variant']:16s} {shape:>9s} {r['peak_gib']:9.2f}G {r['above_model_gib']:11.2f}G {r['step_s']:7.1f}s "
              f"{r['trained_tokens_per_s']:14.1f} {100 * r['epoch_padding_share']:13.1f}%")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
