"""Typed pipeline parameters, read from ``params.yaml`` and validated once.

Every stage calls :func:`load_params`; an unknown key, a wrong type or a value outside
what is allowed stops the run with a message naming the key and what it accepts.
The class list, image size and other facts live here and flow from here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

PBC_CLASSES: tuple[str, ...] = (
    "basophil",
    "eosinophil",
    "erythroblast",
    "ig",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
)

Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class ParamsError(ValueError):
    """Raised when params.yaml is missing, unreadable or invalid."""


# A class name is a folder name, part of file names and of MLflow metric keys ("recall/<class>"),
# and printed in Markdown and HTML: ASCII letters, digits, space, '_', '-', '.' only.
CLASS_NAME_PATTERN = r"[A-Za-z0-9](?:[A-Za-z0-9 _.-]{0,62}[A-Za-z0-9_.-])?"


def check_class_name(value: str, where: str = "class name") -> str:
    """``value`` if it is a valid class name, else ValueError naming ``where`` and what is allowed."""
    if not re.fullmatch(CLASS_NAME_PATTERN, value):
        bad = sorted(set(re.sub(r"[A-Za-z0-9 _.-]", "", value)))
        problem = (f"holds {', '.join(map(repr, bad))}" if bad else "is empty" if not value
                   else "is longer than 64 characters" if len(value) > 64 else "starts or ends with a wrong character")
        raise ValueError(
            f"{where} {value!r} {problem}; a class name is a folder name and part of file names and MLflow "
            "metric keys: 1 to 64 ASCII letters, digits, spaces, '_', '-' or '.', starting with a letter or digit "
            "and not ending with a space"
        )
    return value


class _Section(BaseModel):
    # strict: "3" is no integer, 3.5 no integer, "yes" or 1 no boolean (an integer for a float is fine).
    # A fixed-length field (an RGB tuple) also needs Field(strict=False) to accept YAML's list.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class TableSource(_Section):
    """One CSV/TSV label table: which column names each image and which gives its label.

    Columns left unset are found by their usual names (``path``/``file``/``filename``,
    ``id``/``image id``, ``label``/``class``/``class label``), case and spacing ignored.
    """

    file: str = Field(min_length=1, description="the table, relative to data.root (or absolute)")
    images: str = Field(".", description="folder of the images, relative to the table's folder")
    path_column: str | None = Field(None, description="column holding an image path")
    id_column: str | None = Field(
        None, description="column holding an id, turned into a path by path_pattern"
    )
    path_pattern: str = Field("{id}", description="file name made from the id, e.g. '{id:03d}.bmp'")
    label_column: str | None = None
    group_column: str | None = Field(None, description="rows sharing a value share a split (e.g. patient)")
    delimiter: str | None = Field(None, description="None = ',' or tab, detected from the header")

    @field_validator("path_pattern")
    @classmethod
    def _pattern_uses_only_id(cls, value: str) -> str:
        try:
            value.format(id=1)
        except (KeyError, IndexError) as exc:
            raise ValueError(f"path_pattern may only use the field {{id}}, got {value!r} ({exc})") from None
        except ValueError:
            value.format(id="1")
        return value


# A site name is a folder name and part of MLflow metric keys: lower case, digits, '.', '_', '-'.
SITE_NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"


def check_site_name(value: str) -> str:
    """``value`` if it is a valid site name, else ValueError saying what a site name may hold."""
    if not re.fullmatch(SITE_NAME_PATTERN, value):
        raise ValueError(
            f"site name {value!r}: a site name is a folder name: 1 to 64 lower-case letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return value


def site_name_from(path: str) -> str:
    """A valid site name made from a folder path (its last part, lower case, other characters as '-')."""
    name = re.sub(r"[^a-z0-9._-]+", "-", Path(path).name.lower()).strip("-._")[:64]
    return name or "site"


class SourceParams(_Section):
    """One source of images: a site (lab, scanner) with its own folder tree or label tables.

    ``root`` is relative to ``data.root`` (so DVC, which watches ``data.root``, sees every
    source), or absolute. The other keys mean what they mean in ``data``.
    """

    site: str = Field(description="name of the site: lower case, digits, . _ -")
    root: str = Field(".", min_length=1, description="folder of this source, relative to data.root")
    source: Literal["folder", "table"] = "folder"
    tables: list[TableSource] = Field(default_factory=list)
    label_map: dict[str, str | None] = Field(default_factory=dict)
    um_per_px: float | None = Field(
        None, gt=0.0, description="physical pixel size of this site's images in micrometres, when known"
    )

    @field_validator("site")
    @classmethod
    def _site_name(cls, value: str) -> str:
        return check_site_name(value)

    @model_validator(mode="after")
    def _tables_match_source(self) -> SourceParams:
        if self.source == "table" and not self.tables:
            raise ValueError(f"source {self.site!r}: source 'table' needs at least one entry in tables")
        if self.source == "folder" and self.tables:
            raise ValueError(f"source {self.site!r}: tables are only read when source is 'table'")
        return self


class DataParams(_Section):
    """Where the raw images are, how they are labelled and which classes the model learns.

    ``source: folder`` reads ``<root>/<class>/<image>``; ``source: table`` reads label tables.
    ``label_map`` turns other spellings or codes into class names (``SNE: neutrophil``,
    ``"1": neutrophil``); a label mapped to null is left out on purpose (reported as excluded).
    With ``sources`` set, each entry is one site with its own folder (under ``root``), layout and
    label map, and ``source``/``tables``/``label_map``/``site`` here are not used.
    """

    root: str = "data/raw/synthetic"
    classes: list[str] = Field(default_factory=lambda: list(PBC_CLASSES), min_length=2)
    source: Literal["folder", "table"] = "folder"
    tables: list[TableSource] = Field(default_factory=list)
    label_map: dict[str, str | None] = Field(default_factory=dict)
    allow_outside_root: bool = Field(
        False, description="let label tables name images outside their source folder (absolute paths, '..', "
        "symlinks leading out); false = such rows are rejected (outside-root)"
    )
    site: str | None = Field(None, description="site name of the single source; default: root's folder name")
    um_per_px: float | None = Field(None, gt=0.0, description="physical pixel size of the single source, if known")
    sources: list[SourceParams] = Field(default_factory=list, description="several sites; empty = one source")

    @field_validator("site")
    @classmethod
    def _site_name(cls, value: str | None) -> str | None:
        return value if value is None else check_site_name(value)

    def resolved_sources(self) -> list[SourceParams]:
        """The sources to read: ``sources`` when given, else one made of root/source/tables/label_map."""
        if self.sources:
            return list(self.sources)
        return [SourceParams(site=self.site or site_name_from(self.root), root=".", source=self.source,
                             tables=self.tables, label_map=self.label_map, um_per_px=self.um_per_px)]

    def site_names(self) -> list[str]:
        """The site of every source, in order."""
        return [source.site for source in self.resolved_sources()]

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, value: list[str]) -> list[str]:
        for index, name in enumerate(value):
            check_class_name(name, f"data.classes[{index}]")
        folded = [name.casefold() for name in value]
        if len(set(folded)) != len(folded):
            raise ValueError(f"class names must be unique, also ignoring case (folders on some disks), got {value}")
        return value

    @model_validator(mode="after")
    def _consistent_source(self) -> DataParams:
        for where, label_map in (("data.label_map", self.label_map),
                                 *((f"data.sources[{s.site}].label_map", s.label_map) for s in self.sources)):
            unknown = {key: name for key, name in label_map.items() if name is not None and name not in self.classes}
            if unknown:
                raise ValueError(f"{where} targets must be in data.classes {self.classes} or null, got {unknown}")
        if self.sources:
            sites = [source.site for source in self.sources]
            repeated = sorted({site for site in sites if sites.count(site) > 1})
            if repeated:
                raise ValueError(f"data.sources: site names must be unique, repeated: {', '.join(repeated)}")
            unused = [key for key in ("tables", "label_map", "site", "um_per_px") if getattr(self, key)]
            if unused or self.source != "folder":
                raise ValueError(f"with data.sources set, give {', '.join(unused) or 'source'} per source, "
                                 "not in data itself")
            return self
        if self.source == "table" and not self.tables:
            raise ValueError("source 'table' needs at least one entry in data.tables")
        if self.source == "folder" and self.tables:
            raise ValueError("data.tables is only read when source is 'table'")
        return self


ColourLevel = Annotated[int, Field(ge=0, le=255)]

# Synthetic sites modelled on the real ones (see the data README): stain, light, optics and framing.
SITE_PRESETS: dict[str, dict[str, object]] = {
    # May-Grunwald-Giemsa, CellaVision DM96: the default look, crisper; cell in context, ~1/3 of a 360 px field.
    "barcelona-like": {"size": 360, "blur": 0.5, "jpeg_quality": 95},
    # CellaVision images from another lab: paler nuclei, redder red cells, cell ~1/2 of a 300 px crop.
    "cellavision-like": {
        "size": 300, "background": (252, 226, 200), "saturation": 0.94, "white_cell_stain": 0.8,
        "red_cell_stain": 1.15, "cell_scale": 1.45, "blur": 0.6, "jpeg_quality": 85,
    },
    # Fast stain: yellow background, dark maroon nuclei, tan cytoplasm, pale red cells; soft tight 120 px crop.
    "jiangxi-like": {
        "size": 120, "background": (255, 252, 166), "stain_hue": 20.0, "white_cell_stain": 1.33,
        "red_cell_stain": 0.6, "cell_scale": 2.2, "blur": 2.5, "noise": 1.5,
    },
    # Gismo-Right on a white field: pale magenta cells, lavender red cells, uneven light, 224 px crops
    # with black padding where a cell lay near the image edge.
    "tehran-like": {
        "size": 224, "background": (253, 252, 252), "stain_hue": 9.0, "red_cell_hue": -60.0,
        "white_cell_stain": 0.52, "red_cell_stain": 1.35, "cell_scale": 1.3, "vignetting": 0.1, "blur": 0.7,
        "noise": 1.5, "jpeg_quality": 95, "edge_padding": 0.15,
    },
}


class SiteStyle(_Section):
    """One synthetic site (lab, scanner): how its stain, light, optics and framing differ.

    Unset fields come from ``preset`` (by default the preset named like the site, if there is
    one), else from the default look, which is the single-site sample's. A bare string in
    ``sample.sites`` names a preset: ``sites: [barcelona-like, jiangxi-like]``.
    """

    name: str = Field(description="folder of the site: lower-case letters, digits, '.', '_', '-'")
    preset: str | None = Field(None, description="preset the unset fields come from")
    per_class: int | None = Field(None, ge=4, description="images per class; None = sample.per_class")
    size: int | None = Field(None, ge=32, le=1024, description="image side in pixels; None = sample.size")
    classes: list[str] | None = Field(None, min_length=1, description="classes this site has; None = all")
    background: tuple[ColourLevel, ColourLevel, ColourLevel] = Field(
        (251, 228, 202), strict=False, description="RGB of the empty field"
    )
    stain_hue: float = Field(0.0, ge=-180, le=180, description="degrees the stain colours turn")
    red_cell_hue: float = Field(0.0, ge=-180, le=180, description="extra degrees for red cells")
    saturation: float = Field(1.0, ge=0.0, le=3.0, description="stain colourfulness; 0 = grey")
    white_cell_stain: float = Field(1.0, gt=0.0, le=3.0, description="optical density of nuclei, cytoplasm, granules")
    red_cell_stain: float = Field(1.0, gt=0.0, le=3.0, description="optical density of red cells")
    vignetting: float = Field(0.0, ge=0.0, le=0.6, description="light lost at the corners")
    blur: float = Field(1.0, ge=0.0, le=10.0, description="focus blur, times the default")
    noise: float = Field(1.0, ge=0.0, le=10.0, description="sensor noise, times the default")
    jpeg_quality: int = Field(0, ge=0, le=100, description="JPEG round trip at this quality; 0 = none")
    cell_scale: float = Field(1.0, ge=0.4, le=3.0, description="magnification: cells and red cells, times default")
    edge_padding: Probability = Field(0.0, description="chance of a black strip, as in crops at an image edge")

    @model_validator(mode="before")
    @classmethod
    def _from_preset(cls, data: object) -> object:
        if isinstance(data, str):
            data = {"name": data}
        if not isinstance(data, dict):
            return data
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}; allowed keys: {', '.join(cls.model_fields)}")
        name = data.get("name")
        preset = data.get("preset") or (name if isinstance(name, str) and name in SITE_PRESETS else None)
        if preset is None:
            return data
        if preset not in SITE_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(SITE_PRESETS)}")
        return {**SITE_PRESETS[preset], **data, "preset": preset}

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        if not re.fullmatch(SITE_NAME_PATTERN, value):
            raise ValueError(
                "a site name is its folder's name: 1 to 64 lower-case letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("classes")
    @classmethod
    def _known_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        unknown = [name for name in value if name not in PBC_CLASSES]
        if unknown or len(set(value)) != len(value):
            raise ValueError(f"classes must be distinct names from {', '.join(PBC_CLASSES)}, got {value}")
        return value


class SampleParams(_Section):
    """The synthetic blood-smear sample used when no real data is configured.

    With ``sites`` empty one site is written to ``<out>/<class>/``; otherwise each site gets its
    own tree ``<out>/<site>/<class>/``, so that each can be a data source of its own.
    """

    per_class: int = Field(100, ge=4)
    size: int = Field(128, ge=32, le=1024)
    seed: int = 0
    sites: list[SiteStyle] = Field(
        default_factory=list, description="synthetic sites; empty = one default site. A site's unset "
        "per_class and size are taken from here"
    )

    @field_validator("sites")
    @classmethod
    def _distinct_sites_sized(cls, value: list[SiteStyle], info: ValidationInfo) -> list[SiteStyle]:
        names = [site.name for site in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"site names must be unique, repeated: {', '.join(repeated)}")
        clashing = [name for name in names if name in PBC_CLASSES]
        if clashing:
            raise ValueError(f"a site may not be named like a class folder: {', '.join(clashing)}")
        defaults = {key: info.data[key] for key in ("per_class", "size") if key in info.data}
        return [
            site.model_copy(update={key: getattr(site, key) or default for key, default in defaults.items()})
            for site in value
        ]


# The formats (as PIL names them) that pipeline.imaging decodes to full-size RGB: the raster formats of
# microscope and camera exports. PIL opens more (icons, textures, print formats), not all of them faithfully.
IMAGE_FORMATS: tuple[str, ...] = ("BMP", "GIF", "JPEG", "JPEG2000", "PNG", "PPM", "TIFF", "WEBP")
FORMAT_SPELLINGS = {"JPG": "JPEG", "TIF": "TIFF", "JP2": "JPEG2000", "J2K": "JPEG2000", "PGM": "PPM", "PBM": "PPM"}


class IngestParams(_Section):
    """Validation, de-duplication and splitting of the raw images."""

    seed: int = 42
    val_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_method: Literal["hash", "quota"] = Field(
        "hash",
        description="hash: each group's split follows from its own hash, so adding files never moves "
        "existing ones; quota: per-class counts as close to the fractions as the groups allow",
    )
    min_side: int = Field(16, ge=1)
    max_pixels: int = Field(89_478_485, ge=1)
    formats: list[str] = Field(
        default_factory=lambda: ["BMP", "JPEG", "PNG", "TIFF"], min_length=1,
        description=f"image formats accepted, among {', '.join(IMAGE_FORMATS)}",
    )
    max_file_bytes: int = Field(
        200_000_000, ge=1, description="larger files are rejected (too-large) from their size alone, never read"
    )
    near_dup_threshold: int = Field(
        44, ge=0, le=128, description="max perceptual-hash distance (of 256 bits) of near-duplicates; 0 = off"
    )
    recrop_threshold: int = Field(
        0, ge=0, le=128, description="max perceptual-hash distance (of 256 bits) between the white cells, each "
        "centred on its nucleus: links re-crops of one cell shifted in the frame (crop datasets); 0 = off"
    )
    holdout_sites: list[str] = Field(
        default_factory=list, description="sites never used for training or validation, evaluated apart"
    )

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, value: list[str]) -> list[str]:
        names = sorted({name.upper() for name in value})
        unknown = [name for name in names if name not in IMAGE_FORMATS]
        if unknown:
            hints = "".join(f"; write {FORMAT_SPELLINGS[n]} for {n}" for n in unknown if n in FORMAT_SPELLINGS)
            raise ValueError(f"{', '.join(unknown)} not among the formats the decoder reads: "
                             f"{', '.join(IMAGE_FORMATS)}{hints}")
        return names

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> IngestParams:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:.2f}; "
                "it must stay below 0.9 so that a training split remains"
            )
        return self


class NormalizeParams(_Section):
    """Bringing every kept image to one square RGB size, and optionally to one framing and one colour
    standard (pipeline/preprocess.py applies them, identically in normalize and predict)."""

    size: int = Field(380, ge=16, le=2048)
    mode: Literal["pad", "crop"] = "pad"
    pad_color: tuple[int, int, int] = Field((255, 255, 255), strict=False)
    # The choices mirror pipeline.stain.STAIN_METHODS and pipeline.framing.FRAMING_SCALES (a test keeps them
    # equal): importing those modules here would load OpenCV for every command that reads params.
    stain: Literal["none", "reinhard", "macenko"] = Field(
        "none", description="colour standardisation to a reference fitted on training images")
    stain_reference_images: int = Field(
        64, ge=1, le=10000, description="training-split images of the training sites the reference is fitted on")
    seed: int = Field(0, description="seed drawing the images a stain reference or a pixel size is measured on")
    framing: Literal["none", "red-cell", "pixel-size", "nucleus"] = Field(
        "none", description="centre a square on the white cell at one scale before squaring")
    field_um: float = Field(30.0, gt=0.0, le=1000.0, description="side of the framed square in micrometres "
                            "(framing red-cell and pixel-size)")
    nucleus_fraction: float = Field(0.4, gt=0.0, le=1.0, description="share of the framed square's side the "
                                    "nucleus spans (framing nucleus)")
    pixel_size_images: int = Field(
        200, ge=1, le=100000, description="images per site its pixel size is measured on (framing pixel-size, "
        "sites without um_per_px)")

    @field_validator("pad_color")
    @classmethod
    def _rgb(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError(f"pad_color must be three integers in 0..255, got {list(value)}")
        return value


class AugmentParams(_Section):
    """The albumentations policy applied to training images."""

    hflip: Probability = 0.5
    vflip: Probability = 0.5
    rotate90: Probability = 0.5
    affine: Probability = 0.5
    shift: float = Field(0.05, ge=0.0, le=0.5)
    scale: float = Field(0.1, ge=0.0, le=0.5)
    rotate: float = Field(15.0, ge=0.0, le=180.0)
    color: Probability = 0.5
    brightness: float = Field(0.15, ge=0.0, le=1.0)
    contrast: float = Field(0.15, ge=0.0, le=1.0)
    hue: float = Field(0.03, ge=0.0, le=0.5)
    blur: Probability = 0.1
    noise: Probability = 0.1
    # Shift augmentation: what changes from one lab to the next (stain, light, camera, scale).
    stain: Probability = Field(0.0, description="stain-vector and intensity jitter (albumentations HEStain)")
    stain_intensity: float = Field(0.3, ge=0.0, le=0.9, description="HEStain intensity scale range, 1 ± this")
    hsv: Probability = Field(0.0, description="hue/saturation/value shift of the whole image")
    hsv_hue: int = Field(15, ge=0, le=90, description="hue shift limit, degrees/2 as OpenCV counts them")
    hsv_saturation: int = Field(30, ge=0, le=255)
    hsv_value: int = Field(20, ge=0, le=255)
    illuminant: Probability = Field(0.0, description="colour temperature of the light (PlanckianJitter)")
    gamma: Probability = Field(0.0, description="camera response curve (RandomGamma 70..150)")
    grayscale: Probability = Field(0.0, description="drop colour altogether, so shape must carry the class")
    zoom: Probability = Field(0.0, description="scale jitter between zoom_min and zoom_max (cell size, framing)")
    zoom_min: float = Field(0.7, gt=0.0, le=1.0)
    zoom_max: float = Field(1.4, ge=1.0, le=3.0)
    downscale: Probability = Field(0.0, description="down- then up-sample: lower-resolution cameras")
    downscale_min: float = Field(0.35, gt=0.0, lt=1.0, description="smallest down-sampling factor")
    preview_images: int = Field(8, ge=1, le=64)
    seed: int = 0


class TrainParams(_Section):
    """Model and schedule of the training stage: what shapes the trained weights. Where it runs is
    ``runtime``, where it is logged ``tracking``."""

    # The backbone registry (pipeline.models.BACKBONES) is the one list of model names. It needs torch, which
    # the other stages never import, so the name is checked where the network is built, with the choices.
    model: str = Field("efficientnet-lite0", min_length=1, description="a backbone of pipeline.models.BACKBONES")
    pretrained: Literal["imagenet", "none"] = "imagenet"
    weights_path: str | None = None
    image_size: int = Field(96, ge=32, le=1024)
    epochs: int = Field(12, ge=1)
    freeze_epochs: int = Field(1, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    backbone_lr_factor: float = Field(0.5, gt=0.0, le=1.0)
    warmup_epochs: float = Field(0.5, ge=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0, description="0 disables clipping")
    class_weighting: Literal["none", "loss", "sampler"] = "loss"
    batch_norm: Literal["batch", "frozen"] = Field(
        "batch", description="batch: BatchNorm learns the training sites' statistics; frozen: it keeps the "
        "pretrained (ImageNet) statistics throughout, so it never normalises with one site's batch statistics"
    )
    patience: int = Field(0, ge=0, description="epochs without val macro-F1 gain before stopping; 0 = off")
    seed: int = 0

    @model_validator(mode="after")
    def _freeze_within_epochs(self) -> TrainParams:
        if self.freeze_epochs > self.epochs:
            raise ValueError(f"freeze_epochs ({self.freeze_epochs}) cannot exceed epochs ({self.epochs})")
        return self


class EvaluateParams(_Section):
    """Evaluation of the trained model on the test split."""

    batch_size: int = Field(64, ge=1)
    n_bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for 95% intervals; 0 = none")
    seed: int = 0
    worst_errors: int = Field(
        12, ge=0, le=100, description="misclassified images in the worst-errors gallery, most confident first; 0 = none"
    )
    gradcam_per_class: int = Field(
        2, ge=0, le=16, description="images per class with a Grad-CAM overlay; 0 = no Grad-CAM figure"
    )


class PredictParams(_Section):
    """``wbc predict`` (and the served MLflow model) on new images."""

    threshold: Probability = Field(
        0.5, description="a top probability (calibrated) below this marks the prediction as uncertain"
    )
    batch_size: int = Field(64, ge=1)
    workers: int = Field(2, ge=0, description="loader processes decoding images; 0 = decode in the main process")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    engine: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="what runs the model: torch (GPU when there is one), onnx (ONNX Runtime on the CPU, "
        "the parity-checked export; 2-4x torch's images/s end to end on a CPU), or auto: onnx where the model "
        "runs on the CPU, torch on a GPU (and torch wherever the export fails its parity check, with a warning)"
    )
    max_rows: int = Field(
        256, ge=1, description="rows one request to the served model may carry; every row of a larger request "
        "is refused (too-many-rows) unread. wbc predict streams any number of files"
    )
    max_image_bytes: int = Field(
        20_000_000, ge=1, description="bytes of one image file or of one base64-decoded image; larger ones are "
        "refused (too-large) before they are read or decoded"
    )
    max_pixels: int = Field(
        16_777_216, ge=1, description="width x height read from an image's header; larger images are refused "
        "(too-many-pixels) before they are decoded"
    )
    serve_path_root: str | None = Field(
        None, min_length=1, description="folder whose regular files the served model may read from a 'path' "
        "column (symlinks and '..' are resolved, then checked against it); null = 'path' inputs are refused"
    )
    manifest_root: str | None = Field(
        None, min_length=1, description="folder the paths listed in a manifest CSV given to wbc predict must "
        "stay under; null = the CSV's own folder"
    )


class CrossSiteParams(_Section):
    """The cross-site stage: leave each site out, train on the others, score the one left out."""

    adapt_bn: bool = Field(True, description="also score each left-out site after test-time BatchNorm adaptation")
    epochs: int | None = Field(None, ge=1, description="epochs of each fold's training; None = train.epochs")
    sites: list[str] = Field(default_factory=list, description="sites to leave out in turn; empty = every site")


class RuntimeParams(_Section):
    """Where and how fast the stages run. No stage lists this section in ``dvc.yaml``: none of it
    changes an output, so changing it re-runs nothing."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="training and evaluation; auto = a GPU if any")
    compile: bool = Field(False, description="torch.compile the training network")
    train_workers: int = Field(2, ge=0, description="loader processes feeding training; 0 = the main process")
    ingest_workers: int = Field(0, ge=0, description="processes checking the raw files; 0 = all CPU cores")
    normalize_workers: int = Field(0, ge=0, description="processes resizing the images; 0 = all CPU cores")


