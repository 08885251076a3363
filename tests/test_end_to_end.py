"""Learning and stopping: 4-bit QLoRA on the demo model until greedy decoding reproduces each solution, then EOS."""

from datasets import load_from_disk

import common
import inference


def test_qlora_learns_solutions_and_to_stop(memorised):
    tokenizer = common.load_tokenizer(memorised["model"])
    model = inference.load_for_inference(memorised["model"], memorised["adapter"], common.pick_device(), load_in_4bit=True)
    rows = load_from_disk(str(memorised["prepared"]))["train"]
    assert len(rows) == 8
    prompts = [common.format_prompt(common.DEFAULT_TEMPLATE, row["task"], row["tests"]) for row in rows]
    # Room for 40 more tokens than any solution: a model that never learned EOS would run on.
    longest = max(len(row["input_ids"]) for row in rows)
    results = inference.generate(model, tokenizer, prompts, max_new_tokens=longest + 40)
    exact = [r[0]["completion"] == row["code"] and r[0]["stopped"] for r, row in zip(results, rows)]
    assert sum(exact) >= 7, [r[0]["completion"] for r in results]
