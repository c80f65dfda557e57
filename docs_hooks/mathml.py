"""MkDocs hook: typeset the pages' maths as MathML when the site is built.

``pymdownx.arithmatex`` (generic mode) marks ``$...$`` and ``$$...$$`` in pages and docstrings
as ``<span class="arithmatex">\\(...\\)</span>`` / ``<div class="arithmatex">\\[...\\]</div>``;
this hook converts each to MathML with ``latex2mathml``. Browsers render MathML natively, so the
site needs no script, style or font from anywhere: it stays offline.
"""

from __future__ import annotations

import html
import re
from typing import Any

from latex2mathml.converter import convert

_INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.S)
_BLOCK = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.S)


def _mathml(tex: str, display: str) -> str:
    return convert(html.unescape(tex).strip(), display=display)


def on_page_content(content: str, **kwargs: Any) -> str:
    """Replace every arithmatex span and div of a page by MathML."""
    content = _BLOCK.sub(
        lambda m: f'<div class="math">{_mathml(m.group(1), "block")}</div>', content
    )
    return _INLINE.sub(lambda m: _mathml(m.group(1), "inline"), content)
