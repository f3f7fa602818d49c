"""Does transfer learning transfer? Pretrained vs the same network from scratch on small subsets.

    python benchmarks/pretrained_vs_scratch.py ../shared/data/pbc --per-class 25 100 \
        --val-per-class 50 --image-size 96 --epochs 10

The dataset is ingested with the project's ingest stage (or ``--manifest`` reuses one), so
duplicate groups never straddle train and val. For each subset size, ``k`` training images per
class are drawn (seeded; the smaller subsets are nested in the larger ones) and one fixed
validation set of ``--val-per-class`` images per class is used for every run. Each arm trains
with the train stage itself (``pipeline.train.run_train``), identical params except
``train.pretrained`` (imagenet vs none), so epochs, schedule, augmentation and batch size match.
Reports the best validation macro-F1 of each arm and the difference, one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.augment import build_policy, save_policy
from pipeline.config import parse_params
from pipeline.ingest import run_ingest
from pipeline.layout import IMAGES_FILE, INDEX_FILE
from pipeline.normalize import run_normalize
from pipeline.train import run_train


def choose_rows(manifest: pd.DataFrame, sizes: list[int], val_per_class: int, seed: int) -> pd.DataFrame:
    """Rows used by any run, with ``train_rank`` (position in the seeded per-class order of the
    train split; subset k takes ranks < k) and the fixed validation rows."""
    rng = np.random.default_rng(seed)
    parts = []
    for label, rows in manifest.groupby("label", sort=True):
        for split, wanted in (("train", max(sizes)), ("val", val_per_class)):
            pool = rows[rows["split"] == split]
            if len(pool) < wanted:
                raise ValueError(f"class {label!r} has {len(pool)} {split} images; {wanted} are needed")
            picked = pool.iloc[rng.permutation(len(pool))[:wanted]].copy()
            picked["train_rank"] = np.arange(wanted) if split == "train" else -1
            parts.append(picked)
    return pd.concat(parts, ignore_index=True)


def subset_dir(processed: Path, rows: pd.DataFrame, k: int, folder: Path) -> Path:
    """A processed folder sharing ``images.npy`` whose index keeps train ranks < k and val."""
    folder.mkdir(parents=True, exist_ok=True)
    index = pd.read_csv(processed / INDEX_FILE, dtype={"path": str, "label": str, "split": str, "group": str})
    rank = rows.set_index("path")["train_rank"]
    keep_train = (index["split"] == "train") & (index["path"].map(rank) < k)
    index.loc[(index["split"] == "train") & ~keep_train, "split"] = "unused"
    index.to_csv(folder / INDEX_FILE, index=False)
    link = folder / IMAGES_FILE
    if not link.exists():
        os.symlink((processed / IMAGES_FILE).resolve(), link)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="folder-per-class dataset, e.g. ../shared/data/pbc")
    parser.add_argument("--manifest", type=Path, help="reuse this ingest manifest instead of ingesting again")
    parser.add_argument("--per-class", type=int, nargs="+", default=[25, 100])
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="loader workers")
    parser.add_argument("--tracking-uri", help="MLflow store for the runs (default: a temporary one)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    base = parse_params({"data": {"root": str(args.data)}})
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("MLFLOW_TRACKING_URI", args.tracking_uri or f"sqlite:///{tmp / 'mlflow.db'}")
        manifest_path = args.manifest
        if manifest_path is None:
            run_ingest(base, out_dir=tmp / "interim", reports_dir=tmp / "reports", progress=False)
            manifest_path = tmp / "interim" / "manifest.csv"
        manifest = pd.read_csv(manifest_path, dtype={"path": str, "label": str, "split": str, "group": str})
        rows = choose_rows(manifest, sorted(args.per_class), args.val_per_class, args.seed)
        rows.drop(columns="train_rank").to_csv(tmp / "subset.csv", index=False)
        normalize = parse_params({"normalize": {"size": args.image_size}}).normalize
        run_normalize(tmp / "subset.csv", args.data, tmp / "processed", normalize, progress=False)
        policy = tmp / "policy.json"
        save_policy(build_policy(base.augment), policy)

        for k in sorted(args.per_class):
            processed = subset_dir(tmp / "processed", rows, k, tmp / f"k{k}")
            for pretrained in ("imagenet", "none"):
                params = parse_params({
                    "data": {"root": str(args.data)},
                    "train": {
                        "model": args.model, "pretrained": pretrained, "image_size": args.image_size,
                        "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
                    },
                    "runtime": {"train_workers": args.workers},
                    "tracking": {"experiment": "benchmark-pretrained-vs-scratch", "log_model": False},
                })
                out = tmp / f"k{k}-{pretrained}"
                started = time.perf_counter()
                result = run_train(params, processed, policy, out / "models", out / "reports", progress=False)
                history = pd.read_csv(out / "reports" / "train_history.csv")
                results.append({
                    "model": args.model, "pretrained": pretrained, "train_per_class": k,
                    "val_per_class": args.val_per_class, "image_size": args.image_size, "epochs": args.epochs,
                    "best_val_macro_f1": round(result["best_val_macro_f1"], 4),
                    "best_epoch": result["best_epoch"],
                    "final_val_macro_f1": round(float(history["val_macro_f1"].iloc[-1]), 4),
                    "seconds": round(time.perf_counter() - started, 1),
                })
                print(json.dumps(results[-1]), flush=True)

    table = pd.DataFrame(results).pivot(index="train_per_class", columns="pretrained", values="best_val_macro_f1")
    table["gain_points"] = ((table["imagenet"] - table["none"]) * 100).round(1)
    print(table.to_string())
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
