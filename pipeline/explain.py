"""Figures about single images: the worst-errors gallery and Grad-CAM overlays.

* The **worst-errors gallery** shows the misclassified images the model was most sure about:
  sorted by the probability it gave the wrong (predicted) class, highest first.
* **Grad-CAM** (MONAI's :class:`monai.visualize.GradCAM`) weights a feature map of the
  backbone (:func:`pipeline.models.cam_target_layer`, stride 16 or finer) by the gradient of
  the predicted class score and overlays the result on the image the network saw.
  :func:`occlusion_drops` checks that a map shows what the model uses.

Both read images from the normalize stage's ``images.npy`` by row and draw with matplotlib's
object API on the Agg canvas, like :mod:`pipeline.metrics`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from monai.visualize import GradCAM

from pipeline.data import resize_square
from pipeline.figures import new_figure, save_figure
from pipeline.models import cam_target_layer

WORST_ERRORS_FILE = "worst_errors.png"
GRADCAM_FILE = "gradcam.png"
THUMBNAIL = 160  # pixels: gallery images are shrunk to this side
_OVERLAY_ALPHA = 0.45
_WRONG = "#b00020"
_RIGHT = "#1b5e20"


@dataclass(frozen=True)
class Shown:
    """One image of a figure with what is known about it."""

    image: np.ndarray  # H x W x 3 uint8
    true: str
    predicted: str
    probability: float  # predicted probability of ``predicted``
    path: str = ""


# ---------------------------------------------------------------------------
# Worst errors
# ---------------------------------------------------------------------------


def worst_errors(y_true: np.ndarray, y_prob: np.ndarray, top: int) -> np.ndarray:
    """Indices of the misclassified images, highest predicted (wrong) probability first, at most ``top``.

    Ties keep the original order, so the choice is deterministic.
    """
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_prob.ndim != 2 or len(y_prob) != len(y_true):
        raise ValueError(f"y_prob must be (n, K) with n = {len(y_true)}, got shape {y_prob.shape}")
    predicted = y_prob.argmax(axis=1)
    wrong = np.flatnonzero(predicted != y_true)
    confidence = y_prob[wrong, predicted[wrong]]
    order = np.argsort(-confidence, kind="stable")
    return wrong[order[: max(0, top)]]


def _short(path: str, width: int = 28) -> str:
    name = Path(path).name
    return name if len(name) <= width else "…" + name[-(width - 1):]


def plot_error_gallery(items: Sequence[Shown], path: Path, *, n_errors: int, n_images: int,
                       columns: int = 4) -> Path:
    """Grid of misclassified images with true class, predicted class and its probability.

    ``n_errors`` and ``n_images`` (all errors and all images evaluated) go into the title; with
    no errors the figure says so instead of showing an empty grid.
    """
    if not items:
        fig = new_figure(7.5, 2.2)
        ax = fig.add_subplot()
        text = ("No misclassified images" if n_errors == 0 else f"{n_errors} misclassified images (none shown)")
        ax.text(0.5, 0.5, f"{text} among {n_images:,} evaluated", ha="center", va="center", fontsize=12)
        ax.set_axis_off()
        ax.set_title("Worst errors")
        return save_figure(fig, path)
    columns = max(1, min(columns, len(items)))
    rows = -(-len(items) // columns)
    fig = new_figure(2.3 * columns, 3.2 * rows + 0.4)  # room for the file name under each image
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax, item in zip(axes, items, strict=False):
        ax.imshow(item.image, interpolation="lanczos")
        ax.set_title(f"true: {item.true}\npredicted: {item.predicted}\np = {item.probability:.3f}",
                     fontsize=8.5, color=_WRONG, loc="left")
        if item.path:
            ax.set_xlabel(_short(item.path), fontsize=7, color="#5b6475")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(items):]:
        ax.set_axis_off()
    fig.suptitle(f"Worst errors: {len(items)} most confident of {n_errors:,} misclassified "
                 f"(of {n_images:,} images)", fontsize=11)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------
# Grad-CAM
# ---------------------------------------------------------------------------


def _normalize_map(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map to 0..1 (its maximum to 1); a flat map, which locates nothing, becomes all zero.

    (MONAI's default post-processing inverts the scale: largest to 0.)
    """
    flat = maps.reshape(len(maps), -1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    spread = high - low
    flat_map = spread <= 1e-6 * torch.clamp(high.abs(), min=torch.finfo(maps.dtype).tiny)
    shape = (-1,) + (1,) * (maps.dim() - 1)
    scaled = (maps - low.view(shape)) / torch.where(flat_map, torch.ones_like(spread), spread).view(shape)
    return torch.where(flat_map.view(shape), torch.zeros_like(scaled), scaled)


def gradcam_maps(model: torch.nn.Module, model_name: str, images: np.ndarray, class_idx: Sequence[int],
                 device: torch.device | str = "cpu", layer: str | None = None) -> np.ndarray:
    """Grad-CAM heat maps (N x H x W, 0..1) of ``images`` (N x H x W x 3 uint8, the network's input
    size) for the classes ``class_idx``, at the backbone's :func:`~pipeline.models.cam_target_layer`
    (or at ``layer``, a module name of ``model``, to compare target layers).

    Works on a copy of ``model``: MONAI's hooks stay on the copy and the model is left as it was.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be N x H x W x 3, got shape {images.shape}")
    if len(class_idx) != len(images):
        raise ValueError(f"{len(images)} images but {len(class_idx)} class indices")
    if len(images) == 0:
        return np.zeros((0, *images.shape[1:3]), dtype=np.float32)
    layer = layer or cam_target_layer(model_name)
    net = copy.deepcopy(model).to(device).eval()
    if layer not in dict(net.named_modules()):
        raise ValueError(f"{model_name}: Grad-CAM layer {layer!r} is not a module of the model")
    for parameter in net.parameters():
        parameter.requires_grad_(True)  # gradients must reach the target layer even if frozen
    cam = GradCAM(nn_module=net, target_layers=layer, postprocessing=_normalize_map)
    maps = []
    # One image per call: MONAI scores a batch by summing every image's logit of every chosen class.
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for image, cls in zip(images, class_idx, strict=True):
            x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].to(device)
            x = x.contiguous(memory_format=torch.channels_last)
            maps.append(cam(x, class_idx=int(cls)).detach().float().cpu()[0, 0].numpy())
    return np.stack(maps).astype(np.float32)


def _class_logits(model: torch.nn.Module, images: np.ndarray, class_idx: np.ndarray,
                  device: torch.device | str, batch_size: int = 64) -> np.ndarray:
    """The logit of ``class_idx[i]`` for each of ``images`` (N x H x W x 3 uint8)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = np.ascontiguousarray(images[start:start + batch_size].transpose(0, 3, 1, 2))
            x = torch.from_numpy(chunk).to(device).contiguous(memory_format=torch.channels_last)
            out.append(model(x).float().cpu().numpy())
    return np.concatenate(out)[np.arange(len(images)), class_idx]


def occlusion_drops(model: torch.nn.Module, images: np.ndarray, maps: np.ndarray, class_idx: Sequence[int],
                    fraction: float = 0.25, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """How far the logit of ``class_idx`` falls when the hottest, and when the coldest, ``fraction`` of the
    pixels of each Grad-CAM map (N x H x W) is occluded, i.e. set to the image's mean colour: two arrays of
    N drops (positive = the logit fell).

    A map that shows what the model uses has a larger drop for its hottest region than for its coldest.
    Ties (flat parts of a map) are broken in pixel order, so the result is deterministic. ``model`` is
    put in eval mode on ``device``.
    """
    images, maps = np.asarray(images), np.asarray(maps)
    if images.ndim != 4 or maps.shape != images.shape[:3]:
        raise ValueError(f"maps {maps.shape} must be N x H x W of images {images.shape}")
    if not 0.0 < fraction < 0.5:
        raise ValueError(f"fraction must lie between 0 and 0.5, got {fraction}")
    classes = np.asarray(class_idx, dtype=np.int64)
    n, height, width, _ = images.shape
    count = max(1, round(fraction * height * width))
    order = np.argsort(maps.reshape(n, -1), axis=1, kind="stable")
    pixels = images.reshape(n, -1, 3)
    fill = np.round(pixels.mean(axis=1)).astype(np.uint8)

    def occluded(where: np.ndarray) -> np.ndarray:
        out = pixels.copy()
        out[np.arange(n)[:, None], where] = fill[:, None, :]
        return out.reshape(images.shape)

    model = model.to(device).eval()
    base = _class_logits(model, images, classes, device)
    hot = base - _class_logits(model, occluded(order[:, -count:]), classes, device)
    cold = base - _class_logits(model, occluded(order[:, :count]), classes, device)
    return hot, cold


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = _OVERLAY_ALPHA) -> np.ndarray:
    """``image`` (H x W x 3 uint8) blended with ``heat`` (H x W, 0..1) in the jet colour map."""
    if heat.shape != image.shape[:2]:
        raise ValueError(f"heat map {heat.shape} does not match image {image.shape[:2]}")
    colored = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    return np.clip((1.0 - alpha) * image.astype(np.float64) + alpha * colored, 0, 255).astype(np.uint8)


def per_class_choice(y_true: np.ndarray, n_classes: int, per_class: int, seed: int = 0) -> dict[int, np.ndarray]:
    """Up to ``per_class`` image indices of each class present in ``y_true`` (seeded, in index order)."""
    rng = np.random.default_rng(seed)
    chosen = {}
    for c in range(n_classes):
        members = np.flatnonzero(np.asarray(y_true) == c)
        if len(members) == 0 or per_class <= 0:
            continue
        pick = rng.choice(members, size=min(per_class, len(members)), replace=False)
        chosen[c] = np.sort(pick)
    return chosen


def feature_map_size(model: torch.nn.Module, layer: str, image_size: int) -> tuple[int, int]:
    """Height and width of ``layer``'s output for an ``image_size`` input: the resolution of the
    Grad-CAM map before it is upsampled to the image."""
    shapes: list[tuple[int, int]] = []
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda module, args, output: shapes.append(tuple(output.shape[-2:])))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        handle.remove()
    return shapes[-1]


