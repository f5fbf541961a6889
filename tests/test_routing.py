"""routing.Router over a real SharedState file: the order channels are tried in."""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest

from gbalance.table.channels import Channels
from gbalance.proxy.routing import (KEY_BITS, Rendezvous, Router, channel_seed, client_hash, client_key,
                              rendezvous_order, score)
from gbalance.table.layout import (C_C, C_MAXC, C_PORT, C_SUSPECT, ENABLED, G_RR_NEXT, HARD_DISABLED, HASH,
                                   RR, SOFT_DISABLED, gslot)
from gbalance.table.state import SharedState


@pytest.fixture
def state(tmp_path):
    st = SharedState.create(str(tmp_path / "balance.8080.any"))
    yield st
    st.close()


def build(st: SharedState, *groups: tuple[int, int], maxc: int = 0) -> None:
    """Add groups given as ``(kind, number of channels)``."""
    for kind, n in groups:
        g = st.add_group(kind)
        for c in range(n):
            st.add_channel(g, "127.0.0.1", 10000 + 100 * g + c, maxc)


def first(router: Router, client: str = "127.0.0.1") -> tuple[int, int] | None:
    """The channel a connection that succeeds at once would get."""
    return next(router.candidates(client), None)


def test_round_robin_order(state):
    build(state, (RR, 3))
    r = Router(state)
    assert [first(r) for _ in range(7)] == [(0, 0), (0, 1), (0, 2), (0, 0), (0, 1), (0, 2), (0, 0)]


def test_round_robin_cursor_lives_in_the_table(state):
    """A second router on the same file (a restarted view) continues the rotation."""
    build(state, (RR, 3))
    assert first(Router(state)) == (0, 0)
    assert state.q[gslot(0, G_RR_NEXT)] == 1
    assert first(Router(state)) == (0, 1)


def test_one_connection_tries_the_whole_group_then_the_next(state):
    build(state, (RR, 3), (RR, 2), (HASH, 1))
    r = Router(state)
    assert first(r) == (0, 0)
    assert list(r.candidates("10.0.0.1")) == [(0, 1), (0, 2), (0, 0), (1, 0), (1, 1), (2, 0)]


@pytest.mark.parametrize("status", [SOFT_DISABLED, HARD_DISABLED])
def test_disabled_channels_are_skipped(state, status):
    build(state, (RR, 3))
    state.set_status(0, 1, status)
    r = Router(state)
    assert [first(r) for _ in range(4)] == [(0, 0), (0, 2), (0, 0), (0, 2)]
    state.set_status(0, 1, ENABLED)   # the cursor stands after channel 2
    assert [first(r) for _ in range(3)] == [(0, 0), (0, 1), (0, 2)]


def test_maxc_full_channels_are_skipped(state):
    build(state, (RR, 3), maxc=2)
    r = Router(state)
    state.put(0, 1, C_C, 2)
    assert [first(r) for _ in range(3)] == [(0, 0), (0, 2), (0, 0)]
    state.put(0, 1, C_C, 1)
    assert first(r) == (0, 1)


def test_suspect_channels_are_skipped(state):
    build(state, (RR, 2))
    state.put(0, 0, C_SUSPECT, 1)
    r = Router(state)
    assert [first(r) for _ in range(3)] == [(0, 1)] * 3


def test_failover_to_the_next_group(state):
    build(state, (RR, 2), (RR, 2), (RR, 1))
    for c in range(2):
        state.set_status(0, c, HARD_DISABLED)
    r = Router(state)
    assert [first(r) for _ in range(3)] == [(1, 0), (1, 1), (1, 0)]
    state.put(1, 0, C_C, 1)
    state.put(1, 1, C_C, 1)
    assert first(r) == (1, 1)  # maxc 0 means unlimited
    for c in range(2):
        state.set_status(1, c, SOFT_DISABLED)
    assert first(r) == (2, 0)


def test_all_unusable_gives_nothing(state):
    build(state, (RR, 2), (HASH, 2))
    for g in range(2):
        for c in range(2):
            state.set_status(g, c, HARD_DISABLED)
    assert list(Router(state).candidates("10.0.0.1")) == []
    assert list(Router(state, last_resort=True).candidates("10.0.0.1")) == []


def test_no_groups_gives_nothing(state):
    assert list(Router(state).candidates("10.0.0.1")) == []


def test_empty_group_is_skipped(state):
    build(state, (RR, 0), (RR, 1))
    assert first(Router(state)) == (1, 0)


