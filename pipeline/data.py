"""Data: which kind of dataset a table of rows is (its shape), each row normalised to what the stages use, and
prepared_data/ as the later stages read it (its settings, fingerprint, batches).

Nothing heavy is imported at module level.

Every shape becomes the same problem dict:
    task_id          a string, unique in the dataset
    task             what the prompt shows: a task text, an instruction, or (humaneval) the code to complete
    code             the reference answer the model is trained on
    tests            statements to run after the code (asserts; humaneval's `check` and its call); [] for none
    test_setup_code  code to run before the candidate (imports, helpers); "" for none
    code_prefix      what the completion is joined to before it runs (humaneval: the prompt itself); "" for none

Shapes, detected from the columns in this order:
    humaneval    task_id, prompt, canonical_solution, test, entry_point      (openai_humaneval, HumanEval.jsonl.gz)
    mbpp         text or prompt, code, test_list or test                     (mbpp, mbpp/sanitized, code-rag-bench/mbpp)
    instruction  instruction [, input], output   or   prompt, response|completion   (code_instructions_120k_alpaca)
    text         content or text: one source file per row                    (codeparrot)
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from pipeline import folders, prompts
from pipeline.cli import EXIT_FAILED, StageError, short_error

FORMATS = ("mbpp", "humaneval", "instruction", "text")
HAS_TESTS = {"mbpp": True, "humaneval": True, "instruction": False, "text": False}

MBPP_COLUMNS = {
    "task": ["text", "prompt"],  # the original mbpp has `text`, mbpp/sanitized has `prompt`
    "code": ["code"],
    "tests": ["test_list", "test"],
}
MBPP_SETUP = ["test_setup_code", "test_imports"]  # optional; test_imports (sanitized) is a list of lines
HUMANEVAL_COLUMNS = {"prompt", "canonical_solution", "test", "entry_point"}
INSTRUCTION_PAIRS = [("instruction", "output"), ("prompt", "response"), ("prompt", "completion"),
                     ("question", "answer")]
TEXT_COLUMNS = ["content", "text", "code"]


def detect(columns: list[str]) -> str:
    """The shape of a dataset from its column names; one line naming the shapes when none fits."""
    present = set(columns)
    if HUMANEVAL_COLUMNS <= present:
        return "humaneval"
    if all(any(name in present for name in aliases) for aliases in MBPP_COLUMNS.values()):
        return "mbpp"
    # A shape's own columns with one missing is that shape broken, not raw text: name what is missing.
    if present & {"canonical_solution", "entry_point"}:
        columns_for("humaneval", columns)
    if present & {"test_list", "test_setup_code", "test_imports"}:
        columns_for("mbpp", columns)
    if any(question in present and answer in present for question, answer in INSTRUCTION_PAIRS):
        return "instruction"
    if any(name in present for name in TEXT_COLUMNS):
        return "text"
    raise StageError(
        f"the dataset's columns ({', '.join(columns)}) fit none of the data shapes: mbpp (text, code, test_list), "
        f"humaneval (prompt, canonical_solution, test, entry_point), instruction (instruction, input, output; or "
        f"prompt, response), text (content: one file per row); rename the columns or pass --format"
    )


def columns_for(fmt: str, columns: list[str]) -> dict[str, str | None]:
    """Our field names -> the dataset's columns, for a shape (detected or forced); fails naming what is missing."""
    present = set(columns)

    def first(aliases: list[str], field: str) -> str:
        found = next((name for name in aliases if name in present), None)
        if found is None:
            names = " or ".join(repr(alias) for alias in aliases)
            raise StageError(f"--format {fmt}: the dataset has no {names} column (needed for the {field}); its columns "
                             f"are: {', '.join(columns)}")
        return found

    task_id = "task_id" if "task_id" in present else None
    if fmt == "mbpp":
        found = {field: first(aliases, field) for field, aliases in MBPP_COLUMNS.items()}
        return {**found, "setup": next((n for n in MBPP_SETUP if n in present), None), "task_id": task_id}
    if fmt == "humaneval":
        return {name: first([name], name) for name in sorted(HUMANEVAL_COLUMNS)} | {"task_id": task_id}
    if fmt == "instruction":
        pair = next((p for p in INSTRUCTION_PAIRS if p[0] in present and p[1] in present), None)
        if pair is None:
            raise StageError(f"--format instruction: the dataset needs instruction and output columns (or prompt and "
                             f"response); its columns are: {', '.join(columns)}")
        return {"task": pair[0], "code": pair[1], "input": "input" if "input" in present else None, "task_id": task_id}
    if fmt == "text":
        return {"code": first(TEXT_COLUMNS, "source text"), "task_id": task_id}
    raise StageError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")


