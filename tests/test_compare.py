"""`wbc compare`: the runs of one MLflow experiment as CSV, Markdown and a bar plot."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from conftest import REPO
from PIL import Image

from pipeline.cli import main
from pipeline.compare import run_compare

RUNS = [
    # run name, model, pretrained, size, test metrics (None: never evaluated)
    ("small-cnn", "baseline-cnn", "none", 64, {"test_macro_f1": 0.61, "test_balanced_accuracy": 0.63,
                                               "test_ece": 0.12, "test_accuracy": 0.64}),
    ("lite0-96", "efficientnet-lite0", "imagenet", 96, {"test_macro_f1": 0.87, "test_balanced_accuracy": 0.88,
                                                        "test_ece": 0.04, "test_accuracy": 0.89, "test_n": 182,
                                                        "ext_wbcseg_macro_f1": 0.71}),
    ("r18-unevaluated", "resnet18", "imagenet", 128, None),
]


@pytest.fixture()
def experiment(request, isolated_mlflow) -> str:
    name = f"compare-{request.node.name}"
    mlflow.set_tracking_uri(isolated_mlflow)  # the test session's own store, never the project's
    experiment_id = mlflow.create_experiment(name)
    for run_name, model, pretrained, size, metrics in RUNS:
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name):
            mlflow.log_params({"train.model": model, "train.pretrained": pretrained, "train.image_size": size,
                               "train.epochs": 3})
            mlflow.log_metric("best_val_macro_f1", 0.5)
            if metrics:
                mlflow.log_metrics(metrics)
                mlflow.set_tag("dvc.exp_name", f"exp-{run_name}")
    return name


def test_compare_writes_table_markdown_and_plot(experiment, tmp_path):
    table = run_compare(experiment, tmp_path)
    assert table["run_name"].tolist() == ["lite0-96", "small-cnn", "r18-unevaluated"]  # best macro F1 first
    csv = pd.read_csv(tmp_path / "compare.csv")
    assert csv["run_name"].tolist() == table["run_name"].tolist()
    assert csv.loc[0, "model"] == "efficientnet-lite0" and csv.loc[0, "pretrained"] == "imagenet"
    assert csv.loc[0, "image_size"] == 96
    assert csv.loc[0, "test_macro_f1"] == pytest.approx(0.87)
    assert csv.loc[1, "test_ece"] == pytest.approx(0.12)
    assert pd.isna(csv.loc[2, "test_macro_f1"])
    assert csv.loc[0, "ext_wbcseg_macro_f1"] == pytest.approx(0.71)

    summary = (tmp_path / "compare.md").read_text()
    assert summary.startswith(f"# Runs of MLflow experiment {experiment}")
    assert "| Run | Status | Started (UTC) | Model | Pretrained | Image size |" in summary
    lite = next(line for line in summary.splitlines() if line.startswith("| lite0-96 |"))
    assert "| efficientnet-lite0 | imagenet | 96 |" in lite and "| 0.8700 |" in lite and "| 0.7100 |" in lite
    assert "| 182 |" in lite and "| exp-lite0-96 |" in lite  # counts as integers; the DVC experiment named
    unevaluated = next(line for line in summary.splitlines() if line.startswith("| r18-unevaluated |"))
    assert "—" in unevaluated

    with Image.open(tmp_path / "compare.png") as image:
        assert image.format == "PNG" and image.size[0] > 500
        colors = image.convert("RGB").getcolors(maxcolors=1_000_000)
    assert len(colors) > 20  # bars, labels and text, not a blank canvas


def test_compare_cli_and_errors(experiment, tmp_path, capsys):
    reports = tmp_path / "reports"
    assert main(["--params", str(REPO / "params.yaml"), "compare", "--experiment", experiment,
                 "--reports", str(reports)]) == 0
    assert "3 runs" in capsys.readouterr().out
    assert {p.name for p in reports.iterdir()} == {"compare.csv", "compare.md", "compare.png"}
    assert main(["--params", str(REPO / "params.yaml"), "compare", "--experiment", "no-such-experiment",
                 "--reports", str(reports)]) == 1
    err = capsys.readouterr().err
    assert "no MLflow experiment named 'no-such-experiment'" in err and experiment in err
    mlflow.create_experiment(f"{experiment}-empty")
    with pytest.raises(ValueError, match="has no runs"):
        run_compare(f"{experiment}-empty", reports)
