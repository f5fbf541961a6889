"""The record classes of the compiled :mod:`gbalance.system.limits`.

:class:`FdLimit` and :class:`ConnLimit` live here, not beside their user,
for the reason :mod:`gbalance.proxy.records` gives (Cython 0.29 and record
classes); the compiled module re-exports them.
"""

import resource
from dataclasses import dataclass

#: Descriptors kept for what is not a proxied connection: the listener,
#: state file, event loop, log, control and hand-over sockets, health checks.
RESERVED_FDS = 64


@dataclass(frozen=True)
class FdLimit:
    """RLIMIT_NOFILE before and after :func:`raise_fd_limit`."""

    before: int
    after: int
    hard: int

    def describe(self) -> str:
        """One log line saying what the master may open."""
        hard = "unlimited" if self.hard == resource.RLIM_INFINITY else str(self.hard)
        if self.after == self.before:
            return f"file descriptor limit {self.after} (hard limit {hard})"
        return f"file descriptor limit raised from {self.before} to {self.after} (hard limit {hard})"


@dataclass(frozen=True)
class ConnLimit:
    """What one serving process may hold: ``conns`` open connections
    (accepted ones, with their backend connect pending or linked; 0 = no
    limit) and ``pipes`` splice pipes at once."""

    conns: int
    pipes: int
    nofile: int
    #: An explicit -L asks for more descriptors than this process may open.
    overcommitted: bool = False

    def describe(self, per: str = "") -> str:
        """One log line about the limit (or what is wrong with it); ``per``:
        whose limit it is (" per worker")."""
        if not self.conns:
            return "no connection limit (-L 0)"
        if self.overcommitted:
            return (f"-L: {self.conns} connections{per} need about {2 * self.conns + RESERVED_FDS} file"
                    f" descriptors, a process may open {self.nofile}: accepting pauses when they run out")
        return f"at most {self.conns} connections at once{per} (file descriptor limit {self.nofile})"
