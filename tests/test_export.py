"""export.py: the adapter merged into its base, one plain model folder that transformers loads without peft."""

import json

import pytest

from pipeline import folders, inference, models, prompts

import evaluate
import export
import generate
from conftest import family_rows, one_error_line

pytestmark = pytest.mark.slow  # the demo's whole fine-tune, or several training processes


def test_the_export_loads_with_plain_transformers_and_answers_as_the_adapter_does(demo_trained, exported):
    from transformers import AutoModelForCausalLM

    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", folders.EXPORT_SETTINGS,
            "model.safetensors.index.json"} <= names
    # sharded, no peft files
    assert len(list(exported.glob("model-*.safetensors"))) > 1 and not any("adapter" in name for name in names)
    settings = json.loads((exported / folders.EXPORT_SETTINGS).read_text(encoding="utf-8"))
    assert (settings["template"] == prompts.DEFAULT.name
            and settings["base_model_id"] == models.model_id(demo_trained["model"]))
    merged = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    tokenizer = models.load_tokenizer(exported)
    choice = models.DeviceChoice("cpu", "float32", "test")
    adapter = inference.load_model_as(demo_trained["model"], demo_trained["adapter"], choice, load_in_4bit=False)
    rows = family_rows(demo_trained["prepared"], "train")[:8]
    texts = [prompts.DEFAULT.prompt(row["task"], row["tests"]) for row in rows]
    ours = inference.generate(merged, tokenizer, texts, 48)
    theirs = inference.generate(adapter, tokenizer, texts, 48)
    assert [r[0]["completion"] for r in ours] == [r[0]["completion"] for r in theirs]
    assert sum(r[0]["completion"] == row["code"] for r, row in zip(ours, rows)) >= 6  # what it learned, merged in


def test_generate_and_evaluate_take_the_export_as_a_model(demo_trained, exported, tmp_path, capsys):
    rows = family_rows(demo_trained["prepared"], "train")
    assert generate.main(["--model", str(exported), "--prompt", rows[0]["task"], *sum([["--test",
                                                                                        t] for t in rows[0]["tests"]],
                                                                                        []),
                          "--no-4bit", "--max-new-tokens", "64"]) == 0
    captured = capsys.readouterr()
    assert "merged model" in captured.out + captured.err and rows[0]["code"] in captured.out
    # Held-out problems, as the adapter solves them (the demo's evaluation: at least half of the family's).
    assert evaluate.main(["--model", str(exported), "--data", str(demo_trained["prepared"]), "--no-4bit",
                          "--max-new-tokens", "64", "--out", str(tmp_path / "r")]) == 0
    models = json.loads((tmp_path / "r" / "summary.json").read_text(encoding="utf-8"))["models"]
    held_out = len(family_rows(demo_trained["prepared"], "eval"))
    assert list(models) == ["merged"] and models["merged"]["counts"]["passed"] >= held_out / 2


def test_export_refuses_what_it_cannot_do_in_one_line(demo_trained, exported, demo_data, tmp_path, capsys):
    assert export.main(["--model", str(demo_trained["model"]), "--adapter", str(demo_trained["adapter"]), "--out",
                        str(exported)]) == 2
    assert "--overwrite" in one_error_line(capsys.readouterr())
    assert export.main(["--model", str(demo_trained["model"]), "--adapter", str(tmp_path / "none"), "--out",
                        str(tmp_path / "e")]) == 2
    assert "train.py" in one_error_line(capsys.readouterr())
    assert export.main(["--model", str(demo_data), "--adapter", str(demo_trained["adapter"]), "--out",
                        str(tmp_path / "e")]) == 2
    assert "not a model folder" in one_error_line(capsys.readouterr())
    assert not (tmp_path / "e").exists()
