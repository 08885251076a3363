"""Other model families than Qwen2, as the guides use them: Llama (a BOS token, no pad, an untied output layer)
and GPT-2 (Conv1D projections c_attn/c_proj/c_fc, no pad). Each through prepare -> 4-bit QLoRA -> verify -> evaluate."""

import json

import pytest
import torch
from datasets import load_from_disk

from pipeline import data, folders, memory, models, prompts

import download_model
import evaluate
import prepare_data
import train
import verify_model

TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "gpt2": ["c_attn",
                                                                                                            "c_proj",
                                                                                                            "c_fc"]}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request, demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    assert download_model.main(["--demo", "--demo-family", request.param, "--out", str(root / "model")]) == 0
    assert prepare_data.main(["--data", str(demo_data), "--model", str(root / "model"), "--out", str(root / "prepared"),
                              "--check-tests", "off"]) == 0
    assert train.main(["--model", str(root / "model"), "--data", str(root / "prepared"), "--out", str(root / "run"),
                       "--max-steps", "4",
                       "--save-steps", "2", "--batch-size", "4", "--grad-accum", "1", "--lr", "3e-3"]) == 0
    return {"name": request.param, "model": root / "model", "prepared": root / "prepared",
            "adapter": root / "run" / folders.FINAL_ADAPTER,
            "root": root}


def test_labels_mask_the_prompt_train_the_eos_and_never_double_the_bos(family):
    tokenizer = models.load_tokenizer(family["model"])
    # no pad in these tokenizers: EOS stands in, masked by position
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    for row in load_from_disk(str(family["prepared"]))["train"].select(range(5)):
        ids, labels = row["input_ids"], row["labels"]
        first = next(i for i, label in enumerate(labels) if label != prompts.IGNORE_INDEX)
        assert tokenizer.decode(ids[first:-1]) == row["code"] and labels[first:] == ids[first:]
        assert ids[-1] == labels[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
        if family["name"] == "llama":
            assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        else:
            assert ids[0] != tokenizer.bos_token_id  # GPT-2 adds no BOS (its BOS is its EOS)


def test_lora_targets_are_found_from_the_model_and_saved_with_the_adapter(family):
    assert models.find_lora_targets(str(family["model"])) == TARGETS[family["name"]]
    settings = json.loads((family["adapter"] / folders.TRAINING_SETTINGS).read_text(encoding="utf-8"))
    adapter = json.loads((family["adapter"] / folders.ADAPTER_CONFIG).read_text(encoding="utf-8"))
    assert (settings["lora_target_modules"] == TARGETS[family["name"]]
            and set(adapter["target_modules"]) == set(TARGETS[family["name"]]))
    assert settings["base_model_id"] == f"demo/tiny-{family['name']}"


def test_the_base_is_quantised_to_4bit_and_the_chunked_loss_equals_the_standard_one(family):
    import bitsandbytes as bnb

    model = train.build_model(str(family["model"]), models.pick_device(), True, lora_r=4, lora_alpha=8,
                              lora_dropout=0.0, seed=0)
    model.train()
    quantised = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert quantised and all(any(f".{target}" in name for target in TARGETS[family["name"]]) for name in quantised)
    model.eval()  # GPT-2 has dropout of its own: compare the two losses on the same deterministic forward pass
    rows = load_from_disk(str(family["prepared"]))["train"]
    batch = data.pad_batch([rows[i] for i in (0, 3, 7)], models.load_tokenizer(family["model"]).pad_token_id)
    with torch.no_grad():
        standard = model(**batch).loss
        with train.loss_for(model, "chunked") as compute_loss:
            chunked = compute_loss(model(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]), batch["labels"])
    assert chunked.item() == pytest.approx(standard.item(), rel=1e-4)
    estimate = memory.estimate_peak_memory(model.config, 4, 256, 16)
    assert estimate["total"] > estimate["weights"] > 0


def test_verify_and_evaluate_take_the_family(family, tmp_path, capsys):
    assert verify_model.main(["--model", str(family["model"]), "--adapter", str(family["adapter"])]) == 0
    assert "all checks passed" in capsys.readouterr().out
    out = tmp_path / "results"
    assert evaluate.main(["--model", str(family["model"]), "--adapter", str(family["adapter"]), "--data",
                          str(family["prepared"]),
                          "--limit", "2", "--max-new-tokens", "16", "--compare-base", "--out", str(out)]) == 0
    models = json.loads((out / "summary.json").read_text(encoding="utf-8"))["models"]
    assert models["base"]["problems"] == models["fine-tuned"]["problems"] == 2
