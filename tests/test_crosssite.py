"""The cross-site stage: leave each site out, train on the others, score the one left out."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest
from conftest import tiny_params

from pipeline.augment import build_policy, save_policy
from pipeline.config import PBC_CLASSES
from pipeline.crosssite import folds, report_markdown, run_crosssite
from pipeline.ingest import run_ingest
from pipeline.normalize import run_normalize
from pipeline.sample import generate_sample

SITES = ["barcelona-like", "jiangxi-like", "tehran-like"]


def _multi_site(tmp_path, sites=SITES, **train):
    """Synthetic sites ingested (one source each) and normalized; returns (params, processed, policy)."""
    raw = tmp_path / "raw"
    sample = {"per_class": 6, "size": 48, "seed": 0, "sites": [{"name": s, "size": 48} for s in sites]}
    params = tiny_params(
        sample=sample,
        data={"root": str(raw), "sources": [{"site": s, "root": s} for s in sites]},
        ingest={"near_dup_threshold": 0}, runtime={"ingest_workers": 1},
        train={"epochs": 2, **train},
        evaluate={"n_bootstrap": 50},
        crosssite={"adapt_bn": True},
        tracking={"experiment": f"crosssite-{tmp_path.name}", "log_model": False},  # this test's runs only
    )
    generate_sample(raw, params.sample, PBC_CLASSES)
    run_ingest(params, tmp_path / "interim", tmp_path / "reports", progress=False)
    processed = tmp_path / "processed"
    run_normalize(tmp_path / "interim" / "manifest.csv", raw, processed, params.normalize, progress=False)
    policy = tmp_path / "policy.json"
    save_policy(build_policy(params.augment), policy)
    return params, processed, policy


def test_folds_leave_out_each_site_and_train_on_the_others():
    index = pd.DataFrame({"site": ["a", "a", "b", "b", "c"], "split": ["train", "val", "train", "val", "holdout"]})
    assert [(f.left_out, f.trained_on) for f in folds(index)] == [("a", ("b",)), ("b", ("a",)), ("c", ("a", "b"))]
    assert [f.left_out for f in folds(index, ["b"])] == ["b"]


@pytest.mark.slow
def test_leave_one_site_out_scores_every_site_it_did_not_train_on(tmp_path, isolated_mlflow):
    params, processed, policy = _multi_site(tmp_path)
    out = tmp_path / "reports" / "crosssite"
    metrics = run_crosssite(params, processed, policy, out, progress=False)

    table = pd.read_csv(out / "sites.csv")
    index = pd.read_csv(processed / "index.csv")
    assert table["left_out"].tolist() == SITES
    for record in table.to_dict("records"):
        others = [s for s in SITES if s != record["left_out"]]
        assert record["trained_on"].split() == others
        assert record["out_of_site_n"] == int((index["site"] == record["left_out"]).sum())  # every image
        in_site = int((index["site"].isin(others) & (index["split"] == "test")).sum())
        assert record["in_site_n"] == in_site
        for kind in ("out_of_site", "in_site"):
            low, value, high = (record[f"{kind}_macro_f1{s}"] for s in ("_ci_low", "", "_ci_high"))
            assert 0 <= low <= value <= high <= 1
    assert metrics["sites"] == 3
    assert metrics["worst_out_of_site_macro_f1"] == pytest.approx(table["out_of_site_macro_f1"].min())
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    report = (out / "report.md").read_text()
    assert all(f"| {site} |" in report for site in SITES) and (out / "cross_site.png").is_file()

    experiment = params.tracking.experiment
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string="tags.`wbc.kind` = 'cross-site'")
    assert len(runs) == 1
    children = mlflow.search_runs(experiment_names=[experiment],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{runs.run_id[0]}'")
    assert sorted(children["tags.wbc.left_out_site"]) == sorted(SITES)


@pytest.mark.slow
def test_bn_adaptation_is_scored_for_a_network_with_batchnorm(tmp_path, isolated_mlflow):
    params, processed, policy = _multi_site(tmp_path, sites=SITES[:2], model="resnet18", epochs=1)
    params = params.model_copy(update={"crosssite": params.crosssite.model_copy(update={"sites": [SITES[1]]})})
    run_crosssite(params, processed, policy, tmp_path / "out", progress=False)
    table = pd.read_csv(tmp_path / "out" / "sites.csv")
    assert table["left_out"].tolist() == [SITES[1]]
    assert table.loc[0, "adapted_bn_n"] == table.loc[0, "out_of_site_n"]
    assert 0 <= table.loc[0, "adapted_bn_macro_f1"] <= 1
    assert "after BN adaptation" in (tmp_path / "out" / "report.md").read_text()


def test_one_site_says_there_is_nothing_to_leave_out(tiny_processed, tmp_path):
    raw, processed, policy = tiny_processed
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    manifest.insert(1, "site", "only-lab")
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    run_normalize(tmp_path / "manifest.csv", raw, processed, tiny_params().normalize, progress=False)
    metrics = run_crosssite(tiny_params(), processed, policy, tmp_path / "out", progress=False)
    assert metrics == {"sites": 0.0}
    assert "there is no site to leave out" in (tmp_path / "out" / "report.md").read_text()


def test_report_says_when_the_colour_reference_saw_a_left_out_site():
    table = pd.DataFrame([{"left_out": s, "trained_on": "x", "out_of_site_n": 3} for s in ("lab-a", "lab-b")])
    plain = report_markdown(table, tiny_params())
    assert "Colour reference" not in plain
    stained = report_markdown(table, tiny_params(normalize={"stain": "reinhard"}))
    assert "unlabelled pixels of lab-a, lab-b" in stained and "ingest.holdout_sites" in stained
    held_out = report_markdown(table.iloc[:1], tiny_params(
        normalize={"stain": "reinhard"}, ingest={"holdout_sites": ["lab-a"]},
        data={"sources": [{"site": "lab-a", "root": "a"}, {"site": "lab-b", "root": "b"}]}))
    assert "Colour reference" not in held_out
