"""A throw-away git + DVC copy of the project on a tiny config, driven by the real `dvc` and `git`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import REPO

# Small enough that a whole pipeline run takes seconds of compute.
TINY = {
    "sample": {"per_class": 8, "size": 48},
    "ingest": {"near_dup_threshold": 0},
    "normalize": {"size": 48},
    "augment": {"preview_images": 2},
    "train": {"model": "baseline-cnn", "pretrained": "none", "image_size": 32, "epochs": 2, "freeze_epochs": 0,
              "batch_size": 16},
    "runtime": {"train_workers": 0},
    "tracking": {"experiment": "e2e"},
    "evaluate": {"n_bootstrap": 20, "gradcam_per_class": 0, "worst_errors": 0},
}
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@example.invalid"}


def project_env(tracking_uri: str | None) -> dict[str, str]:
    """The environment a user's shell would have: this venv's tools first on PATH, a git identity, and
    ``MLFLOW_TRACKING_URI`` only when given (else runs go to the project's own store)."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env.update(GIT_IDENTITY, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def make_project(root: Path, env: dict[str, str], **overrides: dict) -> Path:
    """A committed git + DVC repository at ``root`` holding ``dvc.yaml``, the ``pipeline`` package (the
    code the stages list in their deps) and ``params.yaml`` with :data:`TINY` and ``overrides`` applied."""
    root.mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in (*TINY.items(), *overrides.items()):
        params.setdefault(section, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root, env)
    run(["dvc", "init", "-q"], root, env)
    commit(root, env, "tiny project")
    return root


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    """Run a command as a user would; its output, or a failed assertion showing it."""
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def commit(root: Path, env: dict[str, str], message: str) -> None:
    """Commit everything git does not ignore."""
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", message], root, env)


def stages_run(output: str) -> list[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def set_param(root: Path, key: str, value: object) -> None:
    """Write ``value`` at the dotted ``key`` of the project's params.yaml."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    section, name = key.split(".")
    params.setdefault(section, {})[name] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_queue(root: Path, env: dict[str, str], experiments: dict[str, list[str]], jobs: int,
              timeout: float = 1500) -> dict[str, str]:
    """Queue ``experiments`` (name -> ``-S`` overrides), run them with ``dvc queue start -j jobs`` and
    wait until none is queued or running; the status of each as `dvc queue status` shows it."""
    for name, overrides in experiments.items():
        run(["dvc", "exp", "run", "--queue", "-n", name, *(arg for o in overrides for arg in ("-S", o))], root, env)
    run(["dvc", "queue", "start", "-j", str(jobs)], root, env)
    deadline = time.monotonic() + timeout
    while True:
        status = run(["dvc", "queue", "status"], root, env)
        states = {match[0]: match[1] for match in re.findall(r"^\w+\s+(\S+)\s+.*?\s(\w+)\s*$", status, re.M)}
        pending = [name for name in experiments if states.get(name) not in ("Success", "Failed")]
        if not pending:
            return {name: states[name] for name in experiments}
        assert time.monotonic() < deadline, f"queue still busy after {timeout:.0f}s:\n{status}"
        time.sleep(10)


def queue_logs(root: Path, env: dict[str, str], name: str) -> str:
    """What experiment ``name`` printed while it ran in the queue."""
    return subprocess.run(["dvc", "queue", "logs", name], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120).stdout
