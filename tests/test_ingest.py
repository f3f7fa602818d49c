"""Ingest: every odd or broken file is reported with its own reason, splits are sound and stable."""

from __future__ import annotations

import csv
import html
import io
import json
import os
import re
import shutil
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import NormalizeParams, ParamsError, parse_params
from pipeline.imaging import read_rgb
from pipeline.ingest import run_ingest
from pipeline.inspection import inspect_file
from pipeline.normalize import run_normalize
from pipeline.sources import IngestError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CLASSES = ["lymphocyte", "monocyte", "neutrophil"]


def _noise(seed: int, size: tuple[int, int] = (24, 20)) -> np.ndarray:
    """A distinct RGB picture (height, width) for each seed."""
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _encode(array: np.ndarray | Image.Image, fmt: str, **options) -> bytes:
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _bomb_png() -> bytes:
    """A 69-byte PNG whose header claims 50000 x 50000 pixels."""
    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _exif_rotated_jpeg(array: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display after a 90 degree clockwise turn
    return _encode(array, "JPEG", exif=exif, quality=95)


def _params(root: Path, workers: int = 1, **ingest) -> object:
    return parse_params({"data": {"root": str(root), "classes": CLASSES}, "ingest": ingest,
                         "runtime": {"ingest_workers": workers}})


def _ingest(root: Path, tmp_path: Path, **ingest) -> tuple[dict, list[dict], dict[str, tuple[str, str]]]:
    summary = run_ingest(_params(root, **ingest), tmp_path / "interim", tmp_path / "reports", progress=False)
    with (tmp_path / "interim" / "manifest.csv").open(newline="") as handle:
        manifest = list(csv.DictReader(handle))
    with (tmp_path / "interim" / "rejected.csv").open(newline="") as handle:
        rejected = {row["path"]: (row["reason"], row["detail"]) for row in csv.DictReader(handle)}
    return summary, manifest, rejected


def _good_tree(root: Path, per_class: int = 5, start: int = 0) -> list[str]:
    """``per_class`` distinct PNGs per class; returns their relative paths."""
    paths = []
    for c, cls in enumerate(CLASSES):
        for i in range(start, start + per_class):
            rel = f"{cls}/{cls}_{i:04d}.png"
            _write(root / rel, _encode(_noise(10_000 + 1000 * c + i), "PNG"))
            paths.append(rel)
    return paths


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str], dict[str, str]]:
    """A tree full of odd and broken files: (root, paths that must be kept, path -> expected reason)."""
    root = tmp_path_factory.mktemp("corpus") / "raw"
    good = set(_good_tree(root))
    jpeg = _encode(_noise(1), "JPEG")
    png = _encode(_noise(2), "PNG")
    big_jpeg = _encode(_noise(22, (200, 200)), "JPEG")
    rgba = np.dstack([_noise(3), np.full((24, 20), 128, np.uint8)])
    odd = {
        "neutrophil/grayscale.png": _encode(_noise(4)[..., 0], "PNG"),
        "neutrophil/rgba.png": _encode(rgba, "PNG"),
        "neutrophil/palette.png": _encode(Image.fromarray(_noise(5)).convert("P"), "PNG"),
        "neutrophil/sixteen_bit.png": _encode(Image.fromarray(np.full((24, 20), 40000, np.uint16)), "PNG"),
        "neutrophil/exif_rotated.jpg": _exif_rotated_jpeg(_noise(6, (20, 30))),
        "neutrophil/cmyk.jpg": _encode(Image.fromarray(_noise(7)).convert("CMYK"), "JPEG"),
        "neutrophil/scan.tif": _encode(_noise(8), "TIFF"),
        "neutrophil/scan.bmp": _encode(_noise(9), "BMP"),
        "neutrophil/UPPER.JPG": _encode(_noise(10), "JPEG"),
        "neutrophil/png_named.jpg": _encode(_noise(11), "PNG"),
        "neutrophil/no_extension": _encode(_noise(12), "JPEG"),
        "neutrophil/nested/deeper.png": _encode(_noise(13), "PNG"),
        "Monocyte/capital_folder.png": _encode(_noise(14), "PNG"),
        "neutrophil/copy_a.png": _encode(_noise(15), "PNG"),
        "neutrophil/copy_b.png": _encode(_noise(15), "PNG"),
    }
    bad = {
        "neutrophil/empty.jpg": (b"", "empty-file"),
        "neutrophil/truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "neutrophil/truncated.png": (png[: len(png) // 2], "truncated"),
        "neutrophil/cut_in_scan.jpg": (big_jpeg[: len(big_jpeg) * 4 // 5], "truncated"),
        "neutrophil/corrupt.png": (png[:200] + bytes([png[200] ^ 0xFF]) + png[201:], "corrupt"),
        "neutrophil/text.jpg": (b"cell counts: 12, 14, 9\n", "not-an-image"),
        "neutrophil/page.png": (b"<!DOCTYPE html><html><body>404</body></html>", "not-an-image"),
        "neutrophil/.DS_Store": (b"\0\0\0\1Bud1\0\0\x10\0", "not-an-image"),
        "neutrophil/bomb.png": (_bomb_png(), "decompression-bomb"),
        "neutrophil/tiny.png": (_encode(_noise(16, (4, 4)), "PNG"), "too-small"),
        "neutrophil/animation.gif": (_encode(_noise(17), "GIF"), "unsupported-format"),
        "smudge/cell.png": (_encode(_noise(18), "PNG"), "unknown-class"),
        "stray.png": (_encode(_noise(19), "PNG"), "not-in-class-folder"),
        "neutrophil/cross_copy.png": (_encode(_noise(20), "PNG"), "duplicate-conflict"),
        "lymphocyte/cross_copy.png": (_encode(_noise(20), "PNG"), "duplicate-conflict"),
    }
    for rel, data in odd.items():
        _write(root / rel, data)
    for rel, (data, _) in bad.items():
        _write(root / rel, data)
    (root / "neutrophil" / "dangling.png").symlink_to(root / "nowhere.png")
    expected = {rel: reason for rel, (_, reason) in bad.items()}
    expected["neutrophil/dangling.png"] = "unreadable"
    locked = _write(root / "neutrophil" / "locked.png", _encode(_noise(21), "PNG"))
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # running as root: permissions do not stop reads
        locked.unlink()
    else:
        expected["neutrophil/locked.png"] = "unreadable"
    return root, good | set(odd), expected


@pytest.mark.parametrize("workers", [1, 2])
def test_every_bad_file_is_rejected_with_its_reason(corpus, tmp_path, workers):
    root, keep, expected = corpus
    summary, manifest, rejected = _ingest(root, tmp_path, workers=workers)
    assert {path: reason for path, (reason, _) in rejected.items()} == expected
    assert {row["path"] for row in manifest} == keep
    assert summary["n_files"] == len(keep) + len(expected)
    assert summary["n_kept"] == len(keep) and summary["n_rejected"] == len(expected)
    assert summary["synthetic"] is False
    assert "lymphocyte/cross_copy.png" in rejected["neutrophil/cross_copy.png"][1]
    assert "data.classes" in rejected["smudge/cell.png"][1]
    assert "HTML" in rejected["neutrophil/page.png"][1]


def test_manifest_columns_sizes_and_groups(corpus, tmp_path):
    root, _, _ = corpus
    summary, manifest, _ = _ingest(root, tmp_path)
    assert list(manifest[0])[:9] == ["path", "site", "label", "sha256", "width", "height", "bytes", "split", "group"]
    assert [row["path"] for row in manifest] == sorted(row["path"] for row in manifest)
    rows = {row["path"]: row for row in manifest}
    rotated = rows["neutrophil/exif_rotated.jpg"]
    assert (rotated["width"], rotated["height"]) == ("20", "30")  # as displayed, EXIF applied
    assert rows["Monocyte/capital_folder.png"]["label"] == "monocyte"
    assert rows["neutrophil/nested/deeper.png"]["label"] == "neutrophil"
    assert rows["neutrophil/png_named.jpg"]["format"] == "PNG"
    a, b = rows["neutrophil/copy_a.png"], rows["neutrophil/copy_b.png"]
    assert a["sha256"] == b["sha256"] and a["group"] == b["group"] and a["split"] == b["split"]
    assert int(rows["neutrophil/UPPER.JPG"]["bytes"]) == (root / "neutrophil/UPPER.JPG").stat().st_size
    assert sum(sum(per_class.values()) for per_class in summary["counts"].values()) == len(manifest)
    report = (tmp_path / "reports" / "ingest.md").read_text()
    for text in ("decompression-bomb", "duplicate-conflict", "neutrophil/copy_a.png", "Imbalance ratio"):
        assert text in report


def test_odd_images_decode_to_rgb(corpus):
    root, _, _ = corpus
    gray = read_rgb(root / "neutrophil/grayscale.png")
    assert (
        gray.shape == (24, 20, 3)
        and (gray[..., 0] == gray[..., 1]).all()
        and (gray[..., 1] == gray[..., 2]).all()
    )
    deep = read_rgb(root / "neutrophil/sixteen_bit.png")
    assert deep.dtype == np.uint8 and abs(int(deep[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1
    rotated = read_rgb(root / "neutrophil/exif_rotated.jpg")
    assert rotated.shape == (30, 20, 3)
    original = _noise(6, (20, 30)).astype(int)
    turned = np.rot90(original, k=-1)  # orientation 6 = turn 90 degrees clockwise
    assert (
        np.abs(rotated.astype(int) - turned).mean() < np.abs(rotated.astype(int) - turned[::-1, ::-1]).mean()
    )
    rgba = read_rgb(root / "neutrophil/rgba.png")
    expected = np.round(_noise(3) * (128 / 255) + 255 * (1 - 128 / 255))
    assert np.abs(rgba.astype(int) - expected).max() <= 2  # composited over white
    for name in ("palette.png", "cmyk.jpg", "scan.tif", "scan.bmp", "no_extension"):
        assert read_rgb(root / "neutrophil" / name).shape == (24, 20, 3)


def test_splits_are_deterministic_and_follow_the_seed(tmp_path):
    root = tmp_path / "raw"
    _good_tree(root, per_class=30)
    first = _ingest(root, tmp_path / "a")[1]
    second = _ingest(root, tmp_path / "b")[1]
    other_seed = _ingest(root, tmp_path / "c", seed=7)[1]
    assert first == second
    assert [r["split"] for r in first] != [r["split"] for r in other_seed]


def test_adding_files_never_moves_existing_images(tmp_path):
    root = tmp_path / "raw"
    _good_tree(root, per_class=30)
    before = {row["path"]: row["split"] for row in _ingest(root, tmp_path / "a")[1]}
    _good_tree(root, per_class=20, start=30)
    after = {row["path"]: row["split"] for row in _ingest(root, tmp_path / "b")[1]}
    assert len(after) == len(before) + 60
    assert all(after[path] == split for path, split in before.items())


@pytest.mark.parametrize("method", ["hash", "quota"])
def test_splits_are_stratified(tmp_path, method):
    root = tmp_path / "raw"
    _good_tree(root, per_class=100)
    summary = _ingest(root, tmp_path, split_method=method, val_fraction=0.2, test_fraction=0.2)[0]
    tolerance = 0.1 if method == "hash" else 0.011
    for cls in CLASSES:
        for split in ("val", "test"):
            assert abs(summary["counts"][split][cls] / 100 - 0.2) <= tolerance, (cls, split)


def test_a_tiny_class_still_gets_every_split(tmp_path):
    root = tmp_path / "raw"
    _good_tree(root, per_class=3)
    summary = _ingest(root, tmp_path)[0]
    assert all(summary["counts"][split][cls] == 1 for split in ("train", "val", "test") for cls in CLASSES)


def test_too_few_images_names_the_class_and_minimum(tmp_path):
    root = tmp_path / "raw"
    _good_tree(root, per_class=4)
    for path in sorted((root / "monocyte").iterdir())[2:]:
        path.unlink()
    shutil.copy(root / "monocyte" / "monocyte_0000.png", root / "monocyte" / "copy.png")
    with pytest.raises(IngestError, match=r"monocyte: 3 usable image\(s\) in 2 group") as error:
        _ingest(root, tmp_path)
    assert "at least 3" in str(error.value)


def test_missing_root_names_the_path_and_param(tmp_path):
    with pytest.raises(IngestError, match=r"data\.root .*nowhere.* does not exist"):
        _ingest(tmp_path / "nowhere", tmp_path)


def test_synthetic_flag_comes_from_sample_json(tmp_path):
    root = tmp_path / "raw"
    _good_tree(root, per_class=3)
    (root / "SAMPLE.json").write_text(json.dumps({"synthetic": True}))
    summary, _, rejected = _ingest(root, tmp_path)
    assert summary["synthetic"] is True and not rejected
    assert set(summary) >= {"root", "classes", "n_files", "n_kept", "n_rejected", "counts", "data_hash"}


def test_near_duplicates_join_a_group_or_are_quarantined(tmp_path):
    root = tmp_path / "raw"
    _good_tree(root, per_class=4)
    smooth = np.asarray(Image.fromarray(_noise(99, (8, 8))).resize((64, 64), Image.BICUBIC))
    smaller = np.asarray(Image.fromarray(smooth[:, ::-1]).resize((50, 50), Image.BILINEAR))
    _write(root / "neutrophil/original.png", _encode(smooth, "PNG"))
    _write(root / "neutrophil/flipped_smaller.jpg", _encode(smaller, "JPEG", quality=80))
    _write(root / "monocyte/other.png", _encode(_noise(98, (64, 64)), "PNG"))
    _write(root / "monocyte/other_turned.png", _encode(np.rot90(_noise(98, (64, 64))), "PNG"))
    _write(root / "lymphocyte/turned.png", _encode(np.rot90(smooth), "PNG"))
    _, manifest, rejected = _ingest(root, tmp_path)
    assert {path: reason for path, (reason, _) in rejected.items()} == {
        "lymphocyte/turned.png": "near-duplicate-conflict",
        "neutrophil/flipped_smaller.jpg": "near-duplicate-conflict",
        "neutrophil/original.png": "near-duplicate-conflict",
    }
    rows = {row["path"]: row for row in manifest}
    assert rows["monocyte/other.png"]["group"] == rows["monocyte/other_turned.png"]["group"]
    assert rows["monocyte/other.png"]["split"] == rows["monocyte/other_turned.png"]["split"]
    assert len({row["group"] for row in manifest}) == len(manifest) - 1
    _, manifest, rejected = _ingest(root, tmp_path / "off", near_dup_threshold=0)
    assert not rejected and len(manifest) == 17


def test_label_map_aliases_and_exclusions(tmp_path):
    root = tmp_path / "raw"
    _good_tree(root, per_class=3)
    _write(root / "SNE/a.png", _encode(_noise(50), "PNG"))
    _write(root / "neutrophils/b.png", _encode(_noise(51), "PNG"))
    _write(root / "platelet/c.png", _encode(_noise(52), "PNG"))
    params = parse_params(
        {
            "data": {
                "root": str(root),
                "classes": CLASSES,
                "label_map": {"sne": "neutrophil", "platelet": None},
            },
            "runtime": {"ingest_workers": 1},
        }
    )
    summary = run_ingest(params, tmp_path / "interim", tmp_path / "reports", progress=False)
    assert sum(summary["counts"][split]["neutrophil"] for split in ("train", "val", "test")) == 5
    assert summary["rejected_by_reason"] == {"excluded-class": 1}


def test_table_source_with_codes_and_crlf(tmp_path):
    root = tmp_path / "raw"
    for n in range(1, 11):
        _write(root / "Set A" / f"{n:03d}.bmp", _encode(_noise(200 + n), "BMP"))
    rows = ["image ID,class label", *(f"{n},{1 + n % 3}" for n in range(1, 10)), "12,1", "13,", "14,9"]
    _write(root / "Labels A.csv", ("\r\n".join(rows) + "\r\n").encode())
    params = parse_params(
        {
            "data": {
                "root": str(root),
                "classes": CLASSES,
                "source": "table",
                "tables": [{"file": "Labels A.csv", "images": "Set A", "path_pattern": "{id:03d}.bmp"}],
                "label_map": {"1": "neutrophil", "2": "lymphocyte", "3": "monocyte"},
            },
            "runtime": {"ingest_workers": 1},
        }
    )
    summary = run_ingest(params, tmp_path / "interim", tmp_path / "reports", progress=False)
    with (tmp_path / "interim" / "rejected.csv").open(newline="") as handle:
        rejected = {row["path"]: row["reason"] for row in csv.DictReader(handle)}
    assert rejected == {
        "Set A/010.bmp": "unlabelled",
        "Set A/012.bmp": "missing-file",
        "Set A/013.bmp": "missing-file",
        "Set A/014.bmp": "missing-file",
    }
    assert summary["n_kept"] == 9
    assert summary["counts"]["test"]["neutrophil"] + summary["counts"]["val"]["neutrophil"] >= 2


def test_bad_params_are_refused():
    with pytest.raises(ParamsError, match="label_map"):
        parse_params({"data": {"classes": CLASSES, "label_map": {"SNE": "granulocyte"}}})
    with pytest.raises(ParamsError, match="tables"):
        parse_params({"data": {"source": "table"}})


@pytest.mark.shared_data
def test_a_pbc_subset_ingests_cleanly(tmp_path):
    pbc = SHARED_DATA / "pbc"
    if not pbc.is_dir():
        pytest.skip("../shared/data/pbc is absent")
    root = tmp_path / "raw"
    classes = sorted(p.name for p in pbc.iterdir() if p.is_dir())
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for source in sorted((pbc / cls).iterdir())[:10]:
            (root / cls / source.name).symlink_to(source)
    params = parse_params({"data": {"root": str(root), "classes": classes}, "runtime": {"ingest_workers": 2}})
    summary = run_ingest(params, tmp_path / "interim", tmp_path / "reports", progress=False)
    assert summary["n_files"] == 10 * len(classes)
    assert summary["n_kept"] + summary["n_rejected"] == summary["n_files"]
    assert all(summary["counts"][split][cls] >= 1 for split in ("train", "val", "test") for cls in classes)
    # ... and the kept images normalize to 380x380 RGB, one row per manifest entry.
    normalized = run_normalize(tmp_path / "interim" / "manifest.csv", root, tmp_path / "processed",
                               NormalizeParams(size=380), progress=False, workers=2)
    images = np.load(tmp_path / "processed" / "images.npy", mmap_mode="r")
    assert normalized["images"] == summary["n_kept"] == images.shape[0]
    assert images.shape[1:] == (380, 380, 3)
    assert 50 < float(images[0].mean()) < 250  # a real cell picture, not padding or zeros


WBC_SEG_DATA = {
    "classes": ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"],
    "source": "table",
    "tables": [
        {"file": f"Class Labels of Dataset {n}.csv", "images": f"Dataset {n}", "path_pattern": "{id:03d}.bmp"}
        for n in (1, 2)
    ],
    "label_map": {"1": "neutrophil", "2": "lymphocyte", "3": "monocyte", "4": "eosinophil", "5": "basophil"},
}


@pytest.mark.shared_data
def test_wbc_seg_label_tables_ingest_by_params_alone(tmp_path):
    root = SHARED_DATA / "wbc-seg"
    if not root.is_dir():
        pytest.skip("../shared/data/wbc-seg is absent")
    params = parse_params({"data": {"root": str(root), **WBC_SEG_DATA}, "runtime": {"ingest_workers": 2}})
    summary = run_ingest(params, tmp_path / "interim", tmp_path / "reports", progress=False)
    assert summary["n_files"] == 400
    assert summary["n_kept"] + summary["n_rejected"] == 400
    total = {
        cls: sum(summary["counts"][s][cls] for s in ("train", "val", "test")) for cls in summary["classes"]
    }
    assert total["neutrophil"] > total["basophil"] >= 3


def _table_tree(root: Path, outside: Path) -> list[str]:
    """Images under ``root/imgs`` named by ``root/labels.csv``, plus rows that lead outside ``root``."""
    rows = ["path,label"]
    for c, cls in enumerate(CLASSES):
        for i in range(5):
            _write(root / "imgs" / f"{cls}_{i}.png", _encode(_noise(700 + 10 * c + i), "PNG"))
            rows.append(f"{cls}_{i}.png,{cls}")
    _write(root / "imgs" / "inside.png", _encode(_noise(790), "PNG"))
    (root / "imgs" / "sub").mkdir()
    for n in range(3):
        _write(outside / f"secret_{n}.png", _encode(_noise(800 + n), "PNG"))
    (root / "imgs" / "link.png").symlink_to(outside / "secret_2.png")
    rows += ["sub/../inside.png,neutrophil", "../../outside/secret_0.png,neutrophil",
             f"{outside / 'secret_1.png'},lymphocyte", "link.png,monocyte"]
    _write(root / "labels.csv", ("\n".join(rows) + "\n").encode())
    return rows


def _table_params(root: Path, **data) -> object:
    return parse_params({"data": {"root": str(root), "classes": CLASSES, "source": "table",
                                  "tables": [{"file": "labels.csv", "images": "imgs"}], **data},
                         "runtime": {"ingest_workers": 1}})


def test_label_table_paths_leading_outside_the_root_are_rejected(tmp_path):
    root, outside = tmp_path / "raw", tmp_path / "outside"
    _table_tree(root, outside)
    run_ingest(_table_params(root), tmp_path / "interim", tmp_path / "reports", progress=False)
    with (tmp_path / "interim" / "rejected.csv").open(newline="") as handle:
        rejected = {row["path"]: (row["reason"], row["detail"]) for row in csv.DictReader(handle)}
    assert {path: reason for path, (reason, _) in rejected.items()} == {
        "../outside/secret_0.png": "outside-root", "../outside/secret_1.png": "outside-root",
        "imgs/link.png": "outside-root"}
    assert "symlink" in rejected["imgs/link.png"][1] and "labels.csv line" in rejected["imgs/link.png"][1]
    assert all("data.allow_outside_root" in detail for _, detail in rejected.values())
    with (tmp_path / "interim" / "manifest.csv").open(newline="") as handle:
        kept = {row["path"] for row in csv.DictReader(handle)}
    assert "imgs/inside.png" in kept and not any("secret" in path or "link" in path for path in kept)


def test_a_param_lets_label_tables_reach_outside_the_root(tmp_path):
    root, outside = tmp_path / "raw", tmp_path / "outside"
    _table_tree(root, outside)
    summary = run_ingest(_table_params(root, allow_outside_root=True), tmp_path / "interim", tmp_path / "reports",
                         progress=False)
    assert summary["n_rejected"] == 0 and summary["n_kept"] == 3 * 5 + 4


def test_files_over_the_size_cap_are_rejected_from_their_size(tmp_path):
    root = tmp_path / "raw"
    _good_tree(root)
    with (root / "neutrophil" / "huge.png").open("wb") as handle:
        handle.truncate(5_000_000)  # sparse
    _, manifest, rejected = _ingest(root, tmp_path, max_file_bytes=1_000_000)
    reason, detail = rejected["neutrophil/huge.png"]
    assert reason == "too-large" and "5,000,000 bytes > ingest.max_file_bytes (1,000,000)" in detail
    assert len(manifest) == 15


def test_a_named_pipe_is_rejected_without_waiting_for_a_writer(tmp_path):
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(inspect_file, str(pipe), parse_params({}).ingest)
        try:
            found = future.result(timeout=20)
        finally:
            if not future.done():  # a reader blocked in open(): let it go so the test can end
                with open(pipe, "wb"):
                    pass
    assert found.reason == "not-a-file"


def test_ingest_report_escapes_names_from_the_data(tmp_path):
    markdown_it = pytest.importorskip("markdown_it")
    root = tmp_path / "raw"
    _good_tree(root)
    weird_folder = "<b>x|y$z$"
    weird_file = "neutrophil/a|b`c<i>d</i>$e$*f*.png"
    _write(root / weird_folder / "cell.png", _encode(_noise(900), "PNG"))
    _write(root / weird_file, b"not an image")
    _write(root / "neutrophil" / "new\nline.png", b"not an image either")
    _ingest(root, tmp_path)
    text = (tmp_path / "reports" / "ingest.md").read_text(encoding="utf-8")
    page = markdown_it.MarkdownIt("commonmark").enable("table").render(text)
    assert "<b>" not in page and "<i>" not in page
    for shown in (f"{weird_folder}/cell.png", weird_file, "neutrophil/new\\x0aline.png", f"folder '{weird_folder}'"):
        assert html.escape(shown, quote=False) in page, shown
    rows = re.findall(r"<tr>(.*?)</tr>", page, flags=re.S)
    rejected_rows = [row for row in rows if "not-an-image" in row or "unknown-class" in row]
    assert rejected_rows and all(row.count("<td>") == 3 for row in rejected_rows if "<code>" in row)
    outside_code = re.sub(r"(`+).*?\1", "", text)
    assert not re.search(r"(?<!\\)\$", outside_code), "a '$' the Markdown viewer may read as maths"