def test_table_changes_apply_to_the_next_connection(state):
    build(state, (RR, 1))
    r = Router(state)
    assert [first(r) for _ in range(2)] == [(0, 0), (0, 0)]
    state.add_channel(0, "127.0.0.1", 9999)
    assert [first(r) for _ in range(3)] == [(0, 0), (0, 1), (0, 0)]
    state.set_group_type(0, HASH)
    picks = {first(r, "10.1.2.3") for _ in range(5)}
    assert len(picks) == 1


# -- last resort (monitoring) ------------------------------------------------------------

def test_last_resort_tries_soft_disabled_and_suspect_in_order(state):
    build(state, (RR, 3), (RR, 2), maxc=1)
    state.set_status(0, 0, HARD_DISABLED)
    state.set_status(0, 1, SOFT_DISABLED)
    state.put(0, 2, C_SUSPECT, 1)
    state.set_status(1, 0, SOFT_DISABLED)
    state.put(1, 0, C_C, 1)             # soft-disabled but full: not even a last resort
    state.set_status(1, 1, SOFT_DISABLED)
    assert list(Router(state).candidates("10.0.0.1")) == []
    assert list(Router(state, last_resort=True).candidates("10.0.0.1")) == [(0, 1), (0, 2), (1, 1)]


def test_last_resort_only_when_nothing_else(state):
    build(state, (RR, 2), (RR, 1))
    state.set_status(0, 0, SOFT_DISABLED)
    r = Router(state, last_resort=True)
    assert list(r.candidates("10.0.0.1")) == [(0, 1), (1, 0)]


# -- hash groups ----------------------------------------------------------------------

def ipv4_clients(n: int) -> list[str]:
    base = int(ipaddress.IPv4Address("10.0.0.1"))
    return [str(ipaddress.IPv4Address(base + i)) for i in range(n)]


def ipv6_clients(n: int) -> list[str]:
    out = []
    for i in range(n):
        out.append(f"2001:db8::{i + 1:x}" if i % 2 else f"2001:db8:{i:x}::1")
    return out


def spread(state: SharedState, clients: list[str], **kw) -> Counter:
    r = Router(state, **kw)
    return Counter(first(r, a) for a in clients)


@pytest.mark.parametrize("clients", [ipv4_clients(1000), ipv6_clients(1000),
                                     [f"192.168.7.{i}" for i in range(1, 255)] * 4,
                                     [f"::ffff:10.9.{i // 250}.{i % 250}" for i in range(1000)]],
                         ids=["ipv4", "ipv6", "ipv4-/24", "v4-mapped"])
def test_hash_spreads_clients(state, clients):
    build(state, (HASH, 4))
    counts = spread(state, clients)
    assert set(counts) == {(0, c) for c in range(4)}
    share = len(clients) / 4
    for n in counts.values():
        assert 0.7 * share <= n <= 1.3 * share, counts


def test_hash_is_sticky(state):
    build(state, (HASH, 5))
    r = Router(state)
    for client in ipv4_clients(50) + ipv6_clients(50):
        picks = {first(r, client) for _ in range(4)}
        assert len(picks) == 1
    assert state.q[gslot(0, G_RR_NEXT)] == 0  # hashing moves no cursor


def test_v4_mapped_client_hashes_like_plain_ipv4(state):
    build(state, (HASH, 7))
    r = Router(state)
    for client in ipv4_clients(1000):
        assert client_hash("::ffff:" + client) == client_hash(client)
        assert first(r, "::ffff:" + client) == first(r, client)


def test_hash_failure_without_H_goes_to_the_next_group(state):
    build(state, (HASH, 4), (RR, 1))
    client = "10.20.30.40"
    picked = first(Router(state), client)
    assert picked[0] == 0
    assert list(Router(state).candidates(client)) == [picked, (1, 0)]
    state.set_status(0, picked[1], HARD_DISABLED)
    assert list(Router(state).candidates(client)) == [(1, 0)]


def channel_ids(st: SharedState, g: int = 0) -> list[tuple[str, int]]:
    return [(st.address(g, c), st.get(g, c, C_PORT)) for c in range(st.nchannels(g))]


def test_hash_picks_the_channel_with_the_highest_score(state):
    build(state, (HASH, 6))
    seeds = [channel_seed(a, p) for a, p in channel_ids(state)]
    r = Router(state)
    for client in ipv4_clients(300) + ipv6_clients(300):
        key = client_key(client)
        scores = [score(key, s) for s in seeds]
        assert first(r, client) == (0, scores.index(max(scores)))


