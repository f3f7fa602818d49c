"""Shared fixtures: tiny generated datasets, one tiny model trained per session, and an isolated MLflow
store per test."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from pipeline.augment import build_policy, save_policy
from pipeline.config import PBC_CLASSES, Params, parse_params
from pipeline.normalize import run_normalize
from pipeline.sample import generate_sample

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> str:
    """One throw-away SQLite MLflow store for the test session (creating one costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def cache_home(tmp_path_factory) -> Path:
    """The session's XDG cache (ONNX exports the predict engine caches), never the user's."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def isolated_cache(cache_home, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    return cache_home


@pytest.fixture(autouse=True)
def isolated_mlflow(mlflow_store, monkeypatch) -> str:
    """Tests log into the session's store, never the project's."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    return mlflow_store


def tiny_params(**sections):
    """Params for tiny, fast runs; ``sections`` override whole keys per section."""
    raw = {
        "sample": {"per_class": 6, "size": 48, "seed": 0},
        "normalize": {"size": 40},
        "augment": {"preview_images": 2},
        "train": {
            "model": "baseline-cnn",
            "pretrained": "none",
            "image_size": 32,
            "epochs": 3,
            "freeze_epochs": 0,
            "batch_size": 8,
            "lr": 0.003,
        },
        "runtime": {"train_workers": 0, "normalize_workers": 1},
        "tracking": {"experiment": "tests", "log_model": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return parse_params(raw)


def one_backbone_per_family() -> list[str]:
    """The first registered backbone of each family: networks of one family are built by the same code and
    differ only in size and weights, so one of each covers them."""
    from pipeline.models import BACKBONES

    first: dict[str, str] = {}
    for name, backbone in BACKBONES.items():
        first.setdefault(backbone.family, name)
    return list(first.values())


def split_manifest(root: Path, per_class: dict[str, int]) -> pd.DataFrame:
    """A hand-made manifest of a folder-per-class tree: per class, the last image is test,
    the one before it val, the rest train (independent of the ingest stage)."""
    rows = []
    for name, count in per_class.items():
        for i, path in enumerate(sorted((root / name).iterdir())):
            split = "test" if i == count - 1 else "val" if i == count - 2 else "train"
            rows.append({"path": f"{name}/{path.name}", "label": name, "sha256": f"{name}{i}", "width": 0,
                         "height": 0, "bytes": path.stat().st_size, "split": split, "group": f"{name}{i}"})
    return pd.DataFrame(rows)


def make_tiny_processed(root: Path) -> tuple[Path, Path, Path]:
    """(raw root, processed dir, policy path) of a 6-per-class synthetic sample at 40 px, made under ``root``."""
    params = tiny_params()
    raw = root / "raw"
    counts = generate_sample(raw, params.sample, PBC_CLASSES)
    manifest = split_manifest(raw, counts)
    manifest_path = root / "manifest.csv"
    manifest.to_csv(manifest_path, index=False)
    processed = root / "processed"
    run_normalize(manifest_path, raw, processed, params.normalize, progress=False,
                  workers=params.runtime.normalize_workers)
    policy = root / "policy.json"
    save_policy(build_policy(params.augment), policy)
    return raw, processed, policy


@pytest.fixture()
def tiny_processed(tmp_path) -> tuple[Path, Path, Path]:
    """(raw root, processed dir, policy path) for a 6-per-class synthetic sample at 40 px."""
    return make_tiny_processed(tmp_path)


@dataclass(frozen=True)
class TinyRun:
    """The session's tiny trained model: its params, data and the train stage's model folder."""

    params: Params
    raw: Path
    processed: Path
    policy: Path
    models: Path
    reports: Path


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory, mlflow_store) -> TinyRun:
    """:func:`tiny_params`' baseline-cnn trained once per session by the train stage, logged in the session's
    MLflow store. Tests only read it: they evaluate it into folders of their own."""
    from pipeline.train import run_train

    root = tmp_path_factory.mktemp("tiny_trained")
    raw, processed, policy = make_tiny_processed(root)
    params = tiny_params()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_store)  # session fixtures run before the per-test isolation
        run_train(params, processed, policy, root / "models", root / "reports", progress=False)
    return TinyRun(params, raw, processed, policy, root / "models", root / "reports")


def save_tiny_model(path: Path, temperature: float, seed: int = 0, head_std: float | None = None) -> Path:
    """An untrained baseline-cnn at 32 px saved the way the train stage saves one (normalize
    params of :func:`tiny_params`, 40 px pad); ``head_std`` widens the logits' spread so the
    probabilities are not all ~1/8."""
    import torch

    from pipeline.inference import save_model
    from pipeline.model_meta import ModelMeta
    from pipeline.models import build_classifier, get_backbone

    torch.manual_seed(seed)
    params = tiny_params()
    model = build_classifier("baseline-cnn", 8, 32)
    if head_std is not None:
        with torch.no_grad():
            model.net.fc.weight.normal_(std=head_std)
    backbone = get_backbone("baseline-cnn")
    meta = ModelMeta(model="baseline-cnn", classes=tuple(params.data.classes), image_size=32, mean=backbone.mean,
                     std=backbone.std, normalize=params.normalize, temperature=temperature)
    save_model(path, model, meta)
    return path
