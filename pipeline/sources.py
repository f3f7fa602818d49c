"""Finding the raw images and their labels: a class-folder tree or CSV/TSV label tables.

:func:`discover` lists every file under ``data.root`` as a :class:`Candidate` (a file with the
class its folder or table row gives it) or a :class:`Rejection` (a file whose label is missing
or not one of ``data.classes``). Nothing here opens an image; :mod:`pipeline.inspection` does.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.config import DataParams, TableSource
from pipeline.layout import SAMPLE_FILE


class IngestError(ValueError):
    """The raw data cannot be ingested as configured; the message says what to change."""


@dataclass(frozen=True)
class Candidate:
    """A file found under the root, with the label its folder or table row gives it."""

    path: str  # posix, relative to data.root
    file: str  # where to read it
    label: str
    group: str = ""  # a table's group column value, if any
    site: str = ""  # the source (lab, scanner) it came from


@dataclass(frozen=True)
class Rejection:
    """A file left out of the manifest, and why."""

    path: str
    reason: str
    detail: str
    site: str = ""


def resolve_label(name: str, data: DataParams) -> str | None:
    """The class that folder or label ``name`` stands for; None if it is mapped to null.

    Tried in order: the class name itself, a ``label_map`` key, both ignoring case, and a
    plural (``neutrophils``). Raises KeyError when nothing matches.
    """
    name = name.strip()
    if name in data.classes:
        return name
    if name in data.label_map:
        return data.label_map[name]
    folded = name.casefold()
    for candidate in (folded, folded[:-1] if folded.endswith("s") else None):
        if candidate is None:
            continue
        for cls in data.classes:
            if cls.casefold() == candidate:
                return cls
        for key, target in data.label_map.items():
            if key.casefold() == candidate:
                return target
    raise KeyError(name)


def _label_problem(name: str, data: DataParams, what: str) -> Rejection | str:
    """The class for ``name``, or the reason code and detail that leaves its files out."""
    try:
        label = resolve_label(name, data)
    except KeyError:
        return Rejection(
            "",
            "unknown-class",
            f"{what} {name!r} is not one of data.classes ({', '.join(data.classes)}); "
            "add it there or map it in data.label_map",
        )
    if label is None:
        return Rejection("", "excluded-class", f"{what} {name!r} is mapped to null in data.label_map")
    return label


def walk_files(top: Path) -> Iterator[Path]:
    """Every non-directory under ``top`` (symlinked folders followed once), in sorted order."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _relative(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _leaves_root(file: Path, root: Path) -> str:
    """Why ``file`` lies outside ``root`` ('..', an absolute path, or a symlink leading out); '' if it does not."""
    if os.path.commonpath([os.path.abspath(file), os.path.abspath(root)]) != os.path.abspath(root):
        return "its path leads outside the source folder ('..' or an absolute path)"
    real_root = os.path.realpath(root)
    if os.path.commonpath([os.path.realpath(file), real_root]) != real_root:
        return "a symlink on its path leads outside the source folder"
    return ""


def discover_folder(root: Path, data: DataParams) -> tuple[list[Candidate], list[Rejection]]:
    """Files of a ``<root>/<class>/<image>`` tree; files that fit no class become rejections."""
    candidates: list[Candidate] = []
    rejections: list[Rejection] = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            label = _label_problem(entry.name, data, "folder")
            for file in walk_files(entry):
                rel = _relative(file, root)
                if isinstance(label, Rejection):
                    rejections.append(replace(label, path=rel))
                else:
                    candidates.append(Candidate(rel, str(file), label))
        elif entry.name != SAMPLE_FILE:
            rejections.append(
                Rejection(
                    entry.name,
                    "not-in-class-folder",
                    "images must sit in a class folder, <data.root>/<class>/<image>",
                )
            )
    return candidates, rejections


# Usual column names, compared lower-case with '_' and '-' read as spaces.
_PATH_COLUMNS = ("path", "file", "filename", "file name", "filepath", "file path", "image", "image path")
_ID_COLUMNS = ("id", "image id", "imageid", "image no", "image number")
_LABEL_COLUMNS = ("label", "class", "class label", "class name", "category", "cell type", "type")


def _fold(name: str) -> str:
    return " ".join(re.sub(r"[_\-]", " ", name).split()).casefold()


def _find_column(header: list[str], wanted: str | None, usual: tuple[str, ...]) -> str | None:
    """The header column named ``wanted`` (or, when None, one of the ``usual`` names)."""
    folded = {_fold(column): column for column in header}
    if wanted is not None:
        return folded.get(_fold(wanted))
    return next((folded[name] for name in usual if name in folded), None)


def _read_table(path: Path, delimiter: str | None) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV/TSV file (any line endings, optional BOM)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise IngestError(
            f"label table {path} not found (data.tables[].file is relative to data.root)"
        ) from None
    if delimiter is None:
        first_line = text.splitlines()[0] if text else ""
        delimiter = "\t" if "\t" in first_line or path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = header
    rows = [{key: (value or "").strip() for key, value in row.items() if key is not None} for row in reader]
    return header, rows


def _row_path(row: dict[str, str], path_column: str | None, id_column: str | None, pattern: str) -> str:
    if path_column is not None:
        return row[path_column]
    value: str | int = row[id_column]
    if re.fullmatch(r"[+-]?\d+", value):
        value = int(value)
    try:
        return pattern.format(id=value)
    except ValueError:
        return pattern.format(id=str(value))


