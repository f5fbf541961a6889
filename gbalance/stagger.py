"""Adaptive stagger: how long a backend connect may stay pending before a
parallel attempt starts on the next candidate.

Each channel keeps a smoothed connect time and its mean deviation, updated
from every successful connect the way TCP updates its retransmission timer
(RFC 6298): ``srtt += (sample - srtt) / 8`` and ``rttvar += (|srtt - sample|
- rttvar) / 4``.  The delay is ``srtt + K * rttvar`` clamped between a floor
and the configured ``stagger=`` value (the ceiling).  A channel with no
measurement yet uses the ceiling, so a cold start behaves as before.

The estimates live in the process that connects (one list per master); the
master copies the current delay of each channel into the table for
``monitor show`` and ``metrics``.  Nothing here touches sockets or clocks:
callers pass measured seconds, so tests drive it with any numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Lowest delay: below this a busy loop's own latency would look like a hang.
DEFAULT_FLOOR = 0.005
#: Deviations added to the smoothed connect time (RFC 6298's K).
DEVIATIONS = 4.0
ALPHA = 1.0 / 8.0
BETA = 1.0 / 4.0


@dataclass(frozen=True)
class StaggerRule:
    """The configured bounds: ``ceiling`` is ``stagger=`` (0 turns it off)."""

    ceiling: float
    floor: float = DEFAULT_FLOOR

    @property
    def enabled(self) -> bool:
        return self.ceiling > 0


class StaggerEstimator:
    """Per-channel connect-time estimates, indexed by a flat channel number."""

    __slots__ = ("rule", "srtt", "rttvar", "delays", "floor", "ceiling")

    def __init__(self, rule: StaggerRule, nslots: int):
        self.rule = rule
        self.ceiling = rule.ceiling
        self.floor = min(rule.floor, rule.ceiling)
        self.srtt: list[float] = [-1.0] * nslots     # -1: not measured yet
        self.rttvar: list[float] = [0.0] * nslots
        self.delays: list[float] = [rule.ceiling] * nslots

    def delay(self, idx: int) -> float:
        """The stagger delay for channel ``idx`` now (0 when staggering is off)."""
        return self.delays[idx]

    def sample(self, idx: int, seconds: float) -> None:
        """Fold one measured successful connect time into channel ``idx``."""
        if self.ceiling <= 0:
            return
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

    def forget(self, idx: int) -> None:
        """Drop channel ``idx``'s history (its address changed)."""
        self.srtt[idx] = -1.0
        self.rttvar[idx] = 0.0
        self.delays[idx] = self.ceiling
