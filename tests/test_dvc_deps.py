"""dvc.yaml names exactly what each stage runs and reads: the modules of pipeline/ it imports (kept
exact by the first test) and only the params sections that change its outputs."""

from __future__ import annotations

import ast

import yaml
from conftest import REPO
from test_modules import pipeline_imports

from pipeline.config import STAGE_SECTIONS, Params

PACKAGE = REPO / "pipeline"
# The command line only parses arguments and hands them to the stage's module (every path it passes is
# on the stage's cmd in dvc.yaml), and the package's __init__ holds the version: neither changes an
# output, and listing them would re-run every stage for a new help text.
NOT_STAGE_CODE = {"cli", "__init__"}


def _stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def imported_modules(module: str) -> set[str]:
    """Modules of pipeline/ that ``module`` imports anywhere in its code (also inside functions)."""
    found = pipeline_imports(ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8")))
    return {name for name in found if (PACKAGE / f"{name}.py").is_file()} - NOT_STAGE_CODE


def code_of(module: str) -> list[str]:
    """``module`` and every module of pipeline/ it reaches through imports, as dvc.yaml paths."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += imported_modules(name)
    return sorted(f"pipeline/{name}.py" for name in seen)


def test_each_stage_lists_the_modules_it_runs():
    for name, stage in _stages().items():
        command = stage["cmd"].split()[1:]
        module = next(word for word in command if not word.startswith("-"))
        listed = sorted(dep for dep in stage["deps"] if dep.startswith("pipeline/"))
        expected = code_of(module)
        assert listed == expected, f"dvc.yaml stage {name}: deps should list\n" + "\n".join(
            f"      - {path}" for path in expected)


def test_stages_depend_only_on_stage_sections_never_on_runtime_or_tracking():
    sections = set()
    for name, stage in _stages().items():
        for entry in stage["params"]:
            section = entry.split(".")[0]
            assert section in STAGE_SECTIONS, f"stage {name} depends on {entry}, outside {STAGE_SECTIONS}"
            sections.add(section)
    assert sections == set(STAGE_SECTIONS)
    assert {"runtime", "tracking"} <= set(Params.model_fields) - set(STAGE_SECTIONS)
