"""Augment: the policy follows params, round-trips through its JSON file, and is previewed."""

import albumentations as A
import cv2
import numpy as np

from pipeline.augment import build_policy, load_policy, run_augment, save_policy
from pipeline.config import AugmentParams


def test_policy_contains_every_configured_transform_with_its_probability():
    params = AugmentParams(hflip=0.25, blur=0.0, noise=0.7)
    policy = build_policy(params)
    probs = {type(t).__name__: t.p for t in policy.transforms}
    assert probs["HorizontalFlip"] == 0.25
    assert probs["GaussianBlur"] == 0.0
    assert probs["GaussNoise"] == 0.7
    assert {"VerticalFlip", "RandomRotate90", "Affine", "ColorJitter"} <= set(probs)


def test_saved_policy_applies_exactly_the_same_transform(tmp_path):
    policy = build_policy(AugmentParams())
    save_policy(policy, tmp_path / "policy.json")
    loaded = load_policy(tmp_path / "policy.json")
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    policy.set_random_seed(7)
    loaded.set_random_seed(7)
    for _ in range(5):
        assert np.array_equal(policy(image=image)["image"], loaded(image=image)["image"])


def test_certain_flip_policy_flips():
    params = AugmentParams(hflip=1.0, vflip=0.0, rotate90=0.0, affine=0.0, color=0.0, blur=0.0, noise=0.0)
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    assert np.array_equal(build_policy(params)(image=image)["image"], image[:, ::-1])


def test_run_augment_writes_policy_and_preview(tiny_processed, tmp_path):
    _, processed, _ = tiny_processed
    params = AugmentParams(preview_images=3, hflip=0.25, noise=0.0)
    run_augment(processed, params, tmp_path / "p.json", tmp_path / "preview.png")
    preview = cv2.imread(str(tmp_path / "preview.png"))
    assert preview is not None and preview.shape[0] == 3 * 132 and preview.shape[1] == 6 * 132
    # the saved file is the policy of these params, not of the defaults
    assert A.to_dict(load_policy(tmp_path / "p.json")) == A.to_dict(build_policy(params))
    assert A.to_dict(load_policy(tmp_path / "p.json")) != A.to_dict(build_policy(AugmentParams()))
