"""Can this machine run the pipeline? Versions, device, memory, disk, bitsandbytes 4-bit, and a recommendation.

Run:
    python tools/system_check.py

Reads:  the installed packages and the hardware.
Writes: nothing; exits non-zero when something required is missing or broken.
Needs:  pipeline/ (in the folder above)
Run it first, before download_model.py.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import cli  # noqa: E402

REQUIRED = ["torch", "transformers", "datasets", "accelerate", "peft", "bitsandbytes", "safetensors", "huggingface_hub",
            "tokenizers"]
OPTIONAL = ["matplotlib", "tensorboard", "psutil", "pynvml"]


def package_version(name: str) -> str | None:
    try:
        module = importlib.import_module(name)
    except Exception:  # missing or broken: both mean unusable
        return None
    return getattr(module, "__version__", "installed")


def bnb_4bit_works(device: str) -> tuple[bool, str]:
    """Quantise a small layer to NF4 on `device` and run it forward and backward."""
    try:
        import bitsandbytes as bnb
        import torch

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").to(device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).sum().backward()
        return bool(torch.isfinite(x.grad).all()), f"NF4 forward and backward ran on {device}"
    except Exception as error:  # any failure here means 4-bit training will not run
        return False, f"{type(error).__name__}: {str(error)[:150]}"


def recommendation(vram_gib: float | None, bf16: bool) -> str:
    if vram_gib is None:
        return "no CUDA GPU: run the demo (python run_pipeline.py --demo); the real run needs an NVIDIA GPU"
    dtype = "bf16" if bf16 else "fp16 (this GPU has no bf16)"
    if vram_gib < 5:
        batch = "--batch-size 1 --grad-accum 16 and prepare_data.py --max-length 384"
    elif vram_gib < 8:
        batch = "--batch-size 4 --grad-accum 4 (the defaults), max length 512"
    else:
        batch = "--batch-size 8 --grad-accum 2, max length 512 (or --auto-batch-size)"
    return f"{vram_gib:.1f} GiB VRAM: {batch}; compute in {dtype}"


def build_parser() -> argparse.ArgumentParser:
    return cli.Parser(__doc__)


@cli.report_errors
def main(argv=None) -> int:
    build_parser().parse_args(argv)
    problems = 0
    print(f"Python {platform.python_version()} on {platform.system()} {platform.machine()}")
    if sys.version_info < (3, 10):
        print("✗ Python 3.10 or newer is needed")
        problems += 1
    for name in REQUIRED + OPTIONAL:
        version = package_version(name)
        mark = "✓" if version else ("✗" if name in REQUIRED else "-")
        missing = "missing (required: pip install -r requirements.txt)" if name in REQUIRED else "missing (optional)"
        print(f"{mark} {name} {version or missing}")
        problems += version is None and name in REQUIRED
    if package_version("torch") is None:
        print(f"{problems} problem(s) found")
        return 1

    import psutil
    import torch

    from pipeline import models

    models.quiet_libraries()  # bitsandbytes' note about optional Hub kernels is not a problem here
    vram, bf16, device = None, False, "cpu"
    if torch.cuda.is_available():
        device = "cuda"
        properties = torch.cuda.get_device_properties(0)
        vram, bf16 = properties.total_memory / 2**30, torch.cuda.is_bf16_supported()
        print(f"✓ CUDA {torch.version.cuda}: {properties.name}, compute capability {properties.major}."
              f"{properties.minor}, {vram:.1f} GiB VRAM, bf16 {'yes' if bf16 else 'no'}")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        print("- Apple MPS available: train.py trains there unquantised (no bitsandbytes 4-bit on MPS), in fp16 "
              "autocast with fp32 LoRA weights")
    else:
        print("- no CUDA GPU: CPU only (fine for the demo and the tests)")
    memory = psutil.virtual_memory()
    print(f"- RAM {memory.total / 2**30:.1f} GiB ({memory.available / 2**30:.1f} GiB available)")
    free = shutil.disk_usage(Path.cwd()).free / 2**30
    mark = "✓" if free >= 3 else "✗"
    print(f"{mark} free disk here: {free:.1f} GiB (the real run needs ~3 GiB: model, data, checkpoints)")
    problems += free < 3
    if package_version("bitsandbytes"):
        works, detail = bnb_4bit_works(device)
        print(f"{'✓' if works else '✗'} bitsandbytes 4-bit: {detail}")
        problems += not works
    print(f"recommendation: {recommendation(vram, bf16)}")
    print("all required checks passed" if not problems else f"{problems} problem(s) found")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
