"""The parts of a training run, built by factories the train stage and the benchmarks share.

The train stage (``pipeline/train.py``) wires these together top to bottom, the way timm's
``train.py`` uses ``create_loader``/``create_optimizer`` and ``train_one_epoch``/``validate``:
the process group, samplers and loaders, network, loss, optimiser and schedule, one step, one
epoch, validation, and :class:`TrainState`, everything a killed run restores to carry on exactly
where it stopped.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, WeightedRandomSampler

from pipeline.atomic import atomic_path
from pipeline.calibration import fit_temperature
from pipeline.config import Params, RuntimeParams, TrainParams
from pipeline.data import EpochSampler, ProcessedImages, Split
from pipeline.inference import autocast, predict_logits
from pipeline.model_meta import ModelMeta
from pipeline.models import Classifier, build_classifier, get_backbone, head_parameters
from pipeline.preprocess import Preprocessing


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


def is_pretrained(cfg: TrainParams) -> bool:
    """Whether the run starts from ImageNet weights (and so freezes, and slows, the backbone)."""
    return cfg.pretrained == "imagenet"


def frozen_epochs(cfg: TrainParams) -> int:
    """Leading epochs that train the head only: none for a network trained from scratch."""
    return cfg.freeze_epochs if is_pretrained(cfg) else 0


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1 over present classes); absent classes get 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.divide(len(labels), num_classes * counts, out=np.zeros_like(counts), where=counts > 0)
    return torch.tensor(weights, dtype=torch.float32)


def train_sampler(cfg: TrainParams, dataset: Dataset, labels: np.ndarray, num_classes: int, ddp: Distributed,
                  generator: torch.Generator) -> EpochSampler:
    """The order training images are drawn in: class-balanced (``class_weighting: sampler``),
    sharded across processes under DDP, else a seeded shuffle; ``generator`` is its RNG."""
    if cfg.class_weighting == "sampler":
        if ddp.world_size > 1:
            raise ValueError("train.class_weighting: 'sampler' is not supported with several processes; use 'loss'")
        sample_weights = class_weights(labels, num_classes)[torch.tensor(labels)]
        return EpochSampler(WeightedRandomSampler(sample_weights.double(), len(labels), generator=generator))
    if ddp.world_size > 1:
        return EpochSampler(DistributedSampler(dataset, ddp.world_size, ddp.rank, shuffle=True, seed=cfg.seed))
    return EpochSampler(RandomSampler(dataset, generator=generator))


def make_loader(dataset: Dataset, cfg: TrainParams, device: torch.device,
                sampler: EpochSampler | None = None, workers: int = 0) -> DataLoader:
    """Batches of ``dataset`` in ``sampler`` order (in dataset order without one), pinned on CUDA,
    decoded by ``workers`` loader processes (``runtime.train_workers``; 0 = the main process)."""
    return DataLoader(
        dataset,
        sampler=sampler,
        shuffle=False,
        batch_size=cfg.batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        # Worker seeds come from the loader's own generator, not the global RNG, so the global
        # stream (dropout, drop-connect) is the same whether or not a run was resumed.
        generator=torch.Generator().manual_seed(cfg.seed + 1),
    )


def build_model(cfg: TrainParams, num_classes: int, device: torch.device) -> Classifier:
    """The classifier on ``device`` in channels-last layout (faster convolutions on CUDA, and
    1.5x on CPU for EfficientNet)."""
    model = build_classifier(cfg.model, num_classes, cfg.image_size, is_pretrained(cfg), cfg.weights_path)
    return model.to(device, memory_format=torch.channels_last)


def wrap_model(model: Classifier, cfg: TrainParams, ddp: Distributed, device: torch.device,
               compiled: bool = False, backend: str = "inductor") -> nn.Module:
    """What the training step calls: ``model`` under DDP when several processes train it,
    compiled by ``backend`` when ``compiled`` (``runtime.compile``) asks; ``model`` itself otherwise."""
    net: nn.Module = model
    if ddp.world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=frozen_epochs(cfg) > 0)
    return torch.compile(net, backend=backend) if compiled else net


def build_loss(cfg: TrainParams, labels: np.ndarray, num_classes: int, device: torch.device) -> nn.Module:
    """Cross-entropy with label smoothing, weighted by inverse class frequency when
    ``class_weighting: loss``."""
    weights = class_weights(labels, num_classes).to(device) if cfg.class_weighting == "loss" else None
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)


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


def build_optimizer(model: Classifier, cfg: TrainParams) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`; a pretrained backbone learns at ``backbone_lr_factor``."""
    factor = cfg.backbone_lr_factor if is_pretrained(cfg) else 1.0
    return torch.optim.AdamW(parameter_groups(model, cfg.model, cfg.lr, factor, cfg.weight_decay), lr=cfg.lr)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay towards 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainParams,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step :func:`warmup_cosine` over ``train.epochs`` epochs."""
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = max(1, round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps))


def set_backbone_trainable(model: nn.Module, model_name: str, trainable: bool) -> None:
    """Freeze or unfreeze everything but the head."""
    head_ids = {id(p) for p in head_parameters(model, model_name)}
    for param in model.parameters():
        if id(param) not in head_ids:
            param.requires_grad_(trainable)


def freeze_norm_statistics(model: nn.Module, everywhere: bool = False) -> None:
    """Keep frozen BatchNorm layers (``everywhere``: all of them) on their ImageNet statistics: in
    eval mode they normalise with the stored statistics, never with the batch's."""
    for module in model.modules():
        if isinstance(module, _BatchNorm) and (everywhere or not module.weight.requires_grad):
            module.eval()


