"""``DistillConfig``: the settings of one distillation run, checked in full when it is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..optim.perturbations.registry import get_perturbation
from ..trajectory.hypergradient import UnrollSettings
from ..trajectory.matching import autocast_dtype
from ..trajectory.selection import ParameterSelection
from .networks import available_networks
from .validation import (
    ConfigError,
    check_bool,
    check_choice,
    check_int,
    check_real,
    check_seed,
)

METHODS = ("mtt", "ftd", "datm")
NONFINITE_POLICIES = ("raise", "skip")
LR_GRADIENTS = ("exact", "first_order")
HYPERGRADIENTS = ("bptt", "tesla", "checkpointed")
PAD_MODES = ("depth", "loss_rank")
MATCH_STEPS = ("final", "closest")
AUTOCASTS = ("bfloat16", "float16")
#: What SATM's preset (``perturbation="satm"``) sets, whatever the fields say.
SATM_PRESET = ("smooth", "keep", "reuse", "lr_gradient")
#: Settings a resumed run may change: they do not alter the steps already taken.
RESUMABLE_CHANGES = frozenset({"iterations", "checkpoint_every", "nonfinite"})


@dataclass(frozen=True)
class DistillConfig:
    """Settings of one distillation run (defaults sized for 8x8 digits on two CPU cores).

    ``lr_img=10`` and ``lr_lr=1e-6`` were tuned on MTT alone for digits
    (``benchmarks/evidence/accuracy.py``):
    MTT's CIFAR values (1000 / 1e-5) make MTT end below its own starting images there and
    collapse ``syn_lr`` within a few iterations. FTD's decay is 0.98 because these runs are
    short (FTD uses 0.999-0.9995 over thousands of iterations).

    ``perturbation="satm"`` is SATM's preset: smoothed SAM (``smooth``, default 0.01) + TUH
    (``keep``, default N/3) + TR + first-order lr. Any other registered rule name uses
    ``keep``/``reuse``/``lr_gradient`` as given (exact BPTT by default, as MTT). ``rho`` is not
    passed to ``"none"`` (it has no radius), so one ``rho`` can serve a sweep over rules.

    DATM's start-epoch window is ``[min_start_epoch, upper)``, ``upper`` ramping from
    ``current_max_start_epoch`` (clipped into ``(min_start_epoch, max_start_epoch]``) to
    ``max_start_epoch`` over ``expansion_end_epoch`` iterations.

    Trajectory-matching variants (all off by default): ``hypergradient="tesla"`` (TESLA's
    constant-memory hypergradient; needs ``lr_gradient="first_order"``, which the ``satm``
    preset has), ``hypergradient="checkpointed"`` (exact BPTT, segments recomputed),
    ``keep=(low, high)`` (a random truncation window per outer step), ``pad`` with
    ``pad_ratio`` (PAD's parameter selection: ``"depth"`` drops the shallow layers' share,
    ``"loss_rank"`` the best-matched entries), ``match_step="closest"`` (ATT) and
    ``fixed_fraction`` (SelMatch-style partial updates: that share of each class's images,
    rounded down, stays the real images it starts as and is never perturbed).

    ``autocast="bfloat16"`` (or ``"float16"``, with a ``GradScaler`` the run builds; any spelling
    of `autocast_dtype <sharp_bilevel.trajectory.matching.autocast_dtype>`, ``"bf16"``,
    ``"fp16"``, ``torch.bfloat16``, ..., is stored as one of these two names) runs each
    inner step's forward and loss in mixed precision; the images, weights and gradients stay
    float32. ``compile_inner=True`` runs the inner steps that need no graph through
    ``torch.compile`` (the same gradients; faster on CPU for larger batches).

    ``nonfinite="skip"`` skips an outer step whose loss or hypergradient is NaN or infinite
    (counted in the run's diagnostics) instead of stopping the run.

    Every field is checked when the config is built: a bad value raises
    `ConfigError` naming the field and what it allows.
    """

    method: str = "mtt"
    perturbation: str = "none"
    rho: float | None = None
    smooth: float | None = None
    keep: int | float | tuple[int, int] | None = None
    reuse: bool | int = False
    lr_gradient: str = "exact"
    hypergradient: str = "bptt"
    pad: str | None = None
    pad_ratio: float = 0.25
    match_step: str = "final"
    fixed_fraction: float = 0.0
    autocast: str | torch.dtype | None = None
    compile_inner: bool = False
    model: str = "ConvNet"
    width: int | None = 32
    ipc: int = 1
    syn_steps: int = 10
    expert_epochs: int = 2
    max_start_epoch: int = 4
    batch_syn: int | None = None
    iterations: int = 100
    lr_img: float = 10.0
    lr_lr: float = 1e-6
    lr_teacher: float = 0.01
    lr_labels: float = 2.0
    ema_decay: float = 0.98
    threshold: float = 1.0
    min_start_epoch: int = 0
    current_max_start_epoch: int = 2
    expansion_end_epoch: int = 50
    dsa: bool = True
    seed: int = 0
    checkpoint_every: int = 25
    nonfinite: str = "raise"

    def __post_init__(self) -> None:
        try:
            dtype = autocast_dtype(self.autocast)
        except ValueError as err:
            raise ConfigError("autocast", str(err).removeprefix("autocast ")) from None
        name = None if dtype is None else str(dtype).removeprefix("torch.")
        object.__setattr__(self, "autocast", name)  # one spelling, JSON-ready
        validate_config(self)

    @property
    def label(self) -> str:
        """``method-perturbation``, e.g. ``mtt-satm``."""
        return f"{self.method}-{self.perturbation}"

    def unroll_settings(self) -> UnrollSettings:
        """TUH/TR/lr settings handed to the objective through ``closure_options``."""
        if self.perturbation.lower() == "satm":
            keep = 1.0 / 3.0 if self.keep is None else self.keep
            return UnrollSettings(
                keep=keep, reuse=True, lr_gradient="first_order", hypergradient=self.hypergradient
            )
        return UnrollSettings(
            keep=self.keep,
            reuse=self.reuse,
            lr_gradient=self.lr_gradient,
            hypergradient=self.hypergradient,
        )

    def selection(self) -> ParameterSelection | None:
        """PAD's parameter selection for the matching loss (None: every parameter)."""
        return None if self.pad is None else ParameterSelection(self.pad, self.pad_ratio)

    def fixed_per_class(self) -> int:
        """Images per class that stay fixed (``floor(fixed_fraction * ipc)``)."""
        return int(self.fixed_fraction * self.ipc + 1e-9)

    def rule_kwargs(self) -> dict[str, Any]:
        """``perturbation``/``rho``/``smooth`` for `SharpBilevelOptimizer`."""
        name = self.perturbation.lower()
        if name == "satm":
            gamma = 0.01 if self.smooth is None else self.smooth
            return {"perturbation": "ssam", "rho": self.rho, "smooth": gamma}
        rho = None if name in ("none", "mtt", "plain") else self.rho
        return {"perturbation": name, "rho": rho, "smooth": self.smooth}

    def resolved(self) -> dict[str, Any]:
        """What actually runs, defaults filled in: the rule and its hyperparameters, the
        smoothing ``gamma``, and the unroll (``keep_steps``, ``iota``, ``tau``, lr gradient)."""
        kwargs = self.rule_kwargs()
        rule = get_perturbation(kwargs["perturbation"], **_rule_hyperparameters(self))
        smooth = rule.default_smooth if kwargs["smooth"] is None else kwargs["smooth"]
        settings = self.unroll_settings()
        iota, tau = settings.resolve(self.syn_steps, 0.0 if settings.random_window else None)
        names: list[str] = []
        if dataclasses.is_dataclass(rule):
            names = [f.name for f in dataclasses.fields(rule)]
        hyper: dict[str, Any] = {name: getattr(rule, name) for name in names}
        return {
            "rule": type(rule).__name__,
            "perturbation": kwargs["perturbation"],
            **hyper,
            "smooth": smooth,
            "keep_steps": settings.keep if settings.random_window else self.syn_steps - iota,
            "iota": None if settings.random_window else iota,
            "tau": None if settings.random_window else tau,
            "lr_gradient": settings.lr_gradient,
            "hypergradient": settings.hypergradient,
            "selection": None if self.pad is None else f"{self.pad} {self.pad_ratio}",
            "match_step": self.match_step,
            "fixed_per_class": self.fixed_per_class(),
            "autocast": self.autocast,
        }

    def ran(self) -> tuple[dict[str, Any], list[str]]:
        """The settings that ran and the names a preset set: ``asdict`` with SATM's preset
        values (`SATM_PRESET`: ``smooth`` 0.01 unless given, ``keep`` N/3 unless given,
        ``reuse=True``, ``lr_gradient="first_order"``) in place of the fields it overrides."""
        values = dataclasses.asdict(self)
        if self.perturbation.lower() != "satm":
            return values, []
        settings = self.unroll_settings()
        values.update(
            smooth=self.rule_kwargs()["smooth"],
            keep=settings.keep,
            reuse=settings.reuse,
            lr_gradient=settings.lr_gradient,
        )
        return values, list(SATM_PRESET)

    def start_epoch_window(self) -> tuple[int, int, int]:
        """DATM's ``(min_start_epoch, current_max_start_epoch, max_start_epoch)``, clipped."""
        low, high = self.min_start_epoch, self.max_start_epoch
        return low, min(max(self.current_max_start_epoch, low + 1), high), high

    def differences(self, saved: dict[str, Any]) -> list[str]:
        """Names of the fields whose values differ from ``saved`` (a saved ``asdict``)."""
        mine = dataclasses.asdict(self)
        return sorted(k for k in mine.keys() | saved.keys() if mine.get(k) != saved.get(k))


def validate_config(config: DistillConfig) -> None:
    """Check every field of ``config``; raise `ConfigError` naming the first bad one."""
    check_choice("method", config.method, METHODS)
    check_choice("nonfinite", config.nonfinite, NONFINITE_POLICIES)
    check_choice("lr_gradient", config.lr_gradient, LR_GRADIENTS)
    check_choice("hypergradient", config.hypergradient, HYPERGRADIENTS)
    check_choice("match_step", config.match_step, MATCH_STEPS)
    if config.autocast is not None:
        check_choice("autocast", config.autocast, AUTOCASTS)
    if config.pad is not None:
        check_choice("pad", config.pad, PAD_MODES)
    check_real("pad_ratio", config.pad_ratio, 0, 1, high_open=True)
    check_real("fixed_fraction", config.fixed_fraction, 0, 1, high_open=True)
    networks = {name.lower(): name for name in available_networks()}
    if not isinstance(config.model, str) or config.model.lower() not in networks:
        check_choice("model", config.model, networks.values())
    check_int("width", config.width, 1, optional=True)
    for name in ("ipc", "syn_steps", "expert_epochs", "max_start_epoch", "iterations"):
        check_int(name, getattr(config, name), 1)
    for name in ("current_max_start_epoch", "expansion_end_epoch", "checkpoint_every"):
        check_int(name, getattr(config, name), 1)
    check_int("min_start_epoch", config.min_start_epoch, 0)
    check_int("batch_syn", config.batch_syn, 1, optional=True)
    check_seed("seed", config.seed)
    for name in ("lr_img", "lr_lr", "lr_teacher", "lr_labels", "threshold"):
        check_real(name, getattr(config, name), 0, low_open=True)
    check_real("ema_decay", config.ema_decay, 0, 1, high_open=True)
    check_bool("dsa", config.dsa)
    check_bool("compile_inner", config.compile_inner)
    check_real("rho", config.rho, 0, low_open=True, optional=True)
    check_real("smooth", config.smooth, 0, optional=True)
    if config.method == "datm" and config.min_start_epoch >= config.max_start_epoch:
        raise ConfigError(
            "min_start_epoch",
            f"must be < max_start_epoch={config.max_start_epoch} (DATM's window "
            f"[min_start_epoch, max_start_epoch)), got {config.min_start_epoch}",
        )
    if not isinstance(config.perturbation, str):
        raise ConfigError("perturbation", f"must be a rule name, got {config.perturbation!r}")
    try:
        get_perturbation(config.rule_kwargs()["perturbation"], **_rule_hyperparameters(config))
    except (ValueError, TypeError) as err:
        raise ConfigError(
            "perturbation", f"{config.perturbation!r}: {err} (or 'satm', SATM's preset)"
        ) from err
    if not isinstance(config.reuse, bool):
        check_int("reuse", config.reuse, 0)
    tesla = config.hypergradient == "tesla" and config.perturbation.lower() != "satm"
    if tesla and config.lr_gradient != "first_order":
        raise ConfigError(
            "hypergradient",
            "tesla gives the lr gradient in first order only: set lr_gradient='first_order' "
            "(CLI: --first-order-lr), or use the satm preset",
        )
    try:
        settings = config.unroll_settings()
    except ValueError as err:
        argument = "hypergradient" if "tesla" in str(err) else "keep"
        raise ConfigError(argument, str(err)) from err
    if config.fixed_fraction > 0 and config.fixed_per_class() == 0:
        raise ConfigError(
            "fixed_fraction",
            f"{config.fixed_fraction} of ipc={config.ipc} fixes no image (floor(fraction * "
            "ipc) = 0): raise it or the ipc",
        )
    if config.fixed_per_class() >= config.ipc:
        raise ConfigError("fixed_fraction", "must leave at least one learnable image per class")
    try:
        for draw in (0.0, 0.999999) if settings.random_window else (None,):
            settings.resolve(config.syn_steps, draw)
    except ValueError as err:
        argument = "reuse" if "reuse" in str(err) else "keep"
        raise ConfigError(argument, f"{err} (syn_steps={config.syn_steps})") from err


def _rule_hyperparameters(config: DistillConfig) -> dict[str, Any]:
    return {"rho": config.rho} if config.rule_kwargs()["rho"] is not None else {}
