"""The layout of a state file, and who may write which slot of it.

One file per master holds the whole routing table (groups, channels,
states, counters), the master's pid and start time, and a one-slot request
mailbox.  The layout is fixed and versioned:

* bytes 0..7: the magic ``GBALSTAT``;
* then one array of signed 64-bit slots: a header (with the mailbox),
  ``MAXGROUPS`` group records and ``MAXGROUPS * MAXCHANNELS`` channel records,
  followed by the counter rows of workers 1 to ``MAXWORKERS - 1`` (``-w``):
  each a copy of the channel records' shape (:data:`TABLE_SLOTS` slots) of
  which only the counter fields are used; worker 0 (and the single process
  of ``-w 1``) counts in the channel records themselves;
* then one fixed-size, NUL-padded text field per channel: its numeric
  address; then one more such field: the address argument of a request.

Every number is a 64-bit slot so that a serving process can update its
counters with a plain indexed add on a ``memoryview`` (no struct packing, no
allocation, and no lock but in the one case :mod:`gbalance.table.counters` names).

Who writes which slot
---------------------

==========================  ==========================================  =====================
slots                       writer                                      when
==========================  ==========================================  =====================
header identity (version,   the master, in :meth:`SharedState.create`   once, before the file
pid, start time, limits)                                                is renamed into place
``H_REQ_*`` and the         a shell of the master's own user            under the change lock
request address                                                         (owner-only lock file)
``H_ACK_*``                 the master (:mod:`gbalance.table.mailbox`)        after applying a request
groups, channel set,        the master (:mod:`gbalance.table.channels`)       start-up, requests,
addresses, status, maxc,                                                connect results (-w 1),
suspect/fails/passes,       (:mod:`gbalance.table.carry` copies them into     monitoring; at a
monitor switch, generation  the new file at a reload)                   reload, before serving
``C_TOTALC``, ``C_C``       the process that serves (server's channel   per connection
in counter row *w*          events, :mod:`gbalance.proxy.forward` on close):
                            the master with ``-w 1``, worker *w* with
                            ``-w N``; with N > 1 ``C_C`` of a channel
                            with ``maxc`` is raised under the maxc lock
                            (:mod:`gbalance.table.counters`)
``C_C`` of a dead worker's  the master (:mod:`gbalance.process.pool`)           after the worker died,
row                                                                     before its replacement
``C_SENT``, ``C_RCVD``,     the serving process, in its own row         per chunk / connect
``C_STAGGERED`` in row *w*  (:mod:`gbalance.proxy.forward`, connect)
``C_*_BASE`` (reset,        the master (:mod:`gbalance.table.channels`,       on a ``reset`` request;
carried counters)           :mod:`gbalance.table.carry`)                      at a reload (``-r``)
``G_RR_NEXT``               the master with ``-w 1``                    per connection
                            (:mod:`gbalance.proxy.routing`); with N > 1 each
                            worker keeps its own cursor in memory
``C_STAGGER_US``            any serving process (last writer wins)      per connect (with -m)
status and suspect mark,    the serving process: a worker with          connect results, an
``C_CHANGED``, ``C_PASSES`` ``-w N`` (``-a``, passive detection,        address read back
= 0, on a connect result    through :mod:`gbalance.table.channels`, under     invalid
                            the maxc lock; ``C_PASSES`` = 0 just
                            after it, outside: at worst a rise count
                            is one off)
``H_WORKERS``               the master, at start-up                     once
``H_TABLE_DIGEST``          the master, at start-up                     once
``H_ACCEPTING``             the master (:mod:`gbalance.process.pool`    at start-up, and
                            as :mod:`gbalance.process.steering` says)   when it changes
==========================  ==========================================  =====================

Readers sum the counter rows (``C_C``, ``C_TOTALC``, ``C_SENT``, ``C_RCVD``,
``C_STAGGERED`` over rows ``0 .. H_WORKERS - 1``) and subtract the reset
baselines: a ``reset`` never writes a counter another process adds to, it
records the sums at that moment in ``C_TOTALC_BASE``, ``C_SENT_BASE`` and
``C_RCVD_BASE``.

With ``-w N`` the serving processes are the workers; they also make the
connect-result transitions (autodisable, passive detection, suspect marks)
through :mod:`gbalance.table.channels`, as balance's forked children did.  Each
change of a status or suspect mark is then read, decided and written under
the maxc lock (byte 2 of the lock file), by workers and master alike, so a
worker's connect result cannot undo an admin's ``disable`` or a check's
result made meanwhile.  Everything else stays the master's.

Every count read from the file is clamped to its range before it is used
(:attr:`SharedState.ngroups`, :meth:`SharedState.nchannels`), and a file
cut short while mapped costs no process its life (:mod:`gbalance.system.mapguard`).

This module is the layout alone: constants, enums and index arithmetic; it
imports nothing.  The file's life cycle and accessors are
:mod:`gbalance.table.state`'s, its locks :mod:`gbalance.table.locks`', its
naming and safety checks :mod:`gbalance.table.files`', and deciding whether a
master lives :mod:`gbalance.table.liveness`'.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MAGIC = b"GBALSTAT"
LAYOUT_VERSION = 3
MAXGROUPS = 32
MAXCHANNELS = 64
#: Most worker processes (``-w``); each has a counter row.
MAXWORKERS = 64
ADDR_LEN = 64

#: Environment variable that moves the state directory (for non-root users).
# Header slots.
H_VERSION = 0
H_PID = 1
H_MAXGROUPS = 2
H_MAXCHANNELS = 3
H_GENERATION = 4   # bumped whenever a channel's address or the channel set changes
H_MONITOR = 5      # MON_NONE / MON_ENABLED / MON_DISABLED
# slot 6 is unused (layout version 3 kept it)
H_STARTED = 7      # unix time the master started
H_NGROUPS = 8
H_START_TICKS = 9  # the master's start time in clock ticks after boot (/proc/<pid>/stat field 22)
H_WORKERS = 10     # counter rows in use: the -w number (1 = the master alone)
H_STAGGER_US = 11  # stagger delay of a channel not measured yet, microseconds (0 = off)
H_TABLE_DIGEST = 12  # digest of the command line's table (gbalance.table.carry; 0 = unknown)
H_ACCEPTING = 13   # -w N: workers 0 .. H_ACCEPTING-1 accept, the rest stand by (0 = all accept)
# The request mailbox (see gbalance.table.mailbox).
H_REQ_SEQ = 16     # written last by the shell; -1 while it writes the arguments
H_REQ_OP = 17
H_REQ_G = 18
H_REQ_C = 19
H_REQ_A = 20
H_REQ_B = 21
H_ACK_SEQ = 24     # written last by the master: the request it answered
H_ACK_RESULT = 25
H_ACK_VALUE = 26
H_SLOTS = 32

# Group record slots.
G_NCHANNELS = 0
G_TYPE = 1
G_RR_NEXT = 2
G_SLOTS = 4

# Channel record slots.
C_STATUS = 0
C_PORT = 1
C_MAXC = 2
C_C = 3
C_TOTALC = 4
C_SENT = 5      # bytes client -> server
C_RCVD = 6      # bytes server -> client
C_SUSPECT = 7   # a connect has been pending too long (monitoring)
C_FAILS = 8     # consecutive failed checks (monitoring)
C_PASSES = 9    # consecutive passed checks (monitoring)
C_CHANGED = 10  # unix time of the last state change
C_STAGGER_US = 11  # adaptive stagger delay now, in microseconds (monitoring; gauge)
C_STAGGERED = 12   # parallel connects started because this channel's connect hung (counter)
C_TOTALC_BASE = 13  # sum of C_TOTALC at the last reset (readers subtract it)
C_SENT_BASE = 14
C_RCVD_BASE = 15
C_SLOTS = 16

GROUP_BASE = H_SLOTS
CHANNEL_BASE = GROUP_BASE + MAXGROUPS * G_SLOTS
#: Slots of one channel table; worker w's counters are at slot(...) + w * TABLE_SLOTS.
TABLE_SLOTS = MAXGROUPS * MAXCHANNELS * C_SLOTS
NSLOTS = CHANNEL_BASE + MAXWORKERS * TABLE_SLOTS
ADDR_OFFSET = len(MAGIC) + NSLOTS * 8
REQ_ADDR_OFFSET = ADDR_OFFSET + MAXGROUPS * MAXCHANNELS * ADDR_LEN
FILE_SIZE = REQ_ADDR_OFFSET + ADDR_LEN



class ChannelState(enum.IntEnum):
    """A channel's state, as stored in its ``C_STATUS`` slot (the values are the file's)."""

    ENABLED = 0         # ENA: takes connections
    SOFT_DISABLED = 1   # dis: by -a or monitoring; monitoring may re-enable it
    HARD_DISABLED = 2   # DIS: by an admin; only an admin re-enables it


ENABLED = ChannelState.ENABLED
SOFT_DISABLED = ChannelState.SOFT_DISABLED
HARD_DISABLED = ChannelState.HARD_DISABLED
STATUS_NAMES: dict[int, str] = {ENABLED: "ENA", SOFT_DISABLED: "dis", HARD_DISABLED: "DIS"}

# Group types.
RR = 0
HASH = 1
TYPE_NAMES = {RR: "RR", HASH: "Hash"}



class MonitorSwitch(enum.IntEnum):
    """The monitoring switch in the header's ``H_MONITOR`` slot (the values are the file's)."""

    NONE = 0        # the master runs without -m
    ENABLED = 1     # -m, checks run (``monitor enable``)
    DISABLED = 2    # -m, switched off by ``monitor disable``


MON_NONE = MonitorSwitch.NONE
MON_ENABLED = MonitorSwitch.ENABLED
MON_DISABLED = MonitorSwitch.DISABLED


@dataclass
class Channel:
    """A snapshot of one channel record (for the shell and tests)."""

    group: int
    index: int
    status: int
    address: str
    port: int
    maxc: int
    c: int
    totalc: int
    sent: int
    rcvd: int
    suspect: int


def slot(group: int, channel: int, field: int) -> int:
    """Index into :attr:`SharedState.q` of one field of one channel."""
    return CHANNEL_BASE + (group * MAXCHANNELS + channel) * C_SLOTS + field


def row_offset(worker: int) -> int:
    """What to add to a :func:`slot` index to reach worker ``worker``'s counter row."""
    return worker * TABLE_SLOTS


def row_sum(q: memoryview, index: int, rows: int) -> int:
    """The sum of slot ``index`` (a :func:`slot` of a counter field) over ``rows`` rows."""
    total = q[index]
    for w in range(1, max(1, min(rows, MAXWORKERS))):
        total += q[index + w * TABLE_SLOTS]
    return total


def gslot(group: int, field: int) -> int:
    """Index into :attr:`SharedState.q` of one field of one group."""
    return GROUP_BASE + group * G_SLOTS + field


#: The reset baseline of each counter field that has one.
COUNTER_BASES = {C_TOTALC: C_TOTALC_BASE, C_SENT: C_SENT_BASE, C_RCVD: C_RCVD_BASE}
