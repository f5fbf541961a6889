"""Which channel gets the next connection: pure decisions over the table.

The router yields candidate channels in the order balance tries them: the
groups in order; in a round-robin group from the group's cursor on, in a
hash group the channel picked by the client address (and, with ``-H``, the
ones after it).  Disabled channels, channels at ``maxc`` and suspect
channels are skipped.  When monitoring is on and nothing usable is left,
the soft-disabled and suspect channels are tried in order as a last resort,
so a monitor that misjudges cannot take the whole service down.

No sockets here: the server asks for candidates and acts on them.
"""

from __future__ import annotations

import zlib
from typing import Iterator

from gbalance.state import (C_C, C_MAXC, C_STATUS, C_SUSPECT, ENABLED, G_NCHANNELS, G_RR_NEXT,
                            G_TYPE, H_NGROUPS, HARD_DISABLED, HASH, SharedState, gslot, slot)


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

    def __init__(self, state: SharedState, hash_failover: bool = False, last_resort: bool = False):
        self.q = state.q
        self.hash_failover = hash_failover
        self.last_resort = last_resort

    def _usable(self, g: int, c: int) -> bool:
        q = self.q
        base = slot(g, c, 0)
        if q[base + C_STATUS] != ENABLED or q[base + C_SUSPECT]:
            return False
        maxc = q[base + C_MAXC]
        return not maxc or q[base + C_C] < maxc

    def candidates(self, client: str) -> Iterator[tuple[int, int]]:
        """Yield ``(group, channel)`` pairs to try, best first.

        The round-robin cursor of a group moves past each channel as it is
        handed out, so the next connection starts at the following one.
        """
        q = self.q
        yielded = False
        for g in range(q[H_NGROUPS]):
            n = q[gslot(g, G_NCHANNELS)]
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
                cursor = gslot(g, G_RR_NEXT)
                start = q[cursor] % n
                for i in range(n):
                    c = (start + i) % n
                    if self._usable(g, c):
                        q[cursor] = (c + 1) % n
                        yielded = True
                        yield g, c
        if self.last_resort and not yielded:
            yield from self._last_resort()

    def _last_resort(self) -> Iterator[tuple[int, int]]:
        """Soft-disabled and suspect channels, in order, when nothing else is left."""
        q = self.q
        for g in range(q[H_NGROUPS]):
            for c in range(q[gslot(g, G_NCHANNELS)]):
                base = slot(g, c, 0)
                if q[base + C_STATUS] == HARD_DISABLED:
                    continue
                maxc = q[base + C_MAXC]
                if not maxc or q[base + C_C] < maxc:
                    yield g, c
