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


# The flags and defaults of the flat parser before the split (issue 21), read off that version.
FLAT_DEFAULTS = {
    "dataset": "digits", "data_root": None, "limit_train": None, "model": "ConvNet",
    "width": 32, "buffers": None, "num_experts": 4, "train_epochs": 6, "expert_optimizer": "sgd",
    "method": "mtt", "perturbations": "none,satm", "rho": None, "smooth": None, "keep": None,
    "reuse": False, "first_order_lr": False, "hypergradient": "bptt", "pad": None,
    "pad_ratio": 0.25, "match_step": "final", "fixed_fraction": 0.0, "autocast": "off",
    "compile_inner": False, "ipc": 1, "syn_steps": 10, "expert_epochs": 2, "max_start_epoch": 4,
    "iterations": 100, "lr_img": 10.0, "lr_lr": 1e-06, "lr_teacher": 0.01, "threshold": 1.0,
    "ema_decay": 0.98, "no_dsa": False, "nonfinite": "raise", "eval_models": "ConvNet,MLP",
    "eval_seeds": "0,1,2", "eval_epochs": 300, "out": None, "no_resume": False, "seed": 0,
    "device": "cpu", "quiet": False,
}  # fmt: skip


def test_the_split_keeps_every_flag_and_what_it_runs() -> None:
    """Every flag of the flat parser is still there; the default run's configs are the ones
    the flat defaults gave (``pad_ratio`` and ``autocast`` now resolve in the family)."""
    from sharp_bilevel.cli import app

    args = build_parser().parse_args([])
    assert set(FLAT_DEFAULTS) | {"threads"} == set(vars(args))
    for key, value in FLAT_DEFAULTS.items():
        if key not in ("pad_ratio", "autocast"):
            assert getattr(args, key) == value, key
    assert (args.pad_ratio, args.autocast, args.threads) == (None, None, None)
    for rule in ("none", "satm"):
        config = app._config(args, rule)
        assert config.pad_ratio == FLAT_DEFAULTS["pad_ratio"]
        assert config.autocast is None
        assert config == DistillConfig(perturbation=rule)  # the flat defaults are its own


def test_help_groups_options_by_family() -> None:
    from sharp_bilevel.cli.families import FAMILIES

    parser = build_parser()
    groups = {g.title: {a.dest for a in g._group_actions} for g in parser._action_groups}
    assert [f.title for f in FAMILIES] == ["trajectory matching (--method mtt|ftd|datm)"]
    family = groups["trajectory matching (--method mtt|ftd|datm)"]
    assert {"keep", "reuse", "buffers", "syn_steps", "pad", "pad_ratio", "ema_decay"} <= family
    common = groups["distillation (every family)"]
    assert {"method", "perturbations", "ipc", "autocast", "lr_img"} <= common
    assert "threads" in groups["seed, device and threads"]
    assert not family & common
    text = parser.format_help()
    order = ["\ndata:", "\ndistillation (every family):", "\ntrajectory matching (--method"]
    order += ["\nevaluation and output:", "\nseed, device and threads:"]
    positions = [text.index(title) for title in order]
    assert positions == sorted(positions)
