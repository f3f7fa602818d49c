"""Ingest stage: find the raw images, check every one, group duplicates and split them.

Every file under ``data.root`` ends up in exactly one of two lists: ``manifest.csv`` (kept,
with label, checksum, size, split and group) or ``rejected.csv`` (with a reason code, listed
with its meaning in :data:`pipeline.inspection.REASON_MEANINGS`, and a sentence saying why).
Nothing is skipped silently and the raw files are only ever read.

The work is done by :mod:`pipeline.sources` (finding files and labels),
:mod:`pipeline.inspection` (checking each file) and :mod:`pipeline.splitting` (groups of copies
and the split); this module runs them in order and writes the outputs and the readable report.
Splits are stratified by class and made of whole groups (byte-identical copies, near-duplicates
and rows sharing a table's group column), so no picture is in two splits.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from pipeline.atomic import write_json, write_text
from pipeline.config import Params
from pipeline.inspection import PHASH_BITS, REASON_MEANINGS, inspect_all
from pipeline.layout import (
    HOLDOUT,
    INGEST_REPORT_FILE,
    INGEST_SUMMARY_FILE,
    INTERIM,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    REJECTED_COLUMNS,
    REJECTED_FILE,
    REPORTS,
    SAMPLE_FILE,
    SPLITS,
)
from pipeline.markdown import Markdown, md_code, md_text
from pipeline.outputs import stage_folder
from pipeline.sources import Rejection, discover
from pipeline.splitting import Item, assign_splits, picture_groups, quarantine_conflicts, split_groups

log = logging.getLogger(__name__)

INTERIM_FILES = (MANIFEST_FILE, REJECTED_FILE, INGEST_SUMMARY_FILE)  # the output folder holds these and nothing else


# ---------------------------------------------------------------------------------------------
# The stage


def run_ingest(
    params: Params,
    out_dir: Path = INTERIM,
    reports_dir: Path = REPORTS,
    progress: bool = True,
) -> dict:
    """Check, de-duplicate and split the raw images; write manifest, rejections and a report.

    Writes ``manifest.csv``, ``rejected.csv`` and ``ingest.json`` to ``out_dir`` (a folder of their
    own, replaced whole) and ``ingest.md`` to ``reports_dir``; returns the ingest.json record.
    """
    root = Path(params.data.root)
    candidates, rejections = discover(root, params.data)
    named_only = ("missing-file", "outside-root")  # rows of a label table, not files found under the root
    n_files = len({c.path for c in candidates} | {r.path for r in rejections if r.reason not in named_only})
    inspections = inspect_all([c.file for c in candidates], params.ingest, progress, params.runtime.ingest_workers)
    items = []
    for candidate, found in zip(candidates, inspections, strict=True):
        if found.reason:
            rejections.append(Rejection(candidate.path, found.reason, found.detail))
        else:
            items.append(Item(candidate, found))
    pictures, near = picture_groups(items, params.ingest.near_dup_threshold, params.ingest.recrop_threshold)
    kept, conflicts = quarantine_conflicts(pictures)
    rejections += conflicts
    kept_ids = {id(item) for item in kept}
    groups = split_groups(kept, [members for members in pictures if id(members[0]) in kept_ids])
    assign_splits(groups, params.data.classes, params.ingest)
    kept.sort(key=lambda item: item.candidate.path)
    rejections.sort(key=lambda r: (r.path, r.reason))

    summary = summarize(root, params, n_files, kept, rejections)
    report = ingest_report(summary, pictures, near, rejections, params)
    # The three files replace the previous ones together (a kill leaves the old set or the new one);
    # the readable report follows, itself replaced in one step.
    with stage_folder(out_dir, INTERIM_FILES, "ingest") as tmp:
        _write_csv(tmp / MANIFEST_FILE, MANIFEST_COLUMNS, map(_manifest_row, kept))
        _write_csv(tmp / REJECTED_FILE, REJECTED_COLUMNS, (vars(r) for r in rejections))
        write_json(tmp / INGEST_SUMMARY_FILE, summary)
    write_text(reports_dir / INGEST_REPORT_FILE, report)
    log.info("ingest: %d kept, %d rejected", summary["n_kept"], summary["n_rejected"])
    return summary


# ---------------------------------------------------------------------------------------------
# Outputs


def _write_csv(path: Path, columns: list[str], rows: Iterable[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _manifest_row(item: Item) -> dict:
    found = item.found
    return {
        "path": item.candidate.path,
        "site": item.candidate.site,
        "label": item.candidate.label,
        "sha256": found.sha256,
        "width": found.width,
        "height": found.height,
        "bytes": found.bytes,
        "split": item.split,
        "group": item.group,
        "format": found.format,
        "mode": found.mode,
        "phash": "" if found.phash is None else found.phash.hex(),
    }


def data_hash(items: list[Item]) -> str:
    """sha256 over the sorted (path, label, sha256) of the kept images: the data's identity."""
    digest = hashlib.sha256()
    for path, label, sha in sorted((i.candidate.path, i.candidate.label, i.found.sha256) for i in items):
        digest.update(f"{path}\t{label}\t{sha}\n".encode())
    return digest.hexdigest()


