"""Shared fixtures: the demo model, data and prepared data are built once per test session, offline."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"  # the tests never touch the network
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores (pytest.ini: -n 2): one thread each, for torch here and in the stages the tests start
    # (set before anything imports torch). Two torch processes of two threads each on two cores wait on each other.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from pipeline import folders  # noqa: E402

import download_dataset  # noqa: E402
import download_model  # noqa: E402
import prepare_data  # noqa: E402
import train  # noqa: E402

# Fixtures that train or convert a model for half a minute or more. A test that uses one is slow (`-m "not slow"`
# leaves it out), whatever its file says. Each test process (pytest.ini: -n 2) builds its own fixtures: the tests
# that share the demo's fine-tune run in one of them, which builds it once, and so do the tests of a file that share
# a fixture of that file (two torchrun launches at once would also want the same port).
SLOW_FIXTURES = {"readme_demo", "demo_trained", "exported", "smollm2", "runs"}
FINE_TUNE_FIXTURES = {"readme_demo", "demo_trained", "exported"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        used = set(item.fixturenames)
        if used & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
        definitions = item._fixtureinfo.name2fixturedefs
        per_file = any(definitions[name][-1].scope == "module" for name in used if name in definitions)
        if used & FINE_TUNE_FIXTURES:
            item.add_marker(pytest.mark.xdist_group("demo-fine-tune"))
        elif per_file and item.get_closest_marker("xdist_group") is None:  # a file's own group stands
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    # The long tests first, the quick ones after (in file order within each): the two test processes then end
    # together instead of one waiting while the other finishes a long test it took last.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# assets/demo_problems.jsonl: 9001-9051 are unrelated problems, 9052-9087 the string family (six operations x six
# names) whose held-out members the demo fine-tune learns to solve.
FIRST_FAMILY_ID = 9052


def demo_problems() -> list[dict]:
    with open(folders.DEMO_PROBLEMS, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def stage(*argv, cwd=ROOT) -> subprocess.CompletedProcess:
    """A script run as a user runs it: its own process, its output captured."""
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=cwd, timeout=300,
                          encoding="utf-8")


def single_error(done: subprocess.CompletedProcess, code: int = 2) -> str:
    assert done.returncode == code, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file below a folder and its bytes: what "left unchanged" is checked against."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(captured) -> str:
    """The stage's message on stderr; asserts it is a single `error:` line without a traceback."""
    err = captured.err.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith("error: ") for line in lines), err
    return err


def final_error_line(captured) -> str:
    """The one `error:` line a stage ended with, after its progress bars and notes on stderr; no traceback."""
    err = captured.err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    return errors[0]


def assert_adapter_loaded(model, adapter_dir: Path) -> None:
    """Every LoRA tensor saved in adapter_dir is in `model`, with the same values (not a fresh initialisation)."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(Path(adapter_dir) / folders.ADAPTER_WEIGHTS))
    params = dict(model.named_parameters())
    assert saved, adapter_dir
    for name, tensor in saved.items():
        loaded = params[name.replace(".weight", ".default.weight")]
        assert torch.equal(loaded.detach().cpu().to(tensor.dtype), tensor), name


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "model"
    assert download_model.main(["--demo", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    assert download_dataset.main(["--demo", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def demo_prepared(tmp_path_factory, demo_model, demo_data) -> Path:
    out = tmp_path_factory.mktemp("demo") / "prepared_data"
    assert prepare_data.main(["--data", str(demo_data), "--model", str(demo_model), "--out", str(out)]) == 0
    return out


SMOKE_FLAGS = {"max_steps": 4, "save_steps": 2, "keep_last": 1, "batch_size": 4, "grad_accum": 1, "logging_steps": 1}


def train_argv(model, data, out, *extra: str, **overrides) -> list[str]:
    """train.py's command line for a short run: 4 steps of 4 examples, a checkpoint and an evaluation every 2 steps,
    a log every step. Keyword overrides (max_steps=6, lr="1e-3") replace or add flags, None drops one; `extra` flags
    are appended as they are (--resume)."""
    argv = ["--model", str(model), "--data", str(data), "--out", str(out)]
    for name, value in {**SMOKE_FLAGS, **overrides}.items():
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv + list(extra)


@pytest.fixture(scope="session")
def trained_smoke(tmp_path_factory, demo_model, demo_prepared) -> Path:
    """A 4-step QLoRA run on the demo data with a checkpoint and an evaluation every 2 steps, a log every step."""
    out = tmp_path_factory.mktemp("smoke") / "checkpoints"
    assert train.main(train_argv(demo_model, demo_prepared, out)) == 0
    return out


def family_rows(prepared: Path, split: str) -> list[dict]:
    """The string family's rows of a split of the prepared demo data."""
    from datasets import load_from_disk

    return [row for row in load_from_disk(str(prepared))[split] if int(row["task_id"]) >= FIRST_FAMILY_ID]