def test_packed_scores_agree_with_one_by_one():
    """Rendezvous.best (all lanes in one multiply) equals the plain score of each channel."""
    seeds = [channel_seed(f"10.0.{c // 200}.{c % 200}", 80 + c % 3) for c in range(64)]
    for n in (1, 2, 5, 16, 64):
        ring = Rendezvous(seeds[:n])
        for key in [0, 1, (1 << KEY_BITS) - 1] + list(range(7, 1 << KEY_BITS, 97)):
            assert ring.best(key) == rendezvous_order(key, seeds[:n])[0]
            assert ring.best(key) == ring.order(key)[0]      # and again from the memo


def test_twin_channels_get_their_own_clients(state):
    """Two channels with the same address and port still share the clients."""
    g = state.add_group(HASH)
    for _ in range(2):
        state.add_channel(g, "127.0.0.1", 9000)
    counts = spread(state, ipv4_clients(2000))
    assert set(counts) == {(0, 0), (0, 1)} and min(counts.values()) > 800, counts


def test_hash_failover_with_H_follows_the_clients_own_order(state):
    build(state, (HASH, 4), (RR, 1))
    seeds = [channel_seed(a, p) for a, p in channel_ids(state)]
    client = "2001:db8::42"
    order = rendezvous_order(client_key(client), seeds)
    assert list(Router(state, hash_failover=True).candidates(client)) == [(0, c) for c in order] + [(1, 0)]
    state.set_status(0, order[0], SOFT_DISABLED)
    state.put(0, order[1], C_SUSPECT, 1)
    assert list(Router(state, hash_failover=True).candidates(client)) == \
        [(0, order[2]), (0, order[3]), (1, 0)]
    # Clients whose own channel is usable keep it, with or without -H; the
    # others go to their next hash channel (-H) or the next group (no -H).
    for a in ipv4_clients(200):
        plain, with_h = first(Router(state), a), first(Router(state, hash_failover=True), a)
        if plain[0] == 0:
            assert with_h == plain
        else:
            assert plain == (1, 0) and with_h[0] == 0


# -- how many clients move when the channels change ----------------------------------------
# Deterministic: fixed clients, fixed channel addresses.  Ideal: 1/n of the
# clients move when one of n channels goes, 1/(n+1) when one is added, and
# with -H the moved ones spread evenly over the n-1 others.

CLIENTS = ipv4_clients(12000) + ipv6_clients(4000)


def mapping(st: SharedState, **kw) -> dict[str, tuple[str, int] | tuple[int, int]]:
    """client -> (address, port) of its channel in group 0, or its (group, channel) elsewhere."""
    r = Router(st, **kw)
    out = {}
    for a in CLIENTS:
        g, c = first(r, a)
        out[a] = (st.address(g, c), st.get(g, c, C_PORT)) if g == 0 else (g, c)
    return out


def moved(before: dict, after: dict) -> list[str]:
    return [a for a in before if before[a] != after[a]]


@pytest.mark.parametrize("n", [4, 8, 16])
@pytest.mark.parametrize("how", ["disable", "maxc"])
def test_disabling_one_channel_moves_only_its_clients(state, n, how):
    build(state, (HASH, n), (RR, 1))
    before = mapping(state)
    victim = n // 2
    vid = (state.address(0, victim), state.get(0, victim, C_PORT))
    if how == "disable":
        state.set_status(0, victim, HARD_DISABLED)
    else:
        state.put(0, victim, C_MAXC, 3)
        state.put(0, victim, C_C, 3)    # full
    # Without -H: exactly the victim's clients move, to the next group.
    after = mapping(state)
    gone = moved(before, after)
    assert all(before[a] == vid and after[a] == (1, 0) for a in gone)
    assert abs(len(gone) / len(CLIENTS) - 1 / n) < 0.2 / n, len(gone)
    # With -H: the same clients move, spread evenly over the other channels.
    after_h = mapping(state, hash_failover=True)
    assert moved(before, after_h) == gone
    landed = Counter(after_h[a] for a in gone)
    assert len(landed) == n - 1 and vid not in landed
    even = len(gone) / (n - 1)
    assert 0.7 * even <= min(landed.values()) and max(landed.values()) <= 1.3 * even, landed
    # Back to normal: everybody returns.
    state.set_status(0, victim, ENABLED)
    state.put(0, victim, C_C, 0)
    assert mapping(state) == before


@pytest.mark.parametrize("n", [4, 8, 16])
def test_adding_a_channel_moves_only_the_new_channels_clients(state, n):
    build(state, (HASH, n))
    before = mapping(state)
    Channels(state).create(0, "127.0.0.99", 4242)     # created hard-disabled, as balance does
    state.set_status(0, n, ENABLED)
    after = mapping(state)
    gone = moved(before, after)
    assert all(after[a] == ("127.0.0.99", 4242) for a in gone)
    assert abs(len(gone) / len(CLIENTS) - 1 / (n + 1)) < 0.2 / (n + 1), len(gone)
    # ... taken evenly from every old channel.
    taken = Counter(before[a] for a in gone)
    assert len(taken) == n
    even = len(gone) / n
    assert 0.7 * even <= min(taken.values()) and max(taken.values()) <= 1.3 * even, taken


