"""Scoring code by running it: pass@k with its interval, a model's summary, every model against a reference (the
difference with its interval and p-value, pipeline/stats.py), which model solved which, and the tables and charts
evaluate.py writes.

Nothing heavy is imported at module level.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from pipeline import data, prompts, sandbox, stats
from pipeline.cli import StageError, short_error


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
    per_problem = {task: {f"pass@{k}": pass_at_k(len(s), s.count("passed"), k) for k in range(1, max_k + 1)}
                   for task, s in by_task.items()}
    per_problem.update({task: {f"pass@{k}": 0.0 for k in range(1, max_k + 1)} for task in missing})
    scores, intervals = {}, {}
    for k in range(1, max_k + 1):
        values = [problem[f"pass@{k}"] for problem in per_problem.values()]
        scores[f"pass@{k}"] = sum(values) / max(1, len(values))
        intervals[f"pass@{k}"] = stats.mean_interval(values, solved_or_not=num_samples == 1)
    counts = {status: sum(row["status"] == status for row in rows) for status in sandbox.STATUSES}
    return {"problems": len(per_problem), "candidates": len(rows), **scores, "intervals": intervals,
            "counts": counts, "answers": answer_shapes(rows), "missing": list(missing), "per_problem": per_problem}


def score(label: str, problems: list[dict], completions: dict[str, list[str]], box,
          progress: bool = True, stopped: dict[str, list[bool]] | None = None) -> list[dict]:
    """Run every completion against its problem's asserts; one row per candidate, with its shape: whether it
    stopped by itself (None when not known: a completions file), came fenced, is empty, parses as Python."""
    from tqdm.auto import tqdm

    # A model that answers in Markdown is scored on the code of its fenced block, as evaluation harnesses do; an
    # answer the token limit cut off keeps the statements it finished.
    jobs = [(p, index, text, prompts.complete_part(prompts.extract_code(text), p.get("code_prefix", "")))
            for p in problems for index, text in enumerate(completions.get(p["task_id"], []))]
    programs = [sandbox.build_program(*data.program(p, code)) for p, _, _, code in jobs]
    with tqdm(total=len(programs), desc=f"testing {label}", unit="candidate", disable=not progress) as bar:
        verdicts = box.run_many(programs, progress=bar.update)
    return [{"task_id": p["task_id"], "sample": index, "completion": text, "code": code, "status": v.status,
             "message": v.message, "seconds": round(v.seconds, 3),
             "stopped": stopped[p["task_id"]][index] if stopped else None, "fenced": prompts.FENCE in text,
             "empty": not code.strip(), "parses": prompts.is_python(data.program(p, code)[0])}
            for (p, index, text, code), v in zip(jobs, verdicts)]


ANSWER_SHAPES = ("stopped", "hit_limit", "empty", "fenced", "parses")


def held_out_scorer(data_dir: str, stats: dict, tokenizer, choice, max_new_tokens: int, batch_size: int = 16):
    """model -> its greedy pass@1 on the held-out problems of prepared data, their tests run in the sandbox as
    evaluate.py runs them (train.py --score-checkpoints). Mid-training the model is in train mode, its cache off
    and, with the chunked loss, its output layer stood in for: all put back as they were after generating.
    Refuses, before training, a sandbox that cannot run a passing program (it would score every checkpoint 0 %)."""
    import contextlib

    import torch

    from pipeline import inference, loss

    fmt, template = data.prepared_format(stats["settings"]), prompts.get(stats["settings"]["template"])
    problems = data.held_out_problems(data_dir)
    problems = [data.as_chat(problem) for problem in problems] if template.chat else problems
    texts = [data.prompt_for(fmt, problem, template, tokenizer) for problem in problems]
    box = sandbox.Sandbox(sandbox.Limits())
    broken = box.self_test()
    if broken:
        raise StageError(f"--score-checkpoints: {broken}: every checkpoint would score 0 %; fix that, or train "
                         f"without --score-checkpoints and score with evaluate.py --checkpoints")
    # Generation runs outside the Trainer's autocast: in bf16 or fp16 it would meet fp32 layer norms' outputs.
    autocast = (torch.autocast(choice.device, dtype=choice.dtype) if choice.dtype != torch.float32
                else contextlib.nullcontext())

    def score_model(model) -> dict:
        training, use_cache = model.training, model.config.use_cache
        model.eval()
        model.config.use_cache = True
        try:
            with loss.output_layer_restored(model), autocast:
                answers = inference.generate(model, tokenizer, texts, max_new_tokens, batch_size=batch_size,
                                             template=template)
        finally:
            model.train(training)
            model.config.use_cache = use_cache
        completions = {problem["task_id"]: [answer[0]["completion"]] for problem, answer in zip(problems, answers)}
        rows = score("held-out", problems, completions, box, progress=False)
        solved = sum(row["status"] == "passed" for row in rows)
        return {"eval_pass@1": round(solved / len(problems), 4), "eval_solved": solved}

    return score_model


def answer_shapes(rows: list[dict]) -> dict[str, int | None]:
    """How a model's answers came out, counted: stopped by themselves or hit the token limit (None for completions
    made elsewhere), empty, fenced in Markdown, parsing as Python."""
    known = [row for row in rows if row.get("stopped") is not None]
    return {"stopped": sum(row["stopped"] for row in known) if known else None,
            "hit_limit": sum(not row["stopped"] for row in known) if known else None,
            **{shape: sum(row.get(shape, False) for row in rows) for shape in ("empty", "fenced", "parses")}}


def read_completions(path: str, problems: list[dict]) -> dict[str, list[str]]:
    """task_id -> completions, from a JSONL file of {"task_id", "completion"} rows."""
    known = {p["task_id"] for p in problems}
    found: dict[str, list[str]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise StageError(f"cannot read --completions {path}: {short_error(error)}") from None
    except UnicodeDecodeError:
        raise StageError(f"--completions {path} is not a UTF-8 text file: expected JSON lines of "
                         f"{{\"task_id\", \"completion\"}}") from None
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
            raise StageError(f"{path}, line {number}: task_id {task_id} is not in the chosen split; pick it "
                             f"with --split")
        found.setdefault(task_id, []).append(completion)
    if not found:
        raise StageError(f"{path} holds no completions")
    return found


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


def reported_ks(models: dict[str, dict]) -> list[int]:
    """The usual ks that every model's summary has a pass@k for."""
    return [k for k in (1, 5, 10, 20, 50, 100) if all(f"pass@{k}" in result for result in models.values())]


