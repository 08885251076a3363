"""One rule for which model is loaded (pipeline/inference.py: loading): an adapter only on the base and weights it
was trained on, a merged model as saved and never with an adapter on top, in every stage alike; and a sandbox that
cannot run a passing program is an error, never a score of 0 %."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from pipeline import folders, inference, models, sandbox

import evaluate
import export
import generate
import train
import verify_model
from conftest import one_error_line, train_argv


def adapter_copy(trained_smoke: Path, tmp_path: Path, name: str, **recorded) -> Path:
    """The smoke run's final adapter with its training record changed: another base's id, another precision."""
    adapter = tmp_path / name
    shutil.copytree(trained_smoke / folders.FINAL_ADAPTER, adapter)
    settings = folders.read_json(adapter / folders.TRAINING_SETTINGS)
    folders.write_json(adapter / folders.TRAINING_SETTINGS, {**settings, **recorded})
    return adapter


def merged_folder(demo_model: Path, tmp_path: Path, adapter: Path, record: bool = True) -> Path:
    """A model folder as export.py leaves one (its weights stand for base + adapter merged), with or without its
    export_settings.json."""
    merged = tmp_path / "my export"
    shutil.copytree(demo_model, merged)
    if record:
        folders.write_json(merged / folders.EXPORT_SETTINGS, {
            "template": "tests", "base_model_id": models.model_id(demo_model), "adapter": str(adapter.resolve()),
            "dtype": "float32"})
    return merged


def test_an_adapter_on_a_merged_model_is_refused_not_applied_twice(demo_model, demo_prepared, trained_smoke,
                                                                   tmp_path, capsys):
    adapter = trained_smoke / folders.FINAL_ADAPTER
    merged = merged_folder(demo_model, tmp_path, adapter)
    assert evaluate.main(["--model", str(merged), "--adapter", str(adapter), "--data", str(demo_prepared),
                          "--out", str(tmp_path / "r")]) == 2
    error = one_error_line(capsys.readouterr())
    assert "is a merged model" in error and "applied twice" in error and not (tmp_path / "r").exists()
    assert generate.main(["--model", str(merged), "--adapter", str(adapter), "--prompt", "x"]) == 2
    assert "applied twice" in one_error_line(capsys.readouterr())
    assert verify_model.main(["--model", str(merged), "--adapter", str(adapter)]) == 1
    assert "✗ adapter was trained on this base model" in capsys.readouterr().out
    assert export.main(["--model", str(merged), "--adapter", str(adapter), "--out", str(tmp_path / "e")]) == 2
    assert "is a merged model already" in one_error_line(capsys.readouterr())


def test_an_adapter_of_another_base_of_the_same_shape_is_refused_by_every_stage(demo_model, demo_prepared,
                                                                                trained_smoke, tmp_path, capsys):
    """The llama demo's adapter fits the Qwen2 demo's layers: only its record tells that it belongs elsewhere."""
    adapter = adapter_copy(trained_smoke, tmp_path, "final", base_model_id="demo/tiny-llama")
    run = tmp_path / "run"
    shutil.copytree(trained_smoke, run)
    for folder in [run / folders.FINAL_ADAPTER, *run.glob("checkpoint-*")]:
        settings = folders.read_json(folder / folders.TRAINING_SETTINGS)
        folders.write_json(folder / folders.TRAINING_SETTINGS, {**settings, "base_model_id": "demo/tiny-llama"})
    for chosen in (["--adapter", str(adapter)], ["--checkpoints", str(run)]):
        assert evaluate.main(["--model", str(demo_model), *chosen, "--data", str(demo_prepared), "--out",
                              str(tmp_path / "r")]) == 2
        assert "it was trained on demo/tiny-llama" in one_error_line(capsys.readouterr())
    assert generate.main(["--model", str(demo_model), "--adapter", str(adapter), "--prompt", "x"]) == 2
    assert "it was trained on demo/tiny-llama" in one_error_line(capsys.readouterr())
    assert verify_model.main(["--model", str(demo_model), "--adapter", str(adapter)]) == 1
    assert "✗ adapter was trained on this base model: it was trained on demo/tiny-llama" in capsys.readouterr().out


def test_an_adapter_trained_unquantised_is_scored_and_exported_unquantised(demo_model, demo_prepared, trained_smoke,
                                                                           tmp_path, capsys):
    adapter = adapter_copy(trained_smoke, tmp_path, "final", load_in_4bit=False)
    notes = []
    choice, load_in_4bit = inference.loading(demo_model, adapter, models.pick_device(), say=notes.append)
    assert not load_in_4bit and "trained on unquantised weights" in notes[0]
    args = evaluate.build_parser().parse_args(["--model", str(demo_model), "--adapter", str(adapter),
                                               "--compare-base", "--data", str(demo_prepared)])
    candidates = evaluate.candidates_of(args)
    assert [c.label for c in candidates] == ["base", "fine-tuned"]
    assert [c.load[1] for c in candidates] == [False, False]  # the base as the fine-tune's base: unquantised too
    args = export.build_parser().parse_args(["--model", str(demo_model), "--adapter", str(adapter), "--out",
                                             str(tmp_path / "e")])
    export.check(args)
    assert args.merge_into == "original"  # the weights it was trained against
    assert "trained on unquantised weights" in capsys.readouterr().err  # evaluate said how it loads them
    assert export.main(["--model", str(demo_model), "--adapter", str(adapter), "--out", str(tmp_path / "e"),
                        "--merge-into", "quantized"]) == 2
    assert "trained on unquantised weights" in one_error_line(capsys.readouterr())
    four_bit = inference.loading(demo_model, trained_smoke / folders.FINAL_ADAPTER, models.pick_device())
    assert four_bit[1]  # and a QLoRA adapter on the 4-bit weights it was trained on


def test_a_merged_model_is_scored_as_saved_with_or_without_its_record(demo_model, demo_prepared, trained_smoke,
                                                                      tmp_path):
    merged = merged_folder(demo_model, tmp_path, trained_smoke / folders.FINAL_ADAPTER, record=False)
    args = evaluate.build_parser().parse_args(["--model", str(demo_model), "--merged", str(merged), "--compare-base",
                                               "--data", str(demo_prepared)])
    base, candidate = evaluate.candidates_of(args)
    assert base.load[1] and candidate.merged and candidate.load[1] is False  # never quantised again
    assert candidate.load[0].dtype_name == models.stored_dtype(merged)


def test_an_adapter_given_as_a_merged_model_is_named_as_an_adapter(demo_model, demo_prepared, trained_smoke,
                                                                   tmp_path, capsys):
    final = trained_smoke / folders.FINAL_ADAPTER
    assert evaluate.main(["--model", str(demo_model), "--merged", str(final), "--data", str(demo_prepared),
                          "--out", str(tmp_path / "r")]) == 2
    error = one_error_line(capsys.readouterr())
    assert f"--merged {final}: that is an adapter" in error and f"--adapter {final}" in error
    assert "download_model" not in error


# ---- a sandbox that cannot run is said, never scored ---------------------------------------------------------


@pytest.mark.skipif(not sandbox.platforms.running_as_root(), reason="candidates run as other users only as root")
def test_a_private_temporary_folder_does_not_stop_the_sandbox(tmp_path, monkeypatch):
    private = tmp_path / "private-tmp"
    private.mkdir(mode=0o700)
    tmp_path.chmod(0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    box = sandbox.Sandbox(workers=1)
    assert box.drop_privileges and box.self_test() is None and box.workdir_root != str(private)
    assert not any(private.iterdir())


@pytest.fixture()
def broken_sandbox(monkeypatch, tmp_path):
    """Candidates would be run by an interpreter that does not exist: not one of them could pass."""
    missing = str(tmp_path / "no-python")
    monkeypatch.setattr(sandbox.Sandbox, "_choose_interpreter", lambda self: (missing, False))
    return missing


def test_scoring_checkpoints_with_a_sandbox_that_cannot_run_is_refused_before_training(broken_sandbox, demo_model,
                                                                                       demo_prepared, tmp_path,
                                                                                       capsys):
    out = tmp_path / "run"
    assert train.main(train_argv(demo_model, demo_prepared, out, "--score-checkpoints")) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the sandbox cannot run a one-line program" in error and broken_sandbox in error
    assert "would score 0 %" in error and not out.exists()


def test_evaluating_and_checking_tests_with_a_sandbox_that_cannot_run_are_errors(broken_sandbox, demo_model,
                                                                                 demo_data, demo_prepared, tmp_path,
                                                                                 capsys):
    import prepare_data

    completions = tmp_path / "c.jsonl"  # the reference solutions: every one would pass in a working sandbox
    problems = [json.loads(line) for line in folders.DEMO_PROBLEMS.read_text(encoding="utf-8").splitlines()]
    completions.write_text("".join(json.dumps({"task_id": str(p["task_id"]), "completion": p["code"]}) + "\n"
                                   for p in problems), encoding="utf-8")
    assert evaluate.main(["--completions", str(completions), "--data", str(demo_prepared), "--out",
                          str(tmp_path / "r")]) == 2
    assert "cannot run a one-line program" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert prepare_data.main(["--data", str(demo_data), "--model", str(demo_model), "--out",
                              str(tmp_path / "p")]) == 2
    assert "--check-tests off" in capsys.readouterr().err and not (tmp_path / "p").exists()

