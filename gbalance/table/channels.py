"""The channel life cycle: one state machine, and every write of it.

A channel is *enabled* (``ENA``: takes connections), *soft-disabled*
(``dis``: by ``-a`` or monitoring, which may enable it again) or
*hard-disabled* (``DIS``: by an admin; only an admin enables it again; new
channels from ``create`` start so): :class:`~gbalance.table.layout.ChannelState`.
Besides its state a channel carries a *suspect* mark (a connect to it has
been pending too long; routing skips it until it answers or a check passes),
the monitor's counts of consecutive failed and passed checks (*fall*/*rise*),
its ``maxc`` and its counters.

What may happen to a channel is an :class:`Event`; :data:`TRANSITIONS` maps
every (state, event) pair to a :class:`Step` (the state after it and what
becomes of the suspect mark), and :meth:`Channels.fire` is the one place
that executes it.  Whether an event happens at all is the caller's policy:
a connect failure is ``CONNECT_FAILED`` only with ``-a`` or while passive
monitoring is on; ``RISE``/``FALL`` are the ``rise``-th pass and the
``fall``-th failure in a row unless the spec says ``noenable``/``nodisable``.

=================  =====================================  ===============================
from               event                                  to
=================  =====================================  ===============================
any                ``ADMIN_ENABLE``                       ENA
any                ``ADMIN_DISABLE``                      DIS
ENA                ``CONNECT_FAILED`` (-a, or -m)         dis (passes counted from 0)
ENA/dis            ``CONNECT_PENDING`` too long (-m)      same, suspect mark set
any                ``CONNECT_SUCCEEDED``, ``CHECK_PASSED``  same, suspect mark cleared
dis                ``RISE`` (``rise`` checks passed)      ENA, suspect mark cleared
ENA                ``FALL`` (``fall`` checks failed)      dis
any                ``MONITOR_OFF`` (every channel)        same, suspect mark cleared
any                ``ADDRESS_INVALID`` (read back)        DIS, suspect mark cleared
any (DIS: assign)  ``READDRESS``                          same, suspect mark cleared
=================  =====================================  ===============================

Every other pair leaves the channel as it is (the table says so too, so a
test can walk all of it).

Who calls it (the writers table in :mod:`gbalance.table.state` says which bytes
each process writes): the master at start-up (the command line), on a
shell's request (:mod:`gbalance.table.mailbox`) and on check results
(:mod:`gbalance.monitor.monitor`); the serving process on connect results
(``-a`` autodisable, passive detection, suspect marks, an address read back
invalid: the server's channel events), which with ``-w N`` is a worker.
Routing asks :func:`usable` and :func:`last_resort` which channels may take
a connection.
"""


import enum
import ipaddress
import socket

from gbalance.table.counters import lock, unlock
from gbalance.table.files import StateError
from gbalance.table.layout import (C_C, C_SLOTS, CHANNEL_BASE, C_FAILS, C_MAXC, C_PASSES, C_PORT, C_RCVD, C_RCVD_BASE, C_SENT,
                                   C_SENT_BASE, C_STATUS, C_SUSPECT, C_TOTALC, C_TOTALC_BASE, ChannelState,
                                   ENABLED, G_NCHANNELS, HARD_DISABLED, HASH, H_NGROUPS, MAXCHANNELS,
                                   MAXGROUPS, MON_DISABLED, MON_ENABLED, MON_NONE, RR, SOFT_DISABLED, gslot,
                                   row_sum, slot)
from gbalance.table.records import CheckOutcome as CheckOutcome, Fired as Fired, Mark as Mark, Step as Step
from gbalance.table.state import SharedState

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



class Event(enum.Enum):
    """Something that may change a channel's state or suspect mark."""

    ADMIN_ENABLE = "admin enable"
    ADMIN_DISABLE = "admin disable"
    CONNECT_FAILED = "connect failed"          # with -a, or passive detection under -m
    CONNECT_PENDING = "connect pending"        # pending longer than the stagger (-m)
    CONNECT_SUCCEEDED = "connect succeeded"
    CHECK_PASSED = "check passed"              # one passed check (below rise, or noenable)
    RISE = "rise"                              # the rise-th passed check in a row
    FALL = "fall"                              # the fall-th failed check in a row
    MONITOR_OFF = "monitoring switched off"
    ADDRESS_INVALID = "address invalid"        # the address read back is no numeric address
    READDRESS = "assign"                       # an admin re-pointed it (only a DIS one may be)


_ENA, _DIS_SOFT, _DIS_HARD = ChannelState.ENABLED, ChannelState.SOFT_DISABLED, ChannelState.HARD_DISABLED


