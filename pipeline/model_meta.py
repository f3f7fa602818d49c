"""What a trained model carries besides its weights: one typed record, written by the train
stage into ``model.pt`` and read by evaluation, prediction, export and serving.

It holds everything needed to rebuild the network and to feed it exactly as training did
(classes, input size, the normalize params with the colour reference and pixel sizes the normalize
stage used, the backbone's mean/std), its calibration and the MLflow run that made it. No torch
here: the record is plain data, checked when read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pipeline.config import NormalizeParams
from pipeline.stain import StainReference


class ModelMetaError(ValueError):
    """Raised when a saved model's metadata is missing fields or has wrong values."""


@dataclass(frozen=True)
class ModelMeta:
    """Metadata saved with a trained model."""

    model: str
    classes: tuple[str, ...]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    normalize: NormalizeParams
    pretrained: str = "none"
    best_epoch: int = -1
    best_val_macro_f1: float | None = None
    temperature: float | None = None
    run_id: str | None = None
    # The colour reference fitted by the normalize stage (None: normalize.stain is none) and the pixel
    # size (µm/px) of each training site used by framing: pixel-size.
    stain_reference: StainReference | None = None
    pixel_sizes: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def calibrated(self) -> bool:
        """Whether a temperature was fitted on the validation split."""
        return self.temperature is not None

    @property
    def temperature_or_one(self) -> float:
        """The fitted temperature, or 1.0 (no rescaling) when the model has none."""
        return 1.0 if self.temperature is None else float(self.temperature)

    def summary(self) -> dict[str, Any]:
        """What a report says about the model."""
        return {"model": self.model, "pretrained": self.pretrained, "image_size": self.image_size,
                "best_epoch": self.best_epoch, "best_val_macro_f1": self.best_val_macro_f1}

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, numbers, strings), as saved inside ``model.pt``."""
        record = asdict(self)
        record["classes"] = list(self.classes)
        record["mean"], record["std"] = list(self.mean), list(self.std)
        record["normalize"] = self.normalize.model_dump(mode="json")
        record["stain_reference"] = None if self.stain_reference is None else self.stain_reference.to_dict()
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any], source: str = "the model") -> ModelMeta:
        """Check and type a record read from a model file; raise :class:`ModelMetaError` naming
        ``source`` and what is wrong."""
        if not isinstance(record, dict):
            raise ModelMetaError(f"{source}: metadata is not a mapping; retrain the model with `wbc train`")
        known = {f.name for f in fields(cls)}
        required = ("model", "classes", "image_size", "mean", "std", "normalize")
        missing = [key for key in required if key not in record]
        if missing:
            raise ModelMetaError(f"{source}: the model's metadata lacks {', '.join(missing)}; "
                                 "retrain it with `wbc train`")
        try:
            values = {key: value for key, value in record.items() if key in known and key != "extra"}
            values["classes"] = tuple(str(name) for name in record["classes"])
            values["image_size"] = int(record["image_size"])
            values["mean"] = tuple(float(v) for v in record["mean"])
            values["std"] = tuple(float(v) for v in record["std"])
            # Models saved before the worker count moved to runtime carry it with their normalize params.
            values["normalize"] = NormalizeParams.model_validate(
                {key: value for key, value in record["normalize"].items() if key != "workers"})
            if record.get("temperature") is not None:
                values["temperature"] = float(record["temperature"])
            if record.get("stain_reference") is not None:
                values["stain_reference"] = StainReference.from_dict(record["stain_reference"])
            values["pixel_sizes"] = {str(site): float(um) for site, um in (record.get("pixel_sizes") or {}).items()}
            values["extra"] = {**record.get("extra", {}),
                               **{key: value for key, value in record.items() if key not in known}}
            meta = cls(**values)
        except (TypeError, ValueError) as exc:
            raise ModelMetaError(f"{source}: invalid model metadata: {exc}") from None
        if len(meta.classes) < 2 or len(set(meta.classes)) != len(meta.classes):
            raise ModelMetaError(f"{source}: model classes must be at least two distinct names, got {meta.classes}")
        if len(meta.mean) != 3 or len(meta.std) != 3:
            raise ModelMetaError(f"{source}: mean and std must have 3 channels")
        stain = meta.stain_reference.method if meta.stain_reference is not None else "none"
        if stain != meta.normalize.stain:
            raise ModelMetaError(f"{source}: normalize.stain is {meta.normalize.stain!r} but the saved stain "
                                 f"reference is {stain!r}; retrain the model with `wbc train`")
        if any(not um > 0 for um in meta.pixel_sizes.values()):
            raise ModelMetaError(f"{source}: pixel sizes must be positive, got {meta.pixel_sizes}")
        return meta
