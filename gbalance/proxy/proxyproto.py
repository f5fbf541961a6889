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

Receiving (``-A``, see :mod:`gbalance.proxy.frontdoor`): :func:`parse_header`
is a strict, bounded parser of both versions for headers a front tier
sends; it works on whatever prefix has arrived and says "need more",
"a header of N bytes" or why the bytes are not a header.
"""


import _socket
import enum
import socket
import struct
from collections.abc import Callable

from gbalance.errors import EX_USAGE, BalanceError
from gbalance.proxy.records import Received

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


def plain(host: str) -> "tuple[bool, str]":
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


def header_maker(version: Version, listener: socket.socket) -> "Callable[[_socket.socket, tuple], bytes]":
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

        def wildcard(client: _socket.socket, peer: tuple) -> bytes:
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

        def fixed_v1(client: _socket.socket, peer: tuple) -> bytes:
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

    def fixed_v2(client: _socket.socket, peer: tuple) -> bytes:
        src6, src = plain(peer[0])
        if src6 != dst6:
            return slow(peer[0], local[0], peer[1], dport)
        return pack(head2, aton(src), dst_packed, peer[1], dport)
    return fixed_v2


def send_header(sock: _socket.socket, header: bytes) -> bytes:
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


# -- receiving (-A) -------------------------------------------------------------
#
# A header that arrives is hostile input.  The parser below takes the bytes
# read so far and says "need more", "here is a header of N bytes", or raises
# HeaderError; it never looks past the limits below, so a caller that reads
# at most that much holds a bounded buffer per client.

#: The longest version 1 line the specification allows, CRLF included.
V1_MAX = 107
#: The most address-and-TLV bytes accepted after a version 2 header's first
#: 16 (the specification allows 65535; real senders use far less: the
#: addresses, an SNI or unique id, an SSL block, a cloud's endpoint id).
V2_MAX_BODY = 2048
#: The longest header accepted: what a reader may need to hold.
HEADER_MAX = 16 + V2_MAX_BODY
_V1_PREFIX = b"PROXY "
#: Bytes a version 1 line may contain (after "PROXY "), CR included.
_V1_CHARS = b"0123456789abcdefABCDEFTCPUNKOWX.: \r"
_PORT_DIGITS = frozenset("0123456789")


class HeaderError(ValueError):
    """The bytes are not a valid PROXY protocol header; the text says why."""


def parse_header(data: bytes) -> Received | None:
    """The header at the start of ``data``: None while more bytes are needed.

    Raises :class:`HeaderError` as soon as the bytes cannot start a valid
    header (garbage is refused at its first byte, not after a timeout), or
    when a header would exceed :data:`V1_MAX` / :data:`HEADER_MAX`.
    """
    if not data:
        return None
    if data[0] == 0x50:   # "P"
        return _parse_v1(data)
    if data[0] == 0x0D:
        return _parse_v2(data)
    raise HeaderError("no PROXY protocol signature")


def _parse_v1(data: bytes) -> Received | None:
    head = data[:6]
    if head != _V1_PREFIX[:len(head)]:
        raise HeaderError("no PROXY protocol signature")
    end = data.find(b"\r\n", 6, V1_MAX)
    line = data[6:end if end >= 0 else V1_MAX]
    if line.translate(None, _V1_CHARS) or b"\r" in line.rstrip(b"\r"):
        raise HeaderError("v1: invalid character")
    if end < 0:
        if len(data) >= V1_MAX:
            raise HeaderError(f"v1: no CRLF within {V1_MAX} bytes")
        return None
    words = line.decode("ascii").split(" ")
    if words[0] == "UNKNOWN":   # the rest of the line is to be ignored
        return Received(end + 2, 1)
    if len(words) != 5:
        raise HeaderError("v1: not five fields")
    proto, src, dst, sport, dport = words
    if proto == "TCP4":
        family = socket.AF_INET
    elif proto == "TCP6":
        family = socket.AF_INET6
    else:
        raise HeaderError("v1: unknown protocol")
    return Received(end + 2, 1, (_v1_address(family, src), _v1_port(sport)),
                    (_v1_address(family, dst), _v1_port(dport)))


def _v1_address(family: int, text: str) -> str:
    try:
        packed = _inet_pton(family, text)
    except OSError:
        raise HeaderError("v1: invalid address") from None
    return text if family == socket.AF_INET else socket.inet_ntop(family, packed)


def _v1_port(text: str) -> int:
    if not text or len(text) > 5 or not _PORT_DIGITS.issuperset(text) or (text[0] == "0" and text != "0"):
        raise HeaderError("v1: invalid port")
    port = int(text)
    if port > 65535:
        raise HeaderError("v1: invalid port")
    return port


_V2_UNPACK4 = struct.Struct("!4s4sHH").unpack_from
_V2_UNPACK6 = struct.Struct("!16s16sHH").unpack_from
_V2_UNIX = (0x31, 0x32)
_V2_UNIX_LEN = 2 * 108


def _parse_v2(data: bytes) -> Received | None:
    n = len(data)
    if n < 16:
        if data[:12] != V2_SIGNATURE[:n]:
            raise HeaderError("no PROXY protocol signature")
        return None
    if data[:12] != V2_SIGNATURE:
        raise HeaderError("no PROXY protocol signature")
    ver_cmd, fam = data[12], data[13]
    length = int.from_bytes(data[14:16], "big")
    if ver_cmd >> 4 != 2:
        raise HeaderError(f"v2: unsupported version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command > 1:
        raise HeaderError(f"v2: unknown command {command}")
    if length > V2_MAX_BODY:
        raise HeaderError(f"v2: {length} bytes of addresses and TLVs (at most {V2_MAX_BODY})")
    if n < 16 + length:
        return None
    if command == 0:   # LOCAL: the sender's own connection, its block is ignored
        return Received(16 + length, 2)
    if fam == V2_TCP4:
        af: int
        need, unpack, af = V2_LEN4, _V2_UNPACK4, socket.AF_INET
    elif fam == V2_TCP6:
        need, unpack, af = V2_LEN6, _V2_UNPACK6, socket.AF_INET6
    elif fam == V2_UNSPEC:
        need, unpack, af = 0, None, 0
    elif fam in _V2_UNIX:   # a local client of the sender: no IP address to use
        need, unpack, af = _V2_UNIX_LEN, None, 0
    else:
        raise HeaderError(f"v2: unsupported family/protocol {fam:#04x}")
    if length < need:
        raise HeaderError("v2: address block too short")
    _check_tlvs(data, 16 + need, 16 + length)
    if unpack is None:
        return Received(16 + length, 2)
    src, dst, sport, dport = unpack(data, 16)
    return Received(16 + length, 2, (socket.inet_ntop(af, src), sport), (socket.inet_ntop(af, dst), dport))


def _check_tlvs(data: bytes, pos: int, end: int) -> None:
    """Walk the TLVs between ``pos`` and ``end`` (their contents are not used):
    each must fit whole, nothing may be left over."""
    while pos < end:
        if end - pos < 3:
            raise HeaderError("v2: truncated TLV")
        pos += 3 + int.from_bytes(data[pos + 1:pos + 3], "big")
        if pos > end:
            raise HeaderError("v2: TLV longer than the header")
