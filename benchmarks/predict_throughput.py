"""``wbc predict`` images/s against the model's forward-only images/s, per engine and input size.

    python benchmarks/predict_throughput.py ../shared/data/pbc --limit 1000 --sizes 96 224

For each input size, an untrained ``--model`` (efficientnet-lite0, the default; a forward pass costs
the same whatever the weights) is saved the way the train stage saves one, with the default
normalize params. Then, per engine (``predict.engine``: torch, onnx):

- forward only: the engine on batches of ``--batch-size`` images already prepared in memory, the
  ceiling of prediction;
- end to end: :meth:`pipeline.predict.Predictor.predict` over the first ``--limit`` image files,
  what ``wbc predict`` times: reading, header checks, decoding, squaring and resizing in
  ``--workers`` loader processes while the engine runs, the output table.

Both run on the same ``--threads`` torch threads (ONNX Runtime gets as many intra-op threads), at
the same batch size, in this one process. Each measurement is repeated ``--repeats`` times,
interleaved (forward, end to end, forward, ...), and the best of each is kept: on a machine shared
with other jobs, the best run is the one they disturbed least. Beside images/s, images per CPU second
(this process and its loader processes): other jobs stretch the wall clock, far less the CPU time, so
the ratio per CPU second says what preparing the inputs costs beside the model even on a busy machine.
Prints one JSON line per engine and size, then a table of end to end / forward only (target >= 0.85)
and of onnx / torch forward.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.config import IngestParams, PredictParams, parse_params
from pipeline.inference import save_model
from pipeline.inputs import ImageInput, prepare_input
from pipeline.model_meta import ModelMeta
from pipeline.models import build_classifier, get_backbone
from pipeline.predict import Predictor
from pipeline.sources import walk_files

ENGINES = ("torch", "onnx")


def untrained_model(folder: Path, name: str, image_size: int) -> Path:
    """``name`` with fresh weights at ``image_size``, saved like the train stage saves a model."""
    params = parse_params({})
    backbone = get_backbone(name)
    torch.manual_seed(0)
    model = build_classifier(name, len(params.data.classes), image_size)
    meta = ModelMeta(model=name, classes=tuple(params.data.classes), image_size=image_size, mean=backbone.mean,
                     std=backbone.std, normalize=params.normalize, temperature=1.0)
    path = folder / f"{name}-{image_size}.pt"
    save_model(path, model, meta)
    return path


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the loader processes, once joined)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def rates(run: Callable[[], int]) -> tuple[float, float]:
    """(images per second, images per CPU second) of ``run``, which returns how many images it did."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    images = run()
    return images / (time.perf_counter() - wall), images / (cpu_seconds() - cpu)


def forward_only(predictor: Predictor, batch: torch.Tensor, images: int) -> tuple[float, float]:
    """Rates of the engine alone on ``batch`` (prepared, in memory), ``images`` images in all."""
    batches = max(1, images // len(batch))

    def run() -> int:
        for _ in range(batches):
            predictor.engine.probabilities(batch)
        return batches * len(batch)

    return rates(run)


def end_to_end(predictor: Predictor, items: list[ImageInput]) -> tuple[float, float]:
    """Rates of :meth:`Predictor.predict` over ``items``; images/s is what ``wbc predict`` reports."""

    def run() -> int:
        table = predictor.predict(items)
        if not (table["status"] == "ok").all():
            raise SystemExit(f"inputs were rejected: {table['status'].value_counts().to_dict()}")
        return len(items)

    return rates(run)


def measure(model_path: Path, engine: str, items: list[ImageInput], args: argparse.Namespace) -> dict:
    """Forward-only and end-to-end images/s of ``engine`` on ``model_path``, best of ``args.repeats``."""
    settings = PredictParams(engine=engine, batch_size=args.batch_size, workers=args.workers, device="cpu")
    started = time.perf_counter()
    predictor = Predictor.load(model_path, settings, IngestParams())
    load_seconds = time.perf_counter() - started
    batch = torch.from_numpy(np.stack([prepare_input(item, predictor.checks, predictor.preprocessing,
                                                     predictor.image_size) for item in items[: args.batch_size]]))
    predictor.engine.probabilities(batch)  # warm-up: first-call allocations, ONNX Runtime's arenas
    forward, e2e = [], []
    for _ in range(args.repeats):
        forward.append(forward_only(predictor, batch, len(items)))
        e2e.append(end_to_end(predictor, items))
    return {
        "engine": engine,
        "image_size": predictor.image_size,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "workers": args.workers,
        "images": len(items),
        "load_seconds": round(load_seconds, 2),
        "forward_images_per_s": round(best(forward, 0), 1),
        "end_to_end_images_per_s": round(best(e2e, 0), 1),
        "ratio": round(best(e2e, 0) / best(forward, 0), 3),
        "forward_images_per_cpu_s": round(best(forward, 1), 1),
        "end_to_end_images_per_cpu_s": round(best(e2e, 1), 1),
        "cpu_ratio": round(best(e2e, 1) / best(forward, 1), 3),
        "all_forward": [[round(x, 1) for x in pair] for pair in forward],
        "all_end_to_end": [[round(x, 1) for x in pair] for pair in e2e],
    }


def best(runs: list[tuple[float, float]], which: int) -> float:
    """The highest of one rate over repeated runs."""
    return max(run[which] for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a folder of images (searched recursively), e.g. ../shared/data/pbc")
    parser.add_argument("--limit", type=int, default=1000, help="images per end-to-end run")
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 224])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--batch-size", type=int, default=PredictParams().batch_size)
    parser.add_argument("--workers", type=int, default=PredictParams().workers, help="loader processes")
    parser.add_argument("--threads", type=int, default=2, help="torch (and ONNX Runtime) intra-op threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    files = [str(path) for path in walk_files(args.data)][: args.limit]
    items = [ImageInput(file, file) for file in files]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("XDG_CACHE_HOME", str(Path(tmp) / "cache"))  # exports timed, never reused
        for size in args.sizes:
            model_path = untrained_model(Path(tmp), args.model, size)
            for engine in args.engines:
                results.append({"model": args.model, **measure(model_path, engine, items, args)})
                print(json.dumps(results[-1]), flush=True)
    print(f"\n{args.model}, {len(items)} images, batch {args.batch_size}, {args.threads} threads, "
          f"{args.workers} loader workers, load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| size | engine | forward img/s | end to end img/s | end to end / forward | "
          "forward img/CPU-s | end to end img/CPU-s | ratio per CPU-s | engine load s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['image_size']} | {row['engine']} | {row['forward_images_per_s']} | "
              f"{row['end_to_end_images_per_s']} | {row['ratio']} | {row['forward_images_per_cpu_s']} | "
              f"{row['end_to_end_images_per_cpu_s']} | {row['cpu_ratio']} | {row['load_seconds']} |")
    for size in args.sizes:
        forward = {row["engine"]: row["forward_images_per_s"] for row in results if row["image_size"] == size}
        if len(forward) == 2:
            print(f"{size} px: onnx forward / torch forward = {forward['onnx'] / forward['torch']:.2f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
