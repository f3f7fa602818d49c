"""Where the pipeline's files live: the default folders and the names of the files stages hand on.

The CLI's defaults come from here and ``dvc.yaml`` spells the same paths (a test checks that they
agree), so moving an output is one edit here plus the matching line in ``dvc.yaml``.
"""

from __future__ import annotations

from pathlib import Path

# Default folders, relative to the project root (where ``dvc repro`` runs).
RAW = Path("data/raw")
SAMPLE_DIR = RAW / "synthetic"
INTERIM = Path("data/interim")
PROCESSED = Path("data/processed")
POLICY = Path("data/augment/policy.json")
MODELS = Path("models")
REPORTS = Path("reports")
CROSS_SITE = REPORTS / "crosssite"  # the cross-site stage's table, report, figure and metrics

# Ingest (in INTERIM, report in REPORTS).
MANIFEST_FILE = "manifest.csv"
REJECTED_FILE = "rejected.csv"
INGEST_SUMMARY_FILE = "ingest.json"
INGEST_REPORT_FILE = "ingest.md"
SAMPLE_FILE = "SAMPLE.json"  # marks a raw folder as the generated synthetic sample

SPLITS = ("train", "val", "test")
HOLDOUT = "holdout"  # the split of every image of a site in ingest.holdout_sites: never trained on
MANIFEST_COLUMNS = [
    "path",
    "site",
    "label",
    "sha256",
    "width",
    "height",
    "bytes",
    "split",
    "group",
    "format",
    "mode",
    "phash",
]
REJECTED_COLUMNS = ["path", "site", "reason", "detail"]

# Normalize (in PROCESSED).
IMAGES_FILE = "images.npy"
INDEX_FILE = "index.csv"
NORMALIZE_SUMMARY_FILE = "normalize.json"

# Augment (the policy is POLICY; its preview goes to REPORTS).
AUGMENT_PREVIEW_FILE = "augment_preview.png"

# Train (in MODELS).
MODEL_FILE = "model.pt"
RUN_INFO_FILE = "run.json"  # the MLflow run of model.pt; valid only beside the model naming the same run
