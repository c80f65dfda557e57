"""``python -m sharp_bilevel``: the main job (for now, the bilevel demo on real digits)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .demo import main as demo_main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sharp-bilevel`` console script."""
    return demo_main(argv)


if __name__ == "__main__":
    sys.exit(main())
