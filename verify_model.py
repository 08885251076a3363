"""Stage 5: smoke-test the base model, and optionally a trained adapter, with a ✓/✗ report.

Run:
    python verify_model.py                                # the base model in model/
    python verify_model.py --adapter checkpoints/final    # base + the adapter train.py wrote

Reads:  model/ (download_model.py), optionally an adapter folder (train.py)
Writes: nothing; prints one ✓ or ✗ line per check and exits 0 only when every check passes
Needs:  pipeline/ (cli, folders, inference, models, platforms, prompts)
Next:   evaluate.py (does the fine-tune write better code?), export.py (one merged model to use anywhere)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import cli, folders, inference, models, prompts

SMOKE_TASK = "Write a function to return the sum of two numbers."
SMOKE_TESTS = ["assert add(2, 3) == 5"]
# for adapters that continue code (humaneval, raw text)
SMOKE_CODE = 'def add(a, b):\n    """Return the sum of a and b."""\n'


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(__doc__)
    parser.add_argument("--model", default=folders.MODEL_DIR, help="base model folder (default: %(default)s)")
    parser.add_argument("--adapter", default=None,
                        help="LoRA adapter folder to check on top of the base, e.g. checkpoints/final")
    parser.add_argument("--max-new-tokens", type=cli.positive(int), default=24,
                        help="length of the test generation (default: %(default)s)")
    parser.add_argument("--no-4bit", action="store_true", help="load the base model unquantised instead of in 4-bit")
    return parser


@cli.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def run(args) -> int:
    """Every check in order, one ✓ or ✗ line each; a failed check skips the checks that depend on it."""
    model_dir, adapter_dir = Path(args.model), Path(args.adapter) if args.adapter else None
    report = Report()
    models.quiet_libraries()
    print(f"base model: {model_dir}/")
    folder_ok, tokenizer = check_folder(report, model_dir)
    template, settings = prompts.DEFAULT, None
    if adapter_dir is not None:
        template, settings = check_adapter_settings(report, adapter_dir, model_dir, folder_ok)
    # Loaded as the adapter was trained (4-bit, or unquantised for a --no-4bit run), by the rule every stage uses.
    model = folder_ok and check_loads(report, model_dir, adapter_dir if settings else None, args.no_4bit)

    def generates(which):
        return smoke_generation(which, tokenizer, template, args.max_new_tokens)

    if model and tokenizer:
        report.check("base model generates", lambda: generates(model))
        if settings:
            tuned = report.check("adapter loads onto the base model",
                                 lambda: inference.attach_adapter(model, adapter_dir, model_dir))
            if tuned:
                report.check("base + adapter generates", lambda: generates(tuned))
    elif adapter_dir is not None:
        print("✗ adapter not checked: the base model did not load")
        report.failures += 1
    if report.failures:
        print(f"{report.failures} check(s) failed")
        return cli.EXIT_FAILED
    print("all checks passed")
    return 0


class Report:
    """Runs checks in order; a failed check skips the checks that depend on it."""

    def __init__(self):
        self.failures = 0

    def check(self, name: str, action):
        try:
            detail = action()
        except Exception as error:  # every failure becomes one ✗ line, whatever raised it
            print(f"✗ {name}: {cli.short_error(error, 300)}")
            self.failures += 1
            return None
        if isinstance(detail, str) or detail is None:  # a description to show, not a value to pass on
            print(f"✓ {name}" + (f": {detail}" if detail else ""))
            return True
        print(f"✓ {name}")
        return detail


def require(condition: bool, message: str) -> str:
    if not condition:
        raise RuntimeError(message)
    return ""


def check_folder(report: Report, model_dir: Path):
    """The base model's folder and tokenizer: (folder complete, tokenizer), None where one failed."""
    folder_problem = models.model_folder_problem(model_dir)
    folder_ok = report.check("model folder complete (config.json, .safetensors weights, tokenizer files)",
                             lambda: require(folder_problem is None, folder_problem))
    tokenizer = folder_ok and report.check("tokenizer loads", lambda: models.load_tokenizer(model_dir))
    return folder_ok, tokenizer


def check_loads(report: Report, model_dir: Path, adapter_dir: Path | None, no_4bit: bool):
    """The model loads, in the precision the adapter (if any) was trained in; the model, or None."""
    choice, load_in_4bit = inference.loading(model_dir, adapter_dir, models.pick_device(), no_4bit)
    how = "4-bit NF4" if load_in_4bit else choice.dtype_name
    return report.check(f"model loads ({how} on {choice.device})",
                        lambda: inference.load_model_as(model_dir, None, choice, load_in_4bit))


def check_adapter_settings(report: Report, adapter_dir: Path, model_dir: Path, folder_ok: bool):
    """The adapter's files and whether it belongs on this base: (its template, its settings or None)."""
    settings = report.check(f"adapter files in {adapter_dir}/",
                            lambda: inference.adapter_settings(adapter_dir) or {"template": prompts.DEFAULT.name})
    if not settings:
        return prompts.DEFAULT, None
    template = prompts.get(settings.get("template", prompts.DEFAULT.name))
    finite = report.check("adapter weights are numbers (none NaN or infinite)",
                          lambda: require(inference.nonfinite_weights(adapter_dir) is None,
                                          f"{inference.nonfinite_weights(adapter_dir)}: training diverged; train again "
                                          f"with a lower --lr"))
    if not finite:
        return template, None
    base_problem = inference.base_model_problem(settings, model_dir) if folder_ok else None
    if folder_ok and inference.export_settings(model_dir):
        base_problem = (f"{model_dir}/ is a merged model (export.py): its adapter is in its weights already; pass "
                        f"the base model it was trained on with --model")
    base_ok = folder_ok and report.check("adapter was trained on this base model",
                                         lambda: require(base_problem is None, base_problem))
    return template, settings if base_ok else None


def smoke_prompt(template: prompts.Template, tokenizer) -> str:
    """The smoke-test task in the shape the adapter was trained on."""
    if template.continues_code:
        return template.prompt(SMOKE_CODE)
    return template.prompt(SMOKE_TASK, SMOKE_TESTS, tokenizer)


def smoke_generation(model, tokenizer, template: prompts.Template, max_new_tokens: int) -> str:
    result = inference.generate(model, tokenizer, [smoke_prompt(template, tokenizer)], max_new_tokens,
                                template=template)[0][0]
    return f"{result['completion'][:60]!r}" + (" (stopped by itself)" if result["stopped"] else "")


if __name__ == "__main__":
    sys.exit(main())
