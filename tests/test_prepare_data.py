import json

import pytest

from pipeline import cli, data, folders, models, prompts

import download_dataset
import prepare_data
from conftest import demo_problems, one_error_line, write_jsonl


def test_column_names_of_the_mbpp_variants_are_accepted():
    columns = ["task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list"]
    assert data.detect(columns) == "mbpp"
    original = data.columns_for("mbpp", columns)
    assert original == {"task": "text", "code": "code", "tests": "test_list", "setup": "test_setup_code",
                        "task_id": "task_id"}
    sanitized = ["source_file", "task_id", "prompt", "code", "test_imports", "test_list"]
    assert data.detect(sanitized) == "mbpp"
    columns = data.columns_for("mbpp", sanitized)
    assert columns["task"] == "prompt" and columns["setup"] == "test_imports"


def test_missing_column_is_named():
    with pytest.raises(cli.StageError, match="'code'"):
        data.columns_for("mbpp", ["task_id", "text", "test_list"])


@pytest.mark.parametrize("field, value", [("text", ""), ("text", None), ("code", "   "), ("code", 42), ("test_list",
                                                                                                        [])])
def test_rows_with_empty_or_non_string_fields_are_refused(field, value):
    row = {**demo_problems()[0], field: value}
    columns = data.columns_for("mbpp", list(row))
    with pytest.raises(cli.StageError, match="row 3"):
        data.normalize("mbpp", row, columns, 3)


def test_held_out_split_is_deterministic_disjoint_and_order_independent():
    ids = [str(i) for i in range(100)]
    first = prepare_data.held_out_split(ids, 0.1, seed=42)
    assert len(first) == 10
    assert prepare_data.held_out_split(list(reversed(ids)), 0.1, seed=42) == first
    assert prepare_data.held_out_split(ids, 0.1, seed=7) != first


def test_prepared_data_layout_masks_and_task_fields(demo_prepared, demo_model):
    from datasets import load_from_disk

    prepared = load_from_disk(str(demo_prepared))
    assert set(prepared) == {"train", "eval"}
    assert {p.name for p in demo_prepared.iterdir()} == {"train", "eval", "dataset_dict.json", folders.PREPARED_STATS,
                                                         folders.OWNER}
    train_ids, eval_ids = set(prepared["train"]["task_id"]), set(prepared["eval"]["task_id"])
    assert not train_ids & eval_ids and len(train_ids) + len(eval_ids) == len(demo_problems())
    tokenizer = models.load_tokenizer(demo_model)
    for row in prepared["train"]:
        assert {"task_id", "task", "code", "tests", "test_setup_code", "input_ids", "attention_mask",
                "labels"} <= set(row)
        trained = [label for label in row["labels"] if label != prompts.IGNORE_INDEX]
        assert trained[-1] == tokenizer.eos_token_id  # the EOS is learned
        assert tokenizer.decode(trained[:-1]) == row["code"]  # exactly the solution is learned, the prompt is masked
        first = row["labels"].index(trained[0])
        assert tokenizer.decode(row["input_ids"][:first]).endswith("Solution:\n")
    stats = folders.read_json(demo_prepared / folders.PREPARED_STATS)
    assert stats["settings"]["template"] == prompts.DEFAULT.name
    assert stats["rows"] == {"train": len(prepared["train"]), "eval": len(prepared["eval"])}


def test_long_examples_are_dropped_and_counted_never_cut(demo_data, demo_model, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert prepare_data.main(["--data", str(demo_data), "--model", str(demo_model), "--out", str(out), "--max-length",
                              "100", "--check-tests", "off"]) == 0
    stats = folders.read_json(out / folders.PREPARED_STATS)
    dropped = sum(len(ids) for ids in stats["dropped_too_long"].values())
    assert dropped > 0 and stats["rows"]["train"] + stats["rows"]["eval"] + dropped == len(demo_problems())
    assert stats["tokens"]["example"]["max"] <= 100
    assert f"dropped as longer than 100: {dropped}" in capsys.readouterr().out


def test_bad_input_gets_one_line_and_no_output(demo_data, demo_model, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert prepare_data.main(["--data", str(tmp_path / "missing"), "--model", str(demo_model), "--out", str(out)]) == 2
    assert "download_dataset.py" in one_error_line(capsys.readouterr())
    assert prepare_data.main(["--data", str(demo_data), "--model", str(demo_data), "--out", str(out)]) == 2
    assert "not a model folder" in one_error_line(capsys.readouterr())
    with pytest.raises(SystemExit) as refused:
        prepare_data.main(["--data", str(demo_data), "--model", str(demo_model), "--out", str(out),
                           "--eval-fraction", "1"])
    assert refused.value.code == 2 and "--eval-fraction" in one_error_line(capsys.readouterr())
    rows = [{k: v for k, v in p.items() if k != "code"} for p in demo_problems()[:5]]
    download_dataset.main(["--dataset", str(write_jsonl(tmp_path / "nocode.jsonl", rows)), "--out",
                           str(tmp_path / "nocode")])
    capsys.readouterr()
    assert prepare_data.main(["--data", str(tmp_path / "nocode"), "--model", str(demo_model), "--out", str(out)]) == 2
    assert "'code'" in one_error_line(capsys.readouterr())
    assert not out.exists()


def test_guide_template_and_failed_rerun_keeps_previous_output(demo_data, demo_model, tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    assert prepare_data.main(["--data", str(demo_data), "--model", str(demo_model), "--out", str(out), "--template",
                              "guide", "--check-tests", "off"]) == 0
    before = folders.read_json(out / folders.PREPARED_STATS)
    assert before["settings"]["template"] == "guide"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the user presses Ctrl-C while the new output is being written

    monkeypatch.setattr(folders, "write_json", crash)
    assert prepare_data.main(["--data", str(demo_data), "--model", str(demo_model), "--out", str(out), "--check-tests",
                              "off"]) == 130
    monkeypatch.undo()
    assert folders.read_json(out / folders.PREPARED_STATS) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_rows_without_a_task_id_get_one_each(demo_model, tmp_path):
    import download_dataset

    rows = [{**problem, "task_id": None} for problem in demo_problems()[:6]]
    source = write_jsonl(tmp_path / "no_ids.jsonl", rows)
    assert download_dataset.main(["--dataset", str(source), "--out", str(tmp_path / "data")]) == 0
    assert prepare_data.main(["--data", str(tmp_path / "data"), "--model", str(demo_model), "--out",
                              str(tmp_path / "p"),
                              "--eval-fraction", "0.34"]) == 0
    stats = json.loads((tmp_path / "p" / folders.PREPARED_STATS).read_text(encoding="utf-8"))
    assert stats["problems"] == 6 and stats["duplicates_skipped"] == 0
    assert sorted(stats["task_ids"]["train"] + stats["task_ids"]["eval"]) == [f"row-{i}" for i in range(6)]
