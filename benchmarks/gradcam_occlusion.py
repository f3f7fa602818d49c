"""Does Grad-CAM show what the model uses? The occlusion check per backbone family, on PBC images.

    nice python benchmarks/gradcam_occlusion.py ../shared/data/pbc \
        --models baseline-cnn resnet18 efficientnet-b0 efficientnet-lite0 \
        --per-class 60 --test-per-class 8 --image-size 96 --epochs 6 --out gradcam-occlusion

Each model is trained by the train stage itself (``pipeline.train.run_train``) on a seeded subset of the
dataset (ImageNet weights where they can be found, else from scratch), or loaded from ``--model PATH``
(a ``model.pt`` written by ``wbc train``). On held-out test images, Grad-CAM of the predicted class is
computed at each target layer compared: the layer this project used before (``OLD_LAYERS``), the one in
the backbone registry now, and any ``--layer MODEL=MODULE``. Then the map's hottest quarter of the pixels
is occluded (set to the image's mean colour), and separately its coldest quarter
(:func:`pipeline.explain.occlusion_drops`). A map that shows what the model uses makes the logit of the
predicted class fall more for the hottest quarter than for the coldest.

Prints one JSON line per model and layer, then a table; ``--out`` also gets the results as JSON and one
Grad-CAM figure per model and layer (the report's figure, on PBC images).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.augment import build_policy, save_policy
from pipeline.config import NormalizeParams, parse_params
from pipeline.data import load_index
from pipeline.explain import Shown, feature_map_size, gradcam_maps, occlusion_drops, plot_gradcam_grid
from pipeline.imaging import ImageReadError, read_rgb, resize_square
from pipeline.inference import load_model
from pipeline.layout import IMAGES_FILE
from pipeline.models import WeightsError, cam_target_layer, get_backbone, resolve_weights
from pipeline.normalize import run_normalize
from pipeline.train import run_train

# Grad-CAM target layers before the occlusion check was introduced, by family: the last stride-32
# feature map (EfficientNet's taken before its activation); baseline-cnn's is unchanged.
OLD_LAYERS = {"baseline-cnn": "net.features", "resnet": "net.layer4", "efficientnet": "net._bn1",
              "efficientnet-lite": "net._bn1"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


def family(model_name: str) -> str:
    """The backbone family of a registered model name."""
    return get_backbone(model_name).family


def decodable(path: Path) -> bool:
    """Whether ``path`` decodes as an image (the dataset keeps a few files that do not)."""
    try:
        read_rgb(path)
    except ImageReadError:
        return False
    return True


def choose_files(root: Path, classes: list[str], per_class: int, val_per_class: int, test_per_class: int,
                 seed: int) -> pd.DataFrame:
    """A seeded subset of a folder-per-class dataset as a manifest: path (relative to ``root``), label, split."""
    rng = np.random.default_rng(seed)
    rows = []
    wanted = {"train": per_class, "val": val_per_class, "test": test_per_class}
    for label in classes:
        files = sorted(p for p in (root / label).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        picked = iter(files[i] for i in rng.permutation(len(files)))
        for split, count in wanted.items():
            taken = 0
            while taken < count:
                path = next(picked, None)
                if path is None:
                    raise ValueError(f"{root / label}: fewer than {sum(wanted.values())} decodable images")
                if decodable(path):
                    rows.append({"path": f"{label}/{path.name}", "label": label, "split": split,
                                 "group": f"{label}/{path.name}"})
                    taken += 1
    return pd.DataFrame(rows)


def pretrained_for(model_name: str, choice: str) -> str:
    """``imagenet`` or ``none``; ``auto`` uses ImageNet weights where they can be found (offline too)."""
    if choice != "auto":
        return choice
    weights = get_backbone(model_name).weights
    if weights is None:
        return "none"
    try:
        resolve_weights(get_backbone(model_name))
    except WeightsError:
        return "none"
    return "imagenet"


def train_model(name: str, args: argparse.Namespace, processed: Path, policy: Path, work: Path) -> tuple[Path, dict]:
    """Train ``name`` with the train stage; the saved model's path and a summary of the run."""
    pretrained = pretrained_for(name, args.pretrained)
    params = parse_params({
        "data": {"root": str(args.data)},
        "train": {"model": name, "pretrained": pretrained, "image_size": args.image_size, "epochs": args.epochs,
                  "freeze_epochs": 1 if pretrained == "imagenet" else 0, "batch_size": args.batch_size,
                  "seed": args.seed},
        "runtime": {"train_workers": args.workers},
        "tracking": {"experiment": "benchmark-gradcam-occlusion", "log_model": False},
    })
    started = time.perf_counter()
    result = run_train(params, processed, policy, work / name / "models", work / name / "reports", progress=False)
    return work / name / "models" / "model.pt", {
        "pretrained": pretrained, "epochs": args.epochs, "best_val_macro_f1": round(result["best_val_macro_f1"], 3),
        "train_seconds": round(time.perf_counter() - started, 1)}


