"""What every stage shares: the facts (folders, file names, the prompt template), the command-line conventions
(one-line errors, flag types), safe folder writes, and loading a model folder on the right device.

Needs:  nothing else from this project. Every stage imports it; nothing heavy (torch, transformers) is imported
at module level, so `python stage.py --help` is instant and tests can import the pure functions cheaply.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

# ----------------------------------------------------------------------------------------------------------
# Defaults shared by several stages

MODEL_DIR = "model"
DATA_DIR = "data"
PREPARED_DIR = "prepared_data"
CHECKPOINTS_DIR = "checkpoints"
RESULTS_DIR = "results"
EXPORT_DIR = "export"
FINAL_ADAPTER = "final"  # checkpoints/final/

REPO_ROOT = Path(__file__).resolve().parent
DEMO_PROBLEMS = REPO_ROOT / "assets" / "demo_problems.jsonl"

IGNORE_INDEX = -100  # label value that the loss skips (PyTorch's cross_entropy default ignore_index)
GIB = 2**30

# Files written beside artifacts so that later stages reuse the settings that made them.
DOWNLOAD_INFO = "download_info.json"  # in model/ and data/: where they came from
PREPARED_STATS = "stats.json"  # in prepared_data/: its settings (template, max length, model) and counts
RUN_SETTINGS = "run_settings.json"  # in checkpoints/: the settings of the run that owns the folder
TRAINING_SETTINGS = "training_settings.json"  # in checkpoints/final/ and every checkpoint-N/: what made the adapter
EXPORT_SETTINGS = "export_settings.json"  # in export/: the template, base model and adapter of a merged model
ADAPTER_CONFIG = "adapter_config.json"  # peft's files in an adapter folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")  # any one of them

# ----------------------------------------------------------------------------------------------------------
# The prompt template: the only place it is written down.
#
# `guide` is the original guide's format. `tests` also shows the problem's assert statements, as the MBPP
# paper's prompt does: MBPP task texts rarely name the function that the asserts call, so a model that never
# sees the asserts cannot know the expected name and signature.

TEMPLATES = {
    "guide": "Task: {task}\nSolution:\n",
    "tests": "Task: {task}\nYour code should pass these tests:\n{tests}\nSolution:\n",
    "code": "{task}",  # the task is code to continue, as HumanEval defines its prompts
    "none": "{task}",  # raw text: trained without a prompt, every token; at inference the text given is continued
    # `chat`: the task as a user turn rendered by the tokenizer's own chat template (instruct models); the user
    # turn is CHAT_USER, the answer is the assistant turn, ended by the template's end-of-turn token.
    "chat": None,
}
DEFAULT_TEMPLATE = "tests"
CHAT_USER = {"guide": "{task}", "tests": "{task}\nYour code should pass these tests:\n{tests}"}
CHAT_CODE_TASK = "Complete the following Python function:\n```python\n{code}```"  # humaneval prompts as a user turn


def format_prompt(template: str, task: str, tests: list[str] | None = None, tokenizer=None) -> str:
    """The prompt part of an example: everything before the solution. `chat` needs the tokenizer."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    shown = "\n".join(t.strip() for t in tests or [])
    if template == "chat":
        user = CHAT_USER["tests" if tests else "guide"].format(task=task.strip(), tests=shown)
        return render_chat(tokenizer, user)
    if template == "tests" and not tests:
        template = "guide"  # a task typed by hand comes without asserts: nothing to show
    task = task if template in ("code", "none") else task.strip()  # code keeps its indentation and final newline
    return TEMPLATES[template].format(task=task, tests=shown)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, user: str, answer: str | None = None) -> str:
    """The conversation as text: the user turn then the assistant's opening (or, with `answer`, its whole turn)."""
    if tokenizer is None or not has_chat_template(tokenizer):
        raise StageError("--template chat needs a tokenizer with a chat template (an instruct model's); this model has "
                         "none: use --template tests")
    messages = [{"role": "user", "content": user}] + ([{"role": "assistant", "content": answer}] if answer is not None else [])
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn in the tokenizer's chat template (<|im_end|> for ChatML models,
    <|eot_id|> for Llama 3): what a chat answer is trained to end with and where its generation stops."""
    marker = "ANSWER-7f3c"
    prompt, whole = render_chat(tokenizer, "x"), render_chat(tokenizer, "x", marker)
    after = whole[whole.rindex(marker) + len(marker):] if whole.startswith(prompt) and marker in whole else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    return ids[0] if ids else tokenizer.eos_token_id


def encode_example(tokenizer, prompt: str, solution: str, end_id: int | None = None) -> dict:
    """Token ids and labels for one training example: prompt + solution + EOS (or `end_id`, a chat template's
    end-of-turn), prompt masked.

    The prompt and the solution are tokenized separately so that the boundary is exactly where generation
    will start from the same prompt. Labels are masked by *position*, never by token id: Qwen's pad token is
    its EOS token, and masking pads by id would also mask the EOS the model must learn to stop.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    solution_ids = tokenizer(solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id if end_id is None else end_id]
    input_ids = prompt_ids + solution_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(solution_ids)
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids as training saw them: with the BOS where the tokenizer adds one (Llama; Qwen and GPT-2 add none)
    unless the text already starts with it (a rendered chat template does), and never an EOS that some
    tokenizers append to every text, which would end the prompt before the answer."""
    bos = getattr(tokenizer, "bos_token", None)
    ids = tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(str(bos))))["input_ids"]
    if len(ids) > 1 and ids[-1] == tokenizer.eos_token_id and not prompt.endswith(str(getattr(tokenizer, "eos_token", ""))):
        ids = ids[:-1]
    return ids


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
        batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
    return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


# ----------------------------------------------------------------------------------------------------------
# Errors: a user's mistake gets one clear line and a non-zero exit, never a traceback.

EXIT_FAILED = 1  # the run failed (network, training error)
EXIT_USAGE = 2  # bad flags, missing or wrong input folders


class StageError(Exception):
    """A problem the user can fix; its message is printed as one line."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


