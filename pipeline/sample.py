"""A small synthetic blood-smear sample, so the pipeline runs end to end without real data.

Each image imitates one CellaVision-style crop of a May-Grünwald-Giemsa smear: a pale beige
background, scattered red blood cells (pink discs with a paler centre) and, near the middle,
one white cell drawn from a morphology model of its class:

- neutrophil: medium cell, pale lilac cytoplasm with fine faint granules; nucleus of 3-5 lobes
  joined by thin filaments, or a band (a thick C/U-shaped stroke).
- eosinophil: about the same size; cytoplasm packed with coarse orange-red granules; a bilobed
  ("spectacle") nucleus, now and then three lobes.
- basophil: slightly smaller; dense dark purple-blue granules over cytoplasm *and* nucleus, so
  the lobed nucleus is half hidden.
- lymphocyte: small and round; a dense, coarsely clumped dark nucleus fills most of the cell,
  leaving a thin rim of sky-blue cytoplasm.
- monocyte: the largest; grey-blue cytoplasm with an irregular outline and at times vacuoles;
  kidney, horseshoe or folded nucleus with a paler, lacy chromatin.
- ig (metamyelocyte / myelocyte / promyelocyte): large; one eccentric round-to-indented nucleus
  (never segmented) and bluish-pink cytoplasm with fine purple granules.
- erythroblast: small to medium and very round; a compact, very dark, smooth nucleus, and
  cytoplasm from deep blue (early) to grey-pink (late), without granules.
- platelet: no white cell; one to three small purple granular fragments among the red cells.

The classes are told apart by shape, size ratio and texture, while colour alone overlaps on
purpose: every part's colour drifts part of the way toward a confusable neighbour's palette
(neutrophil/ig/monocyte, lymphocyte/erythroblast, eosinophil/neutrophil), sizes overlap, and
each image gets its own stain, brightness, blur and sensor noise. Every range that sets how hard
the task is lives in :data:`DIFFICULTY`.

The scene is drawn with OpenCV primitives at the output size; the white cell (or platelet) is
drawn on a 2x crop for crisp granules and filaments, then shrunk back before blur and noise.
Each image has its own random generator seeded by (seed, class, index), so a different
``per_class`` leaves the images that both runs share unchanged, and equal params give
byte-identical PNG files.

Sites (``sample.sites``, see :class:`~pipeline.config.SiteStyle`) imitate other labs with the
same morphology model and change what a lab changes:

- stain: each stained colour's optical density (Beer-Lambert, relative to the default field)
  is scaled for white-cell parts and for red cells apart, its hue turned about the grey axis
  and its chroma scaled; the result is seen against the site's own empty-field colour.
- light and optics: vignetting, focus blur and sensor noise as multiples of the default.
- camera: a JPEG round trip, black strips where a crop met the edge of the slide image.
- framing: a magnification (``cell_scale``) that enlarges white and red cells alike, so their
  size ratio holds, with fewer red cells per field; and the site's own image size.

A site's generator is also seeded by its name, so each site has its own cells and adding or
reordering sites leaves the others' images unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.config import PBC_CLASSES, SITE_NAME_PATTERN, SampleParams, SiteStyle

DIFFICULTY: dict[str, float | tuple[float, float]] = {
    # Relative standard deviation of a white cell's radius around its class mean.
    "size_jitter": 0.10,
    # Largest offset of the white cell from the image centre, as a fraction of the side.
    "position_jitter": 0.10,
    # Relative per-channel jitter of each stained part's colour, per image.
    "palette_jitter": 0.06,
    # Largest fraction by which a part's colour moves toward a confusable neighbour class.
    "palette_mix": 0.45,
    # Per-image, per-channel gain (stain and illumination) standard deviation.
    "stain_jitter": 0.035,
    # Per-image brightness offset standard deviation, in grey levels.
    "brightness_jitter": 8.0,
    # Gaussian blur sigma range, in output pixels.
    "blur_sigma": (0.3, 1.0),
    # Sensor noise standard deviation range, in grey levels.
    "noise_sd": (1.5, 5.0),
    # How many red cells are scattered over the background.
    "rbc_count": (10, 22),
    # Chance that a translucent red cell lies across the white cell's edge.
    "occlusion_prob": 0.3,
    # Chance that a stray platelet lies beside a white cell (as in real smears).
    "bystander_platelet_prob": 0.25,
}

_SUBPIXEL = 3  # OpenCV fixed-point bits: polygon vertices in 1/8 pixel
_PNG_SETTINGS = [cv2.IMWRITE_PNG_COMPRESSION, 6]
# Sensor noise leaves little for LZ matching to find: Huffman coding alone writes a site's (often large)
# images about 8x faster for about 13% more bytes. The default sample keeps its settings and its bytes.
_SITE_PNG_SETTINGS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
_FILE_PATTERN = re.compile(r"^(?P<cls>[a-z]+)_\d{4,}\.png$")
_MANIFEST = "SAMPLE.json"
# A site's scene is drawn at most this many pixels per field of the default magnification, then resized
# to the site's size: details stay crisp at 360 px, and a large site draws in about 2/3 of the time.
_DRAWN_FIELD = 288

RGB = tuple[float, float, float]

# Mean colour of each stained part (RGB), before jitter and neighbour mixing.
_PALETTES: dict[str, dict[str, RGB]] = {
    "neutrophil": {"cytoplasm": (228, 198, 212), "nucleus": (82, 34, 136), "granule": (186, 130, 178)},
    "eosinophil": {"cytoplasm": (224, 168, 156), "nucleus": (82, 32, 134), "granule": (214, 92, 70)},
    "basophil": {"cytoplasm": (180, 150, 200), "nucleus": (74, 30, 126), "granule": (56, 18, 100)},
    "lymphocyte": {"cytoplasm": (164, 172, 222), "nucleus": (66, 24, 124), "granule": (120, 80, 160)},
    "monocyte": {"cytoplasm": (192, 182, 214), "nucleus": (104, 58, 152), "granule": (170, 136, 190)},
    "ig": {"cytoplasm": (208, 178, 214), "nucleus": (90, 42, 144), "granule": (150, 84, 160)},
    "erythroblast": {"cytoplasm": (146, 136, 200), "nucleus": (50, 16, 96), "granule": (120, 80, 160)},
    "platelet": {"cytoplasm": (176, 136, 204), "nucleus": (90, 40, 140), "granule": (84, 36, 128)},
}

# Whose colours each class may drift toward: the confusions a haematologist also meets.
_NEIGHBOURS: dict[str, tuple[str, ...]] = {
    "neutrophil": ("ig", "eosinophil", "monocyte"),
    "eosinophil": ("neutrophil", "ig"),
    "basophil": ("lymphocyte", "ig"),
    "lymphocyte": ("erythroblast", "monocyte"),
    "monocyte": ("ig", "neutrophil", "lymphocyte"),
    "ig": ("neutrophil", "monocyte"),
    "erythroblast": ("lymphocyte", "basophil"),
    "platelet": ("basophil",),
}

# Mean white-cell radius as a fraction of the image side.
_RADIUS: dict[str, float] = {
    "neutrophil": 0.170,
    "eosinophil": 0.176,
    "basophil": 0.155,
    "lymphocyte": 0.135,
    "monocyte": 0.200,
    "ig": 0.190,
    "erythroblast": 0.132,
    "platelet": 0.035,
}

_BACKGROUND: RGB = (251, 228, 202)
_RBC: RGB = (206, 164, 166)
_RBC_PALLOR: RGB = (236, 206, 194)
_RBC_RADIUS = 0.088  # fraction of the image side


@dataclass(frozen=True)
class _Look:
    """How a site shows a scene: its empty field, red cells, stained parts and magnification."""

    background: np.ndarray
    red_cell: np.ndarray
    red_cell_pallor: np.ndarray
    stain: np.ndarray | None  # 3x3 map of a white-cell part's optical density; None = the default colours
    scale: float = 1.0  # magnification relative to the default framing (a site's cell_scale)

    def ink(self, colour: np.ndarray) -> np.ndarray:
        """``colour`` (a white-cell part as the default stain shows it) as this site stains it."""
        return colour if self.stain is None else _stained(colour, self.stain, self.background)


_DEFAULT_LOOK = _Look(
    np.array(_BACKGROUND, np.float32), np.array(_RBC, np.float32), np.array(_RBC_PALLOR, np.float32), None
)


@dataclass
class _Cell:
    """A white cell being drawn: its 2x canvas crop, centre and radius in crop pixels, palette."""

    crop: np.ndarray
    center: tuple[float, float]
    radius: float
    palette: dict[str, np.ndarray]
    rng: np.random.Generator
    unit: float  # crop pixels per pixel of a 256-px drawing, so textures scale with the size
    look: _Look


def generate_sample(
    out_dir: Path, params: SampleParams, classes: Sequence[str] = PBC_CLASSES
) -> dict[str, int]:
    """Write a synthetic sample and its ``SAMPLE.json``; return the images written per class folder.

    With ``params.sites`` empty the images go to ``out_dir/<class>/<class>_<NNNN>.png``; otherwise
    each site gets its own tree ``out_dir/<site>/<class>/...`` and its own ``SAMPLE.json``, and the
    one in ``out_dir`` lists every site. The keys of the result are the class folders relative to
    ``out_dir`` (``neutrophil`` or ``jiangxi-like/neutrophil``). Files this generator wrote earlier
    are removed first, so the folder holds exactly this sample.
    """
    _check_classes(classes)
    site_classes = {site.name: _site_classes(site, classes) for site in params.sites}
    out_dir = Path(out_dir)
    _remove_previous_sample(out_dir, params.sites)
    origin = {"synthetic": True, "generator": "pipeline.sample", "seed": params.seed}
    settings = {"per_class": params.per_class, "size": params.size, "classes": list(classes)}
    if not params.sites:
        counts = _write_images(out_dir, classes, params.per_class, params.size, params.seed)
        _write_manifest(out_dir, {**origin, **settings})
        return counts
    counts, entries = {}, []
    for site in params.sites:
        entry = _site_entry(site, site_classes[site.name])
        root = site_root(out_dir, site.name)
        written = _write_images(root, entry["classes"], entry["per_class"], entry["size"], params.seed, site)
        counts.update({f"{site.name}/{name}": count for name, count in written.items()})
        _write_manifest(root, {**origin, **entry})
        entries.append(entry)
    _write_manifest(out_dir, {**origin, **settings, "sites": entries})
    return counts


def site_root(out_dir: Path, site: str) -> Path:
    """The folder holding synthetic site ``site``'s ``<class>/<image>`` tree under ``out_dir``."""
    return Path(out_dir) / site