def normalized(work: Path, root: Path, manifest: pd.DataFrame, params: NormalizeParams) -> Path:
    """The subset through the normalize stage (once per set of normalize params); its folder."""
    out = work / f"processed-{params.size}-{params.mode}"
    if not (out / IMAGES_FILE).is_file():
        manifest.to_csv(work / "subset.csv", index=False)
        run_normalize(work / "subset.csv", root, out, params, progress=False, workers=1)
    return out


def held_out_images(processed: Path, image_size: int) -> tuple[np.ndarray, list[str]]:
    """The test split's images as the network sees them (N x S x S x 3 uint8) and their labels: the
    normalize stage's rows resized to the model's input, as evaluation feeds them."""
    index = load_index(processed)
    test = index[index["split"] == "test"]
    stored = np.load(processed / IMAGES_FILE, mmap_mode="r")
    images = np.stack([resize_square(np.asarray(stored[row]), image_size) for row in test.index])
    return images, test["label"].tolist()


def measure(model: torch.nn.Module, model_name: str, layer: str, images: np.ndarray, predicted: np.ndarray,
            fraction: float) -> tuple[dict, np.ndarray]:
    """Occlusion figures of Grad-CAM at ``layer``, and the maps."""
    started = time.perf_counter()
    maps = gradcam_maps(model, model_name, images, predicted, layer=layer)
    hot, cold = occlusion_drops(model, images, maps, predicted, fraction)
    side = feature_map_size(model, layer, images.shape[1])
    return {
        "layer": layer.removeprefix("net."), "map": f"{side[0]}x{side[1]}",
        "hot_drop": round(float(hot.mean()), 3), "cold_drop": round(float(cold.mean()), 3),
        "hot_minus_cold": round(float((hot - cold).mean()), 3),
        "hot_beats_cold": round(float((hot > cold).mean()), 3),
        "gradcam_seconds": round(time.perf_counter() - started, 1),
    }, maps


def save_figure(path: Path, model_name: str, layer: str, map_size: tuple[int, int], images: np.ndarray,
                maps: np.ndarray, labels: list[str], classes: list[str], probs: np.ndarray, per_class: int) -> Path:
    """The report's Grad-CAM figure (rows: true class) for up to ``per_class`` images per class."""
    predicted = probs.argmax(axis=1)
    rows = []
    for name in classes:
        members = [i for i, label in enumerate(labels) if label == name][:per_class]
        items = [(Shown(images[i], name, classes[predicted[i]], float(probs[i, predicted[i]])), maps[i])
                 for i in members]
        if items:
            rows.append((name, items))
    return plot_gradcam_grid(rows, path, model_name=model_name, layer=layer, map_size=map_size)


def layers_to_compare(model_name: str, extra: dict[str, list[str]]) -> list[str]:
    """The old target layer, the registry's, and any asked for on the command line (no repeats)."""
    layers = [OLD_LAYERS[family(model_name)], cam_target_layer(model_name), *extra.get(model_name, [])]
    return list(dict.fromkeys(layers))


