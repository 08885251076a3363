"""Stage 1: download the base model and its tokenizer (or build the offline demo model).

Run:
    python download_model.py                      # Qwen/Qwen2.5-Coder-0.5B from the Hugging Face Hub
    python download_model.py --model-id ./my-local-model
    python download_model.py --model-id ~/models/SmolLM2-135M-Instruct.Q4_1.gguf   # a GGUF file (Ollama, LM Studio)
    python download_model.py --demo               # tiny random Qwen2 model, offline, in seconds

Reads:  the Hugging Face Hub, a local model folder, a GGUF file, or (with --demo) assets/demo_problems.jsonl
Writes: model/ (config.json, *.safetensors, tokenizer files, download_info.json)
Needs:  pipeline/ (cli, folders, models, platforms, prompts); assets/demo_problems.jsonl (--demo: the demo tokenizer
        is trained on it)
Next:   download_dataset.py

Only .safetensors weights are fetched (no pickled .bin files), and no remote code is trusted: Qwen2 is native
in transformers. An interrupted download resumes where it stopped: partial files are kept in .model.partial/
until the download is complete, then the folder is renamed to model/. A GGUF file (or a folder holding one) is
read by transformers (the `gguf` package): its weights dequantised and saved as bfloat16 safetensors, its tokenizer
and chat template as tokenizer files; 4-bit NF4 training rounds far more than bfloat16 does.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import sys
from pathlib import Path

from pipeline import cli, folders, models, prompts
from pipeline.cli import StageError

DEFAULT_MODEL_ID = "Qwen/Qwen2.5-Coder-0.5B"
GGUF = ".gguf"
# Files a model folder needs; weights are .safetensors only.
# *.jinja: chat templates
ALLOWED_PATTERNS = ["*.json", "*.safetensors", "*.txt", "tokenizer*", "*.model", "*.tiktoken", "*.jinja"]

# The demo model: Qwen2 architecture, small enough to train on a laptop CPU in seconds.
DEMO_MODEL_IDS = {"qwen2": "demo/tiny-qwen2", "qwen2-instruct": "demo/tiny-qwen2-instruct", "llama": "demo/tiny-llama",
                  "gpt2": "demo/tiny-gpt2"}
DEMO_VOCAB_SIZE = 1024
DEMO_HIDDEN = 128
DEMO_LAYERS = 4
# Weights drawn with std 0.06 instead of transformers' 0.02: at 0.02 a 4-layer model's attention is nearly
# uniform, and LoRA alone takes far longer than the demo's minute to learn to read a name off the prompt. The
# embedding is scaled x2 on top (std 0.12) so the tied output layer has real range: logits within about ±3 are too
# flat for a model that may only train LoRA adapters to become confident. Measured with run_pipeline.py --demo:
# std 0.02 and the embedding x6 solves 0 of the 4 held-out members of the string family; std 0.06 and x2 solves
# 13 of 13 over seeds 42, 1, 2 and 3 (and none of the unrelated held-out problems), and starts from a loss near
# ln(vocabulary), not 12-19. Still random: the base model solves nothing.
DEMO_INIT_STD = 0.06
DEMO_EMBEDDING_SCALE = 2.0
EOS_TOKEN = "<|endoftext|>"  # Qwen's EOS, and its pad token; GPT-2's BOS and EOS
LLAMA_BOS, LLAMA_EOS = "<|begin_of_text|>", "<|end_of_text|>"  # Llama 3's
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # ChatML turns, as Qwen2.5-Instruct and SmolLM2-Instruct
# Qwen2.5-Instruct's chat template, without its tool-calling branches.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(__doc__)
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID,
                        help="Hub model id, a local model folder, or a .gguf file (default: %(default)s)")
    parser.add_argument("--revision", default="main", help="branch, tag or commit on the Hub (default: %(default)s)")
    parser.add_argument("--out", default=folders.MODEL_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace a complete model folder instead of skipping")
    parser.add_argument("--demo", action="store_true", help="write the tiny offline demo model instead (no download)")
    parser.add_argument("--demo-family", choices=sorted(DEMO_MODEL_IDS), default="qwen2",
                        help="architecture and tokenizer kind of the demo model (default: %(default)s, as "
                             "Qwen2.5-Coder)")
    return parser



@cli.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    source = check(args)
    return 0 if source is None else run(args, *source)


def check(args) -> tuple[str, Path | None] | None:
    """What to write into --out: the model id and, for a local model, the folder to copy or the GGUF file to
    convert; None when --out already holds it (the stage skips). Refuses, naming --force, when --out holds another
    model or an incomplete folder."""
    out = Path(args.out)
    model_id = DEMO_MODEL_IDS[args.demo_family] if args.demo else args.model_id
    local_source = None if args.demo else Path(args.model_id).expanduser()
    if local_source is not None and not local_source.exists():
        if args.model_id.startswith((".", "/", "~")) or args.model_id.count("/") > 1 \
                or args.model_id.lower().endswith(GGUF):
            raise StageError(f"local model {args.model_id} not found")
        local_source = None
    if local_source is not None:
        local_source = gguf_file(local_source) or local_source
        model_id = str(local_source.resolve())
        if is_gguf(local_source) and not is_gguf_magic(local_source):
            raise StageError(f"{local_source} is not a GGUF file (it does not start with GGUF's magic bytes): give a "
                             f".gguf model file")

    if folders.out_problem(out, "download_model"):
        raise StageError(folders.out_problem(out, "download_model"))
    complete = out.is_dir() and model_folder_complete(out)
    held = folders.download_info(out) if complete else {}
    same = held.get("model_id") == model_id
    same_revision = args.demo or local_source is not None or held.get("revision") == args.revision
    if same and local_source is not None and is_gguf(local_source):
        same = held.get("file_fingerprint") == folders.file_fingerprint(local_source)  # the same path, another file
    force = args.force
    if args.demo and same and held.get("recipe") != demo_recipe(args.demo_family):
        print(f"{out}/ holds a demo model made from older demo problems or settings: building it again")
        force = True  # generated from the project's own files: nothing of the user's is replaced
    if folders.skip_download(out, force, complete, held.get("model_id"), same and same_revision, model_id, "model"):
        return None
    return model_id, local_source


def gguf_file(source: Path) -> Path | None:
    """The GGUF file to convert: `source` itself, or the only .gguf in a folder without a config.json; None for
    a model folder (or a folder that is neither: the model-folder check names what it lacks). A folder with several
    GGUF files is refused, naming them."""
    if source.is_file():
        if not is_gguf(source):
            raise StageError(f"--model-id {source}: a file must be a .gguf model; otherwise give a model folder")
        return source
    if (source / "config.json").is_file():
        return None
    found = sorted(path for path in source.iterdir() if is_gguf(path))
    if len(found) > 1:
        raise StageError(f"{source}/ holds {len(found)} GGUF files ({', '.join(f.name for f in found[:4])}): pass "
                         f"the one to use with --model-id {source}/<file>.gguf")
    return found[0] if found else None


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == GGUF  # .gguf or .GGUF, a file and not a folder so named


def is_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def gguf_problem(path: Path) -> str | None:
    """Why a GGUF file cannot be read when the file itself is at fault (damaged, cut short by an interrupted
    download), or None: asked after transformers failed to read it (a full read takes seconds: not on the way of
    every conversion)."""
    from gguf import GGUFReader

    size = path.stat().st_size
    try:
        end = max((tensor.data_offset + int(tensor.n_bytes) for tensor in GGUFReader(str(path)).tensors), default=0)
    except Exception as error:  # a header or tensor table the reader cannot parse: the file is damaged or short
        return (f"{path} is damaged or incomplete ({size:,} bytes; {cli.short_error(error, 80)}): an interrupted "
                f"download or copy? Get the file again")
    if end > size:
        return f"{path} is cut short ({size:,} of {end:,} bytes): an interrupted download? Get the file again"
    return None


def run(args, model_id: str, local_source: Path | None) -> int:
    out = Path(args.out)
    models.quiet_libraries()
    if args.demo:
        tokenizer = build_demo_tokenizer(args.demo_family)  # before the output folder exists: Ctrl-C leaves nothing
        with folders.atomic_output_dir(out, "download_model") as tmp:
            build_demo_model(tmp, tokenizer, args.demo_family)
    elif local_source is not None and is_gguf(local_source):
        with folders.atomic_output_dir(out, "download_model") as tmp:
            convert_gguf(local_source, tmp)
    elif local_source is not None:
        with folders.atomic_output_dir(out, "download_model") as tmp:
            copy_local_model(local_source, tmp)
    else:
        folders.replace_dir(download_from_hub(args.model_id, args.revision, out), out)

    size_mb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
    print(f"✓ {model_id} saved in {out}/ ({size_mb:.1f} MB of safetensors weights)")
    print("next: python download_dataset.py" + (" --demo" if args.demo else ""))
    return 0


# ----------------------------------------------------------------------------------------------------------
# A complete, loadable model folder


def model_folder_complete(path: Path) -> bool:
    return models.model_folder_problem(path) is None and (path / folders.DOWNLOAD_INFO).is_file()


def check_loads(path: Path) -> None:
    """Fail before the rename if the config or tokenizer in `path` cannot be loaded."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(path))
        models.load_tokenizer(path)
    except StageError:
        raise
    except Exception as error:  # a corrupt or incompatible file from the source
        raise StageError(f"the downloaded model does not load: {cli.short_error(error)}", cli.EXIT_FAILED) from None


