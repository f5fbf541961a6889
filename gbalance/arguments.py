"""Parsing of the command line's words: ports, channels, groups, addresses.

Each function turns one kind of word into a value or raises
:class:`~gbalance.errors.BalanceError` with balance's message and exit code.
Host names are resolved here, once, when a channel is defined: the master
never resolves a name per connection.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field

from gbalance.table.channels import known_scope
from gbalance.errors import EX_DATAERR, EX_UNAVAILABLE, EX_USAGE, BalanceError
from gbalance.table.layout import HASH, MAXCHANNELS, MAXGROUPS, RR


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


MAX_MAXC = 2**31 - 1            # balance keeps maxc in a C int
KEEPALIVE_LIMITS = (32767, 32767, 127)   # Linux: TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT
_SECONDS = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


def _is_number(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts ``²`` and ``٨``."""
    return text.isascii() and text.isdigit()


def parse_port(word: str) -> int:
    """A port number or ``/etc/services`` name, 1..65535."""
    text = word.strip()
    if _is_number(text):
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
    """A maximum connection count: 0 (unlimited) up to a C int's maximum.

    Bounded because the count lands in a 64-bit slot of the shared table
    and balance itself keeps it in an int: a huge value must be a usage
    error here, not an overflow in the master.
    """
    if not _is_number(word) or int(word) > MAX_MAXC:
        raise BalanceError(f"invalid maxc [{word}]", EX_USAGE)
    return int(word)


def resolve_host(host: str, prefer_ipv4: bool = True) -> str:
    """Resolve a host name or literal to one numeric address.

    Like the C balance, an IPv4 address is preferred when a name has both,
    so ``localhost`` means 127.0.0.1; IPv6 addresses are used when that is
    all there is.
    """
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if literal.version == 6:
            # libc's spelling (``::ffff:127.0.0.1``), not Python 3.11's ``::ffff:7f00:1``;
            # a scope id only when it names an interface of this host.
            text = socket.inet_ntop(socket.AF_INET6, literal.packed)
            if literal.scope_id is None:
                return text
            if not known_scope(literal.scope_id):
                raise BalanceError(f"unknown or invalid address [{host}]: no interface"
                                   f" {literal.scope_id!r}", EX_DATAERR)
            return f"{text}%{literal.scope_id}"
        return str(literal)
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

    A bare IPv6 literal without brackets is taken as a host with no port
    when it cannot be read as ``host:port:maxc``: three or more colons, or
    a leading ``::`` (``::1``).  ``fe80::1`` therefore means host ``fe80``
    with maxc 1, as in balance; write ``[fe80::1]`` for the address.
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
        # Three or more colons, or a leading "::", cannot be host:port:maxc
        # (a host name is never empty), so the word is a bare IPv6 literal.
        if word.count(":") > 2 or word.startswith("::"):
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


def split_groups(words: list[str]) -> list[tuple[int, list[str]]]:
    """Split channel words into ``(kind, words)`` groups at ``!`` and ``%``.

    Only the structure is checked here (empty groups, too many groups or
    channels), before any name is resolved: a malformed command line fails
    at once instead of after a DNS lookup per channel.
    """
    groups: list[tuple[int, list[str]]] = [(RR, [])]
    for i, word in enumerate(words):
        if word in ("!", "%"):
            if not groups[-1][1]:
                raise BalanceError("no channels in group", EX_UNAVAILABLE)
            if word == "%":
                groups[-1] = (HASH, groups[-1][1])
                if i == len(words) - 1:
                    break
            if len(groups) >= MAXGROUPS:
                raise BalanceError("too many groups", EX_UNAVAILABLE)
            groups.append((RR, []))
            continue
        if len(groups[-1][1]) >= MAXCHANNELS:
            raise BalanceError("MAXCHANNELS exceeded", EX_USAGE)
        groups[-1][1].append(word)
    if not groups[-1][1]:
        raise BalanceError("no channels in group", EX_UNAVAILABLE)
    return groups


def parse_groups(words: list[str], default_port: int) -> list[GroupSpec]:
    """Parse channel words into groups.

    ``!`` starts a new round-robin group; ``%`` makes the group before it a
    hash group and starts a new one.  A trailing ``%`` only marks the last
    group as hash.  No words at all gives no groups (channels may be
    created later from the shell).
    """
    if not words:
        return []
    return [GroupSpec(kind, [parse_channel(w, default_port) for w in group])
            for kind, group in split_groups(words)]


def parse_keepalive(text: str, option: str) -> tuple[int, int, int]:
    """Parse ``-k``/``-K`` ``idle,interval,probes`` (whole seconds, > 0).

    The upper limits are the kernel's (idle and interval 32767 s, 127
    probes): checking them here makes a bad value a usage error instead of
    a failing ``setsockopt`` once the master is starting.
    """
    parts = text.split(",")
    values = tuple(int(p) for p in parts) if all(_is_number(p) for p in parts) else ()
    if len(values) != 3 or min(values) <= 0 or \
            any(v > top for v, top in zip(values, KEEPALIVE_LIMITS)):
        raise BalanceError(f"invalid keepalive [{text}] for {option}: expected idle,interval,probes", EX_USAGE)
    return values


def parse_seconds(text: str, option: str) -> float:
    """A non-negative number of seconds, plain decimal (``5``, ``0.5``).

    ``float()`` alone would also take ``nan``, ``1_0``, ``1e9`` and
    non-ASCII digits; balance's seconds are plain numbers.
    """
    value = float(text) if _SECONDS.fullmatch(text) else -1.0
    if not value >= 0 or value == float("inf"):
        raise BalanceError(f"invalid timeout [{text}] for {option}", EX_USAGE)
    return value


def parse_workers(text: str, limit: int, cpus: int | None = None) -> int:
    """``-w``: a number of worker processes from 1 to ``limit``, or ``auto``.

    ``auto`` is the number of CPUs this process may run on (its affinity
    mask, so a ``taskset`` or cgroup cpuset is honoured), at most ``limit``.
    """
    if text == "auto":
        if cpus is None:
            try:
                cpus = len(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                cpus = os.cpu_count() or 1
        return max(1, min(cpus, limit))
    if text.isascii() and text.isdigit() and 1 <= int(text) <= limit:
        return int(text)
    raise BalanceError(f"invalid number of workers [{text}] for -w (1 to {limit}, or auto)", EX_USAGE)


#: Largest -L/-l value (a C int, as maxc).
MAX_LIMIT = 2147483647


def parse_limit(text: str, option: str) -> int:
    """``-L``/``-l``: a number of connections, 0 (no limit) to :data:`MAX_LIMIT`."""
    if text.isascii() and text.isdigit() and int(text) <= MAX_LIMIT:
        return int(text)
    raise BalanceError(f"invalid connection limit [{text}] for {option}", EX_USAGE)
