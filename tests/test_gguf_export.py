"""export.py --gguf: one .gguf file for llama.cpp, Ollama and LM Studio, written by llama.cpp's own (pinned)
converter and checked before it is kept, for every model family the project trains; an Ollama Modelfile whose
template renders the training prompt byte for byte and that decodes as evaluate.py scores; the README's llama.cpp
command, which gives the training prompt byte for byte too."""

import dataclasses
import json
import re
import shlex
import shutil
from types import SimpleNamespace

import pytest
from gguf import GGUFReader

from pipeline import cli, folders, gguf_export, models, prompts

import download_model
import evaluate
import export
import prepare_data
import train
from conftest import ROOT, demo_problems, train_argv

slow = pytest.mark.slow  # llama.cpp's converter, and a model read back from each file


@pytest.fixture(scope="module")
def families(demo_data, tmp_path_factory):
    """A 3-step QLoRA run for each demo family: Qwen2 (the project's own), Llama 3 (a BOS, an untied output layer),
    GPT-2 (Conv1D layers), and the instruct model trained with its chat template."""
    runs = {}
    for family in ("qwen2", "llama", "gpt2", "qwen2-instruct"):
        root = tmp_path_factory.mktemp(family)
        assert download_model.main(["--demo", "--demo-family", family, "--out", str(root / "model")]) == 0
        chat = ["--template", "chat"] if family.endswith("instruct") else []
        assert prepare_data.main(["--data", str(demo_data), "--model", str(root / "model"), "--out",
                                  str(root / "prepared"), "--check-tests", "off", *chat]) == 0
        assert train.main(train_argv(root / "model", root / "prepared", root / "run", max_steps=3, save_steps=3,
                                     lr="3e-3")) == 0
        runs[family] = root
    return runs


@slow
@pytest.mark.parametrize("family", ["qwen2", "llama", "gpt2", "qwen2-instruct"])
def test_a_q8_0_gguf_of_each_family_checks_itself_and_carries_a_modelfile(families, family, capsys):
    root = families[family]
    out = root / "export"
    assert export.main(["--model", str(root / "model"), "--adapter", str(root / "run" / "checkpoint-3"), "--data",
                        str(root / "prepared"), "--out", str(out), "--gguf", "q8_0"]) == 0
    said = capsys.readouterr().out
    assert "✓ GGUF self-check" in said and "ollama create" in said and "convert_hf_to_gguf" not in said
    assert "whole answers alike" in said and "--gguf f16 where the exact answers matter" in said
    gguf_file = out / "model-q8_0.gguf"
    fields = GGUFReader(str(gguf_file)).fields
    tokenizer = models.load_tokenizer(root / "model")
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["general.architecture"].contents() == {"qwen2": "qwen2", "llama": "llama", "gpt2": "gpt2",
                                                         "qwen2-instruct": "qwen2"}[family]
    settings = folders.read_json(out / folders.EXPORT_SETTINGS)
    template = prompts.get(settings["template"])
    problem = demo_problems()[60]
    typed = problem["text"] + "\n" + prompts.TESTS_HEADER + "\n" + "\n".join(problem["test_list"])  # in Ollama
    rendered = gguf_export.render_modelfile_template((out / gguf_export.MODELFILE).read_text(encoding="utf-8"), typed)
    # byte for byte the prompt the model was trained on, the task shown with its tests
    assert rendered == template.prompt(problem["text"], problem["test_list"], tokenizer)
    # decoded as evaluate.py decodes the answers it scores, not with Ollama's sampling and repeat penalty
    parameters = gguf_export.modelfile_parameters((out / gguf_export.MODELFILE).read_text(encoding="utf-8"))
    assert {name: values for name, values in parameters.items() if name != "stop"} == scored_parameters()


def scored_parameters(repetition_penalty: float = 1.0) -> dict[str, list[str]]:
    """The Ollama parameters of evaluate.py's decoding: its default temperature and token budget."""
    defaults = evaluate.build_parser().parse_args([])
    assert defaults.temperature == 0  # greedy
    penalty = {} if repetition_penalty == 1 else {"repeat_last_n": ["-1"]}
    return {"temperature": ["0"], "repeat_penalty": [f"{repetition_penalty:g}"], **penalty,
            "num_predict": [str(defaults.max_new_tokens)]}


