"""The four tools in tools/: training dashboard, checkpoint manager, system check, GPU monitor."""

import json
import shutil
import sys
from pathlib import Path

from pipeline import merging, prompts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import checkpoint_manager  # noqa: E402
import gpu_monitor  # noqa: E402
import system_check  # noqa: E402
import training_dashboard  # noqa: E402


def test_dashboard_on_a_finished_run(trained_smoke, capsys):
    assert training_dashboard.main(["--run", str(trained_smoke)]) == 0
    out = capsys.readouterr().out
    assert "(finished)" in out and "4/4 steps (100%)" in out and "eval loss: best" in out and "trend:" in out
    metrics = json.loads((trained_smoke / "metrics.json").read_text(encoding="utf-8"))["totals"]
    assert f"{metrics['trained_tokens'] / metrics['elapsed_s']:,.0f} trained tok/s" in out  # totals over time


def test_dashboard_without_metrics_says_what_to_do(tmp_path, capsys):
    assert training_dashboard.main(["--run", str(tmp_path)]) == 2
    assert "train.py" in capsys.readouterr().err


def test_checkpoint_manager_list_best_test_cleanup_delete(trained_smoke, demo_model, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_smoke, run)
    assert checkpoint_manager.main(["list", "--run", str(run)]) == 0  # --run after the command, as typed
    listing = capsys.readouterr().out
    assert "checkpoint-4" in listing and "<- final adapter" in listing and "MB" in listing
    assert checkpoint_manager.main(["--run", str(run), "best"]) == 0
    assert "best by eval loss: " in capsys.readouterr().out  # nothing was scored: the loss, said to be the loss
    assert checkpoint_manager.main(["--run", str(run), "test", str(run / "checkpoint-4"), "--model", str(demo_model),
                                    "--max-new-tokens", "8"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("--- base model:") == checkpoint_manager.TEST_PROBLEMS and "checkpoint-4:" in shown
    assert checkpoint_manager.main(["--run", str(run), "delete", str(run / "logs")]) == 2  # not a checkpoint
    assert (run / "logs").is_dir()
    elsewhere = tmp_path / "my-adapter"  # an adapter folder outside the run: never the manager's to delete
    shutil.copytree(run / "final", elsewhere)
    assert checkpoint_manager.main(["--run", str(run), "delete", str(elsewhere)]) == 2
    assert "nothing deleted" in capsys.readouterr().err and (elsewhere / "adapter_config.json").is_file()
    assert checkpoint_manager.main(["--run", str(run), "cleanup", "--keep", "0"]) == 0
    assert not list(run.glob("checkpoint-*")) and (run / "final").is_dir()
    assert checkpoint_manager.main(["--run", str(run), "delete", str(run / "final")]) == 0
    assert not (run / "final").exists()


def test_system_check_passes_where_the_requirements_are_installed(capsys):
    assert system_check.main([]) == 0  # the tests run with requirements.txt installed
    out = capsys.readouterr().out
    assert "✓ bitsandbytes 4-bit: NF4 forward and backward ran on cpu" in out and "all required checks passed" in out
    assert "recommendation: no CUDA GPU" in out or "GiB VRAM" in out


def test_system_check_fails_when_a_required_package_is_missing(monkeypatch, capsys):
    real = system_check.package_version
    monkeypatch.setattr(system_check, "package_version", lambda name: None if name == "peft" else real(name))
    assert system_check.main([]) == 1
    out = capsys.readouterr().out
    assert "✗ peft missing (required: pip install -r requirements.txt)" in out and "1 problem(s) found" in out


def test_system_check_recommends_a_batch_for_the_gpu_size():
    assert "--batch-size 1" in system_check.recommendation(4.0, bf16=True)
    six_gb = system_check.recommendation(6.0, bf16=True)
    assert "(the defaults)" in six_gb and "compute in bf16" in six_gb
    assert "no bf16" in system_check.recommendation(6.0, bf16=False)
    assert "--batch-size 8" in system_check.recommendation(24.0, bf16=True)


def test_gpu_monitor_once_without_a_gpu(capsys):
    assert gpu_monitor.main(["--once"]) == 0
    out = capsys.readouterr().out
    assert ("no NVIDIA GPU found" in out and "RAM:" in out) or out.startswith("GPU 0")


def test_bundled_prompts_in_the_shape_the_adapter_was_trained_on():
    """checkpoint_manager's `test` and export.py's self-check (without prepared data) prompt with these."""
    code = merging.bundled_prompts(prompts.CODE, None,
                                     checkpoint_manager.TEST_PROBLEMS)  # HumanEval-style adapters continue code
    assert len(code) == checkpoint_manager.TEST_PROBLEMS and all(prompt.startswith("def ") and '"""' in prompt for _,
                                                                 prompt in code)
    tasks = merging.bundled_prompts(prompts.TESTS, None, checkpoint_manager.TEST_PROBLEMS)
    assert all(prompt.startswith("Task: ") and "assert " in prompt for _, prompt in tasks)
