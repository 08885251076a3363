"""Models: which device and dtype (decided in one place, with the reason printed), loading a model folder and its
tokenizer the way every stage loads them, and checking a model folder before anything heavy happens.

Nothing heavy is imported at module level.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from pipeline import folders
from pipeline.cli import StageError, short_error

# ----------------------------------------------------------------------------------------------------------
# Model folders: checks with a message that names the stage to run first.


def model_folder_problem(path: str | Path, remedy: bool = True) -> str | None:
    """Why `path` is not a model folder the stages can use, or None; with `remedy`, followed by the
    download_model.py command that rewrites it (not for a folder that is only a source to copy from)."""
    path = Path(path)
    refresh = f"run download_model.py --force --out {path}"
    if not path.is_dir():
        problem, fix = f"model folder {path}/ not found", "run download_model.py first (or --demo for the offline demo)"
    elif not (path / "config.json").is_file():
        hint = " (it looks like a dataset folder)" if (path / folders.DATASET_DICT).exists() else ""
        problem = f"{path}/ has no config.json{hint}: it is not a model folder"
        fix = f"run download_model.py --out {path}"
    elif not any(path.glob("*.safetensors")):
        problem, fix = f"{path}/ has no .safetensors weights", refresh
    elif not any((path / name).is_file() for name in folders.TOKENIZER_FILES):
        problem, fix = f"{path}/ has no tokenizer files ({', '.join(folders.TOKENIZER_FILES)})", refresh
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


def require_model_dir(path: str | Path) -> Path:
    problem = model_folder_problem(path)
    if problem:
        raise StageError(problem)
    return Path(path)


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """A short hash of the tokenizer files of a model folder: data tokenized with another tokenizer is refused."""
    digest = hashlib.sha256()
    for name in (*folders.TOKENIZER_FILES, "merges.txt"):
        file = Path(model_dir) / name
        if file.is_file() and name != "tokenizer_config.json":  # the config is rewritten on every save
            digest.update(name.encode() + file.read_bytes())
    return digest.hexdigest()[:16]


def model_id(model_dir: str | Path) -> str:
    """The model a folder holds: its Hub id (from download_info.json), else the folder's absolute path."""
    return folders.download_info(model_dir).get("model_id") or str(Path(model_dir).resolve())


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
    """The device this machine offers and the dtype to compute in there (see device_choice)."""
    import torch

    if torch.cuda.is_available():
        return device_choice(cuda=(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0),
                                   torch.cuda.is_bf16_supported()))
    mps = getattr(torch.backends, "mps", None)
    return device_choice(mps=mps is not None and mps.is_available())


def device_choice(cuda: tuple[str, tuple[int, int], bool] | None = None, mps: bool = False) -> DeviceChoice:
    """CUDA > MPS > CPU, from what was found: `cuda` is (name, compute capability, bf16 supported).

    On a GPU with bf16, bf16; without, fp16 autocast with a loss scaler. On Apple's MPS, fp16 autocast with a loss
    scaler too: the base weights in fp16, the LoRA weights in fp32 (peft keeps adapters in fp32, and the Trainer's
    fp16 mode scales the loss), as on a CUDA GPU without bf16. Half-precision LoRA weights trained without a
    scaler stop learning once their updates round away. On a CPU, fp32 (training_choice may pick bf16)."""
    if cuda is not None:
        name, (major, minor), bf16 = cuda
        if bf16:
            return DeviceChoice("cuda", "bfloat16", f"CUDA {name}, compute capability {major}.{minor}: bf16")
        return DeviceChoice("cuda", "float16", f"CUDA {name}, compute capability {major}.{minor}: no bf16, using fp16 "
                                               f"autocast with a loss scaler")
    if mps:
        return DeviceChoice("mps", "float16", "Apple MPS: fp16 autocast with a loss scaler, LoRA weights in fp32 "
                                              "(bitsandbytes 4-bit does not run on MPS: the base model is loaded "
                                              "unquantised, in fp16)")
    return DeviceChoice("cpu", "float32", "no CUDA or MPS device found: CPU with fp32 compute")


def half_precision_training(device: str, compute_dtype: str) -> dict[str, bool]:
    """The Trainer's mixed-precision flags: bf16 autocast (CUDA, CPU), or fp16 autocast with a loss scaler (a CUDA
    GPU without bf16, and MPS), else none (fp32)."""
    return {"bf16": compute_dtype == "bfloat16", "fp16": compute_dtype == "float16" and device in ("cuda", "mps")}


CPU_DTYPES = ("auto", "bfloat16", "float32")
DTYPES = ("float32", "bfloat16", "float16")  # the dtypes a model is stored and computed in


def stored_dtype(model_dir: str | Path) -> str:
    """The dtype a model folder's weights are stored in (its config.json), float32 when it does not say."""
    config = folders.read_json(Path(model_dir) / "config.json")
    named = config.get("dtype") or config.get("torch_dtype")
    return named if named in DTYPES else "float32"


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX, through oneDNN)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# bf16 pays on a CPU where the products are large: measured per step, 2x at hidden size 896 (Qwen2.5-Coder-0.5B,
# bench/whole_run.py), 1.4x at 576 (SmolLM2-135M, bench/real_model.py), none at 128 (the demo model, where it
# held twice the memory: 1.5 against 0.75 GB). Below this width auto keeps fp32.
CPU_BF16_MIN_HIDDEN = 512


