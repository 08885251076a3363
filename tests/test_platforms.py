"""Every platform a student has: what Windows and macOS lack is checked statically (mypy per platform), simulated
(a console that writes cp1252 or ASCII, a process table asked without signals), or decided by a pure function
(the MPS precision). The sandbox's own simulations are in tests/test_sandbox.py."""

from __future__ import annotations

import ast
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import cli, folders, models, platforms, run_folder

from conftest import NARROW, ROOT, NarrowConsole

CHECKED = [*sorted(ROOT.glob("*.py")), ROOT / "pipeline", ROOT / "tools", ROOT / "bench"]


# ---- a static check per platform --------------------------------------------------------------------------


def mypy_errors(platform: str, files, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mypy", "--platform", platform, "--follow-imports=skip",
                             "--ignore-missing-imports", "--no-error-summary", "--cache-dir", str(cache / platform),
                             *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            encoding="utf-8", cwd=ROOT)


def platform_only_errors(files, cache: Path) -> dict[str, list[str]]:
    """mypy's reports, on Windows and on macOS, of a module or class lacking an attribute: uses of what those
    systems lack (os.killpg, signal.SIGKILL, resource.setrlimit, os.geteuid, ...) outside a check of sys.platform.
    (Linux has none: the tests run there.)"""
    runs = {platform: mypy_errors(platform, files, cache) for platform in ("win32", "darwin")}
    lacking = re.compile(r': error: (Module has no attribute|Module "\w+" has no attribute|"type\[\w+\]" has no '
                         r'attribute).*\[attr-defined\]')
    return {platform: sorted(line for line in run.communicate(timeout=300)[0].splitlines() if lacking.search(line))
            for platform, run in runs.items()}


@pytest.mark.slow  # mypy over the project twice
def test_nothing_uses_what_windows_or_macos_lacks(tmp_path):
    slip = tmp_path / "slip.py"  # the check itself can fail: a call Windows lacks, unguarded
    slip.write_text("import os\nimport signal\n\nos.killpg(1, signal.SIGKILL)\n", encoding="utf-8")
    found = platform_only_errors([*CHECKED, slip], tmp_path)
    assert found["win32"] and all("slip.py" in line for line in found["win32"]), found
    assert found["darwin"] == [], found


# ---- text files and subprocess output in UTF-8, whatever the locale -------------------------------------------


