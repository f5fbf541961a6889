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

On Linux a flow whose reads fill the whole buffer (bulk data) switches to
``os.splice`` through a private pipe, so the bytes never enter Python.
The packet dump (``-p``) always uses the copy path.

Half-close is propagated: EOF in one direction shuts down the write side of
the other socket and the opposite direction keeps flowing until it ends too.
An error on either socket closes both.  Byte counters are slots of the
shared table, updated with a plain indexed add.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import sys
from typing import Callable

from gbalance.dump import dump as render_dump

CHUNK = 65536
SCRATCH = bytearray(CHUNK)
SCRATCH_MV = memoryview(SCRATCH)

HAVE_SPLICE = hasattr(os, "splice") and sys.platform.startswith("linux")
SPLICE_FLAGS = (getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)) if HAVE_SPLICE else 0
PIPE_SIZE = 1 << 20
SPLICE_CHUNK = PIPE_SIZE


def read_watcher(loop, fd: int, reuse=None):
    """A read watcher on ``fd``: ``reuse`` (a stopped watcher on that fd) if it can be.

    Reusing the connect's watchers saves creating two per connection; a
    watcher whose events cannot be changed (another loop backend) is
    replaced by a new one.
    """
    if reuse is not None and not reuse.active and reuse.fd == fd:
        try:
            if reuse.events & 3 != 1:
                reuse.events = 1
            return reuse
        except (AttributeError, TypeError, ValueError):
            pass
    return loop.io(fd, 1)


