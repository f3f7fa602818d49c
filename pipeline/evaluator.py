"""The one evaluation path: a trained model on a set of images of a processed dataset.

    images ──predict──▶ logits ──▶ metrics (images of a model class) ──▶ figures, tables,
    report.html/report.md ──▶ the model's MLflow run

The test split (``wbc evaluate``), an external dataset (``wbc evaluate --dataset``) and a
held-out site are the same path with different inputs: which rows (:class:`Images`) and how
they are named (:class:`Target`). :func:`evaluate_rows` is the whole path in one call;
callers that add outputs of their own (external validation and its unknown classes) call
:func:`evaluate_images`, build an :class:`Extra` and hand both to :func:`publish`.

Temperature: always the one saved with the model (:attr:`ModelMeta.temperature_or_one`); a
model saved without one gets 1.0, and the report says so.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from torch.utils.data import DataLoader

from pipeline import registry, tracking
from pipeline.adaptation import adapt_batchnorm
from pipeline.atomic import atomic_dir, write_json
from pipeline.calibration import calibration_summary, softmax
from pipeline.config import STAGE_SECTIONS, EvaluateParams, Params
from pipeline.data import ProcessedImages, Split, images_identity, load_index
from pipeline.explain import write_explanation_figures
from pipeline.figures import write_figures
from pipeline.inference import load_model, pick_device, predict_logits
from pipeline.layout import IMAGES_FILE, MODEL_FILE, RUN_INFO_FILE
from pipeline.metrics import TEST_PREFIX, classification_metrics, flat_metrics, per_class_metrics
from pipeline.model_meta import ModelMeta
from pipeline.models import Classifier
from pipeline.report import Section, split_phrase, write_report

UNKNOWN = "(unknown to the model)"  # the mapped class of an image whose label is no class of the model
METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class.csv"
PREDICTIONS_FILE = "predictions.csv"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
FIGURES_DIR = "figures"
_STAGING_PREFIX = ".evaluation.tmp-"  # the folder an evaluation is written into before it replaces the outputs


@dataclass(frozen=True)
class Target:
    """What is evaluated, as the report, the file names and MLflow call it."""

    dataset: str  # a human name: "PBC", "the synthetic sample", "external dataset lab-b"
    split: str = "test"  # a split name, or "all"
    site: str | None = None
    title: str = "WBC classifier evaluation"  # the report's title starts with this
    metric_prefix: str = TEST_PREFIX  # MLflow keys: <metric_prefix><key of metrics.json>
    artifact_path: str = "evaluation"  # MLflow artifact folder
    synthetic: bool = False  # generated images: the report says so everywhere
    provenance: dict = field(default_factory=dict)  # fields of ingest.json and anything else the report lists
    registry_alias: str | None = None  # alias given to the evaluated model's registered version (pipeline.registry)


@dataclass(frozen=True)
class Images:
    """Rows of one processed dataset and what each image is."""

    processed_dir: Path
    rows: np.ndarray  # positions in images.npy (= rows of index.csv)
    paths: list[str]
    y: np.ndarray  # model class index of each image; -1 where its label is no class of the model
    labels: list[str] | None = None  # the dataset's own labels, when they are not the model's class names

    @property
    def known(self) -> np.ndarray:
        """Mask of the images whose label is a class of the model (the only ones that count in metrics)."""
        return self.y >= 0


@dataclass(frozen=True)
class LoadedModel:
    """A trained model ready to predict, with its metadata and the MLflow run that made it."""

    network: Classifier
    meta: ModelMeta
    device: torch.device
    run_info: dict  # run.json of the train stage: run_id, experiment_id, tracking_uri; {} when not tracked

    @property
    def classes(self) -> list[str]:
        """The model's classes, in output order."""
        return list(self.meta.classes)


