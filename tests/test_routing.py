"""routing.Router over a real SharedState file: the order channels are tried in."""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest

from gbalance.routing import Router, client_hash
from gbalance.state import (C_C, C_SUSPECT, ENABLED, G_RR_NEXT, HARD_DISABLED, HASH, RR,
                            SOFT_DISABLED, SharedState, gslot)


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
    for channel, n in counts.items():
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


def test_hash_failover_with_H_tries_the_following_channels(state):
    build(state, (HASH, 4), (RR, 1))
    client = "2001:db8::42"
    start = first(Router(state), client)[1]
    order = [(0, (start + i) % 4) for i in range(4)] + [(1, 0)]
    assert list(Router(state, hash_failover=True).candidates(client)) == order
    state.set_status(0, start, SOFT_DISABLED)
    state.put(0, (start + 1) % 4, C_SUSPECT, 1)
    assert list(Router(state, hash_failover=True).candidates(client)) == \
        [(0, (start + 2) % 4), (0, (start + 3) % 4), (1, 0)]
    # Clients whose own channel is usable keep it, with or without -H; the
    # others go to the next hash channel (-H) or the next group (no -H).
    for a in ipv4_clients(200):
        plain, with_h = first(Router(state), a), first(Router(state, hash_failover=True), a)
        if plain[0] == 0:
            assert with_h == plain
        else:
            assert plain == (1, 0) and with_h[0] == 0
