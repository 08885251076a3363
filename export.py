"""Stage 7: merge the fine-tuned LoRA adapter into its base model, as one plain model folder that transformers,
vLLM and llama.cpp's converter load without peft.

Run:
    python export.py                                   # model/ + checkpoints/final/ -> export/
    python export.py --adapter checkpoints/checkpoint-100 --out my-coder --dtype float16

Reads:  model/ (the base, loaded unquantised), the adapter (checkpoints/final/ by default), prepared_data/ (a few
        held-out prompts for the self-check; the bundled demo problems without it)
Writes: export/ (model.safetensors, or model-0000N-of-0000M.safetensors above --max-shard-size; config.json,
        generation_config.json, the tokenizer files and chat template, export_settings.json)
Needs:  pipeline/
Before: verify_model.py
Next:   python generate.py --model export --prompt "..."  ·  vllm serve export/
        llama.cpp: convert_hf_to_gguf.py export/

The base is loaded unquantised in --merge-dtype (float32: exact, 4 bytes per parameter of RAM), the adapter put
on it, and peft's merge_and_unload adds the low-rank update into each weight. Before anything is written the
merged model checks itself: its greedy completions of a few held-out prompts must equal those of the same base
with the adapter unmerged, in the same dtype; a mismatch is an error and nothing is written. The weights are then
cast to --dtype (default: the base model's own) and saved. export_settings.json records the template, the base
model and the adapter, so that generate.py and evaluate.py prompt the exported model the way it was trained.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import cli, data, folders, inference, models, prompts
from pipeline.cli import StageError

CHECK_PROMPTS = 3
CHECK_TOKENS = 32
DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(__doc__)
    parser.add_argument("--model", default=folders.MODEL_DIR, help="base model folder (default: %(default)s)")
    parser.add_argument("--adapter", default=f"{folders.CHECKPOINTS_DIR}/{folders.FINAL_ADAPTER}",
                        help="adapter folder (default: %(default)s)")
    parser.add_argument("--data", default=folders.PREPARED_DIR,
                        help="prepared data whose held-out prompts the self-check uses (default: %(default)s)")
    parser.add_argument("--out", default=folders.EXPORT_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="dtype of the saved weights (default: the base model's own)")
    parser.add_argument("--merge-dtype", choices=DTYPES, default="float32",
                        help="dtype the merge and the self-check run in (default: %(default)s, exact; bfloat16 halves "
                             "the RAM)")
    parser.add_argument("--max-shard-size", type=shard_size, default="2GB",
                        help="largest .safetensors file; bigger models are sharded (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    return parser


@cli.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = check(args)
    return run(args, settings)


def check(args) -> dict:
    """Every problem with the flags and folders at once; returns the adapter's training settings."""
    problems, settings = [], {}
    model_problem = models.model_folder_problem(args.model)
    if model_problem:
        problems.append(model_problem)
    try:
        settings = inference.adapter_settings(args.adapter)
        mismatch = None if model_problem else inference.base_model_problem(settings, args.model)
        if mismatch:
            problems.append(f"the adapter in {args.adapter}/ does not belong on this base: {mismatch}")
    except StageError as error:
        problems.append(str(error))
    out = Path(args.out)
    if folders.out_problem(out, "export"):
        problems.append(folders.out_problem(out, "export"))
    elif out.is_dir() and any(out.iterdir()) and not args.overwrite:
        problems.append(f"{out}/ holds an earlier export: pass --overwrite to replace it, or --out for a new folder")
    cli.fail_on_problems(problems)
    return settings


