"""External validation: a model on another ingested + normalized dataset with its own labels,
one of them a class the model does not know."""

from __future__ import annotations

import json
import re

import mlflow
import pandas as pd
import pytest
import yaml
from conftest import tiny_params
from sklearn import metrics as skm

from pipeline.cli import main
from pipeline.config import parse_params
from pipeline.external import locate_dataset, parse_map, resolve_mapping, run_external_evaluate, safe_name
from pipeline.ingest import run_ingest
from pipeline.normalize import run_normalize
from pipeline.sample import generate_sample

EXTERNAL_PARAMS = {
    # the other dataset's own names: a code, a plural, and a class the model never saw
    "data": {"classes": ["NEU", "Lymphocytes", "smudge"]},
    "sample": {"per_class": 6, "size": 48, "seed": 5},
    "ingest": {"split_method": "quota", "near_dup_threshold": 0},
    "normalize": {"size": 36},
    "runtime": {"ingest_workers": 1, "normalize_workers": 1},
}
# generated folder -> the other dataset's label
RENAME = {"neutrophil": "NEU", "lymphocyte": "Lymphocytes", "platelet": "smudge"}


@pytest.fixture()
def trained(tiny_trained):
    params = tiny_params(evaluate={"n_bootstrap": 30, "worst_errors": 4, "gradcam_per_class": 1})
    return params, tiny_trained.models


@pytest.fixture()
def external(tmp_path) -> tuple:
    """DIR/interim and DIR/processed of a 3-class dataset made by the real ingest and normalize stages."""
    raw = tmp_path / "other_raw"
    raw_params = EXTERNAL_PARAMS["sample"]
    generate_sample(raw, parse_params({"sample": raw_params}).sample, list(RENAME))
    for source, label in RENAME.items():
        (raw / source).rename(raw / label)
    params = parse_params({**EXTERNAL_PARAMS, "data": {**EXTERNAL_PARAMS["data"], "root": str(raw)}})
    dataset = tmp_path / "otherlab"
    run_ingest(params, out_dir=dataset / "interim", reports_dir=dataset / "reports", progress=False)
    run_normalize(dataset / "interim" / "manifest.csv", raw, dataset / "processed", params.normalize, progress=False)
    index = pd.read_csv(dataset / "processed" / "index.csv")
    return dataset, index


@pytest.mark.slow  # the session's tiny model is trained for it
def test_external_report_metrics_and_unknown_class(trained, external, tmp_path):
    params, models = trained
    dataset, index = external
    reports = tmp_path / "reports"
    flat = run_external_evaluate(params, models, dataset, reports, label_map={"NEU": "neutrophil"})
    out = reports / "external" / "otherlab"
    for name in ("metrics.json", "per_class.csv", "predictions.csv", "unknown.csv", "report.html", "report.md",
                 "figures/confusion.png", "figures/worst_errors.png", "figures/gradcam.png",
                 "figures/unknown_classes.png"):
        assert (out / name).is_file(), name
    n_smudge = int((index["label"] == "smudge").sum())
    assert flat["n"] == len(index) - n_smudge and flat["n_unknown"] == n_smudge
    assert json.loads((out / "metrics.json").read_text()) == flat

    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == len(index)
    assert dict(zip(predictions["actual"], predictions["mapped"], strict=True)) == {
        "NEU": "neutrophil", "Lymphocytes": "lymphocyte", "smudge": "(unknown to the model)"}
    known = predictions[predictions["mapped"] != "(unknown to the model)"]
    assert flat["accuracy"] == pytest.approx((known["mapped"] == known["predicted"]).mean())
    # macro averages run over the classes present, not over all eight the model knows
    expected_f1 = skm.f1_score(known["mapped"], known["predicted"], labels=["lymphocyte", "neutrophil"],
                               average="macro", zero_division=0)
    assert flat["macro_f1"] == pytest.approx(expected_f1)
    assert set(pd.read_csv(out / "per_class.csv")["class"]) == {"lymphocyte", "neutrophil"}
    assert not any(key.endswith("/platelet") or key.endswith("/basophil") for key in flat)

    unknown = pd.read_csv(out / "unknown.csv")
    assert set(unknown["label"]) == {"smudge"} and unknown["images"].sum() == n_smudge
    smudge = predictions[predictions["actual"] == "smudge"]["predicted"].value_counts()
    assert dict(zip(unknown["predicted"], unknown["images"], strict=True)) == smudge.to_dict()
    assert unknown["share_of_label"].sum() == pytest.approx(1.0)

    page = (out / "report.html").read_text()
    title = re.search(r"<title>(.*?)</title>", page).group(1)
    assert "External validation" in title and "otherlab" in title and "all images" in title
    assert "SYNTHETIC DATA" in title  # the generated sample stays marked as such
    assert "Images of classes the model does not know" in page and "smudge" in page
    assert f"All metrics: all images (train, val and test splits) of external dataset otherlab, n = {flat['n']}" \
        in page
    assert "NEU → neutrophil" in page and "--map" in page
    assert f"{n_smudge} images of classes the model does not know (smudge)" in page
    summary = (out / "report.md").read_text()
    assert "## Images of classes the model does not know" in summary and "(figures/gradcam.png)" in summary

    run_id = json.loads((models / "run.json").read_text())["run_id"]
    run = mlflow.get_run(run_id)
    assert run.data.metrics["ext_otherlab_accuracy"] == pytest.approx(flat["accuracy"])
    assert run.data.metrics["ext_otherlab_n_unknown"] == n_smudge
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "external/otherlab")}
    assert {"external/otherlab/report.html", "external/otherlab/unknown.csv", "external/otherlab/figures"} <= artifacts