def render_image(name: str, index: int, size: int, seed: int = 0, site: SiteStyle | None = None) -> np.ndarray:
    """Return image ``index`` of class ``name`` as a ``size`` x ``size`` x 3 uint8 RGB array.

    Without ``site`` the image has the default look. A site's images are other cells (its name
    is part of the seed), drawn with the same morphology but its stain, light, optics and framing.
    """
    _check_classes([name])
    if site is None:
        rng = np.random.default_rng([seed, PBC_CLASSES.index(name), index])
        return _finish(_scene(name, rng, size, _DEFAULT_LOOK), rng, size)
    rng = np.random.default_rng([seed, PBC_CLASSES.index(name), index, zlib.crc32(site.name.encode())])
    drawn = min(size, int(np.ceil(_DRAWN_FIELD / site.cell_scale)))
    scene = _scene(name, rng, drawn, _site_look(site))
    if drawn != size:
        scene = cv2.resize(scene, (size, size), interpolation=cv2.INTER_CUBIC)
    return _camera(_finish(scene, rng, size, site), rng, site)


def _scene(name: str, rng: np.random.Generator, size: int, look: _Look) -> np.ndarray:
    """The stained smear before optics and sensor: red cells and the white cell of class ``name``."""
    field = size * look.scale
    canvas = _background(rng, size, look)
    center = _cell_center(rng, size, look)
    jitter = float(np.clip(1 + DIFFICULTY["size_jitter"] * rng.standard_normal(), 0.7, 1.4))
    radius = _RADIUS[name] * field * jitter
    _draw_rbcs(canvas, rng, (center, radius), look)
    if name == "platelet":
        _draw_in_crop(canvas, center, 0.1 * field, _palette(name, rng, look), rng, _draw_platelet_cluster, look)
    else:
        _draw_in_crop(canvas, center, radius, _palette(name, rng, look), rng, _DRAWERS[name], look)
        if rng.random() < DIFFICULTY["occlusion_prob"]:
            _draw_occluding_rbc(canvas, rng, center, radius, look)
        if rng.random() < DIFFICULTY["bystander_platelet_prob"]:
            away = _point_at(center, rng.uniform(0, 2 * np.pi), radius + 0.1 * field)
            palette = _palette("platelet", rng, look)
            _draw_in_crop(canvas, away, _RADIUS["platelet"] * field, palette, rng, _draw_platelet, look)
    return canvas


