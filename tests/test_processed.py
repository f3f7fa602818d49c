"""The processed folder as one unit: normalize records what it holds, and every reader refuses files that do
not belong together (or to the manifest it was given) with the file and the fix named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import save_tiny_model, tiny_params

from pipeline.augment import run_augment
from pipeline.config import AugmentParams
from pipeline.crosssite import run_crosssite
from pipeline.evaluate import run_evaluate
from pipeline.external import locate_dataset
from pipeline.layout import (
    IMAGES_FILE,
    INDEX_FILE,
    INGEST_SUMMARY_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    NORMALIZE_SUMMARY_FILE,
    REJECTED_FILE,
)
from pipeline.normalize import run_normalize
from pipeline.processed import ProcessedDataError, check_processed, file_sha256
from pipeline.train import run_train


@pytest.fixture()
def two_runs(tiny_processed, tmp_path):
    """(raw, processed of manifest.csv, processed of the same rows in reverse order, policy)."""
    raw, processed, policy = tiny_processed
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    manifest.iloc[::-1].to_csv(tmp_path / "reversed.csv", index=False)
    other = tmp_path / "other"
    run_normalize(tmp_path / "reversed.csv", raw, other, tiny_params().normalize, progress=False)
    return raw, processed, other, policy


def test_normalize_records_its_manifest_and_what_it_wrote(tiny_processed, tmp_path):
    _, processed, _ = tiny_processed
    record = json.loads((processed / NORMALIZE_SUMMARY_FILE).read_text())
    assert record["manifest_sha256"] == file_sha256(tmp_path / "manifest.csv")
    assert record["index_sha256"] == file_sha256(processed / INDEX_FILE)
    assert record["images_shape"] == [48, 40, 40, 3]
    check_processed(processed, tmp_path / "manifest.csv")
    assert sorted(p.name for p in processed.iterdir()) == sorted(
        [IMAGES_FILE, INDEX_FILE, NORMALIZE_SUMMARY_FILE, REJECTED_FILE])
    assert pd.read_csv(processed / REJECTED_FILE).empty  # framing off: no image is rejected


def test_train_refuses_images_of_another_normalize_run(two_runs, tmp_path):
    _, processed, other, policy = two_runs
    shutil.copy(other / IMAGES_FILE, processed / IMAGES_FILE)  # same shape, rows in another order
    with pytest.raises(ProcessedDataError, match=r"images\.npy does not hold the images .*wbc normalize"):
        run_train(tiny_params(), processed, policy, tmp_path / "models", tmp_path / "reports", progress=False)
    assert not (tmp_path / "models" / MODEL_FILE).exists()


def test_train_and_evaluate_refuse_data_of_another_manifest(two_runs, tmp_path):
    _, processed, _, policy = two_runs
    interim = tmp_path / "interim"
    interim.mkdir()
    shutil.copy(tmp_path / "reversed.csv", interim / MANIFEST_FILE)  # ingest ran again; normalize did not
    with pytest.raises(ProcessedDataError, match=r"another manifest than .*manifest\.csv.*wbc normalize"):
        run_train(tiny_params(), processed, policy, tmp_path / "models", tmp_path / "reports",
                  ingest_summary=interim / "ingest.json", progress=False)
    save_tiny_model(tmp_path / "models" / MODEL_FILE, temperature=1.0)
    with pytest.raises(ProcessedDataError, match="another manifest"):
        run_evaluate(tiny_params(), tmp_path / "models", processed, interim, tmp_path / "reports")
    assert not (tmp_path / "reports").exists()


def test_augment_and_crosssite_refuse_a_mixed_folder(two_runs, tmp_path):
    _, processed, other, policy = two_runs
    shutil.copy(other / INDEX_FILE, processed / INDEX_FILE)
    with pytest.raises(ProcessedDataError, match=r"index\.csv is not the index"):
        run_augment(processed, AugmentParams(), tmp_path / "new-policy.json", tmp_path / "preview.png")
    with pytest.raises(ProcessedDataError, match=r"index\.csv is not the index"):
        run_crosssite(tiny_params(), processed, policy, tmp_path / "crosssite", progress=False)
    assert not (tmp_path / "new-policy.json").exists() and not (tmp_path / "crosssite").exists()


def test_rows_that_disagree_are_named(tiny_processed):
    _, processed, _ = tiny_processed
    index = pd.read_csv(processed / INDEX_FILE)
    index.iloc[:-1].to_csv(processed / INDEX_FILE, index=False)
    with pytest.raises(ProcessedDataError, match=r"holds 48 images but .*index\.csv lists 47 rows"):
        check_processed(processed)


def test_a_truncated_array_is_refused(tiny_processed):
    _, processed, _ = tiny_processed
    path = processed / IMAGES_FILE
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ProcessedDataError, match=r"images\.npy: incomplete or damaged"):
        check_processed(processed)


def test_output_of_a_version_without_the_record_is_refused(tiny_processed):
    _, processed, _ = tiny_processed
    summary = processed / NORMALIZE_SUMMARY_FILE
    summary.write_text(json.dumps({"images": 48, "size": 40}))
    with pytest.raises(ProcessedDataError, match=r"does not record manifest_sha256.*wbc normalize"):
        check_processed(processed)
    summary.unlink()
    with pytest.raises(FileNotFoundError, match="run `wbc normalize`"):
        check_processed(processed)


def test_pixels_changed_after_normalize_are_refused(tiny_processed):
    _, processed, _ = tiny_processed
    images = np.load(processed / IMAGES_FILE, mmap_mode="r+")
    images[-1] = 0  # the last row black, as a run stopped part-way leaves it
    images.flush()
    with pytest.raises(ProcessedDataError, match="stopped part-way"):
        check_processed(processed)


def test_normalize_will_not_replace_a_folder_holding_other_files(tiny_processed, tmp_path):
    raw, _, _ = tiny_processed
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds notes\.txt besides the normalize stage's outputs"):
        run_normalize(tmp_path / "manifest.csv", raw, shared, tiny_params().normalize, progress=False)
    assert [p.name for p in shared.iterdir()] == ["notes.txt"]


def test_external_datasets_are_checked_like_the_pipeline_s_own(tiny_processed, tmp_path):
    """wbc evaluate --dataset and wbc adapt read DIR/interim and DIR/processed: a processed folder made
    from another manifest than the one beside it is refused before anything is scored."""
    interim = tmp_path / "interim"
    interim.mkdir()
    (interim / INGEST_SUMMARY_FILE).write_text("{}")
    shutil.copy(tmp_path / "manifest.csv", interim / MANIFEST_FILE)
    assert locate_dataset(tmp_path) == (interim, tmp_path / "processed")
    manifest = pd.read_csv(interim / MANIFEST_FILE)
    manifest.iloc[:-1].to_csv(interim / MANIFEST_FILE, index=False)  # ingest ran again, normalize did not
    with pytest.raises(ProcessedDataError, match="wbc normalize"):
        locate_dataset(tmp_path)
