"""The one evaluation path: every declared metric reaches every output; the test split and an
external dataset are the same path with the same temperature policy."""

from __future__ import annotations

import html
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import save_tiny_model, tiny_params

from pipeline import metrics
from pipeline.evaluate import run_evaluate
from pipeline.evaluator import Target, evaluate_rows
from pipeline.external import run_external_evaluate
from pipeline.metrics import TEST_PREFIX, Metric, per_class_key, safe_divide

PARAMS = tiny_params(evaluate={"n_bootstrap": 20, "worst_errors": 2, "gradcam_per_class": 0})
# Two metrics added by one declaration each, to show that nothing else needs an edit.
ADDED = (
    Metric("error_rate", "Error rate", "error rate", False, False, "Share of images classified wrongly.",
           lambda s: safe_divide(s.total - s.tp.sum(axis=1), s.total)),
    Metric("miss_rate", "Miss rate", "miss rate", True, False, "Share of cells of a class labelled as another.",
           lambda s: safe_divide(s.fn, s.support)),
)


@pytest.fixture()
def model_dir(tmp_path):
    save_tiny_model(tmp_path / "models" / "model.pt", temperature=1.4, head_std=0.5)
    return tmp_path / "models"


def _test_rows(processed) -> np.ndarray:
    return np.flatnonzero(pd.read_csv(processed / "index.csv")["split"].to_numpy() == "test")


def test_every_declared_metric_reaches_json_csv_report_and_mlflow(tiny_processed, model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "METRICS", metrics.METRICS + ADDED)
    _, processed, _ = tiny_processed
    out = tmp_path / "reports"
    flat = evaluate_rows(PARAMS, model_dir, processed, _test_rows(processed), Target("tiny set", site="lab-a"), out)

    stored = json.loads((out / "metrics.json").read_text())
    assert stored == flat
    per_class = pd.read_csv(out / "per_class.csv")
    page, summary = (out / "report.html").read_text(), (out / "report.md").read_text()
    logged = mlflow.get_run(mlflow.last_active_run().info.run_id).data.metrics
    classes = list(per_class["class"])
    for m in metrics.METRICS:
        assert html.escape(m.heading) in page and m.heading in summary, m.key
        assert html.escape(m.explanation) in page, m.key  # the glossary
        if m.per_class:
            keys = [per_class_key(m.key, cls) for cls in classes]
            assert m.key in per_class.columns
            assert any(key in stored for key in keys), m.key
            assert any(TEST_PREFIX + key in logged for key in keys), m.key
        else:
            assert m.key in stored and logged[TEST_PREFIX + m.key] == pytest.approx(stored[m.key])
    assert stored["error_rate"] == pytest.approx(1 - stored["accuracy"])
    assert "(site lab-a)" in page and "Error rate (lower is better)" in page


def test_test_split_and_external_dataset_are_one_path(tiny_processed, tmp_path):
    """The same images as the test split and as an external dataset give the same numbers, and a model
    without a temperature gets 1.0 in both, said in both reports."""
    _, processed, _ = tiny_processed
    save_tiny_model(tmp_path / "models" / "model.pt", temperature=None, head_std=0.5)
    interim = tmp_path / "interim"
    interim.mkdir()
    (interim / "ingest.json").write_text(json.dumps({"synthetic": True, "root": "raw"}))
    reports = tmp_path / "reports"

    test = run_evaluate(PARAMS, tmp_path / "models", processed, interim, reports)
    external = run_external_evaluate(PARAMS, tmp_path / "models", tmp_path, reports, name="same", split="test")

    assert external.pop("n_unknown") == 0
    assert external == pytest.approx(test)
    assert test["calibration/temperature"] == 1.0
    for out in (reports, reports / "external" / "same"):
        page = (out / "report.html").read_text()
        assert "none saved with the model; 1.0 used" in page
        assert "The model carries no fitted temperature" in page
        assert "saved without a fitted temperature, so T = 1.0" in page
    tables = [pd.read_csv(out / "per_class.csv") for out in (reports, reports / "external" / "same")]
    pd.testing.assert_frame_equal(*tables)
