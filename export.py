"""Stage 7: merge the fine-tuned LoRA adapter into its base, as one plain model that transformers and vLLM load
without peft, and, with --gguf, one .gguf file for llama.cpp, Ollama and LM Studio with an Ollama Modelfile.

Run:
    python export.py                                   # model/ + checkpoints/final/ -> export/
    python export.py --gguf q8_0                       # also export/model-q8_0.gguf and export/Modelfile
    python export.py --adapter checkpoints/checkpoint-100 --out my-coder --dtype float16

Reads:  model/, the adapter (checkpoints/final/ by default), prepared_data/ (a few held-out prompts for the
        self-check; the bundled demo problems without it)
Writes: export/ (model.safetensors, or model-0000N-of-0000M.safetensors above --max-shard-size; config.json,
        generation_config.json, the tokenizer files and chat template, export_settings.json; with --gguf also
        model-<type>.gguf and Modelfile)
Needs:  pipeline/ (cli, data, folders, gguf_export, inference, merging, models, platforms, prompts);
        requirements-gguf.txt and evaluate.py (--gguf: the Modelfile decodes as evaluate.py scores);
        assets/demo_problems.jsonl and assets/examples/ (the self-check's prompts when --data holds no prepared
        data)
Before: verify_model.py
Next:   python generate.py --model export --prompt "..."  ·  vllm serve export/  ·  ollama create -f export/Modelfile

The model exported is the model evaluate.py scored: QLoRA trained the adapter against the base's 4-bit NF4 weights,
so by default it is added to those weights, dequantised, and kept in --dtype (by default the dtype the scored model
computes in here: float32 on a CPU, else the base's own; the adapter's small additions do not survive rounding to
bfloat16 everywhere, and on a real model a few answers change)
(pipeline/merging.py). --merge-into original adds it to the unquantised original weights instead: a model nobody
trained or scored, close on a small model and not on a real one. Before anything is written the merged model checks
itself against base + adapter as evaluate.py loads it: its greedy completions of a few held-out prompts must be
equal (the largest logit difference is printed); a mismatch is an error and nothing is written. With --gguf the
.gguf file checks itself too (pipeline/gguf_export.py). export_settings.json records the template, base model and
adapter, so generate.py and evaluate.py prompt the exported model the way it was trained.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import cli, data, folders, gguf_export, inference, merging, models, platforms, prompts
from pipeline.cli import StageError

CHECK_PROMPTS = 3
CHECK_TOKENS = 32


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(__doc__)
    parser.add_argument("--model", default=folders.MODEL_DIR, help="base model folder (default: %(default)s)")
    parser.add_argument("--adapter", default=f"{folders.CHECKPOINTS_DIR}/{folders.FINAL_ADAPTER}",
                        help="adapter folder (default: %(default)s)")
    parser.add_argument("--data", default=folders.PREPARED_DIR,
                        help="prepared data whose held-out prompts the self-check uses (default: %(default)s)")
    parser.add_argument("--out", default=folders.EXPORT_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--dtype", choices=models.DTYPES, default=None,
                        help="dtype of the saved weights (default: float32 on a CPU, where evaluate.py computes in "
                             "float32; else the base model's own)")
    parser.add_argument("--merge-into", choices=merging.MERGE_INTO, default=None,
                        help="quantized: the 4-bit weights the adapter was trained and scored on, dequantised; "
                             "original: the unquantised original weights (default: those it was trained against: "
                             "quantized, or original for a train.py --no-4bit adapter)")
    parser.add_argument("--gguf", choices=gguf_export.TYPES, default=None,
                        help="also write model-<type>.gguf for llama.cpp, Ollama and LM Studio, and a Modelfile "
                             "(q8_0: 1 byte per weight; f16/bf16: 2; f32: 4)")
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
        if not model_problem and inference.export_settings(args.model):
            problems.append(f"{args.model}/ is a merged model already (export.py wrote it): pass the base model the "
                            f"adapter was trained on with --model")
        args.merge_into = merging.merge_target(settings, args.merge_into)
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
    dtype = args.dtype or default_dtype(model_dir)
    template = prompts.get(settings.get("template", prompts.DEFAULT.name))
    models.quiet_libraries()
    tokenizer = models.load_tokenizer(model_dir)
    reference = merging.load_reference(model_dir, adapter, args.merge_into)
    parameters = models.parameter_count(model_dir)  # the merged model has the base's weights, no more
    bytes_per_weight = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    folders.check_free_space(out.parent, parameters * bytes_per_weight * (2 if args.gguf else 1),
                             f"the merged model ({parameters / 1e6:,.1f}M parameters in {dtype})")
    weights = "its dequantised 4-bit weights" if args.merge_into == "quantized" else "its original weights"
    print(f"merging {adapter}/ into {weights} ({model_dir}/, {parameters / 1e6:,.1f}M parameters) in {dtype}; "
          f"template '{template.name}'")
    merged = merging.merged_model(reference, model_dir, dtype)
    check_texts = check_prompts(Path(args.data), template, tokenizer)
    compare_answers(reference, merged, tokenizer, check_texts, template, "base + adapter as evaluate.py loads it")
    merged.config.use_cache = True
    with folders.atomic_output_dir(out, "export") as tmp:
        merged.save_pretrained(str(tmp), max_shard_size=args.max_shard_size)
        tokenizer.save_pretrained(str(tmp))
        folders.write_json(tmp / folders.EXPORT_SETTINGS, {
            "template": template.name, "base_model_id": models.model_id(model_dir), "adapter": str(adapter.resolve()),
            "dtype": dtype, "merge_into": args.merge_into, "gguf": args.gguf,
            "lora_target_modules": settings.get("lora_target_modules"),
            "prepared_stats": settings.get("prepared_stats", {}),
        })
        problem = models.model_folder_problem(tmp, remedy=False)
        if problem:
            raise StageError(f"the export is incomplete ({problem}): nothing was written", cli.EXIT_FAILED)
        if args.gguf:
            write_gguf(tmp, args.gguf, merged, tokenizer, check_texts, template, scored_decoding(merged))
    report(args, out, dtype, settings)
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


def default_dtype(model_dir: Path) -> str:
    """The dtype that keeps the model evaluate.py scored on this machine: it computes in float32 on a CPU (a merge
    rounded to bfloat16 answers differently on a real model), in the base's own dtype on a GPU."""
    return "float32" if models.pick_device().device == "cpu" else models.stored_dtype(model_dir)


