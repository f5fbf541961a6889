"""The time source of gbalance's timing logic, so tests can move it.

Timing decisions (monitor intervals and skipped ticks, worker restart
back-off) read the time and wait through a :class:`Clock` instead of
calling ``time.monotonic`` and ``gevent.sleep`` themselves; a test passes
a clock whose time it sets, and checks the decisions with no sleeps.  The
per-connection code (:class:`gbalance.proxy.connect.Race`) takes its event loop
the same way: ``loop.now()`` and ``loop.timer()``.
"""

from __future__ import annotations

import time
from typing import Protocol

import gevent


class Clock(Protocol):
    """What timing logic needs: the time, and a wait for the calling greenlet."""

    def now(self) -> float:
        """Monotonic seconds."""
        ...

    def sleep(self, seconds: float) -> None:
        """Let ``seconds`` pass (other greenlets run meanwhile)."""
        ...


class GeventClock:
    """The real clock: ``time.monotonic`` and ``gevent.sleep``."""

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        gevent.sleep(seconds)


#: The default clock of every timer user.
REAL = GeventClock()
