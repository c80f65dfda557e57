"""Smoke test of an installed (non-editable) sharp_bilevel, run from outside the checkout.

Usage: ``python -I .ci/wheel_smoke.py SOURCE_ROOT`` with the Python of the environment the wheel
was installed into (``-I`` keeps the script's folder and the working directory off ``sys.path``).

It imports every module of the installed package (``pkgutil.walk_packages``) and checks that the
installed modules are exactly the source tree's (``adapters/`` mapped to
``sharp_bilevel.adapters``), that every one of them comes from this environment's site-packages,
and that there is no top-level ``adapters`` package. An editable install cannot show a module
missing from the wheel; this does. It also loads the ``sharp-bilevel`` console script.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
import sys
import sysconfig
from pathlib import Path

# Source folder -> the package it ships as.
TREES = {"sharp_bilevel": "sharp_bilevel", "adapters": "sharp_bilevel.adapters"}


def source_modules(root: Path) -> set[str]:
    """Every module the source tree defines, under its installed name."""
    names: set[str] = set()
    for folder, package in TREES.items():
        for path in (root / folder).rglob("*.py"):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.add(".".join((package, *parts)))
    return names


def _raise(name: str) -> None:
    raise ImportError(f"cannot import {name}") from sys.exc_info()[1]


def main(argv: list[str]) -> int:
    root = Path(argv[1]).resolve()
    site = Path(sysconfig.get_paths()["purelib"]).resolve()

    # By name too: the adapters are the modules sharp_bilevel/__init__.py does not import.
    import sharp_bilevel.adapters.datm
    import sharp_bilevel.adapters.ftd
    import sharp_bilevel.adapters.mtt

    walked = {"sharp_bilevel"} | {
        info.name
        for info in pkgutil.walk_packages(sharp_bilevel.__path__, "sharp_bilevel.", onerror=_raise)
    }
    for name in sorted(walked):
        module = importlib.import_module(name)
        where = Path(module.__file__ or "").resolve()
        assert where.is_relative_to(site), f"{name} comes from {where}, not from {site}"
        assert not where.is_relative_to(root), f"{name} comes from the checkout: {where}"

    expected = source_modules(root)
    assert walked == expected, (
        f"missing from the installed package: {sorted(expected - walked)}; "
        f"not in the source tree: {sorted(walked - expected)}"
    )
    assert importlib.util.find_spec("adapters") is None, "a top-level `adapters` is importable"
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="sharp-bilevel")
    assert script.load() is importlib.import_module("sharp_bilevel.__main__").main
    print(f"wheel smoke: {len(walked)} modules imported from {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
