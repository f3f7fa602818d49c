"""A stage's output folder, built aside and swapped in whole, never over files that are not its own.

A stage whose outputs belong together (ingest's manifest and summary, normalize's images and index)
writes them into a temporary folder that takes the output folder's place in one step
(:func:`pipeline.atomic.atomic_dir`): a kill leaves the old set or the new one. The swap replaces the
whole folder, so a folder that also holds other files (raw images, another stage's outputs, a user's
notes) is refused rather than emptied.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.atomic import atomic_dir

_LISTED = 5  # foreign entries named in the error


def foreign_entries(folder: Path, outputs: Iterable[str]) -> list[str]:
    """Names in ``folder`` other than ``outputs`` (sorted; none when the folder does not exist)."""
    if not folder.is_dir():
        return []
    own = set(outputs)
    return sorted(entry.name for entry in folder.iterdir() if entry.name not in own)


@contextmanager
def stage_folder(folder: str | Path, outputs: Iterable[str], stage: str) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``folder`` whole when the block completes
    (and is discarded when it fails), after checking that ``folder`` holds nothing but ``outputs``
    of ``stage``; otherwise raise ``ValueError`` naming what else is there."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: the {stage} stage writes a folder here, but this is a file")
    foreign = foreign_entries(folder, outputs)
    if foreign:
        shown = ", ".join(foreign[:_LISTED]) + (f" and {len(foreign) - _LISTED} more" if len(foreign) > _LISTED else "")
        raise ValueError(f"{folder} holds {shown} besides the {stage} stage's outputs; the stage replaces the "
                         "folder as a whole, so give it a folder of its own (or move those files out)")
    with atomic_dir(folder) as tmp:
        yield tmp
