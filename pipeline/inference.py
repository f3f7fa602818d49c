"""Loading a trained model and running it over batches: the one path shared by evaluation,
prediction and export."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.model_meta import ModelMeta
from pipeline.models import Classifier, build_classifier

PRECISIONS = ("auto", "bf16", "fp32")


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """CUDA when requested or available (``auto``), else CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype autocast computes in on ``device``, or None for full fp32 precision.

    ``auto`` is bf16 on CUDA and fp32 on the CPU (where bf16 is slower on most cores); ``bf16``
    and ``fp32`` force one on any device, so the CUDA path can be rehearsed on a CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, precision: str = "auto") -> AbstractContextManager:
    """Autocast at :func:`autocast_dtype`: bf16 on CUDA, none on the CPU unless ``precision`` says so."""
    dtype = autocast_dtype(device, precision)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def save_model(path: Path, model: Classifier, meta: ModelMeta) -> None:
    """Write weights and the metadata needed to rebuild and feed the model, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "meta": meta.to_dict()}, tmp)
    tmp.replace(path)


def _read_saved(path: Path) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: trained model not found; run `wbc train` (or `dvc repro`) first")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_meta(path: Path) -> ModelMeta:
    """The metadata of a model saved by :func:`save_model`, without building its network."""
    return ModelMeta.from_dict(_read_saved(path).get("meta"), source=str(path))


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[Classifier, ModelMeta]:
    """Rebuild a model saved by :func:`save_model` (weights only: nothing is unpickled)."""
    checkpoint = _read_saved(path)
    meta = ModelMeta.from_dict(checkpoint.get("meta"), source=str(path))
    model = build_classifier(meta.model, len(meta.classes), meta.image_size, pretrained=False)
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device, memory_format=torch.channels_last).eval(), meta


@torch.no_grad()
def batch_logits(model: torch.nn.Module, images: torch.Tensor, device: torch.device,
                 precision: str = "auto") -> torch.Tensor:
    """Float32 logits (on the CPU) of one batch of uint8 NCHW images, computed at ``precision``
    (:func:`autocast_dtype`); ``model`` must be in eval mode."""
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with autocast(device, precision):
        out = model(images)
    return out.float().cpu()


@torch.no_grad()
def predict_logits(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32, N x C) and labels (N) over ``loader``, in loader order."""
    model.eval()
    logits, labels = [], []
    for images, targets in loader:
        logits.append(batch_logits(model, images, device))
        labels.append(targets)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()
