"""The data path under hostile or unlucky conditions, through the real ``balance`` CLI.

Urgent bytes on the splice path, resets passed on as resets (also while a
flow waits for the other side, and when the backend resets before the
master saw its connect complete), client hang-ups during a pending connect,
local port exhaustion, and the file-descriptor limit.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import resource
import select
import selectors
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest
from conftest import BALANCE, ROOT, free_port, read_line, run_in_netns, seeded_data, wait_listening

from gbalance.table.files import state_path
from gbalance.table.layout import C_C, C_STATUS
from gbalance.table.state import SharedState

TICKS = os.sysconf("SC_CLK_TCK")
LINGER_RESET = struct.pack("ii", 1, 0)


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def attach(balance, port: int) -> SharedState:
    return SharedState.attach(state_path(port, None, str(balance.state_dir)))


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Receiver(threading.Thread):
    """Reads a socket to EOF, taking urgent bytes as they come (like a careful peer).

    Before each read it polls for ``POLLPRI``: an urgent byte is taken with
    ``MSG_OOB`` before a normal read could step over its mark (which would
    discard it).
    """

    def __init__(self, sock: socket.socket, limit: float = 30.0):
        super().__init__(daemon=True)
        self.sock = sock
        self.sock.settimeout(None)
        self.limit = limit
        self.digest = hashlib.sha256()
        self.count = 0
        self.urgent = b""
        self.eof = False
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        deadline = time.monotonic() + self.limit
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLPRI)
        try:
            while time.monotonic() < deadline:
                events = poller.poll(500)
                ev = events[0][1] if events else 0
                x, r = ev & select.POLLPRI, ev & ~select.POLLPRI
                if x:
                    try:
                        self.urgent += self.sock.recv(1, socket.MSG_OOB)
                    except OSError as exc:
                        if exc.errno not in (errno.EINVAL, errno.EAGAIN):
                            raise
                if r:
                    data = self.sock.recv(1 << 20)
                    if not data:
                        self.eof = True
                        return
                    self.digest.update(data)
                    self.count += len(data)
        except BaseException as exc:  # reported by the test
            self.error = exc


class RawBackend:
    """One listening socket; the test takes the accepted connection itself."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]
        self.spec = f"127.0.0.1:{self.port}"

    def accept(self) -> socket.socket:
        conn, _ = self.sock.accept()
        conn.settimeout(10)
        return conn

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_backend():
    b = RawBackend()
    yield b
    b.close()


# -- 1. urgent data on the splice path ------------------------------------------------------

@pytest.mark.parametrize("direction", ["client-to-backend", "backend-to-client"])
def test_urgent_byte_mid_bulk_loses_nothing_and_master_goes_idle(balance, raw_backend, direction):
    """2 MB (the flow splices), one urgent byte, 1 MB more: every normal byte
    arrives, the urgent byte is relayed, and the master does not spin."""
    port = free_port()
    proc = balance.start(str(port), raw_backend.spec, port=port)
    first, second = seeded_data(2 << 20, 1), seeded_data(1 << 20, 2)
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    server = raw_backend.accept()
    with client, server:
        sender, receiver = (client, server) if direction == "client-to-backend" else (server, client)
        rx = Receiver(receiver)
        sender.sendall(first)
        wait_for(lambda: rx.count >= len(first) or rx.error or rx.eof, 20, "the first 2 MB")
        sender.send(b"!", socket.MSG_OOB)
        sender.sendall(second)
        total = len(first) + len(second)
        deadline = time.monotonic() + 20
        while rx.count < total and not (rx.error or rx.eof) and time.monotonic() < deadline:
            time.sleep(0.01)
        got_before_close = rx.count
        # The link is idle now (both sockets open): the master must sleep.
        before = cpu_seconds(proc.pid)
        time.sleep(3)
        idle_cpu = cpu_seconds(proc.pid) - before
        sender.shutdown(socket.SHUT_WR)
        rx.join(20)
        assert rx.error is None, rx.error
        assert rx.eof, "no end of stream after the half-close"
        assert got_before_close == total, f"only {got_before_close} of {total} bytes before the half-close"
        assert rx.count == total
        assert rx.digest.digest() == hashlib.sha256(first + second).digest()
        assert rx.urgent == b"!"
        assert idle_cpu < 0.5, f"idle master used {idle_cpu:.2f} s of CPU in 3 s"


