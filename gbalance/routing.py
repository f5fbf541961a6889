"""Which channel gets the next connection: pure decisions over the table.

The router yields candidate channels in the order balance tries them: the
groups in order; in a round-robin group from the group's cursor on, in a
hash group the channel picked by the client address (and, with ``-H``, the
ones after it).  Disabled channels, channels at ``maxc`` and suspect
channels are skipped.  When monitoring is on and nothing usable is left,
the soft-disabled and suspect channels are tried in order as a last resort,
so a monitor that misjudges cannot take the whole service down.

No sockets here: the server asks for candidates and acts on them.  Which
channel may take a connection is decided by :mod:`gbalance.channels`; the
only slot written here is each group's round-robin cursor.

With workers (``-w N``, N > 1) a router is given the worker's
:class:`~gbalance.counters.Counters`: ``maxc`` is then checked against the
open connections of every worker (and the connection counted at once, see
:mod:`gbalance.counters`), and each worker keeps its own round-robin cursor
in memory, starting at its own index: every worker hands out its
connections in strict rotation, so each channel gets an even share of the
total, but two connections in a row from different workers may go to the
same channel.  Hash groups hash the client address the same way in every
process (CRC-32), so a client sticks to its channel whichever worker
accepts it.
"""

from __future__ import annotations

import zlib
from typing import Iterator

from gbalance.channels import eligible, last_resort, usable
from gbalance.counters import Counters
from gbalance.state import (C_STATUS, G_NCHANNELS, G_RR_NEXT, G_TYPE, H_NGROUPS, HARD_DISABLED, HASH,
                            MAXCHANNELS, MAXGROUPS, SharedState, gslot, slot)


def client_hash(address: str) -> int:
    """A stable hash of a client address that spreads IPv4 and IPv6 alike.

    An IPv4 client seen on a dual-stack socket (``::ffff:a.b.c.d``) hashes
    like the same client seen on an IPv4 socket.
    """
    if address.startswith("::ffff:") and "." in address:
        address = address[7:]
    return zlib.crc32(address.encode("ascii", "replace"))


class Router:
    """Candidate channels for new connections, read live from the table."""

    def __init__(self, state: SharedState, hash_failover: bool = False, last_resort: bool = False,
                 counters: Counters | None = None, worker: int = 0):
        self.q = state.q
        self.hash_failover = hash_failover
        self.last_resort = last_resort
        #: Set only when other processes serve too (-w N, N > 1).
        self.counters = counters if counters is not None and counters.shared else None
        self.cursors = [worker] * MAXGROUPS if self.counters is not None else None

    def _usable(self, g: int, c: int) -> bool:
        counters = self.counters
        if counters is None:
            return usable(self.q, slot(g, c, 0))
        base = slot(g, c, 0)
        return eligible(self.q, base) and counters.room(base)

    def candidates(self, client: str) -> Iterator[tuple[int, int]]:
        """Yield ``(group, channel)`` pairs to try, best first.

        The round-robin cursor of a group moves past each channel as it is
        handed out, so the next connection starts at the following one.
        """
        q = self.q
        yielded = False
        for g in range(min(q[H_NGROUPS], MAXGROUPS)):
            n = min(q[gslot(g, G_NCHANNELS)], MAXCHANNELS)
            if n <= 0:
                continue
            if q[gslot(g, G_TYPE)] == HASH:
                first = client_hash(client) % n
                span = n if self.hash_failover else 1
                for i in range(span):
                    c = (first + i) % n
                    if self._usable(g, c):
                        yielded = True
                        yield g, c
            else:
                # The cursor: a worker's own (in memory), else the group's slot in the table.
                cursors, at = (self.cursors, g) if self.cursors is not None else (q, gslot(g, G_RR_NEXT))
                start = cursors[at] % n
                for i in range(n):
                    c = (start + i) % n
                    if self._usable(g, c):
                        cursors[at] = (c + 1) % n
                        yielded = True
                        yield g, c
        if self.last_resort and not yielded:
            yield from self._last_resort()

    def _last_resort(self) -> Iterator[tuple[int, int]]:
        """Soft-disabled and suspect channels, in order, when nothing else is left."""
        q = self.q
        counters = self.counters
        for g in range(min(q[H_NGROUPS], MAXGROUPS)):
            for c in range(min(q[gslot(g, G_NCHANNELS)], MAXCHANNELS)):
                base = slot(g, c, 0)
                if counters is None:
                    if last_resort(q, base):
                        yield g, c
                elif q[base + C_STATUS] != HARD_DISABLED and counters.room(base):
                    yield g, c