def check_prompts(data_dir: Path, template: prompts.Template, tokenizer) -> list[str]:
    """A few held-out prompts in the adapter's template; the bundled demo problems where there is no prepared
    data."""
    if not data.is_prepared(data_dir):
        return [prompt for _, prompt in merging.bundled_prompts(template, tokenizer, CHECK_PROMPTS)]
    from datasets import load_from_disk

    fmt = data.prepared_format(data.prepared_settings(data_dir))
    rows = load_from_disk(str(data_dir))["eval"]
    rows = rows.select(range(min(CHECK_PROMPTS, len(rows))))
    if data.HAS_TESTS[fmt] or fmt == "instruction":
        return [data.prompt_for(fmt, {"code_prefix": "", **row}, template, tokenizer) for row in rows]
    return [tokenizer.decode(row["input_ids"][:64]) for row in rows]


def compare_answers(expected_model, model, tokenizer, texts: list[str], template: prompts.Template,
                    what: str) -> None:
    """The greedy completions of `model` must equal those of `expected_model`; the largest difference of their
    next-token logits over the prompts is printed. Nothing is written on a mismatch."""
    import torch

    expected = inference.generate(expected_model, tokenizer, texts, CHECK_TOKENS, template=template)
    got = inference.generate(model, tokenizer, texts, CHECK_TOKENS, template=template)
    for text, before, after in zip(texts, expected, got):
        if before[0]["completion"] != after[0]["completion"]:
            rounded = next(iter(model.parameters())).dtype != torch.float32
            raise StageError(f"the export answers differently from {what} (prompt {text[:60]!r}: "
                             f"{before[0]['completion'][:60]!r} vs {after[0]['completion'][:60]!r}): nothing was "
                             f"written" + ("; --dtype float32 keeps the merged weights unrounded" if rounded else ""),
                             cli.EXIT_FAILED)
    gap = largest_logit_difference(expected_model, model, tokenizer, texts)
    print(f"✓ self-check: greedy completions of {len(texts)} held-out prompts equal those of {what} (largest "
          f"next-token logit difference {gap:.2g})")


