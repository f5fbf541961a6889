"""``balance -w N``: a supervising master and N worker processes on one port.

Real ``balance -f -w N`` processes, real sockets.  A worker is known to be
accepting when the kernel shows the listening socket in its epoll set
(``/proc/<pid>/fdinfo``), and to be up when it catches the steering signal
(``/proc/<pid>/status``), so no probe connection moves a counter; which
worker served what is read from the workers' own counter rows in the state
file.  The master lets only the first worker accept until clients wait
(gbalance.process.steering), so a test that wants a given worker to serve
stops the others meanwhile (:func:`only_worker`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import threading
import time

import pytest

from conftest import TcpServer, eventually, free_port, listening, pid_alive, read_line
from gbalance.table.files import state_path
from gbalance.table.layout import C_C, C_TOTALC, row_offset, slot
from gbalance.table.state import SharedState

TIMEOUT = 20.0


def wait_for(predicate, timeout: float = TIMEOUT) -> bool:
    return eventually(predicate, timeout)


# -- seeing workers from outside -------------------------------------------------------

def children(pid: int) -> list[int]:
    """Live worker processes of master ``pid``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != pid or fields[0] == "Z":
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if b"gbalance.process.worker" in f.read():
                    found.append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    return sorted(found)


def listen_inode(port: int) -> str | None:
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1].endswith(want) and fields[3] == "0A":
                    return fields[9]
    return None


def accepting(pid: int, port: int) -> bool:
    """True if process ``pid`` watches the listener of ``port`` with epoll."""
    inode = listen_inode(port)
    if inode is None:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
        listen_fd = None
        epolls = []
        for fd in fds:
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target == f"socket:[{inode}]":
                    listen_fd = fd
                elif target == "anon_inode:[eventpoll]":
                    epolls.append(fd)
        if listen_fd is None:
            return False
        for fd in epolls:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                if re.search(rf"^tfd:\s+{listen_fd}\s", f.read(), re.M):
                    return True
    except OSError:
        return False
    return False


