"""Train stage: transfer learning of a registered backbone, read top to bottom.

One entry point for a laptop CPU, one GPU, or several GPUs/nodes under ``torchrun`` (DDP;
only rank 0 logs to MLflow and writes files). Each epoch ends with an atomic checkpoint, so a
killed run started again (``dvc repro`` or ``wbc train``) resumes where it stopped; on CPU with
a fixed seed the resumed run ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, WeightedRandomSampler

from pipeline import tracking
from pipeline.augment import load_policy
from pipeline.calibration import fit_temperature
from pipeline.config import Params
from pipeline.data import EpochSampler, ProcessedImages, load_index, select_split
from pipeline.inference import autocast, pick_device, predict_logits, save_model
from pipeline.layout import IMAGES_FILE
from pipeline.model_meta import ModelMeta
from pipeline.models import build_classifier, get_backbone, head_parameters

CHECKPOINT_DIR = "checkpoints"
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr", "seconds"]


@dataclass(frozen=True)
class Distributed:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Distributed:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Distributed(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), world_size)


def run_name(model_name: str, pretrained: bool) -> str:
    """MLflow run name: model and pretrained/scratch, led by the DVC experiment's name under
    ``dvc exp run`` (DVC sets ``DVC_EXP_NAME``), so runs and experiments are easy to match."""
    name = f"{model_name}-{'pt' if pretrained else 'scratch'}"
    experiment = os.environ.get("DVC_EXP_NAME")
    return f"{experiment}: {name}" if experiment else name


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1 over present classes); absent classes get 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.divide(len(labels), num_classes * counts, out=np.zeros_like(counts), where=counts > 0)
    return torch.tensor(weights, dtype=torch.float32)


def parameter_groups(model: nn.Module, model_name: str, lr: float, backbone_factor: float,
                     weight_decay: float) -> list[dict]:
    """AdamW groups: head at ``lr``, backbone at ``lr * backbone_factor``; no weight decay
    on norm weights and biases (decaying them only fights the normalisation)."""
    head_ids = {id(p) for p in head_parameters(model, model_name)}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        key = (id(param) in head_ids, param.ndim > 1)
        groups.setdefault(key, []).append(param)
    return [
        {
            "params": params,
            "lr": lr if is_head else lr * backbone_factor,
            "weight_decay": weight_decay if decays else 0.0,
            "is_head": is_head,
        }
        for (is_head, decays), params in sorted(groups.items())
    ]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay towards 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_backbone_trainable(model: nn.Module, model_name: str, trainable: bool) -> None:
    """Freeze or unfreeze everything but the head."""
    head_ids = {id(p) for p in head_parameters(model, model_name)}
    for param in model.parameters():
        if id(param) not in head_ids:
            param.requires_grad_(trainable)


def freeze_norm_statistics(model: nn.Module) -> None:
    """Keep frozen BatchNorm layers on their ImageNet statistics."""
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not module.weight.requires_grad:
            module.eval()


def fingerprint(params: Params, index: pd.DataFrame, policy_path: Path) -> str:
    """What a checkpoint must match to be resumed: train/data params, the data, the policy."""
    digest = hashlib.sha256()
    digest.update(params.train.model_dump_json(exclude={"num_workers", "device", "compile"}).encode())
    digest.update(params.data.model_dump_json().encode())
    digest.update(pd.util.hash_pandas_object(index[["path", "label", "split"]], index=False).values.tobytes())
    digest.update(policy_path.read_bytes())
    return digest.hexdigest()


def evaluate_split(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
                   loss_fn: nn.Module) -> dict[str, float]:
    """Loss, accuracy and macro-F1 of ``model`` over ``loader``."""
    logits, labels = predict_logits(model, loader, device)
    loss = loss_fn(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    predicted = logits.argmax(axis=1)
    return {
        "loss": loss,
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, labels=list(range(num_classes)), average="macro",
                                   zero_division=0)),
    }


def train_step(net: nn.Module, images: torch.Tensor, targets: torch.Tensor, loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer, device: torch.device, grad_clip: float) -> torch.Tensor:
    """One optimisation step on a batch of uint8 images (copied to ``device`` without blocking,
    channels-last, bf16 autocast on CUDA); returns the batch loss as a detached tensor, left on
    the device so the step never waits for the GPU."""
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    targets = targets.to(device, non_blocking=True)
    with autocast(device):
        loss = loss_fn(net(images).float(), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def run_train(params: Params, processed_dir: Path, policy_path: Path, model_dir: Path, reports_dir: Path,
              ingest_summary: Path | None = None, progress: bool = True) -> dict:
    """Train ``params.train.model``; write model.pt, run.json and the training history."""
    cfg = params.train
    ddp = setup_distributed()
    device = pick_device(cfg.device, ddp.local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)
    classes = list(params.data.classes)
    num_classes = len(classes)
    pretrained = cfg.pretrained == "imagenet"
    freeze_epochs = cfg.freeze_epochs if pretrained else 0

    # --- data -------------------------------------------------------------------------------
    index = load_index(processed_dir)
    train_split = select_split(index, "train", classes)
    val_split = select_split(index, "val", classes)
    if len(train_split.rows) == 0 or len(val_split.rows) == 0:
        raise ValueError(f"{processed_dir}: train ({len(train_split.rows)}) and val ({len(val_split.rows)}) "
                         "splits must both hold images")
    train_set = ProcessedImages(processed_dir, train_split, cfg.image_size, load_policy(policy_path), cfg.seed)
    val_set = ProcessedImages(processed_dir, val_split, cfg.image_size)
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.class_weighting == "sampler":
        if ddp.world_size > 1:
            raise ValueError("train.class_weighting: 'sampler' is not supported with several processes; use 'loss'")
        sample_weights = class_weights(train_split.labels, num_classes)[train_split.labels]
        base_sampler = WeightedRandomSampler(sample_weights.double(), len(train_split.rows), generator=generator)
    elif ddp.world_size > 1:
        base_sampler = DistributedSampler(train_set, ddp.world_size, ddp.rank, shuffle=True, seed=cfg.seed)
    else:
        base_sampler = RandomSampler(train_set, generator=generator)
    sampler = EpochSampler(base_sampler)
    loader_options = {
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": cfg.num_workers > 0,
        # The loaders draw worker seeds from their own generator, not the global RNG, so the
        # global stream (dropout, drop-connect) is the same whether or not a run was resumed.
        "generator": torch.Generator().manual_seed(cfg.seed + 1),
    }
    train_loader = DataLoader(train_set, sampler=sampler, **loader_options)
    val_loader = DataLoader(val_set, shuffle=False, **loader_options)

    # --- model, loss, optimiser, schedule ----------------------------------------------------
    # channels-last suits convolutions on CUDA and on CPU alike (1.5x on CPU for EfficientNet).
    model = build_classifier(cfg.model, num_classes, cfg.image_size, pretrained, cfg.weights_path)
    model = model.to(device, memory_format=torch.channels_last)
    weights = class_weights(train_split.labels, num_classes) if cfg.class_weighting == "loss" else None
    loss_fn = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device),
                                  label_smoothing=cfg.label_smoothing)
    val_loss_fn = nn.CrossEntropyLoss()
    groups = parameter_groups(model, cfg.model, cfg.lr, cfg.backbone_lr_factor if pretrained else 1.0,
                              cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = max(1, round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps))
    net: nn.Module = model
    if ddp.world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=freeze_epochs > 0)
    if cfg.compile:
        net = torch.compile(net)

    # --- resume ------------------------------------------------------------------------------
    checkpoint_dir = model_dir / CHECKPOINT_DIR
    last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
    run_fingerprint = fingerprint(params, index, policy_path)
    start_epoch, best_score, best_epoch, stale, history, run_id = 0, -1.0, -1, 0, [], None
    if last_path.is_file():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        if state["fingerprint"] == run_fingerprint:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            generator.set_state(state["loader_rng"])
            start_epoch, best_score, best_epoch = state["epoch"] + 1, state["best_score"], state["best_epoch"]
            stale, history, run_id = state["stale"], state["history"], state["run_id"] or None
            if ddp.is_main:
                print(f"resuming from {last_path} after epoch {state['epoch'] + 1}/{cfg.epochs}")
        elif ddp.is_main:
            print(f"{last_path} belongs to other params or data; starting afresh")
            shutil.rmtree(checkpoint_dir)
    if ddp.is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)

    # --- tracking (rank 0 only) --------------------------------------------------------------
    run = None
    if ddp.is_main:
        experiment_id = tracking.setup_experiment(cfg.experiment)
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id,
                               run_name=None if run_id else run_name(cfg.model, pretrained))
        if run_id is None:
            summary = json.loads(ingest_summary.read_text()) if ingest_summary and ingest_summary.is_file() else {}
            mlflow.log_params(tracking.flatten(params.model_dump(mode="json")))
            mlflow.log_params({"world_size": ddp.world_size, "device": device.type,
                               "train_images": len(train_split.rows), "val_images": len(val_split.rows)})
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
        run_id = run.info.run_id

    # --- the loop ----------------------------------------------------------------------------
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        frozen = epoch < freeze_epochs
        set_backbone_trainable(model, cfg.model, not frozen)
        net.train()
        if frozen:
            freeze_norm_statistics(model)
        sampler.set_epoch(epoch)
        total_loss, seen = 0.0, 0
        for images, targets in train_loader:
            try:
                loss = train_step(net, images, targets, loss_fn, optimizer, device, cfg.grad_clip)
            except torch.cuda.OutOfMemoryError:
                raise RuntimeError(
                    f"GPU out of memory at batch size {cfg.batch_size} with {cfg.model} at {cfg.image_size}px; "
                    f"try train.batch_size: {max(1, cfg.batch_size // 2)} (e.g. dvc exp run -S "
                    f"train.batch_size={max(1, cfg.batch_size // 2)})") from None
            scheduler.step()
            total_loss = total_loss + loss * len(targets)
            seen += len(targets)
        val = evaluate_split(model, val_loader, device, num_classes, val_loss_fn)
        record = {
            "epoch": epoch + 1,
            "train_loss": float(total_loss) / max(1, seen),
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "val_macro_f1": val["macro_f1"],
            "lr": max(g["lr"] for g in optimizer.param_groups),
            "seconds": time.perf_counter() - started,
        }
        history.append(record)
        improved = val["macro_f1"] > best_score
        if improved:
            best_score, best_epoch, stale = val["macro_f1"], epoch + 1, 0
        else:
            stale += 1
        if ddp.is_main:
            mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
            if improved:
                _save_checkpoint(best_path, {"model": model.state_dict()})
            _save_checkpoint(last_path, {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "loader_rng": generator.get_state(),
                "epoch": epoch,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "stale": stale,
                "history": history,
                "fingerprint": run_fingerprint,
                "run_id": run_id,
            })
            if progress:
                print(f"epoch {epoch + 1}/{cfg.epochs} {'(frozen backbone) ' if frozen else ''}"
                      f"train_loss {record['train_loss']:.4f} val_loss {val['loss']:.4f} "
                      f"val_acc {val['accuracy']:.4f} val_macro_f1 {val['macro_f1']:.4f} "
                      f"({record['seconds']:.1f}s)", flush=True)
        if cfg.patience and stale >= cfg.patience:
            if ddp.is_main:
                print(f"early stop: val macro-F1 has not improved for {stale} epochs")
            break

    # --- outputs (rank 0 only) ---------------------------------------------------------------
    result = {"best_val_macro_f1": best_score, "best_epoch": best_epoch, "run_id": run_id}
    if ddp.is_main:
        model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["model"])
        # Temperature scaling, fitted once on the validation split and saved with the model, so
        # evaluation, prediction and the exported/served model all use the same calibration.
        val_logits, val_labels = predict_logits(model, val_loader, device)
        temperature = fit_temperature(val_logits, val_labels)
        backbone = get_backbone(cfg.model)
        meta = ModelMeta(
            model=cfg.model,
            classes=tuple(classes),
            image_size=cfg.image_size,
            mean=backbone.mean,
            std=backbone.std,
            normalize=params.normalize,
            pretrained=cfg.pretrained,
            best_epoch=best_epoch,
            best_val_macro_f1=best_score,
            temperature=temperature,
            run_id=run_id,
        )
        save_model(model_dir / "model.pt", model, meta)
        reports_dir.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(history, columns=HISTORY_COLUMNS).to_csv(reports_dir / "train_history.csv", index=False)
        mlflow.log_metrics({"best_val_macro_f1": best_score, "best_epoch": best_epoch, "temperature": temperature})
        mlflow.log_artifact(str(reports_dir / "train_history.csv"))
        run_record = {
            "run_id": run_id,
            "experiment_id": run.info.experiment_id,
            "tracking_uri": mlflow.get_tracking_uri(),
        }
        if cfg.log_model:
            # A pyfunc model that carries its preprocessing, classes and temperature (see
            # pipeline/serving.py); logged from code with weights-only loading: nothing is pickled.
            from pipeline.serving import log_pyfunc_model

            example = np.load(processed_dir / IMAGES_FILE, mmap_mode="r")[val_split.rows[0]]
            info = log_pyfunc_model(model_dir / "model.pt", params, classes, example, cfg.registered_model)
            run_record["model_uri"] = info.model_uri
            if cfg.registered_model:
                run_record["registered_model"] = cfg.registered_model
                run_record["registered_model_version"] = str(info.registered_model_version)
        (model_dir / "run.json").write_text(json.dumps(run_record, indent=2) + "\n", encoding="utf-8")
        mlflow.end_run()
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    if ddp.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result
