"""Markdown results files whose hand-written discussion survives a rerun of their script."""

from __future__ import annotations

from pathlib import Path

MARKER = "<!-- discussion: hand-written below this line, kept when the script rewrites the file -->"


def write_keeping_discussion(path: Path, body: str) -> None:
    """Write ``body``, then the marker, then whatever followed the marker in ``path`` before."""
    text = body + "\n" + MARKER + "\n"
    if path.is_file():
        old = path.read_text()
        if MARKER in old:
            text += old.split(MARKER, 1)[1].lstrip("\n")
    path.write_text(text)
