"""The hot path: copy bytes both ways between a client and its backend.

A :class:`Link` is one proxied connection made of two :class:`Flow` objects
(client to server and back).  Each flow is driven by libev watcher
callbacks in the hub rather than by a greenlet of its own: an idle
connection then costs two watchers and a few small objects, and a short one
costs no greenlet switches at all.

Copying uses one scratch buffer shared by every flow.  That is safe because
a callback runs to completion: data is received into the scratch buffer and
sent at once with a non-blocking send; only when the destination cannot
take it all is the rest copied out (the only per-chunk allocation, and only
under back-pressure) and the flow waits for the destination to drain.

A flow whose reads fill the whole buffer (bulk data) leaves the one-read
copy path.  On Linux it opens a private pipe and measures both bulk ways
in turn (gbalance.proxy.bulkmode): ``os.splice`` through the pipe, so
the bytes never enter Python, and copying in 32 KB pieces, several per
wake-up; it keeps the faster for a while, then measures again.  Without
a pipe it copies.  The packet dump (``-p``) always uses the one-read
copy path.

Half-close is propagated: EOF in one direction shuts down the write side of
the other socket and the opposite direction keeps flowing until it ends too.
An error on either socket (a reset, a timeout) is passed on as an error:
what the link still holds for the surviving side is sent if the socket
takes it at once, then that side is closed with a reset (``SO_LINGER``
zero), as a direct connection would show it.  Byte counters are slots of
the shared table, updated with a plain indexed add.

Urgent data: Linux keeps the urgent byte out of the stream (no
``SO_OOBINLINE``) and stops every read at the urgent mark.  ``recv``
steps over the mark on the next call, but ``splice`` never does: it
returns EAGAIN there (or 0 once the peer half-closed), with the rest of the
stream still queued.  So a splicing flow that gets nothing from a readable
socket takes the urgent byte if it is still there and reads once with
``recv``, which moves past the mark; splicing then goes on.
"""


import _socket
import fcntl
import os
import socket
import struct
import sys
import termios
from typing import TYPE_CHECKING, Any, Callable

from gbalance.proxy.bulkmode import BulkChoice
from gbalance.proxy.dump import dump as render_dump
from gbalance.proxy import watchers as _watchers
from gbalance.proxy.watchers import READ, READ_WRITE, WRITE

try:
    import cython
except ImportError:     # no Cython here: this module runs as Python
    from gbalance.proxy import nocython as cython

if TYPE_CHECKING:
    from gbalance.proxy.urgent import UrgentRelay
    from gbalance.proxy.watchers import EventLoop, IoWatcher, Watchers

CHUNK = 65536
SCRATCH = bytearray(CHUNK)
SCRATCH_MV = memoryview(SCRATCH)

HAVE_SPLICE = hasattr(os, "splice") and sys.platform.startswith("linux")
SPLICE_FLAGS = (getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)) if HAVE_SPLICE else 0
#: Splice pipe size: what one stalled direction can pin in the kernel.  A
#: pipe starts with this (the Linux default); one the kernel made smaller
#: (the user's pipe budget, pipe-user-pages-soft, is spent) is not used.
PIPE_SIZE = 1 << 16
SPLICE_CHUNK = PIPE_SIZE
#: Pipefuls one read wake-up may move before other links get their turn
#: (so at most 1 MB per wake-up and direction).
SPLICE_ROUNDS = 16
#: A bulk flow's copy way: bytes per read (small enough that the bytes are
#: still in the core's first-level cache when they are sent: 64 KB reads
#: cost twice as much per GB), and reads per wake-up (1 MB, as splicing).
COPY_CHUNK = 1 << 15
COPY_ROUNDS = 32
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
#: SO_LINGER {on, 0}: close() sends a reset.
LINGER_RESET = struct.pack("ii", 1, 0)
#: Every send and recv on a proxied socket passes this, so an accepted
#: client needs no ``setblocking(False)`` (one ioctl per connection saved);
#: where it does not exist sockets are made non-blocking instead.
DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
#: Linux's ``struct tcp_info`` (``getsockopt(TCP_INFO)``): the first byte is
#: the TCP state (CLOSE_WAIT: the peer's end has come, behind all it sent),
#: and the 64-bit ``tcpi_bytes_received`` at byte 128 is the sequence space
#: received: the bytes, an urgent byte if any, and 1 for the end.
_TCP_INFO = getattr(socket, "TCP_INFO", 0) if sys.platform.startswith("linux") else 0