def run(args, settings: dict) -> int:
    model_dir, adapter, out = Path(args.model), Path(args.adapter), Path(args.out)
    dtype = args.dtype or base_dtype(model_dir)
    template = prompts.get(settings.get("template", prompts.DEFAULT.name))
    models.quiet_libraries()
    import torch

    tokenizer = models.load_tokenizer(model_dir)
    choice = models.DeviceChoice("cpu", args.merge_dtype, f"merge on the CPU in {args.merge_dtype}")
    model = inference.load_for_inference(model_dir, adapter, choice, load_in_4bit=False)
    parameters = sum(p.numel() for p in model.get_base_model().parameters())
    folders.check_free_space(out.parent, parameters * getattr(torch, dtype).itemsize,
                             f"the merged model ({parameters / 1e6:,.0f}M parameters in {dtype})")

    print(f"merging {adapter}/ into {model_dir}/ ({parameters / 1e6:,.0f}M parameters, {args.merge_dtype}); "
          f"template '{template.name}'")
    merged_model = merge_and_check(model, tokenizer, check_prompts(Path(args.data), template, tokenizer), template)
    merged_model = merged_model.to(getattr(torch, dtype))
    merged_model.config.use_cache = True
    with folders.atomic_output_dir(out, "export") as tmp:
        merged_model.save_pretrained(str(tmp), max_shard_size=args.max_shard_size)
        tokenizer.save_pretrained(str(tmp))
        folders.write_json(tmp / folders.EXPORT_SETTINGS, {
            "template": template.name, "base_model_id": models.model_id(model_dir), "adapter": str(adapter.resolve()),
            "dtype": dtype, "merge_dtype": args.merge_dtype, "lora_target_modules": settings.get("lora_target_modules"),
            "prepared_stats": settings.get("prepared_stats", {}),
        })
        problem = models.model_folder_problem(tmp, remedy=False)
        if problem:
            raise StageError(f"the export is incomplete ({problem}): nothing was written", cli.EXIT_FAILED)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
    files = len(list(out.glob("*.safetensors")))
    print(f"✓ merged model saved in {out}/ ({size:,.1f} MB of {dtype} safetensors, {files} file(s))")
    print(f"next: python generate.py --model {out} --prompt \"Write a function to ...\"  ·  vllm serve {out}/  ·  "
          f"llama.cpp: python convert_hf_to_gguf.py {out}/")
    return 0


def shard_size(text: str) -> str:
    """argparse type: a size as transformers' save_pretrained takes it (5GB, 500MB, 2GiB), above zero."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB, 500MB or 1GiB, got {text!r}") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes, got {text!r}")
    return text


def base_dtype(model_dir: Path) -> str:
    """The dtype the base model's weights are stored in (config.json), float32 when it does not say."""
    config = folders.read_json(model_dir / "config.json")
    named = config.get("dtype") or config.get("torch_dtype")
    return named if named in DTYPES else "float32"


def check_prompts(data_dir: Path, template: prompts.Template, tokenizer) -> list[str]:
    """A few held-out prompts in the adapter's template; the bundled demo problems where there is no prepared
    data."""
    if not data.is_prepared(data_dir):
        return [prompt for _, prompt in inference.bundled_prompts(template, tokenizer, CHECK_PROMPTS)]
    from datasets import load_from_disk

    fmt = data.prepared_format(data.prepared_settings(data_dir))
    rows = load_from_disk(str(data_dir))["eval"]
    rows = rows.select(range(min(CHECK_PROMPTS, len(rows))))
    if data.HAS_TESTS[fmt] or fmt == "instruction":
        return [data.prompt_for(fmt, {"code_prefix": "", **row}, template, tokenizer) for row in rows]
    return [tokenizer.decode(row["input_ids"][:64]) for row in rows]


def merge_and_check(model, tokenizer, prompts_to_check: list[str], template: prompts.Template):
    """The adapter merged into the base weights (peft's merge_and_unload), after its greedy completions of the
    check prompts are found equal to those of base + adapter; nothing is written otherwise."""
    unmerged = inference.generate(model, tokenizer, prompts_to_check, CHECK_TOKENS, template=template)
    merged_model = model.merge_and_unload()
    merged = inference.generate(merged_model, tokenizer, prompts_to_check, CHECK_TOKENS, template=template)
    for prompt, before, after in zip(prompts_to_check, unmerged, merged):
        if before[0]["completion"] != after[0]["completion"]:
            raise StageError(f"the merged model answers differently from base + adapter (prompt {prompt[:60]!r}: "
                             f"{before[0]['completion'][:60]!r} vs {after[0]['completion'][:60]!r}): nothing was "
                             f"written", cli.EXIT_FAILED)
    print(f"✓ self-check: greedy completions of {len(prompts_to_check)} held-out prompts equal those of "
          f"base + adapter")
    return merged_model


if __name__ == "__main__":
    sys.exit(main())
