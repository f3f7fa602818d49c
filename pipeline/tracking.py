"""MLflow set-up and provenance tags.

The default store is a SQLite file in the project (``mlflow.db``, artifacts in ``mlartifacts/``)
so ``mlflow ui`` works with no server; ``MLFLOW_TRACKING_URI`` points runs at a team server.
Nothing here touches MLflow until a command calls it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import mlflow
import yaml

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def tracking_uri(project_root: Path = Path(".")) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the project's embedded SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(project_root / DEFAULT_DB).resolve()}"


def setup_experiment(name: str, project_root: Path = Path(".")) -> str:
    """Point MLflow at the tracking store and return the id of experiment ``name`` (created if new)."""
    uri = tracking_uri(project_root)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        # Keep artifacts beside the database, not wherever the command happens to run.
        database = Path(uri.removeprefix("sqlite:///"))
        artifact_location = (database.parent / DEFAULT_ARTIFACTS).resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=artifact_location)


def git_state(cwd: Path = Path(".")) -> dict[str, str]:
    """The commit and dirty flag of the working tree, or ``unknown`` outside git."""

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git.commit": commit, "git.dirty": str(bool(status)).lower()}


def dvc_data_hashes(lock_path: Path = Path("dvc.lock")) -> dict[str, str]:
    """DVC's md5 of each data output recorded in ``dvc.lock`` (as of the last completed stage)."""
    if not lock_path.is_file():
        return {}
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    hashes = {}
    for stage in ("ingest", "normalize"):
        for out in lock.get("stages", {}).get(stage, {}).get("outs", []):
            if "md5" in out:
                hashes[f"dvc.{stage}.{out['path']}"] = out["md5"]
    return hashes


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.1}}`` → ``{"train.lr": "0.1"}``, the shape MLflow params take."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat
