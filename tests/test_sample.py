"""The synthetic sample: layout, determinism, and that its classes differ by shape more than colour."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import sample
from pipeline.config import PBC_CLASSES, SampleParams
from pipeline.sample import generate_sample, render_image

TINY = SampleParams(per_class=4, size=64, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _dark_purple_fraction(image: np.ndarray) -> float:
    """Share of pixels stained like chromatin or basophilic granules: dark and blue over green."""
    rgb = image.astype(np.int32)
    dark = rgb.sum(axis=2) < 400
    purple = rgb[..., 2] - rgb[..., 1] > 40
    return float((dark & purple).mean())


def test_layout_counts_and_manifest(tmp_path: Path) -> None:
    counts = generate_sample(tmp_path, TINY)
    assert counts == {name: 4 for name in PBC_CLASSES}
    for name in PBC_CLASSES:
        names = sorted(p.name for p in (tmp_path / name).iterdir())
        assert names == [f"{name}_{i:04d}.png" for i in range(4)]
    manifest = json.loads((tmp_path / "SAMPLE.json").read_text(encoding="utf-8"))
    assert manifest == {
        "synthetic": True,
        "generator": "pipeline.sample",
        "seed": 3,
        "per_class": 4,
        "size": 64,
        "classes": list(PBC_CLASSES),
    }


def test_images_are_rgb_of_the_requested_size(tmp_path: Path) -> None:
    generate_sample(tmp_path, SampleParams(per_class=4, size=48), classes=["monocyte", "platelet"])
    for path in tmp_path.rglob("*.png"):
        with Image.open(path) as image:
            assert image.mode == "RGB"
            assert image.size == (48, 48)


def test_same_params_give_identical_bytes(tmp_path: Path) -> None:
    generate_sample(tmp_path / "a", TINY)
    generate_sample(tmp_path / "b", TINY)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_other_seed_gives_other_images() -> None:
    assert not np.array_equal(render_image("ig", 0, 64, seed=0), render_image("ig", 0, 64, seed=1))


def test_more_per_class_keeps_the_first_images(tmp_path: Path) -> None:
    generate_sample(tmp_path / "small", TINY, classes=["eosinophil", "lymphocyte"])
    bigger = SampleParams(per_class=6, size=TINY.size, seed=TINY.seed)
    generate_sample(tmp_path / "big", bigger, classes=["eosinophil", "lymphocyte"])
    small, big = _files(tmp_path / "small"), _files(tmp_path / "big")
    images = [key for key in small if key.endswith(".png")]
    assert len(images) == 8
    assert all(small[key] == big[key] for key in images)


def test_rerun_replaces_its_own_files_and_keeps_others(tmp_path: Path) -> None:
    generate_sample(tmp_path, SampleParams(per_class=6, size=32))
    (tmp_path / "basophil" / "notes.txt").write_text("mine", encoding="utf-8")
    counts = generate_sample(tmp_path, SampleParams(per_class=4, size=32), classes=["basophil", "ig"])
    assert counts == {"basophil": 4, "ig": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SAMPLE.json", "basophil", "ig"]
    assert len(list((tmp_path / "ig").iterdir())) == 4
    assert (tmp_path / "basophil" / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert len(list((tmp_path / "basophil").glob("*.png"))) == 4


def test_unknown_class_is_refused_with_the_supported_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="blast") as error:
        generate_sample(tmp_path, TINY, classes=["neutrophil", "blast"])
    assert all(name in str(error.value) for name in PBC_CLASSES)
    assert not any(tmp_path.iterdir())


def test_difficulty_knob_is_live(monkeypatch: pytest.MonkeyPatch) -> None:
    before = render_image("neutrophil", 0, 64)
    monkeypatch.setitem(sample.DIFFICULTY, "noise_sd", (0.0, 0.0))
    assert not np.array_equal(before, render_image("neutrophil", 0, 64))


def test_classes_differ_in_nucleus_area() -> None:
    area = {
        name: np.mean([_dark_purple_fraction(render_image(name, i, 64)) for i in range(6)])
        for name in PBC_CLASSES
    }
    assert area["lymphocyte"] > area["neutrophil"]
    assert area["erythroblast"] < area["lymphocyte"]
    assert area["basophil"] > area["neutrophil"]
    assert min(area, key=area.get) == "platelet"


def test_colour_alone_does_not_separate_the_classes() -> None:
    """A colour-histogram classifier must fall clearly short: shape has to matter."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels = [], []
    for label, name in enumerate(PBC_CLASSES):
        for index in range(30):
            image = render_image(name, index, 64)
            hist = [np.histogram(image[..., c], bins=8, range=(0, 256))[0] for c in range(3)]
            features.append(np.concatenate(hist) / image[..., 0].size)
            labels.append(label)
    x_train, x_test, y_train, y_test = train_test_split(
        np.array(features), np.array(labels), test_size=0.3, stratify=labels, random_state=0
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_train, y_train)
    score = f1_score(y_test, model.predict(x_test), average="macro")
    assert score < 0.95
    assert score > 1.5 / len(PBC_CLASSES)  # stains still carry some signal, as in real smears
