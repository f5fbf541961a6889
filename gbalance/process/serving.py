"""What the master serves with: one interface, two implementations.

With ``-w 1`` the master's own process accepts and forwards: a
:class:`~gbalance.proxy.server.BalanceServer` (built by
:func:`gbalance.wiring.build_server`).  With ``-w N`` the workers do, and
the master holds a :class:`~gbalance.process.pool.WorkerPool` instead.  The
master's start, drain, grace period, ``kill`` and ``-r`` hand-over drive
either through :class:`Serving` alone, so they behave the same both ways.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gbalance.process.pool import WorkerPool
    from gbalance.proxy.server import BalanceServer


class Serving(Protocol):
    """The serving side of a master, as its life cycle (:mod:`gbalance.process.master`) sees it."""

    #: The event loop the master's grace timer runs on.
    loop: Any

    @property
    def open_count(self) -> int:
        """Connections still open (links plus pending connects, over every worker)."""

    def start(self) -> None:
        """Begin accepting on the listener."""

    def stop_accepting(self) -> None:
        """Accept no more connections; open ones go on."""

    def drain(self, on_drained: Callable[[], None]) -> None:
        """Stop accepting and close the listener; ``on_drained`` once nothing is open."""

    def reset_all(self) -> int:
        """Reset every open connection now; how many there were."""

    def finish(self) -> None:
        """At exit: stop what still runs (a process's timers, or the worker processes)."""


if TYPE_CHECKING:
    def _both_serve(pool: WorkerPool, server: BalanceServer) -> tuple[Serving, Serving]:
        """mypy checks here that both classes are :class:`Serving`."""
        return pool, server