def test_reassigning_a_channel_moves_only_its_clients_and_its_new_share(state):
    n = 8
    build(state, (HASH, n))
    before = mapping(state)
    old = (state.address(0, 3), state.get(0, 3, C_PORT))
    ch = Channels(state)
    state.set_status(0, 3, HARD_DISABLED)
    assert ch.assign(0, 3, "127.0.0.77", 7777).name == "OK"
    state.set_status(0, 3, ENABLED)
    after = mapping(state)
    for a in moved(before, after):
        assert before[a] == old or after[a] == ("127.0.0.77", 7777)
    assert len(moved(before, after)) < 2.4 / n * len(CLIENTS)


def test_mapping_does_not_depend_on_the_order_channels_were_made_in(tmp_path):
    ports = [10000 + 7 * i for i in range(9)]
    maps = []
    for k, order in enumerate([ports, ports[::-1], ports[3:] + ports[:3]]):
        st = SharedState.create(str(tmp_path / f"balance.{k}.any"))
        try:
            g = st.add_group(HASH)
            for p in order:
                st.add_channel(g, "127.0.0.1", p)
            maps.append(mapping(st))
        finally:
            st.close()
    assert maps[0] == maps[1] == maps[2]


def test_an_ipv6_channel_is_the_same_however_it_is_written():
    assert channel_seed("2001:db8:0:0::1", 80) == channel_seed("2001:DB8::1", 80)
    assert channel_seed("2001:db8::1", 80) != channel_seed("2001:db8::1", 81)
    assert channel_seed("2001:db8::1", 80, 1) != channel_seed("2001:db8::1", 80)


def test_the_mapping_is_fixed(state):
    """The same channels pick the same channels for the same clients in every
    release (hosts running different versions side by side must agree)."""
    build(state, (HASH, 4))
    r = Router(state)
    assert [first(r, a)[1] for a in ("10.0.0.1", "10.0.0.2", "192.168.1.10", "2001:db8::1")] == [0, 1, 2, 3]


# -- the first candidate's fast path against the plain generator ----------------------------
# Router.candidates finds the first candidate without a generator and only
# builds one (Router._walk) for a second; REFERENCE is the walk as one plain
# generator (the code before that split).  Over random tables both must hand
# out the same channels in the same order and leave the same table behind
# (cursors, and the connections -w N counts at once for a maxc).

def reference_candidates(r: Router, client: str):
    from gbalance.table.layout import G_NCHANNELS, G_SLOTS, G_TYPE, GROUP_BASE, H_NGROUPS, MAXCHANNELS, MAXGROUPS
    from gbalance.table.channels import eligible, usable
    from gbalance.table.layout import slot
    q = r.state.q

    def ok(g: int, c: int) -> bool:
        if r.counters is None:
            return usable(q, slot(g, c, 0))
        return eligible(q, slot(g, c, 0)) and r.counters.room(slot(g, c, 0))

    yielded = False
    for g in range(min(q[H_NGROUPS], MAXGROUPS)):
        group = GROUP_BASE + g * G_SLOTS
        n = min(q[group + G_NCHANNELS], MAXCHANNELS)
        if n <= 0:
            continue
        if q[group + G_TYPE] == HASH:
            ring = r._ring(g, n)
            key = client_key(client)
            best = ring.best(key)
            if ok(g, best):
                yielded = True
                yield g, best
            if r.hash_failover:
                for c in ring.order(key)[1:]:
                    if ok(g, c):
                        yielded = True
                        yield g, c
        else:
            cursors, at = (r.cursors, g) if r.cursors is not None else (q, group + G_RR_NEXT)
            start = cursors[at] % n
            for i in range(n):
                c = (start + i) % n
                if ok(g, c):
                    cursors[at] = (c + 1) % n
                    yielded = True
                    yield g, c
    if r.last_resort and not yielded:
        yield from r._last_resort()


def random_table(rng, st: SharedState, shape) -> None:
    for kind, n in shape:
        g = st.add_group(kind)
        for c in range(n):
            st.add_channel(g, f"127.0.{g}.{c + 1}", 9000 + c)


