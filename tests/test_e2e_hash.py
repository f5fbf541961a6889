"""Hash groups end to end (issue 20): real masters, real backends, clients from 127.0.0.x.

Rendezvous hashing: a client sticks to its channel; disabling one channel
moves only its clients (with -H spread over the others); two masters whose
channels were given in different orders, and the workers of ``-w 2``, map
every client the same way.
"""

from __future__ import annotations

import socket
from collections import Counter

from conftest import free_port
from test_e2e_workers import children, each_worker, serving, wait_for, worker_index

from gbalance.table.files import state_path
from gbalance.table.layout import C_TOTALC, row_offset, slot
from gbalance.table.state import SharedState

SOURCES = [f"127.0.0.{i}" for i in range(10, 90)]


def tag_from(port: int, source: str) -> str:
    """The tag of the backend a connection from ``source`` reaches ('' if closed)."""
    with socket.socket() as s:
        s.settimeout(10)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(16)
            if not chunk:
                break
            data += chunk
        return data.decode().strip()


def mapping(port: int, rounds: int = 1) -> dict[str, str]:
    """source -> tag, asserting that every round gives the same tag (stickiness)."""
    out: dict[str, str] = {}
    for src in SOURCES:
        tags = {tag_from(port, src) for _ in range(rounds)}
        assert len(tags) == 1, (src, tags)
        out[src] = tags.pop()
    return out


def served_per_worker(balance, port: int, workers: int, channels: int) -> list[int]:
    """Connections each worker of the master on ``port`` counted (its own counter row)."""
    st = SharedState.attach(state_path(port, "127.0.0.1", str(balance.state_dir)))
    try:
        return [sum(st.q[slot(0, c, C_TOTALC) + row_offset(w)] for c in range(channels))
                for w in range(workers)]
    finally:
        st.close()


def test_hash_is_sticky_moves_little_and_agrees_across_masters_and_workers(balance, backends):
    chans = {t: backends(t) for t in "ABCD"}
    order1, order2 = "ABCD", "DBAC"
    p1, p2, p3 = free_port(), free_port(), free_port()
    balance.start("-H", "-b", "127.0.0.1", str(p1), *[chans[t].spec for t in order1], "%", port=p1)
    balance.start("-H", "-b", "127.0.0.1", str(p2), *[chans[t].spec for t in order2], "%", port=p2)
    third = balance.start("-H", "-w", "2", "-b", "127.0.0.1", str(p3), *[chans[t].spec for t in order2], "%",
                          port=p3)

    first = mapping(p1, rounds=3)
    counts = Counter(first.values())
    assert set(counts) == set("ABCD"), counts          # spread over every channel
    # Another master with the channels in another order, and two workers
    # (every source through each worker: the other one is stopped meanwhile).
    assert mapping(p2) == first
    workers = sorted(children(third.pid), key=worker_index)
    assert len(workers) == 2 and wait_for(lambda: serving(workers, p3))
    assert each_worker(workers, lambda: mapping(p3, rounds=2)) == [first, first]
    assert served_per_worker(balance, p3, 2, 4) == [2 * len(SOURCES)] * 2     # each worker served every source

    # Disable B on the first and the third master (its index differs).
    assert balance.run("-b", "127.0.0.1", "-c", f"disable {order1.index('B')}", str(p1)).returncode == 0
    assert balance.run("-b", "127.0.0.1", "-c", f"disable {order2.index('B')}", str(p3)).returncode == 0
    after = mapping(p1, rounds=2)
    moved = {src for src in SOURCES if after[src] != first[src]}
    assert moved == {src for src in SOURCES if first[src] == "B"}     # B's clients only
    assert "B" not in after.values()
    # -H: B's clients go to their own second choice, not all to one channel.
    assert len({after[src] for src in moved}) >= 2, {src: after[src] for src in moved}
    assert mapping(p3, rounds=4) == after                              # the same on the workers
    # Enabled again, everybody is back.
    assert balance.run("-b", "127.0.0.1", "-c", f"enable {order1.index('B')}", str(p1)).returncode == 0
    assert mapping(p1) == first


def test_without_H_a_disabled_hash_channel_sends_its_clients_to_the_next_group(balance, backends):
    chans = {t: backends(t) for t in "ABCZ"}
    port = free_port()
    balance.start("-b", "127.0.0.1", str(port), *[chans[t].spec for t in "ABC"], "%",
                  chans["Z"].spec, port=port)
    first = mapping(port)
    assert set(first.values()) == set("ABC")
    assert balance.run("-b", "127.0.0.1", "-c", "disable 2", str(port)).returncode == 0
    after = mapping(port)
    for src in SOURCES:
        assert after[src] == ("Z" if first[src] == "C" else first[src])


def test_a_restart_keeps_the_mapping_even_with_the_channels_reordered(balance, backends):
    chans = {t: backends(t) for t in "ABCDE"}
    port = free_port()
    old = balance.start("-b", "127.0.0.1", str(port), *[chans[t].spec for t in "ABCDE"], "%", port=port)
    first = mapping(port)
    assert len(set(first.values())) == 5
    # balance -r: the new master takes the listening socket over; the old one exits.
    balance.start("-r", "-b", "127.0.0.1", str(port), *[chans[t].spec for t in "EDCBA"], "%", port=port,
                  wait=False)
    old.p.wait(20)
    assert old.p.returncode == 0
    assert mapping(port) == first
