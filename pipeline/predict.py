"""Prediction on new images: ``wbc predict`` and the served MLflow model share this one path.

Each input (an image file, or the base64-encoded bytes of one) is read within limits, checked from
its header, decoded once by the normalize stage's decoder and brought to the model's input size
exactly like the training data (:mod:`pipeline.inputs`). Loader processes (``predict.workers``)
prepare whole batches, stacked where they are made, while the model runs on the batch before:
decoding overlaps inference. The engine (``predict.engine``, :mod:`pipeline.engines`) turns each
batch of raw 0..255 uint8 NCHW pixels into calibrated probabilities: PyTorch (on the GPU when
there is one) or ONNX Runtime on the CPU, both dividing the logits by the temperature fitted on the
validation split by the train stage.

An input that fails a check becomes one output row with its reason code (the table is
:data:`pipeline.inspection.REASON_MEANINGS`) and a sentence that names sizes, formats and limits,
never the input's content; it never stops the batch.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.config import IngestParams, Params, PredictParams
from pipeline.engines import Engine, load_engine
from pipeline.inputs import ImageInput, InputLimits, RejectedInput, input_checks, model_preprocessing, prepare_input
from pipeline.model_meta import ModelMeta
from pipeline.preprocess import Preprocessing
from pipeline.registry import local_model_file
from pipeline.sources import walk_files

# A row's status: OK, or a reason code of pipeline.inspection.REASON_MEANINGS (predict's own included).
OK = "ok"
MANIFEST_SUFFIX = ".csv"


@dataclass
class _Batch:
    """Consecutive inputs, prepared: the pixels of those that passed (one uint8 N x 3 x H x W
    tensor, rows in ``indices`` order) and a (index, reason, detail) triple for each one refused."""

    indices: list[int] = field(default_factory=list)
    pixels: torch.Tensor | None = None
    rejected: list[tuple[int, str, str]] = field(default_factory=list)

    def pin_memory(self) -> _Batch:
        """The batch with its pixels in page-locked memory (the loader calls this on CUDA)."""
        pixels = None if self.pixels is None else self.pixels.pin_memory()
        return _Batch(self.indices, pixels, self.rejected)


class _Inputs(Dataset):
    """Inputs in order, each prepared (or refused) by :func:`pipeline.inputs.prepare_input`."""

    def __init__(self, items: Sequence[ImageInput], checks: InputLimits, preprocessing: Preprocessing,
                 image_size: int):
        self.items = items
        self.checks = checks
        self.preprocessing = preprocessing
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | RejectedInput]:
        try:
            return index, prepare_input(self.items[index], self.checks, self.preprocessing, self.image_size)
        except RejectedInput as exc:
            return index, exc


def _collate(prepared: list[tuple[int, np.ndarray | RejectedInput]]) -> _Batch:
    """One :class:`_Batch`, stacked in the loader process that prepared it, so the main process
    receives one tensor per batch (through shared memory) and spends its time running the model."""
    batch = _Batch()
    ready = []
    for index, result in prepared:
        if isinstance(result, RejectedInput):
            batch.rejected.append((index, result.reason, result.detail))
        else:
            batch.indices.append(index)
            ready.append(result)
    if ready:
        batch.pixels = torch.from_numpy(np.stack(ready))
    return batch


class Predictor:
    """A trained model with everything needed to classify new image files.

    ``read_paths=False`` (the served model without ``predict.serve_path_root``) refuses every
    input given as a file path."""

    def __init__(self, engine: Engine, meta: ModelMeta, settings: PredictParams, checks: IngestParams,
                 read_paths: bool = True):
        self.engine = engine
        self.meta = meta
        self.settings = settings
        self.checks = input_checks(checks, settings, read_paths)
        self.classes: list[str] = list(meta.classes)
        self.image_size = meta.image_size
        # the normalize params, stain reference and pixel size the training images were prepared with
        self.preprocessing = model_preprocessing(meta)
        self.calibrated = meta.calibrated
        self.temperature = meta.temperature_or_one

    @classmethod
    def load(cls, model_path: str | Path, settings: PredictParams, checks: IngestParams,
             read_paths: bool = True) -> Predictor:
        """Read ``model_path`` (saved by the train stage) into the engine and onto the device
        ``settings`` ask for."""
        engine, meta = load_engine(Path(model_path), settings)
        return cls(engine, meta, settings, checks, read_paths=read_paths)

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self.engine.device

    @property
    def columns(self) -> list[str]:
        """Output columns, in order."""
        return ["path", "status", "detail", *(f"p_{name}" for name in self.classes), "predicted",
                "top_probability", "uncertain"]

    def _batches(self, items: Sequence[ImageInput]) -> Iterator[_Batch]:
        dataset = _Inputs(items, self.checks, self.preprocessing, self.image_size)
        # loader processes only pay off from the second batch on
        workers = min(self.settings.workers, max(0, (len(items) - 1) // self.settings.batch_size))
        loader = DataLoader(dataset, batch_size=self.settings.batch_size, shuffle=False, num_workers=workers,
                            collate_fn=_collate, pin_memory=self.device.type == "cuda")
        yield from loader

    def refused(self, names: Sequence[str], reason: str, detail: str) -> pd.DataFrame:
        """The output table for ``names`` when every one is refused with ``reason`` unread."""
        n = len(names)
        return self._table(names, np.full((n, len(self.classes)), np.nan), [reason] * n, [detail] * n)

    def predict(self, items: Sequence[ImageInput], progress: bool = False) -> pd.DataFrame:
        """One row per item, in order: status, calibrated class probabilities, prediction."""
        n, k = len(items), len(self.classes)
        probs = np.full((n, k), np.nan)
        status = [OK] * n
        detail = [""] * n
        bar = tqdm(total=n, desc="predict", unit="img", disable=not progress)
        for batch in self._batches(items):
            for index, reason, why in batch.rejected:
                status[index], detail[index] = reason, why
            if batch.pixels is not None:
                probs[batch.indices] = self.engine.probabilities(batch.pixels)
            bar.update(len(batch.indices) + len(batch.rejected))
        bar.close()
        return self._table([item.name for item in items], probs, status, detail)

    def _table(self, names: Sequence[str], probs: np.ndarray, status: list[str], detail: list[str]) -> pd.DataFrame:
        ok = np.array([s == OK for s in status], dtype=bool)
        table = pd.DataFrame({"path": list(names), "status": status, "detail": detail})
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


def collect_inputs(paths: Sequence[str | Path], manifest_root: str | None = None) -> list[ImageInput]:
    """The images named on the command line: files, folders (every file below, recursively, in
    sorted order) and manifest CSVs (a ``path`` column, relative to the CSV's folder; each file
    must resolve under ``manifest_root``, by default the CSV's own folder)."""
    items: list[ImageInput] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            items += [ImageInput(str(file), str(file)) for file in walk_files(path)]
        elif path.suffix.lower() == MANIFEST_SUFFIX and path.is_file():
            items += _manifest_inputs(path, manifest_root or str(path.parent))
        else:  # a missing file is reported in its row, like any other bad input
            items.append(ImageInput(str(path), str(path)))
    return items


def _manifest_inputs(path: Path, root: str) -> list[ImageInput]:
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
        items.append(ImageInput(file, file, root=root))
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
    """Classify ``inputs`` with ``model_path`` (a model file, or a registry URI such as
    ``models:/wbc-classifier@champion``); write the CSV (and JSON); return a summary."""
    with local_model_file(model_path) as weights:
        predictor = Predictor.load(weights, params.predict, params.ingest)
    items = collect_inputs(inputs, params.predict.manifest_root)
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
        "engine": predictor.engine.name,
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
