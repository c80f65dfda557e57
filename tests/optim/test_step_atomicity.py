"""A step is all or nothing (DESIGN.md section 3): pre-step or stepped, never mixed.

Failures inside the base optimizer's step (a raising step hook) and asynchronous interrupts
(a real SIGINT delivered at any line a step executes) must leave every parameter (perturbed and
``perturb=False`` groups), the base optimizer's state, the rule state, the step counter and the
noise generator either exactly as before the step or exactly as after an uninterrupted step.
The stepped reference is a twin optimizer that never saw the failure.
"""

from __future__ import annotations

import copy
import gc
import os
import signal
import sys
import threading
import time

import pytest
import torch
from _helpers import Objective, all_equal, backward_closure, clones, nested_equal

from sharp_bilevel import SharpBilevelOptimizer

F64 = torch.float64
BASES = {
    "sgd_momentum": (torch.optim.SGD, {"momentum": 0.9}),
    "adam": (torch.optim.Adam, {}),
}


class Boom(RuntimeError):
    """Raised by a step hook."""


def _build(base: str):
    """VaSSO (stateful) with smoothing (noise generator), a perturbed and a perturb=False group."""
    gen = torch.Generator().manual_seed(4)
    P = [
        torch.nn.Parameter(torch.randn(4, 3, generator=gen, dtype=F64)),
        torch.nn.Parameter(torch.randn(5, generator=gen, dtype=F64)),
    ]
    Q = [torch.nn.Parameter(torch.tensor(0.3, dtype=F64))]  # a learnable lr, say
    objective = Objective([torch.randn(p.shape, generator=gen, dtype=F64) for p in P])
    base_cls, base_kwargs = BASES[base]
    opt = SharpBilevelOptimizer(
        [{"params": P}, {"params": Q, "perturb": False, "lr": 0.01}],
        base_optimizer=base_cls,
        perturbation="vasso",
        rho=0.1,
        theta=0.5,
        smooth=0.05,
        seed=3,
        lr=0.05,
        **base_kwargs,
    )
    return opt, P + Q, backward_closure(objective, P, Q)


def _snapshot(opt: SharpBilevelOptimizer, params) -> dict:
    return {
        "params": clones(params),
        "state_dict": copy.deepcopy(opt.state_dict()),  # base state, rule state, RNG, counters
        "steps_taken": opt.steps_taken,
        "noise_rng": opt._noise_generator.get_state(),
    }


def _same(a: dict, b: dict) -> bool:
    return (
        all_equal(a["params"], b["params"])
        and nested_equal(a["state_dict"], b["state_dict"])
        and a["steps_taken"] == b["steps_taken"]
        and torch.equal(a["noise_rng"], b["noise_rng"])
    )


