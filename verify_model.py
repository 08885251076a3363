"""Stage 5: smoke-test the base model, and optionally a trained adapter, with a ✓/✗ report.

Run:
    python verify_model.py                                # the base model in model/
    python verify_model.py --adapter checkpoints/final    # base + the adapter train.py wrote

Reads:  model/ (download_model.py), optionally an adapter folder (train.py)
Writes: nothing; prints one ✓ or ✗ line per check and exits 0 only when every check passes
Needs:  common.py, inference.py
Next:   evaluate.py (does the fine-tune write better code?), export.py (one merged model to use anywhere)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common
import inference

SMOKE_TASK = "Write a function to return the sum of two numbers."
SMOKE_TESTS = ["assert add(2, 3) == 5"]
SMOKE_CODE = 'def add(a, b):\n    """Return the sum of a and b."""\n'  # for adapters that continue code (humaneval, raw text)


def smoke_prompt(template: str, tokenizer) -> str:
    """The smoke-test task in the shape the adapter was trained on."""
    if template in ("code", "none"):
        return common.format_prompt(template, SMOKE_CODE)
    return common.format_prompt(template, SMOKE_TASK, SMOKE_TESTS, tokenizer)


class Report:
    """Runs checks in order; a failed check skips the checks that depend on it."""

    def __init__(self):
        self.failures = 0

    def check(self, name: str, action):
        try:
            detail = action()
        except Exception as error:  # every failure becomes one ✗ line, whatever raised it
            print(f"✗ {name}: {common.short_error(error, 300)}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=common.MODEL_DIR, help="base model folder (default: %(default)s)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder to check on top of the base, e.g. checkpoints/final")
    parser.add_argument("--max-new-tokens", type=common.positive(int), default=24, help="length of the test generation (default: %(default)s)")
    parser.add_argument("--no-4bit", action="store_true", help="load the base model unquantised instead of in 4-bit")
    return parser


@common.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    model_dir = Path(args.model)
    report = Report()
    common.quiet_libraries()

    print(f"base model: {model_dir}/")
    folder_problem = common.model_folder_problem(model_dir)
    folder_ok = report.check("model folder complete (config.json, .safetensors weights, tokenizer files)",
                             lambda: require(folder_problem is None, folder_problem))
    tokenizer = folder_ok and report.check("tokenizer loads", lambda: common.load_tokenizer(model_dir))
    choice = common.pick_device()
    load_in_4bit = common.use_4bit(choice, args.no_4bit)
    how = "4-bit NF4" if load_in_4bit else choice.dtype_name
    model = folder_ok and report.check(f"model loads ({how} on {choice.device})", lambda: inference.load_for_inference(model_dir, None, choice, load_in_4bit))

    template = common.DEFAULT_TEMPLATE
    adapter_dir = Path(args.adapter) if args.adapter else None
    if adapter_dir is not None:
        settings = report.check(f"adapter files in {adapter_dir}/", lambda: inference.adapter_settings(adapter_dir) or {"template": template})
        if settings:
            template = settings.get("template", template)
            base_problem = inference.base_model_problem(settings, model_dir) if folder_ok else None
            base_ok = folder_ok and report.check("adapter was trained on this base model", lambda: require(base_problem is None, base_problem))
            settings = settings if base_ok else None

    def smoke_generation(which):
        prompt = smoke_prompt(template, tokenizer)
        result = inference.generate(which, tokenizer, [prompt], args.max_new_tokens, template=template)[0][0]
        return f"{result['completion'][:60]!r}" + (" (stopped by itself)" if result["stopped"] else "")

    if model and tokenizer:
        report.check("base model generates", lambda: smoke_generation(model))
        if adapter_dir is not None and settings:
            tuned = report.check("adapter loads onto the base model", lambda: inference.attach_adapter(model, adapter_dir, model_dir))
            if tuned:
                report.check("base + adapter generates", lambda: smoke_generation(tuned))
    elif adapter_dir is not None:
        print("✗ adapter not checked: the base model did not load")
        report.failures += 1

    if report.failures:
        print(f"{report.failures} check(s) failed")
        return common.EXIT_FAILED
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
