"""Train stage: transfer learning of a registered backbone, read top to bottom.

One entry point for a laptop CPU, one GPU, or several GPUs/nodes under ``torchrun`` (DDP;
only rank 0 logs to MLflow and writes files). The parts (loaders, network, loss, optimiser, one
epoch, validation, the resumable :class:`~pipeline.training.TrainState`) come from the factories
in ``pipeline/training.py``; this module wires them together. Each epoch ends with an atomic
checkpoint of the state, so a killed run started again (``dvc repro`` or ``wbc train``) resumes
where it stopped, and on CPU with a fixed seed ends with the same metrics as an uninterrupted
one. A checkpoint is resumed only when the params, split, augmentation policy and processed
images it was trained on are unchanged; otherwise it is discarded and its MLflow run closed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from mlflow import ActiveRun
from torch import nn
from torch.utils.data import DataLoader

from pipeline import tracking
from pipeline.atomic import atomic_path, write_json
from pipeline.augment import load_policy
from pipeline.calibration import fit_temperature
from pipeline.config import Params, TrainParams
from pipeline.data import EpochSampler, ProcessedImages, Split, images_identity, load_index, select_split
from pipeline.inference import pick_device, predict_logits, save_model
from pipeline.layout import IMAGES_FILE, MANIFEST_FILE, MODEL_FILE, RUN_INFO_FILE
from pipeline.preprocess import read_preprocessing
from pipeline.processed import check_processed
from pipeline.training import (
    Distributed,
    TrainState,
    build_loss,
    build_model,
    build_optimizer,
    build_scheduler,
    frozen_epochs,
    is_pretrained,
    make_loader,
    model_meta,
    read_checkpoint,
    save_checkpoint,
    setup_distributed,
    train_and_validate,
    train_sampler,
    wrap_model,
)

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
HISTORY_FILE = "train_history.csv"
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr", "seconds"]


def run_train(params: Params, processed_dir: Path, policy_path: Path, model_dir: Path, reports_dir: Path,
              ingest_summary: Path | None = None, progress: bool = True) -> dict:
    """Train ``params.train.model``; write model.pt, run.json and the training history."""
    cfg = params.train
    ddp = setup_distributed()
    device = pick_device(params.runtime.device, ddp.local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)

    check_processed(processed_dir, ingest_summary.with_name(MANIFEST_FILE) if ingest_summary else None)
    data = load_data(params, processed_dir, policy_path, ddp, device)
    model = build_model(cfg, len(data.classes), device)
    loss_fn = build_loss(cfg, data.train.labels, len(data.classes), device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(data.train_loader))
    net = wrap_model(model, cfg, ddp, device, params.runtime.compile)
    state = TrainState(model, optimizer, scheduler, data.sampler_rng,
                       resume_fingerprint(params, data.index, policy_path, processed_dir))
    checkpoint_dir = model_dir / CHECKPOINT_DIR
    resume(state, checkpoint_dir, ddp, cfg.epochs)

    with tracked_run(params, state, data, ddp, device, reports_dir, ingest_summary) as run:
        for epoch in range(state.epoch, cfg.epochs):
            record = run_epoch(epoch, cfg, data, state, net, loss_fn, device)
            improved = state.update(record)
            if ddp.is_main:
                end_epoch(state, record, improved, checkpoint_dir, cfg, progress)
            if cfg.patience and state.stale >= cfg.patience:
                if ddp.is_main:
                    print(f"early stop: val macro-F1 has not improved for {state.stale} epochs")
                break
        if ddp.is_main:
            write_outputs(params, state, data, run, processed_dir, model_dir, reports_dir, device)

    if ddp.is_main:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    if ddp.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"best_val_macro_f1": state.best_score, "best_epoch": state.best_epoch,
            "run_id": state.run_id if ddp.is_main else None}


@dataclass(frozen=True)
class TrainData:
    """What a run reads: the processed index, its train and val splits, and their loaders."""

    index: pd.DataFrame
    classes: list[str]
    train: Split
    val: Split
    sampler: EpochSampler
    sampler_rng: torch.Generator
    train_loader: DataLoader
    val_loader: DataLoader


def load_data(params: Params, processed_dir: Path, policy_path: Path, ddp: Distributed,
              device: torch.device) -> TrainData:
    """The train and val splits of ``processed_dir`` with their loaders: train images augmented by
    the saved policy, in the order ``train.class_weighting`` asks for; val images as they are."""
    cfg = params.train
    classes = list(params.data.classes)
    index = load_index(processed_dir)
    train, val = select_split(index, "train", classes), select_split(index, "val", classes)
    if len(train.rows) == 0 or len(val.rows) == 0:
        raise ValueError(f"{processed_dir}: train ({len(train.rows)}) and val ({len(val.rows)}) "
                         "splits must both hold images")
    train_set = ProcessedImages(processed_dir, train, cfg.image_size, load_policy(policy_path), cfg.seed)
    sampler_rng = torch.Generator().manual_seed(cfg.seed)
    sampler = train_sampler(cfg, train_set, train.labels, len(classes), ddp, sampler_rng)
    return TrainData(index, classes, train, val, sampler, sampler_rng,
                     train_loader=make_loader(train_set, cfg, device, sampler, params.runtime.train_workers),
                     val_loader=make_loader(ProcessedImages(processed_dir, val, cfg.image_size), cfg, device,
                                            workers=params.runtime.train_workers))


def resume_fingerprint(params: Params, index: pd.DataFrame, policy_path: Path, processed_dir: Path) -> dict[str, str]:
    """What a checkpoint must match to be resumed, one digest per part so that a mismatch can say
    what changed: the train params (but for where and how fast it runs), the data and normalize
    params, the split index, the augmentation policy, and the processed images themselves."""

    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    split_index = pd.util.hash_pandas_object(index[["path", "label", "split"]], index=False).values.tobytes()
    return {
        "train params": digest(params.train.model_dump_json().encode()),
        "data params": digest(params.data.model_dump_json().encode()),
        "normalize params": digest(params.normalize.model_dump_json(exclude={"workers"}).encode()),
        "split index": digest(split_index),
        "augmentation policy": digest(policy_path.read_bytes()),
        "processed images": images_identity(processed_dir),
    }


def resume(state: TrainState, checkpoint_dir: Path, ddp: Distributed, epochs: int) -> None:
    """Restore ``state`` from the last checkpoint when it was saved for this same run; otherwise
    discard the checkpoint, close the MLflow run it was continuing, and start afresh."""
    last = checkpoint_dir / LAST_CHECKPOINT
    saved = read_checkpoint(last) if last.is_file() else None
    changed = state.changes_from(saved.get("fingerprint")) if saved is not None else []
    if saved is not None and not changed:
        state.load_state_dict(saved)
        if ddp.is_main:
            print(f"resuming from {last} after epoch {state.epoch}/{epochs}")
    if ddp.world_size > 1:
        dist.barrier()  # every process has read the checkpoint before rank 0 may remove it
    if not ddp.is_main:
        return
    if changed:
        message = f"{last} was saved for other {', '.join(changed)}; starting afresh"
        if saved.get("run_id"):
            mlflow.set_tracking_uri(tracking.tracking_uri())
            tracking.end_run_as(saved["run_id"], "KILLED")
            message += f" in a new MLflow run (the checkpoint's run {saved['run_id']} is closed)"
        print(message)
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)


def run_name(model_name: str, pretrained: bool) -> str:
    """MLflow run name: model and pretrained/scratch, led by the DVC experiment's name under
    ``dvc exp run`` (DVC sets ``DVC_EXP_NAME``), so runs and experiments are easy to match."""
    name = f"{model_name}-{'pt' if pretrained else 'scratch'}"
    experiment = os.environ.get("DVC_EXP_NAME")
    return f"{experiment}: {name}" if experiment else name


@contextmanager
def tracked_run(params: Params, state: TrainState, data: TrainData, ddp: Distributed, device: torch.device,
                reports_dir: Path, ingest_summary: Path | None) -> Iterator[ActiveRun | None]:
    """Rank 0: continue the checkpoint's MLflow run, or start one and log its inputs; its id goes
    into ``state``. The run ends FINISHED when the block completes, KILLED when it is interrupted
    and FAILED on an error, so a run that stops is never left RUNNING. Other ranks get ``None``."""
    if not ddp.is_main:
        yield None
        return
    cfg = params.train
    experiment_id = tracking.setup_experiment(params.tracking.experiment)
    resumed = state.run_id is not None
    run = mlflow.start_run(run_id=state.run_id, experiment_id=None if resumed else experiment_id,
                           run_name=None if resumed else run_name(cfg.model, is_pretrained(cfg)))
    state.run_id = run.info.run_id
    try:
        if not resumed:
            log_run_inputs(params, data, ddp, device, reports_dir, ingest_summary)
        yield run
    except BaseException as exc:
        mlflow.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.end_run()


def log_run_inputs(params: Params, data: TrainData, ddp: Distributed, device: torch.device, reports_dir: Path,
                   ingest_summary: Path | None) -> None:
    """Params, provenance tags (git, DVC hashes, the ingested data) and the data reports of a new run."""
    cfg = params.train
    summary = json.loads(ingest_summary.read_text()) if ingest_summary and ingest_summary.is_file() else {}
    mlflow.log_params(tracking.flatten(params.model_dump(mode="json")))
    mlflow.log_params({"world_size": ddp.world_size, "device": device.type,
                       "train_images": len(data.train.rows), "val_images": len(data.val.rows)})
    mlflow.set_tags({
        **tracking.git_state(),
        **tracking.dvc_data_hashes(),
        "data.hash": summary.get("data_hash", "unknown"),
        "data.root": params.data.root,
        "data.synthetic": str(summary.get("synthetic", "unknown")).lower(),
        "model": cfg.model,
        "pretrained": cfg.pretrained,
        **({"dvc.exp_name": os.environ["DVC_EXP_NAME"]} if os.environ.get("DVC_EXP_NAME") else {}),
    })
    for name in ("ingest.md", "augment_preview.png"):
        if (reports_dir / name).is_file():
            mlflow.log_artifact(str(reports_dir / name), artifact_path="data")


def run_epoch(epoch: int, cfg: TrainParams, data: TrainData, state: TrainState, net: nn.Module, loss_fn: nn.Module,
              device: torch.device) -> dict[str, float]:
    """Train epoch ``epoch`` (0-based), validate, and return the epoch's history row."""
    return train_and_validate(epoch, cfg, state.model, net, state.optimizer, state.scheduler, data.sampler,
                              data.train_loader, data.val_loader, loss_fn, device, len(data.classes))


