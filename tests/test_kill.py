"""Stage outputs after a failure or a real kill -9: the next stage works on one complete, consistent set
of files or refuses with a message naming the fix; it never uses a mix of two runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import save_tiny_model, split_manifest, tiny_params

import pipeline.augment
import pipeline.evaluator
import pipeline.ingest
from pipeline.config import PBC_CLASSES, AugmentParams
from pipeline.evaluate import run_evaluate
from pipeline.imaging import ImageReadError
from pipeline.inference import load_model, save_model
from pipeline.ingest import run_ingest
from pipeline.layout import IMAGES_FILE, INDEX_FILE, MANIFEST_FILE, MODEL_FILE
from pipeline.metrics import TEST_PREFIX
from pipeline.normalize import run_normalize
from pipeline.sample import generate_sample
from pipeline.train import run_train

WBC = Path(sys.executable).with_name("wbc")
TEST_METRIC = f"{TEST_PREFIX}macro_f1"
KILLS = 5


@dataclass(frozen=True)
class Trained:
    """A tiny model trained by the train stage, and the processed data it was trained on."""

    processed: Path
    models: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mlflow_store) -> Trained:
    """:func:`tiny_params`' model trained once for this module, logged in the session's store; tests copy
    or only read it."""
    root = tmp_path_factory.mktemp("trained")
    params = tiny_params()
    counts = generate_sample(root / "raw", params.sample, PBC_CLASSES)
    split_manifest(root / "raw", counts).to_csv(root / "manifest.csv", index=False)
    run_normalize(root / "manifest.csv", root / "raw", root / "processed", params.normalize, progress=False)
    pipeline.augment.save_policy(pipeline.augment.build_policy(params.augment), root / "policy.json")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_store)  # module fixtures run before the per-test isolation
        run_train(params, root / "processed", root / "policy.json", root / "models", root / "reports",
                  progress=False)
    return Trained(root / "processed", root / "models")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _project_params(root: Path, raw: Path, **sections):
    params = tiny_params(data={"root": str(raw)}, **sections)
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return params


def _start_wbc(root: Path, *args: str) -> subprocess.Popen:
    if not WBC.is_file():
        pytest.skip(f"{WBC} is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([str(WBC), *args], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _kill(process: subprocess.Popen) -> bool:
    """kill -9 ``process``; False when it had already finished."""
    killed = process.poll() is None
    if killed:
        os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    return killed


# ---------------------------------------------------------------------------------------------
# Failures half-way through writing: the previous outputs stay whole


def test_a_failure_while_ingest_writes_leaves_the_previous_outputs(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    params = tiny_params(data={"root": str(raw)})
    generate_sample(raw, params.sample, PBC_CLASSES)
    interim, reports = tmp_path / "interim", tmp_path / "reports"
    run_ingest(params, interim, reports, progress=False)
    before, report = _snapshot(interim), (reports / "ingest.md").read_bytes()
    next(raw.rglob("*.png")).unlink()  # the data changed, so a new ingest writes other files
    write_csv = pipeline.ingest._write_csv

    def fail_on_rejected(path, columns, rows):
        if Path(path).name == "rejected.csv":
            raise OSError(28, "No space left on device", str(path))
        write_csv(path, columns, rows)

    monkeypatch.setattr(pipeline.ingest, "_write_csv", fail_on_rejected)
    with pytest.raises(OSError):
        run_ingest(params, interim, reports, progress=False)
    assert _snapshot(interim) == before
    assert (reports / "ingest.md").read_bytes() == report
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failed_normalize_leaves_the_previous_outputs(tiny_processed, tmp_path):
    raw, processed, _ = tiny_processed
    before = _snapshot(processed)
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    (raw / manifest["path"].iloc[-1]).write_bytes(b"no longer an image")
    with pytest.raises(ImageReadError):
        run_normalize(tmp_path / "manifest.csv", raw, processed, tiny_params().normalize, progress=False)
    assert _snapshot(processed) == before


def test_a_failure_while_augment_writes_leaves_the_previous_policy(tiny_processed, tmp_path, monkeypatch):
    _, processed, _ = tiny_processed
    policy, preview = tmp_path / "policy.json", tmp_path / "preview.png"
    pipeline.augment.run_augment(processed, AugmentParams(preview_images=2), policy, preview)
    before = policy.read_bytes(), preview.read_bytes()

    def fail(*args, **kwargs):
        raise MemoryError("preview")

    monkeypatch.setattr(pipeline.augment, "preview_grid", fail)
    with pytest.raises(MemoryError):
        pipeline.augment.run_augment(processed, AugmentParams(preview_images=2, hflip=0.1), policy, preview)
    assert (policy.read_bytes(), preview.read_bytes()) == before


def test_a_failure_while_evaluate_writes_leaves_the_previous_report(trained, tmp_path, monkeypatch):
    params = tiny_params(evaluate={"n_bootstrap": 0, "gradcam_per_class": 0, "worst_errors": 2})
    reports = tmp_path / "reports"
    run_evaluate(params, trained.models, trained.processed, tmp_path / "interim", reports)
    before = _snapshot(reports)
    other = tmp_path / "other"
    save_tiny_model(other / MODEL_FILE, temperature=1.5, seed=3, head_std=2.0)  # scores differently

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device", str(reports / "report.html"))

    monkeypatch.setattr(pipeline.evaluator, "_write_report", fail)
    with pytest.raises(OSError):
        run_evaluate(params, other, trained.processed, tmp_path / "interim", reports)
    assert _snapshot(reports) == before
    assert [p.name for p in reports.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------
# model.pt and run.json: one run id, read from the model


def _test_metric_counts() -> dict[str, int]:
    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {run.info.run_id: len(client.get_metric_history(run.info.run_id, TEST_METRIC)) for run in runs}


def test_evaluate_refuses_a_run_record_that_belongs_to_another_run(trained, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(trained.models, models)
    network, meta = load_model(models / MODEL_FILE)
    with mlflow.start_run(experiment_id=mlflow.get_run(meta.run_id).info.experiment_id) as newer:
        pass
    # killed between the two files: model.pt of the newer run beside run.json of the previous one
    save_model(models / MODEL_FILE, network, replace(meta, run_id=newer.info.run_id))
    before = _test_metric_counts()
    with pytest.raises(ValueError, match=r"run\.json.*wbc train"):
        run_evaluate(tiny_params(), models, trained.processed, tmp_path / "interim", tmp_path / "reports")
    assert _test_metric_counts() == before
    (models / "run.json").unlink()
    with pytest.raises(ValueError, match=r"run\.json.*wbc train"):
        run_evaluate(tiny_params(), models, trained.processed, tmp_path / "interim", tmp_path / "reports")
    assert _test_metric_counts() == before


# ---------------------------------------------------------------------------------------------
# Real kill -9 of `wbc normalize`, then train


def _noise_dataset(root: Path, per_class: int, size: int) -> tuple[Path, pd.DataFrame]:
    """Noise images of every class (slow enough to decode that a kill lands while normalize writes)
    and a manifest: 5 train and 2 val images per class, the rest test."""
    rng = np.random.default_rng(0)
    raw, rows = root / "raw", []
    for label in PBC_CLASSES:
        (raw / label).mkdir(parents=True)
        for i in range(per_class):
            path = f"{label}/{i:03d}.png"
            cv2.imwrite(str(raw / path), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            split = "train" if i < 5 else "val" if i < 7 else "test"
            rows.append({"path": path, "label": label, "split": split, "group": f"{label}{i}"})
    return raw, pd.DataFrame(rows)


def _writing_started(root: Path, images: Path, before: os.stat_result | None, leftovers: set[Path]) -> bool:
    if set(root.glob(".processed.tmp-*")) - leftovers:
        return True
    if not images.is_file():
        return False
    now = images.stat()
    return before is None or (now.st_ino, now.st_mtime_ns) != (before.st_ino, before.st_mtime_ns)


@pytest.mark.slow
def test_kill_9_of_normalize_then_train_uses_one_complete_output_or_refuses(tmp_path):
    raw, manifest = _noise_dataset(tmp_path, per_class=50, size=224)
    manifests = {"forward": manifest, "reversed": manifest.iloc[::-1]}
    params = _project_params(tmp_path, raw, train={"epochs": 1})
    expected, seconds = {}, []
    for name, table in manifests.items():
        table.to_csv(tmp_path / f"{name}.csv", index=False)
        summary = run_normalize(tmp_path / f"{name}.csv", raw, tmp_path / f"expected-{name}", params.normalize,
                                progress=False, workers=1)
        expected[name] = np.load(tmp_path / f"expected-{name}" / IMAGES_FILE)
        seconds.append(summary["seconds"])
    write_seconds = max(seconds)
    processed, interim = tmp_path / "processed", tmp_path / "interim"
    interim.mkdir()
    shutil.copy(tmp_path / "forward.csv", interim / MANIFEST_FILE)
    run_normalize(interim / MANIFEST_FILE, raw, processed, params.normalize, progress=False, workers=1)
    policy = tmp_path / "policy.json"
    pipeline.augment.save_policy(pipeline.augment.build_policy(params.augment), policy)

    rng = np.random.default_rng(11)
    kills, outcomes = 0, {"worked": 0, "refused": 0}
    for attempt in range(4 * KILLS):
        if kills == KILLS:
            break
        name = list(manifests)[attempt % 2]  # ingest ran again: the manifest changed
        shutil.copy(tmp_path / f"{name}.csv", interim / MANIFEST_FILE)
        images = processed / IMAGES_FILE
        before = images.stat() if images.is_file() else None
        leftovers = set(tmp_path.glob(".processed.tmp-*"))  # of the previous kill, removed by this run
        process = _start_wbc(tmp_path, "--quiet", "normalize", "--manifest", str(interim / MANIFEST_FILE),
                             "--out", str(processed))
        deadline = time.monotonic() + 120
        while not _writing_started(tmp_path, images, before, leftovers) and process.poll() is None:
            assert time.monotonic() < deadline, "normalize never started writing"
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 1.3 * write_seconds))
        kills += _kill(process)
        models = tmp_path / f"models-{attempt}"
        try:
            run_train(params, processed, policy, models, tmp_path / "reports", ingest_summary=interim / "ingest.json",
                      progress=False)
        except (ValueError, OSError) as exc:
            assert "wbc normalize" in str(exc), exc
            outcomes["refused"] += 1
        else:  # it trained: on the complete output of the manifest it was given, nothing else
            assert np.array_equal(np.load(images), expected[name])
            assert pd.read_csv(processed / INDEX_FILE)["path"].tolist() == manifests[name]["path"].tolist()
            outcomes["worked"] += 1
    assert kills == KILLS, outcomes
    run_normalize(interim / MANIFEST_FILE, raw, processed, params.normalize, progress=False, workers=1)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".processed")] == []  # leftovers cleaned


# ---------------------------------------------------------------------------------------------
# Real kill -9 of `wbc train`, then evaluate and a resumed train


def _evaluate_after_kill(params, root: Path, reports: Path) -> str:
    """Evaluate the model folder as a kill left it: 'worked' (the test metrics went to the run that made
    model.pt, which run.json names too) or 'refused' (with the fix named)."""
    models = root / "models"
    before = _test_metric_counts()
    try:
        run_evaluate(params, models, root / "processed", root / "interim", reports)
    except (ValueError, OSError) as exc:
        assert "wbc train" in str(exc), exc
        assert _test_metric_counts() == before
        return "refused"
    run_id = load_model(models / MODEL_FILE)[1].run_id
    assert json.loads((models / "run.json").read_text())["run_id"] == run_id
    after = _test_metric_counts()
    assert {run for run, n in after.items() if n != before.get(run, 0)} == {run_id}
    return "worked"


def _wbc_train(root: Path) -> subprocess.Popen:
    return _start_wbc(root, "train", "--processed", "processed", "--policy", "policy.json", "--models", "models",
                      "--reports", "reports", "--interim", "interim")


@pytest.mark.slow
def test_kill_9_of_train_then_evaluate_uses_the_run_of_the_model_or_refuses(tiny_processed, tmp_path,
                                                                            isolated_mlflow):
    raw, _, _ = tiny_processed
    epochs = 3
    params = _project_params(tmp_path, raw, train={"epochs": epochs},
                             evaluate={"n_bootstrap": 0, "gradcam_per_class": 0, "worst_errors": 0})
    mlflow.set_tracking_uri(isolated_mlflow)
    started = time.monotonic()
    first = _wbc_train(tmp_path)
    output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, output[-3000:]
    seconds = time.monotonic() - started
    assert _evaluate_after_kill(params, tmp_path, tmp_path / "reports-0") == "worked"

    rng = np.random.default_rng(5)
    kills, outcomes = 0, {"worked": 0, "refused": 0}
    for attempt in range(4 * KILLS):
        if kills == KILLS:
            break
        process = _wbc_train(tmp_path)
        if attempt % 2:  # anywhere in the run
            time.sleep(rng.uniform(0.2, 1.0) * seconds)
        else:  # while it writes its outputs: after the last epoch's line
            for line in process.stdout:
                if line.startswith(f"epoch {epochs}/{epochs}") or f"after epoch {epochs}/{epochs}" in line:
                    break
            time.sleep(rng.uniform(0, 0.8))
        kills += _kill(process)
        outcomes[_evaluate_after_kill(params, tmp_path, tmp_path / f"reports-{attempt + 1}")] += 1
    assert kills == KILLS, outcomes

    last = _wbc_train(tmp_path)  # resumes (or starts afresh) and completes
    output = last.communicate(timeout=600)[0]
    assert last.returncode == 0, output[-3000:]
    assert _evaluate_after_kill(params, tmp_path, tmp_path / "reports-last") == "worked"
    run_id = load_model(tmp_path / "models" / MODEL_FILE)[1].run_id
    assert mlflow.get_run(run_id).info.status == "FINISHED"