def shake(rng, states, shape) -> None:
    """The same random change of channel states, counts and cursors in every table."""
    from gbalance.table.layout import G_RR_NEXT as RR_NEXT
    for g, (_, n) in enumerate(shape):
        if rng.random() < 0.3:
            cursor = rng.choice([0, 1, n, 7, -3, 2**40])
            for st in states:
                st.q[gslot(g, RR_NEXT)] = cursor
        for c in range(n):
            status = rng.choices([ENABLED, SOFT_DISABLED, HARD_DISABLED], [6, 1, 1])[0]
            suspect = int(rng.random() < 0.1)
            maxc = rng.choice([0, 0, 0, 1, 2])
            count = rng.choice([0, 0, 1, 2, 3])
            for st in states:
                st.set_status(g, c, status)
                st.put(g, c, C_SUSPECT, suspect)
                st.put(g, c, C_MAXC, maxc)
                st.put(g, c, C_C, count)


def snapshot(st: SharedState, shape, rows: int) -> list[int]:
    """What routing may write: the cursors and every row's open connections."""
    from gbalance.table.layout import row_offset, slot
    out = [st.q[gslot(g, G_RR_NEXT)] for g in range(len(shape))]
    for g, (_, n) in enumerate(shape):
        out += [st.q[slot(g, c, C_C) + row_offset(w)] for c in range(n) for w in range(rows)]
    return out


@pytest.mark.parametrize("seed", range(12))
def test_the_fast_first_candidate_agrees_with_the_plain_walk(tmp_path, seed):
    import random
    from gbalance.table.counters import Counters
    rng = random.Random(seed)
    shape = [(rng.choice([RR, RR, HASH]), rng.choice([0, 1, 2, 3, 5])) for _ in range(rng.randint(1, 4))]
    states = [SharedState.create(str(tmp_path / f"balance.{k}.any")) for k in range(2)]
    try:
        kw = {"hash_failover": rng.random() < 0.5, "last_resort": rng.random() < 0.5}
        workers = rng.choice([1, 1, 2])
        routers = []
        for st in states:
            random_table(rng, st, shape)
            st.set_workers(workers)
            counters = Counters(st, 1, workers) if workers > 1 else None
            routers.append(Router(st, counters=counters, worker=1, **kw))
        new, ref = routers
        for _ in range(150):
            if rng.random() < 0.4:
                shake(rng, states, shape)
            client = rng.choice(["10.0.0.1", "10.0.0.2", "192.168.4.4", "2001:db8::7", "::ffff:10.1.1.1"])
            want = rng.choice([1, 1, 1, 2, 3, 99])     # candidates asked for before the race ends
            got, expected = new.candidates(client), reference_candidates(ref, client)
            a = [x for _, x in zip(range(want), got)]
            b = [x for _, x in zip(range(want), expected)]
            assert a == b, (shape, kw, workers)
            assert snapshot(states[0], shape, workers) == snapshot(states[1], shape, workers)
    finally:
        for st in states:
            st.close()


# -- the hand-written .pxd files against the classes' __slots__ --------------------------------

def pxd_fields(pxd: str) -> "dict[str, set[str]]":
    """Each ``cdef class`` of a .pxd file and the fields it declares."""
    import re
    fields: "dict[str, set[str]]" = {}
    current = None
    for line in open(pxd):
        m = re.match(r"cdef class (\w+):", line)
        if m:
            current = fields.setdefault(m.group(1), set())
            continue
        if not line.startswith("    "):
            current = None
            continue
        text = line.strip()
        if current is not None and text.startswith("cdef ") and "(" not in text:
            first, *rest = text.split(",")      # "cdef public long long x", "y"...
            current.update([first.split()[-1], *(name.strip() for name in rest)])
    return fields


def source_slots(py: str) -> "dict[str, set[str]]":
    """Each class of a module's source and its ``__slots__``."""
    import ast
    out = {}
    for node in ast.parse(open(py).read()).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if (isinstance(item, ast.Assign) and len(item.targets) == 1
                        and getattr(item.targets[0], "id", None) == "__slots__"):
                    out[node.name] = set(ast.literal_eval(item.value))
    return out


@pytest.mark.parametrize("module", ["gbalance/proxy/routing", "gbalance/table/counters"])
def test_the_hand_written_pxd_declares_every_slot(module):
    """routing.pxd and counters.pxd are written by hand: each extension type
    they declare has exactly the fields of its class's __slots__ (a field
    missing there fails the compiled build only at run time)."""
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    declared = pxd_fields(str(root / f"{module}.pxd"))
    slots = source_slots(str(root / f"{module}.py"))
    assert declared, "no cdef class found"
    for name, fields in declared.items():
        assert fields == slots[name], name
