"""Scale and framing standardisation: find the white cell and cut a square around it at one scale.

Sites frame their cells differently: a cell in context filling a third of a 360 px field, a tight
120 px crop, a 224 px crop where the cell fills half. :func:`frame_cell` brings any of them to one
framing: it finds the white cell's nucleus (:func:`locate_nucleus`), centres a square on it and
sizes the square by one of :data:`FRAMING_SCALES`:

- ``red-cell``: the red cells of the same image are the ruler (about :data:`RED_CELL_UM` µm
  across, :func:`measure_red_cells`); the square spans ``field_um`` micrometres. Sizes stay
  physical, so a small lymphocyte stays smaller than a monocyte and a platelet stays tiny.
- ``pixel-size``: the same with a pixel size the user knows (``um_per_px``), or one measured over
  a whole site's images (:func:`estimate_pixel_size`), steadier than one image's few red cells.
- ``nucleus``: the nucleus fills ``nucleus_fraction`` of the square's side. Needs no ruler (tight
  crops have no whole red cell), but it erases size: every nucleus comes out the same width.

When no nucleus is found, or the red cells cannot be measured, the result says so
(``found=False`` and a ``reason`` from :data:`FRAMING_REASONS`); nothing falls back silently.

Finding the nucleus: nuclei take up far more of the azure dye than anything else in a May-Grünwald
or Giemsa smear, so they are the pixels whose optical density differs most between colour channels
("chromatic density", measured against the image's own background so a yellow or blue illuminant
drops out). Red cells absorb less and more evenly, in every site: in Tehran's bluish smears a
red cell's density is nearly as high as a nucleus's, but not its spread across channels. A
three-class Otsu threshold (background, red cells and cytoplasm, nuclei) picks the nuclear class per
image, above a floor (:data:`MIN_NUCLEUS_CONTRAST`) so a smear without a white cell does not turn its
red cells into one. The chosen component is the largest, weighted toward the image centre (the
labelled cell of a crop is near its centre); nearby components (the lobes of a segmented nucleus)
join it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.imaging import resize_square
from pipeline.stain import (
    background_rgb,
    check_rgb,
    chromatic_density,
    nucleus_threshold,
    optical_density,
    stained_mask,
    stats_view,
    void_mask,
)

FRAMING_SCALES = ("red-cell", "pixel-size", "nucleus")

FRAMING_REASONS = {
    "blank-image": "the framing step found no stained pixels at all (an empty or blank frame)",
    "no-cell-found": "the framing step found no nucleus-coloured region large enough to be a white cell",
    "no-red-cells": "the framing step could not measure enough whole, round red cells to use them as a ruler",
}

# A red cell's diameter in a blood smear, micrometres: the ruler every smear carries.
RED_CELL_UM = 7.5
# The nucleus is found, and red cells measured, on a copy whose longer side is at most this.
DETECT_SIDE = 200
# Smallest nucleus component, as a share of the detection copy's area (a platelet is about 0.1 %).
MIN_NUCLEUS_SHARE = 0.0004
# A component within this many seed diameters of the seed nucleus, and stained at least this share as
# strongly, is one of its lobes.
LOBE_REACH = 0.5
LOBE_CONTRAST = 0.75
# How much the distance from the image centre discounts a component's area (0: not at all).
CENTRE_WEIGHT = 0.5
# Red cells: fewest whole ones for a measurement, and the shape a whole, lone one has.
MIN_RED_CELLS = 3
MIN_RED_CELL_AREA = 30
MIN_ROUND_ASPECT = 0.8
MIN_DISC_FILL = 0.75
# A red cell is at least this share of the nucleus's extent wide (a lymphocyte's nucleus is about one red
# cell across): smaller round things are platelets, granules and debris.
MIN_RED_CELL_TO_NUCLEUS = 0.35
# Fewest red cells, over all of a site's images, for a site pixel size.
MIN_SITE_RED_CELLS = 10
# Opening with this symmetric kernel drops single-pixel specks without moving what it keeps.
_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.uint8)


@dataclass(frozen=True)
class NucleusLocation:
    """Where the white cell's nucleus is: ``box`` (x0, y0, x1, y1, source pixels) when ``found``;
    ``background`` is the smear's background colour (RGB) it was measured against."""

    found: bool
    reason: str = ""
    box: tuple[int, int, int, int] | None = None
    area_px: float = 0.0
    background: tuple[float, float, float] = (255.0, 255.0, 255.0)

    @property
    def centre(self) -> tuple[float, float]:
        """The box's centre (x, y) in source pixels."""
        if self.box is None:
            raise ValueError(f"no nucleus was found ({self.reason}), so it has no centre")
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def extent_px(self) -> float:
        """The box's longer side in source pixels: how wide the nucleus (all its lobes) is."""
        if self.box is None:
            raise ValueError(f"no nucleus was found ({self.reason}), so it has no extent")
        x0, y0, x1, y1 = self.box
        return float(max(x1 - x0, y1 - y0))


