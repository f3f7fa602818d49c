"""Augment stage: the albumentations training policy, built from params and serialised.

Training loads the serialised policy (``policy.json``) rather than rebuilding it, so the run
applies exactly the policy this stage wrote and previewed.
"""

from __future__ import annotations

import json
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd

from pipeline.atomic import write_bytes, write_text
from pipeline.config import AugmentParams
from pipeline.layout import IMAGES_FILE, INDEX_FILE
from pipeline.processed import check_processed


def build_policy(params: AugmentParams) -> A.Compose:
    """The training-time augmentation policy described by ``params``.

    Blood-cell images have no canonical orientation, so flips and 90° rotations are label
    preserving; colour jitter stands in for stain and scanner variation between labs.
    """
    return A.Compose(
        [
            A.HorizontalFlip(p=params.hflip),
            A.VerticalFlip(p=params.vflip),
            A.RandomRotate90(p=params.rotate90),
            A.Affine(
                translate_percent=(-params.shift, params.shift),
                scale=(1.0 - params.scale, 1.0 + params.scale),
                rotate=(-params.rotate, params.rotate),
                border_mode=cv2.BORDER_REFLECT_101,
                p=params.affine,
            ),
            A.ColorJitter(
                brightness=params.brightness,
                contrast=params.contrast,
                saturation=0.0,
                hue=params.hue,
                p=params.color,
            ),
            *shift_transforms(params),
            A.GaussianBlur(blur_limit=(3, 5), p=params.blur),
            A.GaussNoise(std_range=(0.02, 0.06), p=params.noise),
        ],
        seed=params.seed,
    )


def shift_transforms(params: AugmentParams) -> list[A.BasicTransform]:
    """Transforms that imitate another lab: stain, light, camera response, colour loss, cell scale
    and resolution. Each is present only when its probability is above 0, so a policy without
    shift augmentation is exactly today's policy."""
    candidates = [
        (params.stain, lambda p: A.HEStain(method="random_preset", augment_background=False, p=p,
                                           intensity_scale_range=(1 - params.stain_intensity,
                                                                  1 + params.stain_intensity))),
        (params.hsv, lambda p: A.HueSaturationValue(hue_shift_limit=params.hsv_hue,
                                                    sat_shift_limit=params.hsv_saturation,
                                                    val_shift_limit=params.hsv_value, p=p)),
        (params.illuminant, lambda p: A.PlanckianJitter(mode="blackbody", p=p)),
        (params.gamma, lambda p: A.RandomGamma(gamma_limit=(70, 150), p=p)),
        (params.grayscale, lambda p: A.ToGray(num_output_channels=3, p=p)),
        (params.zoom, lambda p: A.Affine(scale=(params.zoom_min, params.zoom_max), border_mode=cv2.BORDER_REFLECT_101,
                                         p=p)),
        (params.downscale, lambda p: A.Downscale(scale_range=(params.downscale_min, 0.9), p=p,
                                                 interpolation_pair={"downscale": cv2.INTER_AREA,
                                                                     "upscale": cv2.INTER_LINEAR})),
    ]
    return [make(probability) for probability, make in candidates if probability > 0]


def policy_json(policy: A.Compose) -> str:
    """``policy`` serialised as the JSON text :func:`load_policy` reads."""
    return json.dumps(A.to_dict(policy), indent=2) + "\n"


def save_policy(policy: A.Compose, path: Path) -> None:
    """Serialise ``policy`` as JSON, replacing ``path`` in one step."""
    write_text(path, policy_json(policy))


def load_policy(path: Path) -> A.Compose:
    """Load a policy written by :func:`save_policy`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: augmentation policy not found; run `wbc augment` (or `dvc repro`) first")
    return A.load(str(path), data_format="json")


def preview_grid(images: np.ndarray, policy: A.Compose, variants: int = 5, tile: int = 128) -> np.ndarray:
    """A grid image: one row per input image, its original then ``variants`` augmented draws."""
    rows = []
    for image in images:
        tiles = [image] + [policy(image=image)["image"] for _ in range(variants)]
        tiles = [cv2.resize(t, (tile, tile), interpolation=cv2.INTER_AREA) for t in tiles]
        rows.append(np.concatenate([cv2.copyMakeBorder(t, 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=(255,) * 3)
                                    for t in tiles], axis=1))
    return np.concatenate(rows, axis=0)


def run_augment(processed_dir: Path, params: AugmentParams, policy_path: Path, preview_path: Path) -> None:
    """Build and save the policy, and write a preview grid of it on training images of ``processed_dir``
    (checked first: :func:`pipeline.processed.check_processed`). Both are made before either file is
    replaced, and each file is replaced in one step."""
    check_processed(processed_dir)
    policy = build_policy(params)
    index = pd.read_csv(processed_dir / INDEX_FILE)
    train_rows = np.flatnonzero(index["split"].to_numpy() == "train")
    rng = np.random.default_rng(params.seed)
    # One image per class first, so the preview shows the policy on every kind of cell.
    per_class = index.iloc[train_rows].groupby("label").head(1).index.to_numpy()
    chosen = list(per_class[: params.preview_images])
    remaining = np.setdiff1d(train_rows, chosen)
    extra = params.preview_images - len(chosen)
    if extra > 0 and remaining.size:
        chosen += list(rng.choice(remaining, size=min(extra, remaining.size), replace=False))
    images = np.load(processed_dir / IMAGES_FILE, mmap_mode="r")[np.sort(chosen)]
    serialised = policy_json(policy)
    # previewed as read back from its JSON: the preview shows the policy training will load
    grid = preview_grid(images, A.from_dict(json.loads(serialised)))
    encoded, png = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not encoded:
        raise ValueError(f"{preview_path}: the preview grid could not be encoded as PNG")
    write_bytes(preview_path, png.tobytes())
    write_text(policy_path, serialised)
