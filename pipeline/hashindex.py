"""Every pair of binary hashes within a Hamming radius, found without comparing all pairs.

Multi-index hashing with the generalised pigeonhole principle: the bits are split into ``m``
disjoint parts and part ``k`` gets a radius ``t_k`` with ``sum(t_k + 1) = threshold + 1``. Two
hashes within ``threshold`` bits then differ in at most ``t_k`` bits of at least one part ``k``
(were every part over its radius, they would differ in at least ``threshold + 1`` bits). Each part
sorts the codes by their part key into buckets and, for every bit pattern ``f`` of up to ``t_k``
ones, pairs each code whose key is ``u`` with the bucket ``u ^ f`` (a table lookup).

The ring version of the principle (the cycle lemma applied to ``t_k + 1 - d_k``, ``d_k`` being the
pair's distance on part ``k``) says more: some part ``k`` has ``d_k <= t_k`` *and*
``d_k + d_(k+1) <= t_k + t_(k+1) + 1``, the parts taken in a ring. Part ``k`` lists only the pairs
passing both, which one look-up of the next part's keys decides; that drops all but a few in a
thousand candidates of random hashes before the true distance is computed. The survivors are
checked on all bits, so nothing is missed and nothing false is kept, and a pair is kept only by
the first part that lists it, so none is reported twice.

Radius 44 of 256 bits (17 %) is hard for this family: parts must be long enough that a bucket holds
few codes (about log2 n bits) yet short enough that the bit patterns to try stay few. The number
of parts is chosen per call from a cost model of both (``estimated_seconds``), calibrated on random
hashes; identical hashes are merged first, so repeated pictures cost nothing extra. Work is done in
blocks of at most ``PROBE_BATCH`` look-ups and ``BLOCK_PAIRS`` candidate pairs, so memory grows with
``n`` and the number of pairs found, not with the number of candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import combinations
from math import ceil, comb

import numpy as np

BLOCK_PAIRS = 1 << 20
"""Candidate pairs checked at a time: bounds the working memory (tens of MB)."""
PROBE_BATCH = 1 << 21
"""Bucket look-ups made in one numpy call."""

_MAX_KEY_BITS = 64  # part keys are uint64
_DENSE_KEY_BITS = 24  # up to here a part finds buckets through tables of 2**bits entries (80 MB at most)

# Seconds per unit of work, measured with numpy on one core of a 2-core development machine on a
# million random hashes (smaller sets run faster per unit: fewer cache misses); only their ratios
# matter, to choose the number of parts.
_SECONDS_PER_SORTED_KEY = 4e-7  # building one part: packing, sorting and bucketing one hash
_SECONDS_PER_TABLE_PROBE = 5e-9  # one code's key looked up under one bit pattern, dense table
_SECONDS_PER_SEARCH_PROBE = 1e-7  # the same through a binary search (parts too long for a table)
_SECONDS_PER_PATTERN = 2e-7  # fixed cost of one bit pattern
_SECONDS_PER_CANDIDATE = 4.5e-8  # listing one candidate pair and checking its next part


@dataclass(frozen=True)
class Part:
    """Bit positions (MSB-first within each byte) whose key must lie within ``radius`` of another's."""

    bits: tuple[int, ...]
    radius: int