def decoding_of(repetition_penalty: float | None = None) -> dict:
    """export.py's decoding for a model whose generation_config.json sets this repetition penalty, or none."""
    from transformers import GenerationConfig

    config = GenerationConfig(repetition_penalty=repetition_penalty)
    return export.scored_decoding(SimpleNamespace(generation_config=config))


def test_the_modelfile_decodes_as_evaluate_py_scores():
    """Greedy, evaluate.py's token budget, and the repetition penalty model.generate takes from the model's
    generation_config.json (none, unless the model's own config sets one: Ollama then penalises as far back)."""
    for penalty in (1.0, 1.1):
        text = gguf_export.modelfile("m.gguf", prompts.TESTS, None, decoding_of(penalty))
        parameters = gguf_export.modelfile_parameters(text)
        assert parameters.pop("stop") == [stop.replace("\n```", "\n```\n") for stop in prompts.TESTS.stops]
        assert parameters == scored_parameters(penalty)


def ollama_cut(text: str, template: prompts.Template) -> str:
    """Where Ollama ends an answer: before the first of the Modelfile's stop strings."""
    modelfile = gguf_export.modelfile("m.gguf", template, None, decoding_of())
    stops = gguf_export.modelfile_parameters(modelfile)["stop"]
    return text[:min([text.index(stop) for stop in stops if stop in text], default=len(text))]


def test_the_modelfile_stops_a_fenced_answer_where_the_project_cuts_it():
    answers = ["def f(s):\n    return s\n```\nTask: next",  # a bare fence after the code closes a block
               "```python\ndef f(s):\n    return s\n```\nThis returns s.",  # the answer's own block, closed
               "Here it is:\n```python\ndef f(s):\n    return s\n```\n",  # an opening fence runs on
               "def f(s):\n    return s\nassert f(1) == 1"]
    for answer in answers:
        assert ollama_cut(answer, prompts.TESTS) == prompts.TESTS.cut(answer), answer
    # where the prompt opens the block, its first fence closes it
    opened = dataclasses.replace(prompts.TESTS, opens_fence=True)
    assert ollama_cut("    return s\n```", opened) == opened.cut("    return s\n```") == "    return s"


@slow
def test_the_modelfile_stops_where_generate_py_stops(families):
    tokenizer = models.load_tokenizer(families["qwen2-instruct"] / "model")
    decoding = decoding_of()
    text = gguf_export.modelfile("m.gguf", prompts.CHAT, tokenizer, decoding)
    assert 'PARAMETER stop """<|im_end|>"""' in text and "PARAMETER temperature 0" in text
    assert 'PARAMETER stop """\nTask:"""' in gguf_export.modelfile("m.gguf", prompts.TESTS, tokenizer, decoding)
    assert "FROM ./m.gguf" in text


