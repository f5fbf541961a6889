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
from zlib import crc32
from typing import Iterator, Sequence

from gbalance.table.channels import fallback_eligible, last_resort
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
_KEY_SHIFT = KEY_SHIFT     # (a C constant when compiled, routing.pxd)
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
    return crc32(address.encode("ascii", "replace"))


def client_key(address: str) -> int:
    """The 16-bit key a hash group picks a channel for: the top of :func:`client_hash`."""
    return client_hash(address) >> _KEY_SHIFT


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

    __slots__ = ("state", "q", "rings", "hash_failover", "last_resort", "counters", "cursors")

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
        """May channel ``g``/``c`` take a new connection?  (channels.usable(), or
        with shared counters channels.eligible() and Counters.room(), written out.)"""
        q = self.q
        b = CHANNEL_BASE + (g * MAXCHANNELS + c) * C_SLOTS
        if q[b + C_STATUS] != _ENABLED or q[b + C_SUSPECT]:
            return False
        maxc = q[b + C_MAXC]
        if not maxc:
            return True         # (what room() answers first)
        counters = self.counters
        if counters is not None:
            return counters.room(b)
        return q[b + C_C] < maxc

    def candidates(self, client: str) -> "Candidates":
        """The ``(group, channel)`` pairs to try for ``client``, best first (an iterator).

        The round-robin cursor of a group moves past each channel as it is
        handed out, so the next connection starts at the following one.
        Nothing is read before the first ``next()``; each later one reads
        the table as it is then.
        """
        it = Candidates.__new__(Candidates)
        it.router = self
        it.client = client
        it.rest = None
        it.g = -1
        it.i = it.start = it.n = 0
        return it

    def _first(self, it: "Candidates") -> "tuple[int, int]":
        """The first candidate of ``it``, found without a generator (see :class:`Candidates`)."""
        q = self.q
        # This runs per connection: the slot arithmetic of gslot() and slot(),
        # the cursor and, without shared counters, the round-robin scan are
        # written out (what _cursor() and _next_rr() do).
        if q[H_NGROUPS] > 0:
            n = q[GROUP_BASE + G_NCHANNELS]
            if n > MAXCHANNELS:
                n = MAXCHANNELS
            if n > 0:
                if q[GROUP_BASE + G_TYPE] == HASH:
                    c = self._ring(0, n).best(client_key(it.client))
                    if self._usable(0, c):
                        it.g, it.i, it.start, it.n = 0, 1, -1, n
                        return 0, c
                elif self.cursors is not None:
                    start = self.cursors[0] % n
                    i = self._next_rr(0, n, start, 0)
                    if i < n:
                        it.g, it.i, it.start, it.n = 0, i + 1, start, n
                        c = start + i
                        return 0, c - n if c >= n else c
                else:
                    start = q[GROUP_BASE + G_RR_NEXT] % n
                    for i in range(n):
                        c = start + i
                        if c >= n:
                            c -= n
                        b = CHANNEL_BASE + c * C_SLOTS
                        if (q[b + C_STATUS] == _ENABLED and not q[b + C_SUSPECT]
                                and (not q[b + C_MAXC] or q[b + C_C] < q[b + C_MAXC])):
                            q[GROUP_BASE + G_RR_NEXT] = c + 1 if c + 1 < n else 0
                            it.g, it.i, it.start, it.n = 0, i + 1, start, n
                            return 0, c
        # Nothing in the first group (it read, changed nothing): the full walk.
        it.g = 0
        it.rest = rest = self._walk(it.client, 0, 0, 0, 0)
        return next(rest)

    def _walk(self, client: str, g: int, i: int, start: int, n: int) -> "Iterator[tuple[int, int]]":
        """The candidates from group ``g`` on, then the last resort if none was given.

        ``i`` > 0: go on in group ``g`` after the ``i`` positions already
        handed out there, with the channel count ``n`` and round-robin
        ``start`` read then (-1: a hash group).
        """
        q = self.q
        yielded = i > 0
        if yielded:
            for c in self._group(client, g, n, start, i):
                yield g, c
            g += 1
        ngroups = q[H_NGROUPS]
        if ngroups > MAXGROUPS:
            ngroups = MAXGROUPS
        while g < ngroups:
            group = GROUP_BASE + g * G_SLOTS
            n = q[group + G_NCHANNELS]
            if n > MAXCHANNELS:
                n = MAXCHANNELS
            if n > 0:
                start = -1 if q[group + G_TYPE] == HASH else self._cursor(g, n)
                for c in self._group(client, g, n, start, 0):
                    yielded = True
                    yield g, c
            g += 1
        if self.last_resort and not yielded:
            yield from self._last_resort()

    def _group(self, client: str, g: int, n: int, start: int, i: int) -> "Iterator[int]":
        """Channels of group ``g`` (``n`` of them) from position ``i`` on.

        ``start``: the round-robin cursor as read on entering the group, or
        -1 for a hash group (position 0 is the client's best channel, then,
        with ``-H``, the rest of its own order).
        """
        if start < 0:
            ring = self._ring(g, n)
            key = client_key(client)
            if i == 0:
                best = ring.best(key)
                if self._usable(g, best):
                    yield best
            if self.hash_failover:
                for c in ring.order(key)[1:]:
                    if self._usable(g, c):
                        yield c
            return
        while True:
            i = self._next_rr(g, n, start, i)
            if i >= n:
                return
            yield (start + i) % n
            i += 1

    def _cursor(self, g: int, n: int) -> int:
        """Where group ``g``'s rotation starts now: a worker's own cursor (in memory),
        else the group's slot in the table."""
        cursors = self.cursors
        if cursors is not None:
            return cursors[g] % n
        return self.q[GROUP_BASE + g * G_SLOTS + G_RR_NEXT] % n

    def _next_rr(self, g: int, n: int, start: int, i: int) -> int:
        """The first position from ``i`` on in round-robin group ``g``'s rotation
        (``n`` channels from ``start``) whose channel is usable, the cursor
        moved past that channel; ``n`` when there is none."""
        while i < n:
            c = start + i
            if c >= n:
                c -= n
            if self._usable(g, c):
                c += 1
                if c == n:
                    c = 0
                if self.cursors is not None:
                    self.cursors[g] = c
                else:
                    self.q[GROUP_BASE + g * G_SLOTS + G_RR_NEXT] = c
                return i
            i += 1
        return n

    def _ring(self, g: int, n: int) -> Rendezvous:
        """Group ``g``'s :class:`Rendezvous`, (re)built from the table when its
        channels changed (the table's generation or their number)."""
        ring = self.rings[g]
        generation = self.q[H_GENERATION]
        if ring is not None and ring.generation == generation and ring.n == n:
            return ring
        # The generation is read before the addresses: a change made while they
        # are read bumps it again, and the next connection rebuilds.
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


