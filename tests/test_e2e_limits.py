"""End-to-end limits: -L (open connections), -l (per client address), the
cap on early client bytes, and how -T ends a link (the real CLI, real sockets).

Clients come from their own loopback addresses (127.0.0.2, 127.0.0.3) so
the per-source limit can tell them apart.
"""

from __future__ import annotations

import errno
import resource
import socket
import subprocess
import threading
import time

import pytest
from conftest import (BALANCE, ROOT, TcpServer, closing_factory, eventually, free_port, read_line,
                      wait_listening)

from gbalance.table.files import state_path
from gbalance.table.state import SharedState


def client_from(source: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A connection to the proxy on 127.0.0.1:``port`` from ``source``."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def client_or_reset(source: str, port: int) -> socket.socket | None:
    """As :func:`client_from`, or None when the proxy reset the connection
    before ``connect`` returned (on loopback its reset may come that soon)."""
    try:
        return client_from(source, port)
    except ConnectionResetError:
        return None


def tag_or_none(s: socket.socket | None, wait: float) -> str | None:
    """The backend's tag line, or None if none comes within ``wait`` seconds
    (the connection waits in the listen backlog); "" if it was closed/reset."""
    if s is None:
        return ""
    s.settimeout(wait)
    try:
        return read_line(s)
    except TimeoutError:
        return None
    except ConnectionResetError:
        return ""


def open_count(balance, port: int) -> int:
    """Open connections the table counts (sum over channels and rows)."""
    st = SharedState.attach(state_path(port, None, str(balance.state_dir)))
    try:
        return sum(ch.c for ch in st.channels())
    finally:
        st.close()


class Holder(TcpServer):
    """A backend that accepts and keeps every connection, never reading
    (``mode="hold"``), or sends ``push`` bytes and then never reads either."""

    def __init__(self, push: int = 0):
        self.conns: list[socket.socket] = []
        self.push = push
        self.push_errors: list[str] = []    # how each push ended, when it failed
        super().__init__()

    def accepted(self, conn, peer):
        self.conns.append(conn)
        if self.push:
            threading.Thread(target=self._push, args=(conn,), daemon=True).start()

    def _push(self, conn):
        try:
            conn.sendall(b"d" * self.push)
        except OSError as exc:
            self.push_errors.append(type(exc).__name__)

    def close(self):
        for c in self.conns:
            c.close()
        super().close()


@pytest.fixture
def holders():
    yield from closing_factory(Holder)


def stderr_file(tmp_path):
    return open(tmp_path / "err", "wb")


def log_text(tmp_path) -> str:
    return (tmp_path / "err").read_text(errors="replace")


# -- -L: the connection limit ------------------------------------------------------


def test_connection_limit_holds_new_clients_in_the_backlog(balance, backends, tmp_path):
    """-L 5: five clients are linked, three more wait in the listen backlog
    (connected to the kernel, no backend yet) while -c show still answers;
    as linked clients leave, waiting ones are linked in order.  One log line
    when the limit is reached, one when the load is below it again."""
    be = backends("X")
    port = free_port()
    with stderr_file(tmp_path) as err:
        balance.start("-L", "5", str(port), be.spec, port=port, stderr=err)
    held = [client_from("127.0.0.2", port) for _ in range(5)]
    assert [tag_or_none(s, 10) for s in held] == ["X"] * 5
    waiting = [client_from("127.0.0.2", port) for _ in range(3)]
    assert [tag_or_none(s, 0.5) for s in waiting] == [None] * 3
    assert eventually(lambda: be.connections == 5)
    time.sleep(0.3)
    assert be.connections == 5
    r = balance.run("-c", "show", str(port))
    assert r.returncode == 0 and "127.0.0.1" in r.stdout, r.stderr
    assert open_count(balance, port) == 5
    for s in held[:2]:
        s.close()
    assert tag_or_none(waiting[0], 10) == "X"
    assert tag_or_none(waiting[1], 10) == "X"
    assert tag_or_none(waiting[2], 0.5) is None
    held[2].close()
    assert tag_or_none(waiting[2], 10) == "X"
    text = log_text(tmp_path)
    assert text.count("connection limit of 5 reached (-L)") == 1, text
    assert "below the limit" not in text, text
    for s in held[3:] + waiting:
        s.close()
    assert eventually(lambda: "below the limit of 5 (-L) again" in log_text(tmp_path))
    text = log_text(tmp_path)
    assert text.count("below the limit of 5") == 1, text
    assert "pausing new connections" not in text and "Traceback" not in text, text
    assert eventually(lambda: open_count(balance, port) == 0)


def test_default_limit_keeps_the_master_below_its_fd_limit(balance, backends, tmp_path):
    """With default settings and a descriptor limit of 256, one client that
    opens 150 idle connections is capped by the default -L (88 for 256
    descriptors) before the master runs out of descriptors: no "out of
    descriptors" pause, -c show answers, and accepting goes on as soon as
    the client lets some go."""
    be = backends("X")
    port = free_port()

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    err_path = tmp_path / "err"
    with open(err_path, "wb") as err:
        p = subprocess.Popen(BALANCE + ["-f", str(port), be.spec], env=balance.env, stdout=subprocess.DEVNULL,
                             stderr=err, preexec_fn=limit, cwd=ROOT)
    held: list[socket.socket] = []
    try:
        wait_listening(port, proc=None)
        for _ in range(150):
            held.append(client_from("127.0.0.2", port))
        assert eventually(lambda: be.connections == 88, timeout=15), be.connections
        time.sleep(0.5)
        assert be.connections == 88
        assert p.poll() is None
        r = balance.run("-c", "show", str(port))
        assert r.returncode == 0 and "127.0.0.1" in r.stdout, r.stderr
        for s in held[:10]:
            s.close()
        assert eventually(lambda: be.connections == 98, timeout=15), be.connections
    finally:
        for s in held:
            s.close()
        p.terminate()
        p.wait(10)
    text = err_path.read_text()
    assert text.count("connection limit of 88 reached (-L)") == 1, text
    assert "out of descriptors" not in text and "pausing" not in text, text
    assert "Traceback" not in text, text


def test_limit_is_split_over_workers(balance, backends, tmp_path):
    """-w 2 -L 6: each worker holds 3, the instance 6; the rest wait."""
    be = backends("W")
    port = free_port()
    balance.start("-w", "2", "-L", "6", str(port), be.spec, port=port)
    time.sleep(0.5)      # both workers accepting
    conns = [client_from("127.0.0.2", port) for _ in range(9)]
    assert eventually(lambda: be.connections == 6)
    time.sleep(0.5)
    assert be.connections == 6
    tags = [tag_or_none(s, 2 if i < 1 else 0.2) for i, s in enumerate(conns)]
    assert sorted(t for t in tags if t is not None) == ["W"] * 6, tags
    r = balance.run("-c", "show", str(port))
    assert r.returncode == 0, r.stderr
    for s in conns:
        s.close()


# -- -l: the per-source limit --------------------------------------------------------


def test_per_source_limit_caps_one_client_and_serves_another(balance, backends, tmp_path):
    """-l 20: a client at 127.0.0.2 opening 50 idle connections keeps 20; its
    other 30 are reset at once (and logged once), while a client at
    127.0.0.3 is still served and -c show answers.  When the first client
    lets one go, it may open one more."""
    be = backends("S")
    port = free_port()
    with stderr_file(tmp_path) as err:
        balance.start("-l", "20", str(port), be.spec, port=port, stderr=err)
    greedy = [client_or_reset("127.0.0.2", port) for _ in range(50)]
    tags = [tag_or_none(s, 10) for s in greedy]
    assert tags.count("S") == 20 and tags.count("") == 30, tags
    assert tags[:20] == ["S"] * 20                 # the first 20 are the ones kept
    other = client_from("127.0.0.3", port)
    assert tag_or_none(other, 10) == "S"
    r = balance.run("-c", "show", str(port))
    assert r.returncode == 0 and "127.0.0.1" in r.stdout, r.stderr
    assert be.connections == 21
    greedy[0].close()
    assert eventually(lambda: open_count(balance, port) == 20)
    again = client_from("127.0.0.2", port)
    assert tag_or_none(again, 10) == "S"
    over = client_or_reset("127.0.0.2", port)
    assert tag_or_none(over, 10) == ""
    text = log_text(tmp_path)
    lines = [line for line in text.splitlines() if "per-source limit" in line]
    assert lines == ["balance: 127.0.0.2 has 20 connections open, the per-source limit (-l): its new"
                     " connections are reset (reported at most every 60 seconds)"], text
    for s in greedy + [other, again, over]:
        if s is not None:
            s.close()


# -- early client bytes while connects are pending ------------------------------------


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_early_bytes_of_1500_pending_clients_stay_bounded(balance, hanging, tmp_path):
    """1,500 clients each send 64 KB while their backend connects hang: the
    master holds at most its early-data cap (4 MB) of it, not 64 KB per
    client (which took it from 19.5 to 118 MB); the rest waits in the kernel."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    h = hanging()
    port = free_port()
    proc = balance.start("-t", "60", str(port), h.spec, port=port)
    clients: list[socket.socket] = []
    try:
        # Warm up: the code paths that run per client, then the baseline.
        for _ in range(20):
            s = client_from("127.0.0.2", port)
            s.sendall(b"w" * 1000)
            clients.append(s)
        time.sleep(1.0)
        before = rss_kb(proc.pid)
        chunk = b"e" * 65536
        for _ in range(1500):
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.settimeout(10)
            s.connect(("127.0.0.1", port))
            s.setblocking(False)
            try:
                s.send(chunk)
            except BlockingIOError:
                pass
            clients.append(s)
        assert eventually(lambda: open_count(balance, port) >= 1520, timeout=30)
        time.sleep(2.0)
        after = rss_kb(proc.pid)
        print(f"\nmaster RSS with 1,500 pending clients (64 KB each): {before / 1024:.1f} -> {after / 1024:.1f} MB")
        assert proc.p.poll() is None
        assert after - before < 20 * 1024, (before, after)
    finally:
        for s in clients:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- -T: how an idle timeout ends a link ---------------------------------------------------


def drain_until_end(sock: socket.socket, timeout: float = 10.0) -> str:
    """Read until the end: "eof" or "reset" (or "timeout")."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return "eof"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"


def test_idle_timeout_with_an_upload_in_flight_resets_both_sides(balance, holders, tmp_path):
    """-T 1 on a link whose backend stopped reading mid-upload: nothing moves
    for a second, bytes are still on their way, so both the client and the
    backend get a reset (ECONNRESET), never a clean end the backend could
    take for the whole upload."""
    be = holders()
    port = free_port()
    with stderr_file(tmp_path) as err:
        balance.start("-T", "1", str(port), be.spec, port=port, stderr=err)
    c = client_from("127.0.0.2", port)
    c.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 10
    stalled_since = None
    while time.monotonic() < deadline:
        try:
            sent += c.send(b"u" * 65536)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 0.2:
                break
            time.sleep(0.01)
    assert sent > 65536 and be.conns
    assert drain_until_end(c) == "reset"
    assert drain_until_end(be.conns[0]) == "reset"
    assert eventually(lambda: "timed out after 1 seconds with data in flight: reset" in log_text(tmp_path)), \
        log_text(tmp_path)


def test_idle_timeout_with_a_download_in_flight_resets_both_sides(balance, holders, tmp_path):
    """The other way: the backend sends 8 MB, the client reads none of it."""
    be = holders(push=8 << 20)
    port = free_port()
    with stderr_file(tmp_path) as err:
        balance.start("-T", "1", str(port), be.spec, port=port, stderr=err)
    c = client_from("127.0.0.2", port)
    assert eventually(lambda: len(be.conns) == 1)
    # Nothing moves for over a second: timed out (read nothing before, or it moves).
    assert eventually(lambda: "timed out after 1 seconds with data in flight: reset" in log_text(tmp_path)), \
        log_text(tmp_path)
    assert drain_until_end(c) == "reset"
    # The reset reaches the backend's pushing thread if it is still blocked
    # in sendall, else the next send here: the first error either sees must
    # be the reset (after a clean end a send would fail with EPIPE first).
    time.sleep(0.2)
    if not be.push_errors:
        be.conns[0].settimeout(5)
        try:
            for _ in range(100):
                be.conns[0].send(b"x" * 65536)
                time.sleep(0.01)
        except OSError as exc:
            if not be.push_errors:
                be.push_errors.append(type(exc).__name__)
    assert be.push_errors and be.push_errors[0] == "ConnectionResetError", be.push_errors


class EchoRecorder(TcpServer):
    """Echoes each line; keeps each accepted socket's end ("eof"/"reset") in ``ends``."""

    def __init__(self):
        self.ends: list[str] = []
        super().__init__()

    def accepted(self, conn, peer):
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            conn.settimeout(20)
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        self.ends.append("eof")
                        return
                    conn.sendall(data)
            except ConnectionResetError:
                self.ends.append("reset")
            except OSError as exc:
                self.ends.append(errno.errorcode.get(exc.errno or 0, str(exc)))


def test_idle_timeout_with_nothing_in_flight_ends_cleanly(balance, tmp_path):
    """-T 1 on a link that has gone quiet with every byte delivered: both
    sides see a clean end (EOF), as with balance."""
    be = EchoRecorder()
    try:
        port = free_port()
        with stderr_file(tmp_path) as err:
            balance.start("-T", "1", str(port), be.spec, port=port, stderr=err)
        c = client_from("127.0.0.2", port)
        c.sendall(b"hello\n")
        assert read_line(c) == "hello"
        assert drain_until_end(c, timeout=10) == "eof"
        assert eventually(lambda: be.ends == ["eof"]), be.ends
        assert eventually(lambda: "timed out after 1 seconds\n" in log_text(tmp_path)), log_text(tmp_path)
        assert "data in flight" not in log_text(tmp_path)
        c.close()
    finally:
        be.close()


def test_a_limit_beyond_the_descriptors_is_said_at_start(balance, backends, tmp_path):
    """-L above what the descriptor limit allows: one warning at start
    (accepting would pause on EMFILE before the limit), and it serves."""
    be = backends("X")
    port = free_port()
    with stderr_file(tmp_path) as err:
        proc = balance.start("-L", "50000", str(port), be.spec, port=port, stderr=err)
    assert tag_or_none(client_from("127.0.0.2", port), 10) == "X"
    proc.stop()
    text = log_text(tmp_path)
    assert text.count("-L: 50000 connections need about 100064 file descriptors") == 1, text
