"""What a reader types from a swap page is code, and the pages' instructions keep the baseline."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs" / "swap"


def plus_runs(block: str) -> list[str]:
    """Each run of consecutive ``+`` lines of a diff, as one dedented piece of code."""
    runs: list[list[str]] = []
    previous = False
    for line in block.splitlines():
        plus = line.startswith("+") and not line.startswith("+++")
        if plus:
            if not previous:
                runs.append([])
            runs[-1].append(line[1:])
        previous = plus
    return [textwrap.dedent("\n".join(run)) for run in runs]


@pytest.mark.parametrize("fork", ["mtt", "ftd", "datm"])
def test_every_typed_line_of_the_swap_diff_is_python(fork: str) -> None:
    text = (DOCS / f"{fork}.md").read_text()
    first = re.search(r"^```diff\n(.*?)^```", text, re.S | re.M)
    assert first is not None
    runs = plus_runs(first.group(1))
    assert len(runs) >= 3
    for code in runs:
        compile(code, f"{fork}.md", "exec")  # a SyntaxError here is what a reader would get


@pytest.mark.parametrize("fork", ["mtt", "ftd", "datm"])
def test_the_rule_table_says_to_keep_the_momentum(fork: str) -> None:
    text = (DOCS / f"{fork}.md").read_text()
    header = re.search(r"^\| rule \| (.*) \|$", text, re.M)
    assert header is not None
    assert "keep `momentum=0.5`" in header.group(1)
    constructor = re.search(r'^\+        perturbation="[^\n]*momentum=0\.5\)$', text, re.M)
    assert constructor is not None  # the diff's constructor does carry it


@pytest.mark.parametrize(
    ("fork", "commits"),
    [
        ("mtt", ("1a6f630", "50dccea")),
        ("ftd", ("682c0a2", "711532a")),
        ("datm", ("41cbb4c", "97ae510")),
    ],
)
def test_the_page_says_which_upstream_commits_the_diff_applies_to(
    fork: str, commits: tuple[str, str]
) -> None:
    intro = (DOCS / f"{fork}.md").read_text().split("```diff")[0]
    for commit in commits:
        assert f"`{commit}`" in intro, commit
    assert "HEAD" in intro
