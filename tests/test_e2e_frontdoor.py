"""``-A``: gbalance behind a real PROXY-protocol front tier.

Front tiers: gbalance itself with ``-P v1|v2``, and HAProxy with
``send-proxy``/``send-proxy-v2`` (a plain process on loopback with a
generated configuration).  Behind the gbalance under test sits a backend
that insists on a PROXY header (``-P`` on the inner gbalance) and records
the client address it is told, or a hash group whose channel choice depends
on the client address.  Clients connect from 127.0.0.2 and up (or ::1 with
its own port), so the original client is told apart from the front tier.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time

import pytest
from conftest import free_port, ipv6_available, read_line, wait_listening
from monhelp import wait_for
from test_e2e_proxyproto import ProxyBackend, transfer
from gbalance.proxy.proxyproto import V2_LOCAL_HEADER, v1_header, v2_header


@pytest.fixture
def proxy_backend():
    made = []

    def make(host: str = "127.0.0.1") -> ProxyBackend:
        b = ProxyBackend(host)
        made.append(b)
        return b
    yield make
    for b in made:
        b.close()


def need_ipv6() -> None:
    if not ipv6_available():
        pytest.fail("IPv6 loopback is required on this machine")


def endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reset_or_eof(s: socket.socket, timeout: float) -> str:
    """How the peer ended the connection: "reset", "eof" or "data"."""
    s.settimeout(timeout)
    try:
        data = s.recv(100)
    except ConnectionResetError:
        return "reset"
    return "data" if data else "eof"


def client(port: int, source: str, payload: bytes, host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.connect((host, port))
    if payload:
        s.sendall(payload)
    return s


# -- gbalance -P in front of gbalance -A ----------------------------------------

CHAIN = {   # name: (outer options, outer host, inner options, inner host, trusted, sources, family at backend)
    "ipv4": (["-b", "127.0.0.1"], "127.0.0.1", ["-b", "127.0.0.1"], "127.0.0.1", "127.0.0.1",
             ["127.0.0.2", "127.0.0.3", "127.0.0.4"], 4),
    "ipv6": (["-6", "-b", "::1"], "::1", ["-6", "-b", "::1"], "::1", "::1", ["::1", "::1"], 6),
    "ipv6-client-ipv4-tiers": (["-6", "-b", "::1"], "::1", ["-b", "127.0.0.1"], "127.0.0.1",
                               "127.0.0.0/8", ["::1"], 6),
    "wildcard-inner": (["-b", "127.0.0.1"], "127.0.0.1", [], "127.0.0.1", "127.0.0.1,::1",
                       ["127.0.0.5", "127.0.0.6"], 4),
}


@pytest.mark.parametrize("case", list(CHAIN))
@pytest.mark.parametrize("outer_version", ["v1", "v2"])
def test_gbalance_front_tier_passes_the_original_client_on(balance, proxy_backend, outer_version, case):
    outer_opts, outer_host, inner_opts, inner_host, trusted, sources, family = CHAIN[case]
    if ":" in outer_host + inner_host:
        need_ipv6()
    backend = proxy_backend("127.0.0.1")
    inner = free_port()
    balance.start("-A", trusted, "-P", "v2", *inner_opts, str(inner), backend.spec, port=inner,
                  host=inner_host)
    outer = free_port()
    balance.start("-P", outer_version, *outer_opts, str(outer), endpoint(inner_host, inner),
                  port=outer, host=outer_host)
    clients = [transfer(outer, outer_host, src) for src in sources]
    wait_for(lambda: len(backend.headers) == len(clients), 5)
    assert backend.errors == []
    got = [(info["family"], info["src"], info["sport"]) for info, _peer in backend.headers]
    assert sorted(got) == sorted((family, addr, port) for addr, port in clients)


def test_every_worker_reads_the_header(balance, proxy_backend):
    backend = proxy_backend()
    inner, outer = free_port(), free_port()
    balance.start("-A", "127.0.0.1", "-P", "v1", "-w", "2", "-b", "127.0.0.1", str(inner), backend.spec,
                  port=inner)
    balance.start("-P", "v2", "-b", "127.0.0.1", str(outer), f"127.0.0.1:{inner}", port=outer)
    sources = [f"127.0.0.{i}" for i in range(2, 14)]
    clients = [transfer(outer, "127.0.0.1", src) for src in sources]
    wait_for(lambda: len(backend.headers) == len(clients), 5)
    assert backend.errors == []
    assert sorted((i["src"], i["sport"]) for i, _ in backend.headers) == sorted(clients)


def test_hash_groups_pick_by_the_client_address_from_the_header(balance, backends):
    """Behind a front tier a hash group sees one address for every client and
    pins all of them to one channel; with -A each client lands where it
    would if it connected directly."""
    tags = [backends(f"b{i}") for i in range(4)]
    group = [t.spec for t in tags] + ["%"]
    direct = free_port()
    balance.start("-b", "127.0.0.1", str(direct), *group, port=direct)
    fronted = free_port()
    balance.start("-A", "127.0.0.1", "-b", "127.0.0.1", str(fronted), *group, port=fronted)
    outer = free_port()
    balance.start("-P", "v1", "-b", "127.0.0.1", str(outer), f"127.0.0.1:{fronted}", port=outer)
    plain_outer = free_port()   # the same front tier without PROXY: one address for all
    balance.start("-b", "127.0.0.1", str(plain_outer), f"127.0.0.1:{direct}", port=plain_outer)

    def tag(port: int, src: str) -> str:
        with client(port, src, b"") as s:
            s.settimeout(10)
            return read_line(s)

    sources = [f"127.0.0.{i}" for i in range(2, 42)]
    expected = {src: tag(direct, src) for src in sources}
    assert len(set(expected.values())) >= 3          # the sources do spread
    assert {src: tag(outer, src) for src in sources} == expected
    assert len({tag(plain_outer, src) for src in sources}) == 1   # what -A cures


def test_v2_local_and_v1_unknown_keep_the_real_peer(balance, proxy_backend):
    backend = proxy_backend()
    inner = free_port()
    balance.start("-A", "any", "-P", "v2", "-b", "127.0.0.1", str(inner), backend.spec, port=inner)
    for src, header in (("127.0.0.3", V2_LOCAL_HEADER), ("127.0.0.4", b"PROXY UNKNOWN ff::1 ff::2 1 2\r\n"),
                        ("127.0.0.7", v2_header("10.1.2.3", "10.0.0.1", 4444, 80) + b"")):
        with client(inner, src, header + b"payload") as s:
            s.shutdown(socket.SHUT_WR)
            s.settimeout(10)
            while s.recv(65536):
                pass
    wait_for(lambda: len(backend.headers) == 3, 5)
    assert [(i["src"], i["command"]) for i, _ in backend.headers] == \
        [("127.0.0.3", "PROXY"), ("127.0.0.4", "PROXY"), ("10.1.2.3", "PROXY")]
    assert backend.errors == []


# -- hostile clients ---------------------------------------------------------------

def test_bad_headers_are_reset_never_forwarded_and_logged_once_per_source(balance, backends):
    backend = backends("b")
    port = free_port()
    proc = balance.start("-A", "any,timeout=0.5", "-b", "127.0.0.1", str(port), backend.spec, port=port)
    garbage = [b"GET / HTTP/1.0\r\n\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
               b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
               b"PROXY " + b"1" * 120, b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + bytes(12),
               b"\r\n\r\n\x00\r\nQUIX\n", b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff"]
    for payload in garbage:
        with client(port, "127.0.0.5", payload) as s:
            assert reset_or_eof(s, 5) == "reset", payload
    # Silence, and half a header: reset when the timeout runs out.
    for payload in (b"", b"PROXY TCP4 1.2.3", v2_header("1.2.3.4", "5.6.7.8", 1, 2)[:20]):
        with client(port, "127.0.0.6", payload) as s:
            t0 = time.monotonic()
            assert reset_or_eof(s, 5) == "reset"
            assert 0.3 < time.monotonic() - t0 < 3
    # A bare connect-and-close (a front tier's TCP check) is no error.
    for _ in range(3):
        client(port, "127.0.0.8", b"").close()
    # A good header still works.
    with client(port, "127.0.0.7", v1_header("10.9.8.7", "127.0.0.1", 5555, port)) as s:
        s.settimeout(10)
        assert read_line(s) == "b"
    _out, err = proc.stop()
    assert backend.connections == 1
    lines = err.splitlines()
    five = [line for line in lines if "127.0.0.5" in line]
    six = [line for line in lines if "127.0.0.6" in line]
    assert len(five) == 1 and "refused: invalid PROXY header" in five[0], lines
    assert len(six) == 1 and "no complete PROXY header within 0.5 s" in six[0], lines
    assert not [line for line in lines if "127.0.0.8" in line or "127.0.0.7" in line], lines


def test_a_client_without_its_header_holds_no_backend_slot(balance, backends):
    """maxc 1: silent clients wait for their header without taking the one slot."""
    backend = backends("b")
    port = free_port()
    balance.start("-A", "any,timeout=5", "-b", "127.0.0.1", str(port), f"{backend.spec}:1", port=port)
    silent = [client(port, "127.0.0.9", b"") for _ in range(5)]
    try:
        with client(port, "127.0.0.2", v2_header("192.0.2.1", "127.0.0.1", 1000, port)) as s:
            s.settimeout(10)
            assert read_line(s) == "b"
        assert backend.connections == 1
    finally:
        for s in silent:
            s.close()


def test_only_trusted_front_tiers_may_connect(balance, backends):
    backend = backends("b")
    port = free_port()
    proc = balance.start("-A", "127.0.0.1,127.0.1.0/24", "-b", "127.0.0.1", str(port), backend.spec,
                         port=port)
    header = v1_header("198.51.100.7", "127.0.0.1", 4321, port)
    for src in ("127.0.0.2", "127.0.0.3"):
        with client(port, src, b"") as s:
            try:                    # the reset may come before the header is sent
                s.sendall(header)
            except ConnectionResetError:
                continue
            assert reset_or_eof(s, 5) == "reset"
    for src in ("127.0.0.1", "127.0.1.77"):
        with client(port, src, header) as s:
            s.settimeout(10)
            assert read_line(s) == "b"
    _out, err = proc.stop()
    assert backend.connections == 2
    assert sum("127.0.0.2" in line and "not a trusted front tier" in line for line in err.splitlines()) == 1


def test_bad_A_arguments_are_usage_errors(balance):
    for arg, text in (("", "invalid front-tier address []"),
                      ("any,10.0.0.0/8", "either \"any\" or the front tier's addresses"),
                      ("10.0.0.1/8", "invalid front-tier address [10.0.0.1/8]"),
                      ("any,timeout=0", "invalid timeout [0] for -A"),
                      ("any,timeout=soon", "invalid timeout [soon] for -A")):
        done = balance.run("-f", "-A", arg, str(free_port()), "127.0.0.1:1")
        assert done.returncode == 64, arg
        assert done.stderr.startswith("balance: ") and text in done.stderr, done.stderr
    done = balance.run("-f", str(free_port()), "127.0.0.1:1", "-A")
    assert done.returncode == 64 and done.stderr.startswith("balance: option -A requires an argument\n")


# -- HAProxy in front ----------------------------------------------------------------

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)


@contextlib.contextmanager
def haproxy(tmp_path, bind: str, port: int, server: str, send: str):
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""\
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend front
    bind {bind}:{port}
    default_backend tier
backend tier
    server inner {server} {send} check inter 100ms
""")
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        wait_listening(port, host=bind.strip("[]"))
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_haproxy_front_tier_passes_the_original_client_on(balance, proxy_backend, tmp_path, send, family):
    if HAPROXY is None:
        pytest.skip("haproxy is not installed (packaging/deps.sh installs it for make test)")
    host = "::1" if family == 6 else "127.0.0.1"
    if family == 6:
        need_ipv6()
    backend = proxy_backend()
    inner, front = free_port(), free_port()
    proc = balance.start("-A", host, "-P", "v1", "-b", host, str(inner), backend.spec, port=inner, host=host)
    with haproxy(tmp_path, f"[{host}]" if family == 6 else host, front, endpoint(host, inner), send):
        sources = ["::1", "::1"] if family == 6 else ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        clients = [transfer(front, host, src) for src in sources]
        want = {(family, addr, port) for addr, port in clients}

        def seen() -> set:
            return {(i["family"], i.get("src"), i.get("sport")) for i, _peer in backend.headers}
        wait_for(lambda: want <= seen(), 5)
        time.sleep(0.5)     # HAProxy's checks (every 100 ms) go on meanwhile
    _out, err = proc.stop()
    assert "refused" not in err, err   # its checks are no errors either
    # HAProxy ends each check with a reset, which is passed on as it came
    # (after the header, or instead of a connection not yet linked): never
    # a clean end without a header, nor a bad one.
    assert all("Connection reset by peer" in e for e in backend.errors), backend.errors
    # Each client arrived once; anything else is one of HAProxy's checks,
    # which comes from HAProxy's own address (a LOCAL header, or its endpoints).
    clients_seen = [i for i, _ in backend.headers if (i["family"], i.get("src"), i.get("sport")) in want]
    assert len(clients_seen) == len(clients)
    for info, _peer in backend.headers:
        if info not in clients_seen:
            assert info.get("src") == host and info.get("sport") not in {p for _, p in clients}


def test_a_stop_waits_for_a_client_still_sending_its_header(balance, backends):
    """SIGTERM drains: a client accepted but still sending its header is an
    open connection too; it is served, then the master exits."""
    import signal

    backend = backends("b")
    port = free_port()
    proc = balance.start("-A", "any,timeout=5", "-b", "127.0.0.1", str(port), backend.spec, port=port)
    header = v1_header("203.0.113.5", "127.0.0.1", 999, port)
    with client(port, "127.0.0.2", header[:10]) as s:
        time.sleep(0.2)
        proc.p.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.p.poll() is None           # still draining: the client is waited for
        s.sendall(header[10:])
        s.settimeout(10)
        assert read_line(s) == "b"
    assert proc.p.wait(10) == 0
