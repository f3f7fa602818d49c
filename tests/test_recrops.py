"""Re-crops of one cell, shifted in the frame, are one group (ingest.recrop_threshold): a crop dataset
such as LISC (about 250 cells in 1,287 crops) would otherwise leak a cell across train and test."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import SHARED_DATA
from PIL import Image

from pipeline.config import IngestParams
from pipeline.inspection import canonical_phash, cell_phash, inspect_bytes
from pipeline.sample import render_image
from pipeline.sources import Candidate
from pipeline.splitting import Item, picture_groups

SHIFTS = [(0, 0), (20, 6), (6, 22), (18, 18), (10, 2)]  # where each 128 px crop starts in a 160 px field


def _recrops() -> list[Item]:
    """Five shifted crops of each of 12 generated cells (3 classes x 4 cells)."""
    params = IngestParams(near_dup_threshold=44, recrop_threshold=44)
    items = []
    for label in ("neutrophil", "lymphocyte", "monocyte"):
        for cell in range(4):
            field = render_image(label, cell, 160, seed=0)
            for k, (dx, dy) in enumerate(SHIFTS):
                buffer = io.BytesIO()
                Image.fromarray(field[dy:dy + 128, dx:dx + 128]).save(buffer, "PNG")
                items.append(Item(Candidate(f"{label}/{cell}-{k}.png", "", label),
                                  inspect_bytes(buffer.getvalue(), params)))
    return items


def _cells(group: list[Item]) -> set[str]:
    return {item.candidate.path.split("-")[0] for item in group}


def test_shifted_recrops_of_one_cell_are_grouped_and_other_cells_are_not():
    items = _recrops()
    assert all(item.found.cell_phash is not None for item in items)
    whole_only, _ = picture_groups(items, 44)
    assert len(whole_only) > 50  # a shift moves the whole-picture hash past the near-duplicate limit
    groups, near = picture_groups(items, 44, recrop_threshold=44)
    assert all(len(_cells(group)) == 1 for group in groups)  # never two cells in one group
    assert len(groups) <= 20 and len(near) >= 40  # 60 crops of 12 cells: most re-crops found


def test_off_by_default_and_none_where_no_cell_is_found():
    plain = inspect_bytes(_png(render_image("neutrophil", 0, 96)), IngestParams())
    assert plain.cell_phash is None
    assert cell_phash(Image.new("RGB", (64, 64), (240, 230, 225))) is None  # blank: no cell to centre on


def test_cell_hash_ignores_a_shift_the_whole_picture_hash_does_not():
    field = render_image("monocyte", 1, 160, seed=0)
    a, b = (Image.fromarray(field[y:y + 128, x:x + 128]) for x, y in ((0, 0), (24, 20)))
    assert _bits_apart(cell_phash(a), cell_phash(b)) < _bits_apart(canonical_phash(a), canonical_phash(b))


def _bits_apart(p: bytes, q: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(p, np.uint8) ^ np.frombuffer(q, np.uint8)).sum())


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "lisc").is_dir(), reason="../shared/data/lisc not present")
def test_lisc_recrops_fall_into_few_groups_of_one_class():
    files = sorted((SHARED_DATA / "lisc").glob("*/*.jpg"))
    params = IngestParams(near_dup_threshold=44, recrop_threshold=44)
    items = [Item(Candidate(str(f), str(f), f.parent.name), inspect_bytes(f.read_bytes(), params)) for f in files]
    whole_only, _ = picture_groups(items, 44)
    groups, _ = picture_groups(items, 44, recrop_threshold=44)
    print(f"LISC: {len(files)} crops, {len(whole_only)} groups by whole-picture hash, {len(groups)} with re-crops")
    assert len(groups) < 0.5 * len(whole_only)
    assert all(len({item.candidate.label for item in group}) == 1 for group in groups)
