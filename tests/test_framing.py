"""Framing: the white cell is found and centred at one scale whatever the input's scale and offset;
no cell, no ruler and bad parameters give clear answers."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import SHARED_DATA
from smear_images import NUCLEUS_UM, RED_CELL_UM, smear

from pipeline.framing import (
    FRAMING_REASONS,
    estimate_pixel_size,
    frame_cell,
    locate_nucleus,
    measure_red_cells,
)
from pipeline.imaging import read_rgb

SIZE = 96
FIELD_UM = 30.0


@pytest.mark.parametrize("palette", ["giemsa", "yellow", "blue"])
@pytest.mark.parametrize(("px_per_um", "centre"), [(1.5, (0.5, 0.5)), (2.0, (0.3, 0.65)), (3.0, (0.62, 0.4))])
def test_locate_nucleus_finds_the_cell_where_it_is(palette, px_per_um, centre):
    cell = smear(palette=palette, px_per_um=px_per_um, centre=centre)
    found = locate_nucleus(cell.image)
    assert found.found and found.reason == ""
    # Box coordinates are pixel edges, the generator's centre a pixel centre.
    x, y = found.centre
    assert abs(x - 0.5 - cell.centre[0]) <= 1 and abs(y - 0.5 - cell.centre[1]) <= 1
    assert found.extent_px == pytest.approx(NUCLEUS_UM * px_per_um, rel=0.15)


@pytest.mark.parametrize(("px_per_um", "centre"), [(1.5, (0.5, 0.5)), (2.0, (0.3, 0.65)), (3.0, (0.62, 0.4))])
def test_pixel_size_framing_centres_the_cell_at_one_scale(px_per_um, centre):
    cell = smear(px_per_um=px_per_um, centre=centre)
    framed = frame_cell(cell.image, SIZE, "pixel-size", um_per_px=1 / px_per_um, field_um=FIELD_UM)
    assert framed.found and framed.image.shape == (SIZE, SIZE, 3) and framed.image.dtype == np.uint8
    assert framed.um_per_px == pytest.approx(1 / px_per_um)
    x0, y0, x1, y1 = framed.box
    assert x1 - x0 == pytest.approx(FIELD_UM * px_per_um, abs=1)
    inside = locate_nucleus(framed.image)
    assert inside.found
    assert inside.centre == pytest.approx((SIZE / 2, SIZE / 2), abs=2)
    # The nucleus comes out the same width whatever the input's pixel size.
    assert inside.extent_px == pytest.approx(NUCLEUS_UM / FIELD_UM * SIZE, rel=0.15)


@pytest.mark.parametrize("px_per_um", [1.5, 2.5])
def test_red_cell_framing_measures_the_ruler(px_per_um):
    cell = smear(size=200, px_per_um=px_per_um, centre=(0.45, 0.55))
    framed = frame_cell(cell.image, SIZE, "red-cell", field_um=FIELD_UM)
    assert framed.found
    assert framed.red_cell_px == pytest.approx(RED_CELL_UM * px_per_um, rel=0.1)
    assert framed.um_per_px == pytest.approx(1 / px_per_um, rel=0.1)
    inside = locate_nucleus(framed.image)
    assert inside.centre == pytest.approx((SIZE / 2, SIZE / 2), abs=2)
    assert inside.extent_px == pytest.approx(NUCLEUS_UM / FIELD_UM * SIZE, rel=0.2)


@pytest.mark.parametrize("px_per_um", [1.5, 3.0])
def test_nucleus_framing_gives_the_nucleus_a_fixed_share(px_per_um):
    cell = smear(px_per_um=px_per_um, centre=(0.4, 0.6))
    framed = frame_cell(cell.image, SIZE, "nucleus", nucleus_fraction=0.4)
    assert framed.found and framed.um_per_px is None
    inside = locate_nucleus(framed.image)
    assert inside.centre == pytest.approx((SIZE / 2, SIZE / 2), abs=2)
    assert inside.extent_px == pytest.approx(0.4 * SIZE, rel=0.15)


def test_square_past_the_edge_is_filled_with_the_background_colour():
    cell = smear(px_per_um=2.0, centre=(0.12, 0.12), red_cells=False)
    framed = frame_cell(cell.image, SIZE, "pixel-size", um_per_px=0.5, field_um=60)
    assert framed.found and framed.box[0] < 0 and framed.box[1] < 0
    background = np.median(cell.image[cell.background], axis=0)
    assert np.abs(framed.image[0, 0].astype(int) - background).max() <= 4


def test_black_padding_inside_the_image_becomes_background():
    cell = smear(px_per_um=2.0)
    padded = cell.image.copy()
    padded[:, :20] = 0
    framed = frame_cell(padded, SIZE, "pixel-size", um_per_px=0.5, field_um=80)
    assert framed.found
    assert framed.image.max(axis=2).min() > 100


def test_framing_is_deterministic():
    cell = smear(px_per_um=2.0, centre=(0.4, 0.55), seed=3)
    first = frame_cell(cell.image, SIZE, "red-cell")
    second = frame_cell(cell.image.copy(), SIZE, "red-cell")
    assert first.box == second.box and np.array_equal(first.image, second.image)


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (smear(white_cell=False).image, "no-cell-found"),
        (np.full((64, 64, 3), 255, np.uint8), "blank-image"),
        (np.zeros((64, 64, 3), np.uint8), "blank-image"),
        (np.full((64, 64, 3), (250, 246, 168), np.uint8), "blank-image"),
    ],
    ids=["red-cells-only", "white", "black", "yellow"],
)
def test_no_cell_gives_a_reason_never_a_crop(image, reason):
    for scale in ("red-cell", "pixel-size", "nucleus"):
        framed = frame_cell(image, SIZE, scale, um_per_px=0.5)
        assert not framed.found
        assert framed.reason == reason and framed.meaning == FRAMING_REASONS[reason]
        assert framed.image is None and framed.box is None


def test_red_cell_scale_without_red_cells_says_so():
    tight = smear(size=64, px_per_um=4.0, red_cells=False).image
    framed = frame_cell(tight, SIZE, "red-cell")
    assert not framed.found and framed.reason == "no-red-cells"
    assert framed.nucleus is not None and framed.nucleus.found
    assert measure_red_cells(tight).reason == "no-red-cells"


def test_site_pixel_size_from_many_images():
    site = [smear(px_per_um=2.0, centre=(0.4 + 0.05 * i, 0.5), seed=i).image for i in range(3)]
    size = estimate_pixel_size(site)
    assert size.found and size.images_measured == 3 and size.images_total == 3
    assert size.um_per_px == pytest.approx(1 / 2.0, rel=0.08)
    tight = [smear(size=64, px_per_um=4.0, red_cells=False, seed=i).image for i in range(3)]
    assert estimate_pixel_size(tight).um_per_px is None


@pytest.mark.parametrize("um_per_px", [0, -0.1, float("nan"), None, True])
def test_bad_pixel_size_names_the_parameter(um_per_px):
    with pytest.raises(ValueError, match="um_per_px"):
        frame_cell(smear().image, SIZE, "pixel-size", um_per_px=um_per_px)


def test_zero_pixel_size_is_refused_whatever_the_scale():
    with pytest.raises(ValueError, match="um_per_px"):
        frame_cell(smear().image, SIZE, "nucleus", um_per_px=0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"scale": "zoom"}, "scale"),
        ({"size": 4}, "size"),
        ({"size": 96.0}, "size"),
        ({"field_um": 0}, "field_um"),
        ({"red_cell_um": -7.5}, "red_cell_um"),
        ({"nucleus_fraction": 0}, "nucleus_fraction"),
        ({"nucleus_fraction": 1.5}, "nucleus_fraction"),
    ],
)
def test_bad_parameters_name_themselves(kwargs, name):
    call = {"size": SIZE, "scale": "nucleus"} | kwargs
    with pytest.raises(ValueError, match=name):
        frame_cell(smear().image, **call)


def test_not_an_rgb_image_is_refused():
    with pytest.raises(ValueError, match="uint8 RGB"):
        frame_cell(smear().image.astype(np.float32), SIZE, "nucleus")
    with pytest.raises(ValueError, match="uint8 RGB"):
        locate_nucleus(np.zeros((32, 32), np.uint8))


def _site_images(folder, pattern, count):
    paths = sorted(folder.glob(pattern))
    return [read_rgb(path) for path in random.Random(0).sample(paths, min(count, len(paths)))]


@pytest.mark.shared_data
def test_real_sites_cells_are_found():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not here")
    sites = {
        "pbc": _site_images(SHARED_DATA / "pbc", "*/*.jpg", 8),
        "jiangxi": _site_images(SHARED_DATA / "wbc-seg" / "Dataset 1", "*.bmp", 8),
        "cellavision": _site_images(SHARED_DATA / "wbc-seg" / "Dataset 2", "*.bmp", 8),
        "lisc": _site_images(SHARED_DATA / "lisc", "*/*.jpg", 8),
    }
    for site, images in sites.items():
        assert images, f"{site}: no images"
        for image in images:
            framed = frame_cell(image, SIZE, "nucleus")
            assert framed.found, f"{site}: {framed.reason}"
