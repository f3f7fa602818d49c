"""Training images/s through the real data path against its ceiling, per model.

    python benchmarks/train_throughput.py --processed data/processed --models resnet50 efficientnet-b0 \
        --image-size 380 --batch-size 64 --steps 30

- real: the train stage's loader (memory-mapped uint8 images from the normalize stage, the saved
  augmentation policy applied in loader workers, pinned memory) feeding ``pipeline.train.train_step``;
- ceiling: the same ``train_step`` on one uint8 batch already on the device (no loading at all).

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
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from pipeline.augment import build_policy
from pipeline.config import PBC_CLASSES, parse_params
from pipeline.data import EpochSampler, ProcessedImages, load_index, select_split
from pipeline.inference import pick_device
from pipeline.models import build_classifier
from pipeline.normalize import run_normalize
from pipeline.sample import generate_sample
from pipeline.train import train_step


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


def measure(model_name: str, processed: Path, args: argparse.Namespace, device: torch.device) -> dict:
    index = load_index(processed)
    classes = sorted(set(index["label"]))
    split = select_split(index.assign(split="train"), "train", classes)
    policy = build_policy(parse_params({}).augment)
    dataset = ProcessedImages(processed, split, args.image_size, policy, seed=0)
    sampler = EpochSampler(RandomSampler(dataset, replacement=True, num_samples=10**9))
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0, drop_last=True,
                        prefetch_factor=4 if args.workers > 0 else None)

    torch.manual_seed(0)
    model = build_classifier(model_name, len(classes), args.image_size).to(device, memory_format=torch.channels_last)
    net = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return train_step(net, images, targets, loss_fn, optimizer, device, grad_clip=1.0)

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
