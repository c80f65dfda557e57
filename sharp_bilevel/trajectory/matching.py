"""MTT-style trajectory matching as a closure for ``SharpBilevelOptimizer``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..optim.context import StepContext
from .compiled import compiled_inner_gradient
from .graphless import checkpointed_pass, tesla_pass
from .hypergradient import UnrollSettings, first_order_lr_grad
from .inner import InnerOptimizer
from .labels import check_labels, output_width
from .reuse import accumulate, assign_lr_grad, record_restart, restart_point, with_before
from .selection import ParameterSelection
from .sharded import Shard
from .step_plan import Augmentation, StepPlan
from .student import Student, as_student
from .unroll import UnrollResult, matching_loss, unroll

_MATCH_STEPS = ("final", "closest")


class TrajectoryMatching:
    r"""The outer objective of one outer iteration; call it (or hand it to ``opt.step``).

    $$
    L(\phi, \alpha) = \frac{\lVert w_N(\phi, \alpha) - w^*_{t+M} \rVert^2}
                           {\lVert w^*_t - w^*_{t+M} \rVert^2}, \qquad w_0 = w^*_t
    $$

    with ``w_N`` the student after ``N = syn_steps`` inner steps on the synthetic set (see
    `sharp_bilevel.trajectory.unroll.unroll`). Build one per outer iteration: the step plan
    (minibatches and augmentation randomness of every inner step) is drawn here, once, so the
    optimizer's second pass at ``phi + eps`` and a trajectory-reuse restart replay the same inner
    problem. The closure
    reads the *current* values of ``images``, ``syn_lr`` and ``labels``, fills their ``.grad`` and
    returns the detached loss.

    In a ``SharpBilevelOptimizer`` step (a ``StepContext`` is passed) it applies the hypergradient
    settings: TUH (``keep``), TR (the ascent pass stores ``w_tau`` in ``ctx.scratch``, the descent
    pass restarts from it) and first-order lr learning (``syn_lr.grad`` assigned as
    ``<dL/dw_N, sum_i u_i>``, the directions of steps before ``tau`` taken from the ascent pass).

    Args:
        student: the network (any ``nn.Module``, MTT's ``ReparamModule`` or a ``Student``);
            never modified.
        images: synthetic images ``[n, C, H, W]`` (the perturbed outer variable).
        syn_lr: the learnable inner rate ``alpha`` (0-d tensor).
        labels: hard labels ``[n]`` (long) or, with ``soft_labels``, logits ``[n, classes]``.
        expert_start: ``w*_t``: a flat ``[P]`` vector or per-parameter tensors (MTT's snapshot).
        expert_target: ``w*_{t+M}``, same forms.
        syn_steps: ``N``.
        batch_syn: synthetic samples per inner step (all when None).
        soft_labels: DATM's learnable soft labels (targets ``softmax(labels)``).
        augmentation: e.g. DSA; its randomness is drawn into the step plan.
        settings: TUH/TR/lr settings; None reads ``ctx.options["unroll"]`` and falls back to
            exact BPTT (MTT).
        inner: inner optimizer (MTT's plain SGD by default).
        generator: source of the plan's randomness (a fresh one seeded with ``seed`` if None).
        seed: seed for that generator (default 0).
        shard: the synthetic set is sharded over ranks and ``images``/``labels`` hold this
            rank's rows ``[shard.offset, shard.offset + shard.count)``; the plan (same seed on
            every rank) indexes all ``shard.total`` samples, every rank follows the same
            trajectory and gets the exact gradient of its own rows (see
            `sharp_bilevel.trajectory.sharded`).
        selection: PAD's parameter selection in the matching loss
            (`sharp_bilevel.trajectory.selection.ParameterSelection`); None compares all.
        match_step: ``"final"`` (``w_N``, MTT) or ``"closest"`` (ATT: the kept step's ``w_i``
            nearest to ``w*_{t+M}`` in L1 distance; no memory beyond the unroll's own graph,
            but the steps after it are computed for nothing).
        fixed_images: SelMatch-style partial updates: samples that join every inner step's
            pool but are neither learned nor perturbed (they are not parameters). The inner
            set is ``cat([images, fixed_images])``; the plan indexes both.
        fixed_labels: their labels (hard, or logits with ``soft_labels``); required with
            ``fixed_images``.
        autocast: mixed precision inside the unroll: ``torch.bfloat16`` (CPU and CUDA) or
            ``torch.float16`` (CUDA; pair it with a ``GradScaler``), or their names. Each
            step's forward and inner loss run under ``torch.autocast``; the flat weights, the
            images, ``syn_lr`` and the accumulated hypergradient stay float32. None (default):
            off.
        compile_inner: run the inner steps that need no graph (before ``iota``; TESLA's and
            the checkpointed forward passes) through ``torch.compile``
            (`sharp_bilevel.trajectory.compiled`), compiled once per network and batch shape;
            False (default): eager.
        num_classes: classes the network predicts, to check ``0 <= labels < num_classes`` up
            front; None reads the ``out_features`` of the network's last ``nn.Linear`` (only
            ``labels >= 0`` is checked when it has none).
    """

    def __init__(
        self,
        student: nn.Module | Student,
        images: Tensor,
        syn_lr: Tensor,
        labels: Tensor,
        *,
        expert_start: Tensor | Sequence[Tensor],
        expert_target: Tensor | Sequence[Tensor],
        syn_steps: int,
        batch_syn: int | None = None,
        soft_labels: bool = False,
        augmentation: Augmentation | None = None,
        settings: UnrollSettings | None = None,
        inner: InnerOptimizer | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        shard: Shard | None = None,
        selection: ParameterSelection | None = None,
        match_step: str = "final",
        fixed_images: Tensor | None = None,
        fixed_labels: Tensor | None = None,
        autocast: torch.dtype | str | None = None,
        compile_inner: bool = False,
        num_classes: int | None = None,
    ) -> None:
        self.student = as_student(student)
        self.autocast = autocast_dtype(autocast)
        if not isinstance(compile_inner, bool):
            raise ValueError(f"compile_inner must be True or False, got {compile_inner!r}")
        self.compile_inner = compile_inner
        if match_step not in _MATCH_STEPS:
            raise ValueError(f"match_step must be one of {_MATCH_STEPS}, got {match_step!r}")
        if selection is not None and not isinstance(selection, ParameterSelection):
            raise TypeError(f"selection must be a ParameterSelection or None, got {selection!r}")
        if (fixed_images is None) != (fixed_labels is None):
            raise ValueError("fixed_images and fixed_labels go together: give both or neither")
        if fixed_images is not None and shard is not None:
            raise ValueError("fixed_images cannot be combined with shard (shard the set instead)")
        if images.dim() < 2:
            raise ValueError(
                f"images must be [n, ...] with n samples, got shape {tuple(images.shape)}"
            )
        if syn_lr.dim() != 0:
            raise ValueError(f"syn_lr must be a 0-d tensor, got shape {tuple(syn_lr.shape)}")
        n = images.shape[0]
        if shard is not None and shard.count != n:
            raise ValueError(f"images has {n} rows but the shard owns {shard.count}")
        if isinstance(syn_steps, bool) or not isinstance(syn_steps, int) or syn_steps < 1:
            raise ValueError(f"syn_steps must be an integer >= 1 (inner steps), got {syn_steps!r}")
        if num_classes is None:
            num_classes = output_width(self.student)
        elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")
        expected = (n, labels.shape[-1]) if soft_labels else (n,)
        if tuple(labels.shape) != expected or (labels.dim() != (2 if soft_labels else 1)):
            kind = "logits [n, classes]" if soft_labels else "hard labels [n]"
            raise ValueError(f"labels must be {kind} with n={n}, got shape {tuple(labels.shape)}")
        check_labels("labels", labels, soft_labels, num_classes)
        if fixed_images is not None and fixed_labels is not None:
            if tuple(fixed_images.shape[1:]) != tuple(images.shape[1:]):
                raise ValueError(
                    f"fixed_images must be [m, {', '.join(map(str, images.shape[1:]))}] like the "
                    f"learnable images, got shape {tuple(fixed_images.shape)}"
                )
            check_labels("fixed_labels", fixed_labels, soft_labels, num_classes)
            m = fixed_images.shape[0]
            want = (m, labels.shape[-1]) if soft_labels else (m,)
            if tuple(fixed_labels.shape) != want:
                raise ValueError(
                    f"fixed_labels must have shape {want}, got {tuple(fixed_labels.shape)}"
                )
            fixed_images, fixed_labels = fixed_images.detach(), fixed_labels.detach()
        self.fixed_images, self.fixed_labels = fixed_images, fixed_labels
        self.selection, self.match_step = selection, match_step
        self.images, self.syn_lr, self.labels = images, syn_lr, labels
        self.soft_labels = soft_labels
        dtype = self.student.dtype
        self.expert_start = self._flat(expert_start, "expert_start").to(images.device, dtype)
        self.expert_target = self._flat(expert_target, "expert_target").to(images.device, dtype)
        self.augmentation = augmentation
        self.settings = settings
        self.inner = inner
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else seed)
        self.shard = shard
        self._generator = generator
        self._window_draw: float | None = None
        pool = n if fixed_images is None else n + fixed_images.shape[0]
        pool = pool if shard is None else shard.total
        if batch_syn is not None and (
            isinstance(batch_syn, bool)
            or not isinstance(batch_syn, int)
            or not 1 <= batch_syn <= pool
        ):
            raise ValueError(
                f"batch_syn must be an integer in [1, {pool}] (the synthetic set has {pool} "
                f"samples) or None for all of them, got {batch_syn!r}"
            )
        self.plan = StepPlan.mtt(
            pool,
            syn_steps,
            batch_syn,
            generator=generator,
            sample_shape=tuple(images.shape[1:]),
            augmentation=augmentation,
        )
        self.last_unroll: UnrollResult | None = None
        #: ``(iota, tau)`` of the latest call (``iota`` drawn once with a random window).
        self.last_window: tuple[int, int | None] | None = None

    def _flat(self, value: Tensor | Sequence[Tensor], name: str) -> Tensor:
        if isinstance(value, Tensor) and value.dim() == 1:
            if value.numel() != self.student.num_params:
                raise ValueError(
                    f"{name} has {value.numel()} entries, the network has "
                    f"{self.student.num_params} parameters"
                )
            return value.detach()
        try:
            return self.student.flatten(list(value)).detach()
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err

    def resolve_settings(self, ctx: StepContext | None) -> UnrollSettings:
        """The settings in force: the constructor's, else ``ctx.options["unroll"]``, else exact."""
        if self.settings is not None:
            return self.settings
        if ctx is not None and "unroll" in ctx.options:
            settings = ctx.options["unroll"]
            if not isinstance(settings, UnrollSettings):
                raise TypeError(
                    f"closure_options['unroll'] must be UnrollSettings, got {settings!r}"
                )
            return settings
        return UnrollSettings()

    def __call__(self, ctx: StepContext | None = None) -> Tensor:
        lr = float(self.syn_lr.detach())
        if not (lr > 0 and lr < float("inf")):
            raise ValueError(
                f"syn_lr is {lr}: a non-positive or non-finite inner learning rate turns the inner "
                "loop into ascent; clamp it after each step (syn_lr.data.clamp_(min=1e-8)) or "
                "lower the lr of its group"
            )
        settings = self.resolve_settings(ctx)
        if settings.random_window and self._window_draw is None:
            u = torch.rand((), generator=self._generator, dtype=torch.float64)
            self._window_draw = float(u)  # drawn once: both passes and a restart share it
        iota, tau = settings.resolve(self.plan.num_steps, self._window_draw)
        self.last_window = (iota, tau)
        first_order = settings.lr_gradient == "first_order"
        images, labels = self._inner_set()
        closest_to = self.expert_target if self.match_step == "closest" else None
        if settings.hypergradient == "tesla":
            return tesla_pass(self, ctx, iota, tau, images, labels, closest_to)
        if settings.hypergradient == "checkpointed":
            return checkpointed_pass(self, ctx, settings, iota, tau, images, labels, closest_to)
        common = dict(
            soft_targets=self.soft_labels,
            augmentation=self.augmentation,
            graph_from=iota,
            lr_in_graph=not first_order,
            inner=self.inner,
            shard=self.shard,
            closest_to=closest_to,
            autocast=self.autocast,
            compile_inner=self.compile_inner,
        )
        restart = restart_point(ctx, tau, self.expert_start)
        result = unroll(
            self.student,
            restart.start,
            images,
            labels,
            self.syn_lr,
            self.plan,
            start_step=restart.step,
            start_state=restart.state,
            record_at=tau if restart.record else None,
            **common,  # type: ignore[arg-type]
        )
        record_restart(ctx, restart, result)
        directions = with_before(restart, self._directions(result))
        matched = result.final if closest_to is None else result.closest
        assert matched is not None
        loss = matching_loss(matched, self.expert_target, self.expert_start, self.selection)
        # Gradients only for the outer variables (and w_N for the first-order lr): none is
        # wasted on the detached start of the graph (w_0, w_iota or w_tau).
        leaves = [t for t in (self.images, self.labels) if t.requires_grad]
        if not first_order and self.syn_lr.requires_grad:
            leaves.append(self.syn_lr)
        wants_lr = first_order and self.syn_lr.requires_grad
        targets = [*leaves, matched] if wants_lr else list(leaves)
        if self.shard is not None and result.graph_start is not None:
            # Every rank must run every backward collective, whichever of its inputs need them.
            targets.append(result.graph_start)
        scaled = loss if ctx is None else ctx.scale(loss)  # a GradScaler's scale, if any
        grads = torch.autograd.grad(scaled, targets, allow_unused=True) if targets else ()
        accumulate(leaves, grads)
        if wants_lr:
            assign_lr_grad(self.syn_lr, first_order_lr_grad(grads[len(leaves)], directions))
        self.last_unroll = result
        return loss.detach()

    def _compiled(self) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
        if not self.compile_inner:
            return None
        return compiled_inner_gradient(
            self.student, self.student.fresh_buffers(), self.soft_labels, self.autocast
        )

    def _inner_set(self) -> tuple[Tensor, Tensor]:
        """The inner loop's images and labels: the learnable ones, then the fixed ones."""
        if self.fixed_images is None or self.fixed_labels is None:
            return self.images, self.labels
        fixed_images = self.fixed_images.to(self.images.device, self.images.dtype)
        fixed_labels = self.fixed_labels.to(self.labels.device, self.labels.dtype)
        return torch.cat([self.images, fixed_images]), torch.cat([self.labels, fixed_labels])

    def _directions(self, result: UnrollResult) -> Tensor:
        """``sum u_i`` up to the matched point (``w_N``, or ATT's ``w_i``)."""
        if self.match_step == "closest":
            assert result.closest_direction_sum is not None
            return result.closest_direction_sum
        return result.direction_sum


_AUTOCAST = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_AUTOCAST_OFF = ("off", "none", "float32", "fp32")
#: Every spelling `autocast_dtype` accepts, for error messages.
AUTOCAST_SPELLINGS = (
    "torch.bfloat16, torch.float16, 'bf16', 'bfloat16', 'fp16', 'float16', 'half' "
    "(any case) or None, 'off', 'none', 'float32', 'fp32' (no autocast)"
)


def autocast_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.bfloat16``/``torch.float16`` (or a name: ``"bf16"``, ``"fp16"``, ...) or None.

    The one parser of an autocast setting: `TrajectoryMatching`, ``DistillConfig`` and the
    command line's ``--autocast`` all go through it (case-insensitive, ``torch.`` prefix allowed).
    """
    if value is None or value in (torch.bfloat16, torch.float16):
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in _AUTOCAST:
            return _AUTOCAST[key]
        if key in _AUTOCAST_OFF:
            return None
    raise ValueError(f"autocast must be {AUTOCAST_SPELLINGS}; got {value!r}")


def check_window(num_snapshots: int, start_epoch: int, expert_epochs: int) -> None:
    """Raise ``ValueError`` unless ``0 <= start_epoch`` and ``start_epoch + expert_epochs`` is
    an epoch of a trajectory with ``num_snapshots`` snapshots (epochs ``0..num_snapshots-1``)."""
    for name, value, least in (
        ("start_epoch", start_epoch, 0),
        ("expert_epochs", expert_epochs, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    last = num_snapshots - 1
    if start_epoch + expert_epochs > last:
        raise ValueError(
            f"start_epoch + expert_epochs = {start_epoch} + {expert_epochs} = "
            f"{start_epoch + expert_epochs} exceeds the trajectory length: the expert has "
            f"epochs 0..{last}, so start_epoch must be <= {last - expert_epochs} "
            "(lower max_start_epoch or expert_epochs, or train longer experts)"
        )
