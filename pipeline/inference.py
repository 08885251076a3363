"""Using a model after training: the adapter's settings, loading base + adapter for inference, batched generation.

Used by verify_model.py, evaluate.py, generate.py, export.py and tools/checkpoint_manager.py.
Nothing heavy is imported at module level.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline import folders, models, prompts
from pipeline.cli import StageError, short_error
from pipeline.prompts import DEFAULT as DEFAULT_TEMPLATE
from pipeline.prompts import Template, encode_prompt


def adapter_settings(adapter_dir: str | Path) -> dict:
    """The training settings saved with an adapter (template, base model, LoRA and run settings); train.py writes
    them into checkpoints/final/ and into every checkpoint-N/. Fails with one line when it is not an adapter."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise StageError(f"adapter folder {adapter_dir}/ not found: run train.py first")
    for name in (folders.ADAPTER_CONFIG, folders.ADAPTER_WEIGHTS):
        if not (adapter_dir / name).is_file():
            raise StageError(f"{adapter_dir}/ has no {name}: it is not a finished adapter (train.py writes "
                             f"checkpoints/final/)")
    path = adapter_dir / folders.TRAINING_SETTINGS
    return folders.read_json(path) if path.is_file() else {}


def nonfinite_weights(adapter_dir: str | Path) -> str | None:
    """Which tensors of an adapter hold NaN or infinite values (a training run that diverged), or None."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(Path(adapter_dir) / folders.ADAPTER_WEIGHTS))
    broken = [name for name, tensor in weights.items() if not torch.isfinite(tensor).all()]
    if not broken:
        return None
    return f"{len(broken)} of {len(weights)} tensors hold NaN or infinite values (the first: {broken[0]})"


def adapter_template(adapter_dir: str | Path | None, default: Template = DEFAULT_TEMPLATE,
                     model_dir: str | Path | None = None) -> Template:
    """The prompt template an adapter was trained with, so that it is prompted the same way; without an adapter,
    that of a merged model (export.py's export_settings.json in `model_dir`), else `default`."""
    if adapter_dir is not None:
        recorded = adapter_settings(adapter_dir).get("template")
    else:
        recorded = export_settings(model_dir).get("template") if model_dir is not None else None
    return prompts.get(recorded) if recorded else default


def export_settings(model_dir: str | Path) -> dict:
    """export_settings.json of a model folder that export.py wrote (a base with its adapter merged in), or {}."""
    path = Path(model_dir) / folders.EXPORT_SETTINGS
    return folders.read_json(path) if path.is_file() else {}


def base_model_problem(settings: dict, model_dir: str | Path) -> str | None:
    """Why the adapter whose training settings these are does not belong on the model in `model_dir`, or None."""
    trained_on, given = settings.get("base_model_id"), models.model_id(model_dir)
    if trained_on and trained_on != given:
        return f"it was trained on {trained_on}, but {model_dir}/ holds {given}: pass that model with --model"
    trained_tokenizer = settings.get("prepared_stats", {}).get("settings", {}).get("tokenizer")
    if trained_tokenizer and trained_tokenizer != models.tokenizer_fingerprint(model_dir):
        return f"it was trained with another tokenizer than the one in {model_dir}/: pass its base model with --model"
    return None


def resolve_adapter(requested: str | None, base_only: bool = False, model_dir: str | Path | None = None) -> Path | None:
    """The adapter to use: the one asked for, else checkpoints/final/ when it exists, else none (base model). A
    merged model (export.py) already holds its adapter: none is added unless asked for."""
    if base_only:
        return None
    if requested:
        adapter_settings(requested)  # fails with a clear line when it is not a finished adapter
        return Path(requested)
    if model_dir is not None and export_settings(model_dir):
        print(f"note: {model_dir}/ is a merged model (export.py): its adapter is already in its weights",
              file=sys.stderr)
        return None
    default = Path(folders.CHECKPOINTS_DIR) / folders.FINAL_ADAPTER
    if (default / folders.ADAPTER_CONFIG).is_file():
        return default
    print(f"note: no adapter given and {default}/ does not exist: using the base model alone", file=sys.stderr)
    return None


def loading(model_dir: str | Path, adapter_dir: str | Path | None, choice, no_4bit: bool = False,
            merged: bool = False, say=print) -> tuple[models.DeviceChoice, bool]:
    """How to load a model so that it is the model that was trained and scored: the one rule evaluate.py,
    generate.py, verify_model.py, export.py and checkpoint_manager.py apply. Returns the device choice (its dtype
    a merged model's own) and whether to load the base in 4-bit; refuses, in one line, what cannot be that model.

      * A merged model (export.py's export_settings.json in `model_dir`, or a folder given as one): loaded as
        saved, in its own dtype, never quantised again. An adapter on top would be applied twice: refused.
      * An adapter: only on the base it was trained on (its recorded model id and tokenizer), and on the weights
        it was trained against: 4-bit NF4, or unquantised for a run trained with --no-4bit (train.py records
        which). --no-4bit for a 4-bit adapter is followed, with a note that it changes the answers.
      * A base model alone: 4-bit NF4 unless --no-4bit (or the device has no bitsandbytes)."""
    recorded = export_settings(model_dir)
    if recorded or merged:
        if adapter_dir is not None:
            holds = f" (it holds {recorded['adapter']})" if recorded.get("adapter") else ""
            raise StageError(f"{model_dir}/ is a merged model{holds}: an adapter on top would be applied twice; "
                             f"use it without --adapter, or pass the base model it was merged from with --model")
        dtype = recorded.get("dtype") or models.stored_dtype(model_dir)
        if dtype != choice.dtype_name or not no_4bit:
            say(f"note: {model_dir}/ is a merged model: loaded as saved ({dtype}), not quantised again")
        return models.DeviceChoice(choice.device, dtype, choice.reason), False
    if adapter_dir is None:
        return choice, models.use_4bit(choice, no_4bit, say)
    settings = adapter_settings(adapter_dir)
    mismatch = base_model_problem(settings, model_dir)
    if mismatch:
        raise StageError(f"the adapter in {adapter_dir}/ does not belong on {model_dir}/: {mismatch}")
    if settings.get("load_in_4bit") is False:
        if not no_4bit:
            say(f"note: {adapter_dir}/ was trained on unquantised weights (train.py --no-4bit): loading the base "
                f"unquantised, as it was trained")
        return choice, False
    if no_4bit:
        say(f"note: --no-4bit: {adapter_dir}/ was trained on 4-bit weights; on unquantised ones its answers differ "
            f"from those it was trained and scored with")
    return choice, models.use_4bit(choice, no_4bit, say)


def load_for_inference(model_dir: str | Path, adapter_dir: str | Path | None, choice, no_4bit: bool = False,
                       merged: bool = False, say=print):
    """Base model (plus the LoRA adapter, if given) in eval mode with the KV cache on, loaded by the one rule of
    loading(): a merged model as saved, an adapter on the base and weights it was trained on."""
    choice, load_in_4bit = loading(model_dir, adapter_dir, choice, no_4bit, merged, say)
    return load_model_as(model_dir, adapter_dir, choice, load_in_4bit)


def load_model_as(model_dir: str | Path, adapter_dir: str | Path | None, choice, load_in_4bit: bool):
    """The model loaded as loading() said, in eval mode with the KV cache on and no gradients."""
    model = models.load_model(model_dir, choice, load_in_4bit)
    if adapter_dir is not None:
        model = attach_adapter(model, adapter_dir, model_dir)
    model.config.use_cache = True
    model.requires_grad_(False)  # inference only: no parameter needs a gradient (and the chunked loss asks for that)
    return model.eval()


def attach_adapter(model, adapter_dir: str | Path, model_dir: str | Path):
    """The base model with the LoRA adapter of `adapter_dir` on top, in eval mode; one clear line when the
    adapter was made for another model (other layer names or shapes)."""
    from peft import PeftModel

    # A folder that vanished since the stage checked it (a running train.py rotates old checkpoints) would send peft
    # to the Hub with its path as a model id.
    vanished = (f"the adapter folder {adapter_dir}/ disappeared while loading (a running train.py removes older "
                f"checkpoints): take {Path(folders.CHECKPOINTS_DIR) / folders.FINAL_ADAPTER}/ or a newer checkpoint, "
                f"or copy the checkpoint elsewhere first")
    if not (Path(adapter_dir) / folders.ADAPTER_CONFIG).is_file():
        raise StageError(vanished)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    except OSError:
        if (Path(adapter_dir) / folders.ADAPTER_CONFIG).is_file():
            raise
        raise StageError(vanished) from None
    except (RuntimeError, ValueError, KeyError) as error:
        raise StageError(f"the adapter in {adapter_dir}/ does not fit the model in {model_dir}/ "
                         f"({short_error(error, 120)}): pass the base model it was trained on with --model") from None


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
             batch_size: int = 16, num_samples: int = 1, progress: bool = False,
             template: Template = DEFAULT_TEMPLATE) -> list[list[dict]]:
    """Complete each prompt `num_samples` times. Returns, per prompt, a list of
    {"completion": text cut at EOS or a stop sequence, "stopped": whether it ended by itself}.

    Prompts are batched with left padding (so every row's next token is at the end) and decoded with the KV
    cache; a row stops at EOS (or a chat template's end of turn) or at a stop sequence of the template in the
    text it generated (never across the prompt boundary), such as a new "Task:" line.
    """
    import torch
    from tqdm.auto import tqdm

    context = context_length(model)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    stop_ids = template.stop_ids(tokenizer)
    jobs = [(index, encode_prompt(tokenizer, prompt)) for index, prompt in enumerate(prompts)
            for _ in range(num_samples)]
    refuse_too_long(jobs, context)
    # Similar lengths in one batch waste less compute on padding; results are put back in order below.
    order = sorted(range(len(jobs)), key=lambda j: len(jobs[j][1]))
    results: list[list[dict]] = [[] for _ in prompts]
    sampling = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95}
    bar = tqdm(total=len(jobs), desc="generating", unit="completion", disable=not progress)
    cut_short = False
    for start in range(0, len(order), batch_size):
        chunk = [jobs[j] for j in order[start:start + batch_size]]
        longest = max(len(ids) for _, ids in chunk)
        input_ids = torch.tensor([[pad_id] * (longest - len(ids)) + ids for _, ids in chunk], device=device)
        attention_mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for _, ids in chunk], device=device)
        stops = stop_criteria(tokenizer, template, longest) if template.stops else None
        budget = max_new_tokens if context is None else min(max_new_tokens, context - longest)
        if budget < max_new_tokens and not cut_short:
            cut_short = True
            print(f"note: answers to prompts of more than {context - max_new_tokens} tokens stop at the model's "
                  f"context of {context} tokens, before --max-new-tokens {max_new_tokens}", file=sys.stderr)
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=budget,
                eos_token_id=stop_ids, pad_token_id=pad_id, stopping_criteria=stops, **sampling,
            )
        for (index, _), row in zip(chunk, output[:, longest:].tolist()):
            ended_at_eos = any(token in stop_ids for token in row)
            if ended_at_eos:
                row = row[:next(i for i, token in enumerate(row) if token in stop_ids)]
            text = tokenizer.decode(row, skip_special_tokens=True)
            cut = template.cut(text)
            results[index].append({"completion": cut, "stopped": ended_at_eos or cut != text})
        bar.update(len(chunk))
    bar.close()
    return results


def context_length(model) -> int | None:
    """How many tokens the model reads at once (prompt and answer together), from its config."""
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def refuse_too_long(jobs: list[tuple[int, list[int]]], context: int | None) -> None:
    """A prompt that fills the model's context leaves no room for an answer: past it, positions the model never
    saw (garbage), or an index past GPT-2's table of positions (a crash)."""
    if context is None:
        return
    longest = max((len(ids), index) for index, ids in jobs) if jobs else (0, 0)
    if longest[0] >= context:
        raise StageError(f"prompt {longest[1] + 1} is {longest[0]:,} tokens, and the model reads at most {context:,} "
                         f"tokens at once, its answer included: shorten the prompt")


def stop_criteria(tokenizer, template: Template, prompt_length: int):
    """A transformers StoppingCriteria that ends each row at a stop sequence of its own generated text: the
    prompt's tokens (from `prompt_length` on, everything is generated) are never looked at."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopInCompletion(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_length:], skip_special_tokens=True)
            return torch.tensor([template.find_stop(text) is not None for text in texts], device=input_ids.device)

    return StoppingCriteriaList([StopInCompletion()])
