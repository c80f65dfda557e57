"""The docs site cannot drift from the code: its examples run, it builds strictly, offline,
and its API page renders the optimizer's signature in a real browser."""

from __future__ import annotations

import html
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
    # a Sphinx role shows as `:meth:` before a backtick or, once Markdown has made the
    # backticks code, before <code> (code's content is dropped below, its tag kept)
    role = r":(?:meth|func|class|mod|attr|data|exc|obj):(?:`|<code|\s)"
    raw = re.compile(rf"\.\. math::|{role}|\\\(|\\\[")
    for page in site.rglob("*.html"):
        text = page.read_text(errors="replace")
        text = re.sub(r"<pre\b.*?</pre>", "", text, flags=re.S)  # code may show anything
        text = re.sub(r"<code\b.*?</code>", "<code>", text, flags=re.S)
        found = raw.search(text)
        assert found is None, f"{page.relative_to(site)} shows raw markup {found.group(0)!r}"
    for name in ("rules.html", "api/optimizer.html", "api/trajectory.html", "distributed.html"):
        assert (site / name).read_text().count("<math") >= 3, f"{name} has no typeset maths"


def _chromium(tmp_path: Path, *extra: str) -> list[str]:
    """Headless Chromium's command line at 1280 x 900 (skips the test without Chromium)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
        *extra,
    ]


def _dom(tmp_path: Path, url: str, budget_ms: int = 0) -> str:
    """The DOM Chromium holds after loading ``url`` (and ``budget_ms`` of virtual time)."""
    extra = [f"--virtual-time-budget={budget_ms}"] if budget_ms else []
    command = [*_chromium(tmp_path, *extra), "--dump-dom", url]
    return subprocess.run(command, capture_output=True, text=True, timeout=300).stdout


def test_api_page_renders_the_optimizer_signature_in_chromium(site: Path, tmp_path: Path) -> None:
    url = (site / "api" / "optimizer.html").as_uri()
    text = re.sub(r"<[^>]+>", "", _dom(tmp_path, url))
    assert "SharpBilevelOptimizer(" in text
    for argument in ("base_optimizer", "perturbation", "rho", "smooth", "nonfinite"):
        assert argument in text
    shot = tmp_path / "api.png"
    subprocess.run(
        [*_chromium(tmp_path), f"--screenshot={shot}", url], capture_output=True, timeout=300
    )
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


def _nav() -> list[object]:
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    return list(config["nav"])


def _nav_pages(entries: object) -> list[str]:
    """Every page a nav (or part of one) names, in order."""
    if isinstance(entries, str):
        return [entries]
    if isinstance(entries, dict):
        return [p for value in entries.values() for p in _nav_pages(value)]
    if isinstance(entries, list):
        return [p for entry in entries for p in _nav_pages(entry)]
    raise TypeError(entries)


def _section(title: str) -> list[str]:
    for entry in _nav():
        if isinstance(entry, dict) and title in entry:
            return _nav_pages(entry[title])
    raise AssertionError(f"the nav has no section {title!r}")


def test_the_nav_holds_every_page_once() -> None:
    pages = _nav_pages(_nav())
    assert len(pages) == len(set(pages)), "a page is listed twice"
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert set(pages) == on_disk, set(pages) ^ on_disk


def test_the_nav_groups_pages_by_family_with_a_runnable_examples_page() -> None:
    """Each family of objectives has a section with its pages and an examples page whose code
    the page test runs; the pages every family shares stay outside the family sections."""
    trajectory = _section("Trajectory matching")
    for page in ("swap/mtt.md", "swap/ftd.md", "swap/datm.md", "tuh-tr.md", "variants.md"):
        assert page in trajectory
    assert "lr-learning.md" in trajectory
    families = [
        entry
        for entry in _nav()
        if isinstance(entry, dict) and next(iter(entry)).endswith(" matching")
    ]
    assert families, "no family section"
    for family in families:
        examples = [p for p in _nav_pages(family) if p.startswith("examples/")]
        assert examples, f"{next(iter(family))} has no examples page"
        for page in examples:
            assert python_blocks(DOCS / page), f"{page} has no python block to run"
    general = set(_nav_pages(_nav())) - {p for f in families for p in _nav_pages(f)}
    for page in (
        "install.md",
        "rules.md",
        "mixed-precision.md",
        "checkpointing.md",
        "cli.md",
        "distributed.md",
        "troubleshooting.md",
    ):
        assert page in general, page


def test_the_site_shows_the_package_version(site: Path) -> None:
    import sharp_bilevel

    version = sharp_bilevel.__version__
    header = re.search(
        r'<span class="md-ellipsis">\s*([^<]+?)\s*</span>', (site / "index.html").read_text()
    )
    assert header is not None
    assert header.group(1) == f"sharp_bilevel {version}"
    for name in ("index.html", "install.html", "api/optimizer.html"):
        assert f"sharp_bilevel {version}" in (site / name).read_text(), name
    assert "<!-- package-version -->" not in (site / "install.html").read_text()


def test_the_home_page_and_the_rules_page_list_every_registered_rule(site: Path) -> None:
    from sharp_bilevel import available_perturbations

    home = (site / "index.html").read_text()
    table = home[home.index('id="the-rules"') :]
    table = table[: table.index("</table>")]
    shown = re.findall(r"<tr>\s*<td><code>([^<]+)</code></td>", table)
    assert sorted(shown) == available_perturbations()
    rules = (DOCS / "rules.md").read_text()
    for table_header in ("| rule (aliases) | ascent", "| rule | hyperparameters"):
        block = rules[rules.index(table_header) :].split("\n\n")[0]
        names = re.findall(r"^\| `([^`]+)`", block, re.M)
        assert sorted(names) == available_perturbations(), table_header


def test_search_works_on_the_site_opened_from_disk(site: Path, tmp_path: Path) -> None:
    """Material's offline plugin inlines the index; our polyfill runs the search worker on
    file:// pages (browsers refuse a real worker there and the theme then hides the box)."""
    index = (site / "search" / "search_index.js").read_text()
    assert index.startswith("var __index = {")
    for page in site.rglob("*.html"):
        text = page.read_text()
        assert re.search(r'<script src="/?(\.\./)*assets/javascripts/iframe-worker\.js">', text), (
            page
        )
        assert "unpkg.com" not in text, page
    dom = _dom(tmp_path, (site / "index.html").as_uri() + "?q=sharpness", budget_ms=10000)
    search = re.search(r'<div class="md-search"[^>]*>', dom)
    assert search is not None
    assert "hidden" not in search.group(0), "the search box is hidden"
    found = re.search(r'md-search-result__meta">(\d+) matching documents', dom)
    assert found is not None, "the search found nothing"
    assert int(found.group(1)) >= 5
    assert dom.count("md-search-result__link") >= 5


