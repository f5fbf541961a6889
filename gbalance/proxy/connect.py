"""Backend connects: timed, cancellable, and (with monitoring) staggered.

For each client the server runs one :class:`Race`.  It asks the router for
candidates and connects to them in turn, each with the ``-t`` timeout,
until one succeeds (with a stagger delay, a hanging connect overlaps the
next: see below); every attempt, success, refusal, timeout, cancel and
hang is reported through :class:`Hooks` so the server can count, trace,
autodisable, mark suspects and log.  Additions over balance:

* a client that hangs up while its connect is pending cancels it: what it
  sends meanwhile is read into a small buffer (passed to the link, which
  sends it first), so the watch goes on after a request too.  A reset
  always cancels; an end of stream cancels only before any data (after a
  request it may be a half-close that awaits the reply).  Each client's
  buffer holds at most :data:`EARLY_MAX` bytes, and all of a process's
  races together at most :data:`EARLY_TOTAL`: past either, the client is
  no longer read (its bytes wait in the kernel) until its link starts;
* a connect that completed and was reset before this process saw it
  (``ECONNRESET``) is not a failed connect: the link passes on what the
  backend sent, then the reset, as a direct connection would show;
* with a *stagger* delay (monitoring only), a connect still pending after
  the delay starts a parallel attempt on the next candidate, the first to
  connect wins and the others are closed (RFC 8305 "happy eyeballs",
  applied to failover).  The delay adapts to each channel's measured
  connect times (:mod:`gbalance.proxy.stagger`), between a floor and the
  configured ``stagger=``; before a parallel attempt starts, the pending
  one is asked once more whether it has connected meanwhile (a busy loop
  may not have seen it yet).  Without monitoring the delay is 0 and
  connects are strictly one after another, exactly as balance documents.

A race is a state machine moved on by libev watcher callbacks (the
connects, their timers, the client), like the forwarder: no greenlet per
client and no switches.  :meth:`Connector.race` wraps it for callers that
want to block a greenlet on it.
"""


import _socket
import errno
import os
import select
import socket
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Any, Callable, Iterator

from gevent.hub import Waiter

from gbalance.proxy.forward import DONTWAIT
from gbalance.proxy.records import Connected as Connected
from gbalance.proxy.stagger import StaggerEstimator
from gbalance.proxy.urgent import set_owner
from gbalance.proxy.watchers import READ, WRITE, Watchers

try:
    import cython
except ImportError:     # no Cython here: this module runs as Python
    from gbalance.proxy import nocython as cython

if cython.compiled:
    gbc_init(_socket.socket)     # gbc_fd reads a socket's descriptor in place

if TYPE_CHECKING:
    from gbalance.proxy.urgent import UrgentRelay
    from gbalance.proxy.watchers import EventLoop, IoWatcher, TimerWatcher

_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0)
#: Errors that say this process is out of resources, not that a channel is bad.
_LOCAL_SHORTAGE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                   errno.EADDRNOTAVAIL, errno.EADDRINUSE)
#: connect() errors that say no local port is free for this destination
#: (ephemeral ports exhausted): no channel is to blame, but another
#: destination may still have ports.
_NO_PORT = (errno.EADDRNOTAVAIL, errno.EADDRINUSE, errno.EAGAIN)
#: SO_ERROR after a connect that did complete but was reset since.
_RESET_AFTER_CONNECT = (errno.ECONNRESET, errno.EPIPE)
#: Client bytes held while a connect is pending; past this the client is
#: no longer read (nor watched) until the link starts.
EARLY_MAX = 65536
#: Client bytes held by all the pending connects of one process together
#: (many clients that talk while their connects hang must not grow it).
EARLY_TOTAL = 4 << 20
#: Builds a :class:`Connected` from a full tuple of its fields.
_new_tuple = tuple.__new__


class _Step(Enum):
    """What a race step returns while the race goes on (an enum, so the
    type checker can tell it from a result)."""

    GOING = 0


_GOING = _Step.GOING


class FailReason(StrEnum):
    """Why a connect failed, where it is not an errno's name (a str, so it
    logs as the word)."""

    TIMEOUT = "timeout"            # no answer within -t
    REFUSED = "refused"            # ECONNREFUSED
    SOCKET_ERROR = "socket error"  # no socket could be made (no errno text)


