"""Evaluate stage: the trained model on the test split, per class, with a report.

Writes ``metrics.json`` (DVC metrics), ``per_class.csv`` and ``predictions.csv`` (DVC plots),
pictures under ``figures/`` and ``report.html``/``report.md``, and logs all of it into the
MLflow run that trained the model, linked to the logged model and to the test data (an MLflow
dataset whose digest is DVC's hash); the model's registered version gets the alias ``candidate``,
which ``wbc promote`` may turn into ``champion``. The work is :func:`pipeline.evaluator.evaluate_rows`; this
stage only chooses the rows (the test split) and names them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Params
from pipeline.data import load_index
from pipeline.evaluator import (
    Extra,
    LoadedModel,
    Target,
    evaluate_images,
    images_of_rows,
    load_evaluated_model,
    publish,
)
from pipeline.figures import figure_path, plot_site_scores
from pipeline.layout import HOLDOUT, INGEST_SUMMARY_FILE, MANIFEST_FILE
from pipeline.processed import check_processed
from pipeline.registry import CANDIDATE
from pipeline.sites import SITES_FILE, site_flat, site_rows, site_section, site_table

HISTORY_FILE = "train_history.csv"  # written into the reports folder by the train stage


def dataset_name(ingest: dict) -> str:
    """A short human name of the ingested dataset."""
    if ingest.get("synthetic"):
        return "the synthetic sample"
    return Path(ingest.get("root", "unknown")).name or str(ingest.get("root"))


def read_ingest_summary(interim_dir: Path) -> dict:
    """``ingest.json`` of the ingest stage, or {} when there is none."""
    path = Path(interim_dir) / INGEST_SUMMARY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def run_evaluate(params: Params, model_dir: Path, processed_dir: Path, interim_dir: Path,
                 reports_dir: Path) -> dict[str, float]:
    """Evaluate ``model_dir/model.pt`` on the test split; return the flat headline metrics. The processed
    data is checked first: complete, from one normalize run, of the manifest in ``interim_dir`` when there
    is one (:func:`pipeline.processed.check_processed`)."""
    check_processed(processed_dir, Path(interim_dir) / MANIFEST_FILE)
    index = load_index(processed_dir)
    rows = np.flatnonzero(index["split"].to_numpy() == "test")
    if len(rows) == 0:
        raise ValueError(f"{processed_dir}: the test split is empty; nothing to evaluate")
    ingest = read_ingest_summary(interim_dir)
    target = Target(dataset=dataset_name(ingest), split="test", synthetic=bool(ingest.get("synthetic", False)),
                    provenance=ingest, registry_alias=CANDIDATE)
    history_path = Path(reports_dir) / HISTORY_FILE
    history = pd.read_csv(history_path) if history_path.is_file() else None
    model = load_evaluated_model(model_dir, params.runtime.device)
    evaluation = evaluate_images(model, images_of_rows(processed_dir, rows, model.classes), params.evaluate)
    with tempfile.TemporaryDirectory(prefix="wbc-evaluate-") as scratch:  # publish copies its figure in
        extra = per_site_outputs(model, processed_dir, index, params, target.dataset, Path(scratch))
        return publish(evaluation, model, target, Path(reports_dir), params, history=history, extra=extra)


def per_site_outputs(model: LoadedModel, processed_dir: Path, index: pd.DataFrame, params: Params, dataset: str,
                     figures_dir: Path) -> Extra:
    """With more than one site (or a held-out one): the per-site table, its report section, figure and
    metrics; nothing for data of a single site."""
    if "site" not in index.columns or (index["site"].nunique() < 2 and HOLDOUT not in set(index["split"])):
        return Extra()
    table = site_table(model, processed_dir, site_rows(index), params.evaluate)
    return Extra(sections=(site_section(table, dataset),), flat=site_flat(table), tables={SITES_FILE: table},
                 figures={"sites": plot_site_scores(table, figure_path(figures_dir, "sites"))})