@pytest.mark.parametrize("when", ["proxy-running", "before-accept"])
def test_first_urgent_byte_on_a_fresh_proxy_is_relayed(balance, raw_backend, when):
    """On a fresh instance (no urgent data seen before, so no socket is in the
    urgent epoll set and no alert is on), a client whose very first action is
    an urgent byte gets it relayed as urgent; normal bytes after it, around a
    second urgent byte, arrive whole.

    ``before-accept``: the proxy is stopped (SIGSTOP) while the client
    connects and sends, so the byte is queued before the proxy accepts the
    socket and sets its owner (F_SETOWN): the kernel raises SIGURG only when
    urgent data arrives, and the relay must not depend on that signal alone."""
    port = free_port()
    proc = balance.start(str(port), raw_backend.spec, port=port)
    stopped = when == "before-accept"
    if stopped:
        os.kill(proc.pid, signal.SIGSTOP)
    try:
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.send(b"!", socket.MSG_OOB)                    # its very first action
        if stopped:
            time.sleep(0.05)
    finally:
        if stopped:
            os.kill(proc.pid, signal.SIGCONT)
    server = raw_backend.accept()
    with client, server:
        rx = Receiver(server)
        wait_for(lambda: rx.urgent or rx.error or rx.eof or rx.count, 5, "the first urgent byte")
        time.sleep(0.05)                   # whatever else would come with it
        assert rx.error is None, rx.error
        assert rx.urgent == b"!", f"first urgent byte not relayed (urgent={rx.urgent!r}, {rx.count} normal bytes)"
        assert rx.count == 0
        before, after = seeded_data(200_000, 41), seeded_data(300_000, 42)
        client.sendall(before)
        wait_for(lambda: rx.count >= len(before) or rx.error or rx.eof, 10, "the bytes before")
        client.send(b"?", socket.MSG_OOB)
        wait_for(lambda: len(rx.urgent) >= 2 or rx.error or rx.eof, 5, "the second urgent byte")
        client.sendall(after)
        client.shutdown(socket.SHUT_WR)
        rx.join(20)
        assert rx.error is None, rx.error
        assert rx.eof
        assert rx.urgent == b"!?"
        assert rx.count == len(before) + len(after)
        assert rx.digest.digest() == hashlib.sha256(before + after).digest()


# -- 2. resets look like resets -------------------------------------------------------------

def test_backend_reset_reaches_client_as_reset(balance, backends):
    """A backend that aborts after 100 KB: the client sees the bytes, then ECONNRESET."""
    dying = backends(mode="rst")
    port = free_port()
    balance.start(str(port), dying.spec, port=port)
    got = 0
    with pytest.raises(ConnectionResetError):
        # A loaded client may learn of the reset from connect() itself (its
        # SO_ERROR), as it would on a direct connection.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            while True:
                chunk = s.recv(65536)
                assert chunk, f"clean EOF after {got} bytes: the reset was hidden"
                got += len(chunk)
    assert got <= 100_000


def test_client_reset_reaches_backend_as_reset(balance, raw_backend):
    port = free_port()
    balance.start(str(port), raw_backend.spec, port=port)
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    server = raw_backend.accept()
    with server:
        client.sendall(b"request")
        assert server.recv(100) == b"request"
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        client.close()
        with pytest.raises(ConnectionResetError):
            data = server.recv(100)
            assert data, "clean EOF: the client's reset was hidden"


