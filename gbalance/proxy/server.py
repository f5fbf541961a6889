"""The master's listening server: accept, route, connect, forward.

:class:`BalanceServer` is a ``gevent.server.StreamServer`` with these
changes: accepted connections stay plain (non-gevent) sockets because the
forwarder drives them with watchers; a handler's end does not close the
client, the link does; running out of file descriptors pauses accepting
(with one log line) instead of printing a traceback per attempt; and it
can *drain*: close the listener, let every open link (and every connect
still pending) finish, and say when the last one has ended, or reset
whatever is still open when told to.

Limits (``-L``, ``-l``): at ``max_conns`` open connections (links plus
connects pending) the server stops accepting, so further clients wait in
the listen backlog, and accepts again as soon as one ends; it logs when
the limit is reached and when the load has fallen clearly below it again,
not per connection.  A client address (an IPv6 /64) that already has
``per_source`` connections open gets its next ones reset at once; that is
counted and logged at most once per :data:`SOURCE_REPORT_EVERY` per
address.  Both checks are a counter compared per accept.
"""


import _socket
import errno
import os
import select
import socket
import struct
import sys
from typing import TYPE_CHECKING, Any, Callable

from gevent.server import StreamServer

from gbalance.table.channels import Channels
from gbalance.proxy.connect import Connected, Connector, FailReason, Hooks, Race
from gbalance.table.counters import Counters
from gbalance.proxy.forward import DONTWAIT, Link
from gbalance.proxy.frontdoor import FrontDoor
from gbalance.log import Log
from gbalance.proxy.proxyproto import send_header
from gbalance.proxy.routing import Router
from gbalance.proxy.urgent import UrgentRelay, set_owner
from gbalance.table.layout import (C_C, C_SLOTS, C_SUSPECT, CHANNEL_BASE, C_PORT, C_RCVD, C_SENT, C_STAGGERED, C_STAGGER_US, H_GENERATION,
                                   H_MONITOR, MAXCHANNELS, MAXGROUPS, MON_ENABLED, slot)
from gbalance.table.state import SharedState
from gbalance.system.backlog import QUEUE_AT, QUEUE_LEN, TCP_INFO, queue_probe

try:
    import cython
except ImportError:     # no Cython here: this module runs as Python
    from gbalance.proxy import nocython as cython

if TYPE_CHECKING:
    from gbalance.proxy.watchers import EventLoop, TimerWatcher

_FD_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#: Listeners whose accept the compiled build makes itself (csys.pxd gbc_accept).
_INET_FAMILIES = (socket.AF_INET, socket.AF_INET6)
#: accept() errors about one client only (it reset, or a filter refused it).
_ACCEPT_TRANSIENT = (errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EPERM)
#: What the look at accept asks about: an urgent byte, or anything to read.
_WAITING = select.POLLPRI | select.POLLIN
_URGENT = select.POLLPRI
RESUME_DELAY = 0.1
EXHAUSTION_LOG_EVERY = 30.0
#: SO_LINGER on, timeout 0: close() sends a reset instead of a FIN.
LINGER_RESET = struct.pack("ii", 1, 0)
#: Seconds between two log lines about one source over the per-source limit.
SOURCE_REPORT_EVERY = 60.0
# Linux: after accepting, a wake-up asks the listener's accept queue
# (gbalance.system.backlog) and accepts exactly what waits instead of going
# on until accept() fails with EAGAIN, whose exception (a formatted OSError,
# caught) costs more than the look.  Elsewhere the loop accepts until EAGAIN.


