"""Colour standardisation of blood-smear images: one reference fitted on training images, applied
identically to every image the model sees.

:func:`fit_reference` turns several RGB images into a :class:`StainReference` (plain numbers, saved
as JSON with the model); :func:`apply_stain` brings any image to it. Methods (:data:`STAIN_METHODS`):

- ``none``: pixels unchanged.
- ``reinhard``: Reinhard et al. 2001, "Color transfer between images": each CIELAB channel is
  shifted and scaled to the reference's mean and standard deviation, region by region (below).
- ``macenko``: Macenko et al. 2009, "A method for normalizing histology slides for quantitative
  analysis": optical density is split into two stain vectors (for May-Grünwald-Giemsa, the azure
  of nuclei and the eosin of red cells and granules, the extreme angles of the stained pixels in
  their principal plane) and re-composed with the reference's vectors and typical concentrations.

What blood smears need that the textbook versions (and torchstain's numpy ports of them) lack:

- Statistics are taken per region: the white cell's nucleus (:func:`nucleus_threshold`), the
  other stained pixels (red cells, cytoplasm, granules) and the background. The share of each
  differs by site, because framing does: a tight crop is mostly nucleus and cytoplasm, a cell in
  context mostly red cells and background. Matched as one population, a tight crop's nucleus is
  painted in the reference's red-cell colours; matched per region, nucleus goes to nucleus.
  Macenko's stain concentrations are scaled the same way: the median nuclear-stain concentration
  of the nucleus, not the 99th percentile over all pixels.
- The background is standardised on its own: optical density is measured against each image's
  own background colour (which removes a yellow or blue illuminant or a camera's white balance),
  and background pixels are moved onto the reference background. Regions are blended by smooth
  weights (how stained, how nucleus-like a pixel is), so no seam appears where they meet.
- Padding (pixels black in every channel, such as the edges of crops taken at a slide's border)
  is left as it is and never enters a statistic.
- An image with too few pixels in a region borrows the other stained region's transform, or gets
  only the background shift (all white, a blank frame); one whose stain cannot be split in two
  (grey, one colour) is unmixed with the reference's own vectors; gains are bounded by
  :data:`MAX_GAIN`. No division can reach zero, so no output is NaN.

Statistics are measured on a copy at most :data:`STATS_SIDE` pixels on a side (they do not need
more); the transform is applied at full size with vectorised OpenCV/numpy operations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

STAIN_METHODS = ("none", "reinhard", "macenko")

# Optical density (natural log) above which a pixel counts as stained; Macenko's beta.
STAINED_OD = 0.15
# Pixels no brighter than this in every channel are padding, not smear.
VOID_LEVEL = 10
# Statistics are taken on a copy whose longer side is at most this.
STATS_SIDE = 128
# Fewer pixels than this in a region (on the statistics copy) carry no usable statistics.
MIN_STAINED = 24
# Lowest chromatic density (spread of optical density across channels) a nucleus pixel may have:
# nuclei measure 0.6 to 3 on the four public sites this was tuned on, red cells 0.1 to 0.3.
MIN_NUCLEUS_CONTRAST = 0.35
# Width of the ramp from "not nucleus" to "nucleus" around the threshold, as a share of it.
NUCLEUS_RAMP = 0.25
# The chromatic-density histogram the nucleus threshold is chosen on: bins over 0..CONTRAST_RANGE.
CONTRAST_BINS = 128
CONTRAST_RANGE = 3.0
# The regions the CIELAB methods measure and match, besides the background.
REGIONS = ("nucleus", "stained")
# Bounds on how much an image's stain spread or density may be multiplied to match the
# reference: a faint image is not amplified into noise, a dark one not flattened to nothing.
MAX_GAIN = 4.0
# The background colour is the median of the brightest pixels: this share of the non-padding ones.
BACKGROUND_SHARE = 0.10
# Macenko: the stain vectors are the (ALPHA, 100 - ALPHA) percentiles of the pixel angles.
ALPHA = 1.0
# Two stain vectors closer than this cosine are one colour: the image cannot be split in two.
MAX_STAIN_COSINE = 0.995
# Fitting pools at most this many stained pixels per image into the reference's stain estimate.
POOL_PER_IMAGE = 4000


@dataclass(frozen=True)
class StainReference:
    """A fitted colour reference: ``method`` and its numbers (``values``, plain lists of floats).

    ``n_images`` is how many images it was fitted on. Checked when made (ValueError naming what is
    missing or of the wrong shape); :meth:`to_dict` / :meth:`from_dict` round-trip it through JSON
    exactly.
    """

    method: str
    values: dict[str, list] = field(default_factory=dict)
    n_images: int = 0

    def __post_init__(self) -> None:
        if self.method not in STAIN_METHODS:
            raise ValueError(f"stain reference: method must be one of {list(STAIN_METHODS)}, got {self.method!r}")
        shapes = _VALUE_SHAPES[self.method]
        wrong = {key: shape for key, shape in shapes.items() if np.shape(self.values.get(key)) != shape}
        if wrong:
            raise ValueError(f"stain reference ({self.method}): values missing or of the wrong shape, expected {wrong}")
        plain = {key: _plain(self.values[key]) for key in shapes}
        if not all(np.isfinite(value).all() for value in plain.values()):
            raise ValueError(f"stain reference ({self.method}): values must be finite numbers")
        object.__setattr__(self, "values", plain)

    def to_dict(self) -> dict[str, Any]:
        """The reference as JSON-ready plain data."""
        return {"method": self.method, "values": dict(self.values), "n_images": self.n_images}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StainReference:
        """A reference from :meth:`to_dict`'s output; ValueError naming what is missing or wrong."""
        return cls(
            method=data.get("method"), values=dict(data.get("values") or {}), n_images=int(data.get("n_images", 0))
        )


