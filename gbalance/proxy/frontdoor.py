"""``-A``: accept the PROXY protocol from a front tier.

Behind another balancer every client seems to come from that balancer.
With ``-A`` each accepted connection must start with a PROXY protocol
header (version 1 or 2, told apart by its first byte); the client address
it carries replaces the connection's own before anything else sees the
client: hash groups, the ``-P`` header sent on, logs and traces, and
per-source limits all read the ``address`` that
:meth:`gbalance.proxy.server.BalanceServer.handle_client` is called with.

The header is hostile input:

* only a bounded prefix is ever read (:data:`~gbalance.proxy.proxyproto.V1_MAX`,
  :data:`~gbalance.proxy.proxyproto.HEADER_MAX`), with ``MSG_PEEK`` so that not
  one byte past the header is taken from the client's stream;
* it must be complete within ``timeout`` seconds (default
  :data:`DEFAULT_TIMEOUT`): a client that sends nothing or half a header is
  reset then, and holds no backend connection or ``maxc`` slot meanwhile;
* parsing is strict (:func:`~gbalance.proxy.proxyproto.parse_header`); bytes that
  cannot begin a header are refused at once;
* v2 ``LOCAL`` (the front tier's own health check), v1 ``UNKNOWN`` and
  address families without an IP address keep the connection's real peer;
* a refused connection is reset, never forwarded, and logged once per
  source address per :data:`LOG_INTERVAL` (with how many were refused since).

An optional list of trusted front-tier addresses and networks: a connection
from anywhere else is reset at accept, before reading a byte.

Without ``-A`` none of this runs: the server calls its own handler directly.
"""

from __future__ import annotations

import _socket
import ipaddress
import socket
import struct
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from gbalance.errors import EX_USAGE, BalanceError
from gbalance.proxy.proxyproto import HEADER_MAX, HeaderError, parse_header
from gbalance.proxy.watchers import READ

#: Seconds a client has to send its whole header.
DEFAULT_TIMEOUT = 3.0
#: Longest header timeout accepted on the command line.
MAX_TIMEOUT = 300.0
#: A refused source is logged at most once per this many seconds.
LOG_INTERVAL = 60.0
#: Sources remembered per interval; past this one line covers all others.
LOG_SOURCES_MAX = 4096
_LINGER_ABORT = struct.pack("ii", 1, 0)
_PEEK = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class FrontDoorSpec:
    """``-A``'s argument, parsed: who may connect, and how long a header may take."""

    trusted: tuple[Network, ...] | None = None   # None: any source
    timeout: float = DEFAULT_TIMEOUT


def parse_frontdoor(text: str) -> FrontDoorSpec:
    """``-A any|ADDR[/BITS][,...][,timeout=SEC]``; a usage error when malformed."""
    trusted: list[Network] = []
    anyone = False
    timeout = DEFAULT_TIMEOUT
    items = text.split(",")
    for item in items:
        if item.startswith("timeout="):
            value = item[len("timeout="):]
            try:
                timeout = float(value)
            except ValueError:
                timeout = -1.0
            if not 0 < timeout <= MAX_TIMEOUT:   # NaN fails too
                raise BalanceError(f"invalid timeout [{value}] for -A (seconds, more than 0, "
                                   f"at most {MAX_TIMEOUT:g})", EX_USAGE)
        elif item == "any":
            anyone = True
        else:
            try:
                trusted.append(ipaddress.ip_network(item, strict=True))
            except ValueError:
                raise BalanceError(f"invalid front-tier address [{item}] for -A "
                                   "(use any, an address or a network such as 10.0.0.0/8)", EX_USAGE)
    if anyone == bool(trusted):
        raise BalanceError("-A needs either \"any\" or the front tier's addresses (not both)", EX_USAGE)
    return FrontDoorSpec(None if anyone else tuple(trusted), timeout)


#: Trusted peer addresses remembered (a front tier is a handful of hosts).
TRUSTED_CACHE_MAX = 1024


def trusted_matcher(networks: tuple[Network, ...]) -> Callable[[str], bool]:
    """A test ``host -> bool`` for accepted peers (v4-mapped IPv6 counts as IPv4).

    Addresses found trusted are remembered (up to :data:`TRUSTED_CACHE_MAX`),
    so a front tier's connections cost one dict look-up; others are worked
    out each time and never stored, so they cannot fill the memory.
    """
    nets = tuple(networks)
    known: set[str] = set()

    def trusted(host: str) -> bool:
        if host in known:
            return True
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if any(addr in net for net in nets):
            if len(known) < TRUSTED_CACHE_MAX:
                known.add(host)
            return True
        return False
    return trusted


class RateLimitedLog:
    """At most one line per source per interval; the next line for that
    source tells how many were left out.  Memory is bounded: past
    :data:`LOG_SOURCES_MAX` sources in one interval, one shared line."""

    def __init__(self, emit: Callable[[str], None], clock: Callable[[], float],
                 interval: float = LOG_INTERVAL, limit: int = LOG_SOURCES_MAX):
        self.emit = emit
        self.clock = clock
        self.interval = interval
        self.limit = limit
        self.window = -1.0e18
        self.seen: dict[str, int] = {}    # source -> refusals not logged this interval
        self.carried: dict[str, int] = {}  # ... and from the interval before
        self.overflow = 0

    def __call__(self, source: str, text: str) -> None:
        now = self.clock()
        if now - self.window >= self.interval:
            self.carried = {s: n for s, n in self.seen.items() if n}
            self.seen = {}
            if self.overflow:
                self.emit(f"{self.overflow} more connections refused from other sources")
            self.overflow = 0
            self.window = now
        seen = self.seen
        if source in seen:
            seen[source] += 1
            return
        if len(seen) >= self.limit:
            self.overflow += 1
            return
        seen[source] = 0
        before = self.carried.pop(source, 0)
        self.emit(text + (f" ({before} more since the last report)" if before else ""))


