"""Memory: the estimate train.py prints before training, the batch fit of --auto-batch-size (CUDA), and on the CPU
whether the C allocator gives freed memory back (lean) or not (fast).

Nothing heavy is imported at module level.
"""

from __future__ import annotations

import math
import os

from pipeline import platforms
from pipeline.folders import GIB


def estimate_for_run(config, micro_batch: int, seq_len: int, lora_r: int, load_in_4bit: bool, compute_dtype: str,
                     optim: str, loss: str) -> dict:
    """estimate_peak_memory for a training run's settings: the bytes of its compute dtype and of its optimiser's
    state per trainable parameter (8-bit AdamW: 2, else fp32 AdamW's 8), read off their names here only."""
    return estimate_peak_memory(config, micro_batch, seq_len, lora_r, load_in_4bit,
                                dtype_bytes=4 if compute_dtype == "float32" else 2,
                                optimizer_bytes=2 if "8bit" in optim else 8, chunked_loss=loss == "chunked")


def estimate_peak_memory(config, micro_batch: int, seq_len: int, lora_r: int, load_in_4bit: bool = True,
                         dtype_bytes: int = 2, optimizer_bytes: float = 2.0, chunked_loss: bool = True,
                         labelled_share: float = 0.5, chunk_size: int = 128) -> dict:
    """Estimated bytes of GPU memory at the peak of a training step, by component. Deliberately simple: which
    terms dominate, and how they scale.

    config: a transformers config of a decoder-only model (Qwen2, Llama, GPT-2, ...); optimizer_bytes: bytes of
    optimiser state per trainable parameter (2 for 8-bit AdamW's two moments, 8 for fp32 AdamW); labelled_share:
    share of positions that carry a label (the solution; the prompt is masked); chunk_size: rows of logits the
    chunked loss projects at a time.
    """
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    # GPT-2 names it n_inner, or leaves it at 4 x hidden
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    heads = config.num_attention_heads
    kv = hidden * (getattr(config, "num_key_value_heads", None) or heads) // heads
    embedding_copies = 1 if getattr(config, "tie_word_embeddings", True) else 2  # an untied output layer is another
    per_layer_linear = hidden * hidden * 2 + hidden * kv * 2 + hidden * inter * 3  # q, o, k, v, gate, up, down
    linear_params = per_layer_linear * layers
    # NF4 with double quantisation: 4 bits per weight plus ~0.13 bits of quantisation constants.
    linear_bytes = linear_params * (4.13 / 8 if load_in_4bit else dtype_bytes)
    weight_bytes = linear_bytes + embedding_copies * vocab * hidden * dtype_bytes
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
    parts = {"weights": weight_bytes, "lora_and_optimizer": lora_bytes, "activations": kept_inputs + one_layer,
             "loss": loss}
    parts["total"] = sum(parts.values())
    return parts


def describe_estimate(parts: dict) -> str:
    detail = ", ".join(f"{name.replace('_', ' ')} {value / GIB:.2f}" for name, value in parts.items()
                       if name != "total")
    return f"{parts['total'] / GIB:.2f} GiB ({detail}; CUDA's own context adds ~0.3-0.5 GiB outside this)"


# ----------------------------------------------------------------------------------------------------------
# --auto-batch-size: the largest micro-batch that fits, measured on the GPU.


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
# The C allocator on the CPU.
#
# glibc serves allocations below a threshold from its heap and keeps what is freed there; the threshold starts at
# 128 KiB but rises to the size of any large buffer freed (up to 32 MiB). A CPU training step frees and
# reallocates hundreds of 3-40 MB buffers (dequantised weights, activations), and the heap fragments: 4.3 GiB
# resident for 1.8 GiB in use (bench/whole_run.py). With a fixed threshold of 4 MiB those buffers are mapped and
# unmapped, and freed memory goes back: 2.3 GiB, for up to ~15 % of CPU speed (1 MiB: the same memory, slower;
# 16 MiB: no gain). CUDA tensors are not concerned: they live in CUDA's caching allocator.
GLIBC_MMAP_THRESHOLD = 4 << 20

# On a CPU memory is rarely what stops a run (a laptop has 8-32 GB), speed is: train.py leaves glibc as it is
# ("fast") unless the run would not fit that way, and then gives freed memory back ("lean"). The peak resident
# memory of a CPU run, from estimate_peak_memory(), fitted to bench/whole_run.py (Qwen2.5-Coder-0.5B in 4-bit,
# micro-batch 4 x 420-512, bf16): ~1 GiB of libraries and file pages, plus 3.8x the estimate fast (the glibc heap
# grows for a while: 3.4 GiB after 2 steps, 4.0 after 24, for 4.0 expected) or 1.6x lean (2.26 after 2 steps and
# 2.27 after 24, for 2.3). A fast heap grows more with mixed lengths (SmolLM2-135M on HumanEval, 100-511 tokens:
# 3.0 GiB for 2.1 expected), hence a margin: a run plans to take at most 60 % of the memory available.
CPU_MEMORY_MODES = ("auto", "fast", "lean")
RESIDENT_BASE = 1.0 * GIB
RESIDENT_PER_ESTIMATE = {"fast": 3.8, "lean": 1.6}
ROOM = 0.6  # share of the available memory a run may plan to take


def cpu_memory_mode(requested: str, estimate_bytes: float, available_bytes: float) -> tuple[str, str]:
    """"fast" or "lean" for a CPU run, and why, in words: fast (glibc as it is, up to ~15 % faster) when the run is
    expected to fit in the memory available that way, else lean; or what --cpu-memory asked for."""
    fast, lean = (RESIDENT_BASE + RESIDENT_PER_ESTIMATE[mode] * estimate_bytes for mode in ("fast", "lean"))
    expected = f"~{fast / GIB:.1f} GiB expected fast, ~{lean / GIB:.1f} GiB lean, {available_bytes / GIB:.1f} available"
    if requested != "auto":
        return requested, f"--cpu-memory {requested} ({expected})"
    if fast <= ROOM * available_bytes:
        return "fast", f"it fits ({expected}); --cpu-memory lean holds half the memory for up to ~15 % more time"
    return "lean", f"giving freed memory back, up to ~15 % slower ({expected}); --cpu-memory fast to force"


def available_memory() -> float:
    """Bytes of memory the system can give this process now (psutil's estimate of available memory)."""
    import psutil

    return float(psutil.virtual_memory().available)


def return_freed_memory() -> bool:
    """Make glibc give large freed buffers back to the system (see GLIBC_MMAP_THRESHOLD). Not where the user set
    MALLOC_MMAP_THRESHOLD_ themselves, nor with PIPELINE_GLIBC_DEFAULTS=1 (the benchmark's baseline)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or os.environ.get("PIPELINE_GLIBC_DEFAULTS"):
        return False
    mallopt = platforms.glibc_function("mallopt")
    return mallopt is not None and mallopt(-3, GLIBC_MMAP_THRESHOLD) == 1  # M_MMAP_THRESHOLD; 1 means it took