_VALUE_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "none": {},
    "reinhard": {
        "nucleus_mean": (3,),
        "nucleus_std": (3,),
        "stained_mean": (3,),
        "stained_std": (3,),
        "background": (3,),
    },
    "macenko": {"stains": (3, 2), "concentration": (2,), "background": (3,)},
}


def _plain(value: Any) -> list:
    return np.asarray(value, dtype=np.float64).tolist()


# ---------------------------------------------------------------------------------------------
# Measurements shared by every method (and by the framing step)


def check_rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    """``image`` itself when it is HxWx3 uint8; ValueError naming ``name`` otherwise."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"{name} must be an HxWx3 uint8 RGB array, got shape {shape} of {dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} has no pixels (shape {image.shape})")
    return image


def stats_view(image: np.ndarray, side: int = STATS_SIDE) -> np.ndarray:
    """``image`` shrunk by the smallest whole factor that brings its longer side to at most ``side``
    (area filter; whole factors take OpenCV's fast path); itself when already that small."""
    factor = math.ceil(max(image.shape[:2]) / side)
    if factor <= 1:
        return image
    return cv2.resize(image, None, fx=1 / factor, fy=1 / factor, interpolation=cv2.INTER_AREA)


def channel_max(array: np.ndarray) -> np.ndarray:
    """The largest of the three channels per pixel (numpy's reduction over a length-3 axis is slow)."""
    return np.maximum(np.maximum(array[..., 0], array[..., 1]), array[..., 2])


def channel_min(array: np.ndarray) -> np.ndarray:
    """The smallest of the three channels per pixel."""
    return np.minimum(np.minimum(array[..., 0], array[..., 1]), array[..., 2])


def void_mask(image: np.ndarray) -> np.ndarray:
    """True where a pixel is padding (every channel at most :data:`VOID_LEVEL`), not smear."""
    return channel_max(image) <= VOID_LEVEL


def background_rgb(image: np.ndarray) -> np.ndarray:
    """The smear's background colour (float RGB): the median of its brightest non-padding pixels.

    White when the image is nothing but padding.
    """
    flat = image.reshape(-1, 3)
    brightness = flat[:, 0].astype(np.int32) + flat[:, 1] + flat[:, 2]
    brightness[channel_max(flat) <= VOID_LEVEL] = -1
    counts = np.bincount(brightness + 1, minlength=3 * 255 + 2)[1:]
    if counts.sum() == 0:
        return np.full(3, 255.0)
    # The brightest level at which at least BACKGROUND_SHARE of the pixels are at least as bright.
    at_least = np.cumsum(counts[::-1])[::-1]
    cut = int(np.flatnonzero(at_least >= BACKGROUND_SHARE * counts.sum())[-1])
    return np.median(flat[brightness >= cut], axis=0).astype(np.float64)


def optical_density(image: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Per-channel optical density (natural log, float32 HxWx3) against ``background``, clipped at 0.

    Pixels brighter than the background (0 density) carry no stain. Computed through a 256-entry
    table per channel, so it costs one lookup per pixel.
    """
    levels = np.arange(256, dtype=np.float64)
    tables = np.log((np.asarray(background, dtype=np.float64)[None, :] + 1.0) / (levels[:, None] + 1.0))
    tables = np.clip(tables, 0.0, None).astype(np.float32).reshape(256, 1, 3)
    return cv2.LUT(np.ascontiguousarray(image), tables)


def stained_mask(density: np.ndarray, void: np.ndarray) -> np.ndarray:
    """True where a pixel is stained: some channel's density above :data:`STAINED_OD`, not padding."""
    return (channel_max(density) > STAINED_OD) & ~void


def stain_weight(density: np.ndarray) -> np.ndarray:
    """How stained each pixel is, 0 (background) to 1, a ramp around :data:`STAINED_OD` (float32 HxW).

    The ramp, not a hard mask, keeps cell edges free of seams where two transforms meet.
    """
    ramp = (channel_max(density) - np.float32(0.5 * STAINED_OD)) * np.float32(1 / STAINED_OD)
    return np.clip(ramp, 0.0, 1.0)


def chromatic_density(density: np.ndarray, void: np.ndarray) -> np.ndarray:
    """Per-pixel spread of optical density across the three channels (float32 HxW), 0 on padding.

    High where a dye absorbs one part of the spectrum much more than the rest (the azure of
    nuclei), low on the background and on the evenly absorbing red cells, in every site: in bluish
    smears a red cell's density is nearly a nucleus's, but not its spread across channels.
    """
    contrast = channel_max(density) - channel_min(density)
    contrast[void] = 0.0
    return contrast


def three_class_threshold(values: np.ndarray) -> float:
    """The upper of the two thresholds that split ``values`` into three classes with the largest
    between-class variance (multi-level Otsu), on a histogram over 0..:data:`CONTRAST_RANGE`."""
    width = CONTRAST_RANGE / CONTRAST_BINS
    bins = np.minimum((values * (1.0 / width)).astype(np.int64), CONTRAST_BINS - 1)
    share = np.bincount(bins.ravel(), minlength=CONTRAST_BINS) / max(1, bins.size)
    centres = (np.arange(CONTRAST_BINS) + 0.5) * width
    weight, moment = np.cumsum(share), np.cumsum(share * centres)
    low, high = np.triu_indices(CONTRAST_BINS - 1, 1)
    w0, w1, w2 = weight[low], weight[high] - weight[low], 1.0 - weight[high]
    m0, m1, m2 = moment[low], moment[high] - moment[low], moment[-1] - moment[high]
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = sum(np.where(w > 1e-12, m * m / w, 0.0) for w, m in ((w0, m0), (w1, m1), (w2, m2)))
    return float((high[int(np.argmax(spread))] + 1) * width)


def nucleus_threshold(contrast: np.ndarray, void: np.ndarray) -> float:
    """The chromatic density above which a pixel is nucleus in this image: the upper class of a
    three-class Otsu split (background, red cells and cytoplasm, nuclei), at least
    :data:`MIN_NUCLEUS_CONTRAST` so a smear without a white cell does not make its red cells one."""
    return max(three_class_threshold(contrast[~void]), MIN_NUCLEUS_CONTRAST)


def nucleus_weight(contrast: np.ndarray, threshold: float) -> np.ndarray:
    """How nucleus-like each pixel is, 0 to 1, a ramp around ``threshold`` (float32 HxW)."""
    ramp = (contrast - np.float32(threshold)) * np.float32(1.0 / (NUCLEUS_RAMP * threshold)) + np.float32(0.5)
    return np.clip(ramp, 0.0, 1.0)


def rgb_to_lab(image: np.ndarray) -> np.ndarray:
    """uint8 RGB to float32 CIELAB (L 0..100, a and b about -127..127), OpenCV's sRGB/D65 conversion."""
    return cv2.cvtColor(image.astype(np.float32) * np.float32(1 / 255), cv2.COLOR_RGB2LAB)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """float32 CIELAB to uint8 RGB, out-of-gamut values clipped."""
    rgb = cv2.cvtColor(lab.astype(np.float32, copy=False), cv2.COLOR_LAB2RGB)
    # Negatives clipped first: convertScaleAbs rounds and saturates at 255, but takes absolute values.
    return cv2.convertScaleAbs(np.maximum(rgb, np.float32(0)), alpha=255.0)


@dataclass(frozen=True)
class _Measured:
    """One image's statistics copy, measured once: background colour, densities, region masks."""

    small: np.ndarray
    background: np.ndarray
    density: np.ndarray
    stained: np.ndarray
    nucleus: np.ndarray
    nucleus_cut: float

    @property
    def n_stained(self) -> int:
        return int(self.stained.sum())

    def region_lab(self) -> dict[str, np.ndarray]:
        """CIELAB pixels (Nx3) of each region in :data:`REGIONS`."""
        lab = rgb_to_lab(self.small)
        return {"nucleus": lab[self.nucleus], "stained": lab[self.stained & ~self.nucleus]}


def _measure(image: np.ndarray) -> _Measured:
    small = stats_view(image)
    void = void_mask(small)
    background = background_rgb(small)
    density = optical_density(small, background)
    stained = stained_mask(density, void)
    contrast = chromatic_density(density, void)
    cut = nucleus_threshold(contrast, void)
    return _Measured(small, background, density, stained, stained & (contrast > cut), cut)


# ---------------------------------------------------------------------------------------------
# none


def _fit_none(images: list[np.ndarray]) -> dict[str, list]:
    return {}


def _apply_none(image: np.ndarray, values: Mapping[str, list]) -> np.ndarray:
    return image.copy()


# ---------------------------------------------------------------------------------------------
# reinhard: CIELAB transforms per region, blended by smooth weights

# A CIELAB map is a 3x4 float32 matrix (per-channel gain on the diagonal, offset in the last column),
# applied with cv2.transform: numpy broadcasting over a length-3 last axis is ten times slower.
_LabMap = np.ndarray


def _lab_map(gain: np.ndarray, offset: np.ndarray) -> _LabMap:
    return np.hstack([np.diag(np.asarray(gain, dtype=np.float64)), np.asarray(offset)[:, None]]).astype(np.float32)


def _background_lab(background: np.ndarray) -> np.ndarray:
    return rgb_to_lab(np.clip(np.round(background), 0, 255).astype(np.uint8).reshape(1, 1, 3)).reshape(3)


def _regional_lab(
    image: np.ndarray, measured: _Measured, maps: dict[str, _LabMap | None], background_ref: np.ndarray
) -> np.ndarray:
    """``image`` with background pixels moved onto ``background_ref`` and each region's pixels put
    through its CIELAB map (a region without one borrows the other's), blended by weights."""
    lab = rgb_to_lab(image)
    void = void_mask(image)
    density = optical_density(image, measured.background)
    out = cv2.transform(lab, _lab_map(np.ones(3), np.asarray(background_ref) - _background_lab(measured.background)))
    nucleus_map, stained_map = _first(maps["nucleus"], maps["stained"]), _first(maps["stained"], maps["nucleus"])
    if nucleus_map is not None and stained_map is not None:
        cell = cv2.transform(lab, stained_map)
        if nucleus_map is not stained_map:
            nucleus = nucleus_weight(chromatic_density(density, void), measured.nucleus_cut)
            cell = cv2.blendLinear(cv2.transform(lab, nucleus_map), cell, nucleus, 1.0 - nucleus)
        stained = stain_weight(density)
        out = cv2.blendLinear(cell, out, stained, 1.0 - stained)
    rgb = lab_to_rgb(out)
    rgb[void] = image[void]
    return rgb


def _first(*maps: _LabMap | None) -> _LabMap | None:
    return next((m for m in maps if m is not None), None)


def _median_of(rows: list[np.ndarray], what: str, count: int) -> np.ndarray:
    if not rows:
        raise ValueError(f"none of the {count} reference images has {MIN_STAINED} {what} pixels to measure")
    return np.median(rows, axis=0)


def _fit_reinhard(images: list[np.ndarray]) -> dict[str, list]:
    stats: dict[str, list] = {f"{region}_{kind}": [] for region in REGIONS for kind in ("mean", "std")}
    backgrounds = []
    for image in images:
        measured = _measure(image)
        backgrounds.append(_background_lab(measured.background))
        for region, pixels in measured.region_lab().items():
            if len(pixels) >= MIN_STAINED:
                stats[f"{region}_mean"].append(pixels.mean(axis=0))
                stats[f"{region}_std"].append(pixels.std(axis=0))
    values = {key: _median_of(rows, key.split("_")[0], len(images)) for key, rows in stats.items()}
    return values | {"background": np.median(backgrounds, axis=0)}


def _reinhard_map(pixels: np.ndarray, ref_mean: np.ndarray, ref_std: np.ndarray) -> _LabMap | None:
    """Shift and scale of CIELAB channels taking ``pixels``' mean and spread to the reference's."""
    if len(pixels) < MIN_STAINED:
        return None
    mean, std = pixels.mean(axis=0), pixels.std(axis=0)
    # A channel with no spread (a grey image's a and b) has no scale to match: it only moves.
    gain = np.where(std > 1e-3, np.clip(ref_std / np.maximum(std, 1e-3), 1 / MAX_GAIN, MAX_GAIN), 1.0)
    return _lab_map(gain, ref_mean - mean * gain)


def _apply_reinhard(image: np.ndarray, values: Mapping[str, list]) -> np.ndarray:
    measured = _measure(image)
    maps = {
        region: _reinhard_map(pixels, np.asarray(values[f"{region}_mean"]), np.asarray(values[f"{region}_std"]))
        for region, pixels in measured.region_lab().items()
    }
    return _regional_lab(image, measured, maps, np.asarray(values["background"]))


# ---------------------------------------------------------------------------------------------
# macenko


def _unit_columns(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=0, keepdims=True), 1e-12)


def stain_vectors(density: np.ndarray, nuclear: np.ndarray | None = None) -> np.ndarray | None:
    """Two unit stain vectors (3x2, the nuclear stain first) of stained pixels' densities (Nx3), or
    None when the pixels do not span two colours (too few, grey, or one stain).

    ``nuclear`` (a density direction, e.g. the mean of the nucleus pixels) says which of the two is
    the nuclear stain; without it, the one absorbing more red light (azure does, eosin does not).
    """
    if len(density) < MIN_STAINED:
        return None
    _, eigvecs = np.linalg.eigh(np.cov(density.T.astype(np.float64)))
    plane = eigvecs[:, 1:3]
    projected = density @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [ALPHA, 100.0 - ALPHA])
    first = plane @ np.array([np.cos(low), np.sin(low)])
    second = plane @ np.array([np.cos(high), np.sin(high)])
    # Vectors point into the data, but an eigenvector's sign is arbitrary: make densities positive.
    first, second = first * np.sign(first.sum() or 1.0), second * np.sign(second.sum() or 1.0)
    vectors = _unit_columns(np.stack([first, second], axis=1))
    if abs(float(vectors[:, 0] @ vectors[:, 1])) > MAX_STAIN_COSINE:
        return None
    closeness = vectors[0] if nuclear is None else np.asarray(nuclear, dtype=np.float64) @ vectors
    return vectors if closeness[0] >= closeness[1] else vectors[:, ::-1]


