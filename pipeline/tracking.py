"""MLflow set-up and provenance tags.

The default store is a SQLite file at the project root (``mlflow.db``, artifacts in
``mlartifacts/``) so ``mlflow ui`` works with no server; ``MLFLOW_TRACKING_URI`` points runs at a
team server. The project root is found from the working directory, also when DVC runs a queued or
``--temp`` experiment in a copy under ``.dvc/tmp/``: those runs land in the project's store, not in a
copy that DVC deletes. Nothing here touches MLflow until a command calls it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import mlflow
import yaml
from filelock import FileLock
from mlflow.exceptions import MlflowException

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
_LOCK_TIMEOUT_S = 120
_RETRIES = 5
_T = TypeVar("_T")


def project_root(start: Path | None = None) -> Path:
    """The folder holding the project's ``dvc.yaml``: the nearest one above ``start`` (default: the
    working directory), or, inside a DVC experiment workspace (``<project>/.dvc/tmp/...``), the
    project that owns that workspace. Falls back to ``start`` outside any DVC project."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if folder.name == ".dvc" and (folder.parent / "dvc.yaml").is_file() and here != folder:
            return folder.parent
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return here


def tracking_uri(root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the embedded SQLite store at the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(project_root(root) / DEFAULT_DB).resolve()}"


def redact_uri(uri: str) -> str:
    """``uri`` without the password of its user part (``postgresql://u:secret@h/db`` →
    ``postgresql://u:***@h/db``): safe to write into files and reports."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def recorded_uri(recorded: str | None) -> str:
    """The store to log into for a model trained earlier: ``MLFLOW_TRACKING_URI`` when set, else the
    URI recorded with the model when it is complete (not redacted), else the project's store."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if recorded and "***@" not in recorded:
        return recorded
    return tracking_uri()


def _store_lock(uri: str) -> FileLock | None:
    """A lock beside an SQLite store: creating its schema or an experiment from two processes at
    once fails in SQLite ("duplicate column name", "already exists")."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(database) + ".lock", timeout=_LOCK_TIMEOUT_S)


def with_retries(action: Callable[[], _T], what: str, retries: int = _RETRIES) -> _T:
    """Run ``action``; on an MLflow error that a concurrent writer can cause (a locked database, a
    name created meanwhile) wait a little and try again, up to ``retries`` times."""
    for attempt in range(retries + 1):
        try:
            return action()
        except MlflowException as exc:
            transient = any(text in str(exc).lower() for text in ("database is locked", "already exists"))
            if not transient or attempt == retries:
                raise RuntimeError(f"MLflow: {what} failed: {exc}") from None
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def setup_experiment(name: str, root: Path | None = None) -> str:
    """Point MLflow at the tracking store and return the id of experiment ``name`` (created if new).

    Safe when several processes start at once on a fresh store: schema and experiment creation
    happen under a file lock beside an SQLite store, and "already exists" is answered by a lookup.
    """
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    artifact_location = None
    if uri.startswith("sqlite:///"):
        # Keep artifacts beside the database, not wherever the command happens to run.
        database = Path(uri.removeprefix("sqlite:///"))
        artifact_location = (database.parent / DEFAULT_ARTIFACTS).resolve().as_uri()

    def get_or_create() -> str:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        return mlflow.create_experiment(name, artifact_location=artifact_location)

    lock = _store_lock(uri)
    if lock is None:
        return with_retries(get_or_create, f"creating experiment {name!r} in {redact_uri(uri)}")
    with lock:
        return with_retries(get_or_create, f"creating experiment {name!r} in {redact_uri(uri)}")


def end_run_as(run_id: str, status: str = "KILLED") -> None:
    """Close a run that will never be continued (its checkpoint was discarded) so it does not stay
    RUNNING in the UI; a run that no longer exists is left alone."""
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return
    if run.info.status == "RUNNING":
        client.set_terminated(run_id, status=status)


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


def dvc_out_hash(path: Path, lock_path: Path = Path("dvc.lock")) -> str | None:
    """DVC's md5 of the output ``path`` (a folder's ends in ``.dir``) as ``dvc.lock`` records it
    (``lock_path`` beside the project's ``dvc.yaml``), or None when no stage outputs it."""
    if not lock_path.is_file():
        return None
    try:
        wanted = Path(path).resolve().relative_to(lock_path.resolve().parent).as_posix()
    except ValueError:
        return None
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    for stage in lock.get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") == wanted and "md5" in out:
                return out["md5"]
    return None


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
