"""Stage 6: does the fine-tune write better code? Execution-based pass@k on MBPP, base vs fine-tuned.

Run:
    python evaluate.py --compare-base               # held-out problems, base and checkpoints/final side by side
    python evaluate.py --split train --limit 20     # a sanity check that training took
    python evaluate.py --num-samples 10 --temperature 0.8    # pass@1 ... pass@10
    python evaluate.py --completions my.jsonl       # score completions made elsewhere, no model loaded

Reads:  model/, the adapter (checkpoints/final/ by default), prepared_data/ (task text and asserts of each problem)
Writes: results/ (<model>.jsonl: one row per candidate; summary.json; comparison.md; pass_at_k.png)
Needs:  common.py, inference.py, sandbox.py
Before: train.py

Each completion runs with its problem's asserts in a hardened subprocess (see sandbox.py): it passes only if
every assert ran and held. pass@k uses the unbiased estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k)
for n samples of which c passed, averaged over problems. The prompt template is the one the adapter was
trained with (training_settings.json), for the base model too, so both answer the same prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import common
import inference
import sandbox
from common import StageError

PLOT_NAME = "pass_at_k.png"
TABLE_NAME = "comparison.md"


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
    rows = data[split].select_columns(["task_id", "task", "tests", "test_setup_code"])
    problems = [dict(row) for row in rows]
    return problems[:limit] if limit else problems


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

    jobs = [(p, index, text) for p in problems for index, text in enumerate(completions.get(p["task_id"], []))]
    programs = [sandbox.build_program(text, p["tests"], p["test_setup_code"]) for p, _, text in jobs]
    with tqdm(total=len(programs), desc=f"testing {label}", unit="candidate") as bar:
        verdicts = box.run_many(programs, progress=bar.update)
    return [{"task_id": p["task_id"], "sample": index, "completion": text, "status": v.status,
             "message": v.message, "seconds": round(v.seconds, 3)} for (p, index, text), v in zip(jobs, verdicts)]


def generate_completions(model, tokenizer, problems: list[dict], template: str, num_samples: int, args) -> dict[str, list[str]]:
    prompts = [common.format_prompt(template, p["task"], p["tests"]) for p in problems]
    results = inference.generate(model, tokenizer, prompts, args.max_new_tokens, args.temperature,
                                 args.batch_size, num_samples, progress=True)
    return {p["task_id"]: [r["completion"] for r in samples] for p, samples in zip(problems, results)}


def reported_ks(models: dict[str, dict]) -> list[int]:
    """The usual ks that every model's summary has a pass@k for."""
    return [k for k in (1, 5, 10, 20, 50, 100) if all(f"pass@{k}" in result for result in models.values())]


def refuse_trained_problems(adapter: Path, problems: list[dict], data_dir: str) -> None:
    """A held-out score means nothing for problems the adapter was trained on (data prepared again with
    another seed or fraction after training, say): refuse, naming them."""
    trained = set(inference.adapter_settings(adapter).get("prepared_stats", {}).get("task_ids", {}).get("train", []))
    seen = [p["task_id"] for p in problems if p["task_id"] in trained]
    if seen:
        raise StageError(f"{adapter}/ was trained on {len(seen)} of these {len(problems)} held-out problems "
                         f"({', '.join(seen[:5])}{', ...' if len(seen) > 5 else ''}): {data_dir}/ was prepared again after "
                         f"training; evaluate on the data it was trained with, or pass --allow-trained-problems")


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
    parser.add_argument("--model", default=common.MODEL_DIR, help="base model folder (default: %(default)s)")
    parser.add_argument("--adapter", default=None, help="adapter folder (default: checkpoints/final if it exists)")
    parser.add_argument("--base-only", action="store_true", help="evaluate the base model alone")
    parser.add_argument("--compare-base", action="store_true", help="evaluate the base model and the adapter, same problems and settings")
    parser.add_argument("--completions", default=None, help="score this JSONL of {task_id, completion} instead of generating (no model loaded)")
    parser.add_argument("--data", default=common.PREPARED_DIR, help="folder written by prepare_data.py (default: %(default)s)")
    parser.add_argument("--split", default="eval", choices=["eval", "train"], help="held-out problems (default) or the training ones")
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


@common.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    common.quiet_libraries()
    problems = load_problems(args.data, args.split, args.limit)
    box = sandbox.Sandbox(sandbox.Limits(timeout=args.timeout, memory_mb=args.memory_mb), workers=args.workers)
    template = common.prepared_settings(args.data)["template"]
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
            print(f"warning: {len(missing)} of {len(problems)} problems of the {args.split} split have no completion in "
                  f"{args.completions} ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): they count as unsolved",
                  file=sys.stderr)
        record("completions", completions, {"completions": str(Path(args.completions).resolve())}, 0.0, missing)
    else:
        adapter = inference.resolve_adapter(args.adapter, args.base_only)
        template = inference.adapter_template(adapter, default=template)
        if adapter is not None and args.split != "train" and not args.allow_trained_problems:
            refuse_trained_problems(adapter, problems, args.data)
        base_id = common.model_id(args.model)
        choice = common.pick_device()
        tokenizer = common.load_tokenizer(args.model)
        model = inference.load_for_inference(args.model, None, choice, common.use_4bit(choice, args.no_4bit))
        print(f"{len(problems)} problems from the {args.split} split · template '{template}' · {choice.reason}")
        if adapter is None or args.compare_base:
            started = time.time()
            completions = generate_completions(model, tokenizer, problems, template, num_samples, args)
            record("base", completions, {"model": base_id}, time.time() - started)
        if adapter is not None:
            model = inference.attach_adapter(model, adapter, args.model)
            started = time.time()
            completions = generate_completions(model, tokenizer, problems, template, num_samples, args)
            record("fine-tuned", completions, {"model": base_id, "adapter": str(adapter.resolve())}, time.time() - started)

    table = markdown_table(models)
    settings = {key: getattr(args, key) for key in ("split", "limit", "temperature", "max_new_tokens", "timeout", "memory_mb")}
    settings.update(num_samples=num_samples, workers=box.workers, template=template, data=str(Path(args.data).resolve()),
                    sandbox_user="unprivileged uid per worker" if box.drop_privileges else "the current user")
    summary = {"settings": settings, "models": models}
    with common.atomic_output_dir(args.out) as tmp:
        for label, rows in all_rows.items():
            with open(tmp / f"{label}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        common.write_json(tmp / "summary.json", summary)
        (tmp / TABLE_NAME).write_text(table, encoding="utf-8")
        plot(models, tmp / PLOT_NAME)
    print("\n" + table)
    print(f"✓ every candidate's verdict in {args.out}/ ({', '.join(f'{label}.jsonl' for label in all_rows)}, summary.json, {TABLE_NAME}, {PLOT_NAME})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
