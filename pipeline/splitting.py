"""Grouping copies of one picture and splitting whole groups into train, val and test.

Byte-identical files, near-identical looks (:func:`near_duplicate_pairs` on perceptual hashes)
and rows sharing a table's group column form groups; a group whose copies disagree on the label
is rejected whole, and every other group goes to one split, stratified by class.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.config import IngestParams
from pipeline.hashindex import hamming_pairs
from pipeline.inspection import Inspection
from pipeline.layout import HOLDOUT, SPLITS
from pipeline.sources import Candidate, IngestError, Rejection


def _components(n: int, links: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components (union-find) of ``n`` nodes joined by ``links``, each sorted."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in links:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        members[find(i)].append(i)
    return list(members.values())


def _shared_key_links(keys: list[Iterable[str]]) -> Iterator[tuple[int, int]]:
    """Links joining each node to the first node that had the same (non-empty) key."""
    first: dict[str, int] = {}
    for i, node_keys in enumerate(keys):
        for key in node_keys:
            if key:
                yield first.setdefault(key, i), i


def near_duplicate_pairs(
    hashes: list[bytes], threshold: int, block: int = 256
) -> Iterator[tuple[int, int, int]]:
    """(i, j, distance) for every i < j whose hashes differ in at most ``threshold`` bits, in (i, j) order.

    Found with a multi-index hash table (:func:`pipeline.hashindex.hamming_pairs`), exactly the pairs
    that comparing all pairs finds, without comparing all pairs: under a second for 12,800 hashes
    instead of 8, minutes rather than hours for a million. ``block`` is no longer used.
    """
    codes = np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(len(hashes), len(hashes[0]) if hashes else 0)
    i, j, distance = hamming_pairs(codes, threshold)
    yield from zip(i.tolist(), j.tolist(), distance.tolist(), strict=True)


@dataclass(eq=False)
class Item:
    """A decoded, labelled file on its way into the manifest."""

    candidate: Candidate
    found: Inspection
    group: str = ""
    split: str = ""


def picture_groups(
    items: list[Item], threshold: int, recrop_threshold: int = 0
) -> tuple[list[list[Item]], list[tuple[Item, Item, int]]]:
    """Items showing the same picture: identical bytes or, when ``threshold`` > 0, near-identical looks,
    or, when ``recrop_threshold`` > 0, the same cell re-cropped (hashes of the cell centred on its nucleus).

    Returns the groups and the near-duplicate links (item, item, hash distance) between different files.
    """
    links = list(_shared_key_links([(item.found.sha256,) for item in items]))
    near, linked = [], set()
    for limit, field in ((threshold, "phash"), (recrop_threshold, "cell_phash")):
        if not limit:
            continue
        hashed = [k for k, item in enumerate(items) if getattr(item.found, field) is not None]
        for i, j, distance in near_duplicate_pairs([getattr(items[k].found, field) for k in hashed], limit):
            a, b = items[hashed[i]], items[hashed[j]]
            if a.found.sha256 != b.found.sha256 and (hashed[i], hashed[j]) not in linked:
                linked.add((hashed[i], hashed[j]))
                links.append((hashed[i], hashed[j]))
                near.append((a, b, distance))
    groups = [[items[i] for i in members] for members in _components(len(items), links)]
    return groups, near


def quarantine_conflicts(groups: list[list[Item]]) -> tuple[list[Item], list[Rejection]]:
    """Reject every copy of a picture that carries more than one label; keep the rest."""
    kept, rejections = [], []
    for members in groups:
        labels = sorted({item.candidate.label for item in members})
        if len(labels) == 1:
            kept += members
            continue
        exact = len({item.found.sha256 for item in members}) == 1
        reason = "duplicate-conflict" if exact else "near-duplicate-conflict"
        listing = "; ".join(f"{item.candidate.path} ({item.candidate.label})" for item in members)
        detail = (
            f"{'identical' if exact else 'near-identical'} files labelled {' vs '.join(labels)}: {listing}"
        )
        rejections += [Rejection(item.candidate.path, reason, detail) for item in members]
    return kept, rejections


def split_groups(items: list[Item], pictures: list[list[Item]]) -> list[list[Item]]:
    """Groups that must share a split: one picture's copies, plus rows sharing a table group value.

    Sets each item's ``group`` name: the table group value when there is one, else the first 16
    hex digits of the smallest checksum in the group (stable while the group keeps its members).
    """
    picture_of = {id(item): n for n, members in enumerate(pictures) for item in members}
    keys = [(f"picture:{picture_of[id(item)]}", item.candidate.group) for item in items]
    groups = [[items[i] for i in members] for members in _components(len(items), _shared_key_links(keys))]
    for members in groups:
        tabled = sorted(item.candidate.group for item in members if item.candidate.group)
        name = tabled[0] if tabled else min(item.found.sha256 for item in members)[:16]
        for item in members:
            item.group = name
    return groups


def _unit_hash(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by the seed and the group name alone."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _split_by_hash(ordered: list[list[Item]], params: IngestParams) -> list[str]:
    """Each group's split from where its hash falls: test below test_fraction, then val."""
    test_end = params.test_fraction
    val_end = params.test_fraction + params.val_fraction
    return [
        "test" if u < test_end else "val" if u < val_end else "train"
        for u in (_unit_hash(params.seed, members[0].group) for members in ordered)
    ]