def is_synthetic(root: Path) -> bool:
    """True when ``root/SAMPLE.json`` marks the data as the generated sample."""
    try:
        return json.loads((root / SAMPLE_FILE).read_text(encoding="utf-8")).get("synthetic") is True
    except (OSError, ValueError, AttributeError):
        return False


def summarize(root: Path, params: Params, n_files: int, items: list[Item], rejections: list[Rejection]) -> dict:
    """The ingest.json record: counts per split and class (overall and per site), sites held out,
    rejections by reason, data hash."""
    classes, sites = params.data.classes, params.data.site_names()
    splits = [*SPLITS, HOLDOUT] if params.ingest.holdout_sites else list(SPLITS)
    counts = {split: dict.fromkeys(classes, 0) for split in splits}
    by_site = {site: {split: dict.fromkeys(classes, 0) for split in splits} for site in sites}
    for item in items:
        counts[item.split][item.candidate.label] += 1
        by_site[item.candidate.site][item.split][item.candidate.label] += 1
    per_class = [sum(counts[s][c] for s in splits) for c in classes]
    return {
        "root": str(root),
        "synthetic": is_synthetic(root) or any(is_synthetic(root / s.root) for s in params.data.resolved_sources()),
        "sites": sites,
        "holdout_sites": list(params.ingest.holdout_sites),
        "counts_by_site": by_site,
        "classes": list(classes),
        "n_files": n_files,
        "n_kept": len(items),
        "n_rejected": len(rejections),
        "counts": counts,
        "rejected_by_reason": dict(sorted(Counter(r.reason for r in rejections).items())),
        "data_hash": data_hash(items),
        "imbalance_ratio": round(max(per_class) / max(1, min(per_class)), 2),
    }


# ---------------------------------------------------------------------------------------------
# The readable report

