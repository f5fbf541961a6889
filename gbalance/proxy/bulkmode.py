"""How a bulk flow moves its bytes: splice or copy, chosen by measuring both.

Neither way wins everywhere (bench/FINDINGS, "Why splice loses on this
machine kind").  Splicing costs the proxy the least CPU, so it wins where
the proxy's core is what limits a stream.  Copying breaks the journey of
each page in two (sender to proxy, proxy to receiver), and where the
endpoints share this machine and their core is the limit, that leaves
them less work per byte: on one 2-core machine of the same kind one
stream went 15.3 Gbit/s spliced against 19.2 copied, on another 18.1
spliced against HAProxy's 10.7 copied.

So a flow that turns bulk measures.  It moves its bytes one way for a
window, then the other, twice each, and keeps the way that moved more
bytes per second; copying must win by :data:`MARGIN`, since splicing is
the cheaper of the two for the proxy.  The choice holds for
:data:`HOLD` seconds, then the flow measures again (the conditions of a
long transfer change).  A window stretched by an idle gap says nothing
about either way, so it voids that comparison.  Without a pipe (no
splice on this platform, or the pipe budget spent) a bulk flow copies.

:class:`BulkChoice` only decides: the flow (``forward.Flow``) tells it,
at the end of each read wake-up, how many bytes moved and when, and
switches ways when told, once nothing of the old way is still held.
"""

from __future__ import annotations

#: Seconds of one measuring window.
WINDOW = 0.04
#: Windows of each way in one comparison (they alternate).
TRIALS = 2
#: How much more per second copying must move to be chosen.
MARGIN = 1.05
#: Seconds a choice holds before the next comparison.
HOLD = 5.0
#: A window longer than this many WINDOWs held an idle gap: no comparison.
STALE = 10


class BulkChoice:
    """The measuring and the choice of one bulk flow (see the module doc)."""

    __slots__ = ("copy", "can_splice", "window", "hold", "trial", "windows", "moved", "t0", "b0",
                 "until", "bytes", "secs", "switches")

    def __init__(self, can_splice: bool, now: float, window: float | None = None,
                 hold: float | None = None) -> None:
        self.can_splice = can_splice
        #: The way to use now: copy (True) or splice.
        self.copy = not can_splice
        self.window = WINDOW if window is None else window
        self.hold = HOLD if hold is None else hold
        #: Bytes this flow moved since it turned bulk.
        self.moved = 0
        #: How often the way changed (for tests and -d).
        self.switches = 0
        self.trial = False
        self.windows = 0
        self.t0 = now
        self.b0 = 0
        self.bytes = [0, 0]           # per way: splice, copy
        self.secs = [0.0, 0.0]
        self.until = float("inf")
        if can_splice:
            self._begin(now)

    def _begin(self, now: float) -> None:
        self.trial = True
        self.windows = 0
        self.bytes = [0, 0]
        self.secs = [0.0, 0.0]
        self.t0 = now
        self.b0 = self.moved
        self.until = now + self.window

    def step(self, now: float, moved: int) -> bool:
        """Count the ``moved`` bytes of a wake-up that ended at ``now``
        (seconds, any monotonic clock); the way to use from now on (True: copy)."""
        self.moved += moved
        if now < self.until:
            return self.copy
        if not self.trial:
            self._begin(now)
            return self.copy
        elapsed = now - self.t0
        if elapsed > STALE * self.window:
            # Idle in the middle of a window: rates from it say nothing.
            self.trial = False
            self.until = now + self.hold
            return self.copy
        way = 1 if self.copy else 0
        self.bytes[way] += self.moved - self.b0
        self.secs[way] += elapsed
        self.windows += 1
        if self.windows < 2 * TRIALS:
            self._switch(not self.copy)
            self.t0 = now
            self.b0 = self.moved
            self.until = now + self.window
            return self.copy
        spliced = self.bytes[0] / self.secs[0] if self.secs[0] > 0 else 0.0
        copied = self.bytes[1] / self.secs[1] if self.secs[1] > 0 else 0.0
        self._switch(copied > spliced * MARGIN)
        self.trial = False
        self.until = now + self.hold
        return self.copy

    def _switch(self, copy: bool) -> None:
        if copy != self.copy:
            self.switches += 1
            self.copy = copy
