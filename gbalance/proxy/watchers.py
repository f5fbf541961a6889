"""Recycled libev watchers for the per-connection path.

Creating an I/O watcher through gevent costs an object allocation and an
``fcntl(F_GETFD)`` system call (gevent checks the descriptor); a timer
costs an allocation.  A stopped watcher can be pointed at another
descriptor (or, for a timer, armed again) instead, so the
watchers of a closed link or a finished connect serve the next ones.

One :class:`Watchers` pool per loop, owned by the server's
:class:`~gbalance.proxy.connect.Connector` and handed to its links; nothing here
needs a lock (one thread per loop).  A recycled watcher drops its callback
and arguments, so it keeps no closed link or race alive.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol

    # What this package uses of gevent's loop and watchers (gevent ships no
    # type information); for the type checker only.

    class Watcher(Protocol):
        callback: "Callable[..., Any] | None"
        args: "tuple[Any, ...] | None"

        @property
        def active(self) -> bool: ...
        def start(self, callback: "Callable[..., Any]", *args: Any) -> None: ...
        def stop(self) -> None: ...

    class IoWatcher(Watcher, Protocol):
        fd: int
        events: int

    class TimerWatcher(Watcher, Protocol):
        def again(self, callback: "Callable[..., Any]", *args: Any) -> None: ...

    class EventLoop(Protocol):
        def io(self, fd: int, events: int, ref: bool = ..., priority: "int | None" = ...) -> IoWatcher: ...
        def timer(self, after: float, repeat: float = ..., ref: bool = ...,
                  priority: "int | None" = ...) -> TimerWatcher: ...
        def signal(self, signum: int, ref: bool = ..., priority: "int | None" = ...) -> Watcher: ...
        def now(self) -> float: ...


#: libev event masks for I/O watchers: readable, writable.
READ = 1
WRITE = 2
#: Both directions (masks a watcher's ``events`` down to what I/O means).
READ_WRITE = READ | WRITE

#: Stopped watchers of each kind kept for reuse.
KEEP = 512


class Watchers:
    """Free lists of stopped I/O watchers and timers of one loop."""

    __slots__ = ("loop", "io_free", "timer_free", "timeout")

    def __init__(self, loop: "EventLoop", timeout: float = 0.0):
        self.loop = loop
        self.io_free: "list[IoWatcher]" = []
        self.timer_free: "list[TimerWatcher]" = []
        #: The one delay every pooled timer has (the connect timeout).
        self.timeout = timeout

    def io(self, fd: int, events: int) -> "IoWatcher":
        """A stopped I/O watcher for ``fd`` and ``events``: a recycled one if any."""
        free = self.io_free
        if free:
            w = free.pop()
            try:
                w.fd = fd
                if w.events != events:
                    w.events = events
                return w
            except (AttributeError, TypeError, ValueError):
                pass
        return self.loop.io(fd, events)

    def timer(self) -> "TimerWatcher":
        """A stopped timer of ``timeout`` seconds: a recycled one if any.

        Start it with ``again()``, not ``start()``: libev keeps only the
        time that was left in a timer stopped part-way, and a gevent timer
        that has fired fires at once when started again; ``again()`` on
        this repeating timer always arms it for the full ``timeout`` (stop
        it when it fires).
        """
        free = self.timer_free
        if free:
            return free.pop()
        return self.loop.timer(self.timeout, self.timeout)

    def recycle_io(self, w: "IoWatcher | None") -> None:
        """Keep ``w`` (stopped; its descriptor is about to close) for later."""
        if w is not None and not w.active and len(self.io_free) < KEEP:
            w.callback = None
            w.args = None
            self.io_free.append(w)

    def recycle_timer(self, t: "TimerWatcher | None") -> None:
        """Keep timer ``t`` (stopped) for later."""
        if t is not None and not t.active and len(self.timer_free) < KEEP:
            t.callback = None
            t.args = None
            self.timer_free.append(t)
