"""External validation: the trained model on another ingested and normalized dataset.

The other dataset goes through ``wbc ingest`` and ``wbc normalize`` with its own params (its
own ``data.root`` and ``data.classes``), into its own folder::

    DIR/interim/manifest.csv, DIR/interim/ingest.json     (wbc ingest --out DIR/interim)
    DIR/processed/images.npy, DIR/processed/index.csv     (wbc normalize --out DIR/processed)

``wbc evaluate --dataset DIR`` then runs the model over all its images (or one ``--split``).
Each label of the other dataset is matched to a model class: by ``--map LABEL=CLASS``, else
by name (case and plurals ignored). Images whose label matches no model class are *unknown*:
they are counted per label with what the model predicted for them, and left out of every
metric. Metrics cover the known classes present; macro averages run over those classes only.
The model's saved temperature rescales the probabilities for the calibration figures.

This module keeps only what is particular to another dataset: the label mapping and the
images of unknown classes. Predicting, metrics, figures, tables, report and MLflow logging are
the one evaluation path of :mod:`pipeline.evaluator`, as for the test split.

Outputs go to ``reports/external/<name>/`` and into the model's MLflow run under
``external/<name>`` with metrics named ``ext_<name>_<metric>``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import DataParams, Params
from pipeline.data import load_index
from pipeline.evaluator import (
    FIGURES_DIR,
    UNKNOWN,
    Evaluation,
    Extra,
    Images,
    Target,
    evaluate_images,
    load_evaluated_model,
    publish,
    with_adapted_batchnorm,
)
from pipeline.figures import figure_path, plot_unknown_predictions
from pipeline.layout import IMAGES_FILE, INDEX_FILE, INGEST_SUMMARY_FILE, MANIFEST_FILE
from pipeline.metrics import EXTERNAL_PREFIX
from pipeline.processed import check_processed
from pipeline.report import Section, split_phrase
from pipeline.sources import resolve_label

SPLITS = ("all", "train", "val", "test")
ADAPTED_SUFFIX = "-adapted-bn"  # the name of an evaluation after test-time BatchNorm adaptation
UNKNOWN_FILE = "unknown.csv"


def safe_name(name: str) -> str:
    """``name`` reduced to letters, digits, ``_``, ``-`` and ``.``: usable in paths and MLflow keys."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip("-.")
    if not cleaned:
        raise ValueError(f"external dataset name {name!r} has no letters or digits; give one with --name")
    return cleaned


