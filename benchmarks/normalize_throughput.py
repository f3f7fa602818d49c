"""Normalize throughput against its ceiling and a naive loop, in images/s per core, and what colour
standardisation and framing cost when they are on.

    python benchmarks/normalize_throughput.py ../shared/data/pbc --limit 2000

- decode-only: OpenCV decode of every file, nothing else (the practical ceiling);
- naive: PIL open → resize → save PNG, one file at a time (what a notebook does), on a subset;
- pipeline: ``pipeline.normalize.normalize_images`` (read, decode, aspect-preserving resize, pad,
  write into ``images.npy``) with 1 worker and with every core.

On a shared machine the speed of a core drifts from minute to minute, so each round measures the
ceiling right before the pipeline and the ratio is taken within the round; the table reports the
median over rounds. ``--extras N`` times N images with each stain method and framing mode on, as
milliseconds per image on one worker beside the plain path's. Output files go to a temporary folder
that is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import cv2
from PIL import Image

from pipeline.config import NormalizeParams
from pipeline.imaging import read_rgb
from pipeline.normalize import normalize_images
from pipeline.preprocess import Preprocessing, unstained_square
from pipeline.stain import fit_reference
from pipeline.workers import resolve_workers

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
NAIVE_IMAGES = 200  # the naive loop is slow; its rate is stable on a subset
REFERENCE_IMAGES = 16
EXTRAS = (("stain", "reinhard"), ("stain", "macenko"), ("framing", "red-cell"), ("framing", "nucleus"))


def list_images(root: Path, limit: int) -> list[str]:
    """Image files under ``root`` (sorted, spread over classes by taking every k-th)."""
    files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.stat().st_size > 0)
    step = max(1, len(files) // limit) if limit else 1
    return files[::step][:limit] if limit else files


def decode_only(paths: list[str]) -> float:
    """Images/s of an OpenCV decode of every file, on one core."""
    start = time.perf_counter()
    for path in paths:
        cv2.imread(path, cv2.IMREAD_COLOR)
    return len(paths) / (time.perf_counter() - start)


def naive(paths: list[str], size: int, out_dir: Path) -> float:
    """Images/s of PIL open, resize and PNG save, one file at a time."""
    start = time.perf_counter()
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                image.convert("RGB").resize((size, size)).save(out_dir / f"{i}.png")
        except OSError:
            pass
    return len(paths) / (time.perf_counter() - start)


def pipeline_rate(paths: list[str], preprocessing: Preprocessing, workers: int, out_dir: Path) -> float:
    """Images/s of the normalize stage's image pass with ``workers`` processes."""
    start = time.perf_counter()
    normalize_images(paths, out_dir / f"images_{workers}.npy", preprocessing, progress=False, workers=workers)
    return len(paths) / (time.perf_counter() - start)


def extra_preprocessing(key: str, value: str, size: int, paths: list[str]) -> Preprocessing:
    """The plain preprocessing with ``normalize.<key>`` set to ``value`` (a stain reference fitted on a
    few of ``paths``)."""
    params = NormalizeParams(size=size, **{key: value})
    if key != "stain":
        return Preprocessing(params)
    squares = [unstained_square(Path(p).read_bytes(), Preprocessing(NormalizeParams(size=size)), None, p)
               for p in paths[:REFERENCE_IMAGES]]
    return Preprocessing(params, fit_reference(squares, value))


def extras_ms(paths: list[str], size: int, out_dir: Path) -> dict[str, float]:
    """Milliseconds per image on one worker, plain and with each of :data:`EXTRAS` on."""
    result = {"plain": round(1000 / pipeline_rate(paths, Preprocessing(NormalizeParams(size=size)), 1, out_dir), 2)}
    for key, value in EXTRAS:
        preprocessing = extra_preprocessing(key, value, size, paths)
        result[f"{key}={value}"] = round(1000 / pipeline_rate(paths, preprocessing, 1, out_dir), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--limit", type=int, default=2000, help="images to use (0 = all)")
    parser.add_argument("--size", type=int, default=380)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of ceiling + pipeline (median reported)")
    parser.add_argument("--extras", type=int, default=200, help="images timed with stain/framing on (0 = skip)")
    args = parser.parse_args()
    paths = [p for p in list_images(args.root, args.limit) if cv2.imread(p) is not None]
    cores = resolve_workers(0)
    plain = Preprocessing(NormalizeParams(size=args.size))
    rounds: dict[str, list[float]] = {"decode_only_per_core": [], "pipeline_1_worker": [], "ratio_1_worker": [],
                                      f"pipeline_{cores}_workers_per_core": [], f"ratio_{cores}_workers": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        decode_only(paths[:50])  # warm the page cache
        read_rgb(paths[0])
        for _ in range(args.rounds):
            ceiling = decode_only(paths)
            one = pipeline_rate(paths, plain, 1, out)
            ceiling_again = decode_only(paths)
            every = pipeline_rate(paths, plain, cores, out) / cores
            rounds["decode_only_per_core"].append((ceiling + ceiling_again) / 2)
            rounds["pipeline_1_worker"].append(one)
            rounds["ratio_1_worker"].append(one / ceiling)
            rounds[f"pipeline_{cores}_workers_per_core"].append(every)
            rounds[f"ratio_{cores}_workers"].append(every / ceiling_again)
        results: dict[str, object] = {"images": len(paths), "size": args.size, "cores": cores, "rounds": args.rounds}
        results |= {key: round(statistics.median(values), 3 if key.startswith("ratio") else 1)
                    for key, values in rounds.items()}
        results["naive_pil_png_per_core"] = round(naive(paths[:NAIVE_IMAGES], args.size, out), 1)
        if args.extras:
            results["ms_per_image_1_worker"] = extras_ms(paths[: args.extras], args.size, out)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
