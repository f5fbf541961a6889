"""gbalance.proxy.frontdoor: -A's argument, trusted sources, the rate-limited log, and
the header reader itself on real sockets driven by the gevent loop."""

from __future__ import annotations

import ipaddress
import socket
import time

import gevent
import pytest
from gevent import get_hub

from gbalance.errors import BalanceError
from gbalance.proxy.frontdoor import (DEFAULT_TIMEOUT, FrontDoor, FrontDoorSpec, RateLimitedLog, parse_frontdoor,
                                trusted_matcher)
from gbalance.proxy.proxyproto import HEADER_MAX, V2_LOCAL_HEADER, v1_header, v2_header


# -- -A's argument -------------------------------------------------------------------

def test_parse_any_and_lists():
    assert parse_frontdoor("any") == FrontDoorSpec(None, DEFAULT_TIMEOUT)
    spec = parse_frontdoor("10.0.0.0/8,192.0.2.7,::1,2001:db8::/32,timeout=1.5")
    assert spec.timeout == 1.5
    assert spec.trusted == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.7/32"),
                            ipaddress.ip_network("::1/128"), ipaddress.ip_network("2001:db8::/32"))


@pytest.mark.parametrize("text", ["", "any,", "none", "10.0.0.1/8", "10.0.0.0/33", "any,10.0.0.1",
                                  "timeout=2", "any,timeout=", "any,timeout=-1", "any,timeout=0",
                                  "any,timeout=inf", "any,timeout=nan", "any,timeout=301", "host.example"])
def test_parse_rejects(text):
    with pytest.raises(BalanceError) as exc:
        parse_frontdoor(text)
    assert exc.value.code == 64 and "-A" in exc.value.message


def test_trusted_matcher():
    trusted = trusted_matcher(parse_frontdoor("127.0.0.1,10.1.0.0/16,2001:db8::/32").trusted)
    assert trusted("127.0.0.1") and trusted("10.1.255.3") and trusted("2001:db8::9")
    assert trusted("::ffff:10.1.2.3")          # a v4 client on a dual-stack listener
    assert trusted("2001:db8::1%eth0")
    assert not trusted("127.0.0.2") and not trusted("10.2.0.1") and not trusted("::1")
    assert not trusted("not an address") and not trusted("")
    # Asked again (remembered, or not): the same answers.
    assert trusted("127.0.0.1") and trusted("::ffff:10.1.2.3") and not trusted("127.0.0.2")


def test_trusted_matcher_remembers_a_bounded_number_of_addresses(monkeypatch):
    from gbalance.proxy import frontdoor
    monkeypatch.setattr(frontdoor, "TRUSTED_CACHE_MAX", 4)
    trusted = trusted_matcher(parse_frontdoor("10.0.0.0/8").trusted)
    assert all(trusted(f"10.0.0.{i}") for i in range(50))
    assert all(trusted(f"10.0.0.{i}") for i in range(50))
    assert trusted.__closure__ is not None
    known = [c.cell_contents for c in trusted.__closure__ if isinstance(c.cell_contents, set)][0]
    assert len(known) == 4
    assert not any(trusted(f"11.0.0.{i}") for i in range(50)) and len(known) == 4


# -- the log: once per source per interval ---------------------------------------------

def test_rate_limited_log_once_per_source_per_interval():
    lines: list[str] = []
    now = [0.0]
    log = RateLimitedLog(lines.append, lambda: now[0], interval=60, limit=3)
    for _ in range(5):
        log("a", "from a")
    log("b", "from b")
    assert lines == ["from a", "from b"]
    now[0] = 59.9
    log("a", "from a")
    assert len(lines) == 2
    now[0] = 60.0
    log("a", "from a")
    assert lines[-1] == "from a (5 more since the last report)"
    log("b", "from b")
    assert lines[-1] == "from b"
    # Bounded memory: past `limit` sources in one interval, one summary line later.
    for src in "cdefg":
        log(src, f"from {src}")
    assert lines[-1] == "from c" and len(lines) == 5
    now[0] = 121.0
    log("h", "from h")
    assert lines[-2:] == ["4 more connections refused from other sources", "from h"]


# -- the reader on real sockets ------------------------------------------------------------

class FakeLog:
    def __init__(self):
        self.warnings: list[str] = []
        self.errors: list[str] = []
        self.traces: list[str] = []

    def warning(self, text: str) -> None:
        self.warnings.append(text)

    def error(self, text: str) -> None:
        self.errors.append(text)

    def trace(self, text: str) -> None:
        self.traces.append(text)


class Door:
    """A FrontDoor on the test's hub, fed by a real loopback listener."""

    def __init__(self, spec: str = "any,timeout=0.3", debug: bool = False):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.log = FakeLog()
        self.handed: list[tuple[socket.socket, tuple]] = []
        self.door = FrontDoor(get_hub().loop, socket.AF_INET, parse_frontdoor(spec), self.log, debug=debug)
        self.accept = self.door.wrap(lambda fd, addr: self.handed.append((socket.socket(fileno=fd), addr)))

    def connect(self, source: str = "127.0.0.2") -> socket.socket:
        c = socket.socket()
        c.bind((source, 0))
        c.connect(("127.0.0.1", self.port))
        fd_sock, addr = self.listener.accept()
        self.accept(fd_sock.detach(), addr)
        return c

    def close(self) -> None:
        self.door.close_all()
        for s, _ in self.handed:
            s.close()
        self.listener.close()


@pytest.fixture
def door():
    made = []

    def make(*args, **kw) -> Door:
        d = Door(*args, **kw)
        made.append(d)
        return d
    yield make
    for d in made:
        d.close()


