"""Wall-clock deadlines, and running a call under one.

A per-call socket timeout is not a deadline: a peer that sends one byte just before
each timeout never times out (DESIGN.md, "traps we know of"). So every exchange with
a peer runs under a ``Deadline``, and every call into code that has no deadline of its
own (a name lookup, a registry command, a process group's constructor) runs through
``call_within``, the one helper for that.
"""

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError

_T = TypeVar("_T")


class DeadlineExceeded(ProtocolError):
    """An exchange did not finish within its wall-clock deadline."""


class Deadline:
    """A wall-clock deadline for one exchange, ``seconds`` from now."""

    def __init__(self, seconds: float, what: str):
        self.seconds = seconds
        self.what = what
        self._at = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left; raises ``DeadlineExceeded`` once there are none."""
        left = self._at - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"{self.what} took longer than {self.seconds:g} s")
        return left

    def left_or_zero(self) -> float:
        """Seconds left, 0 once there are none (never raises)."""
        return max(0.0, self._at - time.monotonic())


class CallTimedOut(Exception):
    """``call_within``'s call did not return in time; it may still end on its thread."""


def call_within(
    call: Callable[[], _T],
    seconds: float,
    name: str,
    on_timeout: Callable[[], None] | None = None,
    discard: Callable[[_T], Any] | None = None,
) -> _T:
    """``call()`` run on a daemon thread named ``name``: its result, or the exception
    it raised, if it ends within ``seconds``.

    Otherwise ``on_timeout()`` runs (to make the call fail under its thread: shut its
    socket down, close its connection) and ``CallTimedOut`` is raised. A result that
    still arrives afterwards is nobody's: it goes to ``discard`` (to release what it
    holds: a process group, a connection). Raises ``RuntimeError`` if no thread can
    be started."""
    lock = threading.Lock()
    outcome: list[tuple[bool, Any]] = []
    abandoned = False

    def target() -> None:
        try:
            value = call()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            with lock:
                if not abandoned:
                    outcome.append((False, e))
            return
        with lock:
            if not abandoned:
                outcome.append((True, value))
                return
        if discard is not None:
            discard(value)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(max(seconds, 0.0))
    with lock:
        if not outcome:
            abandoned = True
    if abandoned:
        if on_timeout is not None:
            on_timeout()
        raise CallTimedOut(f"{name}: no result within {seconds:g} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]
