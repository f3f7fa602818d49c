"""Loading a trained model and running it over batches: the one path shared by evaluation,
prediction and export."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.model_meta import ModelMeta
from pipeline.models import Classifier, build_classifier


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """CUDA when requested or available (``auto``), else CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision on CPU (where bf16 is slower on most cores)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def save_model(path: Path, model: Classifier, meta: ModelMeta) -> None:
    """Write weights and the metadata needed to rebuild and feed the model, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "meta": meta.to_dict()}, tmp)
    tmp.replace(path)


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[Classifier, ModelMeta]:
    """Rebuild a model saved by :func:`save_model` (weights only: nothing is unpickled)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: trained model not found; run `wbc train` (or `dvc repro`) first")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    meta = ModelMeta.from_dict(checkpoint.get("meta"), source=str(path))
    model = build_classifier(meta.model, len(meta.classes), meta.image_size, pretrained=False)
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device, memory_format=torch.channels_last).eval(), meta


@torch.no_grad()
def batch_logits(model: torch.nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Float32 logits (on the CPU) of one batch of uint8 NCHW images; ``model`` must be in eval mode."""
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with autocast(device):
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
