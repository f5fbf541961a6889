"""The serving objects of one process, built from the config in one place.

The master of ``-w 1`` and every worker of ``-w N`` serve with the same
objects, made here from a :class:`~gbalance.config.ProxyConfig`: the
address cache and channel events over the table, the connector (with its
stagger estimator under ``-m``), the router, the ``-L`` connection limit,
and the :class:`~gbalance.proxy.server.BalanceServer` that ties them to the
listener, with ``-P``'s header maker and ``-A``'s front door.  This is the
one module that turns settings into proxy objects: the proxy layer never
reads the config record, and the processes (:mod:`gbalance.process`) only
say which listener, table row and counters to serve with.
"""

from __future__ import annotations

import functools
import socket
from typing import Any

from gevent import get_hub

from gbalance.config import ProxyConfig
from gbalance.log import Log
from gbalance.proxy import forward
from gbalance.proxy.connect import Connector
from gbalance.proxy.frontdoor import FrontDoor
from gbalance.proxy.proxyproto import header_maker
from gbalance.proxy.routing import Router
from gbalance.proxy.server import AddressCache, BalanceServer, ChannelEvents, write_stdout
from gbalance.proxy.stagger import StaggerEstimator, StaggerRule
from gbalance.system.limits import connection_limit
from gbalance.table.channels import Channels
from gbalance.table.counters import Counters
from gbalance.table.layout import C_STAGGER_US, MAXCHANNELS, MAXGROUPS, slot
from gbalance.table.state import SharedState


def build_server(cfg: ProxyConfig, state: SharedState, listener: socket.socket, log: Log,
                 source: dict[int, tuple[Any, ...]], channels: Channels, counters: Counters,
                 worker: int = 0) -> BalanceServer:
    """The serving objects of one process: a :class:`~gbalance.proxy.server.BalanceServer`
    over ``listener``, counting in ``counters``' row.  Needs a gevent hub."""
    mon = cfg.monitor
    monitoring = mon is not None
    loop = get_hub().loop
    estimator = None    # -m: each process learns its own connect times
    if mon is not None and mon.stagger > 0:
        estimator = StaggerEstimator(StaggerRule(mon.stagger), MAXGROUPS, MAXCHANNELS)
    readdress = functools.partial(forget_connect_times, estimator, state.q) if estimator else None
    addresses = AddressCache(state, channels, log, on_readdress=readdress)
    events = ChannelEvents(state, log, debug=cfg.debug, autodisable=cfg.autodisable,
                           passive=mon is not None and mon.disable, channels=channels,
                           counters=counters)
    connector = Connector(loop, addresses, events, timeout=cfg.connect_timeout,
                          stagger=mon.stagger if mon is not None else 0.0,
                          source=source, keepalive=cfg.server_keepalive, estimator=estimator)
    router = Router(state, hash_failover=cfg.hash_failover, last_resort=monitoring,
                    counters=counters, worker=worker)
    # -L: this process's share; health checks (-m) may hold a socket per channel.
    checks = sum(len(g.channels) for g in cfg.groups) if monitoring and cfg.workers <= 1 else 0
    limit = connection_limit(cfg.max_conns, cfg.workers, reserve=2 * checks)
    forward.PIPES.limit = limit.pipes
    per = " per worker" if cfg.workers > 1 else ""
    if worker == 0 and limit.overcommitted:
        log.warning(limit.describe(per))
    elif worker == 0 and (cfg.debug or not cfg.foreground):
        log.info(limit.describe(per))
    # -P: a PROXY header on every backend connection.
    proxy = header_maker(cfg.proxy_protocol, listener) if cfg.proxy_protocol is not None else None
    # -A: each client starts with a PROXY header.
    frontdoor = (FrontDoor(loop, listener.family, cfg.frontdoor, log, debug=cfg.debug)
                 if cfg.frontdoor is not None else None)
    return BalanceServer(listener, state, router, connector, log, addresses,
                         idle_timeout=cfg.idle_timeout,
                         dump=write_stdout if cfg.packet_dump else None, counters=counters,
                         max_conns=limit.conns, per_source=cfg.per_source, proxy=proxy,
                         frontdoor=frontdoor)


def forget_connect_times(estimator: StaggerEstimator, q: memoryview, g: int, c: int) -> None:
    """A channel points elsewhere now: its connect times start over."""
    estimator.forget(g, c)
    q[slot(g, c, C_STAGGER_US)] = 0
