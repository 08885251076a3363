"""Published evaluation protocols, so that a score can be set beside a published one: each renders a problem as
its harness does and stops where it stops. evaluate.py --protocol picks one; `project` is the template the model was
trained with.

    evalplus   EvalPlus (github.com/evalplus/evalplus), as in Qwen2.5-Coder's tech report (Table 5: HumanEval,
               HumanEval+, MBPP, MBPP+, greedy pass@1). A base model completes the task prompt directly: for MBPP
               the docstring of MBPP+'s `prompt` field, '\"\"\"\\n{text}\\n{first assert}\\n\"\"\"\\n', for HumanEval
               its code prompt; stops: EvalPlus's EOS list plus, for MBPP, '\\n\"\"\"' and '\\nassert', for HumanEval
               '\\ndef ', '\\nclass ', '\\nimport ', '\\nfrom ', '\\nassert ' (evalplus/provider/utility.py). A model
               with a chat template (EvalPlus's test for a chat model) gets EvalPlus's raw chat prompt: that task
               prompt in a fence after EvalPlus's instruction, and the answer opened with EvalPlus's response
               prefix and "```python", stopping at the closing fence.
    lm-eval    lm-evaluation-harness's `mbpp` task (lm_eval/tasks/mbpp/mbpp.yaml): 3-shot, "You are an expert
               Python programmer, and here is your task: {text} Your code should pass these tests:\\n\\n{3 asserts}
               \\n[BEGIN]\\n", the shots MBPP's problems 2, 3 and 4 with their solutions and "\\n[DONE]", joined by
               blank lines; stops at "[DONE]". MBPP only.

Standard library only.
"""

from __future__ import annotations

from pipeline.prompts import FENCE, Template, render_chat

# EvalPlus's EOS list (evalplus/provider/utility.py); the end-of-text tokens among them are the tokenizer's EOS here.
EVALPLUS_STOPS = ("\nif __name__", "\ndef main(", "\nprint(")
EVALPLUS_MBPP_STOPS = ('\n"""', "\nassert")
EVALPLUS_HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nimport ", "\nfrom ", "\nassert ")
EVALPLUS_INSTRUCTION = ("Please provide a self-contained Python script that solves the following problem in a "
                        "markdown code block:")
EVALPLUS_RESPONSE = ("Below is a Python script with a self-contained function that solves the problem and passes "
                     "corresponding tests:")
SPLITTER = "-[[]]-this-is-really-our-highest-priority-[[]]-"  # EvalPlus's, to cut the rendered answer's opening


def evalplus_task(task: str, tests: list[str], as_code: bool) -> str:
    """EvalPlus's task prompt: the dataset's `prompt` (HumanEval's code; for MBPP+, a docstring of the task and its
    first assert) as its codegen.py passes it on: stripped, then one newline."""
    prompt = task if as_code else f'"""\n{task}\n{tests[0]}\n"""\n'
    return prompt.strip() + "\n"


def evalplus_base(task: str, tests: list[str], tokenizer, as_code: bool) -> str:
    return evalplus_task(task, tests, as_code)


def evalplus_chat(task: str, tests: list[str], tokenizer, as_code: bool) -> str:
    """EvalPlus's make_raw_chat_prompt: the task in a fence after the instruction, then the assistant's turn opened
    with the response prefix and a ```python fence, cut where the answer would begin."""
    user = f"{EVALPLUS_INSTRUCTION}\n{FENCE}\n{evalplus_task(task, tests, as_code).strip()}\n{FENCE}\n"
    answer = f"{EVALPLUS_RESPONSE}\n{FENCE}python\n{SPLITTER}\n{FENCE}\n"
    return render_chat(tokenizer, user, answer).split(SPLITTER)[0]


EVALPLUS_MBPP = Template("evalplus", None, EVALPLUS_STOPS + EVALPLUS_MBPP_STOPS, continues_code=True, fits=("mbpp",),
                         render=evalplus_base)
EVALPLUS_HUMANEVAL = Template("evalplus", None, EVALPLUS_STOPS + EVALPLUS_HUMANEVAL_STOPS, continues_code=True,
                              fits=("humaneval",), render=evalplus_base)
EVALPLUS_CHAT = Template("evalplus", None, EVALPLUS_STOPS + ("\n" + FENCE,), continues_code=True,
                         fits=("mbpp", "humaneval"), chat=True, opens_fence=True, render=evalplus_chat)

# lm-evaluation-harness's three shots (lm_eval/tasks/mbpp/utils.py, list_fewshot_samples): MBPP's problems 2, 3, 4,
# their solutions with the dataset's \r\n line ends and their asserts as stored, trailing spaces included.
LM_EVAL_SHOTS = [
    ("Write a function to find the similar elements from the given two tuple lists.",
     "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n  return (res) ",
     ["assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
      "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
      "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)"]),
    ("Write a python function to identify non-prime numbers.",
     "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):\r\n"
     "        if n % i == 0:\r\n            result = True\r\n    return result",
     ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True", "assert is_not_prime(35) == True"]),
    ("Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
     "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
     "  return largest_nums",
     ["assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
      "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
      "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]"]),
]


def lm_eval_text(task: str, tests: list[str]) -> str:
    """mbpp.yaml's doc_to_text: the task as stored, its three asserts as stored."""
    return (f"You are an expert Python programmer, and here is your task: {task} Your code should pass these "
            f"tests:\n\n" + "\n".join(tests) + "\n[BEGIN]\n")


def lm_eval(task: str, tests: list[str], tokenizer, as_code: bool) -> str:
    """The 3-shot context lm-evaluation-harness builds: each shot's text, its solution and "\\n[DONE]" (the
    target delimiter is empty), joined and followed by a blank line (its few-shot delimiter), then the problem."""
    shots = "\n\n".join(lm_eval_text(text, shot_tests) + code + "\n[DONE]" for text, code, shot_tests in LM_EVAL_SHOTS)
    return shots + "\n\n" + lm_eval_text(task, tests)


LM_EVAL = Template("lm-eval", None, ("[DONE]",), continues_code=False, fits=("mbpp",), render=lm_eval)

PROTOCOLS = ("project", "evalplus", "lm-eval")


def protocol_template(name: str, shape: str, tokenizer) -> Template | None:
    """The template of a published protocol for data of a shape, as the harness picks it for this tokenizer; None
    for `project` (the model's own template)."""
    if name == "project":
        return None
    if name == "lm-eval":
        return LM_EVAL
    if getattr(tokenizer, "chat_template", None):
        return EVALPLUS_CHAT
    return EVALPLUS_MBPP if shape == "mbpp" else EVALPLUS_HUMANEVAL
