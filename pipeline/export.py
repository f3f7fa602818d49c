"""``wbc export``: the trained model as ONNX and/or TorchScript, checked against PyTorch.

The exported graph is :class:`ExportedClassifier`: the Classifier with its built-in mean/std
scaling, plus the temperature fitted on the validation split. It takes raw pixels, NCHW at the
model's ``image_size`` (uint8 for ONNX; uint8 or float 0..255 for TorchScript), any batch size,
and returns ``logits`` and calibrated ``probabilities`` (softmax of logits / temperature).
What the graph does not do (decoding a file, framing the cell, squaring it with the normalize
params, standardising its colour to the saved reference, resizing) is written to ``model.json``
beside it, reference values and pixel sizes included; ``wbc predict`` does exactly those steps.

Each export is run on a batch of inputs and compared with PyTorch in fp32; the largest absolute
differences of logits and probabilities go into ``model.json``. Probabilities must agree within
the tolerance (1e-4), logits within the tolerance times their largest magnitude when that is
above 1 (fp32 rounding grows with the numbers).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import IngestParams
from pipeline.inference import load_model
from pipeline.inputs import ImageInput, RejectedInput, input_checks, model_preprocessing, prepare_input
from pipeline.model_meta import ModelMeta
from pipeline.models import Classifier

FORMATS = ("onnx", "torchscript")
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
META_FILE = "model.json"
TOLERANCE = 1e-4
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities")


class ExportError(RuntimeError):
    """An export failed or does not reproduce the PyTorch model."""


class ExportedClassifier(nn.Module):
    """Classifier (input scaling included) returning logits and calibrated probabilities."""

    def __init__(self, classifier: Classifier, temperature: float):
        super().__init__()
        self.classifier = classifier
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.classifier(images)
        return logits, torch.softmax(logits / self.temperature, dim=1)


def parity_batch(meta: ModelMeta, n: int = 8, seed: int = 0, images: list[Path] | None = None) -> np.ndarray:
    """An (n, 3, size, size) uint8 batch at the model's input size: image files prepared exactly
    as ``wbc predict`` prepares them when ``images`` are given, else seeded uniform noise."""
    size = meta.image_size
    if not images:
        return np.random.default_rng(seed).integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)
    checks = input_checks(IngestParams())
    preprocessing = model_preprocessing(meta)
    batch = []
    for path in images:
        try:
            item = ImageInput(str(path), str(path))
            batch.append(prepare_input(item, checks, preprocessing, size))
        except RejectedInput as exc:
            raise ValueError(f"{path}: cannot be used for the parity check: {exc}") from None
    return np.stack(batch)


def preprocessing_steps(meta: ModelMeta) -> list[str]:
    """What is done to an image file before the exported graph sees it, step by step, with the values
    of this model (``wbc predict`` runs exactly these, :func:`pipeline.preprocess.square_image`)."""
    params = meta.normalize
    steps = ["decode the image file to RGB (EXIF orientation applied; a JPEG at 1/2, 1/4 or 1/8 of its size when "
             "that is still at least normalize.size on the side normalize.mode fits, and framing is none)"]
    if params.framing != "none":
        ruler = {"red-cell": "the square spans normalize.field_um micrometres, the pixel size measured from the "
                             "image's red cells (7.5 µm across)",
                 "pixel-size": f"the square spans normalize.field_um micrometres at the pixel size in pixel_sizes "
                               f"({', '.join(f'{um:g}' for um in sorted(set(meta.pixel_sizes.values())))} µm/px)",
                 "nucleus": "the nucleus spans normalize.nucleus_fraction of the square's side"}[params.framing]
        steps.append(f"frame the white cell (normalize.framing {params.framing}): centre a square on its nucleus, "
                     f"{ruler}; no cell found = no prediction")
    steps.append("bring it to a normalize.size square with normalize.mode and normalize.pad_color (area filter "
                 "when shrinking, cubic when enlarging)")
    if meta.stain_reference is not None:
        steps.append(f"standardise its colour to stain_reference ({meta.stain_reference.method}, fitted on "
                     f"{meta.stain_reference.n_images} training images)")
    steps.append("resize to image_size (area filter when shrinking)")
    return steps


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def export_onnx(module: ExportedClassifier, example: torch.Tensor, path: Path, opset: int | None = None) -> None:
    """Write ``module`` as ONNX with a dynamic batch dimension (torch.export-based exporter)."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)  # "torchvision is not installed" notes: irrelevant here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                module, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"images": {0: batch}}, dynamo=True, opset_version=opset, verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; name the model and the step
        raise ExportError(f"ONNX export to {path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        registration_log.setLevel(level)


def export_torchscript(module: ExportedClassifier, example: torch.Tensor, path: Path) -> None:
    """Write ``module`` as TorchScript (traced; the input may be uint8 or float 0..255)."""
    with warnings.catch_warnings():
        # PyTorch marks TorchScript deprecated in favour of torch.export; the format still loads
        # with torch.jit.load and in LibTorch (C++), which is what it is exported for.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated")
        traced = torch.jit.trace(module, example, check_trace=False)
    traced.save(str(path))


def onnx_outputs(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run the ONNX file on ``images`` with onnxruntime (CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, probabilities = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
    return logits, probabilities


def torchscript_outputs(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run the TorchScript file on ``images``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated")
        module = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.no_grad():
        logits, probabilities = module(torch.from_numpy(images))
    return logits.numpy(), probabilities.numpy()


def run_export(model_path: Path, out_dir: Path, formats: tuple[str, ...] = FORMATS,
               parity_images: list[Path] | None = None, tolerance: float = TOLERANCE,
               opset: int | None = None) -> dict[str, Any]:
    """Export ``model_path`` in ``formats`` to ``out_dir``, check each against PyTorch and
    write ``model.json``; raise :class:`ExportError` when a difference exceeds ``tolerance``."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ValueError(f"export formats must be among {', '.join(FORMATS)}, got {', '.join(formats) or 'none'}")
    classifier, meta = load_model(model_path, "cpu")
    classifier = classifier.to(memory_format=torch.contiguous_format).float().eval()
    temperature = meta.temperature_or_one
    module = ExportedClassifier(classifier, temperature).eval()
    size = meta.image_size
    out_dir.mkdir(parents=True, exist_ok=True)

    example = torch.from_numpy(parity_batch(meta, n=2, seed=1))
    images = parity_batch(meta, images=parity_images)
    if len(images) == len(example):  # check another batch size than the traced one
        images = np.concatenate([images, images[:1]])
    with torch.no_grad():
        reference = [t.numpy() for t in module(torch.from_numpy(images))]
    # fp32 rounding grows with the size of the numbers: logits are held to the tolerance relative
    # to their largest magnitude (when above 1), probabilities (in 0..1) to the tolerance itself.
    logit_scale = max(1.0, float(np.abs(reference[0]).max()))
    logit_tolerance = tolerance * logit_scale

    runners = {"onnx": (ONNX_FILE, export_onnx, onnx_outputs),
               "torchscript": (TORCHSCRIPT_FILE, export_torchscript, torchscript_outputs)}
    exports: dict[str, Any] = {}
    for name in formats:
        filename, export, run = runners[name]
        path = out_dir / filename
        if name == "onnx":
            export(module, example, path, opset)
        else:
            export(module, example, path)
        logits, probabilities = run(path, images)
        exports[name] = {
            "file": filename,
            "max_abs_diff_logits": _max_diff(logits, reference[0]),
            "max_abs_diff_probabilities": _max_diff(probabilities, reference[1]),
        }

    document = {
        "source_model": str(model_path),
        "model": meta.model,
        "classes": list(meta.classes),
        "image_size": size,
        "temperature": temperature,
        "calibrated": meta.calibrated,
        "normalize": meta.normalize.model_dump(mode="json"),
        "stain_reference": None if meta.stain_reference is None else meta.stain_reference.to_dict(),
        "pixel_sizes": dict(meta.pixel_sizes),
        "mean": list(meta.mean),
        "std": list(meta.std),
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, size, size],
            "layout": "NCHW, RGB",
            "dtype": "uint8 (ONNX); uint8 or float32 with values 0..255 (TorchScript)",
            "scaling": "built in: (x - mean*255) / (std*255) per channel",
            "preprocessing": preprocessing_steps(meta),
        },
        "outputs": {"logits": ["batch", len(meta.classes)],
                    "probabilities": "softmax(logits / temperature), temperature fitted on the validation split"
                    if meta.calibrated else "softmax(logits): the model has no fitted temperature"},
        "parity": {
            "reference": "PyTorch fp32 on CPU",
            "inputs": f"{len(images)} {'images' if parity_images else 'random uint8 images'}",
            "tolerance": tolerance,
            "tolerance_logits": logit_tolerance,
            **{name: {k: v for k, v in entry.items() if k != "file"} for name, entry in exports.items()},
        },
        "files": {name: entry["file"] for name, entry in exports.items()},
        "torch_version": torch.__version__,
        "run_id": meta.run_id,
    }
    (out_dir / META_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    failed = [
        f"{name}: probabilities differ by up to {entry['max_abs_diff_probabilities']:.3g}, logits by up to "
        f"{entry['max_abs_diff_logits']:.3g} (allowed {logit_tolerance:.3g} at logits up to {logit_scale:.3g})"
        for name, entry in exports.items()
        if not (entry["max_abs_diff_probabilities"] <= tolerance and entry["max_abs_diff_logits"] <= logit_tolerance)
    ]
    if failed:
        raise ExportError(f"exported model differs from PyTorch beyond the tolerance {tolerance:g}: "
                          + "; ".join(failed) + f" (files kept in {out_dir} for inspection)")
    return {"out_dir": str(out_dir), "exports": exports, "meta_file": str(out_dir / META_FILE),
            "images": len(images), "tolerance": tolerance}
