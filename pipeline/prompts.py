"""The prompt templates: what the model is shown before its answer, and where its answer ends. The only place
a template is written down; every stage asks its Template record and never tests a template's name.

    guide   the original guide's format: "Task: ...\\nSolution:\\n"
    tests   the same with the problem's asserts, as the MBPP paper's prompt (the default for MBPP data): MBPP task
            texts rarely name the function the asserts call, so a model that never sees them cannot know its name
    code    the task is code to continue, as HumanEval defines its prompts
    none    raw text: trained without a prompt, every token; at inference the text given is continued
    chat    the task as a user turn rendered by the tokenizer's own chat template (instruct models); the answer is
            the assistant turn, ended by the template's end-of-turn token

Also here: the prompt and an example as token ids, with the prompt masked from the loss (labels by position).
Standard library only; the tokenizer is passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.cli import StageError

IGNORE_INDEX = -100  # label value that the loss skips (PyTorch's cross_entropy default ignore_index)

TASK_HEADER = "Task:"  # opens the guide and tests prompts; a new one in an answer means the model moved on
TESTS_HEADER = "Your code should pass these tests:"
FENCE = "```"

# Where an answer to a task ends besides EOS: a new task header means the model has moved on to inventing the
# next problem; top-level asserts, prints and a main guard are the model writing its own tests, which would run
# against the real ones (the stop words of bigcode-evaluation-harness's MBPP task, in spirit).
TASK_STOPS = ("\n" + TASK_HEADER, "\nassert ", "\nprint(", "\nif __name__", "\n" + FENCE)
# A continued function body: anything at the start of a line ends it (the stop words of the Codex paper and
# bigcode-evaluation-harness for HumanEval).
CODE_STOPS = ("\nclass ", "\ndef ", "\n#", "\n@", "\nif ", "\nprint(", "\n" + FENCE)


@dataclass(frozen=True)
class Template:
    """One prompt template: its text, the stop sequences of its answers, and what it is for."""

    name: str
    text: str | None  # with {task} and {tests}; None where `render` or the tokenizer's chat template renders it
    stops: tuple[str, ...]  # stop sequences, looked for in the generated text alone
    continues_code: bool  # the prompt is code (or text) that the answer continues: no task header, kept verbatim
    fits: tuple[str, ...]  # the data shapes (pipeline/data.py) it can prompt
    default_for: tuple[str, ...] = ()  # the data shapes it prompts unless --template says otherwise
    user_turn: str | None = None  # how its task reads as a chat user turn (for `chat` on that shape's data)
    chat: bool = False  # rendered with the tokenizer's chat template; the answer ends with its end of turn
    opens_fence: bool = False  # the prompt ends inside an open code block, which the answer's first fence closes
    render: Callable | None = None  # render(task, tests, tokenizer, as_code): a published harness's own prompt

    def prompt(self, task: str, tests: list[str] | None = None, tokenizer=None, as_code: bool = False) -> str:
        """The prompt part of an example: everything before the answer. `chat` needs the tokenizer; `as_code`
        says the task is code to complete (HumanEval), which a chat turn asks for in words."""
        if self.render is not None:
            return self.render(task, tests or [], tokenizer, as_code)
        shown = "\n".join(t.strip() for t in tests or [])
        if self.chat:
            form = CODE if as_code else (TESTS if tests else GUIDE)
            task = task if form.continues_code else task.strip()
            return render_chat(tokenizer, form.user_turn.format(task=task, tests=shown))
        if self.continues_code:
            return self.text.format(task=task)  # code keeps its indentation and final newline
        form = GUIDE if self is TESTS and not tests else self  # a task typed by hand has no asserts to show
        return form.text.format(task=task.strip(), tests=shown)

    def end_id(self, tokenizer) -> int:
        """The token an answer is trained to end with and stops at: EOS, or a chat template's end of turn."""
        return end_of_turn_id(tokenizer) if self.chat else tokenizer.eos_token_id

    def stop_ids(self, tokenizer) -> list[int]:
        return sorted({tokenizer.eos_token_id, self.end_id(tokenizer)})

    def find_stop(self, text: str) -> int | None:
        """Where an answer ends: the first stop sequence in `text`, which must be the generated text alone (a
        prompt's final newline followed by an answer that starts with ``` or assert is not a stop). A fence line
        ends an answer only where it closes a code block (see closes_block), never at an opening fence."""
        found = None
        for stop in self.stops:
            start = 0
            while (index := text.find(stop, start)) != -1:
                if stop != "\n" + FENCE or self.closes_block(text, index + 1):
                    found = index if found is None else min(found, index)
                    break
                start = index + 1
        return found

    def closes_block(self, text: str, fence: int) -> bool:
        """Whether the fence at `fence` closes a code block, whoever opened it: the answer (an odd count of fences
        before it), the prompt (`opens_fence`), or nobody: a bare fence (no language tag after it) right after code
        that the answer continues, or after an answer that is complete Python by itself, can only close. After
        prose ("Here is the code:") a bare fence opens a block."""
        before = text[:fence].count(FENCE) + self.opens_fence
        if before % 2 == 1:
            return True
        bare = not text[fence + len(FENCE):].split("\n", 1)[0].strip()
        return bare and before == 0 and (self.continues_code or is_python(text[:fence]))

    def cut(self, text: str) -> str:
        """Generated text cut at its first stop sequence (see find_stop)."""
        index = self.find_stop(text)
        return text if index is None else text[:index]


