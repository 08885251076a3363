import json

import pytest

from pipeline import cli, folders, models

import download_model
from conftest import one_error_line


def test_demo_model_writes_the_model_folder_layout(demo_model):
    names = {p.name for p in demo_model.iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", folders.DOWNLOAD_INFO, folders.OWNER}
    config = json.loads((demo_model / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
    assert config.get("pad_token_id") is None  # a padding_idx would zero the EOS row of the tied embedding


def test_demo_tokenizer_is_qwen_like_and_round_trips_code(demo_model):
    tokenizer = models.load_tokenizer(demo_model)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    code = "def f(x):\n    return {'é': x ** 2}  # ünïcode"
    assert tokenizer.decode(tokenizer(code, add_special_tokens=False)["input_ids"]) == code


def test_demo_model_can_predict_eos(demo_model):
    """The trap of a zeroed padding row: the EOS row of the tied embedding must be as large as the others."""
    from safetensors.torch import load_file

    weights = load_file(str(demo_model / "model.safetensors"))
    embedding = weights["model.embed_tokens.weight"]
    eos = models.load_tokenizer(demo_model).eos_token_id
    assert embedding[eos].norm() > 0.5 * embedding.norm(dim=1).mean()


def test_second_run_skips_and_a_different_model_needs_force(demo_model, capsys):
    before = (demo_model / "model.safetensors").stat().st_mtime_ns
    assert download_model.main(["--demo", "--out", str(demo_model)]) == 0
    assert "skipping" in capsys.readouterr().out
    assert (demo_model / "model.safetensors").stat().st_mtime_ns == before
    assert download_model.main(["--model-id", "Qwen/Qwen2.5-Coder-0.5B", "--out", str(demo_model)]) == 2
    assert "--force" in one_error_line(capsys.readouterr())


def test_a_demo_model_of_an_older_recipe_is_built_again(demo_model, tmp_path, capsys):
    import shutil

    old = tmp_path / "model"
    shutil.copytree(demo_model, old)
    info = json.loads((old / folders.DOWNLOAD_INFO).read_text(encoding="utf-8"))
    assert info["recipe"] == download_model.demo_recipe("qwen2")
    (old / folders.DOWNLOAD_INFO).write_text(json.dumps({**info, "recipe": "older"}), encoding="utf-8")
    assert download_model.main(["--demo", "--out", str(old)]) == 0
    assert "building it again" in capsys.readouterr().out
    assert json.loads((old / folders.DOWNLOAD_INFO).read_text(encoding="utf-8")) == info
    # seeded: the same model
    assert (old / "model.safetensors").read_bytes() == (demo_model / "model.safetensors").read_bytes()


def test_offline_hub_download_fails_with_one_clear_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "model"
    code = download_model.main(["--model-id", "no-such-org/no-such-model", "--out", str(out)])
    assert code == cli.EXIT_FAILED
    message = one_error_line(capsys.readouterr())
    assert "no-such-org/no-such-model" in message and "--demo" in message
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_local_folder_is_copied(demo_model, tmp_path):
    out = tmp_path / "copy"
    assert download_model.main(["--model-id", str(demo_model), "--out", str(out)]) == 0
    assert (out / "model.safetensors").read_bytes() == (demo_model / "model.safetensors").read_bytes()
    assert json.loads((out / folders.DOWNLOAD_INFO).read_text(encoding="utf-8"))["source"] == "local"


@pytest.mark.parametrize("bad", ["./missing-folder", "/definitely/not/here"])
def test_missing_local_folder_is_refused(bad, tmp_path, capsys):
    assert download_model.main(["--model-id", bad, "--out", str(tmp_path / "m")]) == 2
    assert "not found" in one_error_line(capsys.readouterr())


def test_a_dataset_folder_is_not_accepted_as_a_model(demo_data, tmp_path, capsys):
    assert download_model.main(["--model-id", str(demo_data), "--out", str(tmp_path / "m")]) == 2
    assert "dataset folder" in one_error_line(capsys.readouterr())
