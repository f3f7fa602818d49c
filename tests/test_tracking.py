"""MLflow store resolution, credentials kept out of files, and experiment creation under concurrency."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import tracking


def test_project_root_is_found_from_a_subfolder_and_from_a_dvc_experiment_workspace(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data" / "raw").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    # DVC runs queued and --temp experiments in a full copy of the project under .dvc/tmp/
    workspace = project / ".dvc" / "tmp" / "exps" / "tmpk2v9"
    workspace.mkdir(parents=True)
    (workspace / "dvc.yaml").write_text("stages: {}\n")
    assert tracking.project_root(project / "data" / "raw") == project.resolve()
    assert tracking.project_root(workspace) == project.resolve()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(workspace) == f"sqlite:///{(project / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(workspace) == "http://127.0.0.1:5999"


def test_project_root_outside_any_project_is_the_folder_itself(tmp_path):
    assert tracking.project_root(tmp_path) == tmp_path.resolve()


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("postgresql://wbc:s3cret@db.lab:5432/mlflow", "postgresql://wbc:***@db.lab:5432/mlflow"),
        ("https://alice:pw@mlflow.lab/", "https://alice:***@mlflow.lab/"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////tmp/x/mlflow.db", "sqlite:////tmp/x/mlflow.db"),
    ],
)
def test_redact_uri_hides_passwords(uri, expected):
    assert tracking.redact_uri(uri) == expected
    assert "s3cret" not in tracking.redact_uri(uri) and ":pw@" not in tracking.redact_uri(uri)


def test_a_redacted_uri_is_never_used_to_log(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.recorded_uri("postgresql://wbc:***@db/mlflow") == tracking.tracking_uri()
    assert tracking.recorded_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:6000")
    assert tracking.recorded_uri("http://127.0.0.1:5000") == "http://127.0.0.1:6000"


_CREATE = textwrap.dedent("""
    import sys
    from pipeline import tracking
    import mlflow
    experiment_id = tracking.setup_experiment("wbc")
    with mlflow.start_run(experiment_id=experiment_id):
        mlflow.log_metric("m", 1.0)
    print(experiment_id)
""")


@pytest.mark.parametrize("processes", [2, 4])
def test_concurrent_first_use_of_a_fresh_store_loses_nothing(tmp_path, processes):
    """Several trainings starting at once on a new SQLite store: one schema, one experiment, every run."""
    database = tmp_path / "mlflow.db"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{database}", "PATH": str(Path(sys.executable).parent)}
    children = [subprocess.Popen([sys.executable, "-c", _CREATE], cwd=tmp_path, env={**_base_env(), **env},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(processes)]
    results = [child.communicate(timeout=240) + (child.returncode,) for child in children]
    failures = [err[-2000:] for _, err, code in results if code != 0]
    assert not failures, failures
    assert len({out.strip() for out, _, _ in results}) == 1  # one experiment id for all
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT COUNT(*) FROM experiments WHERE name = 'wbc'").fetchone() == (1,)
        assert db.execute("SELECT COUNT(*) FROM runs WHERE status = 'FINISHED'").fetchone() == (processes,)
        assert db.execute("SELECT COUNT(*) FROM metrics WHERE key = 'm'").fetchone() == (processes,)


def _base_env() -> dict[str, str]:
    keep = ("HOME", "LANG", "LC_ALL", "PYTHONPATH", "TMPDIR")
    return {key: os.environ[key] for key in keep if key in os.environ}


def test_end_run_as_closes_a_dangling_run(isolated_mlflow):
    import mlflow

    experiment_id = tracking.setup_experiment("dangling")
    run_id = mlflow.MlflowClient().create_run(experiment_id).info.run_id  # a killed process leaves it RUNNING
    assert mlflow.MlflowClient().get_run(run_id).info.status == "RUNNING"
    tracking.end_run_as(run_id, "KILLED")
    assert mlflow.MlflowClient().get_run(run_id).info.status == "KILLED"
    tracking.end_run_as("0" * 32)  # unknown run: nothing to do, no error
