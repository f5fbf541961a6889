"""Which channel gets the next connection: decisions over the table.

The router yields candidate channels in the order balance tries them: the
groups in order; in a round-robin group from the group's cursor on, in a
hash group the channel picked by the client address (and, with ``-H``, the
ones after it).  Disabled channels, channels at ``maxc`` and suspect
channels are skipped.  When monitoring is on and nothing usable is left,
the soft-disabled and suspect channels are tried in order as a last resort,
so a monitor that misjudges cannot take the whole service down.

No sockets here: the server asks for candidates and acts on them.  Which
channel may take a connection is decided by :mod:`gbalance.table.channels`.  The
router does write to the table: each group's round-robin cursor (with
``-w 1``), and with ``-w N`` the connection :meth:`Counters.room
<gbalance.table.counters.Counters.room>` counts at once for a channel with a
``maxc``; it changes no channel's state.

With workers (``-w N``, N > 1) a router is given the worker's
:class:`~gbalance.table.counters.Counters`: ``maxc`` is then checked against the
open connections of every worker (and the connection counted at once, see
:mod:`gbalance.table.counters`), and each worker keeps its own round-robin cursor
in memory, starting at its own index: every worker hands out its
connections in strict rotation, so each channel gets an even share of the
total, but two connections in a row from different workers may go to the
same channel.

Hash groups use rendezvous (highest random weight) hashing: every channel
of the group gets a score for the client, computed from the client's
address and the channel's own address and port, and the client goes to the
channel with the highest score.  A channel's score for a client never
depends on the other channels, so

* disabling, enabling, filling up (``maxc``) or re-pointing one channel
  moves only the clients whose best channel that is, and a new channel
  (n+1 in all) takes about 1/(n+1) of every other channel's clients and
  moves no one else;
* with ``-H`` a client whose best channel cannot take it tries its second
  best, then its third...: each client has its own order, so the clients of
  a failed channel spread evenly over the rest instead of all landing on
  the next channel;
* every process (``-w N``) and every host with the same channels picks the
  same channel for a client, whatever order the channels were created in,
  and a restart (``-r``) keeps the mapping.

Cost: the per-channel numbers (two 64-bit words from BLAKE2b of the
channel's address and port) are made only when the channel set or an
address changes (the table's generation).  The client's CRC-32 is cut to a
16-bit key; the winner of a key is computed once (one big-integer
multiply-add scores every channel of the group at once) and remembered in a
64 KiB table per hash group until the channels change, so a connection
costs a CRC-32 and one index.  Only a client whose best channel is not
usable, with ``-H``, has its whole order computed.
"""


import hashlib
import ipaddress
import zlib
from typing import Iterator, Sequence

from gbalance.table.channels import eligible, fallback_eligible, last_resort, usable
from gbalance.table.counters import Counters
from gbalance.table.layout import (C_C, C_MAXC, C_STATUS, C_SUSPECT, ENABLED,
                                   C_PORT, C_SLOTS, CHANNEL_BASE, G_SLOTS, GROUP_BASE, G_NCHANNELS, G_RR_NEXT, G_TYPE, HASH, H_GENERATION, H_NGROUPS,
                                   MAXCHANNELS, MAXGROUPS, gslot, slot)
from gbalance.table.state import SharedState

#: A channel's enabled status as a plain int (compared per connection).
_ENABLED = int(ENABLED)

#: Bits of the client key (the CRC-32 cut down) that pick a winner; 2**KEY_BITS keys.
KEY_BITS = 16
KEY_SHIFT = 32 - KEY_BITS
_NKEYS = 1 << KEY_BITS
_UNKNOWN = 0xFF            # a key whose winner is not computed yet (channels are < 64)
_MASK64 = (1 << 64) - 1
_LANE = 128                # bits per channel in the packed multiply: no carry between lanes


def client_hash(address: str) -> int:
    """A stable hash of a client address that spreads IPv4 and IPv6 alike.

    An IPv4 client seen on a dual-stack socket (``::ffff:a.b.c.d``) hashes
    like the same client seen on an IPv4 socket.
    """
    if address.startswith("::ffff:") and "." in address:
        address = address[7:]
    return zlib.crc32(address.encode("ascii", "replace"))


def client_key(address: str) -> int:
    """The 16-bit key a hash group picks a channel for: the top of :func:`client_hash`."""
    return client_hash(address) >> KEY_SHIFT


def channel_seed(address: str, port: int, twin: int = 0) -> "tuple[(int, int)]":
    """The two 64-bit numbers that make a channel's scores, from its address and port.

    ``twin`` counts earlier channels of the same group with the same address
    and port (0 for the first), so two such channels still get their own
    clients.  The address is put in its compressed form first, so two hosts
    that spell an IPv6 address differently still agree.
    """
    try:
        address = ipaddress.ip_address(address).compressed
    except ValueError:
        pass
    text = f"{address} {port} {twin}".encode("ascii", "replace")
    digest = hashlib.blake2b(text, digest_size=16, person=b"gbalance-hrw").digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def score(key: int, seed: "tuple[(int, int)]") -> int:
    """A channel's score for a client key: ``(a * key + b) mod 2**64``.

    Multiply-add-shift hashing (Dietzfelbinger): over random ``a, b`` the top
    48 bits are 2-independent, which is what rendezvous hashing needs.
    """
    a, b = seed
    return (a * key + b) & _MASK64


def rendezvous_order(key: int, seeds: "Sequence[tuple[int, int]]") -> "list[int]":
    """Channel indices best first for ``key`` (ties, which need equal seeds, by index)."""
    scores = [score(key, s) for s in seeds]
    return sorted(range(len(seeds)), key=lambda c: (-scores[c], c))