# ----------------------------------------------------------------------------------------------------------
# From the Hub or a local folder


def download_from_hub(model_id: str, revision: str, out: Path) -> Path:
    """Download into a partial folder next to `out` and return it once complete and loadable."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import enable_progress_bars

    try:
        # Asking for the repository's info first fails in milliseconds when offline, and tells an unknown id
        # apart from a network problem.
        info = HfApi().model_info(model_id, revision=revision, files_metadata=True)
    except Exception as error:
        raise StageError(cli.hub_error_message(error, model_id), cli.EXIT_FAILED) from None
    files = [s.rfilename for s in info.siblings or []]
    if not any(name.endswith(".safetensors") for name in files):
        raise StageError(f"{model_id} has no .safetensors weights; this pipeline does not load pickled .bin files")

    # Partial downloads live here between attempts so that a rerun resumes instead of starting over.
    partial = out.with_name(f".{out.name}.partial")
    wanted = [s for s in info.siblings or [] if any(fnmatch.fnmatch(s.rfilename, p) for p in ALLOWED_PATTERNS)]
    have = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file()) if partial.exists() else 0
    folders.check_free_space(out.parent, sum(s.size or 0 for s in wanted) - have, f"downloading {model_id}")
    print(f"downloading {model_id} @ {info.sha[:10]} into {partial}/ (resumable)")
    enable_progress_bars()  # quiet_libraries() turned them off with transformers' bars: a 1 GB download needs one
    try:
        snapshot_download(model_id, revision=info.sha, allow_patterns=ALLOWED_PATTERNS, local_dir=str(partial))
    except Exception as error:
        raise StageError(
            cli.hub_error_message(error, model_id) + f"; rerun to resume ({partial}/ keeps what was downloaded)",
            cli.EXIT_FAILED,
        ) from None
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's resume metadata
    check_loads(partial)
    folders.write_json(partial / folders.DOWNLOAD_INFO,
                       {"source": "hub", "model_id": model_id, "revision": revision, "commit": info.sha})
    folders.mark_owner(partial, "download_model")
    return partial


def copy_local_model(source: Path, destination: Path) -> None:
    problem = models.model_folder_problem(source, remedy=False)  # the fix is another source, not --force on this one
    if problem:
        raise StageError(f"cannot copy {source}/: {problem}; point --model-id at a complete model folder")
    for pattern in ALLOWED_PATTERNS:
        for file in source.glob(pattern):
            if file.is_file() and file.name not in (folders.DOWNLOAD_INFO, folders.OWNER):
                shutil.copy2(file, destination / file.name)
    check_loads(destination)
    folders.write_json(destination / folders.DOWNLOAD_INFO, {"source": "local", "model_id": str(source.resolve())})


def convert_gguf(source: Path, destination: Path) -> None:
    """A GGUF file as a plain model folder: transformers dequantises its weights (saved here as bfloat16
    safetensors) and rebuilds its tokenizer, special tokens and chat template from its metadata."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"reading {source} (GGUF: dequantising every tensor; a minute for a 0.5B model)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    except ImportError as error:
        raise StageError(f"reading a GGUF file needs the gguf package ({cli.short_error(error, 80)}): pip install -r "
                         f"requirements.txt") from None
    except Exception as error:  # a damaged file, or an architecture or quantisation transformers lacks
        problem = gguf_problem(source)
        if problem:
            raise StageError(problem) from None
        raise StageError(f"transformers cannot read {source} ({cli.short_error(error, 160)}): it reads GGUF files of "
                         f"the architectures and quantisations listed at "
                         f"https://huggingface.co/docs/transformers/gguf", cli.EXIT_FAILED) from None
    folders.check_free_space(destination, 2 * sum(p.numel() for p in model.parameters()), f"converting {source}")
    # Dequantised on loading: a plain model now, though transformers still marks it "quantised with gguf" (and
    # refuses to save it so).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16).save_pretrained(str(destination))
    tokenizer.save_pretrained(str(destination))
    check_loads(destination)
    folders.write_json(destination / folders.DOWNLOAD_INFO, {
        "source": "gguf", "model_id": str(source.resolve()), "file_fingerprint": folders.file_fingerprint(source),
        "saved_dtype": "bfloat16", "chat_template": bool(getattr(tokenizer, "chat_template", None))})


