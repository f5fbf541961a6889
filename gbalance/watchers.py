"""Recycled I/O watchers for the per-connection path.

Creating a libev I/O watcher through gevent costs an object allocation and
an ``fcntl(F_GETFD)`` system call (gevent checks the descriptor).  A
stopped watcher can be pointed at another descriptor instead, with no
system call, so the watchers of a closed link serve the next connections.
Only watchers of the loop asked for are handed out; one process serves
from one loop, and nothing here needs a lock (one thread per loop).
"""

from __future__ import annotations

#: Stopped watchers kept for reuse (about two links' worth per parked handler).
KEEP = 512

_free: list = []


def io_watcher(loop, fd: int, events: int):
    """A stopped I/O watcher for ``fd`` and ``events`` on ``loop``: a recycled one if any."""
    if _free:
        w = _free.pop()
        if w.loop is loop:
            try:
                w.fd = fd
                if w.events != events:
                    w.events = events
                return w
            except (AttributeError, TypeError, ValueError):
                pass
    return loop.io(fd, events)


def recycle(w) -> None:
    """Keep ``w`` (stopped, its descriptor about to close) for a later connection."""
    if w is not None and len(_free) < KEEP and not w.active:
        _free.append(w)
