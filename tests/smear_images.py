"""Tiny generated blood-smear images with known geometry and colours, for the stain and framing tests.

Sizes are given in micrometres and drawn at ``px_per_um``: a white cell (a dark nucleus disc within
a paler cytoplasm disc) and red cells (discs of :data:`RED_CELL_UM` with a paler centre) on a
background, in one of :data:`PALETTES` (the stain and light of a site).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

RED_CELL_UM = 7.5
NUCLEUS_UM = 7.0
CELL_UM = 12.0

PALETTES = {
    # May-Grünwald-Giemsa under a warm lamp: purple nuclei, pink red cells, beige background.
    "giemsa": {
        "background": (242, 226, 206),
        "red": (214, 162, 160),
        "cytoplasm": (200, 186, 214),
        "nucleus": (92, 48, 138),
    },
    # A fast stain under a yellow lamp: maroon nuclei, orange cytoplasm.
    "yellow": {
        "background": (250, 246, 168),
        "red": (232, 196, 128),
        "cytoplasm": (218, 168, 112),
        "nucleus": (126, 36, 52),
    },
    # A bluish camera: lavender red cells on white, magenta nuclei.
    "blue": {
        "background": (252, 252, 254),
        "red": (190, 188, 232),
        "cytoplasm": (226, 204, 232),
        "nucleus": (156, 96, 196),
    },
}


@dataclass(frozen=True)
class Smear:
    """A generated image and what is where in it."""

    image: np.ndarray
    nucleus: np.ndarray  # bool mask of the nucleus
    background: np.ndarray  # bool mask of pixels far from every cell
    centre: tuple[float, float]  # the white cell's centre (x, y), pixels


def smear(
    size: int = 160,
    palette: str = "giemsa",
    px_per_um: float = 2.0,
    centre: tuple[float, float] = (0.5, 0.5),
    white_cell: bool = True,
    red_cells: bool = True,
    seed: int = 0,
) -> Smear:
    """A ``size`` x ``size`` smear; ``centre`` places the white cell as a fraction of the side."""
    colours = {name: np.array(rgb, np.float32) for name, rgb in PALETTES[palette].items()}
    rng = np.random.default_rng(seed)
    image = np.empty((size, size, 3), np.float32)
    image[:] = colours["background"]
    cx, cy = centre[0] * size, centre[1] * size
    cell_r, nucleus_r, red_r = (um / 2 * px_per_um for um in (CELL_UM, NUCLEUS_UM, RED_CELL_UM))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    occupied = np.zeros((size, size), bool)
    if red_cells:
        spacing = 10.0 * px_per_um
        for gy in np.arange(spacing / 2, size, spacing):
            for gx in np.arange(spacing / 2, size, spacing):
                x, y = gx + rng.uniform(-1, 1) * px_per_um, gy + rng.uniform(-1, 1) * px_per_um
                if white_cell and np.hypot(x - cx, y - cy) < cell_r + red_r + px_per_um:
                    continue
                distance = np.hypot(xx - x, yy - y)
                disc = distance <= red_r
                image[disc] = colours["red"]
                # The pale centre of a biconcave red cell.
                image[distance <= red_r * 0.35] = (colours["red"] + colours["background"]) / 2
                occupied |= disc
    nucleus = np.zeros((size, size), bool)
    if white_cell:
        distance = np.hypot(xx - cx, yy - cy)
        image[distance <= cell_r] = colours["cytoplasm"]
        nucleus = distance <= nucleus_r
        image[nucleus] = colours["nucleus"]
        occupied |= distance <= cell_r
    image = cv2.GaussianBlur(image, (0, 0), 0.6) + rng.normal(0, 1.5, image.shape).astype(np.float32)
    far = cv2.dilate(occupied.astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
    pixels = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    return Smear(pixels, nucleus, far, (cx, cy))