def _build() -> "dict[tuple[ChannelState, Event], Step]":
    table = {(s, e): Step(s) for s in ChannelState for e in Event}   # by default: nothing changes
    for s in ChannelState:
        table[s, Event.ADMIN_ENABLE] = Step(_ENA)
        table[s, Event.ADMIN_DISABLE] = Step(_DIS_HARD)
        table[s, Event.CONNECT_SUCCEEDED] = Step(s, Mark.CLEAR)
        table[s, Event.CHECK_PASSED] = Step(s, Mark.CLEAR)
        table[s, Event.RISE] = Step(s, Mark.CLEAR)
        table[s, Event.MONITOR_OFF] = Step(s, Mark.CLEAR)
        table[s, Event.ADDRESS_INVALID] = Step(_DIS_HARD, Mark.CLEAR)
        table[s, Event.READDRESS] = Step(s, Mark.CLEAR)
    table[_ENA, Event.CONNECT_FAILED] = Step(_DIS_SOFT)
    table[_ENA, Event.CONNECT_PENDING] = Step(_ENA, Mark.SET)
    table[_DIS_SOFT, Event.CONNECT_PENDING] = Step(_DIS_SOFT, Mark.SET)
    table[_DIS_SOFT, Event.RISE] = Step(_ENA, Mark.CLEAR)
    table[_ENA, Event.FALL] = Step(_DIS_SOFT)
    return table


#: The channel state machine: (state, event) -> step, for every pair.
TRANSITIONS: "dict[tuple[ChannelState, Event], Step]" = _build()
#: Events that lead to one state whatever the state before.
_ABSOLUTE = frozenset(e for e in Event if len({TRANSITIONS[s, e].to for s in ChannelState}) == 1)


def _state_of(value: int) -> ChannelState:
    """The state a slot holds; anything the file should not hold counts as hard-disabled."""
    try:
        return ChannelState(value)
    except ValueError:
        return ChannelState.HARD_DISABLED


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


def fallback_eligible(q: memoryview, base: int) -> bool:
    """Not hard-disabled: may take a last-resort connection if its ``maxc`` leaves room."""
    return q[base + C_STATUS] != HARD_DISABLED


def last_resort(q: memoryview, base: int) -> bool:
    """May it take one when nothing usable is left and monitoring is on?

    Soft-disabled and suspect channels may (a monitor that misjudges must not
    take the whole service down); hard-disabled and full ones may not.
    """
    if q[base + C_STATUS] == HARD_DISABLED:
        return False
    maxc = q[base + C_MAXC]
    return not maxc or q[base + C_C] < maxc


