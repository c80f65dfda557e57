"""The docs site cannot drift from the code: its examples run, it builds strictly, offline,
and its API page renders the optimizer's signature in a real browser."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "```python" in p.read_text())


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning:sharp_bilevel"},
    )


def test_pages_have_examples() -> None:
    names = {p.name for p in PAGES}
    assert {"quickstart.md", "rules.md", "tuh-tr.md", "lr-learning.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_every_python_block_on_the_page_runs(page: Path, tmp_path: Path) -> None:
    # The blocks of one page share a namespace, in order, like a reader running them.
    code = "\n\n".join(python_blocks(page))
    result = run_python(code, tmp_path)
    assert result.returncode == 0, f"{page.name} examples failed:\n{result.stderr[-3000:]}"


def _documented_paths() -> set[str]:
    """The import paths the API pages show (a directive's ``heading`` option, else its path)."""
    directive = re.compile(r'^::: (\S+)\n(?:    options:\n      heading: "([^"]+)"\n)?', re.M)
    shown = set()
    for page in (DOCS / "api").glob("*.md"):
        for m in directive.finditer(page.read_text()):
            shown.add(m.group(2) or m.group(1))
    return shown


def _resolve(path: str) -> object:
    """The object a dotted path names (the longest importable module, then attributes)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def test_api_reference_covers_every_public_name_by_its_import_path() -> None:
    import inspect

    import sharp_bilevel.adapters

    import sharp_bilevel

    required = {f"sharp_bilevel.{n}" for n in sharp_bilevel.__all__ if not n.startswith("__")}
    for module in (
        sharp_bilevel.adapters.mtt,
        sharp_bilevel.adapters.ftd,
        sharp_bilevel.adapters.datm,
    ):
        required |= {f"{module.__name__}.{n}" for n in module.__all__}
    # every function or class the pages name by a full path has an entry under that path
    for page in DOCS.rglob("*.md"):
        if page.parent.name == "api" or page.name == "changelog.md":  # history names old paths
            continue
        for path in set(re.findall(r"`(sharp_bilevel(?:\.\w+)+)", page.read_text())):
            obj = _resolve(path)  # a stale path on a page fails here
            if inspect.isclass(obj) or inspect.isfunction(obj):
                required.add(path)
    missing = sorted(required - _documented_paths())
    assert not missing, f"public names without an API entry under their import path: {missing}"


def test_the_optimizer_entry_documents_its_attributes(site: Path) -> None:
    text = re.sub(r"<[^>]+>", " ", (site / "api" / "optimizer.html").read_text())
    entry = text[text.index("SharpBilevelOptimizer") :]
    for attribute in ("base_optimizer", "steps_taken", "skipped_steps", "last_step"):
        assert attribute in entry[: entry.index("Examples")], attribute


def test_docstring_examples_run_as_doctests(tmp_path: Path) -> None:
    script = """
import doctest, importlib, pkgutil, sys
import sharp_bilevel, sharp_bilevel.adapters
failed = tried = 0
for package in (sharp_bilevel, sharp_bilevel.adapters):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if info.name.endswith("__main__"):
            continue
        result = doctest.testmod(importlib.import_module(info.name), optionflags=doctest.ELLIPSIS)
        failed += result.failed
        tried += result.attempted
print(tried)
sys.exit(1 if failed else 0)
"""
    result = run_python(script, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert int(result.stdout.strip().splitlines()[-1]) >= 10  # the examples really ran


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[dev]')")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_site_builds_strictly_and_fetches_nothing_at_view_time(site: Path) -> None:
    pages = list(site.rglob("*.html"))
    assert len(pages) >= 12
    external = re.compile(r"<(?:script|link|img|iframe)[^>]+(?:src|href)=[\"']https?://", re.I)
    for page in pages:
        text = page.read_text(errors="replace")
        assert not external.search(text), f"{page.name} loads an external resource"
        assert "fonts.googleapis" not in text


def test_the_site_typesets_maths_and_shows_no_raw_markup(site: Path) -> None:
    raw = re.compile(r"\.\. math::|:(?:meth|func|class|mod|attr|data):`|\\\(|\\\[")
    for page in site.rglob("*.html"):
        text = page.read_text(errors="replace")
        text = re.sub(r"<(pre|code)\b.*?</\1>", "", text, flags=re.S)  # code may show anything
        found = raw.search(text)
        assert found is None, f"{page.relative_to(site)} shows raw markup {found.group(0)!r}"
    for name in ("rules.html", "api/optimizer.html", "api/trajectory.html", "distributed.html"):
        assert (site / name).read_text().count("<math") >= 3, f"{name} has no typeset maths"


def test_api_page_renders_the_optimizer_signature_in_chromium(site: Path, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,900",
    ]
    url = (site / "api" / "optimizer.html").as_uri()
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=300
    )
    text = re.sub(r"<[^>]+>", "", dom.stdout)
    assert "SharpBilevelOptimizer(" in text
    for argument in ("base_optimizer", "perturbation", "rho", "smooth", "nonfinite"):
        assert argument in text
    shot = tmp_path / "api.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=300)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("fork", ["mtt", "ftd", "datm"])
def test_every_rule_row_of_a_swap_page_runs_with_the_rest_of_its_diff(fork: str) -> None:
    """The rule tables promise: swap the row's arguments into the diff, change nothing else."""
    import warnings

    import torch

    from sharp_bilevel import SharpBilevelOptimizer

    text = (DOCS / "swap" / f"{fork}.md").read_text()
    rows = re.findall(r"^\| [^|]+ \| `(perturbation=[^`]+)` \|$", text, re.M)
    assert len(rows) == 6, rows
    for arguments in rows:
        kwargs = eval(f"dict({arguments})")  # the page's own text, e.g. perturbation="sam", rho=.05
        image_syn = torch.randn(4, 1, 8, 8, requires_grad=True)
        syn_lr = torch.tensor(0.01, requires_grad=True)
        groups = [
            {"params": [image_syn], "lr": 1000.0},
            {"params": [syn_lr], "lr": 1e-5, "perturb": False},
        ]
        if fork == "datm":
            label_syn = torch.randn(4, 3, requires_grad=True)
            groups.append({"params": [label_syn], "lr": 2.0, "momentum": 0.9, "perturb": False})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt = SharpBilevelOptimizer(groups, momentum=0.5, **kwargs)

        def closure(*, images=image_syn, lr=syn_lr):  # type: ignore[no-untyped-def]
            loss = images.square().sum() * lr
            loss.backward()
            return loss

        opt.step(closure)
    assert "from sharp_bilevel import satm_optimizer" in text
    assert "+        lr=args.lr_img, rho=0.05, gamma=0.01, seed=0)" in text


def test_the_changelog_opens_with_the_package_version() -> None:
    import tomllib

    import sharp_bilevel

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert sharp_bilevel.__version__ == version
    first = re.search(r"^## (\S+)", (DOCS / "changelog.md").read_text(), re.M)
    assert first is not None
    assert first.group(1) == version