_MAX_ROWS = 300


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    """A Markdown table; cells are text from the data (escaped) unless they are :class:`Markdown`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_text(v) for v in row) + " |" for row in rows[:_MAX_ROWS]]
    if len(rows) > _MAX_ROWS:
        lines.append(f"\n... and {len(rows) - _MAX_ROWS} more rows (see the CSV files).")
    return lines


def _count_rows(counts: dict, classes: list[str], splits: list[str]) -> list[list[object]]:
    """One row per class (counts per split, total, share) and a total row."""
    total = max(1, sum(sum(per_class.values()) for per_class in counts.values()))
    rows: list[list[object]] = []
    for cls in classes:
        per_split = [counts[split][cls] for split in splits]
        rows.append([cls, *per_split, sum(per_split), f"{sum(per_split) / total:.1%}"])
    split_totals = [sum(counts[split].values()) for split in splits]
    rows.append([Markdown("**all**"), *split_totals, sum(split_totals), "100%"])
    return rows


def _counts_section(summary: dict, params: Params) -> list[str]:
    counts, classes = summary["counts"], summary["classes"]
    splits = list(counts)
    total = max(1, summary["n_kept"] - sum(counts.get(HOLDOUT, {}).values()))
    val, test = (sum(counts[split].values()) for split in ("val", "test"))
    ingest = params.ingest
    lines = [
        "## Images per class and split",
        "",
        *_table(["class", *splits, "total", "share"], _count_rows(counts, classes, splits)),
        "",
        f"Imbalance ratio (largest class / smallest class): **{summary['imbalance_ratio']}**.",
        f"Split: method `{ingest.split_method}`, seed {ingest.seed}, asked val {ingest.val_fraction:.0%} and "
        f"test {ingest.test_fraction:.0%}; got val {val / total:.1%} and test {test / total:.1%}"
        + (" of the training sites' images" if ingest.holdout_sites else "")
        + ". Groups of copies always share one split; classes are stratified within each site.",
        "",
    ]
    if ingest.holdout_sites:
        lines += [f"Held-out sites (all their images in `{HOLDOUT}`, never trained on): "
                  + ", ".join(md_code(site) for site in ingest.holdout_sites) + ".", ""]
    if len(summary["sites"]) > 1:
        for site, site_counts in summary["counts_by_site"].items():
            lines += [f"### Site {md_code(site)}", "", *_table(["class", *splits, "total", "share"],
                                                        _count_rows(site_counts, classes, splits)), ""]
    return lines


def _rejected_section(rejections: list[Rejection]) -> list[str]:
    if not rejections:
        return ["## Rejected files", "", "None: every file found is in the manifest.", ""]
    by_reason = Counter(r.reason for r in rejections)
    return [
        f"## Rejected files ({len(rejections)})",
        "",
        *_table(
            ["reason", "files", "meaning"],
            [[reason, n, REASON_MEANINGS.get(reason, "")] for reason, n in sorted(by_reason.items())],
        ),
        "",
        *_table(["path", "reason", "detail"],
                [[md_code(r.path, in_table=True), r.reason, r.detail] for r in rejections]),
        "",
    ]


def _duplicates_section(
    pictures: list[list[Item]], near: list[tuple[Item, Item, int]], threshold: int, recrop_threshold: int = 0
) -> list[str]:
    repeated = sorted(
        (members for members in pictures if len(members) > 1), key=lambda m: m[0].candidate.path
    )
    rows = []
    for members in repeated:
        labels = sorted({item.candidate.label for item in members})
        status = "conflict: all rejected" if len(labels) > 1 else f"kept, split {members[0].split}"
        paths = Markdown(", ".join(
            md_code(item.candidate.path, in_table=True) for item in sorted(members, key=lambda i: i.candidate.path)
        ))
        rows.append([len(members), " vs ".join(labels), status, paths])
    conflicts = sum(row[2].startswith("conflict") for row in rows)
    near_rule = (
        f"near-identical means flip/rotation-invariant perceptual hashes within {threshold} of "
        f"{PHASH_BITS} bits"
        if threshold
        else "near-duplicate search is off (ingest.near_dup_threshold: 0)"
    ) + (f"; re-crops of one cell: hashes of the white cell centred on its nucleus within {recrop_threshold} bits"
         if recrop_threshold else "")
    lines = [
        "## Duplicates",
        "",
        f"{len(repeated)} group(s) of identical or near-identical images, "
        f"{conflicts} with conflicting labels; {near_rule}.",
        "",
    ]
    if rows:
        lines += _table(["files", "labels", "outcome", "paths"], rows) + [""]
    if near:
        lines += ["Near-duplicate links (different bytes):", ""]
        lines += _table(
            ["distance", "first", "second"],
            [
                [d, md_code(a.candidate.path, in_table=True), md_code(b.candidate.path, in_table=True)]
                for a, b, d in sorted(near, key=lambda x: x[2])
            ],
        ) + [""]
    return lines


def ingest_report(
    summary: dict,
    pictures: list[list[Item]],
    near: list[tuple[Item, Item, int]],
    rejections: list[Rejection],
    params: Params,
) -> str:
    """The Markdown ingest report: counts per class and split, rejections, duplicates."""
    kind = "the generated synthetic sample" if summary["synthetic"] else "real data"
    lines = [
        "# Ingest report" + (" — SYNTHETIC DATA" if summary["synthetic"] else ""),
        "",
        f"Source {md_code(summary['root'])} ({kind}, {params.data.source} layout): {summary['n_files']} files, "
        f"**{summary['n_kept']} kept**, **{summary['n_rejected']} rejected**. "
        f"Data hash `{summary['data_hash'][:16]}`.",
        "",
        *_counts_section(summary, params),
        *_rejected_section(rejections),
        *_duplicates_section(pictures, near, params.ingest.near_dup_threshold, params.ingest.recrop_threshold),
    ]
    return "\n".join(lines).rstrip() + "\n"
