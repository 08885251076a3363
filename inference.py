"""Using a model after training: the adapter's settings, loading base + adapter for inference, batched generation.

Used by verify_model.py, evaluate.py, generate.py and tools/checkpoint_manager.py.
Needs:  common.py. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import sys
from pathlib import Path

import common
from common import StageError

# Where a completion ends besides EOS: a new task header means the model has moved on to inventing the next
# problem; top-level asserts, prints and a main guard are the model writing its own tests, which would run
# against the real ones (the stop words of bigcode-evaluation-harness's MBPP task, in spirit).
STOP_SEQUENCES = ["\nTask:", "\nassert ", "\nprint(", "\nif __name__", "\n```"]
# HumanEval's completions continue a function's body: anything at the start of a line ends it (the stop words
# of the Codex paper and bigcode-evaluation-harness).
CODE_STOP_SEQUENCES = ["\nclass ", "\ndef ", "\n#", "\n@", "\nif ", "\nprint(", "\n```"]


def stop_sequences(template: str) -> list[str]:
    """Raw text (`none`) runs on to EOS or the token limit; code completions end with their function."""
    return {"code": CODE_STOP_SEQUENCES, "none": []}.get(template, STOP_SEQUENCES)


def stop_token_ids(tokenizer, template: str) -> list[int]:
    """Tokens that end a completion: EOS, and for a chat prompt also the template's end-of-turn token."""
    ids = [tokenizer.eos_token_id]
    if template == "chat":
        ids.append(common.end_of_turn_id(tokenizer))
    return sorted(set(ids))


def find_stop(text: str, template: str = common.DEFAULT_TEMPLATE) -> int | None:
    """Where a completion ends: the first stop sequence of the template in `text`, which must be the generated
    text alone (a prompt's final newline followed by an answer that starts with ``` or assert is not a stop). A
    fence line ends a completion only when it closes a block the completion opened, never at the opening fence."""
    found = None
    for stop in stop_sequences(template):
        start = 0
        while (index := text.find(stop, start)) != -1:
            if stop != "\n```" or text[:index].count("```") % 2 == 1:
                found = index if found is None else min(found, index)
                break
            start = index + 1
    return found


def cut_at_stop(text: str, template: str = common.DEFAULT_TEMPLATE) -> str:
    """Generated text cut at its first stop sequence (see find_stop)."""
    index = find_stop(text, template)
    return text if index is None else text[:index]


def extract_code(completion: str) -> str:
    """The code to run from a completion: the first fenced block's content when the model answered in Markdown
    (```python ... ```, ``` ... ```, with prose around it or a fence left unclosed), else the completion as it is."""
    start = completion.find("```")
    if start == -1:
        return completion
    body = completion[start + 3:]
    body = body.split("\n", 1)[1] if "\n" in body else ""  # the rest of the fence line is its language tag
    end = body.find("```")
    return (body if end == -1 else body[:end]).rstrip() + "\n"


def stop_criteria(tokenizer, template: str, prompt_length: int):
    """A transformers StoppingCriteria that ends each row at a stop sequence of its own generated text: the
    prompt's tokens (from `prompt_length` on, everything is generated) are never looked at."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopInCompletion(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_length:], skip_special_tokens=True)
            return torch.tensor([find_stop(text, template) is not None for text in texts], device=input_ids.device)

    return StoppingCriteriaList([StopInCompletion()])


def bundled_prompts(template: str, tokenizer, count: int) -> list[tuple[str, str]]:
    """(title, prompt) of the first `count` bundled problems in the shape a model was trained on: task texts with
    their asserts, or the same problems as code to complete (HumanEval-style, assets/examples/) for models trained
    on HumanEval or raw code. For smoke tests where no prepared data is at hand."""
    import gzip
    import json

    if template in ("code", "none"):
        with gzip.open(common.REPO_ROOT / "assets" / "examples" / "humaneval_style.jsonl.gz", "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f][:count]
        return [(row["entry_point"], common.format_prompt(template, row["prompt"])) for row in rows]
    problems = [json.loads(line) for line in common.DEMO_PROBLEMS.read_text(encoding="utf-8").splitlines()[:count]]
    return [(p["text"], common.format_prompt(template, p["text"], p["test_list"], tokenizer)) for p in problems]


def adapter_settings(adapter_dir: str | Path) -> dict:
    """The training settings saved with an adapter (template, base model, LoRA and run settings); train.py writes
    them into checkpoints/final/ and into every checkpoint-N/. Fails with one line when it is not an adapter."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise StageError(f"adapter folder {adapter_dir}/ not found: run train.py first")
    for name in (common.ADAPTER_CONFIG, common.ADAPTER_WEIGHTS):
        if not (adapter_dir / name).is_file():
            raise StageError(f"{adapter_dir}/ has no {name}: it is not a finished adapter (train.py writes checkpoints/final/)")
    path = adapter_dir / common.TRAINING_SETTINGS
    return common.read_json(path) if path.is_file() else {}