def locate_dataset(dataset_dir: Path) -> tuple[Path, Path]:
    """(interim dir, processed dir) of an external dataset folder.

    Either ``DIR/interim`` and ``DIR/processed`` or ``DIR`` itself holding both sets of files.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"--dataset {dataset_dir}: no such folder")
    interim = next((d for d in (dataset_dir / "interim", dataset_dir) if (d / INGEST_SUMMARY_FILE).is_file()), None)
    processed = next((d for d in (dataset_dir / "processed", dataset_dir) if (d / INDEX_FILE).is_file()), None)
    missing = []
    if interim is None:
        missing.append(f"ingest.json (in {dataset_dir / 'interim'}; run `wbc ingest --out {dataset_dir / 'interim'}`)")
    if processed is None or not (processed / IMAGES_FILE).is_file():
        missing.append(f"{INDEX_FILE} and {IMAGES_FILE} (in {dataset_dir / 'processed'}; run `wbc normalize "
                       f"--manifest {dataset_dir / 'interim' / 'manifest.csv'} --out {dataset_dir / 'processed'}`)")
    if missing:
        raise FileNotFoundError(f"--dataset {dataset_dir}: not an ingested and normalized dataset, missing "
                                + "; ".join(missing) + " (each with that dataset's own --params)")
    check_processed(processed, interim / MANIFEST_FILE)  # one complete normalize run of this manifest
    return interim, processed


def parse_map(items: Iterable[str]) -> dict[str, str | None]:
    """``["SNE=neutrophil", "BNE="]`` → ``{"SNE": "neutrophil", "BNE": None}`` (empty: unknown class)."""
    mapping: dict[str, str | None] = {}
    for item in items:
        label, sep, target = item.partition("=")
        label, target = label.strip(), target.strip()
        if not sep or not label:
            raise ValueError(f"--map {item!r}: expected LABEL=CLASS (LABEL of the external dataset, CLASS of the "
                             "model; LABEL= marks a class the model does not know)")
        if label in mapping and mapping[label] != (target or None):
            raise ValueError(f"--map gives {label!r} twice: {mapping[label]!r} and {target!r}")
        mapping[label] = target or None
    return mapping


def resolve_mapping(labels: Iterable[str], classes: Sequence[str],
                    label_map: Mapping[str, str | None] | None = None) -> dict[str, str | None]:
    """Model class (or None: unknown) of each external label.

    Tried in order: ``label_map``, the class name itself, then case- and plural-insensitive names
    (as ingest matches folders). A ``label_map`` key that is no label of the dataset, or a target
    that is no class of the model, is an error: both are typos more often than not.
    """
    labels = sorted(set(labels))
    label_map = dict(label_map or {})
    bad_targets = {k: v for k, v in label_map.items() if v is not None and v not in classes}
    if bad_targets:
        raise ValueError(f"--map targets {bad_targets} are not classes of the model; its classes are "
                         f"{', '.join(classes)}")
    stray = sorted(set(label_map) - set(labels))
    if stray:
        raise ValueError(f"--map names labels {stray} that the external dataset does not have; its labels are "
                         f"{', '.join(labels)}")
    matcher = DataParams(classes=list(classes), label_map=label_map)
    mapping: dict[str, str | None] = {}
    for label in labels:
        if label in label_map:  # an explicit mapping wins, also over a class of the same name
            mapping[label] = label_map[label]
            continue
        try:
            mapping[label] = resolve_label(label, matcher)
        except KeyError:
            mapping[label] = None
    return mapping


def _how(label: str, target: str | None, label_map: Mapping[str, str | None]) -> str:
    if label in label_map:
        return "--map"
    if target is None:
        return "no model class of that name"
    return "same name" if label == target else "same name (case or plural ignored)"


def unknown_summary(labels: Sequence[str], predicted: Sequence[str], confidence: np.ndarray) -> pd.DataFrame:
    """Per unknown label and predicted class: images, share of the label, mean predicted probability."""
    frame = pd.DataFrame({"label": list(labels), "predicted": list(predicted),
                          "probability": np.asarray(confidence, dtype=np.float64)})
    columns = ["label", "predicted", "images", "share_of_label", "mean_probability"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    table = frame.groupby(["label", "predicted"], sort=True).agg(
        images=("probability", "size"), mean_probability=("probability", "mean")).reset_index()
    table["share_of_label"] = table["images"] / table.groupby("label")["images"].transform("sum")
    table = table.sort_values(["label", "images", "predicted"], ascending=[True, False, True])
    return table[columns].reset_index(drop=True)


def selected_rows(index: pd.DataFrame, split: str, processed_dir: Path) -> pd.DataFrame:
    """The index rows of ``split`` ("all": every row)."""
    if split not in SPLITS:
        raise ValueError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    selected = index if split == "all" else index[index["split"] == split]
    if selected.empty:
        present = ", ".join(sorted(set(index["split"]))) or "none"
        raise ValueError(f"{processed_dir}: the {split} split of the external dataset is empty (splits there: "
                         f"{present}); choose another --split")
    return selected


def mapped_images(processed_dir: Path, selected: pd.DataFrame, mapping: Mapping[str, str | None],
                  classes: Sequence[str]) -> Images:
    """The ``selected`` index rows as :class:`Images`, each label mapped to its model class (or unknown)."""
    lookup = {cls: i for i, cls in enumerate(classes)}
    labels = selected["label"].tolist()
    y = np.array([-1 if mapping[label] is None else lookup[mapping[label]] for label in labels], dtype=np.int64)
    if not (y >= 0).any():
        raise ValueError(f"none of the {len(labels)} images of {processed_dir} has a class the model knows: labels "
                         f"{sorted(set(labels))}, model classes {list(classes)}; map them with --map LABEL=CLASS")
    # index.csv rows are images.npy rows
    return Images(Path(processed_dir), selected.index.to_numpy(), selected["path"].tolist(), y, labels)


def _unknown_table(evaluation: Evaluation) -> pd.DataFrame:
    images = evaluation.images
    unknown = ~images.known
    return unknown_summary([lab for lab, u in zip(images.labels, unknown, strict=True) if u],
                           [p for p, u in zip(evaluation.predicted, unknown, strict=True) if u],
                           evaluation.calibrated[unknown].max(axis=1) if unknown.any() else np.empty(0))


def _unknown_figure(unknown: pd.DataFrame, classes: Sequence[str], figures_dir: Path) -> dict[str, Path]:
    """The unknown-classes figure, or none (and no stale file from an earlier run) when there are none."""
    path = figure_path(figures_dir, "unknown_classes")
    if len(unknown):
        return {"unknown_classes": plot_unknown_predictions(unknown, classes, path)}
    path.unlink(missing_ok=True)
    return {}


def _unknown_rows(unknown: pd.DataFrame) -> list[list]:
    rows = []
    for label in dict.fromkeys(unknown["label"]):
        part = unknown[unknown["label"] == label]
        mean = float((part["images"] * part["mean_probability"]).sum() / part["images"].sum())
        rows.append([label, int(part["images"].sum()),
                     ", ".join(f"{p} {n}" for p, n in zip(part["predicted"], part["images"], strict=True)),
                     f"{mean:.3f}"])
    return rows


@dataclass(frozen=True)
class _Source:
    """The external dataset being evaluated and how its labels map to the model's classes."""

    name: str
    folder: Path
    split: str
    mapping: dict[str, str | None]  # every label of the dataset -> model class, None: unknown to the model
    label_map: dict[str, str | None]  # the --map part of it

    @property
    def dataset(self) -> str:
        return f"external dataset {self.name}"

    @property
    def the_where(self) -> str:
        """"the test split", or "all images (...)"."""
        return split_phrase(self.split) if self.split == "all" else f"the {split_phrase(self.split)}"


