"""Memory per held idle proxied connection, through the real CLI.

Thousands of idle connections are held through ``balance -f`` (each one
counted once the backend's greeting came back through it, so both legs and
both watchers exist) and the growth of the proxy's PSS from the first
thousand to the last is divided by their number.  Issue 21's goal is at most
1 KB a connection; before the links were trimmed this figure was 1.02-1.12
KB, after it 0.82-0.85 (pure) and 0.91 (compiled): a few dozen bytes more
per link (a bound method, a slot that tips an object into the next size
class, a per-link set entry) show.
"""

import contextlib
import os
import resource
import socket
import time
from pathlib import Path

import pytest

from conftest import TcpServer, free_port

#: Connections held: enough that the per-link cost dwarfs the noise of a
#: page or two, few enough for a test of a few seconds.
HELD = 4000
FIRST = 1000
#: KB of PSS each held connection past the first thousand may add (the
#: goal; what the links' dict and libev's per-descriptor array grow by is
#: in it).
BOUND_KB = 1.0
GREETING = b"hi\n"


class Greeter(TcpServer):
    """Sends a greeting to each client and holds the connection open."""

    def __init__(self) -> None:
        self.held: list[socket.socket] = []
        super().__init__()
        self.sock.listen(1024)

    def accepted(self, conn: socket.socket, peer: tuple) -> None:
        conn.sendall(GREETING)
        self.held.append(conn)

    def close(self) -> None:
        super().close()
        for conn in self.held:
            conn.close()


def pss_kb(pid: int) -> int:
    """PSS of ``pid`` and its descendants, kB."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
    return total


def greeted(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    got = b""
    while len(got) < len(GREETING):
        chunk = s.recv(16)
        assert chunk, "the proxied connection ended before the greeting"
        got += chunk
    assert got == GREETING
    return s


@pytest.fixture
def fd_room():
    """Room for the held sockets (both ends live in this process), raised in
    the test only and put back afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * HELD + 500
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < {need}: cannot hold {HELD} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("workers", [[], ["-w", "1"]], ids=["one-process", "w1"])
def test_held_idle_connection_costs_under_a_kilobyte(balance, fd_room, workers):
    greeter = Greeter()
    held: list[socket.socket] = []
    try:
        port = free_port()
        proc = balance.start(*workers, str(port), greeter.spec, port=port)
        for _ in range(50):          # lazily made state goes into the baseline
            greeted(port).close()
        # The first thousand fill what the start-up left free (more of it
        # in the pure build than in the compiled one): the bound is on
        # what each one past them adds.
        for _ in range(FIRST):
            held.append(greeted(port))
        time.sleep(0.3)
        before = pss_kb(proc.pid)
        for _ in range(HELD - FIRST):
            held.append(greeted(port))
        after = pss_kb(proc.pid)
        per_conn = (after - before) / (HELD - FIRST)
        print(f"{per_conn:.3f} KB per held idle connection ({FIRST} -> {HELD} held, {before} -> {after} kB)")
        assert per_conn <= BOUND_KB, f"{per_conn:.3f} KB of PSS per held idle connection (bound {BOUND_KB})"
    finally:
        for s in held:
            s.close()
        greeter.close()