@dataclass(frozen=True)
class RedCells:
    """Red-cell diameters measured in one image (source pixels): their median when ``found``."""

    found: bool
    reason: str = ""
    diameter_px: float | None = None
    diameters_px: tuple[float, ...] = ()


@dataclass(frozen=True)
class Framing:
    """The framed cell, or why there is none.

    ``box`` is the square cut from the source (x0, y0, x1, y1 in source pixels; it may reach past the
    image, where the background colour fills it); ``image`` is that square at the output size;
    ``um_per_px`` the source pixel size used (``red-cell`` and ``pixel-size``) and ``red_cell_px`` the
    measured red-cell diameter (``red-cell``). ``reason`` is a key of :data:`FRAMING_REASONS`.
    """

    found: bool
    reason: str = ""
    box: tuple[int, int, int, int] | None = None
    nucleus: NucleusLocation | None = None
    um_per_px: float | None = None
    red_cell_px: float | None = None
    image: np.ndarray | None = None

    @property
    def meaning(self) -> str:
        """What ``reason`` means, in words ('' when found)."""
        return FRAMING_REASONS.get(self.reason, "")


@dataclass(frozen=True)
class PixelSize:
    """A site's pixel size measured from the red cells of many images."""

    um_per_px: float | None
    images_measured: int
    images_total: int
    cells_measured: int
    red_cell_px: float | None

    @property
    def found(self) -> bool:
        """Whether any red cell could be measured."""
        return self.um_per_px is not None


# ---------------------------------------------------------------------------------------------
# Finding the nucleus


def _seed_component(stats: np.ndarray, centroids: np.ndarray, shape: tuple[int, int], min_area: float) -> int | None:
    """The label of the largest component, its area discounted by its distance from the centre."""
    height, width = shape
    half_diagonal = math.hypot(width, height) / 2
    distance = np.hypot(centroids[:, 0] - (width - 1) / 2, centroids[:, 1] - (height - 1) / 2) / half_diagonal
    score = stats[:, cv2.CC_STAT_AREA] * (1.0 - CENTRE_WEIGHT * distance)
    score[0] = -1.0
    score[stats[:, cv2.CC_STAT_AREA] < min_area] = -1.0
    best = int(np.argmax(score))
    return best if score[best] > 0 else None


def _with_lobes(labels: np.ndarray, stats: np.ndarray, contrast: np.ndarray, seed: int) -> np.ndarray:
    """The seed component's mask joined by its lobes: components within :data:`LOBE_REACH` seed
    diameters whose mean chromatic density is at least :data:`LOBE_CONTRAST` of the seed's (the
    darker edges of overlapping red cells that pass the threshold are much fainter than a lobe)."""
    reach = LOBE_REACH * math.sqrt(4 * stats[seed, cv2.CC_STAT_AREA] / math.pi)
    distance = cv2.distanceTransform((labels != seed).astype(np.uint8), cv2.DIST_L2, 3)
    mean_contrast = np.bincount(labels.ravel(), weights=contrast.ravel(), minlength=len(stats))
    mean_contrast /= np.maximum(stats[:, cv2.CC_STAT_AREA], 1)
    near = np.zeros(len(stats), bool)
    near[labels[distance <= reach]] = True
    near &= mean_contrast >= LOBE_CONTRAST * mean_contrast[seed]
    near[0], near[seed] = False, True
    return near[labels]


