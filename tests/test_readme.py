"""The README's commands, followed as printed: the demo's stage-by-stage route gives the tables the README shows,
run_pipeline.py after it skips what is finished and gives them again, and every command in a README block is
one its script accepts."""

import importlib.util
import json
import re
import shlex
import sys

import pytest
import torch

from pipeline import cli, folders

import run_pipeline
from conftest import DEMO_ROUTE, ROOT, NarrowConsole, readme_blocks

DEMO_OUTPUT = "## What the demo shows"


def readme_demo_output() -> list[str]:
    """What the README says the demo ends with: its two tables and the verdict lines (the lines that do not depend
    on the machine's speed)."""
    (_, block), = readme_blocks(DEMO_OUTPUT)
    lines = block.splitlines()
    tables = lines[:lines.index("which model solved which (the problems where they differ; all 22 in "
                                "results/comparison.md):")]
    return [line for line in tables if line.startswith("|") or " vs base: " in line]


def printed_by(readme_demo, script: str, *flags: str) -> str:
    return next(printed for argv, printed in readme_demo["followed"]
                if argv[1] == script and all(flag in argv for flag in flags))


def test_the_demo_route_ends_with_the_tables_the_readme_shows(readme_demo):
    printed = printed_by(readme_demo, "evaluate.py", "--compare-base").splitlines()
    expected = readme_demo_output()
    assert len(expected) == 12  # two tables of 3 models, two verdicts
    assert [line for line in expected if line not in printed] == [], "\n".join(printed)


def test_the_demo_route_passes_as_many_training_problems_as_the_readme_says(readme_demo):
    (argv,) = [argv for argv, _ in readme_demo["followed"] if "--split" in argv]
    route = dict(readme_blocks(DEMO_ROUTE))["bash"]
    stated = int(re.search(r"--split train .*# its own training problems: (\d+) of 65 pass", route).group(1))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"passes the tests of {stated} of its 65 training problems" in readme
    # the tests train on one thread (a user's CPU, on several, sums in another order): the README's one-thread figure
    assert torch.get_num_threads() == 1
    one_thread = int(re.search(r"memory, not skill \((\d+) with one CPU thread", readme).group(1))
    summary = json.loads((readme_demo["folder"] / argv[argv.index("--out") + 1] / folders.SUMMARY).read_text(
        encoding="utf-8"))
    assert summary["models"]["fine-tuned"]["counts"]["passed"] == one_thread


def test_each_next_line_of_the_demo_route_is_the_readme_s_next_command(readme_demo):
    """The README's route is the one the stages point to: where a stage prints a next: line for the script the README
    runs next, they are the same command (the demo's settings carried on by --demo)."""
    followed = readme_demo["followed"]
    compared = 0
    for (_, printed), (argv, _) in zip(followed, followed[1:]):
        for line in printed.splitlines():
            if line.startswith("next: python ") and shlex.split(line[len("next: "):])[1] == argv[1]:
                assert shlex.split(line[len("next: "):]) == argv
                compared += 1
    assert compared == 4  # download_model -> download_dataset -> prepare_data -> train -> verify_model


def test_run_pipeline_after_the_route_skips_what_is_finished_and_ends_alike(readme_demo, monkeypatch):
    """The README's last demo line, on a console that cannot show ✓ (Windows with the output redirected: cp1252;
    some consoles: ASCII): every finished stage skipped, the same tables, the verdict in the last line."""
    monkeypatch.chdir(readme_demo["folder"])
    console, errors = NarrowConsole(), NarrowConsole()
    monkeypatch.setattr(sys, "stdout", console)  # in the test: pytest's capture resets sys.stdout before a test
    monkeypatch.setattr(sys, "stderr", errors)
    argv = shlex.split(dict(readme_blocks(DEMO_ROUTE))["bash"].splitlines()[-1], comments=True)
    assert argv == ["python", "run_pipeline.py", "--demo"]
    assert run_pipeline.main(argv[2:]) == 0, errors.text("ascii")[-3000:]
    assert "Traceback" not in errors.text("ascii")
    out = console.text("cp1252")
    assert "✓" not in out and "OK pipeline finished" in out
    for folder in (folders.MODEL_DIR, folders.DATA_DIR, folders.PREPARED_DIR):
        assert f"OK {folder}/ already holds" in out
    assert f"OK {folders.CHECKPOINTS_DIR}/{folders.FINAL_ADAPTER}/ already holds an adapter trained" in out
    # export before evaluate: the shipped model scored beside the adapter and the base, on the same problems
    assert out.index("=== [6/7] export.py") < out.index("=== [7/7] evaluate.py")
    assert [line for line in readme_demo_output() if line not in out.splitlines()] == []
    summary = json.loads((readme_demo["folder"] / folders.RESULTS_DIR / folders.SUMMARY).read_text(encoding="utf-8"))
    assert summary["comparisons"]["fine-tuned"]["verdict"] in out[out.index("OK pipeline finished"):]


