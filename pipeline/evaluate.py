"""Evaluate stage: the trained model on the test split, per class, with a report.

Writes ``metrics.json`` (DVC metrics), ``per_class.csv`` and ``predictions.csv`` (DVC plots),
pictures under ``figures/`` and ``report.html``/``report.md``, and logs all of it into the
MLflow run that trained the model.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from pipeline import tracking
from pipeline.config import Params
from pipeline.data import ProcessedImages, load_index, select_split
from pipeline.explain import write_explanation_figures
from pipeline.inference import load_model, pick_device, predict_logits
from pipeline.layout import IMAGES_FILE
from pipeline.metrics import (
    calibration_summary,
    classification_metrics,
    fit_temperature,
    flat_metrics,
    softmax,
    write_figures,
)
from pipeline.report import write_report

PER_CLASS_COLUMNS = ["precision", "recall", "specificity", "f1", "roc_auc", "average_precision"]


def dataset_name(ingest: dict) -> str:
    """A short human name of the ingested dataset."""
    if ingest.get("synthetic"):
        return "the synthetic sample"
    return Path(ingest.get("root", "unknown")).name or str(ingest.get("root"))


def read_run_info(model_dir: Path) -> dict:
    """``run.json`` written by the train stage (MLflow run and store of the model), or {}."""
    path = Path(model_dir) / "run.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def code_and_run(run_info: dict) -> dict[str, str]:
    """The provenance every report carries: git commit and dirty flag, MLflow run, creation time."""
    git = tracking.git_state()
    return {
        "git_commit": git["git.commit"],
        "git_dirty": git["git.dirty"],
        "mlflow_run_id": run_info.get("run_id", "not tracked"),
        "mlflow_experiment_id": run_info.get("experiment_id", ""),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def per_class_table(metrics: dict) -> pd.DataFrame:
    """One row per class: point values of the per-class metrics and the support."""
    rows = []
    for name, entry in metrics["per_class"].items():
        row = {"class": name, **{key: entry[key]["value"] for key in PER_CLASS_COLUMNS}}
        row["support"] = entry["support"]
        rows.append(row)
    return pd.DataFrame(rows, columns=["class", *PER_CLASS_COLUMNS, "support"])


def predictions_table(paths: list[str], y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Per test image: path, true and predicted class, and every class probability."""
    table = pd.DataFrame({
        "path": paths,
        "actual": [classes[i] for i in y_true],
        "predicted": [classes[i] for i in probs.argmax(axis=1)],
    })
    for i, name in enumerate(classes):
        table[f"p_{name}"] = probs[:, i].round(6)
    return table


def run_evaluate(params: Params, model_dir: Path, processed_dir: Path, interim_dir: Path,
                 reports_dir: Path) -> dict[str, float]:
    """Evaluate ``model_dir/model.pt`` on the test split; return the flat headline metrics."""
    cfg = params.evaluate
    device = pick_device(params.train.device)
    model, meta = load_model(model_dir / "model.pt", device)
    classes = list(meta.classes)
    index = load_index(processed_dir)

    def logits_of(split: str) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
        rows = select_split(index, split, classes)
        if len(rows.rows) == 0:
            raise ValueError(f"{processed_dir}: the {split} split is empty; nothing to evaluate")
        loader = DataLoader(ProcessedImages(processed_dir, rows, meta.image_size), batch_size=cfg.batch_size,
                            num_workers=0)
        logits, labels = predict_logits(model, loader, device)
        return logits, labels, rows.paths, rows.rows

    test_logits, y_test, test_paths, test_rows = logits_of("test")
    if meta.temperature is not None:  # fitted on val by the train stage and saved with the model
        temperature = meta.temperature
    else:  # a model saved without one
        val_logits, y_val, _, _ = logits_of("val")
        temperature = fit_temperature(val_logits, y_val)
    probs = softmax(test_logits)
    metrics = classification_metrics(y_test, probs, classes, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
    metrics["calibration"] = calibration_summary(y_test, test_logits, temperature)
    flat = flat_metrics(metrics)

    reports_dir.mkdir(parents=True, exist_ok=True)
    history_path = reports_dir / "train_history.csv"
    history = pd.read_csv(history_path) if history_path.is_file() else None
    figures = write_figures(reports_dir / "figures", y_test, probs, classes, history=history,
                            y_prob_calibrated=softmax(test_logits, temperature))
    figures.update(write_explanation_figures(
        reports_dir / "figures", model=model, model_name=meta.model, image_size=meta.image_size,
        images=np.load(processed_dir / IMAGES_FILE, mmap_mode="r"), rows=test_rows, paths=test_paths,
        y_true=y_test, y_prob=probs, classes=classes, n_worst=cfg.worst_errors,
        gradcam_per_class=cfg.gradcam_per_class, seed=cfg.seed, device=device,
    ))
    (reports_dir / "metrics.json").write_text(json.dumps(flat, indent=2) + "\n", encoding="utf-8")
    per_class_table(metrics).to_csv(reports_dir / "per_class.csv", index=False)
    predictions_table(test_paths, y_test, probs, classes).to_csv(reports_dir / "predictions.csv", index=False)

    ingest_path = interim_dir / "ingest.json"
    ingest = json.loads(ingest_path.read_text(encoding="utf-8")) if ingest_path.is_file() else {}
    run_info = read_run_info(model_dir)
    provenance = {**ingest, "dataset": dataset_name(ingest), "split": "test", **code_and_run(run_info)}
    model_info = meta.summary()
    model_info["temperature (fitted on val)"] = round(temperature, 4)
    synthetic = bool(ingest.get("synthetic", False))
    write_report(
        reports_dir / "report.html",
        reports_dir / "report.md",
        title=f"WBC classifier evaluation: {meta.model} on {provenance['dataset']}",
        synthetic=synthetic,
        provenance=provenance,
        model=model_info,
        params=params.model_dump(mode="json"),
        metrics=metrics,
        figures=figures,
    )
    log_evaluation(run_info, flat, reports_dir)
    return flat


def log_evaluation(run_info: dict, flat: dict[str, float], reports_dir: Path, *, metric_prefix: str = "test_",
                   artifact_path: str = "evaluation",
                   files: tuple[str, ...] = ("metrics.json", "per_class.csv", "predictions.csv", "report.html",
                                             "report.md")) -> None:
    """Add the evaluation to the training run (a new run when the model was trained elsewhere):
    metrics as ``<metric_prefix><key>``, ``files`` and ``figures/`` under ``artifact_path``."""
    if run_info.get("tracking_uri") and "MLFLOW_TRACKING_URI" not in os.environ:
        mlflow.set_tracking_uri(run_info["tracking_uri"])
    else:
        mlflow.set_tracking_uri(tracking.tracking_uri())
    with mlflow.start_run(run_id=run_info.get("run_id")):
        mlflow.log_metrics({f"{metric_prefix}{key}": value for key, value in flat.items()})
        for name in files:
            mlflow.log_artifact(str(reports_dir / name), artifact_path=artifact_path)
        mlflow.log_artifacts(str(reports_dir / "figures"), artifact_path=f"{artifact_path}/figures")