def report_errors(stage_main):
    """Decorator for `main`: turns StageError and Ctrl-C into one line on stderr and an exit code."""

    def wrapper(argv=None) -> int:
        try:
            return stage_main(argv)
        except StageError as error:
            print(f"error: {error}", file=sys.stderr)
            return error.exit_code
        except KeyboardInterrupt:
            print("interrupted: anything half-written was discarded; earlier complete output is kept", file=sys.stderr)
            return 130
        except BrokenPipeError:
            # Output piped into `head` or a closed pager: stop quietly, as command-line tools do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_FAILED
        except PermissionError as error:
            print(f"error: permission denied: {error.filename}: choose a folder you can write to (--out), or fix its "
                  f"permissions; earlier complete output is kept", file=sys.stderr)
            return EXIT_FAILED
        except OSError as error:  # a full disk, a vanished folder: the system's own words, on one line
            print(f"error: {error.strerror or short_error(error)}: {error.filename or ''}; earlier complete output is kept",
                  file=sys.stderr)
            return EXIT_FAILED

    wrapper.__name__ = stage_main.__name__
    wrapper.__doc__ = stage_main.__doc__
    return wrapper


def short_error(error: BaseException, limit: int = 200) -> str:
    """First line of an exception's message (or its type name when it has none), for one-line reports."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


def fail_on_problems(problems: list[str]) -> None:
    """Report every problem at once (one line each) rather than the first only."""
    if problems:
        for problem in problems[:-1]:
            print(f"error: {problem}", file=sys.stderr)
        raise StageError(problems[-1])


def positive(kind):
    """argparse type: a number > 0 (batch sizes, learning rates, steps)."""

    def parse(text: str):
        import argparse

        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


# ----------------------------------------------------------------------------------------------------------
# Folders: checks with a message that names the stage to run first, and atomic writes.


def model_folder_problem(path: str | Path, remedy: bool = True) -> str | None:
    """Why `path` is not a model folder the stages can use, or None; with `remedy`, followed by the
    download_model.py command that rewrites it (not for a folder that is only a source to copy from)."""
    path = Path(path)
    refresh = f"run download_model.py --force --out {path}"
    if not path.is_dir():
        problem, fix = f"model folder {path}/ not found", "run download_model.py first (or --demo for the offline demo)"
    elif not (path / "config.json").is_file():
        hint = " (it looks like a dataset folder)" if (path / "dataset_dict.json").exists() else ""
        problem, fix = f"{path}/ has no config.json{hint}: it is not a model folder", f"run download_model.py --out {path}"
    elif not any(path.glob("*.safetensors")):
        problem, fix = f"{path}/ has no .safetensors weights", refresh
    elif not any((path / name).is_file() for name in TOKENIZER_FILES):
        problem, fix = f"{path}/ has no tokenizer files ({', '.join(TOKENIZER_FILES)})", refresh
    else:
        problem, fix = config_or_weights_problem(path), refresh
    if problem is None:
        return None
    return f"{problem}: {fix}" if remedy else problem


def config_or_weights_problem(path: Path) -> str | None:
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        return f"{path}/config.json is not valid JSON ({short_error(error, 80)})"
    for weights in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            return f"{weights} is damaged ({problem})"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be read to the end (a truncated download, say), from its header alone."""
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if not 0 < header_size <= 100 * 2**20:
                return "no safetensors header"
            header = json.loads(f.read(header_size))
    except (ValueError, OSError) as error:
        return f"unreadable header: {short_error(error, 80)}"
    end = max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"), default=0)
    size = path.stat().st_size - 8 - header_size
    return None if size >= end else f"{size:,} of {end:,} bytes of tensor data"


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """A short hash of the tokenizer files of a model folder: data tokenized with another tokenizer is refused."""
    digest = hashlib.sha256()
    for name in (*TOKENIZER_FILES, "merges.txt"):
        file = Path(model_dir) / name
        if file.is_file() and name != "tokenizer_config.json":  # the config is rewritten on every save
            digest.update(name.encode() + file.read_bytes())
    return digest.hexdigest()[:16]