def set_reset_on_close(sock: _socket.socket) -> None:
    """Make the next close of ``sock`` abort the connection (RST)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass


class ChannelEvents(Hooks):
    """Counting, tracing, autodisable and passive detection around connects.

    With monitoring on (``passive``) and not switched off in the shell, a
    failed or timed-out connect soft-disables the channel at once (the
    monitor re-enables it when its checks pass) and a connect pending past
    the stagger delay marks the channel suspect.  Without monitoring, ``-a``
    keeps balance's meaning: soft-disable, re-enable by hand.  The state
    changes themselves are :class:`~gbalance.table.channels.Channels`'; only the
    connection counters are added here, in this process's row
    (:class:`~gbalance.table.counters.Counters`).
    """

    # Slots: success() reads one per connection, a dictionary look-up more
    # without.  (The instance keeps the dictionary Hooks gives it: attempt()
    # or success() is replaced there, see __init__.)
    __slots__ = ("state", "q", "counters", "log", "debug", "autodisable", "passive", "channels")

    def __init__(self, state: SharedState, log: Log, debug: bool = False,
                 autodisable: bool = False, passive: bool = False,
                 channels: Channels | None = None, counters: Counters | None = None):
        self.state = state
        self.q = state.q
        self.counters = counters if counters is not None else Counters(state)
        self.log = log
        self.debug = debug
        self.autodisable = autodisable
        self.passive = passive
        self.channels = channels if channels is not None else Channels(state)
        # Per connection, attempt() and success() cost a call and every
        # attribute they read: without -d the counter row's own method is the
        # attempt hook (one call instead of two), with -d success() traces.
        if debug:
            self.success = self._traced_success     # type: ignore[method-assign]
        else:
            self.attempt = self.counters.attempt    # type: ignore[method-assign]

    def _monitoring(self) -> bool:
        """Passive detection applies only while the shell leaves monitoring on."""
        return self.passive and self.q[H_MONITOR] == MON_ENABLED

    def attempt(self, g: int, c: int) -> None:
        self.counters.count_attempt(CHANNEL_BASE + (g * MAXCHANNELS + c) * C_SLOTS)   # slot(g, c, 0)
        if self.debug:
            self.log.trace(f"trying group {g} channel {c} ... ")

    def success(self, g: int, c: int) -> None:
        # (clear_suspect's own first test, without its call: this runs per connection)
        if self.q[CHANNEL_BASE + (g * MAXCHANNELS + c) * C_SLOTS + C_SUSPECT] and self.channels.clear_suspect(g, c):
            self.log.info(f"group {g} channel {c} {self._where(g, c)} answers again: no longer suspect")

    def _traced_success(self, g: int, c: int) -> None:
        """success() with -d: the trace line first."""
        self.log.trace(f"connect to channel {c} successful\n")
        ChannelEvents.success(self, g, c)

    def failure(self, g: int, c: int, reason: str) -> None:
        self.counters.uncount(slot(g, c, 0))
        if self.debug:
            if reason is FailReason.TIMEOUT:
                self.log.trace(f"timeout group {g} channel {c}\n")
            else:
                self.log.trace(f"connection refused group {g} channel {c}\n")
        if self._monitoring():
            if self.channels.soft_disable(g, c):
                self.log.warning(f"group {g} channel {c} {self._where(g, c)} soft-disabled: connect {reason}"
                                 " (monitoring re-enables it when checks pass)")
        elif self.autodisable:
            if self.channels.soft_disable(g, c):
                self.log.warning(f"connection failed group {g} channel {c}")
                self.log.warning(f"{self._where(g, c)} needs to be enabled manually using balance -i"
                                 " after the problem is solved")

    def cancel(self, g: int, c: int) -> None:
        self.counters.uncount(slot(g, c, 0))
        if self.debug:
            self.log.trace(f"cancelled group {g} channel {c}: client gone\n")

    def staggered(self, g: int, c: int) -> None:
        """A parallel connect started because ``g``/``c``'s connect hung: count it
        in this process's row (readers sum ``C_STAGGERED`` over the rows)."""
        self.q[slot(g, c, C_STAGGERED) + self.counters.off] += 1

    def suspect(self, g: int, c: int) -> None:
        if not self._monitoring():
            return
        if self.channels.mark_suspect(g, c):
            self.log.warning(f"group {g} channel {c} {self._where(g, c)} suspect: connect still pending,"
                             " new connections skip it")

    def measured(self, g: int, c: int, delay: float) -> None:
        """The channel's adaptive stagger delay after its latest connect."""
        self.q[slot(g, c, C_STAGGER_US)] = int(delay * 1e6)

    def _where(self, g: int, c: int) -> str:
        addr = self.state.address(g, c)
        port = self.q[slot(g, c, C_PORT)]
        return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