class Flow:
    """One direction of a link: read ``src``, write ``dst``, count bytes."""

    __slots__ = ("link", "src", "dst", "q", "idx", "rw", "ww", "pending",
                 "pipe_r", "pipe_w", "fill", "arrow", "done")

    def __init__(self, link: "Link", src: socket.socket, dst: socket.socket, idx: int, arrow: str,
                 rw=None):
        self.link = link
        self.src = src
        self.dst = dst
        self.q = link.q
        self.idx = idx
        self.rw = read_watcher(link.loop, src.fileno(), rw)
        self.ww = None
        self.pending = None
        self.pipe_r = -1
        self.pipe_w = -1
        self.fill = 0
        self.arrow = arrow
        self.done = False

    # -- copy path ---------------------------------------------------------

    def on_read(self) -> None:
        try:
            n = self.src.recv_into(SCRATCH)
        except BlockingIOError:
            return
        except OSError:
            self.link.abort()
            return
        if not n:
            self.eof()
            return
        self.q[self.idx] += n
        self.link.active = True
        if self.link.dump is not None:
            self.link.dump(render_dump(self.arrow, SCRATCH_MV[:n]))
        try:
            m = self.dst.send(SCRATCH_MV[:n])
        except BlockingIOError:
            m = 0
        except OSError:
            self.link.abort()
            return
        if m < n:
            self.pending = bytes(SCRATCH_MV[m:n])
            self._wait_writable(self.on_write)
        elif n == CHUNK and self.link.splice:
            self._start_splice()

    def on_write(self) -> None:
        try:
            m = self.dst.send(self.pending)
        except BlockingIOError:
            return
        except OSError:
            self.link.abort()
            return
        if m < len(self.pending):
            self.pending = self.pending[m:]
            return
        self.pending = None
        self.ww.stop()
        self.rw.start(self.on_read)

    def _wait_writable(self, callback: Callable[[], None]) -> None:
        self.rw.stop()
        if self.ww is None:
            self.ww = self.link.loop.io(self.dst.fileno(), 2)
        self.ww.start(callback)

    # -- splice path (Linux) -----------------------------------------------

    def _start_splice(self) -> None:
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # out of fds: stay on the copy path
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
        self.pipe_r, self.pipe_w = r, w
        self.rw.stop()
        self.rw.start(self.on_read_splice)

    def on_read_splice(self) -> None:
        try:
            n = os.splice(self.src.fileno(), self.pipe_w, SPLICE_CHUNK, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError:
            self.link.abort()
            return
        if not n:
            self.eof()
            return
        self.q[self.idx] += n
        self.link.active = True
        self.fill = n
        self.drain()

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
        if self.ww is not None and self.ww.active:
            self.ww.stop()
            self.rw.start(self.on_read_splice)

    # -- ends ----------------------------------------------------------------

    def eof(self) -> None:
        """The source finished sending: pass the half-close on."""
        self.rw.stop()
        self.done = True
        link = self.link
        if link.dump is not None and self.arrow == "->":
            link.dump("-> 0\n\n")
        if link.up.done and link.down.done:
            # Both directions ended: close() sends the FIN, no shutdown needed.
            link.close()
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


class Link:
    """One proxied connection: two flows and the bookkeeping around them."""

    __slots__ = ("loop", "client", "server", "q", "up", "down", "c_idx", "closed",
                 "active", "dump", "splice", "on_close", "urgent")

    def __init__(self, loop, client: socket.socket, server: socket.socket, q: memoryview,
                 sent_idx: int, rcvd_idx: int, c_idx: int,
                 on_close: Callable[["Link"], None] | None = None,
                 dump: Callable[[str], None] | None = None,
                 urgent: "UrgentRelay | None" = None,
                 client_watcher=None, server_watcher=None):
        self.loop = loop
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
        self.up = Flow(self, client, server, sent_idx, "->", client_watcher)
        self.down = Flow(self, server, client, rcvd_idx, "-<", server_watcher)

    def start(self) -> None:
        self.up.rw.start(self.up.on_read)
        self.down.rw.start(self.down.on_read)
        if self.urgent is not None:
            self.urgent.add(self.client, self.server)
            self.urgent.add(self.server, self.client)

    def abort(self) -> None:
        """An error on either side: close both at once."""
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.up.stop()
        self.down.stop()
        if self.urgent is not None:
            self.urgent.remove(self.client)
            self.urgent.remove(self.server)
        self.client.close()
        self.server.close()
        self.q[self.c_idx] -= 1
        if self.on_close is not None:
            self.on_close(self)


class UrgentRelay:
    """Forward TCP urgent (out-of-band) bytes as balance 3.56 does.

    libev cannot watch for exceptional conditions, so one epoll set (Linux)
    watches every proxied socket for ``EPOLLPRI``; its own fd is watched by
    the hub.  Each urgent byte is read with ``MSG_OOB`` and sent on with
    ``MSG_OOB``.  Elsewhere urgent data is simply not relayed.
    """

    def __init__(self, loop):
        self.ep = select.epoll() if hasattr(select, "epoll") else None
        self.peers: dict[int, tuple[socket.socket, socket.socket]] = {}
        if self.ep is not None:
            self.watcher = loop.io(self.ep.fileno(), 1)
            self.watcher.start(self._on_event)

    def add(self, src: socket.socket, dst: socket.socket) -> None:
        if self.ep is None:
            return
        fd = src.fileno()
        try:
            self.ep.register(fd, select.EPOLLPRI)
        except OSError:
            return
        self.peers[fd] = (src, dst)

    def remove(self, src: socket.socket) -> None:
        """Forget a socket about to be closed.

        No ``epoll_ctl(DEL)``: closing the only descriptor of a socket
        removes it from the epoll set, which saves a syscall per socket.
        """
        self.peers.pop(src.fileno(), None)

    def _on_event(self) -> None:
        for fd, _ev in self.ep.poll(0):
            pair = self.peers.get(fd)
            if pair is None:
                continue
            src, dst = pair
            try:
                byte = src.recv(1, socket.MSG_OOB)
                if byte:
                    dst.send(byte, socket.MSG_OOB)
            except OSError:
                # Nothing urgent after all, or a dead peer: the flows see it.
                try:
                    self.ep.unregister(fd)
                except OSError:
                    pass
                self.peers.pop(fd, None)
