"""``--help`` is plain text with a line for every option, and agrees with the README."""

from __future__ import annotations

import pytest

from sharp_bilevel.cli.app import build_parser
from sharp_bilevel.distill.pipeline import DistillConfig
from sharp_bilevel.distill.validation import ConfigError


def test_every_option_has_help_and_no_markup() -> None:
    parser = build_parser()
    assert all(action.help for action in parser._actions), [
        a.option_strings for a in parser._actions if not a.help
    ]
    text = parser.format_help()
    assert "``" not in text
    assert ":func:" not in text
    assert ":class:" not in text
    assert "under a minute" in " ".join(text.split())  # as README.md says
    assert "torchrun" in text


def test_the_unknown_rule_message_lists_satm() -> None:
    with pytest.raises(ConfigError, match=r"known: \[.*'sam'.*\].*'satm'"):
        DistillConfig(perturbation="bogus")
