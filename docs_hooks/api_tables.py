"""MkDocs hook: a summary table at the top of every API page, built from the docstrings.

On a page under ``api/``, the line ``<!-- api-summary -->`` is replaced by a table with one row per
``::: identifier`` directive of the page: the import path (linked to its entry), the first line
of its docstring and the source file and line. Docstrings are read statically with griffe, as
mkdocstrings reads them, so the table cannot drift from the entries below it.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import griffe

ROOT = Path(__file__).resolve().parents[1]
_DIRECTIVE = re.compile(r"^::: (\S+)\n(?:    options:\n      heading: \"([^\"]+)\"\n)?", re.M)


@cache
def _package(name: str) -> Any:
    return griffe.load(name, search_paths=[str(ROOT)])


def _object(identifier: str) -> Any:
    top, _, rest = identifier.partition(".")
    obj = _package(top)
    return obj[rest] if rest else obj


def _row(identifier: str, heading: str | None) -> str:
    obj = _object(identifier)
    target = obj.final_target if getattr(obj, "is_alias", False) else obj
    doc = target.docstring.value.strip().splitlines()[0] if target.docstring else ""
    doc = doc.replace("|", "\\|")
    where = f"`{target.relative_filepath}:{target.lineno}`"
    name = heading or identifier
    return f"| [`{name}`](#{identifier}) | {doc} | {where} |"


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Fill the ``<!-- api-summary -->`` marker of an API page."""
    if "<!-- api-summary -->" not in markdown:
        return markdown
    rows = [_row(m.group(1), m.group(2)) for m in _DIRECTIVE.finditer(markdown)]
    table = "\n".join(["| name | what it is | source |", "|---|---|---|", *rows])
    return markdown.replace("<!-- api-summary -->", table)
