"""What a run folder holds (checkpoints/ by default), its lock, which of its checkpoints can be resumed from, and
whether a resume (or a rerun) belongs to the run the folder holds: the same settings, model and data.

Used by train.py, pipeline/trainer.py (which writes the checkpoints) and tools/checkpoint_manager.py.
Nothing heavy is imported at module level.

A checkpoint is checkpoints/checkpoint-<step>/ holding the adapter (adapter_config.json,
adapter_model.safetensors), its training_settings.json, the optimiser, scheduler and RNG states, the Trainer's
state, and its epoch's data order and what the logs had not reported yet (resume_state.json); together they let
`train.py --resume` continue exactly where the run stopped. The Trainer writes each one into a staging folder
(.staging-<step>/) and renames it when complete, so a folder named checkpoint-<step> is never half-written; before
resuming, train.py validates the newest one here (every file present and readable to the end) and falls back to
the previous good one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import zipfile
from pathlib import Path

from pipeline import folders, models, platforms
from pipeline.cli import StageError
from pipeline.folders import ADAPTER_CONFIG, ADAPTER_WEIGHTS

PREFIX = "checkpoint-"
STAGING = ".staging-"  # checkpoints/.staging-<step>/checkpoint-<step>/ while being written
TRAINER_STATE = "trainer_state.json"  # the Trainer's own record in each checkpoint: step, log history
RESUME_STATE = "resume_state.json"  # its epoch's data order, what its logs had not reported (pipeline/trainer.py)
REQUIRED_FILES = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINER_STATE, "optimizer.pt", "scheduler.pt"]
# Flags a resumed run must share with the run it continues: a checkpoint trained with another rank, batch, rate
# or precision is another run. How long to train, how often to log and save may change.
RESUME_FLAGS = ("lora_r", "lora_dropout", "batch_size", "grad_accum", "lr", "warmup_ratio", "optim", "no_4bit",
                "loss", "seed")


@contextlib.contextmanager
def run_lock(out: str | Path):
    """Hold the run folder for one train.py at a time. A second run into the same folder is refused with the
    first one's pid; the lock of a run that was killed (its process is gone, or its pid now names another process)
    is recognised and taken over. Whether the owner lives is asked of the process table, never by a signal."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock, me = out / folders.RUN_LOCK, lock_text(os.getpid())
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            owner = lock.read_text(encoding="utf-8").split() if lock.is_file() else []
            if lock_held(owner):
                raise StageError(f"{out}/ is in use by another train.py (pid {owner[0]}): wait for it to finish, "
                                 f"stop it, or choose another --out") from None
            print(f"note: removing the stale lock of a run that no longer exists ({' '.join(owner) or 'empty'})",
                  file=sys.stderr)
            lock.unlink(missing_ok=True)
    else:
        raise StageError(f"cannot take the lock {lock}: another train.py is starting in {out}/; choose another --out")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(me)
    try:
        yield
    finally:
        if lock.is_file() and lock.read_text(encoding="utf-8") == me:
            lock.unlink()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that stopped before writing anything leaves no empty folder behind


def lock_text(pid: int) -> str:
    """What a run lock holds: "<pid> <host> <start time>", the start time telling the process from a later one
    that reuses its pid."""
    return f"{pid} {socket.gethostname()} {platforms.started_at(pid) or 0:.2f}"


def lock_held(owner: list[str]) -> bool:
    """Whether the train.py a lock names still runs: on this host, alive, and (where the lock says when it
    started, as locks since this version do) the same process, not a later one with its pid."""
    if len(owner) < 2 or not owner[0].isdigit() or owner[1] != socket.gethostname():
        return False
    pid = int(owner[0])
    if not platforms.pid_alive(pid):
        return False
    started = platforms.started_at(pid)
    try:
        return started is None or len(owner) < 3 or abs(started - float(owner[2])) < 1
    except ValueError:  # a damaged start time: the pid alone decides
        return True


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def written_by_train(path: Path) -> bool:
    """A checkpoint (or final/) folder train.py wrote, not merely one named like it: it holds train.py's records."""
    return (path / TRAINER_STATE).is_file() or (path / folders.TRAINING_SETTINGS).is_file()


def checkpoint_step(path: Path) -> int:
    """The optimiser steps a checkpoint holds, from its trainer state (whatever the folder is called)."""
    return json.loads((Path(path) / TRAINER_STATE).read_text(encoding="utf-8"))["global_step"]