class Hooks:
    """What the server wants to hear about; every method is optional."""

    def attempt(self, g: int, c: int) -> None: ...
    def success(self, g: int, c: int) -> None: ...
    def failure(self, g: int, c: int, reason: str) -> None: ...   # a FailReason or an errno name
    def cancel(self, g: int, c: int) -> None: ...
    def suspect(self, g: int, c: int) -> None: ...
    def staggered(self, g: int, c: int) -> None: ...
    def measured(self, g: int, c: int, delay: float) -> None: ...


class Attempt:
    """One pending connect."""

    __slots__ = ("g", "c", "sock", "io", "timer", "t0", "sent", "reset")

    def __init__(self, g: int, c: int, sock: _socket.socket):
        self.g = g
        self.c = c
        self.sock = sock
        self.io: "IoWatcher | None" = None
        self.timer: "TimerWatcher | None" = None
        self.t0 = -1.0     # loop time the connect started (adaptive stagger only)
        self.sent = 0      # bytes of the client's early data its first send took
        self.reset = False # it connected, and was reset before the link began

    def stop(self) -> None:
        if self.io is not None:
            self.io.stop()
        if self.timer is not None:
            self.timer.stop()


class Connector:
    """Settings shared by every race of one master."""

    # (slots: compiled, an extension type whose settings races read as C fields)
    __slots__ = ("loop", "address_of", "hooks", "timeout", "estimator", "stagger", "source",
                 "keepalive", "urgent", "send_early", "abort_unused", "watchers", "early_held",
                 "early_cap")

    def __init__(self, loop: "EventLoop", address_of: "Callable[[int, int], tuple[int, tuple[Any, ...]]]",
                 hooks: Hooks, timeout: float = 5.0, stagger: float = 0.0,
                 source: "dict[int, tuple[Any, ...]] | None" = None,
                 keepalive: "tuple[int, int, int] | None" = None,
                 estimator: StaggerEstimator | None = None):
        self.loop = loop
        self.address_of = address_of
        self.hooks = hooks
        self.timeout = timeout
        # With an estimator the delay adapts per channel (its ceiling is the
        # configured stagger); without one, ``stagger`` is a fixed delay.
        self.estimator = estimator if estimator is not None and estimator.ceiling > 0 else None
        self.stagger = self.estimator.ceiling if self.estimator is not None else stagger
        self.source = source or {}
        self.keepalive = keepalive
        #: The server's :class:`~gbalance.proxy.urgent.UrgentRelay`: it owns each
        #: backend socket from its creation (urgent data raises SIGURG).
        self.urgent: "UrgentRelay | None" = None
        #: Send what the client said during the connect as soon as it
        #: completes (off when something must go first: a PROXY header).
        self.send_early = True
        #: Close every backend connection the race does not use with a reset
        #: (on with -P: one that completed unseen must not end with a clean
        #: EOF before its header, which a PROXY-protocol backend logs as an error).
        self.abort_unused = False
        #: Recycled watchers for races and links.
        self.watchers = Watchers(loop, timeout)
        #: Early client bytes held by this process's races, and the cap on them.
        self.early_held = 0
        self.early_cap = EARLY_TOTAL

    def early_room(self, have: int) -> int:
        """How many more early bytes a race holding ``have`` may read now."""
        return min(EARLY_MAX - have, self.early_cap - self.early_held)

    def open_socket(self, family: int) -> _socket.socket:
        """A non-blocking backend socket with balance's options set."""
        sock = _socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
        try:
            if cython.compiled:      # (the same calls on the descriptor: csys.pxd)
                fd = gbc_fd(sock)
                err = gbc_backend_options(fd)
                if err < 0:
                    raise OSError(-err, os.strerror(-err))
            else:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self.keepalive is not None:
                set_keepalive(sock, self.keepalive)
            src = self.source.get(family)
            if src is not None:
                sock.bind(src)
            if self.urgent is not None:    # urgent data from the backend raises SIGURG
                if cython.compiled:
                    if gbc_setowner(fd, self.urgent.pid) < 0:
                        raise OSError(f"fcntl(F_SETOWN) failed on descriptor {fd}")
                else:
                    set_owner(sock.fileno(), self.urgent.pid)
        except OSError:
            sock.close()
            raise
        return sock

    def race(self, client: _socket.socket, candidates: "Iterator[tuple[int, int]]") -> Connected | None:
        """Connect to the first candidate that answers; None when all fail.

        Blocks the calling greenlet (the server itself runs races from
        callbacks, see :class:`Race`); an error that ended the race is raised.
        """
        waiter = Waiter()
        Race(self, client, candidates, lambda race, result, error: waiter.switch((result, error))).start()
        result: "Connected | None"
        error: "BaseException | None"
        result, error = waiter.get()
        if error is not None:
            raise error
        return result