def test_the_readme_s_llama_cpp_command_gives_the_training_prompt_byte_for_byte():
    """The README's Ollama words and its printf for llama.cpp: both the prompt the default template renders for the
    task and asserts typed, read by llama.cpp as written (-bf: -f drops the file's final newline), decoded as
    evaluate.py scores."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    typed = re.search(r"^ollama run my-coder '([^']*)'$", readme, flags=re.M).group(1)
    task, tests = typed.split("\n" + prompts.TESTS_HEADER + "\n")
    expected = prompts.DEFAULT.prompt(task, tests.splitlines())
    modelfile = gguf_export.modelfile("m.gguf", prompts.DEFAULT, None, decoding_of())
    assert gguf_export.render_modelfile_template(modelfile, typed) == expected
    written, file = re.search(r"^printf '([^']*)' > (\S+)$", readme, flags=re.M).groups()
    assert "%" not in written and set(re.findall(r"\\.", written)) == {"\\n"}  # printf changes only \n
    assert written.replace("\\n", "\n") == expected
    command = shlex.split(next(line for line in readme.splitlines() if line.startswith("llama-completion ")))
    flags = dict(zip(command, command[1:]))
    assert flags["-bf"] == file and {"--no-escape", "-no-cnv"} <= set(command)
    scored = scored_parameters()
    assert (flags["--temp"], flags["--repeat-penalty"], flags["-n"]) == (scored["temperature"][0],
                                                                         scored["repeat_penalty"][0],
                                                                         scored["num_predict"][0])


@slow
def test_a_tokenizer_llama_cpp_does_not_know_is_refused_in_one_line(families, tmp_path):
    folder = tmp_path / "merged"
    shutil.copytree(families["qwen2"] / "model", folder)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = {"type": "Whitespace"}  # a split no llama.cpp family has
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}),
                                                  encoding="utf-8")
    assert gguf_export.llama_cpp_pre_tokenizer(folder) is None
    with pytest.raises(cli.StageError, match="does not know this tokenizer's pre-tokenizer"):
        gguf_export.convert(folder, "q8_0")
    assert not (folder / "model-q8_0.gguf").exists()


@slow
def test_a_gguf_file_becomes_a_model_folder_every_stage_can_use(families, tmp_path, capsys):
    """download_model.py --model-id FILE.gguf, as a user with a GGUF from Ollama or LM Studio starts: the weights
    dequantised (bfloat16), the tokenizer and its chat template rebuilt from the file's metadata."""
    import torch
    from safetensors.torch import load_file

    root = families["qwen2-instruct"]
    exported = tmp_path / "export"
    assert export.main(["--model", str(root / "model"), "--adapter", str(root / "run" / "checkpoint-3"), "--data",
                        str(root / "prepared"), "--out", str(exported), "--gguf", "f32"]) == 0
    gguf_file = exported / "model-f32.gguf"
    out = tmp_path / "model"
    assert download_model.main(["--model-id", str(gguf_file), "--out", str(out)]) == 0
    info = folders.download_info(out)
    assert info["source"] == "gguf" and info["model_id"] == str(gguf_file.resolve()) and info["chat_template"]
    assert models.model_folder_problem(out) is None and models.parameter_count(out) == models.parameter_count(exported)
    # every weight as the export holds it, to bfloat16's rounding
    converted, original = load_file(str(out / "model.safetensors")), load_file(str(exported / "model.safetensors"))
    for name, tensor in original.items():
        assert converted[name].dtype == torch.bfloat16
        torch.testing.assert_close(converted[name].float(), tensor.float(), rtol=2 ** -8, atol=1e-6)
    # the same tokens, special tokens and chat template
    before, after = models.load_tokenizer(exported), models.load_tokenizer(out)
    text = demo_problems()[3]["code"] + "<|im_end|>"
    assert after(text)["input_ids"] == before(text)["input_ids"] and after.eos_token_id == before.eos_token_id
    assert prompts.render_chat(after, "Reverse a string.") == prompts.render_chat(before, "Reverse a string.")
    # a second run skips; a folder holding the file is taken as the file
    capsys.readouterr()
    assert download_model.main(["--model-id", str(gguf_file), "--out", str(out)]) == 0
    assert "skipping" in capsys.readouterr().out
    downloads = tmp_path / "Downloads"  # a folder holding the file, as Ollama's or LM Studio's
    downloads.mkdir()
    shutil.copy2(gguf_file, downloads / "my-coder.gguf")
    assert download_model.main(["--model-id", str(downloads), "--out", str(tmp_path / "again")]) == 0
    assert folders.download_info(tmp_path / "again")["source"] == "gguf"
    (downloads / "copy.gguf").write_bytes(b"GGUF")  # two files: which one is the user's to say
    assert download_model.main(["--model-id", str(downloads), "--out", str(tmp_path / "third")]) == 2
    assert "holds 2 GGUF files (copy.gguf, my-coder.gguf)" in capsys.readouterr().err
    assert download_model.main(["--model-id", str(downloads / "copy.gguf"), "--out", str(tmp_path / "third")]) == 2
    assert "is damaged or incomplete" in capsys.readouterr().err and not (tmp_path / "third").exists()
