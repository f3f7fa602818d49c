"""The synthetic sample: layout, determinism, that its classes differ by shape more than colour, and its sites."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline import sample
from pipeline.config import PBC_CLASSES, ParamsError, SampleParams, SiteStyle, parse_params
from pipeline.sample import generate_sample, render_image, site_root

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


# ---------------------------------------------------------------- sites

PRESETS = ("barcelona-like", "cellavision-like", "jiangxi-like", "tehran-like")


def _sites(*entries: object, size: int = 64, per_class: int = 4) -> SampleParams:
    return SampleParams(per_class=per_class, size=size, seed=1, sites=list(entries))


def _small_presets(size: int) -> list[SiteStyle]:
    """The presets at one small size, so that they differ only in stain, light, optics and framing."""
    return SampleParams(sites=[{"name": name, "size": size} for name in PRESETS]).sites


def _background_colour(image: np.ndarray) -> np.ndarray:
    """Mean colour of the brightest 30% of the pixels: the empty field."""
    rgb = image.reshape(-1, 3).astype(np.float64)
    total = rgb.sum(axis=1)
    return rgb[total >= np.quantile(total, 0.7)].mean(axis=0)


def _nucleus_colour(image: np.ndarray) -> np.ndarray:
    """Mean colour of the darkest 3% of the pixels: chromatin."""
    rgb = image.reshape(-1, 3).astype(np.float64)
    total = rgb.sum(axis=1)
    return rgb[total <= np.quantile(total, 0.03)].mean(axis=0)


def _nucleus_share(image: np.ndarray) -> float:
    """Share of the specimen stained like chromatin, whatever the site's colours.

    Every nuclear stain absorbs green most, so chromatin is where the green optical density
    (relative to the field) exceeds half of its top percentile; red cells stay below. Black
    padding is no specimen and is left out.
    """
    rgb = image.reshape(-1, 3)
    green = rgb[rgb.astype(np.int32).sum(axis=1) > 30, 1].astype(np.float64)
    density = -np.log(np.maximum(green, 1) / np.quantile(green, 0.85))
    return float((density > 0.5 * np.quantile(density, 0.99)).mean())


def test_default_images_are_unchanged_by_the_site_model() -> None:
    """Pixels of default images as the generator drew them before sites existed."""
    digest = hashlib.sha256()
    for name in ("basophil", "ig", "neutrophil", "platelet"):
        for index in range(2):
            digest.update(render_image(name, index, 128, 0).tobytes())
    assert digest.hexdigest() == "e119e820154751884613784fbbccdc3dcbc6188f7104d3a7aa284f2aa11063c9"


def test_each_site_gets_its_own_tree_and_manifest(tmp_path: Path) -> None:
    params = _sites("jiangxi-like", {"name": "lab-b", "size": 40, "per_class": 5, "classes": ["ig", "basophil"]})
    counts = generate_sample(tmp_path, params, classes=["basophil", "ig", "monocyte"])
    assert counts == {
        "jiangxi-like/basophil": 4, "jiangxi-like/ig": 4, "jiangxi-like/monocyte": 4,
        "lab-b/basophil": 5, "lab-b/ig": 5,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SAMPLE.json", "jiangxi-like", "lab-b"]
    assert sorted(p.name for p in (tmp_path / "lab-b").iterdir()) == ["SAMPLE.json", "basophil", "ig"]
    assert site_root(tmp_path, "lab-b") == tmp_path / "lab-b"
    for path in (tmp_path / "jiangxi-like").rglob("*.png"):
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (120, 120)  # the preset's size
    for path in (tmp_path / "lab-b").rglob("*.png"):
        with Image.open(path) as image:
            assert image.size == (40, 40)

    manifest = json.loads((tmp_path / "SAMPLE.json").read_text(encoding="utf-8"))
    assert manifest["synthetic"] is True and manifest["seed"] == 1
    assert [entry["site"] for entry in manifest["sites"]] == ["jiangxi-like", "lab-b"]
    site = json.loads((tmp_path / "jiangxi-like" / "SAMPLE.json").read_text(encoding="utf-8"))
    assert site == {"synthetic": True, "generator": "pipeline.sample", "seed": 1, **manifest["sites"][0]}
    assert site["preset"] == "jiangxi-like" and site["size"] == 120 and site["per_class"] == 4
    assert site["classes"] == ["basophil", "ig", "monocyte"]
    assert site["style"]["background"] == [255, 252, 166] and site["style"]["cell_scale"] == 2.2
    lab_b = json.loads((tmp_path / "lab-b" / "SAMPLE.json").read_text(encoding="utf-8"))
    assert lab_b["preset"] is None and lab_b["classes"] == ["basophil", "ig"]
    assert lab_b["style"] == SiteStyle(name="x").model_dump(
        mode="json", exclude={"name", "preset", "per_class", "size", "classes"}
    )


def test_sites_are_deterministic_and_independent_of_each_other(tmp_path: Path) -> None:
    both = _sites("tehran-like", {"name": "lab-b", "preset": "jiangxi-like"}, size=48)
    generate_sample(tmp_path / "a", both, classes=["eosinophil", "platelet"])
    generate_sample(tmp_path / "b", both, classes=["eosinophil", "platelet"])
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    alone = _sites({"name": "lab-b", "preset": "jiangxi-like"}, size=48)
    generate_sample(tmp_path / "c", alone, classes=["eosinophil", "platelet"])
    assert _files(tmp_path / "c" / "lab-b") == _files(tmp_path / "a" / "lab-b")


def test_a_site_draws_other_cells_than_the_default_and_other_sites() -> None:
    plain, other = SiteStyle(name="plain"), SiteStyle(name="other")
    default = render_image("monocyte", 0, 64)
    assert not np.array_equal(render_image("monocyte", 0, 64, site=plain), default)
    assert not np.array_equal(render_image("monocyte", 0, 64, site=plain), render_image("monocyte", 0, 64, site=other))


def test_a_site_without_preset_keeps_the_default_look() -> None:
    plain = SiteStyle(name="plain")
    default = np.mean([_background_colour(render_image("ig", i, 64)) for i in range(6)], axis=0)
    site = np.mean([_background_colour(render_image("ig", i, 64, site=plain)) for i in range(6)], axis=0)
    assert np.abs(default - site).max() < 6


def test_presets_differ_in_background_stain_and_framing() -> None:
    classes = [name for name in PBC_CLASSES if name != "platelet"]
    background, nucleus, share = {}, {}, {}
    for site in _small_presets(64):
        images = [render_image(name, index, 64, site=site) for name in classes for index in range(3)]
        background[site.name] = np.mean([_background_colour(image) for image in images], axis=0)
        nucleus[site.name] = np.mean([_nucleus_colour(image) for image in images], axis=0)
        share[site.name] = np.mean([_nucleus_share(image) for image in images])
    red, green, blue = background["barcelona-like"]
    assert red - blue > 30  # beige
    red, green, blue = background["jiangxi-like"]
    assert green - blue > 50  # yellow
    assert np.ptp(background["tehran-like"]) < 10  # white
    assert nucleus["tehran-like"].sum() > nucleus["barcelona-like"].sum() + 60  # paler chromatin
    assert nucleus["jiangxi-like"].sum() < nucleus["barcelona-like"].sum() - 40  # darker ...
    jiangxi_red, barcelona_red = (np.subtract(*nucleus[name][[0, 2]]) for name in ("jiangxi-like", "barcelona-like"))
    assert jiangxi_red > barcelona_red + 20  # ... and redder
    # Cells fill more of a tight crop: the nucleus covers several times the share of the image.
    assert share["jiangxi-like"] > 3 * share["barcelona-like"]
    assert share["cellavision-like"] > 1.4 * share["barcelona-like"]
    assert share["tehran-like"] > 1.3 * share["barcelona-like"]


def test_site_optics_and_camera_settings_are_live() -> None:
    def sharpness(image: np.ndarray) -> float:
        return float(cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())

    crisp, soft = SiteStyle(name="a", blur=0.0, noise=0.0), SiteStyle(name="a", blur=4.0, noise=0.0)
    assert sharpness(render_image("eosinophil", 0, 96, site=soft)) < 0.6 * sharpness(
        render_image("eosinophil", 0, 96, site=crisp)
    )
    padded = SiteStyle(name="a", edge_padding=1.0)
    for index in range(4):
        image = render_image("lymphocyte", index, 64, site=padded)
        edges = [image[:, 0], image[:, -1], image[0], image[-1]]
        assert any(not edge.any() for edge in edges)
    dim = SiteStyle(name="a", vignetting=0.5, noise=0.0)
    image = render_image("platelet", 0, 64, site=dim).astype(np.float64).sum(axis=2)
    assert image[:6, :6].mean() < 0.8 * image[29:35, 29:35].mean()
    lossy, lossless = SiteStyle(name="a", jpeg_quality=30), SiteStyle(name="a")
    assert not np.array_equal(render_image("ig", 0, 64, site=lossy), render_image("ig", 0, 64, site=lossless))


def test_classes_keep_their_morphology_in_every_site() -> None:
    """Nucleus area ranks the classes as in the default look, whatever the stain and framing."""
    for site in _small_presets(64):
        area = {
            name: np.mean([_nucleus_share(render_image(name, i, 64, site=site)) for i in range(6)])
            for name in ("basophil", "erythroblast", "lymphocyte", "neutrophil")
        }
        assert area["lymphocyte"] > area["neutrophil"], site.name
        assert area["basophil"] > area["neutrophil"], site.name
        assert area["erythroblast"] < area["lymphocyte"], site.name


def test_a_pixel_model_learns_each_site_but_does_not_transfer() -> None:
    """Trained on one site, a model of colour and grey levels is well above chance there and collapses elsewhere."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def features(image: np.ndarray) -> np.ndarray:
        hist = [np.histogram(image[..., c], bins=8, range=(0, 256))[0] / image[..., 0].size for c in range(3)]
        grey = cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (16, 16), interpolation=cv2.INTER_AREA)
        return np.concatenate([*hist, grey.ravel() / 255])

    per_class, data = 20, {}
    for site in _small_presets(48):
        x = [features(render_image(name, i, 48, site=site)) for name in PBC_CLASSES for i in range(per_class)]
        data[site.name] = (np.array(x), np.repeat(np.arange(len(PBC_CLASSES)), per_class))
    held_out = np.arange(len(PBC_CLASSES) * per_class) % 4 == 0
    for name, (x, y) in data.items():
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.3))
        model.fit(x[~held_out], y[~held_out])
        in_site = f1_score(y[held_out], model.predict(x[held_out]), average="macro")
        elsewhere = [
            f1_score(other_y, model.predict(other_x), average="macro")
            for other, (other_x, other_y) in data.items()
            if other != name
        ]
        assert in_site > 2.4 / len(PBC_CLASSES), name
        assert np.mean(elsewhere) < in_site - 0.1, name
        assert min(elsewhere) < 2 / len(PBC_CLASSES), name