def locate_nucleus(image: np.ndarray) -> NucleusLocation:
    """Find the white cell's nucleus in an RGB uint8 image (see the module notes for how).

    Not found (``found=False``) with reason ``blank-image`` when nothing in the image is stained, or
    ``no-cell-found`` when nothing is nucleus-coloured enough or large enough.
    """
    check_rgb(image)
    small = stats_view(image, DETECT_SIDE)
    scale = image.shape[1] / small.shape[1], image.shape[0] / small.shape[0]
    background = background_rgb(small)
    colour = tuple(float(c) for c in background)
    void = void_mask(small)
    density = optical_density(small, background)
    if not stained_mask(density, void).any():
        return NucleusLocation(False, "blank-image", background=colour)
    contrast = chromatic_density(density, void)
    threshold = nucleus_threshold(contrast, void)
    mask = cv2.morphologyEx((contrast > threshold).astype(np.uint8), cv2.MORPH_OPEN, _CROSS)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    seed = _seed_component(stats, centroids, mask.shape, MIN_NUCLEUS_SHARE * mask.size) if count > 1 else None
    if seed is None:
        return NucleusLocation(False, "no-cell-found", background=colour)
    nucleus = _with_lobes(labels, stats, contrast, seed)
    x, y, w, h = cv2.boundingRect(nucleus.astype(np.uint8))
    box = (
        math.floor(x * scale[0]),
        math.floor(y * scale[1]),
        math.ceil((x + w) * scale[0]),
        math.ceil((y + h) * scale[1]),
    )
    return NucleusLocation(True, box=box, area_px=float(nucleus.sum() * scale[0] * scale[1]), background=colour)


# ---------------------------------------------------------------------------------------------
# The red-cell ruler


def _filled(mask: np.ndarray) -> np.ndarray:
    """``mask`` with its holes filled (a red cell's pale centre is part of the cell)."""
    framed = cv2.copyMakeBorder((~mask).astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=1)
    flood = np.zeros((framed.shape[0] + 2, framed.shape[1] + 2), np.uint8)
    cv2.floodFill(framed, flood, (0, 0), 2)
    return (framed != 2)[1:-1, 1:-1]