def find_checkpoints(out: str | Path) -> list[Path]:
    """checkpoint-<step> folders, oldest first."""
    found = [p for p in Path(out).glob(PREFIX + "*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=step_of)


def checkpoint_problem(path: Path) -> str | None:
    """Why this checkpoint cannot be resumed from, naming the file at fault, or None when it can."""
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
    states = [path / "optimizer.pt", path / "scheduler.pt", *path.glob("rng_state*.pth")]
    records = [path / TRAINER_STATE, path / ADAPTER_CONFIG, *path.glob(RESUME_STATE)]  # older checkpoints have none
    checks = [(path / ADAPTER_WEIGHTS, read_every_tensor), *((state, zip_problem) for state in states),
              *((record, read_json_file) for record in records)]
    for file, check in checks:
        try:
            problem = check(file)
        except Exception as error:  # any unreadable file makes the checkpoint unusable
            problem = f"{type(error).__name__}: {str(error)[:120]}"
        if problem:
            return f"{file.name} is damaged ({problem})"
    return None


def read_every_tensor(file: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as weights:
        for key in weights.keys():
            weights.get_tensor(key)  # reads every byte: a truncated file fails here


def zip_problem(file: Path) -> str | None:
    """torch.save writes zip archives: a CRC check of every member finds a truncated or damaged state file."""
    with zipfile.ZipFile(file) as archive:
        return archive.testzip()


def read_json_file(file: Path) -> None:
    json.loads(file.read_text(encoding="utf-8"))


def latest_valid_checkpoint(out: str | Path) -> Path | None:
    """The newest checkpoint that passes validation; warns about each broken one it skips."""
    for path in reversed(find_checkpoints(out)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        print(f"warning: skipping {path}: {problem}; trying the previous checkpoint", file=sys.stderr)
    return None


def remove_staging(out: str | Path) -> None:
    """Leftovers of a save that was interrupted: never complete, never used."""
    for path in Path(out).glob(STAGING + "*"):
        shutil.rmtree(path, ignore_errors=True)


def checkpoint_size(path: Path | None, trainable_params: int) -> int:
    """Bytes a checkpoint takes: the previous one's size, or an estimate from the trainable parameters
    (fp32 weights and two fp32 optimiser moments)."""
    if path is not None and path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return trainable_params * 12 + 2**20


# ----------------------------------------------------------------------------------------------------------
# Resuming: which checkpoint, and whether it belongs to this run's settings, model and data.


def resume_from(args, stats: dict, out: Path, alpha: float) -> tuple[Path | None, str | None]:
    """The checkpoint --resume continues from (None: no usable one yet) and why it may not, if it may not: a
    resumed run keeps the settings its run recorded (the checkpoint's own, else the run folder's), model and data."""
    if args.resume != "latest":
        checkpoint = Path(args.resume)
        problem = "no such checkpoint folder" if not checkpoint.is_dir() else checkpoint_problem(checkpoint)
        if problem:
            return None, (f"cannot resume from {checkpoint}: {problem}; try --resume without a path to pick the "
                          f"newest good one")
    else:
        checkpoint = latest_valid_checkpoint(out)
    candidates = ([checkpoint / folders.TRAINING_SETTINGS] if checkpoint else []) + [
        out / folders.RUN_SETTINGS, out / folders.FINAL_ADAPTER / folders.TRAINING_SETTINGS]
    recorded = next((folders.read_json(path) for path in candidates if path.is_file()), None)
    differing = [] if recorded is None or args.force_resume else changed_settings(recorded, args, stats, alpha)
    if not differing:
        return checkpoint, None
    return checkpoint, (f"cannot resume {checkpoint or out}: it was trained with other settings or data "
                        f"({'; '.join(differing)}); use the same settings, --overwrite to start over, --out for a new "
                        f"run, or --force-resume")


def changed_settings(recorded: dict, args, stats: dict, alpha: float) -> list[str]:
    """What differs between the settings a run recorded and these flags, model and data."""
    before, now = recorded.get("arguments", {}), vars(args)
    differing = [f"--{key.replace('_', '-')} {before[key]!r} -> {now[key]!r}" for key in RESUME_FLAGS
                 if key in before and before[key] != now[key]]
    if recorded.get("lora_alpha") not in (None, alpha):
        differing.append(f"LoRA alpha {recorded['lora_alpha']:g} -> {alpha:g}")
    if (recorded.get("base_model_id"), recorded.get("base_model_source")) != (
            models.model_id(args.model), folders.download_info(args.model)):
        differing.append(f"the base model ({recorded.get('base_model_id')} -> {models.model_id(args.model)}, or "
                         f"another download of it)")
    if recorded.get("prepared_fingerprint") != stats.get("fingerprint"):
        differing.append(f"the prepared data ({args.data}/ was prepared again, or is other data)")
    return differing


def finished_before(out: Path, arguments: dict, stats: dict) -> bool:
    """Whether out/final already holds an adapter trained with this very command line and prepared data, on the
    same download of the base model (a model/ downloaded again at another revision keeps its id and tokenizer)."""
    saved = out / folders.FINAL_ADAPTER / folders.TRAINING_SETTINGS
    if not saved.is_file():
        return False
    previous = folders.read_json(saved)
    settings = lambda flags: {k: v for k, v in flags.items() if k != "demo"}  # noqa: E731 (--demo only sets others)
    return (settings(previous.get("arguments", {})) == settings(arguments) and previous.get("prepared_stats") == stats
            and previous.get("base_model_source") == folders.download_info(arguments["model"]))
