"""Wrong or unusual input, run as a user runs it (each stage as its own process, or its main() in this one where a
case loads or trains a model): one `error:` line, a non-zero exit, no traceback, and earlier outputs unchanged.
Cases that need a trained run share one."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import folders

import prepare_data
import train
from conftest import ROOT, demo_problems, final_error_line, one_error_line, single_error, snapshot, stage, write_jsonl


def copy_model(demo_model: Path, to: Path) -> Path:
    shutil.copytree(demo_model, to)
    return to


# ---- output paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["train.py", "prepare_data.py", "evaluate.py"])
def test_out_naming_a_file_is_refused_and_the_file_kept(script, demo_model, demo_data, demo_prepared, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine", encoding="utf-8")
    flags = {"train.py": ["--model", demo_model, "--data", demo_prepared],
             "prepare_data.py": ["--model", demo_model, "--data", demo_data],
             "evaluate.py": ["--model", demo_model, "--data", demo_prepared]}[script]
    assert "is a file, not a folder" in single_error(stage(ROOT / script, *flags, "--out", target))
    assert target.read_text(encoding="utf-8") == "mine"


def test_a_folder_that_cannot_be_written_gives_one_line(demo_model, demo_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "prepared"
    assert prepare_data.main(["--model", str(demo_model), "--data", str(demo_data), "--out", str(out), "--check-tests",
                              "off"]) == 0
    before = snapshot(out)

    def refuse(*args, **kwargs):  # what a read-only folder does (root, as in CI, is never refused by chmod)
        raise PermissionError(13, "Permission denied", str(out))

    monkeypatch.setattr(folders, "replace_dir", refuse)
    assert prepare_data.main(["--model", str(demo_model), "--data", str(demo_data), "--out", str(out), "--seed", "3",
                              "--check-tests", "off"]) == 1
    assert "permission denied" in one_error_line(capsys.readouterr())
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


# ---- data files --------------------------------------------------------------------------------------------


def test_dataset_files_that_are_empty_malformed_binary_or_a_folder(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    assert "is empty" in single_error(stage(ROOT / "download_dataset.py", "--dataset", empty, "--out", tmp_path / "d"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(demo_problems()[0]) + "\n{not json\n", encoding="utf-8")
    assert "broken.jsonl, line 2: not valid JSON" in single_error(stage(ROOT / "download_dataset.py", "--dataset",
                                                                        broken, "--out", tmp_path / "d"))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    assert "not UTF-8" in single_error(stage(ROOT / "download_dataset.py", "--dataset", binary, "--out",
                                             tmp_path / "d"))
    assert "is a folder" in single_error(stage(ROOT / "download_dataset.py", "--dataset", tmp_path, "--out",
                                               tmp_path / "d"))
    assert not (tmp_path / "d").exists()


def test_an_eval_fraction_that_leaves_no_training_problem_is_named(demo_model, tmp_path):
    source = write_jsonl(tmp_path / "three.jsonl", demo_problems()[:3])
    assert stage(ROOT / "download_dataset.py", "--dataset", source, "--out", tmp_path / "data").returncode == 0
    error = single_error(stage(ROOT / "prepare_data.py", "--data", tmp_path / "data", "--model", demo_model,
                               "--out", tmp_path / "p", "--eval-fraction", "0.9"))
    assert "--eval-fraction 0.9 leaves no problem for the train split" in error and "--max-length" not in error


def test_a_binary_completions_file(demo_prepared, tmp_path):
    binary = tmp_path / "completions.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    error = single_error(stage(ROOT / "evaluate.py", "--completions", binary, "--data", demo_prepared, "--out",
                               tmp_path / "r"))
    assert "not a UTF-8 text file" in error and not (tmp_path / "r").exists()


def test_dashboard_on_json_of_another_shape(tmp_path):
    other = tmp_path / "metrics.json"
    other.write_text("[1, 2, 3]", encoding="utf-8")
    assert "not a metrics.json written by train.py" in single_error(stage(ROOT / "tools" / "training_dashboard.py",
                                                                          "--run", other))


# ---- model folders -----------------------------------------------------------------------------------------


def test_a_model_folder_without_tokenizer_files(demo_model, demo_prepared, tmp_path):
    model = copy_model(demo_model, tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    error = single_error(stage(ROOT / "train.py", "--model", model, "--data", demo_prepared, "--out", tmp_path / "c"))
    assert "has no tokenizer files" in error and not (tmp_path / "c").exists()
    verified = stage(ROOT / "verify_model.py", "--model", model)
    assert (verified.returncode == 1 and "✗ model folder complete" in verified.stdout
            and "✓ tokenizer loads" not in verified.stdout)


def test_a_truncated_weights_file_and_a_config_that_is_not_json(demo_model, demo_prepared, tmp_path):
    model = copy_model(demo_model, tmp_path / "model")
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "is damaged" in single_error(stage(ROOT / "download_model.py", "--model-id", model, "--out",
                                              tmp_path / "copy"))
    assert not (tmp_path / "copy").exists()
    assert "is damaged" in single_error(stage(ROOT / "train.py", "--model", model, "--data", demo_prepared, "--out",
                                              tmp_path / "c"))
    shutil.copy(next(demo_model.glob("*.safetensors")), weights)
    (model / "config.json").write_text("{ not json", encoding="utf-8")
    assert "config.json is not valid JSON" in single_error(stage(ROOT / "generate.py", "--model", model, "--prompt",
                                                                 "x"))


def test_a_tokenizer_of_another_model_is_refused(demo_model, demo_prepared, tmp_path):
    model = copy_model(demo_model, tmp_path / "model")
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    config["vocab_size"] = 100  # the tokenizer has 1,024 tokens
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    error = single_error(stage(ROOT / "generate.py", "--model", model, "--base-only", "--prompt", "x"))
    assert "1,024 tokens but the model's embedding only 100" in error


# ---- identity: data prepared again, another base, two runs in one folder -------------------------------------


@pytest.fixture(scope="module")
def short_run(demo_model, demo_prepared, tmp_path_factory):
    """A 2-step run on a copy of the prepared data, for the cases below."""
    root = tmp_path_factory.mktemp("identity")
    shutil.copytree(demo_prepared, root / "prepared")
    assert train.main(["--model", str(demo_model), "--data", str(root / "prepared"), "--out", str(root / "run"),
                       "--max-steps", "2", "--save-steps", "1", "--batch-size", "4", "--grad-accum", "1"]) == 0
    return root


@pytest.mark.slow
def test_data_prepared_again_is_refused_by_resume_and_by_evaluation(short_run, demo_model, demo_data, tmp_path):
    prepared, run = tmp_path / "prepared", tmp_path / "run"
    shutil.copytree(short_run / "prepared", prepared)
    shutil.copytree(short_run / "run", run)
    assert prepare_data.main(["--data", str(demo_data), "--model", str(demo_model), "--out", str(prepared), "--seed",
                              "7", "--check-tests", "off"]) == 0
    before = snapshot(run)
    error = single_error(stage(ROOT / "train.py", "--model", demo_model, "--data", prepared, "--out", run,
                               "--max-steps", "4", "--save-steps", "1", "--batch-size", "4", "--grad-accum", "1",
                               "--resume"))
    assert "the prepared data" in error and "prepared again" in error and snapshot(run) == before
    error = single_error(stage(ROOT / "evaluate.py", "--model", demo_model, "--adapter", run / "final", "--data",
                               prepared, "--out", tmp_path / "r"))
    assert "was trained on" in error and "measures memory" in error and not (tmp_path / "r").exists()


def test_verify_model_refuses_an_adapter_on_another_base(short_run, demo_model, tmp_path, capsys):
    import verify_model

    other = copy_model(demo_model, tmp_path / "other")
    folders.write_json(other / folders.DOWNLOAD_INFO, {"source": "hub", "model_id": "someone/other-model"})
    assert verify_model.main(["--model", str(other), "--adapter", str(short_run / "run" / "final")]) == 1
    printed = capsys.readouterr()
    assert "✗ adapter was trained on this base model: it was trained on demo/tiny-qwen2" in printed.out
    assert "Traceback" not in printed.out + printed.err


@pytest.mark.slow
def test_a_second_train_into_the_same_folder_is_refused_and_a_stale_lock_cleared(short_run, demo_model, tmp_path,
                                                                                 capsys):
    run = tmp_path / "run"
    shutil.copytree(short_run / "run", run)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / folders.RUN_LOCK).write_text(f"{other.pid} {os.uname().nodename}", encoding="utf-8")
        before = snapshot(run)
        error = single_error(stage(ROOT / "train.py", "--model", demo_model, "--data", short_run / "prepared", "--out",
                                   run,
                                   "--max-steps", "3", "--save-steps", "1", "--batch-size", "4", "--grad-accum", "1",
                                   "--resume"))
        assert f"in use by another train.py (pid {other.pid})" in error and snapshot(run) == before
    finally:
        other.kill()
        other.wait()
    assert train.main(["--model", str(demo_model), "--data", str(short_run / "prepared"), "--out", str(run),
                       "--max-steps", "3", "--save-steps", "1", "--batch-size", "4", "--grad-accum", "1",
                       "--resume"]) == 0  # the lock's process has gone
    assert "removing the stale lock" in capsys.readouterr().err
    assert not (run / folders.RUN_LOCK).exists() and (run / "checkpoint-3").is_dir()


def test_an_adapter_of_another_shape_is_refused_by_generate_and_evaluate(short_run, demo_model, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    import evaluate
    import generate

    adapter = tmp_path / "adapter"
    shutil.copytree(short_run / "run" / "final", adapter)
    weights = load_file(str(adapter / folders.ADAPTER_WEIGHTS))
    save_file({name: tensor[..., :64].contiguous() if "lora_A" in name else tensor for name, tensor in weights.items()},
              str(adapter / folders.ADAPTER_WEIGHTS))  # as if made for a model of half the width
    assert generate.main(["--model", str(demo_model), "--adapter", str(adapter), "--prompt", "x"]) == 2
    assert "does not fit the model" in final_error_line(capsys.readouterr())
    assert evaluate.main(["--model", str(demo_model), "--adapter", str(adapter), "--data", str(short_run / "prepared"),
                          "--split", "train", "--limit", "1", "--out", str(tmp_path / "r")]) == 2
    assert "does not fit the model" in final_error_line(capsys.readouterr()) and not (tmp_path / "r").exists()