def training_choice(choice: DeviceChoice, requested: str, hidden_size: int) -> DeviceChoice:
    """The compute dtype to train in: on a CPU, bf16 where it multiplies bf16 natively and the model is wide
    enough to gain (auto) or where asked, else fp32; a GPU's choice as it is. Inference on a CPU stays fp32 (the
    scored model does not depend on the CPU)."""
    if choice.device != "cpu":
        return choice
    native = cpu_has_bf16()
    wide = hidden_size >= CPU_BF16_MIN_HIDDEN
    if requested == "bfloat16" or (requested == "auto" and native and wide):
        how = "native bf16 (AVX512-BF16 or AMX)" if native else "no native bf16: emulated, likely slower"
        return DeviceChoice("cpu", "bfloat16", f"no CUDA or MPS device found: CPU, {how}: bf16 compute "
                                               f"(--cpu-dtype float32 for fp32)")
    if requested == "float32":
        why = "--cpu-dtype float32"
    elif native:
        why = f"a model {hidden_size} wide is too narrow to gain from bf16 on a CPU; --cpu-dtype bfloat16 to force"
    else:
        why = "no native bf16 on this CPU"
    return DeviceChoice("cpu", "float32", f"no CUDA or MPS device found: CPU with fp32 compute ({why})")


def use_4bit(choice: DeviceChoice, no_4bit: bool, say=print) -> bool:
    """Whether to load the base model in 4-bit: unless --no-4bit, wherever bitsandbytes runs (CUDA and CPU)."""
    if no_4bit:
        return False
    if choice.device not in ("cuda", "cpu"):
        say(f"note: bitsandbytes 4-bit does not run on {choice.device}: loading the model unquantised")
        return False
    return True


def quiet_libraries() -> None:
    """Silence library chatter that is not actionable for a user of this pipeline."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MPLCONFIGDIR", str(Path(tempfile.gettempdir()) / "mplconfig"))
    import logging

    # bitsandbytes looks for optional CPU kernels on the Hub and logs when it cannot fetch them.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*use_cache=True.*is incompatible with gradient checkpointing.*")
    warnings.filterwarnings("ignore", message=".*torch.utils.checkpoint.*use_reentrant.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated.*")
    # peft's prepare_model_for_kbit_training still calls the old name; transformers 5 warns on every run.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*is deprecated.*",
                            category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the "Loading weights" bars of a model that loads in a second


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as error:  # a damaged or foreign tokenizer file
        raise StageError(f"the tokenizer in {model_dir}/ does not load ({short_error(error, 120)}): run "
                         f"download_model.py --force") from None
    vocab_size = folders.read_json(Path(model_dir) / "config.json").get("vocab_size")
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


def quantization_config(compute_dtype):
    """QLoRA's 4-bit recipe: NF4 weights with double quantisation (the quantisation constants quantised too),
    matrix products in the compute dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_model(model_dir: str | Path, choice: DeviceChoice, load_in_4bit: bool):
    """The base model as every stage loads it: 4-bit NF4 with double quantisation, or plain in the compute dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    # Each process of a multi-GPU run (torchrun, accelerate) loads its own copy on its own GPU.
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if choice.device == "cuda" else choice.device
    kwargs = {"dtype": choice.dtype}
    if load_in_4bit:
        kwargs.update(quantization_config=quantization_config(choice.dtype), device_map={"": device})
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if load_in_4bit and choice.device == "cpu":
        compute_in_declared_dtype(model)
    if not load_in_4bit:
        model.to(device)
    if torch.cuda.is_available() and choice.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return model


def compute_in_declared_dtype(model) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes would switch a 4-bit layer to a bf16 inference kernel the first
    time it runs in eval mode without gradients: its answers would then depend on the CPU (and on the batch), the
    adapter would be scored in another precision than it was trained in, and training would go on through a
    kernel that has no backward (a crash under DDP). Every 4-bit layer keeps computing in the compute dtype."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def find_lora_targets(model_dir: str | Path) -> list[str]:
    """The names of every linear projection in the model's decoder blocks, in the order they appear: q_proj ...
    down_proj for Qwen2 and Llama, c_attn, c_proj, c_fc for GPT-2. Never the output layer (nor the embeddings),
    as in QLoRA. Read from the architecture built on the meta device: no weights are loaded."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    output = skeleton.get_output_embeddings()
    names: list[str] = []
    for path, module in skeleton.named_modules():
        name = path.rsplit(".", 1)[-1]
        if module is not output and isinstance(module, (torch.nn.Linear, Conv1D)) and name not in names:
            names.append(name)
    if not names:
        raise StageError(f"the {skeleton.config.model_type} model in {model_dir}/ has no linear layers for LoRA "
                         f"adapters")
    return names


def is_instruct(model_dir: str | Path, tokenizer) -> bool:
    """Whether a model was tuned to chat: it has a chat template, and its EOS is that template's end of turn (as
    SmolLM2-Instruct's <|im_end|>, Llama 3 Instruct's <|eot_id|>) or its name says instruct or chat. Such a model
    is prompted through its chat template by default. Qwen2.5-Coder's base model ships the ChatML template too, but
    ends its texts with <|endoftext|>: it is prompted raw."""
    from pipeline import prompts

    if not prompts.has_chat_template(tokenizer):
        return False
    name = model_id(model_dir).lower()
    return prompts.end_of_turn_id(tokenizer) == tokenizer.eos_token_id or any(
        word in name for word in ("instruct", "-chat", "-it"))


def parameter_count(model_dir: str | Path) -> int:
    """The weights a model folder holds, from its safetensors headers (a tied embedding counted once, as stored):
    no model loaded, and no LoRA layers or 4-bit packing to miscount."""
    import math

    from safetensors import safe_open

    total = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), "np") as weights:
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return total