def _check_classes(classes: Sequence[str]) -> None:
    unknown = [name for name in classes if name not in PBC_CLASSES]
    if unknown:
        raise ValueError(
            f"unknown class(es) for the synthetic sample: {', '.join(unknown)}; "
            f"supported: {', '.join(PBC_CLASSES)}"
        )


def _site_classes(site: SiteStyle, classes: Sequence[str]) -> list[str]:
    """The classes site ``site`` gets, in the order of ``classes``; its own list must be a subset."""
    if site.classes is None:
        return list(classes)
    missing = [name for name in site.classes if name not in classes]
    if missing:
        raise ValueError(
            f"sample.sites {site.name!r}: class(es) {', '.join(missing)} are not among the classes "
            f"being generated ({', '.join(classes)})"
        )
    return [name for name in classes if name in site.classes]


def _site_entry(site: SiteStyle, classes: list[str]) -> dict:
    """A site's resolved settings, as written to the manifests."""
    return {
        "site": site.name,
        "preset": site.preset,
        "per_class": site.per_class,
        "size": site.size,
        "classes": classes,
        "style": site.model_dump(mode="json", exclude={"name", "preset", "per_class", "size", "classes"}),
    }


def _write_images(
    root: Path, classes: Sequence[str], per_class: int, size: int, seed: int, site: SiteStyle | None = None
) -> dict[str, int]:
    settings = _PNG_SETTINGS if site is None else _SITE_PNG_SETTINGS
    counts: dict[str, int] = {}
    for name in classes:
        class_dir = root / name
        class_dir.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            bgr = cv2.cvtColor(render_image(name, index, size, seed, site), cv2.COLOR_RGB2BGR)
            if not cv2.imwrite(str(class_dir / f"{name}_{index:04d}.png"), bgr, settings):
                raise OSError(f"could not write {class_dir / f'{name}_{index:04d}.png'}")
        counts[name] = per_class
    return counts


