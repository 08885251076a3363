"""The folders the stages pass their results through, the files in them, and how they are written: atomically
(a temporary sibling renamed into place), so a crash leaves the previous output or the new one, never half; and
each by the stage that owns it, so that a careless --out never replaces another stage's work.

Standard library, and pipeline/platforms.py for whether a process is alive.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from pipeline import platforms
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
SUMMARY = "summary.json"  # in results/: every model's scores and the settings they were scored with
ADAPTER_CONFIG = "adapter_config.json"  # peft's files in an adapter folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")  # any one of them
OWNER = ".written_by.json"  # in every output folder: the stage that wrote it, {"stage": "train"}
RUN_LOCK = ".lock"  # in a run folder while a train.py writes to it: "<pid> <host> <start time>"

# What each stage's folder holds, for the line that refuses to write over it.
HOLDS = {"download_model": "a base model", "download_dataset": "downloaded problems", "prepare_data": "prepared data",
         "train": "a training run", "evaluate": "an evaluation", "export": "a merged model"}


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
def atomic_output_dir(final: str | Path, stage: str):
    """Yield a temporary sibling folder; on success it replaces `final`, marked as `stage`'s, and on any error
    (Ctrl-C and SIGTERM included) it is removed.

    A crash therefore leaves either the previous output or the new one, never a half-written folder that
    the next stage would accept.
    """
    final = Path(final)
    if out_file_problem(final):
        raise StageError(out_file_problem(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        mark_owner(tmp, stage)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(final: Path) -> None:
    """Temporary siblings of `final` that a killed process (kill -9, a power cut) could not remove."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(tmp|old)-(\d+)$")
    for sibling in final.parent.iterdir():
        found = pattern.match(sibling.name)
        if found and int(found.group(2)) != os.getpid() and not platforms.pid_alive(int(found.group(2))):
            shutil.rmtree(sibling, ignore_errors=True)


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


# ----------------------------------------------------------------------------------------------------------
# Who wrote a folder: each stage replaces only an empty folder or one it wrote itself.


def mark_owner(folder: Path, stage: str) -> None:
    write_json(folder / OWNER, {"stage": stage})


def owner(folder: str | Path) -> str | None:
    """The stage that wrote `folder`: its marker, else (a folder of an earlier version of this project) what its
    files say; "" for a folder holding files no stage writes; None for a missing or empty folder."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    if (folder / OWNER).is_file():
        try:
            return read_json(folder / OWNER).get("stage", "")
        except (ValueError, OSError, AttributeError):
            return ""
    has = lambda name: (folder / name).exists()  # noqa: E731
    if has(EXPORT_SETTINGS):
        return "export"
    trained = [FINAL_ADAPTER, *(p.name for p in folder.glob("checkpoint-*"))]  # train.py's records inside
    if has(RUN_LOCK) or has(RUN_SETTINGS) or has(TRAINING_SETTINGS) or has(ADAPTER_CONFIG) \
            or any((folder / name / TRAINING_SETTINGS).is_file() for name in trained):
        return "train"
    if has(SUMMARY):
        return "evaluate"
    if has(PREPARED_STATS) and has(DATASET_DICT):
        return "prepare_data"
    if has(DOWNLOAD_INFO) and not has("config.json"):
        return "download_dataset"
    if has("config.json"):
        return "download_model"
    return ""


def out_problem(out: str | Path, stage: str) -> str | None:
    """Why `stage` may not write into --out, or None: a stage writes a new folder, or replaces an empty one or one
    it wrote itself; never a file, another stage's folder, or a folder of files no stage writes."""
    if out_file_problem(out):
        return out_file_problem(out)
    found = owner(out)
    if found is None or found == stage:
        return None
    if found in HOLDS:
        return (f"--out {out}/ holds {HOLDS[found]} ({found}.py wrote it), not {HOLDS[stage]}: choose another --out "
                f"(nothing was changed)")
    names = sorted(p.name for p in Path(out).iterdir())
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return (f"--out {out}/ holds files this pipeline did not write ({shown}): choose a new or empty folder "
            f"(nothing was changed)")