def plot_gradcam_grid(rows: Sequence[tuple[str, Sequence[tuple[Shown, np.ndarray]]]], path: Path,
                      *, model_name: str, layer: str, map_size: tuple[int, int] | None = None) -> Path:
    """One row per true class: each image beside its Grad-CAM overlay for the predicted class.
    ``map_size``, the feature map's resolution, is stated in the title: a map of a few cells
    only says which part of the image mattered, not which structure."""
    if not rows:
        raise ValueError("no images to show in the Grad-CAM figure")
    per_row = max(len(items) for _, items in rows)
    fig = new_figure(max(5.0, 3.3 * per_row), 1.75 * len(rows) + 0.8)
    axes = fig.subplots(len(rows), 2 * per_row, squeeze=False)
    for r, (name, items) in enumerate(rows):
        for j in range(per_row):
            ax_image, ax_cam = axes[r, 2 * j], axes[r, 2 * j + 1]
            if j >= len(items):
                ax_image.set_axis_off()
                ax_cam.set_axis_off()
                continue
            shown, heat = items[j]
            ax_image.imshow(shown.image)
            ax_cam.imshow(overlay(shown.image, heat))
            color = _RIGHT if shown.predicted == shown.true else _WRONG
            ax_cam.set_title(f"→ {shown.predicted} ({shown.probability:.2f})", fontsize=8, color=color)
            for ax in (ax_image, ax_cam):
                ax.set_xticks([])
                ax.set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=9)
    resolution = f", {map_size[0]}x{map_size[1]} map upsampled" if map_size else ""
    fig.suptitle(f"Grad-CAM of the predicted class; rows: true class\n{model_name}, layer {layer}{resolution}",
                 fontsize=10)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------
