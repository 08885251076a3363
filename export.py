"""Stage 7: merge the fine-tuned LoRA adapter into its base model, as one plain model folder that transformers,
vLLM and llama.cpp's converter load without peft.

Run:
    python export.py                                   # model/ + checkpoints/final/ -> export/
    python export.py --adapter checkpoints/checkpoint-100 --out my-coder --dtype float16

Reads:  model/ (the base, loaded unquantised), the adapter (checkpoints/final/ by default), prepared_data/ (a few
        held-out prompts for the self-check; the bundled demo problems without it)
Writes: export/ (model.safetensors, or model-0000N-of-0000M.safetensors above --max-shard-size; config.json,
        generation_config.json, the tokenizer files and chat template, export_settings.json)
Needs:  common.py, formats.py, inference.py
Before: verify_model.py
Next:   python generate.py --model export --prompt "..."   ·   vllm serve export/   ·   llama.cpp: convert_hf_to_gguf.py export/

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

import common
import formats
import inference
from common import StageError

CHECK_PROMPTS = 3
CHECK_TOKENS = 32
DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=common.MODEL_DIR, help="base model folder (default: %(default)s)")
    parser.add_argument("--adapter", default=f"{common.CHECKPOINTS_DIR}/{common.FINAL_ADAPTER}", help="adapter folder (default: %(default)s)")
    parser.add_argument("--data", default=common.PREPARED_DIR, help="prepared data whose held-out prompts the self-check uses (default: %(default)s)")
    parser.add_argument("--out", default=common.EXPORT_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of the saved weights (default: the base model's own)")
    parser.add_argument("--merge-dtype", choices=DTYPES, default="float32",
                        help="dtype the merge and the self-check run in (default: %(default)s, exact; bfloat16 halves the RAM)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest .safetensors file; bigger models are sharded (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    return parser


def base_dtype(model_dir: Path) -> str:
    """The dtype the base model's weights are stored in (config.json), float32 when it does not say."""
    config = common.read_json(model_dir / "config.json")
    named = config.get("dtype") or config.get("torch_dtype")
    return named if named in DTYPES else "float32"


def check_prompts(data_dir: Path, template: str, tokenizer) -> list[str]:
    """A few held-out prompts in the adapter's template; the bundled demo problems where there is no prepared data."""
    if (data_dir / "dataset_dict.json").is_file() and (data_dir / common.PREPARED_STATS).is_file():
        from datasets import load_from_disk

        fmt = common.prepared_settings(data_dir).get("format", "mbpp")
        rows = load_from_disk(str(data_dir))["eval"]
        if formats.HAS_TESTS[fmt] or fmt == "instruction":
            problems = [{"code_prefix": "", **row} for row in rows.select(range(min(CHECK_PROMPTS, len(rows))))]
            return [formats.prompt_for(fmt, problem, template, tokenizer) for problem in problems]
        return [tokenizer.decode(row["input_ids"][:64]) for row in rows.select(range(min(CHECK_PROMPTS, len(rows))))]
    return [prompt for _, prompt in inference.bundled_prompts(template, tokenizer, CHECK_PROMPTS)]


def check_args(args) -> None:
    problems = []
    model_problem = common.model_folder_problem(args.model)
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
    if common.out_file_problem(out):
        problems.append(common.out_file_problem(out))
    elif out.is_dir() and any(out.iterdir()) and not args.overwrite:
        problems.append(f"{out}/ holds an earlier export: pass --overwrite to replace it, or --out for a new folder")
    common.fail_on_problems(problems)


@common.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    model_dir, adapter, out = Path(args.model), Path(args.adapter), Path(args.out)
    dtype = args.dtype or base_dtype(model_dir)
    settings = inference.adapter_settings(adapter)
    template = settings.get("template", common.DEFAULT_TEMPLATE)
    common.quiet_libraries()
    import torch

    tokenizer = common.load_tokenizer(model_dir)
    choice = common.DeviceChoice("cpu", args.merge_dtype, f"merge on the CPU in {args.merge_dtype}")
    model = inference.load_for_inference(model_dir, adapter, choice, load_in_4bit=False)
    parameters = sum(p.numel() for p in model.get_base_model().parameters())
    common.check_free_space(out.parent, parameters * getattr(torch, dtype).itemsize,
                            f"the merged model ({parameters / 1e6:,.0f}M parameters in {dtype})")

    prompts = check_prompts(Path(args.data), template, tokenizer)
    print(f"merging {adapter}/ into {model_dir}/ ({parameters / 1e6:,.0f}M parameters, {args.merge_dtype}); template '{template}'")
    unmerged = inference.generate(model, tokenizer, prompts, CHECK_TOKENS, template=template)
    merged_model = model.merge_and_unload()
    merged = inference.generate(merged_model, tokenizer, prompts, CHECK_TOKENS, template=template)
    for prompt, before, after in zip(prompts, unmerged, merged):
        if before[0]["completion"] != after[0]["completion"]:
            raise StageError(f"the merged model answers differently from base + adapter (prompt {prompt[:60]!r}: "
                             f"{before[0]['completion'][:60]!r} vs {after[0]['completion'][:60]!r}): nothing was written", common.EXIT_FAILED)
    print(f"✓ self-check: greedy completions of {len(prompts)} held-out prompts equal those of base + adapter")

    merged_model = merged_model.to(getattr(torch, dtype))
    merged_model.config.use_cache = True
    with common.atomic_output_dir(out) as tmp:
        merged_model.save_pretrained(str(tmp), max_shard_size=args.max_shard_size)
        tokenizer.save_pretrained(str(tmp))
        common.write_json(tmp / common.EXPORT_SETTINGS, {
            "template": template, "base_model_id": common.model_id(model_dir), "adapter": str(adapter.resolve()),
            "dtype": dtype, "merge_dtype": args.merge_dtype, "lora_target_modules": settings.get("lora_target_modules"),
            "prepared_stats": settings.get("prepared_stats", {}),
        })
        problem = common.model_folder_problem(tmp, remedy=False)
        if problem:
            raise StageError(f"the export is incomplete ({problem}): nothing was written", common.EXIT_FAILED)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
    print(f"✓ merged model saved in {out}/ ({size:,.1f} MB of {dtype} safetensors, {len(list(out.glob('*.safetensors')))} file(s))")
    print(f"next: python generate.py --model {out} --prompt \"Write a function to ...\"  ·  vllm serve {out}/  ·  "
          f"llama.cpp: python convert_hf_to_gguf.py {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
