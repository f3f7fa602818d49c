"""Registry aliases: the evaluated model is the candidate, `wbc promote` makes it champion only past the
gates, and prediction and the pyfunc model take `models:/<name>@champion`."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from conftest import tiny_params
from test_train import _train

from pipeline import tracking
from pipeline.cli import main
from pipeline.config import PromoteParams
from pipeline.evaluate import run_evaluate
from pipeline.promote import gates
from pipeline.registry import CANDIDATE, CHAMPION, logged_model_id

MODEL_NAME = "wbc-promote-test"


def test_gates_check_macro_f1_and_every_tested_class():
    metrics = {"macro_f1": 0.82, "recall/a": 0.9, "support/a": 5, "recall/b": 0.55, "support/b": 4, "support/c": 0}
    checked = {gate.what: gate for gate in gates(metrics, PromoteParams(min_macro_f1=0.8, min_class_recall=0.6))}
    assert checked["macro F1"].passed and checked["recall of a"].passed
    assert not checked["recall of b"].passed
    assert checked["recall of b"].describe() == "recall of b 0.5500 < 0.6000 (promote.min_class_recall)"
    assert not checked["recall of c"].passed  # no test image of c: nothing vouches for it
    assert "not measured" in checked["recall of c"].describe()


def _params_file(tmp_path, **promote) -> str:
    raw = tiny_params(tracking={"log_model": True, "registered_model": MODEL_NAME},
                      promote=promote, evaluate={"n_bootstrap": 10, "gradcam_per_class": 0, "worst_errors": 0})
    path = tmp_path / f"params-{len(list(tmp_path.glob('params-*')))}.yaml"
    path.write_text(yaml.safe_dump(raw.model_dump(mode="json"), sort_keys=False))
    return str(path)


@pytest.mark.slow
def test_evaluated_model_is_candidate_and_promote_moves_champion_only_past_the_gates(tiny_processed, tmp_path,
                                                                                     capsys):
    raw, processed, policy = tiny_processed
    params = tiny_params(tracking={"log_model": True, "registered_model": MODEL_NAME},
                         evaluate={"n_bootstrap": 10, "gradcam_per_class": 0, "worst_errors": 0})
    _, _, out = _train(tmp_path, processed, policy, epochs=2,
                       tracking={"log_model": True, "registered_model": MODEL_NAME})
    run_evaluate(params, out / "models", processed, tmp_path / "no-interim", out / "reports")
    run_info = json.loads((out / "models" / "run.json").read_text())
    client = mlflow.MlflowClient()

    # The evaluated version is the candidate; its test metrics are linked to its logged model and to the data.
    candidate = client.get_model_version_by_alias(MODEL_NAME, CANDIDATE)
    assert str(candidate.version) == run_info["registered_model_version"]
    assert logged_model_id(candidate) == run_info["model_id"]
    linked = {m.key: m for m in client.get_logged_model(run_info["model_id"]).metrics}
    metrics = json.loads((out / "reports" / "metrics.json").read_text())
    assert linked["test_macro_f1"].value == pytest.approx(metrics["macro_f1"])
    assert linked["test_macro_f1"].dataset_name == f"{processed.as_posix()}:test"
    inputs = client.get_run(run_info["run_id"]).inputs.dataset_inputs
    assert [entry.dataset.digest for entry in inputs] == [linked["test_macro_f1"].dataset_digest]

    # Gates the model cannot pass: refused with the numbers, exit 1, no champion.
    assert main(["--params", _params_file(tmp_path, min_macro_f1=1.0, min_class_recall=1.0), "promote"]) == 1
    refused = capsys.readouterr()
    assert f"{MODEL_NAME} version {candidate.version} not promoted" in refused.err
    assert f"macro F1 {metrics['macro_f1']:.4f} < 1.0000 (promote.min_macro_f1)" in refused.err
    weakest = min(value for key, value in metrics.items() if key.startswith("recall/"))
    assert f"{weakest:.4f} < 1.0000 (promote.min_class_recall)" in refused.err
    assert f"{CHAMPION!r} stays unset" in refused.err
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(MODEL_NAME, CHAMPION)

    # Gates it passes: champion.
    assert main(["--params", _params_file(tmp_path, min_macro_f1=0.0, min_class_recall=0.0), "promote"]) == 0
    accepted = capsys.readouterr().out
    assert f"{MODEL_NAME} version {candidate.version} is now champion (was unset)" in accepted
    assert f"macro F1 {metrics['macro_f1']:.4f} >= 0.0000 (promote.min_macro_f1)" in accepted
    assert str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version) == str(candidate.version)

    # wbc predict and the pyfunc model take the champion's registry URI and answer like the model file.
    images = [str(raw / "monocyte" / "monocyte_0000.png"), str(raw / "platelet" / "platelet_0003.png")]
    params_file = _params_file(tmp_path)
    by_file, by_alias = tmp_path / "by_file.csv", tmp_path / "by_alias.csv"
    assert main(["--params", params_file, "predict", *images, "--model", str(out / "models" / "model.pt"),
                 "--out", str(by_file)]) == 0
    assert main(["--params", params_file, "predict", *images, "--model", f"models:/{MODEL_NAME}@{CHAMPION}",
                 "--out", str(by_alias)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(by_file), pd.read_csv(by_alias))
    mlflow.set_tracking_uri(tracking.tracking_uri())
    served = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@{CHAMPION}")
    table = served.predict(pd.DataFrame({"image": [base64.b64encode(Path(p).read_bytes()).decode() for p in images]}))
    assert table["predicted"].tolist() == pd.read_csv(by_file)["predicted"].tolist()