def _nuclear_direction(measured: _Measured) -> np.ndarray | None:
    """The mean density of the image's nucleus pixels, or None when it has too few."""
    pixels = measured.density[measured.nucleus]
    return pixels.mean(axis=0) if len(pixels) >= MIN_STAINED else None


def _concentrations(density: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """Least-squares stain concentrations (Nx2) of densities (Nx3) for a 3x2 stain matrix."""
    return density @ np.linalg.pinv(stains).T


def _typical_concentrations(measured: _Measured, stains: np.ndarray) -> np.ndarray:
    """The median nuclear-stain concentration of the nucleus pixels and the median second-stain
    concentration of the other stained pixels (all stained pixels stand in for a region that is
    too small). Per region, unlike Macenko's 99th percentile over all pixels, so a tight crop (mostly
    nucleus) and a cell in context (mostly red cells) are scaled alike."""
    concentrations = _concentrations(measured.density[measured.stained], stains)
    nucleus = measured.nucleus[measured.stained]
    typical = np.median(concentrations, axis=0)
    for stain, region in ((0, nucleus), (1, ~nucleus)):
        if region.sum() >= MIN_STAINED:
            typical[stain] = np.median(concentrations[region, stain])
    return typical


def _fit_macenko(images: list[np.ndarray]) -> dict[str, list]:
    measured = [_measure(image) for image in images]
    usable = [m for m in measured if m.n_stained >= MIN_STAINED]
    pooled = [_spread_sample(m.density[m.stained], POOL_PER_IMAGE) for m in usable]
    nuclear = [d for d in map(_nuclear_direction, usable) if d is not None]
    stains = stain_vectors(np.concatenate(pooled), np.median(nuclear, axis=0) if nuclear else None) if pooled else None
    if stains is None:
        raise ValueError(f"macenko: the {len(images)} reference images do not show two separable stains")
    typical = [_typical_concentrations(m, stains) for m in usable]
    return {
        "stains": stains,
        "concentration": np.maximum(np.median(typical, axis=0), 1e-3),
        "background": np.median([m.background for m in measured], axis=0),
    }


def _spread_sample(rows: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` rows taken at an even stride (deterministic)."""
    if len(rows) <= limit:
        return rows
    return rows[np.linspace(0, len(rows) - 1, limit).astype(np.int64)]


def _apply_macenko(image: np.ndarray, values: Mapping[str, list]) -> np.ndarray:
    measured = _measure(image)
    ref_stains = np.asarray(values["stains"])
    stains, gain = ref_stains, np.ones(2)
    if measured.n_stained >= MIN_STAINED:
        stained = measured.density[measured.stained]
        found = stain_vectors(stained, _nuclear_direction(measured))
        stains = ref_stains if found is None else found
        typical = _typical_concentrations(measured, stains)
        gain = np.clip(np.asarray(values["concentration"]) / np.maximum(typical, 1e-6), 1 / MAX_GAIN, MAX_GAIN)
    # Concentrations (pinv(stains) @ density), rescaled to the reference's intensities and re-composed
    # with its stain colours: one 3x3 matrix per pixel, applied by cv2.transform.
    recompose = ref_stains @ (gain[:, None] * np.linalg.pinv(stains))
    density = cv2.transform(optical_density(image, measured.background), recompose.astype(np.float32))
    light = cv2.exp(-np.maximum(density, np.float32(0)))
    out = cv2.convertScaleAbs(cv2.transform(light, np.diag(np.asarray(values["background"])).astype(np.float32)))
    void = void_mask(image)
    out[void] = image[void]
    return out


# ---------------------------------------------------------------------------------------------
# Public entry points

_Fit = Callable[[list[np.ndarray]], dict]
_Apply = Callable[[np.ndarray, Mapping[str, list]], np.ndarray]
_METHODS: dict[str, tuple[_Fit, _Apply]] = {
    "none": (_fit_none, _apply_none),
    "reinhard": (_fit_reinhard, _apply_reinhard),
    "macenko": (_fit_macenko, _apply_macenko),
}


def fit_reference(images: Iterable[np.ndarray], method: str) -> StainReference:
    """Fit ``method``'s reference on RGB uint8 ``images`` (e.g. a seeded sample of training images).

    Per-image statistics are combined by their median, so a few odd images do not pull the
    reference. ValueError when ``method`` is unknown, no image is given, or (for a method other
    than ``none``) no image has enough stained pixels.
    """
    if method not in STAIN_METHODS:
        raise ValueError(f"stain method must be one of {list(STAIN_METHODS)}, got {method!r}")
    batch = [check_rgb(image, f"reference image {i}") for i, image in enumerate(images)]
    if not batch:
        raise ValueError("fit_reference needs at least one image")
    fit, _ = _METHODS[method]
    return StainReference(method=method, values=fit(batch), n_images=len(batch))


def apply_stain(image: np.ndarray, reference: StainReference) -> np.ndarray:
    """``image`` (HxWx3 uint8 RGB) with its colours brought to ``reference``: a new uint8 RGB array
    of the same shape. Deterministic: the same image and reference give the same bytes."""
    _, apply = _METHODS[reference.method]
    return apply(check_rgb(image), reference.values)
