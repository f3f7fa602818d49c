"""End to end: the real `dvc repro` on a tiny config in a temporary git + DVC repository."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml
from dvc_project import make_project, project_env, run, stages_run

pytestmark = pytest.mark.slow

@pytest.fixture()
def project(tmp_path, isolated_mlflow) -> tuple[Path, dict]:
    """A committed git + DVC copy of the project on the tiny config (with the report's Grad-CAM and
    worst-errors figures), logging to the test session's MLflow store."""
    env = project_env(tracking_uri=isolated_mlflow)
    return make_project(tmp_path / "project", env, evaluate={"gradcam_per_class": 2, "worst_errors": 12}), env


def test_dvc_repro_runs_every_stage_then_only_what_changed(project):
    root, env = project
    first = run(["dvc", "repro"], root, env)
    ran = stages_run(first)
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
    logged = mlflow.get_run(run_id)
    assert "test_macro_f1" in logged.data.metrics and logged.data.tags["data.synthetic"] == "true"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "evaluation")}
    assert "evaluation/report.html" in artifacts

    # Nothing changed: nothing runs.
    assert stages_run(run(["dvc", "repro"], root, env)) == []
    shown = run(["dvc", "metrics", "show", "--json"], root, env)
    assert "macro_f1" in shown

    # A train param changed: only train and evaluate run again.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["lr"] = params["train"]["lr"] * 1.5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # (and the cross-site stage, whose folds are trained with the train params)
    assert sorted(stages_run(run(["dvc", "repro"], root, env))) == ["crosssite", "evaluate", "train"]


def test_a_bad_param_stops_the_stage_with_the_key_named(project):
    root, env = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["normalize"]["mode"] = "stretch"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run(["wbc", "normalize"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "normalize.mode" in done.stderr and "'pad' or 'crop'" in done.stderr and "Traceback" not in done.stderr