class Candidates:
    """The channels to try for one client, best first: an iterator over
    ``(group, channel)`` pairs (what :meth:`Router.candidates` returns).

    Most connections take the first candidate, so the first ``next()``
    looks at the first group directly; only when that group has no usable
    channel, or when a second candidate is asked for (the first failed),
    does a generator (:meth:`Router._walk`) take over, going on where the
    first stopped.  (A generator for every connection cost a frame, and its
    close when the race dropped it raised ``GeneratorExit`` inside it.)
    """

    __slots__ = ("router", "client", "rest", "g", "i", "start", "n")
    # (Router.candidates sets them: no __init__, a call less per connection.)
    router: Router
    client: str
    rest: "Iterator[tuple[int, int]] | None"   # the walk, once it took over
    g: int          # -1 before the first next(); then the group it stopped in
    i: int          # positions of that group handed out
    start: int      # that group's round-robin start (-1: a hash group)
    n: int          # and its number of channels

    def __iter__(self) -> "Candidates":
        return self

    def __next__(self) -> "tuple[int, int]":
        rest = self.rest
        if rest is not None:
            return next(rest)
        if self.g < 0:
            return self.router._first(self)
        self.rest = rest = self.router._walk(self.client, self.g, self.i, self.start, self.n)
        return next(rest)
