"""The layout a newcomer walks: the stages at the top, one package beneath, one home for what a template is."""

import ast
from pathlib import Path

from pipeline import folders, prompts

ROOT = folders.REPO_ROOT
STAGES = ["download_model", "download_dataset", "prepare_data", "train", "verify_model", "evaluate", "export",
          "generate", "run_pipeline"]
LONGEST_LINE = 120


def project_files() -> list[Path]:
    return sorted(p for folder in (ROOT, ROOT / "pipeline", ROOT / "tools", ROOT / "bench", ROOT / "tests")
                  for p in folder.glob("*.py"))


def test_the_top_level_holds_the_stages_a_user_runs_and_nothing_else():
    assert sorted(p.stem for p in ROOT.glob("*.py")) == sorted(STAGES)
    for stage in STAGES:
        tree = ast.parse((ROOT / f"{stage}.py").read_text(encoding="utf-8"))
        doc = ast.get_docstring(tree)
        assert "Run:" in doc and "Needs:" in doc and ("Writes:" in doc or "Reads/writes:" in doc), stage
        functions = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
        assert functions.index("build_parser") < functions.index("main"), stage  # parser, then main, then phases
        assert functions.index("main") < 3, stage


def test_no_template_is_told_apart_by_its_name_outside_prompts_py():
    """Stages ask the Template record (continues_code, chat, stops, default_for); none compares a name."""
    names = set(prompts.TEMPLATES)
    offenders = []
    for path in project_files():
        if path == ROOT / "pipeline" / "prompts.py" or path.parent.name == "tests":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                constants = [c for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in names]
                mentions = "template" in ast.unparse(node).lower()
                if constants and mentions:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders


def test_lines_are_wrapped():
    long = [f"{path.relative_to(ROOT)}:{number}" for path in project_files()
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
            if len(line) > LONGEST_LINE]
    assert not long, long
