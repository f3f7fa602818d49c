"""Prediction on new images: ``wbc predict`` and the served MLflow model share this one path.

Each input (an image file, or the base64-encoded bytes of one) is

1. checked the way ingest checks raw files (:func:`pipeline.inspection.inspect_bytes`: the same
   reason codes, ``truncated``, ``not-an-image``, ``too-small``…, with ``params.ingest``'s limits),
2. decoded the way the normalize stage decodes (:func:`pipeline.imaging.decode_rgb`),
3. squared with the normalize params saved in the model and resized to the model's input size
   exactly like the training data (:func:`pipeline.imaging.model_pixels`),
4. fed to the model as raw 0..255 uint8 NCHW (the model scales its input itself), in batches,
   on the GPU when there is one,
5. turned into calibrated probabilities: logits divided by the temperature fitted on the
   validation split by the train stage.

A file that fails a check becomes one output row with its reason; it never stops the batch.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.calibration import softmax
from pipeline.config import IngestParams, Params, PredictParams
from pipeline.imaging import ImageReadError, decode_rgb, model_pixels, to_chw
from pipeline.inference import batch_logits, load_model, pick_device
from pipeline.inspection import inspect_bytes
from pipeline.model_meta import ModelMeta
from pipeline.models import Classifier
from pipeline.sources import walk_files

# A row's status: OK, or a reason code of pipeline.inspection.REASON_MEANINGS (predict's own included).
OK = "ok"
MANIFEST_SUFFIX = ".csv"


@dataclass(frozen=True)
class ImageInput:
    """One image to classify: a file ``path``, or ``image_b64``, the base64-encoded bytes of an
    image file (a ``data:image/...;base64,`` prefix is allowed). ``name`` labels the output row."""

    name: str
    path: str | None = None
    image_b64: str | bytes | None = None


class RejectedInput(Exception):
    """An input that cannot be classified; ``reason`` is a short code, ``detail`` a sentence."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def input_checks(ingest: IngestParams) -> IngestParams:
    """The ingest limits (formats, minimum side, maximum pixels) without the perceptual hash,
    which only duplicate detection needs."""
    return ingest.model_copy(update={"near_dup_threshold": 0})


def _decode_base64(value: str | bytes) -> bytes:
    if isinstance(value, str) and value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RejectedInput("not-base64", str(exc)) from None


