"""Colour standardisation: a reference fitted once, serialised exactly, applied deterministically;
it moves another stain's colours onto the reference's and survives degenerate images."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import cv2
import numpy as np
import pytest
from conftest import SHARED_DATA
from smear_images import smear

from pipeline.framing import locate_nucleus
from pipeline.imaging import read_rgb
from pipeline.stain import STAIN_METHODS, StainReference, apply_stain, fit_reference, rgb_to_lab

FITTED = ("reinhard", "macenko")


def _reference_images() -> list[np.ndarray]:
    return [smear(palette="giemsa", px_per_um=2.0, centre=(0.4 + 0.05 * i, 0.5), seed=i).image for i in range(4)]


@pytest.fixture(scope="module")
def references() -> dict[str, StainReference]:
    images = _reference_images()
    return {method: fit_reference(images, method) for method in STAIN_METHODS}


def _mean_lab(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return rgb_to_lab(image)[mask].mean(axis=0)


@pytest.mark.parametrize("method", STAIN_METHODS)
def test_fit_and_apply_are_deterministic(method):
    first, second = fit_reference(_reference_images(), method), fit_reference(_reference_images(), method)
    assert first.to_dict() == second.to_dict() and first.n_images == 4
    image = smear(palette="yellow", seed=7).image
    assert np.array_equal(apply_stain(image, first), apply_stain(image.copy(), first))


@pytest.mark.parametrize("method", STAIN_METHODS)
def test_reference_round_trips_through_json(method, references):
    reference = references[method]
    restored = StainReference.from_dict(json.loads(json.dumps(reference.to_dict())))
    assert restored == reference
    image = smear(palette="blue", seed=5).image
    assert np.array_equal(apply_stain(image, restored), apply_stain(image, reference))


def test_none_leaves_pixels_alone(references):
    image = smear(palette="yellow").image
    out = apply_stain(image, references["none"])
    assert np.array_equal(out, image) and out is not image


def _restained(image: np.ndarray) -> np.ndarray:
    """``image`` as another lab would show it (Beer-Lambert): the dyes' colours mixed, the stain 40 %
    denser, seen under a yellow lamp."""
    lamp = np.array([250.0, 246.0, 170.0])
    density = -np.log((image.astype(np.float64) + 1) / 256.0)
    mixing = np.array([[1.1, 0.25, 0.0], [0.0, 0.9, 0.2], [0.15, 0.0, 1.0]]) * 1.4
    return np.clip(lamp * np.exp(-density @ mixing) + 0.5, 0, 255).astype(np.uint8)


def _other_stain(kind: str):
    """The giemsa test smear's twin: drawn in another palette, or re-stained through optical density."""
    if kind == "restained":
        twin = smear(palette="giemsa", px_per_um=2.5, centre=(0.55, 0.45), seed=11)
        return replace(twin, image=_restained(twin.image))
    return smear(palette=kind, px_per_um=2.5, centre=(0.55, 0.45), seed=11)


# Macenko re-composes two stains, so only a physically re-stained smear (not an arbitrary palette) is
# a fair test of it; Reinhard matches colour statistics whatever produced them.
@pytest.mark.parametrize(
    ("method", "kind"),
    [("reinhard", "yellow"), ("reinhard", "blue"), ("reinhard", "restained"), ("macenko", "restained")],
)
def test_another_stain_moves_to_the_reference(method, kind, references):
    target = smear(palette="giemsa", px_per_um=2.5, centre=(0.55, 0.45), seed=11)
    source = _other_stain(kind)
    out = apply_stain(source.image, references[method])
    assert out.shape == source.image.shape and out.dtype == np.uint8
    for region in (source.nucleus, source.background):
        before = np.linalg.norm(_mean_lab(source.image, region) - _mean_lab(target.image, region))
        after = np.linalg.norm(_mean_lab(out, region) - _mean_lab(target.image, region))
        assert before > 15, "the two stains should differ to begin with"
        assert after < 0.35 * before and after < 8, (before, after)


@pytest.mark.parametrize("method", FITTED)
def test_reference_stain_is_nearly_unchanged(method, references):
    image = smear(palette="giemsa", seed=9).image
    out = apply_stain(image, references[method])
    difference = np.linalg.norm(rgb_to_lab(out) - rgb_to_lab(image), axis=2)
    assert np.median(difference) < 3


