"""Several ``wbc train`` at once on a fresh MLflow SQLite store: does every run finish, is nothing lost?

    python benchmarks/concurrent_train.py --runs 2 4 --epochs 2

For each count N in ``--runs``: a new SQLite store, then N ``wbc train`` processes started together on
one tiny synthetic dataset (40 px, baseline-cnn, each with its own model and report folders), every one
logging and registering its model under one registered name. Afterwards the store is read back:

- runs: how many, and their statuses (all FINISHED expected);
- metric rows: in all, and per run against what one run logs (each epoch's history, plus the best
  score, best epoch and temperature);
- registry: versions of the registered model (N expected, numbered 1..N), and that each run's
  ``run.json`` names its own run and version;
- ``PRAGMA integrity_check`` of the database.

Prints one JSON line per N and exits 1 when anything is missing or a process failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from pipeline.augment import build_policy, save_policy
from pipeline.config import PBC_CLASSES, parse_params
from pipeline.layout import MODEL_FILE, RUN_INFO_FILE
from pipeline.normalize import run_normalize
from pipeline.sample import generate_sample

HISTORY_METRICS = 6  # per epoch: train_loss, val_loss, val_accuracy, val_macro_f1, lr, seconds
FINAL_METRICS = 3  # once: best_val_macro_f1, best_epoch, temperature
REGISTERED = "wbc-concurrent"
WBC = Path(sys.executable).with_name("wbc")


def tiny_raw_params(root: Path, epochs: int) -> dict:
    """Params of a run that takes seconds: 40 px data, baseline-cnn at 32 px, logged and registered."""
    return {
        "data": {"root": str(root / "raw")},
        "sample": {"per_class": 6, "size": 48, "seed": 0},
        "normalize": {"size": 40},
        "train": {"model": "baseline-cnn", "pretrained": "none", "image_size": 32, "epochs": epochs,
                  "freeze_epochs": 0, "batch_size": 8},
        "runtime": {"train_workers": 0, "normalize_workers": 1, "device": "cpu"},
        "tracking": {"experiment": "concurrent", "log_model": True, "registered_model": REGISTERED},
    }


def prepare(root: Path, epochs: int) -> Path:
    """Write params.yaml, a synthetic sample, its manifest (per class: last image test, the one before
    val, the rest train), the processed data and the policy under ``root``; return the params file."""
    raw = tiny_raw_params(root, epochs)
    params = parse_params(raw)
    counts = generate_sample(root / "raw", params.sample, PBC_CLASSES)
    rows = []
    for label, count in counts.items():
        for i, path in enumerate(sorted((root / "raw" / label).iterdir())):
            split = "test" if i == count - 1 else "val" if i == count - 2 else "train"
            rows.append({"path": f"{label}/{path.name}", "label": label, "split": split, "group": f"{label}{i}"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    run_normalize(root / "manifest.csv", root / "raw", root / "processed", params.normalize, progress=False, workers=1)
    save_policy(build_policy(params.augment), root / "policy.json")
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    return params_file


def train_together(root: Path, params_file: Path, count: int, store: str) -> tuple[list[int], float, list[str]]:
    """Start ``count`` ``wbc train`` at once; their exit codes, the wall time and the tails of failed ones."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    processes = [
        subprocess.Popen([str(WBC), "--quiet", "--params", str(params_file), "train", "--processed",
                          str(root / "processed"), "--policy", str(root / "policy.json"), "--interim",
                          str(root / "interim"), "--models", str(root / f"models-{count}-{i}"), "--reports",
                          str(root / f"reports-{count}-{i}")],
                         cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(count)
    ]
    outputs = [process.communicate(timeout=1800)[0] for process in processes]
    seconds = time.perf_counter() - started
    codes = [process.returncode for process in processes]
    return codes, seconds, [out[-2000:] for out, code in zip(outputs, codes, strict=True) if code != 0]


def store_counts(database: Path, epochs: int) -> dict:
    """Runs by status, metric rows, registry versions and the integrity check, read from the database."""
    with sqlite3.connect(database) as db:
        statuses = dict(db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())
        per_run = [n for (n,) in db.execute(
            "SELECT COUNT(m.key) FROM runs r LEFT JOIN metrics m ON m.run_uuid = r.run_uuid GROUP BY r.run_uuid")]
        versions = sorted(int(v) for (v,) in db.execute("SELECT version FROM model_versions WHERE name = ?",
                                                        (REGISTERED,)))
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    return {"runs": sum(statuses.values()), "statuses": statuses, "metric_rows": sum(per_run),
            "metric_rows_per_run": sorted(set(per_run)), "expected_rows_per_run": epochs * HISTORY_METRICS
            + FINAL_METRICS, "registry_versions": versions, "integrity_check": integrity}


def records_agree(root: Path, count: int) -> bool:
    """Whether every run's run.json names its own run and a distinct registered version, beside its model."""
    import torch

    seen = set()
    for i in range(count):
        models = root / f"models-{count}-{i}"
        record = json.loads((models / RUN_INFO_FILE).read_text())
        meta = torch.load(models / MODEL_FILE, map_location="cpu", weights_only=True)["meta"]
        if record["run_id"] != meta["run_id"]:
            return False
        seen.add(record.get("registered_model_version"))
    return len(seen) == count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, nargs="+", default=[2, 4], help="concurrent runs per round")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each run")
    args = parser.parse_args()
    failed = False
    with tempfile.TemporaryDirectory(prefix="wbc-concurrent-") as folder:
        root = Path(folder)
        params_file = prepare(root, args.epochs)
        for count in args.runs:
            database = root / f"store-{count}" / "mlflow.db"
            codes, seconds, failures = train_together(root, params_file, count, f"sqlite:///{database}")
            counts = store_counts(database, args.epochs)
            agree = not failures and records_agree(root, count)
            ok = (codes == [0] * count and counts["statuses"] == {"FINISHED": count}
                  and counts["metric_rows_per_run"] == [counts["expected_rows_per_run"]]
                  and counts["registry_versions"] == list(range(1, count + 1))
                  and counts["integrity_check"] == "ok" and agree)
            failed |= not ok
            print(json.dumps({"concurrent": count, "ok": ok, "exit_codes": codes, "seconds": round(seconds, 1),
                              **counts, "run_json_matches_model": agree}), flush=True)
            for tail in failures:
                print(tail, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