class _Waiting:
    """A client whose header is not complete yet."""

    __slots__ = ("sock", "fd", "address", "got", "io", "timer")

    def __init__(self, sock, fd: int, address: tuple):
        self.sock = sock
        self.fd = fd
        self.address = address
        self.got = b""          # header bytes taken so far (all of them header)
        self.io: Any = None      # gevent watchers (no type stubs)
        self.timer: Any = None


class FrontDoor:
    """Reads each client's PROXY header, then hands the client on.

    :meth:`wrap` turns the server's per-client handler ``handle(fd,
    address)`` into one that reads the header first and calls ``handle``
    with the client address from the header (or the real peer when the
    header carries none).  A client the header cannot be read from is reset
    and never reaches ``handle``.
    """

    def __init__(self, loop, family: int, spec: FrontDoorSpec, log, debug: bool = False,
                 clock: Callable[[], float] | None = None):
        self.loop = loop
        self.family = family
        self.spec = spec
        self.log = log
        self.debug = debug
        self.trusted = trusted_matcher(spec.trusted) if spec.trusted is not None else None
        self.refusals = RateLimitedLog(log.warning, clock or loop.now)
        self.waiting: set[_Waiting] = set()
        self.handle: Callable[[int, tuple], None] | None = None
        #: Called when a client that waited for its header is settled (the
        #: server's drain waits for these clients too).
        self.settled: Callable[[], None] | None = None

    def wrap(self, handle: Callable[[int, tuple], None]) -> Callable[[int, tuple], None]:
        self.handle = handle
        return self.accept

    # -- per client -----------------------------------------------------------

    def accept(self, fd: int, address: tuple) -> None:
        """A client was accepted: check its source, then read its header."""
        sock = _socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
        host = address[0]
        if self.trusted is not None and not self.trusted(host):
            self._refuse(sock, host, "not a trusted front tier")
            return
        w = _Waiting(sock, fd, address)
        try:
            if self._read(w):       # most front tiers send the header with the connect
                return
            w.io = self.loop.io(fd, READ)
            w.timer = self.loop.timer(self.spec.timeout)
            self.waiting.add(w)
            w.io.start(self._readable, w)
            w.timer.start(self._expired, w)
        except Exception as exc:   # never let one client take the server down
            self._drop(w)
            self.log.error(f"internal error reading the PROXY header from {host}: {type(exc).__name__}: {exc}")

    def _readable(self, w: _Waiting) -> None:
        try:
            if not self._read(w):
                return
            self._stop(w)
        except Exception as exc:   # never let one client take the server down
            self._stop(w)
            self._drop(w)
            self.log.error(f"internal error reading the PROXY header from {w.address[0]}:"
                           f" {type(exc).__name__}: {exc}")
        self._after()

    def _expired(self, w: _Waiting) -> None:
        self._stop(w)
        self._refuse(w.sock, w.address[0],
                     f"no complete PROXY header within {self.spec.timeout:g} s"
                     f" ({len(w.got)} bytes)")
        self._after()

    def _after(self) -> None:
        """A waiting client is settled (handed on: the server holds it now)."""
        if self.settled is not None and not self.waiting:
            self.settled()

    def _stop(self, w: _Waiting) -> None:
        self.waiting.discard(w)
        if w.io is not None:
            w.io.stop()
            w.io = None
        if w.timer is not None:
            w.timer.stop()
            w.timer = None

    def _read(self, w: _Waiting) -> bool:
        """Read what has come: True when the client is settled (handed on or
        dropped), False while its header is incomplete.

        Bytes are peeked, and only header bytes are taken: all that was
        peeked while the header is incomplete (every one of them belongs to
        it), exactly its rest once it is whole.
        """
        sock = w.sock
        try:
            data = sock.recv(HEADER_MAX - len(w.got), _PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:      # reset: it left; nothing to report
            self._drop(w)
            return True
        if not data:
            if w.got:
                self._refuse(sock, w.address[0], f"connection closed inside the PROXY header ({len(w.got)} bytes)")
            else:            # a bare connect-and-close (a TCP check): not an error
                self._drop(w)
            return True
        buf = w.got + data
        try:
            header = parse_header(buf)
        except HeaderError as exc:
            self._refuse(sock, w.address[0], f"invalid PROXY header: {exc}")
            return True
        if header is None:
            sock.recv(len(data), _DONTWAIT)
            w.got = buf
            if len(buf) >= HEADER_MAX:   # cannot happen with the parser's limits; never loop
                self._refuse(sock, w.address[0], "PROXY header too long")
                return True
            return False
        sock.recv(header.length - len(w.got), _DONTWAIT)
        address = header.source if header.source is not None else w.address
        if self.debug:
            self.log.trace(f"PROXY v{header.version} header from {w.address[0]}: client "
                           f"{_show(address)}\n")
        self._stop(w)
        sock.detach()
        self.handle(w.fd, address)  # type: ignore[misc]  # set by the owner before start
        return True

    def _refuse(self, sock, source: str, why: str) -> None:
        """Reset the connection and log it (rate-limited per source)."""
        self.refusals(source, f"connection from {source} refused: {why}")
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
        except OSError:
            pass
        sock.close()

    def _drop(self, w: _Waiting) -> None:
        try:
            w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
        except OSError:
            pass
        w.sock.close()

    def close_all(self) -> int:
        """Reset every client still sending its header (a stop at once)."""
        count = len(self.waiting)
        for w in list(self.waiting):
            self._stop(w)
            self._drop(w)
        return count


def _show(address: tuple) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