def hamming_pairs(
    codes: np.ndarray, threshold: int, parts: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) arrays of every i < j whose codes differ in at most ``threshold`` bits.

    ``codes`` is an (n, bytes) uint8 array, one packed hash per row. Pairs come sorted by (i, j).
    ``parts`` forces the number of parts of the index (default: the cheapest by
    :func:`estimated_seconds`); any value gives the same pairs.
    """
    codes = _checked_codes(codes, threshold)
    n, nbits = len(codes), codes.shape[1] * 8
    empty = np.empty(0, dtype=np.int64)
    if n < 2:
        return empty, empty, empty.astype(np.int32)
    order, starts, counts = _runs(_sorted_rows(codes), codes)
    unique = codes[order[starts]]
    m = choose_parts(len(unique), threshold, nbits) if parts is None else parts
    layout = plan_parts(unique, threshold, m)
    found = list(_unique_pairs(unique, layout, threshold))
    u = np.concatenate([f[0] for f in found]) if found else empty
    v = np.concatenate([f[1] for f in found]) if found else empty
    d = np.concatenate([f[2] for f in found]) if found else empty.astype(np.int32)
    i, j, dist = _expand_to_copies(order, starts, counts, u, v, d)
    sort = np.lexsort((j, i))
    return i[sort], j[sort], dist[sort]


def choose_parts(n: int, threshold: int, nbits: int) -> int:
    """The number of parts whose index :func:`estimated_seconds` says is cheapest for ``n`` random hashes."""
    fewest = ceil(nbits / _MAX_KEY_BITS)
    most = max(fewest, min(nbits, threshold + 1))
    return min(range(fewest, most + 1), key=lambda m: estimated_seconds(n, _shape(m, threshold, nbits)))


def estimated_seconds(n: int, shape: list[tuple[int, int]]) -> float:
    """Modelled time of a self-join of ``n`` uniformly random hashes with parts of (length, radius)."""
    total = 0.0
    for length, radius in shape:
        if radius < 0:
            continue
        reach = _ball(length, radius)
        probe = _SECONDS_PER_TABLE_PROBE if length <= _DENSE_KEY_BITS else _SECONDS_PER_SEARCH_PROBE
        total += n * _SECONDS_PER_SORTED_KEY
        total += (reach - 1) * (_SECONDS_PER_PATTERN + n / 2 * probe)
        total += n * (n - 1) / 2 * reach / 2**length * _SECONDS_PER_CANDIDATE
    return total


def plan_parts(codes: np.ndarray, threshold: int, m: int) -> list[Part]:
    """``m`` disjoint parts covering every bit, with radii summing (each plus one) to ``threshold + 1``.

    Bits are dealt to parts so that each part gets a similar share of the bits' entropy on
    ``codes``: a part made of nearly constant bits would put most hashes in one bucket.
    """
    nbits = codes.shape[1] * 8
    if not 1 <= m <= nbits:
        raise ValueError(f"parts must be between 1 and {nbits} for {nbits}-bit hashes, got {m}")
    fewest = ceil(nbits / _MAX_KEY_BITS)
    if m < fewest:
        raise ValueError(f"{m} parts of {nbits} bits exceed {_MAX_KEY_BITS}-bit keys; use {fewest} or more")
    shape = _shape(m, threshold, nbits)
    dealt: list[list[int]] = [[] for _ in range(m)]
    for rank, bit in enumerate(_bits_by_entropy(codes)):
        lap, seat = divmod(rank, m)
        dealt[seat if lap % 2 == 0 else m - 1 - seat].append(bit)
    dealt.sort(key=len, reverse=True)  # the longer parts take the larger radii, as _shape assigns them
    return [Part(tuple(sorted(bits)), radius) for bits, (_, radius) in zip(dealt, shape, strict=True)]


def _shape(m: int, threshold: int, nbits: int) -> list[tuple[int, int]]:
    """(length, radius) of ``m`` parts: lengths as even as can be, radii with sum(radius + 1) = threshold + 1."""
    base, longer = divmod(nbits, m)
    lengths = [base + 1] * longer + [base] * (m - longer)
    share, wider = divmod(threshold + 1, m)
    radii = [share] * wider + [share - 1] * (m - wider)
    return list(zip(lengths, radii, strict=True))


def _ball(length: int, radius: int) -> int:
    """Number of bit patterns of ``length`` bits with at most ``radius`` ones."""
    return sum(comb(length, k) for k in range(min(radius, length) + 1))


def _checked_codes(codes: np.ndarray, threshold: int) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype != np.uint8:
        raise ValueError(f"hashes must be an (n, bytes) uint8 array, got {codes.dtype} of shape {codes.shape}")
    if threshold < 0:
        raise ValueError(f"the distance threshold must be 0 or more bits, got {threshold}")
    return np.ascontiguousarray(codes)


def _words(codes: np.ndarray) -> np.ndarray:
    """The codes as (words, n) uint64, zero-padded: one contiguous row per word for fast gathers."""
    padded = np.zeros((len(codes), -(-codes.shape[1] // 8) * 8), dtype=np.uint8)
    padded[:, : codes.shape[1]] = codes
    return np.ascontiguousarray(padded.view(np.uint64).T)


def _sorted_rows(codes: np.ndarray) -> np.ndarray:
    """Row order that sorts the codes (equal codes adjacent, in increasing row number)."""
    words = _words(codes)
    return np.lexsort(words[::-1])


def _runs(order: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``order`` and the start and length of each run of equal keys (rows) along it."""
    ranked = keys[order]
    changed = ranked[1:] != ranked[:-1]
    if changed.ndim == 2:
        changed = changed.any(axis=1)
    starts = np.flatnonzero(np.concatenate(([True], changed)))
    counts = np.diff(np.append(starts, len(order)))
    return order, starts, counts


