"""Normalize stage: every kept image to one square RGB size, stored for fast read-back.

Output is a single uint8 array ``images.npy`` of shape (N, size, size, 3) that training
memory-maps (no JPEG decode per epoch), plus ``index.csv`` giving each row's manifest entry.
Decoding and resizing run in a process pool; each worker writes its rows straight into the
memory-mapped output, so nothing large crosses process boundaries.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.atomic import write_json
from pipeline.config import NormalizeParams
from pipeline.imaging import ImageReadError, fit_square, read_rgb
from pipeline.layout import IMAGES_FILE, INDEX_FILE, NORMALIZE_SUMMARY_FILE
from pipeline.outputs import stage_folder
from pipeline.processed import PROCESSED_FILES, processed_record
from pipeline.workers import resolve_workers


def _normalize_chunk(
    images_path: str, rows: list[tuple[int, str]], size: int, mode: str, pad_color: tuple[int, int, int]
) -> list[tuple[int, str, str]]:
    """Decode and resize ``rows`` into the shared output; return (row, path, reason) failures."""
    out = np.load(images_path, mmap_mode="r+")
    failures = []
    for row, path in rows:
        try:
            out[row] = fit_square(read_rgb(path), size, mode, pad_color)
        except ImageReadError as exc:
            failures.append((row, path, str(exc)))
    out.flush()
    return failures


def normalize_images(
    paths: list[str],
    images_path: Path,
    params: NormalizeParams,
    progress: bool = True,
    chunk_size: int = 64,
    workers: int = 0,
) -> None:
    """Write ``paths`` (in order) as rows of a (N, size, size, 3) uint8 ``.npy`` file, in ``workers``
    processes (0 = one per CPU core)."""
    size = params.size
    images_path.parent.mkdir(parents=True, exist_ok=True)
    out = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    del out
    rows = list(enumerate(paths))
    chunks = [rows[i : i + chunk_size] for i in range(0, len(rows), chunk_size)]
    failures: list[tuple[int, str, str]] = []
    workers = min(resolve_workers(workers), max(1, len(chunks)))
    bar = tqdm(total=len(paths), desc="normalize", unit="img", disable=not progress)
    if workers == 1:
        for chunk in chunks:
            failures += _normalize_chunk(str(images_path), chunk, size, params.mode, params.pad_color)
            bar.update(len(chunk))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {
                pool.submit(_normalize_chunk, str(images_path), chunk, size, params.mode, params.pad_color): len(
                    chunk
                )
                for chunk in chunks
            }
            for future in as_completed(futures):
                failures += future.result()
                bar.update(futures[future])
    bar.close()
    if failures:
        listed = "\n".join(f"  {path}: {reason}" for _, path, reason in sorted(failures)[:20])
        raise ImageReadError(
            failures[0][1],
            "changed-since-ingest",
            f"{len(failures)} file(s) accepted by ingest can no longer be decoded; re-run ingest:\n{listed}",
        )


def run_normalize(
    manifest_path: Path, root: Path, out_dir: Path, params: NormalizeParams, progress: bool = True, workers: int = 0
) -> dict:
    """Normalize every manifest row in ``workers`` processes (0 = one per CPU core); write images.npy,
    index.csv and normalize.json to ``out_dir``.

    The three files are built in a temporary folder that replaces ``out_dir`` whole once they are
    complete, so a kill or a failure leaves the previous output intact; normalize.json records the
    manifest's hash and what the other two hold, which every reader checks
    (:func:`pipeline.processed.check_processed`).
    """
    manifest = pd.read_csv(manifest_path, dtype={"path": str, "label": str, "split": str, "group": str})
    if manifest.empty:
        raise ValueError(f"{manifest_path}: the manifest has no images to normalize")
    with stage_folder(out_dir, PROCESSED_FILES, "normalize") as tmp:
        start = time.perf_counter()
        normalize_images([str(root / p) for p in manifest["path"]], tmp / IMAGES_FILE, params, progress,
                         workers=workers)
        seconds = time.perf_counter() - start
        manifest.to_csv(tmp / INDEX_FILE, index=False)
        workers = resolve_workers(workers)
        summary = {
            "images": len(manifest),
            "size": params.size,
            "mode": params.mode,
            "seconds": round(seconds, 3),
            "workers": workers,
            "images_per_second": round(len(manifest) / seconds, 1),
            "images_per_second_per_worker": round(len(manifest) / seconds / workers, 1),
            **processed_record(tmp, manifest_path),
        }
        write_json(tmp / NORMALIZE_SUMMARY_FILE, summary)
    return summary