# a table is cut off when it scrolls inside itself or ends right of its scrolling wrapper
_OVERFLOW_PROBE = """<script>
addEventListener("load", () => {
  const cut = [...document.querySelectorAll(".md-content table")]
    .filter((t) => {
      const wrap = t.closest(".md-typeset__scrollwrap") || t;
      const right = (box) => box.getBoundingClientRect().right;
      return t.scrollWidth > t.clientWidth + 1 || right(t) > right(wrap) + 1;
    })
    .map((t) => (t.querySelector("th") || t).textContent.trim().slice(0, 40));
  const out = document.createElement("pre");
  out.id = "overflow-probe";
  out.textContent = JSON.stringify(cut);
  document.body.appendChild(out);
});
</script>"""


# the pages with the widest tables: maths (rules), registry and install tables, eight numeric
# columns (benchmarks), mkdocstrings' parameter tables (the optimizer's API entry)
WIDE_TABLE_PAGES = [
    "index.html",
    "rules.html",
    "install.html",
    "troubleshooting.html",
    "benchmarks.html",
    "api/optimizer.html",
]


@pytest.mark.parametrize("name", WIDE_TABLE_PAGES)
def test_tables_fit_the_page_at_1280_pixels(site: Path, tmp_path: Path, name: str) -> None:
    """No table of these pages is wider than its column (nothing cut off or scrolled)."""
    import json

    page = site / name
    probe = page.with_name(f"probe-{page.name}")  # beside the page: its relative links hold
    probe.write_text(page.read_text().replace("</body>", _OVERFLOW_PROBE + "</body>"))
    try:
        dom = _dom(tmp_path, probe.as_uri(), budget_ms=3000)
    finally:
        probe.unlink()
    found = re.search(r'<pre id="overflow-probe">(.*?)</pre>', dom)
    assert found is not None, "the probe did not run"
    assert json.loads(html.unescape(found.group(1))) == [], f"{name}: tables wider than the page"