def _pending_error(sock: socket.socket, timeout: float) -> int:
    """Wait (bounded) until ``sock`` has a pending error, without reading its data."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            return err
        time.sleep(0.02)
    return 0


@pytest.mark.parametrize("who_resets", ["client", "backend"])
def test_reset_passes_while_the_other_side_applies_back_pressure(balance, raw_backend, who_resets):
    """A flow that waits for a slow reader does not read its source: a reset
    of that source must still reach the slow side at once (not when it reads)."""
    port = free_port()
    balance.start(str(port), raw_backend.spec, port=port)
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    server = raw_backend.accept()
    with client, server:
        resetter, slow = (client, server) if who_resets == "client" else (server, client)
        resetter.setblocking(False)
        sent, block = 0, b"z" * 65536
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:      # fill every buffer on the way
            try:
                sent += resetter.send(block)
            except BlockingIOError:
                if not select.select([], [resetter], [], 0.5)[1]:
                    break
        assert sent > 0
        resetter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        resetter.close()
        assert _pending_error(slow, 5) == errno.ECONNRESET, "the reset did not reach the slow side"


def _connection_to(port: int, tcp_state: str) -> bool:
    """A connection towards 127.0.0.1:port in ``tcp_state`` (hex, from /proc/net/tcp)."""
    want = f":{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        return any(line.split()[2].endswith(want) and line.split()[3] == tcp_state for line in f)


def _syn_sent_to(port: int) -> bool:
    """A connection in SYN-SENT towards 127.0.0.1:port."""
    return _connection_to(port, "02")


def _connected_to(port: int) -> bool:
    """An established connection towards 127.0.0.1:port."""
    return _connection_to(port, "01")


def test_backend_reset_before_master_saw_connect_complete(balance, backends):
    """The flake of test_backend_dying_mid_transfer_closes_only_that_client.

    A loaded master may look at its connect only after the backend has
    already sent its bytes and reset: SO_ERROR then says ECONNRESET.  That
    connect did succeed: the client must get the bytes and the reset, not
    be failed over to another channel (where it waited for data that never
    came).  Reproduced exactly: the backend's accept queue is full, so the
    master's SYN is dropped; the master is stopped (SIGSTOP), the queue
    freed, the retransmitted SYN completes, the backend sends 100 KB and
    resets, and only then does the master run again.
    """
    steady = backends("S")
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    lsock.settimeout(10)
    bport = lsock.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", bport), timeout=5)   # fills the queue
    port = free_port()
    proc = balance.start("-t", "15", str(port), f"127.0.0.1:{bport}", steady.spec, port=port)
    stopped = False
    try:
        client = socket.create_connection(("127.0.0.1", port), timeout=15)
        wait_for(lambda: _syn_sent_to(bport), 5, "the master's connect")
        os.kill(proc.pid, signal.SIGSTOP)
        stopped = True
        lsock.accept()[0].close()              # the filler: the queue has room again
        filler.close()
        conn, _ = lsock.accept()               # the master's retransmitted SYN (about 1 s)
        conn.sendall(b"x" * 100_000)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        conn.close()
        wait_for(lambda: not _connected_to(bport), 2, "the reset to reach the master's socket")
        os.kill(proc.pid, signal.SIGCONT)
        stopped = False
        got = b""
        with client, pytest.raises(ConnectionResetError):
            while True:
                chunk = client.recv(65536)
                assert chunk, f"clean EOF after {len(got)} bytes"
                got += chunk
        assert got == b"x" * len(got) and len(got) <= 100_000, got[:20]
    finally:
        if stopped:
            os.kill(proc.pid, signal.SIGCONT)
        lsock.close()
    st = attach(balance, port)
    try:
        assert st.get(0, 0, C_STATUS) == 0
    finally:
        st.close()


# -- 6. connects: client hang-up with data, local port exhaustion ----------------------------

def _unread(local_port: int, remote_port: int) -> int | None:
    """Bytes queued unread on the socket local_port <- remote_port (from /proc/net/tcp)."""
    want_l, want_r = f":{local_port:04X}", f":{remote_port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1].endswith(want_l) and fields[2].endswith(want_r):
                return int(fields[4].split(":")[1], 16)
    return None


def test_client_reset_after_sending_data_cancels_pending_connect(balance, hanging):
    primary = hanging()
    port = free_port()
    balance.start("-t", "10", str(port), primary.spec, port=port)
    st = attach(balance, port)
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        wait_for(lambda: st.get(0, 0, C_C) == 1, 2, "the pending connect")
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        me = s.getsockname()[1]
        wait_for(lambda: _unread(port, me) == 0, 2, "the master to read the request")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        s.close()
        start = time.monotonic()
        wait_for(lambda: st.get(0, 0, C_C) == 0, 3, "the connect to be cancelled")
        assert time.monotonic() - start < 1.0
    finally:
        st.close()


def test_half_close_during_pending_connect_still_gets_the_answer(balance):
    """Request, then SHUT_WR, while the connect is pending: an end of stream
    after data may be a client waiting for its reply (a direct connection
    would serve it), so the connect goes on and the request is delivered.
    (Only a reset, or an end of stream before any data, cancels.)"""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    lsock.settimeout(10)
    bport = lsock.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", bport), timeout=5)   # SYNs are dropped now
    port = free_port()
    balance.start("-t", "15", str(port), f"127.0.0.1:{bport}", port=port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as c:
            wait_for(lambda: _syn_sent_to(bport), 5, "the master's connect")
            c.sendall(b"question\n")
            c.shutdown(socket.SHUT_WR)
            me = c.getsockname()[1]
            wait_for(lambda: _unread(port, me) == 0, 2, "the master to read the request")
            lsock.accept()[0].close()             # room in the queue: the SYN retransmit completes
            filler.close()
            conn, _ = lsock.accept()
            with conn:
                assert read_line(conn) == "question"
                assert conn.recv(10) == b""       # the half-close, passed on
                conn.sendall(b"answer\n")
            assert read_line(c) == "answer"
    finally:
        lsock.close()


def test_data_sent_during_connect_arrives_first_and_whole(balance, raw_backend):
    """What the client sends while the connect is pending is held and sent first."""
    port = free_port()
    balance.start(str(port), raw_backend.spec, port=port)
    payload = seeded_data(300_000, 5)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        writer = threading.Thread(target=lambda: (c.sendall(payload), c.shutdown(socket.SHUT_WR)))
        writer.start()
        server = raw_backend.accept()
        with server:
            rx = Receiver(server)
            rx.join(20)
            writer.join(10)
            assert rx.eof and rx.count == len(payload)
            assert rx.digest.digest() == hashlib.sha256(payload).digest()


@pytest.mark.parametrize("size", [300, 300_000], ids=["request", "more-than-one-read"])
def test_bytes_sent_before_accept_go_with_the_connect_first_and_whole(balance, raw_backend, size):
    """The master is stopped while a client connects and sends (the bytes wait
    in its socket before accept): they are read at accept, sent with the
    connect, and whatever the first read did not take follows, in order."""
    port = free_port()
    proc = balance.start(str(port), raw_backend.spec, port=port)
    payload = seeded_data(size, 9)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        writer = threading.Thread(target=lambda: (c.sendall(payload), c.shutdown(socket.SHUT_WR)))
        writer.start()
        time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    with c:
        server = raw_backend.accept()
        with server:
            rx = Receiver(server)
            rx.join(20)
            writer.join(10)
            assert rx.error is None, rx.error
            assert rx.eof and rx.count == len(payload)
            assert rx.digest.digest() == hashlib.sha256(payload).digest()


def _ports_exhausted_probe() -> str:
    return str(ROOT / "tests" / "port_exhaustion_probe.py")


def test_local_port_exhaustion_does_not_disable_channels(netns, tmp_path):
    """EADDRNOTAVAIL (no ephemeral port left for a destination) is a local
    shortage: with -a the channel stays enabled and the client goes to the
    next group.  Real exhaustion: a private network namespace whose
    ip_local_port_range holds two ports."""
    r = run_in_netns(netns, tmp_path, _ports_exhausted_probe(), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["A", "A", "B", "status=0", "c=2"], r.stdout + r.stderr


# -- 3. file descriptors -------------------------------------------------------------------

class EchoServer(threading.Thread):
    """A single-threaded echo server for thousands of idle connections."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.spec = f"127.0.0.1:{self.port}"
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ)
        self.conns: list[socket.socket] = []
        self.stopping = False
        self.start()

    def run(self) -> None:
        while not self.stopping:
            for key, _ in self.sel.select(0.2):
                s = key.fileobj
                if s is self.sock:
                    with contextlib.suppress(BlockingIOError):
                        conn, _ = self.sock.accept()
                        conn.setblocking(False)
                        self.conns.append(conn)
                        self.sel.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if data:
                    with contextlib.suppress(OSError):
                        s.send(data)
                else:
                    self.sel.unregister(s)
                    s.close()

    def close(self) -> None:
        self.stopping = True
        self.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()
        self.sel.close()