def _state_tensor_ids(opt: SharpBilevelOptimizer) -> set[int]:
    return {id(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("good_steps", [0, 2], ids=["no_state_yet", "with_state"])
@pytest.mark.parametrize("hook", ["pre", "post"])
@pytest.mark.parametrize("base", list(BASES))
def test_raising_base_step_hook_leaves_everything_pre_step(base, hook, good_steps):
    opt, params, closure = _build(base)
    twin, twin_params, twin_closure = _build(base)
    for _ in range(good_steps):
        opt.step(closure)
        twin.step(twin_closure)
    before = _snapshot(opt, params)
    ids_before = _state_tensor_ids(opt)

    def boom(*_):
        raise Boom("hook failure")

    register = opt.base_optimizer.register_step_post_hook
    if hook == "pre":
        register = opt.base_optimizer.register_step_pre_hook
    handle = register(boom)
    with pytest.raises(Boom):
        opt.step(closure)
    handle.remove()

    assert _same(_snapshot(opt, params), before)
    assert opt.state is opt.base_optimizer.state
    assert _state_tensor_ids(opt) == ids_before  # restored in place: same tensor objects
    assert len(opt.state) == (0 if good_steps == 0 else len(params))
    # the next step is the one an optimizer that never saw the failure takes
    opt.step(closure)
    twin.step(twin_closure)
    assert _same(_snapshot(opt, params), _snapshot(twin, twin_params))


@pytest.mark.parametrize("base", list(BASES))
def test_sigint_in_a_post_step_hook_is_delivered_after_a_complete_step(base):
    opt, params, closure = _build(base)
    twin, twin_params, twin_closure = _build(base)
    opt.step(closure)
    twin.step(twin_closure)
    twin.step(twin_closure)
    handler = signal.getsignal(signal.SIGINT)
    handle = opt.base_optimizer.register_step_post_hook(
        lambda *_: signal.raise_signal(signal.SIGINT)
    )
    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    handle.remove()
    assert signal.getsignal(signal.SIGINT) is handler
    assert _same(_snapshot(opt, params), _snapshot(twin, twin_params))


def test_sigint_interrupts_a_closure_at_once_and_the_step_is_undone():
    opt, params, closure = _build("sgd_momentum")
    opt.step(closure)
    before = _snapshot(opt, params)
    reached = []

    def interrupted(ctx):
        loss = closure(ctx)
        if ctx.is_descent:  # at phi + eps, with the ascent's rule state pending
            signal.raise_signal(signal.SIGINT)
            reached.append(True)
        return loss

    with pytest.raises(KeyboardInterrupt):
        opt.step(interrupted)
    assert not reached  # the closure itself was interrupted, not the end of the step
    assert _same(_snapshot(opt, params), before)


class _InterruptAt:
    """A trace function that delivers SIGINT at the ``n``-th line the interpreter runs."""

    def __init__(self, n: int) -> None:
        self.n, self.lines = n, 0

    def __call__(self, frame, event, arg):
        if event == "line":
            self.lines += 1
            if self.lines == self.n:
                signal.raise_signal(signal.SIGINT)
        return self


def _traced_step(opt, closure, n):
    """One step with SIGINT at line ``n``; returns (lines run, KeyboardInterrupt raised).

    The garbage collector is off while tracing: a collection runs finalizers at arbitrary
    points, which would add traced lines that are not the step's and shift the sweep.
    """
    tracer, previous = _InterruptAt(n), sys.gettrace()
    interrupted = False
    collecting = gc.isenabled()
    gc.disable()
    sys.settrace(tracer)
    try:
        opt.step(closure)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        sys.settrace(previous)
        if collecting:
            gc.enable()
    return tracer.lines, interrupted


@pytest.mark.parametrize("base", list(BASES))
def test_sigint_at_every_line_of_a_step_leaves_it_pre_step_or_stepped(base):
    handler = signal.getsignal(signal.SIGINT)
    opt, params, closure = _build(base)
    opt.step(closure)
    pre = _snapshot(opt, params)
    opt.step(closure)
    stepped = _snapshot(opt, params)
    # how many lines one step runs (the tracer never reaches line 0)
    opt, params, closure = _build(base)
    opt.step(closure)
    lines, _ = _traced_step(opt, closure, 0)
    assert lines > 100

    outcomes = {"pre": 0, "stepped": 0}
    for n in range(1, lines + 1, 3):
        opt, params, closure = _build(base)
        opt.step(closure)
        _, interrupted = _traced_step(opt, closure, n)
        assert interrupted, f"the SIGINT at line {n} was lost"
        assert signal.getsignal(signal.SIGINT) is handler
        now = _snapshot(opt, params)
        if _same(now, pre):
            outcomes["pre"] += 1
        else:
            assert _same(now, stepped), f"a SIGINT at line {n} of {lines} left a mixed state"
            outcomes["stepped"] += 1
    # interrupts in the closures undo the step; from the base step on they wait for its end
    assert outcomes["pre"] > 0
    assert outcomes["stepped"] > 0


def test_steps_off_the_main_thread_or_with_sigint_ignored_leave_the_handler_alone():
    opt, params, closure = _build("sgd_momentum")
    twin, twin_params, twin_closure = _build("sgd_momentum")
    seen = []

    def watching(ctx):
        seen.append(signal.getsignal(signal.SIGINT))
        return closure(ctx)

    handler = signal.getsignal(signal.SIGINT)
    worker = threading.Thread(target=opt.step, args=(watching,))
    worker.start()
    worker.join()
    assert seen == [handler, handler]  # no shield outside the main thread
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        opt.step(watching)
        assert seen[2:] == [signal.SIG_IGN, signal.SIG_IGN]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    twin.step(twin_closure)
    twin.step(twin_closure)
    assert _same(_snapshot(opt, params), _snapshot(twin, twin_params))


class Preempted(Exception):
    """Raised by a SIGTERM or SIGALRM handler, as a scheduler's preemption handler might."""


def _raise_preempted(signum, frame):
    raise Preempted(signum)


@pytest.mark.parametrize("kind", ["SIGTERM", "SIGALRM"])
def test_sigterm_and_sigalrm_handlers_that_raise_see_an_all_or_nothing_step(kind):
    """A real signal (os.kill for SIGTERM, an interval timer for SIGALRM) sent at many lines of
    a step; its handler raises. Before the shield covered every signal, one landing after the
    base step left the images restored but momentum, the learned lr and the counter stepped."""
    signum = getattr(signal, kind)
    timer = signal.getitimer(signal.ITIMER_REAL)  # pytest-timeout's, put back below
    previous = signal.signal(signum, _raise_preempted)

    def send():
        if kind == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            signal.setitimer(signal.ITIMER_REAL, 1e-5)

    class SendAt(_InterruptAt):
        def __call__(self, frame, event, arg):
            if event == "line":
                self.lines += 1
                if self.lines == self.n:
                    send()
            return self

    try:
        opt, params, closure = _build("adam")
        opt.step(closure)
        pre = _snapshot(opt, params)
        opt.step(closure)
        stepped = _snapshot(opt, params)
        opt, params, closure = _build("adam")
        opt.step(closure)
        lines, _ = _traced_step(opt, closure, 0)
        outcomes = {"pre": 0, "stepped": 0}
        for n in range(1, lines + 1, 5):
            opt, params, closure = _build("adam")
            opt.step(closure)
            tracer, raised = SendAt(n), False
            sys.settrace(tracer)
            try:
                opt.step(closure)
                sys.settrace(None)
                time.sleep(0.05)  # a timer that fires after the step lands here
            except Preempted:
                raised = True
            finally:
                sys.settrace(None)
            assert raised, f"the {kind} sent at line {n} was lost"
            assert signal.getsignal(signum) is _raise_preempted
            now = _snapshot(opt, params)
            if _same(now, pre):
                outcomes["pre"] += 1
            else:
                assert _same(now, stepped), f"a {kind} at line {n} of {lines} left a mixed state"
                outcomes["stepped"] += 1
        assert outcomes["pre"] > 0
        assert outcomes["stepped"] > 0
    finally:
        signal.signal(signum, previous)
        signal.setitimer(signal.ITIMER_REAL, *timer)
