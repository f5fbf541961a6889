"""The locks of a state file: bytes of its owner-only lock file.

A shell never writes the table itself: it posts a request in the mailbox
and waits for the master's acknowledgement (see :mod:`gbalance.table.mailbox`), so
a ``reset`` can never race with the master's counting.  The master takes no
lock per connection: it holds the *master lock* (byte 0 of the lock file)
for its life, and shells of the same user take the *change lock* (byte 1)
to use the mailbox one at a time.  With ``-w N`` (N > 1) the workers take the
*maxc lock* (byte 2) for the few instructions that count a connection to a
channel with a ``maxc`` limit (:mod:`gbalance.table.counters`); channels without a
limit never take it.  Workers and the master also take it for a channel
state change (:meth:`gbalance.table.channels.Channels.fire`), never per
connection.

Byte 0 is the master lock, byte 1 the change lock, byte 2 the maxc lock
(taken by :mod:`gbalance.table.counters` with a waiting lock of its own).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

# Open-file-description locks: they belong to the open file, not the process,
# so closing another descriptor of the lock file never drops them, and two
# opens in one process exclude each other like two processes would.

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
FLOCK = "hhqqi4x"   # struct flock: type, whence, start, len, pid


def try_lock(fd: int, kind: int, start: int) -> bool:
    """Take (``F_WRLCK``/``F_RDLCK``) or drop (``F_UNLCK``) one byte without waiting."""
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, struct.pack(FLOCK, kind, os.SEEK_SET, start, 1, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def is_locked(fd: int, start: int) -> bool:
    """True if someone holds a lock on byte ``start`` that a read lock would conflict with."""
    res = fcntl.fcntl(fd, F_OFD_GETLK, struct.pack(FLOCK, fcntl.F_RDLCK, os.SEEK_SET, start, 1, 0))
    return bool(struct.unpack(FLOCK, res)[0] != fcntl.F_UNLCK)
