"""Benchmark: batched generation vs one prompt at a time, and parallel vs serial test execution.

Run:
    python bench/generation.py                 # builds the demo model in a temporary folder if needed
    python bench/generation.py --model model --problems 32 --batch-size 16

Both halves run in this one process on the same problems, so the ratios compare like with like on whatever
machine runs them. Prints a table and, last, one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import cli, folders, inference, models, prompts, sandbox  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(__doc__)
    parser.add_argument("--model", default=None, help="model folder (default: a fresh demo model)")
    parser.add_argument("--problems", type=cli.positive(int), default=32,
                        help="problems to generate for (default: %(default)s)")
    parser.add_argument("--batch-size", type=cli.positive(int), default=16,
                        help="batch of the batched run (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=cli.positive(int), default=64,
                        help="tokens per completion (default: %(default)s)")
    return parser


def timed(action) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    models.quiet_libraries()
    model_dir = args.model
    if model_dir is None:
        import download_model

        model_dir = str(Path(tempfile.mkdtemp()) / "model")
        download_model.main(["--demo", "--out", model_dir])
    problems = [json.loads(line) for line in folders.DEMO_PROBLEMS.read_text(encoding="utf-8").splitlines()]
    problems = (problems * (args.problems // len(problems) + 1))[: args.problems]
    texts = [prompts.DEFAULT.prompt(p["text"], p["test_list"]) for p in problems]
    choice = models.pick_device()
    tokenizer = models.load_tokenizer(model_dir)
    model = inference.load_for_inference(model_dir, None, choice)
    inference.generate(model, tokenizer, texts[:2], 4)  # warm-up

    # A random model rarely emits EOS, so both runs generate max_new_tokens for every prompt: equal work.
    one_s, _ = timed(lambda: [inference.generate(model, tokenizer, [p], args.max_new_tokens, batch_size=1)
                              for p in texts])
    batch_s, _ = timed(lambda: inference.generate(model, tokenizer, texts, args.max_new_tokens,
                                                  batch_size=args.batch_size))

    programs = [sandbox.build_program(p["code"], p["test_list"], p["test_setup_code"]) for p in problems]
    serial_s, serial = timed(lambda: sandbox.Sandbox(workers=1).run_many(programs))
    cores = os.cpu_count() or 1
    parallel_s, parallel = timed(lambda: sandbox.Sandbox(workers=cores).run_many(programs))
    assert all(v.status == "passed" for v in serial + parallel)

    rows = [
        ("generation, one prompt at a time", len(texts) / one_s, 1.0),
        (f"generation, batch {args.batch_size}", len(texts) / batch_s, one_s / batch_s),
        ("test execution, 1 worker", len(programs) / serial_s, 1.0),
        (f"test execution, {cores} workers", len(programs) / parallel_s, serial_s / parallel_s),
    ]
    print(f"device: {choice.reason}; {len(texts)} problems, {args.max_new_tokens} new tokens each")
    print(f"{'variant':40s} {'problems/s':>11s} {'speed-up':>9s}")
    for name, rate, ratio in rows:
        print(f"{name:40s} {rate:11.2f} {ratio:8.2f}x")
    print(json.dumps({"device": choice.device, "problems": len(texts), "max_new_tokens": args.max_new_tokens,
                      "batch_size": args.batch_size, "generation_speedup": round(one_s / batch_s, 2),
                      "execution_workers": cores, "execution_speedup": round(serial_s / parallel_s, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
