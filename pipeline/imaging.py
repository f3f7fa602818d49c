"""Image decoding and geometry shared by every stage that reads pixels.

``read_rgb`` is the one way the project turns a file into pixels (normalize and predict
both call it), and ``fit_square`` the one way it brings pixels to the model's square size.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

# OpenCV threads would fight the process pool for the same cores.
cv2.setNumThreads(1)


class ImageReadError(ValueError):
    """A file could not be turned into RGB pixels; ``reason`` is a short machine-readable code."""

    def __init__(self, path: str | Path, reason: str, detail: str = ""):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


def _to_uint8_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        gray = ((array - lo) / (hi - lo or 1.0) * 255.0 + 0.5).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def read_rgb_pil(path: str | Path) -> np.ndarray:
    """Decode any PIL-readable file to HxWx3 uint8 RGB, EXIF orientation applied."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image.load()
            return _to_uint8_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, "decompression-bomb", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, "undecodable", str(exc)) from None


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode a file to HxWx3 uint8 RGB, EXIF orientation applied.

    JPEG and BMP (the formats of microscope exports) go through OpenCV's decoder, several
    times faster than PIL; anything else (alpha, palettes, 16-bit, TIFF) goes through PIL.
    """
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(path, "unreadable", str(exc)) from None
    if data.size == 0:
        raise ImageReadError(path, "empty-file")
    if data[:2].tobytes() in (b"\xff\xd8", b"BM"):
        decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)
        if decoded is not None:
            return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    return read_rgb_pil(path)


def fit_square(image: np.ndarray, size: int, mode: str, pad_color: tuple[int, int, int]) -> np.ndarray:
    """Bring an RGB image to ``size`` x ``size`` keeping its aspect ratio.

    ``mode="pad"`` scales the long side to ``size`` and pads the short side with ``pad_color``;
    ``mode="crop"`` scales the short side to ``size`` and cuts the centre square.
    """
    height, width = image.shape[:2]
    scale = size / max(height, width) if mode == "pad" else size / min(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_h, new_w) != (height, width):
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        image = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    if mode == "crop":
        top, left = (new_h - size) // 2, (new_w - size) // 2
        return np.ascontiguousarray(image[top : top + size, left : left + size])
    top, left = (size - new_h) // 2, (size - new_w) // 2
    return cv2.copyMakeBorder(
        image, top, size - new_h - top, left, size - new_w - left, cv2.BORDER_CONSTANT, value=pad_color
    )