def file_fingerprint(path: str | Path, *extra: object) -> str:
    """A short hash of a file's bytes (and of `extra` settings): a copy made from an older version is noticed."""
    digest = hashlib.sha256(repr(extra).encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def require_model_dir(path: str | Path) -> Path:
    problem = model_folder_problem(path)
    if problem:
        raise StageError(problem)
    return Path(path)


def require_dataset_dir(path: str | Path, stage_hint: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise StageError(f"{path}/ not found: run {stage_hint} first")
    if not (path / "dataset_dict.json").is_file():
        raise StageError(f"{path}/ is not a saved dataset (no dataset_dict.json): run {stage_hint} first")
    return path


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


def model_id(model_dir: str | Path) -> str:
    """The model a folder holds: its Hub id (from download_info.json), else the folder's absolute path."""
    return download_info(model_dir).get("model_id") or str(Path(model_dir).resolve())


def download_info(folder: str | Path) -> dict:
    """What download_model.py or download_dataset.py recorded of where a folder came from ({} if nothing)."""
    info = Path(folder) / DOWNLOAD_INFO
    return read_json(info) if info.is_file() else {}


def data_fingerprint(task_ids: dict[str, list[str]], settings: dict) -> str:
    """What prepared data is: which problems are in which split, and how they were tokenized. Recorded in
    stats.json, the run settings and every checkpoint; a resume onto other data is refused."""
    keys = ("template", "max_length", "tokenizer")
    text = json.dumps({"task_ids": task_ids, **{key: settings.get(key) for key in keys}}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepared_stats(data_dir: str | Path) -> dict:
    """prepared_data/'s stats.json: its settings (template, max_length, model, tokenizer), splits and fingerprint."""
    path = Path(data_dir) / PREPARED_STATS
    if not path.is_file():
        raise StageError(f"{data_dir}/ has no {PREPARED_STATS}: run prepare_data.py again")
    return read_json(path)


def prepared_settings(data_dir: str | Path) -> dict:
    """The settings prepared_data/ was made with (template, max_length, model, ...)."""
    return prepared_stats(data_dir)["settings"]


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


def skip_download(out: Path, force: bool, complete: bool, holds: str | None, same: bool, wanted: str, kind: str) -> bool:
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


def hub_error_message(error: Exception, what: str) -> str:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(error, GatedRepoError):
        return f"{what} is gated: accept its licence on huggingface.co and run `hf auth login`"
    if isinstance(error, RepositoryNotFoundError):
        return f"{what} was not found on the Hugging Face Hub: check the spelling (for example Qwen/Qwen2.5-Coder-0.5B)"
    if isinstance(error, RevisionNotFoundError):
        return f"{what}: revision not found; check --revision"
    return (
        f"cannot reach the Hugging Face Hub for {what} ({type(error).__name__}): check your internet connection "
        f"or proxy, pass a local folder instead, or use --demo to run offline"
    )


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


# ----------------------------------------------------------------------------------------------------------
# Device and dtype: decided in one place, with the reason printed.


@dataclass
class DeviceChoice:
    device: str  # "cuda", "mps" or "cpu"
    dtype_name: str  # compute dtype: "bfloat16", "float16" or "float32"
    reason: str

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.dtype_name)


def pick_device() -> DeviceChoice:
    """CUDA > MPS > CPU; bf16 where the GPU supports it, else fp16; fp32 on CPU."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        if torch.cuda.is_bf16_supported():
            return DeviceChoice("cuda", "bfloat16", f"CUDA {name}, compute capability {major}.{minor}: bf16")
        return DeviceChoice("cuda", "float16", f"CUDA {name}, compute capability {major}.{minor}: no bf16, using fp16")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return DeviceChoice("mps", "float16", "Apple MPS: fp16 (bitsandbytes 4-bit is not available on MPS)")
    return DeviceChoice("cpu", "float32", "no CUDA or MPS device found: CPU with fp32 compute (slow, fine for the demo)")


def quiet_libraries() -> None:
    """Silence library chatter that is not actionable for a user of this pipeline."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MPLCONFIGDIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "mplconfig"))
    import logging

    # bitsandbytes looks for optional CPU kernels on the Hub and logs when it cannot fetch them.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*use_cache=True.*is incompatible with gradient checkpointing.*")
    warnings.filterwarnings("ignore", message=".*torch.utils.checkpoint.*use_reentrant.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated.*")
    # peft's prepare_model_for_kbit_training still calls the old name; transformers 5 warns on every run.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*is deprecated.*", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the "Loading weights" bars of a model that loads in a second


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as error:  # a damaged or foreign tokenizer file
        raise StageError(f"the tokenizer in {model_dir}/ does not load ({short_error(error, 120)}): run download_model.py --force") from None
    vocab_size = read_json(Path(model_dir) / "config.json").get("vocab_size")
    if vocab_size and len(tokenizer) > vocab_size:
        raise StageError(f"the tokenizer in {model_dir}/ has {len(tokenizer):,} tokens but the model's embedding only "
                         f"{vocab_size:,}: they belong to different models; run download_model.py --force")
    if tokenizer.eos_token_id is None:
        raise StageError(f"the tokenizer in {model_dir}/ has no EOS token: the model could never learn to stop")
    if tokenizer.pad_token_id is None:
        # Padding positions are masked by the attention mask and labels (-100), so any id works; EOS is the
        # usual choice and is what Qwen itself uses.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def open_stream(info: dict):
    """The rows of a dataset that download_dataset.py --streaming recorded (`info`: its download_info.json), read
    lazily with datasets' streaming: a Hub dataset or a local file larger than memory, never held whole."""
    from datasets import load_dataset

    try:
        if info["source"] == "hub":
            return load_dataset(info["dataset"], info.get("config"), revision=info.get("revision"), split="train", streaming=True)
        return load_dataset(info["builder"], data_files=info["dataset"], split="train", streaming=True)
    except Exception as error:
        raise StageError(f"cannot stream {info['dataset']}: {short_error(error)}", EXIT_FAILED) from None


def load_model(model_dir: str | Path, choice: DeviceChoice, load_in_4bit: bool):
    """The base model as every stage loads it: 4-bit NF4 with double quantisation, or plain in the compute dtype."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # Each process of a multi-GPU run (torchrun, accelerate) loads its own copy on its own GPU.
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if choice.device == "cuda" else choice.device
    kwargs = {"dtype": choice.dtype}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=choice.dtype,
        )
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if not load_in_4bit:
        model.to(device)
    if torch.cuda.is_available() and choice.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return model


def use_4bit(choice: DeviceChoice, no_4bit: bool, say=print) -> bool:
    """Whether to load the base model in 4-bit: unless --no-4bit, wherever bitsandbytes runs (CUDA and CPU)."""
    if no_4bit:
        return False
    if choice.device not in ("cuda", "cpu"):
        say(f"note: bitsandbytes 4-bit does not run on {choice.device}: loading the model unquantised")
        return False
    return True