def _split_by_quota(ordered: list[list[Item]], params: IngestParams) -> list[str]:
    """Fill test then val, in hash order, up to their share of images; the rest is train.

    Every split gets at least one group (the caller made sure there are three).
    """
    total = sum(len(members) for members in ordered)
    splits, index = [], 0
    for split, fraction, later in (("test", params.test_fraction, 2), ("val", params.val_fraction, 1)):
        target, taken = max(1, round(total * fraction)), 0
        while index < len(ordered) - later and (taken == 0 or taken + len(ordered[index]) / 2 <= target):
            taken += len(ordered[index])
            splits.append(split)
            index += 1
    return splits + ["train"] * (len(ordered) - index)


def _stratum(members: list[Item]) -> tuple[str, str]:
    """The site and class a group is stratified under: its most common (site, label); ties
    alphabetical."""
    counts = Counter((item.candidate.site, item.candidate.label) for item in members)
    return min(counts, key=lambda key: (-counts[key], key))


def assign_splits(groups: list[list[Item]], classes: list[str], params: IngestParams) -> None:
    """Set each item's split: stratified by class within site, whole groups, fixed by seed and
    group names. Every image of a site in ``params.holdout_sites`` (and every copy of one) goes
    to the ``holdout`` split, never to train or val.

    With ``split_method: hash`` a group's split depends only on its own name, so adding files
    never moves an existing image; a stratum whose hash split would leave a split empty (a very
    small class of one site) is split by quota instead.
    """
    held_out = set(params.holdout_sites)
    training = []
    for members in groups:
        if any(item.candidate.site in held_out for item in members):
            for item in members:
                item.split = HOLDOUT
        else:
            training.append(members)
    _check_enough(training, classes, params)
    by_stratum: dict[tuple[str, str], list[list[Item]]] = defaultdict(list)
    for members in training:
        by_stratum[_stratum(members)].append(members)
    for members_list in by_stratum.values():
        ordered = sorted(members_list, key=lambda members: _unit_hash(params.seed, members[0].group))
        splits = _split_by_hash(ordered, params) if params.split_method == "hash" else []
        if set(splits) != set(SPLITS) and len(ordered) >= len(SPLITS):
            splits = _split_by_quota(ordered, params)
        for members, split in zip(ordered, splits, strict=True):
            for item in members:
                item.split = split


def _check_enough(groups: list[list[Item]], classes: list[str], params: IngestParams) -> None:
    n_groups: Counter[str] = Counter()
    n_images: Counter[str] = Counter()
    for members in groups:
        labels = Counter(item.candidate.label for item in members)
        n_groups.update(labels.keys())
        n_images.update(labels)
    problems = [
        f"  {cls}: {n_images[cls]} usable image(s)"
        + (f" in {n_groups[cls]} group(s) of copies" if n_groups[cls] != n_images[cls] else "")
        for cls in classes
        if n_groups[cls] < len(SPLITS)
    ]
    if problems:
        raise IngestError(
            "too few images to split into train, val and test "
            f"(ingest.val_fraction={params.val_fraction}, ingest.test_fraction={params.test_fraction}); "
            f"each class needs at least {len(SPLITS)} distinct images (not copies of one another):\n"
            + "\n".join(problems)
            + "\nAdd images, or remove the class from data.classes."
        )