def test_rerun_replaces_sites_and_keeps_foreign_files(tmp_path: Path) -> None:
    generate_sample(tmp_path, _sites("tehran-like", "lab-b", size=32), classes=["ig"])
    (tmp_path / "lab-b" / "notes.txt").write_text("mine", encoding="utf-8")
    generate_sample(tmp_path, _sites("lab-c", size=32), classes=["ig"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SAMPLE.json", "lab-b", "lab-c"]
    assert sorted(p.name for p in (tmp_path / "lab-b").iterdir()) == ["notes.txt"]
    generate_sample(tmp_path, SampleParams(per_class=4, size=32), classes=["ig"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SAMPLE.json", "ig", "lab-b"]
    assert "sites" not in json.loads((tmp_path / "SAMPLE.json").read_text(encoding="utf-8"))


def test_site_presets_and_overrides() -> None:
    by_name, overridden, plain = SampleParams(
        sites=["jiangxi-like", {"name": "lab-b", "preset": "jiangxi-like", "blur": 0.5}, "lab-c"]
    ).sites
    assert by_name.preset == "jiangxi-like" and by_name.background == (255, 252, 166) and by_name.size == 120
    assert overridden.blur == 0.5 and overridden.cell_scale == by_name.cell_scale
    assert plain.preset is None and (plain.size, plain.per_class) == (128, 100)  # the sample's
    assert plain == SiteStyle(name="lab-c", size=128, per_class=100)
    assert SampleParams().sites == []


@pytest.mark.parametrize(
    ("sites", "message"),
    [
        (["lab", "lab"], "sample.sites: .*site names must be unique, repeated: lab"),
        (["../up"], "sample.sites.0.name: .*folder's name"),
        (["Lab A"], "sample.sites.0.name: .*lower-case"),
        (["neutrophil"], "may not be named like a class folder: neutrophil"),
        ([{"name": "x", "preset": "paris-like"}], "unknown preset 'paris-like'; presets: barcelona-like"),
        ([{"name": "x", "blurr": 2}], "unknown key\\(s\\) blurr; allowed keys: name, preset"),
        ([{"name": "x", "cell_scale": 0}], "sample.sites.0.cell_scale: .*greater than or equal to 0.4"),
        ([{"name": "x", "background": [255, 255, 256]}], "sample.sites.0.background.2"),
        ([{"name": "x", "classes": ["blast"]}], "sample.sites.0.classes: .*blast"),
        ([{"name": "x", "size": 8}], "sample.sites.0.size"),
    ],
)
def test_bad_site_params_are_named(sites: list, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        parse_params({"sample": {"sites": sites}})


def test_site_class_outside_the_generated_classes_is_refused_before_writing(tmp_path: Path) -> None:
    params = _sites({"name": "lab-b", "classes": ["platelet", "ig"]})
    with pytest.raises(ValueError, match="sample.sites 'lab-b': class\\(es\\) platelet are not among") as error:
        generate_sample(tmp_path, params, classes=["ig", "monocyte"])
    assert "ig, monocyte" in str(error.value)
    assert not any(tmp_path.iterdir())


def test_cli_sample_writes_the_configured_sites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(
        "data: {classes: [lymphocyte, neutrophil]}\n"
        "sample: {per_class: 4, size: 32, sites: [{name: jiangxi-like, size: 48}, lab-b]}\n",
        encoding="utf-8",
    )
    assert main(["--params", str(params), "sample", "--out", str(tmp_path / "raw")]) == 0
    assert "16 images" in capsys.readouterr().out
    assert sorted(p.relative_to(tmp_path / "raw").as_posix() for p in (tmp_path / "raw").rglob("*.png"))[::4] == [
        "jiangxi-like/lymphocyte/lymphocyte_0000.png",
        "jiangxi-like/neutrophil/neutrophil_0000.png",
        "lab-b/lymphocyte/lymphocyte_0000.png",
        "lab-b/neutrophil/neutrophil_0000.png",
    ]