@pytest.mark.slow  # the session's tiny model is trained for it
def test_external_split_and_cli(trained, external, tmp_path, capsys):
    params, models = trained
    dataset, index = external
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    reports = tmp_path / "reports"
    code = main(["--params", str(params_file), "evaluate", "--models", str(models), "--reports",
                 str(reports), "--dataset", str(dataset), "--name", "lab B", "--split", "test", "--map",
                 "NEU=neutrophil"])
    assert code == 0, capsys.readouterr().err
    assert "external/lab-B/report.html" in capsys.readouterr().out
    out = reports / "external" / "lab-B"
    test_rows = index[index["split"] == "test"]
    predictions = pd.read_csv(out / "predictions.csv")
    assert sorted(predictions["path"]) == sorted(test_rows["path"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] + metrics["n_unknown"] == len(test_rows)
    page = (out / "report.html").read_text()
    assert "External validation: baseline-cnn on external dataset lab-B, test split" in page
    assert "All metrics: test split of external dataset lab-B" in page

    # external-only options without --dataset, and a bad mapping, are clean errors
    assert main(["--params", str(params_file), "evaluate", "--split", "test"]) == 2
    assert "--split only apply with --dataset" in capsys.readouterr().err
    assert main(["--params", str(params_file), "evaluate", "--models", str(models), "--reports", str(reports),
                 "--dataset", str(dataset), "--map", "NEU=neutro"]) == 1
    assert "not classes of the model" in capsys.readouterr().err


def test_mapping_rules_and_errors(tmp_path):
    classes = ["lymphocyte", "neutrophil"]
    assert resolve_mapping(["NEU", "Lymphocytes", "smudge"], classes, {"NEU": "neutrophil"}) == {
        "NEU": "neutrophil", "Lymphocytes": "lymphocyte", "smudge": None}
    assert resolve_mapping(["lymphocyte"], classes, {"lymphocyte": None}) == {"lymphocyte": None}
    with pytest.raises(ValueError, match="not classes of the model.*lymphocyte, neutrophil"):
        resolve_mapping(["NEU"], classes, {"NEU": "neutro"})
    with pytest.raises(ValueError, match=r"labels \['NUE'\] that the external dataset does not have; its labels a"):
        resolve_mapping(["NEU"], classes, {"NUE": "neutrophil"})
    assert parse_map(["SNE=neutrophil", " BNE = "]) == {"SNE": "neutrophil", "BNE": None}
    with pytest.raises(ValueError, match="LABEL=CLASS"):
        parse_map(["neutrophil"])
    assert safe_name("lab B/2024") == "lab-B-2024"
    with pytest.raises(ValueError, match="--name"):
        safe_name("///")
    with pytest.raises(FileNotFoundError, match="ingest.json.*wbc ingest"):
        locate_dataset(tmp_path)
