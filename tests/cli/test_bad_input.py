"""Bad input is refused before any work, in one line naming the flag (or field) and what it
allows, with exit status 2 and no traceback (issue 8, "Bad input, refused before any work")."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from sharp_bilevel.cli import app as cli
from sharp_bilevel.distill.pipeline import DistillConfig
from sharp_bilevel.distill.validation import ConfigError

# argv, the flag the message must name, a pattern of what it must say.
CLI_CASES = [
    (["--rho", "-1"], "--rho", r"> 0"),
    (["--rho", "nan"], "--rho", r"finite"),
    (["--smooth", "-0.1"], "--smooth", r">= 0"),
    (["--perturbations", "bogus"], "--perturbations", r"unknown name 'bogus'; known: satm"),
    (["--perturbations", "none,bogus"], "--perturbations", r"unknown name 'bogus'"),
    (["--perturbations", ","], "--perturbations", r"comma-separated list"),
    (["--perturbations", "sam,SAM"], "--perturbations", r"twice"),
    (["--ipc", "1000"], "--ipc", r"at most \d+ for digits"),
    (["--ipc", "0"], "--ipc", r">= 1"),
    (["--ipc", "1.5"], "--ipc", r"invalid int value"),
    (["--expert-epochs", "50"], "--expert-epochs", r"beyond --train-epochs 6"),
    (["--max-start-epoch", "0"], "--max-start-epoch", r">= 1"),
    (["--keep", "1.5"], "--keep", r"fraction must be in \(0, 1\]"),
    (["--keep", "abc"], "--keep", r"'all', a step count >= 1, a fraction in \(0, 1\] or a window"),
    (["--keep", "5:2"], "--keep", r"pair of ints \(low, high\) with 1 <= low <= high"),
    (["--keep", "3:20"], "--keep", r"exceeds the number of inner steps 10"),
    (["--hypergradient", "tesla"], "--hypergradient", r"--first-order-lr"),
    (["--hypergradient", "implicit"], "--hypergradient", r"invalid choice"),
    (["--pad", "layers"], "--pad", r"invalid choice"),
    (["--pad", "depth", "--pad-ratio", "1"], "--pad-ratio", r"\[0, 1\)"),
    (["--match-step", "best"], "--match-step", r"invalid choice"),
    (["--autocast", "int8"], "--autocast", r"bf16.*fp16.*got .int8."),
    (["--fixed-fraction", "0.5"], "--fixed-fraction", r"fixes no image"),
    (["--fixed-fraction", "-0.1"], "--fixed-fraction", r"\[0, 1\)"),
    (["--keep", "0"], "--keep", r">= 1"),
    (["--keep", "11"], "--keep", r"exceeds the number of inner steps 10"),
    (["--eval-seeds", "abc"], "--eval-seeds", r"list of ints"),
    (["--eval-seeds", ""], "--eval-seeds", r"list of ints"),
    (["--eval-seeds", "-1"], "--eval-seeds", r"\[0, 9223372036854775807\]"),
    (["--eval-models", "bogus"], "--eval-models", r"unknown name 'bogus'; known: ConvNet"),
    (["--eval-models", "ConvNet,,MLP"], "--eval-models", r"comma-separated"),
    (["--eval-epochs", "0"], "--eval-epochs", r">= 1"),
    (["--limit-train", "100"], "--limit-train", r"fashion-mnist, mnist, cifar10 and cifar100"),
    (["--dataset", "fashion-mnist", "--limit-train", "0"], "--limit-train", r">= 1"),
    (["--dataset", "bogus"], "--dataset", r"one of digits, fashion-mnist"),
    (["--data-root", "/tmp"], "--data-root", r"not used by digits"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent"], "--data-root", r"cannot read"),
    (["--dataset", "cifar10"], "--data-root", r"needs root"),
    (["--model", "bogus"], "--model", r"one of ConvNet"),
    (["--width", "0"], "--width", r">= 1"),
    (["--threshold", "nan"], "--threshold", r"finite number > 0"),
    (["--lr-img", "nan"], "--lr-img", r"finite number > 0"),
    (["--lr-img", "0"], "--lr-img", r"> 0"),
    (["--lr-lr", "-1"], "--lr-lr", r"> 0"),
    (["--lr-teacher", "inf"], "--lr-teacher", r"finite"),
    (["--ema-decay", "1"], "--ema-decay", r"\[0, 1\)"),
    (["--iterations", "0"], "--iterations", r">= 1"),
    (["--syn-steps", "0"], "--syn-steps", r">= 1"),
    (["--seed", "-1"], "--seed", r"\[0, 9223372036854775807\]"),
    (["--seed", str(2**70)], "--seed", r"\[0, 9223372036854775807\]"),
    (["--num-experts", "0"], "--num-experts", r">= 1"),
    (["--train-epochs", "0"], "--train-epochs", r">= 1"),
    (["--buffers", "/nonexistent"], "--buffers", r"holds no replay_buffer"),
    (["--method", "tesla"], "--method", r"invalid choice"),
    (["--nonfinite", "ignore"], "--nonfinite", r"invalid choice"),
    (["--device", "tpu"], "--device", r"cpu, cuda or cuda:<index>"),
    (["--device", "nonsense"], "--device", r"cpu, cuda or cuda:<index>"),
    (["--pad-ratio", "0.3"], "--pad-ratio", r"only with --pad \(depth or loss_rank\)"),
    (["--threads", "0"], "--threads", r"an int >= 1, got '0'"),
    (["--threads", "two"], "--threads", r"an int >= 1, got 'two'"),
]
if not torch.cuda.is_available():
    CLI_CASES.append((["--device", "cuda"], "--device", r"no CUDA device is available"))


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any expert training or evaluation fails the test: the refusal must come first."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the bad input was refused")

    for name in ("train_expert", "random_real_baseline", "evaluate_synthetic", "distill"):
        monkeypatch.setattr(cli, name, forbidden)


@pytest.mark.parametrize(("argv", "flag", "says"), CLI_CASES, ids=lambda v: str(v))
@pytest.mark.usefixtures("no_work")
def test_cli_refuses_bad_input_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], flag: str, says: str
) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--out", str(out), "--quiet"])
    assert info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err  # one line, no usage block, no traceback
    assert lines[0].startswith("python -m sharp_bilevel: error: argument " + flag), lines[0]
    assert f"{flag}:" in lines[0]
    assert re.search(says, lines[0]), lines[0]
    assert not (out / "experts").exists()


def _page_examples() -> list[tuple[list[str], str]]:
    """``$ python -m sharp_bilevel ARGS`` lines of docs/cli.md and the line printed under each."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    lines = text.splitlines()
    return [
        (line.split()[4:], lines[i + 1])
        for i, line in enumerate(lines)
        if line.startswith("$ python -m sharp_bilevel ")
    ]


