"""How a model does on each site: the sites it was trained on (their test split) and the sites
it never saw (all their images), one row per site, each number with its confidence interval.

Every evaluation of data with more than one site carries this table, so a model is never shown
only on the lab it was trained in when other labs are at hand. Metrics of a site cover the
classes that site has (macro averages over those only): a lab without basophils is not scored
on basophils.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import EvaluateParams
from pipeline.evaluator import Images, LoadedModel, evaluation_of, images_of_rows, predict_images
from pipeline.layout import HOLDOUT
from pipeline.metrics import CI_LEVEL
from pipeline.report import Section

SITE_METRICS = ("macro_f1", "accuracy", "balanced_accuracy")  # overall metrics shown per site
TRAINED = "trained on"
UNSEEN = "not trained on"
SITES_FILE = "sites.csv"


@dataclass(frozen=True)
class SiteRows:
    """The images of one site that an evaluation scores, and the site's relation to the model."""

    site: str
    role: str  # TRAINED or UNSEEN
    split: str  # "test" for a site the model was trained on; the split name (or "all") otherwise
    rows: np.ndarray  # positions in the processed index


def site_rows(index: pd.DataFrame, trained_sites: set[str] | None = None) -> list[SiteRows]:
    """Per site of ``index``, in order of appearance: the test split of a site the model was trained
    on, every image of one it was not. ``trained_sites`` defaults to the sites with a train split."""
    sites = list(dict.fromkeys(index["site"]))
    split = index["split"].to_numpy()
    if trained_sites is None:
        trained_sites = set(index.loc[split == "train", "site"])
    sets = []
    for site in sites:
        in_site = index["site"].to_numpy() == site
        if site in trained_sites:
            sets.append(SiteRows(site, TRAINED, "test", np.flatnonzero(in_site & (split == "test"))))
        else:
            held = set(split[in_site]) == {HOLDOUT}
            sets.append(SiteRows(site, UNSEEN, HOLDOUT if held else "all", np.flatnonzero(in_site)))
    return [s for s in sets if len(s.rows)]


def _interval(entry: dict) -> tuple[float | None, float | None, float | None]:
    return entry["value"], entry.get("ci_low"), entry.get("ci_high")


def site_table(model: LoadedModel, processed_dir: Path, sets: list[SiteRows], cfg: EvaluateParams) -> pd.DataFrame:
    """One row per site: images, classes scored, each of :data:`SITE_METRICS` with its interval,
    and the recall of each class the site has. Predicts every image once."""
    rows = np.concatenate([s.rows for s in sets]) if sets else np.zeros(0, dtype=np.int64)
    everything = images_of_rows(processed_dir, rows, model.classes)
    logits = predict_images(model, everything, cfg.batch_size)
    table, start = [], 0
    for s in sets:
        part = slice(start, start + len(s.rows))
        start += len(s.rows)
        images = Images(everything.processed_dir, everything.rows[part], everything.paths[part], everything.y[part])
        metrics = evaluation_of(model, images, logits[part], cfg, present_classes_only=True).metrics
        record: dict[str, object] = {"site": s.site, "role": s.role, "split": s.split, "n": len(s.rows),
                                     "classes": " ".join(metrics["per_class"])}
        for key in SITE_METRICS:
            record[key], record[f"{key}_ci_low"], record[f"{key}_ci_high"] = _interval(metrics["overall"][key])
        for cls, entry in metrics["per_class"].items():
            record[f"recall/{cls}"] = entry["recall"]["value"]
        table.append(record)
    return pd.DataFrame(table)


def site_flat(table: pd.DataFrame) -> dict[str, float]:
    """metrics.json / MLflow keys of the table: ``site/<site>/<metric>`` (and its interval)."""
    flat: dict[str, float] = {}
    for record in table.to_dict("records"):
        for key in SITE_METRICS:
            for suffix in ("", "_ci_low", "_ci_high"):
                value = record[f"{key}{suffix}"]
                if value is not None and not pd.isna(value):
                    flat[f"site/{record['site']}/{key}{suffix}"] = float(value)
        flat[f"site/{record['site']}/n"] = float(record["n"])
    return flat


def _cell(record: dict, key: str) -> str:
    value, low, high = record[key], record[f"{key}_ci_low"], record[f"{key}_ci_high"]
    if value is None or pd.isna(value):
        return "—"
    if low is None or pd.isna(low):
        return f"{value:.3f}"
    return f"{value:.3f} ({low:.3f}–{high:.3f})"


def site_section(table: pd.DataFrame, dataset: str) -> Section:
    """The report section: which sites the model was trained on and how it did on each site."""
    trained = [r["site"] for r in table.to_dict("records") if r["role"] == TRAINED]
    unseen = [r["site"] for r in table.to_dict("records") if r["role"] == UNSEEN]
    text = (f"Source: {dataset}. The model was trained on {', '.join(trained) or 'none of these sites'}"
            + (f" and never saw {', '.join(unseen)}" if unseen else "")
            + f". A trained-on site is scored on its test split, an unseen site on all its images; macro "
            f"averages cover the classes each site has. Intervals: {CI_LEVEL:.0%} bootstrap.")
    header = ["Site", "Model", "Split", "Images", "Macro F1", "Accuracy", "Balanced accuracy", "Classes"]
    rows = [[r["site"], r["role"], r["split"], r["n"], *(_cell(r, key) for key in SITE_METRICS), r["classes"]]
            for r in table.to_dict("records")]
    return Section("Performance per site", text, header, rows)
