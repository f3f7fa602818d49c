"""The registered MLflow model served over HTTP answers like `wbc predict`."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from conftest import REPO
from test_train import _train

from pipeline.cli import main

MODEL_NAME = "wbc-serve-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_ping(server: subprocess.Popen, url: str, log, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            pytest.fail(f"mlflow models serve exited with {server.returncode}:\n{log.read()[-3000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    log.seek(0)
    pytest.fail(f"mlflow models serve did not answer /ping within {timeout:.0f}s:\n{log.read()[-3000:]}")


@pytest.mark.slow
def test_registered_model_served_over_http_matches_wbc_predict(tiny_processed, tmp_path, isolated_mlflow):
    raw, processed, policy = tiny_processed
    result, _, out = _train(tmp_path, processed, policy, epochs=2,
                            tracking={"log_model": True, "registered_model": MODEL_NAME})
    run_info = json.loads((out / "models" / "run.json").read_text())
    version = run_info["registered_model_version"]
    registered = mlflow.MlflowClient().get_model_version(MODEL_NAME, version)
    assert registered.run_id == result["run_id"]

    images = [raw / "monocyte" / "monocyte_0000.png", raw / "platelet" / "platelet_0003.png"]
    csv = tmp_path / "predict.csv"
    assert main(["--quiet", "predict", *map(str, images), "--model", str(out / "models" / "model.pt"),
                 "--out", str(csv)]) == 0
    expected = pd.read_csv(csv)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # the server starts uvicorn by name: the interpreter's own bin folder must be on PATH
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": isolated_mlflow, "OMP_NUM_THREADS": "1", "PATH": path}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL_NAME}/{version}",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with (tmp_path / "serve.log").open("w+") as log:
        # its own process group: `mlflow models serve` runs uvicorn as a child, and both must go
        server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            _wait_for_ping(server, url, log)
            rows = [[base64.b64encode(path.read_bytes()).decode("ascii"), None] for path in images]
            # a file the server could read, and one it must never: both refused, the model reads no paths
            rows += [["not base64!", None], [None, str(images[0])], [None, "/etc/passwd"]]
            response = requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["image", "path"],
                                                                                      "data": rows}}, timeout=60)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=15)
    assert response.status_code == 200, response.text[:2000]
    served = pd.DataFrame(response.json()["predictions"])
    classes = [c for c in expected.columns if c.startswith("p_")]
    assert served["status"].tolist() == ["ok", "ok", "not-base64", "path-not-allowed", "path-not-allowed"]
    assert served.loc[4, "path"] == "/etc/passwd" and "serve_path_root" in served.loc[4, "detail"]
    assert "root:" not in response.text  # nothing of the file reached the answer
    np.testing.assert_allclose(served.loc[:1, classes].to_numpy(dtype=float), expected[classes].to_numpy(),
                               atol=1e-5, rtol=0)
    assert served.loc[:1, "predicted"].tolist() == expected["predicted"].tolist()
    assert served.loc[:1, "uncertain"].tolist() == expected["uncertain"].tolist()
    rejected = response.json()["predictions"][2]
    assert all(rejected[name] is None for name in classes)  # null, not NaN: the answer is valid JSON
    assert rejected["predicted"] is None and rejected["uncertain"] is None
