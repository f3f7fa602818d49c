"""Cross-site stage: leave one site out.

For each site, a model is trained on the other sites (their train split, validated on their val
split) with the train stage's recipe, then scored on every image of the site it never saw, and, for
comparison, on the test split of the sites it was trained on. With ``crosssite.adapt_bn`` the
left-out site is scored a second time after test-time BatchNorm adaptation on its unlabelled images.
The result is one row per left-out site, every number with its bootstrap interval and named by its
site and split: ``sites.csv``, ``report.md``, a figure, ``metrics.json`` (DVC metrics), and an MLflow
run per fold under one parent run.

Scores of a site cover the classes that site has (a lab without basophils is not scored on them);
the model still chooses among all its classes, so a cell called by a class the site lacks is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import mlflow
import numpy as np
import pandas as pd
import torch

from pipeline import tracking
from pipeline.adaptation import batchnorm_layers
from pipeline.atomic import atomic_dir
from pipeline.augment import load_policy
from pipeline.config import Params
from pipeline.data import Split, load_index, select_split
from pipeline.evaluator import (
    Evaluation,
    LoadedModel,
    evaluation_of,
    images_of_rows,
    predict_images,
    with_adapted_batchnorm,
)
from pipeline.figures import new_figure, save_figure
from pipeline.inference import pick_device
from pipeline.metrics import CI_LEVEL
from pipeline.preprocess import read_preprocessing
from pipeline.processed import check_processed
from pipeline.training import fit, model_meta

SCORES = ("macro_f1", "accuracy", "balanced_accuracy")
TABLE_FILE = "sites.csv"
REPORT_FILE = "report.md"
FIGURE_FILE = "cross_site.png"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class Fold:
    """One leave-one-site-out run: the site left out and the sites trained on."""

    left_out: str
    trained_on: tuple[str, ...]


def folds(index: pd.DataFrame, only: list[str] | None = None) -> list[Fold]:
    """A fold per site (or per site of ``only``): every other site that has train images trains."""
    sites = list(dict.fromkeys(index["site"]))
    with_train = set(index.loc[index["split"] == "train", "site"])
    chosen = [site for site in sites if not only or site in only]
    return [Fold(site, tuple(s for s in sites if s != site and s in with_train)) for site in chosen]


def site_rows(index: pd.DataFrame, sites: tuple[str, ...] | str, split: str | None) -> np.ndarray:
    """Positions of the rows of ``sites`` (one name or several) in ``split`` (None: every split)."""
    in_sites = index["site"].isin([sites] if isinstance(sites, str) else list(sites)).to_numpy()
    in_split = np.ones(len(index), bool) if split is None else index["split"].to_numpy() == split
    return np.flatnonzero(in_sites & in_split)


def _split_of(index: pd.DataFrame, rows: np.ndarray, classes: list[str]) -> Split:
    chosen = index.iloc[rows]
    return Split(rows, chosen["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64),
                 chosen["path"].tolist())


def _score(model: LoadedModel, processed_dir: Path, rows: np.ndarray, params: Params) -> Evaluation | None:
    """The model on ``rows``, scored on the classes they hold."""
    if len(rows) == 0:
        return None
    images = images_of_rows(processed_dir, rows, model.classes)
    logits = predict_images(model, images, params.evaluate.batch_size)
    return evaluation_of(model, images, logits, params.evaluate, present_classes_only=True)


def _columns(prefix: str, evaluation: Evaluation | None) -> dict[str, object]:
    if evaluation is None:
        return {}
    overall = evaluation.metrics["overall"]
    record: dict[str, object] = {f"{prefix}_n": int(evaluation.images.known.sum())}
    for key in SCORES:
        entry = overall[key]
        record.update({f"{prefix}_{key}": entry["value"], f"{prefix}_{key}_ci_low": entry.get("ci_low"),
                       f"{prefix}_{key}_ci_high": entry.get("ci_high")})
    return record


def fold_model(fold: Fold, params: Params, processed_dir: Path, index: pd.DataFrame, policy: A.Compose | None,
               device: torch.device, progress: bool = False) -> LoadedModel | None:
    """A model trained on ``fold.trained_on`` (their train split, validated on their val split) with the
    train stage's recipe; None when those sites hold no train or no val image."""
    classes = list(params.data.classes)
    cfg = params.train.model_copy(update={"epochs": params.crosssite.epochs or params.train.epochs})
    train = _split_of(index, site_rows(index, fold.trained_on, "train"), classes)
    val = _split_of(index, site_rows(index, fold.trained_on, "val"), classes)
    if len(train.rows) == 0 or len(val.rows) == 0:
        return None
    fitted = fit(cfg, len(classes), processed_dir, train, val, policy, device,
                 progress=f"without {fold.left_out}" if progress else "", runtime=params.runtime)
    meta = model_meta(params.model_copy(update={"train": cfg}), fitted.best_epoch, fitted.best_val_macro_f1,
                      fitted.temperature, preprocessing=read_preprocessing(processed_dir))
    return LoadedModel(fitted.model, meta, device, {})