# ---- every command of every README block ------------------------------------------------------------------


def readme_command_lines() -> list[list[str]]:
    """Each command of the README's shell blocks (bash, PowerShell, and the `$ ` lines of output blocks) as a shell
    splits it: a quoted argument may span lines; commands joined by &&, ; or | apart; redirections dropped."""
    found = []
    for language, block in readme_blocks():
        lines = [line[2:] if language == "" else line for line in block.splitlines()
                 if language in ("bash", "powershell") or (language == "" and line.startswith("$ "))]
        pending = ""
        for line in lines:
            pending += line + "\n"
            try:
                lexer = shlex.shlex(pending, posix=True, punctuation_chars=";&|>")
                lexer.whitespace_split, lexer.commenters = True, "#"
                tokens = list(lexer)
            except ValueError:  # a quotation still open: the command goes on
                continue
            pending, command = "", []
            for token in tokens + [";"]:
                if token in ("&&", ";", "|"):
                    found += [command] if command else []
                    command = []
                elif token.endswith(">"):  # > file, *> file (PowerShell): the file is the next token
                    command.append(None)
                elif command and command[-1] is None:
                    command[-1:] = []
                else:
                    command.append(token)
        assert not pending, pending
    return [[token for token in command if token != "*"] for command in found]  # *> is PowerShell's redirection


def script_parser(script: str):
    path = ROOT / script
    assert path.is_file(), f"the README runs {script}, which does not exist"
    if "/" in script:  # tools/ and bench/: loaded from their files, as their own folder is not on sys.path
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = sys.modules.setdefault(path.stem, importlib.util.module_from_spec(spec))
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(path.stem)
    parser = module.build_parser()

    def refuse(message):
        raise cli.StageError(message)

    for each in [parser, *(action.choices[name] for action in parser._actions
                           if isinstance(action.choices, dict) for name in action.choices)]:
        each.error = refuse  # subcommands too (checkpoint_manager.py list)
    return parser


def test_every_command_in_a_readme_block_is_one_its_script_accepts():
    commands = readme_command_lines()
    scripts = [argv for argv in commands if argv[:1] == ["python"] and argv[1] != "-m"]
    # torchrun and accelerate launch: the script and its flags after the launcher's
    scripts += [["python", *argv[n:]] for argv in commands if argv[0] in ("torchrun", "accelerate")
                for n in [next(i for i, token in enumerate(argv) if token.endswith(".py"))]]
    assert len(scripts) >= 50
    # and the commands quoted in the text, `python evaluate.py --split train` (not `python -c ...` or `python ...`)
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    scripts += [argv for argv in map(shlex.split, re.findall(r"`(python [^`]+\.py(?: [^`]*)?)`", text))
                if "--help" not in argv]
    wrong = []
    for argv in scripts:
        try:
            if argv[1] == "run_pipeline.py":  # the flags it does not know go to the stages that have them
                run_pipeline.check(*script_parser(argv[1]).parse_known_args(argv[2:]))
            else:
                script_parser(argv[1]).parse_args(argv[2:])
        except cli.StageError as problem:
            wrong.append(f"{shlex.join(argv)}: {problem}")
    assert wrong == []
    for argv in commands:  # the requirement files the README installs from
        if argv[:2] == ["pip", "install"] and "-r" in argv:
            assert (ROOT / argv[argv.index("-r") + 1]).is_file(), argv


@pytest.mark.parametrize("script", ["train.py", "prepare_data.py", "evaluate.py"])
def test_demo_gives_the_stage_its_demo_settings_and_a_flag_given_wins(script):
    module = importlib.import_module(script[:-3])
    demo = module.build_parser().parse_args(["--demo"])
    plain = module.build_parser().parse_args([])
    for flag, value in module.DEMO.items():
        typed = next(a.type for a in module.build_parser()._actions if flag in a.option_strings)
        assert getattr(demo, flag[2:].replace("-", "_")) == typed(value) != getattr(plain, flag[2:].replace("-", "_"))
    flag, _ = next(iter(module.DEMO.items()))
    given = module.build_parser().parse_args(["--demo", flag, "7" if "fraction" not in flag else "0.5"])
    assert str(getattr(given, flag[2:].replace("-", "_"))) in ("7", "0.5", "7.0")
