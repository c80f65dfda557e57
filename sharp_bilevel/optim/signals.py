"""The signal shield of a step: no asynchronous exception lands while parameters and state are
half-updated."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any


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
