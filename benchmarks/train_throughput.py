"""Training images/s through the real data path against its ceiling, per model.

    python benchmarks/train_throughput.py --processed data/processed --models resnet50 efficientnet-b0 \
        --image-size 380 --batch-size 64 --steps 30

- real: the train stage's loader (memory-mapped uint8 images from the normalize stage, the
  augmentation policy applied in loader workers, pinned memory) feeding ``train_step``;
- ceiling: the same ``train_step`` on one uint8 batch already on the device (no loading at all).

Loader, network, loss and optimiser come from the factories the train stage uses
(``pipeline/training.py``), built from the same ``train`` params, so what is timed is what trains.

The ratio real/ceiling says how much the data path holds back the accelerator (target ≥ 0.90 on a
GPU). Without ``--processed``, a synthetic sample is generated and normalized into a temporary
folder first. Both modes run a few warm-up steps (cudnn benchmark, allocator) before timing.
Prints one JSON line per model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import RandomSampler

from pipeline.augment import build_policy
from pipeline.config import PBC_CLASSES, TrainParams, parse_params
from pipeline.data import EpochSampler, ProcessedImages, load_index, select_split
from pipeline.inference import pick_device
from pipeline.normalize import run_normalize
from pipeline.sample import generate_sample
from pipeline.training import Distributed, build_loss, build_model, build_optimizer, make_loader, train_step, wrap_model


def synthetic_processed(folder: Path, size: int, per_class: int) -> Path:
    """Generate and normalize a synthetic sample (every image in the train split)."""
    params = parse_params({"sample": {"per_class": per_class, "size": 128}, "normalize": {"size": size}})
    raw = folder / "raw"
    generate_sample(raw, params.sample, PBC_CLASSES)
    rows = [{"path": str(p.relative_to(raw)), "label": p.parent.name, "split": "train"}
            for p in sorted(raw.glob("*/*.png"))]
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    run_normalize(manifest, raw, folder / "processed", params.normalize, progress=False)
    return folder / "processed"


def timed_steps(step, batches, warmup: int, steps: int, device: torch.device) -> float:
    """Images/s over ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    batches = iter(batches)
    for _ in range(warmup):
        step(*next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seen, start = 0, time.perf_counter()
    for _ in range(steps):
        images, targets = next(batches)
        loss = step(images, targets)
        seen += len(targets)
    float(loss)  # wait for the last step
    return seen / (time.perf_counter() - start)


def train_params(model_name: str, args: argparse.Namespace) -> TrainParams:
    """The ``train`` params of the timed run: the stage's defaults but for the model, size and batch
    (loader workers and compile are runtime settings, given where used); from scratch, so no weights are
    fetched (the step costs the same)."""
    return parse_params({"train": {
        "model": model_name, "pretrained": "none", "image_size": args.image_size, "batch_size": args.batch_size,
    }}).train


def measure(model_name: str, processed: Path, args: argparse.Namespace, device: torch.device) -> dict:
    cfg = train_params(model_name, args)
    index = load_index(processed)
    classes = sorted(set(index["label"]))
    split = select_split(index.assign(split="train"), "train", classes)
    policy = build_policy(parse_params({}).augment)
    dataset = ProcessedImages(processed, split, cfg.image_size, policy, seed=cfg.seed)
    # Drawn with replacement from a bottomless sampler, so warm-up and timed steps never wait on
    # an epoch boundary (worker start-up) whatever the dataset's size.
    loader = make_loader(dataset, cfg, device, EpochSampler(RandomSampler(dataset, replacement=True,
                                                                          num_samples=10**9)), args.workers)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, len(classes), device)
    net = wrap_model(model, cfg, Distributed(), device, args.compile)
    optimizer = build_optimizer(model, cfg)
    loss_fn = build_loss(cfg, split.labels, len(classes), device)
    net.train()

    def step(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return train_step(net, images, targets, loss_fn, optimizer, device, cfg.grad_clip)

    fixed_images, fixed_targets = next(iter(loader))
    fixed_images, fixed_targets = fixed_images.to(device), fixed_targets.to(device)
    ceiling = timed_steps(step, itertools.repeat((fixed_images, fixed_targets)), args.warmup, args.steps, device)
    real = timed_steps(step, loader, args.warmup, args.steps, device)
    result = {
        "model": model_name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "channels_last": True,
        "compile": args.compile,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "loader_workers": args.workers,
        "steps": args.steps,
        "real_images_per_s": round(real, 2),
        "ceiling_images_per_s": round(ceiling, 2),
        "ratio": round(real / ceiling, 3),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        torch.cuda.reset_peak_memory_stats(device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processed", type=Path, help="normalize stage output (default: a synthetic sample)")
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet-b0"])
    parser.add_argument("--image-size", type=int, default=380)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=64, help="synthetic sample size per class")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        processed = args.processed or synthetic_processed(Path(tmp), args.image_size, args.per_class)
        for name in args.models:
            results.append(measure(name, processed, args, device))
            print(json.dumps(results[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    ratios = np.array([r["ratio"] for r in results])
    print(f"real/ceiling ratio: min {ratios.min():.3f}, mean {ratios.mean():.3f}")


if __name__ == "__main__":
    main()