def _plain_tcp() -> bool:
    """Are this process's stream sockets plain TCP?  Under ``mptcpize`` (or
    a BPF program that picks the protocol) they are MPTCP, whose TCP_INFO
    describes one subflow only: then the end is never taken from it."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            return probe.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == socket.IPPROTO_TCP
    except (OSError, AttributeError):
        return False


_TCP_INFO_LEN = 136
_CLOSE_WAIT = 8
_U64 = struct.Struct("=Q")
#: A last send: hold the bytes back so the end (FIN) goes in the same segment.
_LAST = DONTWAIT | getattr(socket, "MSG_MORE", 0)
#: Whether a link looks for its backend's end at the first read of the reply.
_PROBE_END = bool(_TCP_INFO) and _LAST != DONTWAIT and _plain_tcp()
#: ioctls for the bytes a socket has received but not yet been read
#: (SIOCINQ) and sent but not yet acknowledged (SIOCOUTQ).
_SIOCINQ = getattr(termios, "FIONREAD", 0x541B)
_SIOCOUTQ = getattr(termios, "TIOCOUTQ", 0x5411)
_INT = struct.Struct("i")

if cython.compiled:
    # The compiled build calls recv, send, shutdown and getsockopt(TCP_INFO)
    # directly on descriptors (csys.pxd): no socket method, argument
    # parsing, GIL release or result tuple per call.  Each branch below
    # mirrors the Python code after it, errno for exception.
    gbc_init(_socket.socket)


class PipeBudget:
    """How many splice pipes this process may hold at once (2 descriptors
    each): the server sets ``limit`` from what its connection limit leaves
    of the descriptor limit.  One per process, as descriptors are."""

    __slots__ = ("open", "limit")

    def __init__(self) -> None:
        self.open = 0
        self.limit = 1 << 62


PIPES = PipeBudget()


def read_watcher(link: "Link", fd: int, reuse: "IoWatcher | None" = None) -> "IoWatcher":
    """A read watcher on ``fd``: ``reuse`` (a stopped watcher on that fd) if it can be.

    Reusing the connect's watchers saves creating two per connection; a
    watcher whose events cannot be changed (another loop backend) is
    replaced by a new one.
    """
    if reuse is not None and not reuse.active and reuse.fd == fd:
        try:
            if reuse.events & READ_WRITE != READ:
                reuse.events = READ
            return reuse
        except (AttributeError, TypeError, ValueError):
            pass
    return new_watcher(link, fd, READ)


def new_watcher(link: "Link", fd: int, events: int) -> "IoWatcher":
    """A stopped I/O watcher from the link's pool (or its loop, without one)."""
    if link.watchers is not None:
        return link.watchers.io(fd, events)
    return link.loop.io(fd, events)


