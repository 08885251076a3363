"""What makes QLoRA training of Qwen2.5-Coder fit a 6 GB GPU: a memory-efficient causal-LM loss and a
peak-memory estimate. Used by train.py and bench/train_step.py.

The output layer of Qwen2.5-Coder has 151,936 entries: the standard loss materialises logits for every position
of the batch (4 x 512 x 151,936 values, ~1.2 GB in fp32) several times over (logits, upcast, softmax,
gradient). `causal_lm_loss` instead projects only the positions that have a label, a chunk of rows at a time,
and computes each chunk's gradient at once, so at most one chunk of logits exists at any moment (the approach of
Liger Kernel's fused linear cross-entropy, in plain PyTorch so that it runs on CPU, CUDA and MPS alike).
"""

from __future__ import annotations

import math

import torch

from common import IGNORE_INDEX

DEFAULT_CHUNK = 128  # rows of logits at a time: 128 x 151,936 x 4 bytes = 78 MB


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), without keeping the logits; the weight must be frozen."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, want_grad):
        # want_grad is decided by the caller: grad mode is always off inside forward.
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = (hidden[rows] @ weight.t()).float()  # the only [chunk, vocab] tensor alive
            target = targets[rows]
            target_logit = logits.gather(1, target[:, None]).squeeze(1)
            # log-sum-exp and softmax in the logits' own memory: no second [chunk, vocab] buffer
            row_max = logits.max(dim=-1, keepdim=True).values
            exp = logits.sub_(row_max).exp_()
            sum_exp = exp.sum(dim=-1, keepdim=True)
            total += ((sum_exp.log() + row_max).squeeze(1) - target_logit).sum()
            if want_grad:
                # d CE / d logits = softmax - one_hot(target)
                probs = exp.div_(sum_exp)
                probs[torch.arange(len(target), device=probs.device), target] -= 1.0
                grad_hidden[rows] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None


