"""Checking one image file: checksum, full decode, size limits and a perceptual hash.

:func:`inspect_bytes` is the one check every image passes before use, whether ingest reads it
from ``data.root`` or ``wbc predict`` receives it; :data:`REASON_MEANINGS` says what each reason
code (in ``rejected.csv`` and in prediction rows) means.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline.config import IngestParams
from pipeline.framing import FRAMING_REASONS, frame_cell
from pipeline.imaging import to_uint8_rgb
from pipeline.workers import resolve_workers

REASON_MEANINGS = {
    # the file itself is not a usable image
    "empty-file": "the file has 0 bytes",
    "unreadable": "the file could not be read (permissions, I/O error, broken link)",
    "not-an-image": "the content is not an image format the decoder knows",
    "unsupported-format": "an image, but of a format not in ingest.formats",
    "decompression-bomb": "more pixels than ingest.max_pixels (checked before decoding)",
    "truncated": "the image data ends early",
    "corrupt": "the image data is damaged",
    "undecodable": "the decoder could not turn the image into pixels",
    "too-small": "the short side is below ingest.min_side",
    "changed-since-ingest": "a file ingest accepted can no longer be decoded; re-run ingest",
    # the file's label is missing or not one of data.classes
    "unknown-class": "the folder or label is not in data.classes nor in data.label_map",
    "excluded-class": "the folder or label is mapped to null in data.label_map",
    "not-in-class-folder": "a file directly in data.root, outside any class folder",
    "missing-label": "the label table gives no label for this image",
    "unlabelled": "an image the label table does not name",
    "missing-file": "the file named (by a label table or a prediction input) does not exist",
    "outside-root": "a label table names a file outside its source folder ('..', an absolute path or a symlink "
    "leading out); not read unless data.allow_outside_root is true",
    # the same picture carries different labels
    "duplicate-conflict": "identical files (or one file listed twice) with different labels",
    "near-duplicate-conflict": "near-identical images with different labels",
    # a prediction input that carries no image
    "no-input": "the input names no file and carries no image bytes",
    "not-base64": "the image bytes given are not valid base64",
    # a prediction input over a limit or somewhere it may not be read from: refused before reading or decoding
    "path-not-allowed": "a file path the served model may not read (paths need predict.serve_path_root), "
    "or one that resolves outside its allowed folder (symlinks and '..' followed)",
    "not-a-file": "the path names a folder, device, pipe or socket, not a regular file",
    "too-large": "more bytes than the cap (ingest.max_file_bytes when ingesting, predict.max_image_bytes when "
    "predicting); judged from the size alone, never read",
    "too-many-pixels": "width x height in the image header exceeds predict.max_pixels",
    "too-many-rows": "the request has more rows than predict.max_rows",
    # normalize.framing found no white cell to centre on (data/processed/rejected.csv, prediction rows):
    # the framing step's own codes and meanings
    **FRAMING_REASONS,
}
# EXIF orientations with a quarter turn (5-8): the picture shows with width and height swapped.
_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}


@dataclass(frozen=True)
class Inspection:
    """What decoding one file found: its checksum and size, or why it is not usable."""

    sha256: str = ""
    bytes: int = 0
    width: int = 0
    height: int = 0
    format: str = ""
    mode: str = ""
    phash: bytes | None = None
    cell_phash: bytes | None = None  # of the white cell centred on its nucleus (None: off, or no cell found)
    reason: str = ""
    detail: str = ""


@contextmanager
def _no_pil_pixel_limit() -> Iterator[None]:
    """Lift PIL's own bomb check: ingest checks ``max_pixels`` from the header itself."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _describe_content(head: bytes) -> str:
    """A guess at what a non-image file is, from its first bytes."""
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    if stripped.startswith(b"<"):
        return "XML or HTML text"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    if head[4:8] == b"Bud1":
        return "a macOS .DS_Store folder index"
    text = head.decode("utf-8", errors="replace")[:-3]  # the last character may be cut in two
    if "\ufffd" not in text and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "text"
    return f"unrecognised binary data (starts {head[:8].hex()})"


PHASH_BITS = 256
_PHASH_SIDE = 16  # low-frequency DCT block kept: 16 x 16 = 256 bits
_SIGNS = (-1.0) ** np.arange(_PHASH_SIDE)  # mirroring a picture flips the sign of its odd DCT terms


def canonical_phash(image: Image.Image) -> bytes:
    """A 256-bit DCT perceptual hash, the same for all 8 flips and quarter turns of a picture.

    Cells have no preferred orientation, so a turned copy is still the same picture: the hash is
    the smallest of the eight orientations' hashes. Their DCTs follow from one DCT by sign flips
    and a transpose. 256 bits rather than the usual 64: on PBC, 64-bit hashes put distinct cells
    of different classes within 6 bits of each other; 256-bit ones keep them more than 60 apart.
    """
    small = cv2.resize(to_uint8_rgb(image), (4 * _PHASH_SIDE, 4 * _PHASH_SIDE), interpolation=cv2.INTER_AREA)
    low = cv2.dct(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32))[:_PHASH_SIDE, :_PHASH_SIDE]
    rows, cols = _SIGNS[:, None], _SIGNS[None, :]
    mirrored = np.stack([low, low * cols, low * rows, low * rows * cols])
    views = np.concatenate([mirrored, mirrored.transpose(0, 2, 1)]).reshape(8, -1)
    middle = views.shape[1] // 2
    median = np.partition(views, (middle - 1, middle), axis=1)[:, middle - 1 : middle + 1].mean(axis=1)
    bits = views > median[:, None]
    return min(np.packbits(row).tobytes() for row in bits)


