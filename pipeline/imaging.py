"""Image decoding and geometry shared by every stage that reads pixels.

``decode_rgb`` (``read_rgb`` for files) is the one way the project turns image bytes into
pixels, ``fit_square`` the one way it brings them to the normalized square size and
``resize_square`` the one way that square reaches the network's input size. Normalize, the
training data and ``wbc predict`` (and the served model) all reach them through
:func:`pipeline.preprocess.square_image`.

Speed matters here (normalize runs over every image): JPEGs are decoded straight to RGB, and at a
half, quarter or eighth of their size when that is still at least the square's size
(:func:`decode_reduction`: libjpeg scales in the DCT domain, far cheaper than decoding every pixel
and shrinking afterwards); :func:`fit_square` resizes straight into the square it returns (or into
a caller's buffer) and paints only the padding, with no intermediate copies.
"""

from __future__ import annotations

import io
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


# libjpeg decodes to RGB as cheaply as to BGR; OpenCV before 4.10 only offers BGR (then converted).
_COLOR_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
REDUCTIONS = (1, *_REDUCED)
JPEG_MAGIC = b"\xff\xd8"
# JPEG markers without a length field, and the start-of-frame markers that are no frame (DHT, JPG, DAC).
_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xDA)}
_NOT_FRAMES = {0xC4, 0xC8, 0xCC}


def _opencv_flags(reduction: int) -> int:
    base = cv2.IMREAD_COLOR if reduction == 1 else _REDUCED[reduction]
    return base if _COLOR_RGB is None else (base & ~cv2.IMREAD_COLOR) | _COLOR_RGB


def decode_rgb(data: bytes | np.ndarray, name: str | Path = "<bytes>", reduction: int = 1) -> np.ndarray:
    """Decode the bytes of an image file to HxWx3 uint8 RGB, EXIF orientation applied.

    JPEG and BMP (the formats of microscope exports) go through OpenCV's decoder, several
    times faster than PIL; anything else (alpha, palettes, 16-bit, TIFF) goes through PIL.
    ``reduction`` (2, 4 or 8) decodes a JPEG at that fraction of its size (sides rounded up);
    other formats, and JPEGs OpenCV cannot read, come at full size. ``name`` only labels errors.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    buffer = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if buffer.size == 0:
        raise ImageReadError(name, "empty-file")
    magic = buffer[:2].tobytes()
    if magic in (JPEG_MAGIC, b"BM"):
        decoded = cv2.imdecode(buffer, _opencv_flags(reduction if magic == JPEG_MAGIC else 1))
        if decoded is not None:
            return decoded if _COLOR_RGB is not None else cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    return read_rgb_pil(io.BytesIO(buffer.tobytes()), name)


def jpeg_size(data: bytes | np.ndarray) -> tuple[int, int] | None:
    """(width, height) a JPEG's frame header states (before EXIF orientation), or None when ``data``
    is no JPEG or its header cannot be read; reads the markers only, decodes nothing."""
    view = memoryview(data if isinstance(data, (bytes, bytearray)) else np.ascontiguousarray(data)).cast("B")
    if view[:2].tobytes() != JPEG_MAGIC:
        return None
    at = 2
    while at + 9 <= len(view):
        if view[at] != 0xFF:
            return None
        marker = view[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
        elif marker in _STANDALONE_MARKERS:
            at += 2
        elif 0xC0 <= marker <= 0xCF and marker not in _NOT_FRAMES:
            return (view[at + 7] << 8) | view[at + 8], (view[at + 5] << 8) | view[at + 6]
        else:
            at += 2 + ((view[at + 2] << 8) | view[at + 3])
    return None


def decode_reduction(data: bytes | np.ndarray, size: int, mode: str) -> int:
    """The largest JPEG decoding reduction (1, 2, 4 or 8) whose image still needs shrinking to reach a
    ``size`` square in ``mode`` (its long side for ``pad``, short side for ``crop`` at least ``size``),
    so reduced decoding never costs detail the square keeps; 1 for anything but a JPEG."""
    dimensions = jpeg_size(data)
    if dimensions is None:
        return 1
    side = max(dimensions) if mode == "pad" else min(dimensions)
    return max(r for r in REDUCTIONS if -(-side // r) >= size or r == 1)


def read_bytes(path: str | Path) -> bytes:
    """The bytes of an image file; :class:`ImageReadError` (``unreadable``) naming it when they cannot be read."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ImageReadError(path, "unreadable", str(exc)) from None


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode a file to HxWx3 uint8 RGB, EXIF orientation applied (see :func:`decode_rgb`)."""
    return decode_rgb(read_bytes(path), path)


def fit_square(image: np.ndarray, size: int, mode: str, pad_color: tuple[int, int, int],
               out: np.ndarray | None = None) -> np.ndarray:
    """Bring an RGB image to ``size`` x ``size`` keeping its aspect ratio, in ``out`` when given (a
    writable size x size x 3 uint8 array, e.g. a row of the normalize stage's output).

    ``mode="pad"`` scales the long side to ``size`` and pads the short side with ``pad_color``;
    ``mode="crop"`` scales the short side to ``size`` and cuts the centre square.
    """
    height, width = image.shape[:2]
    scale = size / max(height, width) if mode == "pad" else size / min(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    if out is None:
        out = np.empty((size, size, 3), np.uint8)
    if mode == "crop":
        if (new_h, new_w) != (height, width):
            image = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        out[...] = image[top : top + size, left : left + size]
        return out
    top, left = (size - new_h) // 2, (size - new_w) // 2
    region = out[top : top + new_h, left : left + new_w]
    if (new_h, new_w) == (height, width):
        region[...] = image
    else:
        resized = cv2.resize(image, (new_w, new_h), dst=region, interpolation=interpolation)
        if resized is not region:  # OpenCV could not write into the view
            region[...] = resized
    out[:top] = pad_color
    out[top + new_h :] = pad_color
    out[top : top + new_h, :left] = pad_color
    out[top : top + new_h, left + new_w :] = pad_color
    return out


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a square uint8 image to ``size`` x ``size`` (area filter when shrinking)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    interpolation = cv2.INTER_AREA if size < image.shape[0] else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interpolation)


def to_chw(image: np.ndarray) -> np.ndarray:
    """HxWx3 to a contiguous 3xHxW array: the layout the model takes (values stay 0..255 uint8)."""
    return np.ascontiguousarray(image.transpose(2, 0, 1))
