"""A serving process's counter row, and ``maxc`` as an exact limit across processes.

Every process that serves connections (the master with ``-w 1``, each
worker with ``-w N``) counts in its own row of the table
(:func:`gbalance.table.layout.row_offset`), so no two processes ever add to the
same slot and every count stays exact; readers sum the rows.

A channel's ``maxc`` limits the *sum* of its open connections over all
rows.  Checking the sum and counting the new connection must then be one
step, or two workers could both see room for the last connection.  With
more than one row, a connection to a channel *with* a limit is therefore
counted under the *maxc lock*: byte 2 of the instance's owner-only lock
file, taken through this process's own open of it (``F_OFD_SETLKW``).  The
lock is held for a few instructions (sum the rows, compare, add one), never
across a system call of the data path, and only the instance's own
processes (same user; the file is 0600) can take it.  Channels without a
limit, and ``-w 1``, never take it.

The router asks :meth:`Counters.room` while it picks a channel; a
connection it counted there is *held*, so the connect hook
(:meth:`Counters.count_attempt`) does not count it twice.
"""


import errno
import fcntl
import os
import struct

from gbalance.table.layout import C_C, C_MAXC, C_SLOTS, C_TOTALC, CHANNEL_BASE, MAXCHANNELS, row_offset, row_sum
from gbalance.table.state import SharedState

#: Byte of the lock file that serialises counting towards ``maxc``.
MAXC_LOCK_BYTE = 2
_F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)
_FLOCK = "hhqqi4x"
_LOCK = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, MAXC_LOCK_BYTE, 1, 0)
_UNLOCK = struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, MAXC_LOCK_BYTE, 1, 0)


class Counters:
    """The counter row of one serving process (``worker``) among ``rows``.

    ``lock_fd``: this process's own open of the lock file (needed only when
    ``rows`` > 1; without one the check and the count are two steps).
    """

    __slots__ = ("q", "off", "rows", "lock_fd", "held")

    def __init__(self, state: SharedState, worker: int = 0, rows: int = 1, lock_fd: int = -1):
        self.q = state.q
        self.off = row_offset(worker)
        self.rows = rows
        self.lock_fd = lock_fd
        self.held = -1      # record base of the channel room() just counted

    @property
    def shared(self) -> bool:
        """True when other processes count connections too."""
        return self.rows > 1

    def open_count(self, base: int) -> int:
        """Open connections of the channel whose record starts at ``base``, all rows."""
        return row_sum(self.q, base + C_C, self.rows)

    def room(self, base: int) -> bool:
        """May the channel at ``base`` take one more connection under its ``maxc``?

        With several rows and a limit, the connection is counted at once
        (under the maxc lock) and held for :meth:`count_attempt`.
        """
        q = self.q
        maxc = q[base + C_MAXC]
        if not maxc:
            return True
        if self.rows <= 1:
            return q[base + C_C] < maxc
        fd = self.lock_fd
        if fd >= 0:
            _lock(fd, _LOCK)
        try:
            if row_sum(q, base + C_C, self.rows) >= q[base + C_MAXC]:
                return False
            q[base + self.off + C_C] += 1
            self.held = base
            return True
        finally:
            if fd >= 0:
                _lock(fd, _UNLOCK)

    def count_attempt(self, base: int) -> None:
        """A connect to the channel at ``base`` starts: count it (once)."""
        q = self.q
        i = base + self.off
        q[i + C_TOTALC] += 1
        if self.held == base:
            self.held = -1
        else:
            q[i + C_C] += 1

    def attempt(self, g: int, c: int) -> None:
        """:meth:`count_attempt` for channel ``g``/``c`` (the connect hook itself
        when the server does not trace: ``ChannelEvents``), written out: it
        runs per connection."""
        base = CHANNEL_BASE + (g * MAXCHANNELS + c) * C_SLOTS    # slot(g, c, 0)
        q = self.q
        i = base + self.off
        q[i + C_TOTALC] += 1
        if self.held == base:
            self.held = -1
        else:
            q[i + C_C] += 1

    def uncount(self, base: int) -> None:
        """A connection (or connect) of this process to the channel at ``base`` ended."""
        self.q[base + self.off + C_C] -= 1


def lock(fd: int) -> None:
    """Take the maxc lock through ``fd`` (also what a state change by
    :meth:`gbalance.table.channels.Channels.fire` holds with ``-w N``)."""
    _lock(fd, _LOCK)


def unlock(fd: int) -> None:
    _lock(fd, _UNLOCK)


def _lock(fd: int, how: bytes) -> None:
    """Take or drop the maxc lock, waiting (held by a sibling for microseconds)."""
    while True:
        try:
            fcntl.fcntl(fd, _F_OFD_SETLKW, how)
            return
        except InterruptedError:
            continue
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
