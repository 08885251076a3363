"""export.py: the adapter merged into its base, one plain model folder that transformers loads without peft."""

import json

import pytest
from conftest import one_error_line
from datasets import load_from_disk

import common
import evaluate
import export
import generate
import inference


@pytest.fixture(scope="module")
def exported(memorised, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "export"
    assert export.main(["--model", str(memorised["model"]), "--adapter", str(memorised["adapter"]), "--data", str(memorised["prepared"]),
                        "--out", str(out), "--max-shard-size", "2MB"]) == 0
    return out


def test_the_export_loads_with_plain_transformers_and_answers_as_the_adapter_does(memorised, exported):
    from transformers import AutoModelForCausalLM

    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", common.EXPORT_SETTINGS, "model.safetensors.index.json"} <= names
    assert len(list(exported.glob("model-*.safetensors"))) > 1 and not any("adapter" in name for name in names)  # sharded, no peft files
    settings = json.loads((exported / common.EXPORT_SETTINGS).read_text())
    assert settings["template"] == common.DEFAULT_TEMPLATE and settings["base_model_id"] == common.model_id(memorised["model"])
    merged = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    tokenizer = common.load_tokenizer(exported)
    choice = common.DeviceChoice("cpu", "float32", "test")
    adapter = inference.load_for_inference(memorised["model"], memorised["adapter"], choice, load_in_4bit=False)
    rows = load_from_disk(str(memorised["prepared"]))["train"]
    prompts = [common.format_prompt(common.DEFAULT_TEMPLATE, row["task"], row["tests"]) for row in rows]
    ours = inference.generate(merged, tokenizer, prompts, 48)
    theirs = inference.generate(adapter, tokenizer, prompts, 48)
    assert [r[0]["completion"] for r in ours] == [r[0]["completion"] for r in theirs]
    assert sum(r[0]["completion"] == row["code"] for r, row in zip(ours, rows)) >= 6  # what it memorised, merged in


def test_generate_and_evaluate_take_the_export_as_a_model(memorised, exported, tmp_path, capsys):
    rows = load_from_disk(str(memorised["prepared"]))["train"]
    assert generate.main(["--model", str(exported), "--prompt", rows[0]["task"], *sum([["--test", t] for t in rows[0]["tests"]], []),
                          "--no-4bit", "--max-new-tokens", "64"]) == 0
    captured = capsys.readouterr()
    assert "merged model" in captured.out + captured.err and rows[0]["code"] in captured.out
    assert evaluate.main(["--model", str(exported), "--data", str(memorised["prepared"]), "--split", "train", "--no-4bit",
                          "--max-new-tokens", "64", "--out", str(tmp_path / "r")]) == 0
    models = json.loads((tmp_path / "r" / "summary.json").read_text())["models"]
    assert list(models) == ["merged"] and models["merged"]["pass@1"] >= 6 / 8


def test_export_refuses_what_it_cannot_do_in_one_line(memorised, exported, demo_data, tmp_path, capsys):
    assert export.main(["--model", str(memorised["model"]), "--adapter", str(memorised["adapter"]), "--out", str(exported)]) == 2
    assert "--overwrite" in one_error_line(capsys.readouterr())
    assert export.main(["--model", str(memorised["model"]), "--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "e")]) == 2
    assert "train.py" in one_error_line(capsys.readouterr())
    assert export.main(["--model", str(demo_data), "--adapter", str(memorised["adapter"]), "--out", str(tmp_path / "e")]) == 2
    assert "not a model folder" in one_error_line(capsys.readouterr())
    assert not (tmp_path / "e").exists()
