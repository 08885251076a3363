import pytest

from pipeline import cli

import run_pipeline
from conftest import one_error_line


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
    demo_train = run_pipeline.stage_argv("train", flags["train"] | {"--demo"}, {"--lr": ["1e-5"]}, demo=True)
    assert demo_train == ["--lr", "1e-5", "--demo"]  # the stage's own demo settings; the user's flag wins there


def test_folder_and_unknown_flags_are_refused(capsys):
    assert run_pipeline.main(["--out", "x"]) == 2
    assert "different folder" in one_error_line(capsys.readouterr())
    assert run_pipeline.main(["--no-such-flag"]) == 2
    assert "no stage has the flag --no-such-flag" in one_error_line(capsys.readouterr())
