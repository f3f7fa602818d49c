"""`wbc export`: ONNX (run with onnxruntime) and TorchScript against PyTorch, dynamic batch, metadata."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import save_tiny_model, tiny_params

from pipeline.cli import main
from pipeline.config import IngestParams, PredictParams
from pipeline.export import META_FILE, ONNX_FILE, TOLERANCE, TORCHSCRIPT_FILE, run_export
from pipeline.predict import ImageInput, Predictor

TEMPERATURE = 1.4


@pytest.fixture()
def tiny_model(tmp_path):
    return save_tiny_model(tmp_path / "model.pt", TEMPERATURE, seed=1, head_std=0.3)


@pytest.mark.filterwarnings(r"ignore:.*torch\.jit\.load.* is deprecated:DeprecationWarning")
def test_onnx_and_torchscript_match_pytorch_with_any_batch_size(tiny_model, tmp_path):
    out = tmp_path / "export"
    result = run_export(tiny_model, out)
    for name in ("onnx", "torchscript"):
        entry = result["exports"][name]
        assert entry["max_abs_diff_logits"] <= TOLERANCE and entry["max_abs_diff_probabilities"] <= TOLERANCE
    meta = json.loads((out / META_FILE).read_text())
    assert meta["classes"] == tiny_params().data.classes and meta["image_size"] == 32
    assert meta["temperature"] == pytest.approx(TEMPERATURE)
    assert meta["normalize"] == tiny_params().normalize.model_dump(mode="json") and meta["normalize"]["size"] == 40
    assert meta["stain_reference"] is None and meta["pixel_sizes"] == {}
    assert meta["files"] == {"onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE}
    assert meta["parity"]["onnx"]["max_abs_diff_probabilities"] == result["exports"]["onnx"][
        "max_abs_diff_probabilities"]

    graph = onnx.load(str(out / ONNX_FILE)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in graph.output] == ["logits", "probabilities"]

    # the exported graphs scale raw pixels themselves and calibrate with the saved temperature
    from pipeline.inference import load_model

    model, _ = load_model(tiny_model)
    session = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(out / TORCHSCRIPT_FILE))
    for batch in (1, 5):
        images = np.random.default_rng(batch).integers(0, 256, (batch, 3, 32, 32), dtype=np.uint8)
        with torch.no_grad():
            logits = model(torch.from_numpy(images)).numpy()
        probs = torch.softmax(torch.from_numpy(logits) / TEMPERATURE, dim=1).numpy()
        onnx_logits, onnx_probs = session.run(None, {"images": images})
        np.testing.assert_allclose(onnx_logits, logits, atol=1e-4)
        np.testing.assert_allclose(onnx_probs, probs, atol=1e-5)
        with torch.no_grad():
            ts_logits, _ = scripted(torch.from_numpy(images).float())  # float 0..255 input works too
        np.testing.assert_allclose(ts_logits.numpy(), logits, atol=1e-4)


def test_cli_export_with_real_images_reports_the_parity(tiny_processed, tiny_model, tmp_path, capsys):
    raw, _, _ = tiny_processed
    images = sorted(raw.rglob("*.png"))[:4]
    out = tmp_path / "onnx_only"
    code = main(["export", "--model", str(tiny_model), "--format", "onnx", "--out", str(out), "--images",
                 *map(str, images)])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"{out / ONNX_FILE}: max abs diff vs PyTorch on 4 images" in printed
    assert not (out / TORCHSCRIPT_FILE).exists()
    meta = json.loads((out / META_FILE).read_text())
    assert set(meta["parity"]) >= {"onnx", "tolerance"} and meta["parity"]["inputs"] == "4 images"
    # the ONNX model on wbc predict's preprocessing gives wbc predict's probabilities
    predictor = Predictor.load(tiny_model, PredictParams(workers=0, device="cpu"), IngestParams())
    table = predictor.predict([ImageInput(str(p), str(p)) for p in images])
    from pipeline.export import parity_batch

    batch = parity_batch(predictor.meta, images=images)
    _, onnx_probs = ort.InferenceSession(str(out / ONNX_FILE)).run(None, {"images": batch})
    np.testing.assert_allclose(onnx_probs, table[[f"p_{c}" for c in meta["classes"]]].to_numpy(), atol=1e-5)


def test_cli_export_names_a_bad_parity_image(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("text")
    code = main(["export", "--model", str(tiny_model), "--out", str(tmp_path / "x"), "--images", str(bad)])
    assert code == 1
    assert "bad.png: cannot be used for the parity check: not-an-image" in capsys.readouterr().err


@pytest.mark.filterwarnings(r"ignore:.*torch\.jit\.load.* is deprecated:DeprecationWarning")
def test_an_export_that_disagrees_with_pytorch_fails_with_the_figures(tiny_model, tmp_path, monkeypatch):
    from pipeline import export

    real = export.torchscript_outputs

    def off_by_a_little(path, images):
        logits, probabilities = real(path, images)
        return logits, probabilities + 3e-4

    monkeypatch.setattr(export, "torchscript_outputs", off_by_a_little)
    with pytest.raises(export.ExportError, match=r"torchscript: probabilities differ by up to 0\.0003"):
        run_export(tiny_model, tmp_path / "x", ("torchscript",))
    assert json.loads((tmp_path / "x" / META_FILE).read_text())["parity"]["torchscript"][
        "max_abs_diff_probabilities"] == pytest.approx(3e-4, rel=1e-3)