def discover_table(
    root: Path, data: DataParams, table: TableSource
) -> tuple[list[Candidate], list[Rejection]]:
    """Files named by one label table; rows without a usable file or label become rejections."""
    table_path = root / table.file
    header, rows = _read_table(table_path, table.delimiter)
    path_column = _find_column(header, table.path_column, _PATH_COLUMNS)
    id_column = None if path_column else _find_column(header, table.id_column, _ID_COLUMNS)
    label_column = _find_column(header, table.label_column, _LABEL_COLUMNS)
    group_column = _find_column(header, table.group_column, ()) if table.group_column else None
    missing = [
        what
        for what, found, asked in (
            ("a path or id column", path_column or id_column, table.path_column or table.id_column),
            ("a label column", label_column, table.label_column),
            ("the group column", group_column or not table.group_column, table.group_column),
        )
        if not found
    ]
    if missing:
        raise IngestError(
            f"{table_path}: cannot find {' and '.join(missing)} among the columns {header}; "
            "name them in data.tables[] (path_column/id_column, label_column, group_column)"
        )
    image_dir = table_path.parent / table.images
    table_name = _relative(table_path, root)
    candidates: list[Candidate] = []
    rejections: list[Rejection] = []
    for line, row in enumerate(rows, start=2):
        file = image_dir / _row_path(row, path_column, id_column, table.path_pattern)
        rel = _relative(file, root)
        raw_label = row[label_column]
        label = _label_problem(raw_label, data, f"label in {table_name} line {line}:") if raw_label else None
        outside = "" if data.allow_outside_root else _leaves_root(file, root)
        if not row[path_column or id_column]:
            rejections.append(Rejection(f"{table_name}:{line}", "missing-file", "the row names no image"))
        elif outside:
            rejections.append(Rejection(rel, "outside-root", f"named by {table_name} line {line}: {outside}; "
                                        "not read (data.allow_outside_root is false)"))
        elif not file.exists():
            rejections.append(Rejection(rel, "missing-file", f"named by {table_name} line {line}, not found"))
        elif label is None:
            rejections.append(Rejection(rel, "missing-label", f"{table_name} line {line} has no label"))
        elif isinstance(label, Rejection):
            rejections.append(replace(label, path=rel))
        else:
            group = f"{table_name}:{row[group_column]}" if group_column and row[group_column] else ""
            candidates.append(Candidate(rel, str(file), label, group))
    named = {c.path for c in candidates} | {r.path for r in rejections}
    listed = image_dir.is_dir() and (data.allow_outside_root or not _leaves_root(image_dir, root))
    for file in walk_files(image_dir) if listed else ():
        rel = _relative(file, root)
        if rel not in named and file != table_path and file.name != SAMPLE_FILE:
            rejections.append(
                Rejection(rel, "unlabelled", f"in {table.images!r} but not named by {table_name}")
            )
    return candidates, rejections


def _merge_repeated_rows(candidates: list[Candidate]) -> tuple[list[Candidate], list[Rejection]]:
    """One candidate per path; a path given two different labels is a conflict."""
    by_path: dict[str, list[Candidate]] = defaultdict(list)
    for candidate in candidates:
        by_path[candidate.path].append(candidate)
    kept, rejections = [], []
    for path, same in by_path.items():
        labels = sorted({c.label for c in same})
        if len(labels) > 1:
            rejections.append(
                Rejection(path, "duplicate-conflict", f"listed with labels {', '.join(labels)}")
            )
        else:
            kept.append(same[0])
    return kept, rejections


def discover_source(root: Path, data: DataParams) -> tuple[list[Candidate], list[Rejection]]:
    """All labelled candidate files of one source folder plus files rejected for their label alone
    (paths relative to ``root``)."""
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise IngestError(f"{str(root)!r} {what}; set data.root (and data.sources[].root) in params.yaml "
                          "to the raw image folder")
    if data.source == "folder":
        return discover_folder(root, data)
    candidates: list[Candidate] = []
    rejections: list[Rejection] = []
    for table in data.tables:
        found, rejected = discover_table(root, data, table)
        candidates += found
        rejections += rejected
    candidates, conflicts = _merge_repeated_rows(candidates)
    return candidates, rejections + conflicts


def _under(prefix: str, path: str) -> str:
    """``path`` (relative to a source folder) as a path relative to data.root."""
    return path if prefix in ("", ".") else Path(os.path.normpath(Path(prefix) / path)).as_posix()


def discover(root: Path, data: DataParams) -> tuple[list[Candidate], list[Rejection]]:
    """Every file of every source (``data.sources``, or the one source ``data`` describes), each a
    :class:`Candidate` or a :class:`Rejection` tagged with its site; paths relative to ``root``.

    A source that yields no candidate at all is an error naming it: an empty or mistyped folder
    must not quietly drop a whole lab from the data.
    """
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise IngestError(
            f"data.root {str(root)!r} {what}; set data.root in params.yaml to the raw image folder"
        )
    candidates: list[Candidate] = []
    rejections: list[Rejection] = []
    for source in data.resolved_sources():
        view = data.model_copy(update={"source": source.source, "tables": source.tables,
                                       "label_map": source.label_map, "sources": []})
        prefix = Path(os.path.relpath(root / source.root, root)).as_posix()
        found, rejected = discover_source(root / source.root, view)
        if not found and data.sources:
            raise IngestError(
                f"data.sources[{source.site}]: no labelled image in {str(root / source.root)!r} "
                f"({len(rejected)} file(s) rejected, e.g. "
                f"{', '.join(f'{r.path}: {r.reason}' for r in rejected[:3]) or 'no files at all'}); "
                "check its root, layout and label_map"
            )
        candidates += [replace(c, path=_under(prefix, c.path), site=source.site) for c in found]
        rejections += [replace(r, path=_under(prefix, r.path), site=source.site) for r in rejected]
    return candidates, rejections