def read_input(item: ImageInput) -> bytes:
    """The bytes of ``item``'s image file; raises :class:`RejectedInput` when there are none."""
    encoded = item.image_b64.strip() if isinstance(item.image_b64, str) else item.image_b64
    if encoded:
        return _decode_base64(encoded)
    if not item.path:
        raise RejectedInput("no-input", "neither a file path nor image bytes were given")
    path = Path(item.path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise RejectedInput("missing-file", f"{path} does not exist") from None
    except IsADirectoryError:
        raise RejectedInput("unreadable", f"{path} is a directory") from None
    except OSError as exc:
        raise RejectedInput("unreadable", exc.strerror or str(exc)) from None


def prepare_input(item: ImageInput, checks: IngestParams, normalize: dict[str, Any], image_size: int) -> np.ndarray:
    """``item`` as the model's input: a 3 x image_size x image_size uint8 array.

    Raises :class:`RejectedInput` with ingest's reason code when the input is not a usable image.
    """
    data = read_input(item)
    found = inspect_bytes(data, checks)
    if found.reason:
        raise RejectedInput(found.reason, found.detail)
    try:
        image = decode_rgb(data, item.name)
    except ImageReadError as exc:
        raise RejectedInput(exc.reason, exc.detail) from None
    return to_chw(model_pixels(image, normalize, image_size))


@dataclass
class _Prepared:
    index: int
    pixels: np.ndarray | None
    reason: str = ""
    detail: str = ""


class _Inputs(Dataset):
    """Prepared inputs in order; decoding runs in the loader's worker processes."""

    def __init__(self, items: Sequence[ImageInput], checks: IngestParams, normalize: dict[str, Any],
                 image_size: int):
        self.items = items
        self.checks = checks
        self.normalize = normalize
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> _Prepared:
        try:
            return _Prepared(index, prepare_input(self.items[index], self.checks, self.normalize, self.image_size))
        except RejectedInput as exc:
            return _Prepared(index, None, exc.reason, exc.detail)


def _as_list(batch: list[_Prepared]) -> list[_Prepared]:
    return batch


class Predictor:
    """A trained model with everything needed to classify new image files."""

    def __init__(self, model: Classifier, meta: ModelMeta, settings: PredictParams, checks: IngestParams,
                 device: torch.device, source: str = "the model"):
        self.model = model.eval()
        self.meta = meta
        self.settings = settings
        self.checks = input_checks(checks)
        self.device = device
        self.classes: list[str] = list(meta.classes)
        self.image_size = meta.image_size
        self.normalize: dict[str, Any] = meta.normalize.model_dump(mode="json")
        self.calibrated = meta.calibrated
        self.temperature = meta.temperature_or_one

    @classmethod
    def load(cls, model_path: str | Path, settings: PredictParams, checks: IngestParams) -> Predictor:
        """Read ``model_path`` (saved by the train stage) onto the device ``settings`` asks for."""
        device = pick_device(settings.device)
        model, meta = load_model(Path(model_path), device)
        return cls(model, meta, settings, checks, device, source=str(model_path))

    @property
    def columns(self) -> list[str]:
        """Output columns, in order."""
        return ["path", "status", "detail", *(f"p_{name}" for name in self.classes), "predicted",
                "top_probability", "uncertain"]

    def _batches(self, items: Sequence[ImageInput]) -> Iterator[list[_Prepared]]:
        dataset = _Inputs(items, self.checks, self.normalize, self.image_size)
        # loader processes only pay off from the second batch on
        workers = min(self.settings.workers, max(0, (len(items) - 1) // self.settings.batch_size))
        loader = DataLoader(dataset, batch_size=self.settings.batch_size, shuffle=False, num_workers=workers,
                            collate_fn=_as_list)
        yield from loader

    def predict(self, items: Sequence[ImageInput], progress: bool = False) -> pd.DataFrame:
        """One row per item, in order: status, calibrated class probabilities, prediction."""
        n, k = len(items), len(self.classes)
        probs = np.full((n, k), np.nan)
        status = [OK] * n
        detail = [""] * n
        bar = tqdm(total=n, desc="predict", unit="img", disable=not progress)
        for batch in self._batches(items):
            ready = [entry for entry in batch if entry.pixels is not None]
            for entry in batch:
                if entry.pixels is None:
                    status[entry.index], detail[entry.index] = entry.reason, entry.detail
            if ready:
                images = torch.from_numpy(np.stack([entry.pixels for entry in ready]))
                logits = batch_logits(self.model, images, self.device).numpy()
                probs[[entry.index for entry in ready]] = softmax(logits, self.temperature)
            bar.update(len(batch))
        bar.close()
        ok = np.array([s == OK for s in status], dtype=bool)
        table = pd.DataFrame({"path": [item.name for item in items], "status": status, "detail": detail})
        for i, name in enumerate(self.classes):
            table[f"p_{name}"] = probs[:, i]
        scores = np.where(ok[:, None], probs, -1.0)
        best, top = scores.argmax(axis=1), np.where(ok, scores.max(axis=1), np.nan)
        table["predicted"] = pd.Series([self.classes[b] if good else None for b, good in zip(best, ok, strict=True)],
                                       dtype="object")
        table["top_probability"] = top
        table["uncertain"] = pd.array([bool(t < self.settings.threshold) if good else None
                                       for t, good in zip(top, ok, strict=True)], dtype="boolean")
        return table[self.columns]


def collect_inputs(paths: Sequence[str | Path]) -> list[ImageInput]:
    """The images named on the command line: files, folders (every file below, recursively, in
    sorted order) and manifest CSVs (a ``path`` column, relative to the CSV's folder)."""
    items: list[ImageInput] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            items += [ImageInput(str(file), str(file)) for file in walk_files(path)]
        elif path.suffix.lower() == MANIFEST_SUFFIX and path.is_file():
            items += _manifest_inputs(path)
        else:  # a missing file is reported in its row, like any other bad input
            items.append(ImageInput(str(path), str(path)))
    return items


def _manifest_inputs(path: Path) -> list[ImageInput]:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable CSV manifest ({exc})") from None
    if "path" not in table.columns:
        raise ValueError(f"{path}: a manifest needs a 'path' column (relative to the CSV's folder); "
                         f"its columns are: {', '.join(map(str, table.columns)) or 'none'}")
    items = []
    for value in table["path"]:
        value = value.strip()
        file = str(path.parent / value) if value else ""
        items.append(ImageInput(file, file))
    return items


def _json_value(value: Any) -> Any:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _json_records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts: missing values become null, numpy scalars plain Python."""
    return [{key: _json_value(value) for key, value in row.items()} for row in table.astype(object).to_dict("records")]


def run_predict(params: Params, inputs: Sequence[str | Path], model_path: Path, out_csv: Path,
                out_json: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Classify ``inputs`` with ``model_path``; write the CSV (and JSON); return a summary."""
    predictor = Predictor.load(model_path, params.predict, params.ingest)
    items = collect_inputs(inputs)
    if not items:
        raise ValueError(f"no files found in {', '.join(map(str, inputs))}")
    started = time.perf_counter()
    table = predictor.predict(items, progress=progress)
    seconds = time.perf_counter() - started
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_csv, index=False)
    ok = table["status"] == OK
    summary: dict[str, Any] = {
        "rows": len(table),
        "ok": int(ok.sum()),
        "rejected": int((~ok).sum()),
        "rejected_by_reason": dict(sorted(Counter(table.loc[~ok, "status"]).items())),
        "uncertain": int(table["uncertain"].fillna(False).sum()),
        "threshold": params.predict.threshold,
        "temperature": predictor.temperature,
        "calibrated": predictor.calibrated,
        "seconds": round(seconds, 3),
        "images_per_second": round(len(table) / seconds, 1) if seconds > 0 else None,
        "device": str(predictor.device),
        "model": str(model_path),
        "csv": str(out_csv),
    }
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        document = {"model": str(model_path), "classes": predictor.classes, "temperature": predictor.temperature,
                    "calibrated": predictor.calibrated, "threshold": params.predict.threshold,
                    "predictions": _json_records(table)}
        out_json.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        summary["json"] = str(out_json)
    return summary
