"""PROXY protocol headers: exact bytes, a round trip through a decoder, real sockets.

The decoder below is written from the HAProxy specification independently
of ``gbalance.proxy.proxyproto`` and is strict: anything the specification does
not allow a sender to emit is rejected.  ``decode`` is also used by the
end-to-end tests.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import gevent
import gevent.socket as gsocket
import pytest

from conftest import free_port, ipv6_available
from gbalance.proxy import proxyproto
from gbalance.errors import BalanceError
from gbalance.proxy.proxyproto import (V1_UNKNOWN, V2_LOCAL_HEADER, V2_SIGNATURE, Version, check_header,
                                 header_maker, parse_version, send_header, v1_header, v2_header)

SIG = b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A"


class Bad(ValueError):
    """Not a header a conforming sender may produce."""


def _v1_addr(text: str, v6: bool) -> str:
    if v6:
        if not text or not all(c in "0123456789abcdefABCDEF:" for c in text):
            raise Bad(f"bad IPv6 address {text!r}")
        return str(ipaddress.IPv6Address(text))
    parts = text.split(".")
    if len(parts) != 4 or any(not p.isdigit() or (len(p) > 1 and p[0] == "0") or int(p) > 255 for p in parts):
        raise Bad(f"bad IPv4 address {text!r}")
    return text


def _v1_port(text: str) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise Bad(f"bad port {text!r}")
    return int(text)


def decode(data: bytes) -> tuple[dict | None, int]:
    """Parse the header at the start of ``data``.

    Returns ``(info, length)``: ``info`` is None while ``data`` is too short
    to tell; otherwise a dict with ``version``, ``command`` (``PROXY``,
    ``LOCAL`` or ``UNKNOWN``) and, for addressed headers, ``family`` (4 or
    6), ``src``, ``dst``, ``sport``, ``dport``.  Raises :class:`Bad`.
    """
    if data[:1] == b"P":
        if not b"PROXY "[: len(data)] == data[:6]:
            raise Bad("not a PROXY line")
        end = data.find(b"\r\n")
        if end < 0:
            if len(data) >= 107 or b"\n" in data:
                raise Bad("no CRLF in 107 bytes")
            return None, 0
        if end + 2 > 107:
            raise Bad("line too long")
        line = data[:end].decode("ascii")
        words = line.split(" ")
        if words[1] == "UNKNOWN":
            return {"version": 1, "command": "UNKNOWN"}, end + 2
        if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
            raise Bad(f"bad line {line!r}")
        v6 = words[1] == "TCP6"
        return {"version": 1, "command": "PROXY", "family": 6 if v6 else 4,
                "src": _v1_addr(words[2], v6), "dst": _v1_addr(words[3], v6),
                "sport": _v1_port(words[4]), "dport": _v1_port(words[5])}, end + 2
    if len(data) < 16:
        if SIG[: len(data)] != data[:12]:
            raise Bad("neither v1 nor v2")
        return None, 0
    if data[:12] != SIG:
        raise Bad("bad v2 signature")
    ver_cmd, fam, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    if ver_cmd >> 4 != 2 or ver_cmd & 0xF not in (0, 1):
        raise Bad(f"bad version/command {ver_cmd:#x}")
    if len(data) < 16 + length:
        return None, 0
    if ver_cmd & 0xF == 0:
        return {"version": 2, "command": "LOCAL"}, 16 + length
    block = data[16:16 + length]
    if fam == 0x11:
        if length < 12:
            raise Bad("short IPv4 block")
        src, dst, sport, dport = struct.unpack("!4s4sHH", block[:12])
        return {"version": 2, "command": "PROXY", "family": 4, "src": socket.inet_ntop(socket.AF_INET, src),
                "dst": socket.inet_ntop(socket.AF_INET, dst), "sport": sport, "dport": dport}, 16 + length
    if fam == 0x21:
        if length < 36:
            raise Bad("short IPv6 block")
        src, dst, sport, dport = struct.unpack("!16s16sHH", block[:36])
        return {"version": 2, "command": "PROXY", "family": 6,
                "src": str(ipaddress.IPv6Address(src)), "dst": str(ipaddress.IPv6Address(dst)),
                "sport": sport, "dport": dport}, 16 + length
    if fam == 0x00:
        return {"version": 2, "command": "UNKNOWN"}, 16 + length
    raise Bad(f"bad family/protocol {fam:#x}")


# -- exact bytes ---------------------------------------------------------------

def test_signature_is_the_specified_twelve_bytes():
    assert V2_SIGNATURE == SIG and len(SIG) == 12


def test_v1_example_from_the_specification():
    assert v1_header("192.168.0.1", "192.168.0.11", 56324, 443) == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"


def test_v1_longest_lines_fit_the_specified_limits():
    four = v1_header("255.255.255.255", "255.255.255.255", 65535, 65535)
    assert four == b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n" and len(four) == 56
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    six = v1_header(full, full, 65535, 65535)
    assert six == f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode() and len(six) == 104


def test_v1_ipv6_and_port_zero():
    assert v1_header("2001:db8::1", "::1", 0, 80) == b"PROXY TCP6 2001:db8::1 ::1 0 80\r\n"


def test_v1_mapped_clients_are_sent_as_tcp4():
    assert v1_header("::ffff:127.0.0.7", "::ffff:127.0.0.1", 40000, 8080) == \
        b"PROXY TCP4 127.0.0.7 127.0.0.1 40000 8080\r\n"


def test_v1_scope_is_dropped():
    assert v1_header("fe80::1%lo", "fe80::2%lo", 1, 2) == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"


def test_v2_ipv4_exact_bytes():
    got = v2_header("192.168.0.1", "192.168.0.11", 56324, 443)
    assert got == SIG + b"\x21\x11\x00\x0c" + bytes([192, 168, 0, 1, 192, 168, 0, 11]) + b"\xdc\x04\x01\xbb"
    assert len(got) == 16 + 12


def test_v2_ipv6_exact_bytes():
    got = v2_header("2001:db8::1", "::1", 65535, 80)
    want = (SIG + b"\x21\x21\x00\x24"
            + bytes.fromhex("20010db8000000000000000000000001") + bytes.fromhex("00" * 15 + "01")
            + b"\xff\xff\x00\x50")
    assert got == want and len(got) == 16 + 36


def test_v2_mapped_clients_are_sent_as_af_inet():
    assert v2_header("::ffff:10.1.2.3", "::ffff:127.0.0.1", 1234, 80) == v2_header("10.1.2.3", "127.0.0.1", 1234, 80)


def test_mixed_families_stay_consistent():
    # Cannot come from one socket, but the header must still be valid: both IPv6.
    info, _ = decode(v1_header("10.0.0.1", "::1", 1, 2))
    assert info["family"] == 6 and info["src"] == "::ffff:a00:1"
    info, _ = decode(v2_header("::1", "10.0.0.1", 1, 2))
    assert info["family"] == 6 and info["dst"] == "::ffff:a00:1"


def test_local_and_unknown_forms():
    assert V1_UNKNOWN == b"PROXY UNKNOWN\r\n"
    assert V2_LOCAL_HEADER == SIG + b"\x20\x00\x00\x00"
    assert proxyproto.V2_UNSPEC_HEADER == SIG + b"\x21\x00\x00\x00"
    assert decode(V1_UNKNOWN)[0] == {"version": 1, "command": "UNKNOWN"}
    assert decode(V2_LOCAL_HEADER)[0] == {"version": 2, "command": "LOCAL"}
    assert decode(proxyproto.V2_UNSPEC_HEADER)[0] == {"version": 2, "command": "UNKNOWN"}


@pytest.mark.parametrize("src,dst", [("1.2.3.4", "5.6.7.8"), ("0.0.0.0", "255.255.255.255"),
                                     ("::1", "2001:db8:85a3::8a2e:370:7334"), ("fe80::1", "::"),
                                     ("::ffff:192.0.2.9", "::ffff:192.0.2.1")])
@pytest.mark.parametrize("build", [v1_header, v2_header])
def test_round_trip_through_the_decoder(build, src, dst):
    data = build(src, dst, 54321, 7) + b"payload"
    info, n = decode(data)
    assert data[n:] == b"payload"
    mapped = src.startswith("::ffff:")
    want_src = src[7:] if mapped else str(ipaddress.ip_address(src))
    want_dst = dst[7:] if mapped else str(ipaddress.ip_address(dst))
    assert (info["src"], info["dst"], info["sport"], info["dport"]) == (want_src, want_dst, 54321, 7)
    assert info["family"] == (4 if "." in want_src else 6)
    # A receiver reading byte by byte never sees a complete header early.
    for cut in range(n):
        assert decode(data[:cut])[0] is None


def test_parse_version():
    assert parse_version("v1") is Version.V1 and parse_version("V2") is Version.V2
    for bad in ("v3", "1", "", "v1 ", "proxy"):
        with pytest.raises(BalanceError) as exc:
            parse_version(bad)
        assert exc.value.code == 64 and "-P" in exc.value.message and "\n" not in exc.value.message


# -- real sockets ------------------------------------------------------------------

def _accepted(listener: socket.socket, src: str | None = None) -> tuple[socket.socket, socket.socket, tuple]:
    """Connect to ``listener`` (from ``src`` if given); the client, the accepted socket, its peer address."""
    family = listener.family if src is None or ":" in src else socket.AF_INET
    client = socket.socket(family, socket.SOCK_STREAM)
    if src is not None:
        client.bind((src, 0))
    host, port = listener.getsockname()[:2]
    if host in ("0.0.0.0", "::") or host.startswith("::ffff:"):
        host = "127.0.0.1" if family == socket.AF_INET else "::1"
    client.connect((host, port))
    conn, peer = listener.accept()
    return client, conn, peer


def _listener(family: int, host: str, v6only: bool = False) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    s.bind((host, 0))
    s.listen(8)
    return s


CASES = [  # listener family, bind, client source, expected family
    (socket.AF_INET, "127.0.0.1", "127.0.0.5", 4),     # fixed destination
    (socket.AF_INET, "0.0.0.0", "127.0.0.6", 4),       # wildcard: getsockname per connection
    (socket.AF_INET6, "::", "127.0.0.7", 4),           # dual stack, v4-mapped client
    (socket.AF_INET6, "::", "::1", 6),
    (socket.AF_INET6, "::1", "::1", 6),
]


@pytest.mark.parametrize("family,bind,src,fam", CASES)
@pytest.mark.parametrize("version", list(Version))
def test_header_maker_on_real_connections(version, family, bind, src, fam):
    if family == socket.AF_INET6 and not ipv6_available():
        pytest.fail("IPv6 loopback is required on this machine")
    listener = _listener(family, bind)
    client, conn, peer = _accepted(listener, src)
    try:
        make = header_maker(version, listener)
        info, n = decode(make(conn, peer))
        cs, cp = client.getsockname()[:2]
        ds, dp = client.getpeername()[:2]
        assert info["version"] == (1 if version is Version.V1 else 2)
        assert (info["family"], info["src"], info["sport"], info["dst"], info["dport"]) == \
            (fam, cs.removeprefix("::ffff:"), cp, ds.removeprefix("::ffff:"), dp)
    finally:
        for s in (client, conn, listener):
            s.close()


def test_fixed_listener_with_mapped_bind_address():
    """``-6 -b ::ffff:127.0.0.1``: the destination itself is mapped; sent as TCP4."""
    listener = _listener(socket.AF_INET6, "::ffff:127.0.0.1")
    client, conn, peer = _accepted(listener, "127.0.0.3")
    try:
        for version in Version:
            info, _ = decode(header_maker(version, listener)(conn, peer))
            assert (info["family"], info["src"], info["dst"]) == (4, "127.0.0.3", "127.0.0.1")
    finally:
        for s in (client, conn, listener):
            s.close()


def test_wildcard_maker_survives_a_closed_client():
    listener = _listener(socket.AF_INET, "0.0.0.0")
    client, conn, peer = _accepted(listener)
    conn.close()   # getsockname now fails: the header says "unknown", nothing raises
    try:
        assert header_maker(Version.V1, listener)(conn, peer) == V1_UNKNOWN
        assert header_maker(Version.V2, listener)(conn, peer) == proxyproto.V2_UNSPEC_HEADER
    finally:
        client.close()
        listener.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_check_header_uses_the_check_sockets_own_endpoints(host):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = _listener(family, host)
    client, conn, peer = _accepted(listener)
    try:
        info, _ = decode(check_header(Version.V1, client))
        here, there = client.getsockname(), client.getpeername()
        assert (info["src"], info["sport"], info["dst"], info["dport"]) == (here[0], here[1], there[0], there[1])
        assert check_header(Version.V2, client) == V2_LOCAL_HEADER
        dead = socket.socket(family)      # never connected: no peer to describe
        assert check_header(Version.V1, dead) == V1_UNKNOWN
        dead.close()
    finally:
        for s in (client, conn, listener):
            s.close()


def test_send_header_on_a_full_socket_keeps_every_byte():
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        assert send_header(a, b"PROXY UNKNOWN\r\n") == b""
        assert b.recv(100) == b"PROXY UNKNOWN\r\n"
        while True:     # fill a's send buffer and b's receive buffer
            try:
                a.send(b"x" * 65536)
            except BlockingIOError:
                break
        header = v2_header("10.0.0.1", "10.0.0.2", 1, 2)
        assert send_header(a, header) == header
        b.close()
        assert send_header(a, header) == header   # an error: the caller's next send meets it
    finally:
        a.close()
        b.close()


# -- the server's hook: a partial send still puts the whole header first ------------

@pytest.mark.parametrize("early", [False, True], ids=["direct", "client-talks-first"])
def test_partial_header_send_goes_before_client_data(tmp_path, monkeypatch, hanging, early):
    """Force the rare partial send in a real in-process master: the backend
    must read the whole header, then the client's bytes, in order.  With a
    first channel whose connect hangs, the client's bytes arrive while the
    connect is pending (read early by the race, sent by the link on start):
    they too must follow the whole header."""
    from gbalance.proxy import server as server_mod
    from gbalance.cli import parse
    from gbalance.log import Log
    from gbalance.process.master import Master

    sent_parts: list[bytes] = []
    early_seen: list[bool] = []

    def partial(sock, header):
        n = sock.send(header[:5])
        sent_parts.append(header[:n])
        return header[n:]

    class SpyLink(server_mod.Link):
        # A subclass, not a patched method: compiled, Link is an extension type.
        __slots__ = ()

        def start(self, preamble=b"", oob=b""):
            early_seen.append(bool(self.early))
            super().start(preamble, oob)

    monkeypatch.setattr(server_mod, "send_header", partial)
    monkeypatch.setattr(server_mod, "Link", SpyLink)
    monkeypatch.setenv("BALANCE_STATE_DIR", str(tmp_path))
    backend = gsocket.socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen(4)
    port = free_port()
    channels = [f"127.0.0.1:{backend.getsockname()[1]}"]
    if early:
        channels = ["-t", "0.5", hanging().spec, "!", *channels]
    cfg = parse(["-f", "-P", "v1", "-b", "127.0.0.1", str(port), *channels])
    master = Master(cfg, Log(foreground=True))
    try:
        master.build()
        master.listener.listen(16)
        master.server.start()
        with gevent.Timeout(10):
            client = gsocket.create_connection(("127.0.0.1", port))
            client.sendall(b"hello, backend")
            conn, _ = backend.accept()
            data = b""
            while not data.endswith(b"hello, backend"):
                chunk = conn.recv(4096)
                assert chunk, data
                data += chunk
            info, n = decode(data)
            assert data[n:] == b"hello, backend"
            assert (info["src"], info["sport"]) == client.getsockname()
            assert (info["dst"], info["dport"]) == ("127.0.0.1", port)
            conn.sendall(b"reply")
            assert client.recv(100) == b"reply"
        assert sent_parts == [b"PROXY"]
        if early:   # (with a direct backend the client's bytes may or may not come early)
            assert early_seen == [True]
        client.close()
        conn.close()
    finally:
        if hasattr(master, "server"):     # (build() made it)
            master.server.stop()
        master.remove_state()
        backend.close()


def test_cli_option_reaches_the_config():
    from gbalance.cli import parse

    assert parse(["-P", "v2", "8080", "127.0.0.1:81"]).proxy_protocol is Version.V2
    assert parse(["-fP", "V1", "8080", "127.0.0.1:81"]).proxy_protocol is Version.V1
    assert parse(["8080", "127.0.0.1:81"]).proxy_protocol is None


@pytest.mark.parametrize("args,on", [([], False), (["-P", "v1"], True)])
def test_without_P_nothing_is_hooked(tmp_path, monkeypatch, args, on):
    """No -P: the server and the monitor get no header function (no per-connection cost)."""
    from gbalance.cli import parse
    from gbalance.log import Log
    from gbalance.process.master import Master

    monkeypatch.setenv("BALANCE_STATE_DIR", str(tmp_path))
    cfg = parse([*args, "-m", "connect", str(free_port()), "127.0.0.1:81"])
    master = Master(cfg, Log(foreground=True))
    try:
        master.build()
        assert (master.server.proxy is not None) is on
        assert (master.monitor.proxy_header is not None) is on
    finally:
        master.listener.close()
        master.remove_state()


# -- receiving: parse_header with hostile input ----------------------------------------

from gbalance.proxy.proxyproto import HEADER_MAX, V1_MAX, V2_MAX_BODY, HeaderError, Received, parse_header  # noqa: E402


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def v2_raw(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return SIG + bytes([ver_cmd, fam]) + n.to_bytes(2, "big") + body


GOOD = {
    "v1-tcp4": (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
                Received(45, 1, ("192.0.2.1", 56324), ("198.51.100.2", 443))),
    "v1-tcp6": (b"PROXY TCP6 2001:DB8:0:0::1 ::1 0 65535\r\n",
                Received(40, 1, ("2001:db8::1", 0), ("::1", 65535))),
    "v1-unknown": (b"PROXY UNKNOWN\r\n", Received(15, 1)),
    "v1-unknown-with-addresses": (b"PROXY UNKNOWN ffff:f::1 ::2 65535 65535\r\n", Received(41, 1)),
    "v1-longest": (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
                   b" 65535 65535\r\n",
                   Received(104, 1, ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
                            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535))),
    "v2-tcp4": (v2_header("10.0.0.1", "10.0.0.2", 1, 2), Received(28, 2, ("10.0.0.1", 1), ("10.0.0.2", 2))),
    "v2-tcp6": (v2_header("fe80::1", "::ffff:1.2.3.4", 65535, 0),
                Received(52, 2, ("fe80::1", 65535), ("::ffff:1.2.3.4", 0))),
    "v2-local": (V2_LOCAL_HEADER, Received(16, 2)),
    "v2-local-with-block": (v2_raw(0x20, 0x11, bytes(12) + b"\xff\xff"), Received(30, 2)),
    "v2-unspec": (v2_raw(0x21, 0x00, b""), Received(16, 2)),
    "v2-unix": (v2_raw(0x21, 0x31, bytes(216)), Received(232, 2)),
    "v2-tlvs": (v2_raw(0x21, 0x11, socket.inet_aton("10.0.0.1") + socket.inet_aton("10.0.0.2")
                       + b"\x00\x01\x00\x02" + tlv(0x02, b"example.org") + tlv(0x04, b"") + tlv(0xE0, b"x" * 300)),
                Received(16 + 12 + 14 + 3 + 303, 2, ("10.0.0.1", 1), ("10.0.0.2", 2))),
    "v2-largest": (v2_raw(0x21, 0x11, bytes(12) + tlv(0x04, bytes(V2_MAX_BODY - 15))),
                   Received(HEADER_MAX, 2, ("0.0.0.0", 0), ("0.0.0.0", 0))),
}


@pytest.mark.parametrize("name", list(GOOD))
def test_parse_valid_headers(name):
    data, want = GOOD[name]
    assert parse_header(data) == want
    # What follows the header is not part of it.
    assert parse_header(data + b"GET / HTTP/1.1\r\n") == want
    # Every strict prefix asks for more, never fails or claims a header.
    for n in range(len(data)):
        assert parse_header(data[:n]) is None, n


BAD = {
    "http": b"GET / HTTP/1.1\r\n",
    "lowercase": b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "no-space": b"PROXYTCP4",
    "tab": b"PROXY\tTCP4",
    "two-spaces": b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
    "lf-only": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    "cr-inside": b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n",
    "nul": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\x00\r\n",
    "high-byte": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xb2\r\n",
    "udp4": b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "tcp6-with-v4": b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    "tcp4-with-v6": b"PROXY TCP4 ::1 ::2 1 2\r\n",
    "octal-ish": b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
    "short-v4": b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    "v4-256": b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    "scope": b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    "port-big": b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    "port-zero-pad": b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    "port-empty": b"PROXY TCP4 1.2.3.4 5.6.7.8  2\r\n",
    "port-sign": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
    "four-fields": b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    "six-fields": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    "v1-too-long": b"PROXY UNKNOWN " + b"1" * (V1_MAX - 14),
    "v1-crlf-past-limit": b"PROXY UNKNOWN " + b"1" * (V1_MAX - 15) + b"\r\n",
    "v2-bad-signature": b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c",
    "v2-early-garbage": b"\r\n\r\nX",
    "v2-version-1": v2_raw(0x11, 0x11, bytes(12)),
    "v2-version-3": v2_raw(0x31, 0x11, bytes(12)),
    "v2-command-2": v2_raw(0x22, 0x11, bytes(12)),
    "v2-family-4": v2_raw(0x21, 0x41, bytes(12)),
    "v2-udp4": v2_raw(0x21, 0x12, bytes(12)),
    "v2-tcp4-short": v2_raw(0x21, 0x11, bytes(11)),
    "v2-tcp6-short": v2_raw(0x21, 0x21, bytes(35)),
    "v2-unix-short": v2_raw(0x21, 0x31, bytes(215)),
    "v2-oversized": v2_raw(0x21, 0x11, b"", length=V2_MAX_BODY + 1),
    "v2-max-length": v2_raw(0x21, 0x11, b"", length=0xFFFF),
    "v2-tlv-truncated-head": v2_raw(0x21, 0x11, bytes(12) + b"\x04\x00"),
    "v2-tlv-overruns": v2_raw(0x21, 0x11, bytes(12) + b"\x04\x00\x05abc"),
    "v2-tlv-trailing-byte": v2_raw(0x21, 0x11, bytes(12) + tlv(0x04, b"ab") + b"\x00"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_parse_refuses_hostile_headers(name):
    data = BAD[name]
    with pytest.raises(HeaderError):
        parse_header(data)
    with pytest.raises(HeaderError):
        parse_header(data + b"\r\n" + bytes(HEADER_MAX))


def test_garbage_is_refused_at_its_first_byte():
    """No wait for a timeout when the first bytes cannot begin a header."""
    for first in range(256):
        if first in (0x50, 0x0D):
            continue
        with pytest.raises(HeaderError):
            parse_header(bytes([first]))


def test_v2_oversize_is_refused_from_its_first_sixteen_bytes():
    with pytest.raises(HeaderError, match="at most"):
        parse_header(v2_raw(0x21, 0x11, b"", length=V2_MAX_BODY + 1))


def test_random_input_never_breaks_the_parser():
    """Random and mutated headers: a header within the data, None, or HeaderError."""
    import random
    rng = random.Random(20)
    seeds = [d for d, _ in GOOD.values()]
    for _ in range(20000):
        if rng.random() < 0.5:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data[:rng.randint(0, len(data))])
        else:
            data = rng.choice((b"PROXY ", SIG, b"")) + rng.randbytes(rng.randint(0, 300))
        try:
            got = parse_header(data)
        except HeaderError:
            continue
        if got is not None:
            assert 0 < got.length <= min(len(data), HEADER_MAX)
            assert got.length <= V1_MAX or data[0] == 0x0D
