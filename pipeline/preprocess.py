"""The one way an image becomes the square the model learns from and is fed: decode, frame, square,
standardise colour.

The normalize stage runs :func:`square_image` over every manifest row and ``wbc predict`` (and the
served model, export's parity images) over every input, with the same :class:`Preprocessing`:
the normalize params, the colour reference fitted on training images and the pixel sizes used for
framing, saved in ``normalize.json``, then in the model's metadata. The two paths cannot drift,
because there is only one:

1. decode (:func:`pipeline.imaging.decode_rgb`), a JPEG at a reduced size when the square is at
   least 2x smaller and no framing needs its source pixels,
2. frame (``normalize.framing``, :func:`pipeline.framing.frame_cell`): a square centred on the white
   cell at one scale; an image where no cell is found raises :class:`NoCellFound` with a reason of
   :data:`pipeline.framing.FRAMING_REASONS`,
3. square (:func:`pipeline.imaging.fit_square`) with ``normalize.size``, ``mode``, ``pad_color``,
4. standardise colour (``normalize.stain``, :func:`pipeline.stain.apply_stain`) to the reference.

No torch here: normalize uses it without the training stack.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import NormalizeParams
from pipeline.framing import FRAMING_REASONS, frame_cell
from pipeline.imaging import decode_reduction, decode_rgb, fit_square
from pipeline.layout import NORMALIZE_SUMMARY_FILE
from pipeline.stain import StainReference, apply_stain

PREPROCESSING_KEY = "preprocessing"  # the entry of normalize.json holding Preprocessing.record()


class NoCellFound(ValueError):
    """The framing step found no white cell to centre on; ``reason`` is a key of FRAMING_REASONS."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason} ({FRAMING_REASONS.get(reason, reason)})")


@dataclass(frozen=True)
class Preprocessing:
    """What turns a decoded image into the stored square: the normalize params, the fitted colour
    reference (None when ``normalize.stain`` is none) and, for ``framing: pixel-size``, the pixel
    size (µm/px) used for each site (``pixel_sizes``)."""

    normalize: NormalizeParams
    stain_reference: StainReference | None = None
    pixel_sizes: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        method = self.normalize.stain
        given = self.stain_reference.method if self.stain_reference is not None else "none"
        if given != method:
            raise ValueError(f"normalize.stain is {method!r} but the stain reference is {given!r}; "
                             "they must agree (fit a reference with that method, or set normalize.stain)")

    @property
    def plain(self) -> bool:
        """True when neither framing nor colour standardisation is on (the fast path)."""
        return self.normalize.framing == "none" and self.stain_reference is None

    def input_um_per_px(self) -> float | None:
        """The pixel size to frame an input of unknown site with (``framing: pixel-size``): the one
        the sites in ``pixel_sizes`` share; None when framing needs none. ValueError when they
        differ or none is known, since an input's site cannot be told."""
        if self.normalize.framing != "pixel-size":
            return None
        sizes = sorted(set(self.pixel_sizes.values()))
        if len(sizes) != 1:
            known = ", ".join(f"{site}: {um:g}" for site, um in sorted(self.pixel_sizes.items())) or "none"
            raise ValueError(f"normalize.framing is pixel-size, but the training sites do not share one pixel size "
                             f"(µm/px {known}), so the pixel size of an input cannot be told; train on sites of "
                             "one pixel size, or use framing red-cell or nucleus")
        return sizes[0]

    def record(self) -> dict[str, Any]:
        """JSON-ready: the normalize params, the reference's values and the pixel sizes."""
        return {
            "normalize": self.normalize.model_dump(mode="json"),
            "stain_reference": None if self.stain_reference is None else self.stain_reference.to_dict(),
            "pixel_sizes": {site: float(um) for site, um in sorted(self.pixel_sizes.items())},
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any], source: str = "the record") -> Preprocessing:
        """The preprocessing :meth:`record` wrote; ValueError naming ``source`` when it is not one."""
        try:
            reference = record.get("stain_reference")
            sizes = {str(site): float(um) for site, um in dict(record.get("pixel_sizes") or {}).items()}
            if any(not um > 0 for um in sizes.values()):
                raise ValueError(f"pixel sizes must be positive, got {sizes}")
            return cls(NormalizeParams.model_validate(record["normalize"]),
                       None if reference is None else StainReference.from_dict(reference), sizes)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{source}: not a preprocessing record ({exc})") from None


def framed(image: np.ndarray, params: NormalizeParams, um_per_px: float | None, name: str | Path) -> np.ndarray:
    """``image`` framed by ``params.framing`` (a size x size square on the white cell); raises
    :class:`NoCellFound` when there is no cell, or (``red-cell``) no red cell to measure it by."""
    result = frame_cell(image, params.size, params.framing, field_um=params.field_um, um_per_px=um_per_px,
                        nucleus_fraction=params.nucleus_fraction)
    if not result.found:
        raise NoCellFound(name, result.reason)
    return result.image


def unstained_square(data: bytes | np.ndarray, preprocessing: Preprocessing, um_per_px: float | None = None,
                     name: str | Path = "<bytes>", out: np.ndarray | None = None) -> np.ndarray:
    """Steps 1 to 3 of the module notes: the image file's bytes decoded, framed and squared, before
    colour standardisation (what a stain reference is fitted on). ``um_per_px`` is the image's pixel
    size for ``framing: pixel-size``; ``out`` (size x size x 3 uint8) receives the square when given."""
    params = preprocessing.normalize
    if params.framing == "none":
        image = decode_rgb(data, name, decode_reduction(data, params.size, params.mode))
    else:
        image = framed(decode_rgb(data, name), params, um_per_px, name)
    return fit_square(image, params.size, params.mode, params.pad_color, out)


def square_image(data: bytes | np.ndarray, preprocessing: Preprocessing, um_per_px: float | None = None,
                 name: str | Path = "<bytes>", out: np.ndarray | None = None) -> np.ndarray:
    """The bytes of an image file as the normalized square (size x size x 3 uint8 RGB), every step of
    the module notes; the one function normalize and predict both call.

    Raises :class:`pipeline.imaging.ImageReadError` when the bytes do not decode, :class:`NoCellFound`
    when framing finds no cell. ``out``, when given, receives the square (and is returned).
    """
    if preprocessing.stain_reference is None:
        return unstained_square(data, preprocessing, um_per_px, name, out)
    stained = apply_stain(unstained_square(data, preprocessing, um_per_px, name), preprocessing.stain_reference)
    if out is None:
        return stained
    out[...] = stained
    return out


def read_preprocessing(processed_dir: Path) -> Preprocessing | None:
    """The preprocessing recorded in a processed folder's ``normalize.json`` (None when that was
    written before it was recorded); ValueError naming the file when it is unreadable."""
    path = Path(processed_dir) / NORMALIZE_SUMMARY_FILE
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; run `wbc normalize` (or `dvc repro`) first") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    record = summary.get(PREPROCESSING_KEY) if isinstance(summary, dict) else None
    return None if record is None else Preprocessing.from_record(record, str(path))