GUIDE = Template("guide", TASK_HEADER + " {task}\nSolution:\n", TASK_STOPS, continues_code=False,
                 fits=("mbpp", "instruction"), default_for=("instruction",), user_turn="{task}")
TESTS = Template("tests", TASK_HEADER + " {task}\n" + TESTS_HEADER + "\n{tests}\nSolution:\n", TASK_STOPS,
                 continues_code=False, fits=("mbpp",), default_for=("mbpp",),
                 user_turn="{task}\n" + TESTS_HEADER + "\n{tests}")
CODE = Template("code", "{task}", CODE_STOPS, continues_code=True, fits=("humaneval",), default_for=("humaneval",),
                user_turn="Complete the following Python function:\n" + FENCE + "python\n{task}" + FENCE)
NONE = Template("none", "{task}", (), continues_code=True, fits=("text",), default_for=("text",))
CHAT = Template("chat", None, TASK_STOPS, continues_code=False, fits=("mbpp", "humaneval", "instruction"), chat=True)

TEMPLATES = {template.name: template for template in (GUIDE, TESTS, CODE, NONE, CHAT)}
DEFAULT = TESTS  # an adapter or a typed task with nothing recorded: the project's own template, for MBPP


def get(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def default_for(shape: str) -> Template:
    """The template a data shape is trained and scored with unless --template says otherwise."""
    return next(template for template in TEMPLATES.values() if shape in template.default_for)


def fitting(shape: str) -> list[str]:
    """The names of the templates that can prompt data of a shape."""
    return [name for name, template in TEMPLATES.items() if shape in template.fits]


def require_fit(template: Template, shape: str) -> None:
    if shape not in template.fits:
        raise StageError(f"--template {template.name} does not fit {shape} data: choose one of "
                         f"{', '.join(fitting(shape))}")


# ----------------------------------------------------------------------------------------------------------
# Chat templates: the tokenizer's own, for instruct models.


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, user: str, answer: str | None = None) -> str:
    """The conversation as text: the user turn then the assistant's opening (or, with `answer`, its whole turn)."""
    if tokenizer is None or not has_chat_template(tokenizer):
        raise StageError("--template chat needs a tokenizer with a chat template (an instruct model's); this model "
                         "has none: use --template tests")
    messages = [{"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn in the tokenizer's chat template (<|im_end|> for ChatML models,
    <|eot_id|> for Llama 3): what a chat answer is trained to end with and where its generation stops."""
    marker = "ANSWER-7f3c"
    prompt, whole = render_chat(tokenizer, "x"), render_chat(tokenizer, "x", marker)
    after = whole[whole.rindex(marker) + len(marker):] if whole.startswith(prompt) and marker in whole else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    return ids[0] if ids else tokenizer.eos_token_id


# ----------------------------------------------------------------------------------------------------------
# Tokens: the prompt as training saw it, and one example with its prompt masked.


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids as training saw them: with the BOS where the tokenizer adds one (Llama; Qwen and GPT-2 add none)
    unless the text already starts with it (a rendered chat template does), and never an EOS that some
    tokenizers append to every text, which would end the prompt before the answer."""
    bos = getattr(tokenizer, "bos_token", None)
    ids = tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(str(bos))))["input_ids"]
    eos = str(getattr(tokenizer, "eos_token", ""))
    if len(ids) > 1 and ids[-1] == tokenizer.eos_token_id and not prompt.endswith(eos):
        ids = ids[:-1]
    return ids


def encode_example(tokenizer, prompt: str, answer: str, end_id: int) -> dict:
    """Token ids and labels for one training example: prompt + answer + `end_id` (EOS, or a chat template's
    end of turn), the prompt masked.

    The prompt and the answer are tokenized separately so that the boundary is exactly where generation
    will start from the same prompt. Labels are masked by *position*, never by token id: Qwen's pad token is
    its EOS token, and masking pads by id would also mask the EOS the model must learn to stop.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_id]
    input_ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids)
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def is_python(text: str) -> bool:
    """Whether `text` is complete Python source with something in it (a function, not a sentence of prose)."""
    import ast

    if not text.strip():
        return False
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return True


def complete_part(code: str, prefix: str = "") -> str:
    """`code` without an unfinished last statement: an answer cut off by the token limit in the middle of a second,
    repeated function keeps the functions it finished (as EvalPlus's sanitiser keeps the code that parses). Cut only
    at top-level statements, and only when the whole does not parse after `prefix` (the code it continues)."""
    if is_python(prefix + code) or not code.strip():
        return code
    lines = code.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if i and line[:1] not in ("", " ", "\t", "\n", ")", "]", "}")]
    for start in reversed(starts):
        if is_python(prefix + "".join(lines[:start])):
            return "".join(lines[:start])
    return code


def extract_code(completion: str) -> str:
    """The code to run from a completion: the first fenced block's content when the model answered in Markdown
    (```python ... ```, ``` ... ```, with prose around it or a fence left unclosed), else the completion as it is.
    A lone bare fence after complete code closes a block nobody opened: the code is what comes before it."""
    start = completion.find(FENCE)
    if start == -1:
        return completion
    lone = completion.count(FENCE) == 1 and not completion[start + 3:].split("\n", 1)[0].strip()
    if lone and is_python(completion[:start]):
        return completion[:start].rstrip() + "\n"
    body = completion[start + 3:]
    body = body.split("\n", 1)[1] if "\n" in body else ""  # the rest of the fence line is its language tag
    end = body.find(FENCE)
    return (body if end == -1 else body[:end]).rstrip() + "\n"