RECROP_SIDE = 64  # the centred cell is hashed at this size
RECROP_NUCLEUS_FRACTION = 0.6  # share of that square the nucleus spans: the cell, little of its surroundings


def cell_phash(image: Image.Image) -> bytes | None:
    """:func:`canonical_phash` of the white cell centred on its nucleus at one scale (None: no cell found).

    Crop datasets often hold several crops of one cell, each shifted a little in the frame (LISC: about
    250 cells in 1,287 crops). A whole-picture hash changes with the shift; this one is taken after the
    shift is undone, so re-crops of one cell land within a few bits while other cells stay far apart.
    """
    framed = frame_cell(to_uint8_rgb(image), RECROP_SIDE, "nucleus", nucleus_fraction=RECROP_NUCLEUS_FRACTION)
    return canonical_phash(Image.fromarray(framed.image)) if framed.found else None


def inspect_file(file: str, params: IngestParams) -> Inspection:
    """Read, checksum and fully decode one file (read-only); say why it is unusable, if it is.

    What the file is and its size come first, from ``stat``: a folder, device or pipe, or a file
    above ``params.max_file_bytes``, is rejected without reading a byte of it.
    """
    try:
        # non-blocking: opening a named pipe would otherwise wait for a writer
        with os.fdopen(os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as handle:
            refused = _refused_unread(os.fstat(handle.fileno()), params)
            if refused.reason:
                return refused
            data = handle.read(params.max_file_bytes + 1)
    except OSError as exc:
        return Inspection(reason="unreadable", detail=exc.strerror or str(exc))
    if len(data) > params.max_file_bytes:  # it grew between the stat and the read
        return _too_large(len(data), params)
    return inspect_bytes(data, params)


def _refused_unread(status: os.stat_result, params: IngestParams) -> Inspection:
    """Why a file is refused from its ``stat`` alone (not a regular file, too large); no reason if it is not."""
    if not stat.S_ISREG(status.st_mode):
        return Inspection(reason="not-a-file", detail="a folder, device, pipe or socket, not a regular file")
    if status.st_size > params.max_file_bytes:
        return _too_large(status.st_size, params)
    return Inspection()


def _too_large(size: int, params: IngestParams) -> Inspection:
    return Inspection(bytes=size, reason="too-large",
                      detail=f"{size:,} bytes > ingest.max_file_bytes ({params.max_file_bytes:,}); not read")


def inspect_bytes(data: bytes, params: IngestParams) -> Inspection:
    """Checksum and fully decode the bytes of one image file; say why it is unusable, if it is."""
    if not data:
        return Inspection(reason="empty-file", detail="the file has 0 bytes")
    found = Inspection(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    try:
        with warnings.catch_warnings(), _no_pil_pixel_limit():
            warnings.simplefilter("ignore")
            return _decode(data, found, params)
    except UnidentifiedImageError:
        return replace(found, reason="not-an-image", detail=f"content is {_describe_content(data[:512])}")
    except MemoryError:
        return replace(found, reason="decompression-bomb", detail="decoding ran out of memory")
    except Exception as exc:  # a decoder bug on one odd file must not stop the whole ingest
        cut = isinstance(exc, EOFError) or "truncat" in str(exc).lower()
        return replace(found, reason="truncated" if cut else "corrupt", detail=f"{type(exc).__name__}: {exc}")


def _lacks_end(data: bytes, found: Inspection) -> bool:
    """True when a JPEG or PNG stops before its end marker: the file was cut short."""
    if found.format == "JPEG":
        return b"\xff\xd9" not in data[-64:]
    if found.format == "PNG":
        return b"IEND" not in data[-64:]
    return False


def _decode(data: bytes, found: Inspection, params: IngestParams) -> Inspection:
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        found = replace(found, format=image.format or "", mode=image.mode)
        if found.format not in params.formats:
            return replace(
                found,
                reason="unsupported-format",
                detail=f"{found.format} image; ingest.formats allows {', '.join(params.formats)}",
            )
        if width * height > params.max_pixels:
            return replace(
                found,
                reason="decompression-bomb",
                detail=f"header says {width}x{height} = {width * height} pixels > ingest.max_pixels "
                f"({params.max_pixels}); not decoded",
            )
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            message = str(exc) or type(exc).__name__
            truncated = isinstance(exc, EOFError) or "truncat" in message.lower() or _lacks_end(data, found)
            return replace(found, reason="truncated" if truncated else "corrupt", detail=message)
        if image.getexif().get(_ORIENTATION_TAG) in _TRANSPOSED_ORIENTATIONS:
            width, height = height, width
        found = replace(found, width=width, height=height)
        if min(width, height) < params.min_side:
            return replace(
                found, reason="too-small", detail=f"{width}x{height}; ingest.min_side is {params.min_side}"
            )
        if params.near_dup_threshold:
            found = replace(found, phash=canonical_phash(image))
        if params.recrop_threshold:
            found = replace(found, cell_phash=cell_phash(image))
        return found


def inspect_all(files: list[str], params: IngestParams, progress: bool = True, workers: int = 0) -> list[Inspection]:
    """Inspect ``files`` in a pool of ``workers`` processes (0 = one per CPU core); results come back in
    the order of ``files``."""
    workers = min(resolve_workers(workers), max(1, len(files)))
    check = partial(inspect_file, params=params)
    bar = partial(tqdm, total=len(files), desc="ingest", unit="img", disable=not progress)
    if workers == 1:
        return list(bar(map(check, files)))
    chunksize = max(1, min(64, len(files) // (workers * 8)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(bar(pool.map(check, files, chunksize=chunksize)))
