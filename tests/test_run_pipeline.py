import json
import sys

import pytest

from pipeline import cli, folders

import run_pipeline
from conftest import NarrowConsole, one_error_line


def test_flags_are_grouped_with_their_values():
    assert run_pipeline.group_flags(["--lr", "1e-4", "--force", "--seed=7"]) == {"--lr": ["1e-4"], "--force": [],
                                                                                 "--seed": ["7"]}
    with pytest.raises(cli.StageError):
        run_pipeline.group_flags(["stray"])


def test_each_flag_reaches_every_stage_that_has_it_and_no_other():
    groups = {"--force": [], "--seed": ["7"], "--max-steps": ["3"]}
    flags = {"download_model": {"--force", "--demo"}, "prepare_data": {"--seed"}, "train": {"--seed", "--max-steps",
                                                                                            "--lr"}}
    assert run_pipeline.stage_argv("download_model", flags["download_model"], groups,
                                   demo=True) == ["--force", "--demo"]
    assert run_pipeline.stage_argv("prepare_data", flags["prepare_data"], groups, demo=False) == ["--seed", "7"]
    demo_train = run_pipeline.stage_argv("train", flags["train"], {"--lr": ["1e-5"]}, demo=True)
    assert demo_train == ["--lr", "1e-5"]  # the user's flag wins over the demo default


def test_folder_and_unknown_flags_are_refused(capsys):
    assert run_pipeline.main(["--out", "x"]) == 2
    assert "different folder" in one_error_line(capsys.readouterr())
    assert run_pipeline.main(["--no-such-flag"]) == 2
    assert "no stage has the flag --no-such-flag" in one_error_line(capsys.readouterr())


@pytest.mark.slow
def test_demo_pipeline_runs_every_stage_offline_on_a_cp1252_or_ascii_console(tmp_path, monkeypatch):
    """Every stage to its end, its output written to a console that cannot show ✓ (Windows with the output
    redirected: cp1252; some consoles: ASCII), as it is written."""
    monkeypatch.chdir(tmp_path)
    console, errors = NarrowConsole(), NarrowConsole()
    monkeypatch.setattr(sys, "stdout", console)  # in the test: pytest's capture resets sys.stdout before a test
    monkeypatch.setattr(sys, "stderr", errors)
    assert run_pipeline.main(["--demo", "--max-steps", "3", "--limit", "4", "--max-new-tokens", "16"]) == 0, \
        errors.text("ascii")[-3000:]
    assert "Traceback" not in errors.text("ascii") and "OK pipeline finished" in console.text("ascii")
    out = console.text("cp1252")
    assert "all checks passed" in out and "pipeline finished" in out and "✓" not in out
    # export before evaluate: the shipped model scored beside the adapter and the base, on the same problems
    assert out.index("=== [6/7] export.py") < out.index("=== [7/7] evaluate.py")
    assert "| fine-tuned |" in out and "| export |" in out and "| base |" in out
    # the last lines carry evaluate.py's verdict (3 steps change nothing: "no difference"; the demo's own run, with
    # its interval and p-value, is in tests/test_end_to_end.py)
    finished = out[out.index("OK pipeline finished"):]
    summary = json.loads((tmp_path / folders.RESULTS_DIR / folders.SUMMARY).read_text(encoding="utf-8"))
    verdict = summary["comparisons"]["fine-tuned"]
    assert verdict["verdict"] in finished
    for folder in (folders.MODEL_DIR, folders.DATA_DIR, folders.PREPARED_DIR,
                   f"{folders.CHECKPOINTS_DIR}/{folders.FINAL_ADAPTER}", folders.RESULTS_DIR,
                   folders.EXPORT_DIR):
        assert (tmp_path / folder).is_dir()
