"""The folders the stages pass their results through, the files in them, and how they are written: atomically
(a temporary sibling renamed into place), so a crash leaves the previous output or the new one, never half.

Standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from pipeline.cli import EXIT_FAILED, StageError

# Default folders, one per stage, in the order of the road.
MODEL_DIR = "model"
DATA_DIR = "data"
PREPARED_DIR = "prepared_data"
CHECKPOINTS_DIR = "checkpoints"
RESULTS_DIR = "results"
EXPORT_DIR = "export"
FINAL_ADAPTER = "final"  # checkpoints/final/

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_PROBLEMS = REPO_ROOT / "assets" / "demo_problems.jsonl"
EXAMPLES = REPO_ROOT / "assets" / "examples"

GIB = 2**30

# Files written beside artifacts so that later stages reuse the settings that made them.
DOWNLOAD_INFO = "download_info.json"  # in model/ and data/: where they came from
DATASET_DICT = "dataset_dict.json"  # in a folder that datasets' save_to_disk wrote
PREPARED_STATS = "stats.json"  # in prepared_data/: its settings (template, max length, model) and counts
RUN_SETTINGS = "run_settings.json"  # in checkpoints/: the settings of the run that owns the folder
TRAINING_SETTINGS = "training_settings.json"  # in checkpoints/final/ and every checkpoint-N/: what made the adapter
EXPORT_SETTINGS = "export_settings.json"  # in export/: the template, base model and adapter of a merged model
ADAPTER_CONFIG = "adapter_config.json"  # peft's files in an adapter folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")  # any one of them


def read_json(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str | Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_output_dir(final: str | Path):
    """Yield a temporary sibling folder; on success it replaces `final`, on any error it is removed.

    A crash therefore leaves either the previous output or the new one, never a half-written folder that
    the next stage would accept.
    """
    final = Path(final)
    if out_file_problem(final):
        raise StageError(out_file_problem(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, final: Path) -> None:
    """Move the complete folder `new` to `final`, replacing what was there."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def out_file_problem(out: str | Path) -> str | None:
    """An --out that names an existing file (not a folder) is refused, never replaced."""
    out = Path(out)
    return f"--out {out} is a file, not a folder: choose another --out" if out.exists() and not out.is_dir() else None


def check_free_space(folder: str | Path, needed_bytes: int, what: str) -> None:
    """Stop with a clear message rather than failing halfway through a write."""
    folder = Path(folder)
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    margin = 100 * 2**20
    if free < needed_bytes + margin:
        raise StageError(f"not enough disk space for {what}: {free / 2**20:.0f} MB free in {folder}/, about "
                         f"{(needed_bytes + margin) / 2**20:.0f} MB needed; free some space and run again", EXIT_FAILED)


def is_saved_dataset(path: str | Path) -> bool:
    return (Path(path) / DATASET_DICT).is_file()


def require_dataset_dir(path: str | Path, stage_hint: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise StageError(f"{path}/ not found: run {stage_hint} first")
    if not is_saved_dataset(path):
        raise StageError(f"{path}/ is not a saved dataset (no {DATASET_DICT}): run {stage_hint} first")
    return path


def file_fingerprint(path: str | Path, *extra: object) -> str:
    """A short hash of a file's bytes (and of `extra` settings): a copy made from an older version is noticed."""
    digest = hashlib.sha256(repr(extra).encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def download_info(folder: str | Path) -> dict:
    """What download_model.py or download_dataset.py recorded of where a folder came from ({} if nothing)."""
    info = Path(folder) / DOWNLOAD_INFO
    return read_json(info) if info.is_file() else {}


def skip_download(out: Path, force: bool, complete: bool, holds: str | None, same: bool, wanted: str,
                  kind: str) -> bool:
    """For the download stages: True when `out` already holds what was asked (`complete` and `same`), so the
    stage can skip. Refuses, naming --force, when it holds something else or an incomplete folder."""
    if force or not out.exists():
        return False
    if out_file_problem(out):
        raise StageError(out_file_problem(out))
    if complete and same:
        print(f"✓ {out}/ already holds {wanted}: skipping (use --force to download again)")
        return True
    if complete:
        raise StageError(f"{out}/ already holds {holds}; pass --force to replace it with {wanted}")
    if any(out.iterdir()):
        raise StageError(f"{out}/ exists but is not a complete {kind} folder; pass --force to replace it")
    return False
