"""The master process: from a validated config to a serving proxy.

Order matters: detach first (before any gevent hub exists), then take the
state file (a live master on the same port and address is an error), then
bind the listener, fill the table, start the server and report success to
the waiting parent.  On SIGTERM/SIGINT the master stops accepting, closes
its links and removes its own state file.
"""

from __future__ import annotations

import errno
import os
import signal
import socket

from gbalance.config import ProxyConfig
from gbalance.daemon import detach
from gbalance.errors import EX_DATAERR, EX_NOPERM, EX_OSERR, EX_SOFTWARE, BalanceError
from gbalance.log import Log
from gbalance.state import MON_ENABLED, MON_NONE, MasterRunning, SharedState, StateError, state_path

LISTEN_BACKLOG = socket.SOMAXCONN


def make_listener(cfg: ProxyConfig) -> socket.socket:
    """Bind and listen as balance does: IPv4 by default, dual-stack with -6."""
    if cfg.bind:
        family = socket.AF_INET6 if cfg.ipv6 else socket.AF_UNSPEC
        try:
            infos = socket.getaddrinfo(cfg.bind, cfg.port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        except (OSError, UnicodeError) as exc:
            raise BalanceError(f"cannot bind to [{cfg.bind}]: {getattr(exc, 'strerror', None) or exc}", EX_OSERR)
        family, _, _, _, sockaddr = infos[0]
    elif cfg.ipv6:
        family, sockaddr = socket.AF_INET6, ("::", cfg.port, 0, 0)
    else:
        family, sockaddr = socket.AF_INET, ("0.0.0.0", cfg.port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass
        # Accepted sockets inherit these on Linux: no per-connection syscalls.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if cfg.client_keepalive:
            from gbalance.connect import set_keepalive
            set_keepalive(sock, cfg.client_keepalive)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise BalanceError(f"bind(): Address already in use (port {cfg.port})", EX_OSERR)
        raise BalanceError(f"cannot listen on port {cfg.port}: {exc.strerror}", EX_OSERR)
    sock.setblocking(False)
    return sock


def resolve_source(source: str | None) -> dict[int, tuple]:
    """``-B``: the source address to bind outgoing sockets to, per family."""
    if not source:
        return {}
    try:
        infos = socket.getaddrinfo(source, 0, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise BalanceError(f"unknown or invalid address [{source}]", EX_DATAERR)
    result: dict[int, tuple] = {}
    for family, _, _, _, sockaddr in infos:
        result.setdefault(family, sockaddr)
    return result


def open_state(cfg: ProxyConfig) -> SharedState:
    """Take the state file for this port and address, or explain why not."""
    path = state_path(cfg.port, cfg.bind)
    where = f"port {cfg.port}" + (f" address {cfg.bind}" if cfg.bind else "")
    try:
        return SharedState.create(path)
    except MasterRunning as exc:
        raise BalanceError(f"another balance master (pid {exc.pid}) is already running on {where}", EX_OSERR)
    except StateError as exc:
        code = EX_NOPERM if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else EX_OSERR
        raise BalanceError(f"{exc} (set $BALANCE_STATE_DIR to use another directory)", code)


def fill_table(state: SharedState, cfg: ProxyConfig) -> None:
    """Write the groups and channels of the command line into the table."""
    from gbalance.channels import Channels

    channels = Channels(state)
    for group in cfg.groups:
        g = channels.add_group(group.kind)
        for ch in group.channels:
            channels.add_channel(g, ch.address, ch.port, ch.maxc)
    state.set_monitor(MON_ENABLED if cfg.monitor is not None else MON_NONE)


class Master:
    """A running proxy: state, listener, server and (optionally) monitor."""

    def __init__(self, cfg: ProxyConfig, log: Log):
        self.cfg = cfg
        self.log = log
        self.state = open_state(cfg)
        try:
            self.listener = make_listener(cfg)
            self.source = resolve_source(cfg.source)
            fill_table(self.state, cfg)
        except BaseException:
            self.remove_state()
            raise
        self.server = None
        self.monitor = None
        self.mailbox = None

    def remove_state(self) -> None:
        """Delete our state file (only if it is still ours) and unmap it."""
        try:
            if os.stat(self.state.path).st_ino == os.fstat(self.state.fd).st_ino:
                os.unlink(self.state.path)
        except OSError:
            pass
        self.state.close()

    def build(self) -> None:
        """Create the gevent objects (after any fork)."""
        from gevent import get_hub

        import gevent

        from gbalance.channels import Channels
        from gbalance.connect import Connector
        from gbalance.mailbox import Mailbox
        from gbalance.routing import Router
        from gbalance.server import AddressCache, BalanceServer, ChannelEvents, write_stdout

        cfg = self.cfg
        monitoring = cfg.monitor is not None
        loop = get_hub().loop
        channels = Channels(self.state)
        addresses = AddressCache(self.state, channels, self.log)
        events = ChannelEvents(self.state, self.log, debug=cfg.debug,
                               autodisable=cfg.autodisable,
                               passive=monitoring and cfg.monitor.disable, channels=channels)
        connector = Connector(loop, addresses, events, timeout=cfg.connect_timeout,
                              stagger=cfg.monitor.stagger if monitoring else 0.0,
                              source=self.source, keepalive=cfg.server_keepalive)
        router = Router(self.state, hash_failover=cfg.hash_failover, last_resort=monitoring)
        self.server = BalanceServer(self.listener, self.state, router, connector, self.log,
                                    addresses, idle_timeout=cfg.idle_timeout,
                                    dump=write_stdout if cfg.packet_dump else None)
        if monitoring:
            from gbalance.monitor import Monitor
            self.monitor = Monitor(self.state, cfg.monitor, cfg.connect_timeout, self.log,
                                   source=self.source, channels=channels)
        # A shell's ``kill`` request stops the master as SIGTERM does.
        self.mailbox = Mailbox(self.state, channels, on_kill=lambda: gevent.spawn(self.server.stop))

    def trace_channels(self) -> None:
        """``-d``: list the active channels at start-up."""
        self.log.trace("the following channels are active:\n")
        for ch in self.state.channels():
            self.log.trace(f"{ch.group:3d} {ch.index:2d} {ch.address}:{ch.port}:{ch.maxc}\n")

    def listen(self) -> None:
        """Install signal handlers, then start listening.

        In this order a SIGTERM that follows the first accepted connection
        always finds its handler.
        """
        import gevent

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            gevent.signal_handler(sig, self.server.stop)
        try:
            self.listener.listen(LISTEN_BACKLOG)
        except OSError as exc:
            raise BalanceError(f"cannot listen on port {self.cfg.port}: {exc.strerror}", EX_OSERR)

    def serve(self) -> int:
        """Serve until SIGTERM/SIGINT or a shell's ``kill``."""
        if not self.cfg.foreground:   # in the foreground the terminal shows it all
            st = self.state
            nch = sum(st.nchannels(g) for g in range(st.ngroups))
            where = f"{self.cfg.bind}:" if self.cfg.bind else ""
            self.log.info(f"master pid {os.getpid()} listening on {where}{self.cfg.port}, "
                          f"{nch} channels in {st.ngroups} groups")
        if self.monitor is not None:
            self.monitor.start()
        if self.mailbox is not None:
            self.mailbox.start(self.server.loop)
        try:
            self.server.serve_forever()
        finally:
            if self.mailbox is not None:
                self.mailbox.stop()
            if self.monitor is not None:
                self.monitor.stop()
            self.server.close_links()
            self.remove_state()
            self.log.info(f"master on port {self.cfg.port} shut down")
        return 0


def run_master(cfg: ProxyConfig) -> int:
    """Start a master in the foreground (``-f``) or as a daemon."""
    report = None if cfg.foreground else detach()
    log = Log(foreground=cfg.foreground)
    master = None
    try:
        master = Master(cfg, log)
        master.build()
        master.listen()
    except Exception as exc:
        if master is not None:
            master.remove_state()
        if isinstance(exc, BalanceError):
            code, message = exc.code, exc.message
        else:  # a bug: still one line, for the terminal or the waiting parent
            code, message = EX_SOFTWARE, f"internal error: {type(exc).__name__}: {exc}"
        if report is None:
            raise BalanceError(message, code)
        report(code, message)
        os._exit(code)
    if cfg.debug:
        master.trace_channels()
    if report is not None:
        report(0, "")
    return master.serve()
