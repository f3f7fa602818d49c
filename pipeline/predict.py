"""Prediction on new images: ``wbc predict`` and the served MLflow model share this one path.

Each input (an image file, or the base64-encoded bytes of one) is

1. read within limits (:class:`InputLimits`): a file only when paths are allowed and it resolves
   (symlinks and ``..`` followed) under its permitted folder, only a regular file, and only after
   its size passed ``predict.max_image_bytes``; base64 only when short enough to decode within it,
2. checked from its header alone, nothing decoded yet: a format of ``ingest.formats``, at most
   ``predict.max_pixels`` pixels, a short side of at least ``ingest.min_side``, not cut short,
3. decoded once, framed, squared and colour-standardised by the very function the normalize stage
   runs over the training images (:func:`pipeline.preprocess.square_image`), with the preprocessing
   saved in the model (normalize params, stain reference, pixel size); an image where framing finds
   no cell is refused with the framing step's reason,
4. resized to the model's input size exactly like the training data
   (:func:`pipeline.imaging.resize_square`),
5. fed to the model as raw 0..255 uint8 NCHW (the model scales its input itself), in batches,
   on the GPU when there is one,
6. turned into calibrated probabilities: logits divided by the temperature fitted on the
   validation split by the train stage.

An input that fails a check becomes one output row with its reason code (the table is
:data:`pipeline.inspection.REASON_MEANINGS`) and a sentence that names sizes, formats and limits,
never the input's content; it never stops the batch.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import stat
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.calibration import softmax
from pipeline.config import IngestParams, Params, PredictParams
from pipeline.imaging import ImageReadError, resize_square, to_chw
from pipeline.inference import batch_logits, load_model, pick_device
from pipeline.inspection import REASON_MEANINGS
from pipeline.model_meta import ModelMeta
from pipeline.models import Classifier
from pipeline.preprocess import NoCellFound, Preprocessing, square_image
from pipeline.registry import local_model_file
from pipeline.sources import walk_files

# A row's status: OK, or a reason code of pipeline.inspection.REASON_MEANINGS (predict's own included).
OK = "ok"
MANIFEST_SUFFIX = ".csv"


@dataclass(frozen=True)
class ImageInput:
    """One image to classify: a file ``path``, or ``image_b64``, the base64-encoded bytes of an
    image file (a ``data:image/...;base64,`` prefix is allowed). ``name`` labels the output row.
    ``root``, when set, is the folder the file must resolve under (a manifest's folder, the served
    model's ``predict.serve_path_root``)."""

    name: str
    path: str | None = None
    image_b64: str | bytes | None = None
    root: str | None = None


class RejectedInput(Exception):
    """An input that cannot be classified; ``reason`` is a short code, ``detail`` a sentence."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class InputLimits:
    """What prediction accepts: ingest's formats and minimum side, predict's caps on bytes and
    pixels, and whether file paths may be read at all (the served model reads none unless
    ``predict.serve_path_root`` is set)."""

    formats: tuple[str, ...]
    min_side: int
    max_bytes: int
    max_pixels: int
    read_paths: bool = True


def input_checks(ingest: IngestParams, predict: PredictParams | None = None, read_paths: bool = True) -> InputLimits:
    """The limits every input passes: ``ingest``'s formats and minimum side, ``predict``'s caps."""
    predict = predict or PredictParams()
    return InputLimits(formats=tuple(ingest.formats), min_side=ingest.min_side, max_bytes=predict.max_image_bytes,
                       max_pixels=predict.max_pixels, read_paths=read_paths)


def _too_large(size: int, limits: InputLimits, what: str = "bytes") -> RejectedInput:
    return RejectedInput("too-large", f"{size} {what}; predict.max_image_bytes is {limits.max_bytes}; not read")


def _decode_base64(value: str | bytes, limits: InputLimits) -> bytes:
    if isinstance(value, str) and value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    # 4 base64 characters carry 3 bytes: a longer value cannot fit the cap, so it is never decoded
    if len(value) > 4 * -(-limits.max_bytes // 3):
        raise _too_large(len(value) * 3 // 4, limits, "bytes (base64-encoded)")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RejectedInput("not-base64", f"the 'image' value is not valid base64 ({exc})") from None
    if len(data) > limits.max_bytes:
        raise _too_large(len(data), limits)
    return data


def _allowed_path(item: ImageInput, limits: InputLimits) -> str:
    """``item``'s file with symlinks and ``..`` resolved, once it is allowed to be read."""
    if not limits.read_paths:
        raise RejectedInput("path-not-allowed", "this model reads no files; send the image's bytes base64-encoded "
                            "in the 'image' column (file paths need predict.serve_path_root)")
    if "\0" in str(item.path):  # no file system accepts it; os functions raise ValueError, not OSError
        raise RejectedInput("unreadable", "the path holds a NUL character")
    resolved = os.path.realpath(str(item.path))
    if item.root is not None:
        root = os.path.realpath(item.root)
        if os.path.commonpath([root, resolved]) != root:
            raise RejectedInput("path-not-allowed", "the path leads outside the folder it may be read from")
    return resolved


def _check_file(info: os.stat_result, limits: InputLimits) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a device, pipe or socket"
        raise RejectedInput("not-a-file", f"the path names {kind}, not a regular file; not opened")
    if info.st_size > limits.max_bytes:
        raise _too_large(info.st_size, limits)


def _read_file(item: ImageInput, limits: InputLimits) -> bytes:
    """The bytes of ``item``'s file: checked by ``stat`` before it is opened, and again on the open
    file (it may have been swapped since); at most ``max_bytes + 1`` bytes are read (files under
    /proc report a size of 0)."""
    path = _allowed_path(item, limits)
    try:
        _check_file(os.stat(path), limits)
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise RejectedInput("missing-file", "the file does not exist") from None
    except OSError as exc:
        raise RejectedInput("unreadable", exc.strerror or type(exc).__name__) from None
    with os.fdopen(handle, "rb") as file:
        _check_file(os.fstat(file.fileno()), limits)
        try:
            data = file.read(limits.max_bytes + 1)
        except OSError as exc:
            raise RejectedInput("unreadable", exc.strerror or type(exc).__name__) from None
    if len(data) > limits.max_bytes:
        raise _too_large(len(data), limits, "bytes or more")
    return data


def read_input(item: ImageInput, limits: InputLimits) -> bytes:
    """The bytes of ``item``'s image within ``limits``; raises :class:`RejectedInput` when there are none."""
    encoded = item.image_b64.strip() if isinstance(item.image_b64, str) else item.image_b64
    if encoded:
        return _decode_base64(encoded, limits)
    if not item.path:
        raise RejectedInput("no-input", "neither a file path nor image bytes were given")
    return _read_file(item, limits)


def _ends_early(data: bytes, image_format: str) -> bool:
    """True when a JPEG or PNG stops before its end marker (OpenCV would decode the rest as grey)."""
    if image_format == "JPEG":
        return b"\xff\xd9" not in data[-64:]
    if image_format == "PNG":
        return b"IEND" not in data[-64:]
    return False


def _header(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) as the header of ``data`` states them; no pixel is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format or "", *image.size
    except Image.DecompressionBombError:  # PIL's own limit, above any sane predict.max_pixels
        raise RejectedInput("too-many-pixels", f"the header states more than {2 * Image.MAX_IMAGE_PIXELS} "
                            "pixels; not decoded") from None
    except UnidentifiedImageError:
        raise RejectedInput("not-an-image", "the content is not an image format the decoder knows") from None
    except Exception as exc:  # a damaged header fails in many ways; the message may quote the content
        if isinstance(exc, EOFError) or "truncat" in str(exc).lower():
            raise RejectedInput("truncated", "the image data stops inside its header") from None
        raise RejectedInput("corrupt", "the image header is damaged") from None


def checked_header(data: bytes, limits: InputLimits) -> str:
    """The image format of ``data`` once its header passes ``limits``; raises :class:`RejectedInput`."""
    if not data:
        raise RejectedInput("empty-file", "the image has 0 bytes")
    image_format, width, height = _header(data)
    if image_format not in limits.formats:
        raise RejectedInput("unsupported-format",
                            f"{image_format} image; ingest.formats allows {', '.join(limits.formats)}")
    if width * height > limits.max_pixels:
        raise RejectedInput("too-many-pixels", f"header says {width}x{height} = {width * height} pixels > "
                            f"predict.max_pixels ({limits.max_pixels}); not decoded")
    if min(width, height) < limits.min_side:
        raise RejectedInput("too-small", f"{width}x{height}; ingest.min_side is {limits.min_side}")
    if _ends_early(data, image_format):
        raise RejectedInput("truncated", f"the {image_format} data stops before its end marker")
    return image_format


def model_preprocessing(meta: ModelMeta) -> Preprocessing:
    """The preprocessing a trained model's inputs get, from its metadata; ValueError (before any
    input is read) when the model frames by a pixel size its inputs cannot be given."""
    preprocessing = Preprocessing(meta.normalize, meta.stain_reference, meta.pixel_sizes)
    preprocessing.input_um_per_px()
    return preprocessing


def checked_square(data: bytes, limits: InputLimits, preprocessing: Preprocessing, name: str = "<bytes>") -> np.ndarray:
    """``data`` checked from its header, then decoded once and brought to the normalized square exactly
    as the normalize stage brings its images (:func:`pipeline.preprocess.square_image`); raises
    :class:`RejectedInput` with a reason code (the framing step's when it finds no cell)."""
    image_format = checked_header(data, limits)
    try:
        return square_image(data, preprocessing, preprocessing.input_um_per_px(), name)
    except NoCellFound as exc:
        raise RejectedInput(exc.reason, f"normalize.framing {preprocessing.normalize.framing}: "
                            f"{REASON_MEANINGS[exc.reason]}") from None
    except MemoryError:
        raise RejectedInput("too-many-pixels", "decoding ran out of memory") from None
    except Exception as exc:  # an ImageReadError, or a decoder bug on one odd input: it must not stop the others
        if isinstance(exc, ImageReadError) and exc.reason == "decompression-bomb":
            raise RejectedInput("too-many-pixels", "the decoder's own pixel limit stopped it") from None
        raise RejectedInput("corrupt", f"the {image_format} data could not be decoded") from None


def prepare_input(item: ImageInput, checks: InputLimits, preprocessing: Preprocessing, image_size: int) -> np.ndarray:
    """``item`` as the model's input: a 3 x image_size x image_size uint8 array, prepared with the
    model's ``preprocessing``.

    Raises :class:`RejectedInput` with a reason code when the input is not a usable image.
    """
    square = checked_square(read_input(item, checks), checks, preprocessing, item.name)
    return to_chw(resize_square(square, image_size))


@dataclass
class _Prepared:
    index: int
    pixels: np.ndarray | None
    reason: str = ""
    detail: str = ""


class _Inputs(Dataset):
    """Prepared inputs in order; decoding runs in the loader's worker processes."""

    def __init__(self, items: Sequence[ImageInput], checks: InputLimits, preprocessing: Preprocessing,
                 image_size: int):
        self.items = items
        self.checks = checks
        self.preprocessing = preprocessing
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> _Prepared:
        try:
            return _Prepared(index, prepare_input(self.items[index], self.checks, self.preprocessing,
                                                  self.image_size))
        except RejectedInput as exc:
            return _Prepared(index, None, exc.reason, exc.detail)


def _as_list(batch: list[_Prepared]) -> list[_Prepared]:
    return batch


class Predictor:
    """A trained model with everything needed to classify new image files.

    ``read_paths=False`` (the served model without ``predict.serve_path_root``) refuses every
    input given as a file path."""

    def __init__(self, model: Classifier, meta: ModelMeta, settings: PredictParams, checks: IngestParams,
                 device: torch.device, source: str = "the model", read_paths: bool = True):
        self.model = model.eval()
        self.meta = meta
        self.settings = settings
        self.checks = input_checks(checks, settings, read_paths)
        self.device = device
        self.classes: list[str] = list(meta.classes)
        self.image_size = meta.image_size
        # the normalize params, stain reference and pixel size the training images were prepared with
        self.preprocessing = model_preprocessing(meta)
        self.calibrated = meta.calibrated
        self.temperature = meta.temperature_or_one

    @classmethod
    def load(cls, model_path: str | Path, settings: PredictParams, checks: IngestParams,
             read_paths: bool = True) -> Predictor:
        """Read ``model_path`` (saved by the train stage) onto the device ``settings`` asks for."""
        device = pick_device(settings.device)
        model, meta = load_model(Path(model_path), device)
        return cls(model, meta, settings, checks, device, source=str(model_path), read_paths=read_paths)

    @property
    def columns(self) -> list[str]:
        """Output columns, in order."""
        return ["path", "status", "detail", *(f"p_{name}" for name in self.classes), "predicted",
                "top_probability", "uncertain"]

    def _batches(self, items: Sequence[ImageInput]) -> Iterator[list[_Prepared]]:
        dataset = _Inputs(items, self.checks, self.preprocessing, self.image_size)
        # loader processes only pay off from the second batch on
        workers = min(self.settings.workers, max(0, (len(items) - 1) // self.settings.batch_size))
        loader = DataLoader(dataset, batch_size=self.settings.batch_size, shuffle=False, num_workers=workers,
                            collate_fn=_as_list)
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
