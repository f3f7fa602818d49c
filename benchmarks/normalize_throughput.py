"""Normalize throughput against its ceiling and a naive loop, in images/s per core.

    python benchmarks/normalize_throughput.py ../shared/data/pbc --limit 2000

- decode-only: OpenCV decode of every file, nothing else (the practical ceiling);
- naive: PIL open → resize → save PNG, one file at a time (what a notebook does);
- pipeline: ``pipeline.normalize.normalize_images`` (decode, aspect-preserving resize, pad,
  write into the memory-mapped array) with 1 worker, and with every core.
Output files go to a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
from PIL import Image

from pipeline.config import NormalizeParams
from pipeline.normalize import normalize_images
from pipeline.workers import resolve_workers

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


def list_images(root: Path, limit: int) -> list[str]:
    """Image files under ``root`` (sorted, spread over classes by taking every k-th)."""
    files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.stat().st_size > 0)
    step = max(1, len(files) // limit) if limit else 1
    return files[::step][:limit] if limit else files


def decode_only(paths: list[str]) -> float:
    start = time.perf_counter()
    for path in paths:
        cv2.imread(path, cv2.IMREAD_COLOR)
    return len(paths) / (time.perf_counter() - start)


def naive(paths: list[str], size: int, out_dir: Path) -> float:
    start = time.perf_counter()
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                image.convert("RGB").resize((size, size)).save(out_dir / f"{i}.png")
        except OSError:
            pass
    return len(paths) / (time.perf_counter() - start)


def pipeline_rate(paths: list[str], size: int, workers: int, out_dir: Path) -> float:
    params = NormalizeParams(size=size)
    start = time.perf_counter()
    normalize_images(paths, out_dir / f"images_{workers}.npy", params, progress=False, workers=workers)
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--limit", type=int, default=2000, help="images to use (0 = all)")
    parser.add_argument("--size", type=int, default=380)
    args = parser.parse_args()
    paths = [p for p in list_images(args.root, args.limit) if cv2.imread(p) is not None]
    cores = resolve_workers(0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        decode_only(paths[:50])  # warm the page cache
        results = {
            "images": len(paths),
            "size": args.size,
            "cores": cores,
            "decode_only_per_core": round(decode_only(paths), 1),
            "naive_pil_png_per_core": round(naive(paths, args.size, out), 1),
            "pipeline_1_worker": round(pipeline_rate(paths, args.size, 1, out), 1),
            "pipeline_all_cores": round(pipeline_rate(paths, args.size, cores, out), 1),
        }
    results["pipeline_all_cores_per_core"] = round(results["pipeline_all_cores"] / cores, 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
