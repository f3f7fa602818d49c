"""The normalize stage's output folder as one unit, and the check every reader makes before using it.

``normalize.json`` records, beside the run's timings, what the folder was made from and what it
holds: the sha256 of the manifest it normalized, the sha256 of ``index.csv``, the shape of
``images.npy`` and a digest of evenly spaced rows of it. :func:`check_processed` compares that
record with the files (and with the manifest a stage was given), so ``images.npy`` of one run beside
``index.csv`` of another, a truncated array, or data normalized from another manifest is refused with
the file and the fix named, instead of being trained or evaluated on. Plain files only: no torch here,
so the normalize stage can write the record without importing the training stack.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.layout import IMAGES_FILE, INDEX_FILE, NORMALIZE_SUMMARY_FILE

PROCESSED_FILES = (IMAGES_FILE, INDEX_FILE, NORMALIZE_SUMMARY_FILE)  # the whole folder: written and read as one
SAMPLED_ROWS = 64  # rows of images.npy read for its digest: megabytes, not the gigabytes of the whole array
RECORD_KEYS = ("manifest_sha256", "index_sha256", "images_shape", "images_sample_sha256")
_FIX = "run `wbc normalize` (or `dvc repro normalize`) again"


class ProcessedDataError(ValueError):
    """The processed folder's files do not belong together, or not to the manifest a stage was given."""


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def images_sample_sha256(images: np.ndarray, sampled_rows: int = SAMPLED_ROWS) -> str:
    """sha256 over the shape, dtype and ``sampled_rows`` evenly spaced rows (first and last included) of
    ``images``: it differs for an array of another run, or one whose writing stopped part-way."""
    digest = hashlib.sha256(f"{images.shape}:{images.dtype}".encode())
    if len(images):
        for row in np.unique(np.linspace(0, len(images) - 1, min(sampled_rows, len(images))).round().astype(int)):
            digest.update(np.ascontiguousarray(images[row]).tobytes())
    return digest.hexdigest()


def processed_record(folder: Path, manifest_path: Path) -> dict[str, object]:
    """What ``normalize.json`` records about the files in ``folder`` (written from ``manifest_path``)
    so that :func:`check_processed` can tell they belong together."""
    images = np.load(folder / IMAGES_FILE, mmap_mode="r")
    return {
        "manifest_sha256": file_sha256(manifest_path),
        "index_sha256": file_sha256(folder / INDEX_FILE),
        "images_shape": list(images.shape),
        "images_sample_sha256": images_sample_sha256(images),
    }


def _read_record(processed_dir: Path) -> dict:
    for name in PROCESSED_FILES:
        if not (processed_dir / name).is_file():
            raise FileNotFoundError(f"{processed_dir / name}: not found; run `wbc normalize` (or `dvc repro`) first")
    path = processed_dir / NORMALIZE_SUMMARY_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ProcessedDataError(f"{path}: unreadable ({exc}); {_FIX}") from None
    missing = [key for key in RECORD_KEYS if not isinstance(record, dict) or key not in record]
    if missing:
        raise ProcessedDataError(f"{path} does not record {', '.join(missing)}, so nothing shows that "
                                 f"{IMAGES_FILE} and {INDEX_FILE} beside it come from one run; {_FIX}")
    return record


def _open_images(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:  # a header cut short, or data shorter than the header says
        raise ProcessedDataError(f"{path}: incomplete or damaged ({exc}); {_FIX}") from None


def _index_rows(path: Path) -> int:
    try:
        return len(pd.read_csv(path, dtype=str, usecols=[0]))
    except (ValueError, OSError) as exc:
        raise ProcessedDataError(f"{path}: unreadable ({exc}); {_FIX}") from None


def check_processed(processed_dir: Path, manifest: Path | None = None) -> None:
    """Refuse (:class:`ProcessedDataError`, naming the file and the fix) unless ``images.npy``,
    ``index.csv`` and ``normalize.json`` in ``processed_dir`` come from one complete normalize run,
    and, when ``manifest`` is given and exists, that run normalized this very manifest."""
    processed_dir = Path(processed_dir)
    record = _read_record(processed_dir)
    summary = processed_dir / NORMALIZE_SUMMARY_FILE
    images_path, index_path = processed_dir / IMAGES_FILE, processed_dir / INDEX_FILE
    images = _open_images(images_path)
    rows = _index_rows(index_path)
    if len(images) != rows:
        raise ProcessedDataError(f"{images_path} holds {len(images)} images but {index_path} lists {rows} rows: "
                                 f"they come from different normalize runs; {_FIX}")
    if list(images.shape) != list(record["images_shape"]):
        raise ProcessedDataError(f"{images_path} has shape {tuple(images.shape)} but {summary} records "
                                 f"{tuple(record['images_shape'])}: they come from different normalize runs; {_FIX}")
    if file_sha256(index_path) != record["index_sha256"]:
        raise ProcessedDataError(f"{index_path} is not the index {summary} was written with: they come from "
                                 f"different normalize runs; {_FIX}")
    if images_sample_sha256(images) != record["images_sample_sha256"]:
        raise ProcessedDataError(f"{images_path} does not hold the images {summary} was written with (another "
                                 f"run's, or one stopped part-way); {_FIX}")
    if manifest is not None and Path(manifest).is_file() and file_sha256(Path(manifest)) != record["manifest_sha256"]:
        raise ProcessedDataError(f"{processed_dir} was normalized from another manifest than {manifest} (the "
                                 f"manifest changed since, e.g. ingest ran again); {_FIX}")
