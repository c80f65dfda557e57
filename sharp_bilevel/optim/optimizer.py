"""``SharpBilevelOptimizer``: a sharpness-aware wrapper around any ``torch.optim`` optimizer.

This file is the algorithm: ``step()`` and its two passes. The rest lives by concern beside it:
argument checks (`arguments`), the all-or-nothing bookkeeping (`transaction`), the signal
shield (`signals`), the gradient scaler (`scaler`), the per-pass checks agreed over ranks
(`checks`), checked calls into the rule (`rule_calls`). Over 500 lines only because about 130
of them are the class docstring, the API reference."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from . import rule_calls
from .arguments import (
    Closure,
    _adopt_groups,
    _check_flag,
    _check_lr,
    _check_options,
    _split_kwargs,
    _takes_context,
)
from .checks import _check_pass
from .context import ASCENT, DESCENT, Phase, StepContext, StepReport
from .distributed import DistributedStepError, RankLayout
from .errors import NoGradientWarning, NonFiniteError
from .perturbations.base import PerturbationRule, RuleState, is_number
from .perturbations.registry import get_perturbation
from .reductions import centralized
from .scaler import _back_off, _check_scaler, _loss_scale
from .signals import _SigintShield
from .transaction import (
    _base_step,
    _clone_state,
    _copy_into,
    _grads_or_zeros,
    _state_like,
)

_STATE_KEY = "sharp_bilevel"


class SharpBilevelOptimizer(torch.optim.Optimizer):
    r"""Sharpness-aware minimisation of an outer objective ``F(phi)``, wrapping a base optimizer.

    One ``step(closure)`` does, with ``phi`` the parameters of the groups with ``perturb=True``:

    1. ``g = grad F(phi)``: first closure call (at ``phi + Delta`` when ``smooth > 0``; ``Delta``
       is removed afterwards);
    2. ``eps = rule.ascent(phi, g)``; ``phi <- phi + eps``;
    3. ``g' = grad F(phi + eps)``: second closure call;
    4. ``phi`` is restored to its saved pre-step values (bit-exact, not ``phi - eps``);
    5. ``d = rule.descent(g, g')`` (``g'`` except for GSAM) is written into ``phi.grad``;
       parameters of ``perturb=False`` groups keep the gradient of the second call;
    6. the base optimizer steps. The loss of the first call is returned.

    With ``perturbation="none"`` the closure is called once and the base optimizer steps on
    ``g``: the unperturbed baseline through the same class.

    Whatever happens (the closure raises, a non-finite loss or gradient, a ``skip_if`` gate, a
    zero gradient, a base optimizer's step hook raises, Ctrl-C or another signal handler
    raises), the parameters and the state (base optimizer's, rule's, counters) end either
    exactly as before the step or exactly stepped; never perturbed, never mixed.

    Args:
        params: tensors or param groups, as for any ``torch.optim`` optimizer. A group may set
            ``perturb=False`` (a learnable inner learning rate, soft labels): it is stepped but
            never perturbed. May be None when ``base_optimizer`` is an instance.
        base_optimizer: a ``torch.optim.Optimizer`` subclass (built on these param groups with
            the remaining keyword arguments) or an already-built instance.
        perturbation: a registered rule name (``"none"``, ``"sam"``, ``"asam"``, ``"gsam"``,
            ``"vasso"``, ``"ssam"``, aliases, user rules; case-insensitive) or a
            ``PerturbationRule`` instance.
        rho: the rule's radius (the rule's default when None; ``"none"`` ignores it, with a
            ``UserWarning``).
        smooth: relative size ``gamma >= 0`` of SATM's smoothing noise before the ascent call
            (``Delta_j = gamma ||phi_j|| / sqrt(d_j) z`` per sample); None takes the rule's
            default (``gamma`` for ``"ssam"``, 0 otherwise).
        smooth_per_element: read ``smooth`` in SATM's paper convention, a per-element standard
            deviation relative to the sample norm: ``Delta_j = gamma ||phi_j|| z``
            (``gamma_relative = sqrt(d_j) gamma``).
        centralize: gradient centralisation for any rule (GCSAM's): the rule sees ``gc(g)`` and
            ``gc(g')``, each sample's mean removed
            (`sharp_bilevel.optim.reductions.centralized`); with ``"none"`` the base optimizer
            steps on ``gc(g)`` (Yong et al.'s GC). Unperturbed groups are left alone.
        nonfinite: ``"raise"`` (default: raise ``NonFiniteError``) or ``"skip"`` (skip the step
            and count it in ``skipped_steps``) when a loss or gradient is NaN or infinite.
        seed: seed of the optimizer's own noise generator, an int in ``[0, 2**63 - 1]`` (drawn
            from torch's global generator at construction when None and smoothing is on).
        closure_options: a mapping of read-only settings passed to one-argument closures as
            ``ctx.options``.
        perturbation_kwargs: rule hyperparameters given explicitly.
        process_group: a ``torch.distributed`` process group (``dist.group.WORLD`` for all
            ranks) when the outer variables are sharded over ranks: param groups with
            ``"sharded": True`` hold this rank's rows of a set split along the first dimension.
            Whole-set norms and inner products, the smoothing noise and every skip/raise
            decision are then the same as in one process (`sharp_bilevel.optim.distributed`);
            a failure on one rank makes every rank restore and raise ``DistributedStepError``.
            None (default): one process.
        grad_scaler: a ``torch.amp.GradScaler`` (CUDA or CPU) for float16 mixed precision. A
            one-argument closure scales its loss with ``ctx.scale(loss)`` (the trajectory
            matching closure does); both passes' gradients are unscaled before the rule sees
            them; an inf/NaN in either pass skips the whole step (restored, counted in
            ``skipped_steps["nonfinite"]``, whatever ``nonfinite`` says) and the scale is
            updated once per step, backed off after a skip. Its state is in ``state_dict``.
        **kwargs: hyperparameters of the rule (any name the rule has, e.g. ``eta``, ``alpha``,
            ``theta``, ``per_sample``) and the base optimizer's keyword arguments (``lr``,
            ``momentum``, ...). A name that neither takes raises ``TypeError``. Every ``lr``
            (here or in a param group) must be a finite number >= 0.

    Attributes:
        base_optimizer: the wrapped ``torch.optim.Optimizer``; its ``param_groups`` and
            ``state`` are this optimizer's (a scheduler may drive either).
        perturbation: the ``PerturbationRule`` in use.
        smooth: the smoothing size ``gamma`` in force (0: off).
        centralize: whether the perturbed parameters' gradients are centralised.
        nonfinite: ``"raise"`` or ``"skip"``.
        grad_scaler: the ``GradScaler`` in use, or None.
        steps_taken: steps the base optimizer has taken (skipped steps not counted).
        skipped_steps: ``{"nonfinite": n, "gate": m}``, the steps skipped so far.
        last_step: the ``StepReport`` of the latest ``step()`` (loss, perturbed loss, ``||g||``,
            whether and why it was skipped), None before the first.

    Examples:
        >>> import torch
        >>> from sharp_bilevel import SharpBilevelOptimizer
        >>> phi = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = SharpBilevelOptimizer([phi], perturbation="sam", rho=0.05, lr=0.1)
        >>> def closure():
        ...     loss = (phi ** 2).sum()
        ...     loss.backward()
        ...     return loss
        >>> float(opt.step(closure))
        5.0
    """

    def __init__(
        self,
        params: Iterable[Any] | None = None,
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer = torch.optim.SGD,
        perturbation: str | PerturbationRule = "sam",
        rho: float | None = None,
        *,
        smooth: float | None = None,
        smooth_per_element: bool = False,
        centralize: bool = False,
        nonfinite: str = "raise",
        seed: int | None = None,
        closure_options: Mapping[str, Any] | None = None,
        perturbation_kwargs: Mapping[str, Any] | None = None,
        process_group: Any = None,
        grad_scaler: Any = None,
        **kwargs: Any,
    ) -> None:
        # Every argument is checked before anything is built.
        _check_scaler(grad_scaler)
        is_class = _check_options(
            base_optimizer, closure_options, perturbation_kwargs, seed, nonfinite
        )
        rule_kwargs, base_kwargs = _split_kwargs(perturbation, base_optimizer, kwargs)
        rule_kwargs.update(perturbation_kwargs or {})
        if rho is not None:
            rule_kwargs["rho"] = rho
        self.perturbation: PerturbationRule = get_perturbation(perturbation, **rule_kwargs)
        self.nonfinite = nonfinite
        gamma = self.perturbation.default_smooth if smooth is None else smooth
        if not (is_number(gamma) and math.isfinite(gamma) and gamma >= 0):
            raise ValueError(
                f"smooth must be a finite number >= 0 (None: the rule's default), got {smooth!r}"
            )
        self.smooth = float(gamma)
        self.smooth_per_element = _check_flag("smooth_per_element", smooth_per_element)
        self.centralize = _check_flag("centralize", centralize)
        if is_class and "lr" in base_kwargs:
            _check_lr(base_kwargs["lr"], "lr")
        if params is not None and not isinstance(params, Tensor):
            params = list(params)  # as torch.optim does; lets the groups' lr be checked first
            for i, group in enumerate(params):
                if isinstance(group, dict) and "lr" in group:
                    _check_lr(group["lr"], f"param group {i}'s lr")

        if isinstance(base_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise ValueError(
                    f"keyword arguments {sorted(base_kwargs)} were given with an already-built "
                    "base_optimizer; set them on it instead"
                )
            super().__init__(_adopt_groups(base_optimizer, params), {"perturb": True})
            self.base_optimizer = base_optimizer
        else:
            if params is None:
                raise ValueError("params is required when base_optimizer is a class")
            super().__init__(params, {"perturb": True})
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self._link_base()
        if self.perturbation.two_pass and not self._perturbed_params():
            raise ValueError(
                f"perturbation {type(self.perturbation).__name__} needs at least one param group "
                "with perturb=True"
            )

        self.grad_scaler = grad_scaler
        self._layout: RankLayout | None = None
        self._broken = False
        if process_group is not None:
            self._layout = RankLayout.for_groups(process_group, self.param_groups)

        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item()) if self._draws_noise else 0
        self._noise_generator = torch.Generator(device="cpu")
        self._noise_generator.manual_seed(int(seed))
        self.closure_options: Mapping[str, Any] = MappingProxyType(dict(closure_options or {}))
        self._rule_state: RuleState = self.perturbation.init(self._perturbed_params())
        self.steps_taken = 0
        self.skipped_steps: dict[str, int] = {"nonfinite": 0, "gate": 0}
        self.last_step: StepReport | None = None

    # ------------------------------------------------------------------ param groups
    def _link_base(self) -> None:
        """Share param groups and state with the base optimizer (schedulers edit either)."""
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = {**self.base_optimizer.defaults, "perturb": True}
        for i, group in enumerate(self.param_groups):
            group.setdefault("perturb", True)
            if not isinstance(group["perturb"], bool):
                raise ValueError(
                    f"a param group's perturb must be True or False, got {group['perturb']!r}"
                )
            if "lr" in group:
                _check_lr(group["lr"], f"param group {i}'s lr")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (``perturb`` defaults to True); the base optimizer gets it too.

        Adding a perturbed group re-initialises the rule's state (e.g. VaSSO's average ``d``),
        whose tensors are aligned with the perturbed parameters.
        """
        if not hasattr(self, "base_optimizer"):
            super().add_param_group(param_group)
            return
        param_group.setdefault("perturb", True)
        if "lr" in param_group:
            _check_lr(param_group["lr"], f"param group {len(self.param_groups)}'s lr")
        self.base_optimizer.add_param_group(param_group)
        self._link_base()
        if param_group["perturb"]:
            self._rule_state = self.perturbation.init(self._perturbed_params())

    def _perturbed_params(self) -> list[Tensor]:
        return [p for g in self.param_groups if g["perturb"] for p in g["params"]]

    def _unperturbed_params(self) -> list[Tensor]:
        return [p for g in self.param_groups if not g["perturb"] for p in g["params"]]

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _rule_lr(self) -> float:
        for group in self.param_groups:
            if group["perturb"] and "lr" in group:
                return float(group["lr"])
        return 0.0

    # ------------------------------------------------------------------ the step
    def step(
        self, closure: Closure | None = None, *, skip_if: Callable[[Any], bool] | None = None
    ) -> Any:
        """One sharpness-aware step; returns the first closure call's loss, detached (a tensor
        the closure returned comes back without its graph, so logging it holds no memory).

        The step is all or nothing: if it raises (in the closure, the rule, ``skip_if``, a step
        hook of the base optimizer, ``NonFiniteError``), the parameters, the base optimizer's
        state, the rule state, the counters and the noise generator are left exactly as before
        it. A signal with a Python handler (Ctrl-C's SIGINT, a SIGTERM or SIGALRM handler that
        raises; main thread) interrupts the closure and user hooks as usual, but waits while
        the step updates parameters and state, and arrives as soon as they are consistent
        again (`sharp_bilevel.optim.signals`).

        Args:
            closure: recomputes the outer loss, fills ``.grad`` (``backward()`` or assignment)
                and returns the loss. A closure that accepts a positional argument receives the
                ``StepContext`` (keep other arguments keyword-only); one that takes none is
                simply called again.
                Gradients are cleared before each call. Only ``perturbation="none"`` without
                smoothing may omit it (the gradients already in ``.grad`` are used).
            skip_if: a gate on the first call's loss (e.g. DATM's ``lambda l: l > threshold``);
                when it returns True the step is skipped with nothing perturbed left behind and
                counted in ``skipped_steps["gate"]``.
        """
        if closure is not None and not callable(closure):
            raise TypeError(
                "step(closure=...) must be a callable that recomputes the loss, calls backward() "
                f"and returns the loss (or None), got {type(closure).__name__}"
            )
        if skip_if is not None and not callable(skip_if):
            raise TypeError(
                f"step(skip_if=...) must be a callable on the loss or None, got "
                f"{type(skip_if).__name__}"
            )
        if closure is None and self._loss_scale() != 1.0:
            raise ValueError(
                "step() needs a closure with a grad_scaler: the optimizer unscales what each "
                "closure call back-propagates (scale the loss with ctx.scale(loss))"
            )
        if closure is None and (self.perturbation.two_pass or self._draws_noise):
            raise ValueError(
                "step() needs a closure: the perturbation evaluates the objective twice"
            )
        with _SigintShield() as shield:
            loss = self._step(closure, skip_if, shield)
        return loss.detach() if isinstance(loss, Tensor) else loss

    def _step(
        self,
        closure: Closure | None,
        skip_if: Callable[[Any], bool] | None,
        shield: _SigintShield,
    ) -> Any:
        """The two passes, inside a transaction: anything short of the commit at the end
        (a raise, a skip) puts the parameters and the noise generator back."""
        perturbed, everything = self._perturbed_params(), self._all_params()
        saved = [p.detach().clone() for p in perturbed]
        rng = self._noise_generator.get_state() if self._draws_noise else None
        scratch: dict[str, Any] = {}
        stepped = False
        try:
            if self._broken:
                raise DistributedStepError(
                    "an earlier step failed and shut the process group down; build a new group "
                    "and optimizer to go on"
                )
            # First pass: g = grad F(phi) (at phi + Delta when smoothing).
            if self._draws_noise:
                noise = rule_calls.first_pass_noise(
                    self.perturbation,
                    self._layout,
                    perturbed,
                    self._rule_state,
                    self._noise_generator,
                    self.smooth,
                    self.smooth_per_element,
                )
                with torch.no_grad():
                    for delta in noise:
                        torch._foreach_add_(perturbed, delta)
            two_pass = self.perturbation.two_pass and rule_calls.wants_second_pass(
                self.perturbation, self._rule_state
            )
            loss = None
            if closure is not None:
                loss = self._call(closure, ASCENT, scratch, everything, shield, two_pass)
            if self._draws_noise:
                _copy_into(perturbed, saved)
            grads, had_grad = self._collect_grads(perturbed)
            loss_value, grad_norm, problem, gate = self._check(
                loss, grads, everything, skip_if, shield
            )
            if problem:
                return self._skip_nonfinite(loss, loss_value, grad_norm, problem, "ascent")
            if gate:
                return self._skip(loss, loss_value, grad_norm, "gate")
            if self.centralize:
                grads = centralized(grads)
                if not self.perturbation.two_pass:  # GC of the plain step
                    for p, g, had in zip(perturbed, grads, had_grad, strict=True):
                        p.grad = g if had else None

            # Second pass (or the rule's reuse between its second passes): the direction d.
            new_state, adv_value = self._rule_state, None
            if self.perturbation.two_pass and not two_pass:  # e.g. LookSAM between its k-steps
                with shield.open():
                    direction, new_state = rule_calls.reuse(
                        self.perturbation, self._layout, perturbed, grads, self._rule_state
                    )
                self._set_direction(perturbed, direction, had_grad)
            elif two_pass and closure is not None:
                outcome = self._second_pass(closure, scratch, shield, perturbed, saved, grads)
                if isinstance(outcome, str):
                    return self._skip_nonfinite(loss, loss_value, grad_norm, outcome, "descent")
                direction, new_state, adv_value = outcome
                self._set_direction(perturbed, direction, had_grad)

            # The base step, then the commit.
            others = self._unperturbed_params()
            _base_step(
                self.base_optimizer,
                perturbed + others,
                saved + [p.detach().clone() for p in others],
                self.grad_scaler,
                self._loss_scale(),
            )
            self._rule_state = new_state
            self.steps_taken += 1
            self.last_step = StepReport(loss_value, adv_value, grad_norm)
            stepped = True
            return loss
        except NonFiniteError:  # raised on every rank alike, after an agreement
            raise
        except BaseException as err:
            if self._layout is None or isinstance(err, DistributedStepError):
                raise
            # Other ranks may be waiting in a collective this rank will never join: shut the
            # group so theirs fail too, and raise the same error type everywhere.
            self._broken = True
            self._layout.abort()
            raise DistributedStepError(
                f"rank {self._layout.rank}: the step failed here or on another rank "
                f"({type(err).__name__}: {err}); every rank restored its pre-step values"
            ) from err
        finally:
            if not stepped:  # raised or skipped: a skipped step draws no noise either
                _copy_into(perturbed, saved)
                if rng is not None:
                    self._noise_generator.set_state(rng)

    def _second_pass(
        self,
        closure: Closure,
        scratch: dict[str, Any],
        shield: _SigintShield,
        perturbed: list[Tensor],
        saved: list[Tensor],
        grads: list[Tensor],
    ) -> tuple[list[Tensor], RuleState, float] | str:
        """``eps = rule.ascent(phi, g)``; ``g' = grad F(phi + eps)``; ``phi`` restored;
        ``d = rule.descent(g, g')``. Returns ``(d, new rule state, F(phi + eps))``, or the
        non-finite problem found in ``g'`` (agreed over ranks)."""
        with shield.open():
            eps, new_state = rule_calls.ascent(
                self.perturbation, self._layout, perturbed, grads, self._rule_state, self._rule_lr()
            )
        with torch.no_grad():
            torch._foreach_add_(perturbed, eps)
        everything = self._all_params()
        perturbed_loss = self._call(closure, DESCENT, scratch, everything, shield, True)
        _copy_into(perturbed, saved)
        grads_adv, _ = self._collect_grads(perturbed)
        adv_value, _, problem, _ = self._check(perturbed_loss, grads_adv, everything, None, shield)
        if problem:
            return problem
        if self.centralize:
            grads_adv = centralized(grads_adv)
        with shield.open():
            direction, new_state = rule_calls.descent(
                self.perturbation, self._layout, perturbed, grads, grads_adv, new_state
            )
        return direction, new_state, adv_value

    @property
    def _draws_noise(self) -> bool:
        return self.smooth > 0 or self.perturbation.draws_noise

    def _check(
        self,
        loss: Any,
        grads: list[Tensor],
        everything: list[Tensor],
        skip_if: Callable[[Any], bool] | None,
        shield: _SigintShield,
    ) -> tuple[float, float, str, bool]:
        """Loss value, ``||g||``, a non-finite problem ("" if none) and the gate's verdict,
        agreed by every rank (`sharp_bilevel.optim.checks`)."""
        return _check_pass(self._layout, loss, grads, everything, skip_if, shield)

    def _collect_grads(self, perturbed: list[Tensor]) -> tuple[list[Tensor], list[bool]]:
        """The perturbed parameters' gradients (zeros where none) and which had one."""
        for i, group in enumerate(self.param_groups):
            for k, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.layout is not torch.strided:
                    raise TypeError(
                        f"param group {i}, parameter {k} (shape {tuple(p.shape)}) has a sparse "
                        f"gradient ({p.grad.layout}); SharpBilevelOptimizer needs dense "
                        "gradients (e.g. nn.Embedding(..., sparse=False)); the parameters were "
                        "restored to their pre-step values"
                    )
        return _grads_or_zeros(perturbed), [p.grad is not None for p in perturbed]

    @staticmethod
    def _set_direction(perturbed: list[Tensor], direction: list[Tensor], had: list[bool]) -> None:
        """``phi.grad <- d`` (left None where the parameter had no gradient in either pass)."""
        for p, d, had_grad in zip(perturbed, direction, had, strict=True):
            p.grad = d if (had_grad or p.grad is not None) else None

    def _call(
        self,
        closure: Closure,
        phase: Phase,
        scratch: dict[str, Any],
        params: list[Tensor],
        shield: _SigintShield,
        two_pass: bool,
    ) -> Any:
        for p in params:
            p.grad = None
        context = StepContext(
            phase=phase,
            step=self.steps_taken,
            two_pass=two_pass,
            smoothed=self._draws_noise,
            scratch=scratch,
            options=self.closure_options,
            loss_scale=self._loss_scale(),
        )
        takes_context = _takes_context(closure)
        with torch.enable_grad(), shield.open():
            loss = closure(context) if takes_context else closure()
        if loss is None:
            raise TypeError(
                "the closure must return the loss (a scalar tensor or a number), got None"
            )
        perturbed = self._perturbed_params()
        if any(p.numel() for p in perturbed) and all(p.grad is None for p in perturbed):
            warnings.warn(
                f"the closure's {phase} pass left no gradient on any perturbed parameter (did "
                "it call loss.backward()?); the step uses zero gradients for them",
                NoGradientWarning,
                stacklevel=4,
            )
        if context.loss_scale != 1.0:  # a power of two: dividing is exact
            for p in params:
                if p.grad is not None:
                    p.grad = p.grad / context.loss_scale
        return loss

    def _skip(self, loss: Any, loss_value: float, grad_norm: float, reason: str) -> Any:
        for p in self._all_params():
            p.grad = None
        self.skipped_steps[reason] += 1
        self.last_step = StepReport(loss_value, None, grad_norm, skipped=reason)
        return loss

    def _skip_nonfinite(
        self, loss: Any, loss_value: float, grad_norm: float, problem: str, phase: str
    ) -> Any:
        if self._loss_scale() != 1.0:  # an overflow of the scaled loss: back off, skip
            params = self._perturbed_params() + self._unperturbed_params()
            _back_off(self.grad_scaler, self.base_optimizer, params)
            return self._skip(loss, loss_value, grad_norm, "nonfinite")
        if self.nonfinite == "raise":
            for p in self._all_params():
                p.grad = None
            raise NonFiniteError(
                f"{problem} in the {phase} pass at step {self.steps_taken}; the parameters were "
                "restored to their pre-step values (pass nonfinite='skip' to skip such steps "
                "instead)"
            )
        return self._skip(loss, loss_value, grad_norm, "nonfinite")

    def _loss_scale(self) -> float:
        """The scaler's current scale (1.0 without an enabled scaler)."""
        return _loss_scale(self.grad_scaler, self._all_params())

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus the rule state, noise RNG and step counters."""
        state = self.base_optimizer.state_dict()
        state[_STATE_KEY] = {
            "perturbation": type(self.perturbation).__name__,
            "rule_state": _clone_state(self._rule_state),
            "noise_rng": self._noise_generator.get_state(),
            "steps_taken": self.steps_taken,
            "skipped_steps": dict(self.skipped_steps),
        }
        if self.grad_scaler is not None:
            state[_STATE_KEY]["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; continuing is bit-identical to an uninterrupted run."""
        if _STATE_KEY not in state_dict:
            raise ValueError(
                "state_dict has no 'sharp_bilevel' entry: it was not saved by SharpBilevelOptimizer"
            )
        extra = state_dict[_STATE_KEY]
        expected = type(self.perturbation).__name__
        if extra["perturbation"] != expected:
            raise ValueError(
                f"state_dict was saved with perturbation {extra['perturbation']}, "
                f"this optimizer uses {expected}"
            )
        self.base_optimizer.load_state_dict(
            {k: v for k, v in state_dict.items() if k != _STATE_KEY}
        )
        self._link_base()
        self._rule_state = _state_like(extra["rule_state"], self._perturbed_params())
        self._noise_generator.set_state(extra["noise_rng"].clone())
        self.steps_taken = int(extra["steps_taken"])
        self.skipped_steps = dict(extra["skipped_steps"])
        if self.grad_scaler is not None and "grad_scaler" in extra:
            self.grad_scaler.load_state_dict(extra["grad_scaler"])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(perturbation={self.perturbation!r}, smooth={self.smooth}, "
            f"base_optimizer={type(self.base_optimizer).__name__}, "
            f"groups={len(self.param_groups)})"
        )
