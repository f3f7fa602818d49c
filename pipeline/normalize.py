"""Normalize stage: every kept image to one square RGB size (and, when asked, one framing and one
colour standard), stored for fast read-back.

Outputs, in one folder written as a whole:

- ``images.npy``: uint8 (N, size, size, 3) that training memory-maps (no JPEG decode per epoch),
- ``index.csv``: each row's manifest entry,
- ``rejected.csv``: images the framing step found no white cell in (path, site, reason, detail, the
  reason a key of :data:`pipeline.framing.FRAMING_REASONS`); they are in neither file above,
- ``normalize.json``: timings, what the folder holds (:mod:`pipeline.processed`) and the
  preprocessing: the params, the colour reference fitted on training images and the pixel sizes
  framing used, which the train stage saves with the model so predict repeats them exactly.

Each image goes through :func:`pipeline.preprocess.square_image`, the function predict uses.
The colour reference (``normalize.stain``) is fitted first, on ``normalize.stain_reference_images``
training-split images drawn with ``normalize.seed`` (held-out sites' rows are split ``holdout``, never
``train``), or taken from a trained model or another processed folder (``wbc normalize
--stain-reference``, so another dataset is standardised exactly like the training data). For
``framing: pixel-size`` each site's pixel size is its source's ``um_per_px``, else measured from the
red cells of ``normalize.pixel_size_images`` of its images.

Speed: a process pool whose workers get the preprocessing once, then chunks of rows; each worker
writes each square straight to its row of ``images.npy`` with ``pwrite`` (the profile showed the page
faults of a fresh memory map cost more), reusing one buffer, so nothing large crosses processes.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.atomic import write_json
from pipeline.config import NormalizeParams
from pipeline.framing import FRAMING_REASONS, estimate_pixel_size
from pipeline.imaging import ImageReadError, decode_rgb, read_bytes
from pipeline.layout import IMAGES_FILE, INDEX_FILE, NORMALIZE_SUMMARY_FILE, REJECTED_COLUMNS, REJECTED_FILE
from pipeline.outputs import stage_folder
from pipeline.preprocess import PREPROCESSING_KEY, NoCellFound, Preprocessing, square_image, unstained_square
from pipeline.processed import PROCESSED_FILES, processed_record
from pipeline.stain import StainReference, fit_reference
from pipeline.workers import resolve_workers

NORMALIZE_FILES = (*PROCESSED_FILES, REJECTED_FILE)  # what the output folder holds
TRAIN_SPLIT = "train"
_COPY_ROWS = 256  # rows copied at a time when rejected rows are taken out of images.npy


@dataclass
class _Outcome:
    """What a chunk of rows came to besides the squares written: unreadable files and images without a cell."""

    unreadable: list[tuple[int, str, str]] = field(default_factory=list)  # (row, path, reason)
    no_cell: dict[int, str] = field(default_factory=dict)  # row -> framing reason


class _Rows:
    """Writes squares into the rows of an existing ``.npy`` file by their offset."""

    def __init__(self, images_path: str):
        images = np.load(images_path, mmap_mode="r")
        self.offset, self.row_bytes = images.offset, int(np.prod(images.shape[1:]))
        del images
        self.fd = os.open(images_path, os.O_WRONLY)

    def write(self, row: int, square: np.ndarray) -> None:
        view, at = memoryview(square).cast("B"), self.offset + row * self.row_bytes
        while view:  # a regular file takes it in one call; the loop only guards the rule of pwrite
            written = os.pwrite(self.fd, view, at)
            view, at = view[written:], at + written

    def close(self) -> None:
        os.close(self.fd)


class _Worker:
    """One process's share of the work: its output file, the preprocessing and a reusable square."""

    def __init__(self, images_path: str, preprocessing: Preprocessing):
        self.rows = _Rows(images_path)
        self.preprocessing = preprocessing
        size = preprocessing.normalize.size
        self.square = np.empty((size, size, 3), np.uint8)

    def run(self, rows: Sequence[tuple[int, str, float | None]]) -> _Outcome:
        outcome = _Outcome()
        for row, path, um_per_px in rows:
            try:
                square = square_image(read_bytes(path), self.preprocessing, um_per_px, path, self.square)
            except ImageReadError as exc:
                outcome.unreadable.append((row, path, str(exc)))
            except NoCellFound as exc:
                outcome.no_cell[row] = exc.reason
            else:
                self.rows.write(row, square)
        return outcome


