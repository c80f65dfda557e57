"""``SharpBilevelOptimizer``: a sharpness-aware wrapper around any ``torch.optim`` optimizer."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import numbers
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import FrameType, MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .context import ASCENT, DESCENT, Phase, StepContext, StepReport
from .distributed import DistributedStepError, RankLayout
from .errors import NonFiniteError
from .perturbations.base import PerturbationRule, RuleState, is_number
from .perturbations.registry import (
    canonical_name,
    get_perturbation,
    owners_hint,
    rule_parameters,
)
from .reductions import centralized
from .smoothing import smoothing_noise, standard_normal

Closure = Callable[..., Any]
_STATE_KEY = "sharp_bilevel"
_NONFINITE_POLICIES = ("raise", "skip")


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
    zero gradient, a base optimizer's step hook raises, Ctrl-C), the parameters and the state
    (base optimizer's, rule's, counters) end either exactly as before the step or exactly
    stepped; never perturbed, never mixed.

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
        _check_scaler(grad_scaler)
        is_class = isinstance(base_optimizer, type) and issubclass(
            base_optimizer, torch.optim.Optimizer
        )
        if not (is_class or isinstance(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass or instance, "
                f"got {base_optimizer!r}"
            )
        # Every argument is checked before anything is built.
        for name, mapping in (
            ("closure_options", closure_options),
            ("perturbation_kwargs", perturbation_kwargs),
        ):
            if mapping is not None and not isinstance(mapping, Mapping):
                raise TypeError(f"{name} must be a mapping or None, got {type(mapping).__name__}")
        if seed is not None and not (
            isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and 0 <= seed < 2**63
        ):
            raise ValueError(f"seed must be an int in [0, 2**63 - 1] or None, got {seed!r}")
        if nonfinite not in _NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {_NONFINITE_POLICIES}, got {nonfinite!r}")
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
        if not isinstance(smooth_per_element, bool):
            raise ValueError(
                f"smooth_per_element must be True or False, got {smooth_per_element!r}"
            )
        self.smooth_per_element = smooth_per_element
        if not isinstance(centralize, bool):
            raise ValueError(f"centralize must be True or False, got {centralize!r}")
        self.centralize = centralize
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
            groups = _adopt_groups(base_optimizer, params)
            super().__init__(groups, {"perturb": True})
            self.base_optimizer = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            if params is None:
                raise ValueError("params is required when base_optimizer is a class")
            super().__init__(params, {"perturb": True})
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass or instance, "
                f"got {base_optimizer!r}"
            )
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
            flags = []
            for i, group in enumerate(self.param_groups):
                group.setdefault("sharded", False)
                if not isinstance(group["sharded"], bool):
                    raise ValueError(
                        f"param group {i}'s sharded must be True or False, got {group['sharded']!r}"
                    )
                if group["perturb"]:
                    flags += [group["sharded"]] * len(group["params"])
            self._layout = RankLayout.build(process_group, self._perturbed_params(), flags)

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
        it. A Ctrl-C (SIGINT, main thread) interrupts the closure and user hooks as usual, but
        waits while the step updates parameters and state, and arrives as soon as they are
        consistent again.

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
        perturbed = self._perturbed_params()
        everything = self._all_params()
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
            if self._draws_noise:
                self._add_first_pass_noise(perturbed)
            two_pass = self.perturbation.two_pass and self._wants_second_pass()
            loss = None
            if closure is not None:
                loss = self._call(closure, ASCENT, scratch, everything, shield, two_pass)
            if self._draws_noise:
                _copy_into(perturbed, saved)
            self._refuse_sparse_grads()
            grads = _grads_or_zeros(perturbed)
            had_grad = [p.grad is not None for p in perturbed]
            loss_value, grad_norm, problem, gate = self._check_pass(
                loss, grads, everything, skip_if, shield
            )
            if problem:
                return self._skip_nonfinite(
                    loss, loss_value, grad_norm, f"{problem} in the ascent pass"
                )
            if gate:
                return self._skip(loss, loss_value, grad_norm, "gate")
            if self.centralize:
                grads = centralized(grads)
                if not self.perturbation.two_pass:  # GC of the plain step
                    for p, g, had in zip(perturbed, grads, had_grad, strict=True):
                        p.grad = g if had else None

            new_state, adv_value = self._rule_state, None
            if self.perturbation.two_pass and not two_pass:  # e.g. LookSAM between its k-steps
                with shield.open():
                    direction, new_state = self._reuse(perturbed, grads)
                for p, d, had in zip(perturbed, direction, had_grad, strict=True):
                    p.grad = d if (had or p.grad is not None) else None
            elif two_pass and closure is not None:
                with shield.open():
                    eps, new_state = self._ascent(perturbed, grads)
                with torch.no_grad():
                    torch._foreach_add_(perturbed, eps)
                perturbed_loss = self._call(closure, DESCENT, scratch, everything, shield, True)
                _copy_into(perturbed, saved)
                self._refuse_sparse_grads()
                grads_adv = _grads_or_zeros(perturbed)
                adv_value, _, problem, _ = self._check_pass(
                    perturbed_loss, grads_adv, everything, None, shield
                )
                if problem:
                    return self._skip_nonfinite(
                        loss, loss_value, grad_norm, f"{problem} in the descent pass"
                    )
                if self.centralize:
                    grads_adv = centralized(grads_adv)
                with shield.open():
                    direction = self._descent(perturbed, grads, grads_adv, new_state)
                    new_state = self._after_descent(grads, grads_adv, new_state)
                for p, d, had in zip(perturbed, direction, had_grad, strict=True):
                    p.grad = d if (had or p.grad is not None) else None

            self._base_step(perturbed, saved)
            self._rule_state = new_state
            self.steps_taken += 1
            self.last_step = StepReport(loss_value, adv_value, grad_norm)
            stepped = True
            return loss
        except NonFiniteError:  # raised on every rank alike, after an agreement
            if rng is not None:
                self._noise_generator.set_state(rng)
            raise
        except BaseException as err:
            if rng is not None:
                self._noise_generator.set_state(rng)
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
            if not stepped:
                _copy_into(perturbed, saved)

    @property
    def _draws_noise(self) -> bool:
        return self.smooth > 0 or self.perturbation.draws_noise

    def _add_first_pass_noise(self, perturbed: list[Tensor]) -> None:
        """``phi <- phi + Delta`` for the first pass: SATM's smoothing noise, then the rule's
        own (Bayesian SAM), both from the seeded generator."""
        rows = None
        if self._layout is not None:
            rows = [self._layout.noise_rows(k) for k in range(len(perturbed))]
        parts = []
        if self.smooth > 0:
            parts.append(
                smoothing_noise(
                    perturbed,
                    self.smooth,
                    self._noise_generator,
                    rows,
                    per_element=self.smooth_per_element,
                )
            )
        if self.perturbation.draws_noise:
            z = standard_normal(perturbed, self._noise_generator, rows)
            where = f"{type(self.perturbation).__name__}.first_pass_noise()"
            noise = self.perturbation.first_pass_noise(
                [p.detach() for p in perturbed], z, self._rule_state
            )
            parts.append(_checked_tensors(where, "the noise", noise, perturbed))
        with torch.no_grad():
            for noise in parts:
                torch._foreach_add_(perturbed, noise)

    def _ascent(
        self, perturbed: list[Tensor], grads: list[Tensor]
    ) -> tuple[list[Tensor], RuleState]:
        """The rule's ``(eps, new_state)``, checked (user rules may return anything)."""
        where = f"{type(self.perturbation).__name__}.ascent()"
        with self._reduction_scope():
            result: object = self.perturbation.ascent(
                [p.detach() for p in perturbed], grads, self._rule_state, self._rule_lr()
            )
        if not (isinstance(result, tuple | list) and len(result) == 2):
            raise TypeError(f"{where} must return a pair (eps, new_state), got {_describe(result)}")
        eps, new_state = result
        if not isinstance(new_state, dict):
            raise TypeError(
                f"{where} must return a pair (eps, new_state) with new_state a dict, got "
                f"{_describe(result)}"
            )
        return _checked_tensors(where, "eps", eps, perturbed), new_state

    def _descent(
        self,
        perturbed: list[Tensor],
        grads: list[Tensor],
        grads_adv: list[Tensor],
        state: RuleState,
    ) -> list[Tensor]:
        """The rule's descent direction, checked."""
        where = f"{type(self.perturbation).__name__}.descent()"
        with self._reduction_scope():
            direction: object = self.perturbation.descent(grads, grads_adv, state)
        return _checked_tensors(where, "the direction", direction, perturbed)

    def _reduction_scope(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if self._layout is None else self._layout.scope()

    def _check_pass(
        self,
        loss: Any,
        grads: list[Tensor],
        everything: list[Tensor],
        skip_if: Callable[[Any], bool] | None,
        shield: _SigintShield,
    ) -> tuple[float, float, str, bool]:
        """Loss value, ``||g||``, a non-finite problem ("" if none) and the gate's verdict; with
        a process group, agreed by every rank (one all-reduce)."""
        layout = self._layout
        weights = None if layout is None else [layout.weight(k) for k in range(len(grads))]
        loss_value, sq_norm, problem = _inspect(loss, grads, everything, weights)
        gate = False
        if skip_if is not None and not problem:
            with shield.open():
                gate = bool(skip_if(loss))
        if layout is not None:
            device = grads[0].device if grads else torch.device("cpu")
            bad_loss, bad_grad, sq_norm, gates = layout.agree(
                [problem == _BAD_LOSS, problem == _BAD_GRAD, sq_norm, gate], device
            )
            problem = _BAD_LOSS if bad_loss else _BAD_GRAD if bad_grad else ""
            problem += " (on at least one rank)" if problem else ""
            gate = gates > 0
        grad_norm = math.sqrt(sq_norm) if math.isfinite(sq_norm) and sq_norm >= 0 else math.nan
        return loss_value, grad_norm, problem, gate

    def _wants_second_pass(self) -> bool:
        wanted: object = self.perturbation.wants_second_pass(self._rule_state)
        if not isinstance(wanted, bool):
            raise TypeError(
                f"{type(self.perturbation).__name__}.wants_second_pass() must return True or "
                f"False, got {_describe(wanted)}"
            )
        return wanted

    def _reuse(
        self, perturbed: list[Tensor], grads: list[Tensor]
    ) -> tuple[list[Tensor], RuleState]:
        """The rule's direction for a step without a second pass, checked."""
        where = f"{type(self.perturbation).__name__}.reuse()"
        with self._reduction_scope():
            result: object = self.perturbation.reuse(grads, self._rule_state)
        if not (isinstance(result, tuple | list) and len(result) == 2):
            raise TypeError(
                f"{where} must return a pair (direction, new_state), got {_describe(result)}"
            )
        direction, new_state = result
        if not isinstance(new_state, dict):
            raise TypeError(f"{where} must return new_state as a dict, got {_describe(new_state)}")
        return _checked_tensors(where, "the direction", direction, perturbed), new_state

    def _after_descent(
        self, grads: list[Tensor], grads_adv: list[Tensor], state: RuleState
    ) -> RuleState:
        with self._reduction_scope():
            new_state: object = self.perturbation.after_descent(grads, grads_adv, state)
        if not isinstance(new_state, dict):
            raise TypeError(
                f"{type(self.perturbation).__name__}.after_descent() must return a dict, got "
                f"{_describe(new_state)}"
            )
        return new_state

    def _refuse_sparse_grads(self) -> None:
        for i, group in enumerate(self.param_groups):
            for k, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.layout is not torch.strided:
                    raise TypeError(
                        f"param group {i}, parameter {k} (shape {tuple(p.shape)}) has a sparse "
                        f"gradient ({p.grad.layout}); SharpBilevelOptimizer needs dense "
                        "gradients (e.g. nn.Embedding(..., sparse=False)); the parameters were "
                        "restored to their pre-step values"
                    )

    def _base_step(self, perturbed: list[Tensor], saved: list[Tensor]) -> None:
        """``base_optimizer.step()``, all or nothing: if it raises (a step hook, say), every
        parameter and the base optimizer's state are put back exactly, in place."""
        others = [p for g in self.param_groups if not g["perturb"] for p in g["params"]]
        others_saved = [p.detach().clone() for p in others]
        state_saved = _snapshot_state(self.base_optimizer.state)
        scaler = self.grad_scaler
        scale = self._loss_scale()
        try:
            if scaler is None or scale == 1.0:
                self.base_optimizer.step()
            else:  # hand the scaler what it expects: scaled gradients (exact: a power of two)
                for p in perturbed + others:
                    if p.grad is not None:
                        p.grad = p.grad * scale
                scaler.step(self.base_optimizer)
                scaler.update()
        except BaseException:
            _copy_into(perturbed + others, saved + others_saved)
            _restore_state(self.base_optimizer.state, state_saved)
            _reset_scaler_stage(scaler)
            raise

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
        with torch.enable_grad(), shield.open():
            loss = closure(context) if _takes_context(closure) else closure()
        if loss is None:
            raise TypeError(
                "the closure must return the loss (a scalar tensor or a number), got None"
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

    def _skip_nonfinite(self, loss: Any, loss_value: float, grad_norm: float, what: str) -> Any:
        if self._loss_scale() != 1.0:  # an overflow of the scaled loss: back off, skip
            self._back_off()
            return self._skip(loss, loss_value, grad_norm, "nonfinite")
        if self.nonfinite == "raise":
            for p in self._all_params():
                p.grad = None
            raise NonFiniteError(
                f"{what} at step {self.steps_taken}; the parameters were restored to their "
                "pre-step values (pass nonfinite='skip' to skip such steps instead)"
            )
        return self._skip(loss, loss_value, grad_norm, "nonfinite")

    def _loss_scale(self) -> float:
        """The scaler's current scale (1.0 without an enabled scaler)."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0
        if getattr(scaler, "_scale", 0) is None:  # created lazily by its first scale() call
            params = self._all_params()
            scaler.scale(torch.zeros((), device=params[0].device if params else "cpu"))
        return float(scaler.get_scale())

    def _back_off(self) -> None:
        """One scaler update that records an overflow (the scale is backed off); no step."""
        scaler = self.grad_scaler
        assert scaler is not None
        perturbed = self._perturbed_params()
        for p in self._all_params():
            p.grad = None
        marker = (perturbed or self._all_params())[0]
        marker.grad = torch.full_like(marker, math.inf)
        try:
            scaler.step(self.base_optimizer)  # finds the inf and skips the base step
            scaler.update()
        except BaseException:
            _reset_scaler_stage(scaler)
            raise
        finally:
            marker.grad = None

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


# ---------------------------------------------------------------------- helpers
def _split_kwargs(
    perturbation: str | PerturbationRule,
    base_optimizer: Any,
    kwargs: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route keyword arguments: the rule's hyperparameters to the rule, the rest to the base.

    A name that neither takes is refused here, before anything is built, with what each accepts.
    """
    if isinstance(perturbation, str):
        rule_names, rule = rule_parameters(perturbation), canonical_name(perturbation)
    elif dataclasses.is_dataclass(perturbation):
        # Hyperparameters given beside an instance reach get_perturbation, which refuses them.
        rule_names = frozenset(f.name for f in dataclasses.fields(perturbation))
        rule = type(perturbation).__name__
    else:
        rule_names, rule = frozenset(), type(perturbation).__name__
    is_class = isinstance(base_optimizer, type)
    base_names: frozenset[str] = frozenset()
    open_signature = False  # a base class taking **kwargs
    if is_class:
        parameters = inspect.signature(base_optimizer).parameters.values()
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        base_names = frozenset(p.name for p in parameters if p.kind in named) - {"params"}
        open_signature = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    rule_kwargs: dict[str, Any] = {}
    base_kwargs: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in rule_names:
            if name in base_names:
                raise ValueError(
                    f"{name!r} is both a hyperparameter of the perturbation and an argument of "
                    f"{base_optimizer.__name__}; pass it in perturbation_kwargs or build the base "
                    "optimizer yourself"
                )
            rule_kwargs[name] = value
            continue
        if name in base_names or open_signature:
            base_kwargs[name] = value
            continue
        hint = owners_hint([name], rule)
        if not (is_class or hint):
            base_kwargs[name] = value  # an instance refuses these below, with its own message
            continue
        takes = f"perturbation {rule!r} (which accepts {', '.join(sorted(rule_names)) or 'none'})"
        if is_class:
            base = f"{base_optimizer.__name__} (which accepts {', '.join(sorted(base_names))})"
        else:
            base = "a base_optimizer instance (set its arguments on it)"
        raise TypeError(
            f"unexpected keyword argument {name!r}: not a hyperparameter of {takes} nor an "
            f"argument of {base}{hint}"
        )
    return rule_kwargs, base_kwargs


def _describe(value: object) -> str:
    """``"a tuple of length 2 (list, dict)"``, ``"a Tensor"``: what a user function returned."""
    if isinstance(value, list | tuple):
        items = f" ({', '.join(type(v).__name__ for v in value)})" if len(value) <= 4 else ""
        return f"a {type(value).__name__} of length {len(value)}{items}"
    return f"a {type(value).__name__}"


def _checked_tensors(where: str, what: str, values: object, params: list[Tensor]) -> list[Tensor]:
    """``values`` as a list of tensors shaped, typed and placed like ``params`` (or raise)."""
    if not isinstance(values, list | tuple):
        raise TypeError(
            f"{where} must return {what} as a list with one tensor per perturbed parameter, "
            f"got {_describe(values)}"
        )
    if len(values) != len(params):
        raise ValueError(
            f"{where} returned {len(values)} tensors as {what} for {len(params)} perturbed "
            "parameters"
        )
    for k, (v, p) in enumerate(zip(values, params, strict=True)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{where}: {what}[{k}] must be a tensor, got {_describe(v)}")
        if v.shape != p.shape or v.dtype != p.dtype or v.device != p.device:
            raise ValueError(
                f"{where}: {what}[{k}] has shape {tuple(v.shape)}, {v.dtype} on {v.device}, "
                f"but its parameter has shape {tuple(p.shape)}, {p.dtype} on {p.device}"
            )
    return list(values)


def _check_scaler(scaler: Any) -> None:
    """``scaler`` must look like a ``torch.amp.GradScaler`` (or be None)."""
    needed = ("scale", "step", "update", "get_scale", "is_enabled", "state_dict")
    if scaler is not None and not all(callable(getattr(scaler, n, None)) for n in needed):
        raise TypeError(
            f"grad_scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}"
        )


def _reset_scaler_stage(scaler: Any) -> None:
    """Forget a half-done ``unscale_``/``step`` of this update (so the next step may unscale)."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is not None:
        states.clear()


def _check_lr(lr: Any, what: str) -> None:
    """A learning rate must be a finite real number >= 0 (a one-element float tensor too)."""
    value = lr
    if isinstance(lr, Tensor) and lr.numel() == 1 and lr.is_floating_point():
        value = lr.item()
    if not (is_number(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {lr!r}")


def _adopt_groups(
    base: torch.optim.Optimizer, params: Iterable[Any] | None
) -> list[dict[str, Any]]:
    """Take a built optimizer's groups; ``params`` (if given) must hold the same tensors and
    may carry ``perturb`` flags for them."""
    if params is not None:
        given = list(params)
        groups = given if given and isinstance(given[0], dict) else [{"params": given}]
        flags: dict[int, bool] = {}
        for group in groups:
            tensors = (
                [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
            )
            for t in tensors:
                flags[id(t)] = bool(group.get("perturb", True))
        owned = {id(p) for g in base.param_groups for p in g["params"]}
        if set(flags) != owned:
            raise ValueError(
                "params must hold exactly the tensors of the given base_optimizer instance"
            )
        for base_group in base.param_groups:
            values = {flags[id(p)] for p in base_group["params"]}
            if len(values) > 1:
                raise ValueError(
                    "tensors of one base_optimizer param group need the same perturb flag"
                )
            base_group["perturb"] = values.pop() if values else True
    return base.param_groups


def _takes_context(closure: Closure) -> bool:
    try:
        signature = inspect.signature(closure)
    except (TypeError, ValueError):
        return False
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    )
    return any(p.kind in positional for p in signature.parameters.values())


def _grads_or_zeros(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]


def _copy_into(params: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)


_BAD_LOSS = "non-finite loss"
_BAD_GRAD = "non-finite gradient"


def _inspect(
    loss: Any,
    grads: Sequence[Tensor],
    everything: Sequence[Tensor],
    weights: Sequence[float] | None = None,
) -> tuple[float, float, str]:
    """Loss value, ``||g||_2^2`` (each tensor's share times ``weights[k]``) and a description of
    any non-finite value ("" if none), in one sync."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"the closure must return a scalar loss, got shape {tuple(loss.shape)}"
            )
        loss_t = loss.detach().reshape(()).to(torch.float64)
    elif loss is None:  # step() without a closure: only the gradients are there to check
        loss_t = torch.tensor(0.0, dtype=torch.float64)
    else:
        loss_t = torch.tensor(float(loss), dtype=torch.float64)
    device = loss_t.device
    all_grads = [p.grad for p in everything if p.grad is not None]
    grads_ok = [torch.isfinite(g).all().to(device) for g in all_grads]
    shares = weights if weights is not None else [1.0] * len(grads)
    sq = [
        g.to(torch.float64).square().sum().to(device) * share
        for g, share in zip(grads, shares, strict=True)
    ]
    summary = torch.stack(
        [
            loss_t,
            torch.stack(grads_ok).all().to(torch.float64) if grads_ok else loss_t.new_ones(()),
            torch.stack(sq).sum() if sq else loss_t.new_zeros(()),
        ]
    ).tolist()
    loss_value, grads_finite, sq_norm = summary
    if loss is None:
        loss_value = math.nan
    elif not math.isfinite(loss_value):
        return loss_value, sq_norm, _BAD_LOSS
    if grads_finite != 1.0:
        return loss_value, math.nan, _BAD_GRAD
    return loss_value, sq_norm, ""


class _SigintShield:
    """Defers SIGINT (Ctrl-C) during a step, except inside ``open()`` sections.

    Python runs a signal handler between any two bytecodes, so a KeyboardInterrupt could land
    between the base optimizer's update of one tensor and the next. Within the shield an
    interrupt is recorded and handed to the previous handler (normally raising
    KeyboardInterrupt) when the shield closes, or at once inside ``open()`` sections (the
    closure calls and user callbacks, where unwinding leaves a consistent state). Signals reach
    only the main thread; elsewhere, or when SIGINT is not handled in Python, this does nothing.
    """

    def __init__(self) -> None:
        self._previous: Callable[[int, FrameType | None], Any] | None = None
        self._pending: tuple[int, FrameType | None] | None = None
        self._open = False

    def __enter__(self) -> _SigintShield:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if callable(previous):
                with contextlib.suppress(ValueError):  # a subinterpreter: no signals here
                    signal.signal(signal.SIGINT, self._handle)
                    self._previous = previous
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._open = False
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._deliver()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._pending = (signum, frame)
        if self._open:
            self._deliver()

    def _deliver(self) -> None:
        if self._pending is not None and self._previous is not None:
            pending, self._pending = self._pending, None
            self._previous(*pending)

    @contextlib.contextmanager
    def open(self) -> Iterator[None]:
        """A section an interrupt may cut short; one that is pending arrives on entry."""
        self._open = True
        try:
            self._deliver()
            yield
        finally:
            self._open = False


class _SavedTensor(NamedTuple):
    original: Tensor
    value: Tensor


_StateSnapshot = list[tuple[Any, dict[str, Any], dict[str, Any]]]


def _snapshot_state(state: Mapping[Any, dict[str, Any]]) -> _StateSnapshot:
    """Each entry of a base optimizer's state: its dict, and its values (tensors cloned)."""
    return [
        (
            key,
            entry,
            {
                name: _SavedTensor(v, v.clone()) if isinstance(v, Tensor) else copy.deepcopy(v)
                for name, v in entry.items()
            },
        )
        for key, entry in state.items()
    ]


def _restore_state(state: dict[Any, dict[str, Any]], snapshot: _StateSnapshot) -> None:
    """Put a base optimizer's state back as snapshotted, in place (same dicts and tensors)."""
    kept = {id(key) for key, _, _ in snapshot}
    for key in [k for k in state if id(k) not in kept]:
        del state[key]
    with torch.no_grad():
        for key, entry, values in snapshot:
            entry.clear()
            for name, value in values.items():
                if isinstance(value, _SavedTensor):
                    entry[name] = value.original.copy_(value.value)
                else:
                    entry[name] = value
            state[key] = entry


def _clone_state(state: RuleState) -> RuleState:
    out: RuleState = {}
    for key, value in state.items():
        if isinstance(value, Tensor):
            out[key] = value.detach().clone()
        elif isinstance(value, list | tuple):
            out[key] = [v.detach().clone() if isinstance(v, Tensor) else v for v in value]
        else:
            out[key] = value
    return out


def _state_like(state: RuleState, params: Sequence[Tensor]) -> RuleState:
    """Clone a saved rule state onto the devices/dtypes of the perturbed parameters."""
    out = _clone_state(state)
    for key, value in out.items():
        if isinstance(value, list) and len(value) == len(params):
            out[key] = [
                v.to(p.device, p.dtype) if isinstance(v, Tensor) else v
                for v, p in zip(value, params, strict=True)
            ]
    return out
