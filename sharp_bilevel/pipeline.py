"""The distillation loop of the main job: MTT, FTD or DATM with any perturbation rule.

One outer iteration: pick an expert and a start epoch ``t`` (uniform in ``[0, max_start_epoch)``;
DATM's ramping window), build the :class:`~sharp_bilevel.objectives.TrajectoryMatching` closure
for ``(w*_t, w*_{t+M})``, take one ``SharpBilevelOptimizer`` step (DATM: gated by
``threshold``), update FTD's image average. Every random choice comes from one generator whose
state is checkpointed with everything else, so a resumed run continues bit-identically.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .adapters import datm
from .adapters.ftd import ImageEMA
from .augment import DSA
from .checkpoint import atomic_save, load_checkpoint
from .data import class_balanced_indices
from .hypergradient import UnrollSettings
from .networks import get_network
from .objectives import TrajectoryMatching
from .optimizer import SharpBilevelOptimizer
from .student import FunctionalStudent

METHODS = ("mtt", "ftd", "datm")
Expert = Sequence[Sequence[Tensor]]


@dataclass(frozen=True)
class DistillConfig:
    """Settings of one distillation run (defaults sized for 8x8 digits on two CPU cores).

    ``lr_img=10`` and ``lr_lr=1e-6`` were tuned on MTT alone for digits (``benchmarks/accuracy``):
    MTT's CIFAR values (1000 / 1e-5) make MTT end below its own starting images there and
    collapse ``syn_lr`` within a few iterations. FTD's decay is 0.98 because these runs are
    short (FTD uses 0.999-0.9995 over thousands of iterations).

    ``perturbation="satm"`` is SATM's preset: smoothed SAM (``smooth``, default 0.01) + TUH
    (``keep``, default N/3) + TR + first-order lr. Any other registered rule name uses
    ``keep``/``reuse``/``lr_gradient`` as given (exact BPTT by default, as MTT).
    """

    method: str = "mtt"
    perturbation: str = "none"
    rho: float | None = None
    smooth: float | None = None
    keep: int | float | None = None
    reuse: bool | int = False
    lr_gradient: str = "exact"
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

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("lr_img", "lr_lr", "lr_teacher", "lr_labels"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("ipc", "syn_steps", "expert_epochs", "max_start_epoch", "iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")

    @property
    def label(self) -> str:
        """``method-perturbation``, e.g. ``mtt-satm``."""
        return f"{self.method}-{self.perturbation}"

    def unroll_settings(self) -> UnrollSettings:
        """TUH/TR/lr settings handed to the objective through ``closure_options``."""
        if self.perturbation.lower() == "satm":
            return UnrollSettings.satm(1.0 / 3.0 if self.keep is None else self.keep)
        return UnrollSettings(keep=self.keep, reuse=self.reuse, lr_gradient=self.lr_gradient)


@dataclass
class DistillResult:
    """What a run produced: the synthetic set, its learned lr and the per-iteration history."""

    config: DistillConfig
    images: Tensor
    labels: Tensor
    syn_lr: float
    ema_images: Tensor | None
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def soft_labels(self) -> bool:
        """True for DATM's logits ``[n, classes]``."""
        return self.labels.dim() == 2


def _check_experts(experts: Sequence[Expert], config: DistillConfig) -> None:
    if not experts:
        raise ValueError("no expert trajectories were given")
    needed = config.max_start_epoch - 1 + config.expert_epochs
    shortest = min(len(e) - 1 for e in experts)
    if needed > shortest:
        raise ValueError(
            f"start_epoch + expert_epochs reaches epoch {needed} (max_start_epoch - 1 + "
            f"expert_epochs), but the shortest expert trajectory ends at epoch {shortest}"
        )


def _rule_kwargs(config: DistillConfig) -> dict[str, Any]:
    name = config.perturbation.lower()
    if name == "satm":
        gamma = 0.01 if config.smooth is None else config.smooth
        return {"perturbation": "ssam", "rho": config.rho, "smooth": gamma}
    return {"perturbation": name, "rho": config.rho, "smooth": config.smooth}


