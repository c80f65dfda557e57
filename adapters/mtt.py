"""MTT (Cazenavette et al., CVPR 2022) adapter: the closure for an MTT fork's update block.

In ``distill.py`` the fork keeps its expert choice and start-epoch sampling and replaces the
unroll, loss and the two optimizer steps with::

    closure = mtt.make_closure(student_net, expert_trajectory, start_epoch, image_syn, syn_lr,
                               label_syn, args=args)
    grand_loss = optimizer.step(closure)

where ``optimizer`` is one ``SharpBilevelOptimizer`` over ``image_syn`` and ``syn_lr``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sharp_bilevel.trajectory.hypergradient import UnrollSettings
from sharp_bilevel.trajectory.matching import TrajectoryMatching
from sharp_bilevel.trajectory.selection import ParameterSelection
from sharp_bilevel.trajectory.sharded import Shard
from sharp_bilevel.trajectory.student import Student

from ._common import dsa_from_fork, expert_endpoints, setting
from .distributed import check_same_window

__all__ = ["floor_syn_lr", "make_closure"]


def make_closure(
    student_net: nn.Module | Student,
    expert_trajectory: Sequence[Any],
    start_epoch: int,
    image_syn: Tensor,
    syn_lr: Tensor,
    label_syn: Tensor,
    *,
    args: Any = None,
    expert_epochs: int | None = None,
    syn_steps: int | None = None,
    batch_syn: int | None = None,
    dsa: bool | None = None,
    dsa_strategy: str | None = None,
    dsa_param: Any = None,
    soft_labels: bool = False,
    settings: UnrollSettings | None = None,
    seed: int | None = None,
    shard: Shard | None = None,
    selection: ParameterSelection | None = None,
    match_step: str = "final",
    fixed_images: Tensor | None = None,
    fixed_labels: Tensor | None = None,
    autocast: torch.dtype | str | None = None,
    compile_inner: bool = False,
) -> TrajectoryMatching:
    """Build the outer objective of one MTT iteration.

    Args:
        student_net: MTT's ``ReparamModule`` student or any plain ``nn.Module`` of the same
            architecture (used functionally; never modified).
        expert_trajectory: one expert: a list of epochs, each a list of per-parameter tensors
            (MTT's buffer format) or a flat vector.
        start_epoch: the fork's sampled ``t``; ``t + expert_epochs`` must exist.
        image_syn: the synthetic images ``[classes * ipc, C, H, W]``.
        syn_lr: the learnable inner lr (0-d).
        label_syn: hard labels ``[n]`` (or DATM logits with ``soft_labels=True``).
        args: the fork's argparse namespace; ``expert_epochs``, ``syn_steps``, ``batch_syn``,
            ``dsa``, ``dsa_strategy`` and ``dsa_param`` are read from it unless given here
            (and ``no_aug`` switches augmentation off, as in MTT).
        settings: TUH/TR/lr settings (None: from the optimizer's ``closure_options``, else exact).
        seed: seed of this iteration's step plan (drawn from torch's global RNG when None, so a
            fork's ``torch.manual_seed`` still fixes the run). Under ``torchrun`` pass the same
            seed on every rank (``seed=it``).
        shard: run on several GPUs/machines: ``image_syn``/``label_syn`` hold this rank's rows
            (``Shard.current(total)``); see the "Several GPUs and machines" page. The ranks
            then check, with one all-gather of six integers, that they match the same expert
            window (start epoch, ``expert_epochs``, ``syn_steps``, seed and fingerprints of the
            expert's start and target parameters), and all raise
            `sharp_bilevel.adapters.distributed.RankMismatchError` together if not.
        selection: PAD's parameter selection (`sharp_bilevel.trajectory.selection`).
        match_step: ``"final"`` (MTT) or ``"closest"`` (ATT).
        fixed_images: SelMatch-style partial updates: samples trained on but never learned
            (with ``fixed_labels``); ``image_syn`` then holds the learnable ones only.
        fixed_labels: the labels of ``fixed_images``.
        autocast: mixed precision inside the unroll (``torch.bfloat16``, ``torch.float16``
            with the optimizer's ``grad_scaler=``); see ``TrajectoryMatching``.
        compile_inner: compile the inner steps that need no graph; see ``TrajectoryMatching``.

    TESLA's hypergradient and the random truncation window are ``settings``
    (``UnrollSettings.tesla()``, ``UnrollSettings(keep=(low, high))``), as TUH and TR are.
    """
    epochs = setting(args, "expert_epochs", expert_epochs)
    steps = setting(args, "syn_steps", syn_steps)
    if epochs is None or steps is None:
        raise ValueError("expert_epochs and syn_steps are required (as arguments or in args)")
    start, target = expert_endpoints(expert_trajectory, start_epoch, int(epochs))
    if setting(args, "texture", None, False):
        raise NotImplementedError("MTT's --texture mode (random canvas rolls) is not supported")
    augment = bool(setting(args, "dsa", dsa, False)) and not setting(args, "no_aug", None, False)
    augmentation = dsa_from_fork(
        augment,
        setting(args, "dsa_strategy", dsa_strategy),
        setting(args, "dsa_param", dsa_param),
    )
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if shard is not None:
        check_same_window(
            shard,
            start_epoch=start_epoch,
            expert_epochs=int(epochs),
            syn_steps=int(steps),
            seed=seed,
            start=start,
            target=target,
            like=image_syn,
        )
    return TrajectoryMatching(
        student_net,
        image_syn,
        syn_lr,
        label_syn,
        expert_start=start,
        expert_target=target,
        syn_steps=int(steps),
        batch_syn=setting(args, "batch_syn", batch_syn),
        soft_labels=soft_labels,
        augmentation=augmentation,
        settings=settings,
        seed=seed,
        shard=shard,
        selection=selection,
        match_step=match_step,
        fixed_images=fixed_images,
        fixed_labels=fixed_labels,
        autocast=autocast,
        compile_inner=compile_inner,
    )


def floor_syn_lr(
    optimizer: torch.optim.Optimizer, syn_lr: Tensor, floor: float = 1e-8
) -> RemovableHandle:
    """Keep the learnable inner lr at or above ``floor`` after every ``optimizer.step()``.

    Its own SGD step can push ``syn_lr`` below zero (MTT issue #16: 0.01 -> -0.0275 -> -2627 ->
    NaN at ``lr_lr=1e-4`` upstream); a non-positive rate turns the inner loop into ascent, so the
    next closure refuses it with a ``ValueError``. One line after building the optimizer,
    ``mtt.floor_syn_lr(optimizer, syn_lr)``, clamps it in a post-step hook instead (the main
    job does the same). Returns the hook's handle (``.remove()`` undoes it).

    Raises:
        ValueError: ``floor`` is not a finite number > 0.
    """
    if isinstance(floor, bool) or not isinstance(floor, int | float) or not 0 < floor < math.inf:
        raise ValueError(f"floor must be a finite number > 0, got {floor!r}")

    def clamp(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            syn_lr.clamp_(min=floor)

    return optimizer.register_step_post_hook(clamp)
