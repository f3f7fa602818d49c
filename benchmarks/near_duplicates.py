"""Near-duplicate search: comparing all pairs (before) against the hash index (after), in seconds.

    python benchmarks/near_duplicates.py --pbc ../shared/data/pbc --sizes 100000 1000000

- PBC: the perceptual hashes ingest computes for every image of the folder (decoded once, then
  cached in ``--cache``, outside the repository);
- synthetic: uniformly random 256-bit hashes in which ``--near-fraction`` of the rows are rewritten
  as copies of other rows with a uniformly drawn number of bits flipped, from 0 to the threshold
  (so pairs at every distance, exact copies and chains of copies are all present).

"Before" is the all-pairs search ingest used (blocks of 256 rows against the rest, numpy). It is timed
in full up to ``--brute-max`` hashes; above that it is timed on the first ``--brute-sample`` rows and
scaled by the number of pairs (its cost is that of the pairs compared), and the table says so.
Wherever both ran in full, the pairs are compared and must be identical; elsewhere every pair found
is re-checked and every planted pair must be among them. Timings are wall-clock
seconds on one core (numpy is single-threaded here); the load average is printed because other work
on the machine slows both columns alike.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.config import IngestParams
from pipeline.hashindex import choose_parts, hamming_pairs
from pipeline.inspection import PHASH_BITS, inspect_all

Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]


def all_pairs(codes: np.ndarray, threshold: int, block: int = 256) -> Pairs:
    """Every pair within ``threshold`` bits by comparing all pairs: ingest's search before the index."""
    words = np.ascontiguousarray(codes).view(np.uint64)
    found = []
    for start in range(0, len(words), block):
        chunk = words[start : start + block, None, :] ^ words[None, start:, :]
        distances = np.bitwise_count(chunk).sum(axis=2, dtype=np.int32)
        rows, cols = np.nonzero(distances <= threshold)
        later = rows < cols
        rows, cols = rows[later], cols[later]
        found.append((start + rows, start + cols, distances[rows, cols]))
    return tuple(np.concatenate([f[k] for f in found]) for k in range(3)) if found else (np.empty(0),) * 3


def pbc_hashes(root: Path, cache: Path) -> np.ndarray:
    """The perceptual hash of every decodable image under ``root``, as ingest computes it (cached)."""
    if cache.exists():
        return np.load(cache)["hashes"]
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    found = inspect_all(files, IngestParams(), progress=False)
    hashes = np.frombuffer(b"".join(f.phash for f in found if f.phash), dtype=np.uint8).reshape(-1, PHASH_BITS // 8)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, hashes=hashes)
    return hashes


def synthetic_hashes(n: int, threshold: int, near_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random hashes, ``near_fraction`` of them near copies (0 to ``threshold`` bits off) of other rows.

    Also returns the planted (copy, source) row pairs; sources are never copies themselves.
    """
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, size=(n, PHASH_BITS // 8), dtype=np.uint8)
    copies = rng.choice(n, int(n * near_fraction), replace=False)
    originals = np.setdiff1d(np.arange(n), copies)
    sources = originals[rng.integers(0, len(originals), len(copies))]
    flips = rng.integers(0, threshold + 1, len(copies))
    # flip the ``flips`` bits of lowest random rank in each copy
    rank = np.argsort(np.argsort(rng.random((len(copies), PHASH_BITS)), axis=1), axis=1)
    mask = np.packbits(rank < flips[:, None], axis=1)
    codes[copies] = codes[sources] ^ mask
    return codes, np.stack([copies, sources], axis=1)


def timed(search: Callable[[], Pairs]) -> tuple[float, float, Pairs]:
    """Wall-clock and CPU seconds of ``search``, and its pairs."""
    start, cpu = time.perf_counter(), time.process_time()
    pairs = search()
    return time.perf_counter() - start, time.process_time() - cpu, pairs


def same(a: Pairs, b: Pairs) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def sound(codes: np.ndarray, found: Pairs, threshold: int, planted: np.ndarray) -> bool:
    """Every pair found is within ``threshold`` at the distance given, and every planted pair is found."""
    i, j, distance = found
    true = np.bitwise_count(codes[i] ^ codes[j]).sum(axis=1, dtype=np.int64)
    found_keys = set(zip(i.tolist(), j.tolist(), strict=True))
    low, high = planted.min(axis=1), planted.max(axis=1)
    return (
        bool((true == distance).all() and (true <= threshold).all())
        and (i < j).all()
        and all(pair in found_keys for pair in zip(low.tolist(), high.tolist(), strict=True))
    )


def measure(
    name: str, codes: np.ndarray, threshold: int, brute_max: int, brute_sample: int, planted: np.ndarray
) -> dict[str, str]:
    n = len(codes)
    after, after_cpu, found = timed(lambda: hamming_pairs(codes, threshold))
    if n <= brute_max:
        before, before_cpu, reference = timed(lambda: all_pairs(codes, threshold))
        before_text = f"{before:.2f} (cpu {before_cpu:.2f})"
        check = "identical" if same(found, reference) else "DIFFERENT"
    else:
        sample, sample_cpu, _ = timed(lambda: all_pairs(codes[:brute_sample], threshold))
        scale = (n * (n - 1)) / (brute_sample * (brute_sample - 1))
        before = sample * scale
        before_text = f"~{before:,.0f} (cpu ~{sample_cpu * scale:,.0f}; scaled from {brute_sample:,} rows)"
        check = (
            f"{len(planted):,} planted all found, distances right"
            if sound(codes, found, threshold, planted)
            else "WRONG"
        )
    return {
        "hashes": f"{n:,}",
        "data": name,
        "before: all pairs, s": before_text,
        "after: index, s": f"{after:.2f} (cpu {after_cpu:.2f})",
        "speed-up": f"{before / after:,.0f}x",
        "pairs": f"{len(found[0]):,}",
        "parts": str(choose_parts(len(np.unique(codes, axis=0)), threshold, PHASH_BITS)),
        "pairs vs all-pairs search": check,
    }


def print_table(rows: list[dict[str, str]]) -> None:
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row[c] for c in columns) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pbc", type=Path, default=Path("../shared/data/pbc"), help="PBC folder (skipped if absent)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wbc-bench" / "pbc-phash.npz")
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000], help="synthetic sizes")
    parser.add_argument("--threshold", type=int, default=IngestParams().near_dup_threshold)
    parser.add_argument("--near-fraction", type=float, default=0.01, help="share of rows that are near copies")
    parser.add_argument("--brute-max", type=int, default=100_000, help="largest n compared all-pairs in full")
    parser.add_argument("--brute-sample", type=int, default=20_000, help="rows timed all-pairs above --brute-max")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"threshold {args.threshold} of {PHASH_BITS} bits; load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    if args.pbc.is_dir():
        codes, none = pbc_hashes(args.pbc, args.cache), np.empty((0, 2), dtype=np.int64)
        rows.append(measure("PBC", codes, args.threshold, args.brute_max, args.brute_sample, none))
        print_table(rows)
    for n in args.sizes:
        codes, planted = synthetic_hashes(n, args.threshold, args.near_fraction, args.seed)
        name = f"random, {args.near_fraction:.0%} near copies"
        rows.append(measure(name, codes, args.threshold, args.brute_max, args.brute_sample, planted))
        print_table(rows[-1:])
    print(f"load average {os.getloadavg()[0]:.1f}")
    print_table(rows)


if __name__ == "__main__":
    main()
