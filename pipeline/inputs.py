"""What prediction accepts and how one input becomes the model's pixels.

An input (an image file, or the base64-encoded bytes of one) is

1. read within limits (:class:`InputLimits`): a file only when paths are allowed and it resolves
   (symlinks and ``..`` followed) under its permitted folder, only a regular file, and only after
   its size passed ``predict.max_image_bytes``; base64 only when short enough to decode within it,
2. checked from its header alone, nothing decoded yet: a format of ``ingest.formats``, at most
   ``predict.max_pixels`` pixels, a short side of at least ``ingest.min_side``, not cut short,
3. decoded once, framed, squared and colour-standardised by the very function the normalize stage
   runs over the training images (:func:`pipeline.preprocess.square_image`), with the preprocessing
   saved in the model (normalize params, stain reference, pixel size); an image where framing finds
   no cell is refused with the framing step's reason,
4. resized to the model's input size exactly like the training data
   (:func:`pipeline.imaging.resize_square`).

An input that fails a check raises :class:`RejectedInput` with its reason code (the table is
:data:`pipeline.inspection.REASON_MEANINGS`) and a sentence that names sizes, formats and limits,
never the input's content. ``wbc predict``, the served model and the export's parity images all
prepare their inputs here.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.config import IngestParams, PredictParams
from pipeline.imaging import ImageReadError, resize_square, to_chw
from pipeline.inspection import REASON_MEANINGS
from pipeline.model_meta import ModelMeta
from pipeline.preprocess import NoCellFound, Preprocessing, square_image


@dataclass(frozen=True)
class ImageInput:
    """One image to classify: a file ``path``, or ``image_b64``, the base64-encoded bytes of an
    image file (a ``data:image/...;base64,`` prefix is allowed). ``name`` labels the output row.
    ``root``, when set, is the folder the file must resolve under (a manifest's folder, the served
    model's ``predict.serve_path_root``)."""

    name: str
    path: str | None = None
    image_b64: str | bytes | None = None
    root: str | None = None


class RejectedInput(Exception):
    """An input that cannot be classified; ``reason`` is a short code, ``detail`` a sentence."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class InputLimits:
    """What prediction accepts: ingest's formats and minimum side, predict's caps on bytes and
    pixels, and whether file paths may be read at all (the served model reads none unless
    ``predict.serve_path_root`` is set)."""

    formats: tuple[str, ...]
    min_side: int
    max_bytes: int
    max_pixels: int
    read_paths: bool = True


def input_checks(ingest: IngestParams, predict: PredictParams | None = None, read_paths: bool = True) -> InputLimits:
    """The limits every input passes: ``ingest``'s formats and minimum side, ``predict``'s caps."""
    predict = predict or PredictParams()
    return InputLimits(formats=tuple(ingest.formats), min_side=ingest.min_side, max_bytes=predict.max_image_bytes,
                       max_pixels=predict.max_pixels, read_paths=read_paths)


def _too_large(size: int, limits: InputLimits, what: str = "bytes") -> RejectedInput:
    return RejectedInput("too-large", f"{size} {what}; predict.max_image_bytes is {limits.max_bytes}; not read")


def _decode_base64(value: str | bytes, limits: InputLimits) -> bytes:
    if isinstance(value, str) and value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    # 4 base64 characters carry 3 bytes: a longer value cannot fit the cap, so it is never decoded
    if len(value) > 4 * -(-limits.max_bytes // 3):
        raise _too_large(len(value) * 3 // 4, limits, "bytes (base64-encoded)")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RejectedInput("not-base64", f"the 'image' value is not valid base64 ({exc})") from None
    if len(data) > limits.max_bytes:
        raise _too_large(len(data), limits)
    return data


def _allowed_path(item: ImageInput, limits: InputLimits) -> str:
    """``item``'s file with symlinks and ``..`` resolved, once it is allowed to be read."""
    if not limits.read_paths:
        raise RejectedInput("path-not-allowed", "this model reads no files; send the image's bytes base64-encoded "
                            "in the 'image' column (file paths need predict.serve_path_root)")
    if "\0" in str(item.path):  # no file system accepts it; os functions raise ValueError, not OSError
        raise RejectedInput("unreadable", "the path holds a NUL character")
    resolved = os.path.realpath(str(item.path))
    if item.root is not None:
        root = os.path.realpath(item.root)
        if os.path.commonpath([root, resolved]) != root:
            raise RejectedInput("path-not-allowed", "the path leads outside the folder it may be read from")
    return resolved


def _check_file(info: os.stat_result, limits: InputLimits) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a device, pipe or socket"
        raise RejectedInput("not-a-file", f"the path names {kind}, not a regular file; not opened")
    if info.st_size > limits.max_bytes:
        raise _too_large(info.st_size, limits)


def _read_file(item: ImageInput, limits: InputLimits) -> bytes:
    """The bytes of ``item``'s file: checked by ``stat`` before it is opened, and again on the open
    file (it may have been swapped since); at most ``max_bytes + 1`` bytes are read (files under
    /proc report a size of 0)."""
    path = _allowed_path(item, limits)
    try:
        _check_file(os.stat(path), limits)
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise RejectedInput("missing-file", "the file does not exist") from None
    except OSError as exc:
        raise RejectedInput("unreadable", exc.strerror or type(exc).__name__) from None
    with os.fdopen(handle, "rb") as file:
        _check_file(os.fstat(file.fileno()), limits)
        try:
            data = file.read(limits.max_bytes + 1)
        except OSError as exc:
            raise RejectedInput("unreadable", exc.strerror or type(exc).__name__) from None
    if len(data) > limits.max_bytes:
        raise _too_large(len(data), limits, "bytes or more")
    return data


def read_input(item: ImageInput, limits: InputLimits) -> bytes:
    """The bytes of ``item``'s image within ``limits``; raises :class:`RejectedInput` when there are none."""
    encoded = item.image_b64.strip() if isinstance(item.image_b64, str) else item.image_b64
    if encoded:
        return _decode_base64(encoded, limits)
    if not item.path:
        raise RejectedInput("no-input", "neither a file path nor image bytes were given")
    return _read_file(item, limits)


def _ends_early(data: bytes, image_format: str) -> bool:
    """True when a JPEG or PNG stops before its end marker (OpenCV would decode the rest as grey)."""
    if image_format == "JPEG":
        return b"\xff\xd9" not in data[-64:]
    if image_format == "PNG":
        return b"IEND" not in data[-64:]
    return False


def _header(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) as the header of ``data`` states them; no pixel is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format or "", *image.size
    except Image.DecompressionBombError:  # PIL's own limit, above any sane predict.max_pixels
        raise RejectedInput("too-many-pixels", f"the header states more than {2 * Image.MAX_IMAGE_PIXELS} "
                            "pixels; not decoded") from None
    except UnidentifiedImageError:
        raise RejectedInput("not-an-image", "the content is not an image format the decoder knows") from None
    except Exception as exc:  # a damaged header fails in many ways; the message may quote the content
        if isinstance(exc, EOFError) or "truncat" in str(exc).lower():
            raise RejectedInput("truncated", "the image data stops inside its header") from None
        raise RejectedInput("corrupt", "the image header is damaged") from None


def checked_header(data: bytes, limits: InputLimits) -> str:
    """The image format of ``data`` once its header passes ``limits``; raises :class:`RejectedInput`."""
    if not data:
        raise RejectedInput("empty-file", "the image has 0 bytes")
    image_format, width, height = _header(data)
    if image_format not in limits.formats:
        raise RejectedInput("unsupported-format",
                            f"{image_format} image; ingest.formats allows {', '.join(limits.formats)}")
    if width * height > limits.max_pixels:
        raise RejectedInput("too-many-pixels", f"header says {width}x{height} = {width * height} pixels > "
                            f"predict.max_pixels ({limits.max_pixels}); not decoded")
    if min(width, height) < limits.min_side:
        raise RejectedInput("too-small", f"{width}x{height}; ingest.min_side is {limits.min_side}")
    if _ends_early(data, image_format):
        raise RejectedInput("truncated", f"the {image_format} data stops before its end marker")
    return image_format


def model_preprocessing(meta: ModelMeta) -> Preprocessing:
    """The preprocessing a trained model's inputs get, from its metadata; ValueError (before any
    input is read) when the model frames by a pixel size its inputs cannot be given."""
    preprocessing = Preprocessing(meta.normalize, meta.stain_reference, meta.pixel_sizes)
    preprocessing.input_um_per_px()
    return preprocessing


def checked_square(data: bytes, limits: InputLimits, preprocessing: Preprocessing, name: str = "<bytes>") -> np.ndarray:
    """``data`` checked from its header, then decoded once and brought to the normalized square exactly
    as the normalize stage brings its images (:func:`pipeline.preprocess.square_image`); raises
    :class:`RejectedInput` with a reason code (the framing step's when it finds no cell)."""
    image_format = checked_header(data, limits)
    try:
        return square_image(data, preprocessing, preprocessing.input_um_per_px(), name)
    except NoCellFound as exc:
        raise RejectedInput(exc.reason, f"normalize.framing {preprocessing.normalize.framing}: "
                            f"{REASON_MEANINGS[exc.reason]}") from None
    except MemoryError:
        raise RejectedInput("too-many-pixels", "decoding ran out of memory") from None
    except Exception as exc:  # an ImageReadError, or a decoder bug on one odd input: it must not stop the others
        if isinstance(exc, ImageReadError) and exc.reason == "decompression-bomb":
            raise RejectedInput("too-many-pixels", "the decoder's own pixel limit stopped it") from None
        raise RejectedInput("corrupt", f"the {image_format} data could not be decoded") from None


def prepare_input(item: ImageInput, checks: InputLimits, preprocessing: Preprocessing, image_size: int) -> np.ndarray:
    """``item`` as the model's input: a 3 x image_size x image_size uint8 array, prepared with the
    model's ``preprocessing``.

    Raises :class:`RejectedInput` with a reason code when the input is not a usable image.
    """
    square = checked_square(read_input(item, checks), checks, preprocessing, item.name)
    return to_chw(resize_square(square, image_size))
