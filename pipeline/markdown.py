"""Text from the data (file names, labels, folders) written into Markdown so that it shows as itself.

A file name may hold ``|`` (which splits a table cell), backticks, ``<tag>`` (raw HTML), ``$..$``
(maths on GitHub and in many viewers), ``*``/``_`` (emphasis) or a newline (which ends a table row).
:func:`md_text` escapes all of them for running text and table cells; :func:`md_code` writes a code
span that no backtick in the value can close. Control characters show as ``\\xNN``.
"""

from __future__ import annotations

import re

# Characters with a meaning somewhere in Markdown (CommonMark, GitHub tables, maths, HTML).
_SPECIAL = re.compile(r"([\\`*_\[\]<>|$&~#!])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Markdown(str):
    """Text that is already Markdown (made by this module or written by hand): never escaped again."""


def _visible_controls(text: str) -> str:
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def md_text(value: object) -> Markdown:
    """``value`` as Markdown text that renders exactly as ``str(value)`` reads (control characters as
    ``\\xNN``); a :class:`Markdown` value is returned unchanged."""
    if isinstance(value, Markdown):
        return value
    escaped = _SPECIAL.sub(r"\\\1", str(value))
    return Markdown(_CONTROL.sub(lambda match: f"\\\\x{ord(match.group()):02x}", escaped))


def md_code(value: object, in_table: bool = False) -> Markdown:
    """``value`` as a code span: fenced by more backticks than any run inside it, control characters as
    ``\\xNN``; ``in_table`` escapes ``|``, which GitHub tables split cells on even inside code."""
    text = _visible_controls(str(value))
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    # CommonMark strips one space from each end of a span's content when both ends have one
    edges = text[:1] + text[-1:]
    padded = f" {text} " if text.strip() and ("`" in edges or edges == "  ") else text
    if in_table:
        padded = padded.replace("|", "\\|")
    return Markdown(f"{fence}{padded}{fence}")
