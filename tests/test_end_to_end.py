"""What the demo shows: 4-bit QLoRA on the tiny random model learns its training solutions and to stop, and solves
held-out members of the string family that the base model cannot."""

import json

import pytest
from datasets import load_from_disk

from pipeline import folders, inference, models, prompts

import evaluate
from conftest import family_rows

pytestmark = pytest.mark.slow  # the demo's whole fine-tune, or several training processes


def test_qlora_learns_solutions_and_to_stop(demo_trained):
    tokenizer = models.load_tokenizer(demo_trained["model"])
    model = inference.load_for_inference(demo_trained["model"], demo_trained["adapter"], models.pick_device())
    rows = load_from_disk(str(demo_trained["prepared"]))["train"]
    assert len(rows) == 65
    texts = [prompts.DEFAULT.prompt(row["task"], row["tests"]) for row in rows]
    # Room for 40 more tokens than any solution: a model that never learned EOS would run on.
    longest = max(len(row["input_ids"]) for row in rows)
    results = inference.generate(model, tokenizer, texts, max_new_tokens=longest + 40)
    exact = [r[0]["completion"] == row["code"] and r[0]["stopped"] for r, row in zip(results, rows)]
    assert sum(exact) >= 52, [r[0]["completion"] for r in results]  # 60 of 65 on the development machine


def test_the_demo_fine_tune_solves_held_out_problems_the_base_model_cannot(demo_trained, tmp_path, capsys):
    out = tmp_path / "results"
    code = evaluate.main(["--model", str(demo_trained["model"]), "--adapter", str(demo_trained["adapter"]),
                          "--data", str(demo_trained["prepared"]), "--compare-base", "--max-new-tokens", "128", "--out",
                          str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    models = summary["models"]
    assert (models["base"]["pass@1"] == 0
            and models["fine-tuned"]["identity"]["adapter"] == str(demo_trained["adapter"].resolve()))
    family = [row["task_id"] for row in family_rows(demo_trained["prepared"], "eval")]
    verdicts = [json.loads(line) for line in (out / "fine-tuned.jsonl").open(encoding="utf-8")]
    solved = {verdict["task_id"] for verdict in verdicts if verdict["status"] == "passed"}
    assert len(family) == 10 and len(solved & set(family)) >= 8, (family, solved)
    # The problems it gained are named, on the screen and in the files.
    assert len(summary["changes"]["gained"]) == len(solved) and not summary["changes"]["lost"]
    table = capsys.readouterr().out
    assert ("| base |" in table and "| fine-tuned |" in table
            and f"fine-tuned solves {len(solved)} problem(s) that base does not" in table)
    assert summary["changes"]["gained"][0] in (out / evaluate.TABLE_NAME).read_text(encoding="utf-8")
    assert {p.name for p in out.iterdir()} == {"base.jsonl", "fine-tuned.jsonl", "summary.json", "comparison.md",
                                               "pass_at_k.png", folders.OWNER}
    # A quarter held out lets the demo's lift show as more than luck: 8 or more gained, none lost, p <= 2 / 2**8.
    comparison = summary["comparisons"]["fine-tuned"]
    assert comparison["p_value"] <= 2 / 2 ** 8 and comparison["interval"][0] > 0
    assert comparison["verdict"] in table and "more than chance would explain" in comparison["verdict"]



def test_answers_and_verdicts_do_not_depend_on_the_batch_size(demo_trained, tmp_path):
    """Left padding and a batch's shapes must not change a greedy answer: one prompt at a time and 12 of different
    lengths together answer alike, so a verdict does not depend on --batch-size."""
    rows = {}
    for batch in ("1", "16"):
        out = tmp_path / batch
        assert evaluate.main(["--model", str(demo_trained["model"]), "--adapter", str(demo_trained["adapter"]),
                              "--data", str(demo_trained["prepared"]), "--max-new-tokens", "64", "--batch-size", batch,
                              "--limit", "12", "--out", str(out)]) == 0
        rows[batch] = [json.loads(line) for line in (out / "fine-tuned.jsonl").open(encoding="utf-8")]
    assert len(rows["1"]) == 12
    assert [(r["task_id"], r["completion"], r["status"]) for r in rows["1"]] == [
        (r["task_id"], r["completion"], r["status"]) for r in rows["16"]]

def test_the_command_the_demo_suggests_shows_the_fine_tune_at_work(demo_trained, capsys):
    import shlex

    import generate
    import run_pipeline

    argv = ["--model", str(demo_trained["model"]), "--adapter", str(demo_trained["adapter"]),
            *shlex.split(run_pipeline.DEMO_TRY)]
    assert generate.main(argv) == 0
    assert capsys.readouterr().out.strip() == "def lower_title(s):\n    return s.lower()"


def test_models_that_score_alike_get_the_verdict_and_no_empty_list_of_gains(demo_trained, tmp_path, capsys):
    # the first held-out problems are unrelated ones, which neither the base nor the demo fine-tune solves
    assert evaluate.main(["--model", str(demo_trained["model"]), "--adapter", str(demo_trained["adapter"]),
                          "--data", str(demo_trained["prepared"]), "--compare-base", "--limit", "2",
                          "--max-new-tokens", "16", "--out", str(tmp_path / "results")]) == 0
    said = capsys.readouterr().out
    assert "every one of the 2 problems scored alike: no difference" in said
    assert "solves 0 problem(s)" not in said
