import json

from pipeline import cli, folders

import download_dataset
from conftest import demo_problems, one_error_line, write_jsonl


def test_demo_writes_a_saved_dataset_with_every_bundled_problem(demo_data, capsys):
    from datasets import load_from_disk

    dataset = load_from_disk(str(demo_data))
    assert list(dataset) == ["train"] and len(dataset["train"]) == len(demo_problems())
    assert {"task_id", "text", "code", "test_list", "test_setup_code"} <= set(dataset["train"].column_names)
    assert json.loads((demo_data / folders.DOWNLOAD_INFO).read_text(encoding="utf-8"))["source"] == "demo"


def test_local_jsonl_file_prints_rows_and_columns(tmp_path, capsys):
    source = write_jsonl(tmp_path / "tasks.jsonl", demo_problems()[:3])
    assert download_dataset.main(["--dataset", str(source), "--out", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert "train: 3 rows" in out and "columns: task_id, text, code, test_list, test_setup_code" in out


def test_an_edited_file_is_not_taken_for_the_copy_in_data(demo_data, tmp_path, capsys):
    import shutil

    rows = demo_problems()[:3]
    source = write_jsonl(tmp_path / "tasks.jsonl", rows)
    assert download_dataset.main(["--dataset", str(source), "--out", str(tmp_path / "data")]) == 0
    assert download_dataset.main(["--dataset", str(source), "--out", str(tmp_path / "data")]) == 0
    assert "skipping" in capsys.readouterr().out
    write_jsonl(source, rows[:2])
    assert download_dataset.main(["--dataset", str(source), "--out", str(tmp_path / "data")]) == 2
    assert "has changed" in one_error_line(capsys.readouterr())
    assert download_dataset.main(["--dataset", str(source), "--out", str(tmp_path / "data"), "--force"]) == 0
    assert "train: 2 rows" in capsys.readouterr().out
    # The demo problems change with the code: a data/ made from an older version is replaced, no --force needed.
    old = tmp_path / "old-demo"
    shutil.copytree(demo_data, old)
    info = json.loads((old / folders.DOWNLOAD_INFO).read_text(encoding="utf-8"))
    (old / folders.DOWNLOAD_INFO).write_text(json.dumps({**info, "content": "older"}), encoding="utf-8")
    assert download_dataset.main(["--demo", "--out", str(old)]) == 0
    assert "older version of the demo problems" in capsys.readouterr().out
    assert json.loads((old / folders.DOWNLOAD_INFO).read_text(encoding="utf-8")) == info


def test_missing_file_empty_file_and_wrong_format_are_refused(tmp_path, capsys):
    assert download_dataset.main(["--dataset", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "d1")]) == 2
    assert "not found" in one_error_line(capsys.readouterr())
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    assert download_dataset.main(["--dataset", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "d2")]) == 2
    one_error_line(capsys.readouterr())
    (tmp_path / "tasks.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    assert download_dataset.main(["--dataset", str(tmp_path / "tasks.csv"), "--out", str(tmp_path / "d3")]) == 2
    assert "unsupported file type" in one_error_line(capsys.readouterr())
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    assert download_dataset.main(["--dataset", str(tmp_path / "broken.json"), "--out", str(tmp_path / "d4")]) == 2
    one_error_line(capsys.readouterr())
    assert not any((tmp_path / name).exists() for name in ("d1", "d2", "d3", "d4"))


def test_offline_hub_dataset_fails_fast_with_a_clear_line(tmp_path, capsys):
    assert download_dataset.main(["--dataset", "no-such-org/no-such-data", "--out",
                                  str(tmp_path / "data")]) == cli.EXIT_FAILED
    assert "no-such-org/no-such-data" in one_error_line(capsys.readouterr())
    assert not (tmp_path / "data").exists()


def test_bundled_problems_are_mbpp_style_and_their_solutions_pass():
    problems = demo_problems()
    assert len(problems) >= 40
    assert len({p["task_id"] for p in problems}) == len(problems)
    for problem in problems:
        assert problem["text"].strip() and problem["code"].strip()
        assert len(problem["test_list"]) >= 3
        namespace: dict = {}
        exec(problem["test_setup_code"] + "\n" + problem["code"], namespace)  # our own reference code
        for test in problem["test_list"]:
            exec(test, namespace)
