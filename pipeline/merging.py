"""Merging an adapter into its base: one plain model that runs without peft or bitsandbytes.

QLoRA trains the adapter against the base's 4-bit NF4 weights, and evaluate.py scores base + adapter that way, so
by default the adapter is merged into those very weights: each 4-bit layer dequantised (the values its matrix
products use) plus the LoRA update, kept in 16 or 32 bits. That merged model is the model that was trained and
scored. Merging into the original unquantised weights instead (`original`) gives a model nobody trained or scored,
close to it on a small model and far from it on a real one (peft #2321, transformers #31293, artidoro/qlora #254).

Nothing heavy is imported at module level.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from pipeline import folders, inference, models
from pipeline.cli import StageError

MERGE_INTO = ("quantized", "original")  # the weights the adapter is added to


def merge_target(settings: dict, asked: str | None) -> str:
    """The weights to merge into: those the adapter was trained against (its 4-bit ones, or the original ones for a
    train.py --no-4bit run) unless --merge-into says otherwise; "quantized" for an adapter that never saw 4-bit
    weights is refused."""
    trained_quantized = settings.get("load_in_4bit") is not False
    if asked == "quantized" and not trained_quantized:
        raise StageError("--merge-into quantized: this adapter was trained on unquantised weights (train.py "
                         "--no-4bit); merged into 4-bit ones it would be a model nobody trained: leave --merge-into "
                         "out")
    return asked or ("quantized" if trained_quantized else "original")


def load_reference(model_dir: Path, adapter_dir: Path, merge_into: str):
    """The model the merged one must answer as: base + adapter as evaluate.py loads it (4-bit NF4, on the device
    evaluate.py picks), or unquantised in float32 on the CPU when merging into the original weights."""
    if merge_into == "quantized":
        return inference.load_for_inference(model_dir, adapter_dir, models.pick_device())
    choice = models.DeviceChoice("cpu", "float32", "merge on the CPU in float32")
    return inference.load_model_as(model_dir, adapter_dir, choice, load_in_4bit=False)


def merged_model(reference, model_dir: Path, dtype: str):
    """A plain transformers model of `dtype` (on the CPU) holding base + adapter merged: each LoRA layer's update
    added to its base weight as the reference computes with it (dequantised when the base is 4-bit). Built a
    weight at a time, so that the peak is the reference, the merged model and one layer in float32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)), dtype=getattr(torch, dtype))
    sources = weight_sources(reference)
    with torch.no_grad():
        for name, target in plain.state_dict(keep_vars=True).items():
            if name not in sources:
                raise RuntimeError(f"the merge has no weight for {name}")
            weight, in_out = sources[name]
            tensor = weight().to("cpu", torch.float32)
            if tensor.dim() == 2 and in_out != is_conv1d(plain.get_submodule(name.rpartition(".")[0])):
                tensor = tensor.T  # GPT-2's Conv1D layers hold (in, out); bitsandbytes' 4-bit layers (out, in)
            target.copy_(tensor)
    return plain.eval()


def weight_sources(reference) -> dict:
    """For every weight of base + adapter, named as in the plain model: a function giving it in float32 (a LoRA
    layer's base weight as computed with, dequantised from 4-bit, plus its update; any other weight as it is),
    and whether it is laid out (in, out) as in a Conv1D layer."""
    sources, lora_layers = {}, ()
    for name, module in reference.get_base_model().named_modules():
        if name.startswith(lora_layers):
            continue  # the inside of a LoRA layer (its base layer, its A and B) is merged below, not copied
        if hasattr(module, "get_delta_weight"):
            lora_layers += (f"{name}.",)
            base = module.get_base_layer()
            sources[f"{name}.weight"] = (lambda module=module: merged_weight(module), is_conv1d(base))
            if getattr(base, "bias", None) is not None:
                sources[f"{name}.bias"] = (lambda base=base: base.bias.float(), False)
            continue
        for leaf, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            sources[f"{name}.{leaf}" if name else leaf] = (lambda tensor=tensor: as_computed(tensor).float(),
                                                            is_conv1d(module))
    return sources


def is_conv1d(module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def merged_weight(lora_layer):
    """A LoRA layer's base weight as its matrix products use it, plus the layer's low-rank update."""
    import torch

    update = sum(lora_layer.get_delta_weight(adapter) for adapter in lora_layer.active_adapters)
    return as_computed(lora_layer.get_base_layer().weight).to(torch.float32) + update.to(torch.float32)


def as_computed(weight):
    """A weight as its layer's matrix products use it: a 4-bit one dequantised, any other as it is."""
    if weight.__class__.__name__ == "Params4bit":
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(weight)
    return weight


def bundled_prompts(template, tokenizer, count: int) -> list[tuple[str, str]]:
    """(title, prompt) of the first `count` bundled problems in the shape a model was trained on: task texts with
    their asserts, or the same problems as code to complete (HumanEval-style, assets/examples/) for models trained
    on HumanEval or raw code. For smoke tests where no prepared data is at hand."""
    if template.continues_code:
        with gzip.open(folders.EXAMPLES / "humaneval_style.jsonl.gz", "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f][:count]
        return [(row["entry_point"], template.prompt(row["prompt"])) for row in rows]
    lines = folders.DEMO_PROBLEMS.read_text(encoding="utf-8").splitlines()[:count]
    problems = [json.loads(line) for line in lines]
    return [(p["text"], template.prompt(p["text"], p["test_list"], tokenizer)) for p in problems]