class TrackingParams(_Section):
    """Where MLflow keeps runs and models. No stage lists this section in ``dvc.yaml``: the weights and
    metrics are the same wherever they are logged."""

    experiment: str = Field("wbc", min_length=1, description="MLflow experiment of training runs")
    log_model: bool = Field(True, description="log the trained network as an MLflow model")
    registered_model: str | None = Field(
        "wbc-classifier", description="MLflow registry name of the logged model; empty or null = do not register"
    )

    @field_validator("registered_model")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return (value.strip() or None) if value is not None else None


# The sections the DVC stages depend on (dvc.yaml names them per stage): what made a model and its
# evaluation. The others (runtime, tracking, and the settings of tools that are no stage) change no output.
STAGE_SECTIONS = ("data", "sample", "ingest", "normalize", "augment", "train", "evaluate", "crosssite")

# Keys that moved out of the stage sections, so that a params.yaml written before says where they went.
MOVED_KEYS = {
    "train.num_workers": "runtime.train_workers",
    "train.device": "runtime.device",
    "train.compile": "runtime.compile",
    "ingest.workers": "runtime.ingest_workers",
    "normalize.workers": "runtime.normalize_workers",
    "train.experiment": "tracking.experiment",
    "train.log_model": "tracking.log_model",
    "train.registered_model": "tracking.registered_model",
}