def largest_logit_difference(first, second, tokenizer, texts: list[str]) -> float:
    import torch

    gap = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([prompts.encode_prompt(tokenizer, text)])
            logits = [model(input_ids=ids.to(next(model.parameters()).device)).logits[0, -1].float().cpu()
                      for model in (first, second)]
            gap = max(gap, float((logits[0] - logits[1]).abs().max()))
    return gap


def scored_decoding(model) -> dict:
    """How evaluate.py decodes the answers it scores, for the Modelfile: its default --temperature (0: greedy) and
    --max-new-tokens, and the repetition penalty model.generate takes from the model's generation_config (1:
    none)."""
    import evaluate  # its defaults are the one home of the scored decoding

    defaults = evaluate.build_parser().parse_args([])
    return {"temperature": defaults.temperature, "max_new_tokens": defaults.max_new_tokens,
            "repetition_penalty": getattr(model.generation_config, "repetition_penalty", None) or 1.0}


def write_gguf(folder: Path, outtype: str, merged, tokenizer, texts: list[str], template: prompts.Template,
               decoding: dict) -> None:
    """folder/model-<type>.gguf and folder/Modelfile (decoding as `decoding` says), after the GGUF has checked
    itself against the merged model."""
    print(f"writing {gguf_export.file_name(outtype)} with llama.cpp's converter")
    gguf_file = gguf_export.convert(folder, outtype)
    problems = gguf_export.metadata_problems(gguf_file, tokenizer)
    if problems:
        raise StageError(f"the GGUF does not carry the model's tokens: {'; '.join(problems)}: nothing was written",
                         cli.EXIT_FAILED)
    loaded, gguf_tokenizer = gguf_export.load_back(gguf_file)
    for text in texts:
        if gguf_tokenizer(text)["input_ids"] != tokenizer(text)["input_ids"]:
            raise StageError(f"the GGUF's tokenizer splits {text[:60]!r} differently from the model's: nothing was "
                             f"written", cli.EXIT_FAILED)
    alike = check_tokens_chosen_alike(merged, loaded, tokenizer, texts, template)
    in_llama_cpp = check_in_llama_cpp(gguf_file, merged, tokenizer, texts, template, outtype)
    alike = alike if in_llama_cpp is None else in_llama_cpp  # what a user of the file gets, where it was checked
    if outtype in gguf_export.ROUNDED:
        print(f"note: {outtype} rounds each weight to 8 bits, which changes answers at near-ties ({len(texts) - alike} "
              f"of these {len(texts)}; README.md counts them over more prompts): --gguf f16 where the exact answers "
              f"matter")
    text = gguf_export.modelfile(gguf_file.name, template, tokenizer, decoding)
    (folder / gguf_export.MODELFILE).write_text(text, encoding="utf-8")


