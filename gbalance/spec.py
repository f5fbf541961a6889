"""Parsing of the command line's words: ports, channels, groups, addresses.

Each function turns one kind of word into a value or raises
:class:`~gbalance.errors.BalanceError` with balance's message and exit code.
Host names are resolved here, once, when a channel is defined: the master
never resolves a name per connection.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from gbalance.errors import EX_DATAERR, EX_UNAVAILABLE, EX_USAGE, BalanceError
from gbalance.state import HASH, MAXCHANNELS, MAXGROUPS, RR


@dataclass
class ChannelSpec:
    """One destination: a numeric address, a port and a connection limit."""

    host: str          # as written on the command line
    address: str       # numeric address it resolved to
    port: int
    maxc: int = 0


@dataclass
class GroupSpec:
    """A channel group: round robin or client-address hash."""

    kind: int = RR
    channels: list[ChannelSpec] = field(default_factory=list)


def parse_port(word: str) -> int:
    """A port number or ``/etc/services`` name, 1..65535."""
    text = word.strip()
    if text.isdigit():
        port = int(text)
    else:
        try:
            port = socket.getservbyname(text, "tcp")
        except OSError:
            port = -1
    if not 0 < port <= 65535:
        raise BalanceError(f"invalid port [{word}]", EX_USAGE)
    return port


def parse_maxc(word: str) -> int:
    """A maximum connection count: 0 (unlimited) or more."""
    if not word.isdigit():
        raise BalanceError(f"invalid maxc [{word}]", EX_USAGE)
    return int(word)


def resolve_host(host: str, prefer_ipv4: bool = True) -> str:
    """Resolve a host name or literal to one numeric address.

    Like the C balance, an IPv4 address is preferred when a name has both,
    so ``localhost`` means 127.0.0.1; IPv6 addresses are used when that is
    all there is.
    """
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise BalanceError(f"unknown or invalid address [{host}]", EX_DATAERR)
    addrs = [info[4][0] for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]
    if not addrs:
        raise BalanceError(f"unknown or invalid address [{host}]", EX_DATAERR)
    if prefer_ipv4:
        v4 = [a for a in addrs if ":" not in a]
        if v4:
            return v4[0]
    return addrs[0]


def split_channel(word: str) -> tuple[str, str | None, str | None]:
    """Split ``host[:port[:maxc]]`` (or ``[v6]:port:maxc``) into its parts.

    A bare IPv6 literal without brackets is taken as a host with no port.
    """
    if word.startswith("["):
        end = word.find("]")
        if end < 0:
            raise BalanceError(f"unknown or invalid address [{word}]", EX_DATAERR)
        host, rest = word[1:end], word[end + 1:]
        if rest and not rest.startswith(":"):
            raise BalanceError(f"unknown or invalid address [{word}]", EX_DATAERR)
        parts = rest[1:].split(":") if rest else []
    else:
        if word.count(":") > 2:
            try:
                ipaddress.IPv6Address(word)
                return word, None, None
            except ValueError:
                raise BalanceError(f"unknown or invalid address [{word}]", EX_DATAERR)
        host, *parts = word.split(":")
    if len(parts) > 2:
        raise BalanceError(f"invalid channel [{word}]", EX_USAGE)
    port = parts[0] if parts and parts[0] != "" else None
    maxc = parts[1] if len(parts) > 1 and parts[1] != "" else None
    return host, port, maxc


def parse_channel(word: str, default_port: int) -> ChannelSpec:
    """Parse and resolve one channel word."""
    host, port, maxc = split_channel(word)
    if not host:
        raise BalanceError(f"unknown or invalid address [{word}]", EX_DATAERR)
    return ChannelSpec(
        host=host,
        address=resolve_host(host),
        port=parse_port(port) if port is not None else default_port,
        maxc=parse_maxc(maxc) if maxc is not None else 0,
    )


def parse_groups(words: list[str], default_port: int) -> list[GroupSpec]:
    """Split channel words into groups at ``!`` and ``%``.

    ``!`` starts a new round-robin group; ``%`` makes the group before it a
    hash group and starts a new one.  A trailing ``%`` only marks the last
    group as hash.  No words at all gives no groups (channels may be
    created later from the shell).
    """
    if not words:
        return []
    groups = [GroupSpec()]
    for i, word in enumerate(words):
        if word in ("!", "%"):
            if not groups[-1].channels:
                raise BalanceError("no channels in group", EX_UNAVAILABLE)
            if word == "%":
                groups[-1].kind = HASH
                if i == len(words) - 1:
                    break
            if len(groups) >= MAXGROUPS:
                raise BalanceError("too many groups", EX_UNAVAILABLE)
            groups.append(GroupSpec())
            continue
        if len(groups[-1].channels) >= MAXCHANNELS:
            raise BalanceError("MAXCHANNELS exceeded", EX_USAGE)
        groups[-1].channels.append(parse_channel(word, default_port))
    if not groups[-1].channels:
        raise BalanceError("no channels in group", EX_UNAVAILABLE)
    return groups


def parse_keepalive(text: str, option: str) -> tuple[int, int, int]:
    """Parse ``-k``/``-K`` ``idle,interval,probes`` (whole seconds, > 0)."""
    parts = text.split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise BalanceError(f"invalid keepalive [{text}] for {option}: expected idle,interval,probes", EX_USAGE)
    return values  # type: ignore[return-value]


def parse_seconds(text: str, option: str) -> float:
    """A non-negative number of seconds (fractions allowed)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise BalanceError(f"invalid timeout [{text}] for {option}", EX_USAGE)
    return value