def _bits_by_entropy(codes: np.ndarray, sample: int = 100_000) -> np.ndarray:
    """Bit positions from the most to the least evenly split on (an evenly spaced sample of) ``codes``."""
    step = max(1, len(codes) // sample)
    p = np.unpackbits(codes[::step], axis=1).mean(axis=0)
    return np.argsort(np.abs(p - 0.5), kind="stable")


def _part_keys(codes: np.ndarray, part: Part) -> np.ndarray:
    """Each code's bits at ``part.bits`` packed into a uint64 key."""
    keys = np.zeros(len(codes), dtype=np.uint64)
    for place, bit in enumerate(part.bits):
        byte, shift = divmod(bit, 8)
        keys |= ((codes[:, byte] >> (7 - shift)) & 1).astype(np.uint64) << np.uint64(place)
    return keys


def _bit_mask(nwords: int, bits: tuple[int, ...]) -> np.ndarray:
    """(words,) uint64 mask selecting ``bits`` of a code laid out as :func:`_words` lays it out."""
    flags = np.zeros(nwords * 64, dtype=np.uint8)
    flags[list(bits)] = 1
    return np.packbits(flags).view(np.uint64)


def _unique_pairs(
    codes: np.ndarray, layout: list[Part], threshold: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Blocks of (i, j, distance) over distinct codes, each qualifying pair once, i < j."""
    words = _words(codes)
    masks = [_bit_mask(len(words), part.bits) for part in layout]
    for k, part in enumerate(layout):
        if part.radius < 0:
            continue
        following = layout[(k + 1) % len(layout)]
        keys = _part_keys(codes, part)
        order = np.argsort(keys, kind="stable")
        # the next part's keys in this part's key order: one side of each candidate is read in sequence
        next_keys = _compact(_part_keys(codes, following)[order])
        slack = part.radius + following.radius + 1
        for p, q, weight in _candidates(keys[order], part.radius):
            ring = np.bitwise_count(next_keys[p] ^ next_keys[q]) <= slack - weight
            x, y = order[p[ring]], order[q[ring]]
            distance = _distances(words, x, y)
            near = distance <= threshold
            if not near.any():
                continue
            x, y, distance = x[near], y[near], distance[near]
            first = _first_listed(words, masks, layout, x, y) == k
            yield np.minimum(x, y)[first], np.maximum(x, y)[first], distance[first]


def _compact(keys: np.ndarray) -> np.ndarray:
    """``keys`` as uint32 when they fit: half the memory read per look-up."""
    return keys.astype(np.uint32) if len(keys) and int(keys.max()) < 1 << 32 else keys


def _first_listed(
    words: np.ndarray, masks: list[np.ndarray], layout: list[Part], x: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """For each pair (x, y), the first part whose filters it passes (len(layout) where none)."""
    part_distances = [_distances(words, x, y, mask) for mask in masks]
    first = np.full(len(x), len(layout))
    for k in reversed(range(len(layout))):
        following = (k + 1) % len(layout)
        passes = (part_distances[k] <= layout[k].radius) & (
            part_distances[k] + part_distances[following] <= layout[k].radius + layout[following].radius + 1
        )
        first[passes] = k
    return first


def _distances(words: np.ndarray, x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Hamming distance between codes ``x`` and ``y`` (over the bits in ``mask`` when given)."""
    total = np.zeros(len(x), dtype=np.int32)
    for w, row in enumerate(words):
        diff = row[x] ^ row[y]
        if mask is not None:
            diff &= mask[w]
        total += np.bitwise_count(diff)
    return total


def _candidates(keys: np.ndarray, radius: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Blocks of position pairs (p, q) whose sorted ``keys`` differ in at most ``radius`` bits, with that distance.

    Each unordered pair comes once.
    """
    _, starts, counts = _runs(np.arange(len(keys)), keys)
    crowded = np.flatnonzero(counts > 1)
    for p, q, _ in _range_pairs(starts[crowded], counts[crowded], starts[crowded], counts[crowded], same=True):
        yield p, q, 0
    if radius == 0 or len(starts) < 2:
        return
    length = int(keys[-1]).bit_length()
    if length <= _DENSE_KEY_BITS:
        keys = keys.astype(np.int64)  # signed keys index numpy arrays without a conversion
    find = _bucket_finder(keys[starts], starts, counts, length)
    for top in range(length):
        # a pair of buckets (u, u ^ f) is listed once: from the u whose bit at f's highest one is clear
        low = np.flatnonzero((keys >> top) & 1 == 0)
        if not len(low):
            continue
        probes = keys[low]
        for weight in range(1, min(radius, top + 1) + 1):
            patterns = _patterns(top, weight, keys.dtype)
            per_batch = max(1, PROBE_BATCH // len(low))  # many patterns per numpy call
            for first in range(0, len(patterns), per_batch):
                hits, found = find((patterns[first : first + per_batch, None] ^ probes[None, :]).ravel())
                p = low[hits % len(low)]
                alone = found >= 0  # most buckets of a sparse index hold one code
                yield p[alone], found[alone], weight
                if not alone.all():
                    shared = ~alone
                    bucket = ~found[shared]
                    ones = np.ones(len(bucket), dtype=counts.dtype)
                    for a, b, _ in _range_pairs(p[shared], ones, starts[bucket], counts[bucket], same=False):
                        yield a, b, weight


def _patterns(top: int, weight: int, dtype: np.dtype) -> np.ndarray:
    """Bit patterns of ``weight`` ones, the highest of them bit ``top``."""
    return np.array([sum(1 << b for b in rest) | 1 << top for rest in combinations(range(top), weight - 1)], dtype)


def _bucket_finder(
    buckets: np.ndarray, starts: np.ndarray, counts: np.ndarray, length: int
) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A function from keys to the indices of those in ``buckets`` and, for each, where its bucket starts
    when it holds one code, or ~(the bucket's index) when it holds several."""
    marks = np.where(counts == 1, starts, ~np.arange(len(buckets)))
    if length <= _DENSE_KEY_BITS:
        # most look-ups miss: a one-byte-per-key table stays in cache where a table of positions would not
        occupied = np.zeros(1 << length, dtype=bool)
        occupied[buckets] = True
        where = np.zeros(1 << length, dtype=np.int32)
        where[buckets] = marks

        def look_up(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            hits = np.flatnonzero(occupied[keys])
            return hits, where[keys[hits]]

        return look_up

    def search(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        at = np.minimum(np.searchsorted(buckets, keys), len(buckets) - 1)
        hits = np.flatnonzero(buckets[at] == keys)
        return hits, marks[at[hits]]

    return search


def _spans(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``arange(start, start + count)`` for each range, concatenated."""
    offsets = np.cumsum(counts) - counts
    return np.arange(int(counts.sum())) + np.repeat(starts - offsets, counts)


def _range_pairs(
    left_start: np.ndarray, left_count: np.ndarray, right_start: np.ndarray, right_count: np.ndarray, same: bool
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Blocks of about ``BLOCK_PAIRS`` (a, b, k): a in the k-th left range of positions, b in its right one.

    With ``same`` the two ranges are one and only a < b is kept (each pair once).
    """
    several = np.arange(len(left_start))
    if not same:
        single = (left_count == 1) & (right_count == 1)  # most ranges in a sparse index: no expansion needed
        alone = np.flatnonzero(single)
        for lo in range(0, len(alone), BLOCK_PAIRS):
            k = alone[lo : lo + BLOCK_PAIRS]
            yield left_start[k], right_start[k], k
        several = np.flatnonzero(~single)
    if not len(several):
        return
    owner = np.repeat(several, left_count[several])
    a = _spans(left_start[several], left_count[several])
    if same:
        b_start = a + 1
        b_count = left_start[owner] + left_count[owner] - b_start
    else:
        b_start, b_count = right_start[owner], right_count[owner]
    ends = np.cumsum(b_count)
    cuts = np.searchsorted(ends, np.arange(BLOCK_PAIRS, int(ends[-1]), BLOCK_PAIRS), side="right")
    for lo, hi in zip(np.concatenate(([0], cuts)), np.append(cuts, len(a)), strict=True):
        if lo < hi:
            count = b_count[lo:hi]
            yield np.repeat(a[lo:hi], count), _spans(b_start[lo:hi], count), np.repeat(owner[lo:hi], count)


def _expand_to_copies(
    order: np.ndarray,
    starts: np.ndarray,
    counts: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    d: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of distinct codes turned into pairs of rows (every copy of each), plus copies of one code at 0."""
    crowded = np.flatnonzero(counts > 1)
    copies = _range_pairs(starts[crowded], counts[crowded], starts[crowded], counts[crowded], same=True)
    blocks = [(order[a], order[b], np.zeros(len(a), dtype=np.int32)) for a, b, _ in copies]
    near = _range_pairs(starts[u], counts[u], starts[v], counts[v], same=False)
    blocks += [(order[a], order[b], d[k]) for a, b, k in near]
    if not blocks:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty.astype(np.int32)
    a = np.concatenate([block[0] for block in blocks]).astype(np.int64)
    b = np.concatenate([block[1] for block in blocks]).astype(np.int64)
    return np.minimum(a, b), np.maximum(a, b), np.concatenate([block[2] for block in blocks])
