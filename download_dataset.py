"""Stage 2: download the problems: MBPP by default, any data shape of pipeline/data.py, a local file, or the demo
problems.

Run:
    python download_dataset.py                          # code-rag-bench/mbpp from the Hugging Face Hub
    python download_dataset.py --dataset mbpp           # the original MBPP, train/validation/test/prompt splits
    python download_dataset.py --dataset my_tasks.jsonl # a local .json, .jsonl, .parquet, .jsonl.gz or .json.gz file
    python download_dataset.py --dataset HumanEval.jsonl.gz    # any data shape prepare_data.py knows
    python download_dataset.py --demo                   # the 87 problems bundled in assets/, offline
    python download_dataset.py --dataset codeparrot/codeparrot-clean --streaming   # raw code larger than memory

Reads:  the Hugging Face Hub, a local file, or assets/demo_problems.jsonl
Writes: data/ (a datasets DatasetDict written with save_to_disk, plus download_info.json); with --streaming only
        download_info.json: prepare_data.py and train.py then read the rows lazily from the source
Needs:  pipeline/ (cli, data, folders, models, platforms, prompts); assets/demo_problems.jsonl (--demo)
Next:   prepare_data.py
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

from pipeline import cli, data, folders, models
from pipeline.cli import StageError

DEFAULT_DATASET = "code-rag-bench/mbpp"
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".json.gz": "json", ".jsonl.gz": "json"}


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(__doc__)
    parser.add_argument("--dataset", default=DEFAULT_DATASET,
                        help="Hub dataset name or a local .json/.jsonl/.parquet file, .jsonl.gz/.json.gz too "
                             "(default: %(default)s)")
    parser.add_argument("--config", default=None,
                        help="dataset configuration on the Hub, e.g. 'sanitized' for mbpp (default: the dataset's "
                             "default)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a Hub dataset (default: main)")
    parser.add_argument("--out", default=folders.DATA_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace an existing data folder instead of skipping")
    parser.add_argument("--demo", action="store_true",
                        help=f"write the bundled demo problems ({folders.DEMO_PROBLEMS.name}) instead")
    parser.add_argument("--streaming", action="store_true",
                        help="do not download: record the source so that its rows are read lazily (raw text larger "
                             "than memory; train.py then runs by --max-steps)")
    return parser



@cli.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    identity = check(args)
    return 0 if identity is None else run(args, identity)


def check(args) -> dict | None:
    """What --out will record of its source (download_info.json); None when --out already holds it (the stage
    skips). Refuses a folder or missing file, and a local file edited since --out was made from it."""
    out, local = Path(args.out), source_path(args)
    is_local = args.demo or file_type(local) in LOCAL_FORMATS or local.exists()
    if is_local and local.is_dir():
        raise StageError(f"{local} is a folder: pass a .json, .jsonl or .parquet file, or a Hub dataset name "
                         f"(a folder written by this stage is used as it is by prepare_data.py --data {local})")
    if is_local and not local.is_file():
        raise StageError(f"dataset file {local} not found")
    identity = {"source": "demo" if args.demo else ("local" if is_local else "hub"),
                "dataset": str(local.resolve()) if is_local else args.dataset, "config": args.config,
                "revision": args.revision}
    if args.streaming:
        identity.update(streaming=True, **({"builder": builder_for(local)} if is_local else {}))
    elif is_local:
        identity["content"] = folders.file_fingerprint(local)  # an edited file is not the copy data/ holds

    if folders.out_problem(out, "download_dataset"):
        raise StageError(folders.out_problem(out, "download_dataset"))
    held = folders.download_info(out)
    # a streamed source is complete as recorded
    complete = bool(held) and (folders.is_saved_dataset(out) or held.get("streaming", False))
    force = args.force
    edited = "content" in identity and held.get("dataset") == identity["dataset"]
    if complete and edited and held.get("content") != identity["content"]:
        if args.demo:  # the project's own problems, updated with the code: nothing of the user's is replaced
            print(f"{out}/ holds an older version of the demo problems: replacing it")
        elif not force:
            raise StageError(f"{local} has changed since {out}/ was made from it: pass --force to copy it again")
        force = True
    wanted = identity["dataset"]
    if folders.skip_download(out, force, complete, held.get("dataset"), held == identity, wanted, "dataset"):
        return None
    return identity


def next_preparing(args, out) -> str:
    """prepare_data.py on what this stage wrote (with the demo's settings for the demo's problems)."""
    return cli.command("prepare_data.py", ("--data", out, folders.DATA_DIR)) + (" --demo" if args.demo else "")


def source_path(args) -> Path:
    """--dataset as a path (the bundled problems with --demo): a local file, or a Hub name if no such file."""
    return folders.DEMO_PROBLEMS if args.demo else Path(args.dataset)


def run(args, identity: dict) -> int:
    out = Path(args.out)
    models.quiet_libraries()
    if args.streaming:
        return record_stream(out, identity)
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # the bars of a sub-second save are noise
    if identity["source"] == "hub":
        dataset = load_from_hub(identity["dataset"], args.config, args.revision)
    else:
        dataset = load_local(source_path(args))
    if sum(len(part) for part in dataset.values()) == 0:
        raise StageError(f"{identity['dataset']} has no rows")

    with folders.atomic_output_dir(out, "download_dataset") as tmp:
        dataset.save_to_disk(str(tmp))
        folders.write_json(tmp / folders.DOWNLOAD_INFO, identity)
    print(describe(dataset))
    print(f"✓ saved in {out}/")
    print("next: " + next_preparing(args, out))
    return 0


# ----------------------------------------------------------------------------------------------------------
# Reading a local file, a Hub dataset, a stream


def file_type(path: Path) -> str:
    """'.jsonl', '.json.gz', ...: the suffix that decides how a local file is read (compressed as distributed)."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    return "".join(suffixes) if suffixes[-1:] == [".gz"] else "".join(suffixes[-1:])