def _sections(source: _Source, counts: pd.Series, unknown: pd.DataFrame) -> tuple[Section, Section]:
    mapping_section = Section(
        "Label mapping",
        f"How each label of the {source.dataset} maps to a model class; images in {source.the_where}.",
        ["External label", "Model class", "Matched by", "Images"],
        [[lab, t or UNKNOWN, _how(lab, t, source.label_map), int(counts.get(lab, 0))]
         for lab, t in source.mapping.items()],
    )
    rows = _unknown_rows(unknown)
    where = f"Source: {source.the_where} of the {source.dataset}."
    unknown_section = Section(
        "Images of classes the model does not know",
        (f"{where} These images are left out of every metric above and below; the table shows what the model "
         "predicted for them and its mean temperature-scaled probability for that prediction (a well-behaved "
         "model is unsure here).") if rows
        else f"{where} None: every label maps to a model class.",
        ["External label", "Images", "Predicted as (images)", "Mean probability of the prediction"],
        rows,
    )
    return mapping_section, unknown_section


def _note(evaluation: Evaluation, source: _Source) -> str:
    images = evaluation.images
    adapted = ("The network's BatchNorm statistics were first recomputed on these same images (pixels only, "
               "no label): test-time adaptation to this lab. " if source.name.endswith(ADAPTED_SUFFIX) else "")
    n_known, n_unknown = int(images.known.sum()), int((~images.known).sum())
    known_names = [evaluation.classes[c] for c in sorted(set(images.y[images.known].tolist()))]
    unknown_labels = sorted({lab for lab, u in zip(images.labels, ~images.known, strict=True) if u})
    return (
        adapted + f"External validation: every number and figure in this report comes from {source.the_where} of the "
        f"{source.dataset} ({source.folder}), not from the data the model was trained on. Metrics cover the "
        f"{n_known:,} images of the {len(known_names)} model classes present ({', '.join(known_names)}); macro "
        "averages run over these classes only. "
        + (f"{n_unknown:,} images of classes the model does not know ({', '.join(unknown_labels)}) "
           "are reported apart below and are not counted as errors."
           if n_unknown else "Every image belongs to a class the model knows.")
    )