def normalize(fmt: str, row: dict, columns: dict, position: int) -> dict:
    """One row as a problem dict (see the module docstring); one line naming the row when a field is unusable."""
    task_id = row.get(columns["task_id"]) if columns["task_id"] else None
    if task_id is None or not str(task_id).strip():
        task_id = f"row-{position}"  # rows without an id get one of their own, never a shared one
    where = f"row {position} (task_id {task_id})"

    def text(field: str, strip: bool = True) -> str:
        value = row[columns[field]]
        if not isinstance(value, str) or not value.strip():
            raise StageError(mixed_shapes(fmt, row, where) or f"{where}: the {field} column {columns[field]!r} is "
                                                              f"empty or not text; fix or remove that row")
        return value

    problem = {"task_id": str(task_id), "task": "", "code": "", "tests": [], "test_setup_code": "", "code_prefix": ""}
    if fmt == "mbpp":
        tests = row[columns["tests"]]
        tests = [tests] if isinstance(tests, str) else tests
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
            raise StageError(mixed_shapes(fmt, row, where)
                             or f"{where}: {columns['tests']!r} must be a non-empty list of assert statements")
        setup = row[columns["setup"]] if columns["setup"] else ""
        setup = "\n".join(setup) if isinstance(setup, list) else setup
        problem.update(task=text("task").strip(), code=text("code").rstrip(), tests=tests, test_setup_code=setup or "")
    elif fmt == "humaneval":
        # The benchmark's definition: the program is prompt + completion, then the test code, then check(entry_point).
        # A "test" that defines check but never calls it passes any answer: the call is what makes it a test.
        prompt, entry_point = text("prompt", strip=False), text("entry_point").strip()
        problem.update(task=prompt, code=text("canonical_solution").rstrip(), code_prefix=prompt,
                       tests=[text("test").rstrip() + f"\n\n\ncheck({entry_point})"])
    elif fmt == "instruction":
        extra = row.get(columns["input"]) if columns["input"] else None
        has_input = isinstance(extra, str) and extra.strip()
        task = text("task").strip() + (f"\n\nInput:\n{extra.strip()}" if has_input else "")
        problem.update(task=task, code=text("code").rstrip())
    else:
        problem.update(code=text("code"))
    return problem


def mixed_shapes(fmt: str, row: dict, where: str) -> str | None:
    """When a row that does not fit the file's shape fits another one, the file mixes shapes (a JSON lines file
    of MBPP and HumanEval rows reads as one table with the columns of both, each row missing the other's)."""
    filled = [column for column, value in row.items() if value not in (None, "", [])]
    try:
        own = detect(filled)
    except StageError:
        return None
    if own == fmt:
        return None
    return (f"{where} has the columns of {own} data ({', '.join(filled)}) in a file of {fmt} rows: one file holds "
            f"one data shape; split the file, or drop the rows of the other shape")


def content_key(problem: dict) -> str:
    """A short hash of what a problem asks (its task text, whitespace aside): the same problem under another id
    (or none) is recognised by it, so that a held-out score never counts a problem the model trained on."""
    asked = problem["task"] or problem["code"]  # raw text asks nothing: its file is what it is
    return hashlib.sha256(" ".join(asked.split()).encode()).hexdigest()[:12]


def prompt_for(fmt: str, problem: dict, template: prompts.Template, tokenizer=None) -> str:
    """The prompt of a problem: MBPP shows its asserts (the `tests` template); HumanEval hides its `check`, and its
    code becomes a request to complete it in a chat turn."""
    tests = problem["tests"] if fmt == "mbpp" else None
    return template.prompt(problem["task"], tests, tokenizer, as_code=prompts.default_for(fmt).continues_code)


def pack_blocks(texts, tokenizer, block: int):
    """Raw text as causal-LM training blocks, numbered block-0, block-1, ...: every file's tokens then EOS, joined
    and cut every `block` tokens (the last block may be shorter), every token trained; nothing padded, and only
    rows that are not text (empty, missing) skipped. Lazy: `texts` may be a stream larger than memory."""
    def token_blocks():
        stream: list[int] = []
        for text in texts:
            if isinstance(text, str) and text.strip():
                stream += prompts.encode_prompt(tokenizer, text) + [tokenizer.eos_token_id]
            while len(stream) >= block:
                yield stream[:block]
                stream = stream[block:]
        if stream:
            yield stream

    for number, ids in enumerate(token_blocks()):
        yield {"task_id": f"block-{number}", "input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids),
               "length": len(ids)}


def as_chat(problem: dict) -> dict:
    """A problem for a chat template: an instruct model answers with the whole function, not a continuation of the
    prompt's code, so a humaneval problem's code moves out of the code prefix. The reference answer is the
    function without the docstring the user turn already shows (the code is carried once); the prompt's imports
    and helpers run before the answer (the prompt is complete Python: its function's docstring body is replaced
    by the answer's own definition), so that an answer is not wrong for leaving out `from typing import List`."""
    prefix = problem["code_prefix"]
    if not prefix:
        return problem
    setup = prefix if prompts.is_python(prefix) else "\n".join(
        line for line in prefix.splitlines() if line.startswith(("import ", "from ")))
    return {**problem, "code": without_docstring(prefix) + problem["code"], "code_prefix": "",
            "test_setup_code": "\n".join(part for part in (problem["test_setup_code"], setup) if part)}