@dataclass(frozen=True)
class Evaluation:
    """A model's predictions on some images and the metrics over those of a model class."""

    images: Images
    classes: list[str]
    logits: np.ndarray  # every image, in images order
    temperature: float  # applied for the calibrated probabilities
    temperature_fitted: bool
    metrics: dict  # classification_metrics() with a "calibration" section, over the known images

    @cached_property
    def probs(self) -> np.ndarray:
        """Raw softmax probabilities of every image."""
        return softmax(self.logits)

    @cached_property
    def calibrated(self) -> np.ndarray:
        """Temperature-scaled probabilities of every image."""
        return softmax(self.logits, self.temperature)

    @property
    def predicted(self) -> list[str]:
        """Predicted class of every image."""
        return [self.classes[i] for i in self.probs.argmax(axis=1)]


@dataclass(frozen=True)
class Extra:
    """What a caller adds to the standard outputs (external validation: its unknown classes)."""

    note: str = ""  # a paragraph under the report's title
    sections: tuple[Section, ...] = ()  # report sections after the per-class metrics
    flat: dict[str, float] = field(default_factory=dict)  # more keys for metrics.json and MLflow
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # file name -> table, written as CSV
    figures: dict[str, Path] = field(default_factory=dict)  # figure key -> PNG already written


def read_run_info(model_dir: Path, meta: ModelMeta) -> dict:
    """``run.json`` of the train stage (the MLflow store, experiment and logged model of the run) for the
    model whose metadata is ``meta``, or {} for a model trained without tracking.

    The run id has one source, the model's own metadata (saved inside ``model.pt``); ``run.json`` is
    written after the model and is accepted only when it names that same run. Otherwise (missing, or
    left by an earlier run because the train stage stopped between the two files) a ``ValueError``
    names both files and the fix, rather than evaluating into another run.
    """
    path, model = Path(model_dir) / RUN_INFO_FILE, Path(model_dir) / MODEL_FILE
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    recorded = None if record is None else record.get("run_id")
    if recorded == meta.run_id:
        return record or {}
    if record is None:
        found = f"{model} was trained in MLflow run {meta.run_id} but {path} is missing"
    elif meta.run_id is None:
        found = f"{path} names MLflow run {recorded} but {model} records no run"
    else:
        found = f"{path} names MLflow run {recorded} but {model} was trained in run {meta.run_id}"
    raise ValueError(f"{found}: the two files are not from one training run (the train stage stopped between "
                     "writing them, or they were copied apart); run `wbc train` again")


def load_evaluated_model(model_dir: Path, device: str = "auto") -> LoadedModel:
    """The model in ``model_dir`` (``model.pt`` and its ``run.json``) on ``device`` (auto, cpu or cuda)."""
    torch_device = pick_device(device)
    network, meta = load_model(Path(model_dir) / MODEL_FILE, torch_device)
    return LoadedModel(network, meta, torch_device, read_run_info(model_dir, meta))


def images_of_rows(processed_dir: Path, rows: np.ndarray | list[int], classes: list[str]) -> Images:
    """Rows of ``processed_dir`` (positions in its index.csv) whose labels are all classes of the model."""
    index = load_index(Path(processed_dir))
    rows = np.asarray(rows, dtype=np.int64)
    chosen = index.iloc[rows]
    unknown = sorted(set(chosen["label"]) - set(classes))
    if unknown:
        raise ValueError(f"{processed_dir}: labels {unknown} of the rows to evaluate are not classes of the model "
                         f"({', '.join(classes)}); evaluate such data with `wbc evaluate --dataset` and --map")
    lookup = {name: i for i, name in enumerate(classes)}
    return Images(Path(processed_dir), rows, chosen["path"].tolist(), chosen["label"].map(lookup).to_numpy(np.int64))


def predict_images(model: LoadedModel, images: Images, batch_size: int) -> np.ndarray:
    """Logits (float32, n x K) of every image, in ``images`` order."""
    split = Split(images.rows, np.where(images.known, images.y, 0), images.paths)
    loader = DataLoader(ProcessedImages(images.processed_dir, split, model.meta.image_size), batch_size=batch_size,
                        num_workers=0)
    return predict_logits(model.network, loader, model.device)[0]


