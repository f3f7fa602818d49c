"""`wbc predict`: the training data path on new files, per-row rejections, manifests, CLI outputs."""

from __future__ import annotations

import base64
import json
import os
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import save_tiny_model, split_manifest, tiny_params
from PIL import Image, ImageFile

from pipeline.calibration import softmax
from pipeline.cli import main
from pipeline.config import IngestParams, PredictParams
from pipeline.data import ProcessedImages, load_index, select_split
from pipeline.inference import load_model, predict_logits
from pipeline.normalize import run_normalize
from pipeline.predict import ImageInput, Predictor, collect_inputs
from pipeline.serving import WEIGHTS_ARTIFACT, WbcPyfuncModel, inputs_from_frame, model_config

TEMPERATURE = 1.7


@pytest.fixture()
def tiny_model(tmp_path):
    """An untrained baseline-cnn at 32 px saved like the train stage saves it (normalize: 40 px pad)."""
    return save_tiny_model(tmp_path / "model.pt", TEMPERATURE)


def _predictor(model_path, **settings) -> Predictor:
    return Predictor.load(model_path, PredictParams(**{"workers": 0, "device": "cpu", **settings}), IngestParams())


def _probs(table: pd.DataFrame) -> np.ndarray:
    return table[[c for c in table.columns if c.startswith("p_")]].to_numpy(dtype=np.float64)


def _served(model_path: Path, **predict) -> WbcPyfuncModel:
    """The pyfunc model as ``mlflow models serve`` loads it, logged with ``predict`` params."""
    served = WbcPyfuncModel()
    config = model_config(tiny_params(predict={"device": "cpu", **predict}))
    served.load_context(SimpleNamespace(model_config=config, artifacts={WEIGHTS_ARTIFACT: str(model_path)}))
    return served


def _serve(served: WbcPyfuncModel, **columns) -> pd.DataFrame:
    return served.predict(None, pd.DataFrame(columns))


