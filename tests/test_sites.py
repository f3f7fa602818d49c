"""Sites in the data model: several sources, a site column, per-site stratified splits, held-out sites."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import ParamsError, parse_params
from pipeline.ingest import run_ingest
from pipeline.sources import IngestError

CLASSES = ["lymphocyte", "neutrophil"]


def _image(path: Path, seed: int, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _folder_site(root: Path, per_class: int, seed: int, classes=CLASSES) -> None:
    for c, cls in enumerate(classes):
        for i in range(per_class):
            _image(root / cls / f"{i:03d}.png", seed * 1000 + c * 100 + i)


def _table_site(root: Path, n: int, seed: int) -> None:
    rows = []
    for i in range(n):
        _image(root / "images" / f"{i:03d}.bmp", seed * 1000 + i)
        rows.append({"image id": i, "class label": 1 + i % 2})
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image id", "class label"])
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def three_sites(tmp_path) -> Path:
    root = tmp_path / "raw"
    _folder_site(root / "lab-a", 12, 1)
    _folder_site(root / "lab-b", 9, 2)
    _table_site(root / "lab-c", 16, 3)
    return root


def _params(root: Path, **ingest):
    return parse_params({
        "data": {
            "root": str(root),
            "classes": CLASSES,
            "sources": [
                {"site": "lab-a", "root": "lab-a"},
                {"site": "lab-b", "root": "lab-b", "um_per_px": 0.1},
                {"site": "lab-c", "root": "lab-c", "source": "table",
                 "tables": [{"file": "labels.csv", "images": "images", "path_pattern": "{id:03d}.bmp"}],
                 "label_map": {"1": "lymphocyte", "2": "neutrophil"}},
            ],
        },
        "ingest": {"near_dup_threshold": 0, **ingest},
        "runtime": {"ingest_workers": 1},
    })


def _manifest(out: Path) -> list[dict]:
    with (out / "manifest.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_every_site_is_ingested_with_its_name_and_stratified_within_site(three_sites, tmp_path):
    summary = run_ingest(_params(three_sites), tmp_path / "interim", tmp_path / "reports", progress=False)
    rows = _manifest(tmp_path / "interim")
    assert summary["sites"] == ["lab-a", "lab-b", "lab-c"] and summary["n_kept"] == 24 + 18 + 16
    assert {row["site"] for row in rows} == {"lab-a", "lab-b", "lab-c"}
    assert all(row["path"].startswith(row["site"] + "/") for row in rows)  # relative to data.root
    for site in summary["sites"]:
        for cls in CLASSES:
            splits = {row["split"] for row in rows if row["site"] == site and row["label"] == cls}
            assert splits == {"train", "val", "test"}, (site, cls, splits)
    assert summary["counts_by_site"]["lab-c"]["train"]["lymphocyte"] > 0
    report = (tmp_path / "reports" / "ingest.md").read_text()
    assert "### Site `lab-b`" in report


def test_held_out_sites_never_reach_train_or_val(three_sites, tmp_path):
    summary = run_ingest(_params(three_sites, holdout_sites=["lab-b"]), tmp_path / "interim",
                         tmp_path / "reports", progress=False)
    rows = _manifest(tmp_path / "interim")
    assert {row["split"] for row in rows if row["site"] == "lab-b"} == {"holdout"}
    assert "holdout" not in {row["split"] for row in rows if row["site"] != "lab-b"}
    assert summary["holdout_sites"] == ["lab-b"]
    assert sum(summary["counts"]["holdout"].values()) == 18
    assert "Held-out sites" in (tmp_path / "reports" / "ingest.md").read_text()


def test_a_copy_of_a_held_out_image_in_a_training_site_is_held_out_too(three_sites, tmp_path):
    copy = three_sites / "lab-a" / "lymphocyte" / "copy.png"
    copy.write_bytes((three_sites / "lab-b" / "lymphocyte" / "000.png").read_bytes())
    run_ingest(_params(three_sites, holdout_sites=["lab-b"]), tmp_path / "interim", tmp_path / "reports",
               progress=False)
    rows = {row["path"]: row for row in _manifest(tmp_path / "interim")}
    assert rows["lab-a/lymphocyte/copy.png"]["split"] == "holdout"
    assert rows["lab-a/lymphocyte/copy.png"]["group"] == rows["lab-b/lymphocyte/000.png"]["group"]


def test_one_source_as_today_keeps_its_paths_and_takes_the_folder_name_as_site(tmp_path):
    root = tmp_path / "My Lab"
    _folder_site(root, 6, 4)
    params = parse_params({"data": {"root": str(root), "classes": CLASSES}, "runtime": {"ingest_workers": 1}})
    run_ingest(params, tmp_path / "interim", tmp_path / "reports", progress=False)
    rows = _manifest(tmp_path / "interim")
    assert {row["site"] for row in rows} == {"my-lab"}
    assert rows[0]["path"].startswith(("lymphocyte/", "neutrophil/"))


def test_a_site_with_an_unknown_class_lists_those_files_with_the_site(three_sites, tmp_path):
    _folder_site(three_sites / "lab-a", 3, 9, classes=["smudge"])
    run_ingest(_params(three_sites), tmp_path / "interim", tmp_path / "reports", progress=False)
    with (tmp_path / "interim" / "rejected.csv").open() as handle:
        rejected = list(csv.DictReader(handle))
    assert len(rejected) == 3
    assert {(r["site"], r["reason"]) for r in rejected} == {("lab-a", "unknown-class")}
    assert all(r["path"].startswith("lab-a/smudge/") for r in rejected)


def test_a_source_without_images_is_an_error_naming_the_site(three_sites, tmp_path):
    (three_sites / "empty").mkdir()
    raw = _params(three_sites).model_dump(mode="json")
    raw["data"]["sources"].append({"site": "lab-d", "root": "empty"})
    with pytest.raises(IngestError, match=r"data.sources\[lab-d\]: no labelled image"):
        run_ingest(parse_params(raw), tmp_path / "interim", tmp_path / "reports", progress=False)


@pytest.mark.parametrize(
    ("data", "ingest", "message"),
    [
        ({"sources": [{"site": "a", "um_per_px": 0}]}, {}, r"data.sources.0.um_per_px: Input should be greater than 0"),
        ({"um_per_px": -1.0}, {}, r"data.um_per_px"),
        ({"sources": [{"site": "Lab A"}]}, {}, r"data.sources.0.site: .*site name 'Lab A'"),
        ({"sources": [{"site": "a"}, {"site": "a"}]}, {}, r"site names must be unique, repeated: a"),
        ({"sources": [{"site": "a"}], "label_map": {"x": "neutrophil"}}, {}, r"give label_map per source"),
        ({"sources": [{"site": "a", "label_map": {"1": "monocyte"}}], "classes": CLASSES}, {},
         r"data.sources\[a\].label_map targets must be in data.classes"),
        ({"sources": [{"site": "a"}, {"site": "b"}]}, {"holdout_sites": ["c"]}, r"holdout_sites \['c'\] are not sites"),
        ({"sources": [{"site": "a"}]}, {"holdout_sites": ["a"]}, r"holds every site"),
    ],
)
def test_bad_site_params_name_the_key(data, ingest, message):
    with pytest.raises(ParamsError, match=message):
        parse_params({"data": {"root": "raw", **data}, "ingest": ingest})


def test_evaluation_reports_every_site_with_intervals_and_which_were_trained_on(tmp_path):
    """Three sites, one held out: the evaluate stage scores the trained-on sites on their test split and
    the held-out site on all its images, in metrics.json, sites.csv, a figure and the report."""
    import json

    import pandas as pd
    from conftest import save_tiny_model, tiny_params

    from pipeline.config import PBC_CLASSES
    from pipeline.evaluate import run_evaluate
    from pipeline.normalize import run_normalize

    root = tmp_path / "raw"
    for seed, site in enumerate(["lab-a", "lab-b", "lab-c"]):
        _folder_site(root / site, 6, 10 + seed, classes=list(PBC_CLASSES))
    params = tiny_params(
        data={"root": str(root), "sources": [{"site": s, "root": s} for s in ["lab-a", "lab-b", "lab-c"]]},
        ingest={"near_dup_threshold": 0, "holdout_sites": ["lab-c"]}, runtime={"ingest_workers": 1},
        evaluate={"n_bootstrap": 50, "worst_errors": 0, "gradcam_per_class": 0},
    )
    run_ingest(params, tmp_path / "interim", tmp_path / "reports", progress=False)
    run_normalize(tmp_path / "interim" / "manifest.csv", root, tmp_path / "processed", params.normalize,
                  progress=False)
    models = tmp_path / "models"
    save_tiny_model(models / "model.pt", temperature=1.0, head_std=1.0)
    flat = run_evaluate(params, models, tmp_path / "processed", tmp_path / "interim", tmp_path / "reports")

    sites = pd.read_csv(tmp_path / "reports" / "sites.csv")
    index = pd.read_csv(tmp_path / "processed" / "index.csv")
    assert sites["site"].tolist() == ["lab-a", "lab-b", "lab-c"]
    assert sites["role"].tolist() == ["trained on", "trained on", "not trained on"]
    assert sites["split"].tolist() == ["test", "test", "holdout"]
    expected_n = [int(((index["site"] == s) & (index["split"] == "test")).sum()) for s in ["lab-a", "lab-b"]]
    assert sites["n"].tolist() == [*expected_n, 48]
    assert (sites["macro_f1_ci_low"] <= sites["macro_f1"]).all()
    assert (sites["macro_f1"] <= sites["macro_f1_ci_high"]).all()
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["site/lab-c/n"] == 48 and "site/lab-c/macro_f1_ci_high" in metrics and flat == metrics
    assert metrics["n"] == sum(expected_n)  # the headline covers the trained-on sites' test split only
    html = (tmp_path / "reports" / "report.html").read_text()
    assert "Performance per site" in html and "never saw lab-c" in html
    assert (tmp_path / "reports" / "figures" / "sites.png").is_file()