def markdown_table(models: dict[str, dict]) -> str:
    ks = reported_ks(models)
    header = ("| model | problems | " + " | ".join(f"pass@{k} [95% interval]" for k in ks)
              + " | passed | failed | timeout | error |")
    if any(result["candidates"] != result["problems"] for result in models.values()):
        header = header.replace("| passed |", "| candidates passed |")  # several samples: answers, not problems
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for label, result in models.items():
        counts = result["counts"]
        scores = " | ".join(f"{100 * result[f'pass@{k}']:.1f}% [{100 * result['intervals'][f'pass@{k}'][0]:.1f}, "
                            f"{100 * result['intervals'][f'pass@{k}'][1]:.1f}]" for k in ks)
        lines.append(f"| {label} | {result['problems']} | " + scores
                     + f" | {counts['passed']} | {counts['failed']} | {counts['timeout']} | {counts['error']} |")
    return "\n".join(lines) + "\n"


def shapes_table(models: dict[str, dict], max_new_tokens: int | None) -> str:
    """How each model's answers came out: an instruct model prompted raw answers nothing, prompted by chat it may
    run on to the token limit; a model that never learned to stop hits it every time."""
    limit = f"hit the {max_new_tokens}-token limit" if max_new_tokens else "hit the token limit"
    lines = [f"| answers | stopped by itself | {limit} | empty | fenced | parse as Python |",
             "|---|---|---|---|---|---|"]
    for label, result in models.items():
        shapes, total = result["answers"], result["candidates"]
        cell = lambda key: "-" if shapes[key] is None else f"{shapes[key]}/{total}"  # noqa: E731
        lines.append(f"| {label} | " + " | ".join(cell(key) for key in ANSWER_SHAPES) + " |")
    return "\n".join(lines) + "\n"


def compare_models(problems: list[dict], models: dict[str, dict], reference: str,
                   solved_or_not: bool = True) -> dict[str, dict]:
    """Every model against `reference` on the same problems: the pass@1 difference with its interval, the p-value
    (exact McNemar for one sample per problem, `solved_or_not`; else the signed-rank test), the verdict in words,
    and the problems gained and lost by name."""
    order = [p["task_id"] for p in problems]
    base = [models[reference]["per_problem"][task]["pass@1"] for task in order]
    compared = {}
    for label, result in models.items():
        if label == reference:
            continue
        scores = [result["per_problem"][task]["pass@1"] for task in order]
        comparison = stats.compare(base, scores, solved_or_not=solved_or_not)
        comparison["verdict"] = stats.verdict(comparison, label, reference)
        comparison["changes"] = changed(problems, models[reference]["per_problem"], result["per_problem"])
        compared[label] = comparison
    return compared


