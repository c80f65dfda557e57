"""The wheel ships every module: setuptools finds every package of the source tree, with adapters/
as sharp_bilevel.adapters and never as a top-level `adapters` (the editable install the other
tests run on cannot show a module missing from the wheel). CI also installs the built wheel into
a fresh environment and imports every module (.ci/wheel_smoke.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it ships as.
TREES = {"sharp_bilevel": "sharp_bilevel", "adapters": "sharp_bilevel.adapters"}


def _source_files() -> list[tuple[Path, str]]:
    """(source .py file, its path inside the wheel) for every module of the source tree."""
    return [
        (path, "/".join((*package.split("."), *path.relative_to(ROOT / folder).parts)))
        for folder, package in TREES.items()
        for path in sorted((ROOT / folder).rglob("*.py"))
    ]


def _source_packages() -> set[str]:
    return {
        ".".join((package, *init.parent.relative_to(ROOT / folder).parts))
        for folder, package in TREES.items()
        for init in (ROOT / folder).rglob("__init__.py")
    }


def test_every_source_folder_is_a_package() -> None:
    # find_packages skips a folder without __init__.py silently, and its modules with it.
    folders = {path.parent for path, _ in _source_files()}
    missing = sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file())
    assert not missing, f"folders with modules but no __init__.py (they would not ship): {missing}"


def test_setuptools_finds_every_package() -> None:
    # What setuptools computes from setup.py and pyproject.toml, with its own code; deprecated
    # configuration is an error here (a later setuptools drops it and the build breaks).
    probe = (
        "import json, warnings, setuptools, distutils.core\n"
        "from setuptools.warnings import SetuptoolsDeprecationWarning\n"
        "warnings.simplefilter('error', SetuptoolsDeprecationWarning)\n"
        "d = distutils.core.run_setup('setup.py', stop_after='config')\n"
        "print(json.dumps({'packages': d.packages, 'package_dir': d.package_dir}))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.splitlines()[-1])
    packages = found["packages"]
    assert len(packages) == len(set(packages))
    assert set(packages) == _source_packages()
    assert not [p for p in packages if p == "adapters" or p.startswith("adapters.")]
    assert found["package_dir"] == {"sharp_bilevel.adapters": "adapters"}


def test_built_wheel_ships_every_source_file(tmp_path: Path) -> None:
    # From a clean copy of the build inputs: setuptools would ship stale files left in the
    # checkout's build/ or *.egg-info/ by an earlier build, and hide a missing package.
    src, dist = tmp_path / "src", tmp_path / "dist"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in TREES:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    # The sdist, then the wheel built from it (as `pip install` from an index would).
    run = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = dist.glob("sharp_bilevel-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        contents = {name: zf.read(name) for name in zf.namelist()}
    outside = [n for n in contents if not n.startswith(("sharp_bilevel/", "sharp_bilevel-"))]
    assert not outside, f"the wheel installs more than sharp_bilevel: {outside}"
    shipped = {n for n in contents if n.endswith(".py")}
    expected = {name for _, name in _source_files()}
    assert shipped == expected, (
        f"missing from the wheel: {sorted(expected - shipped)}; "
        f"not in the source tree: {sorted(shipped - expected)}"
    )
    for path, name in _source_files():
        assert contents[name] == path.read_bytes(), f"{name} differs from {path}"