@pytest.mark.usefixtures("no_work")
def test_the_cli_page_shows_what_the_cli_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    examples = _page_examples()
    assert len(examples) >= 2
    for argv, shown in examples:
        with pytest.raises(SystemExit):
            cli.main([*argv, "--out", str(tmp_path / "out"), "--quiet"])
        assert capsys.readouterr().err.strip() == shown, argv


def test_cli_real_bugs_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(*args: object, **kwargs: object) -> None:
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(cli, "check_arguments", bug)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["--quiet"])


# field values, the field the error must name, a pattern of what it must say.
CONFIG_CASES = [
    ({"lr_img": "0.1"}, "lr_img", r"finite number > 0, got '0.1'"),
    ({"lr_img": math.nan}, "lr_img", r"finite number > 0"),
    ({"lr_lr": True}, "lr_lr", r"finite number > 0, got True"),
    ({"seed": 2**70}, "seed", r"\[0, 9223372036854775807\]"),
    ({"seed": -1}, "seed", r"\[0, 9223372036854775807\]"),
    ({"checkpoint_every": 0}, "checkpoint_every", r">= 1"),
    ({"ipc": 1.5}, "ipc", r"an int >= 1, got 1.5"),
    ({"ipc": True}, "ipc", r"an int >= 1, got True"),
    ({"syn_steps": "10"}, "syn_steps", r"an int >= 1"),
    ({"smooth": True}, "smooth", r">= 0"),
    ({"smooth": -0.1}, "smooth", r">= 0"),
    ({"rho": -1.0}, "rho", r"> 0"),
    ({"rho": "0.1"}, "rho", r"> 0"),
    ({"threshold": math.nan}, "threshold", r"finite number > 0"),
    ({"threshold": math.inf}, "threshold", r"finite number > 0"),
    ({"ema_decay": 1.0}, "ema_decay", r"\[0, 1\)"),
    ({"method": "datm", "min_start_epoch": 5, "max_start_epoch": 3}, "min_start_epoch", r"< max"),
    ({"min_start_epoch": -1}, "min_start_epoch", r">= 0"),
    ({"current_max_start_epoch": 0}, "current_max_start_epoch", r">= 1"),
    ({"expansion_end_epoch": 0}, "expansion_end_epoch", r">= 1"),
    ({"keep": 1.5}, "keep", r"\(0, 1\]"),
    ({"keep": "abc"}, "keep", r"an int, a float in \(0, 1\] or None"),
    ({"keep": 20, "syn_steps": 10}, "keep", r"exceeds"),
    ({"reuse": -1}, "reuse", r">= 0"),
    ({"reuse": 2, "keep": 3, "syn_steps": 10}, "reuse", r"\[iota=7, N=10\)"),
    ({"perturbation": "bogus"}, "perturbation", r"unknown perturbation 'bogus'; known"),
    ({"perturbation": 5}, "perturbation", r"rule name"),
    ({"method": "tesla"}, "method", r"one of mtt, ftd, datm"),
    ({"model": "bogus"}, "model", r"one of ConvNet"),
    ({"width": 0}, "width", r">= 1 or None"),
    ({"batch_syn": 0}, "batch_syn", r">= 1 or None"),
    ({"nonfinite": "ignore"}, "nonfinite", r"one of raise, skip"),
    ({"lr_gradient": "bogus"}, "lr_gradient", r"one of exact, first_order"),
    ({"dsa": "yes"}, "dsa", r"True or False"),
    ({"hypergradient": "tesla"}, "hypergradient", r"lr_gradient='first_order'"),
    ({"hypergradient": "implicit"}, "hypergradient", r"one of bptt, tesla, checkpointed"),
    ({"pad": "layers"}, "pad", r"one of depth, loss_rank"),
    ({"pad_ratio": 1.0}, "pad_ratio", r"\[0, 1\)"),
    ({"match_step": "best"}, "match_step", r"one of final, closest"),
    ({"autocast": "int8"}, "autocast", r"bf16.*float16.*got .int8."),
    ({"compile_inner": "yes"}, "compile_inner", r"True or False"),
    ({"fixed_fraction": 0.4, "ipc": 2}, "fixed_fraction", r"fixes no image"),
    ({"fixed_fraction": 1.0, "ipc": 2}, "fixed_fraction", r"\[0, 1\)"),
    ({"keep": (3, 2)}, "keep", r"pair of ints"),
    ({"keep": (2, 12), "syn_steps": 10}, "keep", r"exceeds"),
]