def soft_nofile(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no open-files line")


def test_2000_idle_connections_from_a_soft_limit_of_1024(balance, tmp_path):
    """Started with the usual soft limit of 1024 (hard 20000), the master
    raises it and holds 2,000 idle proxied connections, each one working."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 20000:
        pytest.fail(f"this test needs a hard fd limit of 20000 (have {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))     # for our own 4,000 sockets
    echo = EchoServer()
    port = free_port()
    err_path = tmp_path / "err"

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 20000))

    held: list[socket.socket] = []
    with open(err_path, "wb") as err:
        p = subprocess.Popen(BALANCE + ["-f", "-d", str(port), echo.spec], env=balance.env,
                             stdout=subprocess.DEVNULL, stderr=err, preexec_fn=limit, cwd=ROOT)
        try:
            wait_listening(port)
            assert soft_nofile(p.pid) == 20000
            for i in range(2000):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                held.append(s)
                msg = b"ping %d\n" % i
                s.sendall(msg)
                assert read_line(s) == msg.decode().strip(), f"connection {i} got no echo"
            # All still open and working, proxied by the same master.
            for i in (0, 999, 1999):
                held[i].sendall(b"again\n")
                assert read_line(held[i]) == "again"
            assert p.poll() is None
            assert len(os.listdir(f"/proc/{p.pid}/fd")) >= 4000
        finally:
            for s in held:
                s.close()
            p.terminate()
            p.wait(10)
            echo.close()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    text = err_path.read_text()
    assert "file descriptor limit raised from 1024 to 20000" in text, text[:500]
    assert "Traceback" not in text


def _pipes_of(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
    return n


def test_spent_pipe_budget_falls_back_to_copying(balance, backends, tmp_path):
    """Over the per-user pipe budget (pipe-user-pages-soft) the kernel gives
    an unprivileged process one-page pipes; the master then copies instead
    of splicing, and every byte still arrives.

    The budget is spent for real: this (privileged) test process holds
    enough pipes to put the user over the soft limit, and the master runs
    without CAP_SYS_RESOURCE and CAP_SYS_ADMIN, the capabilities that
    exempt a process from it.
    """
    with open("/proc/sys/fs/pipe-user-pages-soft") as f:
        budget_pages = int(f.read())
    if budget_pages == 0:
        pytest.fail("pipe-user-pages-soft is 0 (no budget): cannot test")
    be = backends(mode="echo")
    port = free_port()
    proc_env = balance.env
    hoard = []
    try:
        for _ in range(budget_pages // 16 + 64):      # 16 pages per default pipe
            hoard.append(os.pipe())
        p = subprocess.Popen(["setpriv", "--bounding-set", "-sys_resource,-sys_admin", *BALANCE,
                              "-f", str(port), be.spec], env=proc_env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, cwd=ROOT)
        try:
            wait_listening(port)
            pipes_at_start = _pipes_of(p.pid)         # its stderr, gevent's own
            payload = seeded_data(8 << 20, 9)
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                rx = Receiver(s)
                s.sendall(payload[: 4 << 20])
                wait_for(lambda: rx.count >= 2 << 20 or rx.error is not None, 20, "bulk data")
                pipes_mid_transfer = _pipes_of(p.pid)
                s.sendall(payload[4 << 20:])
                s.shutdown(socket.SHUT_WR)
                rx.join(30)
            assert rx.error is None and rx.eof
            assert rx.count == len(payload)
            assert rx.digest.digest() == hashlib.sha256(payload).digest()
            assert pipes_mid_transfer == pipes_at_start, "spliced through budget-starved pipes"
        finally:
            p.terminate()
            p.wait(10)
    finally:
        for r, w in hoard:
            os.close(r)
            os.close(w)


# -- accepted clients stay blocking: the loop must never block on one ---------------------------

def _tcp_max(name: str) -> int:
    """The largest buffer TCP autotuning may give a socket (``tcp_rmem``/``tcp_wmem``)."""
    try:
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            return int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 6 << 20


def _more_than_the_path_holds() -> int:
    """An upload the buffers between A and the stalled backend cannot absorb
    whole: the proxy's receive buffer can grow to tcp_rmem's maximum (32 MB on
    some machines of this kind) while it reads, plus A's and the proxy's send
    buffers, a pipe and the backend's small receive buffer."""
    return max(16 << 20, _tcp_max("tcp_rmem") + 2 * _tcp_max("tcp_wmem") + (8 << 20))


class StallingBackend:
    """Per connection, the first line says what to do.

    ``ECHO``: echo every byte back.  ``BULK``: send ``down`` (then half-close)
    from one thread, and read nothing until :attr:`release` is set; then read
    to EOF and record ``(count, sha256)`` in :attr:`uploads`.
    """

    def __init__(self, down: bytes):
        self.down = down
        self.release = threading.Event()
        self.uploads: list[tuple[int, bytes]] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.spec = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        try:
            first = b""
            while not first.endswith(b"\n"):
                byte = conn.recv(1)
                if not byte:
                    return
                first += byte
            if first == b"ECHO\n":
                while data := conn.recv(65536):
                    conn.sendall(data)
                return
            # BULK: small receive buffer, so the upload stalls quickly.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            sender = threading.Thread(target=self._send_down, args=(conn,), daemon=True)
            sender.start()
            self.release.wait(60)
            digest, count = hashlib.sha256(), 0
            while data := conn.recv(1 << 20):
                digest.update(data)
                count += len(data)
            self.uploads.append((count, digest.digest()))
            sender.join(60)
        except OSError:
            pass

    def _send_down(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(self.down)
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.release.set()
        self.sock.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.close()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_loop_never_blocks_on_a_stalled_splicing_client(balance):
    """Accepted clients stay in blocking mode (every call passes MSG_DONTWAIT,
    a splicing flow makes its sockets non-blocking).  Client A uploads and
    downloads 16 MB (uploads more than the buffers on the way can hold: see
    :func:`_more_than_the_path_holds`; both flows splice) and then neither A nor the
    backend reads: a second client B still gets its echo within 1 s, again
    and again.  Once both sides read, every byte arrives, checked by SHA-256."""
    up, down = seeded_data(_more_than_the_path_holds(), 51), seeded_data(16 << 20, 52)
    backend = StallingBackend(down)
    port = free_port()
    proc = balance.start(str(port), backend.spec, port=port)
    pipes_before = _pipes_of(proc.pid)
    rss_before = _rss_kb(proc.pid)
    a = socket.socket()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)    # A's download stalls quickly
    a.settimeout(60)
    try:
        a.connect(("127.0.0.1", port))
        a.sendall(b"BULK\n")
        upload_error: list[BaseException] = []

        def upload() -> None:
            try:
                a.sendall(up)
                a.shutdown(socket.SHUT_WR)
            except BaseException as exc:  # reported below
                upload_error.append(exc)

        uploader = threading.Thread(target=upload, daemon=True)
        uploader.start()
        # Both directions switched to splice (a pipe each), then everything stalls.
        wait_for(lambda: _pipes_of(proc.pid) >= pipes_before + 4, 20, "both flows of A to splice")
        time.sleep(0.3)
        assert uploader.is_alive(), "A's upload was not stalled"
        # Stalled both ways with megabytes unsent: the proxy holds a pipe (64 KB)
        # per direction, not the stream.
        grown = _rss_kb(proc.pid) - rss_before
        assert grown < 6 << 10, f"RSS grew by {grown} KB while both readers stalled"

        with socket.create_connection(("127.0.0.1", port), timeout=5) as kept:
            kept.sendall(b"ECHO\n")
            for i in range(8):
                t0 = time.monotonic()
                with socket.create_connection(("127.0.0.1", port), timeout=2) as b:
                    b.settimeout(1.0)
                    msg = b"ping %d\n" % i
                    b.sendall(b"ECHO\n" + msg)
                    assert read_line(b) == msg.decode().strip()
                kept.settimeout(1.0)
                kept.sendall(msg)
                assert read_line(kept) == msg.decode().strip()
                took = time.monotonic() - t0
                assert took < 1.0, f"round {i} took {took:.2f} s: the loop was blocked"
                time.sleep(0.05)
        assert uploader.is_alive(), "A's upload ended while nobody read it"

        backend.release.set()
        digest, count = hashlib.sha256(), 0
        while data := a.recv(1 << 20):
            digest.update(data)
            count += len(data)
        uploader.join(30)
        assert not upload_error, upload_error
        assert count == len(down)
        assert digest.digest() == hashlib.sha256(down).digest()
        wait_for(lambda: backend.uploads, 30, "the backend to read the upload")
        assert backend.uploads == [(len(up), hashlib.sha256(up).digest())]
        assert proc.p.poll() is None
    finally:
        a.close()
        backend.close()
