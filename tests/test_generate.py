import io

import pytest

import generate
from conftest import family_rows, one_error_line

pytestmark = pytest.mark.slow  # the demo's whole fine-tune, or several training processes


def test_prompt_flag_prints_the_learned_solution(demo_trained, capsys):
    row = family_rows(demo_trained["prepared"], "train")[0]
    args = ["--model", str(demo_trained["model"]), "--adapter", str(demo_trained["adapter"]), "--prompt", row["task"]]
    for test in row["tests"]:
        args += ["--test", test]
    assert generate.main(args) == 0
    assert capsys.readouterr().out.strip() == row["code"]


def test_tasks_are_read_line_by_line_from_stdin(demo_trained, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Write a function to add.\n\nWrite a function to subtract.\n"))
    assert generate.main(["--model", str(demo_trained["model"]), "--adapter", str(demo_trained["adapter"]),
                          "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    # Not interactive: each completion is followed by one empty line, and the blank input line is skipped.
    assert out.endswith("\n\n") and len([block for block in out.split("\n\n") if block.strip()]) == 2, out


def test_missing_adapter_is_refused(demo_model, tmp_path, capsys):
    assert generate.main(["--model", str(demo_model), "--adapter", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "train.py" in one_error_line(capsys.readouterr())