def with_adapted_batchnorm(model: LoadedModel, images: Images, batch_size: int) -> LoadedModel:
    """``model`` with its BatchNorm statistics recomputed on ``images`` (their pixels only, no label):
    test-time adaptation to the site the images come from. Raises ``ValueError`` for a network
    without BatchNorm."""
    split = Split(images.rows, np.zeros(len(images.rows), np.int64), images.paths)
    loader = DataLoader(ProcessedImages(images.processed_dir, split, model.meta.image_size), batch_size=batch_size)
    network = adapt_batchnorm(model.network, (batch for batch, _ in loader), model.device)
    return LoadedModel(network, model.meta, model.device, model.run_info)


def evaluate_images(model: LoadedModel, images: Images, cfg: EvaluateParams, *,
                    present_classes_only: bool = False) -> Evaluation:
    """Predict ``images`` and compute the metrics over those whose label is a model class.

    ``present_classes_only``: macro averages and the per-class table cover only the classes these
    images hold (data that lacks some of the model's classes), instead of every class.
    """
    if not images.known.any():
        raise ValueError(f"{images.processed_dir}: none of the {len(images.y)} images to evaluate has a class of "
                         "the model")
    return evaluation_of(model, images, predict_images(model, images, cfg.batch_size), cfg,
                         present_classes_only=present_classes_only)


def evaluation_of(model: LoadedModel, images: Images, logits: np.ndarray, cfg: EvaluateParams, *,
                  present_classes_only: bool = False) -> Evaluation:
    """The metrics of ``images`` from their ``logits`` (already predicted, in ``images`` order): for
    callers that predict once and evaluate several subsets (the sites of a dataset)."""
    known = images.known
    if not known.any():
        raise ValueError(f"{images.processed_dir}: none of the {len(images.y)} images to evaluate has a class of "
                         "the model")
    temperature = model.meta.temperature_or_one
    y = images.y[known]
    present = sorted(set(y.tolist())) if present_classes_only else None
    metrics = classification_metrics(y, softmax(logits[known]), model.classes, n_bootstrap=cfg.n_bootstrap,
                                     seed=cfg.seed, macro_classes=present)
    metrics["calibration"] = calibration_summary(y, logits[known], temperature)
    if present_classes_only:
        metrics["per_class"] = {cls: entry for cls, entry in metrics["per_class"].items() if entry["support"] > 0}
    return Evaluation(images, model.classes, logits, temperature, model.meta.calibrated, metrics)


def per_class_table(metrics: dict) -> pd.DataFrame:
    """One row per class: point values of the declared per-class metrics, and the support."""
    keys = [m.key for m in per_class_metrics()]
    rows = [{"class": name, **{key: entry[key]["value"] for key in keys}, "support": entry["support"]}
            for name, entry in metrics["per_class"].items()]
    return pd.DataFrame(rows, columns=["class", *keys, "support"])


def predictions_table(evaluation: Evaluation) -> pd.DataFrame:
    """Per image: path, true class (and, with labels of its own, the dataset's label and its model class),
    predicted class and every class probability (raw softmax)."""
    images, classes = evaluation.images, evaluation.classes
    mapped = [classes[i] if i >= 0 else UNKNOWN for i in images.y]
    table = pd.DataFrame({"path": images.paths})
    if images.labels is None:
        table["actual"] = mapped
    else:
        table["actual"], table["mapped"] = images.labels, mapped
    table["predicted"] = evaluation.predicted
    for i, name in enumerate(classes):
        table[f"p_{name}"] = evaluation.probs[:, i].round(6)
    return table


def _write_figures(evaluation: Evaluation, model: LoadedModel, figures_dir: Path, cfg: EvaluateParams,
                   history: pd.DataFrame | None) -> dict[str, Path]:
    """The metric figures and the worst-errors and Grad-CAM figures, over the images of a model class."""
    images, known = evaluation.images, evaluation.images.known
    y, probs = images.y[known], evaluation.probs[known]
    figures = write_figures(figures_dir, y, probs, evaluation.classes, history=history,
                            y_prob_calibrated=evaluation.calibrated[known])
    figures.update(write_explanation_figures(
        figures_dir, model=model.network, model_name=model.meta.model, image_size=model.meta.image_size,
        images=np.load(images.processed_dir / IMAGES_FILE, mmap_mode="r"), rows=images.rows[known],
        paths=[p for p, k in zip(images.paths, known, strict=True) if k], y_true=y, y_prob=probs,
        classes=evaluation.classes, n_worst=cfg.worst_errors, gradcam_per_class=cfg.gradcam_per_class,
        seed=cfg.seed, device=model.device,
    ))
    return figures


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