def evaluate_model(model_path: Path, args: argparse.Namespace, manifest: pd.DataFrame, extra: dict[str, list[str]],
                   summary: dict, work: Path) -> list[dict]:
    """Occlusion figures of one saved model at every layer compared (and the figures, with ``--out``)."""
    model, meta = load_model(model_path)
    images, labels = held_out_images(normalized(work, args.data, manifest, meta.normalize), meta.image_size)
    classes = list(meta.classes)
    with torch.no_grad():
        logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).float()
    probs = torch.softmax(logits, dim=1).numpy()
    predicted = probs.argmax(axis=1)
    accuracy = float(np.mean([classes[p] == label for p, label in zip(predicted, labels, strict=True)]))
    results = []
    for layer in layers_to_compare(meta.model, extra):
        figures, maps = measure(model, meta.model, layer, images, predicted, args.fraction)
        roles = [role for role, name in (("old", OLD_LAYERS[family(meta.model)]),
                                         ("new", cam_target_layer(meta.model))) if name == layer]
        row = {"model": meta.model, "image_size": meta.image_size, "source": str(model_path.name), **summary,
               "test_images": len(images), "test_accuracy": round(accuracy, 3),
               "target": " = ".join(roles) or "extra", **figures}
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            side = tuple(int(v) for v in figures["map"].split("x"))
            save_figure(args.out / f"gradcam-{meta.model}-{figures['layer']}.png", meta.model, layer, side, images,
                        maps, labels, classes, probs, args.figure_per_class)
    return results


def parse_layers(pairs: list[str]) -> dict[str, list[str]]:
    """``MODEL=MODULE`` pairs (module as ``named_modules()`` of the classifier spells it, e.g. net.layer3)."""
    extra: dict[str, list[str]] = {}
    for pair in pairs:
        name, sep, layer = pair.partition("=")
        if not sep or not layer:
            raise SystemExit(f"--layer {pair!r}: expected MODEL=MODULE, e.g. resnet18=net.layer3")
        extra.setdefault(name, []).append(layer if layer.startswith("net.") else f"net.{layer}")
    return extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="folder-per-class dataset, e.g. ../shared/data/pbc")
    parser.add_argument("--models", nargs="*", default=["baseline-cnn", "resnet18", "efficientnet-b0",
                                                        "efficientnet-lite0"], help="backbones to train")
    parser.add_argument("--model", type=Path, action="append", default=[],
                        help="a trained model.pt to check instead (repeatable); --models is then ignored")
    parser.add_argument("--layer", action="append", default=[], help="MODEL=MODULE: another layer to compare")
    parser.add_argument("--per-class", type=int, default=60, help="training images per class")
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--test-per-class", type=int, default=8, help="images per class that are occluded")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pretrained", choices=["auto", "imagenet", "none"], default="auto")
    parser.add_argument("--fraction", type=float, default=0.25, help="share of the pixels occluded")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="loader workers while training")
    parser.add_argument("--figure-per-class", type=int, default=2, help="images per class in each figure")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; more than one on a busy shared machine is far slower (spin-waits)")
    parser.add_argument("--out", type=Path, help="folder for results.json and the Grad-CAM figures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    extra = parse_layers(args.layer)

    base = parse_params({"data": {"root": str(args.data)}})
    manifest = choose_files(args.data, list(base.data.classes), args.per_class, args.val_per_class,
                            args.test_per_class, args.seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
        if args.model:
            for path in args.model:
                results += evaluate_model(path, args, manifest, extra, {}, work)
        else:
            processed = normalized(work, args.data, manifest, base.normalize)
            save_policy(build_policy(base.augment), work / "policy.json")
            for name in args.models:
                path, summary = train_model(name, args, processed, work / "policy.json", work)
                results += evaluate_model(path, args, manifest, extra, summary, work)

    columns = ["model", "pretrained", "best_val_macro_f1", "test_accuracy", "target", "layer", "map", "hot_drop",
               "cold_drop", "hot_beats_cold"]
    table = pd.DataFrame(results)
    print(table[[c for c in columns if c in table]].to_string(index=False))
    if args.out:
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
