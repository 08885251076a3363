"""The chunked causal-LM loss: what makes QLoRA training of Qwen2.5-Coder fit a 6 GB GPU.

Used by train.py and evaluate.py (imported once they need it: this module imports torch) and bench/.

The output layer of Qwen2.5-Coder has 151,936 entries: the standard loss materialises logits for every position
of the batch (4 x 512 x 151,936 values, ~1.2 GB in fp32) several times over (logits, upcast, softmax,
gradient). `causal_lm_loss` instead projects only the positions that have a label, a chunk of rows at a time,
and computes each chunk's gradient at once, so at most one chunk of logits exists at any moment (the approach of
Liger Kernel's fused linear cross-entropy, in plain PyTorch so that it runs on CPU, CUDA and MPS alike).
"""

from __future__ import annotations

import contextlib

import torch

from pipeline.prompts import IGNORE_INDEX

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
            # in the output layer's dtype, as autocast would (on a CPU the loss runs outside the model's autocast)
            logits = (hidden[rows].to(weight.dtype) @ weight.t()).float()  # the only [chunk, vocab] tensor alive
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


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """How many positions of a batch the loss is computed on: a label after the first position, not -100 (the
    first position predicts nothing). What "trained tokens" counts everywhere."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


class _PassThroughHead(torch.nn.Module):
    """Stands in for lm_head during training: the model returns hidden states; the loss projects them."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.real = [head]  # in a list: not a submodule, so its weight is not counted or saved twice

    def forward(self, hidden_states):
        return hidden_states


@contextlib.contextmanager
def output_layer_skipped(model, chunk_size: int = DEFAULT_CHUNK):
    """Within this block `model` (a PeftModel or a causal LM) returns hidden states instead of logits, and the
    yielded function (the Trainer's compute_loss_func) projects only the labelled positions, chunk by chunk.
    The output layer is put back on leaving, also after an error, so the adapter is saved with the real model."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = causal_lm.get_output_embeddings()  # lm_head in Qwen2, Llama and GPT-2, tied to the embedding or not
    if getattr(head, "bias", None) is not None:
        raise ValueError("the chunked loss supports output layers without bias (Qwen2, Llama and GPT-2 have none): "
                         "use --loss standard")

    def compute_loss(outputs, labels, num_items_in_batch=None):
        return causal_lm_loss(outputs.logits, head.weight, labels, num_items_in_batch, chunk_size)

    causal_lm.set_output_embeddings(_PassThroughHead(head))
    try:
        yield compute_loss
    finally:
        causal_lm.set_output_embeddings(head)


@contextlib.contextmanager
def output_layer_restored(model):
    """The real output layer back for a while inside output_layer_skipped (to generate text mid-training, where
    logits are needed); nothing changes outside it."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    stand_in = causal_lm.get_output_embeddings()
    if not isinstance(stand_in, _PassThroughHead):
        yield
        return
    causal_lm.set_output_embeddings(stand_in.real[0])
    try:
        yield
    finally:
        causal_lm.set_output_embeddings(stand_in)


def keep_embedding_in_compute_dtype(model, dtype: torch.dtype) -> None:
    """Undo prepare_model_for_kbit_training's fp32 upcast of the frozen (tied) embedding / output layer.

    The upcast costs 136M x 2 extra bytes on Qwen2.5-Coder-0.5B and makes the output projection an fp32 matmul;
    the layer is frozen, so it gains nothing from fp32. Layer norms stay in fp32, where stability matters.
    """
    for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):  # the same layer when tied
        if embedding is not None and embedding.weight.dtype != dtype and not embedding.weight.requires_grad:
            embedding.to(dtype)
