"""Scoring code by running it: pass@k, a model's summary, what changed between two models, and the tables and
charts evaluate.py writes.

Nothing heavy is imported at module level.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from pipeline import data, prompts, sandbox
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
    problems = len(by_task) + len(missing)
    scores = {f"pass@{k}": sum(pass_at_k(len(s), s.count("passed"), k) for s in by_task.values()) / max(1, problems)
              for k in range(1, max_k + 1)}
    counts = {status: sum(row["status"] == status for row in rows) for status in sandbox.STATUSES}
    return {"problems": problems, "candidates": len(rows), **scores, "counts": counts, "missing": list(missing)}


def score(label: str, problems: list[dict], completions: dict[str, list[str]], box) -> list[dict]:
    """Run every completion against its problem's asserts; one row per candidate."""
    from tqdm.auto import tqdm

    # A model that answers in Markdown is scored on the code of its fenced block, as evaluation harnesses do.
    jobs = [(p, index, text, prompts.extract_code(text)) for p in problems
            for index, text in enumerate(completions.get(p["task_id"], []))]
    programs = [sandbox.build_program(*data.program(p, code)) for p, _, _, code in jobs]
    with tqdm(total=len(programs), desc=f"testing {label}", unit="candidate") as bar:
        verdicts = box.run_many(programs, progress=bar.update)
    return [{"task_id": p["task_id"], "sample": index, "completion": text, "code": code, "status": v.status,
             "message": v.message, "seconds": round(v.seconds, 3)} for (p, index, text, code), v in zip(jobs, verdicts)]


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
    header = "| model | problems | " + " | ".join(f"pass@{k}" for k in ks) + " | passed | failed | timeout | error |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for label, result in models.items():
        counts = result["counts"]
        scores = " | ".join(f"{100 * result[f'pass@{k}']:.1f}%" for k in ks)
        lines.append(f"| {label} | {result['problems']} | " + scores
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
