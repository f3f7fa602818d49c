"""`wbc predict`: the training data path on new files, per-row rejections, manifests, CLI outputs."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import save_tiny_model, tiny_params
from PIL import Image

from pipeline.calibration import softmax
from pipeline.cli import main
from pipeline.config import IngestParams, PredictParams
from pipeline.data import ProcessedImages, load_index, select_split
from pipeline.inference import load_model, predict_logits
from pipeline.predict import ImageInput, Predictor, collect_inputs
from pipeline.serving import inputs_from_frame

TEMPERATURE = 1.7


@pytest.fixture()
def tiny_model(tmp_path):
    """An untrained baseline-cnn at 32 px saved like the train stage saves it (normalize: 40 px pad)."""
    return save_tiny_model(tmp_path / "model.pt", TEMPERATURE)


def _predictor(model_path, **settings) -> Predictor:
    return Predictor.load(model_path, PredictParams(**{"workers": 0, "device": "cpu", **settings}), IngestParams())


def _probs(table: pd.DataFrame) -> np.ndarray:
    return table[[c for c in table.columns if c.startswith("p_")]].to_numpy(dtype=np.float64)


def test_predict_on_raw_files_equals_the_training_data_path(tiny_processed, tiny_model):
    raw, processed, _ = tiny_processed
    index = load_index(processed)
    split = select_split(index, "train", tiny_params().data.classes)
    model, meta = load_model(tiny_model)
    loader = torch.utils.data.DataLoader(ProcessedImages(processed, split, 32), batch_size=16)
    logits, _ = predict_logits(model, loader, torch.device("cpu"))
    expected = softmax(logits, TEMPERATURE)

    files = [str(raw / path) for path in split.paths]
    table = _predictor(tiny_model, batch_size=5).predict([ImageInput(f, f) for f in files])
    assert table["path"].tolist() == files
    assert (table["status"] == "ok").all()
    np.testing.assert_allclose(_probs(table), expected, atol=1e-6)
    assert table["predicted"].tolist() == [meta.classes[i] for i in expected.argmax(axis=1)]
    np.testing.assert_allclose(table["top_probability"], expected.max(axis=1), atol=1e-6)


def test_loader_workers_and_base64_give_the_same_rows(tiny_processed, tiny_model):
    raw, _, _ = tiny_processed
    files = sorted(str(p) for p in raw.rglob("*.png"))[:10]
    in_process = _predictor(tiny_model, batch_size=4).predict([ImageInput(f, f) for f in files])
    with_workers = _predictor(tiny_model, batch_size=4, workers=2).predict([ImageInput(f, f) for f in files])
    pd.testing.assert_frame_equal(in_process, with_workers)
    frame = pd.DataFrame({"image": [base64.b64encode(Path(f).read_bytes()).decode() for f in files]})
    from_bytes = _predictor(tiny_model, batch_size=4).predict(inputs_from_frame(frame))
    np.testing.assert_array_equal(_probs(from_bytes), _probs(in_process))


def test_bad_inputs_are_rows_with_reasons_and_never_stop_the_batch(tiny_processed, tiny_model, tmp_path):
    raw, _, _ = tiny_processed
    good = sorted(raw.rglob("*.png"))[:2]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.png").write_text("not a picture\n")
    data = good[0].read_bytes()
    (bad / "cut.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (8, 8), (200, 10, 10)).save(bad / "tiny.png")
    Image.new("RGB", (30, 30)).save(bad / "picture.gif")
    items = [ImageInput(str(p), str(p)) for p in [good[0], *sorted(bad.iterdir()), tmp_path / "gone.png", good[1]]]
    items.append(ImageInput("", image_b64="%%% not base64 %%%"))
    items.append(ImageInput(""))
    table = _predictor(tiny_model, batch_size=3).predict(items)
    assert table["status"].tolist() == ["ok", "truncated", "empty-file", "not-an-image", "unsupported-format",
                                        "too-small", "missing-file", "ok", "not-base64", "no-input"]
    rejected = table[table["status"] != "ok"]
    assert rejected[[c for c in table.columns if c.startswith("p_")]].isna().all().all()
    assert rejected["predicted"].isna().all() and rejected["uncertain"].isna().all()
    assert rejected["detail"].str.len().gt(0).all()
    assert "GIF" in table.loc[4, "detail"] and "min_side" in table.loc[5, "detail"]
    ok = table[table["status"] == "ok"]
    np.testing.assert_allclose(_probs(ok).sum(axis=1), 1.0)


def test_folders_are_walked_and_manifest_paths_are_relative_to_the_csv(tiny_processed, tmp_path):
    raw, _, _ = tiny_processed
    from_folder = collect_inputs([raw / "basophil"])
    assert [item.path for item in from_folder] == [str(p) for p in sorted((raw / "basophil").iterdir())]
    manifest = raw / "lists" / "new.csv"
    manifest.parent.mkdir()
    pd.DataFrame({"path": ["../basophil/basophil_0000.png", "", "../nowhere.png"], "note": ["a", "b", "c"]}).to_csv(
        manifest, index=False)
    items = collect_inputs([manifest, raw / "eosinophil" / "eosinophil_0001.png"])
    assert [item.path for item in items] == [str(manifest.parent / "../basophil/basophil_0000.png"), "",
                                             str(manifest.parent / "../nowhere.png"),
                                             str(raw / "eosinophil" / "eosinophil_0001.png")]
    no_path = tmp_path / "wrong.csv"
    no_path.write_text("file,label\na.png,x\n")
    with pytest.raises(ValueError, match=r"wrong\.csv: a manifest needs a 'path' column.*file, label"):
        collect_inputs([no_path])


@pytest.mark.parametrize(("threshold", "uncertain"), [(1.0, True), (0.0, False)])
def test_cli_writes_csv_json_and_summary(tiny_processed, tiny_model, tmp_path, capsys, threshold, uncertain):
    raw, _, _ = tiny_processed
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"predict": {"threshold": threshold, "workers": 0, "device": "cpu"}}))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    out = tmp_path / "out" / "pred.csv"
    code = main(["--quiet", "--params", str(params_file), "predict", str(raw / "ig"), str(tmp_path / "broken.jpg"),
                 "--model", str(tiny_model), "--out", str(out), "--json"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "predict: 7 rows, 6 classified, 1 rejected (truncated=1)" in printed and "images/s" in printed
    table = pd.read_csv(out)
    assert table.columns.tolist() == ["path", "status", "detail", *(f"p_{c}" for c in tiny_params().data.classes),
                                      "predicted", "top_probability", "uncertain"]
    ok = table["status"] == "ok"
    assert table.loc[ok, "uncertain"].astype(bool).tolist() == [uncertain] * 6
    document = json.loads(out.with_suffix(".json").read_text())
    assert document["temperature"] == pytest.approx(TEMPERATURE) and document["threshold"] == threshold
    rows = document["predictions"]
    assert len(rows) == 7 and rows[-1]["status"] == "truncated" and rows[-1]["p_ig"] is None
    assert rows[0]["p_ig"] == pytest.approx(table.loc[0, "p_ig"])


def test_cli_reports_a_missing_model(tmp_path, capsys):
    code = main(["predict", str(tmp_path), "--model", str(tmp_path / "none.pt"), "--out", str(tmp_path / "p.csv")])
    assert code == 2
    assert "none.pt: trained model not found" in capsys.readouterr().err
