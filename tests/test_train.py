import json

import pytest
import torch
from conftest import one_error_line

import common
import train


def test_pad_batch_pads_to_the_longest_with_masked_labels():
    eos = 0  # pad id == EOS id, as in Qwen
    features = [
        {"input_ids": [5, 6, 7, eos], "attention_mask": [1, 1, 1, 1], "labels": [-100, -100, 7, eos]},
        {"input_ids": [5, eos], "attention_mask": [1, 1], "labels": [-100, eos]},
    ]
    batch = train.pad_batch(features, pad_token_id=eos)
    assert batch["input_ids"].tolist() == [[5, 6, 7, eos], [5, eos, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, eos], [-100, eos, -100, -100]]  # the real EOS stays a label
    assert train.pad_batch(features, eos, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)


def test_trained_span_is_shown_between_markers(demo_model, demo_prepared):
    from datasets import load_from_disk

    row = load_from_disk(str(demo_prepared))["train"][0]
    shown = train.show_trained_span(common.load_tokenizer(demo_model), row)
    assert shown.startswith("Task: ") and "Solution:\n⟦" + row["code"] + "<|endoftext|>⟧" in shown


def test_smoke_run_writes_checkpoints_and_the_final_adapter(trained_smoke, demo_model):
    names = {p.name for p in trained_smoke.iterdir()}
    assert names == {"checkpoint-4", common.FINAL_ADAPTER, train.RUN_SETTINGS, "metrics.json", "training_curves.png", "logs"}  # --keep-last 1
    final = trained_smoke / common.FINAL_ADAPTER
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", common.TRAINING_SETTINGS} <= {p.name for p in final.iterdir()}
    settings = json.loads((final / common.TRAINING_SETTINGS).read_text())
    assert settings["template"] == common.DEFAULT_TEMPLATE and settings["load_in_4bit"] is True
    assert settings["base_model_id"] == "demo/tiny-qwen2" and settings["result"]["global_step"] == 4
    assert settings["loss"] == "chunked" and 0 <= settings["result"]["padding_share"] < 0.5
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == set(common.LORA_TARGET_MODULES) and adapter["r"] == 16


def test_training_uses_bitsandbytes_4bit_on_cpu(demo_model):
    import bitsandbytes as bnb

    class Args:
        model, seed, lora_r, lora_alpha, lora_dropout = str(demo_model), 0, 4, 8, 0.0

    model = train.build_model(Args, common.pick_device(), load_in_4bit=True)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and layer.base_layer.weight.quant_type == "nf4"
    trainable = {name.split(".")[-3] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}


def test_rerun_with_same_settings_skips_and_an_earlier_run_is_not_overwritten(trained_smoke, demo_model, demo_prepared, capsys):
    same = ["--model", str(demo_model), "--data", str(demo_prepared), "--out", str(trained_smoke), "--max-steps", "4",
            "--save-steps", "2", "--keep-last", "1", "--batch-size", "4", "--grad-accum", "1", "--logging-steps", "1"]
    assert train.main(same) == 0
    assert "skipping" in capsys.readouterr().out
    assert train.main(same[:-1] + ["2"]) == 2  # other settings, same folder
    assert "--resume" in one_error_line(capsys.readouterr())


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--lr", "-1"), ("--max-steps", "0"), ("--epochs", "0"), ("--grad-accum", "x")])
def test_nonsensical_flag_values_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main([flag, value])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_missing_folders_name_the_stage_to_run_first(tmp_path, capsys):
    assert train.main(["--model", str(tmp_path / "m"), "--data", str(tmp_path / "p"), "--out", str(tmp_path / "c")]) == 2
    err = one_error_line(capsys.readouterr())
    assert "download_model.py" in err and "prepare_data.py" in err
    assert not (tmp_path / "c").exists()


def test_data_prepared_for_another_model_is_refused(demo_model, demo_prepared, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    for f in demo_model.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    common.write_json(other / common.DOWNLOAD_INFO, {"source": "hub", "model_id": "Qwen/Qwen2.5-Coder-0.5B"})
    assert train.main(["--model", str(other), "--data", str(demo_prepared), "--out", str(tmp_path / "c")]) == 2
    assert "prepare_data.py --model" in one_error_line(capsys.readouterr())


def test_gradients_reach_lora_weights_with_gradient_checkpointing(demo_model, demo_prepared):
    """from_pretrained returns eval mode, where checkpointing is off: train mode must be on for the real path."""
    from datasets import load_from_disk

    class Args:
        model, seed, lora_r, lora_alpha, lora_dropout = str(demo_model), 0, 4, 8, 0.0

    model = train.build_model(Args, common.pick_device(), load_in_4bit=True)
    model.train()
    rows = load_from_disk(str(demo_prepared))["train"]
    batch = train.pad_batch([rows[i] for i in range(2)], 0)
    model(**batch).loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
