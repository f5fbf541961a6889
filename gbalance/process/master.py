"""The master process: from a validated config to a serving proxy.

Order matters: detach first (before any gevent hub exists), then take the
state file (a live master on the same port and address is an error), then
bind the listener, fill the table, start the server and report success to
the waiting parent (and to systemd: ``READY=1``).  With ``-r`` the listener
and the right to the state file come from the running master instead
(:mod:`gbalance.process.handover`): the socket is received first, then our state
file is prepared under a temporary name and filled (the command line, plus
what :mod:`gbalance.table.carry` copies from the running master's table), the
server (or the workers) starts accepting, and only then is the socket
taken; the old master lets go of its state file and ours is renamed over
it.  From then on no failure gives the port up.

Stopping: SIGTERM (or the shell's ``kill``) *drains*: the listener is
closed at once, the state file given up (a new master may start at once)
and the open links run on until the last one ends or the ``-g`` grace
period is over; then whatever is still open is reset.  A second SIGTERM,
or SIGINT at any time, resets everything and exits at once.  SIGHUP is
logged and ignored.
"""

from __future__ import annotations

import enum
import errno
import functools
import os
import signal
import socket
import time
from typing import Any

import gevent
from gevent import socket as gsocket
from gevent.event import Event

from gbalance.process import handover
from gbalance.system import heap, notify
from gbalance.config import ProxyConfig
from gbalance.system.daemon import detach
from gbalance.errors import EX_DATAERR, EX_NOPERM, EX_OSERR, EX_SOFTWARE, BalanceError
from gbalance.system.limits import LISTEN_BACKLOG, raise_and_report
from gbalance.log import Log
from gbalance.monitor.monitor import Monitor
from gbalance.process.pool import WorkerPool
from gbalance.process.serving import Serving
from gbalance.proxy.connect import set_keepalive
from gbalance.proxy.proxyproto import check_header
from gbalance.proxy.stagger import initial_delay
from gbalance.system.evloop import install_hub
from gbalance.table.carry import Carry, open_previous, table_digest
from gbalance.table.channels import Channels
from gbalance.table.counters import Counters
from gbalance.table.mailbox import Mailbox
from gbalance.wiring import build_server
from gbalance.table.files import MasterRunning, StateError, state_path
from gbalance.table.layout import H_NGROUPS, H_STAGGER_US, H_START_TICKS, H_TABLE_DIGEST
from gbalance.table.liveness import master_process_alive
from gbalance.table.state import SharedState


#: How long a new master (-r) retries taking the state file the old one gave up.
STATE_RETRY = 1.0


class Phase(enum.Enum):
    """Where a master is in its life."""

    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