class PromoteParams(_Section):
    """Gates ``wbc promote`` checks before the evaluated model (alias ``candidate``) becomes the one a lab
    should use (alias ``champion``): its test metrics, as linked to the logged model."""

    min_macro_f1: Probability = Field(0.8, description="lowest test macro-F1 a champion may have")
    min_class_recall: Probability = Field(
        0.6, description="lowest test recall any class may have (a class without test images fails)"
    )


class AdaptParams(_Section):
    """``wbc adapt``: fine-tuning a trained model on a few labelled images of a new site."""

    shots: int = Field(10, ge=1, description="labelled images per class to fine-tune on (wbc adapt --shots)")
    epochs: int = Field(15, ge=1, description="fine-tuning epochs")
    lr: float = Field(5e-4, gt=0.0, description="learning rate of the head; the backbone's is lr x backbone_lr_factor")
    backbone_lr_factor: float = Field(0.5, gt=0.0, le=1.0)
    adapt_bn: bool = Field(True, description="recompute BatchNorm statistics on all the site's images first")
    seed: int = Field(0, description="which groups become the shots")


class Params(_Section):
    """All pipeline parameters, one section per stage."""

    data: DataParams = DataParams()
    sample: SampleParams = SampleParams()
    ingest: IngestParams = IngestParams()
    normalize: NormalizeParams = NormalizeParams()
    augment: AugmentParams = AugmentParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    predict: PredictParams = PredictParams()
    promote: PromoteParams = PromoteParams()
    runtime: RuntimeParams = RuntimeParams()
    tracking: TrackingParams = TrackingParams()

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        moved = []
        for old, new in MOVED_KEYS.items():
            section, key = old.split(".")
            if isinstance(data.get(section), dict) and key in data[section]:
                moved.append(f"{old} is now {new}")
        if moved:
            raise ValueError(f"{'; '.join(moved)} (how and where stages run is no stage's dependency)")
        return data
    crosssite: CrossSiteParams = CrossSiteParams()
    adapt: AdaptParams = AdaptParams()

    @model_validator(mode="after")
    def _holdout_sites_exist(self) -> Params:
        sites = self.data.site_names()
        unknown = [site for site in self.ingest.holdout_sites if site not in sites]
        if unknown:
            raise ValueError(f"ingest.holdout_sites {unknown} are not sites of data (sites: {', '.join(sites)})")
        unknown_folds = [site for site in self.crosssite.sites if site not in sites]
        if unknown_folds:
            raise ValueError(f"crosssite.sites {unknown_folds} are not sites of data (sites: {', '.join(sites)})")
        if set(sites) <= set(self.ingest.holdout_sites):
            raise ValueError(f"ingest.holdout_sites holds every site ({', '.join(sites)}); keep one for training")
        return self


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        section = _section_model(error["loc"][:-1])
        allowed = ", ".join(section.model_fields) if section else ""
        message = f"unknown key; allowed keys here: {allowed}"
    elif error["type"] == "value_error":  # the validators' messages name the value themselves
        message = message.removeprefix("Value error, ")
    elif "input" in error and not isinstance(error["input"], dict):
        message = f"{message} (got {error['input']!r}{_type_hint(error)})"
    return f"  {key}: {message}"


def _type_hint(error: dict) -> str:
    """Why a value of the wrong type was not taken as meant, for the two usual slips."""
    if error["type"] == "bool_type":
        return "; write true or false"
    if error["type"] in ("int_type", "float_type") and isinstance(error["input"], str):
        return "; quotes make a value text: write the number without them"
    return ""


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None
        model = field.annotation
    return model


def parse_params(raw: dict, source: str = "params") -> Params:
    """Validate a params mapping; raise :class:`ParamsError` listing every bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = "\n".join(_describe(err) for err in exc.errors())
        raise ParamsError(f"{source} is invalid:\n{lines}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml`` (missing sections take their defaults)."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_ParamsLoader)
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{path}: cannot read the params file ({exc})") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(raw or {}, source=str(path))


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads ``1e-3`` as a number, as YAML 1.2 (and DVC, which writes
    params.yaml on ``dvc exp run -S``) does; PyYAML alone, a YAML 1.1 reader, would make it text."""


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)