def set_keepalive(sock: _socket.socket, params: "tuple[(int, int, int)]") -> None:
    """Enable TCP keepalive with idle time, probe interval and probe count."""
    idle, interval, probes = params
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    if hasattr(socket, "TCP_KEEPINTVL"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    if hasattr(socket, "TCP_KEEPCNT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)


class Race:
    """The connect attempts made for one client: a state machine driven by
    libev callbacks (no greenlet of its own).

    :meth:`start` launches the first attempt; watcher callbacks then move
    the race on until it ends, and ``done(race, result, error)`` is called
    exactly once: ``result`` is the :class:`Connected` winner or None (no
    candidate answered, or the client left); ``error`` is an exception that
    ended the race early (``result`` is then None).  Whatever ends it, no
    attempt is left behind: its socket is closed and its connection count
    given back, so ``maxc`` stays right.
    """

    __slots__ = ("conn", "client", "candidates", "done", "peer", "pending", "client_io",
                 "stagger_timer", "exhausted", "early", "over", "shortage", "oob", "held", "source")

    def __init__(self, conn: Connector, client: _socket.socket, candidates: "Iterator[tuple[int, int]]",
                 done: Callable[["Race", "Connected | None", "BaseException | None"], None],
                 peer: Any = None):
        self.conn = conn
        self.client = client
        self.candidates = candidates
        self.done = done
        self.peer = peer               # the client's address, for whoever called
        self.pending: "list[Attempt]" = []
        self.client_io: "IoWatcher | None" = None
        self.stagger_timer: "TimerWatcher | None" = None
        self.exhausted = False
        self.early: bytes | bytearray | None = None    # only if the client talks first
        self.over = False
        #: The error when this process ran out of descriptors or memory for a connect.
        self.shortage: OSError | None = None
        #: For the caller: an urgent byte the client sent before it was accepted.
        self.oob = b""
        #: Early bytes of this race counted in the connector's ``early_held``.
        self.held = 0
        #: For the caller: its key for the client's address (per-source limit).
        self.source: Any = None

    # -- start and events --------------------------------------------------

    def start(self, talking: bool = False) -> None:
        """Launch the first attempt (``done`` may be called before this returns).

        ``talking``: the client has something waiting.  Bytes are read
        first and go out with the connect (see :meth:`_launch`).  A client
        that has already gone (an end before any byte, or a reset) is
        cancelled at once, as when it leaves during the connect: the
        attempt is counted and given back.  With ``abort_unused`` (-P) no
        connect is made for it at all: a backend would only see a reset.
        """
        try:
            gone = talking and not self._take_waiting()
            won = None if gone and self.conn.abort_unused else self._launch()
            if gone:
                if won is not None:
                    self.pending.append(won)
                result = self._finish(None)
            elif won is not None:
                result = self._finish(won)
            elif not self.pending:
                result = self._finish(None)
            else:
                if self.conn.early_room(self.held) > 0:
                    self.client_io = self.conn.watchers.io(self.client.fileno(), READ)
                    self.client_io.start(self._event, Race._on_client, None)
                return
        except BaseException as exc:
            self._fault(exc)
            return
        self.over = True            # (_end written out)
        self.done(self, result, None)

    def _event(self, step: Callable[["Race", "Attempt | None"], "Connected | None | _Step"], att: "Attempt | None") -> None:
        """A watcher fired: ``step`` is the handler of its kind (``_on_io``,
        ``_on_timeout``, ``_on_stagger``, ``_on_client``, passed as plain
        functions so arming a watcher allocates nothing more).  Move the
        race on, and end it if it is decided."""
        if self.over:
            return
        try:
            result = step(self, att)
        except BaseException as exc:
            self._fault(exc)
            return
        if result is not _GOING:
            self._end(result)

    def abandon(self) -> None:
        """Stop now (the server is stopping at once): close every attempt and
        give its count back; ``done`` is not called.  The client is the caller's."""
        if not self.over:
            self.over = True
            self._finish(None)

    def _end(self, result: "Connected | None") -> None:
        self.over = True
        self.done(self, result, None)

    def _fault(self, exc: BaseException) -> None:
        """An error mid-race: leave nothing behind, tell the caller."""
        if not self.over:
            self.over = True
            self._finish(None)
            self.done(self, None, exc)
        if not isinstance(exc, Exception):
            raise exc

    # -- attempts ----------------------------------------------------------

    def _launch(self) -> Attempt | None:
        """Start connecting to the next candidate.

        Returns an attempt that connected at once, or None; pending ones go
        to ``self.pending``.  Immediate failures move on to the next.
        """
        while not self.exhausted:
            try:
                g, c = next(self.candidates)
            except StopIteration:
                self.exhausted = True
                break
            att = self._connect(g, c)
            if att is None:
                continue               # failed at once: the next candidate
            if att.io is None:
                return att             # connected (or reset) at once
            self.pending.append(att)
            self._arm_stagger(att)
            return None
        return None

    def _connect(self, g: int, c: int) -> Attempt | None:
        """Open a socket and connect it to channel ``g``/``c``.

        Returns the attempt (with an I/O watcher when its connect is
        pending, without when it is already decided), or None when it
        failed at once (reported; ``self.exhausted`` is set when no other
        candidate could fare better).
        """
        conn, hooks = self.conn, self.conn.hooks
        family, addr = conn.address_of(g, c)
        hooks.attempt(g, c)
        try:
            sock = conn.open_socket(family)
        except OSError as exc:
            if exc.errno in _LOCAL_SHORTAGE:
                # Out of descriptors or memory here: no channel is to
                # blame (no autodisable), and no other would fare better.
                self.shortage = exc
                hooks.cancel(g, c)
                self.exhausted = True
                return None
            hooks.failure(g, c, exc.strerror or FailReason.SOCKET_ERROR)
            return None
        rc = sock.connect_ex(addr)
        att = Attempt(g, c, sock)
        if rc == 0:
            return att
        if conn.estimator is not None:
            att.t0 = conn.loop.now()
        if rc in _NO_PORT:
            # Out of local ports for this destination: not the channel's fault.
            sock.close()
            hooks.cancel(g, c)
            return None
        if rc not in (errno.EINPROGRESS, errno.EALREADY):
            sock.close()
            hooks.failure(g, c, _reason(rc))
            return None
        early = self.early
        if early and conn.send_early:
            # The client has spoken: send now.  A near backend (this host)
            # has completed the handshake inside connect(), and the send
            # then ends the race with no loop turn; a far one is still
            # connecting (EAGAIN) and is waited for.  (_send_early written
            # out: the common case, one call less per connection.)
            if cython.compiled:
                sent = gbc_send(gbc_fd(sock), early, 0, len(early), DONTWAIT)
                if sent >= 0:
                    att.sent = sent
                    return att
                err = 0 if sent == GBC_AGAIN else -sent
            else:
                err = 0
                try:
                    att.sent = sock.send(early, DONTWAIT)
                    return att
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as exc:
                    err = exc.errno or 0
            if err:
                if err in _RESET_AFTER_CONNECT:
                    att.reset = True
                    return att
                if err > 0:
                    sock.close()
                    hooks.failure(g, c, _reason(err))
                    return None
        att.io = conn.watchers.io(sock.fileno(), WRITE)
        att.io.start(self._event, Race._on_io, att)
        if conn.timeout > 0:
            att.timer = conn.watchers.timer()
            att.timer.again(self._event, Race._on_timeout, att)   # the full -t, whatever its past
        return att

    def _arm_stagger(self, att: Attempt) -> None:
        conn = self.conn
        if conn.stagger <= 0 or self.exhausted:
            return
        delay = conn.estimator.delay(att.g, att.c) if conn.estimator is not None else conn.stagger
        if self.stagger_timer is not None:
            self.stagger_timer.stop()
        self.stagger_timer = conn.loop.timer(delay)
        self.stagger_timer.start(self._event, Race._on_stagger, att)

    def _fail(self, att: Attempt, reason: str) -> None:
        att.stop()
        self._recycle(att, True)
        att.sock.close()
        self.pending.remove(att)
        self.conn.hooks.failure(att.g, att.c, reason)

    def _recycle(self, att: Attempt, with_io: bool) -> None:
        """Give a stopped attempt's timer and I/O watcher back to the pool."""
        watchers = self.conn.watchers
        if att.timer is not None:        # (none when the connect was decided at once)
            watchers.recycle_timer(att.timer)
            att.timer = None
        if with_io:
            watchers.recycle_io(att.io)
            att.io = None

    def _finish(self, winner: Attempt | None) -> "Connected | None":
        """Stop every watcher, close the losers, return the winner's result."""
        if self.held:
            self.conn.early_held -= self.held     # the link holds them now, or nobody
            self.held = 0
        for att in self.pending:
            att.stop()
            if att is not winner:
                self._recycle(att, True)
                if self.conn.abort_unused:
                    _abort_on_close(att.sock)
                att.sock.close()
                self.conn.hooks.cancel(att.g, att.c)
        self.pending = []
        if self.client_io is not None:
            self.client_io.stop()
        if self.stagger_timer is not None:
            self.stagger_timer.stop()
        if winner is None:
            self.conn.watchers.recycle_io(self.client_io)
            self.client_io = None
            return None
        # winner.stop() and self._recycle(winner, False) written out: a
        # connect decided at once (the common case) has neither watcher.
        # Its I/O watcher goes on with the link.
        if winner.io is not None:
            winner.io.stop()
        if winner.timer is not None:
            winner.timer.stop()
            self.conn.watchers.recycle_timer(winner.timer)
            winner.timer = None
        conn = self.conn
        if conn.estimator is not None and not winner.reset:
            # A connect that was pending: fold its time in (Karn: a reset
            # or a lost race gives no sample); an instant one counts as 0.
            took = conn.loop.now() - winner.t0 if winner.t0 >= 0 else 0.0
            conn.hooks.measured(winner.g, winner.c, conn.estimator.sample(winner.g, winner.c, took))
        conn.hooks.success(winner.g, winner.c)
        # tuple.__new__ directly: a NamedTuple's own __new__ is a Python
        # function, one more frame per connection for the same tuple.
        return _new_tuple(Connected, (winner.sock, winner.g, winner.c, self.client_io, winner.io,
                                      bytes(self.early) if self.early else b"", winner.reset, winner.sent))

    def _client_gone(self) -> bool:
        """Read from the client: True if it hung up.

        Data is kept for the link and the watch goes on, so a reset that
        follows a request is still seen.  The watch stops once the buffer
        is full (this race's, or what the process may hold for all of
        them: then the bytes wait in the kernel), or at an end of stream
        after data (a half-close).
        """
        early = self.early
        room = self.conn.early_room(self.held)
        if room <= 0:
            self.client_io.stop()  # type: ignore[union-attr]  # called only from client_io's callback
            return False
        try:
            data = self.client.recv(room, DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        if not data:
            if not early:
                return True
            self.client_io.stop()  # type: ignore[union-attr]  # (as above)
            return False
        if early is None:
            early = self.early = data
        else:
            if not isinstance(early, bytearray):
                early = self.early = bytearray(early)
            early += data
        self.held += len(data)
        self.conn.early_held += len(data)
        if len(data) >= room:
            self.client_io.stop()  # type: ignore[union-attr]  # (as above)
        return False

    def _take_waiting(self) -> bool:
        """Keep what the client sent before its race began: False if it has
        gone instead (an end before any byte, or a reset; a reset is seen
        only once, so it must be acted on here)."""
        conn = self.conn
        room = min(EARLY_MAX, conn.early_cap - conn.early_held)    # (early_room(0) written out)
        if room <= 0:
            return True          # no room: its bytes (or its end) wait in the kernel
        if cython.compiled:
            data = gbc_recv_bytes(gbc_fd(self.client), room, DONTWAIT)
            if isinstance(data, int):
                return data == GBC_AGAIN
        else:
            try:
                data = self.client.recv(room, DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
        if not data:
            return False
        self.early = data
        n = len(data)
        self.held = n
        conn.early_held += n
        return True

    # -- the race ------------------------------------------------------------

    def _send_early(self, att: Attempt) -> int:
        """Send the client's early bytes on ``att``: 0 if the send took
        them, -1 if the connect is still pending, else the errno."""
        try:
            att.sent = att.sock.send(self.early, DONTWAIT)  # type: ignore[arg-type]  # called only with early bytes held
            return 0
        except (BlockingIOError, InterruptedError):
            return -1
        except OSError as exc:
            return exc.errno

    # -- the race: one handler per watcher kind ------------------------------

    def _on_io(self, att: Attempt) -> "Connected | None | _Step":
        """A pending connect became writable: it connected, or it failed."""
        if att not in self.pending:
            return _GOING
        if self.early and self.conn.send_early:
            # The client has spoken: its bytes go now, and the send tells
            # how the connect went (no SO_ERROR look-up needed).
            err = max(self._send_early(att), 0)
        else:
            err = att.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            return self._finish(att)
        if err in _RESET_AFTER_CONNECT:
            # Connected, then reset before we looked (reading SO_ERROR cleared it).
            att.reset = True
            return self._finish(att)
        self._fail(att, _reason(err))
        return self._next()

    def _on_timeout(self, att: Attempt) -> "Connected | None | _Step":
        """A pending connect had no answer within -t."""
        if att not in self.pending:
            return _GOING
        self._fail(att, FailReason.TIMEOUT)
        return self._next()

    def _on_stagger(self, att: Attempt) -> "Connected | None | _Step":
        """The stagger delay ran out with ``att`` (and maybe others) pending:
        suspect them and start a parallel attempt on the next candidate."""
        if not self.pending or self.exhausted:
            return _GOING
        done = _settled(self.pending)
        if done is not None:
            # Connected (or failed) already; the loop had not told us yet.
            return self._on_io(done)
        hooks = self.conn.hooks
        for p in self.pending:
            hooks.suspect(p.g, p.c)
        if att in self.pending:
            hooks.staggered(att.g, att.c)
            if self.conn.estimator is not None:
                hooks.measured(att.g, att.c, self.conn.estimator.backoff(att.g, att.c))
        return self._next()

    def _on_client(self, _att: None) -> "Connected | None | _Step":
        """The client sent something, or left, while connects are pending."""
        if self._client_gone():
            return self._finish(None)
        return _GOING

    def _next(self) -> "Connected | None | _Step":
        """Launch the next candidate: the race's result, or ``_GOING``."""
        won = self._launch()
        if won is not None:
            return self._finish(won)
        if not self.pending:
            return self._finish(None)
        return _GOING


#: SO_LINGER on with a zero timeout: close() aborts (RST) instead of a FIN.
_LINGER_ABORT = b"\x01\x00\x00\x00\x00\x00\x00\x00"


def _abort_on_close(sock: _socket.socket) -> None:
    """Make closing ``sock`` reset its connection if it has one (a connect
    still pending is simply dropped)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    except OSError:
        pass


def _reason(err: int) -> str:
    """How a failed connect is reported (``refused``, else the errno's name)."""
    return FailReason.REFUSED if err == errno.ECONNREFUSED else errno.errorcode.get(err, str(err))


def _settled(pending: "list[Attempt]") -> Attempt | None:
    """The first pending attempt whose connect has finished, one way or the other.

    A zero-timeout poll per attempt, made only when a stagger delay runs out.
    """
    p = select.poll()
    for att in pending:
        p.register(att.sock.fileno(), select.POLLOUT)
    ready = {fd for fd, _ in p.poll(0)}
    for att in pending:
        if att.sock.fileno() in ready:
            return att
    return None
