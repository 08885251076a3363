import argparse

import pytest
from conftest import demo_problems

import common
import inference


class FakeTokenizer:
    """Character-level tokenizer whose pad token equals its EOS token, as Qwen's does."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(ch) for ch in text]}


def test_guide_template_is_the_guides_format():
    assert common.format_prompt("guide", "Add two numbers.") + "return a + b" == "Task: Add two numbers.\nSolution:\nreturn a + b"


def test_tests_template_shows_every_assert_before_the_solution():
    prompt = common.format_prompt("tests", "Add.", ["assert add(1, 2) == 3", "assert add(0, 0) == 0"])
    assert prompt == "Task: Add.\nYour code should pass these tests:\nassert add(1, 2) == 3\nassert add(0, 0) == 0\nSolution:\n"


def test_unknown_template_is_refused():
    with pytest.raises(ValueError, match="unknown template"):
        common.format_prompt("alpaca", "x")


def test_prompt_is_masked_and_eos_is_trained_although_pad_equals_eos():
    tokenizer = FakeTokenizer()
    example = common.encode_example(tokenizer, "Task: t\nSolution:\n", "x = 1")
    n_prompt = len("Task: t\nSolution:\n")
    assert example["labels"][:n_prompt] == [common.IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == [ord(c) for c in "x = 1"] + [tokenizer.eos_token_id]
    assert example["input_ids"][-1] == tokenizer.pad_token_id  # the EOS *is* the pad id, and still a label
    assert len(example["input_ids"]) == len(example["labels"]) == len(example["attention_mask"])


def test_cut_at_stop_removes_an_invented_next_task():
    assert inference.cut_at_stop("def f():\n    pass\nTask: another one") == "def f():\n    pass"
    assert inference.cut_at_stop("def f(): pass") == "def f(): pass"


def test_atomic_output_dir_keeps_previous_output_when_writing_fails(tmp_path):
    out = tmp_path / "out"
    with common.atomic_output_dir(out) as tmp:
        (tmp / "result.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with common.atomic_output_dir(out) as tmp:
            (tmp / "result.txt").write_text("half")
            raise RuntimeError("crash while writing")
    assert (out / "result.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind


def test_positive_refuses_zero_and_negative():
    parse = common.positive(float)
    assert parse("2e-4") == 2e-4
    for bad in ("0", "-1", "abc"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


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