def _write_manifest(root: Path, manifest: dict) -> None:
    (root / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _remove_previous_sample(out_dir: Path, sites: Sequence[SiteStyle]) -> None:
    """Delete the PNGs and SAMPLE.json files an earlier run wrote, its sites' included; leave the rest."""
    names = dict.fromkeys([*_previous_sites(out_dir), *(site.name for site in sites)])
    _remove_sample_tree(out_dir)
    for name in names:
        root = site_root(out_dir, name)
        if root.is_dir():
            _remove_sample_tree(root)
            if not any(root.iterdir()):
                root.rmdir()


def _previous_sites(out_dir: Path) -> list[str]:
    """Site folders the sample already in ``out_dir`` lists (names that are not safe folders are ignored)."""
    try:
        entries = json.loads((out_dir / _MANIFEST).read_text(encoding="utf-8")).get("sites", [])
    except (OSError, ValueError, AttributeError):
        return []
    names = [entry.get("site") for entry in entries if isinstance(entry, dict)] if isinstance(entries, list) else []
    return [name for name in names if isinstance(name, str) and re.fullmatch(SITE_NAME_PATTERN, name)]


def _remove_sample_tree(root: Path) -> None:
    (root / _MANIFEST).unlink(missing_ok=True)
    for name in PBC_CLASSES:
        class_dir = root / name
        if not class_dir.is_dir():
            continue
        for path in class_dir.iterdir():
            match = _FILE_PATTERN.match(path.name)
            if match and match["cls"] == name and path.is_file():
                path.unlink()
        if not any(class_dir.iterdir()):
            shutil.rmtree(class_dir)


# ---------------------------------------------------------------- scene


def _background(rng: np.random.Generator, side: int, look: _Look) -> np.ndarray:
    """The empty field (beige by default) with a gentle illumination gradient."""
    tint = look.background + rng.normal(0, 3, 3).astype(np.float32)
    ramp = np.linspace(-1, 1, side, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    shade = 1 + rng.uniform(0, 0.03) * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])
    return shade[..., None] * tint


def _cell_center(rng: np.random.Generator, side: int, look: _Look) -> tuple[float, float]:
    # At a higher magnification the cell wanders less, so that it stays in the frame.
    offset = DIFFICULTY["position_jitter"] * side * rng.uniform(-1, 1, 2) * min(1.0, 1.0 / look.scale)
    return (side / 2 + offset[0], side / 2 + offset[1])


def _point_at(center: tuple[float, float], angle: float, distance: float) -> tuple[float, float]:
    return (center[0] + distance * np.cos(angle), center[1] + distance * np.sin(angle))


def _draw_rbcs(
    canvas: np.ndarray, rng: np.random.Generator, avoid: tuple[tuple[float, float], float], look: _Look
) -> None:
    """Scatter red cells; those landing on the white cell are dropped (it is drawn on top anyway)."""
    side = canvas.shape[0]
    field = side * look.scale
    low, high = DIFFICULTY["rbc_count"]
    count = round(int(rng.integers(low, high + 1)) / look.scale**2)  # same density at any magnification
    centers = rng.uniform(-0.05, 1.05, (count, 2)) * side
    radii = _RBC_RADIUS * field * rng.uniform(0.88, 1.12, count)
    (ax, ay), ar = avoid
    keep = np.hypot(centers[:, 0] - ax, centers[:, 1] - ay) > 0.6 * ar + radii
    disc = np.zeros(canvas.shape[:2], np.uint8)
    pallor = np.zeros_like(disc)
    for (x, y), r in zip(centers[keep], radii[keep], strict=True):
        aspect, angle = rng.uniform(0.85, 1.0), rng.uniform(0, 180)
        _ellipse(disc, (x, y), r, r * aspect, angle)
        _ellipse(pallor, (x, y), 0.5 * r, 0.5 * r * aspect, angle)
    rbc = look.red_cell * rng.uniform(0.96, 1.03)
    _paint(canvas, _soften(disc, 0.006 * field), rbc, 0.92)
    _paint(canvas, _soften(pallor, 0.014 * field), look.red_cell_pallor, 0.8)


def _draw_occluding_rbc(
    canvas: np.ndarray, rng: np.random.Generator, center: tuple[float, float], radius: float, look: _Look
) -> None:
    """A translucent red cell across the white cell's edge, hiding part of it."""
    side = canvas.shape[0]
    field = side * look.scale
    r = _RBC_RADIUS * field * rng.uniform(0.9, 1.1)
    x, y = _point_at(center, rng.uniform(0, 2 * np.pi), radius + r * rng.uniform(0.2, 0.7))
    x0, y0 = max(int(x - r) - 2, 0), max(int(y - r) - 2, 0)
    x1, y1 = min(int(x + r) + 3, side), min(int(y + r) + 3, side)
    if x1 <= x0 or y1 <= y0:
        return
    region = canvas[y0:y1, x0:x1]
    disc = np.zeros(region.shape[:2], np.uint8)
    _ellipse(disc, (x - x0, y - y0), r, r * rng.uniform(0.85, 1.0), rng.uniform(0, 180))
    _paint(region, _soften(disc, 0.006 * field), look.red_cell, rng.uniform(0.45, 0.75))


