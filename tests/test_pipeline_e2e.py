"""End to end: the real `dvc repro` on a tiny config in a temporary git + DVC repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import REPO

pytestmark = pytest.mark.slow

TINY = {
    "sample": {"per_class": 8, "size": 48},
    "ingest": {"near_dup_threshold": 0},
    "normalize": {"size": 48},
    "augment": {"preview_images": 2},
    "train": {"model": "baseline-cnn", "pretrained": "none", "image_size": 32, "epochs": 2, "freeze_epochs": 0,
              "batch_size": 16},
    "runtime": {"train_workers": 0},
    "tracking": {"experiment": "e2e"},
    "evaluate": {"n_bootstrap": 20},
}


def _run(args: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def _stages_run(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.fixture()
def project(tmp_path, isolated_mlflow) -> tuple[Path, dict]:
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    # the stages list the modules they run in their deps
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "MLFLOW_TRACKING_URI":
           isolated_mlflow, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    _run(["git", "init", "-q"], root, env)
    _run(["dvc", "init", "-q"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "tiny project"], root, env)
    return root, env


def test_dvc_repro_runs_every_stage_then_only_what_changed(project):
    root, env = project
    first = _run(["dvc", "repro"], root, env)
    ran = _stages_run(first)
    assert [s for s in ran if s != "crosssite"] == ["sample", "ingest", "normalize", "augment", "train", "evaluate"]
    assert ran.index("crosssite") > ran.index("augment")  # it reads the processed images and the policy
    # one site (the sample): the cross-site report says there is nothing to leave out
    assert "no site to leave out" in (root / "reports" / "crosssite" / "report.md").read_text()

    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "recall/basophil", "f1/platelet"):
        assert 0.0 <= metrics[key] <= 1.0
    html = (root / "reports" / "report.html").read_text()
    assert "SYNTHETIC DATA" in html.split("</title>")[0]
    assert "SYNTHETIC" in (root / "reports" / "ingest.md").read_text().splitlines()[0]
    for name in ("augment_preview.png", "figures/confusion.png", "figures/confusion_normalized.png",
                 "per_class.csv", "predictions.csv", "train_history.csv", "report.md"):
        assert (root / "reports" / name).is_file(), name
    run_id = json.loads((root / "models" / "run.json").read_text())["run_id"]
    run = mlflow.get_run(run_id)
    assert "test_macro_f1" in run.data.metrics and run.data.tags["data.synthetic"] == "true"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "evaluation")}
    assert "evaluation/report.html" in artifacts

    # Nothing changed: nothing runs.
    assert _stages_run(_run(["dvc", "repro"], root, env)) == []
    shown = _run(["dvc", "metrics", "show", "--json"], root, env)
    assert "macro_f1" in shown

    # A train param changed: only train and evaluate run again.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["lr"] = params["train"]["lr"] * 1.5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # (and the cross-site stage, whose folds are trained with the train params)
    assert sorted(_stages_run(_run(["dvc", "repro"], root, env))) == ["crosssite", "evaluate", "train"]


def test_a_bad_param_stops_the_stage_with_the_key_named(project):
    root, env = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["normalize"]["mode"] = "stretch"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run(["wbc", "normalize"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "normalize.mode" in done.stderr and "'pad' or 'crop'" in done.stderr and "Traceback" not in done.stderr