class Flow:
    """One direction of a link: read ``src``, write ``dst``, count bytes."""

    # (13 slots: with one more the compiled flow takes the next 16-byte
    # size class, 32 bytes more per held connection; the counters are
    # ``link.q``, and ``done`` also says whether the source was reset early.)
    __slots__ = ("link", "src", "dst", "idx", "rw", "ww", "pending",
                 "pipe_r", "pipe_w", "fill", "done", "probe", "bulk")

    def __init__(self, link: "Link", src: _socket.socket, dst: _socket.socket, idx: int,
                 rw: "IoWatcher | None" = None):
        self.link = link
        self.src = src
        self.dst = dst
        self.idx = idx
        if cython.compiled:  # noqa: SIM108  (in a ternary mypy would see the C call)
            fd = gbc_fd(src)
        else:
            fd = src.fileno()
        # read_watcher()'s two common cases without its calls: the race's
        # watcher as it is, or (a connect decided at once) one from the pool.
        if rw is None:
            watchers = link.watchers
            if watchers is None:
                self.rw = link.loop.io(fd, READ)
            else:
                # Watchers.io() written out for its common case: a pooled
                # read watcher pointed at this descriptor.
                free = watchers.io_free
                w = free.pop() if free else None
                if w is not None and w.events == READ:
                    try:
                        w.fd = fd
                    except (AttributeError, TypeError, ValueError):
                        w = None
                    self.rw = w if w is not None else link.loop.io(fd, READ)
                else:
                    if w is not None:
                        free.append(w)
                    self.rw = watchers.io(fd, READ)
        elif not rw.active and rw.fd == fd and rw.events & READ_WRITE == READ:
            self.rw = rw
        else:
            self.rw = read_watcher(link, fd, rw)
        self.ww: "IoWatcher | None" = None
        self.pending: "bytes | None" = None
        self.pipe_r = -1
        self.pipe_w = -1
        self.fill = 0
        #: False while the source sends, True once it has ended; None: the
        #: source was reset before the link began (the connect reported it
        #: and so cleared the error), so its end is to be passed on as an abort.
        self.done: "bool | None" = False
        #: Look at the next read whether the source has already ended.
        self.probe = False
        #: A bulk flow's choice between splicing and copying (None: not bulk).
        self.bulk: "BulkChoice | None" = None

    @property
    def arrow(self) -> str:
        """How the packet dump (``-p``) marks this direction."""
        return "->" if self.link is None or self.link.up is self else "-<"

    # -- copy path ---------------------------------------------------------

    def __call__(self) -> None:
        # The read watcher's callback is the flow itself (``rw.start(flow)``):
        # a bound method per flow would be 64 bytes more per held connection.
        if cython.compiled:
            link = self.link
            fd = gbc_fd(self.src)
            end = -1
            if self.probe:
                self.probe = False
                end = gbc_end_seen(fd)
            n = gbc_recv_into(fd, SCRATCH, CHUNK, DONTWAIT)
            if n < 0:
                if n != GBC_AGAIN:
                    link.abort()
                return
            if not n:
                self.eof()
                return
            link.q[self.idx] += n
            link.active = True
            if link.dump is not None:
                link.dump(render_dump(self.arrow, SCRATCH_MV[:n]))
            last = end == n + 1
            m = gbc_send(gbc_fd(self.dst), SCRATCH, 0, n, _LAST if last else DONTWAIT)
            if m < 0:
                if m != GBC_AGAIN:
                    link.abort()
                    return
                m = 0
            if m < n:
                self.pending = bytes(SCRATCH_MV[m:n])
                self._wait_writable(self.on_write)
            elif last:
                self.eof()
            elif n == CHUNK and self.bulk is None and link.dump is None:
                self._start_bulk()
            return
        info = None
        if self.probe:
            self.probe = False
            try:
                info = self.src.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
            except OSError:
                pass
        try:
            n = self.src.recv_into(SCRATCH, 0, DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            self.link.abort()
            return
        if not n:
            self.eof()
            return
        self.link.q[self.idx] += n
        self.link.active = True
        if self.link.dump is not None:
            self.link.dump(render_dump(self.arrow, SCRATCH_MV[:n]))
        # (_all_read written out: a function call less per short connection)
        last = (info is not None and len(info) >= _TCP_INFO_LEN and info[0] == _CLOSE_WAIT
                and _U64.unpack_from(info, 128)[0] == n + 1)
        try:
            m = self.dst.send(SCRATCH_MV[:n], _LAST if last else DONTWAIT)
        except BlockingIOError:
            m = 0
        except OSError:
            self.link.abort()
            return
        if m < n:
            # (bytes held back by _LAST go out with this rest: no MSG_MORE there)
            self.pending = bytes(SCRATCH_MV[m:n])
            self._wait_writable(self.on_write)
        elif last:
            self.eof()       # its FIN leaves with the bytes just sent
        elif n == CHUNK and self.bulk is None and self.link.dump is None:
            self._start_bulk()

    #: Read what ``src`` has and send it on (the copy path).
    on_read = __call__

    def on_write(self) -> None:
        # (the write watcher's callback: it runs only while a rest is held)
        pending: bytes = self.pending  # type: ignore[assignment]
        try:
            m = self.dst.send(pending, DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            self.link.abort()
            return
        self.link.active = True          # bytes moved: not idle (-T)
        if m < len(pending):
            self.pending = pending[m:]
            return
        self.pending = None
        self.ww.stop()  # type: ignore[union-attr]  # (the watcher that called it)
        self.rw.start(self._reader())

    def _wait_writable(self, callback: Callable[[], None]) -> None:
        self.rw.stop()
        urgent = self.link.urgent
        if urgent is not None:   # nobody reads src now: have its errors reported
            urgent.add(self.src, self.dst, self.link)
        if self.ww is None:
            self.ww = new_watcher(self.link, self.dst.fileno(), WRITE)
        self.ww.start(callback)

    def _reader(self) -> Callable[[], None]:
        """The read callback of this flow's way now (after a wait to write)."""
        bulk = self.bulk
        if bulk is None:
            return self
        return self.on_read_copy if bulk.copy else self.on_read_splice

    # -- bulk: the choice between its two ways ------------------------------

    def _start_bulk(self) -> None:
        """A read filled the buffer: this flow carries bulk data from now on."""
        if self.link.splice:
            self._open_pipe()
        self.bulk = BulkChoice(self.pipe_r >= 0, self.link.loop.now())
        if self.rw.active:
            self.rw.stop()
            self.rw.start(self._reader())

    def _after_wake(self, moved: int) -> None:
        """Tell the choice what a read wake-up moved; change ways if it says
        so and nothing of the old way is held (a rest to send, a pipe to
        drain: those restart reading through ``_reader`` once done)."""
        bulk: BulkChoice = self.bulk  # type: ignore[assignment]
        was = bulk.copy
        if bulk.step(self.link.loop.now(), moved) != was and self.rw.active \
                and self.pending is None and not self.fill:
            self.rw.stop()
            self.rw.start(self._reader())

    def on_read_copy(self) -> None:
        """A bulk flow's copy way: COPY_CHUNK reads, each sent on at once,
        up to COPY_ROUNDS per wake-up."""
        link = self.link
        moved = 0
        rounds = COPY_ROUNDS
        while rounds:
            rounds -= 1
            if cython.compiled:
                n = gbc_recv_into(gbc_fd(self.src), SCRATCH, COPY_CHUNK, DONTWAIT)
                if n < 0:
                    if n != GBC_AGAIN:
                        link.abort()
                        return
                    break
            else:
                try:
                    n = self.src.recv_into(SCRATCH, COPY_CHUNK, DONTWAIT)
                except BlockingIOError:
                    break
                except OSError:
                    link.abort()
                    return
            if not n:
                self.eof()
                return
            link.q[self.idx] += n
            link.active = True
            moved += n
            if cython.compiled:
                m = gbc_send(gbc_fd(self.dst), SCRATCH, 0, n, DONTWAIT)
                if m < 0:
                    if m != GBC_AGAIN:
                        link.abort()
                        return
                    m = 0
            else:
                try:
                    m = self.dst.send(SCRATCH_MV[:n], DONTWAIT)
                except BlockingIOError:
                    m = 0
                except OSError:
                    link.abort()
                    return
            if m < n:
                self.pending = bytes(SCRATCH_MV[m:n])
                self._wait_writable(self.on_write)
                break
            if n < COPY_CHUNK:
                break            # the source is empty (or at an urgent mark)
        if self.link is None or link.closed:
            return
        self._after_wake(moved)

    # -- splice path (Linux) -----------------------------------------------

    def _open_pipe(self) -> None:
        if PIPES.open >= PIPES.limit:
            self.link.splice = False   # the descriptors left are for connections
            return
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self.link.splice = False   # out of fds: this link copies
            return
        try:
            small = fcntl.fcntl(w, F_GETPIPE_SZ) < PIPE_SIZE
        except OSError:
            small = True
        if small:
            # Over the per-user pipe budget the kernel hands out one-page
            # pipes: copying is faster than splicing through those.
            os.close(r)
            os.close(w)
            self.link.splice = False
            return
        self.pipe_r, self.pipe_w = r, w
        PIPES.open += 1
        # splice() blocks on a blocking socket whatever its flags say; the
        # copy path's sockets may be blocking (every call passes DONTWAIT).
        try:
            self.src.setblocking(False)
            self.dst.setblocking(False)
        except OSError:
            pass

    def on_read_splice(self) -> None:
        # Up to SPLICE_ROUNDS pipefuls per wake-up: a return to the loop
        # per pipeful (one epoll_wait and one callback each 40-60 KB) was
        # what bulk spent beside the splices themselves.
        rounds = SPLICE_ROUNDS
        moved = 0
        while True:
            try:
                n = os.splice(self.src.fileno(), self.pipe_w, SPLICE_CHUNK, flags=SPLICE_FLAGS)
            except BlockingIOError:
                if rounds < SPLICE_ROUNDS:
                    break        # drained the socket: wait for more
                n = 0
            except OSError:
                self.link.abort()
                return
            if not n:
                # Nothing from a readable socket: the end, a spurious wake-up,
                # or the urgent mark, which splice cannot pass.  The pipe is
                # empty here, so the urgent byte and one recv keep the order.
                if self.link.urgent is not None:
                    self.take_urgent()
                self.on_read()
                return
            self.link.q[self.idx] += n
            self.link.active = True
            moved += n
            self.fill = n
            self.drain()
            rounds -= 1
            if self.link is None or self.link.closed:
                return           # the link ended
            if self.fill or not rounds or not self.rw.active:
                break            # waits for dst, or its turn is over
        self._after_wake(moved)

    def drain(self) -> None:
        """Move what the pipe holds to the destination, or wait for it."""
        while self.fill:
            try:
                m = os.splice(self.pipe_r, self.dst.fileno(), self.fill, flags=SPLICE_FLAGS)
            except BlockingIOError:
                if self.ww is None or not self.ww.active:
                    self._wait_writable(self.drain)
                return
            except OSError:
                self.link.abort()
                return
            self.fill -= m
            self.link.active = True      # bytes moved: not idle (-T)
        if self.ww is not None and self.ww.active:
            self.ww.stop()
            self.rw.start(self._reader())

    def take_urgent(self) -> None:
        """Relay the urgent byte of ``src`` if one is waiting (as UrgentRelay does)."""
        try:
            byte = self.src.recv(1, socket.MSG_OOB | DONTWAIT)
            if byte:
                self.dst.send(byte, socket.MSG_OOB | DONTWAIT)
        except OSError:
            pass  # none, already taken, or not yet arrived; errors show on the next read

    def flush(self) -> None:
        """Pass on what this flow holds if ``dst`` takes it at once (before a reset)."""
        try:
            if self.pending is not None:
                self.dst.send(self.pending, DONTWAIT)
                self.pending = None
            if self.fill:
                self.fill -= os.splice(self.pipe_r, self.dst.fileno(), self.fill, flags=SPLICE_FLAGS)
        except OSError:
            pass

    # -- ends ----------------------------------------------------------------

    def eof(self) -> None:
        """The source finished sending: pass the half-close on."""
        self.rw.stop()
        reset_early = self.done is None
        self.done = True
        link = self.link
        if reset_early:
            link.abort()
            return
        if link.dump is not None and self.arrow == "->":
            link.dump("-> 0\n\n")
        if link.up.done and link.down.done:
            # Both directions ended: close() sends the FIN, no shutdown needed.
            link.close()
            return
        if cython.compiled:
            gbc_shutdown(gbc_fd(self.dst), socket.SHUT_WR)    # (an error: as below, ignored)
            return
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def stop(self) -> None:
        self.rw.stop()
        if self.ww is not None:
            self.ww.stop()
        if self.pipe_r >= 0:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1
            PIPES.open -= 1


def _all_read(info: bytes, n: int) -> bool:
    """Did a first read of ``n`` bytes take all the peer sent, with its end
    already in?  ``info``: its ``struct tcp_info`` from just before the read.

    The counts differ when the read stopped at an urgent mark, or when
    more came than one read takes: the end is then left to a later read.
    """
    return (len(info) >= _TCP_INFO_LEN and info[0] == _CLOSE_WAIT
            and _U64.unpack_from(info, 128)[0] == n + 1)


class Link:
    """One proxied connection: two flows and the bookkeeping around them."""

    __slots__ = ("loop", "client", "server", "q", "up", "down", "c_idx", "closed",
                 "active", "dump", "splice", "on_close", "urgent", "early", "early_sent", "watchers",
                 "source")

    def __init__(self, loop: "EventLoop", client: _socket.socket, server: _socket.socket, q: memoryview,
                 sent_idx: int, rcvd_idx: int, c_idx: int,
                 on_close: Callable[["Link"], None] | None = None,
                 dump: Callable[[str], None] | None = None,
                 urgent: "UrgentRelay | None" = None,
                 client_watcher: "IoWatcher | None" = None, server_watcher: "IoWatcher | None" = None,
                 early: bytes = b"", server_reset: bool = False, early_sent: int = 0,
                 watchers: "Watchers | None" = None):
        """``early``: client bytes read while the connect was pending, sent
        first (``early_sent`` of them already went with the connect);
        ``server_reset``: the backend reset the connection before the link
        began (its queued bytes are still passed on, then the reset);
        ``watchers``: a :class:`~gbalance.proxy.watchers.Watchers` pool to take
        watchers from and give them back to at close."""
        self.loop = loop
        self.watchers = watchers
        self.early_sent = early_sent
        self.client = client
        self.server = server
        self.q = q
        self.c_idx = c_idx
        self.closed = False
        self.active = False
        self.dump = dump
        self.splice = HAVE_SPLICE and dump is None
        self.on_close = on_close
        self.urgent = urgent
        self.early = early
        self.up = Flow(self, client, server, sent_idx, client_watcher)
        self.down = Flow(self, server, client, rcvd_idx, server_watcher)
        if server_reset:
            self.down.done = None          # its end is an abort (Flow.done)
        # A backend that answers and closes (HTTP/1.0, "Connection: close")
        # has usually queued its end behind its reply by the time the reply
        # is read: then both go to the client in one segment, not two.
        self.down.probe = _PROBE_END
        #: The owner's key for the client's address (the per-source limit).
        self.source: Any = None

    def start(self, preamble: bytes = b"", oob: bytes = b"") -> None:
        """Start both flows.  ``preamble`` (what is left of a PROXY header) goes
        to the backend before anything else and is neither counted nor dumped;
        ``oob`` (an urgent byte taken from the client before the link, which
        then raised no SIGURG) is sent on as urgent after the early bytes."""
        up = self.up
        early = self.early
        if early:
            self.early = b""
            self.q[up.idx] += len(early)
            self.active = True
            if self.dump is not None:
                self.dump(render_dump(up.arrow, early))
            if self.early_sent:
                early = early[self.early_sent:]
        first = preamble + early if preamble else early
        if first:
            # The backend has just connected: it nearly always takes the
            # request at once, with no write watcher and no loop turn.
            if cython.compiled:
                m = gbc_send(gbc_fd(self.server), first, 0, len(first), DONTWAIT)
                if m < 0:        # would block, or an error on_write will meet again
                    m = 0
            else:
                try:
                    m = self.server.send(first, DONTWAIT)
                except OSError:      # would block, or an error on_write will meet again
                    m = 0
            if m < len(first):
                up.pending = first[m:] if m else first
                up._wait_writable(up.on_write)
            else:
                up.rw.start(up)
        else:
            up.rw.start(up)
        if oob:
            try:
                self.server.send(oob, socket.MSG_OOB | DONTWAIT)
            except OSError:
                pass             # the flows meet the error, if any, next
        self.down.rw.start(self.down)
        urgent = self.urgent
        if urgent is not None and urgent.alert:     # (add_link's own test, without its call)
            urgent.add_link(self)

    def abort(self) -> None:
        """An error on either side: reset both, after passing on what can go at once.

        The failed socket is closed either way; the other one learns of the
        failure as a reset, not as a clean end it could take for a whole
        reply.  Bytes the failed side sent before failing were read (and
        forwarded) before the error showed; what the link still holds is
        sent if the survivor takes it without waiting.
        """
        if self.closed:
            return
        self.up.flush()
        self.down.flush()
        for sock in (self.client, self.server):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            except OSError:
                pass
        self.close()

    def in_flight(self) -> bool:
        """Is any byte of this link on its way: held here (a flow's rest or
        pipe), received by either socket and not yet read, or sent and not
        yet acknowledged by the peer?  Asked when ``-T`` ends the link: a
        clean end (FIN) would then pass a cut transfer off as a whole one."""
        if self.up.pending is not None or self.down.pending is not None or self.up.fill or self.down.fill:
            return True
        for sock in (self.client, self.server):
            try:
                fd = sock.fileno()
                if _INT.unpack(fcntl.ioctl(fd, _SIOCINQ, b"\0\0\0\0"))[0] or \
                        _INT.unpack(fcntl.ioctl(fd, _SIOCOUTQ, b"\0\0\0\0"))[0]:
                    return True
            except OSError:
                return True      # cannot tell: take the safe side
        return False

    def reset(self) -> None:
        """End the link with a reset on both sides (SO_LINGER 0), sending
        nothing more: the idle timeout's end when bytes are in flight."""
        if self.closed:
            return
        for sock in (self.client, self.server):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            except OSError:
                pass
        self.close()

    def socket_failed(self, sock: _socket.socket) -> None:
        """The relay saw an error or hang-up on ``sock``.

        The flow reading ``sock`` finds it itself if it is reading; one
        that waits for its destination (or has ended) would not look at
        ``sock`` again, so the link is aborted now.
        """
        if self.closed:
            return
        flow = self.up if sock is self.client else self.down
        if not flow.rw.active:
            self.abort()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        up, down = self.up, self.down
        if up.ww is None and down.ww is None and up.pipe_r < 0 and down.pipe_r < 0:
            # A short connection's close: only the read watchers to stop
            # (Flow.stop written out, two calls less per connection).
            up.rw.stop()
            down.rw.stop()
        else:
            up.stop()
            down.stop()
        watchers = self.watchers
        if watchers is not None:
            # The stopped watchers serve later connections; nothing touches
            # a closed link's flows again (every path checks ``closed`` first).
            # (recycle_io's test and keeping written out for the two read
            # watchers, which were stopped just above)
            free = watchers.io_free
            keep = _watchers.KEEP
            w = up.rw
            if not w.active and len(free) < keep:
                w.callback = None
                w.args = None
                free.append(w)
            w = down.rw
            if not w.active and len(free) < keep:
                w.callback = None
                w.args = None
                free.append(w)
            if up.ww is not None:        # (a short connection never waited to write)
                watchers.recycle_io(up.ww)
            if down.ww is not None:
                watchers.recycle_io(down.ww)
            up.rw = down.rw = up.ww = down.ww = None  # type: ignore[assignment]  # closed: never read again
        # No flow method looks at its link once it is closed: let go of it,
        # so a closed link is freed at once, not by the cycle collector.
        up.link = down.link = None  # type: ignore[assignment]  # (as above)
        urgent = self.urgent
        if urgent is not None and urgent.peers:     # (remove_link's own test, without its call)
            urgent.remove_link(self)
        if cython.compiled:
            gbc_close(self.client)       # (socket.close() without the GIL's round trip)
            gbc_close(self.server)
        else:
            self.client.close()
            self.server.close()
        self.q[self.c_idx] -= 1
        if self.on_close is not None:
            self.on_close(self)
