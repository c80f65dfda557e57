"""The signal shield of a step: no asynchronous exception lands while parameters and state are
half-updated.

Python runs a signal handler between any two bytecodes, so an exception raised by one (Ctrl-C's
KeyboardInterrupt, a SIGTERM handler on preemption, a SIGALRM timeout) could land between the
base optimizer's update of one tensor and the next. Blocking signals with
``signal.pthread_sigmask`` would not do: a process-directed signal is then delivered to another
thread (torch's workers, gloo's), whose C handler still trips the main thread's Python handler.
So the shield swaps every Python-level handler for one that records the signal, and hands it to
the real handler when the shield closes, or at once inside ``open()`` sections (the closure calls
and user callbacks, where unwinding leaves a consistent state and the real handlers are back in
place).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # the C module: no Python lines per call
import itertools
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

Handler = Callable[[int, FrameType | None], Any]
# Every signal a handler can be set for (SIGKILL and SIGSTOP cannot be caught).
_CATCHABLE = (
    tuple(
        s
        for s in signal.valid_signals()
        if s not in {getattr(signal, "SIGKILL", -1), signal.SIGSTOP}
    )
    if hasattr(signal, "SIGSTOP")
    else tuple(signal.valid_signals())
)


def _python_handled() -> list[int]:
    """The signals whose handler is a Python callable (C builtins only: no Python lines run)."""
    handlers = map(_signal.getsignal, _CATCHABLE)
    return list(itertools.compress(_CATCHABLE, map(callable, handlers)))


class _SignalShield:
    """Defers every signal with a Python-level handler during a step, except in ``open()``.

    Signals reach only the main thread's handlers; elsewhere, or when no signal is handled in
    Python, this does nothing. A pending signal is re-raised with ``signal.raise_signal`` once
    the real handlers are back, so Python delivers it as it would have.
    """

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self._pending: list[int] = []
        self._active = False

    def __enter__(self) -> _SignalShield:
        if threading.current_thread() is threading.main_thread():
            self._active = True
            try:
                self._install()
            except ValueError:  # a subinterpreter: no signals here
                self._active = False
            except BaseException:  # a signal's exception mid-way: put back what was swapped
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._active:
            self._active = False
            try:
                self._uninstall()
            finally:  # an exception from a restored handler cut the first round short
                self._uninstall()
                self._deliver()

    def _install(self) -> None:
        for signum in _python_handled():
            # Recorded before the swap: an exception between the two leaves nothing unrecorded.
            self._previous[signum] = _signal.getsignal(signum)
            _signal.signal(signum, self._handle)

    def _uninstall(self) -> None:
        for signum in list(self._previous):
            if _signal.getsignal(signum) == self._handle:  # a handler set meanwhile stays
                _signal.signal(signum, self._previous[signum])
            del self._previous[signum]  # after the restore: an interrupt between loses nothing

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum not in self._pending:
            self._pending.append(signum)

    def _deliver(self) -> None:
        """Re-raise the recorded signals to their real handlers (which may raise)."""
        while self._pending:
            signal.raise_signal(self._pending.pop(0))

    def open(self) -> _OpenSection:
        """A section a signal may cut short; one that is pending arrives on entry."""
        return _OpenSection(self)


class _OpenSection:
    """``with shield.open():`` the real handlers are in place (a plain class, not a generator:
    an exception landing in a generator context manager's exit would leave its cleanup to the
    garbage collector, after the shield closed)."""

    def __init__(self, shield: _SignalShield) -> None:
        self._shield = shield

    def __enter__(self) -> None:
        if self._shield._active:
            self._shield._uninstall()
            self._shield._deliver()

    def __exit__(self, *exc_info: object) -> None:
        if self._shield._active:
            self._shield._install()


# The shield's former name (it deferred SIGINT only).
_SigintShield = _SignalShield
