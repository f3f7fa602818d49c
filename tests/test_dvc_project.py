"""The pipeline as a lab runs it with DVC, in a throw-away git + DVC project on a tiny config, logging
to the project's own MLflow store: exact stage dependencies, a remote that a fresh clone pulls from,
and sweeps whose every run lands in the store."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
from itertools import pairwise

import mlflow
import pandas as pd
import pytest
import yaml
from dvc_project import commit, make_project, project_env, queue_logs, run, run_queue, set_param, stages_run

from pipeline.registry import logged_model_id

pytestmark = pytest.mark.slow

RUN_NAME = "baseline-cnn-scratch"  # run_name() of the tiny config's model


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> tuple:
    """A project whose pipeline has run once (`dvc repro`) and is committed, with no MLFLOW_TRACKING_URI."""
    env = project_env(tracking_uri=None)
    root = make_project(tmp_path_factory.mktemp("dvc") / "project", env)
    assert sorted(stages_run(run(["dvc", "repro"], root, env))) == sorted(
        ["sample", "ingest", "normalize", "augment", "train", "evaluate", "crosssite"])
    commit(root, env, "pipeline run")
    return root, env


def changed_stages(status: str) -> list[str]:
    """Stage names in `dvc status` output (lines like ``train:``)."""
    return [line[:-1] for line in status.splitlines() if line.endswith(":") and not line.startswith(("\t", " "))]


def test_editing_a_module_makes_its_stages_stale_and_runtime_knobs_rerun_nothing(reproduced):
    root, env = reproduced
    assert "up to date" in run(["dvc", "status"], root, env)

    for key, value in (("runtime.train_workers", 1), ("runtime.device", "cpu"), ("runtime.ingest_workers", 1),
                       ("runtime.normalize_workers", 1), ("tracking.experiment", "elsewhere"),
                       ("tracking.registered_model", "")):
        set_param(root, key, value)
    status = run(["dvc", "status"], root, env)
    print(f"dvc status after changing every runtime and tracking knob:\n{status}")
    assert "up to date" in status
    assert stages_run(run(["dvc", "repro"], root, env)) == []
    run(["git", "checkout", "params.yaml"], root, env)

    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for module in ("train", "normalize", "imaging"):
        path = root / "pipeline" / f"{module}.py"
        path.write_text(path.read_text() + "\n# edited\n")
        status = run(["dvc", "status"], root, env)
        print(f"dvc status after editing pipeline/{module}.py:\n{status}")
        running = sorted(name for name, stage in stages.items() if f"pipeline/{module}.py" in stage["deps"])
        assert sorted(changed_stages(status)) == running
        assert module != "train" or running == ["train"]
        assert f"modified:           pipeline/{module}.py" in status
        run(["git", "checkout", str(path.relative_to(root))], root, env)
    assert "up to date" in run(["dvc", "status"], root, env)


def test_a_fresh_clone_pulls_data_and_models_from_the_remote_and_reproduces_the_evaluation(reproduced, tmp_path):
    root, env = reproduced
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "storage", str(remote)], root, env)
    commit(root, env, "DVC remote")
    pushed = run(["dvc", "push"], root, env)
    print(f"dvc push: {pushed.strip()}")
    assert "pushed" in pushed and (remote / "files" / "md5").is_dir()

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    assert not (clone / "models" / "model.pt").exists()
    pulled = run(["dvc", "pull"], clone, env)
    print(f"dvc pull: {pulled.strip()}")
    for path in ("models/model.pt", "models/run.json", "data/processed/images.npy", "data/interim/manifest.csv",
                 "data/raw/synthetic", "reports/report.html"):
        assert (clone / path).exists(), path
    assert "up to date" in run(["dvc", "status"], clone, env)
    assert stages_run(run(["dvc", "repro"], clone, env)) == []

    # The evaluation alone, from the pulled model and data, gives the committed metrics again.
    committed = json.loads((root / "reports" / "metrics.json").read_text())
    assert stages_run(run(["dvc", "repro", "--force", "--single-item", "evaluate"], clone, env)) == ["evaluate"]
    again = json.loads((clone / "reports" / "metrics.json").read_text())
    assert again.keys() == committed.keys()
    assert all(again[key] == pytest.approx(committed[key], abs=1e-9, nan_ok=True) for key in committed)
    shutil.rmtree(clone)


def test_a_parallel_queue_and_a_temp_experiment_log_every_run_into_the_project_store(reproduced):
    root, env = reproduced
    queued = {f"q{seed}": [f"train.seed={seed}"] for seed in (1, 2, 3)}
    statuses = run_queue(root, env, queued, jobs=2)
    assert statuses == dict.fromkeys(queued, "Success"), {name: queue_logs(root, env, name)[-3000:] for name in queued}
    run(["dvc", "exp", "run", "--temp", "-n", "t4", "-S", "train.seed=4"], root, env)
    names = [*queued, "t4"]

    store = root / "mlflow.db"
    assert not list((root / ".dvc").rglob("mlflow.db")), "a run went into a workspace DVC deletes"
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    client = mlflow.MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("e2e").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment]) if "dvc.exp_name" in r.data.tags}
    assert set(runs) == {f"{name}: {RUN_NAME}" for name in names}
    shown = pd.read_csv(io.StringIO(run(["dvc", "exp", "show", "--csv"], root, env)))
    shown = shown[shown["Experiment"].notna()].set_index("Experiment")
    for name in names:
        found = runs[f"{name}: {RUN_NAME}"]
        assert found.info.status == "FINISHED"
        assert found.data.tags["dvc.exp_name"] == name
        assert found.data.metrics["test_log_loss"] == pytest.approx(shown.loc[name, "log_loss"])
    spans = sorted((runs[f"{name}: {RUN_NAME}"].info.start_time, runs[f"{name}: {RUN_NAME}"].info.end_time)
                   for name in queued)
    assert any(later[0] < earlier[1] for earlier, later in pairwise(spans)), "no two queued runs overlapped"
    registered = {v.run_id: v for v in client.search_model_versions("name = 'wbc-classifier'")}
    for found in runs.values():
        version = registered[found.info.run_id]
        assert client.get_logged_model(logged_model_id(version)).metrics  # test metrics linked to the model
    print(f"{len(runs)} experiment runs in {store}: " + ", ".join(
        f"{name} (test macro-F1 {found.data.metrics['test_macro_f1']:.4f}, model version "
        f"{registered[found.info.run_id].version})" for name, found in sorted(runs.items())))
