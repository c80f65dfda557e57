"""The distillation loop of the main job: MTT, FTD or DATM with any perturbation rule.

One outer iteration: pick an expert and a start epoch ``t`` (uniform in ``[0, max_start_epoch)``;
DATM's ramping window), build the
`TrajectoryMatching` closure for
``(w*_t, w*_{t+M})``, take one ``SharpBilevelOptimizer`` step (DATM: gated by ``threshold``),
update FTD's image average. Every random choice comes from one generator whose
state is checkpointed with everything else, so a resumed run continues bit-identically.

About 500 lines because the loop and its resume checks (ranks agreeing on the checkpoint, the
checkpoint's fields against this run) sit together; when gradient and distribution matching
join the pipeline, the trajectory-matching iteration moves into a module of its own.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..adapters import datm
from ..adapters.ftd import ImageEMA
from ..optim.errors import NonFiniteError
from ..optim.optimizer import SharpBilevelOptimizer
from ..trajectory.augment import DSA
from ..trajectory.matching import TrajectoryMatching
from ..trajectory.sharded import Shard, check_shardable
from ..trajectory.student import FunctionalStudent
from .checkpoint import (
    CheckpointContentError,
    agree_on_checkpoint,
    atomic_save,
    load_checkpoint,
    remove_stale_temporaries,
    validate_checkpoint,
)
from .config import METHODS, RESUMABLE_CHANGES, DistillConfig
from .data import class_balanced_indices
from .diagnostics import LR_FLOOR, DistillationWarning, RunDiagnostics
from .experts import experts_fingerprint
from .networks import get_network
from .sharding import gather_optimizer_state, gather_rows, map_rows, slice_optimizer_state
from .validation import ConfigError

__all__ = [
    "METHODS",
    "DistillConfig",
    "DistillResult",
    "ResumeError",
    "check_checkpoint",
    "distill",
]

Expert = Sequence[Sequence[Tensor]]


@dataclass
class DistillResult:
    """What a run produced: the synthetic set, its learned lr, the per-iteration history and the
    set it started from (``initial_images``/``initial_labels``)."""

    config: DistillConfig
    images: Tensor
    labels: Tensor
    syn_lr: float
    ema_images: Tensor | None
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    diagnostics: RunDiagnostics = field(default_factory=RunDiagnostics)
    initial_images: Tensor | None = None
    initial_labels: Tensor | None = None

    @property
    def soft_labels(self) -> bool:
        """True for DATM's logits ``[n, classes]``."""
        return self.labels.dim() == 2


class ResumeError(ConfigError):
    """A checkpoint was written by a run with other settings or other experts.

    Attributes:
        path: the checkpoint.
        changes: setting name -> ``(value in the checkpoint, value now)``.
    """

    def __init__(self, path: Path, changes: dict[str, tuple[Any, Any]]) -> None:
        self.path = path
        self.changes = changes
        said = ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in changes.items())
        super().__init__(
            next(iter(changes)),
            f"differs from {path}, which was written with {said}; remove it to start over",
        )


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


