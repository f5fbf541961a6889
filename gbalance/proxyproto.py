"""PROXY protocol headers (HAProxy's specification, versions 1 and 2).

With ``-P v1`` or ``-P v2`` every backend connection starts with a header
that tells the backend who the client is: the client's address and port
(source) and the address and port the client connected to on the proxy
(destination).  Version 1 is one line of ASCII text, version 2 a binary
block; both are sent before any byte of the client's data.

Family rules:

* IPv4 clients give ``TCP4`` (v1) or ``AF_INET``/``STREAM`` (v2);
* IPv6 clients give ``TCP6`` or ``AF_INET6``/``STREAM``;
* an IPv4 client accepted on a dual-stack ``-6`` listener appears as a
  v4-mapped IPv6 address (``::ffff:a.b.c.d``); it is sent as IPv4, as if
  the listener had been IPv4 only, because that is the client's real
  address and what a backend expects to log or filter on.  The scope of a
  link-local IPv6 address (``%eth0``) is dropped: it means nothing to the
  backend.

Health checks (``-m connect``) are connections the proxy makes for itself.
Version 2 has a command for exactly that: ``LOCAL`` with no address block.
For version 1 the specification advises against ``PROXY UNKNOWN`` on
connections meant to be accepted (some servers reject it) and recommends a
valid line filled with the check socket's own endpoints; :func:`check_header`
does that and falls back to ``PROXY UNKNOWN`` only when the endpoints cannot
be read.

Cost: everything constant is built once per listener (the v2 prefix, and
the whole destination part when the listener is bound to one address); per
connection only the client's part is formatted, plus one ``getsockname``
when the listener is a wildcard (the destination then depends on the
address the client chose).
"""

from __future__ import annotations

import enum
import socket
import struct
from typing import Callable

from gbalance.errors import EX_USAGE, BalanceError

#: The 12-byte signature that starts every version 2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Version 2 (high nibble) with the PROXY (1) or LOCAL (0) command.
V2_PROXY = 0x21
V2_LOCAL = 0x20
#: Family (high nibble) and transport (low nibble): TCP over IPv4 / IPv6.
V2_TCP4 = 0x11
V2_TCP6 = 0x21
V2_UNSPEC = 0x00
#: Length of the address block: two addresses and two ports.
V2_LEN4 = 2 * 4 + 2 * 2
V2_LEN6 = 2 * 16 + 2 * 2

V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V2_LOCAL_HEADER = V2_SIGNATURE + bytes((V2_LOCAL, V2_UNSPEC, 0, 0))
#: A relayed connection whose addresses cannot be told (v2's "UNKNOWN").
V2_UNSPEC_HEADER = V2_SIGNATURE + bytes((V2_PROXY, V2_UNSPEC, 0, 0))

_V2_HEAD4 = V2_SIGNATURE + bytes((V2_PROXY, V2_TCP4)) + V2_LEN4.to_bytes(2, "big")
_V2_HEAD6 = V2_SIGNATURE + bytes((V2_PROXY, V2_TCP6)) + V2_LEN6.to_bytes(2, "big")
_V2_PACK4 = struct.Struct("!16s4s4sHH").pack
_V2_PACK6 = struct.Struct("!16s16s16sHH").pack
_MAPPED = "::ffff:"

_inet_aton = socket.inet_aton
_inet_pton = socket.inet_pton
_AF_INET6 = socket.AF_INET6


class Version(enum.Enum):
    """The header format chosen with ``-P``."""

    V1 = "v1"
    V2 = "v2"


def parse_version(text: str) -> Version:
    """``-P``'s argument: ``v1`` or ``v2`` (case-insensitive), else a usage error."""
    try:
        return Version(text.lower())
    except ValueError:
        raise BalanceError(f"invalid PROXY protocol version [{text}] for -P (use v1 or v2)", EX_USAGE)


def plain(host: str) -> tuple[bool, str]:
    """``(is_ipv6, address)`` for a socket address string, as it goes on the wire.

    v4-mapped IPv6 addresses become the IPv4 address they carry; an IPv6
    scope (``%eth0``) is dropped.
    """
    if ":" not in host:
        return False, host
    if host.startswith(_MAPPED) and "." in host:
        return False, host[len(_MAPPED):]
    if "%" in host:
        host = host.split("%", 1)[0]
    return True, host