def _model_summary(evaluation: Evaluation, meta: ModelMeta) -> dict:
    summary = {**meta.summary(), "classes": ", ".join(meta.classes)}
    if evaluation.temperature_fitted:
        summary["temperature (fitted on the training data's val split)"] = round(evaluation.temperature, 4)
    else:
        summary["temperature"] = "none saved with the model; 1.0 used"
    return summary


def _note(evaluation: Evaluation, extra: Extra) -> str:
    if evaluation.temperature_fitted:
        return extra.note
    missing = ("The model carries no fitted temperature, so none is applied: its probabilities are not "
               "calibrated (retrain it to fit one).")
    return f"{extra.note} {missing}".strip()


def _write_report(evaluation: Evaluation, model: LoadedModel, target: Target, out_dir: Path, params: Params,
                  figures: dict[str, Path], extra: Extra) -> None:
    site = {"site": target.site} if target.site else {}
    provenance = {**target.provenance, "dataset": target.dataset, "split": target.split, **site,
                  **code_and_run(model.run_info)}
    where = split_phrase(target.split) + (f", site {target.site}" if target.site else "")
    write_report(
        out_dir / REPORT_HTML,
        out_dir / REPORT_MD,
        title=f"{target.title}: {model.meta.model} on {target.dataset}, {where}",
        synthetic=target.synthetic,
        provenance=provenance,
        model=_model_summary(evaluation, model.meta),
        params=params.model_dump(mode="json", include=set(STAGE_SECTIONS)),
        metrics=evaluation.metrics,
        figures=figures,
        note=_note(evaluation, extra),
        sections=extra.sections,
        temperature_fitted=evaluation.temperature_fitted,
    )


def evaluated_dataset(images: Images, split: str) -> MetaDataset:
    """The evaluated images as an MLflow dataset named ``<processed folder>:<split>``; its digest is
    DVC's hash of the processed folder when ``dvc.lock`` records one, else a digest of the images."""
    folder = images.processed_dir
    digest = tracking.dvc_out_hash(folder) or images_identity(folder)[:32]
    with warnings.catch_warnings():
        # MLflow registers its local-files source once per scheme ('' and 'file') and warns that a path
        # matches both: they are the same source.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(folder.resolve().as_uri())
    return MetaDataset(source=source, name=f"{folder.as_posix()}:{split}", digest=digest)


def log_evaluation(run_info: dict, flat: dict[str, float], out_dir: Path, files: list[str], *,
                   metric_prefix: str = TEST_PREFIX, artifact_path: str = "evaluation",
                   dataset: MetaDataset | None = None) -> None:
    """Add the evaluation to the training run (a new run when the model was trained elsewhere):
    metrics as ``<metric_prefix><key>``, ``files`` and ``figures/`` under ``artifact_path``. The
    metrics are also linked to the logged model of ``run_info`` (``model_id``, MLflow model metrics)
    and to ``dataset`` (an MLflow dataset, logged as the run's input) when given."""
    mlflow.set_tracking_uri(tracking.recorded_uri(run_info.get("tracking_uri")))
    with mlflow.start_run(run_id=run_info.get("run_id")):
        if dataset is not None:
            mlflow.log_input(dataset, context="evaluation")
        mlflow.log_metrics({f"{metric_prefix}{key}": value for key, value in flat.items()},
                           model_id=run_info.get("model_id"), dataset=dataset)
        for name in files:
            mlflow.log_artifact(str(out_dir / name), artifact_path=artifact_path)
        mlflow.log_artifacts(str(out_dir / FIGURES_DIR), artifact_path=f"{artifact_path}/{FIGURES_DIR}")


