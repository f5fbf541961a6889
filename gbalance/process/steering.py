"""Which workers take new connections (``-w N``): the first ones, until they fall behind.

Every worker of an instance accepts from the same listening socket.  If
all of them watched it all the time, the kernel would wake whichever
worker is idle for each new client, so under a steady load every worker
runs part-time, sleeps and wakes for nearly every connection, and pays a
wake-up (a context switch, a loop turn) for each: in ``make bench`` two
workers cost 1.2 times as much CPU per connection as one.  Instead the
master lets the first *A* workers (rows ``0 .. A-1``) accept and keeps
the others on standby (their listener out of their epoll set, so no
client wakes them), and changes *A* from what it samples every
:data:`TICK` seconds:

* **more** workers (*A* + 1) when clients wait: the accept queue is not
  empty at two samples in a row (one client that arrived just before a
  sample is no sign of anything) and either nobody accepted in between
  (the accepting workers are stopped, dead, or out of descriptors) or the
  queue holds more than :data:`WAIT_LIMIT` seconds of the accept rate
  just seen;
* **more** workers (as many as it takes) when the accepting ones hold
  :data:`SPREAD` connections more than the next one: long-lived
  connections are spread, so no one worker runs into its descriptor
  limit or carries every open connection alone;
* **a nudge** when clients wait, nobody accepted in between, and every
  worker accepts already, so none can be added: the accepting workers are
  told to look at the listener once.  A guard: the kernel wakes one
  worker per arriving client, and should that worker not accept (one
  that stopped watching the listener and has not yet left the kernel's
  list, see :mod:`gbalance.system.exclusive`), nobody else is woken until
  the next client arrives, so one client could wait for ever.  Repeated
  at most every :data:`NUDGE_EVERY` seconds while the clients still wait;
* **fewer** (*A* - 1) after :data:`HOLD` seconds without either, if all
  the workers together (those on standby too: they serve what they hold)
  used at most :data:`IDLE_SHARE` of a core per accepting worker that
  would remain, and the spread rule would not take the worker straight
  back.

A worker on standby keeps serving what it holds.  The master writes *A*
to the state file (``H_ACCEPTING``, its only writer) and signals the
workers (SIGWINCH), which read it.  :class:`Steering` is the decision
alone, on samples the pool takes, so it is tested with made-up samples
and clocks.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Seconds between two samples (the master's timer).
TICK = 0.05
#: Clients may wait this long (queue length over the accept rate) before
#: one more worker is asked to accept.
WAIT_LIMIT = 0.010
#: Open connections the accepting workers may hold beyond the next worker's.
SPREAD = 128
#: Seconds without pressure before one worker fewer is considered.
HOLD = 1.0
#: Fewer workers only if those left would run at most this busy.
IDLE_SHARE = 0.5
#: Seconds between two nudges while the same clients still wait.
NUDGE_EVERY = 1.0


@dataclass(frozen=True)
class Sample:
    """What the master sees at one tick."""

    now: float                      # seconds, monotonic
    queued: "int | None"            # clients in the accept queue (None: unknown)
    accepted: "tuple[int, ...]"     # per worker: connections taken so far (a running total)
    open: "tuple[int, ...]"         # per worker: connections open now
    cpu: "float | None" = None      # CPU seconds of every worker so far (None: not read this tick)


class Steering:
    """The number of workers asked to accept, from one sample to the next."""

    def __init__(self, n: int, wait_limit: float = WAIT_LIMIT, spread: int = SPREAD,
                 hold: float = HOLD, idle_share: float = IDLE_SHARE):
        self.n = max(1, n)
        self.wait_limit = wait_limit
        self.spread = spread
        self.hold = hold
        self.idle_share = idle_share
        self.accepting = 1
        self.last: Sample | None = None
        self.pressed = 0.0          # when the last rule asked for more workers (or A last changed)
        self.cpu_mark: "tuple[float, float] | None" = None    # (time, CPU seconds) at the window's start
        self.why = ""               # why the last change (or nudge) was made (for the debug log)
        self.nudge = False          # set by decide(): the accepting workers should look at the listener
        self.nudged = float("-inf")     # when the last nudge was asked for

    def cpu_due(self, now: float) -> bool:
        """Should the next sample read the workers' CPU time?"""
        return (self.accepting > 1 and now - self.pressed >= self.hold
                and (self.cpu_mark is None or now - self.cpu_mark[0] >= self.hold))

    def grow(self, why: str, now: float, to: int = 0) -> int:
        """One worker more (or up to ``to``), e.g. when an accepting worker died."""
        want = min(self.n, max(self.accepting + 1, to))
        if want > self.accepting:
            self.accepting = want
            self.why = why
            self.cpu_mark = None
        self.pressed = now
        return self.accepting

    def decide(self, s: Sample) -> int:
        """Take one sample; the number of workers that should accept now."""
        last, self.last = self.last, s
        self.nudge = False
        a = self.accepting
        if self.n == 1:
            return a
        # Spread: the accepting workers hold far more than the next one.
        k = a
        while k < self.n and k <= len(s.open) - 1 and min(s.open[:k]) >= s.open[k] + self.spread:
            k += 1
        if k > a:
            return self.grow(f"the accepting workers hold {self.spread}+ connections more than the next", s.now, k)
        if last is not None and s.queued and last.queued:
            took = sum(s.accepted) - sum(last.accepted)
            dt = s.now - last.now
            if took <= 0:
                why = f"{s.queued} clients wait and none was accepted for {dt:.2f} s"
                if a < self.n:
                    return self.grow(why, s.now)
                if s.now - self.nudged >= NUDGE_EVERY:
                    self.nudge = True
                    self.nudged = s.now
                    self.why = why
                self.pressed = s.now
                return a
            if dt > 0 and s.queued * dt > self.wait_limit * took:
                return self.grow(f"{s.queued} clients wait, {1000 * s.queued * dt / took:.0f} ms at the"
                                 " accept rate", s.now)
        self.nudged = float("-inf")         # no stall at this sample: the next one is nudged at once
        if a == 1:
            return a
        if s.now - self.pressed < self.hold or s.cpu is None:
            return a
        if self.cpu_mark is None or s.now - self.cpu_mark[0] <= 0 or s.cpu < self.cpu_mark[1]:
            # (less than before: a worker was replaced, its CPU time starts over)
            self.cpu_mark = (s.now, s.cpu)
            return a
        busy = (s.cpu - self.cpu_mark[1]) / (s.now - self.cpu_mark[0])
        self.cpu_mark = (s.now, s.cpu)
        # The worker that would leave: would the spread rule take it back at once?
        if len(s.open) >= a and min(s.open[:a - 1]) >= s.open[a - 1] + self.spread:
            return a
        if busy <= (a - 1) * self.idle_share:
            self.accepting = a - 1
            self.why = f"the workers used {busy:.2f} of a core"
            self.pressed = s.now
        return self.accepting
