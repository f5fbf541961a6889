"""Validated settings for one run: what the CLI hands to the server or shell."""

from __future__ import annotations

from dataclasses import dataclass, field

from gbalance.proxy.frontdoor import FrontDoorSpec
from gbalance.monitor.monspec import MonitorSpec
from gbalance.proxy.proxyproto import Version as ProxyVersion
from gbalance.arguments import GroupSpec

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_GRACE = 30.0   # -g: seconds open links may run on after SIGTERM


@dataclass
class ProxyConfig:
    """Everything a master needs; built once from argv, never changed."""

    port: int
    groups: list[GroupSpec] = field(default_factory=list)
    bind: str | None = None             # -b, as written
    source: str | None = None           # -B, as written
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT   # -t (0 = no limit)
    idle_timeout: float = 0.0           # -T (0 = never)
    autodisable: bool = False           # -a
    debug: bool = False                 # -d
    foreground: bool = False            # -f
    packet_dump: bool = False           # -p
    hash_failover: bool = False         # -H
    ipv6: bool = False                  # -6
    client_keepalive: tuple[int, int, int] | None = None   # -k idle,interval,probes
    server_keepalive: tuple[int, int, int] | None = None   # -K idle,interval,probes
    monitor: MonitorSpec | None = None  # -m
    grace: float = DEFAULT_GRACE        # -g drain grace period (0 = reset at once)
    replace: bool = False               # -r take over from the running master
    proxy_protocol: ProxyVersion | None = None   # -P v1|v2: PROXY header to backends
    frontdoor: FrontDoorSpec | None = None   # -A: accept a PROXY header from a front tier
    workers: int = 1                    # -w worker processes (1 = the master serves alone)
    max_conns: int | None = None        # -L open connections (None: from the fd limit; 0: none)
    per_source: int = 0                 # -l open connections per client address (0: no limit)


@dataclass
class ShellConfig:
    """A ``-i`` session or a ``-c`` command against a running master."""

    port: int
    bind: str | None = None
    command: str | None = None          # -c; None means interactive (-i)
    debug: bool = False