_worker: _Worker | None = None  # this pool process's worker, made once by _start_worker


def _start_worker(images_path: str, preprocessing: Preprocessing) -> None:
    global _worker
    _worker = _Worker(images_path, preprocessing)


def _run_chunk(rows: Sequence[tuple[int, str, float | None]]) -> _Outcome:
    assert _worker is not None, "the pool's initializer makes the worker"
    return _worker.run(rows)


def _chunks(rows: list, workers: int) -> list[list]:
    # Enough chunks per worker that none waits long for the last one, few enough that hand-offs stay cheap.
    size = min(256, max(8, -(-len(rows) // (8 * workers))))
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _outcomes(rows: list, images_path: Path, preprocessing: Preprocessing, workers: int,
              bar: tqdm) -> Iterator[_Outcome]:
    chunks = _chunks(rows, workers)
    workers = min(workers, len(chunks))
    if workers <= 1:
        worker = _Worker(str(images_path), preprocessing)
        try:
            for chunk in chunks:
                yield worker.run(chunk)
                bar.update(len(chunk))
        finally:
            worker.rows.close()
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_start_worker,
                             initargs=(str(images_path), preprocessing)) as pool:
        futures = {pool.submit(_run_chunk, chunk): len(chunk) for chunk in chunks}
        for future in as_completed(futures):
            yield future.result()
            bar.update(futures[future])


def normalize_images(
    paths: Sequence[str],
    images_path: Path,
    preprocessing: Preprocessing,
    progress: bool = True,
    workers: int = 0,
    um_per_px: Sequence[float | None] | None = None,
) -> dict[int, str]:
    """Write ``paths`` (in order) as rows of a (N, size, size, 3) uint8 ``.npy`` file, in ``workers``
    processes (0 = one per CPU core); ``um_per_px`` is each image's pixel size for ``framing:
    pixel-size``. Returns the rows framing found no cell in (row -> reason); their rows stay unwritten.
    Raises :class:`ImageReadError` naming every file that can no longer be decoded."""
    size = preprocessing.normalize.size
    images_path.parent.mkdir(parents=True, exist_ok=True)
    # Created at full length (a sparse file): every worker writes its rows at their offsets.
    created = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    del created
    sizes = list(um_per_px) if um_per_px is not None else [None] * len(paths)
    rows = list(zip(range(len(paths)), paths, sizes, strict=True))
    unreadable: list[tuple[int, str, str]] = []
    no_cell: dict[int, str] = {}
    bar = tqdm(total=len(paths), desc="normalize", unit="img", disable=not progress)
    for outcome in _outcomes(rows, images_path, preprocessing, resolve_workers(workers), bar):
        unreadable += outcome.unreadable
        no_cell.update(outcome.no_cell)
    bar.close()
    if unreadable:
        listed = "\n".join(f"  {path}: {reason}" for _, path, reason in sorted(unreadable)[:20])
        raise ImageReadError(
            sorted(unreadable)[0][1],
            "changed-since-ingest",
            f"{len(unreadable)} file(s) accepted by ingest can no longer be decoded; re-run ingest:\n{listed}",
        )
    return no_cell


def drop_rows(images_path: Path, rows: Sequence[int]) -> None:
    """Rewrite the ``.npy`` file at ``images_path`` without ``rows``, the others in their order."""
    images = np.load(images_path, mmap_mode="r")
    keep = np.setdiff1d(np.arange(len(images)), np.asarray(rows, dtype=np.int64))
    kept_path = images_path.with_name(images_path.stem + ".kept.npy")
    kept = np.lib.format.open_memmap(kept_path, mode="w+", dtype=images.dtype, shape=(len(keep), *images.shape[1:]))
    for start in range(0, len(keep), _COPY_ROWS):
        kept[start : start + _COPY_ROWS] = images[keep[start : start + _COPY_ROWS]]
    kept.flush()
    del kept, images
    os.replace(kept_path, images_path)


def reference_rows(manifest: pd.DataFrame, params: NormalizeParams) -> list[int]:
    """The manifest rows the colour reference is fitted on: up to ``stain_reference_images`` rows of the
    training split, drawn with ``seed``, in manifest order. Held-out sites' rows are split ``holdout``,
    so the reference never sees them."""
    train = np.flatnonzero(manifest["split"].astype(str).to_numpy() == TRAIN_SPLIT)
    if not len(train):
        raise ValueError(f"normalize.stain is {params.stain}, but the manifest has no {TRAIN_SPLIT}-split images "
                         "to fit the colour reference on")
    chosen = np.random.default_rng(params.seed).choice(train, size=min(params.stain_reference_images, len(train)),
                                                      replace=False)
    return sorted(int(row) for row in chosen)


def fitted_reference(paths: Sequence[str], rows: Sequence[int], params: NormalizeParams,
                     um_per_px: Sequence[float | None]) -> StainReference:
    """The ``params.stain`` reference fitted on the squares (framed when framing is on, not yet
    standardised) of ``rows``; images framing finds no cell in are left out, as they are of the data."""
    preprocessing = Preprocessing(params.model_copy(update={"stain": "none"}))
    squares = []
    for row in rows:
        try:
            squares.append(unstained_square(read_bytes(paths[row]), preprocessing, um_per_px[row], paths[row]))
        except NoCellFound:
            continue
    if not squares:
        raise ValueError(f"framing found no cell in any of the {len(rows)} images drawn to fit the colour "
                         "reference on; see normalize.framing")
    return fit_reference(squares, params.stain)


def site_pixel_sizes(sites: pd.Series, paths: Sequence[str], known: Mapping[str, float | None],
                     params: NormalizeParams) -> dict[str, dict]:
    """Each site's pixel size (µm/px) for ``framing: pixel-size`` and where it comes from: its source's
    ``um_per_px`` (``known``), else the red cells of up to ``pixel_size_images`` of its images drawn with
    ``seed`` (:func:`pipeline.framing.estimate_pixel_size`). ValueError naming the site and the param to
    set when a site has neither."""
    sites = sites.to_numpy()
    result = {}
    for site in dict.fromkeys(sites):
        if known.get(site):
            result[site] = {"um_per_px": float(known[site]), "source": "data um_per_px"}
            continue
        rows = np.flatnonzero(sites == site)
        drawn = np.sort(np.random.default_rng(params.seed).choice(rows, min(params.pixel_size_images, len(rows)),
                                                                  replace=False))
        measured = estimate_pixel_size(decode_rgb(read_bytes(paths[row]), paths[row]) for row in drawn)
        if not measured.found:
            raise ValueError(
                f"site {site!r}: normalize.framing is pixel-size, but its pixel size could not be measured "
                f"({measured.cells_measured} whole red cells in {measured.images_total} images; tight crops show "
                "none): give the site's um_per_px (data.sources[].um_per_px, or data.um_per_px for one source), "
                "or use framing red-cell or nucleus")
        result[site] = {"um_per_px": measured.um_per_px, "source": "measured", "red_cell_px": measured.red_cell_px,
                        "images": measured.images_total, "images_measured": measured.images_measured,
                        "red_cells": measured.cells_measured}
    return result


def _sites(manifest: pd.DataFrame) -> pd.Series:
    """Each row's site ('' for a manifest written before sites existed)."""
    if "site" not in manifest.columns:
        return pd.Series("", index=manifest.index)
    return manifest["site"].fillna("").astype(str)


def _rejected(manifest: pd.DataFrame, sites: pd.Series, no_cell: Mapping[int, str], framing: str) -> pd.DataFrame:
    rows = sorted(no_cell)
    reasons = [no_cell[row] for row in rows]
    return pd.DataFrame({"path": manifest["path"].iloc[rows].to_list(), "site": sites.iloc[rows].to_list(),
                         "reason": reasons,
                         "detail": [f"normalize.framing {framing}: {FRAMING_REASONS[r]}" for r in reasons]},
                        columns=REJECTED_COLUMNS)


def run_normalize(
    manifest_path: Path,
    root: Path,
    out_dir: Path,
    params: NormalizeParams,
    progress: bool = True,
    workers: int = 0,
    *,
    um_per_px: Mapping[str, float | None] | None = None,
    stain_reference: StainReference | None = None,
) -> dict:
    """Normalize every manifest row in ``workers`` processes (0 = one per CPU core); write images.npy,
    index.csv, rejected.csv and normalize.json to ``out_dir``.

    ``um_per_px`` maps a site to its known pixel size (``data.sources``); ``stain_reference``, when
    given, is used instead of fitting one (its method must be ``params.stain``). The files are built
    in a temporary folder that replaces ``out_dir`` whole once they are complete, so a kill or a
    failure leaves the previous output intact; normalize.json records the manifest's hash and what
    the other files hold, which every reader checks (:func:`pipeline.processed.check_processed`).
    """
    manifest = pd.read_csv(manifest_path, dtype={"path": str, "site": str, "label": str, "split": str, "group": str})
    if manifest.empty:
        raise ValueError(f"{manifest_path}: the manifest has no images to normalize")
    if stain_reference is not None and stain_reference.method != params.stain:
        raise ValueError(f"the stain reference given is {stain_reference.method}, but normalize.stain is "
                         f"{params.stain}; set normalize.stain to {stain_reference.method}")
    sites = _sites(manifest)
    paths = [str(root / p) for p in manifest["path"]]
    with stage_folder(out_dir, NORMALIZE_FILES, "normalize") as tmp:
        start = time.perf_counter()
        pixel_sizes = site_pixel_sizes(sites, paths, um_per_px or {}, params) if params.framing == "pixel-size" else {}
        row_um = [pixel_sizes[site]["um_per_px"] if pixel_sizes else None for site in sites]
        trained_sites = set(sites[manifest["split"] == TRAIN_SPLIT])
        drawn: list[int] = []
        if params.stain != "none" and stain_reference is None:
            drawn = reference_rows(manifest, params)
            stain_reference = fitted_reference(paths, drawn, params, row_um)
        preprocessing = Preprocessing(params, stain_reference, {site: entry["um_per_px"] for site, entry
                                                                in pixel_sizes.items() if site in trained_sites})
        fit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        no_cell = normalize_images(paths, tmp / IMAGES_FILE, preprocessing, progress, workers, row_um)
        seconds = time.perf_counter() - start
        if len(no_cell) == len(manifest):
            counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(Counter(no_cell.values()).items()))
            raise ValueError(f"normalize.framing {params.framing} found no cell in any of the {len(manifest)} "
                             f"images ({counts}); try another framing, or none")
        if no_cell:
            drop_rows(tmp / IMAGES_FILE, sorted(no_cell))
        rejected = _rejected(manifest, sites, no_cell, params.framing)
        rejected.to_csv(tmp / REJECTED_FILE, index=False)
        manifest.drop(index=sorted(no_cell)).to_csv(tmp / INDEX_FILE, index=False)
        workers = resolve_workers(workers)
        summary = {
            "images": len(manifest) - len(no_cell),
            "size": params.size,
            "mode": params.mode,
            "stain": params.stain,
            "framing": params.framing,
            "rejected": dict(sorted(Counter(rejected["site"]).items())),
            "rejected_by_reason": dict(sorted(Counter(rejected["reason"]).items())),
            "seconds": round(seconds, 3),
            "fit_seconds": round(fit_seconds, 3),
            "workers": workers,
            "images_per_second": round(len(manifest) / seconds, 1),
            "images_per_second_per_worker": round(len(manifest) / seconds / workers, 1),
            PREPROCESSING_KEY: preprocessing.record(),
            "stain_reference_images": [manifest["path"].iloc[row] for row in drawn],
            "pixel_size_sources": pixel_sizes,
            **processed_record(tmp, manifest_path),
        }
        write_json(tmp / NORMALIZE_SUMMARY_FILE, summary)
    return summary