def causal_lm_loss(hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch=None, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions, as transformers' ForCausalLMLoss computes it.

    hidden_states: [batch, time, hidden], the final-norm output; weight: [vocab, hidden], the frozen output layer;
    labels: [batch, time] with IGNORE_INDEX where nothing is trained. As in the Trainer, the sum is divided by
    `num_items_in_batch` (the labelled tokens of all micro-batches of one optimiser step) when given, so
    gradient accumulation averages over tokens, not over micro-batches.
    """
    if weight.requires_grad:
        raise ValueError("causal_lm_loss computes no gradient for the output layer: it must be frozen (as in LoRA)")
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if not keep.any():
        return hidden_states.sum() * 0.0  # nothing to learn here; keeps the graph connected (DDP needs that)
    hidden = hidden_states[:, :-1][keep]  # [labelled positions, hidden]: the only positions projected
    want_grad = torch.is_grad_enabled() and hidden.requires_grad  # no gradient work during evaluation
    total = _LinearCrossEntropy.apply(hidden, weight, targets[keep], chunk_size, want_grad)
    divisor = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    if torch.is_tensor(divisor):
        divisor = divisor.to(total.device)
    return total / divisor


class _PassThroughHead(torch.nn.Module):
    """Stands in for lm_head during training: the model returns hidden states; the loss projects them."""

    def forward(self, hidden_states):
        return hidden_states


def install_chunked_loss(model, chunk_size: int = DEFAULT_CHUNK):
    """Make `model` (a PeftModel or a causal LM) return hidden states instead of logits.

    Returns (compute_loss_func for the Trainer, restore) where restore() puts the output layer back.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = causal_lm.lm_head
    if getattr(head, "bias", None) is not None:
        raise ValueError("the chunked loss supports output layers without bias (Qwen2 has none)")
    causal_lm.lm_head = _PassThroughHead()

    def compute_loss(outputs, labels, num_items_in_batch=None):
        return causal_lm_loss(outputs.logits, head.weight, labels, num_items_in_batch, chunk_size)

    def restore():
        causal_lm.lm_head = head

    return compute_loss, restore


def keep_embedding_in_compute_dtype(model, dtype: torch.dtype) -> None:
    """Undo prepare_model_for_kbit_training's fp32 upcast of the frozen (tied) embedding / output layer.

    The upcast costs 136M x 2 extra bytes on Qwen2.5-Coder-0.5B and makes the output projection an fp32 matmul;
    the layer is frozen, so it gains nothing from fp32. Layer norms stay in fp32, where stability matters.
    """
    embedding = model.get_input_embeddings()
    if embedding.weight.dtype != dtype:
        embedding.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Peak memory estimate (CUDA). Deliberately simple: which terms dominate, and how they scale.

GIB = 2**30


def estimate_peak_memory(config, micro_batch: int, seq_len: int, lora_r: int, load_in_4bit: bool = True,
                         dtype_bytes: int = 2, optimizer_bytes: float = 2.0, chunked_loss: bool = True,
                         labelled_share: float = 0.5, chunk_size: int = DEFAULT_CHUNK) -> dict:
    """Estimated bytes of GPU memory at the peak of a training step, by component.

    config: a transformers config of the Qwen2 family; optimizer_bytes: bytes of optimiser state per trainable
    parameter (2 for 8-bit AdamW's two moments, 8 for fp32 AdamW); labelled_share: share of positions that carry
    a label (the solution; the prompt is masked).
    """
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    inter = config.intermediate_size
    kv = hidden * config.num_key_value_heads // config.num_attention_heads
    per_layer_linear = hidden * hidden * 2 + hidden * kv * 2 + hidden * inter * 3  # q, o, k, v, gate, up, down
    linear_params = per_layer_linear * layers
    # NF4 with double quantisation: 4 bits per weight plus ~0.13 bits of quantisation constants.
    weight_bytes = linear_params * (4.13 / 8 if load_in_4bit else dtype_bytes) + vocab * hidden * dtype_bytes
    lora_params = lora_r * layers * (2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + inter))
    lora_bytes = lora_params * (4 + 4 + optimizer_bytes)  # fp32 weights, fp32 gradients, optimiser state
    tokens = micro_batch * seq_len
    # Gradient checkpointing keeps each layer's input; one layer's activations are live during recompute.
    checkpoints = tokens * hidden * dtype_bytes * layers
    one_layer = tokens * (10 * hidden + 3 * inter) * dtype_bytes
    if chunked_loss:
        # one chunk of logits in the compute dtype and in fp32, and the gradient of the labelled hidden states
        loss = min(chunk_size, tokens) * vocab * (dtype_bytes + 4) + tokens * labelled_share * hidden * 4 * 2
    else:
        # logits in the compute dtype, their fp32 upcast, log-softmax and its gradient, over every position
        loss = tokens * vocab * (dtype_bytes + 4 + 4 + 4)
    parts = {"weights": weight_bytes, "lora_and_optimizer": lora_bytes, "activations": checkpoints + one_layer, "loss": loss}
    parts["total"] = sum(parts.values())
    return parts


def describe_estimate(parts: dict) -> str:
    detail = ", ".join(f"{name.replace('_', ' ')} {value / GIB:.2f}" for name, value in parts.items() if name != "total")
    return f"{parts['total'] / GIB:.2f} GiB ({detail}; CUDA's own context adds ~0.3-0.5 GiB outside this)"


def fit_batch(requested_batch: int, grad_accum: int, fits) -> tuple[int, int]:
    """Largest micro-batch <= the effective batch for which fits(batch) holds, and the accumulation that keeps
    the effective batch (micro-batch x accumulation) as close as possible to what was asked."""
    effective = requested_batch * grad_accum
    batch = effective
    while batch > 1 and not fits(batch):
        batch //= 2
    return batch, max(1, math.ceil(effective / batch))