def without_docstring(code: str) -> str:
    """`code` with the docstring of its last function taken out (the whole code when it does not parse)."""
    import ast

    try:
        functions = [node for node in ast.parse(code).body if isinstance(node, ast.FunctionDef)]
    except SyntaxError:
        return code
    body = functions[-1].body if functions else []
    if not (body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)
            and isinstance(body[0].value.value, str)):
        return code
    lines = code.splitlines(keepends=True)
    return "".join(lines[:body[0].lineno - 1] + lines[body[0].end_lineno:])


def program(problem: dict, completion: str) -> tuple[str, list[str], str]:
    """(code, tests, setup) to run for a completion of a problem (see sandbox.build_program)."""
    return problem.get("code_prefix", "") + completion, problem["tests"], problem.get("test_setup_code", "")


# ----------------------------------------------------------------------------------------------------------
# prepared_data/: its settings, its fingerprint, a streamed source, batches.


def held_out_problems(data_dir: str, split: str = "eval", limit: int | None = None) -> list[dict]:
    """The problems of a split of prepared_data/ as evaluate.py scores them: task, tests, reference and setup."""
    from datasets import load_from_disk

    folders.require_dataset_dir(data_dir, "prepare_data.py")
    splits = load_from_disk(data_dir)
    if split not in splits:
        raise StageError(f"{data_dir}/ has no {split!r} split (it has: {', '.join(splits)})")
    wanted = ["task_id", "task", "code", "tests", "test_setup_code", "code_prefix"]
    rows = splits[split].select_columns([name for name in wanted if name in splits[split].column_names])
    problems = [{"code_prefix": "", **row} for row in rows]  # data prepared before code_prefix existed has none
    return problems[:limit] if limit else problems


def data_fingerprint(task_ids: dict[str, list[str]], settings: dict) -> str:
    """What prepared data is: which problems are in which split, and how they were tokenized. Recorded in
    stats.json, the run settings and every checkpoint; a resume onto other data is refused."""
    keys = ("template", "max_length", "tokenizer")
    text = json.dumps({"task_ids": task_ids, **{key: settings.get(key) for key in keys}}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepared_stats(data_dir: str | Path) -> dict:
    """prepared_data/'s stats.json: its settings (template, max_length, model, tokenizer), splits and fingerprint."""
    path = Path(data_dir) / folders.PREPARED_STATS
    if not path.is_file():
        raise StageError(f"{data_dir}/ has no {folders.PREPARED_STATS}: run prepare_data.py again")
    return folders.read_json(path)


def prepared_settings(data_dir: str | Path) -> dict:
    """The settings prepared_data/ was made with (template, max_length, model, ...)."""
    return prepared_stats(data_dir)["settings"]


def prepared_format(settings: dict) -> str:
    """The data shape prepared data holds (its settings in stats.json); data prepared before the shapes existed is
    MBPP."""
    return settings.get("format", "mbpp")


def is_prepared(data_dir: str | Path) -> bool:
    return folders.is_saved_dataset(data_dir) and (Path(data_dir) / folders.PREPARED_STATS).is_file()


def open_stream(info: dict):
    """The rows of a dataset that download_dataset.py --streaming recorded (`info`: its download_info.json), read
    lazily with datasets' streaming: a Hub dataset or a local file larger than memory, never held whole."""
    from datasets import load_dataset

    try:
        if info["source"] == "hub":
            return load_dataset(info["dataset"], info.get("config"), revision=info.get("revision"), split="train",
                                streaming=True)
        return load_dataset(info["builder"], data_files=info["dataset"], split="train", streaming=True)
    except Exception as error:
        raise StageError(f"cannot stream {info['dataset']}: {short_error(error)}", EXIT_FAILED) from None


def padding_share(batches: list[list[int]], pad_to: int | None = None) -> float:
    """Share of padding among the tokens of `batches` (lists of example lengths), each padded to its longest
    example, or to `pad_to` tokens."""
    padded = sum((pad_to or max(lengths)) * len(lengths) for lengths in batches)
    return 1 - sum(map(sum, batches)) / max(1, padded)


def pad_batch(features: list[dict], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict:
    """Right-pad a list of examples to the longest one (dynamic padding); pads get label -100 and mask 0."""
    import torch

    longest = max(len(f["input_ids"]) for f in features)
    longest = math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        pad = longest - len(f["input_ids"])
        batch["input_ids"].append(list(f["input_ids"]) + [pad_token_id] * pad)
        batch["attention_mask"].append(list(f["attention_mask"]) + [0] * pad)
        batch["labels"].append(list(f["labels"]) + [prompts.IGNORE_INDEX] * pad)
    return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