def score_columns(prefix: str, model: LoadedModel, processed_dir: Path, rows: np.ndarray,
                  params: Params) -> dict[str, object]:
    """``<prefix>_n`` and each of :data:`SCORES` with its interval (``<prefix>_<score>[_ci_low|_ci_high]``)
    of the model on ``rows``, over the classes they hold; with ``recall/<class>`` for ``out_of_site``."""
    evaluation = _score(model, processed_dir, rows, params)
    record = _columns(prefix, evaluation)
    if evaluation is not None and prefix == "out_of_site":
        record.update({f"recall/{cls}": entry["recall"]["value"]
                       for cls, entry in evaluation.metrics["per_class"].items()})
    return record


def run_fold(fold: Fold, params: Params, processed_dir: Path, index: pd.DataFrame, policy: A.Compose | None,
             device: torch.device, progress: bool) -> dict[str, object]:
    """Train without ``fold.left_out`` and score it: one row of the cross-site table."""
    record: dict[str, object] = {"left_out": fold.left_out, "trained_on": " ".join(fold.trained_on)}
    model = fold_model(fold, params, processed_dir, index, policy, device, progress)
    if model is None:
        return {**record, "skipped": "no other site has both train and val images"}
    target_rows = site_rows(index, fold.left_out, None)
    in_site = site_rows(index, fold.trained_on, "test")
    record.update(score_columns("in_site", model, processed_dir, in_site, params))
    record.update(score_columns("out_of_site", model, processed_dir, target_rows, params))
    if params.crosssite.adapt_bn and batchnorm_layers(model.network):
        adapted = with_adapted_batchnorm(model, images_of_rows(processed_dir, target_rows, model.classes),
                                         params.evaluate.batch_size)
        record.update(score_columns("adapted_bn", adapted, processed_dir, target_rows, params))
    return record


def _interval(record: dict, key: str) -> str:
    value, low, high = (record.get(f"{key}{suffix}") for suffix in ("", "_ci_low", "_ci_high"))
    if value is None or pd.isna(value):
        return "—"
    return f"{value:.3f}" if low is None or pd.isna(low) else f"{value:.3f} ({low:.3f}–{high:.3f})"


def report_markdown(table: pd.DataFrame, params: Params, note: str = "") -> str:
    """The cross-site report: one row per left-out site."""
    lines = ["# Cross-site evaluation: leave one site out", ""]
    if note:
        return "\n".join([*lines, note, ""])
    adapt = "adapted_bn_macro_f1" in table.columns
    lines += [
        f"Model `{params.train.model}` ({params.train.pretrained}), {params.crosssite.epochs or params.train.epochs} "
        f"epochs at {params.train.image_size} px, trained once per row without the site of that row. "
        "**Out of site**: every image of the left-out site (it never took part in training or model "
        "selection). **In site**: the test split of the sites the model was trained on. Scores cover the "
        f"classes each evaluated set has; intervals are {CI_LEVEL:.0%} bootstrap intervals.",
        "",
        "| left-out site | trained on | images | out-of-site macro F1 | out-of-site accuracy | "
        + ("after BN adaptation macro F1 | " if adapt else "") + "in-site macro F1 (test split) |",
        "|---|---|---|---|---|" + ("---|" if adapt else "") + "---|",
    ]
    for record in table.to_dict("records"):
        if isinstance(record.get("skipped"), str):
            lines.append(f"| {record['left_out']} | {record['trained_on'] or '—'} | — | skipped: "
                         f"{record['skipped']} | | " + ("| " if adapt else "") + "|")
            continue
        lines.append(
            f"| {record['left_out']} | {record['trained_on']} | {int(record['out_of_site_n']):,} | "
            f"{_interval(record, 'out_of_site_macro_f1')} | {_interval(record, 'out_of_site_accuracy')} | "
            + (f"{_interval(record, 'adapted_bn_macro_f1')} | " if adapt else "")
            + f"{_interval(record, 'in_site_macro_f1')} |")
    seen = [site for site in table["left_out"] if site not in params.ingest.holdout_sites]
    if params.normalize.stain != "none" and seen:
        lines += ["", f"Colour reference (`normalize.stain: {params.normalize.stain}`): fitted once, on "
                  "training-split images of every site not in `ingest.holdout_sites`, so its statistics saw "
                  f"unlabelled pixels of {', '.join(seen)} before {'that site was' if len(seen) == 1 else 'each was'} "
                  "left out. For a strict measure, hold a site out at ingest (`ingest.holdout_sites`): the "
                  "reference then never sees it (`benchmarks/cross_site.py` does this for every fold)."]
    recall = [c for c in table.columns if c.startswith("recall/")]
    if recall:
        lines += ["", "Recall per class on the left-out site (all its images):", "",
                  "| left-out site | " + " | ".join(c.removeprefix("recall/") for c in recall) + " |",
                  "|---|" + "---|" * len(recall)]
        for record in table.to_dict("records"):
            cells = ["—" if pd.isna(record.get(c)) else f"{record[c]:.3f}" for c in recall]
            lines.append(f"| {record['left_out']} | " + " | ".join(cells) + " |")
    lines += ["", f"![Macro F1 per left-out site]({FIGURE_FILE})", ""]
    return "\n".join(lines)


