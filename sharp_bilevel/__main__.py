"""``python -m sharp_bilevel``: the main job (experts, distillation, evaluation, report)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .cli.app import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sharp-bilevel`` console script."""
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
