"""Write code for a task description with the fine-tuned model (or the base model).

Run:
    python generate.py --prompt "Write a function to reverse the words of a sentence."
    python generate.py --prompt "Write a function to add two numbers." --test "assert add(2, 3) == 5"
    python generate.py                      # interactive: one task per line on standard input, Ctrl-D to end
    python generate.py --prompt "$(cat stub.py)"   # an adapter trained on HumanEval or raw code continues the code

Reads:  model/, the adapter (checkpoints/final/ by default, if it exists)
Writes: nothing; prints each completion
Needs:  pipeline/ (cli, folders, inference, models, platforms, prompts)
Before: train.py

The prompt is built with the template the adapter was trained with (training_settings.json), exactly as in
training and evaluation (an instruct model's chat template with --template chat); with --test the asserts are
shown too, which tells the model the function's name.
"""

from __future__ import annotations

import argparse
import sys

from pipeline import cli, folders, inference, models


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(__doc__)
    parser.add_argument("--model", default=folders.MODEL_DIR,
                        help="base model folder, or a merged model from export.py (default: %(default)s)")
    parser.add_argument("--adapter", default=None, help="adapter folder (default: checkpoints/final if it exists)")
    parser.add_argument("--base-only", action="store_true", help="use the base model without the adapter")
    parser.add_argument("--prompt", default=None,
                        help="the task description; without it, tasks are read from standard input")
    parser.add_argument("--test", action="append", default=[], metavar="ASSERT",
                        help="an assert the solution should pass (repeatable)")
    parser.add_argument("--max-new-tokens", type=cli.positive(int), default=256,
                        help="longest completion in tokens (default: %(default)s)")
    parser.add_argument("--temperature", type=cli.non_negative(float), default=0.0,
                        help="0 for greedy decoding (default), > 0 to sample")
    parser.add_argument("--no-4bit", action="store_true", help="load the base model unquantised")
    return parser


@cli.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check(args)
    return run(args)


def check(args) -> None:
    problems = []
    if args.prompt is not None and not args.prompt.strip():
        problems.append("--prompt is empty: describe the function to write")
    problem = models.model_folder_problem(args.model)
    if problem:
        problems.append(problem)
    cli.fail_on_problems(problems)


def run(args) -> int:
    """The model loaded once, then each task answered: the --prompt, or one per line of standard input."""
    models.quiet_libraries()
    adapter = inference.resolve_adapter(args.adapter, args.base_only, args.model)
    template = inference.adapter_template(adapter, model_dir=args.model)
    choice = models.pick_device()
    tokenizer = models.load_tokenizer(args.model)
    note = lambda message: print(message, file=sys.stderr)  # noqa: E731  (standard output holds the answers only)
    model = inference.load_for_inference(args.model, adapter, choice, args.no_4bit, say=note)
    which = f" + {adapter}/" if adapter else (" (merged)" if inference.export_settings(args.model) else " (base)")
    note(f"model: {args.model}/{which} · template '{template.name}' · {choice.device}")

    def complete(task: str) -> str:
        prompt = template.prompt(task, args.test, tokenizer)
        results = inference.generate(model, tokenizer, [prompt], args.max_new_tokens, args.temperature,
                                     template=template)
        return results[0][0]["completion"]

    if args.prompt is not None:
        print(complete(args.prompt))
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        note("Describe a function per line (Ctrl-D to quit).")
    for line in sys.stdin:
        if line.strip():
            print(complete(line.strip()))
            print("-" * 40 if interactive else "", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