# ---- the README's commands, followed as printed ------------------------------------------------------------

README = ROOT / "README.md"
DEMO_ROUTE = "### The demo, stage by stage"


def readme_blocks(heading: str | None = None) -> list[tuple[str, str]]:
    """The README's code blocks as (language, text), in order; with `heading`, only the first block below it."""
    text = README.read_text(encoding="utf-8")
    if heading is not None:
        text = text[re.search(f"^{re.escape(heading)}.*$", text, flags=re.M).start():]  # the heading's line
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)
    return blocks[:1] if heading is not None else blocks


def readme_commands(heading: str) -> list[list[str]]:
    """Each command line of the first block below a README heading, split as a shell splits it, comments dropped."""
    (_, block), = readme_blocks(heading)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def follow(argv: list[str]) -> tuple[int, str]:
    """A README line `python SCRIPT.py ...` run as that stage's main(argv), in this process (as run_pipeline.py
    runs the stages); its exit code and what it printed."""
    assert argv[0] == "python" and argv[1].endswith(".py") and "/" not in argv[1], argv
    module = importlib.import_module(argv[1][:-len(".py")])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = module.main(argv[2:])
    return code, printed.getvalue()


@pytest.fixture(scope="session")
def readme_demo(tmp_path_factory) -> dict:
    """The README's demo route (DEMO_ROUTE) followed as printed in a fresh folder, up to the run_pipeline.py line
    (tests/test_readme.py runs that one): the folder, and each command's exit code and output, in order."""
    folder = tmp_path_factory.mktemp("readme-demo")
    followed = []
    with contextlib.chdir(folder):
        for argv in readme_commands(DEMO_ROUTE):
            if argv[1] == "run_pipeline.py":
                break
            code, printed = follow(argv)
            assert code == 0, (argv, printed[-3000:])
            followed.append((argv, printed))
    return {"folder": folder, "followed": followed}


@pytest.fixture(scope="session")
def demo_trained(readme_demo) -> dict:
    """The demo's fine-tune, as the README's demo route makes it (prepare_data.py --demo: a quarter held out;
    train.py --demo: 4-bit QLoRA, 180 steps, 20 epochs of 9 steps)."""
    folder = readme_demo["folder"]
    return {"model": folder / folders.MODEL_DIR, "prepared": folder / folders.PREPARED_DIR,
            "adapter": folder / folders.CHECKPOINTS_DIR / folders.FINAL_ADAPTER}


@pytest.fixture(scope="session")
def exported(demo_trained, tmp_path_factory) -> Path:
    """The demo's fine-tune merged by export.py (into the dequantised 4-bit weights it was trained on)."""
    import export

    out = tmp_path_factory.mktemp("export") / "export"
    assert export.main(["--model", str(demo_trained["model"]), "--adapter", str(demo_trained["adapter"]), "--data",
                        str(demo_trained["prepared"]), "--out", str(out), "--max-shard-size", "2MB"]) == 0
    return out


# ---- a console that cannot show ✓ (Windows, output redirected: cp1252; some consoles: ASCII) -------------------

NARROW = ("cp1252", "ascii")


class NarrowConsole(io.TextIOBase):
    """What Python gives a stage whose output goes to a cp1252 file (Windows, redirected) and to an ASCII console
    at once: each write is encoded strictly in both, as sys.stdout does with PYTHONIOENCODING."""

    encoding = "cp1252"

    def __init__(self):
        super().__init__()
        self.streams = {name: io.TextIOWrapper(io.BytesIO(), encoding=name, errors="strict") for name in NARROW}

    def write(self, text: str) -> int:
        for stream in self.streams.values():
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams.values():
            stream.flush()

    def reconfigure(self, **settings):
        for stream in self.streams.values():
            stream.reconfigure(**settings)

    def isatty(self) -> bool:
        return False

    def text(self, name: str) -> str:
        self.flush()
        return self.streams[name].buffer.getvalue().decode(name)
