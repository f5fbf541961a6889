"""``-P v1|v2`` end to end: the real ``balance`` CLI, real sockets, a backend that
requires a PROXY header and decodes it with the strict decoder of
``test_proxyproto``."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import socket
import threading
import time

import pytest
from conftest import TcpServer, closing_factory, free_port, ipv6_available
from monhelp import ENABLED, Table, wait_for
from test_proxyproto import Bad, decode

HEADER_WAIT = 5.0
UP = 1_500_000       # client -> backend bytes (large enough to splice)
DOWN = 1_000_000     # backend -> client bytes


def pattern(n: int) -> bytes:
    """Deterministic, non-repeating-looking bytes."""
    out = bytearray()
    block = 0
    while len(out) < n:
        out += hashlib.sha256(block.to_bytes(8, "big")).digest()
        block += 1
    return bytes(out[:n])


DOWN_DATA = pattern(DOWN)


class ProxyBackend(TcpServer):
    """A server that insists on a PROXY header, as HAProxy's ``accept-proxy`` does.

    Each connection must start with a complete, valid header (v1 or v2)
    within ``HEADER_WAIT`` seconds; otherwise the connection is recorded in
    ``errors`` and reset.  Valid headers go to ``headers`` with the address
    the connection really came from.  After the header, the backend reads
    until EOF, answers ``<bytes> <sha256>\\n`` followed by ``DOWN`` bytes of
    a known pattern, and closes.
    """

    def __init__(self, host: str = "127.0.0.1"):
        self.headers: list[tuple[dict, tuple]] = []
        self.errors: list[str] = []
        super().__init__(host)

    def accepted(self, conn: socket.socket, peer: tuple) -> None:
        threading.Thread(target=self._handle, args=(conn, peer), daemon=True).start()

    def _handle(self, conn: socket.socket, peer: tuple) -> None:
        with conn:
            conn.settimeout(HEADER_WAIT)
            data = b""
            try:
                while True:
                    info, n = decode(data) if data else (None, 0)
                    if info is not None:
                        break
                    chunk = conn.recv(4096)
                    if not chunk:
                        raise Bad(f"EOF before a complete header (got {data[:40]!r})")
                    data += chunk
            except (Bad, OSError, UnicodeError) as exc:
                self.errors.append(f"{peer}: {exc}")
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                return
            self.headers.append((info, peer))
            if info["command"] != "PROXY":
                return    # a health check: nothing follows
            conn.settimeout(30)
            digest = hashlib.sha256(data[n:])
            total = len(data) - n
            try:
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    digest.update(chunk)
                    total += len(chunk)
                if not total:
                    return    # nothing came: a v1 health check (or an empty client)
                conn.sendall(f"{total} {digest.hexdigest()}\n".encode() + DOWN_DATA)
            except OSError as exc:
                self.errors.append(f"{peer}: after the header: {exc}")


@pytest.fixture
def proxy_backend():
    """Factory for :class:`ProxyBackend` objects, all closed after the test."""
    yield from closing_factory(ProxyBackend)


def transfer(port: int, connect_host: str, source: str) -> tuple[str, int]:
    """One client from ``source``: bulk data both ways; returns its (address, port)."""
    family = socket.AF_INET6 if ":" in connect_host else socket.AF_INET
    up = pattern(UP + 7)[7:]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.bind((source, 0))
        s.connect((connect_host, port))
        me = s.getsockname()[:2]
        s.sendall(up)                 # at once: the header must still come first
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    line, _, rest = got.partition(b"\n")
    assert line.decode() == f"{UP} {hashlib.sha256(up).hexdigest()}"
    assert len(rest) == DOWN and rest == DOWN_DATA
    return me


CASES = {   # name: (balance options, address to connect to, client sources, header family)
    "ipv4": ([], "127.0.0.1", ["127.0.0.2", "127.0.0.3", "127.0.0.4"], 4),
    "ipv4-bound": (["-b", "127.0.0.1"], "127.0.0.1", ["127.0.0.5", "127.0.0.6"], 4),
    "ipv6": (["-6", "-b", "::1"], "::1", ["::1", "::1"], 6),
    "dual-stack-v6-client": (["-6"], "::1", ["::1"], 6),
    "dual-stack-v4-client": (["-6"], "127.0.0.1", ["127.0.0.7", "127.0.0.8"], 4),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_backend_learns_the_real_client_address_and_port(balance, proxy_backend, version, case):
    opts, connect_host, sources, family = CASES[case]
    if ":" in connect_host and not ipv6_available():
        pytest.fail("IPv6 loopback is required on this machine")
    backend = proxy_backend("::1" if family == 6 else "127.0.0.1")
    port = free_port()
    balance.start("-P", version, *opts, str(port), backend.spec, port=port,
                  host="::1" if ":" in connect_host else "127.0.0.1")
    clients = [transfer(port, connect_host, src) for src in sources]
    wait_for(lambda: len(backend.headers) == len(clients), 5)
    assert backend.errors == []
    for (info, _peer), (addr, cport) in zip(backend.headers, clients):
        assert info["version"] == int(version[1])
        assert info["command"] == "PROXY" and info["family"] == family
        assert (info["src"], info["sport"]) == (addr.removeprefix("::ffff:"), cport)
        assert (info["dst"], info["dport"]) == (connect_host, port)


def test_without_P_no_header_is_sent(balance, proxy_backend):
    """The strict backend rejects a plain connection: the header test above means something."""
    backend = proxy_backend()
    port = free_port()
    balance.start(str(port), backend.spec, port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"not a header at all\r\n")
        try:
            s.shutdown(socket.SHUT_WR)
            assert s.recv(100) == b""
        except OSError as exc:
            # The backend's reset, relayed, may arrive before the shutdown.
            assert exc.errno in (errno.ECONNRESET, errno.ENOTCONN), exc
    wait_for(lambda: len(backend.errors) == 1, 5)
    assert backend.headers == []


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_connect_checks_send_a_valid_header(balance, proxy_backend, version):
    """Health checks against a backend that resets anything without a header:
    every check carries one (LOCAL in v2, the check's own endpoints in v1),
    the backend logs no error and the channel stays enabled."""
    backend = proxy_backend()
    port = free_port()
    balance.start("-P", version, "-m", "connect:interval=0.2", str(port), backend.spec, port=port)
    wait_for(lambda: len(backend.headers) >= 4, 10)
    table = Table(balance.state_dir, port)
    try:
        assert table.status(0, 0) == ENABLED
    finally:
        table.close()
    assert backend.errors == []
    for info, peer in backend.headers[:4]:
        if version == "v2":
            assert info == {"version": 2, "command": "LOCAL"}
        else:
            assert info["command"] == "PROXY"
            assert (info["src"], info["sport"], info["dst"], info["dport"]) == \
                (peer[0], peer[1], "127.0.0.1", backend.port)
    # And clients still get through with their own address.
    addr, cport = transfer(port, "127.0.0.1", "127.0.0.9")
    wait_for(lambda: any(i.get("sport") == cport for i, _ in backend.headers), 5)
    assert backend.errors == []


def test_bad_version_is_a_usage_error(balance):
    done = balance.run("-f", "-P", "v3", str(free_port()), "127.0.0.1:1")
    assert done.returncode == 64
    assert done.stderr == "balance: invalid PROXY protocol version [v3] for -P (use v1 or v2)\n"
    done = balance.run("-f", str(free_port()), "127.0.0.1:1", "-P")
    assert done.returncode == 64 and done.stderr.startswith("balance: option -P requires an argument\n")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_client_bytes_sent_while_the_connect_hangs_follow_the_header(balance, proxy_backend, hanging, version):
    """The first channel's connect hangs until -t; the client sends at once.
    Its bytes, read while the connect was pending, reach the backend after
    the whole header and intact."""
    backend = proxy_backend()
    port = free_port()
    balance.start("-P", version, "-t", "0.5", str(port), hanging().spec, "!", backend.spec, port=port)
    addr, cport = transfer(port, "127.0.0.1", "127.0.0.10")
    wait_for(lambda: len(backend.headers) == 1, 5)
    assert backend.errors == []
    info, _ = backend.headers[0]
    assert (info["command"], info["src"], info["sport"]) == ("PROXY", addr, cport)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_every_worker_sends_the_header(balance, proxy_backend, version):
    """With -w 2 the header is built in each worker: every connection, whichever
    worker accepted it, starts with a header naming its real client."""
    backend = proxy_backend()
    port = free_port()
    balance.start("-P", version, "-w", "2", str(port), backend.spec, port=port)
    sources = [f"127.0.0.{i}" for i in range(2, 14)]
    clients = [transfer(port, "127.0.0.1", src) for src in sources]
    wait_for(lambda: len(backend.headers) == len(clients), 5)
    assert backend.errors == []
    got = sorted((info["src"], info["sport"]) for info, _peer in backend.headers)
    assert got == sorted(clients)


class RecordingBackend(TcpServer):
    """Records how each accepted connection ended: ``("header", info)`` for a
    complete valid header (whatever follows), ``("reset", data)`` for a reset
    before one, ``("eof", data)`` for a clean end before one (zero bytes or
    part of a header), ``("bad", text)`` for bytes that are not a header."""

    def __init__(self, host: str = "127.0.0.1"):
        self.outcomes: list[tuple[str, object]] = []
        super().__init__(host)

    def accepted(self, conn: socket.socket, peer: tuple) -> None:
        threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(HEADER_WAIT)
            data = b""
            try:
                while True:
                    info, _n = decode(data) if data else (None, 0)
                    if info is not None:
                        self.outcomes.append(("header", info))
                        return
                    chunk = conn.recv(4096)
                    if not chunk:
                        self.outcomes.append(("eof", data))
                        return
                    data += chunk
            except ConnectionResetError:
                self.outcomes.append(("reset", data))
            except (Bad, OSError, UnicodeError) as exc:
                self.outcomes.append(("bad", f"{exc} after {data!r}"))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_client_that_closes_at_once_leaves_no_headerless_backend_connection(balance, version):
    """200 clients connect and close at once (a front tier's TCP health check).
    Every backend connection gbalance completed either got a whole, valid
    header or was reset: none ends cleanly with zero bytes or half a header,
    which a strict backend logs as an error each time."""
    backend = RecordingBackend()
    try:
        port = free_port()
        balance.start("-P", version, str(port), backend.spec, port=port)
        for i in range(200):
            with socket.socket() as s:
                s.bind((f"127.0.0.{2 + i % 50}", 0))
                s.connect(("127.0.0.1", port))
        # Then one real client: when its header has come, every earlier
        # backend connection has been accepted (one accept thread, in order).
        with socket.socket() as s:
            s.bind(("127.0.0.99", 0))
            s.connect(("127.0.0.1", port))
            cport = s.getsockname()[1]
            s.sendall(b"hello")
            wait_for(lambda: any(o == "header" and i.get("sport") == cport
                                        for o, i in backend.outcomes), 10)
        time.sleep(0.5)
        bad = [o for o in backend.outcomes if o[0] not in ("header", "reset")]
        assert bad == [], f"{len(bad)} of {len(backend.outcomes)} backend connections: {bad[:5]}"
    finally:
        backend.close()
