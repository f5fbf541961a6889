"""A fake event loop with a clock the test moves: timing logic without sleeps.

It offers what gbalance's loop users call: ``now()``, ``timer(after,
repeat)`` (watchers with ``start``/``again``/``stop``/``active``) and
``io(fd, events)``.  Timers fire only from :meth:`FakeLoop.advance`; I/O
watchers fire only when the test calls :meth:`FakeLoop.fire_io`, so a test
says exactly when a connect "became writable".  Sockets stay real.
"""

from __future__ import annotations


class FakeTimer:
    def __init__(self, loop: "FakeLoop", after: float, repeat: float):
        self.loop, self.after, self.repeat = loop, after, repeat
        self.active = False
        self.due = 0.0
        self.callback = None
        self.args = None

    def start(self, callback, *args) -> None:
        self.callback, self.args = callback, args
        self.due = self.loop.t + self.after
        self.active = True

    def again(self, callback, *args) -> None:
        self.callback, self.args = callback, args
        self.due = self.loop.t + self.repeat
        self.active = True

    def stop(self) -> None:
        self.active = False


class FakeIO:
    def __init__(self, fd: int, events: int):
        self.fd, self.events = fd, events
        self.active = False
        self.callback = None
        self.args = None

    def start(self, callback, *args) -> None:
        self.callback, self.args = callback, args
        self.active = True

    def stop(self) -> None:
        self.active = False


class FakeLoop:
    def __init__(self) -> None:
        self.t = 0.0
        self.timers: list[FakeTimer] = []
        self.ios: list[FakeIO] = []

    def now(self) -> float:
        return self.t

    def timer(self, after: float, repeat: float = 0.0) -> FakeTimer:
        t = FakeTimer(self, after, repeat)
        self.timers.append(t)
        return t

    def io(self, fd: int, events: int) -> FakeIO:
        w = FakeIO(fd, events)
        self.ios.append(w)
        return w

    def advance(self, dt: float) -> None:
        """Move the clock by ``dt``, firing due timers in order (a repeating
        timer re-arms, as libev's does)."""
        end = self.t + dt
        while True:
            due = [t for t in self.timers if t.active and t.due <= end + 1e-12]
            if not due:
                break
            t = min(due, key=lambda x: x.due)
            self.t = max(self.t, t.due)
            if t.repeat > 0:
                t.due = self.t + t.repeat
            else:
                t.active = False
            t.callback(*t.args)
        self.t = end

    def fire_io(self, fd: int) -> None:
        """The descriptor ``fd`` is ready: run its active watcher."""
        for w in self.ios:
            if w.active and w.fd == fd:
                w.callback(*w.args)
                return
        raise AssertionError(f"no active watcher on fd {fd}")


class FakeClock:
    """A :class:`gbalance.clock.Clock` whose ``sleep`` only moves the time
    (and records the wait); ``stop_after`` sleeps it raises :class:`Enough`
    to end the loop under test."""

    def __init__(self, stop_after: int = 1000) -> None:
        self.t = 100.0
        self.sleeps: list[float] = []
        self.stop_after = stop_after

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        if len(self.sleeps) >= self.stop_after:
            raise Enough
        self.sleeps.append(round(seconds, 9))
        self.t += seconds


class Enough(Exception):
    """Raised by :class:`FakeClock` to stop a loop after enough waits."""
