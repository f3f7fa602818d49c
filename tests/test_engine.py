"""``predict.engine``: ONNX Runtime on the parity-checked export gives the torch engine's predictions
(probabilities within 1e-4, same rows and reasons), in ``wbc predict`` and in the served model; the
export is made once per model file and cached."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import save_tiny_model, tiny_params

from pipeline import engines, export
from pipeline.config import IngestParams, PredictParams
from pipeline.engines import OnnxEngine, TorchEngine
from pipeline.predict import ImageInput, Predictor, run_predict
from pipeline.serving import WEIGHTS_ARTIFACT, WbcPyfuncModel, model_config, serving_requirements

TEMPERATURE = 1.3
TOLERANCE = 1e-4


@pytest.fixture()
def tiny_model(tmp_path):
    """An untrained baseline-cnn whose probabilities spread well away from 1/8."""
    return save_tiny_model(tmp_path / "model.pt", TEMPERATURE, seed=2, head_std=0.3)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Exports cached under the test's own folder, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "wbc-pipeline" / "onnx"


def _predictor(model: Path, engine: str, **settings) -> Predictor:
    return Predictor.load(model, PredictParams(engine=engine, workers=0, device="cpu", **settings), IngestParams())


def _probs(table: pd.DataFrame) -> np.ndarray:
    return table[[c for c in table.columns if c.startswith("p_")]].to_numpy(dtype=np.float64)


def _inputs(raw: Path, tmp_path: Path) -> list[ImageInput]:
    """Every image of the sample, plus a file that is no image and one that does not exist."""
    files = [str(p) for p in sorted(raw.rglob("*.png"))]
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    files += [str(bad), str(tmp_path / "missing.png")]
    return [ImageInput(f, f) for f in files]


def _assert_same_predictions(onnx: pd.DataFrame, torch_: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(onnx[["path", "status", "detail"]], torch_[["path", "status", "detail"]])
    ok = (torch_["status"] == "ok").to_numpy()
    assert ok.sum() > 40 and (~ok).sum() == 2
    assert np.abs(_probs(onnx)[ok] - _probs(torch_)[ok]).max() <= TOLERANCE
    assert np.isnan(_probs(onnx)[~ok]).all()
    assert onnx["predicted"].tolist() == torch_["predicted"].tolist()
    assert torch_["predicted"].nunique() > 1  # probabilities that decide something


def test_onnx_engine_predicts_what_torch_predicts(tiny_processed, tiny_model, tmp_path):
    raw, _, _ = tiny_processed
    items = _inputs(raw, tmp_path)
    by_torch = _predictor(tiny_model, "torch", batch_size=7).predict(items)
    onnx = _predictor(tiny_model, "onnx", batch_size=7)
    assert isinstance(onnx.engine, OnnxEngine) and str(onnx.device) == "cpu"
    assert onnx.engine.parity["onnx"]["max_abs_diff_probabilities"] <= TOLERANCE
    _assert_same_predictions(onnx.predict(items), by_torch)


def test_the_export_is_made_once_per_model_file(tiny_model, tmp_path, cache, monkeypatch):
    _predictor(tiny_model, "onnx")
    (folder,) = [entry for entry in cache.iterdir() if entry.is_dir()]
    assert {export.ONNX_FILE, export.META_FILE} <= {p.name for p in folder.iterdir()}

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    with monkeypatch.context() as patch:
        patch.setattr(engines, "run_export", no_export)
        assert isinstance(_predictor(tiny_model, "onnx").engine, OnnxEngine)
    other = save_tiny_model(tmp_path / "other.pt", TEMPERATURE, seed=3)
    _predictor(other, "onnx")
    assert len([entry for entry in cache.iterdir() if entry.is_dir()]) == 2


def test_an_export_off_by_more_than_the_tolerance_is_refused_and_not_cached(tiny_model, cache, monkeypatch):
    real = export.onnx_outputs

    def off_by_a_little(path, images):
        logits, probabilities = real(path, images)
        return logits, probabilities + 3e-4

    monkeypatch.setattr(export, "onnx_outputs", off_by_a_little)
    with pytest.raises(export.ExportError, match=r"onnx: probabilities differ by up to 0\.0003"):
        _predictor(tiny_model, "onnx")
    assert not [entry for entry in cache.iterdir() if entry.is_dir()]


def test_without_a_writable_cache_the_export_is_made_for_the_process(tiny_model, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the cache folder would have to be inside a file
    predictor = _predictor(tiny_model, "onnx")
    assert isinstance(predictor.engine, OnnxEngine)
    assert predictor.engine.probabilities(torch.zeros((2, 3, 32, 32), dtype=torch.uint8)).shape == (2, 8)


def test_onnx_engine_refuses_cuda_and_the_default_runs_onnx_on_the_cpu(tiny_model):
    with pytest.raises(ValueError, match="predict.engine 'onnx' runs on the CPU"):
        Predictor.load(tiny_model, PredictParams(engine="onnx", device="cuda"), IngestParams())
    assert PredictParams().engine == "auto"
    assert isinstance(Predictor.load(tiny_model, PredictParams(device="cpu"), IngestParams()).engine, OnnxEngine)
    assert isinstance(_predictor(tiny_model, "torch").engine, TorchEngine)


def test_auto_falls_back_to_torch_with_a_warning_when_the_export_fails(tiny_model, monkeypatch):
    def failing(model_path, threads):
        raise export.ExportError("exported model differs from PyTorch beyond the tolerance")

    monkeypatch.setattr(engines, "onnx_engine", failing)
    with pytest.warns(UserWarning, match="ONNX export of .* failed .* running it with torch"):
        assert isinstance(_predictor(tiny_model, "auto").engine, TorchEngine)
    with pytest.raises(export.ExportError):  # asked for by name: no silent fallback
        _predictor(tiny_model, "onnx")


def test_wbc_predict_summary_names_the_engine(tiny_processed, tiny_model, tmp_path):
    raw, _, _ = tiny_processed
    params = tiny_params(predict={"engine": "onnx", "device": "cpu", "workers": 0})
    summary = run_predict(params, [raw], tiny_model, tmp_path / "out.csv", progress=False)
    assert (summary["engine"], summary["device"], summary["ok"]) == ("onnx", "cpu", len(list(raw.rglob("*.png"))))


def test_served_model_runs_the_engine_it_was_logged_with(tiny_processed, tiny_model, tmp_path):
    raw, _, _ = tiny_processed
    files = [str(p) for p in sorted(raw.rglob("*.png"))[:12]]

    def served(engine: str) -> pd.DataFrame:
        model = WbcPyfuncModel()
        config = model_config(tiny_params(predict={"device": "cpu", "engine": engine, "serve_path_root": str(raw)}))
        model.load_context(SimpleNamespace(model_config=config, artifacts={WEIGHTS_ARTIFACT: str(tiny_model)}))
        assert model.predictor.engine.name == engine
        return model.predict(None, pd.DataFrame({"path": [str(Path(f).relative_to(raw)) for f in files]}))

    by_torch, by_onnx = served("torch"), served("onnx")
    assert (by_onnx["status"] == "ok").all()
    assert np.abs(_probs(by_onnx) - _probs(by_torch)).max() <= TOLERANCE
    assert any(name.startswith("onnxruntime==") for name in serving_requirements("onnx"))
    assert not any(name.startswith("onnxruntime") for name in serving_requirements("torch"))
