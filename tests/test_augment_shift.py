"""Shift augmentation: stain, light, camera, colour loss, scale and resolution, each a param with
a probability, off by default (the policy is then exactly the in-site policy)."""

import json

import cv2
import numpy as np
import pytest

from pipeline.augment import build_policy, load_policy, run_augment, shift_transforms
from pipeline.config import AugmentParams

SHIFTS = {
    "stain": "HEStain",
    "hsv": "HueSaturationValue",
    "illuminant": "PlanckianJitter",
    "gamma": "RandomGamma",
    "grayscale": "ToGray",
    "zoom": "Affine",
    "downscale": "Downscale",
}
NO_OTHER = {"hflip": 0.0, "vflip": 0.0, "rotate90": 0.0, "affine": 0.0, "color": 0.0, "blur": 0.0, "noise": 0.0}


def _cell(size: int = 64, radius: int = 14) -> np.ndarray:
    """A purple nucleus on a pale pink cytoplasm on a light background."""
    image = np.full((size, size, 3), (235, 228, 225), np.uint8)
    cv2.circle(image, (size // 2, size // 2), radius + 8, (225, 180, 200), -1)
    cv2.circle(image, (size // 2, size // 2), radius, (110, 50, 150), -1)
    return image


def test_no_shift_transform_by_default():
    assert shift_transforms(AugmentParams()) == []
    names = [type(t).__name__ for t in build_policy(AugmentParams()).transforms]
    assert names == ["HorizontalFlip", "VerticalFlip", "RandomRotate90", "Affine", "ColorJitter", "GaussianBlur",
                     "GaussNoise"]


@pytest.mark.parametrize(("param", "transform"), SHIFTS.items())
def test_each_shift_is_a_param_with_its_probability(param, transform):
    transforms = shift_transforms(AugmentParams(**{param: 0.4}))
    assert [(type(t).__name__, t.p) for t in transforms] == [(transform, 0.4)]


def _mean_colours(params: AugmentParams, draws: int = 24) -> np.ndarray:
    policy = build_policy(params)
    image = _cell()
    out = []
    for seed in range(draws):
        policy.set_random_seed(seed)
        out.append(policy(image=image)["image"].reshape(-1, 3).mean(axis=0))
    return np.array(out)


@pytest.mark.parametrize("param", ["stain", "hsv", "illuminant", "gamma"])
def test_colour_shifts_vary_the_colours_between_draws(param):
    spread = _mean_colours(AugmentParams(**NO_OTHER, **{param: 1.0})).std(axis=0).max()
    assert spread > 2.0, f"{param}: mean colour barely changes between draws ({spread:.2f})"
    assert _mean_colours(AugmentParams(**NO_OTHER)).std(axis=0).max() == 0.0


def test_grayscale_removes_colour():
    policy = build_policy(AugmentParams(**NO_OTHER, grayscale=1.0))
    out = policy(image=_cell())["image"].astype(int)
    assert np.abs(out[..., 0] - out[..., 1]).max() <= 1 and np.abs(out[..., 1] - out[..., 2]).max() <= 1


def test_zoom_changes_the_size_of_the_cell():
    policy = build_policy(AugmentParams(**NO_OTHER, zoom=1.0, zoom_min=0.5, zoom_max=1.0))
    nucleus_area = []
    for seed in range(12):
        policy.set_random_seed(seed)
        out = policy(image=_cell())["image"]
        nucleus_area.append(int((out[..., 1] < 100).sum()))
    original = int((_cell()[..., 1] < 100).sum())
    assert max(nucleus_area) <= original * 1.05
    assert min(nucleus_area) < original * 0.6


def test_downscale_blurs_fine_detail():
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = build_policy(AugmentParams(**NO_OTHER, downscale=1.0, downscale_min=0.3))(image=texture)["image"]
    assert cv2.Laplacian(out, cv2.CV_64F).var() < 0.9 * cv2.Laplacian(texture, cv2.CV_64F).var()


def test_shift_policy_round_trips_and_is_previewed(tiny_processed, tmp_path):
    _, processed, _ = tiny_processed
    params = AugmentParams(preview_images=2, **{name: 0.5 for name in SHIFTS})
    run_augment(processed, params, tmp_path / "p.json", tmp_path / "preview.png")
    saved = json.loads((tmp_path / "p.json").read_text())
    names = {t["__class_fullname__"].split(".")[-1] for t in saved["transform"]["transforms"]}
    assert set(SHIFTS.values()) <= names
    image = _cell()
    policy, loaded = build_policy(params), load_policy(tmp_path / "p.json")
    for seed in range(4):
        policy.set_random_seed(seed)
        loaded.set_random_seed(seed)
        assert np.array_equal(policy(image=image)["image"], loaded(image=image)["image"])
    assert cv2.imread(str(tmp_path / "preview.png")) is not None
