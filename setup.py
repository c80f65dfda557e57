"""Package discovery only: every piece of metadata lives in pyproject.toml's ``[project]``.

``adapters/`` at the repository root ships as the subpackage ``sharp_bilevel.adapters`` (through
``package_dir``), and there is deliberately no top-level ``adapters`` package. pyproject's
``[tool.setuptools.packages.find]`` cannot rename a found package, and a hand-written package list
goes stale (it once left ``sharp_bilevel.objectives`` out of the wheel), so the list is computed
here: every package under ``sharp_bilevel/``, plus every package under ``adapters/`` renamed.
tests/test_packaging.py and .ci/wheel_smoke.py check the result against the source tree.
"""

from setuptools import find_packages, setup

ADAPTERS = "sharp_bilevel.adapters"

packages = find_packages(include=["sharp_bilevel", "sharp_bilevel.*"])
packages += [ADAPTERS] + [f"{ADAPTERS}.{sub}" for sub in find_packages(where="adapters")]

setup(packages=packages, package_dir={ADAPTERS: "adapters"})