def _draw_in_crop(
    canvas: np.ndarray,
    center: tuple[float, float],
    radius: float,
    palette: dict[str, np.ndarray],
    rng: np.random.Generator,
    drawer: Callable[[_Cell], None],
    look: _Look,
) -> None:
    """Run ``drawer`` on a 2x-upsampled crop around ``center`` and shrink the result back in place.

    Only the small region holding the cell is drawn at twice the resolution, which keeps
    granules and thin filaments crisp without paying for a 2x canvas.
    """
    side = canvas.shape[0]
    half = int(1.3 * radius) + 3
    x0, y0 = max(int(center[0]) - half, 0), max(int(center[1]) - half, 0)
    x1, y1 = min(int(center[0]) + half, side), min(int(center[1]) + half, side)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    region = canvas[y0:y1, x0:x1]
    crop = cv2.resize(region, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
    local = (2 * (center[0] - x0), 2 * (center[1] - y0))
    drawer(_Cell(crop, local, 2 * radius, palette, rng, unit=side * look.scale / 128, look=look))
    region[:] = cv2.resize(crop, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)


def _draw_platelet(cell: _Cell) -> None:
    """One small purple granular fragment with a paler rim (hyalomere)."""
    rng = cell.rng
    body = np.zeros(cell.crop.shape[:2], np.uint8)
    size = cell.radius * rng.uniform(0.55, 1.3)
    _fill(body, _outline(cell.center, size, rng, rng.uniform(0.6, 1.0), rng.uniform(0, np.pi), 0.18))
    _platelet_paint(cell, body)


def _draw_platelet_cluster(cell: _Cell) -> None:
    """One to three platelets near the centre; ``cell.radius`` is the spread of the cluster."""
    rng = cell.rng
    body = np.zeros(cell.crop.shape[:2], np.uint8)
    fragment = cell.radius * _RADIUS["platelet"] / 0.1
    for _ in range(int(rng.integers(1, 4))):
        offset = rng.normal(0, 0.35 * cell.radius, 2)
        at = (cell.center[0] + offset[0], cell.center[1] + offset[1])
        size = fragment * rng.uniform(0.55, 1.35)
        _fill(body, _outline(at, size, rng, rng.uniform(0.6, 1.0), rng.uniform(0, np.pi), 0.18))
    _platelet_paint(cell, body)


def _platelet_paint(cell: _Cell, body: np.ndarray) -> None:
    mask = _soften(body, cell.unit)
    _paint(cell.crop, mask, cell.palette["cytoplasm"], 0.85)
    _sprinkle(cell, mask, sigma=1.2, coverage=0.3, strength=0.9)


def _finish(canvas: np.ndarray, rng: np.random.Generator, size: int, site: SiteStyle | None = None) -> np.ndarray:
    """Per-image stain and brightness shift, optical blur and sensor noise; a site's light and optics."""
    gain = 1 + DIFFICULTY["stain_jitter"] * rng.standard_normal(3)
    offset = DIFFICULTY["brightness_jitter"] * rng.standard_normal()
    image = canvas * gain.astype(np.float32) + np.float32(offset)
    blur, noise = (1.0, 1.0) if site is None else (site.blur, site.noise)
    if site is not None and site.vignetting > 0:
        image *= _vignette(size, site.vignetting)[..., None]
    sigma = rng.uniform(*DIFFICULTY["blur_sigma"]) * size / 128 * blur
    if sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    image += np.float32(rng.uniform(*DIFFICULTY["noise_sd"]) * noise) * rng.standard_normal(image.shape, np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- sites


def _site_look(site: SiteStyle) -> _Look:
    """The colours and magnification ``site`` draws its scenes with."""
    background = np.array(site.background, np.float32)
    white = site.white_cell_stain * _stain_turn(site.stain_hue, site.saturation)
    red = site.red_cell_stain * _stain_turn(site.stain_hue + site.red_cell_hue, site.saturation)
    pallor = _stained(np.array(_RBC_PALLOR, np.float32), red, background)
    return _Look(background, _stained(np.array(_RBC, np.float32), red, background), pallor, white, site.cell_scale)


def _stained(colour: np.ndarray, od_map: np.ndarray, background: np.ndarray) -> np.ndarray:
    """A default-look colour with its optical density mapped by ``od_map``, seen against ``background``.

    Beer-Lambert: a dye absorbs a share of the light that passes, so a stain change is linear in
    optical density (-log of transmitted over incident light), and the light of the site's empty
    field is what the stained part is seen against.
    """
    density = -np.log(np.maximum(colour, 1.0) / np.array(_BACKGROUND, np.float32))
    return np.clip(background * np.exp(-(od_map @ density)), 0, 255).astype(np.float32)


def _stain_turn(degrees: float, saturation: float) -> np.ndarray:
    """3x3 map of optical density: turn its hue by ``degrees`` about the grey axis, scale its chroma."""
    axis = np.full(3, 1 / np.sqrt(3))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.radians(degrees)
    turn = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    grey = np.outer(axis, axis)
    return turn @ (grey + saturation * (np.eye(3) - grey))


def _vignette(size: int, strength: float) -> np.ndarray:
    """Share of the light reaching each pixel: 1 at the centre, ``1 - strength`` at the corners."""
    ramp = np.linspace(-1, 1, size, dtype=np.float32) ** 2
    return 1 - np.float32(strength / 2) * (ramp[None, :] + ramp[:, None])


def _camera(image: np.ndarray, rng: np.random.Generator, site: SiteStyle) -> np.ndarray:
    """What a site's acquisition adds after the sensor: crops at the image edge, JPEG compression."""
    if rng.random() < site.edge_padding:
        image = _edge_padded(image, rng)
    if site.jpeg_quality:
        ok, encoded = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, site.jpeg_quality])
        if not ok:
            raise OSError(f"could not JPEG-encode an image of site {site.name!r}")
        image = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1]
    return np.ascontiguousarray(image)


