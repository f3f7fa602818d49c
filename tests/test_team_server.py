"""Team mode for real: `mlflow server` on a PostgreSQL backend store with proxied artifacts, started the
way `make team-server` starts it; the default pipeline and a parallel sweep log to it over HTTP,
their runs and registered models are there, and `wbc compare` and `wbc promote` read them."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
import yaml
from dvc_project import commit, make_project, project_env, queue_logs, run, run_queue, stages_run

from pipeline import team_server
from pipeline.registry import CANDIDATE, logged_model_id

pytestmark = pytest.mark.slow

RUN_NAME = "baseline-cnn-scratch"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unavailable() -> str | None:
    """Why a PostgreSQL-backed server cannot be started here, or None."""
    if team_server.postgres_bin() is None:
        return "PostgreSQL is not installed (Debian: apt-get install postgresql)"
    if importlib.util.find_spec("psycopg2") is None:
        return "psycopg2 is not installed (pip install -e '.[team]')"
    try:
        team_server.service_account()
    except RuntimeError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def server():
    """`python -m pipeline.team_server` (what `make team-server` runs) on private ports; its URL and folder."""
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    # A folder the PostgreSQL account can reach when the tests run as root (pytest's own are private).
    folder = Path(tempfile.mkdtemp(prefix="wbc-team-"))
    folder.chmod(0o755)
    port, db_port = _free_port(), _free_port()
    log = (folder / "server.log").open("w+")
    process = subprocess.Popen([sys.executable, "-m", "pipeline.team_server", "--dir", str(folder), "--port",
                                str(port), "--db-port", str(db_port), "--workers", "2"],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(url, process, log)
        yield url, folder, db_port
    finally:
        process.send_signal(signal.SIGTERM)  # the server stops, then the database
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_health(url: str, process: subprocess.Popen, log, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"the team server exited with {process.returncode}:\n{log.read()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or busy creating its tables
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the team server did not answer /health within {timeout:.0f} s")
        time.sleep(1)


def test_the_pipeline_and_a_parallel_sweep_log_to_the_postgres_backed_server(server, tmp_path):
    url, folder, db_port = server
    env = project_env(tracking_uri=url)
    root = make_project(tmp_path / "project", env)
    ran = stages_run(run(["dvc", "repro"], root, env))
    assert ran.index("train") < ran.index("evaluate") and "crosssite" in ran
    commit(root, env, "pipeline run")
    queued = {f"q{seed}": [f"train.seed={seed}"] for seed in (1, 2, 3)}
    statuses = run_queue(root, env, queued, jobs=2)
    assert statuses == dict.fromkeys(queued, "Success"), {name: queue_logs(root, env, name)[-3000:] for name in queued}
    assert not (root / "mlflow.db").exists(), "runs went to the project's store, not the server"

    client = mlflow.MlflowClient(url)
    experiment = client.get_experiment_by_name("e2e")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {RUN_NAME, *(f"{name}: {RUN_NAME}" for name in queued)}
    for found in runs.values():
        assert found.info.status == "FINISHED" and "test_macro_f1" in found.data.metrics
        assert found.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied by the server
        assert "evaluation/report.html" in {a.path for a in client.list_artifacts(found.info.run_id, "evaluation")}
    versions = client.search_model_versions("name = 'wbc-classifier'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs.values())
    assert all(client.get_logged_model(logged_model_id(v)).metrics for v in versions)
    assert client.get_model_version_by_alias("wbc-classifier", CANDIDATE).run_id in {
        r.info.run_id for r in runs.values()}
    assert list((folder / "artifacts").rglob("model.pt")), "no artifact reached --artifacts-destination"
    # The runs live in PostgreSQL itself.
    count = subprocess.run(team_server.Postgres(team_server.postgres_bin(), folder / "pg", db_port, None)
                           .client_command("psql", "-d", team_server.DB_NAME, "-tAc", "SELECT COUNT(*) FROM runs"),
                           capture_output=True, text=True, check=True).stdout
    assert int(count) == len(runs)

    compared = run(["wbc", "compare", "--experiment", "e2e"], root, env)
    table = pd.read_csv(root / "reports" / "compare.csv")
    assert len(table) == len(runs) and table["test_macro_f1"].notna().all(), compared
    assert set(table["dvc_experiment"].dropna()) == set(queued)

    # The default gates refuse a tiny model, naming its numbers; gates it passes make it the champion, which is
    # read back through the server's artifact proxy.
    refused = subprocess.run(["wbc", "promote"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "not promoted: macro F1 " in refused.stderr, refused.stderr
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["promote"] = {"min_macro_f1": 0.0, "min_class_recall": 0.0}
    (tmp_path / "gates.yaml").write_text(yaml.safe_dump(params))
    promoted = run(["wbc", "--params", str(tmp_path / "gates.yaml"), "promote"], root, env)
    image = next((root / "data" / "raw" / "synthetic" / "monocyte").iterdir())
    run(["wbc", "predict", str(image), "--model", "models:/wbc-classifier@champion", "--out",
         str(tmp_path / "champion.csv")], root, env)
    assert pd.read_csv(tmp_path / "champion.csv")["status"].tolist() == ["ok"]
    print(f"{len(runs)} runs and {len(versions)} model versions on {url} (PostgreSQL)\n{refused.stderr.strip()}\n"
          f"{promoted.strip()}")
