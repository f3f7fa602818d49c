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

Outputs go to ``reports/external/<name>/`` and into the model's MLflow run under
``external/<name>`` with metrics named ``ext_<name>_<metric>``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from pipeline.config import DataParams, Params
from pipeline.data import ProcessedImages, Split, load_index
from pipeline.evaluate import code_and_run, log_evaluation, per_class_table, read_run_info
from pipeline.explain import write_explanation_figures
from pipeline.inference import load_model, pick_device, predict_logits
from pipeline.layout import IMAGES_FILE, INDEX_FILE
from pipeline.metrics import (
    calibration_summary,
    class_colors,
    classification_metrics,
    flat_metrics,
    new_figure,
    save_figure,
    softmax,
    write_figures,
)
from pipeline.report import Section, split_phrase, write_report
from pipeline.sources import resolve_label

SPLITS = ("all", "train", "val", "test")
UNKNOWN = "(unknown to the model)"
UNKNOWN_FILE = "unknown.csv"
REPORT_FILES = ("metrics.json", "per_class.csv", "predictions.csv", UNKNOWN_FILE, "report.html", "report.md")


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
    interim = next((d for d in (dataset_dir / "interim", dataset_dir) if (d / "ingest.json").is_file()), None)
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


def plot_unknown_predictions(table: pd.DataFrame, classes: Sequence[str], path: Path) -> Path:
    """Stacked horizontal bars: for each unknown label, how its images were classified."""
    labels = list(dict.fromkeys(table["label"]))
    fig = new_figure(8.0, max(2.4, 0.55 * len(labels) + 1.6))
    ax = fig.add_subplot()
    left = np.zeros(len(labels))
    for cls, color in zip(classes, class_colors(len(classes)), strict=True):
        counts = np.array([table[(table["label"] == lab) & (table["predicted"] == cls)]["images"].sum()
                           for lab in labels], dtype=float)
        if counts.any():
            ax.barh(labels, counts, left=left, color=color, label=cls, edgecolor="white")
            left += counts
    ax.invert_yaxis()
    ax.set_xlabel("Images")
    ax.set_title("Classes the model does not know: what it predicted")
    ax.legend(title="predicted", loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def run_external_evaluate(
    params: Params,
    model_dir: Path,
    dataset_dir: Path,
    reports_dir: Path,
    *,
    name: str | None = None,
    split: str = "all",
    label_map: Mapping[str, str | None] | None = None,
) -> dict[str, float]:
    """Evaluate ``model_dir/model.pt`` on the external dataset in ``dataset_dir``; write
    ``reports_dir/external/<name>/`` and return the flat metrics of the known classes."""
    if split not in SPLITS:
        raise ValueError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    cfg = params.evaluate
    dataset_dir = Path(dataset_dir)
    name = safe_name(name or dataset_dir.resolve().name)
    interim_dir, processed_dir = locate_dataset(dataset_dir)
    device = pick_device(params.train.device)
    model, meta = load_model(Path(model_dir) / "model.pt", device)
    classes = list(meta.classes)
    label_map = dict(label_map or {})

    index = load_index(processed_dir)
    mapping = resolve_mapping(index["label"], classes, label_map)
    selected = index if split == "all" else index[index["split"] == split]
    if selected.empty:
        present = ", ".join(sorted(set(index["split"]))) or "none"
        raise ValueError(f"{processed_dir}: the {split} split of the external dataset is empty (splits there: "
                         f"{present}); choose another --split")
    lookup = {cls: i for i, cls in enumerate(classes)}
    labels = selected["label"].tolist()
    targets = [mapping[label] for label in labels]
    y_all = np.array([-1 if t is None else lookup[t] for t in targets], dtype=np.int64)
    paths = selected["path"].tolist()
    rows = selected.index.to_numpy()  # index.csv rows are images.npy rows
    known = y_all >= 0
    if not known.any():
        raise ValueError(f"none of the {len(labels)} images of {dataset_dir} ({split}) has a class the model knows: "
                         f"labels {sorted(set(labels))}, model classes {classes}; map them with --map LABEL=CLASS")

    loader = DataLoader(ProcessedImages(processed_dir, Split(rows, np.where(known, y_all, 0), paths),
                                        meta.image_size), batch_size=cfg.batch_size, num_workers=0)
    logits, _ = predict_logits(model, loader, device)
    temperature = meta.temperature_or_one
    probs = softmax(logits)
    calibrated = softmax(logits, temperature)
    predicted = [classes[i] for i in probs.argmax(axis=1)]

    y_known, logits_known, probs_known = y_all[known], logits[known], probs[known]
    present = sorted(set(y_known.tolist()))
    metrics = classification_metrics(y_known, probs_known, classes, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed,
                                     macro_classes=present)
    metrics["calibration"] = calibration_summary(y_known, logits_known, temperature)
    metrics["per_class"] = {cls: entry for cls, entry in metrics["per_class"].items() if entry["support"] > 0}
    flat = flat_metrics(metrics)
    unknown_mask = ~known
    flat["n_unknown"] = int(unknown_mask.sum())

    out = Path(reports_dir) / "external" / name
    figures_dir = out / "figures"
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(figures_dir, y_known, probs_known, classes,
                            y_prob_calibrated=calibrated[known])
    figures.update(write_explanation_figures(
        figures_dir, model=model, model_name=meta.model, image_size=meta.image_size,
        images=np.load(processed_dir / IMAGES_FILE, mmap_mode="r"), rows=rows[known],
        paths=[p for p, k in zip(paths, known, strict=True) if k], y_true=y_known, y_prob=probs_known,
        classes=classes, n_worst=cfg.worst_errors, gradcam_per_class=cfg.gradcam_per_class, seed=cfg.seed,
        device=device,
    ))
    unknown = unknown_summary([lab for lab, u in zip(labels, unknown_mask, strict=True) if u],
                              [p for p, u in zip(predicted, unknown_mask, strict=True) if u],
                              calibrated[unknown_mask].max(axis=1) if unknown_mask.any() else np.empty(0))
    unknown_png = figures_dir / "unknown_classes.png"
    if len(unknown):
        figures["unknown_classes"] = plot_unknown_predictions(unknown, classes, unknown_png)
    else:
        unknown_png.unlink(missing_ok=True)

    (out / "metrics.json").write_text(json.dumps(flat, indent=2) + "\n", encoding="utf-8")
    per_class_table(metrics).to_csv(out / "per_class.csv", index=False)
    predictions = pd.DataFrame({"path": paths, "actual": labels,
                                "mapped": [UNKNOWN if t is None else t for t in targets], "predicted": predicted})
    for i, cls in enumerate(classes):
        predictions[f"p_{cls}"] = probs[:, i].round(6)
    predictions.to_csv(out / "predictions.csv", index=False)
    unknown.round({"share_of_label": 4, "mean_probability": 4}).to_csv(out / UNKNOWN_FILE, index=False)

    ingest = json.loads((interim_dir / "ingest.json").read_text(encoding="utf-8"))
    run_info = read_run_info(model_dir)
    dataset = f"external dataset {name}"
    where = split_phrase(split)
    the_where = where if split == "all" else f"the {where}"
    known_names = [classes[c] for c in present]
    unknown_labels = sorted({lab for lab, t in mapping.items() if t is None and lab in set(labels)})
    provenance = {
        **ingest,
        "dataset": dataset,
        "split": split,
        "external dataset folder": str(dataset_dir),
        "images evaluated": f"{len(labels):,} ({int(known.sum()):,} of known classes, "
                            f"{int(unknown_mask.sum()):,} of unknown classes)",
        "label mapping": "; ".join(f"{lab} → {t or UNKNOWN}" for lab, t in mapping.items()),
        **code_and_run(run_info),
    }
    note = (
        f"External validation: every number and figure in this report comes from {the_where} of the {dataset} "
        f"({dataset_dir}), not from the data the model was trained on. Metrics cover the {int(known.sum()):,} "
        f"images of the {len(known_names)} model classes present ({', '.join(known_names)}); macro averages run "
        f"over these classes only. "
        + (f"{int(unknown_mask.sum()):,} images of classes the model does not know ({', '.join(unknown_labels)}) "
           "are reported apart below and are not counted as errors."
           if unknown_mask.any() else "Every image belongs to a class the model knows.")
        + ("" if meta.calibrated else " The model carries no fitted temperature, so none is applied.")
    )
    counts = selected["label"].value_counts()
    sections = [Section(
        "Label mapping",
        f"How each label of the {dataset} maps to a model class; images in {the_where}.",
        ["External label", "Model class", "Matched by", "Images"],
        [[lab, t or UNKNOWN, _how(lab, t, label_map), int(counts.get(lab, 0))] for lab, t in mapping.items()],
    )]
    unknown_rows = []
    for lab in dict.fromkeys(unknown["label"]):
        part = unknown[unknown["label"] == lab]
        mean = float((part["images"] * part["mean_probability"]).sum() / part["images"].sum())
        unknown_rows.append([lab, int(part["images"].sum()),
                             ", ".join(f"{p} {n}" for p, n in zip(part["predicted"], part["images"], strict=True)),
                             f"{mean:.3f}"])
    sections.append(Section(
        "Images of classes the model does not know",
        (f"Source: {the_where} of the {dataset}. These images are left out of every metric above and below; the "
         "table shows what the model predicted for them and its mean temperature-scaled probability for that "
         "prediction (a well-behaved model is unsure here).") if unknown_rows
        else f"Source: {the_where} of the {dataset}. None: every label maps to a model class.",
        ["External label", "Images", "Predicted as (images)", "Mean probability of the prediction"],
        unknown_rows,
    ))
    model_info = meta.summary()
    model_info["classes"] = classes
    if meta.calibrated:
        model_info["temperature (fitted on the training data's val split)"] = round(temperature, 4)
    else:
        model_info["temperature"] = "none saved with the model; 1.0 used"
    write_report(
        out / "report.html",
        out / "report.md",
        title=f"External validation: {meta.model} on {dataset}, {where}",
        synthetic=bool(ingest.get("synthetic", False)),
        provenance=provenance,
        model=model_info,
        params=params.model_dump(mode="json"),
        metrics=metrics,
        figures=figures,
        note=note,
        sections=sections,
    )
    log_evaluation(run_info, flat, out, metric_prefix=f"ext_{name}_", artifact_path=f"external/{name}",
                   files=REPORT_FILES)
    return flat