class Channels:
    """The writer of channel states, over one process's map of the state file.

    ``lock_fd``: with ``-w N`` (N > 1), this process's own open of the lock
    file; every :meth:`fire` then reads, decides and writes under the maxc
    lock, so a worker's connect result and the master's admin or check
    result never interleave (one would undo the other).  -1: one process.
    """

    def __init__(self, state: SharedState, lock_fd: int = -1):
        self.state = state
        self.q = state.q
        self.lock_fd = lock_fd

    # -- reading -------------------------------------------------------------

    def exists(self, g: int, c: int) -> bool:
        return 0 <= g < min(self.q[H_NGROUPS], MAXGROUPS) and \
            0 <= c < min(self.q[gslot(g, G_NCHANNELS)], MAXCHANNELS)

    def status(self, g: int, c: int) -> int:
        return self.q[slot(g, c, C_STATUS)]

    def checkable(self, g: int, c: int) -> bool:
        """May the monitor check the channel?  Every one but the hard-disabled."""
        return self.q[slot(g, c, C_STATUS)] != HARD_DISABLED

    # -- the state machine ---------------------------------------------------------

    def fire(self, g: int, c: int, event: Event) -> Fired:
        """Apply ``event`` to channel ``g``/``c`` as :data:`TRANSITIONS` says; what changed."""
        fd = self.lock_fd
        if fd < 0:
            return self._fire(g, c, event)
        lock(fd)
        try:
            return self._fire(g, c, event)
        finally:
            unlock(fd)

    def _fire(self, g: int, c: int, event: Event) -> Fired:
        q, base = self.q, slot(g, c, 0)
        raw = q[base + C_STATUS]
        before = _state_of(raw)
        step = TRANSITIONS[before, event]
        # An event with one target from every state (admin, invalid address)
        # also overwrites a value the file should not hold; the others leave it.
        changed = step.to != before or (raw != step.to and event in _ABSOLUTE)
        if changed:
            self.state.set_status(g, c, step.to)
        suspect_set = suspect_cleared = False
        if step.suspect is Mark.SET and not q[base + C_SUSPECT]:
            q[base + C_SUSPECT] = 1
            suspect_set = True
        elif step.suspect is Mark.CLEAR and q[base + C_SUSPECT]:
            q[base + C_SUSPECT] = 0
            suspect_cleared = True
        return Fired(before, step.to, changed, suspect_set, suspect_cleared)

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
        return self._admin(g, c, Event.ADMIN_ENABLE)

    def disable(self, g: int, c: int) -> Result:
        return self._admin(g, c, Event.ADMIN_DISABLE)

    def _admin(self, g: int, c: int, event: Event) -> Result:
        if not self.exists(g, c):
            return Result.NO_CHANNEL
        if self.status(g, c) == TRANSITIONS[_state_of(self.status(g, c)), event].to:
            return Result.ALREADY
        if event is Event.ADMIN_ENABLE and not valid_address(self.state.address(g, c)):
            return Result.INVALID_ADDRESS
        self.fire(g, c, event)
        return Result.OK

    def create(self, g: int, address: str, port: int) -> "tuple[Result, int]":
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
        self.fire(g, c, Event.READDRESS)
        q, base = self.q, slot(g, c, 0)
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

    def start_monitor(self, monitoring: bool) -> None:
        """At start-up: monitoring on (``-m``) or absent (never switchable)."""
        self.state.set_monitor(MON_ENABLED if monitoring else MON_NONE)

    # -- connect results ----------------------------------------------------------

    def soft_disable(self, g: int, c: int) -> bool:
        """A connect failed (``-a`` or passive detection): soft-disable an enabled channel.

        The monitor's rise count starts again from this failure.  False if
        the channel was not enabled.
        """
        if not self.fire(g, c, Event.CONNECT_FAILED).changed:
            return False
        self.q[slot(g, c, C_PASSES)] = 0
        return True

    def mark_suspect(self, g: int, c: int) -> bool:
        """A connect has been pending too long: routing skips the channel.  True if new."""
        return self.fire(g, c, Event.CONNECT_PENDING).suspect_set

    def clear_suspect(self, g: int, c: int) -> bool:
        """A connect succeeded: routing may use the channel again.  True if it was suspect.

        (The common case, no mark, costs one read: this runs per connection.)
        """
        if not self.q[CHANNEL_BASE + (g * MAXCHANNELS + c) * C_SLOTS + C_SUSPECT]:    # slot(g, c, C_SUSPECT)
            return False
        return self.fire(g, c, Event.CONNECT_SUCCEEDED).suspect_cleared

    def clear_suspects(self) -> None:
        """Monitoring was switched off: nothing would clear suspect marks, so drop them."""
        for g in range(min(self.q[H_NGROUPS], MAXGROUPS)):
            for c in range(min(self.q[gslot(g, G_NCHANNELS)], MAXCHANNELS)):
                if self.q[slot(g, c, C_SUSPECT)]:
                    self.fire(g, c, Event.MONITOR_OFF)

    def invalidate(self, g: int, c: int) -> bool:
        """The address read back is no numeric address: hard-disable.  True if it changed."""
        return self.fire(g, c, Event.ADDRESS_INVALID).changed

    # -- monitoring -----------------------------------------------------------------

    def check_passed(self, g: int, c: int, rise: int, may_enable: bool) -> CheckOutcome:
        """Count a passed check; ``rise`` in a row enable a soft-disabled channel."""
        q, base = self.q, slot(g, c, 0)
        q[base + C_FAILS] = 0
        passes = q[base + C_PASSES] + 1
        q[base + C_PASSES] = passes
        towards = q[base + C_STATUS] == SOFT_DISABLED and may_enable
        fired = self.fire(g, c, Event.RISE if towards and passes >= rise else Event.CHECK_PASSED)
        return CheckOutcome(passes, changed=fired.changed, unsuspected=fired.suspect_cleared,
                            counting=towards and not fired.changed)

    def check_failed(self, g: int, c: int, fall: int, may_disable: bool) -> CheckOutcome:
        """Count a failed check; ``fall`` in a row soft-disable an enabled channel."""
        q, base = self.q, slot(g, c, 0)
        q[base + C_PASSES] = 0
        fails = q[base + C_FAILS] + 1
        q[base + C_FAILS] = fails
        towards = q[base + C_STATUS] == ENABLED and may_disable
        if not towards or fails < fall:
            return CheckOutcome(fails, counting=towards)
        return CheckOutcome(fails, changed=self.fire(g, c, Event.FALL).changed)

    def address_of(self, g: int, c: int) -> "tuple[str, int] | None":
        """(address, port) of a channel, or None when what the file holds is not valid."""
        address = self.state.address(g, c)
        port = self.q[slot(g, c, C_PORT)]
        if not valid_address(address) or not valid_port(port):
            return None
        return address, port