def builder_for(path: Path) -> str:
    """The datasets builder that reads a local file ('json' or 'parquet'), or one line naming the file types."""
    kind = file_type(path)
    if kind not in LOCAL_FORMATS:
        raise StageError(f"{path}: unsupported file type {kind or 'without a suffix'!r}; use .json, .jsonl, .parquet, "
                         f".jsonl.gz or .json.gz")
    return LOCAL_FORMATS[kind]


def load_local(path: Path):
    from datasets import load_dataset

    builder = builder_for(path)
    if path.stat().st_size == 0:
        raise StageError(f"{path} is empty: it holds no problems")
    if file_type(path).startswith(".jsonl"):
        check_json_lines(path)
    try:
        dataset = load_dataset(builder, data_files=str(path))
    except Exception as error:  # malformed JSON or parquet
        raise StageError(f"{path} could not be read as {builder}: {cli.short_error(error)}") from None
    if looks_columnar(dataset):
        raise StageError(f"{path} holds one object of columns ({{column: [values, ...]}}), read as a single row: write "
                         f"one object per problem, as JSON lines (.jsonl) or a JSON list of objects")
    return dataset


def looks_columnar(dataset) -> bool:
    """A JSON object of equally long lists, {"text": [...], "code": [...]}: datasets reads it as one row."""
    rows = [row for split in dataset.values() for row in split]
    if len(rows) != 1:
        return False
    lengths = {len(value) if isinstance(value, list) else -1 for value in rows[0].values()}
    return len(lengths) == 1 and lengths.pop() > 1


def check_json_lines(path: Path) -> None:
    """Name the first line of a JSONL file that is not one JSON object (datasets' own error names no line)."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise StageError(f"{path}, line {number}: not valid JSON ({error.msg}); fix or "
                                         f"remove that line") from None
                    if not isinstance(row, dict):
                        raise StageError(f"{path}, line {number}: expected a JSON object (one problem per line)")
    except UnicodeDecodeError:
        raise StageError(f"{path} is not UTF-8 text: expected JSON lines") from None
    except (gzip.BadGzipFile, EOFError):
        raise StageError(f"{path} is not a complete gzip file: download it again") from None


def load_from_hub(name: str, config: str | None, revision: str | None, check_only: bool = False):
    from datasets import load_dataset
    from huggingface_hub import HfApi

    try:
        # Fails in milliseconds when offline; load_dataset alone retries for half a minute first.
        HfApi().dataset_info(name, revision=revision)
    except Exception as error:
        raise StageError(cli.hub_error_message(error, f"dataset {name}"), cli.EXIT_FAILED) from None
    if check_only:
        return None
    try:
        return load_dataset(name, config, revision=revision)
    except Exception as error:
        raise StageError(f"loading {name} failed: {cli.short_error(error)}", cli.EXIT_FAILED) from None


def record_stream(out: Path, identity: dict) -> int:
    """--streaming: check that the source answers and show its first row's columns; write only download_info.json."""
    if identity["source"] == "hub":
        load_from_hub(identity["dataset"], identity["config"], identity["revision"], check_only=True)
    first = next(iter(data.open_stream(identity)), None)
    if first is None:
        raise StageError(f"{identity['dataset']} has no rows")
    with folders.atomic_output_dir(out, "download_dataset") as tmp:
        folders.write_json(tmp / folders.DOWNLOAD_INFO, identity)
    print(f"streaming source recorded: {identity['dataset']} (nothing downloaded; rows are read as training "
          f"needs them)")
    print(f"columns: {', '.join(first)}")
    print(f"✓ saved in {out}/")
    print("next: " + cli.command("prepare_data.py", ("--data", out, folders.DATA_DIR))
          + " (it holds out the first rows for evaluation)")
    return 0


def describe(dataset) -> str:
    rows = ", ".join(f"{split}: {len(part)} rows" for split, part in dataset.items())
    columns = next(iter(dataset.values())).column_names
    return f"{rows}\ncolumns: {', '.join(columns)}"


if __name__ == "__main__":
    sys.exit(main())