def _split_fixed(
    config: DistillConfig, images: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(learnable images, their labels, fixed images, their labels)``: the last
    ``fixed_per_class`` images of each class stay fixed (None, None when there are none)."""
    fixed = config.fixed_per_class()
    if fixed == 0:
        return images, labels, None, None
    per_class = config.ipc
    # _initial_state lays the set out class by class, ipc images each
    rows = torch.arange(len(images)).reshape(-1, per_class)
    learn, keep = rows[:, : per_class - fixed].reshape(-1), rows[:, per_class - fixed :].reshape(-1)
    return images[learn], labels[learn], images[keep].detach(), labels[keep].detach()


#: The float16 ``GradScaler``'s first scale. torch's default, 65536, suits a summed loss over
#: a large batch; the matching loss is normalised (about 1) and its gradient flows back through
#: every inner step, so at 65536 the unroll's float16 backward overflows: on digits the scaler
#: skipped the first 5 steps backing off to 2048, then 2 more down to 512. Starting at 256 the
#: same run skips none.
FLOAT16_INIT_SCALE = 2.0**8


def _scaler_for(config: DistillConfig, device: torch.device | str) -> Any:
    """A ``GradScaler`` for float16 mixed precision (None otherwise)."""
    if config.autocast != "float16":
        return None
    return torch.amp.GradScaler(torch.device(device).type, init_scale=FLOAT16_INIT_SCALE)


def _joined(part: Tensor, fixed: Tensor | None, classes: int) -> Tensor:
    """The whole synthetic set in its class-major layout, learnable and fixed rows merged back
    (each class: its learnable images, then its fixed ones)."""
    if fixed is None:
        return part
    shape = part.shape[1:]
    learnable = part.reshape(classes, -1, *shape)
    kept = fixed.to(part.device, part.dtype).reshape(classes, -1, *shape)
    return torch.cat([learnable, kept], dim=1).reshape(-1, *shape)


def check_checkpoint(
    path: str | Path, config: DistillConfig, experts_id: str | None = None
) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if ``config`` (and ``experts_id`` when given) can resume it,
    None when there is no file.

    Raises:
        ResumeError: it was written with other settings or experts (each one is named).
        ConfigError: it is further along than ``config.iterations``.
        CheckpointContentError: a field is missing or impossible (`validate_checkpoint`; the
            file and the field are named).
        ValueError: it is not a readable checkpoint.
    """
    path = Path(path)
    if not path.exists():
        return None
    saved = validate_checkpoint(load_checkpoint(path), path)
    _check_resumable(saved, config, experts_id, path)
    return saved


def _check_resumable(
    saved: dict[str, Any], config: DistillConfig, experts_id: str | None, path: Path
) -> None:
    """Refuse a checkpoint of other settings or experts, naming each difference."""
    recorded = saved.get("config", {})
    now = dataclasses.asdict(config)
    changes = {
        k: (recorded.get(k), now.get(k))
        for k in config.differences(recorded)
        if k not in RESUMABLE_CHANGES
    }
    if experts_id is not None and saved.get("experts_id") != experts_id:
        changes["experts"] = (str(saved.get("experts_id"))[:12], experts_id[:12])
    if changes:
        raise ResumeError(path, changes)
    if saved["iteration"] > config.iterations:
        raise ConfigError(
            "iterations",
            f"must be at least {saved['iteration']} to resume {path}, which is at that "
            f"iteration (raise it to extend the run), got {config.iterations}",
        )


def _restore(path: Any, field: str, load: Callable[[Any], None], state: Any) -> None:
    """``load(state)``, any failure reported as the checkpoint field it came from."""
    try:
        load(state)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        message = f"cannot be restored ({type(err).__name__}: {err})"
        raise CheckpointContentError(path, field, message) from err


def _check_shapes(saved: dict[str, Any], path: Any, shapes: dict[str, torch.Size]) -> None:
    """The checkpoint's images and labels must have this run's whole shapes."""
    for key, shape in shapes.items():
        if saved[key].shape != shape:
            raise CheckpointContentError(
                path,
                key,
                f"must have this run's shape {tuple(shape)}, got {tuple(saved[key].shape)} "
                "(written for other data, ipc or method?)",
            )


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
    experts_id: str | None = None,
    process_group: Any = None,
) -> DistillResult:
    """Distil ``config.ipc`` images per class by trajectory matching against ``experts``.

    At the end, one `DistillationWarning` per kind of
    trouble seen (``syn_lr`` at its floor, DATM's gate skipping most steps, skipped non-finite
    steps, exploding images) says how often it happened; the counts are in
    ``result.diagnostics``.

    Args:
        config: the run's settings.
        train_images: real training images ``[n, C, H, W]`` (initialisation).
        train_labels: their labels ``[n]``.
        num_classes: number of classes.
        experts: trajectories in MTT's format (epochs of per-parameter tensors).
        checkpoint: a file to write every ``checkpoint_every`` iterations (atomically) and to
            resume from when it exists. Resuming needs the same settings (``iterations`` may be
            raised to extend a run; ``checkpoint_every`` and ``nonfinite`` may change) and the
            same experts; the thread count should match too (a warning says when not).
        device: where the unroll runs.
        progress: called after every iteration with the iteration and its logged values.
        experts_id: a name of the experts recorded in the checkpoint (the CLI passes its
            manifest's identity); by default a SHA-256 of the experts' values.
        process_group: shard the synthetic set over the ranks of this ``torch.distributed``
            group (every rank calls ``distill`` with the same arguments). Each rank keeps the
            rows `Shard.even <sharp_bilevel.trajectory.sharded.Shard.even>` gives it, every
            outer step equals the single-process step up to float summation order, rank 0 writes
            the checkpoint (whole tensors, resumable under any number of ranks) and every rank
            returns the whole set.

    Raises:
        ResumeError: the checkpoint records other settings or experts (each one is named).
        NonFiniteError: with ``nonfinite="raise"``, a NaN/inf outer loss or hypergradient; a
            checkpoint at that iteration is written first, so a rerun with
            ``nonfinite="skip"`` continues from there.
    """
    _check_experts(experts, config)
    is_main = process_group is None or dist.get_rank(group=process_group) == 0
    path = Path(checkpoint) if checkpoint is not None else None
    saved = None
    if path is not None:  # every rank reads it, and all agree, before any other collective
        if is_main:
            remove_stale_temporaries(path.parent, path.name)
        experts_id = experts_id or experts_fingerprint(experts)
        ident = experts_id
        saved = agree_on_checkpoint(
            path, lambda p: check_checkpoint(p, config, ident), process_group
        )
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
    if config.fixed_per_class() and process_group is not None:
        raise ValueError(
            "fixed_fraction (SelMatch-style partial updates) cannot be combined with "
            "process_group yet: run it in one process"
        )
    images, labels, fixed_images, fixed_labels = _split_fixed(config, images, labels)
    whole_shapes = {"images": images.shape, "labels": labels.shape}
    initial_norm = float(images.norm())
    initial_images = _joined(images, fixed_images, num_classes).detach().cpu().clone()
    initial_labels = _joined(labels, fixed_labels, num_classes).detach().cpu().clone()
    if fixed_images is not None and fixed_labels is not None:
        fixed_images, fixed_labels = fixed_images.to(device), fixed_labels.to(device)
    shard = None if process_group is None else Shard.current(len(images), process_group)
    if shard is not None:
        check_shardable(student.fresh_buffers())
        images, labels = shard.rows(images), shard.rows(labels)
    images = images.to(device).requires_grad_(True)
    labels = labels.to(device)
    syn_lr = syn_lr.to(device).requires_grad_(True)
    sharded = shard is not None
    groups: list[dict[str, Any]] = [
        {"params": [images], "sharded": sharded},
        {"params": [syn_lr], "perturb": False, "lr": config.lr_lr},
    ]
    if config.method == "datm":
        labels.requires_grad_(True)
        groups.append(
            {
                "params": [labels],
                "perturb": False,
                "lr": config.lr_labels,
                "momentum": 0.9,
                "sharded": sharded,
            }
        )
    sharded_params = {0, 2} if config.method == "datm" else {0}
    optimizer = SharpBilevelOptimizer(
        groups,
        torch.optim.SGD,
        lr=config.lr_img,
        momentum=0.5,
        seed=config.seed,
        nonfinite=config.nonfinite,
        closure_options={"unroll": config.unroll_settings()},
        process_group=process_group,
        grad_scaler=_scaler_for(config, device),
        **config.rule_kwargs(),
    )
    ema = ImageEMA(images, config.ema_decay).attach(optimizer) if config.method == "ftd" else None
    window = datm.StartEpochWindow(*config.start_epoch_window(), config.expansion_end_epoch)
    augmentation = DSA() if config.dsa else None
    history: dict[str, list[float]] = {
        k: [] for k in ("loss", "perturbed_loss", "grad_norm", "sharpness", "skipped", "syn_lr")
    }
    diagnostics = RunDiagnostics(initial_image_norm=initial_norm)
    start_iteration, seconds = 0, 0.0
    if saved is not None:
        _check_shapes(saved, path, whole_shapes)
        if saved.get("threads") != torch.get_num_threads():
            warnings.warn(
                f"resuming {path} with {torch.get_num_threads()} threads, written with "
                f"{saved.get('threads')}: the continuation is not bit-identical to an "
                "uninterrupted run (float sums depend on the thread count; match it with "
                "torch.set_num_threads)",
                DistillationWarning,
                stacklevel=2,
            )
        optimizer_state, ema_state = saved["optimizer"], saved["ema"]
        if shard is not None:  # the checkpoint holds whole tensors: take this rank's rows
            for key in ("images", "labels"):
                saved[key] = shard.rows(saved[key])
            optimizer_state = slice_optimizer_state(optimizer_state, sharded_params, shard)
            ema_state = map_rows(ema_state, shard.total, shard.rows)
        with torch.no_grad():
            images.copy_(saved["images"])
            syn_lr.copy_(saved["syn_lr"].reshape(()))
            labels.copy_(saved["labels"])
        _restore(path, "optimizer", optimizer.load_state_dict, optimizer_state)
        if ema is not None:
            _restore(path, "ema", ema.load_state_dict, ema_state)
        generator.set_state(saved["generator"])
        history = saved["history"]
        diagnostics = RunDiagnostics(**saved["diagnostics"])
        start_iteration, seconds = saved["iteration"], saved["seconds"]

    def whole(t: Tensor) -> Tensor:
        return (t if shard is None else gather_rows(t, shard)).detach().cpu()

    def save(iteration: int, generator_state: Tensor) -> None:
        if path is None:
            return
        optimizer_state = optimizer.state_dict()
        ema_state = None if ema is None else ema.state_dict()
        if shard is not None:  # every rank joins the gathers; rank 0 writes
            optimizer_state = gather_optimizer_state(optimizer_state, sharded_params, shard)
            ema_state = map_rows(ema_state, shard.count, lambda t: gather_rows(t, shard))
        whole_images, whole_labels = whole(images), whole(labels)
        if not is_main:
            return
        atomic_save(
            {
                "config": dataclasses.asdict(config),
                "experts_id": experts_id,
                "threads": torch.get_num_threads(),
                "iteration": iteration,
                "images": whole_images,
                "syn_lr": syn_lr.detach().cpu(),
                "labels": whole_labels,
                "optimizer": optimizer_state,
                "generator": generator_state,
                "ema": ema_state,
                "history": history,
                "diagnostics": diagnostics.as_dict(),
                "seconds": seconds,
            },
            path,
        )

    gate = datm.gate(config.threshold) if config.method == "datm" else None
    for it in range(start_iteration, config.iterations):
        began = time.perf_counter()
        draws = generator.get_state()  # a checkpoint of iteration ``it`` replays these draws
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
            shard=shard,
            expert_start=expert[start_epoch],
            expert_target=expert[start_epoch + config.expert_epochs],
            syn_steps=config.syn_steps,
            batch_syn=config.batch_syn,
            soft_labels=config.method == "datm",
            augmentation=augmentation,
            seed=int(torch.randint(2**62, (1,), generator=generator)),
            selection=config.selection(),
            match_step=config.match_step,
            fixed_images=fixed_images,
            fixed_labels=fixed_labels,
            autocast=config.autocast,
            compile_inner=config.compile_inner,
        )
        try:
            optimizer.step(closure, skip_if=gate)
        except NonFiniteError as err:
            save(it, draws)  # the optimizer restored the pre-step state
            raise NonFiniteError(
                f"{config.label}, outer iteration {it}: {err}. Rerun with nonfinite='skip' "
                "(CLI: --nonfinite skip) to skip such steps and continue from "
                f"{'the checkpoint just written' if path else 'here'}, or lower lr_img"
            ) from err
        with torch.no_grad():  # a negative inner lr inverts the inner loop (MTT #16)
            clamped = bool(syn_lr < LR_FLOOR)
            syn_lr.clamp_(min=LR_FLOOR)
            image_sq = images.square().sum()
            if shard is not None:
                dist.all_reduce(image_sq, group=process_group)
            image_norm = float(image_sq.sqrt())
        report = optimizer.last_step
        assert report is not None
        scaler = optimizer.grad_scaler
        diagnostics.record(
            clamped=clamped,
            image_norm=image_norm,
            skipped=optimizer.skipped_steps,
            overflow=scaler is not None
            and report.skipped == "nonfinite"
            and math.isfinite(report.loss),  # a finite loss: float16 overflowed in backward
            loss_scale=None if scaler is None else float(scaler.get_scale()),
        )
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
            save(it + 1, generator.get_state())
    if is_main:
        diagnostics.warn(config.label)
    return DistillResult(
        config=config,
        images=_joined(whole(images), fixed_images, num_classes),
        labels=_joined(whole(labels), fixed_labels, num_classes),
        syn_lr=float(syn_lr.detach()),
        ema_images=None if ema is None else _joined(whole(ema.average), fixed_images, num_classes),
        history=history,
        seconds=seconds,
        diagnostics=diagnostics,
        initial_images=initial_images,
        initial_labels=initial_labels,
    )