class AddressCache:
    """Numeric socket addresses of the channels, rebuilt when the table's
    generation changes (so ``create``/``assign`` apply to the next connection).

    Every address is checked as it is read back from the file: a channel
    whose address is not a numeric IPv4/IPv6 address (or whose port is out of
    range) is hard-disabled, logged, and never connected to.
    """

    def __init__(self, state: SharedState, channels: Channels | None = None,
                 log: Log | None = None,
                 on_readdress: Callable[[int, int], None] | None = None):
        self.state = state
        self.q = state.q
        self.channels = channels if channels is not None else Channels(state)
        self.log = log
        self.on_readdress = on_readdress   # a channel now points elsewhere
        self.generation = -1
        self.entries: list = []

    def refresh(self) -> None:
        gen = self.q[H_GENERATION]
        if gen == self.generation:
            return
        st = self.state
        entries: list = [None] * (MAXGROUPS * MAXCHANNELS)
        for g in range(min(st.ngroups, MAXGROUPS)):
            for c in range(min(st.nchannels(g), MAXCHANNELS)):
                found = self.channels.address_of(g, c)
                if found is None:
                    if self.channels.invalidate(g, c) and self.log is not None:
                        self.log.warning(f"group {g} channel {c}: invalid address in the state file,"
                                         " channel disabled")
                    entries[g * MAXCHANNELS + c] = (socket.AF_INET, ("0.0.0.0", 0))
                    continue
                addr, port = found
                if ":" in addr:
                    entries[g * MAXCHANNELS + c] = (socket.AF_INET6, (addr, port, 0, 0))
                else:
                    entries[g * MAXCHANNELS + c] = (socket.AF_INET, (addr, port))
        if self.on_readdress is not None and self.entries:
            old = self.entries
            for i, entry in enumerate(entries):
                if entry != old[i]:
                    self.on_readdress(i // MAXCHANNELS, i % MAXCHANNELS)
        self.entries = entries
        self.generation = gen

    def __call__(self, g: int, c: int) -> "tuple[(int, tuple)]":
        return self.entries[g * MAXCHANNELS + c]


class BalanceServer(StreamServer):
    """Accepts clients and proxies each to a channel chosen from the table."""

    loop: "EventLoop"     # (StreamServer's; gevent ships no types)

    def __init__(self, listener: socket.socket, state: SharedState, router: Router,
                 connector: Connector, log: Log, addresses: AddressCache,
                 idle_timeout: float = 0.0, dump: Callable[[str], None] | None = None,
                 counters: Counters | None = None, max_conns: int = 0, per_source: int = 0,
                 proxy: Callable[[_socket.socket, tuple], bytes] | None = None,
                 frontdoor: FrontDoor | None = None):
        super().__init__(listener, handle=self.handle_client)
        #: -P: ``(client_socket, client_address) -> PROXY header``.
        self.proxy = proxy
        #: -A: reads each client's PROXY header first.
        self.frontdoor = frontdoor
        self.state = state
        self.q = state.q
        # This process's counter row (-w N): connections given back through it.
        self.counters = counters if counters is not None else Counters(state)
        self.row = self.counters.off
        self.router = router
        self.connector = connector
        self.log = log
        self.addresses = addresses
        self.idle_timeout = idle_timeout
        self.dump = dump
        self.family = listener.family
        # Every open link (value: idle seconds, for -T) and the race of
        # every accepted client without a link yet (its backend connect
        # pending): what a drain waits for.
        self.links: "dict[Link, float]" = {}
        #: Every link's ``on_close``: one bound method for all of them (a
        #: fresh ``self._closed`` per link is 64 bytes per held connection).
        self.link_closed = self._closed
        #: Counter slot base -> (sent, received, open) indexes of its links.
        self.link_slots: "dict[int, tuple]" = {}
        self.pending: "set[Race]" = set()
        self.draining = False
        self.aborted = False
        self._on_drained: Callable[[], None] | None = None
        self.paused = False
        self.quiet_until = 0.0    # no exhaustion warning before this loop time
        self.deferred = 0
        self._resume_timer: "TimerWatcher | None" = None
        self.on_accepting: "Callable[[], None] | None" = None    # -w N: told when the watcher (re)starts
        # -w N: told when the watcher stops (standby, the connection limit, out
        # of descriptors), with a "still stopped?" test; and before the
        # listener is closed (draining).  A process that stopped watching must
        # not stay where the kernel wakes it for a new client (gbalance.system.exclusive).
        self.on_unwatched: "Callable[[Callable[[], bool]], None] | None" = None
        self.on_closing: "Callable[[], None] | None" = None
        self.standby = False      # -w N: another worker takes new clients (gbalance.process.steering)
        self._sweeper: "TimerWatcher | None" = None
        self.urgent: UrgentRelay | None = None
        self.pid = 0              # owner of every proxied socket (SIGURG), set by start()
        self._queued: Callable[[int, int, int], bytes] | None = None      # the listener's getsockopt, when it tells the accept queue
        self._busy = False        # the last wake-ups found batches: accept until EAGAIN at once
        # -L: not accepting while ``full``; ``limited`` from the first time the
        # limit is reached until the open count is down to ``low_water``.
        self.max_conns = max_conns
        self.low_water = max_conns - max(1, max_conns // 10)
        self.full = False
        self.limited = False
        self.limited_since = 0.0
        # -l: open connections per source key, and the sources over the
        # limit: key -> [connections reset since the last report, its time, name].
        self.per_source = per_source
        self.sources: dict = {}
        self.refused: dict = {}
        self.refused_total = 0
        self.report_every = SOURCE_REPORT_EVERY
        self._reporter: "TimerWatcher | None" = None

    # -- lifecycle ------------------------------------------------------

    def start(self) -> None:
        super().start()
        self.pid = os.getpid()
        self._oob_poll = select.poll()
        self._queued = queue_probe(self.socket)
        self.urgent = UrgentRelay(self.loop, links=self.links)
        self.connector.urgent = self.urgent     # backend sockets are owned too (SIGURG)
        self.connector.send_early = self.proxy is None    # -P: the header goes first
        self.connector.abort_unused = self.proxy is not None    # ... or a reset, never a bare EOF
        if self.frontdoor is not None and self.frontdoor.handle is None:
            # -A: the client's PROXY header is read before all else.
            self.handle_client = self.frontdoor.wrap(self.handle_client)  # type: ignore[method-assign,assignment]  # -A: per server
            self.frontdoor.settled = self._check_drained
        if self.idle_timeout > 0:
            step = max(0.05, min(1.0, self.idle_timeout / 10))
            self._sweeper = self.loop.timer(step, step)
            self._sweeper.start(self._sweep, step)

    # -- accepting ------------------------------------------------------

    def _do_read(self) -> None:
        """The listener is readable: accept what waits (at most
        ``max_accept``) and start each client's race at once.

        Replaces gevent's loop, which does more per client than is needed
        here (a pool check, a ``do_read``/``do_handle`` round) and prints a
        traceback on an unexpected error; here one line is logged instead.
        """
        accept = self.socket._accept
        # Compiled: accept4 on the descriptor (csys.pxd), the same result
        # without the method call, the GIL's round trip or sprintf (a real
        # socket only: anything else, a test's wrapper say, is asked).
        lfd = -1
        if cython.compiled and isinstance(self.socket, _socket.socket) and self.family in _INET_FAMILIES:
            lfd = self.socket.fileno()
        handle = self.handle_client
        limit = self.max_conns
        budget = self.max_accept
        queued = self._queued
        # The wake-up says a client waits: accept it, then ask the queue
        # whether more wait.  None (light load, a wake-up per client): done,
        # with no failed accept.  Some (load): accept until EAGAIN, whose one
        # exception is then shared by the batch; and while wake-ups keep
        # finding batches, skip the look (``_busy``) until one finds a
        # single client again.
        if queued is not None and self._busy:
            queued = None
            floor = 2
        else:
            floor = 1
        waiting = 1 if queued is not None else budget
        while True:
            if waiting > budget:
                waiting = budget
            budget -= waiting
            for i in range(waiting):
                if limit and len(self.links) + len(self.pending) >= limit:
                    self._hold()
                    return
                try:
                    if cython.compiled and lfd >= 0:
                        got = gbc_accept(lfd)
                        if isinstance(got, int):     # -errno: raised as accept() raises it
                            raise OSError(-got, os.strerror(-got))
                        fd, address = got
                    else:
                        fd, address = accept()
                except BlockingIOError:
                    if i < floor:
                        self._busy = False
                    return
                except OSError as exc:
                    if exc.errno in _FD_EXHAUSTED:
                        self._pause(exc)
                        return
                    if exc.errno in _ACCEPT_TRANSIENT:
                        continue            # that client is gone; the next may be fine
                    self._pause(exc, f"accept failed ({exc.strerror})")
                    return
                handle(fd, address)
            if queued is None or budget <= 0:
                return
            try:
                if QUEUE_LEN.unpack_from(queued(socket.IPPROTO_TCP, TCP_INFO, 32), QUEUE_AT)[0] <= 0:
                    return
            except (OSError, struct.error):
                pass
            waiting = budget                # the rest: until EAGAIN
            queued = None
            self._busy = True

    def start_accepting(self) -> None:
        """Watch the listener again (the same watcher, if there is one);
        not while at the connection limit or on standby."""
        if self.full or self.standby:
            return
        watcher = self._watcher
        if watcher is None:
            super().start_accepting()
        elif not watcher.active:
            watcher.start(self._do_read)
        else:
            return
        if self.on_accepting is not None:
            self.on_accepting()

    def set_standby(self, standby: bool) -> None:
        """-w N: leave new clients to the workers asked to accept (``standby``),
        or take them again; what is open is served either way."""
        if standby == self.standby:
            return
        self.standby = standby
        watcher = self._watcher
        if standby:
            if watcher is not None and watcher.active:
                watcher.stop()
                self._unwatched()
        elif self.started and not self.draining and not self.paused:
            self.start_accepting()

    def _unwatched(self) -> None:
        """The listener's watcher stopped: tell ``on_unwatched`` (-w N)."""
        if self.on_unwatched is not None:
            self.on_unwatched(self._not_watching)

    def _not_watching(self) -> bool:
        watcher = self._watcher
        return watcher is None or not watcher.active

    def look_again(self) -> None:
        """-w N: accept what waits, as a wake-up for the listener would, if
        this process is accepting (the master saw clients wait that no worker
        took: a wake-up may have been lost).  Done from the loop, soon."""
        if self.started and not self.draining and not self._not_watching():
            loop: Any = self.loop       # (gevent's stubs do not list run_callback)
            loop.run_callback(self._look)

    def _look(self) -> None:
        if not self.draining and not self._not_watching():
            self._do_read()

    def _hold(self) -> None:
        """At the connection limit: leave new clients in the listen backlog."""
        self.full = True
        if self._watcher is not None and self._watcher.active:
            self._watcher.stop()        # kept, not closed: started again at once when one ends
            self._unwatched()
        if not self.limited:
            self.limited = True
            self.limited_since = self.loop.now()
            self.log.warning(f"connection limit of {self.max_conns} reached (-L);"
                             " new connections wait in the listen backlog")

    def _ended(self) -> None:
        """A connection ended while at or near the connection limit."""
        count = len(self.links) + len(self.pending)
        if self.full and count < self.max_conns:
            self.full = False
            if self.started and not self.draining and not self.paused:
                self.start_accepting()
        if self.limited and count <= self.low_water and not self._backlog():
            self.limited = False
            took = self.loop.now() - self.limited_since
            self.log.info(f"open connections down to {count}, below the limit of {self.max_conns} (-L)"
                          f" again after {took:.1f} seconds")

    def _backlog(self) -> bool:
        """Do clients wait in the listen backlog?  (Asked only while limited.)"""
        try:
            poll = select.poll()
            poll.register(self.socket.fileno(), select.POLLIN)
            return bool(poll.poll(0))
        except (OSError, ValueError, AttributeError):
            return False

    # -- per-source limit (-l) ------------------------------------------------

    def _refuse(self, client, key, address) -> None:
        """``key`` has ``per_source`` connections open: reset this one."""
        set_reset_on_close(client)
        client.close()
        self.refused_total += 1
        entry = self.refused.get(key)
        if entry is not None:
            entry[0] += 1
            return
        name = source_name(key, address)
        self.refused[key] = [0, self.loop.now(), name]
        self.log.warning(f"{name} has {self.per_source} connections open, the per-source limit (-l):"
                         f" its new connections are reset (reported at most every {self.report_every:g} seconds)")
        if self._reporter is None:
            step = self.report_every / 4
            self._reporter = self.loop.timer(step, step)
            self._reporter.start(self._report_refused)

    def _report_refused(self) -> None:
        """Every quarter report period: one line per source whose period is over
        and that had connections reset in it; forget sources that had none."""
        now = self.loop.now()
        for key, entry in list(self.refused.items()):
            if now - entry[1] < self.report_every - 1e-6:
                continue
            if entry[0]:
                self.log.warning(f"{entry[2]}: {entry[0]} more connection{'s' if entry[0] != 1 else ''} reset"
                                 f" over the per-source limit of {self.per_source} (-l) in"
                                 f" {now - entry[1]:.0f} seconds ({self.refused_total} from all sources"
                                 " since start)")
                entry[0] = 0
                entry[1] = now
            else:
                del self.refused[key]
        if not self.refused and self._reporter is not None:
            self._reporter.stop()
            self._reporter = None

    def _release(self, key) -> None:
        """A connection from ``key`` ended (per-source limit)."""
        sources = self.sources
        n = sources.get(key, 0) - 1
        if n > 0:
            sources[key] = n
        else:
            sources.pop(key, None)

    def _pause(self, exc: OSError, what: str = "") -> None:
        """Out of descriptors (or ``what`` else went wrong): stop accepting
        until a link closes or a moment passes."""
        self.deferred += 1
        if self.paused:
            return
        self.paused = True
        now = self.loop.now()
        if now >= self.quiet_until:      # at most one line per EXHAUSTION_LOG_EVERY
            self.quiet_until = now + EXHAUSTION_LOG_EVERY
            more = f" ({self.deferred - 1} more since the last report)" if self.deferred > 1 else ""
            self.log.warning(f"{what or f'out of descriptors ({exc.strerror})'}; pausing new connections{more}")
            self.deferred = 0
        self.stop_accepting()
        self._unwatched()
        self._resume_timer = self.loop.timer(RESUME_DELAY)
        self._resume_timer.start(self._resume)

    def _resume(self) -> None:
        if not self.paused:
            return
        self.paused = False
        if self._resume_timer is not None:
            self._resume_timer.stop()
            self._resume_timer = None
        if self.started and not self.draining:
            self.start_accepting()

    # -- draining ---------------------------------------------------------

    @property
    def open_count(self) -> int:
        """Links plus connects still pending."""
        return len(self.links) + len(self.pending)

    def drain(self, on_drained: Callable[[], None]) -> None:
        """Close the listener (new connects are refused) and call
        ``on_drained`` once every link and pending connect has ended.

        Only this process's descriptor is closed: a listening socket that
        was handed to a new master keeps listening there.
        """
        if self.draining:
            return
        self.draining = True
        self._on_drained = on_drained
        if self._resume_timer is not None:
            self._resume_timer.stop()
            self._resume_timer = None
        self.paused = False
        if self.on_closing is not None:
            self.on_closing()
        self.close()
        self._check_drained()

    def _check_drained(self) -> None:
        if self.draining and not self.links and not self.pending and self._on_drained is not None:
            if self.frontdoor is not None and self.frontdoor.waiting:
                return    # -A: clients still sending their header are accepted clients too
            callback, self._on_drained = self._on_drained, None
            callback()

    def reset_all(self) -> int:
        """Abort every open link and pending connect (clients see a reset).

        Returns how many were open.  Pending connects are abandoned (their
        attempts closed, their counts given back) and their clients reset.
        """
        self.aborted = True
        self._on_drained = None
        count = self.open_count
        self.sources.clear()
        if self.frontdoor is not None:
            count += self.frontdoor.close_all()
        for race in list(self.pending):
            race.abandon()
            set_reset_on_close(race.client)
            race.client.close()
        self.pending.clear()
        for link in list(self.links):
            set_reset_on_close(link.client)
            set_reset_on_close(link.server)
            link.close()
        return count

    def finish(self) -> None:
        """Stop the idle sweeper and the accept-resume timer (at exit)."""
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None
        if self._resume_timer is not None:
            self._resume_timer.stop()
            self._resume_timer = None
        if self._reporter is not None:
            self._reporter.stop()
            self._reporter = None

    # -- per connection -------------------------------------------------

    def handle_client(self, fd: int, address: tuple) -> None:
        """A client was accepted: start racing to a backend for it.

        Runs in the listener's callback; the race goes on in watcher
        callbacks and ends in :meth:`_connected`.
        """
        client = _socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
        if self.aborted:        # accepted just before a stop-at-once
            set_reset_on_close(client)
            client.close()
            return
        key = None
        if self.per_source:
            key = source_key(address[0])
            n = self.sources.get(key, 0)
            if n >= self.per_source:
                self._refuse(client, key, address[0])
                return
            self.sources[key] = n + 1
        try:
            if not DONTWAIT:      # else every send and recv says MSG_DONTWAIT
                client.setblocking(False)
            # Urgent data from now on raises SIGURG (F_SETOWN) ... but an
            # urgent byte that came before (queued with the connection)
            # raised none: look once, and keep it for the link.  The same
            # look tells whether the client has spoken already (the race
            # then reads it first and sends it with the connect).
            if cython.compiled:      # (the same two calls on the descriptor: csys.pxd)
                if gbc_setowner(fd, self.pid) < 0:
                    raise OSError(f"fcntl(F_SETOWN) failed on descriptor {fd}")
                revents = gbc_poll1(fd, _WAITING)
                if revents < 0:
                    raise OSError(-revents, os.strerror(-revents))
            else:
                set_owner(fd, self.pid)
                poll = self._oob_poll
                poll.register(fd, _WAITING)
                queued = poll.poll(0)
                poll.unregister(fd)
                revents = queued[0][1] if queued else 0
            oob = b""
            talking = False
            if revents:
                if revents & _URGENT:
                    oob = _take_urgent(client)
                else:
                    talking = True
            addresses = self.addresses
            if self.q[H_GENERATION] != addresses.generation:
                addresses.refresh()
            race = Race(self.connector, client, self.router.candidates(address[0]), self._connected, address)
            race.oob = oob
            race.source = key
            self.pending.add(race)
        except Exception as exc:  # never let one client take the server down
            client.close()
            self.log.error(f"internal error handling {address[0]}: {type(exc).__name__}: {exc}")
            if key is not None:
                self._release(key)
            self._check_drained()
            return
        race.start(talking)

    def _connected(self, race: Race, result: Connected | None, error: BaseException | None) -> None:
        """A race ended: link the client to its backend, or let it go."""
        pending = self.pending
        pending.discard(race)
        client = race.client
        if error is not None:
            client.close()
            self.log.error(f"internal error handling {race.peer[0]}: {type(error).__name__}: {error}")
            self._gone(race.source)
            self._check_drained()
            return
        if result is None or self.aborted:
            shortage = race.shortage
            if shortage is not None and shortage.errno in _FD_EXHAUSTED and not self.draining:
                self._pause(shortage)    # as when accept runs out: wait for a link to close
            if result is not None:   # stopped while connecting: reset both ends
                set_reset_on_close(client)
                set_reset_on_close(result.sock)
                result.sock.close()
                self.counters.uncount(slot(result.group, result.channel, 0))
            client.close()
            self._gone(race.source)
            if self.draining:
                self._check_drained()
            return
        try:
            rest = b""
            if self.proxy is not None:   # -P: the PROXY header goes first
                rest = send_header(result.sock, self.proxy(client, race.peer))
            base = CHANNEL_BASE + (result.group * MAXCHANNELS + result.channel) * C_SLOTS + self.row
            idx = self.link_slots.get(base)
            if idx is None:
                # A channel's counter indexes, made once and shared by its
                # links (else three int objects more per held connection).
                idx = self.link_slots[base] = (base + C_SENT, base + C_RCVD, base + C_C)
            # All positional: keyword arguments would cost a dict per connection.
            # (loop, client, server, q, sent_idx, rcvd_idx, c_idx, on_close, dump, urgent,
            #  client_watcher, server_watcher, early, server_reset, early_sent, watchers)
            link = Link(self.loop, client, result.sock, self.q, idx[0], idx[1], idx[2],
                        self.link_closed, self.dump, self.urgent, result.client_watcher, result.server_watcher,
                        result.early, result.reset, result.sent, self.connector.watchers)
        except Exception as exc:  # never let one client take the server down
            client.close()
            result.sock.close()
            self.counters.uncount(slot(result.group, result.channel, 0))
            self.log.error(f"internal error handling {race.peer[0]}: {type(exc).__name__}: {exc}")
            self._gone(race.source)
            self._check_drained()
            return
        link.source = race.source
        self.links[link] = 0.0
        try:
            link.start(rest, race.oob)    # rare: a header's unsent rest; an urgent byte sent before accept
        except Exception as exc:  # never let one client take the server down
            link.abort()
            self.log.error(f"internal error handling {race.peer[0]}: {type(exc).__name__}: {exc}")

    def _closed(self, link: Link) -> None:
        self.links.pop(link, None)
        source = link.source
        if source is not None or self.limited:
            self._gone(source)
        if self.paused:
            self._resume()
        elif self.draining:
            self._check_drained()

    def _gone(self, key) -> None:
        """A connection (pending or linked) ended: the limits' bookkeeping."""
        if key is not None:
            self._release(key)
        if self.limited:
            self._ended()

    def _sweep(self, step: float) -> None:
        """End links idle (no bytes either way) for ``idle_timeout`` seconds.

        A link with nothing in flight is closed (a FIN each way, as
        balance does); one with bytes still on their way (held here, or
        in a socket's queues) is reset on both sides, so neither end can
        take the cut transfer for a whole one.  One log line per sweep.
        """
        expired = []
        for link, idle in self.links.items():
            if link.active:
                link.active = False
                self.links[link] = 0.0
            else:
                idle += step
                self.links[link] = idle
                if idle >= self.idle_timeout - 1e-9:
                    expired.append(link)
        closed = reset = 0
        for link in expired:
            if link.in_flight():
                reset += 1
                link.reset()
            else:
                closed += 1
                link.close()
        if closed:
            self.log.info(f"timed out after {self.idle_timeout:g} seconds"
                          + (f" ({closed} connections)" if closed > 1 else ""))
        if reset:
            self.log.info(f"timed out after {self.idle_timeout:g} seconds with data in flight: reset"
                          + (f" ({reset} connections)" if reset > 1 else ""))


def source_key(host: str):
    """What the per-source limit counts by: an IPv4 address (also written
    as IPv4-mapped IPv6) as it is, an IPv6 address by its /64 network."""
    if ":" not in host or "." in host:
        return host
    try:
        return socket.inet_pton(socket.AF_INET6, host.partition("%")[0])[:8]
    except OSError:
        return host


def source_name(key, host: str) -> str:
    """How a source key is written in the log."""
    if isinstance(key, bytes):
        return socket.inet_ntop(socket.AF_INET6, key + bytes(8)) + "/64"
    return host


def _take_urgent(client) -> bytes:
    """The urgent byte a client sent before it was accepted (b"" if none yet)."""
    try:
        return client.recv(1, socket.MSG_OOB | DONTWAIT)
    except OSError:
        return b""


def write_stdout(text: str) -> None:
    """Packet-dump sink: stdout, flushed so a pipe sees each chunk at once."""
    sys.stdout.write(text)
    sys.stdout.flush()