def plot_cross_site(table: pd.DataFrame, path: Path) -> Path:
    """Macro F1 per left-out site: out of site (and after BN adaptation) beside in site, with intervals."""
    done = table[table["out_of_site_macro_f1"].notna()] if "out_of_site_macro_f1" in table else table.iloc[:0]
    kinds = [(k, label) for k, label in (("in_site", "in site (test split)"), ("out_of_site", "left-out site"),
                                         ("adapted_bn", "left-out site, BN adapted"))
             if f"{k}_macro_f1" in done.columns]
    fig = new_figure(6.8, 0.6 * max(1, len(done)) * max(1, len(kinds)) / 2 + 1.6)
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(kinds))
    for k, (kind, label) in enumerate(kinds):
        values = done[f"{kind}_macro_f1"].to_numpy(float)
        low, high = done[f"{kind}_macro_f1_ci_low"].to_numpy(float), done[f"{kind}_macro_f1_ci_high"].to_numpy(float)
        ax.barh(np.arange(len(done)) + k * height, values, height, xerr=[values - low, high - values], capsize=2,
                label=label)
    ax.set_yticks(np.arange(len(done)) + height * (len(kinds) - 1) / 2, done["left_out"].tolist())
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("macro F1")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Leave one site out: each model never saw the site of its row", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def summary_metrics(table: pd.DataFrame) -> dict[str, float]:
    """metrics.json: per left-out site its scores (``<site>/out_of_site_macro_f1``...), and the worst
    and mean out-of-site macro F1 over the sites."""
    flat: dict[str, float] = {"sites": float(len(table))}
    for record in table.to_dict("records"):
        for key, value in record.items():
            if key.startswith(("in_site_", "out_of_site_", "adapted_bn_")) and value is not None and not pd.isna(value):
                flat[f"{record['left_out']}/{key}"] = float(value)
    if "out_of_site_macro_f1" in table and table["out_of_site_macro_f1"].notna().any():
        scores = table["out_of_site_macro_f1"].dropna()
        flat["worst_out_of_site_macro_f1"] = float(scores.min())
        flat["mean_out_of_site_macro_f1"] = float(scores.mean())
    return flat


def run_crosssite(params: Params, processed_dir: Path, policy_path: Path, out_dir: Path,
                  progress: bool = True) -> dict[str, float]:
    """Leave each site out in turn; write the table, report, figure and metrics to ``out_dir`` (swapped
    in whole) and log a parent MLflow run with a child run per fold. Data of one site gives a report
    that says so, and no fold."""
    check_processed(processed_dir)
    index = load_index(processed_dir)
    select_split(index, "train", list(params.data.classes))  # labels outside data.classes fail here, early
    sites = list(dict.fromkeys(index["site"])) if "site" in index.columns else []
    device = pick_device(params.runtime.device)
    policy = load_policy(policy_path)
    rows = []
    if len(sites) > 1:
        for fold in folds(index, params.crosssite.sites):
            rows.append(run_fold(fold, params, processed_dir, index, policy, device, progress))
    table = pd.DataFrame(rows)
    note = "" if len(sites) > 1 else (f"The data has {len(sites)} site ({', '.join(sites)}): there is no site to "
                                      "leave out. Add sites in data.sources to measure how models hold up in "
                                      "other labs.")
    metrics = summary_metrics(table)
    with atomic_dir(out_dir) as tmp:
        table.to_csv(tmp / TABLE_FILE, index=False)
        (tmp / REPORT_FILE).write_text(report_markdown(table, params, note), encoding="utf-8")
        if len(table):
            plot_cross_site(table, tmp / FIGURE_FILE)
        (tmp / METRICS_FILE).write_text(pd.Series(metrics).to_json(indent=2) + "\n", encoding="utf-8")
    if len(table):
        log_crosssite(params, table, metrics, out_dir)
    return metrics


def log_crosssite(params: Params, table: pd.DataFrame, metrics: dict[str, float], out_dir: Path) -> None:
    """One parent MLflow run (table, report, figure, summary) with a child run per left-out site."""
    experiment_id = tracking.setup_experiment(params.tracking.experiment)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"cross-site: {params.train.model}",
                          tags={"wbc.kind": "cross-site", **tracking.git_state()}):
        mlflow.log_params(tracking.flatten({"train": params.train.model_dump(mode="json"),
                                            "crosssite": params.crosssite.model_dump(mode="json")}))
        mlflow.log_metrics({k.replace("/", "."): v for k, v in metrics.items()})
        mlflow.log_artifacts(str(out_dir), artifact_path="cross_site")
        for record in table.to_dict("records"):
            with mlflow.start_run(experiment_id=experiment_id, run_name=f"without {record['left_out']}", nested=True,
                                  tags={"wbc.left_out_site": record["left_out"]}):
                mlflow.log_param("trained_on", record["trained_on"])
                mlflow.log_metrics({k: float(v) for k, v in record.items()
                                    if k.startswith(("in_site_", "out_of_site_", "adapted_bn_", "recall/"))
                                    and v is not None and not pd.isna(v)})
