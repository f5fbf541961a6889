"""Shared test harness: free ports, real backends, the real CLI as a subprocess.

Every process a test starts is killed by its pid; state files live in a
per-test temporary directory through ``$BALANCE_STATE_DIR``.  All traffic is
on loopback (127.0.0.1 and ::1).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BALANCE = [sys.executable, "-m", "gbalance"]


_GIVEN: set[int] = set()


def _port_range() -> tuple[int, int]:
    """The ports :func:`free_port` hands out: ``$GBALANCE_TEST_PORTS`` (``LOW-HIGH``,
    both included) or 20000-31999.  ``make test`` gives the two test runs it
    starts side by side ranges of their own, so neither can hand out a port the
    other has just found free."""
    spec = os.environ.get("GBALANCE_TEST_PORTS", "")
    if not spec:
        return 20000, 31999
    low, _, high = spec.partition("-")
    if not (low.isdigit() and high.isdigit() and 1024 <= int(low) <= int(high) <= 32767):
        raise ValueError(f"GBALANCE_TEST_PORTS={spec!r}: want LOW-HIGH within 1024-32767")
    return int(low), int(high)


def _bindable(port: int) -> bool:
    """True if ``port`` binds on the IPv4 and the IPv6 wildcard right now."""
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    """A TCP port that is free now (any address, both families), never handed out before.

    Ports come from 20000-31999 (:func:`_port_range`), below the kernel's
    ephemeral range (32768 and up here), so a backend's ``bind(0)`` or an
    outgoing connection can never take the port between this call and the
    proxy's bind.  ``family`` and ``host`` are accepted for old callers.
    """
    rng = random.SystemRandom()
    low, high = _port_range()
    for _ in range(1000):
        port = rng.randrange(low, high + 1)
        if port not in _GIVEN and _bindable(port):
            _GIVEN.add(port)
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Wait until something accepts connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """True if a socket reachable at ``host`` is in LISTEN state on ``port``.

    Read from /proc/net/tcp*, so checking makes no connection: a probe
    through the proxy would be routed and move counters and cursors.  For
    an IPv4 ``host`` an IPv4 listener or a dual-stack ``::`` (or
    v4-mapped) one counts; for an IPv6 host, only IPv6 listeners.
    """
    want = f":{port:04X}"
    v6_host = ":" in host
    tables = ("/proc/net/tcp6",) if v6_host else ("/proc/net/tcp", "/proc/net/tcp6")
    for name in tables:
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local = fields[1]
                    if not local.endswith(want) or fields[3] != "0A":
                        continue
                    addr = local.split(":")[0]
                    if name.endswith("tcp6") and not v6_host and \
                            addr != "0" * 32 and addr[:24] != "0000000000000000FFFF0000":
                        continue
                    return True
        except FileNotFoundError:
            continue
    return False


def wait_listening(port: int, timeout: float = 10.0, proc: "Proc | None" = None,
                   host: str = "127.0.0.1") -> None:
    """Wait until ``port`` is in LISTEN state (the master listens only when ready)."""
    deadline = time.monotonic() + timeout
    while not listening(port, host):
        if proc is not None and proc.p.poll() is not None:
            raise TimeoutError(f"process exited with {proc.p.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on port {port}")
        time.sleep(0.01)


class Backend:
    """A threaded TCP server on loopback.

    Mode ``tag``: sends its tag and a newline on connect, then echoes.
    Mode ``echo``: echoes only.
    Mode ``eof``: reads until the client half-closes, then replies
    ``<bytes read> <sha256>`` and closes (tests half-close).
    Mode ``rst``: sends 100 KB, then resets the connection (SO_LINGER 0).  ``connections`` counts accepted clients and
    ``peers`` records their addresses (to check ``-B``).
    """

    def __init__(self, tag: str = "", host: str = "127.0.0.1", port: int = 0, mode: str = "tag"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(256)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.tag = tag.encode()
        self.mode = mode
        self.connections = 0
        self.peers: list[str] = []
        self.closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def spec(self) -> str:
        """The channel word for this backend."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _serve(self) -> None:
        while not self.closed:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.peers.append(peer[0])
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                if self.mode == "eof":
                    digest, total = hashlib.sha256(), 0
                    while True:
                        data = conn.recv(65536)
                        if not data:
                            break
                        digest.update(data)
                        total += len(data)
                    conn.sendall(f"{total} {digest.hexdigest()}\n".encode())
                    return
                if self.mode == "rst":
                    conn.sendall(b"x" * 100_000)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                if self.mode == "tag":
                    conn.sendall(self.tag + b"\n")
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class HangingListener:
    """A listener whose connects hang: backlog 0 and a full accept queue.

    Linux then drops further SYNs, so a connect neither succeeds nor is
    refused until its timeout - like a backend whose machine is down.
    """

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(0)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.fillers: list[socket.socket] = []
        # Fill the accept queue (it holds backlog + 1 entries).
        for _ in range(8):
            f = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            f.setblocking(False)
            f.connect_ex((host, self.port))
            self.fillers.append(f)
        time.sleep(0.05)
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(0.3)
        try:
            probe.connect((host, self.port))
            hung = False
        except (TimeoutError, OSError):
            hung = True
        finally:
            probe.close()
        assert hung, "could not make a listener whose connects hang"

    @property
    def spec(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        for f in self.fillers:
            f.close()
        self.sock.close()


@pytest.fixture
def hanging():
    """Factory for :class:`HangingListener`, closed after the test."""
    made: list[HangingListener] = []

    def make(host: str = "127.0.0.1") -> HangingListener:
        h = HangingListener(host)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


class Proc:
    """A ``balance`` subprocess (foreground), killed by pid at the end."""

    def __init__(self, args: list[str], env: dict, stdout=subprocess.PIPE, stderr=subprocess.PIPE):
        self.args = args
        self.p = subprocess.Popen(BALANCE + args, env=env, stdout=stdout, stderr=stderr,
                                  stdin=subprocess.DEVNULL, cwd=ROOT)

    @property
    def pid(self) -> int:
        return self.p.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> tuple[str, str]:
        """Signal the process, wait for it, return its stdout and stderr."""
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.p.pid, sig)
        try:
            out, err = self.p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            out, err = self.p.communicate()
        return (out or b"").decode(errors="replace"), (err or b"").decode(errors="replace")


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (PID 1 here may not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class BalanceRunner:
    """Starts balance masters and one-shot commands with a private state dir."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.env = dict(os.environ, BALANCE_STATE_DIR=str(state_dir), PYTHONUNBUFFERED="1")
        self.procs: list[Proc] = []
        self.daemon_pids: list[int] = []

    def start(self, *args: str, port: int, host: str = "127.0.0.1", wait: bool = True, **kw) -> Proc:
        """Start ``balance -f args...`` and wait until it listens on ``port``.

        Readiness is read from the kernel's socket table, not probed with a
        connection, so no connection is routed before the test's own.
        """
        proc = Proc(["-f", *args], self.env, **kw)
        self.procs.append(proc)
        if wait:
            try:
                wait_listening(port, proc=proc, host=host)
            except TimeoutError:
                out, err = proc.stop()
                raise AssertionError(f"balance did not start: rc={proc.p.returncode} {err}")
        return proc

    def run(self, *args: str, timeout: float = 30.0, input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``balance args...`` to completion (text mode)."""
        return subprocess.run(BALANCE + list(args), env=self.env, capture_output=True, text=True,
                              timeout=timeout, input=input, cwd=ROOT,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def cleanup(self) -> None:
        for proc in self.procs:
            proc.stop(timeout=5)
        for pid in self.daemon_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def balance(tmp_path):
    """A :class:`BalanceRunner` whose processes die with the test."""
    runner = BalanceRunner(tmp_path / "state")
    yield runner
    runner.cleanup()


@pytest.fixture
def backends():
    """Factory for :class:`Backend` objects, all closed after the test."""
    made: list[Backend] = []

    def make(tag: str = "", host: str = "127.0.0.1", mode: str = "tag") -> Backend:
        b = Backend(tag, host=host, mode=mode)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected loopback TCP sockets: (the connecting end, the accepted end)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


def read_line(s: socket.socket) -> str:
    """Read up to the first newline (or EOF); the text without it."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(100)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def read_tag(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> str:
    """Connect through the proxy and return the backend's tag line."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        return read_line(s)


def eventually(predicate, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` every 10 ms for up to ``timeout`` seconds; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def closing_factory(make):
    """Body of a factory fixture: yields ``make``; closes all it made after the test.

    Use as ``yield from closing_factory(SomeServer)``.
    """
    made: list = []

    def tracked(*args, **kw):
        obj = make(*args, **kw)
        made.append(obj)
        return obj

    yield tracked
    for obj in made:
        obj.close()


@pytest.fixture
def netns():
    """A private network namespace with loopback up (root and iproute2 needed)."""
    name = f"gbtest{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name])


def run_in_netns(netns: str, state_dir: Path, script: Path, *args: str,
                 timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run the Python ``script`` inside ``netns`` (text mode), gbalance and tests/ importable."""
    env = dict(os.environ, BALANCE_STATE_DIR=str(state_dir), PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    return subprocess.run(["ip", "netns", "exec", netns, BALANCE[0], str(script), *args],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def seeded_data(size: int, seed: int, repeat: int = 32) -> bytes:
    """``size`` bytes of test data: SHA-256 blocks of (seed, counter), each ``repeat`` times.

    Consecutive blocks differ, so lost, doubled or reordered chunks show
    (a short repeated pattern could hide them).
    """
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d:%d" % (seed, counter)).digest() * repeat
        counter += 1
    return bytes(out[:size])


class TcpServer:
    """A loopback test server: one thread accepts and hands each connection to
    :meth:`accepted` (which runs in that thread: keep it short, or start a
    thread of its own).  Subclasses set their own fields *before* calling
    ``super().__init__()``, which starts accepting."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, 0), family=family, backlog=64)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def spec(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.accepted(conn, peer)

    def accepted(self, conn: socket.socket, peer: tuple) -> None:
        conn.close()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@contextlib.contextmanager
def inprocess_server(argv: list[str], state_dir: Path):
    """A master built in this process, its server started on the test's hub
    (``argv`` as after ``balance``; state under ``state_dir``): yields
    ``(master, server)`` and tears both down, whatever happened.

    The hub may be left idle by an earlier in-process test: its clock is
    refreshed, or a connect's -t timer would start in the past.
    """
    from gbalance.cli import parse
    from gbalance.log import Log
    from gbalance.process.master import Master

    old = os.environ.get("BALANCE_STATE_DIR")
    os.environ["BALANCE_STATE_DIR"] = str(state_dir)
    try:
        master = Master(parse(argv), Log(foreground=True))
        master.build()
        master.listener.listen(16)
        server = master.server
        server.start()
        server.loop.update_now()
        try:
            yield master, server
        finally:
            server.reset_all()
            server.finish()
            server.close()
            master.remove_state()
    finally:
        if old is None:
            os.environ.pop("BALANCE_STATE_DIR", None)
        else:
            os.environ["BALANCE_STATE_DIR"] = old


def green_read_until(sock: socket.socket, marker: bytes, timeout: float = 5.0) -> bytes:
    """From inside the gevent loop: read the non-blocking ``sock`` until
    ``marker`` has come (or ``timeout``), letting the loop run in between."""
    import gevent

    sock.settimeout(0)
    deadline = time.monotonic() + timeout
    data = b""
    while marker not in data and time.monotonic() < deadline:
        gevent.sleep(0.01)
        try:
            data += sock.recv(100)
        except BlockingIOError:
            pass
    return data


class OneShotBackend:
    """A backend in a thread: reads the request, answers 100 bytes (99 ``a``
    and a newline) and closes, for every client; ``close()`` stops it."""

    REPLY = b"a" * 99 + b"\n"

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.recv(4096)
                    conn.sendall(self.REPLY)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()
