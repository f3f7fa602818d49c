"""What runs the trained model on prepared images (``predict.engine``): ``torch`` or ``onnx``.

- ``torch`` runs the network itself, on the GPU when there is one (bf16 autocast, channels-last)
  and in fp32 on the CPU; probabilities are the softmax of the logits over the fitted temperature.
- ``onnx`` runs the export of :mod:`pipeline.export` (temperature built in, probabilities checked
  against PyTorch within its tolerance, 1e-4, when it is made) with ONNX Runtime on the CPU: all
  graph optimisations, as many intra-op threads as torch uses. For labs without a GPU: on CPU it
  runs several times faster than torch (``benchmarks/predict_throughput.py``).

An export takes seconds to tens of seconds, so it is made once per model file and kept in
``$XDG_CACHE_HOME/wbc-pipeline/onnx/`` (``~/.cache/...`` when unset), in a folder named after the
model file's SHA-256 and the torch version that exported it; where that cannot be written, the
export lives in a temporary folder for the process.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from filelock import FileLock

from pipeline import __version__
from pipeline.atomic import atomic_dir
from pipeline.calibration import softmax
from pipeline.config import PredictParams
from pipeline.export import INPUT_NAME, META_FILE, ONNX_FILE, ExportError, run_export
from pipeline.inference import batch_logits, load_meta, load_model, pick_device
from pipeline.model_meta import ModelMeta
from pipeline.models import Classifier
from pipeline.processed import file_sha256

CACHE_FOLDER = "wbc-pipeline"


class Engine(Protocol):
    """Calibrated class probabilities of batches of prepared images."""

    name: str
    device: torch.device

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """N x C probabilities of N uint8 images (NCHW, RGB, values 0..255, the model's input size)."""


@dataclass
class TorchEngine:
    """The PyTorch network on ``device``: bf16 autocast on CUDA, fp32 on the CPU."""

    model: Classifier
    temperature: float
    device: torch.device
    name: str = "torch"

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """Softmax of the logits over the temperature."""
        return softmax(batch_logits(self.model, images, self.device).numpy(), self.temperature)


class OnnxEngine:
    """The parity-checked ONNX export run by ONNX Runtime on the CPU; ``parity`` holds the check's
    figures from ``model.json``."""

    name = "onnx"
    device = torch.device("cpu")

    def __init__(self, onnx_file: Path, threads: int):
        import onnxruntime as ort  # only labs that choose this engine load ONNX Runtime

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning: the loader processes decoding the next batch need those
        # cycles (measured on 2 shared cores: 1.4x faster forward-only and end to end).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        self.parity: dict[str, Any] = json.loads((onnx_file.parent / META_FILE).read_text(encoding="utf-8"))["parity"]

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """The graph's own ``probabilities`` output (softmax of logits over the temperature)."""
        (probabilities,) = self.session.run(["probabilities"], {INPUT_NAME: images.numpy()})
        return probabilities


def cache_root() -> Path:
    """The folder exports are cached in: ``$XDG_CACHE_HOME/wbc-pipeline/onnx`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / CACHE_FOLDER / "onnx"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def onnx_engine(model_path: Path, threads: int) -> OnnxEngine:
    """An :class:`OnnxEngine` for ``model_path``: exported and parity-checked on first use, read from
    the cache after; :class:`pipeline.export.ExportError` when the export does not reproduce PyTorch."""
    root = cache_root()
    folder = root / f"{file_sha256(model_path)[:32]}-wbc{__version__}-torch{torch.__version__}"
    if not _writable(root):  # a read-only home (a container): this process exports for itself
        with tempfile.TemporaryDirectory(prefix="wbc-onnx-") as tmp:
            run_export(model_path, Path(tmp), ("onnx",))
            return OnnxEngine(Path(tmp) / ONNX_FILE, threads)
    with FileLock(str(folder) + ".lock"):  # server workers starting together export once
        if not (folder / META_FILE).is_file():
            with atomic_dir(folder) as building:
                run_export(model_path, building, ("onnx",))
    return OnnxEngine(folder / ONNX_FILE, threads)


def load_engine(model_path: Path, settings: PredictParams) -> tuple[Engine, ModelMeta]:
    """The engine ``settings.engine`` names for ``model_path`` (saved by the train stage), and the
    model's metadata. ``auto``: ONNX Runtime where the model would run on the CPU (the export made once
    per model file, falling back to torch with a warning when it fails its parity check), torch on a GPU."""
    if settings.engine == "onnx" and settings.device == "cuda":
        raise ValueError("predict.engine 'onnx' runs on the CPU; use predict.engine 'torch' or 'auto' for "
                         "predict.device 'cuda', or predict.device 'auto' or 'cpu'")
    device = pick_device(settings.device)
    if settings.engine == "onnx" or (settings.engine == "auto" and device.type == "cpu"):
        meta = load_meta(model_path)
        try:
            return onnx_engine(model_path, torch.get_num_threads()), meta
        except ExportError as exc:
            if settings.engine == "onnx":
                raise
            warnings.warn(f"predict.engine auto: the ONNX export of {model_path} failed ({exc}); running it with "
                          "torch instead", stacklevel=2)
    model, meta = load_model(model_path, device)
    return TorchEngine(model, meta.temperature_or_one, device), meta