# ----------------------------------------------------------------------------------------------------------
# The offline demo model


def demo_corpus() -> list[str]:
    """Texts to train the demo tokenizer on: the bundled problems in every prompt template."""
    corpus = []
    with open(folders.DEMO_PROBLEMS, encoding="utf-8") as f:
        for line in f:
            problem = json.loads(line)
            # a fixed pair: the demo tokenizer must not change when a template is added
            for template in (prompts.GUIDE, prompts.TESTS):
                prompt = template.prompt(problem["text"], problem["test_list"])
                corpus.append(prompt + problem["code"])
    return corpus


def build_demo_tokenizer(family: str = "qwen2"):
    """A byte-level BPE tokenizer trained on the bundled problems, with the special tokens of the family's own:
    qwen2: no BOS, EOS <|endoftext|> doubling as pad; qwen2-instruct: the same plus ChatML turns <|im_start|> and
    <|im_end|> and a chat template (as Qwen2.5-Coder's tokenizer); llama: <|begin_of_text|> added before every text (as
    Llama 3), EOS <|end_of_text|>, no pad; gpt2: <|endoftext|> as BOS and EOS, nothing added, no pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {"qwen2": [EOS_TOKEN], "qwen2-instruct": [EOS_TOKEN, IM_START, IM_END], "llama": [LLAMA_BOS, LLAMA_EOS],
                "gpt2": [EOS_TOKEN]}[family]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=DEMO_VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tokenizer.train_from_iterator(demo_corpus(), trainer)
    if family == "llama":
        bos_id = tokenizer.token_to_id(LLAMA_BOS)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{LLAMA_BOS} $A", pair=f"{LLAMA_BOS} $A {LLAMA_BOS} $B", special_tokens=[(LLAMA_BOS, bos_id)])
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=LLAMA_BOS, eos_token=LLAMA_EOS)
    if family == "gpt2":
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                       unk_token=EOS_TOKEN)
    if family == "qwen2-instruct":
        # EOS stays <|endoftext|>, as in Qwen2.5-Coder's own tokenizer: a chat answer must end with <|im_end|>,
        # a different token, which is what --template chat trains and stops on.
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                       additional_special_tokens=[IM_START, IM_END], chat_template=CHATML_TEMPLATE)
    # Like Qwen: no BOS, and the pad token is the EOS token.
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def demo_config(family: str, tokenizer):
    """A 4-layer, 128-wide model of the family. No pad_token_id: nn.Embedding(padding_idx=...) would zero that
    row, and where the pad is the EOS (Qwen) the model could then never predict EOS. Padding is handled by
    attention masks and -100 labels instead."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    size = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    if family == "gpt2":  # tied embedding, learned positions, Conv1D projections c_attn, c_proj, c_fc
        return GPT2Config(n_embd=DEMO_HIDDEN, n_layer=DEMO_LAYERS, n_head=4, n_positions=1024,
                          initializer_range=DEMO_INIT_STD, bos_token_id=tokenizer.bos_token_id, **size)
    kind = LlamaConfig if family == "llama" else Qwen2Config
    return kind(hidden_size=DEMO_HIDDEN, intermediate_size=4 * DEMO_HIDDEN, num_hidden_layers=DEMO_LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                initializer_range=DEMO_INIT_STD,
                # tied as in Qwen2.5-Coder-0.5B (and Llama 3.2-1B); untied as in Llama-3 8B
                tie_word_embeddings=family != "llama",
                bos_token_id=tokenizer.bos_token_id, **size)


def build_demo_model(out: Path, tokenizer, family: str = "qwen2", seed: int = 0) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(demo_config(family, tokenizer))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(DEMO_EMBEDDING_SCALE)
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            model.get_output_embeddings().weight.mul_(DEMO_EMBEDDING_SCALE)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    folders.write_json(out / folders.DOWNLOAD_INFO, {"source": "demo", "model_id": DEMO_MODEL_IDS[family], "seed": seed,
                                                   "recipe": demo_recipe(family, seed)})


def demo_recipe(family: str, seed: int = 0) -> str:
    """What a demo model is made from (the bundled problems its tokenizer learns, its shape and initialisation):
    a model/ made by an older version of this file is rebuilt, not reused."""
    shape = (family, seed, DEMO_VOCAB_SIZE, DEMO_HIDDEN, DEMO_LAYERS, DEMO_INIT_STD, DEMO_EMBEDDING_SCALE)
    return folders.file_fingerprint(folders.DEMO_PROBLEMS, *shape)


if __name__ == "__main__":
    sys.exit(main())