@pytest.mark.parametrize("method", FITTED)
def test_degenerate_images_give_finite_plausible_output(method, references):
    reference = references[method]
    background = np.asarray(reference.values["background"])
    white = np.full((40, 40, 3), 255, np.uint8)
    black = np.zeros((40, 40, 3), np.uint8)
    grey = cv2.cvtColor(cv2.cvtColor(smear(seed=2).image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    speck = white.copy()
    speck[18:21, 18:21] = (90, 40, 140)
    one_pixel = np.full((1, 1, 3), 200, np.uint8)
    for image in (white, black, grey, speck, one_pixel):
        out = apply_stain(image, reference)
        assert out.shape == image.shape and out.dtype == np.uint8
    # Padding stays padding; a blank frame takes the reference background's colour.
    assert np.array_equal(apply_stain(black, reference), black)
    blank_lab = rgb_to_lab(apply_stain(white, reference)).reshape(-1, 3).mean(axis=0)
    reference_lab = background if method == "reinhard" else rgb_to_lab(np.uint8([[background.round()]]))[0, 0]
    assert np.linalg.norm(blank_lab - reference_lab) < 3
    # A mostly empty image does not blow up: its background stays near the reference background.
    speck_out = apply_stain(speck, reference)
    assert np.linalg.norm(rgb_to_lab(speck_out)[0, 0] - reference_lab) < 3


def test_black_padding_is_kept_and_ignored(references):
    cell = smear(palette="blue", seed=4)
    padded = cell.image.copy()
    padded[:, :30] = 0
    for method in FITTED:
        out = apply_stain(padded, references[method])
        assert not out[:, :30].any()
        plain = apply_stain(cell.image, references[method])
        # The statistics ignore padding: the cell comes out (nearly) the same colour either way.
        difference = np.linalg.norm(_mean_lab(out, cell.nucleus) - _mean_lab(plain, cell.nucleus))
        assert difference < 2


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"method": "vahadane", "values": {}}, "method"),
        ({"method": "reinhard", "values": {"background": [1, 2, 3]}}, "nucleus_mean"),
        (
            {
                "method": "macenko",
                "values": {"stains": [1, 2, 3], "concentration": [1, 1], "background": [1, 2, 3]},
            },
            "stains",
        ),
    ],
)
def test_bad_serialised_reference_names_what_is_wrong(data, match):
    with pytest.raises(ValueError, match=match):
        StainReference.from_dict(data)


def test_bad_fit_input_is_refused():
    with pytest.raises(ValueError, match="stain method"):
        fit_reference(_reference_images(), "vahadane")
    with pytest.raises(ValueError, match="at least one image"):
        fit_reference([], "reinhard")
    with pytest.raises(ValueError, match="reference image 1"):
        fit_reference([smear().image, smear().image.astype(np.float32)], "reinhard")
    blank = [np.full((32, 32, 3), 255, np.uint8)] * 2
    for method in FITTED:
        with pytest.raises(ValueError, match="reference images"):
            fit_reference(blank, method)
    assert fit_reference(blank, "none").values == {}


def test_apply_refuses_what_is_not_an_rgb_image(references):
    with pytest.raises(ValueError, match="uint8 RGB"):
        apply_stain(np.zeros((8, 8), np.uint8), references["reinhard"])


def _nucleus_lab(images: list[np.ndarray]) -> np.ndarray:
    """Mean CIELAB of the pixels inside each image's nucleus box, averaged over images."""
    means = []
    for image in images:
        found = locate_nucleus(image)
        x0, y0, x1, y1 = found.box
        means.append(rgb_to_lab(image[max(0, y0) : y1, max(0, x0) : x1]).reshape(-1, 3).mean(axis=0))
    return np.mean(means, axis=0)


@pytest.mark.shared_data
def test_standardisation_brings_real_sites_together():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not here")
    rng = random.Random(0)
    pbc = [read_rgb(p) for p in rng.sample(sorted((SHARED_DATA / "pbc").glob("*/*.jpg")), 16)]
    jiangxi = [read_rgb(p) for p in rng.sample(sorted((SHARED_DATA / "wbc-seg" / "Dataset 1").glob("*.bmp")), 8)]
    lisc = [read_rgb(p) for p in rng.sample(sorted((SHARED_DATA / "lisc").glob("*/*.jpg")), 8)]
    reference = fit_reference(pbc[:8], "reinhard")
    target = _nucleus_lab([apply_stain(image, reference) for image in pbc[8:]])
    for site in (jiangxi, lisc):
        before = np.linalg.norm(_nucleus_lab(site) - _nucleus_lab(pbc[8:]))
        after = np.linalg.norm(_nucleus_lab([apply_stain(image, reference) for image in site]) - target)
        assert after < 0.5 * before, (before, after)
