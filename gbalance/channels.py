"""The channel life cycle: every change of a channel's state, in one place.

A channel is *enabled* (``ENA``: takes connections), *soft-disabled*
(``dis``: by ``-a`` or monitoring, which may enable it again) or
*hard-disabled* (``DIS``: by an admin; only an admin enables it again; new
channels from ``create`` start so).  Besides its state a channel carries a
*suspect* mark (a connect to it has been pending too long; routing skips it
until it answers or a check passes), the monitor's counts of consecutive
failed and passed checks (*fall*/*rise*), its ``maxc`` and its counters.

Only the master writes the table (see the writers table in
:mod:`gbalance.state`); inside the master, this module makes every state
change: at start-up (the command line), on a shell's request
(:mod:`gbalance.mailbox`), on connect results (``-a`` autodisable and
passive detection, in the server's channel events) and on check results
(:mod:`gbalance.monitor`).  Routing asks :func:`usable` and
:func:`last_resort` which channels may take a connection.

Transitions:

=================  ==============================  ===============================
from               event                           to
=================  ==============================  ===============================
any                admin ``enable``                ENA
any                admin ``disable``               DIS
ENA                connect fails, ``-a`` or -m     dis (passes counted from 0)
ENA                ``fall`` failed checks          dis (unless ``nodisable``)
dis                ``rise`` passed checks          ENA (unless ``noenable``)
ENA/dis            connect pending too long (-m)   suspect mark set
any                connect succeeds, check passes  suspect mark cleared
any                monitoring switched off         every suspect mark cleared
any                address read back invalid       DIS (never routed nor checked)
=================  ==============================  ===============================
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from dataclasses import dataclass

from gbalance.state import (C_C, C_FAILS, C_MAXC, C_PASSES, C_PORT, C_RCVD, C_SENT, C_STATUS,
                            C_SUSPECT, C_TOTALC, ENABLED, H_NGROUPS, HARD_DISABLED, HASH,
                            MAXCHANNELS, MAXGROUPS, MON_DISABLED, MON_ENABLED, MON_NONE, RR,
                            SOFT_DISABLED, SharedState, StateError, gslot, slot, G_NCHANNELS,
                            C_RCVD_BASE, C_SENT_BASE, C_TOTALC_BASE, row_sum)

#: Largest ``maxc`` (the C balance keeps it in an int).
MAX_MAXC = 2**31 - 1


class Result(enum.IntEnum):
    """The answer to an admin change (also what the mailbox carries back)."""

    OK = 0
    ALREADY = 1          # the channel (or monitor) already is in that state
    NO_CHANNEL = 2       # no such channel in that group
    NOT_DISABLED = 3     # assign needs a hard-disabled channel
    NO_SLOTS = 4         # the group is full
    OUT_OF_RANGE = 5     # a number outside its range
    INVALID_ADDRESS = 6  # not a numeric IPv4/IPv6 address
    NO_MONITOR = 7       # the master runs without -m
    BAD_REQUEST = 8      # a request the master does not understand
    NO_GROUP = 9         # no such group


def valid_address(text: str) -> bool:
    """True for a numeric IPv4 or IPv6 address (what the table may hold), nothing else.

    An IPv6 scope id (``fe80::1%eth0``) must name an interface of this host:
    ``::1%<text>`` would carry any text into a check's argv or a shell's screen.
    """
    if not text or len(text) > 45 or not text.isascii():
        return False
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return address.version == 4 or address.scope_id is None or known_scope(address.scope_id)


def known_scope(scope: str) -> bool:
    """True if an IPv6 scope id names an interface of this host (by name or index)."""
    if not scope or not scope.isascii() or not scope.isprintable():
        return False
    try:
        if scope.isdigit():
            return int(scope) in {index for index, _ in socket.if_nameindex()}
        socket.if_nametoindex(scope)
    except (OSError, ValueError, OverflowError):
        return False
    return True


def valid_port(port: int) -> bool:
    return 0 < port <= 65535


def eligible(q: memoryview, base: int) -> bool:
    """Enabled and not suspect: may take a connection if its ``maxc`` leaves room."""
    return q[base + C_STATUS] == ENABLED and not q[base + C_SUSPECT]


def usable(q: memoryview, base: int) -> bool:
    """May the channel whose record starts at ``base`` take a new connection?"""
    if q[base + C_STATUS] != ENABLED or q[base + C_SUSPECT]:
        return False
    maxc = q[base + C_MAXC]
    return not maxc or q[base + C_C] < maxc


def last_resort(q: memoryview, base: int) -> bool:
    """May it take one when nothing usable is left and monitoring is on?

    Soft-disabled and suspect channels may (a monitor that misjudges must not
    take the whole service down); hard-disabled and full ones may not.
    """
    if q[base + C_STATUS] == HARD_DISABLED:
        return False
    maxc = q[base + C_MAXC]
    return not maxc or q[base + C_C] < maxc


@dataclass
class CheckOutcome:
    """What one check result did to a channel (for the monitor's log lines)."""

    count: int                 # consecutive passes (or failures) now
    changed: bool = False      # the state changed (enabled or soft-disabled)
    unsuspected: bool = False  # a suspect mark was cleared
    counting: bool = False     # the count moves the channel towards a change


class Channels:
    """The master's writer of channel states, over its own state file."""

    def __init__(self, state: SharedState):
        self.state = state
        self.q = state.q

    # -- reading -------------------------------------------------------------

    def exists(self, g: int, c: int) -> bool:
        return 0 <= g < min(self.q[H_NGROUPS], MAXGROUPS) and \
            0 <= c < min(self.q[gslot(g, G_NCHANNELS)], MAXCHANNELS)

    def status(self, g: int, c: int) -> int:
        return self.q[slot(g, c, C_STATUS)]

    def _set_status(self, g: int, c: int, status: int) -> None:
        self.state.set_status(g, c, status)

    # -- building ----------------------------------------------------------------

    def ensure_group(self, g: int) -> None:
        """Make group ``g`` exist (``group N`` may select one that has no channels yet)."""
        while self.q[H_NGROUPS] <= g:
            self.state.add_group(RR)

    def add_group(self, kind: int = RR) -> int:
        return self.state.add_group(kind)

    def add_channel(self, g: int, address: str, port: int, maxc: int = 0,
                    status: int = ENABLED) -> int:
        """Append a channel (start-up or ``create``); raises StateError when full."""
        if not valid_address(address):
            raise StateError(f"invalid address {address!r}")
        return self.state.add_channel(g, address, port, maxc, status)

    # -- admin changes (a shell's requests) --------------------------------------

    def enable(self, g: int, c: int) -> Result:
        return self._admin_set(g, c, ENABLED)

    def disable(self, g: int, c: int) -> Result:
        return self._admin_set(g, c, HARD_DISABLED)

    def _admin_set(self, g: int, c: int, status: int) -> Result:
        if not self.exists(g, c):
            return Result.NO_CHANNEL
        if self.status(g, c) == status:
            return Result.ALREADY
        if status == ENABLED and not valid_address(self.state.address(g, c)):
            return Result.INVALID_ADDRESS
        self._set_status(g, c, status)
        return Result.OK

    def create(self, g: int, address: str, port: int) -> tuple[Result, int]:
        """Add a hard-disabled channel to group ``g``; (result, its index)."""
        if not 0 <= g < MAXGROUPS:
            return Result.OUT_OF_RANGE, -1
        if not valid_address(address):
            return Result.INVALID_ADDRESS, -1
        if not valid_port(port):
            return Result.OUT_OF_RANGE, -1
        self.ensure_group(g)
        if self.q[gslot(g, G_NCHANNELS)] >= MAXCHANNELS:
            return Result.NO_SLOTS, -1
        return Result.OK, self.state.add_channel(g, address, port, 0, status=HARD_DISABLED)

    def assign(self, g: int, c: int, address: str, port: int) -> Result:
        """Re-point a hard-disabled channel (as balance.fm: only ``DIS``)."""
        if not self.exists(g, c):
            return Result.NO_CHANNEL
        if not valid_address(address):
            return Result.INVALID_ADDRESS
        if not valid_port(port):
            return Result.OUT_OF_RANGE
        if self.status(g, c) != HARD_DISABLED:
            return Result.NOT_DISABLED
        self.state.set_address(g, c, address, port)
        q, base = self.q, slot(g, c, 0)
        q[base + C_SUSPECT] = 0
        q[base + C_FAILS] = 0
        q[base + C_PASSES] = 0
        self.state.bump_generation()
        return Result.OK

    def set_maxc(self, g: int, c: int, maxc: int) -> Result:
        if not self.exists(g, c):
            return Result.NO_CHANNEL
        if not 0 <= maxc <= MAX_MAXC:
            return Result.OUT_OF_RANGE
        self.q[slot(g, c, C_MAXC)] = maxc
        return Result.OK

    def reset(self, g: int, c: int) -> Result:
        """Zero ``totalc`` and both byte counters (what the C ``reset`` does).

        The counters themselves belong to the serving processes (one row
        each), so the master never writes them: it records their sums as the
        baselines readers subtract, and no count made meanwhile is lost.
        """
        if not self.exists(g, c):
            return Result.NO_CHANNEL
        base = slot(g, c, 0)
        q = self.q
        rows = self.state.workers
        q[base + C_TOTALC_BASE] = row_sum(q, base + C_TOTALC, rows)
        q[base + C_SENT_BASE] = row_sum(q, base + C_SENT, rows)
        q[base + C_RCVD_BASE] = row_sum(q, base + C_RCVD, rows)
        return Result.OK

    def set_group_type(self, g: int, kind: int) -> Result:
        if not 0 <= g < MAXGROUPS:
            return Result.OUT_OF_RANGE
        if kind not in (RR, HASH):
            return Result.BAD_REQUEST
        self.ensure_group(g)
        self.state.set_group_type(g, kind)
        return Result.OK

    def set_monitor(self, on: bool) -> Result:
        """Switch monitoring (-m) on or off, as ``monitor enable|disable`` does."""
        current = self.state.monitor
        if current == MON_NONE:
            return Result.NO_MONITOR
        want = MON_ENABLED if on else MON_DISABLED
        if current == want:
            return Result.ALREADY
        self.state.set_monitor(want)
        if not on:
            self.clear_suspects()
        return Result.OK

    # -- connect results ----------------------------------------------------------

    def soft_disable(self, g: int, c: int) -> bool:
        """A connect failed (``-a`` or passive detection): soft-disable an enabled channel.

        The monitor's rise count starts again from this failure.  False if
        the channel was not enabled.
        """
        base = slot(g, c, 0)
        q = self.q
        if q[base + C_STATUS] != ENABLED:
            return False
        self._set_status(g, c, SOFT_DISABLED)
        q[base + C_PASSES] = 0
        return True

    def mark_suspect(self, g: int, c: int) -> bool:
        """A connect has been pending too long: routing skips the channel.  True if new."""
        idx = slot(g, c, C_SUSPECT)
        if self.q[idx] or self.status(g, c) == HARD_DISABLED:
            return False
        self.q[idx] = 1
        return True

    def clear_suspect(self, g: int, c: int) -> bool:
        """The channel answered: routing may use it again.  True if it was suspect."""
        idx = slot(g, c, C_SUSPECT)
        if not self.q[idx]:
            return False
        self.q[idx] = 0
        return True

    def clear_suspects(self) -> None:
        """Monitoring was switched off: nothing would clear suspect marks, so drop them."""
        for g in range(min(self.q[H_NGROUPS], MAXGROUPS)):
            for c in range(min(self.q[gslot(g, G_NCHANNELS)], MAXCHANNELS)):
                self.q[slot(g, c, C_SUSPECT)] = 0

    def invalidate(self, g: int, c: int) -> bool:
        """The address read back is no numeric address: hard-disable.  True if it changed."""
        if self.status(g, c) == HARD_DISABLED:
            return False
        self._set_status(g, c, HARD_DISABLED)
        self.q[slot(g, c, C_SUSPECT)] = 0
        return True

    # -- monitoring -----------------------------------------------------------------

    def check_passed(self, g: int, c: int, rise: int, may_enable: bool) -> CheckOutcome:
        """Count a passed check; ``rise`` in a row enable a soft-disabled channel."""
        q, base = self.q, slot(g, c, 0)
        q[base + C_FAILS] = 0
        passes = q[base + C_PASSES] + 1
        q[base + C_PASSES] = passes
        out = CheckOutcome(passes, unsuspected=self.clear_suspect(g, c))
        if q[base + C_STATUS] != SOFT_DISABLED or not may_enable:
            return out
        if passes >= rise:
            self._set_status(g, c, ENABLED)
            out.changed = True
        else:
            out.counting = True
        return out

    def check_failed(self, g: int, c: int, fall: int, may_disable: bool) -> CheckOutcome:
        """Count a failed check; ``fall`` in a row soft-disable an enabled channel."""
        q, base = self.q, slot(g, c, 0)
        q[base + C_PASSES] = 0
        fails = q[base + C_FAILS] + 1
        q[base + C_FAILS] = fails
        out = CheckOutcome(fails)
        if q[base + C_STATUS] != ENABLED or not may_disable:
            return out
        if fails >= fall:
            self._set_status(g, c, SOFT_DISABLED)
            out.changed = True
        else:
            out.counting = True
        return out

    def address_of(self, g: int, c: int) -> tuple[str, int] | None:
        """(address, port) of a channel, or None when what the file holds is not valid."""
        address = self.state.address(g, c)
        port = self.q[slot(g, c, C_PORT)]
        if not valid_address(address) or not valid_port(port):
            return None
        return address, port