def _extra(evaluation: Evaluation, source: _Source, counts: pd.Series, figures_dir: Path) -> Extra:
    """The unknown classes' table, figure and count, the label mapping and the note."""
    unknown = _unknown_table(evaluation)
    return Extra(
        note=_note(evaluation, source),
        sections=_sections(source, counts, unknown),
        flat={"n_unknown": int((~evaluation.images.known).sum())},
        tables={UNKNOWN_FILE: unknown.round({"share_of_label": 4, "mean_probability": 4})},
        figures=_unknown_figure(unknown, evaluation.classes, figures_dir),
    )


def _target(source: _Source, ingest: dict, images: Images) -> Target:
    n, n_unknown = len(images.y), int((~images.known).sum())
    return Target(
        dataset=source.dataset, split=source.split, title="External validation",
        metric_prefix=f"{EXTERNAL_PREFIX}{source.name}_", artifact_path=f"external/{source.name}",
        synthetic=bool(ingest.get("synthetic", False)),
        provenance={
            **ingest,
            "external dataset folder": str(source.folder),
            "images evaluated": f"{n:,} ({n - n_unknown:,} of known classes, {n_unknown:,} of unknown classes)",
            "label mapping": "; ".join(f"{lab} → {t or UNKNOWN}" for lab, t in source.mapping.items()),
        },
    )


def run_external_evaluate(
    params: Params,
    model_dir: Path,
    dataset_dir: Path,
    reports_dir: Path,
    *,
    name: str | None = None,
    split: str = "all",
    label_map: Mapping[str, str | None] | None = None,
    adapt_bn: bool = False,
) -> dict[str, float]:
    """Evaluate ``model_dir/model.pt`` on the external dataset in ``dataset_dir``; write
    ``reports_dir/external/<name>/`` and return the flat metrics of the known classes.

    ``adapt_bn``: first recompute the network's BatchNorm statistics on the evaluated images (their
    pixels, never their labels): test-time adaptation to that lab. The outputs are then named
    ``<name>-adapted-bn``, beside the plain evaluation's."""
    dataset_dir = Path(dataset_dir)
    name = safe_name(name or dataset_dir.resolve().name) + (ADAPTED_SUFFIX if adapt_bn else "")
    interim_dir, processed_dir = locate_dataset(dataset_dir)
    index = load_index(processed_dir)
    selected = selected_rows(index, split, processed_dir)
    model = load_evaluated_model(model_dir, params.runtime.device)
    label_map = dict(label_map or {})
    source = _Source(name, dataset_dir, split, resolve_mapping(index["label"], model.classes, label_map), label_map)
    images = mapped_images(processed_dir, selected, source.mapping, model.classes)
    if adapt_bn:
        model = with_adapted_batchnorm(model, images, params.evaluate.batch_size)
    evaluation = evaluate_images(model, images, params.evaluate, present_classes_only=True)

    out = Path(reports_dir) / "external" / name
    extra = _extra(evaluation, source, selected["label"].value_counts(), out / FIGURES_DIR)
    ingest = json.loads((interim_dir / INGEST_SUMMARY_FILE).read_text(encoding="utf-8"))
    return publish(evaluation, model, _target(source, ingest, images), out, params, extra=extra)
