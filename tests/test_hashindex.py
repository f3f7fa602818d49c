"""The hash index finds exactly the pairs that comparing every pair finds: none missed, none extra."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import hashindex
from pipeline.hashindex import choose_parts, hamming_pairs, plan_parts


def all_pairs(codes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference: every pair compared bit by bit."""
    bits = np.unpackbits(codes, axis=1).astype(bool)
    distance = (bits[:, None, :] != bits[None, :, :]).sum(axis=2)
    i, j = np.nonzero(np.triu(distance <= threshold, k=1))
    return i, j, distance[i, j]


def flipped(code: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``code`` with exactly ``count`` of its bits flipped."""
    bits = np.unpackbits(code)
    bits[rng.choice(bits.size, count, replace=False)] ^= 1
    return np.packbits(bits)


def planted(n: int, nbytes: int, distances: list[int], seed: int) -> np.ndarray:
    """Random codes, the first ones rewritten as copies of later ones at each of ``distances``."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    for k, count in enumerate(distances):
        codes[k] = flipped(codes[rng.integers(len(distances), n)], count, rng)
    return codes


def assert_same_pairs(codes: np.ndarray, threshold: int, parts: int | None = None) -> int:
    expected = all_pairs(codes, threshold)
    found = hamming_pairs(codes, threshold, parts)
    for name, want, got in zip(("i", "j", "distance"), expected, found, strict=True):
        np.testing.assert_array_equal(got, want, err_msg=f"{name} differs (threshold {threshold}, parts {parts})")
    return len(expected[0])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0, 1, 7, 20, 44])
def test_same_pairs_as_comparing_every_pair(seed, threshold):
    # neighbours at every distance up to just past the threshold, some chained through one source
    codes = planted(400, 32, list(range(0, 50)) * 2, seed)
    assert_same_pairs(codes, threshold)


@pytest.mark.parametrize("seed", range(3))
def test_any_number_of_parts_gives_the_same_pairs(seed):
    codes = planted(300, 32, list(range(0, 48)), seed)
    found = [assert_same_pairs(codes, 44, parts) for parts in (9, 11, 12, 15, 23, 45)]
    assert found[0] >= 40  # the planted neighbours within 44 bits (plus any chained ones)


def test_a_pair_exactly_at_the_threshold_is_kept_and_one_bit_further_is_not():
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, size=(3, 32), dtype=np.uint8)
    codes = np.stack([base[0], flipped(base[0], 44, rng), base[1], flipped(base[1], 45, rng), base[2]])
    i, j, distance = hamming_pairs(codes, 44)
    assert list(zip(i.tolist(), j.tolist(), distance.tolist(), strict=True)) == [(0, 1, 44)]


def test_copies_pair_with_each_other_and_with_every_copy_of_a_neighbour():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, size=(60, 32), dtype=np.uint8)
    codes[[5, 17, 40]] = codes[2]  # four copies of one code
    codes[[9, 33]] = flipped(codes[2], 30, rng)  # two copies of a neighbour
    i, j, distance = hamming_pairs(codes, 44)
    copies, neighbours = {2, 5, 17, 40}, {9, 33}
    group = copies | neighbours
    expected = sorted(
        (a, b, 0 if {a, b} <= copies or {a, b} <= neighbours else 30) for a in group for b in group if a < b
    )
    assert list(zip(i.tolist(), j.tolist(), distance.tolist(), strict=True)) == expected
    assert_same_pairs(codes, 44)


def test_threshold_zero_finds_only_identical_codes():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(50, 32), dtype=np.uint8)
    codes[10] = codes[3]
    codes[11] = flipped(codes[3], 1, rng)
    i, j, distance = hamming_pairs(codes, 0)
    assert (i.tolist(), j.tolist(), distance.tolist()) == ([3], [10], [0])


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_codes_have_no_pairs(n):
    codes = np.zeros((n, 32), dtype=np.uint8)
    assert all(len(a) == 0 for a in hamming_pairs(codes, 44))


def test_every_code_identical():
    codes = np.full((30, 32), 7, dtype=np.uint8)
    i, j, distance = hamming_pairs(codes, 44)
    assert len(i) == 30 * 29 // 2 and not distance.any()
    assert (i < j).all()


@pytest.mark.parametrize("nbytes, threshold", [(8, 10), (5, 6), (16, 30), (2, 16)])
def test_codes_of_other_lengths(nbytes, threshold):
    # (2, 16): a threshold of every bit pairs everything
    codes = planted(300, nbytes, list(range(min(threshold + 3, nbytes * 8) + 1)), seed=nbytes)
    assert assert_same_pairs(codes, threshold) >= threshold


def test_crowded_buckets_split_into_small_blocks(monkeypatch):
    # codes that differ only in their last 3 bytes put hundreds of codes in one bucket of most parts
    monkeypatch.setattr(hashindex, "BLOCK_PAIRS", 97)
    monkeypatch.setattr(hashindex, "PROBE_BATCH", 50)
    rng = np.random.default_rng(5)
    codes = np.tile(rng.integers(0, 256, size=32, dtype=np.uint8), (250, 1))
    codes[:, -3:] = rng.integers(0, 256, size=(250, 3), dtype=np.uint8)
    codes[200:] = rng.integers(0, 256, size=(50, 32), dtype=np.uint8)
    assert assert_same_pairs(codes, 12) > 1000
    assert_same_pairs(codes, 44, parts=12)


@pytest.mark.parametrize("threshold", [0, 5, 44, 100])
@pytest.mark.parametrize("n", [2, 1000, 100_000, 1_000_000])
def test_parts_cover_every_bit_once_with_radii_adding_up_to_the_threshold(threshold, n):
    codes = planted(64, 32, [3, 9], seed=1)
    parts = plan_parts(codes, threshold, choose_parts(n, threshold, 256))
    bits = sorted(b for part in parts for b in part.bits)
    assert bits == list(range(256))
    assert sum(part.radius + 1 for part in parts) == threshold + 1
    assert all(len(part.bits) <= 64 for part in parts)


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="threshold must be 0 or more"):
        hamming_pairs(np.zeros((3, 32), dtype=np.uint8), -1)
    with pytest.raises(ValueError, match=r"\(n, bytes\) uint8 array"):
        hamming_pairs(np.zeros((3, 4), dtype=np.int64), 4)
    with pytest.raises(ValueError, match="exceed 64-bit keys"):
        hamming_pairs(np.zeros((3, 32), dtype=np.uint8), 4, parts=2)