class Rendezvous:
    """One hash group's channels as rendezvous hashing sees them.

    Built when the group's channels change; :meth:`best` is the per-connection
    call.
    """

    __slots__ = ("seeds", "n", "generation", "winners", "_a", "_b", "_nbytes")

    def __init__(self, seeds: "Sequence[tuple[int, int]]", generation: int = 0):
        self.seeds = tuple(seeds)
        self.n = len(self.seeds)
        self.generation = generation
        #: The best channel of every key once computed, else _UNKNOWN.
        self.winners = bytearray(b"\xff" * _NKEYS)
        # Every channel's a (and b) side by side in one integer, one 128-bit lane
        # each: key * A + B computes every score at once (a*key+b < 2**113).
        self._a = sum(a << (_LANE * c) for c, (a, _) in enumerate(self.seeds))
        self._b = sum(b << (_LANE * c) for c, (_, b) in enumerate(self.seeds))
        self._nbytes = _LANE // 8 * self.n

    def best(self, key: int) -> int:
        """The channel with the highest score for ``key`` (0 <= key < 2**KEY_BITS)."""
        c = self.winners[key]
        if c == _UNKNOWN:
            c = self._compute(key)
            self.winners[key] = c
        return c

    def _compute(self, key: int) -> int:
        # The low 64 bits of each lane are the channel's score.
        lanes = memoryview((key * self._a + self._b).to_bytes(self._nbytes, "little")).cast("Q")
        scores = lanes[::2].tolist()
        return scores.index(max(scores))

    def order(self, key: int) -> "list[int]":
        """Every channel, best first, for ``key`` (the -H failover order)."""
        return rendezvous_order(key, self.seeds)


def group_seeds(state: SharedState, g: int, n: int) -> "list[tuple[(int, int)]]":
    """The seeds of the first ``n`` channels of group ``g``, read from the table."""
    q = state.q
    seen: "dict[tuple[str, int], int]" = {}
    seeds = []
    for c in range(n):
        ident = (state.address(g, c), q[slot(g, c, C_PORT)])
        twin = seen.get(ident, 0)
        seen[ident] = twin + 1
        seeds.append(channel_seed(ident[0], ident[1], twin))
    return seeds


class Router:
    """Candidate channels for new connections, read live from the table."""

    def __init__(self, state: SharedState, hash_failover: bool = False, last_resort: bool = False,
                 counters: Counters | None = None, worker: int = 0):
        self.state = state
        self.q = state.q
        #: Each hash group's :class:`Rendezvous`, rebuilt when the channels change.
        self.rings: "list[Rendezvous | None]" = [None] * MAXGROUPS
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

    def candidates(self, client: str) -> "Iterator[tuple[int, int]]":
        """Yield ``(group, channel)`` pairs to try, best first.

        The round-robin cursor of a group moves past each channel as it is
        handed out, so the next connection starts at the following one.
        """
        q = self.q
        yielded = False
        # This runs per connection: the slot arithmetic of state.gslot() and
        # state.slot() is written out, and without shared counters a channel
        # is checked with channels.usable() directly (what _usable() does).
        shared = self.counters is not None
        ngroups = q[H_NGROUPS]
        for g in range(ngroups if ngroups < MAXGROUPS else MAXGROUPS):
            group = GROUP_BASE + g * G_SLOTS
            n = q[group + G_NCHANNELS]
            if n > MAXCHANNELS:
                n = MAXCHANNELS
            if n <= 0:
                continue
            if q[group + G_TYPE] == HASH:
                ring = self.rings[g]
                if ring is None or ring.generation != q[H_GENERATION] or ring.n != n:
                    ring = self._ring(g, n)
                key = client_key(client)
                best = ring.best(key)
                if self._usable(g, best):
                    yielded = True
                    yield g, best
                if self.hash_failover:
                    for c in ring.order(key)[1:]:
                        if self._usable(g, c):
                            yielded = True
                            yield g, c
            else:
                # The cursor: a worker's own (in memory), else the group's slot in the table.
                cursors, at = (self.cursors, g) if self.cursors is not None else (q, group + G_RR_NEXT)
                start = cursors[at] % n
                first = CHANNEL_BASE + g * MAXCHANNELS * C_SLOTS
                for i in range(n):
                    c = (start + i) % n
                    if shared:
                        ok = self._usable(g, c)
                    else:
                        # channels.usable() written out (a call less per connection).
                        b = first + c * C_SLOTS
                        ok = (q[b + C_STATUS] == _ENABLED and not q[b + C_SUSPECT]
                              and (not q[b + C_MAXC] or q[b + C_C] < q[b + C_MAXC]))
                    if ok:
                        cursors[at] = (c + 1) % n
                        yielded = True
                        yield g, c
        if self.last_resort and not yielded:
            yield from self._last_resort()

    def _ring(self, g: int, n: int) -> Rendezvous:
        """Build group ``g``'s :class:`Rendezvous` from the table as it is now."""
        # The generation is read before the addresses: a change made while they
        # are read bumps it again, and the next connection rebuilds.
        generation = self.q[H_GENERATION]
        ring = Rendezvous(group_seeds(self.state, g, n), generation)
        self.rings[g] = ring
        return ring

    def _last_resort(self) -> "Iterator[tuple[int, int]]":
        """Soft-disabled and suspect channels, in order, when nothing else is left."""
        q = self.q
        counters = self.counters
        for g in range(min(q[H_NGROUPS], MAXGROUPS)):
            for c in range(min(q[gslot(g, G_NCHANNELS)], MAXCHANNELS)):
                base = slot(g, c, 0)
                if counters is None:
                    if last_resort(q, base):
                        yield g, c
                elif fallback_eligible(q, base) and counters.room(base):
                    yield g, c
