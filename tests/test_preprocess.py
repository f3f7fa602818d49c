"""One preparation for training images and new inputs: colour standardisation and framing as normalize
params, saved with the model, and predict giving the very pixels normalize gave for the same file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import tiny_params
from PIL import Image
from smear_images import smear

from pipeline.cli import main
from pipeline.config import NormalizeParams, ParamsError, PredictParams, parse_params
from pipeline.framing import FRAMING_REASONS, FRAMING_SCALES, locate_nucleus
from pipeline.imaging import decode_reduction, decode_rgb, fit_square, jpeg_size, resize_square, to_chw
from pipeline.inference import load_model, save_model
from pipeline.inspection import REASON_MEANINGS
from pipeline.model_meta import ModelMeta
from pipeline.models import build_classifier
from pipeline.normalize import run_normalize
from pipeline.predict import ImageInput, Predictor, prepare_input
from pipeline.preprocess import NoCellFound, Preprocessing, read_preprocessing, square_image
from pipeline.stain import STAIN_METHODS, StainReference, fit_reference
from pipeline.training import model_meta

SIZE = 96
# site -> (palette, pixels per micrometre): two labs that differ in stain and scale, one held out.
SITES = {"lab-a": ("giemsa", 2.0), "lab-b": ("blue", 1.5), "lab-c": ("yellow", 2.5)}
SPLITS = ("train", "train", "train", "val", "test")


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def _smear_tree(root: Path, sites: dict[str, tuple[str, float]] = SITES, holdout: tuple[str, ...] = ("lab-c",),
                no_cell: int = 0) -> pd.DataFrame:
    """Generated smears of each site (one per split entry and class, the white cell off centre), as PNG
    under ``root/<site>/<class>/``; ``no_cell`` extra training images of the first site hold red cells
    only. Returns the manifest (held-out sites' rows are split holdout, as ingest writes them)."""
    rows = []
    for s, (site, (palette, px_per_um)) in enumerate(sites.items()):
        for label in ("lymphocyte", "neutrophil"):
            for i, split in enumerate(SPLITS):
                seed = 100 * s + 10 * (label == "neutrophil") + i
                cell = smear(size=150, palette=palette, px_per_um=px_per_um, seed=seed,
                             centre=(0.4 + 0.04 * i, 0.55 - 0.03 * i))
                path = f"{site}/{label}/{i}.png"
                _write(root / path, cell.image)
                rows.append({"path": path, "site": site, "label": label,
                             "split": "holdout" if site in holdout else split, "group": f"{site}-{label}-{i}"})
    first = next(iter(sites))
    for i in range(no_cell):
        path = f"{first}/lymphocyte/empty-{i}.png"
        _write(root / path, smear(size=150, palette=sites[first][0], white_cell=False, seed=900 + i).image)
        rows.append({"path": path, "site": first, "label": "lymphocyte", "split": "train", "group": f"empty-{i}"})
    return pd.DataFrame(rows)


def _normalize(tmp_path: Path, manifest: pd.DataFrame, out: str = "processed", **normalize) -> tuple[Path, dict]:
    manifest_path = tmp_path / f"{out}.csv"
    manifest.to_csv(manifest_path, index=False)
    um_per_px, workers = normalize.pop("um_per_px", None), normalize.pop("workers", 1)
    summary = run_normalize(manifest_path, tmp_path / "raw", tmp_path / out, NormalizeParams(size=SIZE, **normalize),
                            progress=False, workers=workers, um_per_px=um_per_px)
    return tmp_path / out, summary


def _saved_model(tmp_path: Path, processed: Path, name: str = "model.pt") -> Path:
    """A baseline-cnn at the normalized size, saved with the metadata the train stage writes for it."""
    params = tiny_params(train={"image_size": SIZE})
    meta = model_meta(params, 1, 0.5, 1.0, None, read_preprocessing(processed))
    model = build_classifier("baseline-cnn", len(meta.classes), SIZE)
    save_model(tmp_path / name, model, meta)
    return tmp_path / name


def _predictor(model: Path) -> Predictor:
    return Predictor.load(model, PredictParams(workers=0, device="cpu"), tiny_params().ingest)


def test_normalize_choices_mirror_the_stain_and_framing_modules():
    assert get_args(NormalizeParams.model_fields["stain"].annotation) == STAIN_METHODS
    assert get_args(NormalizeParams.model_fields["framing"].annotation) == ("none", *FRAMING_SCALES)


@pytest.mark.parametrize("data", [{"um_per_px": 0}, {"sources": [{"site": "lab-a", "root": "a", "um_per_px": 0}]}])
def test_a_pixel_size_of_zero_is_refused_naming_the_param(data):
    with pytest.raises(ParamsError, match="um_per_px"):
        parse_params({"data": data})


def test_framing_reasons_are_in_the_one_reason_table():
    assert {code: REASON_MEANINGS[code] for code in FRAMING_REASONS} == FRAMING_REASONS


# ---------------------------------------------------------------------------------------------
# Decoding and squaring: faster, and the same bytes as before


def _reference_square(image: np.ndarray, size: int, mode: str, pad: tuple[int, int, int]) -> np.ndarray:
    """The square as the normalize stage made it before it resized into its output: resize, then pad or cut."""
    height, width = image.shape[:2]
    scale = size / max(height, width) if mode == "pad" else size / min(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_h, new_w) != (height, width):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    if mode == "crop":
        top, left = (new_h - size) // 2, (new_w - size) // 2
        return image[top : top + size, left : left + size]
    top, left = (size - new_h) // 2, (size - new_w) // 2
    return cv2.copyMakeBorder(image, top, size - new_h - top, left, size - new_w - left, cv2.BORDER_CONSTANT,
                              value=pad)


@pytest.mark.parametrize("shape", [(20, 40), (40, 20), (363, 360), (50, 50), (7, 90), (600, 200)])
@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_fit_square_into_a_buffer_gives_the_same_bytes(shape, mode):
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    for size in (16, 50, 380):
        out = np.full((size, size, 3), 7, np.uint8)
        assert fit_square(image, size, mode, (255, 0, 10), out) is out
        assert np.array_equal(out, _reference_square(image, size, mode, (255, 0, 10)))


@pytest.mark.parametrize("extension", [".jpg", ".bmp", ".png"])
def test_rgb_decoding_matches_opencv_bgr_decoding(tmp_path, extension):
    image = smear(size=90, seed=3).image
    _write(tmp_path / f"cell{extension}", image)
    data = (tmp_path / f"cell{extension}").read_bytes()
    expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.array_equal(decode_rgb(data), expected)


def test_jpeg_header_and_reduced_decoding(tmp_path):
    image = smear(size=200, seed=4).image[:, :180]
    _write(tmp_path / "cell.jpg", image)
    data = (tmp_path / "cell.jpg").read_bytes()
    assert jpeg_size(data) == Image.open(tmp_path / "cell.jpg").size == (180, 200)
    assert jpeg_size(b"BM" + bytes(60)) is None
    # the largest reduction whose side (long side for pad, short for crop) still reaches the square
    assert [decode_reduction(data, size, "pad") for size in (25, 26, 50, 51, 100, 101)] == [8, 4, 4, 2, 2, 1]
    assert decode_reduction(data, 90, "crop") == 2 and decode_reduction(data, 91, "crop") == 1
    assert decode_rgb(data, reduction=4).shape == (50, 45, 3)
    full = fit_square(decode_rgb(data), 40, "pad", (255, 255, 255))
    reduced = fit_square(decode_rgb(data, reduction=4), 40, "pad", (255, 255, 255))
    assert np.abs(full.astype(int) - reduced).mean() < 3


# ---------------------------------------------------------------------------------------------
# Normalize with colour standardisation and framing


@pytest.mark.parametrize(("stain", "framing"), [
    ("reinhard", "none"), ("macenko", "none"), ("none", "red-cell"), ("none", "pixel-size"), ("none", "nucleus"),
    ("reinhard", "nucleus")])
def test_normalize_standardises_and_frames_every_image_as_square_image_does(tmp_path, stain, framing):
    manifest = _smear_tree(tmp_path / "raw")
    processed, summary = _normalize(tmp_path, manifest, stain=stain, framing=framing, workers=2,
                                    um_per_px={"lab-a": 0.5})
    images = np.load(processed / "images.npy")
    assert images.shape == (len(manifest), SIZE, SIZE, 3)
    assert pd.read_csv(processed / "index.csv")["path"].tolist() == manifest["path"].tolist()
    assert pd.read_csv(processed / "rejected.csv").empty and summary["rejected"] == {}
    preprocessing = read_preprocessing(processed)
    assert preprocessing.normalize.stain == stain and preprocessing.normalize.framing == framing
    assert (preprocessing.stain_reference is None) == (stain == "none")
    for row, path in enumerate(manifest["path"]):
        um = summary["pixel_size_sources"][manifest["site"][row]]["um_per_px"] if framing == "pixel-size" else None
        assert np.array_equal(images[row], square_image((tmp_path / "raw" / path).read_bytes(), preprocessing, um))
    if framing != "none":  # the white cell is centred whatever its place in the source
        for image in images:
            assert locate_nucleus(image).centre == pytest.approx((SIZE / 2, SIZE / 2), abs=0.1 * SIZE)
    if framing == "pixel-size":  # a known pixel size is used as given, an unknown one measured from red cells
        sources = summary["pixel_size_sources"]
        assert sources["lab-a"] == {"um_per_px": 0.5, "source": "data um_per_px"}
        assert sources["lab-b"]["source"] == "measured"
        assert sources["lab-b"]["um_per_px"] == pytest.approx(1 / SITES["lab-b"][1], rel=0.1)
        assert preprocessing.pixel_sizes == {"lab-a": 0.5, "lab-b": sources["lab-b"]["um_per_px"]}  # trained sites


def _lab(images: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(images.reshape(-1, images.shape[-2], 3), cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float64)


@pytest.mark.parametrize("stain", ["reinhard", "macenko"])
def test_standardisation_brings_the_sites_colours_together(tmp_path, stain):
    manifest = _smear_tree(tmp_path / "raw")
    plain = np.load(_normalize(tmp_path, manifest, out="plain")[0] / "images.npy")
    standard = np.load(_normalize(tmp_path, manifest, out="standard", stain=stain)[0] / "images.npy")
    sites = manifest["site"].to_numpy()

    def spread(images: np.ndarray) -> float:
        means = [np.median(_lab(images[sites == site])[:, 1:], axis=0) for site in SITES]
        return float(max(np.linalg.norm(a - b) for a in means for b in means))

    assert spread(standard) < 0.5 * spread(plain)


def test_the_reference_is_fitted_on_training_rows_of_training_sites_only(tmp_path):
    manifest = _smear_tree(tmp_path / "raw")
    processed, summary = _normalize(tmp_path, manifest, stain="reinhard", stain_reference_images=4, seed=3)
    drawn = manifest.set_index("path").loc[summary["stain_reference_images"]]
    assert len(drawn) == 4 and set(drawn["split"]) == {"train"} and "lab-c" not in set(drawn["site"])
    preprocessing = read_preprocessing(processed)
    unstained = Preprocessing(NormalizeParams(size=SIZE))
    squares = [square_image((tmp_path / "raw" / p).read_bytes(), unstained) for p in drawn.index]
    assert preprocessing.stain_reference == fit_reference(squares, "reinhard")
    # what the held-out site looks like changes nothing
    for path in manifest.loc[manifest["split"] != "train", "path"]:
        _write(tmp_path / "raw" / path, smear(size=150, palette="blue", px_per_um=3.0, seed=7).image)
    again = read_preprocessing(_normalize(tmp_path, manifest, out="again", stain="reinhard",
                                          stain_reference_images=4, seed=3)[0])
    assert again.stain_reference == preprocessing.stain_reference


def test_an_image_without_a_cell_is_listed_with_its_reason_and_left_out(tmp_path):
    manifest = _smear_tree(tmp_path / "raw", no_cell=2)
    processed, summary = _normalize(tmp_path, manifest, framing="nucleus", stain="reinhard")
    rejected = pd.read_csv(processed / "rejected.csv")
    empty = manifest[manifest["path"].str.contains("empty")]
    assert rejected["path"].tolist() == empty["path"].tolist()
    assert set(rejected["site"]) == {"lab-a"} and set(rejected["reason"]) <= set(FRAMING_REASONS)
    assert all(FRAMING_REASONS[r] in d for r, d in zip(rejected["reason"], rejected["detail"], strict=True))
    assert summary["rejected"] == {"lab-a": 2} and summary["images"] == len(manifest) - 2
    kept = manifest.drop(index=empty.index)
    assert pd.read_csv(processed / "index.csv")["path"].tolist() == kept["path"].tolist()
    images = np.load(processed / "images.npy")
    preprocessing = read_preprocessing(processed)
    assert len(images) == len(kept)
    for row, path in enumerate(kept["path"]):
        assert np.array_equal(images[row], square_image((tmp_path / "raw" / path).read_bytes(), preprocessing))
    with pytest.raises(NoCellFound) as caught:
        square_image((tmp_path / "raw" / empty["path"].iloc[0]).read_bytes(), preprocessing, name="empty")
    assert caught.value.reason == rejected["reason"].iloc[0]


def test_a_site_whose_pixel_size_cannot_be_measured_names_the_param(tmp_path):
    root = tmp_path / "raw"
    rows = []
    for i in range(3):  # tight crops: a white cell and no red cell
        _write(root / f"crops/a/{i}.png", smear(size=60, red_cells=False, seed=i).image)
        rows.append({"path": f"crops/a/{i}.png", "site": "crops", "label": "a", "split": "train", "group": str(i)})
    with pytest.raises(ValueError, match=r"site 'crops'.*um_per_px"):
        _normalize(tmp_path, pd.DataFrame(rows), framing="pixel-size")


# ---------------------------------------------------------------------------------------------
# The same preparation in predict, the served model and export


@pytest.mark.parametrize(("stain", "framing"), [("none", "none"), ("reinhard", "pixel-size"),
                                                 ("macenko", "red-cell"), ("reinhard", "nucleus")])
def test_predict_gives_the_pixels_normalize_gave(tmp_path, stain, framing):
    sites = {"lab-a": SITES["lab-a"]}  # one training site: an input's pixel size is the site's
    manifest = _smear_tree(tmp_path / "raw", sites=sites, holdout=())
    processed, _ = _normalize(tmp_path, manifest, stain=stain, framing=framing)
    predictor = _predictor(_saved_model(tmp_path, processed))
    assert predictor.preprocessing == read_preprocessing(processed)
    images = np.load(processed / "images.npy")
    for row, path in enumerate(manifest["path"]):
        item = ImageInput(path, str(tmp_path / "raw" / path))
        pixels = prepare_input(item, predictor.checks, predictor.preprocessing, predictor.image_size)
        assert np.array_equal(pixels, to_chw(resize_square(images[row], SIZE)))


def test_predict_reports_an_input_without_a_cell_in_its_row(tmp_path):
    manifest = _smear_tree(tmp_path / "raw", sites={"lab-a": SITES["lab-a"]}, holdout=(), no_cell=1)
    processed, _ = _normalize(tmp_path, manifest, framing="red-cell")
    predictor = _predictor(_saved_model(tmp_path, processed))
    rejected = pd.read_csv(processed / "rejected.csv")
    paths = [str(tmp_path / "raw" / manifest["path"].iloc[0]), str(tmp_path / "raw" / rejected["path"].iloc[0])]
    table = predictor.predict([ImageInput(p, p) for p in paths])
    assert table["status"].tolist() == ["ok", rejected["reason"].iloc[0]]
    assert "framing red-cell" in table["detail"].iloc[1] and np.isnan(table.filter(like="p_").iloc[1]).all()


def test_the_model_carries_the_reference_and_pixel_sizes(tmp_path):
    manifest = _smear_tree(tmp_path / "raw", sites={"lab-a": SITES["lab-a"]}, holdout=())
    processed, _ = _normalize(tmp_path, manifest, stain="macenko", framing="pixel-size", um_per_px={"lab-a": 0.5})
    _, meta = load_model(_saved_model(tmp_path, processed))
    assert meta.stain_reference == read_preprocessing(processed).stain_reference
    assert meta.pixel_sizes == {"lab-a": 0.5} and meta.normalize.framing == "pixel-size"
    assert ModelMeta.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
    broken = {**meta.to_dict(), "stain_reference": None}
    with pytest.raises(ValueError, match="normalize.stain is 'macenko'"):
        ModelMeta.from_dict(broken)


def test_a_model_of_sites_with_different_pixel_sizes_cannot_frame_inputs_by_pixel_size(tmp_path):
    manifest = _smear_tree(tmp_path / "raw", holdout=())
    processed, _ = _normalize(tmp_path, manifest, framing="pixel-size", um_per_px={"lab-a": 0.5, "lab-b": 0.66})
    with pytest.raises(ValueError, match="do not share one pixel size"):
        _predictor(_saved_model(tmp_path, processed))


def test_another_dataset_is_normalized_with_the_models_reference(tmp_path):
    manifest = _smear_tree(tmp_path / "raw", sites={"lab-a": SITES["lab-a"]}, holdout=())
    processed, _ = _normalize(tmp_path, manifest, stain="reinhard")
    model = _saved_model(tmp_path, processed)
    other = _smear_tree(tmp_path / "raw", sites={"lab-b": SITES["lab-b"]}, holdout=())
    other.to_csv(tmp_path / "other.csv", index=False)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"data": {"root": str(tmp_path / "raw")},
                                  "normalize": {"size": SIZE, "stain": "reinhard"}}))
    for source in (model, processed):
        out = tmp_path / f"other-{source.name}"
        assert main(["-q", "--params", str(params), "normalize", "--manifest", str(tmp_path / "other.csv"),
                     "--out", str(out), "--stain-reference", str(source)]) == 0
        summary = json.loads((out / "normalize.json").read_text())
        assert summary["stain_reference_images"] == []  # nothing fitted on the other dataset
        assert read_preprocessing(out).stain_reference == read_preprocessing(processed).stain_reference
    params.write_text(json.dumps({"data": {"root": str(tmp_path / "raw")},
                                  "normalize": {"size": SIZE, "stain": "macenko"}}))
    assert main(["-q", "--params", str(params), "normalize", "--manifest", str(tmp_path / "other.csv"),
                 "--out", str(tmp_path / "mismatch"), "--stain-reference", str(model)]) == 1


def test_export_states_the_preprocessing_with_the_reference_values(tmp_path):
    from pipeline.export import run_export

    manifest = _smear_tree(tmp_path / "raw", sites={"lab-a": SITES["lab-a"]}, holdout=())
    processed, _ = _normalize(tmp_path, manifest, stain="reinhard", framing="nucleus")
    model = _saved_model(tmp_path, processed)
    images = [tmp_path / "raw" / p for p in manifest["path"][:2]]
    run_export(model, tmp_path / "export", formats=("torchscript",), parity_images=images)
    document = json.loads((tmp_path / "export" / "model.json").read_text())
    reference = read_preprocessing(processed).stain_reference
    assert StainReference.from_dict(document["stain_reference"]) == reference
    assert document["normalize"]["framing"] == "nucleus"
    steps = " ".join(document["input"]["preprocessing"])
    assert "normalize.framing nucleus" in steps and "stain_reference (reinhard" in steps
