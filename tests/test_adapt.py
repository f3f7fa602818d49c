"""Adapting a trained model to a new site: test-time BatchNorm adaptation and few-shot fine-tuning."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import tiny_params

from pipeline.adapt import choose_shots, run_adapt
from pipeline.augment import build_policy, save_policy
from pipeline.config import PBC_CLASSES
from pipeline.evaluator import Images
from pipeline.external import run_external_evaluate
from pipeline.ingest import run_ingest
from pipeline.normalize import run_normalize
from pipeline.sample import generate_sample
from pipeline.train import run_train


def test_shots_are_whole_groups_seeded_and_leave_every_class_something_to_score():
    y = np.array([0] * 9 + [1] * 4 + [2] * 2 + [-1])
    groups = ["a1", "a1", "a1", "a2", "a3", "a4", "a5", "a6", "a7", "b1", "b2", "b3", "b4", "c1", "c1", "x"]
    images = Images(None, np.arange(len(y)), [str(i) for i in range(len(y))], y)
    shots = choose_shots(images, groups, ["a", "b", "c"], shots=2, seed=0)
    trained_groups = {groups[i] for i in shots.train}
    scored_groups = {groups[i] for i in shots.evaluate}
    assert not trained_groups & scored_groups  # no copy of a shot is ever scored
    assert 15 not in shots.evaluate and 15 not in shots.train  # unknown class: neither
    for c in (0, 1):
        taken = [i for i in shots.train if y[i] == c]
        assert len(taken) >= 2 and any(y[i] == c for i in shots.evaluate)
    assert shots.classes_without_shots == ("c",) and set(np.flatnonzero(y == 2)) <= set(shots.evaluate)
    again = choose_shots(images, groups, ["a", "b", "c"], shots=2, seed=0)
    assert np.array_equal(again.train, shots.train)
    assert not np.array_equal(choose_shots(images, groups, ["a", "b", "c"], shots=2, seed=5).train, shots.train) or \
        len({g for g in groups if g.startswith("a")}) < 3


def _site(tmp_path, name, seed):
    """One synthetic site ingested and normalized on its own: (params, root of DIR/interim + DIR/processed)."""
    raw = tmp_path / "raw"
    sample = {"per_class": 6, "size": 48, "seed": seed, "sites": [{"name": name, "size": 48}]}
    params = tiny_params(sample=sample, data={"root": str(raw / name)}, runtime={"ingest_workers": 1},
                         train={"model": "resnet18", "epochs": 2},
                         tracking={"registered_model": "tests-adapted", "log_model": True},
                         evaluate={"n_bootstrap": 20, "worst_errors": 0, "gradcam_per_class": 0},
                         adapt={"epochs": 2})
    generate_sample(raw, params.sample, PBC_CLASSES)
    out = tmp_path / name
    run_ingest(params, out / "interim", out, progress=False)
    run_normalize(out / "interim" / "manifest.csv", raw / name, out / "processed", params.normalize, progress=False)
    return params, out


@pytest.mark.slow
def test_bn_adaptation_and_few_shot_adaptation_on_a_new_site(tmp_path, isolated_mlflow):
    params, home = _site(tmp_path, "barcelona-like", 0)
    policy = tmp_path / "policy.json"
    save_policy(build_policy(params.augment), policy)
    models, reports = tmp_path / "models", tmp_path / "reports"
    trained = run_train(params, home / "processed", policy, models, reports, progress=False)
    _, new_site = _site(tmp_path, "jiangxi-like", 1)

    plain = run_external_evaluate(params, models, new_site, reports, name="lab-b")
    adapted = run_external_evaluate(params, models, new_site, reports, name="lab-b", adapt_bn=True)
    assert plain["n"] == adapted["n"] == 48
    assert "recomputed on these same images" in (reports / "external" / "lab-b-adapted-bn" / "report.md").read_text()
    assert (reports / "external" / "lab-b" / "metrics.json").is_file()

    metrics = run_adapt(params, models, new_site, 2, name="lab-b", models_root=tmp_path / "adapted",
                        reports_root=tmp_path / "adapt-reports", progress=False)
    out = tmp_path / "adapt-reports" / "lab-b-2shot"
    shots = pd.read_csv(out / "shots.csv")
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(shots) >= 2 * len(PBC_CLASSES) and metrics["n"] == 48 - len(shots)
    assert not set(shots["path"]) & set(predictions["path"])
    assert json.loads((out / "metrics.json").read_text())["n"] == metrics["n"]

    record = json.loads((tmp_path / "adapted" / "lab-b-2shot" / "run.json").read_text())
    run = mlflow.get_run(record["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == trained["run_id"] and run.data.tags["wbc.kind"] == "few-shot"
    assert run.data.params["shots"] == "2" and "adapted_macro_f1" in run.data.metrics
    versions = mlflow.MlflowClient().search_model_versions("name = 'tests-adapted'")
    assert {v.run_id for v in versions} >= {trained["run_id"], record["run_id"]}