def v1_header(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A version 1 line for a TCP connection from ``src:sport`` to ``dst:dport``."""
    src6, src = plain(src)
    dst6, dst = plain(dst)
    if src6 != dst6:   # cannot come from one socket; keep the line consistent
        src, dst = _as_v6(src6, src), _as_v6(dst6, dst)
        src6 = True
    return f"PROXY {'TCP6' if src6 else 'TCP4'} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def v2_header(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A version 2 PROXY block for a TCP connection from ``src:sport`` to ``dst:dport``."""
    src6, src = plain(src)
    dst6, dst = plain(dst)
    if src6 != dst6:
        src, dst = _as_v6(src6, src), _as_v6(dst6, dst)
        src6 = True
    if src6:
        return _V2_PACK6(_V2_HEAD6, _inet_pton(_AF_INET6, src), _inet_pton(_AF_INET6, dst), sport, dport)
    return _V2_PACK4(_V2_HEAD4, _inet_aton(src), _inet_aton(dst), sport, dport)


def _as_v6(is6: bool, host: str) -> str:
    """An IPv4 address as v4-mapped IPv6 in hex groups (v1 allows no dotted tail)."""
    if is6:
        return host
    a, b, c, d = _inet_aton(host)
    return f"::ffff:{a << 8 | b:x}:{c << 8 | d:x}"


def check_header(version: Version, sock: socket.socket) -> bytes:
    """The header a health check sends right after connecting on ``sock``.

    v2: the LOCAL command (no addresses).  v1: a valid line from the
    socket's own endpoints, or ``PROXY UNKNOWN`` if they cannot be read.
    """
    if version is Version.V2:
        return V2_LOCAL_HEADER
    try:
        local = sock.getsockname()
        peer = sock.getpeername()
        return v1_header(local[0], peer[0], local[1], peer[1])
    except (OSError, ValueError, UnicodeError):
        return V1_UNKNOWN


def header_maker(version: Version, listener: socket.socket) -> Callable[[socket.socket, tuple], bytes]:
    """A function ``(client_socket, client_address) -> header`` for ``listener``.

    When the listener is bound to one address, every client reaches that
    address: the destination part is formatted here, once.  On a wildcard
    listener the destination is read per connection with ``getsockname``.
    """
    unknown = V1_UNKNOWN if version is Version.V1 else V2_UNSPEC_HEADER
    local = listener.getsockname()
    fixed = local[0] not in ("0.0.0.0", "::")
    if not fixed:
        build = v1_header if version is Version.V1 else v2_header

        def wildcard(client: socket.socket, peer: tuple) -> bytes:
            try:
                here = client.getsockname()
            except OSError:   # the client is gone already: the link will see it
                return unknown
            return build(peer[0], here[0], peer[1], here[1])
        return wildcard

    dst6, dst = plain(local[0])
    dport = local[1]
    slow = v1_header if version is Version.V1 else v2_header
    if version is Version.V1:
        # "PROXY TCPx <src> <dst> <sport> <dport>\r\n": only src and sport vary.
        head = f"PROXY {'TCP6' if dst6 else 'TCP4'} "
        middle = f" {dst} "
        tail = f" {dport}\r\n"

        def fixed_v1(client: socket.socket, peer: tuple) -> bytes:
            src6, src = plain(peer[0])
            if src6 != dst6:
                return slow(peer[0], local[0], peer[1], dport)
            return (head + src + middle + str(peer[1]) + tail).encode("ascii")
        return fixed_v1

    if dst6:
        pack, head2, aton = _V2_PACK6, _V2_HEAD6, lambda a: _inet_pton(_AF_INET6, a)
    else:
        pack, head2, aton = _V2_PACK4, _V2_HEAD4, _inet_aton
    dst_packed = aton(dst)

    def fixed_v2(client: socket.socket, peer: tuple) -> bytes:
        src6, src = plain(peer[0])
        if src6 != dst6:
            return slow(peer[0], local[0], peer[1], dport)
        return pack(head2, aton(src), dst_packed, peer[1], dport)
    return fixed_v2


def send_header(sock: socket.socket, header: bytes) -> bytes:
    """Send ``header`` on a fresh non-blocking ``sock``; return what is left to send.

    A fresh socket's send buffer is empty, so this is all of it in practice;
    a partial send (or an error, which the caller's next send will meet
    again and handle) leaves the rest to be sent when the socket drains.
    """
    try:
        n = sock.send(header)
    except OSError:   # BlockingIOError included
        return header
    return header[n:] if n < len(header) else b""