def _round_cell_diameters(mask: np.ndarray, exclude: np.ndarray, min_diameter: float) -> list[float]:
    """Equivalent diameters of the components of ``mask`` that look like one whole, lone red cell:
    not touching the border or ``exclude``, about as wide as tall, filling their bounding ellipse,
    at least ``min_diameter`` across."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    touched = set(np.unique(labels[exclude]).tolist())
    height, width = mask.shape
    diameters = []
    for label in range(1, count):
        x, y, w, h, area = stats[label]
        if label in touched or area < MIN_RED_CELL_AREA or x == 0 or y == 0 or x + w >= width or y + h >= height:
            continue
        if min(w, h) / max(w, h) < MIN_ROUND_ASPECT or area / (math.pi / 4 * w * h) < MIN_DISC_FILL:
            continue
        diameter = math.sqrt(4 * area / math.pi)
        if diameter >= min_diameter:
            diameters.append(diameter)
    return diameters


def measure_red_cells(image: np.ndarray, nucleus: NucleusLocation | None = None) -> RedCells:
    """Median diameter (source pixels) of the whole, lone red cells in an RGB uint8 image.

    Stained regions that are round, whole (not cut by the border) and not the white cell (the
    region around ``nucleus``, when given) count; clumps and overlaps fail the roundness test.
    Not found (reason ``no-red-cells``) with fewer than :data:`MIN_RED_CELLS` of them.
    """
    check_rgb(image)
    small = stats_view(image, DETECT_SIDE)
    scale = image.shape[1] / small.shape[1]
    void = void_mask(small)
    stained = stained_mask(optical_density(small, background_rgb(small)), void)
    # A thin opening cuts the narrow necks between touching cells.
    cells = cv2.morphologyEx(_filled(stained).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
    exclude = cv2.dilate(void.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    min_diameter = 0.0
    if nucleus is not None and nucleus.box is not None:
        x0, y0, x1, y1 = (round(v / scale) for v in nucleus.box)
        exclude[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
        min_diameter = MIN_RED_CELL_TO_NUCLEUS * nucleus.extent_px / scale
    diameters = sorted(d * scale for d in _round_cell_diameters(cells, exclude, min_diameter))
    if len(diameters) < MIN_RED_CELLS:
        return RedCells(False, "no-red-cells", diameters_px=tuple(diameters))
    return RedCells(True, diameter_px=float(np.median(diameters)), diameters_px=tuple(diameters))


def estimate_pixel_size(images: Iterable[np.ndarray], red_cell_um: float = RED_CELL_UM) -> PixelSize:
    """One pixel size (µm/px) for a set of images from one site and scanner, from the median diameter
    of all the red cells measured in them; ``um_per_px`` is None when fewer than
    :data:`MIN_SITE_RED_CELLS` could be measured (tight crops show no whole red cell)."""
    _check_positive("red_cell_um", red_cell_um)
    diameters: list[float] = []
    measured = total = 0
    for image in images:
        total += 1
        cells = measure_red_cells(image, locate_nucleus(image))
        diameters += cells.diameters_px
        measured += bool(cells.diameters_px)
    if len(diameters) < MIN_SITE_RED_CELLS:
        return PixelSize(None, measured, total, len(diameters), None)
    diameter = float(np.median(diameters))
    return PixelSize(red_cell_um / diameter, measured, total, len(diameters), diameter)


# ---------------------------------------------------------------------------------------------
# Cutting the square


def _check_positive(name: str, value: float | None) -> float:
    valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not valid or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def cut_square(image: np.ndarray, centre: tuple[float, float], side: float, size: int, fill: np.ndarray) -> np.ndarray:
    """The square of ``side`` source pixels centred on ``centre``, at ``size`` x ``size`` pixels.

    Parts of the square past the image edge, and padding inside it, take the colour ``fill``.
    """
    shrink = size / side
    if shrink < 1:
        # Shrink the whole image first (area filter, no aliasing) and cut the square at its scale.
        height, width = image.shape[:2]
        new_size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
        image = cv2.resize(image, new_size, interpolation=cv2.INTER_AREA)
        centre, side = (centre[0] * new_size[0] / width, centre[1] * new_size[1] / height), float(size)
    pixels = max(1, round(side))
    x0, y0 = round(centre[0] - pixels / 2), round(centre[1] - pixels / 2)
    height, width = image.shape[:2]
    colour = tuple(int(c) for c in np.clip(np.round(fill), 0, 255))
    region = image[max(0, y0) : max(0, min(height, y0 + pixels)), max(0, x0) : max(0, min(width, x0 + pixels))]
    if region.size == 0:
        return np.full((size, size, 3), colour, np.uint8)
    region = region.copy()
    # Padding gets the background colour too, with the dark fringe (up to 3 px, compression) along its edge.
    void = void_mask(region)
    if void.any():
        region[cv2.dilate(void.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0] = colour
    top, left = max(0, -y0), max(0, -x0)
    square = cv2.copyMakeBorder(
        region,
        top,
        pixels - region.shape[0] - top,
        left,
        pixels - region.shape[1] - left,
        cv2.BORDER_CONSTANT,
        value=colour,
    )
    return resize_square(square, size)


def frame_cell(
    image: np.ndarray,
    size: int,
    scale: str,
    *,
    field_um: float = 30.0,
    um_per_px: float | None = None,
    nucleus_fraction: float = 0.4,
    red_cell_um: float = RED_CELL_UM,
) -> Framing:
    """Centre a ``size`` x ``size`` square on the white cell of an RGB uint8 image at one scale.

    ``scale`` is one of :data:`FRAMING_SCALES`: ``red-cell`` (the square spans ``field_um`` µm, the
    pixel size measured from this image's red cells, ``red_cell_um`` across), ``pixel-size`` (the same
    with the given ``um_per_px``, checked whenever it is given) or ``nucleus`` (the nucleus spans
    ``nucleus_fraction`` of the side).
    Returns ``found=False`` with a reason from :data:`FRAMING_REASONS` when there is no cell or no
    ruler; ValueError naming the parameter when one is out of range.
    """
    check_rgb(image)
    if scale not in FRAMING_SCALES:
        raise ValueError(f"scale must be one of {list(FRAMING_SCALES)}, got {scale!r}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer of at least 8 pixels, got {size!r}")
    field_um, red_cell_um = _check_positive("field_um", field_um), _check_positive("red_cell_um", red_cell_um)
    if um_per_px is not None or scale == "pixel-size":
        um_per_px = _check_positive("um_per_px", um_per_px)
    if not 0 < nucleus_fraction <= 1:
        raise ValueError(f"nucleus_fraction must be in (0, 1], got {nucleus_fraction!r}")

    nucleus = locate_nucleus(image)
    if not nucleus.found:
        return Framing(False, nucleus.reason, nucleus=nucleus)
    red_cell_px = None
    if scale == "red-cell":
        cells = measure_red_cells(image, nucleus)
        if not cells.found:
            return Framing(False, cells.reason, nucleus=nucleus)
        red_cell_px = cells.diameter_px
        um_per_px = red_cell_um / red_cell_px
    side = nucleus.extent_px / nucleus_fraction if scale == "nucleus" else field_um / um_per_px
    centre = nucleus.centre
    box = (
        round(centre[0] - side / 2),
        round(centre[1] - side / 2),
        round(centre[0] + side / 2),
        round(centre[1] + side / 2),
    )
    framed = cut_square(image, centre, side, size, np.asarray(nucleus.background))
    return Framing(True, box=box, nucleus=nucleus, um_per_px=um_per_px, red_cell_px=red_cell_px, image=framed)
