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


# ---- what a copied stage needs -----------------------------------------------------------------------------

# Files outside pipeline/ that a module reaches through these names (pipeline/folders.py, pipeline/gguf_export.py).
FILES_BY_NAME = {"DEMO_PROBLEMS": "assets/demo_problems.jsonl", "EXAMPLES": "assets/examples/",
                 "REQUIREMENTS": "requirements-gguf.txt"}


def pipeline_imports(path: Path) -> tuple[set[str], set[str]]:
    """The pipeline modules a file imports (at the top or inside a function) and the names it reads."""
    modules, names = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
            modules.add(node.module.split(".")[1])
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            names.add(node.id)
    return modules, names


def needed_by(path: Path) -> tuple[set[str], set[str]]:
    """Every pipeline module a stage needs, following imports from module to module (the sandbox copies
    sandbox_runner.py beside each candidate), and the files outside pipeline/ those modules read."""
    modules, names = pipeline_imports(path)
    found, waiting = set(), list(modules)
    while waiting:
        module = waiting.pop()
        if module not in found:
            found.add(module)
            more, read = pipeline_imports(ROOT / "pipeline" / f"{module}.py")
            waiting += [*more, *(["sandbox_runner"] if module == "sandbox" else [])]
            names |= read
    return found, {file for name, file in FILES_BY_NAME.items() if name in names}


def needs_line(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=False)
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Needs:"))
    following = [line.strip() for line in lines[start + 1:]]
    continued = following[:next((i for i, line in enumerate(lines[start + 1:]) if not line.startswith(" " * 8)),
                                len(following))]
    return " ".join([lines[start], *continued])


def test_each_stage_names_the_pipeline_modules_and_files_a_copy_of_it_needs():
    """A stage copied into a course assignment with what its header names must run: the pipeline modules it
    imports (and they import), and the files outside pipeline/ they read (assets/, requirements-gguf.txt)."""
    every = set()
    for stage in [stage for stage in STAGES if stage != "run_pipeline"]:
        modules, files = needed_by(ROOT / f"{stage}.py")
        every |= modules
        line = needs_line(ROOT / f"{stage}.py")
        named = set(line.split("pipeline/ (", 1)[1].split(")", 1)[0].replace(",", " ").split())
        assert named == modules, f"{stage}.py: {line}\n  modules it needs: {', '.join(sorted(modules))}"
        assert all(file in line for file in files), f"{stage}.py: {line}\n  files it reads: {sorted(files)}"
    line = needs_line(ROOT / "run_pipeline.py")
    assert "every stage file above" in line and "pipeline/" in line, line
    assert every <= {p.stem for p in (ROOT / "pipeline").glob("*.py")}
