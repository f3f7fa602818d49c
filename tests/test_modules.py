"""The package's shape: imports without cycles, stage modules nobody else's library, one table of reason codes."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from pipeline.inspection import REASON_MEANINGS

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
# Callables that carry a reason code, and the position of the code among their arguments.
REASON_ARGUMENT = {"Rejection": 1, "ImageReadError": 1, "RejectedInput": 0, "refused": 1}
CODE = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")  # a sentence held in a variable named reason is no code


def _trees() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.glob("*.py"))}


def pipeline_imports(tree: ast.Module) -> set[str]:
    """The pipeline modules a module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("pipeline.")}
    return found


def _graph() -> dict[str, set[str]]:
    return {name: pipeline_imports(tree) - {name} for name, tree in _trees().items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for module in graph.get(todo.pop(), ()):
            if module not in seen:
                seen.add(module)
                todo.append(module)
    return seen


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    cycles = sorted(name for name in graph if name in _reachable(graph, name))
    assert not cycles, f"modules importing themselves through others: {cycles}"


def test_ingest_and_normalize_are_imported_only_by_the_cli():
    graph = _graph()
    for stage in ("ingest", "normalize"):
        importers = sorted(name for name, imported in graph.items() if stage in imported)
        assert importers == ["cli"], (stage, importers)


def test_prediction_does_not_reach_the_ingest_stage():
    reached = _reachable(_graph(), "predict")
    assert {"inspection", "sources"} & reached
    assert not {"ingest", "normalize", "splitting"} & reached


def _strings(node: ast.AST) -> Iterator[str]:
    """The string constants an expression can evaluate to (both branches of ``a if c else b``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, ast.IfExp):
        yield from _strings(node.body)
        yield from _strings(node.orelse)


def _reason_codes(tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            callee = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            position = REASON_ARGUMENT.get(callee)
            if position is not None and len(node.args) > position:
                yield from _strings(node.args[position])
            for keyword in node.keywords:
                if keyword.arg == "reason":
                    yield from _strings(keyword.value)
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "reason" for t in node.targets):
            yield from _strings(node.value)


def test_every_reason_code_used_has_its_meaning_in_the_one_table():
    used = {code: name for name, tree in _trees().items() for code in _reason_codes(tree) if CODE.fullmatch(code)}
    # one code of each kind of carrier: if the scan misses a kind, it proves nothing
    assert {"unknown-class", "undecodable", "not-base64", "too-small", "near-duplicate-conflict"} <= set(used)
    missing = {code: module for code, module in used.items() if code not in REASON_MEANINGS}
    assert not missing, f"reason codes without a meaning in pipeline.inspection.REASON_MEANINGS: {missing}"


def test_no_module_but_inspection_defines_a_reason_table():
    owners = [
        name
        for name, tree in _trees().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "REASON_MEANINGS" for t in node.targets)
    ]
    assert owners == ["inspection"]