def settle(pred, timeout: float = 3.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "not settled"
        gevent.sleep(0.01)


def peer_result(c: socket.socket) -> str:
    c.settimeout(3)
    try:
        return "data" if c.recv(10) else "eof"
    except ConnectionResetError:
        return "reset"


def test_header_at_connect_is_handled_at_once_and_the_rest_stays(door):
    d = door()
    c = d.connect("127.0.0.2")
    c.sendall(v1_header("203.0.113.9", "127.0.0.1", 4242, d.port) + b"first bytes")
    settle(lambda: d.handed)
    sock, addr = d.handed[0]
    assert addr == ("203.0.113.9", 4242)
    sock.settimeout(3)
    assert sock.recv(100) == b"first bytes"      # not one byte past the header was taken
    assert not d.door.waiting and not d.log.warnings
    c.close()


@pytest.mark.parametrize("header", [v1_header("2001:db8::5", "::1", 1, 2), v2_header("198.51.100.1", "127.0.0.1", 7, 8)])
def test_a_header_in_single_bytes(door, header):
    d = door("any,timeout=5")
    c = d.connect()
    for i in range(len(header)):
        c.send(header[i:i + 1])
        gevent.sleep(0.002)
        if i < len(header) - 1:
            assert not d.handed
    c.sendall(b"after")
    settle(lambda: d.handed)
    sock, addr = d.handed[0]
    assert addr[0] in ("2001:db8::5", "198.51.100.1")
    sock.settimeout(3)
    assert sock.recv(100) == b"after"
    c.close()


def test_local_keeps_the_real_peer_and_debug_traces_the_client(door):
    d = door(debug=True)
    c = d.connect("127.0.0.3")
    c.sendall(V2_LOCAL_HEADER)
    settle(lambda: d.handed)
    assert d.handed[0][1][0] == "127.0.0.3"
    c2 = d.connect("127.0.0.4")
    c2.sendall(v2_header("192.0.2.44", "127.0.0.1", 5, 6))
    settle(lambda: len(d.handed) == 2)
    assert d.log.traces[-1] == "PROXY v2 header from 127.0.0.4: client 192.0.2.44:5\n"
    c.close()
    c2.close()


def test_silence_and_half_headers_time_out_with_a_reset(door):
    d = door("any,timeout=0.3")
    silent = d.connect("127.0.0.5")
    half = d.connect("127.0.0.6")
    half.sendall(b"PROXY TCP4 10.0.0.1 ")
    gevent.sleep(0.1)
    assert len(d.door.waiting) == 2
    settle(lambda: not d.door.waiting)
    assert peer_result(silent) == "reset" and peer_result(half) == "reset"
    assert not d.handed
    assert sorted(d.log.warnings) == [
        "connection from 127.0.0.5 refused: no complete PROXY header within 0.3 s (0 bytes)",
        "connection from 127.0.0.6 refused: no complete PROXY header within 0.3 s (20 bytes)"]
    silent.close()
    half.close()


def test_garbage_is_reset_at_once(door):
    d = door("any,timeout=30")
    c = d.connect("127.0.0.7")
    c.sendall(b"SSH-2.0-OpenSSH\r\n")
    settle(lambda: d.log.warnings, 1)
    assert peer_result(c) == "reset"
    assert d.log.warnings == ["connection from 127.0.0.7 refused: invalid PROXY header: no PROXY protocol signature"]
    assert not d.handed and not d.door.waiting
    c.close()


def test_a_header_longer_than_the_limit_is_refused(door):
    d = door("any,timeout=30")
    c = d.connect()
    c.sendall(b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + (HEADER_MAX).to_bytes(2, "big") + bytes(5000))
    settle(lambda: d.log.warnings, 1)
    assert peer_result(c) == "reset"
    assert "at most" in d.log.warnings[0]
    c.close()


def test_leaving_quietly_or_mid_header(door):
    d = door("any,timeout=30")
    c = d.connect("127.0.0.8")
    c.close()                         # a TCP check: not worth a line
    c = d.connect("127.0.0.9")
    c.sendall(b"PROXY TCP4")
    gevent.sleep(0.05)
    c.close()                         # half a header, then gone: worth one
    settle(lambda: not d.door.waiting)
    assert d.log.warnings == ["connection from 127.0.0.9 refused: connection closed inside the PROXY header"
                              " (10 bytes)"]
    assert not d.handed


def test_untrusted_sources_are_reset_before_any_read(door):
    d = door("127.0.0.1,timeout=30")
    c = d.connect("127.0.0.2")
    assert peer_result(c) == "reset"      # at accept: not even the header is read
    assert d.log.warnings == ["connection from 127.0.0.2 refused: not a trusted front tier"]
    ok = d.connect("127.0.0.1")
    ok.sendall(v1_header("1.2.3.4", "127.0.0.1", 1, 2))
    settle(lambda: d.handed)
    assert d.handed[0][1] == ("1.2.3.4", 1)
    c.close()
    ok.close()


def test_close_all_resets_the_clients_still_waiting(door):
    d = door("any,timeout=30")
    cs = [d.connect() for _ in range(3)]
    gevent.sleep(0.02)
    assert d.door.close_all() == 3
    assert [peer_result(c) for c in cs] == ["reset"] * 3
    for c in cs:
        c.close()


def test_settled_is_called_when_the_last_waiting_client_is_settled(door):
    d = door("any,timeout=0.3")
    calls = []
    d.door.settled = lambda: calls.append(len(d.door.waiting))
    late = d.connect("127.0.0.2")
    silent = d.connect("127.0.0.3")
    gevent.sleep(0.05)
    late.sendall(v2_header("192.0.2.1", "127.0.0.1", 1, 2))
    settle(lambda: d.handed)
    assert calls == []                   # one still waits
    settle(lambda: calls)
    assert calls == [0]
    late.close()
    silent.close()