def _initial_state(
    config: DistillConfig,
    train_images: Tensor,
    train_labels: Tensor,
    num_classes: int,
    experts: Sequence[Expert],
    student: FunctionalStudent,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """Synthetic images (random real, ``ipc`` per class), labels and ``syn_lr``."""
    order = class_balanced_indices(train_labels, config.ipc, num_classes, generator)
    images = train_images[order].clone()
    hard = train_labels[order].clone()
    if config.method == "datm":
        finals = [expert[-1] for expert in experts]
        targets = datm.soft_label_logits(student, finals, images, hard).detach().clone()
    else:
        targets = hard
    syn_lr = torch.tensor(config.lr_teacher, dtype=images.dtype)
    return images, targets, syn_lr


def distill(
    config: DistillConfig,
    train_images: Tensor,
    train_labels: Tensor,
    num_classes: int,
    experts: Sequence[Expert],
    *,
    checkpoint: str | Path | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> DistillResult:
    """Distil ``config.ipc`` images per class by trajectory matching against ``experts``.

    Args:
        config: the run's settings.
        train_images: real training images ``[n, C, H, W]`` (initialisation).
        train_labels: their labels ``[n]``.
        num_classes: number of classes.
        experts: trajectories in MTT's format (epochs of per-parameter tensors).
        checkpoint: a file to write every ``checkpoint_every`` iterations (atomically) and to
            resume from when it exists and holds the same config.
        device: where the unroll runs.
        progress: called after every iteration with the iteration and its logged values.
    """
    _check_experts(experts, config)
    channels, height, width = train_images.shape[1:]
    network = get_network(
        config.model,
        channels,
        num_classes,
        (height, width),
        width=config.width,
        seed=config.seed,
        device=device,
    )
    student = FunctionalStudent(network)
    generator = torch.Generator().manual_seed(config.seed)
    images, labels, syn_lr = _initial_state(
        config, train_images, train_labels, num_classes, experts, student, generator
    )
    images = images.to(device).requires_grad_(True)
    labels = labels.to(device)
    syn_lr = syn_lr.to(device).requires_grad_(True)
    groups: list[dict[str, Any]] = [
        {"params": [images]},
        {"params": [syn_lr], "perturb": False, "lr": config.lr_lr},
    ]
    if config.method == "datm":
        labels.requires_grad_(True)
        groups.append(
            {"params": [labels], "perturb": False, "lr": config.lr_labels, "momentum": 0.9}
        )
    optimizer = SharpBilevelOptimizer(
        groups,
        torch.optim.SGD,
        lr=config.lr_img,
        momentum=0.5,
        seed=config.seed,
        closure_options={"unroll": config.unroll_settings()},
        **_rule_kwargs(config),
    )
    ema = ImageEMA(images, config.ema_decay).attach(optimizer) if config.method == "ftd" else None
    window = datm.StartEpochWindow(
        config.min_start_epoch,
        max(config.current_max_start_epoch, config.min_start_epoch + 1),
        max(config.max_start_epoch, config.current_max_start_epoch, config.min_start_epoch + 1),
        config.expansion_end_epoch,
    )
    augmentation = DSA() if config.dsa else None
    history: dict[str, list[float]] = {
        k: [] for k in ("loss", "perturbed_loss", "grad_norm", "sharpness", "skipped", "syn_lr")
    }
    start_iteration, seconds = 0, 0.0
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        saved = load_checkpoint(path)
        if saved.get("config") != dataclasses.asdict(config):
            raise ValueError(
                f"{path} was written by a run with other settings; remove it to start over"
            )
        with torch.no_grad():
            images.copy_(saved["images"])
            syn_lr.copy_(saved["syn_lr"])
            labels.copy_(saved["labels"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        history = saved["history"]
        start_iteration, seconds = saved["iteration"], saved["seconds"]

    def save(iteration: int) -> None:
        if path is None:
            return
        atomic_save(
            {
                "config": dataclasses.asdict(config),
                "iteration": iteration,
                "images": images.detach().cpu(),
                "syn_lr": syn_lr.detach().cpu(),
                "labels": labels.detach().cpu(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "ema": None if ema is None else ema.state_dict(),
                "history": history,
                "seconds": seconds,
            },
            path,
        )

    gate = datm.gate(config.threshold) if config.method == "datm" else None
    for it in range(start_iteration, config.iterations):
        began = time.perf_counter()
        expert = experts[int(torch.randint(len(experts), (1,), generator=generator))]
        if config.method == "datm":
            start_epoch = window.sample(it, generator)
        else:
            start_epoch = int(torch.randint(config.max_start_epoch, (1,), generator=generator))
        closure = TrajectoryMatching(
            student,
            images,
            syn_lr,
            labels,
            expert_start=expert[start_epoch],
            expert_target=expert[start_epoch + config.expert_epochs],
            syn_steps=config.syn_steps,
            batch_syn=config.batch_syn,
            soft_labels=config.method == "datm",
            augmentation=augmentation,
            seed=int(torch.randint(2**62, (1,), generator=generator)),
        )
        optimizer.step(closure, skip_if=gate)
        with torch.no_grad():  # a negative inner lr inverts the inner loop (MTT #16)
            syn_lr.clamp_(min=1e-8)
        report = optimizer.last_step
        assert report is not None
        history["loss"].append(report.loss)
        history["perturbed_loss"].append(
            math.nan if report.perturbed_loss is None else report.perturbed_loss
        )
        history["sharpness"].append(math.nan if report.sharpness is None else report.sharpness)
        history["grad_norm"].append(report.grad_norm)
        history["skipped"].append(0.0 if report.skipped is None else 1.0)
        history["syn_lr"].append(float(syn_lr.detach()))
        seconds += time.perf_counter() - began
        if progress is not None:
            progress(it, {k: v[-1] for k, v in history.items()})
        if (it + 1) % config.checkpoint_every == 0 or it + 1 == config.iterations:
            save(it + 1)
    return DistillResult(
        config=config,
        images=images.detach().cpu(),
        labels=labels.detach().cpu(),
        syn_lr=float(syn_lr.detach()),
        ema_images=None if ema is None else ema.average.detach().cpu(),
        history=history,
        seconds=seconds,
    )