def check_tokens_chosen_alike(merged, loaded, tokenizer, texts: list[str], template: prompts.Template) -> int:
    """The GGUF read back (dequantised) must choose every token of the merged model's greedy answers as the merged
    model does, except at a near-tie: where the merged model's two best tokens are closer than the largest logit
    difference between the two. That difference must itself be small against the spread of the logits (under half
    their standard deviation): a quantised GGUF moves the logits a little, a broken one a lot. Each token is
    compared after the merged model's own answer so far; the whole answers the GGUF gives by itself are counted too
    (one token chosen otherwise changes the rest): returns how many are the merged model's."""
    import torch

    answers = inference.generate(merged, tokenizer, texts, CHECK_TOKENS, template=template)
    gap, spread, tokens, ties, differing = 0.0, 0.0, 0, 0, []
    for text, answer in zip(texts, answers):
        prompt = prompts.encode_prompt(tokenizer, text)
        answer_ids = tokenizer(answer[0]["completion"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer_ids])
        with torch.no_grad():
            ours, theirs = (model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() for model in (merged, loaded))
        gap = max(gap, float((ours - theirs).abs().max()))
        spread = max(spread, float(ours.std()))
        best_two = ours.topk(2).values
        for position, (margin, ours_token, theirs_token) in enumerate(zip(
                (best_two[:, 0] - best_two[:, 1]).tolist(), ours.argmax(-1).tolist(), theirs.argmax(-1).tolist())):
            tokens += 1
            if ours_token != theirs_token:
                ties += 1
                differing.append((margin, text, position))
    decided = [(margin, text, position) for margin, text, position in differing if margin >= gap]
    if gap >= spread / 2 or decided:
        where = (f"; at token {decided[0][2]} of the answer to {decided[0][1][:50]!r} the merged model's choice "
                 f"leads by {decided[0][0]:.3g}") if decided else ""
        raise StageError(f"the GGUF, read back, does not answer as the merged model does (largest logit difference "
                         f"{gap:.3g}, the logits' spread {spread:.3g}{where}): nothing was written", cli.EXIT_FAILED)
    chosen = "every one" if not ties else f"{tokens - ties}"
    others = f", the other {ties} at near-ties" if ties else ""
    own = inference.generate(loaded, tokenizer, texts, CHECK_TOKENS, template=template)
    alike = sum(ours[0]["completion"] == theirs[0]["completion"] for ours, theirs in zip(answers, own))
    print(f"✓ GGUF self-check: read back, it chooses {chosen} of the {tokens} answer tokens of {len(texts)} held-out "
          f"prompts as the merged model does{others} (largest logit difference {gap:.2g}, the logits' spread "
          f"{spread:.2g}), and gives {alike} of the {len(texts)} whole answers alike; its special tokens, chat "
          f"template and tokenizer are the model's")
    return alike


def check_in_llama_cpp(gguf_file: Path, merged, tokenizer, texts: list[str], template: prompts.Template,
                       outtype: str) -> int | None:
    """The greedy answers of llama.cpp itself must be the merged model's, except those of a rounded type (q8_0)
    at near-ties; returns how many are alike, None where llama-cpp-python is not installed."""
    ids = [prompts.encode_prompt(tokenizer, text) for text in texts]
    answers = gguf_export.llama_cpp_answers(gguf_file, ids, CHECK_TOKENS)
    if answers is None:
        print("- not checked in llama.cpp itself: llama-cpp-python is not installed (pip install llama-cpp-python, "
              "which compiles llama.cpp, to check there too)")
        return None
    expected = inference.generate(merged, tokenizer, texts, CHECK_TOKENS, template=template)
    got = [template.cut(tokenizer.decode(answer, skip_special_tokens=True)) for answer in answers]
    alike = sum(e[0]["completion"] == answer for e, answer in zip(expected, got))
    if alike < len(texts) and outtype not in gguf_export.ROUNDED:
        raise StageError("llama.cpp answers the check prompts differently from the merged model: nothing was "
                         "written", cli.EXIT_FAILED)
    print(f"{'✓' if alike == len(texts) else '-'} llama.cpp itself answers {alike} of the {len(texts)} prompts as "
          f"the merged model does")
    return alike


def report(args, out: Path, dtype: str, settings: dict) -> None:
    shards = list(out.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in shards) / 1e6
    print(f"✓ merged model saved in {out}/ ({size:,.1f} MB of {dtype} safetensors, {len(shards)} file(s))")
    quote = platforms.shell_quote
    generate = f"python generate.py --model {quote(str(out))} --prompt \"Write a function to ...\""
    if args.gguf:
        gguf_file = out / gguf_export.file_name(args.gguf)
        print(f"✓ {gguf_file} ({gguf_file.stat().st_size / 1e6:,.1f} MB) and {out / gguf_export.MODELFILE}")
        print(f"next: ollama create my-coder -f {quote(str(out / gguf_export.MODELFILE))}, then ollama run "
              f"my-coder  ·  {generate}")
        return
    # the same adapter and folders again, so that the GGUF is made from this export and not from the defaults
    defaults = {**vars(build_parser().parse_args([])), "merge_into": merging.merge_target(settings, None)}
    gguf_command = cli.command("export.py", *((f"--{name.replace('_', '-')}", getattr(args, name), defaults[name])
                                              for name in ("model", "adapter", "data", "out", "dtype", "merge_into")))
    print(f"next: {generate}  ·  vllm serve {quote(str(out))}  ·  for llama.cpp and Ollama: {gguf_command} --gguf q8_0 "
          f"--overwrite")


if __name__ == "__main__":
    sys.exit(main())
