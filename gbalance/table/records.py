"""The record classes of the compiled :mod:`gbalance.table.channels`.

:class:`Step` (a row of its transition table, with :class:`Mark`),
:class:`Fired` and :class:`CheckOutcome` live here, not beside their user,
for the reason :mod:`gbalance.proxy.records` gives (Cython 0.29 and record
classes); the compiled module re-exports them.
"""

import enum
from dataclasses import dataclass

from gbalance.table.layout import ChannelState


class Mark(enum.Enum):
    """What a step does to the suspect mark."""

    KEEP = "keep"
    SET = "set"
    CLEAR = "clear"


@dataclass(frozen=True)
class Step:
    """One row of :data:`TRANSITIONS`: the state after the event, and the suspect mark."""

    to: ChannelState
    suspect: Mark = Mark.KEEP


@dataclass(frozen=True)
class Fired:
    """What :meth:`Channels.fire` did."""

    before: ChannelState
    after: ChannelState
    changed: bool = False           # the status slot was written
    suspect_set: bool = False       # the suspect mark went from clear to set
    suspect_cleared: bool = False   # the suspect mark went from set to clear


@dataclass
class CheckOutcome:
    """What one check result did to a channel (for the monitor's log lines)."""

    count: int                 # consecutive passes (or failures) now
    changed: bool = False      # the state changed (enabled or soft-disabled)
    unsuspected: bool = False  # a suspect mark was cleared
    counting: bool = False     # the count moves the channel towards a change
