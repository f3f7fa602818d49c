"""Normalize throughput against its ceiling and a naive loop, in images/s per core, and what colour
standardisation and framing cost when they are on.

    python benchmarks/normalize_throughput.py ../shared/data/pbc --limit 2000

- decode-only: OpenCV decode of every file, nothing else (the practical ceiling);
- naive: PIL open → resize → save PNG, one file at a time (what a notebook does), on a subset;
- pipeline: ``pipeline.normalize.normalize_images`` (read, decode, aspect-preserving resize, pad,
  write into ``images.npy``) with 1 worker and with every core.

On a shared machine the speed of a core drifts from minute to minute, so each round measures the
ceiling right before and after the pipeline and the ratio is taken within the round; the table
reports the median over rounds. Each rate is given twice: per second of wall-clock time, and per
second of CPU time of the processes doing the work (``*_cpu``), which is what a core delivers when
other programs share the machine. ``--extras N`` times N images with each stain method and framing
mode on, as milliseconds of CPU per image on one worker beside the plain path's. Output files go to
a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
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


def cpu_seconds() -> float:
    """CPU time used so far by this process and its finished worker processes."""
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def rates(count: int, work: Callable[[], object]) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second) of ``work`` over ``count`` images."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    work()
    return count / (time.perf_counter() - wall), count / (cpu_seconds() - cpu)


def _decode(paths: list[str]) -> None:
    for path in paths:  # each image dropped at once, as a pipeline would
        cv2.imread(path, cv2.IMREAD_COLOR)


def decode_only(paths: list[str]) -> tuple[float, float]:
    """Images/s (wall, CPU) of an OpenCV decode of every file, on one core."""
    return rates(len(paths), lambda: _decode(paths))


def naive(paths: list[str], size: int, out_dir: Path) -> None:
    """PIL open, resize and PNG save, one file at a time."""
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            image.convert("RGB").resize((size, size)).save(out_dir / f"{i}.png")


def pipeline_rate(paths: list[str], preprocessing: Preprocessing, workers: int, out_dir: Path) -> tuple[float, float]:
    """Images/s (wall, CPU) of the normalize stage's image pass with ``workers`` processes."""
    return rates(len(paths), lambda: normalize_images(paths, out_dir / f"images_{workers}.npy", preprocessing,
                                                      progress=False, workers=workers))


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
    """Milliseconds of CPU per image on one worker, plain and with each of :data:`EXTRAS` on."""
    plain = Preprocessing(NormalizeParams(size=size))
    result = {"plain": round(1000 / pipeline_rate(paths, plain, 1, out_dir)[1], 2)}
    for key, value in EXTRAS:
        preprocessing = extra_preprocessing(key, value, size, paths)
        result[f"{key}={value}"] = round(1000 / pipeline_rate(paths, preprocessing, 1, out_dir)[1], 2)
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
    rounds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        decode_only(paths[:50])  # warm the page cache
        read_rgb(paths[0])
        for _ in range(args.rounds):
            for workers in sorted({1, cores}):
                before = decode_only(paths)
                rate = pipeline_rate(paths, plain, workers, out)
                after = decode_only(paths)
                for i, clock in enumerate(("", "_cpu")):
                    ceiling = (before[i] + after[i]) / 2
                    # a CPU second is one core's: the CPU rate of several workers is already per core
                    per_core = rate[i] / workers if clock == "" else rate[i]
                    rounds.setdefault(f"decode_only_per_core{clock}", []).append(ceiling)
                    rounds.setdefault(f"pipeline_{workers}_workers_per_core{clock}", []).append(per_core)
                    rounds.setdefault(f"ratio_{workers}_workers{clock}", []).append(per_core / ceiling)
        results: dict[str, object] = {"images": len(paths), "size": args.size, "cores": cores, "rounds": args.rounds}
        results |= {key: round(statistics.median(values), 3 if key.startswith("ratio") else 1)
                    for key, values in rounds.items()}
        subset = paths[:NAIVE_IMAGES]
        results["naive_pil_png_per_core_cpu"] = round(rates(len(subset), lambda: naive(subset, args.size, out))[1], 1)
        if args.extras:
            results["ms_per_image_1_worker"] = extras_ms(paths[: args.extras], args.size, out)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