def end_epoch(state: TrainState, record: dict[str, float], improved: bool, checkpoint_dir: Path, cfg: TrainParams,
              progress: bool) -> None:
    """Rank 0, after each epoch: log its metrics, checkpoint the state (and the best weights so
    far), and report progress."""
    mlflow.log_metrics({key: value for key, value in record.items() if key != "epoch"}, step=state.epoch)
    if improved:
        save_checkpoint(checkpoint_dir / BEST_CHECKPOINT, {"model": state.model.state_dict()})
    state.save(checkpoint_dir / LAST_CHECKPOINT)
    if progress:
        print(f"epoch {state.epoch}/{cfg.epochs} {'(frozen backbone) ' if state.epoch <= frozen_epochs(cfg) else ''}"
              f"train_loss {record['train_loss']:.4f} val_loss {record['val_loss']:.4f} "
              f"val_acc {record['val_accuracy']:.4f} val_macro_f1 {record['val_macro_f1']:.4f} "
              f"({record['seconds']:.1f}s)", flush=True)


def write_outputs(params: Params, state: TrainState, data: TrainData, run: ActiveRun, processed_dir: Path,
                  model_dir: Path, reports_dir: Path, device: torch.device) -> None:
    """Rank 0, after the last epoch: the best weights with their metadata (``model.pt``), the
    history (CSV and MLflow), the MLflow model when ``tracking.log_model`` asks, and ``run.json``."""
    model = state.model
    model.load_state_dict(read_checkpoint(model_dir / CHECKPOINT_DIR / BEST_CHECKPOINT)["model"])
    # Temperature scaling, fitted once on the validation split and saved with the model, so
    # evaluation, prediction and the exported/served model all use the same calibration.
    temperature = fit_temperature(*predict_logits(model, data.val_loader, device))
    # The colour reference and pixel sizes the images were normalized with travel with the model, so
    # predict and the served model prepare an input exactly as the training images were.
    meta = model_meta(params, state.best_epoch, state.best_score, temperature, state.run_id,
                      read_preprocessing(processed_dir))
    save_model(model_dir / MODEL_FILE, model, meta)
    with atomic_path(reports_dir / HISTORY_FILE) as tmp:
        pd.DataFrame(state.history, columns=HISTORY_COLUMNS).to_csv(tmp, index=False)
    mlflow.log_metrics({"best_val_macro_f1": state.best_score, "best_epoch": state.best_epoch,
                        "temperature": temperature})
    mlflow.log_artifact(str(reports_dir / HISTORY_FILE))
    # model.pt is the one source of the run id; run.json, written last, describes that run and is read
    # only beside a model naming the same run (pipeline.evaluator.read_run_info), so a kill between the
    # two files is refused downstream rather than evaluated into the previous run.
    run_record = {
        "run_id": meta.run_id,
        "experiment_id": run.info.experiment_id,
        "tracking_uri": tracking.redact_uri(mlflow.get_tracking_uri()),
    }
    if params.tracking.log_model:
        example = np.load(processed_dir / IMAGES_FILE, mmap_mode="r")[data.val.rows[0]]
        run_record.update(log_served_model(params, model_dir / MODEL_FILE, example))
    write_json(model_dir / RUN_INFO_FILE, run_record)


def log_served_model(params: Params, model_path: Path, example: np.ndarray) -> dict[str, str]:
    """Log the pyfunc model (registered when ``tracking.registered_model`` names it); its entries for
    ``run.json``."""
    # A pyfunc model that carries its preprocessing, classes and temperature (see
    # pipeline/serving.py); logged from code with weights-only loading: nothing is pickled.
    from pipeline.serving import log_pyfunc_model

    registered = params.tracking.registered_model
    info = log_pyfunc_model(model_path, params, list(params.data.classes), example, registered)
    record = {"model_uri": info.model_uri, "model_id": info.model_id}
    if registered:
        record.update(registered_model=registered, registered_model_version=str(info.registered_model_version))
    return record