def catches(pid: int, sig: int) -> bool:
    """True if process ``pid`` has a handler for signal ``sig``."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def serving(pids: list[int], port: int) -> bool:
    """Every worker is up (its steering handler installed) and the first accepts."""
    by_row = sorted(pids, key=worker_index)
    return (all(catches(p, signal.SIGWINCH) for p in by_row)
            and worker_index(by_row[0]) == 0 and accepting(by_row[0], port))


def proc_state(pid: int) -> str:
    """The state letter of process ``pid`` (R, S, T...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def only_worker(pids: list[int], pid: int):
    """Connections made inside go to worker ``pid``.

    At light load only the first worker accepts (the master's steering),
    and the kernel hands a connection to the first idle worker that watches
    the listener, so the others are stopped meanwhile: the clients that
    wait then make the master ask more workers to accept, and the one left
    running takes them.  (A worker is waited for until it has stopped:
    before that it may still be woken for a connection, and hold it until
    SIGCONT.)
    """
    others = [p for p in pids if p != pid]
    for p in others:
        os.kill(p, signal.SIGSTOP)
    try:
        assert wait_for(lambda: all(proc_state(p) == "T" for p in others), 10)
        yield
    finally:
        for p in others:
            os.kill(p, signal.SIGCONT)


def start_workers(balance, n: int, *args: str, port: int):
    """``balance -f -w n args...``; returns (proc, worker pids by row) once every
    worker is up and the first accepts."""
    proc = balance.start("-w", str(n), *args, port=port)
    assert wait_for(lambda: len(children(proc.pid)) == n), f"expected {n} workers"
    pids = sorted(children(proc.pid), key=worker_index)
    assert wait_for(lambda: serving(pids, port)), "the workers never served"
    return proc, pids


def each_worker(pids: list[int], fn) -> list:
    """``fn()`` once inside :func:`only_worker` of each worker, in row order."""
    out = []
    for pid in pids:
        with only_worker(pids, pid):
            out.append(fn())
    return out


class Table:
    """The state file of a running instance, read as the shell reads it."""

    def __init__(self, balance, port: int):
        self.st = SharedState.attach(state_path(port, None, str(balance.state_dir)))

    def row(self, worker: int, g: int, c: int, field: int) -> int:
        return self.st.q[slot(g, c, field) + row_offset(worker)]

    def served(self, worker: int, channels: int, g: int = 0) -> int:
        return sum(self.row(worker, g, c, C_TOTALC) for c in range(channels))

    def open(self, worker: int, channels: int, g: int = 0) -> int:
        return sum(self.row(worker, g, c, C_C) for c in range(channels))

    def close(self) -> None:
        self.st.close()


def show(balance, port: int) -> list[list[str]]:
    r = balance.run("-c", "show", str(port))
    assert r.returncode == 0, r.stderr
    return [line.split() for line in r.stdout.splitlines()[1:]]


def round_trip(port: int, payload: bytes = b"hello") -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        tag = read_line(s)
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(100)
            assert chunk, "echo cut short"
            got += chunk
        assert got == payload
    return tag


def hammer(port: int, total: int, threads: int = 8, fn=round_trip) -> list[str]:
    """``total`` round trips from ``threads`` concurrent clients; their tags."""
    tags: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def run(k: int) -> None:
        for _ in range(k):
            try:
                t = fn(port)
            except (OSError, AssertionError) as exc:
                errors.append(repr(exc))
                continue
            with lock:
                tags.append(t)

    per = total // threads
    ts = [threading.Thread(target=run, args=(per,)) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert errors == []
    return tags


# -- counters --------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3])
def test_counters_exact_and_spread_over_workers(balance, backends, n):
    a, b = backends("A"), backends("B")
    port = free_port()
    _, pids = start_workers(balance, n, str(port), a.spec, b.spec, port=port)
    total = 2400
    # A share in each worker (the others stopped meanwhile); then a burst
    # with every worker running, where the steering decides who accepts.
    tags = [t for got in each_worker(pids, lambda: hammer(port, total // n)) for t in got]
    tags += hammer(port, 800)
    total += 800
    assert len(tags) == total
    table = Table(balance, port)
    try:
        # Every link has ended in the proxy (c back to 0) before the sums are final.
        assert wait_for(lambda: sum(table.open(w, 2) for w in range(n)) == 0)
        rows = show(balance, port)
        per_worker = [table.served(w, 2) for w in range(n)]
    finally:
        table.close()
    totalc = [int(r[7]) for r in rows]
    assert sum(totalc) == total
    assert totalc == [tags.count("A"), tags.count("B")] == [a.connections, b.connections]
    assert [int(r[6]) for r in rows] == [0, 0]                          # c
    assert [int(r[9]) for r in rows] == [5 * t for t in totalc]          # sent: b"hello"
    assert [int(r[10]) for r in rows] == [7 * t for t in totalc]         # rcvd: tag, newline, echo
    # Every worker served its share, and round robin stays even: each worker
    # alternates strictly, so the channels differ by at most one per worker.
    assert sum(per_worker) == total and all(k >= 2400 // n for k in per_worker), per_worker
    assert abs(totalc[0] - totalc[1]) <= n
    # mrtg and metrics sum the same rows.
    r = balance.run("-c", "mrtg-conns 0 0", str(port))
    assert r.stdout.splitlines()[0] == str(totalc[0])
    r = balance.run("-c", "metrics", str(port))
    assert re.search(rf'^balance_channel_connections_total{{.*channel="1".*}} {totalc[1]}$', r.stdout, re.M)
    # reset zeroes the sums without touching a worker's row.
    assert balance.run("-c", "reset 0", str(port)).returncode == 0
    zeroed = show(balance, port)[0]
    assert (int(zeroed[7]), int(zeroed[9]), int(zeroed[10])) == (0, 0, 0)
    round_trip(port)
    round_trip(port)
    after = show(balance, port)
    assert int(after[0][7]) + int(after[1][7]) == 2 + totalc[1]
    print(f"\n-w {n}: {total} connections, per worker {per_worker}, per channel {totalc}")


# -- maxc ------------------------------------------------------------------------------

class OneAtATime(TcpServer):
    """A backend that records how many of its connections are open at once.

    It sends a line, holds the connection 20 ms, counts it closed and only
    then closes it, so the proxy cannot see the end before we counted it.
    """

    def __init__(self):
        self.open = 0
        self.most = 0
        self.served = 0
        self.lock = threading.Lock()
        self.hold_next = False          # keep the next connection open until ``release``
        self.release = threading.Event()
        super().__init__()

    def accepted(self, conn: socket.socket, peer: tuple) -> None:
        with self.lock:
            self.open += 1
            self.most = max(self.most, self.open)
            self.served += 1
            hold, self.hold_next = self.hold_next, False
        threading.Thread(target=self._handle, args=(conn, hold), daemon=True).start()

    def _handle(self, conn: socket.socket, hold: bool = False) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(b"one\n")
            if hold:
                self.release.wait(TIMEOUT)
            time.sleep(0.02)
        with self.lock:
            self.open -= 1
        conn.close()


def test_maxc_one_is_never_exceeded_across_workers(balance):
    backend = OneAtATime()
    port = free_port()
    try:
        _, pids = start_workers(balance, 3, str(port), f"127.0.0.1:{backend.port}:1", port=port)

        tags: list[str] = []
        errors: list[str] = []

        def clients(goal: int) -> None:
            deadline = time.monotonic() + TIMEOUT

            def client() -> None:
                # Concurrent clients until the backend has served ``goal`` (or the deadline).
                while backend.served < goal and time.monotonic() < deadline:
                    try:
                        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                            tags.append(read_line(s) or "refused")
                    except OSError as exc:
                        errors.append(repr(exc))

            ts = [threading.Thread(target=client) for _ in range(12)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(60)

        # Each worker alone, then all of them at once.
        for i, pid in enumerate(pids):
            with only_worker(pids, pid):
                clients(10 * (i + 1))
        clients(40)
        # A link held through one worker fills the channel for the others.
        # (Once the proxy too counts nothing open: it sees the backend's
        # close a moment after the backend counted it.)
        assert wait_for(lambda: backend.open == 0 and int(show(balance, port)[0][6]) == 0)
        backend.hold_next = True
        with only_worker(pids, pids[1]):
            held = socket.create_connection(("127.0.0.1", port), timeout=10)
            assert read_line(held) == "one"
        with held:
            for pid in (pids[0], pids[2]):
                with only_worker(pids, pid):
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                        assert read_line(s) == "", "maxc 1 let a second connection through another worker"
            backend.release.set()
    finally:
        backend.release.set()
        backend.close()
    served = tags.count("one")
    assert errors == []
    assert backend.most == 1, f"{backend.most} connections at once through maxc 1"
    assert served + 1 == backend.served and served >= 40
    assert tags.count("refused") == len(tags) - served > 0     # the others found no channel
    print(f"\nmaxc 1 over 3 workers: {served} served one at a time, {len(tags) - served} refused")
    assert wait_for(lambda: int(show(balance, port)[0][6]) == 0)


# -- hash ------------------------------------------------------------------------------

def test_hash_groups_stay_sticky_across_workers(balance, backends):
    tags = [backends(t) for t in "ABC"]
    port = free_port()
    _, pids = start_workers(balance, 3, str(port), *[t.spec for t in tags], "%", port=port)
    sources = [f"127.0.0.{i}" for i in range(2, 14)]
    seen: dict[str, set[str]] = {s: set() for s in sources}
    lock = threading.Lock()

    def client(src: str) -> None:
        for _ in range(10):
            s = socket.socket()
            s.settimeout(10)
            s.bind((src, 0))
            s.connect(("127.0.0.1", port))
            with s:
                tag = read_line(s)
            with lock:
                seen[src].add(tag)

    def clients() -> None:
        ts = [threading.Thread(target=client, args=(src,)) for src in sources]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)

    each_worker(pids, clients)          # every source through every worker
    table = Table(balance, port)
    try:
        per_worker = [table.served(w, 3) for w in range(3)]
    finally:
        table.close()
    assert all(len(v) == 1 for v in seen.values()), seen
    assert len({next(iter(v)) for v in seen.values()}) >= 2          # the hash does spread
    assert per_worker == [10 * len(sources)] * 3, per_worker


# -- shell changes -----------------------------------------------------------------------

def served_since(table: Table, before: list[int], n: int, channels: int) -> list[int]:
    return [table.served(w, channels) - before[w] for w in range(n)]


def test_a_shell_change_reaches_every_worker_at_the_next_connection(balance, backends):
    a, b, c = backends("A"), backends("B"), backends("C")
    port = free_port()
    n = 3
    _, pids = start_workers(balance, n, str(port), a.spec, b.spec, port=port)
    table = Table(balance, port)
    try:
        def burst() -> tuple[list[str], list[int]]:
            before = [table.served(w, 3) for w in range(n)]
            got = [t for part in each_worker(pids, lambda: hammer(port, 40, threads=4)) for t in part]
            return got, served_since(table, before, n, 3)

        assert balance.run("-c", "disable 1", str(port)).returncode == 0
        got, per_worker = burst()
        assert set(got) == {"A"} and all(k > 0 for k in per_worker), (set(got), per_worker)
        # assign: re-point channel 0 to C (disable, assign, enable).
        for cmd in ("disable 0", f"assign 0 127.0.0.1 {c.port}", "enable 0", "enable 1"):
            r = balance.run("-c", cmd, str(port))
            assert r.returncode == 0 and r.stderr == "", (cmd, r.stderr)
        got, per_worker = burst()
        assert set(got) == {"B", "C"} and all(k > 0 for k in per_worker), (set(got), per_worker)
        # create: a new channel, enabled, takes its share in every worker.
        d = backends("D")
        for cmd in (f"create 127.0.0.1 {d.port}", "enable 2"):
            assert balance.run("-c", cmd, str(port)).returncode == 0
        got, per_worker = burst()
        assert set(got) == {"B", "C", "D"}
        # maxc 0 on a channel: 0 means no limit; maxc 1 with held links caps it.
        assert balance.run("-c", "disable 0", str(port)).returncode == 0
        assert balance.run("-c", "disable 2", str(port)).returncode == 0
        assert balance.run("-c", "maxc 1 1", str(port)).returncode == 0
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert read_line(held) == "B"
        for pid in pids:                # every worker now finds channel 1 full
            with only_worker(pids, pid), socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                assert read_line(s) == ""
        held.close()
    finally:
        table.close()


# -- monitoring ---------------------------------------------------------------------------

class Counting(TcpServer):
    """A listener that only counts the connections it accepts (monitor checks)."""

    def __init__(self):
        self.count = 0
        super().__init__()

    def accepted(self, conn: socket.socket, peer: tuple) -> None:
        self.count += 1
        conn.close()


def test_monitoring_runs_once_per_instance(balance):
    backend = Counting()
    port = free_port()
    try:
        start_workers(balance, 3, "-m", "connect:interval=0.2", str(port),
                      f"127.0.0.1:{backend.port}", port=port)
        t0, c0 = time.monotonic(), backend.count
        time.sleep(2.0)     # the measured span: checks happen on their own timer
        span, checks = time.monotonic() - t0, backend.count - c0
    finally:
        backend.close()
    expected = span / 0.2
    assert expected * 0.5 <= checks <= expected * 1.3 + 1, (checks, expected)


# -- a worker dies -----------------------------------------------------------------------

def test_sigkill_of_one_worker_loses_only_its_connections(balance, backends):
    a = backends("A")
    port = free_port()
    proc, pids = start_workers(balance, 2, str(port), a.spec, port=port)
    table = Table(balance, port)
    try:
        links = []
        for pid in pids:
            with only_worker(pids, pid):
                for _ in range(3):
                    s = socket.create_connection(("127.0.0.1", port), timeout=10)
                    assert read_line(s) == "A"
                    links.append(s)
        assert wait_for(lambda: table.open(0, 1) + table.open(1, 1) == len(links))
        assert table.open(0, 1) == table.open(1, 1) == 3
        victim = pids[0]
        victim_row = worker_index(victim)
        lost_expected = table.open(victim_row, 1)
        os.kill(victim, signal.SIGKILL)
        alive = lost = 0
        for s in links:
            try:
                s.sendall(b"ping\n")
                ok = read_line(s) == "ping"
            except OSError:
                ok = False
            if ok:
                alive += 1
            else:
                lost += 1
            s.close()
        assert lost == lost_expected and alive == len(links) - lost_expected
        # A replacement starts, accepts, and its row's open count was zeroed.
        assert wait_for(lambda: len(children(proc.pid)) == 2 and victim not in children(proc.pid))
        new = [p for p in children(proc.pid) if p not in pids]
        assert len(new) == 1
        assert wait_for(lambda: accepting(new[0], port))
        assert wait_for(lambda: table.open(0, 1) + table.open(1, 1) == 0)
        assert hammer(port, 200, threads=4).count("A") == 200
    finally:
        table.close()
    out, err = proc.stop()
    assert re.search(rf"worker {victim_row} \(pid {victim}\) died \(signal 9 \(SIGKILL\)\); starting a replacement",
                     err), err


def worker_index(pid: int) -> int:
    """The counter row of worker ``pid`` (its command line ends with it)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return int(f.read().rstrip(b"\0").split(b"\0")[-1])


# -- stopping ----------------------------------------------------------------------------

SIZE = 4 * 1024 * 1024


class Slow(TcpServer):
    """Sends SIZE bytes to each client at about 8 MB/s, then closes."""

    def __init__(self):
        self.data = hashlib.shake_256(b"workers drain").digest(SIZE)
        self.digest = hashlib.sha256(self.data).hexdigest()
        super().__init__()

    def accepted(self, conn: socket.socket, peer: tuple) -> None:
        threading.Thread(target=self._send, args=(conn,), daemon=True).start()

    def _send(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            for i in range(0, SIZE, 65536):
                conn.sendall(self.data[i:i + 65536])
                time.sleep(0.008)


def test_sigterm_drains_every_worker(balance):
    slow = Slow()
    port = free_port()
    try:
        proc, pids = start_workers(balance, 2, "-g", "60", str(port), f"127.0.0.1:{slow.port}", port=port)
        table = Table(balance, port)
        clients = []
        try:
            # One download in each worker.
            for pid in pids:
                with only_worker(pids, pid):
                    clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
                    assert wait_for(lambda: table.open(0, 1) + table.open(1, 1) == len(clients), 10)
            assert table.open(0, 1) == 1 and table.open(1, 1) == 1, "a download in each worker"
        finally:
            table.close()
        os.kill(proc.pid, signal.SIGTERM)
        assert wait_for(lambda: not listening(port)), "still listening after SIGTERM"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
        for s in clients:
            digest, got = hashlib.sha256(), 0
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                digest.update(chunk)
                got += len(chunk)
            s.close()
            assert got == SIZE and digest.hexdigest() == slow.digest
        out, err = proc.stop(signal.SIGCONT, timeout=20)      # it exits by itself
        assert proc.p.returncode == 0, err
        assert f"waiting up to 60 seconds for {len(clients)} open connections" in err
        assert not any(pid_alive(p) for p in pids)
    finally:
        slow.close()


def test_handover_with_workers_loses_no_connection(balance, backends):
    a, b = backends("A"), backends("B")
    port = free_port()
    old, old_pids = start_workers(balance, 2, str(port), a.spec, b.spec, port=port)
    failures: list[str] = []
    done = threading.Event()
    count = [0]

    def load() -> None:
        while not done.is_set():
            try:
                if round_trip(port) not in ("A", "B"):
                    failures.append("bad tag")
            except (OSError, AssertionError) as exc:
                failures.append(repr(exc))
            count[0] += 1

    ts = [threading.Thread(target=load) for _ in range(3)]
    for t in ts:
        t.start()
    try:
        assert wait_for(lambda: count[0] >= 100)
        new = balance.start("-r", "-w", "3", str(port), a.spec, b.spec, port=port, wait=False)
        assert wait_for(lambda: len(children(new.pid)) == 3)
        assert wait_for(lambda: len(children(new.pid)) == 3 and serving(children(new.pid), port))
        old.p.wait(20)
        assert old.p.returncode == 0
        assert not any(pid_alive(p) for p in old_pids)
        mark = count[0]
        assert wait_for(lambda: count[0] >= mark + 200)
    finally:
        done.set()
        for t in ts:
            t.join(30)
    assert failures == []
    table = Table(balance, port)
    try:
        assert table.st.pid == new.pid and table.st.workers == 3
    finally:
        table.close()


# -- -d and -p ---------------------------------------------------------------------------

def test_debug_trace_and_packet_dump_come_from_every_worker(balance, backends):
    a = backends("A")
    port = free_port()
    proc, pids = start_workers(balance, 2, "-d", "-p", str(port), a.spec, port=port)
    table = Table(balance, port)
    try:
        each_worker(pids, lambda: hammer(port, 20, threads=4))
        total = 40
        served = [table.served(w, 1) for w in range(2)]
    finally:
        table.close()
    out, err = proc.stop()
    assert served == [20, 20], served
    assert err.count("connect to channel 0 successful") == total, err[-500:]
    # Each worker dumps its own connections: every chunk is there, once.
    assert out.count("-> 5\nhello\n") == total, out[-500:]
    assert out.count("-< 2\nA\\0A\n") == total and out.count("-< 5\nhello\n") == total, out[-500:]


# -- the listener registered with EPOLLEXCLUSIVE -----------------------------------------

def listener_entries(pid: int, port: int) -> list[int]:
    """The epoll events with which process ``pid`` watches the listener of ``port``."""
    from gbalance.system.exclusive import epoll_fds, registered
    inode = listen_inode(port)
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):      # a client's socket closed meanwhile
            if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                fds.append(int(fd))
    return [entry[0] for ep in epoll_fds(pid) for fd in fds
            if (entry := registered(ep, pid).get(fd)) is not None]


def test_each_worker_watches_the_listener_exclusively_and_serves(balance, backends):
    from gbalance.system.exclusive import EPOLLEXCLUSIVE
    a = backends("A")
    port = free_port()
    proc, pids = start_workers(balance, 2, "-d", str(port), a.spec, port=port)
    exclusive = [EPOLLEXCLUSIVE]
    # At rest the first worker watches the listener (exclusively) and the
    # second stands by with the listener out of its epoll set: no client wakes it.
    assert wait_for(lambda: [e & EPOLLEXCLUSIVE for e in listener_entries(pids[0], port)] == exclusive), \
        listener_entries(pids[0], port)
    assert listener_entries(pids[1], port) == []
    table = Table(balance, port)
    try:
        payload = os.urandom(300_000)
        for _ in range(20):                                     # one after another: the first worker's
            assert round_trip(port, payload) == "A"
        before = [table.served(w, 1) for w in range(2)]
        # (On a machine this loaded the first worker can be kept from the CPU
        # long enough for the master to let the second one in: "most".)
        assert sum(before) == 20 and before[0] > before[1], before
        # The first worker stops: the client that waits brings the second in.
        t0 = time.monotonic()
        with only_worker(pids, pids[1]):
            assert round_trip(port, payload) == "A"
            took = time.monotonic() - t0
            assert [e & EPOLLEXCLUSIVE for e in listener_entries(pids[1], port)] == exclusive
        assert [table.served(w, 1) for w in range(2)] == [before[0], before[1] + 1]
        # Quiet again: the second worker goes back to standby and leaves the epoll set.
        assert wait_for(lambda: listener_entries(pids[1], port) == [], 15), listener_entries(pids[1], port)
        assert [e & EPOLLEXCLUSIVE for e in listener_entries(pids[0], port)] == exclusive
    finally:
        table.close()
    out, err = proc.stop()
    assert "2 of 2 workers accept: 1 clients wait" in err, err[-800:]
    assert "1 of 2 workers accept: the workers used" in err, err[-800:]
    print(f"\nthe stopped first worker's client was served by the second after {1000 * took:.0f} ms")


def test_a_worker_that_dies_passes_its_clients_on_at_once(balance, backends):
    """The first worker is killed: the master asks the second to accept as
    soon as it sees the death, without waiting for a client to wait."""
    a = backends("A")
    port = free_port()
    proc, pids = start_workers(balance, 2, "-d", str(port), a.spec, port=port)
    assert listener_entries(pids[1], port) == []
    os.kill(pids[0], signal.SIGKILL)
    assert wait_for(lambda: listener_entries(pids[1], port) != [], 10)
    assert round_trip(port) == "A"
    out, err = proc.stop()
    assert "2 of 2 workers accept: worker 0 died" in err, err[-800:]


# -- a client's one wake-up never lost ----------------------------------------------------

def greeted(port: int, timeout: float = 5.0) -> "tuple[socket.socket, float]":
    """A connection through the proxy, once its backend's tag arrived; (socket, seconds taken)."""
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        assert read_line(s) == "A"
    except BaseException:
        s.close()
        raise
    return s, time.monotonic() - t0


def test_a_worker_at_its_connection_limit_leaves_the_wake_ups_to_the_others(balance, backends):
    """-L over -w 2: the first worker reaches its share (10) and stops
    accepting.  It must also leave the kernel's list of processes to wake
    for a new client: watching the listener exclusively while idle, it
    would take each client's one wake-up, accept nothing, and the client
    would wait for the next one to arrive."""
    a = backends("A")
    port = free_port()
    proc, pids = start_workers(balance, 2, "-d", "-L", "20", str(port), a.spec, port=port)
    held = []
    try:
        with only_worker(pids, pids[0]):
            held += [greeted(port)[0] for _ in range(10)]
        s, took = greeted(port)                  # the first worker is full: the second takes it
        held.append(s)
        assert wait_for(lambda: listener_entries(pids[0], port) == [], 10), listener_entries(pids[0], port)
        times = []
        for _ in range(5):
            s, took = greeted(port)
            held.append(s)
            times.append(took)
        assert max(times) < 2.0, times
    finally:
        for s in held:
            s.close()
    out, err = proc.stop()
    assert "connection limit of 10 reached" in err, err[-800:]


def steal_wake_up(master: int, port: int):
    """An epoll set in this process that watches ``port``'s listener
    exclusively, as a worker's does, and one thread sleeping in it: it takes
    the wake-up of the next client that no process ahead of it in the
    kernel's list is waiting for, and never accepts.  (The listener comes
    from the master's descriptors, with pidfd_getfd.)  Returns (epoll, fd,
    thread, woken) where ``woken`` is filled with the time of the wake-up."""
    import ctypes
    import select
    inode = listen_inode(port)
    target = -1
    for name in os.listdir(f"/proc/{master}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{master}/fd/{name}") == f"socket:[{inode}]":
                target = int(name)
    assert target >= 0, f"the master holds no listener for port {port} (inode {inode})"
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(master)
    try:
        fd = libc.syscall(438, pidfd, target, 0)        # pidfd_getfd (same number on every arch)
        if fd < 0:
            pytest.skip(f"pidfd_getfd refused: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(pidfd)
    ep = select.epoll()
    ep.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
    woken: list[float] = []

    def sleep() -> None:
        if ep.poll(30, 1):
            woken.append(time.monotonic())
    t = threading.Thread(target=sleep, daemon=True)
    t.start()
    return ep, fd, t, woken


def test_a_lost_wake_up_is_made_good_by_the_master(balance, backends):
    """Both workers accept (-w 2, the first holds 200 more connections than
    the second), and a client's one wake-up goes to a sleeper that never
    accepts: the client waits in the accept queue and nobody is woken for it.
    No worker can be added, so the master, seeing it wait while nothing was
    accepted, has the accepting workers look at the listener: served within
    a few of the master's samples, not at the next client's arrival."""
    a = backends("A")
    port = free_port()
    proc, pids = start_workers(balance, 2, "-d", str(port), a.spec, port=port)
    held = []
    thief = None
    try:
        with only_worker(pids, pids[0]):
            held += [greeted(port)[0] for _ in range(200)]
        # The spread brings the second worker in, and keeps it.
        assert wait_for(lambda: listener_entries(pids[1], port) != [], 10)
        thief = steal_wake_up(proc.pid, port)
        # Both workers join the kernel's list after the sleeper: the second
        # is replaced (it holds nothing), the first is stopped (a stopped
        # process is not waiting: the kernel passes it over).
        assert wait_for(lambda: "epoll" in thief_wchan(thief), 5)
        os.kill(pids[1], signal.SIGKILL)

        def replacement() -> "int | None":
            now = [p for p in children(proc.pid) if p not in pids]
            return now[0] if now else None
        assert wait_for(lambda: replacement() is not None, 10), proc.stop()[1][-800:]
        second = replacement()
        assert wait_for(lambda: listener_entries(second, port) != [] and catches(second, signal.SIGWINCH), 15)
        time.sleep(0.5)                         # the replacement settles in its loop
        os.kill(pids[0], signal.SIGSTOP)
        try:
            assert wait_for(lambda: proc_state(pids[0]) == "T", 10)
            s, took = greeted(port, timeout=10)
            held.append(s)
        finally:
            os.kill(pids[0], signal.SIGCONT)
        ep, fd, t, woken = thief
        t.join(5)
        assert woken, "the sleeper was not woken: no wake-up was lost"
        assert took < 2.0, took
    finally:
        for s in held:
            s.close()
        if thief is not None:
            thief[0].close()
            os.close(thief[1])
    out, err = proc.stop()
    assert "the 2 accepting workers look at the listener again" in err, err[-800:]
    print(f"\na client whose wake-up was lost was served after {1000 * took:.0f} ms")


def thief_wchan(thief) -> str:
    """Where the sleeper thread of :func:`steal_wake_up` sleeps."""
    tid = thief[2].native_id
    try:
        with open(f"/proc/self/task/{tid}/wchan") as f:
            return f.read().strip()
    except OSError:
        return ""