def changed(problems: list[dict], before: dict, after: dict) -> dict[str, list[str]]:
    """The problems one model solves (any sample passed) and the other does not: what a fine-tune gained and lost,
    which a pass@1 of a few problems alone does not say."""
    solved = lambda scores: {task for task, score in scores.items() if score["pass@1"] > 0}  # noqa: E731
    was, now = solved(before), solved(after)
    return {"gained": [problem_name(p) for p in problems if p["task_id"] in now - was],
            "lost": [problem_name(p) for p in problems if p["task_id"] in was - now]}


def matrix(problems: list[dict], models: dict[str, dict], only_differing: bool, limit: int | None = None) -> str:
    """Which model solved which problem (pass@1 of its samples, ✓ for all of them), as a Markdown table."""
    labels = list(models)
    rows = []
    for problem in problems:
        cells = [models[label]["per_problem"][problem["task_id"]]["pass@1"] for label in labels]
        if only_differing and len(set(cells)) == 1:
            continue
        marks = ["✓" if cell == 1 else ("✗" if cell == 0 else f"{100 * cell:.0f}%") for cell in cells]
        rows.append(f"| {problem_name(problem)} | " + " | ".join(marks) + " |")
    shown = rows[:limit] if limit else rows
    lines = ["| problem | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1), *shown]
    if len(shown) < len(rows):
        lines.append(f"| ... {len(rows) - len(shown)} more | " + " | ".join("" for _ in labels) + " |")
    return "\n".join(lines) + "\n"


def problem_name(problem: dict) -> str:
    """A short name to list a problem by: its task id and the function its reference solution defines."""
    found = re.search(r"def\s+(\w+)", problem["code"]) or re.search(r"def\s+(\w+)", problem["task"])
    return f"{problem['task_id']} {found.group(1)}" if found else problem["task_id"]


def describe_changes(changes: dict[str, list[str]], before: str, after: str, shown: int = 10) -> str:
    def listed(names: list[str]) -> str:
        return ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")

    lines = [f"{after} solves {len(changes['gained'])} problem(s) that {before} does not"
             + (f": {listed(changes['gained'])}" if changes["gained"] else "")]
    if changes["lost"]:
        lines.append(f"{before} solves {len(changes['lost'])} problem(s) that {after} does not: "
                     f"{listed(changes['lost'])}")
    return "\n".join(lines) + "\n"


def plot(models: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    ks = reported_ks(models)
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(ks) * max(1, len(models) / 2), 3.6))
    for i, (label, result) in enumerate(models.items()):
        values = [100 * result[f"pass@{k}"] for k in ks]
        errors = [[100 * (result[f"pass@{k}"] - result["intervals"][f"pass@{k}"][0]) for k in ks],
                  [100 * (result["intervals"][f"pass@{k}"][1] - result[f"pass@{k}"]) for k in ks]]
        bars = ax.bar([x + i * width for x in range(len(ks))], values, width, label=label, yerr=errors, capsize=3)
        ax.bar_label(bars, fmt="%.1f%%", fontsize=8, padding=2)
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(ks))], [f"pass@{k}" for k in ks])
    ax.set_ylabel("problems solved (%), 95% interval")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def plot_checkpoints(steps: dict[str, int], models: dict[str, dict], run: Path, path: Path) -> None:
    """pass@1 of every checkpoint against its step, with its 95 % interval, beside the run's eval loss (from its
    metrics.json, when there is one): the loss is not the score, and this shows where they part."""
    import matplotlib

    from pipeline import monitoring

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(steps, key=lambda label: steps[label])
    xs = [steps[label] for label in order]
    ys = [100 * models[label]["pass@1"] for label in order]
    low = [y - 100 * models[label]["intervals"]["pass@1"][0] for y, label in zip(ys, order)]
    high = [100 * models[label]["intervals"]["pass@1"][1] - y for y, label in zip(ys, order)]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.errorbar(xs, ys, yerr=[low, high], fmt="o-", capsize=3, color="tab:blue", label="held-out pass@1")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("pass@1 (%), 95% interval", color="tab:blue")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    try:
        history = json.loads((run / monitoring.METRICS).read_text(encoding="utf-8"))["history"]
    except (OSError, ValueError, KeyError):
        history = []  # a run without metrics.json (copied checkpoints): the scores alone
    evals = [row for row in history if "eval_loss" in row]
    if evals:
        loss_ax = ax.twinx()
        loss_ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "s--", color="tab:orange",
                     label="eval loss")
        loss_ax.set_ylabel("eval loss", color="tab:orange")
    fig.legend(loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
