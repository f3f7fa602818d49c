"""dvc.yaml, the CLI and pipeline.layout name the same folders and files."""

from __future__ import annotations

import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.config import parse_params
from pipeline.layout import (
    IMAGES_FILE,
    INDEX_FILE,
    INGEST_SUMMARY_FILE,
    INTERIM,
    MANIFEST_FILE,
    MODEL_FILE,
    MODELS,
    NORMALIZE_SUMMARY_FILE,
    PROCESSED,
    REJECTED_FILE,
    SAMPLE_DIR,
)

DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"
STAGES = yaml.safe_load(DVC_YAML.read_text(encoding="utf-8"))["stages"]
OUTPUT_KINDS = ("deps", "outs", "metrics", "plots")


def _argv(stage: dict) -> list[str]:
    words = shlex.split(stage["cmd"])
    assert words[0] == "wbc", stage["cmd"]
    return words[1:]


def _paths(stage: dict) -> list[PurePosixPath]:
    """Every data file or folder a stage lists in deps, outs, metrics and plots (templated ones and the
    stage's code in pipeline/ left out)."""
    entries = [entry for kind in OUTPUT_KINDS for entry in stage.get(kind, [])]
    names = [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries]
    return [PurePosixPath(name) for name in names if "${" not in name and not name.startswith("pipeline/")]


def _path_args(stage: dict) -> list[PurePosixPath]:
    args = vars(build_parser().parse_args(_argv(stage)))
    return [PurePosixPath(value.as_posix()) for value in args.values() if isinstance(value, Path)]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_dvc_stage_passes_the_cli_defaults(name):
    """Each path a dvc.yaml command passes is what the CLI (that is, pipeline.layout) gives by default."""
    argv = _argv(STAGES[name])
    given = vars(build_parser().parse_args(argv))
    default = vars(build_parser().parse_args([given["command"]]))
    for key in ("quiet", "handler"):
        given.pop(key)
        default.pop(key)
    assert given == default


@pytest.mark.parametrize("name", sorted(STAGES))
def test_dvc_stage_files_lie_in_the_folders_its_command_gets(name):
    stage = STAGES[name]
    folders = _path_args(stage)
    for path in _paths(stage):
        assert any(path == folder or folder in path.parents for folder in folders), (name, str(path))


def test_dvc_files_between_stages_carry_the_layout_names():
    interim, processed, models = (PurePosixPath(folder.as_posix()) for folder in (INTERIM, PROCESSED, MODELS))
    named = {
        interim: {MANIFEST_FILE, REJECTED_FILE, INGEST_SUMMARY_FILE},
        processed: {IMAGES_FILE, INDEX_FILE, NORMALIZE_SUMMARY_FILE},
    }
    listed = [path for stage in STAGES.values() for path in _paths(stage)]
    for path in listed:
        assert path.parent not in named or path.name in named[path.parent], str(path)
    assert interim / MANIFEST_FILE in _paths(STAGES["normalize"])
    assert interim / INGEST_SUMMARY_FILE in _paths(STAGES["train"])
    assert models / MODEL_FILE in _paths(STAGES["train"]) and models / MODEL_FILE in _paths(STAGES["evaluate"])


def test_default_data_root_is_the_sample_folder():
    assert Path(parse_params({}).data.root) == SAMPLE_DIR
