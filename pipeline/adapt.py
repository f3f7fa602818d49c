"""Few-shot adaptation to a new site: ``wbc adapt --dataset DIR --shots K``.

A lab labels K images per class of its own; the trained model is fine-tuned on them and scored on
the rest of that lab's images. The recipe: first recompute the BatchNorm statistics on all of the
site's images (pixels only, no labels: test-time adaptation), then fine-tune every layer for a few
epochs with those statistics frozen (K images per class are too few to estimate them), keeping the
model's temperature. The K shots of a class are whole groups of copies (ingest's ``group``: crops of
one cell, duplicates), drawn with a seed, so no copy of a training shot is ever scored.

The adapted model is saved beside the original (``models/adapted/<name>/model.pt``), logged as its
own MLflow run nested under the run of the model it started from, and registered as a new version
of the registered model; its evaluation report goes to ``reports/adapt/<name>/``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from pipeline import tracking
from pipeline.adaptation import batchnorm_layers
from pipeline.atomic import write_json
from pipeline.augment import build_policy
from pipeline.config import Params
from pipeline.data import Split, load_index
from pipeline.evaluator import (
    Extra,
    Images,
    LoadedModel,
    Target,
    evaluate_images,
    load_evaluated_model,
    publish,
    with_adapted_batchnorm,
)
from pipeline.external import locate_dataset, mapped_images, resolve_mapping, safe_name, selected_rows
from pipeline.inference import save_model
from pipeline.layout import IMAGES_FILE, MODEL_FILE, MODELS, REPORTS
from pipeline.training import fit

SHOTS_FILE = "shots.csv"


@dataclass(frozen=True)
class Shots:
    """The images a few-shot run trains on and the ones it is scored on, as positions in ``images``."""

    train: np.ndarray
    evaluate: np.ndarray
    classes_without_shots: tuple[str, ...]  # classes with a single group: all of it is scored, none trained on


def _unit(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_shots(images: Images, groups: list[str], classes: list[str], shots: int, seed: int) -> Shots:
    """Per class of a known image, whole groups in seeded order until ``shots`` images are taken, always
    leaving at least one group of the class to score; everything not taken is scored."""
    train: list[int] = []
    without: list[str] = []
    for c, name in enumerate(classes):
        members = np.flatnonzero(images.y == c)
        if len(members) == 0:
            continue
        by_group: dict[str, list[int]] = {}
        for i in members:
            by_group.setdefault(groups[i], []).append(int(i))
        order = sorted(by_group, key=lambda g: _unit(seed, f"{name}/{g}"))
        if len(order) < 2:
            without.append(name)
            continue
        taken: list[int] = []
        for group in order[:-1]:
            if len(taken) >= shots:
                break
            taken += by_group[group]
        train += taken
    chosen = np.zeros(len(images.y), bool)
    chosen[train] = True
    return Shots(np.flatnonzero(chosen), np.flatnonzero(~chosen & images.known), tuple(without))


def _subset(images: Images, positions: np.ndarray) -> Images:
    labels = None if images.labels is None else [images.labels[i] for i in positions]
    return Images(images.processed_dir, images.rows[positions], [images.paths[i] for i in positions],
                  images.y[positions], labels)


def fine_tune(model: LoadedModel, images: Images, shots: Shots, params: Params, progress: str) -> LoadedModel:
    """``model`` adapted to the site of ``images``: AdaBN on all of them, then fine-tuning on ``shots.train``
    with BatchNorm frozen (the shots are too few to estimate it); the model keeps its temperature."""
    settings = params.adapt
    if settings.adapt_bn and batchnorm_layers(model.network):
        model = with_adapted_batchnorm(model, images, params.evaluate.batch_size)
    cfg = params.train.model_copy(update={
        "epochs": settings.epochs, "lr": settings.lr, "freeze_epochs": 0, "warmup_epochs": 0.0,
        "backbone_lr_factor": settings.backbone_lr_factor, "batch_norm": "frozen", "seed": settings.seed,
        "patience": 0, "batch_size": min(params.train.batch_size, max(2, len(shots.train))),
        "image_size": model.meta.image_size, "model": model.meta.model,
    })
    train = _subset(images, shots.train)
    split = Split(train.rows, train.y, train.paths)
    fitted = fit(cfg, len(model.classes), images.processed_dir, split, split, build_policy(params.augment),
                 model.device, model=model.network, progress=progress, runtime=params.runtime)
    return LoadedModel(fitted.model.eval(), model.meta, model.device, model.run_info)


def run_adapt(params: Params, model_dir: Path, dataset_dir: Path, shots: int, *, name: str | None = None,
              label_map: dict[str, str | None] | None = None, models_root: Path = MODELS / "adapted",
              reports_root: Path = REPORTS / "adapt", progress: bool = True) -> dict[str, float]:
    """Fine-tune the model in ``model_dir`` on ``shots`` images per class of the ingested and normalized
    dataset in ``dataset_dir`` and score it on the rest; return the flat metrics of the rest."""
    if shots < 1:
        raise ValueError(f"--shots {shots}: give at least 1 labelled image per class")
    dataset_dir = Path(dataset_dir)
    name = safe_name(f"{name or dataset_dir.resolve().name}-{shots}shot")
    _, processed_dir = locate_dataset(dataset_dir)
    index = load_index(processed_dir)
    selected = selected_rows(index, "all", processed_dir)
    parent = load_evaluated_model(model_dir, params.runtime.device)
    mapping = resolve_mapping(index["label"], parent.classes, dict(label_map or {}))
    images = mapped_images(processed_dir, selected, mapping, parent.classes)
    groups = [g if isinstance(g, str) and g else f"row{r}" for g, r in zip(selected["group"], images.rows, strict=True)]
    chosen = choose_shots(images, groups, parent.classes, shots, params.adapt.seed)
    if len(chosen.train) == 0:
        raise ValueError(f"{dataset_dir}: no class has two or more groups of images, so no shots can be taken "
                         "while keeping images of the class to score")
    adapted = fine_tune(parent, images, chosen, params, f"adapt {name}" if progress else "")

    out_models = Path(models_root) / name
    model_path = out_models / MODEL_FILE
    meta = replace(parent.meta, run_id=None)
    experiment_id = tracking.setup_experiment(params.tracking.experiment)
    parent_run = parent.run_info.get("run_id")
    tags = {"wbc.kind": "few-shot", "wbc.site": name, **({"mlflow.parentRunId": parent_run,
                                                          "wbc.parent_run_id": parent_run} if parent_run else {})}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{parent.meta.model}: {name}", tags=tags) as run:
        meta = replace(meta, run_id=run.info.run_id)
        save_model(model_path, adapted.network, meta)
        mlflow.log_params({"shots": shots, "adapt.seed": params.adapt.seed, "adapt.epochs": params.adapt.epochs,
                           "adapt.lr": params.adapt.lr, "adapt.adapt_bn": params.adapt.adapt_bn,
                           "dataset": str(dataset_dir), "parent_run_id": parent_run or ""})
        mlflow.log_metrics({"train_images": len(chosen.train), "evaluated_images": len(chosen.evaluate)})
        record = {"run_id": run.info.run_id, "experiment_id": experiment_id,
                  "tracking_uri": tracking.redact_uri(mlflow.get_tracking_uri()), "parent_run_id": parent_run}
        if params.tracking.registered_model:
            from pipeline.serving import log_pyfunc_model

            example = np.load(processed_dir / IMAGES_FILE, mmap_mode="r")[images.rows[chosen.train[0]]]
            info = log_pyfunc_model(model_path, params, list(parent.classes), example,
                                    params.tracking.registered_model)
            record.update(model_uri=info.model_uri, registered_model=params.tracking.registered_model,
                          registered_model_version=str(info.registered_model_version))
    write_json(out_models / "run.json", record)

    scored = LoadedModel(adapted.network, meta, adapted.device, record)
    rest = _subset(images, chosen.evaluate)
    evaluation = evaluate_images(scored, rest, params.evaluate, present_classes_only=True)
    out = Path(reports_root) / name
    shots_table = pd.DataFrame({"path": [images.paths[i] for i in chosen.train],
                                "label": [parent.classes[images.y[i]] for i in chosen.train],
                                "group": [groups[i] for i in chosen.train]})
    note = (f"Few-shot adaptation to {dataset_dir}: the model was fine-tuned on {len(chosen.train)} labelled images "
            f"({shots} per class, whole groups of copies, seed {params.adapt.seed}; listed in {SHOTS_FILE}) and is "
            f"scored here on the other {len(chosen.evaluate):,} images of the site, none of which it trained on."
            + (f" Classes with a single group, scored but not trained on: {', '.join(chosen.classes_without_shots)}."
               if chosen.classes_without_shots else ""))
    target = Target(dataset=f"site {name.removesuffix(f'-{shots}shot')}", split="all but the shots",
                    title=f"Few-shot adaptation ({shots} per class)", metric_prefix="adapted_",
                    artifact_path="evaluation")
    return publish(evaluation, scored, target, out, params, extra=Extra(note=note, tables={SHOTS_FILE: shots_table}))