@pytest.mark.parametrize(("values", "field", "says"), CONFIG_CASES, ids=lambda v: str(v))
def test_config_refuses_bad_values_naming_the_field(
    values: dict[str, object], field: str, says: str
) -> None:
    with pytest.raises(ConfigError, match=says) as info:
        DistillConfig(**values)  # type: ignore[arg-type]
    assert info.value.argument == field
    assert str(info.value).startswith(field)


def test_config_accepts_what_it_documents() -> None:
    DistillConfig(model="convnet", keep=0.5, reuse=True, perturbation="SATM")
    DistillConfig(perturbation="satm", hypergradient="tesla", keep=(2, 5))  # satm: first order
    cfg = DistillConfig(
        pad="loss_rank", pad_ratio=0.5, match_step="closest", fixed_fraction=0.5, ipc=4
    )
    assert cfg.fixed_per_class() == 2
    assert cfg.selection() is not None
    DistillConfig(perturbation="none", rho=0.5)  # one rho for a sweep: not passed to "none"
    DistillConfig(method="datm", min_start_epoch=1, max_start_epoch=3, current_max_start_epoch=9)
    cfg = DistillConfig(method="datm", min_start_epoch=1, max_start_epoch=3)
    assert cfg.start_epoch_window() == (1, 2, 3)
    assert DistillConfig(current_max_start_epoch=9).start_epoch_window() == (0, 4, 4)


# ------------------------------------------------------------------ issue 21, point 6
def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    return lines[0]


@pytest.mark.usefixtures("no_work")
def test_an_out_that_is_a_file_is_refused_naming_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("not a folder")
    for out in (existing, existing / "run"):
        with pytest.raises(SystemExit) as info:
            cli.main(["--out", str(out), "--quiet"])
        assert info.value.code == 2
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith("python -m sharp_bilevel: error: argument --out: must be a folder")
        assert f"{existing} " in line
        assert "another --out" in line
    assert existing.read_text() == "not a folder"


@pytest.mark.usefixtures("no_work")
def test_fixed_fraction_under_torchrun_is_refused_before_the_experts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to train the experts, then die in the pipeline with a traceback."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        cli.main(["--fixed-fraction", "0.5", "--ipc", "2", "--out", str(out), "--quiet"])
    assert info.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "argument --fixed-fraction: cannot be sharded over 2 torchrun ranks" in line
    assert "drop --fixed-fraction" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("spelling", "name"),
    [("bf16", "bfloat16"), ("BFloat16", "bfloat16"), ("torch.bfloat16", "bfloat16"),
     ("fp16", "float16"), ("float16", "float16"), ("half", "float16"), ("off", None)],
)  # fmt: skip
def test_every_autocast_spelling_reaches_the_config(spelling: str, name: str | None) -> None:
    """Issue 21, point 11: the CLI refused ``bf16``, which the Python API accepts."""
    args = cli.build_parser().parse_args(["--autocast", spelling])
    config = cli._config(args, "none")
    assert config.autocast == name
    assert DistillConfig(autocast=spelling).autocast == name  # the Python API, same parser


def test_the_python_api_takes_dtypes_and_names_alike() -> None:
    from sharp_bilevel.trajectory.matching import autocast_dtype

    by_dtype = DistillConfig(perturbation="satm", autocast=torch.bfloat16)
    by_name = DistillConfig(perturbation="satm", autocast="bf16")
    assert by_dtype == by_name
    assert by_dtype.autocast == "bfloat16"
    assert autocast_dtype(by_name.autocast) is torch.bfloat16
    assert DistillConfig(autocast=torch.float16).autocast == "float16"
    with pytest.raises(ConfigError, match=r"'bf16', 'bfloat16', 'fp16', 'float16'") as info:
        DistillConfig(autocast=torch.int8)  # type: ignore[arg-type]
    assert info.value.argument == "autocast"
