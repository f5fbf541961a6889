"""Hash groups (issue 20): how many clients move when the channels change, and what a pick costs.

Runs the real router (gbalance.proxy.routing.Router) over a real state file in a
temporary directory; no sockets.  For a hash group of n = 4, 8, 16 channels
and a fixed set of clients (IPv4 and IPv6) it reports

* disable: the share of clients that move when one channel is disabled
  (ideal 1/n), and with -H how evenly the moved ones land on the n-1 others
  (fewest and most per channel against the even share);
* add: the share that moves when one channel is added (ideal 1/(n+1)) and
  whether any client moves between two old channels (ideal: none);

for the rendezvous hashing of this release and, for comparison, for the
``crc32(client) % n`` of earlier ones (computed here, not by the router).
Then the cost of one pick (``next(router.candidates(client))``) in
microseconds: with the winners' table warm (the usual case), cold (every
pick computes its key's winner), a round-robin pick over the same channels
for reference, and the bare ``crc32 % n`` of earlier releases.

    .venv/bin/python bench/hashmove.py [--clients N]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import tempfile
import timeit
import zlib
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gbalance.proxy.routing import Router, client_hash  # noqa: E402
from gbalance.table.layout import C_PORT, ENABLED, HARD_DISABLED, HASH, RR
from gbalance.table.state import SharedState


def clients(count: int) -> list[str]:
    """Three quarters sequential IPv4 from 10.0.0.1, a quarter IPv6 in 2001:db8::/32."""
    v4 = int(ipaddress.IPv4Address("10.0.0.1"))
    out = [str(ipaddress.IPv4Address(v4 + i)) for i in range(count * 3 // 4)]
    out += [f"2001:db8:{i % 97:x}::{i:x}" for i in range(count - len(out))]
    return out


def table(directory: str, name: str, n: int) -> SharedState:
    st = SharedState.create(os.path.join(directory, f"balance.{name}.any"))
    g = st.add_group(HASH)
    for c in range(n):
        st.add_channel(g, f"192.0.2.{10 + c}", 8080)
    return st


def ident(st: SharedState, c: int) -> tuple[str, int]:
    return st.address(0, c), st.get(0, c, C_PORT)


def mapping(st: SharedState, who: list[str], failover: bool = False) -> dict[str, object]:
    r = Router(st, hash_failover=failover)
    out: dict[str, object] = {}
    for a in who:
        pick = next(r.candidates(a), None)
        out[a] = ident(st, pick[1]) if pick is not None else None
    return out


def old_mapping(n: int, who: list[str], down: int | None = None) -> dict[str, object]:
    """Earlier releases: crc32 % n; with -H a client of a down channel takes the next one."""
    out: dict[str, object] = {}
    for a in who:
        c = client_hash(a) % n
        if c == down:
            c = (c + 1) % n
        out[a] = c
    return out


def spread(landed: Counter, others: int) -> str:
    total = sum(landed.values())
    even = total / others
    low = min(landed.values()) if len(landed) == others else 0
    return f"{low}..{max(landed.values())} (even {even:.0f})"


def movement(directory: str, n: int, who: list[str]) -> list[str]:
    lines = []
    st = table(directory, f"d{n}", n)
    try:
        before = mapping(st, who)
        victim = n // 2
        st.set_status(0, victim, HARD_DISABLED)
        after = mapping(st, who, failover=True)
        gone = [a for a in who if before[a] != after[a]]
        landed = Counter(after[a] for a in gone)
        lines.append(f"  n={n:2} disable one: moved {len(gone) / len(who):.4f} (ideal {1 / n:.4f}),"
                     f" -H spread over {n - 1}: {spread(landed, n - 1)}")
        st.set_status(0, victim, ENABLED)
        assert mapping(st, who) == before
    finally:
        st.close()
    old_before = old_mapping(n, who)
    old_after = old_mapping(n, who, down=n // 2)
    gone = [a for a in who if old_before[a] != old_after[a]]
    landed = Counter(old_after[a] for a in gone)
    lines.append(f"        old crc32%n:  moved {len(gone) / len(who):.4f},"
                 f" -H spread over {n - 1}: {spread(landed, n - 1)}")

    st = table(directory, f"a{n}", n)
    try:
        before = mapping(st, who)
        st.add_channel(0, "192.0.2.200", 8080)
        after = mapping(st, who)
        gone = [a for a in who if before[a] != after[a]]
        between_old = sum(1 for a in gone if after[a] != ("192.0.2.200", 8080))
        taken = Counter(before[a] for a in gone)
        lines.append(f"  n={n:2} add one:     moved {len(gone) / len(who):.4f} (ideal {1 / (n + 1):.4f}),"
                     f" taken from each old channel {spread(taken, n)}, moved between old channels"
                     f" {between_old}")
    finally:
        st.close()
    old_before, old_after = old_mapping(n, who), old_mapping(n + 1, who)
    gone = sum(1 for a in who if old_before[a] != old_after[a])
    lines.append(f"        old crc32%n:  moved {gone / len(who):.4f}")
    return lines


def cost(directory: str, n: int, who: list[str]) -> str:
    st = table(directory, f"t{n}", n)
    try:
        r = Router(st)
        sample = who[:1000]
        for a in sample:           # warm the winners' table for these keys
            next(r.candidates(a))

        def warm() -> None:
            for a in sample:
                next(r.candidates(a))

        def cold() -> None:
            for a in sample:
                r.rings[0].winners[client_hash(a) >> 16] = 0xFF
                next(r.candidates(a))

        def forget() -> None:
            for a in sample:
                r.rings[0].winners[client_hash(a) >> 16] = 0xFF

        def old() -> None:
            for a in sample:
                zlib.crc32(a.encode("ascii", "replace")) % n

        def best(fn) -> float:
            return min(timeit.repeat(fn, number=20, repeat=15)) / (20 * len(sample)) * 1e6

        t_warm, t_cold, t_forget, t_old = best(warm), best(cold), best(forget), best(old)
        st.set_group_type(0, RR)      # the same pick in a round-robin group, for reference
        t_rr = best(warm)
        return (f"  n={n:2}: hash pick {t_warm:.2f} us warm, {t_cold - t_forget:.2f} us cold;"
                f" round-robin pick {t_rr:.2f} us; crc32 % n alone {t_old:.2f} us")
    finally:
        st.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=40000)
    args = ap.parse_args()
    who = clients(args.clients)
    with tempfile.TemporaryDirectory() as directory:
        print(f"Clients moved ({len(who)} clients: {len(who) * 3 // 4} IPv4, the rest IPv6):")
        for n in (4, 8, 16):
            for line in movement(directory, n, who):
                print(line)
        print("Cost of one pick (next(Router.candidates(client)), best of 15 runs):")
        for n in (4, 8, 16, 64):
            print(cost(directory, n, who))


if __name__ == "__main__":
    main()