def _edge_padded(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image with a black strip along one side, as when a cell near the slide image's edge is cropped."""
    padded = image.copy()
    width = int(rng.uniform(0.05, 0.25) * image.shape[0])
    side = int(rng.integers(4))
    rotated = np.rot90(padded, side)  # a view: the strip lands on side ``side``
    rotated[:, :width] = 0
    return padded


# ---------------------------------------------------------------- white cells


def _palette(name: str, rng: np.random.Generator, look: _Look) -> dict[str, np.ndarray]:
    """The class palette, each part jittered, pulled part-way toward a neighbour class and stained as the site does."""
    neighbour = _PALETTES[_NEIGHBOURS[name][rng.integers(len(_NEIGHBOURS[name]))]]
    palette = {}
    for part, colour in _PALETTES[name].items():
        mix = rng.uniform(0, DIFFICULTY["palette_mix"])
        value = (1 - mix) * np.array(colour) + mix * np.array(neighbour[part])
        value *= 1 + DIFFICULTY["palette_jitter"] * rng.standard_normal(3)
        palette[part] = look.ink(np.clip(value, 0, 255).astype(np.float32))
    return palette


def _body(cell: _Cell, wobble: float = 0.04, aspect: tuple[float, float] = (0.88, 1.0)) -> np.ndarray:
    """Paint the cytoplasm disc and return its soft mask."""
    mask = np.zeros(cell.crop.shape[:2], np.uint8)
    rng = cell.rng
    _fill(mask, _outline(cell.center, cell.radius, rng, rng.uniform(*aspect), rng.uniform(0, np.pi), wobble))
    soft = _soften(mask, 1.2 * cell.unit)
    texture = _texture(rng, soft.shape, 3.0 * cell.unit, 0.04)
    _paint(cell.crop, soft, cell.palette["cytoplasm"], 0.95, texture)
    return soft


def _paint_nucleus(cell: _Cell, mask: np.ndarray, grain: float, contrast: float) -> None:
    """Nucleus colour modulated by chromatin texture (``grain`` in px, ``contrast`` relative)."""
    texture = _texture(cell.rng, mask.shape, grain * cell.unit, contrast)
    _paint(cell.crop, _soften(mask, cell.unit), cell.palette["nucleus"], 0.97, texture)


def _sprinkle(cell: _Cell, region: np.ndarray, sigma: float, coverage: float, strength: float) -> None:
    """Granules of the palette's granule colour over ``region`` (a soft mask)."""
    grains = _granules(cell.rng, region.shape, sigma * cell.unit, coverage) * region
    _paint(cell.crop, grains, cell.palette["granule"], strength)


def _lobe_chain(cell: _Cell, count: int, span: float, ring: float, lobe: float) -> np.ndarray:
    """Lobes spread along an arc around the centre, joined by thin chromatin filaments."""
    rng, r = cell.rng, cell.radius
    start = rng.uniform(0, 2 * np.pi)
    angles = start + np.linspace(0, span, count) + rng.normal(0, 0.15, count)
    mask = np.zeros(cell.crop.shape[:2], np.uint8)
    points = [_point_at(cell.center, a, ring * r * rng.uniform(0.8, 1.15)) for a in angles]
    for at in points:
        size = lobe * r * rng.uniform(0.8, 1.15)
        _fill(mask, _outline(at, size, rng, rng.uniform(0.6, 0.95), rng.uniform(0, np.pi), 0.08))
    thickness = max(int(0.1 * r), 1)
    for a, b in zip(points[:-1], points[1:], strict=False):
        cv2.line(mask, _fixed(a), _fixed(b), 255, thickness, cv2.LINE_AA, _SUBPIXEL)
    return mask


def _arc_stroke(cell: _Cell, span: float, ring: float, width: float, taper: float = 0.0) -> np.ndarray:
    """A thick curved stroke (band or kidney nucleus) centred on the cell."""
    rng, r = cell.rng, cell.radius
    start = rng.uniform(0, 2 * np.pi)
    steps = 12
    mask = np.zeros(cell.crop.shape[:2], np.uint8)
    bend = ring * r * rng.uniform(0.85, 1.15)
    angles = start + np.linspace(0, span, steps)
    ends = np.abs(np.linspace(-1, 1, steps))
    for a, end in zip(angles, ends, strict=True):
        at = _point_at(cell.center, a, bend * (1 + 0.1 * rng.standard_normal()))
        _fill(mask, _outline(at, width * r * (1 - taper * end**2), rng, 1.0, 0.0, 0.05, 20))
    return mask


def _draw_neutrophil(cell: _Cell) -> None:
    rng = cell.rng
    body = _body(cell)
    _sprinkle(cell, body, sigma=0.9, coverage=0.35, strength=rng.uniform(0.1, 0.45))
    if rng.random() < 0.3:
        nucleus = _arc_stroke(cell, rng.uniform(3.0, 4.4), 0.5, rng.uniform(0.2, 0.26), taper=0.3)
    else:
        count = int(rng.integers(3, 6))
        nucleus = _lobe_chain(cell, count, rng.uniform(2.4, 4.0), 0.44, rng.uniform(0.26, 0.33))
    _paint_nucleus(cell, nucleus, grain=1.8, contrast=0.14)


def _draw_eosinophil(cell: _Cell) -> None:
    rng = cell.rng
    body = _body(cell)
    strength = rng.uniform(0.45, 0.95)
    _sprinkle(cell, body, sigma=1.6, coverage=0.55, strength=strength)
    count = 2 if rng.random() < 0.8 else 3
    nucleus = _lobe_chain(cell, count, rng.uniform(1.6, 2.8), 0.52, rng.uniform(0.3, 0.38))
    _paint_nucleus(cell, nucleus, grain=1.8, contrast=0.14)


def _draw_basophil(cell: _Cell) -> None:
    rng = cell.rng
    body = _body(cell, wobble=0.07)
    nucleus = _lobe_chain(cell, int(rng.integers(2, 4)), rng.uniform(1.0, 2.2), 0.3, rng.uniform(0.35, 0.45))
    _paint_nucleus(cell, nucleus, grain=2.0, contrast=0.12)
    _sprinkle(cell, body, sigma=1.7, coverage=rng.uniform(0.5, 0.75), strength=rng.uniform(0.75, 0.95))


def _draw_lymphocyte(cell: _Cell) -> None:
    rng, r = cell.rng, cell.radius
    _body(cell, wobble=0.03)
    nucleus = np.zeros(cell.crop.shape[:2], np.uint8)
    size = r * rng.uniform(0.76, 0.9)
    at = _point_at(cell.center, rng.uniform(0, 2 * np.pi), (r - size) * rng.uniform(0.2, 0.9))
    _fill(nucleus, _outline(at, size, rng, rng.uniform(0.85, 1.0), rng.uniform(0, np.pi), 0.05))
    if rng.random() < 0.3:  # a shallow notch, as in many small lymphocytes
        notch = _point_at(at, rng.uniform(0, 2 * np.pi), size * 1.05)
        cv2.circle(nucleus, _fixed(notch), int(0.3 * size * 2**_SUBPIXEL), 0, -1, cv2.LINE_AA, _SUBPIXEL)
    _paint_nucleus(cell, nucleus, grain=2.6, contrast=0.2)


def _draw_monocyte(cell: _Cell) -> None:
    rng, r = cell.rng, cell.radius
    body = _body(cell, wobble=0.09, aspect=(0.8, 1.0))
    _sprinkle(cell, body, sigma=0.8, coverage=0.25, strength=rng.uniform(0.0, 0.25))
    for _ in range(int(rng.integers(0, 6))):
        at = _point_at(cell.center, rng.uniform(0, 2 * np.pi), r * rng.uniform(0.55, 0.85))
        vacuole = np.zeros(body.shape, np.uint8)
        cv2.circle(
            vacuole,
            _fixed(at),
            int(r * rng.uniform(0.05, 0.1) * 2**_SUBPIXEL),
            255,
            -1,
            cv2.LINE_AA,
            _SUBPIXEL,
        )
        _paint(cell.crop, _soften(vacuole, 0.8 * cell.unit), cell.look.background, 0.6)
    shape = rng.random()
    if shape < 0.5:  # kidney
        nucleus = _arc_stroke(cell, rng.uniform(1.4, 2.4), 0.3, rng.uniform(0.36, 0.44), taper=0.25)
    elif shape < 0.8:  # horseshoe
        nucleus = _arc_stroke(cell, rng.uniform(2.6, 3.6), 0.42, rng.uniform(0.26, 0.32), taper=0.15)
    else:  # folded
        nucleus = _lobe_chain(cell, 3, rng.uniform(1.2, 2.0), 0.3, rng.uniform(0.36, 0.44))
    _paint_nucleus(cell, nucleus, grain=1.1, contrast=0.3)


def _draw_ig(cell: _Cell) -> None:
    rng, r = cell.rng, cell.radius
    body = _body(cell, wobble=0.05)
    _sprinkle(cell, body, sigma=1.0, coverage=0.4, strength=rng.uniform(0.25, 0.65))
    nucleus = np.zeros(body.shape, np.uint8)
    size = r * rng.uniform(0.52, 0.68)
    direction = rng.uniform(0, 2 * np.pi)
    at = _point_at(cell.center, direction, (r - size) * rng.uniform(0.5, 0.95))
    _fill(nucleus, _outline(at, size, rng, rng.uniform(0.75, 1.0), rng.uniform(0, np.pi), 0.06))
    indent = rng.uniform(0.0, 0.5)  # promyelocyte round ... metamyelocyte bean
    if indent > 0.12:
        notch = _point_at(at, direction + np.pi, size * (1.25 - indent))
        cv2.circle(nucleus, _fixed(notch), int(0.55 * size * 2**_SUBPIXEL), 0, -1, cv2.LINE_AA, _SUBPIXEL)
    _paint_nucleus(cell, nucleus, grain=1.6, contrast=0.18)


def _draw_erythroblast(cell: _Cell) -> None:
    rng, r = cell.rng, cell.radius
    ripeness = rng.uniform(0, 1)  # basophilic (blue) to polychromatic (grey-pink) cytoplasm
    late = cell.look.ink(np.array((204, 168, 184), np.float32))
    cell.palette["cytoplasm"] = (1 - ripeness) * cell.palette["cytoplasm"] + ripeness * late
    body = _body(cell, wobble=0.02, aspect=(0.92, 1.0))
    nucleus = np.zeros(body.shape, np.uint8)
    size = r * rng.uniform(0.5, 0.72) * (1 - 0.15 * ripeness)
    at = _point_at(cell.center, rng.uniform(0, 2 * np.pi), (r - size) * rng.uniform(0.2, 0.9))
    _fill(nucleus, _outline(at, size, rng, rng.uniform(0.92, 1.0), 0.0, 0.015))
    _paint_nucleus(cell, nucleus, grain=2.0, contrast=0.08)


_DRAWERS: dict[str, Callable[[_Cell], None]] = {
    "neutrophil": _draw_neutrophil,
    "eosinophil": _draw_eosinophil,
    "basophil": _draw_basophil,
    "lymphocyte": _draw_lymphocyte,
    "monocyte": _draw_monocyte,
    "ig": _draw_ig,
    "erythroblast": _draw_erythroblast,
}


# ---------------------------------------------------------------- drawing primitives


def _fixed(point: tuple[float, float]) -> tuple[int, int]:
    return (int(round(point[0] * 2**_SUBPIXEL)), int(round(point[1] * 2**_SUBPIXEL)))


def _outline(
    center: tuple[float, float],
    radius: float,
    rng: np.random.Generator,
    aspect: float,
    angle: float,
    wobble: float,
    points: int = 40,
) -> np.ndarray:
    """A closed, gently irregular ellipse as fixed-point polygon vertices."""
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    harmonics = np.arange(2, 6)
    amplitude = wobble * rng.standard_normal(4) / np.sqrt(harmonics)
    phase = rng.uniform(0, 2 * np.pi, 4)
    rho = radius * (1 + (amplitude[:, None] * np.cos(harmonics[:, None] * t + phase[:, None])).sum(0))
    x, y = rho * np.cos(t), aspect * rho * np.sin(t)
    ca, sa = np.cos(angle), np.sin(angle)
    xy = np.stack([center[0] + ca * x - sa * y, center[1] + sa * x + ca * y], axis=1)
    return np.rint(xy * 2**_SUBPIXEL).astype(np.int32)


def _fill(mask: np.ndarray, polygon: np.ndarray) -> None:
    cv2.fillPoly(mask, [polygon], 255, cv2.LINE_AA, _SUBPIXEL)


def _ellipse(mask: np.ndarray, center: tuple[float, float], a: float, b: float, angle: float) -> None:
    axes = (int(a * 2**_SUBPIXEL), int(b * 2**_SUBPIXEL))
    cv2.ellipse(mask, _fixed(center), axes, angle, 0, 360, 255, -1, cv2.LINE_AA, _SUBPIXEL)


def _soften(mask: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 mask to a float coverage in [0, 1] with blurred edges."""
    return cv2.GaussianBlur(mask.astype(np.float32) * (1 / 255), (0, 0), sigma)


def _texture(rng: np.random.Generator, shape: tuple[int, ...], grain: float, contrast: float) -> np.ndarray:
    """A multiplicative brightness field around 1 with blobs of about ``grain`` pixels."""
    field = cv2.GaussianBlur(rng.standard_normal(shape[:2]).astype(np.float32), (0, 0), grain)
    return 1 + contrast * field / (field.std() + 1e-6)


def _granules(rng: np.random.Generator, shape: tuple[int, ...], sigma: float, coverage: float) -> np.ndarray:
    """Coverage in [0, 1] of round granules about ``2 * sigma`` pixels wide over ``coverage`` of the area."""
    field = cv2.GaussianBlur(rng.standard_normal(shape[:2]).astype(np.float32), (0, 0), sigma)
    field /= field.std() + 1e-6
    threshold = np.quantile(field, 1 - coverage)
    return np.clip((field - threshold) * 2.5, 0, 1)


def _paint(
    canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float, texture: np.ndarray | None = None
) -> None:
    """Blend ``colour`` (optionally times ``texture``) into ``canvas`` in place where ``mask`` covers it."""
    ink = colour[None, None, :] if texture is None else texture[..., None] * colour[None, None, :]
    step = ink - canvas
    step *= (mask * np.float32(alpha))[..., None]
    canvas += step
