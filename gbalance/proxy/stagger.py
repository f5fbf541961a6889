"""Adaptive stagger: how long a backend connect may stay pending before a
parallel attempt starts on the next candidate.

Each channel keeps a smoothed connect time and its mean deviation, updated
from every successful connect the way TCP updates its retransmission timer
(RFC 6298): ``srtt += (sample - srtt) / 8`` and ``rttvar += (|srtt - sample|
- rttvar) / 4``.  The delay is ``srtt + K * rttvar`` clamped between a floor
and the configured ``stagger=`` value (the ceiling).  A channel with no
measurement yet starts at :data:`INITIAL` (at most the ceiling).  Each time
a channel's delay runs out and a parallel connect starts, its delay doubles
(up to the ceiling), as TCP backs its timer off: a channel that is merely
slower than assumed stops being raced after a few connects, and the next
measured connect sets the delay from the estimates again.

The estimates live in the process that connects (the master with ``-w 1``,
each worker its own with ``-w N``); after each connect that process writes
the channel's delay into the table (``C_STAGGER_US``, the last writer wins)
for ``monitor show`` and ``metrics``.  Nothing here touches sockets or clocks:
callers pass measured seconds, so tests drive it with any numbers.
"""


# Re-exported: their users import them from here.
from gbalance.proxy.records import DEFAULT_FLOOR as DEFAULT_FLOOR, StaggerRule as StaggerRule

#: Delay of a channel with no measured connect yet.
INITIAL = 0.02
#: Deviations added to the smoothed connect time (RFC 6298's K).
DEVIATIONS = 4.0
ALPHA = 1.0 / 8.0
BETA = 1.0 / 4.0


def initial_delay(ceiling: float) -> float:
    """The delay of a channel not measured yet, for a ``stagger=`` of ``ceiling``."""
    return min(INITIAL, ceiling)


class StaggerEstimator:
    """Connect-time estimates of every channel (``groups`` x ``channels``)."""

    __slots__ = ("rule", "srtt", "rttvar", "delays", "floor", "ceiling", "width", "initial")

    def __init__(self, rule: StaggerRule, groups: int, channels: int):
        self.rule = rule
        self.ceiling = rule.ceiling
        self.floor = min(rule.floor, rule.ceiling)
        self.width = channels
        nslots = groups * channels
        self.srtt: "list[float]" = [-1.0] * nslots     # -1: not measured yet
        self.rttvar: "list[float]" = [0.0] * nslots
        self.initial = initial_delay(rule.ceiling)
        self.delays: "list[float]" = [self.initial] * nslots

    def delay(self, g: int, c: int) -> float:
        """The stagger delay for group ``g`` channel ``c`` now (0 when off)."""
        return self.delays[g * self.width + c]

    def sample(self, g: int, c: int, seconds: float) -> float:
        """Fold one measured successful connect time in; return the new delay."""
        if self.ceiling <= 0:
            return 0.0
        idx = g * self.width + c
        if seconds < 0:
            seconds = 0.0
        srtt = self.srtt[idx]
        if srtt < 0:
            srtt = seconds
            var = seconds / 2
        else:
            var = self.rttvar[idx]
            var += BETA * (abs(srtt - seconds) - var)
            srtt += ALPHA * (seconds - srtt)
        self.srtt[idx] = srtt
        self.rttvar[idx] = var
        d = srtt + DEVIATIONS * var
        if d < self.floor:
            d = self.floor
        elif d > self.ceiling:
            d = self.ceiling
        self.delays[idx] = d
        return d

    def backoff(self, g: int, c: int) -> float:
        """The channel's delay ran out (a parallel connect starts): double it, up
        to the ceiling, until a measured connect sets it again.  Returns it."""
        idx = g * self.width + c
        d = self.delays[idx] * 2
        if d > self.ceiling:
            d = self.ceiling
        self.delays[idx] = d
        return d

    def forget(self, g: int, c: int) -> None:
        """Drop a channel's history (its address changed)."""
        idx = g * self.width + c
        self.srtt[idx] = -1.0
        self.rttvar[idx] = 0.0
        self.delays[idx] = self.initial