def adapter_template(adapter_dir: str | Path | None, default: str = common.DEFAULT_TEMPLATE, model_dir: str | Path | None = None) -> str:
    """The prompt template an adapter was trained with, so that it is prompted the same way; without an adapter,
    that of a merged model (export.py's export_settings.json in `model_dir`), else `default`."""
    if adapter_dir is not None:
        return adapter_settings(adapter_dir).get("template", default)
    return export_settings(model_dir).get("template", default) if model_dir is not None else default


def export_settings(model_dir: str | Path) -> dict:
    """export_settings.json of a model folder that export.py wrote (a base with its adapter merged in), or {}."""
    path = Path(model_dir) / common.EXPORT_SETTINGS
    return common.read_json(path) if path.is_file() else {}


def base_model_problem(settings: dict, model_dir: str | Path) -> str | None:
    """Why the adapter whose training settings these are does not belong on the model in `model_dir`, or None."""
    trained_on, given = settings.get("base_model_id"), common.model_id(model_dir)
    if trained_on and trained_on != given:
        return f"it was trained on {trained_on}, but {model_dir}/ holds {given}: pass that model with --model"
    trained_tokenizer = settings.get("prepared_stats", {}).get("settings", {}).get("tokenizer")
    if trained_tokenizer and trained_tokenizer != common.tokenizer_fingerprint(model_dir):
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
        print(f"note: {model_dir}/ is a merged model (export.py): its adapter is already in its weights", file=sys.stderr)
        return None
    default = Path(common.CHECKPOINTS_DIR) / common.FINAL_ADAPTER
    if (default / common.ADAPTER_CONFIG).is_file():
        return default
    print(f"note: no adapter given and {default}/ does not exist: using the base model alone", file=sys.stderr)
    return None


def load_for_inference(model_dir: str | Path, adapter_dir: str | Path | None, choice, load_in_4bit: bool):
    """Base model (plus the LoRA adapter, if given) in eval mode with the KV cache on."""
    model = common.load_model(model_dir, choice, load_in_4bit)
    if adapter_dir is not None:
        model = attach_adapter(model, adapter_dir, model_dir)
    model.config.use_cache = True
    model.requires_grad_(False)  # inference only: no parameter needs a gradient (and the chunked loss asks for that)
    return model.eval()


def attach_adapter(model, adapter_dir: str | Path, model_dir: str | Path):
    """The base model with the LoRA adapter of `adapter_dir` on top, in eval mode; one clear line when the
    adapter was made for another model (other layer names or shapes)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    except (RuntimeError, ValueError, KeyError) as error:
        raise StageError(f"the adapter in {adapter_dir}/ does not fit the model in {model_dir}/ ({common.short_error(error, 120)}): "
                         f"pass the base model it was trained on with --model") from None


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
             batch_size: int = 16, num_samples: int = 1, progress: bool = False,
             template: str = common.DEFAULT_TEMPLATE) -> list[list[dict]]:
    """Complete each prompt `num_samples` times. Returns, per prompt, a list of
    {"completion": text cut at EOS or a stop sequence, "stopped": whether it ended by itself}.

    Prompts are batched with left padding (so every row's next token is at the end) and decoded with the KV
    cache; a row stops at EOS (or a chat template's end of turn) or at a stop sequence of the template in the
    text it generated (never across the prompt boundary), such as a new "Task:" line.
    """
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    stop_ids = stop_token_ids(tokenizer, template)
    jobs = [(index, common.encode_prompt(tokenizer, prompt)) for index, prompt in enumerate(prompts) for _ in range(num_samples)]
    # Similar lengths in one batch waste less compute on padding; results are put back in order below.
    order = sorted(range(len(jobs)), key=lambda j: len(jobs[j][1]))
    results: list[list[dict]] = [[] for _ in prompts]
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95} if temperature > 0 else {"do_sample": False}
    bar = tqdm(total=len(jobs), desc="generating", unit="completion", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = [jobs[j] for j in order[start:start + batch_size]]
        longest = max(len(ids) for _, ids in chunk)
        input_ids = torch.tensor([[pad_id] * (longest - len(ids)) + ids for _, ids in chunk], device=device)
        attention_mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for _, ids in chunk], device=device)
        stops = stop_criteria(tokenizer, template, longest) if stop_sequences(template) else None
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                eos_token_id=stop_ids, pad_token_id=pad_id, stopping_criteria=stops, **sampling,
            )
        for (index, _), row in zip(chunk, output[:, longest:].tolist()):
            ended_at_eos = any(token in stop_ids for token in row)
            if ended_at_eos:
                row = row[:next(i for i, token in enumerate(row) if token in stop_ids)]
            text = tokenizer.decode(row, skip_special_tokens=True)
            cut = cut_at_stop(text, template)
            results[index].append({"completion": cut, "stopped": ended_at_eos or cut != text})
        bar.update(len(chunk))
    bar.close()
    return results
