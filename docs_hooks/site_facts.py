"""MkDocs hook: facts the site shows that must come from the package, never be typed twice.

- The version: read from ``pyproject.toml`` (``[project] version``, the one place it is written;
  ``sharp_bilevel.__version__`` reads the installed metadata of the same field), appended to the
  site name in the header of every page and written where a page has ``<!-- package-version -->``.
- The rules: ``<!-- rules-summary -->`` becomes a table of every rule the registry
  (``sharp_bilevel/optim/perturbations/registry.py``) registers, with its aliases and the first
  line of its class docstring. The registry's ``register_perturbation("name", Class,
  aliases=(...))`` calls are read statically (``ast``) and the docstrings with griffe, as
  mkdocstrings reads them, so building the site needs no torch.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path
from typing import Any

import griffe

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "sharp_bilevel" / "optim" / "perturbations" / "registry.py"


@cache
def package_version() -> str:
    """``[project] version`` of ``pyproject.toml`` (read without ``tomllib``: Python 3.10
    builds the site too)."""
    text = (ROOT / "pyproject.toml").read_text()
    project = text[text.index("\n[project]\n") :]
    found = re.search(r'^version\s*=\s*"([^"]+)"', project, re.M)
    if found is None:
        raise ValueError("pyproject.toml: [project] has no version")
    return found.group(1)


def registered_rules() -> list[tuple[str, str, tuple[str, ...]]]:
    """``(name, class name, aliases)`` of each module-level ``register_perturbation`` call."""
    rules = []
    for node in ast.parse(REGISTRY.read_text()).body:
        call = node.value if isinstance(node, ast.Expr) else None
        if not (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Name)
            and call.func.id == "register_perturbation"
        ):
            continue
        name, factory = call.args[0], call.args[1]
        if not (isinstance(name, ast.Constant) and isinstance(factory, ast.Name)):
            raise ValueError(f"{REGISTRY}: cannot read {ast.unparse(call)}")
        aliases: tuple[str, ...] = ()
        for keyword in call.keywords:
            if keyword.arg == "aliases":
                aliases = tuple(ast.literal_eval(keyword.value))
        rules.append((str(name.value), factory.id, aliases))
    return rules


@cache
def _registry_module() -> Any:
    return griffe.load("sharp_bilevel", search_paths=[str(ROOT)])["optim.perturbations.registry"]


def _summary(class_name: str) -> str:
    target = _registry_module()[class_name]
    target = target.final_target if getattr(target, "is_alias", False) else target
    doc = target.docstring.value.strip() if target.docstring else ""
    first = doc.split("\n\n")[0].replace("\n", " ")
    return first.replace("|", "\\|")


def rules_table() -> str:
    """One row per registered rule: name (linked to the rules page), aliases, summary."""
    rows = ["| rule | aliases | what it does |", "|---|---|---|"]
    for name, class_name, aliases in registered_rules():
        shown = ", ".join(f"`{a}`" for a in aliases)
        rows.append(f"| `{name}` | {shown} | {_summary(class_name)} |")
    return "\n".join(rows)


def on_config(config: Any, **kwargs: Any) -> Any:
    """Show the version beside the site name on every page."""
    if not config.site_name.endswith(package_version()):  # once, also under `mkdocs serve`
        config.site_name = f"{config.site_name} {package_version()}"
    return config


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """Fill the ``<!-- package-version -->`` and ``<!-- rules-summary -->`` markers."""
    markdown = markdown.replace("<!-- package-version -->", package_version())
    if "<!-- rules-summary -->" in markdown:
        markdown = markdown.replace("<!-- rules-summary -->", rules_table())
    return markdown