def listen_address(cfg: ProxyConfig) -> tuple[int, tuple]:
    """The family and socket address balance listens on: IPv4 by default, dual-stack with -6."""
    if cfg.bind:
        family = socket.AF_INET6 if cfg.ipv6 else socket.AF_UNSPEC
        try:
            infos = socket.getaddrinfo(cfg.bind, cfg.port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        except (OSError, UnicodeError) as exc:
            raise BalanceError(f"cannot bind to [{cfg.bind}]: {getattr(exc, 'strerror', None) or exc}", EX_OSERR)
        family, _, _, _, sockaddr = infos[0]
        return family, sockaddr
    if cfg.ipv6:
        return socket.AF_INET6, ("::", cfg.port, 0, 0)
    return socket.AF_INET, ("0.0.0.0", cfg.port)


def set_listener_options(sock: socket.socket, cfg: ProxyConfig) -> None:
    """Options accepted sockets inherit on Linux: no per-connection syscalls."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if cfg.client_keepalive:
        set_keepalive(sock, cfg.client_keepalive)


def make_listener(cfg: ProxyConfig) -> socket.socket:
    """Bind (not yet listen) as balance does."""
    family, sockaddr = listen_address(cfg)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass
        set_listener_options(sock, cfg)
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


def request_handover(cfg: ProxyConfig, log: Log) -> handover.Inherited | None:
    """``-r``: receive the listening socket of the master running on this port.

    Returns it (checked to listen on our address) with the old master's
    pid, not yet taken: the old master still accepts until
    :meth:`Master.take_over`.  None when no master offers one (then we
    start as usual).
    """
    inherited = handover.request(handover.control_path(state_path(cfg.port, cfg.bind)),
                                 warn=log.warning)
    if inherited is None:
        return None
    family, sockaddr = listen_address(cfg)
    why = handover.check_listener(inherited.sock, family, sockaddr)
    if why is not None:
        inherited.abandon()
        raise BalanceError(f"the running master (pid {inherited.pid}) cannot be replaced: its socket {why}"
                           " (stop it first)", EX_OSERR)
    return inherited


def _state_error(exc: StateError) -> BalanceError:
    code = EX_NOPERM if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else EX_OSERR
    return BalanceError(f"{exc} (set $BALANCE_STATE_DIR to use another directory)", code)


def prepare_state(cfg: ProxyConfig) -> SharedState:
    """``-r``: our state file, ready beside the running master's (not yet in place)."""
    try:
        return SharedState.prepare(state_path(cfg.port, cfg.bind))
    except StateError as exc:
        raise _state_error(exc)


def open_state(cfg: ProxyConfig, retry: float = 0.0) -> SharedState:
    """Take the state file for this port and address, or explain why not.

    ``retry``: keep trying this long while another master still holds it
    (the one we replace is letting go of it).
    """
    path = state_path(cfg.port, cfg.bind)
    where = f"port {cfg.port}" + (f" address {cfg.bind}" if cfg.bind else "")
    deadline = time.monotonic() + retry
    try:
        while True:
            try:
                return SharedState.create(path)
            except MasterRunning:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
    except MasterRunning as exc:
        if not cfg.replace:
            hint = "; use -r to replace it"
        elif not retry:
            hint = " and offers no hand-over (no control socket): stop it first"
        else:
            hint = ""
        raise BalanceError(f"another balance master (pid {exc.pid}) is already running on {where}{hint}",
                           EX_OSERR)
    except StateError as exc:
        raise _state_error(exc)


def fill_table(state: SharedState, cfg: ProxyConfig) -> None:
    """Write the groups and channels of the command line into the table."""
    state.q[H_NGROUPS] = 0        # (again after a hand-over: the table is rebuilt)
    channels = Channels(state)
    for group in cfg.groups:
        g = channels.add_group(group.kind)
        for ch in group.channels:
            channels.add_channel(g, ch.address, ch.port, ch.maxc)
    channels.start_monitor(cfg.monitor is not None)
    state.set_workers(cfg.workers)
    state.q[H_TABLE_DIGEST] = table_digest(cfg.groups)


class Master:
    """A running proxy: state, listener, server and (optionally) monitor."""

    def __init__(self, cfg: ProxyConfig, log: Log):
        self.cfg = cfg
        self.log = log
        self.replaced_pid = 0
        self.inherited: handover.Inherited | None = None
        self.carry: Carry | None = None     # the replaced master's table (gbalance.table.carry)
        self.old_ticks = 0
        self.started = False        # the server accepts already (take_over)
        # Everything that can fail on our own arguments fails before a
        # hand-over, while the running master still serves.
        self.source = resolve_source(cfg.source)
        if cfg.replace:
            self.inherited = request_handover(cfg, log)
        if self.inherited is not None:
            # Prepare all that can fail (state file, table) while the old
            # master still accepts; the socket is taken in take_over().
            inherited = self.inherited
            self.listener, self.replaced_pid = inherited.sock, inherited.pid
            try:
                self.state = prepare_state(cfg)
            except BaseException:
                inherited.abandon()
                raise
            try:
                old = open_previous(self.state.path, inherited.pid)
                if old is not None:
                    self.old_ticks = old.q[H_START_TICKS]
                    self.carry = Carry(old, cfg)
                fill_table(self.state, cfg)
                if self.carry is not None:
                    self.carry.apply(self.state)
            except BaseException:
                inherited.abandon()
                self.remove_state()
                raise
        else:
            self.state = open_state(cfg)
            try:
                self.listener = make_listener(cfg)
                fill_table(self.state, cfg)
            except BaseException:
                self.remove_state()
                raise
        # Made by build(), after any fork: the serving side (a BalanceServer
        # or the WorkerPool) and the event that ends serve().
        self.server: Serving
        self.done: Any
        self.monitor: Monitor | None = None
        self.mailbox: Mailbox | None = None
        self.control: handover.HandoverServer | None = None
        self.control_opened = False
        self.phase = Phase.SERVING
        self.grace_timer: Any = None        # gevent objects (no type information)
        self.monitor_stopper: Any = None

    def remove_state(self, unlink: bool = True) -> None:
        """Give up our state file (removed if it is still ours); the mapping stays."""
        self.state.release(unlink)

    def take_over(self) -> None:
        """``-r``: take the listener from the old master, then put our table in place.

        Our server starts accepting first (its table already holds what the
        old master's had a moment ago), so the port never waits for us:
        for a moment both masters accept from the one socket.  From the old
        master's ``DONE`` on, nothing makes us give the socket up: if our
        state file cannot be put in place we serve on from its temporary
        name and say so.  Only when the old master never confirmed and still
        holds its state file is the hand-over abandoned (it serves on; what
        we accepted meanwhile drains as on SIGTERM).
        """
        inherited, self.inherited = self.inherited, None
        if inherited is None:
            return
        try:
            set_listener_options(self.listener, self.cfg)
        except OSError:
            pass
        self.listener.setblocking(False)
        self.server.start()
        self.started = True
        # Wait for the old master's answer in the loop, so that we accept meanwhile.
        inherited.conn = gsocket.socket(fileno=inherited.conn.detach())
        inherited.conn.settimeout(handover.STEP_TIMEOUT)
        gevent.sleep(0)
        why = inherited.take()
        state = self.state
        placed: StateError | None
        try:
            state.place(retry=STATE_RETRY if why is None else 0.0)
            placed = None
        except MasterRunning as exc:
            if why is not None:        # it never let go: it serves on, we drain and leave
                self.begin_drain(f"hand-over from master pid {inherited.pid} failed ({why})",
                                 handed_over=True)
                self.done.wait(self.cfg.grace + 1.0)
                raise BalanceError(f"hand-over from master pid {inherited.pid} failed: {why}", EX_OSERR)
            placed = exc
        except StateError as exc:
            placed = exc
        if why is not None:
            self.log.warning(f"master pid {inherited.pid} did not confirm the hand-over ({why}) but"
                             " let go of its state file: serving")
        if self.carry is not None:     # again: the admin may have changed it meanwhile
            for warn, line in self.carry.apply(state):
                (self.log.warning if warn else self.log.info)(line)
        if placed is not None:
            self.log.error(f"{placed}; serving port {self.cfg.port} on with the state file at"
                           f" {state.pending}: -i, -c and -r cannot reach this master until it is"
                           " stopped and started again")
            state.path, state.pending = state.pending, ""

    def build(self) -> None:
        """Create the gevent objects (after any fork)."""
        cfg = self.cfg
        mon = cfg.monitor
        if mon is None and cfg.workers <= 1:
            # No child processes to watch: a loop without libev's per-turn getpid.
            install_hub()
        self.done = Event()
        channels = Channels(self.state, self._own_lock() if cfg.workers > 1 else -1)
        if mon is not None and mon.stagger > 0:
            # The delay shown for channels no process has measured yet.
            self.state.q[H_STAGGER_US] = int(initial_delay(mon.stagger) * 1e6)
        if cfg.workers > 1:
            self.server = WorkerPool(cfg, self.state, self.listener, self.log, self.source)
        else:
            self.server = build_server(cfg, self.state, self.listener, self.log, self.source,
                                       channels, Counters(self.state))
        if mon is not None:
            # -P: health checks send a header too (clients' headers: wiring.build_server).
            header = None if cfg.proxy_protocol is None else functools.partial(check_header, cfg.proxy_protocol)
            self.monitor = Monitor(self.state, mon, cfg.connect_timeout, self.log,
                                   source=self.source, channels=channels, proxy_header=header)
        # A shell's ``kill`` request drains as SIGTERM does (balance's forked
        # children, too, finished their transfers when the master was killed).
        self.mailbox = Mailbox(self.state, channels, on_kill=lambda: gevent.spawn(self.begin_drain, "kill from the shell"))

    def _own_lock(self) -> int:
        """The master's own open of the lock file, for state changes with -w N (see
        :class:`~gbalance.table.channels.Channels`); -1, with a warning, if it cannot be had."""
        try:
            return self.state.open_own_lock()
        except StateError as exc:
            self.log.warning(f"{exc}; channel state changes are made without the lock")
            return -1

    def trace_channels(self) -> None:
        """``-d``: list the active channels at start-up."""
        self.log.trace("the following channels are active:\n")
        for ch in self.state.channels():
            self.log.trace(f"{ch.group:3d} {ch.index:2d} {ch.address}:{ch.port}:{ch.maxc}\n")

    def listen(self) -> None:
        """Install signal handlers, then start listening.

        In this order a SIGTERM that follows the first accepted connection
        always finds its handler.  ``listen()`` on an inherited socket that
        already listens only sets the backlog; its queue is kept.
        """
        gevent.signal_handler(signal.SIGTERM, self.on_sigterm)
        gevent.signal_handler(signal.SIGINT, self.on_sigint)
        gevent.signal_handler(signal.SIGHUP, self.on_sighup)
        if self.inherited is None:
            # The control socket exists before the port answers, so a
            # ``balance -r`` that follows the first answer finds it.  (Its
            # requests wait in its queue until serve() runs the hub, and the
            # server accepts by then.)  With -r it comes after the hand-over:
            # until then the path is the old master's.
            self.open_control()
        try:
            self.listener.listen(LISTEN_BACKLOG)
        except OSError as exc:
            raise BalanceError(f"cannot listen on port {self.cfg.port}: {exc.strerror}", EX_OSERR)

    # -- signals -------------------------------------------------------------

    def on_sigterm(self) -> None:
        if self.phase is Phase.SERVING:
            self.begin_drain("SIGTERM")
        else:
            self.stop_now("second SIGTERM")

    def on_sigint(self) -> None:
        self.stop_now("SIGINT")

    def on_sighup(self) -> None:
        self.log.info("SIGHUP ignored (SIGTERM drains and stops, balance -r replaces this master)")

    # -- stopping ------------------------------------------------------------

    def begin_drain(self, why: str, handed_over: bool = False, at_once: bool = False) -> None:
        """Stop accepting, give up the state file, let the open links finish.

        Stops accepting before the state file goes, so that after a hand-over
        no new link starts here.  ``at_once``: the caller resets what is open.
        """
        if self.phase is not Phase.SERVING:
            return
        self.phase = Phase.DRAINING
        server = self.server
        server.stop_accepting()
        if self.control is not None:
            self.control.close()
        if self.mailbox is not None:
            self.mailbox.stop()     # the file goes now: no shell can reach us any more
        self.remove_state(unlink=not handed_over)   # the new master renames its own over it
        if not handed_over:
            notify.stopping()
        if self.monitor is not None:
            self.monitor_stopper = gevent.spawn(self.monitor.stop)
        grace = self.cfg.grace
        count = server.open_count
        if at_once:
            self.log.info(f"{why}: stopping now")
        elif count:
            self.log.info(f"{why}: no longer accepting; waiting up to {grace:g} seconds for"
                          f" {count} open connection{'s' if count != 1 else ''}")
        else:
            self.log.info(f"{why}: no longer accepting; no open connections")
        server.drain(self._drained)
        if self.phase is not Phase.DRAINING or at_once:
            return
        if grace <= 0:
            self._grace_over()
            return
        self.grace_timer = server.loop.timer(grace)
        self.grace_timer.start(self._grace_over)

    def stop_now(self, why: str) -> None:
        """Reset whatever is open and exit."""
        if self.phase is Phase.STOPPED:
            return
        if self.phase is Phase.SERVING:
            self.begin_drain(why, at_once=True)
        elif why:
            self.log.info(f"{why}: stopping now")
        if self.phase is Phase.STOPPED:
            return
        count = self.server.reset_all()
        if count:
            self.log.info(f"reset {count} open connection{'s' if count != 1 else ''}")
        self._finish()

    def _drained(self) -> None:
        if self.phase is Phase.DRAINING:
            self._finish()

    def _grace_over(self) -> None:
        if self.phase is not Phase.DRAINING:
            return
        count = self.server.reset_all()
        self.log.info(f"grace period of {self.cfg.grace:g} seconds over: reset {count} open"
                      f" connection{'s' if count != 1 else ''}")
        self._finish()

    def _finish(self) -> None:
        self.phase = Phase.STOPPED
        if self.grace_timer is not None:
            self.grace_timer.stop()
            self.grace_timer = None
        self.done.set()

    def _fold_late_counts(self) -> None:
        """Once the replaced master has exited, add what its draining links counted."""
        carry = self.carry
        if carry is None:
            return
        deadline = time.monotonic() + self.cfg.grace + 60.0
        try:
            while master_process_alive(self.replaced_pid, self.old_ticks) and time.monotonic() < deadline:
                gevent.sleep(0.5)
            if self.phase is Phase.SERVING:
                carry.fold(self.state)
        finally:
            carry.close()
            self.carry = None

    def open_control(self) -> None:
        """Create the control socket ``balance -r`` asks for the listener (once;
        if that fails this master serves on without, as the warning says)."""
        self.control_opened = True
        control = handover.HandoverServer(handover.control_path(self.state.path),
                                          self.listener.fileno(), self._handed_over,
                                          self.log.warning)
        self.control = control if control.start() else None

    def _handed_over(self, pid: int) -> None:
        """The new master (``pid``) has our socket: drain as on SIGTERM."""
        self.begin_drain(f"replaced by master pid {pid}", handed_over=True)

    # -- serving -------------------------------------------------------------

    def serve(self) -> int:
        """Serve until stopped (SIGTERM, SIGINT, the shell's ``kill``, or ``-r``)."""
        where = f"{self.cfg.bind}:" if self.cfg.bind else ""
        if not self.cfg.foreground:   # in the foreground the terminal shows it all
            st = self.state
            nch = sum(st.nchannels(g) for g in range(st.ngroups))
            workers = f", {self.cfg.workers} workers" if self.cfg.workers > 1 else ""
            self.log.info(f"master pid {os.getpid()} listening on {where}{self.cfg.port}, "
                          f"{nch} channels in {st.ngroups} groups{workers}")
        if self.replaced_pid:
            self.log.info(f"took over {where}{self.cfg.port} from master pid {self.replaced_pid}")
        if self.monitor is not None:
            self.monitor.start()
        if self.mailbox is not None:
            self.mailbox.start(self.server.loop)
        if self.carry is not None:
            gevent.spawn(self._fold_late_counts)
        try:
            if not self.started:
                self.server.start()
            if not self.control_opened:
                self.open_control()
            notify.ready()
            self.done.wait()
        finally:
            if self.mailbox is not None:
                self.mailbox.stop()
            self.server.finish()
            if self.control is not None:
                self.control.close()
            if self.monitor is not None:
                if self.monitor_stopper is not None:
                    self.monitor_stopper.join(timeout=5)
                else:
                    self.monitor.stop()
            self.remove_state()
            self.log.info(f"master on port {self.cfg.port} shut down")
        return 0


def run_master(cfg: ProxyConfig) -> int:
    """Start a master in the foreground (``-f``) or as a daemon."""
    notify.notify_address()       # read (and unset) $NOTIFY_SOCKET before any child runs
    report = None if cfg.foreground else detach()
    log = Log(foreground=cfg.foreground)
    raise_and_report(log, quiet=cfg.foreground and not cfg.debug)
    master = None
    try:
        master = Master(cfg, log)
        master.build()
        master.listen()
        master.take_over()
    except Exception as exc:
        if master is not None:
            if master.control is not None:
                master.control.close()
            master.remove_state()
        if isinstance(exc, BalanceError):
            code, message = exc.code, exc.message
        else:  # a bug: still one line, for the terminal or the waiting parent
            code, message = EX_SOFTWARE, f"internal error: {type(exc).__name__}: {exc}"
        if report is None:
            raise BalanceError(message, code)
        report(code, message)
        os._exit(code)
    # Serving from here on: later collections need not walk what start-up
    # left (said before -d's channel list, which -d's users read as balance's).
    frozen = heap.freeze_startup()
    if cfg.debug:
        log.info(f"start-up heap frozen: {frozen} objects")
        master.trace_channels()
    if report is not None:
        report(0, "")
    return master.serve()
