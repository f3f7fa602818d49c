"""Normalize: square RGB output of the configured size, aspect ratio kept, stored for fast reads."""

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.config import NormalizeParams
from pipeline.imaging import ImageReadError, fit_square
from pipeline.normalize import normalize_images, run_normalize
from pipeline.preprocess import Preprocessing


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(array, cv2.COLOR_RGB2BGR))


def test_pad_keeps_the_whole_image_and_pads_with_the_colour():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:] = (10, 200, 30)
    out = fit_square(image, 40, "pad", (255, 0, 255))
    assert out.shape == (40, 40, 3)
    assert (out[0, 0] == (255, 0, 255)).all() and (out[-1, -1] == (255, 0, 255)).all()
    assert (out[20, 20] == (10, 200, 30)).all()
    assert (out[10:30, :] == (10, 200, 30)).all()


def test_crop_takes_the_centre_square():
    image = np.zeros((20, 60, 3), np.uint8)
    image[:, 20:40] = 255  # the centre third is white
    out = fit_square(image, 20, "crop", (0, 0, 0))
    assert out.shape == (20, 20, 3)
    assert out.min() == 255


def test_upscales_small_images():
    out = fit_square(np.full((8, 8, 3), 7, np.uint8), 32, "pad", (0, 0, 0))
    assert out.shape == (32, 32, 3) and out.mean() == pytest.approx(7, abs=0.5)


@pytest.mark.parametrize("workers", [1, 2])
def test_normalize_writes_rows_in_manifest_order(tmp_path, workers):
    root = tmp_path / "raw"
    colours = [(i * 20, 255 - i * 20, 100) for i in range(10)]
    for i, colour in enumerate(colours):
        _write(root / "a" / f"{i:02d}.png", np.full((30, 50, 3), colour, np.uint8))
    manifest = pd.DataFrame({"path": [f"a/{i:02d}.png" for i in range(10)], "label": "a", "split": "train",
                             "group": [str(i) for i in range(10)]})
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    params = NormalizeParams(size=24)
    summary = run_normalize(tmp_path / "manifest.csv", root, tmp_path / "out", params, progress=False, workers=workers)
    images = np.load(tmp_path / "out" / "images.npy", mmap_mode="r")
    assert images.shape == (10, 24, 24, 3) and images.dtype == np.uint8
    for i, colour in enumerate(colours):
        assert tuple(images[i, 12, 12]) == colour
    assert pd.read_csv(tmp_path / "out" / "index.csv")["path"].tolist() == manifest["path"].tolist()
    assert json.loads((tmp_path / "out" / "normalize.json").read_text())["images"] == 10
    assert summary["images_per_second"] > 0


def test_a_file_that_changed_since_ingest_is_named(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image any more")
    with pytest.raises(ImageReadError, match="bad.png"):
        normalize_images([str(tmp_path / "bad.png")], tmp_path / "x.npy", Preprocessing(NormalizeParams(size=16)),
                         progress=False)


def test_empty_manifest_is_an_error(tmp_path):
    pd.DataFrame(columns=["path", "label", "split", "group"]).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ValueError, match="no images"):
        run_normalize(tmp_path / "m.csv", tmp_path, tmp_path / "out", NormalizeParams(), progress=False)
