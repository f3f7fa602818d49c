"""How many worker processes a stage's pool gets: the one rule every ``workers`` param follows."""

from __future__ import annotations

import os


def resolve_workers(requested: int) -> int:
    """``requested`` workers, or every CPU this process may use when it is 0."""
    if requested > 0:
        return requested
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