def train_step(net: nn.Module, images: torch.Tensor, targets: torch.Tensor, loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer, device: torch.device, grad_clip: float,
               precision: str = "auto") -> torch.Tensor:
    """One optimisation step on a batch of uint8 images (copied to ``device`` without blocking,
    channels-last, autocast at ``precision``: bf16 on CUDA by default, see
    :func:`pipeline.inference.autocast_dtype`); returns the batch loss as a detached tensor, left
    on the device so the step never waits for the GPU."""
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    targets = targets.to(device, non_blocking=True)
    with autocast(device, precision):
        loss = loss_fn(net(images).float(), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


def train_one_epoch(net: nn.Module, loader: DataLoader, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device,
                    grad_clip: float) -> float:
    """Mean training loss over one pass of ``loader``, stepping the schedule after every batch.
    The loss is summed on the device and read once, at the end of the epoch."""
    total_loss: torch.Tensor | float = 0.0
    seen = 0
    for images, targets in loader:
        loss = train_step(net, images, targets, loss_fn, optimizer, device, grad_clip)
        scheduler.step()
        total_loss = total_loss + loss * len(targets)
        seen += len(targets)
    return float(total_loss) / max(1, seen)


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


@dataclass
class TrainState:
    """Everything a run restores to carry on exactly where it stopped, saved and loaded as one.

    The live model, optimiser, schedule and sampler generator are held by reference: :meth:`save`
    writes their state with the global torch RNG and the counters, :meth:`load` puts all of it
    back. ``fingerprint`` names what the run trains on (params, data, policy) with a digest each;
    a checkpoint is resumed only when every digest matches.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler_rng: torch.Generator
    fingerprint: dict[str, str]
    epoch: int = 0  # epochs completed
    best_score: float = -1.0
    best_epoch: int = -1
    stale: int = 0  # epochs since the best one
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None

    def update(self, record: dict[str, float]) -> bool:
        """Count one finished epoch (``record`` is its history row); True when its val macro-F1
        is the best so far."""
        self.history.append(record)
        self.epoch = int(record["epoch"])
        if record["val_macro_f1"] > self.best_score:
            self.best_score, self.best_epoch, self.stale = record["val_macro_f1"], self.epoch, 0
            return True
        self.stale += 1
        return False

    def changes_from(self, saved_fingerprint: Any) -> list[str]:
        """What differs between this run and a checkpoint saved with ``saved_fingerprint``."""
        if not isinstance(saved_fingerprint, dict):
            return ["checkpoint format"]
        return [name for name, digest in self.fingerprint.items() if saved_fingerprint.get(name) != digest]

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, numbers and strings only, so :func:`torch.load` reads it with ``weights_only``."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "sampler_rng": self.sampler_rng.get_state(),
            "fingerprint": self.fingerprint,
            "epoch": self.epoch,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "stale": self.stale,
            "history": self.history,
            "run_id": self.run_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, the global torch RNG included."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.sampler_rng.set_state(state["sampler_rng"])
        self.fingerprint = dict(state["fingerprint"])
        self.epoch, self.best_score, self.best_epoch = state["epoch"], state["best_score"], state["best_epoch"]
        self.stale, self.history, self.run_id = state["stale"], list(state["history"]), state["run_id"] or None

    def save(self, path: Path) -> None:
        """Write the state atomically: a kill leaves the previous checkpoint or this one."""
        save_checkpoint(path, self.state_dict())


def save_checkpoint(path: Path, obj: Any) -> None:
    """``torch.save`` atomically: a kill leaves the previous file at ``path`` or this one."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` (weights only: nothing is unpickled)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def train_and_validate(epoch: int, cfg: TrainParams, model: Classifier, net: nn.Module,
                       optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                       sampler: EpochSampler,
                       train_loader: DataLoader, val_loader: DataLoader, loss_fn: nn.Module, device: torch.device,
                       num_classes: int) -> dict[str, float]:
    """Train epoch ``epoch`` (0-based; the backbone stays frozen, with its BatchNorm statistics, for
    the first ``freeze_epochs`` of a pretrained run), validate, and return the epoch's history row."""
    started = time.perf_counter()
    frozen = epoch < frozen_epochs(cfg)
    set_backbone_trainable(model, cfg.model, not frozen)
    net.train()
    if frozen or cfg.batch_norm == "frozen":
        freeze_norm_statistics(model, everywhere=cfg.batch_norm == "frozen")
    sampler.set_epoch(epoch)
    try:
        train_loss = train_one_epoch(net, train_loader, loss_fn, optimizer, scheduler, device, cfg.grad_clip)
    except torch.cuda.OutOfMemoryError:
        half = max(1, cfg.batch_size // 2)
        raise RuntimeError(f"GPU out of memory at batch size {cfg.batch_size} with {cfg.model} at {cfg.image_size}px; "
                           f"try train.batch_size: {half} (e.g. dvc exp run -S train.batch_size={half})") from None
    val = evaluate_split(model, val_loader, device, num_classes, nn.CrossEntropyLoss())
    return {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "val_macro_f1": val["macro_f1"],
        "lr": max(group["lr"] for group in optimizer.param_groups),
        "seconds": time.perf_counter() - started,
    }


@dataclass
class Fitted:
    """A network trained in memory by :func:`fit`: the best weights by val macro-F1 and their story."""

    model: Classifier
    history: list[dict[str, float]]
    best_epoch: int
    best_val_macro_f1: float
    temperature: float


def fit(cfg: TrainParams, num_classes: int, processed_dir: Path, train: Split, val: Split, policy: A.Compose | None,
        device: torch.device, *, model: Classifier | None = None, progress: str = "",
        runtime: RuntimeParams | None = None) -> Fitted:
    """Train on ``train`` and keep the weights that score best on ``val`` (macro-F1), then fit the
    temperature on ``val``: the train stage's recipe without checkpoints or tracking, for the runs
    that other stages make (one per left-out site, a few-shot adaptation). ``model`` continues from
    given weights (fine-tuning) instead of building the network afresh. ``progress`` names the run
    in a line printed per epoch; empty = silent. ``runtime`` gives the loader processes and compilation."""
    runtime = runtime or RuntimeParams()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_classes, device) if model is None else model.to(device)
    train_set = ProcessedImages(processed_dir, train, cfg.image_size, policy, cfg.seed)
    sampler = train_sampler(cfg, train_set, train.labels, num_classes, Distributed(),
                            torch.Generator().manual_seed(cfg.seed))
    train_loader = make_loader(train_set, cfg, device, sampler, runtime.train_workers)
    val_loader = make_loader(ProcessedImages(processed_dir, val, cfg.image_size), cfg, device,
                             workers=runtime.train_workers)
    loss_fn = build_loss(cfg, train.labels, num_classes, device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(train_loader))
    net = wrap_model(model, cfg, Distributed(), device, runtime.compile)
    history: list[dict[str, float]] = []
    best_state, best_epoch, best_score = None, -1, -1.0
    for epoch in range(cfg.epochs):
        record = train_and_validate(epoch, cfg, model, net, optimizer, scheduler, sampler, train_loader, val_loader,
                                    loss_fn, device, num_classes)
        history.append(record)
        if record["val_macro_f1"] > best_score:
            best_score, best_epoch = record["val_macro_f1"], epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if progress:
            print(f"{progress}: epoch {epoch + 1}/{cfg.epochs} train_loss {record['train_loss']:.4f} "
                  f"val_macro_f1 {record['val_macro_f1']:.4f} ({record['seconds']:.1f}s)", flush=True)
    model.load_state_dict(best_state)
    model.eval()
    temperature = fit_temperature(*predict_logits(model, val_loader, device))
    return Fitted(model, history, best_epoch, best_score, temperature)


def model_meta(params: Params, best_epoch: int, best_score: float, temperature: float | None,
               run_id: str | None = None, preprocessing: Preprocessing | None = None) -> ModelMeta:
    """The metadata saved with trained weights: how to rebuild and feed the network (``preprocessing``,
    what the normalize stage recorded of the images trained on, else ``params.normalize``), its score,
    its calibration and the run that made it."""
    cfg = params.train
    backbone = get_backbone(cfg.model)
    preprocessing = preprocessing or Preprocessing(params.normalize)
    return ModelMeta(model=cfg.model, classes=tuple(params.data.classes), image_size=cfg.image_size,
                     mean=backbone.mean, std=backbone.std, normalize=preprocessing.normalize,
                     pretrained=cfg.pretrained, best_epoch=best_epoch, best_val_macro_f1=best_score,
                     temperature=temperature, run_id=run_id, stain_reference=preprocessing.stain_reference,
                     pixel_sizes=dict(preprocessing.pixel_sizes))