def png_bomb(width: int, height: int) -> bytes:
    """A valid greyscale PNG of ``width`` x ``height`` black pixels: kilobytes that decode to
    ``width * height`` bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer, row = zlib.compressobj(9), bytes(width + 1)  # each row: filter byte 0, then the pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture()
def decodes(monkeypatch) -> list[str]:
    """Every pixel decode (PIL or OpenCV) made in this process, by decoder."""
    calls: list[str] = []
    pil_load, cv2_decode = ImageFile.ImageFile.load, cv2.imdecode

    def counted_load(image):
        if image.tile:  # PIL decodes only while tiles are pending; later load() calls are no-ops
            calls.append("PIL")
        return pil_load(image)

    def counted_decode(*args, **kwargs):
        calls.append("OpenCV")
        return cv2_decode(*args, **kwargs)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted_load)
    monkeypatch.setattr(cv2, "imdecode", counted_decode)
    return calls


def _converted(raw: Path, out: Path, suffix: str) -> Path:
    """A copy of the sample tree with every image saved as ``suffix`` (PIL's encoder)."""
    for png in sorted(raw.rglob("*.png")):
        target = out / png.relative_to(raw).with_suffix(suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(png) as image:
            image.convert("RGB").save(target)
    return out


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_predict_on_raw_files_equals_the_training_data_path(tiny_processed, tiny_model, tmp_path, suffix):
    raw, processed, _ = tiny_processed
    if suffix != ".png":  # the same pictures in another format, through the normalize stage
        raw = _converted(raw, tmp_path / f"raw{suffix}", suffix)
        manifest = split_manifest(raw, {name: 6 for name in tiny_params().data.classes})
        manifest.to_csv(tmp_path / "manifest.csv", index=False)
        processed = tmp_path / f"processed{suffix}"
        run_normalize(tmp_path / "manifest.csv", raw, processed, tiny_params().normalize, progress=False)
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
    # a manifest's files must stay under its folder (or predict.manifest_root); files named directly may not
    assert [item.root for item in items] == [str(manifest.parent)] * 3 + [None]
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
    code = main(["--params", str(params_file), "predict", str(raw / "ig"), str(tmp_path / "broken.jpg"),
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
    assert code == 1
    assert "none.pt: trained model not found" in capsys.readouterr().err


def test_manifest_paths_stay_under_the_csv_folder_unless_manifest_root_allows(tiny_processed, tiny_model, tmp_path):
    raw, _, _ = tiny_processed
    lists = raw / "lists"
    lists.mkdir()
    (lists / "inside.png").write_bytes((raw / "ig" / "ig_0000.png").read_bytes())
    (lists / "link-out.png").symlink_to(raw / "ig" / "ig_0001.png")
    (lists / "link-in.png").symlink_to(lists / "inside.png")
    pd.DataFrame({"path": ["inside.png", "../ig/ig_0002.png", str(raw / "ig" / "ig_0003.png"), "link-out.png",
                           "link-in.png", "sub/../inside.png", "none.png"]}).to_csv(lists / "new.csv", index=False)
    predictor = _predictor(tiny_model)
    table = predictor.predict(collect_inputs([lists / "new.csv"]))
    assert table["status"].tolist() == ["ok", "path-not-allowed", "path-not-allowed", "path-not-allowed", "ok", "ok",
                                        "missing-file"]
    widened = predictor.predict(collect_inputs([lists / "new.csv"], manifest_root=str(raw)))
    assert widened["status"].tolist() == ["ok"] * 6 + ["missing-file"]
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump({"predict": {"workers": 0, "device": "cpu", "manifest_root": str(raw)}}))
    out = tmp_path / "pred.csv"
    assert main(["--quiet", "--params", str(config), "predict", str(lists / "new.csv"), "--model", str(tiny_model),
                 "--out", str(out)]) == 0
    assert pd.read_csv(out)["status"].tolist() == widened["status"].tolist()


def test_each_input_is_decoded_once_after_its_header_passed(tiny_processed, tiny_model, tmp_path, decodes):
    raw, _, _ = tiny_processed
    pngs = sorted(raw.rglob("*.png"))[:3]
    jpgs = sorted(_converted(raw / "ig", tmp_path / "jpg", ".jpg").rglob("*.jpg"))[:3]
    (tmp_path / "bomb.png").write_bytes(png_bomb(5000, 5000))
    Image.new("RGB", (30, 30)).save(tmp_path / "picture.gif")
    files = [*pngs, *jpgs, tmp_path / "bomb.png", tmp_path / "picture.gif"]
    decodes.clear()  # making the test files decoded some
    table = _predictor(tiny_model).predict([ImageInput(str(f), str(f)) for f in files])
    assert table["status"].tolist() == ["ok"] * 6 + ["too-many-pixels", "unsupported-format"]
    assert decodes == ["PIL"] * 3 + ["OpenCV"] * 3  # one decode per good image, by normalize's decoder
    assert "5000x5000 = 25000000 pixels > predict.max_pixels (16777216)" in table.loc[6, "detail"]


def test_bytes_and_pixel_caps_refuse_before_reading_or_decoding(tiny_processed, tiny_model, tmp_path, decodes):
    raw, _, _ = tiny_processed
    good = raw / "ig" / "ig_0000.png"
    huge = tmp_path / "huge.png"
    with huge.open("wb") as file:  # sparse: 64 MB by stat, nothing on disk
        file.write(good.read_bytes())
        file.truncate(64 * 2**20)
    bomb = png_bomb(5000, 5000)  # 25 megapixels in a few kilobytes
    (tmp_path / "bomb.png").write_bytes(bomb)
    items = [ImageInput(str(huge), str(huge)), ImageInput(str(tmp_path / "bomb.png"), str(tmp_path / "bomb.png")),
             ImageInput("b64", image_b64=base64.b64encode(bomb)), ImageInput("big b64", image_b64="A" * 30_000_000),
             ImageInput(str(good), str(good))]
    table = _predictor(tiny_model).predict(items)
    assert table["status"].tolist() == ["too-large", "too-many-pixels", "too-many-pixels", "too-large", "ok"]
    assert "67108864 bytes; predict.max_image_bytes is 20000000" in table.loc[0, "detail"]
    assert "5000x5000 = 25000000 pixels" in table.loc[1, "detail"]
    assert decodes == ["PIL"]  # the good image only
    small = _predictor(tiny_model, max_image_bytes=1000, max_pixels=2000).predict(
        [ImageInput(str(good), str(good)), ImageInput("b64", image_b64=base64.b64encode(png_bomb(48, 48)))])
    assert small["status"].tolist() == ["too-large", "too-many-pixels"]  # the sample's images are 48 x 48


def test_rejected_rows_never_echo_file_content(tiny_model, tmp_path):
    secret = "password=hunter2 api_key=0123456789abcdef"
    (tmp_path / "secret.png").write_text(secret + "\n")
    (tmp_path / "blob.jpg").write_bytes(bytes(range(7, 250)))
    (tmp_path / "head.png").write_bytes(b"\x89PNG\r\n\x1a\n" + secret.encode())
    names = ["secret.png", "blob.jpg", "head.png"]
    items = [ImageInput(name, str(tmp_path / name)) for name in names]
    items.append(ImageInput("b64", image_b64=base64.b64encode(secret.encode())))
    items += [ImageInput("/dev/null", "/dev/null"), ImageInput("folder", str(tmp_path))]
    table = _predictor(tiny_model).predict(items)
    assert table["status"].tolist() == ["not-an-image", "not-an-image", "truncated", "not-an-image", "not-a-file",
                                        "not-a-file"]
    for detail in table["detail"]:
        assert detail and "hunter2" not in detail and "text" not in detail
        assert bytes(range(7, 15)).hex() not in detail and "0123456789" not in detail


def test_served_model_reads_no_path_by_default(tiny_processed, tiny_model, tmp_path):
    raw, _, _ = tiny_processed
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    image = raw / "ig" / "ig_0000.png"
    paths = [str(image), str(secret), "/etc/passwd", "/proc/self/environ", "/dev/zero", "../../etc/passwd"]
    table = _serve(_served(tiny_model), path=paths)
    assert table["status"].tolist() == ["path-not-allowed"] * len(paths)
    assert table["path"].tolist() == paths
    assert all("serve_path_root" in detail and "hunter2" not in detail for detail in table["detail"])
    assert all(table.loc[i, f"p_{name}"] is None for i in range(len(paths)) for name in tiny_params().data.classes)
    both = _serve(_served(tiny_model), image=[base64.b64encode(image.read_bytes()).decode()], path=["/etc/passwd"])
    assert both["status"].tolist() == ["ok"]  # the image sent wins; the path is never looked at


def test_served_path_root_allows_only_regular_files_under_it(tiny_processed, tiny_model, tmp_path):
    raw, _, _ = tiny_processed
    root = tmp_path / "allowed"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "cell.png").write_bytes((raw / "ig" / "ig_0000.png").read_bytes())
    (tmp_path / "outside.png").write_bytes((raw / "ig" / "ig_0001.png").read_bytes())
    (root / "out-link.png").symlink_to(tmp_path / "outside.png")
    (root / "in-link.png").symlink_to(root / "sub" / "cell.png")
    (root / "zero").symlink_to("/dev/zero")
    os.mkfifo(root / "pipe")
    paths = ["sub/cell.png", str(root / "sub" / "cell.png"), "in-link.png", "sub/../sub/cell.png",
             "../outside.png", str(tmp_path / "outside.png"), "out-link.png", "/etc/passwd",
             "sub", "pipe", "zero", "sub/none.png", "sub/\0.png"]
    table = _serve(_served(tiny_model, serve_path_root=str(root)), path=paths)
    assert table["status"].tolist() == ["ok"] * 4 + ["path-not-allowed"] * 4 + ["not-a-file"] * 2 + [
        "path-not-allowed", "missing-file", "unreadable"]
    assert table["path"].tolist() == paths
    everywhere = _serve(_served(tiny_model, serve_path_root="/"), path=["/dev/zero", "/proc/self/environ"])
    assert everywhere["status"].tolist() == ["not-a-file", "not-an-image"]
    environ = Path("/proc/self/environ").read_bytes()[:8]
    assert environ.hex() not in everywhere.loc[1, "detail"] and "text" not in everywhere.loc[1, "detail"]
    with pytest.raises(ValueError, match="serve_path_root: .*nowhere is not a folder"):
        _served(tiny_model, serve_path_root=str(tmp_path / "nowhere"))


def test_served_request_over_max_rows_is_refused_row_by_row_unread(tiny_processed, tiny_model, decodes):
    raw, _, _ = tiny_processed
    image = base64.b64encode((raw / "ig" / "ig_0000.png").read_bytes()).decode()
    served = _served(tiny_model, max_rows=3)
    assert _serve(served, image=[image] * 3)["status"].tolist() == ["ok"] * 3
    decodes.clear()
    table = _serve(served, image=[image] * 4)
    assert table["status"].tolist() == ["too-many-rows"] * 4
    assert table["detail"].tolist() == ["the request has 4 rows; predict.max_rows allows 3"] * 4
    assert decodes == []