def publish(evaluation: Evaluation, model: LoadedModel, target: Target, out_dir: Path, params: Params, *,
            history: pd.DataFrame | None = None, extra: Extra = Extra()) -> dict[str, float]:
    """Write figures, ``metrics.json``, ``per_class.csv``, ``predictions.csv``, ``extra``'s tables and the
    report into ``out_dir`` (all replaced only once complete and logged: :func:`staged_outputs`); log them
    into the model's MLflow run; return the flat metrics.

    ``history`` (the train stage's per-epoch table) adds the training curves.
    """
    flat = {**flat_metrics(evaluation.metrics), **extra.flat}
    tables = {PER_CLASS_FILE: per_class_table(evaluation.metrics), PREDICTIONS_FILE: predictions_table(evaluation),
              **extra.tables}
    with staged_outputs(Path(out_dir)) as stage:
        figures = {**_write_figures(evaluation, model, stage / FIGURES_DIR, params.evaluate, history),
                   **_copied_figures(extra.figures, stage / FIGURES_DIR)}
        write_json(stage / METRICS_FILE, flat)
        for name, table in tables.items():
            table.to_csv(stage / name, index=False)
        _write_report(evaluation, model, target, stage, params, figures, extra)
        log_evaluation(model.run_info, flat, stage, [METRICS_FILE, *tables, REPORT_HTML, REPORT_MD],
                       metric_prefix=target.metric_prefix, artifact_path=target.artifact_path,
                       dataset=evaluated_dataset(evaluation.images, target.split))
        if target.registry_alias:
            registry.set_alias(model.run_info, target.registry_alias)
    return flat


def _copied_figures(figures: dict[str, Path], folder: Path) -> dict[str, Path]:
    """``figures`` (PNGs a caller wrote) copied into ``folder``, which replaces the published figures."""
    folder.mkdir(parents=True, exist_ok=True)
    return {key: Path(shutil.copy2(path, folder / Path(path).name)) for key, path in figures.items()}


@contextmanager
def staged_outputs(out_dir: Path) -> Iterator[Path]:
    """A temporary folder inside ``out_dir`` for an evaluation's outputs (laid out as in ``out_dir``, so
    the report's links hold). When the block completes they replace those in ``out_dir``: the figures
    folder whole in one step, then each file in one rename, ``metrics.json`` last, so a kill leaves every
    file either the previous complete one or the new one, and a new ``metrics.json`` means all are new.
    On failure the folder is removed and ``out_dir`` is untouched."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(f"{_STAGING_PREFIX}*"):  # of an evaluation killed before it could clean up
        shutil.rmtree(leftover, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=out_dir))
    try:
        yield stage
        if (stage / FIGURES_DIR).is_dir():
            with atomic_dir(out_dir / FIGURES_DIR) as figures:
                for path in (stage / FIGURES_DIR).iterdir():
                    os.replace(path, figures / path.name)
        for path in sorted((p for p in stage.iterdir() if p.is_file()), key=lambda p: p.name == METRICS_FILE):
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def evaluate_rows(params: Params, model_dir: Path, processed_dir: Path, rows: np.ndarray | list[int],
                  target: Target, out_dir: Path, *, history: pd.DataFrame | None = None) -> dict[str, float]:
    """Evaluate the model in ``model_dir`` on ``rows`` of the processed dataset ``processed_dir`` (positions
    in its index.csv, every label a class of the model), named by ``target``: metrics, figures, tables and
    report in ``out_dir``, logged into the model's MLflow run. Returns the flat metrics."""
    if len(rows) == 0:
        raise ValueError(f"{processed_dir}: no rows to evaluate for the {split_phrase(target.split)} of "
                         f"{target.dataset}")
    model = load_evaluated_model(model_dir, params.runtime.device)
    images = images_of_rows(processed_dir, rows, model.classes)
    evaluation = evaluate_images(model, images, params.evaluate)
    return publish(evaluation, model, target, out_dir, params, history=history)