# Both figures for an evaluation
# ---------------------------------------------------------------------------


def write_explanation_figures(
    out_dir: Path,
    *,
    model: torch.nn.Module,
    model_name: str,
    image_size: int,
    images: np.ndarray,
    rows: np.ndarray,
    paths: Sequence[str],
    y_true: np.ndarray,
    y_prob: np.ndarray,
    classes: Sequence[str],
    n_worst: int,
    gradcam_per_class: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Path]:
    """Write the worst-errors gallery and the Grad-CAM grid; returns {figure key: path}.

    ``images`` is the (memory-mapped) ``images.npy`` and ``rows`` the row of each evaluated image
    in it; ``y_true``/``y_prob`` are their class indices and probabilities (``classes`` order).
    A figure turned off (count 0) is not written, and a stale copy from an earlier run is removed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if not len(rows) == len(paths) == len(y_true) == len(y_prob):
        raise ValueError(f"rows ({len(rows)}), paths ({len(paths)}), y_true ({len(y_true)}) and y_prob "
                         f"({len(y_prob)}) must have one entry per evaluated image")
    predicted = y_prob.argmax(axis=1)
    figures: dict[str, Path] = {}

    gallery = out_dir / WORST_ERRORS_FILE
    if n_worst > 0:
        shown = [
            Shown(resize_square(np.asarray(images[rows[i]]), min(THUMBNAIL, images.shape[1])), classes[y_true[i]],
                  classes[predicted[i]], float(y_prob[i, predicted[i]]), paths[i])
            for i in worst_errors(y_true, y_prob, n_worst)
        ]
        figures["worst_errors"] = plot_error_gallery(shown, gallery, n_errors=int((predicted != y_true).sum()),
                                                     n_images=len(y_true))
    else:
        gallery.unlink(missing_ok=True)

    grid = out_dir / GRADCAM_FILE
    chosen = per_class_choice(y_true, len(classes), gradcam_per_class, seed)
    if chosen:
        order = [i for c in sorted(chosen) for i in chosen[c]]
        inputs = np.stack([resize_square(np.asarray(images[rows[i]]), image_size) for i in order])
        heat = gradcam_maps(model, model_name, inputs, [predicted[i] for i in order], device)
        by_index = dict(zip(order, zip(inputs, heat, strict=True), strict=True))
        grid_rows = []
        for c in sorted(chosen):
            items = []
            for i in chosen[c]:
                image, cam = by_index[i]
                items.append((Shown(image, classes[y_true[i]], classes[predicted[i]],
                                    float(y_prob[i, predicted[i]]), paths[i]), cam))
            grid_rows.append((classes[c], items))
        layer = cam_target_layer(model_name)
        figures["gradcam"] = plot_gradcam_grid(grid_rows, grid, model_name=model_name, layer=layer,
                                               map_size=feature_map_size(model, layer, image_size))
    else:
        grid.unlink(missing_ok=True)
    return figures