def opened_without_encoding(tree: ast.AST) -> list[int]:
    """Lines that open a text file or a text pipe in the locale's encoding (cp1252 on a Windows laptop)."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        keywords = {k.arg for k in node.keywords}
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if "encoding" in keywords:
            continue
        if name in ("read_text", "write_text"):
            lines.append(node.lineno)
        elif name in ("open", "fdopen") and not (isinstance(node.func, ast.Attribute) and name == "open"
                                                 and getattr(node.func.value, "id", "") in ("gzip", "os", "zipfile")):
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"),
                                                                None)
            if not (isinstance(mode, ast.Constant) and "b" in str(mode.value)):
                lines.append(node.lineno)
        elif name in ("run", "Popen", "check_output") and ({"text", "universal_newlines"} & keywords):
            lines.append(node.lineno)
    return lines


def test_every_text_file_and_text_pipe_names_its_encoding():
    files = [p for folder in (ROOT, ROOT / "pipeline", ROOT / "tools", ROOT / "bench", ROOT / "tests")
             for p in sorted(folder.glob("*.py"))]
    found = [f"{path.relative_to(ROOT)}:{line}" for path in files
             for line in opened_without_encoding(ast.parse(path.read_text(encoding="utf-8")))]
    assert found == []
    assert opened_without_encoding(ast.parse("open('x')\nPath('x').read_text()\nopen('y', 'rb')")) == [1, 2]


# ---- a console that cannot show ✓ -------------------------------------------------------------------------


def test_marks_become_ascii_where_the_console_lacks_them():
    console = NarrowConsole()
    platforms.make_output_safe(console)
    console.write("✓ adapter saved → export/ · ⟦trained⟧ ✗ 中\n")
    assert console.text("ascii") == "OK adapter saved -> export/ - [[trained]] FAIL \\u4e2d\n"
    assert console.text("cp1252") == "OK adapter saved -> export/ · [[trained]] FAIL \\u4e2d\n"
    utf8 = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    platforms.make_output_safe(utf8)
    assert utf8.errors == "strict"  # a UTF-8 console keeps its ✓


def test_progress_bars_are_drawn_on_a_terminal_only(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert platforms.progress_bars()
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # python train.py 2> train.log, an IDE's pane
    assert not platforms.progress_bars()


def test_the_other_tools_end_normally_on_a_cp1252_or_ascii_console(monkeypatch, demo_model, trained_smoke):
    """What run_pipeline.py does not run (tests/test_run_pipeline.py runs every stage it does on such a console):
    generate.py and the tools, their output encoded in cp1252 and in ASCII as it is written."""
    import generate

    sys.path.insert(0, str(ROOT / "tools"))
    import checkpoint_manager
    import system_check
    import training_dashboard

    adapter = trained_smoke / folders.FINAL_ADAPTER
    runs = [
        (generate.main, ["--model", demo_model, "--adapter", adapter, "--prompt", "Write a function to reverse a "
                         "string → and say ✓", "--max-new-tokens", "16"]),
        (checkpoint_manager.main, ["list", "--run", trained_smoke]),
        (training_dashboard.main, ["--run", trained_smoke]),
        (system_check.main, []),
    ]
    out, err = NarrowConsole(), NarrowConsole()
    monkeypatch.setattr(sys, "stdout", out)  # here, not in a fixture: pytest's capture resets sys.stdout before a test
    monkeypatch.setattr(sys, "stderr", err)
    for main, argv in runs:
        assert main([str(arg) for arg in argv]) == 0, (main.__module__, err.text("ascii")[-2000:])
    assert "OK " in out.text("ascii") and "Traceback" not in err.text("ascii")


@pytest.mark.parametrize("encoding", NARROW)
def test_a_stage_in_its_own_process_prints_ascii_marks_under_a_narrow_pythonioencoding(encoding, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "download_dataset.py"), "--demo", "--out", str(tmp_path / "d")],
                          capture_output=True, cwd=ROOT, timeout=300, env={**os.environ, "PYTHONIOENCODING": encoding})
    out, err = done.stdout.decode(encoding), done.stderr.decode(encoding)
    assert done.returncode == 0 and "Traceback" not in err, out + err
    assert f"OK saved in {tmp_path / 'd'}" in out and "✓" not in out


# ---- processes: asked of the process table, never signalled ---------------------------------------------


@pytest.fixture()
def no_signals(monkeypatch):
    """os.kill raises: on Windows, os.kill(pid, 0) terminates the process it was meant to ask about."""
    def refuse(pid, sig):
        raise AssertionError(f"os.kill({pid}, {sig}) called")

    monkeypatch.setattr(os, "kill", refuse)


def test_whether_a_process_lives_is_asked_without_signalling_it(no_signals):
    assert platforms.pid_alive(os.getpid())
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    assert not platforms.pid_alive(ended.pid)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # ended, not yet reaped
    deadline = time.monotonic() + 30
    while platforms.pid_alive(zombie.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert not platforms.pid_alive(zombie.pid)
    finally:
        zombie.wait()


def test_a_leftover_temporary_folder_is_removed_only_when_its_process_is_gone(no_signals, monkeypatch, tmp_path):
    (tmp_path / "out").mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    try:
        for pid in (alive.pid, ended.pid):
            (tmp_path / f".out.tmp-{pid}").mkdir()
        folders.remove_leftovers(tmp_path / "out")
        assert (tmp_path / f".out.tmp-{alive.pid}").is_dir() and not (tmp_path / f".out.tmp-{ended.pid}").exists()
        assert alive.poll() is None  # and the live one was not touched
    finally:
        monkeypatch.undo()  # os.kill back, to end the sleeper
        alive.kill()
        alive.wait()


def test_a_run_lock_of_a_reused_pid_is_stale(no_signals, tmp_path):
    """A lock names its process by pid and start time: after a reboot another process can hold that pid."""
    mine = run_folder.lock_text(os.getpid()).split()
    assert run_folder.lock_held(mine)
    assert not run_folder.lock_held([mine[0], mine[1], f"{float(mine[2]) - 3600:.2f}"])
    assert run_folder.lock_held(mine[:2])  # a lock of an earlier version: the pid alone
    assert not run_folder.lock_held([mine[0], "another-host", mine[2]])


def test_the_stop_signals_end_a_stage_as_a_shell_reports_them():
    assert {signal.SIGINT, signal.SIGTERM} <= set(platforms.stop_signals())

    @cli.report_errors
    def stopped(argv=None):
        raise cli.Terminated(signal.SIGTERM)

    assert stopped([]) == 128 + signal.SIGTERM


def test_commands_shown_to_copy_keep_a_path_with_spaces_one_word():
    import shlex

    line = cli.command("train.py", ("--data", "my data/prepared", "prepared_data"), ("--lr", 2e-4, 2e-4))
    assert shlex.split(line) == ["python", "train.py", "--data", "my data/prepared"]


# ---- Apple MPS: a precision that learns --------------------------------------------------------------------


def test_mps_trains_in_fp16_autocast_with_a_scaler_and_fp32_lora_weights(demo_model):
    import torch

    import train

    choice = models.device_choice(mps=True)
    assert (choice.device, choice.dtype_name) == ("mps", "float16") and "loss scaler" in choice.reason
    assert models.half_precision_training("mps", "float16") == {"bf16": False, "fp16": True}
    assert not models.use_4bit(choice, no_4bit=False, say=lambda *a: None)  # no bitsandbytes on MPS
    gpu = models.device_choice(cuda=("RTX 3050 Laptop GPU", (8, 6), True))
    assert gpu.dtype_name == "bfloat16" and models.half_precision_training("cuda", "bfloat16")["bf16"]
    assert models.device_choice().device == "cpu"
    # The base in fp16, unquantised (as on MPS): the LoRA weights the optimiser updates are fp32.
    half = models.DeviceChoice("cpu", "float16", "fp16 base, as on MPS")
    model = train.build_model(str(demo_model), half, False, lora_r=4, lora_alpha=8, lora_dropout=0.0, seed=0)
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and torch.float16 in frozen
