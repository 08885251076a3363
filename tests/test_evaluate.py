import json

import pytest

from pipeline import folders, inference, models, prompts, sandbox, scoring
from pipeline.cli import StageError

import evaluate
from conftest import one_error_line


def test_completions_file_is_scored_without_loading_a_model(demo_prepared, tmp_path, monkeypatch, capsys):
    from datasets import load_from_disk

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", no_model)
    rows = load_from_disk(str(demo_prepared))["train"].select(range(4))
    completions = tmp_path / "completions.jsonl"
    with open(completions, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({"task_id": row["task_id"],
                                "completion": row["code"] if i < 3 else "def nothing(): pass"}) + "\n")
    out = tmp_path / "results"
    assert evaluate.main(["--completions", str(completions), "--data", str(demo_prepared), "--split", "train",
                          "--limit", "4",
                          "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"completions.jsonl", "summary.json", "comparison.md", "pass_at_k.png",
                                               folders.OWNER}
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))["models"]["completions"]
    assert summary["counts"] == {"passed": 3, "failed": 0, "timeout": 0, "error": 1}
    assert summary["problems"] == 4 and summary["pass@1"] == pytest.approx(3 / 4)  # the problems the file covers
    verdicts = [json.loads(line) for line in (out / "completions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [v["status"] for v in verdicts] == ["passed", "passed", "passed", "error"]
    assert "| completions |" in capsys.readouterr().out


def test_pass_at_k_is_only_reported_for_k_up_to_the_samples_of_every_problem(demo_prepared, tmp_path, capsys):
    rows = [{"task_id": "a", "status": "failed"}, {"task_id": "a", "status": "failed"}, {"task_id": "b",
                                                                                         "status": "failed"}]
    summary = scoring.summarize(rows, num_samples=5)
    assert summary["pass@1"] == 0.0 and "pass@2" not in summary  # b has one sample: pass@2 would read 100 %
    with pytest.raises(ValueError):
        scoring.pass_at_k(1, 0, 2)

    from datasets import load_from_disk

    rows = load_from_disk(str(demo_prepared))["train"].select(range(3))
    completions = tmp_path / "one_each.jsonl"
    completions.write_text("".join(json.dumps({"task_id": row["task_id"], "completion": "def wrong(): pass"}) + "\n"
                                   for row in rows), encoding="utf-8")
    flags = ["--completions", str(completions), "--data", str(demo_prepared), "--split", "train", "--limit", "3"]
    assert evaluate.main([*flags, "--num-samples", "5", "--out", str(tmp_path / "r")]) == 2
    assert "only 1 completion(s)" in one_error_line(capsys.readouterr()) and not (tmp_path / "r").exists()
    assert evaluate.main([*flags, "--out", str(tmp_path / "r")]) == 0
    scored = json.loads((tmp_path / "r" / "summary.json").read_text(encoding="utf-8"))["models"]["completions"]
    assert scored["pass@1"] == 0.0 and "pass@5" not in scored


def test_problems_missing_from_a_completions_file_count_as_unsolved(demo_prepared, tmp_path, capsys):
    from datasets import load_from_disk

    rows = load_from_disk(str(demo_prepared))["eval"]
    completions = tmp_path / "partial.jsonl"
    completions.write_text(json.dumps({"task_id": rows[0]["task_id"], "completion": rows[0]["code"]}) + "\n",
                           encoding="utf-8")
    assert evaluate.main(["--completions", str(completions), "--data", str(demo_prepared), "--out",
                          str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert f"{len(rows) - 1} of {len(rows)} problems of {demo_prepared}/ (eval split) have no completion" in err
    scored = json.loads((tmp_path / "r" / "summary.json").read_text(encoding="utf-8"))["models"]["completions"]
    assert scored["problems"] == len(rows) and scored["pass@1"] == pytest.approx(1 / len(rows))
    assert len(scored["missing"]) == len(rows) - 1


def test_an_earlier_evaluation_is_kept_unless_overwrite(demo_prepared, tmp_path, capsys):
    from datasets import load_from_disk

    row = load_from_disk(str(demo_prepared))["eval"][0]
    completions = tmp_path / "c.jsonl"
    completions.write_text(json.dumps({"task_id": row["task_id"], "completion": row["code"]}) + "\n", encoding="utf-8")
    flags = ["--completions", str(completions), "--data", str(demo_prepared), "--limit", "1", "--out",
             str(tmp_path / "r")]
    assert evaluate.main(flags) == 0
    before = (tmp_path / "r" / "summary.json").read_text(encoding="utf-8")
    capsys.readouterr()
    assert evaluate.main(flags) == 2
    assert ("--overwrite" in one_error_line(capsys.readouterr())
            and (tmp_path / "r" / "summary.json").read_text(encoding="utf-8") == before)
    assert evaluate.main(flags + ["--overwrite"]) == 0


def test_bad_completions_and_flags_are_refused(demo_prepared, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "no-such-task", "completion": "x"}\n', encoding="utf-8")
    assert evaluate.main(["--completions", str(bad), "--data", str(demo_prepared), "--out", str(tmp_path / "r")]) == 2
    assert "no-such-task" in one_error_line(capsys.readouterr())
    bad.write_text("not json\n", encoding="utf-8")
    assert evaluate.main(["--completions", str(bad), "--data", str(demo_prepared), "--out", str(tmp_path / "r")]) == 2
    assert "line 1" in one_error_line(capsys.readouterr())
    assert evaluate.main(["--num-samples", "5", "--data", str(demo_prepared)]) == 2
    assert "--temperature" in one_error_line(capsys.readouterr())
    assert not (tmp_path / "r").exists()


SOLUTION = "def add(a, b):\n    return a + b"


@pytest.mark.parametrize("completion", [
    SOLUTION,  # bare code
    f"```python\n{SOLUTION}\n```",  # fenced
    f"Here is the function:\n\n```python\n{SOLUTION}\n```\n\nIt adds the two numbers.",  # fenced, prose around it
    f"```\n{SOLUTION}\n```",  # fenced without a language
    f"```python\n{SOLUTION}\n",  # a fence the token limit left open
])
def test_the_code_that_runs_is_extracted_from_every_common_answer_shape(completion):
    code = prompts.extract_code(completion)
    assert code.strip() == SOLUTION
    program = sandbox.build_program(code, ["assert add(1, 2) == 3"])
    assert sandbox.Sandbox(workers=1).run(program).status == "passed"


@pytest.mark.parametrize("stop", prompts.TASK_STOPS)
def test_an_answer_may_start_with_a_stop_sequence(stop):
    """Stop sequences match only inside the generated text: a prompt ends with a newline, and an answer that
    starts with ``` or `assert` (or `print(`, `if __name__`, `Task:`) is not cut to nothing."""
    answer = stop.lstrip("\n") + "python\n" + SOLUTION if stop == "\n```" else stop.lstrip("\n") + "x\n" + SOLUTION
    assert prompts.DEFAULT.cut(answer).startswith(stop.lstrip("\n"))


def test_an_opening_fence_is_kept_and_a_closing_one_ends_the_answer():
    answer = f"Sure:\n```python\n{SOLUTION}\n```\nassert add(1, 2) == 3\n"
    assert prompts.DEFAULT.cut(answer) == f"Sure:\n```python\n{SOLUTION}"
    assert prompts.DEFAULT.cut(f"{SOLUTION}\nassert add(1, 2) == 3") == SOLUTION  # the model's own tests are cut
    assert prompts.CODE.cut(f"{SOLUTION}\n\n\ndef main():\n    pass") == f"{SOLUTION}\n\n"


def test_generation_stops_are_looked_for_in_the_completion_only(demo_model):
    """The stop criterion given to model.generate never sees the prompt: a prompt ending in a newline followed
    by a generated ``` is not a stop, a generated newline and ``` after an opened fence is."""
    import torch

    tokenizer = models.load_tokenizer(demo_model)
    prompt = prompts.encode_prompt(tokenizer, prompts.TESTS.prompt("Add two numbers.", ["assert add(1, 2) == 3"]))
    criteria = inference.stop_criteria(tokenizer, prompts.TESTS, len(prompt))

    def stopped(generated: str) -> bool:
        ids = prompt + tokenizer(generated, add_special_tokens=False)["input_ids"]
        return bool(criteria(torch.tensor([ids]), None)[0])

    assert not stopped("```") and not stopped("assert add(1, 2) == 3") and not stopped("```python\ndef add(a, b):")
    assert stopped("```python\ndef add(a, b):\n    return a + b\n```") and stopped("def add(a, b):\n    return a + "
                                                                                   "b\nassert ")


def test_a_fenced_correct_solution_passes_evaluation(demo_prepared, tmp_path):
    from datasets import load_from_disk

    rows = load_from_disk(str(demo_prepared))["eval"]
    completions = tmp_path / "fenced.jsonl"
    fenced = [{"task_id": row["task_id"], "completion": f"Here you go:\n```python\n{row['code']}\n```\nDone."}
              for row in rows]
    completions.write_text("".join(json.dumps(row) + "\n" for row in fenced), encoding="utf-8")
    assert evaluate.main(["--completions", str(completions), "--data", str(demo_prepared), "--out",
                          str(tmp_path / "r")]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text(encoding="utf-8"))
    assert summary["models"]["completions"]["pass@1"] == 1.0
    scored = [json.loads(line)
              for line in (tmp_path / "r" / "completions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(row["completion"].startswith("Here you go:") and row["code"].startswith("def ") for row in scored)


def test_models_are_named_after_their_folders_the_nearest_folder_above_telling_two_apart(tmp_path):
    paths = [tmp_path / "runs" / "r8" / "final", tmp_path / "runs" / "r16" / "checkpoints" / "final",
             tmp_path / "runs" / "r16" / "checkpoints" / "checkpoint-50", tmp_path / "export"]
    assert evaluate.names(paths) == ["r8/fine-tuned", "checkpoints/fine-tuned", "checkpoint-50", "export"]
    twice = [tmp_path / "a" / "final", tmp_path / "b" / "final", tmp_path / "a" / "final"]
    with pytest.raises(StageError, match="is given twice: each model once"):
        evaluate.names(twice)


def test_a_wrong_against_is_refused_before_anything_is_generated(trained_smoke, demo_model, demo_prepared, tmp_path,
                                                                 monkeypatch, capsys):
    def no_generation(*args, **kwargs):
        raise AssertionError("generated before refusing")

    monkeypatch.setattr(inference, "generate", no_generation)
    code = evaluate.main(["--model", str(demo_model), "--data", str(demo_prepared), "--adapter",
                          str(trained_smoke / folders.FINAL_ADAPTER), "--compare-base", "--against", "r16",
                          "--out", str(tmp_path / "results")])
    assert code == 2 and not (tmp_path / "results").exists()
    assert "--against r16: no model of that name here (the models: base, fine-tuned)" in capsys.readouterr().err


def test_checkpoints_takes_a_run_folder_and_says_what_else_it_was_given(trained_smoke, tmp_path, capsys):
    for given, said in [(tmp_path / "nope", "no such folder"),
                        (trained_smoke / folders.FINAL_ADAPTER, "that is one adapter; --checkpoints takes the run "
                                                                "folder that holds it"),
                        (tmp_path, "not a run folder train.py wrote")]:
        assert evaluate.main(["--checkpoints", str(given), "--out", str(tmp_path / "results")]) == 2
        assert said in capsys.readouterr().err
