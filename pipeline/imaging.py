"""Image decoding and geometry shared by every stage that reads pixels.

``decode_rgb`` (``read_rgb`` for files) is the one way the project turns image bytes into
pixels, ``fit_square`` the one way it brings them to the normalized square size and
``resize_square`` the one way that square reaches the network's input size. Normalize, the
training data and ``wbc predict`` (and the served model) all call these; :func:`model_pixels`
chains the last two for an image that has not been through the normalize stage.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
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


def to_uint8_rgb(image: Image.Image) -> np.ndarray:
    """An opened PIL image as HxWx3 uint8 RGB: 16-bit and float grey scaled to 0..255, transparency
    composited on white, anything else converted by PIL."""
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


def read_rgb_pil(path: str | Path | io.BytesIO, name: str | Path | None = None) -> np.ndarray:
    """Decode any PIL-readable file (or in-memory file) to HxWx3 uint8 RGB, EXIF orientation applied."""
    name = path if name is None else name
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image.load()
            return to_uint8_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageReadError(name, "decompression-bomb", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(name, "undecodable", str(exc)) from None


def decode_rgb(data: bytes | np.ndarray, name: str | Path = "<bytes>") -> np.ndarray:
    """Decode the bytes of an image file to HxWx3 uint8 RGB, EXIF orientation applied.

    JPEG and BMP (the formats of microscope exports) go through OpenCV's decoder, several
    times faster than PIL; anything else (alpha, palettes, 16-bit, TIFF) goes through PIL.
    ``name`` only labels errors.
    """
    buffer = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if buffer.size == 0:
        raise ImageReadError(name, "empty-file")
    if buffer[:2].tobytes() in (b"\xff\xd8", b"BM"):
        decoded = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
        if decoded is not None:
            return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    return read_rgb_pil(io.BytesIO(buffer.tobytes()), name)


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode a file to HxWx3 uint8 RGB, EXIF orientation applied (see :func:`decode_rgb`)."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(path, "unreadable", str(exc)) from None
    return decode_rgb(data, path)


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


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a square uint8 image to ``size`` x ``size`` (area filter when shrinking)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    interpolation = cv2.INTER_AREA if size < image.shape[0] else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interpolation)


def to_chw(image: np.ndarray) -> np.ndarray:
    """HxWx3 to a contiguous 3xHxW array: the layout the model takes (values stay 0..255 uint8)."""
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def model_pixels(image: np.ndarray, normalize: Mapping, image_size: int) -> np.ndarray:
    """A decoded RGB image as the network sees it: the normalize stage's square (``normalize``
    holds its ``size``, ``mode`` and ``pad_color``), then the training resize to ``image_size``."""
    square = fit_square(image, int(normalize["size"]), str(normalize["mode"]), tuple(normalize["pad_color"]))
    return resize_square(square, image_size)
